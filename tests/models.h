/* tests/models.h — the models every model-cache test uses, and a fixture.
   Included by several test files on purpose: each file gets its own copies
   of the class objects, which must resolve to one registered class. */
#ifndef FLASH_TEST_MODELS_H
#define FLASH_TEST_MODELS_H
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

#define USER_FIELDS(F) F(I64, id) F(STR, first_name) F(STR, username) F(I32, age) F(F64, score) F(BOOL, active) F(BYTES, avatar)
FLASH_MODEL(User, USER_FIELDS)
FLASH_GET_KEYS(User, (id), (username))
FLASH_FILTER_KEYS(User, (first_name))

#define EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title) F(I64, owner)
FLASH_MODEL(Event, EVENT_FIELDS)
FLASH_INSTANCE_CACHE(EventCacheOnSlug, Event, (slug))

#define PART_FIELDS(F) F(I64, id) F(I64, user) F(I64, event)
FLASH_MODEL(Participant, PART_FIELDS)
FLASH_GET_KEYS(Participant, (user, event))
FLASH_COUNT_CACHE(ParticipantCount, Participant, (event))
FLASH_IDS_CACHE(ParticipantIds, Participant, (event))

/* A custom fallback (get_result) and counters the tests read. */
void events_of_owner(flash_ctx *ctx, flash_fetch *f, void *user_data);
FLASH_LIST_CACHE_OPT(EventsOfOwner, Event, (owner), .fallback = events_of_owner)
/* A custom get_instance that finds nothing for titles starting with "none". */
void event_by_title(flash_ctx *ctx, flash_fetch *f, void *user_data);
FLASH_INSTANCE_CACHE_OPT(EventCacheOnTitle, Event, (title), .fallback = event_by_title, .version = 3)
/* The same, but a not-found is not cached. */
FLASH_INSTANCE_CACHE_OPT(EventCacheOnTitleNoNone, Event, (title), .fallback = event_by_title, .no_cache_none = true)

/* What fixture_setup builds on: set before it runs (suite init). */
typedef enum fixture_backend { FIXTURE_MEMORY = 0, FIXTURE_MEMCACHED, FIXTURE_REDIS, FIXTURE_REDIS_CLUSTER } fixture_backend;
typedef struct fixture_config {
    const char *loop;         /* a name of tests/loops.h; default "poll" */
    fixture_backend backend;  /* default: the memory backend */
    const flash_allocator *loop_alloc; /* the loop adapter's; default malloc */
} fixture_config;
extern fixture_config fixture_use;

typedef struct test_fixture {
    flash_ctx *ctx;
    flash_table *db;
    flash_cache cache;
    flash_poll *loop;       /* when the loop is poll, else NULL */
    void *native;           /* the native loop, whichever it is */
    flash_loop lp;          /* its vtable view */
    int fallback_calls;     /* events_of_owner / event_by_title calls */
    size_t fallback_keys;
    char log[4096];         /* what the context logged */
} test_fixture;

extern test_fixture fx;

/* One loop iteration (may_block: wait for an event). */
int fixture_run_once(bool may_block);
/* Attach ctx to the fixture's loop. */
int fixture_attach(flash_ctx *ctx);
/* Iterate until the loop has nothing left ready. */
void fixture_settle(void);

/* users 1..100 (first_name cycles through 5 names, username "user<i>"),
   events 1..10 (slug "event<i>", owner i % 3), participants user u of event e
   for u in 1..5, e in 1..3. desc may be NULL; its cache defaults to a new
   memory backend, its logger to one that appends to fx.log. */
void fixture_setup(const flash_desc *desc);
void fixture_teardown(void);
/* The counters since the last call (of fx.ctx), and now - before. */
flash_stats stats_delta(void);
flash_stats stats_sub(flash_stats now, flash_stats before);
/* Class copies as seen from another translation unit (models.c). */
const flash_class *other_tu_user_by_id(void);
const flash_model *other_tu_user_model(void);
/* Puts ProbeA {id, name} in db and resolves the class "SchemaProbe" defined
   on ProbeA (see test_engine.c); returns the name read. */
const char *schema_probe_a(flash_ctx *ctx, flash_table *db, int64_t id, const char *name);
#endif
