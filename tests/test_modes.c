/* Upstream's invalidation semantics (issue 13, item 7), each on the memory
   backend, a real memcached and a real Redis:
     - FLASH_INVALIDATE_STALE: per-key stale serving while one reader
       refreshes, the lag window, the lock released after the refresh;
     - FLASH_INVALIDATE_RESET and flash_reset_queries: write-through by a
       refresh after the markers, a failed refresh leaving the markers;
     - allowtime with OFF (refresh-ahead) and with DYNAMIC (older versions
       within allowtime);
     - flash_bump_version on an UNSET class and on the classes depending on
       a model. */
#include <stdio.h>
#include <string.h>

#include "backends/cache/memcached.h"
#include "backends/cache/memory.h"
#include "backends/cache/redis.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"
#include "harness.h"

#define KM_FIELDS(F) F(I64, id) F(STR, name) F(I64, team)
FLASH_MODEL_OPT(StaleMember, KM_FIELDS, .invalidation = FLASH_INVALIDATE_STALE)
FLASH_GET_KEYS(StaleMember, (id))
FLASH_MODEL_OPT(ResetMember, KM_FIELDS, .invalidation = FLASH_INVALIDATE_RESET)
FLASH_GET_KEYS(ResetMember, (id), (name))
FLASH_FILTER_KEYS(ResetMember, (team))
FLASH_MODEL(PlainMember, KM_FIELDS)
FLASH_GET_KEYS(PlainMember, (id))
FLASH_MODEL_OPT(AheadMember, KM_FIELDS, .invalidation = FLASH_INVALIDATE_OFF, .allowtime_s = 10)
FLASH_GET_KEYS(AheadMember, (id))
FLASH_MODEL_OPT(DynSoftMember, KM_FIELDS, .invalidation = FLASH_INVALIDATE_DYNAMIC, .allowtime_s = 10)
FLASH_GET_KEYS(DynSoftMember, (id))
/* A list of PlainMembers per team that depends on the KTeam model: a
   flush of KTeam flushes it too. */
#define KT_FIELDS(F) F(I64, id) F(STR, title)
FLASH_MODEL(KTeam, KT_FIELDS)
FLASH_GET_KEYS(KTeam, (id))
FLASH_LIST_CACHE(MembersOfTeam, PlainMember, (team))
FLASH_DEPENDS_ON_FIELDS(MembersOfTeam, KTeam, (id))

static int64_t now_ms = 1800000000000;
static int64_t clock_fn(void *ud) {
    (void)ud;
    return now_ms;
}

typedef enum store { ST_MEMORY, ST_MEMCACHED, ST_REDIS } store;

static struct {
    flash_poll *loop;
    flash_table *db;
    flash_cache cache;
    flash_test_server server;
    bool started;
} w;

static void world_start(store st) {
    int err = 0;
    memset(&w, 0, sizeof w);
    w.loop = flash_poll_create();
    w.db = flash_table_create();
    if (st == ST_MEMORY) {
        flash_memory_desc md = {0};
        md.clock_ms = clock_fn;
        w.cache = flash_memory_create(&md);
    } else if (st == ST_MEMCACHED) {
        cr_assert(flash_test_memcached_start(&w.server, "-m 16"));
        w.started = true;
        flash_memcached_server s = {"127.0.0.1", w.server.port, 1};
        flash_memcached_desc d = {0};
        d.loop = flash_poll_loop(w.loop);
        d.servers = &s;
        d.server_count = 1;
        w.cache = flash_memcached_create(&d, &err);
    } else {
        cr_assert(flash_test_redis_start(&w.server));
        w.started = true;
        flash_redis_desc d = {0};
        d.loop = flash_poll_loop(w.loop);
        d.host = "127.0.0.1";
        d.port = w.server.port;
        w.cache = flash_redis_create(&d, &err);
    }
    cr_assert(w.cache.vt, "backend: %s", flash_strerror(err));
}

static void world_stop(void) {
    flash_cache_destroy(w.cache);
    flash_table_destroy(w.db);
    flash_poll_destroy(w.loop);
    if (w.started) flash_test_server_stop(&w.server);
}

/* A request: a context of its own on the world's cache, loop and table. */
static flash_ctx *request(void) {
    flash_desc d = {0};
    d.cache = w.cache;
    d.clock_ms = clock_fn;
    flash_ctx *c = flash_ctx_create(&d);
    cr_assert(c);
    cr_assert_eq(flash_poll_attach(c, w.loop), 0);
    cr_assert_eq(flash_ctx_set_source(c, NULL, flash_table_source(w.db)), 0);
    return c;
}

/* Wait until the context has nothing in flight (fills, locks, refreshes). */
static void settle(flash_ctx *c) {
    while (flash_ctx_busy(c)) flash_poll_run_once(w.loop, true);
    for (int i = 0; i < 100 && flash_poll_run_once(w.loop, false) > 0; i++) {
    }
}

static void *get(flash_ctx *c, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(c, p, &v);
    cr_assert_eq(rc, 0, "%s: %s", flash_strerror(rc), flash_promise_message(p));
    return v;
}

/* The name the cache alone answers for class c, key id ("" for nothing). */
static const char *cached_name(const flash_class *c, int64_t id, char *buf, size_t cap) {
    flash_ctx *r = request();
    flash_value k = flash_v_i64(id);
    void *v = NULL;
    cr_assert_eq(flash_wait(r, flash_query_async(r, c, &k, 1, FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE), &v), 0);
    snprintf(buf, cap, "%s", v ? ((const StaleMember *)v)->name : "");
    flash_ctx_destroy(r);
    return buf;
}

/* ---- STALE: per-key stale serving ---- */

static void stale_mode(void) {
    char buf[64];
    StaleMember m = {1, "before", 7};
    flash_table_put(w.db, &StaleMember_model, &m);
    flash_ctx *a = request(), *b = request();
    get(a, StaleMember_get_by_id_async(a, 1));
    settle(a);
    m.name = "after";
    flash_table_put(w.db, &StaleMember_model, &m);
    cr_assert_eq(flash_invalidate(a, &StaleMember_model, &m, &m), 0);
    flash_ctx_reset(a);

    /* Inside the lag window: served stale, nobody refreshes yet. */
    now_ms += 100;
    uint64_t f0 = flash_table_fetches(w.db);
    cr_assert_str_eq(((StaleMember *)get(a, StaleMember_get_by_id_async(a, 1)))->name, "before");
    settle(a);
    cr_assert_eq(flash_table_fetches(w.db), f0, "no refresh inside the lag window");
    flash_ctx_reset(a);

    /* Past it, and long after (no allowtime: no bound): two requests at once
       are both served the stale value; one of them refreshes. */
    now_ms += 3600 * 1000;
    flash_ctx_stats_clear(a);
    flash_ctx_stats_clear(b);
    flash_promise *pa = StaleMember_get_by_id_async(a, 1), *pb = StaleMember_get_by_id_async(b, 1);
    cr_assert_str_eq(((StaleMember *)get(a, pa))->name, "before");
    cr_assert_str_eq(((StaleMember *)get(b, pb))->name, "before");
    settle(a);
    settle(b);
    flash_stats sa = flash_ctx_stats(a), sb = flash_ctx_stats(b);
    cr_assert_eq(sa.source_calls + sb.source_calls, 1, "one refresher, got %llu",
                 (unsigned long long)(sa.source_calls + sb.source_calls));
    cr_assert_eq(sa.fills + sb.fills, 1);
    cr_assert_str_eq(cached_name(&StaleMember__get_by_id, 1, buf, sizeof buf), "after");

    /* The lock went with the refresh: the next write is refreshed by the
       next reader at once, not when the lock would have expired. */
    m.name = "third";
    flash_table_put(w.db, &StaleMember_model, &m);
    cr_assert_eq(flash_invalidate(a, &StaleMember_model, &m, &m), 0);
    now_ms += 1000;
    flash_ctx_reset(a);
    cr_assert_str_eq(((StaleMember *)get(a, StaleMember_get_by_id_async(a, 1)))->name, "after");
    settle(a);
    cr_assert_str_eq(cached_name(&StaleMember__get_by_id, 1, buf, sizeof buf), "third");

    /* A key that was never cached: the write leaves a marker, the reader
       reads the source. */
    StaleMember n = {2, "fresh", 7};
    flash_table_put(w.db, &StaleMember_model, &n);
    cr_assert_eq(flash_invalidate(a, &StaleMember_model, NULL, &n), 0);
    now_ms += 1000;
    flash_ctx_reset(a);
    cr_assert_str_eq(((StaleMember *)get(a, StaleMember_get_by_id_async(a, 2)))->name, "fresh");
    flash_ctx_destroy(a);
    flash_ctx_destroy(b);
}

FLASH_TEST(modes, stale_serves_each_key_while_one_reader_refreshes_on_memory) {
    world_start(ST_MEMORY);
    stale_mode();
    world_stop();
}
FLASH_TEST(modes, stale_serves_each_key_while_one_reader_refreshes_on_memcached) {
    world_start(ST_MEMCACHED);
    stale_mode();
    world_stop();
}
FLASH_TEST(modes, stale_serves_each_key_while_one_reader_refreshes_on_redis) {
    world_start(ST_REDIS);
    stale_mode();
    world_stop();
}

/* ---- RESET: write-through ---- */

static void reset_mode(void) {
    char buf[64];
    ResetMember m = {1, "ann", 7}, m2 = {2, "bob", 7};
    flash_table_put(w.db, &ResetMember_model, &m);
    flash_table_put(w.db, &ResetMember_model, &m2);
    flash_ctx *c = request();
    get(c, ResetMember_get_by_id_async(c, 1));
    get(c, ResetMember_get_by_name_async(c, "ann"));
    flash_list *l = get(c, ResetMember_filter_by_team_async(c, 7));
    cr_assert_eq(l->count, 2);
    settle(c);

    /* A rename: the new row's keys hold it as soon as the invalidation
       settled; the old name's key holds a cached not-found. */
    ResetMember renamed = m;
    renamed.name = "anna";
    flash_table_put(w.db, &ResetMember_model, &renamed);
    flash_ctx_reset(c);
    flash_ctx_stats_clear(c);
    cr_assert_eq(flash_invalidate(c, &ResetMember_model, &m, &renamed), 0);
    flash_stats s = flash_ctx_stats(c);
    cr_assert_eq(s.source_calls, 3, "one refresh per class (id, name, team), got %llu",
                 (unsigned long long)s.source_calls);
    settle(c);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 1, buf, sizeof buf), "anna");
    flash_ctx *r = request();
    uint64_t f0 = flash_table_fetches(w.db);
    cr_assert_str_eq(((ResetMember *)get(r, ResetMember_get_by_name_async(r, "anna")))->name, "anna");
    cr_assert_null(get(r, flash_query_async(r, &ResetMember__get_by_name, &(flash_value){FLASH_STR, false, {.s = {"ann", 3}}},
                                            1, FLASH_Q_OR_NONE)));
    l = get(r, ResetMember_filter_by_team_async(r, 7));
    cr_assert_eq(l->count, 2);
    cr_assert(strcmp(((ResetMember *)l->items[0])->name, "anna") == 0 ||
              strcmp(((ResetMember *)l->items[1])->name, "anna") == 0);
    cr_assert_eq(flash_table_fetches(w.db), f0, "every key was written through: no source read");
    flash_ctx_destroy(r);

    /* Two writes to the same row in one request: each refreshes anew. */
    renamed.name = "anne";
    flash_table_put(w.db, &ResetMember_model, &renamed);
    cr_assert_eq(flash_invalidate(c, &ResetMember_model, NULL, &renamed), 0);
    settle(c);
    renamed.name = "annie";
    flash_table_put(w.db, &ResetMember_model, &renamed);
    cr_assert_eq(flash_invalidate(c, &ResetMember_model, NULL, &renamed), 0);
    settle(c);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 1, buf, sizeof buf), "annie");

    /* The refresh fails (the database is down): the invalidation still
       fulfils, the marker stays and the next reader refills. */
    renamed.name = "ana";
    flash_table_put(w.db, &ResetMember_model, &renamed);
    flash_table_fail_next(w.db, FLASH_ESOURCE, "database down");
    flash_ctx_reset(c);
    flash_value one = flash_v_i64(1);
    flash_query *q = flash_query_new(c, &ResetMember__get_by_id, &one, 1);
    cr_assert_eq(flash_invalidate_queries(c, 1, &q), 0);
    settle(c);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 1, buf, sizeof buf), "");
    now_ms += 1000; /* past the lag window */
    r = request();
    cr_assert_str_eq(((ResetMember *)get(r, ResetMember_get_by_id_async(r, 1)))->name, "ana");
    settle(r);
    flash_ctx_destroy(r);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 1, buf, sizeof buf), "ana");
    flash_ctx_destroy(c);
}

FLASH_TEST(modes, reset_writes_through_on_memory) {
    world_start(ST_MEMORY);
    reset_mode();
    world_stop();
}
FLASH_TEST(modes, reset_writes_through_on_memcached) {
    world_start(ST_MEMCACHED);
    reset_mode();
    world_stop();
}
FLASH_TEST(modes, reset_writes_through_on_redis) {
    world_start(ST_REDIS);
    reset_mode();
    world_stop();
}

/* flash_reset_queries (Cache.reset()) on a class of any mode. */
FLASH_TEST(modes, reset_queries_refresh_an_unset_class) {
    char buf[64];
    world_start(ST_MEMCACHED);
    PlainMember m = {3, "old", 1};
    flash_table_put(w.db, &PlainMember_model, &m);
    flash_ctx *c = request();
    get(c, PlainMember_get_by_id_async(c, 3));
    settle(c);
    m.name = "new";
    flash_table_put(w.db, &PlainMember_model, &m);
    flash_value k = flash_v_i64(3);
    flash_query *q = flash_query_new(c, &PlainMember__get_by_id, &k, 1);
    cr_assert_eq(flash_reset_queries(c, 1, &q), 0);
    settle(c);
    cr_assert_str_eq(cached_name(&PlainMember__get_by_id, 3, buf, sizeof buf), "new");
    /* Bad input: a NULL array, a query of an unknown class. */
    cr_assert_eq(flash_reset_queries(c, 1, NULL), FLASH_EINVAL);
    flash_ctx_destroy(c);
    world_stop();
}

/* ---- allowtime with OFF and DYNAMIC ---- */

static void allowtime_modes(void) {
    char buf[64];
    AheadMember a = {1, "v1", 1};
    flash_table_put(w.db, &AheadMember_model, &a);
    flash_ctx *c = request(), *d = request();
    get(c, AheadMember_get_by_id_async(c, 1));
    settle(c);
    /* OFF: writes leave it alone; younger than allowtime it is a plain hit. */
    a.name = "v2";
    flash_table_put(w.db, &AheadMember_model, &a);
    cr_assert_eq(flash_invalidate(c, &AheadMember_model, NULL, &a), 0);
    now_ms += 5000;
    flash_ctx_reset(c);
    flash_ctx_stats_clear(c);
    cr_assert_str_eq(((AheadMember *)get(c, AheadMember_get_by_id_async(c, 1)))->name, "v1");
    settle(c);
    cr_assert_eq(flash_ctx_stats(c).source_calls, 0);
    /* Older than allowtime: served, and one of two readers refreshes it. */
    now_ms += 6000;
    flash_ctx_reset(c);
    flash_ctx_stats_clear(c);
    flash_ctx_stats_clear(d);
    flash_promise *p1 = AheadMember_get_by_id_async(c, 1), *p2 = AheadMember_get_by_id_async(d, 1);
    cr_assert_str_eq(((AheadMember *)get(c, p1))->name, "v1");
    cr_assert_str_eq(((AheadMember *)get(d, p2))->name, "v1");
    settle(c);
    settle(d);
    cr_assert_eq(flash_ctx_stats(c).source_calls + flash_ctx_stats(d).source_calls, 1, "one refresher");
    cr_assert_str_eq(cached_name(&AheadMember__get_by_id, 1, buf, sizeof buf), "v2");

    /* DYNAMIC with allowtime: after a bump, a value written less than
       allowtime ago is served while one reader refreshes it ... */
    DynSoftMember y = {1, "y1", 1};
    flash_table_put(w.db, &DynSoftMember_model, &y);
    flash_ctx_reset(c);
    get(c, DynSoftMember_get_by_id_async(c, 1));
    settle(c);
    y.name = "y2";
    flash_table_put(w.db, &DynSoftMember_model, &y);
    cr_assert_eq(flash_invalidate(c, &DynSoftMember_model, NULL, &y), 0);
    now_ms += 2000;
    flash_ctx_reset(c);
    cr_assert_str_eq(((DynSoftMember *)get(c, DynSoftMember_get_by_id_async(c, 1)))->name, "y1");
    settle(c);
    cr_assert_str_eq(cached_name(&DynSoftMember__get_by_id, 1, buf, sizeof buf), "y2");
    /* ... one written longer ago is a miss. */
    now_ms += 20000;
    y.name = "y3";
    flash_table_put(w.db, &DynSoftMember_model, &y);
    cr_assert_eq(flash_invalidate(c, &DynSoftMember_model, NULL, &y), 0);
    flash_ctx_reset(c);
    cr_assert_str_eq(((DynSoftMember *)get(c, DynSoftMember_get_by_id_async(c, 1)))->name, "y3");
    flash_ctx_destroy(c);
    flash_ctx_destroy(d);
}

FLASH_TEST(modes, allowtime_with_off_and_dynamic_on_memory) {
    world_start(ST_MEMORY);
    allowtime_modes();
    world_stop();
}
FLASH_TEST(modes, allowtime_with_off_and_dynamic_on_memcached) {
    world_start(ST_MEMCACHED);
    allowtime_modes();
    world_stop();
}
FLASH_TEST(modes, allowtime_with_off_and_dynamic_on_redis) {
    world_start(ST_REDIS);
    allowtime_modes();
    world_stop();
}

/* ---- flash_bump_version on any class, and on dependents ---- */

static void bump_any_class(void) {
    PlainMember p = {1, "p1", 5};
    KTeam t = {5, "reds"};
    flash_table_put(w.db, &PlainMember_model, &p);
    flash_table_put(w.db, &KTeam_model, &t);
    flash_ctx *c = request();
    get(c, PlainMember_get_by_id_async(c, 1));
    flash_list *l = NULL;
    cr_assert_eq(MembersOfTeam_resolve(c, 5, &l), 0);
    cr_assert_eq(l->count, 1);
    settle(c);
    /* Changed behind flash's back (no invalidation): still cached. */
    p.name = "p2";
    flash_table_put(w.db, &PlainMember_model, &p);
    PlainMember q = {2, "q1", 5};
    flash_table_put(w.db, &PlainMember_model, &q);
    flash_ctx_reset(c);
    cr_assert_str_eq(((PlainMember *)get(c, PlainMember_get_by_id_async(c, 1)))->name, "p1");
    cr_assert_eq(MembersOfTeam_resolve(c, 5, &l), 0);
    cr_assert_eq(l->count, 1);
    /* Flushing KTeam flushes the list that depends on it, not the gets. */
    cr_assert_eq(flash_bump_version(c, &KTeam_model), 0);
    flash_ctx_reset(c);
    cr_assert_eq(MembersOfTeam_resolve(c, 5, &l), 0);
    cr_assert_eq(l->count, 2, "the dependent list was flushed");
    cr_assert_str_eq(((PlainMember *)get(c, PlainMember_get_by_id_async(c, 1)))->name, "p1");
    settle(c);
    /* Flushing PlainMember flushes its UNSET get class. */
    cr_assert_eq(flash_bump_version(c, &PlainMember_model), 0);
    flash_ctx_reset(c);
    flash_ctx_stats_clear(c);
    cr_assert_str_eq(((PlainMember *)get(c, PlainMember_get_by_id_async(c, 1)))->name, "p2");
    cr_assert_eq(flash_ctx_stats(c).cache_misses, 1);
    settle(c);
    flash_ctx_reset(c);
    flash_ctx_stats_clear(c);
    get(c, PlainMember_get_by_id_async(c, 1));
    cr_assert_eq(flash_ctx_stats(c).cache_hits, 1, "refilled under the new version");
    /* Bad input. */
    cr_assert_eq(flash_bump_version(c, NULL), FLASH_EINVAL);
    flash_ctx_destroy(c);
}

FLASH_TEST(modes, bump_version_flushes_any_class_and_its_dependents_on_memory) {
    world_start(ST_MEMORY);
    bump_any_class();
    world_stop();
}
FLASH_TEST(modes, bump_version_flushes_any_class_and_its_dependents_on_memcached) {
    world_start(ST_MEMCACHED);
    bump_any_class();
    world_stop();
}
FLASH_TEST(modes, bump_version_flushes_any_class_and_its_dependents_on_redis) {
    world_start(ST_REDIS);
    bump_any_class();
    world_stop();
}

/* Every class of a batch reads its version key in the same get-many: one
   key per class, whatever the number of its keys. */
FLASH_TEST(modes, a_batch_reads_one_version_key_per_class) {
    world_start(ST_MEMCACHED);
    flash_ctx *c = request();
    for (int i = 1; i <= 20; i++) {
        PlainMember p = {i, "x", 1};
        flash_table_put(w.db, &PlainMember_model, &p);
    }
    flash_promise *ps[21];
    for (int i = 0; i < 20; i++) ps[i] = PlainMember_get_by_id_async(c, i + 1);
    ps[20] = KTeam_get_by_id_async(c, 99);
    long long g0 = flash_test_memcached_stat(&w.server, "cmd_get");
    flash_wait(c, flash_gather_settled(c, 21, ps), NULL);
    long long g1 = flash_test_memcached_stat(&w.server, "cmd_get");
    cr_assert_eq(g1 - g0, 21 + 2, "21 keys and 2 version keys, got %lld", g1 - g0);
    cr_assert_eq(flash_ctx_stats(c).cache_round_trips, 1);
    flash_ctx_destroy(c);
    world_stop();
}

/* Django's save() on a RESET class: the write, then the keys of the old and
   the new row refreshed by the writer, so readers hit the new row at once. */
FLASH_TEST(modes, save_on_a_reset_class_writes_through) {
    char buf[64];
    world_start(ST_MEMCACHED);
    ResetMember m = {9, "nine", 3};
    flash_table_put(w.db, &ResetMember_model, &m);
    flash_ctx *c = request();
    get(c, ResetMember_get_by_id_async(c, 9));
    settle(c);
    m.name = "NINE";
    cr_assert_eq(flash_save(c, &ResetMember_model, &m), 0);
    settle(c);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 9, buf, sizeof buf), "NINE");
    flash_ctx *r = request();
    uint64_t f0 = flash_table_fetches(w.db);
    cr_assert_str_eq(((ResetMember *)get(r, ResetMember_get_by_name_async(r, "NINE")))->name, "NINE");
    cr_assert_eq(flash_table_fetches(w.db), f0, "the new name's key was written through");
    flash_ctx_destroy(r);
    flash_ctx_destroy(c);
    world_stop();
}

/* A reset while a RESET write's refresh is in flight: the refresh is
   cancelled with its request, nothing is touched after (ASan), and the
   marker stays for the next reader. */
FLASH_TEST(modes, a_reset_during_a_write_through_refresh) {
    char buf[64];
    world_start(ST_MEMORY);
    ResetMember m = {4, "four", 2};
    flash_table_put(w.db, &ResetMember_model, &m);
    flash_ctx *c = request();
    get(c, ResetMember_get_by_id_async(c, 4));
    settle(c);
    m.name = "FOUR";
    flash_table_put(w.db, &ResetMember_model, &m);
    flash_promise *p = flash_invalidate_async(c, &ResetMember_model, NULL, &m);
    /* Run until the markers landed and the refresh asked the source. */
    uint64_t f0 = flash_table_fetches(w.db);
    for (int i = 0; i < 100 && flash_table_fetches(w.db) == f0; i++) flash_poll_run_once(w.loop, false);
    cr_assert_gt(flash_table_fetches(w.db), f0, "the refresh reached the source");
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    flash_ctx_reset(c);
    for (int i = 0; i < 100; i++) flash_poll_run_once(w.loop, false);
    cr_assert_str_eq(cached_name(&ResetMember__get_by_id, 4, buf, sizeof buf), "");
    now_ms += 1000;
    cr_assert_str_eq(((ResetMember *)get(c, ResetMember_get_by_id_async(c, 4)))->name, "FOUR");
    flash_ctx_destroy(c);
    world_stop();
}
