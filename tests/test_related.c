/* Result caches (get_result of any value) and related caches (django-flash's
   RelatedInstanceCache / RelatedQuerysetCache / select_related): result
   structs filled by a join in the fallback, invalidated through declared
   dependencies. On the memory backend, on memcached, and with the joins in
   SQLite. The models are this file's own (RUser, REvent and the through
   table RPart), so that no other suite's invalidations grow. */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#include "harness.h"
#include "models.h"

#define RUSER_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(RUser, RUSER_FIELDS)
FLASH_GET_KEYS(RUser, (id))
#define REVENT_FIELDS(F) F(I64, id) F(STR, title)
FLASH_MODEL(REvent, REVENT_FIELDS)
FLASH_GET_KEYS(REvent, (id))
/* The m2m through table between RUser and REvent. */
#define RPART_FIELDS(F) F(I64, id) F(I64, user) F(I64, event)
FLASH_MODEL(RPart, RPART_FIELDS)
FLASH_GET_KEYS(RPart, (id))

/* Where the fallbacks and mappings read: the fixture's table, or SQLite. */
static sqlite3 *sdb;
static int fills;          /* fallback calls */
static size_t fill_keys;   /* keys they were asked */

/* ---- a result cache of aggregates ---- */
#define SUMMARY_FIELDS(F) F(I64, event_id) F(I64, participants) F(I64, max_user)
FLASH_RESULT(EventSummary, SUMMARY_FIELDS)
static void summary_fill(flash_ctx *ctx, flash_fetch *f, void *ud);
FLASH_RESULT_CACHE(EventSummaryCache, EventSummary, (event_id), .fallback = summary_fill)
FLASH_DEPENDS_ON_FIELDS(EventSummaryCache, RPart, (event))

/* ---- select_related: a participant with its user's and event's names ---- */
#define PFULL_FIELDS(F) F(I64, id) F(I64, user) F(I64, event) F(STR, username) F(STR, event_title)
FLASH_RESULT(PartFull, PFULL_FIELDS)
static void pfull_fill(flash_ctx *ctx, flash_fetch *f, void *ud);
static void parts_of_user(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud);
static void parts_of_event(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud);
FLASH_RESULT_CACHE(PartFullCache, PartFull, (id), .fallback = pfull_fill)
FLASH_DEPENDS_ON_FIELDS(PartFullCache, RPart, (id))
FLASH_DEPENDS_ON(PartFullCache, RUser, parts_of_user)
FLASH_DEPENDS_ON(PartFullCache, REvent, parts_of_event)

/* ---- RelatedQuerysetCache: both sides of the m2m ---- */
#define EVENT_USER_FIELDS(F) F(I64, event) F(I64, user) F(STR, username)
FLASH_RESULT(EventUser, EVENT_USER_FIELDS)
static void users_of_event_fill(flash_ctx *ctx, flash_fetch *f, void *ud);
static void events_of_user_row(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud);
FLASH_RESULT_LIST_CACHE(UsersOfEvent, EventUser, (event), .fallback = users_of_event_fill, .order_by = "user")
FLASH_DEPENDS_ON_FIELDS(UsersOfEvent, RPart, (event))
FLASH_DEPENDS_ON(UsersOfEvent, RUser, events_of_user_row)

#define USER_EVENT_FIELDS(F) F(I64, user) F(I64, event) F(STR, title)
FLASH_RESULT(UserEvent, USER_EVENT_FIELDS)
static void events_of_user_fill(flash_ctx *ctx, flash_fetch *f, void *ud);
FLASH_RESULT_LIST_CACHE(EventsOfUser, UserEvent, (user), .fallback = events_of_user_fill, .order_by = "event")
FLASH_DEPENDS_ON_FIELDS(EventsOfUser, RPart, (user))

/* ---- bad declarations ---- */
static flash_model Ghost_model = {.name = "Ghost"}; /* never registered: no FLASH_MODEL */
static void no_keys(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)row, (void)sink, (void)ud;
}
FLASH_RESULT_CACHE(GhostSummary, EventSummary, (event_id), .fallback = summary_fill)
FLASH_DEPENDS_ON(GhostSummary, Ghost, no_keys)
/* A mapping that gives two key parts to a one-part class. */
#define RTAG_FIELDS(F) F(I64, id) F(I64, event)
FLASH_MODEL(RTag, RTAG_FIELDS)
static void two_parts(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)ud;
    flash_value k[2] = {flash_v_i64(((const RTag *)row)->event), flash_v_i64(1)};
    flash_key_sink_add(sink, k, 2);
}
FLASH_RESULT_CACHE(TaggedSummary, EventSummary, (event_id), .fallback = summary_fill)
FLASH_DEPENDS_ON(TaggedSummary, RTag, two_parts)
/* A result without a fallback: nothing could fill it. */
FLASH_RESULT_CACHE(OrphanSummary, EventSummary, (event_id), .version = 2)

/* ---- data: users 1..5, events 1..4, user u in events 1..3 (id (u-1)*3+e) ---- */

#define NPARTS_MAX 64
static size_t parts_where(int col, int64_t v, RPart *out) { /* col 1: user, 2: event, 0: id */
    size_t n = 0;
    if (sdb) {
        static const char *const sql[] = {"SELECT id, user, event FROM rpart WHERE id = ? ORDER BY id",
                                           "SELECT id, user, event FROM rpart WHERE user = ? ORDER BY id",
                                           "SELECT id, user, event FROM rpart WHERE event = ? ORDER BY id"};
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(sdb, sql[col], -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_int64(st, 1, v);
        while (sqlite3_step(st) == SQLITE_ROW && n < NPARTS_MAX)
            out[n++] = (RPart){sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2)};
        sqlite3_finalize(st);
        return n;
    }
    for (int64_t id = 1; id <= 128 && n < NPARTS_MAX; id++) { /* ids in this file stay below 128 */
        const RPart *p = flash_table_find(fx.db, &RPart_model, flash_v_i64(id));
        if (p && (col == 0 ? p->id : col == 1 ? p->user : p->event) == v) out[n++] = *p;
    }
    return n;
}

static void summary_fill(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx, (void)ud;
    fills++;
    fill_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t event = flash_fetch_key(f, i)[0].u.i64;
        EventSummary s = {event, 0, 0};
        if (sdb) {
            sqlite3_stmt *st;
            cr_assert_eq(sqlite3_prepare_v2(sdb, "SELECT count(*), coalesce(max(user), 0) FROM rpart WHERE event = ?",
                                            -1, &st, NULL),
                         SQLITE_OK);
            sqlite3_bind_int64(st, 1, event);
            cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
            s.participants = sqlite3_column_int64(st, 0);
            s.max_user = sqlite3_column_int64(st, 1);
            sqlite3_finalize(st);
        } else {
            RPart ps[NPARTS_MAX];
            size_t n = parts_where(2, event, ps);
            for (size_t j = 0; j < n; j++)
                if (ps[j].user > s.max_user) s.max_user = ps[j].user;
            s.participants = (int64_t)n;
        }
        flash_fetch_set_row(f, i, &s);
    }
    flash_fetch_done(f, 0, NULL);
}

static const char *user_name(int64_t id) {
    const RUser *u = flash_table_find(fx.db, &RUser_model, flash_v_i64(id));
    return u ? u->name : NULL;
}
static const char *event_title(int64_t id) {
    const REvent *e = flash_table_find(fx.db, &REvent_model, flash_v_i64(id));
    return e ? e->title : NULL;
}

/* Runs sql with one int64 parameter; each row to fetch key i. */
static void sql_rows(flash_fetch *f, size_t i, const char *sql, int64_t v, void (*row)(flash_fetch *, size_t, sqlite3_stmt *)) {
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(sdb, sql, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(sdb));
    sqlite3_bind_int64(st, 1, v);
    while (sqlite3_step(st) == SQLITE_ROW) row(f, i, st);
    sqlite3_finalize(st);
}
static void pfull_row(flash_fetch *f, size_t i, sqlite3_stmt *st) {
    PartFull r = {sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
                  (const char *)sqlite3_column_text(st, 3), (const char *)sqlite3_column_text(st, 4)};
    flash_fetch_set_row(f, i, &r);
}
static void event_user_row(flash_fetch *f, size_t i, sqlite3_stmt *st) {
    EventUser r = {sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), (const char *)sqlite3_column_text(st, 2)};
    flash_fetch_set_row(f, i, &r);
}
static void user_event_row(flash_fetch *f, size_t i, sqlite3_stmt *st) {
    UserEvent r = {sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), (const char *)sqlite3_column_text(st, 2)};
    flash_fetch_set_row(f, i, &r);
}

static void pfull_fill(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx, (void)ud;
    fills++;
    fill_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t id = flash_fetch_key(f, i)[0].u.i64;
        if (sdb) {
            sql_rows(f, i,
                     "SELECT p.id, p.user, p.event, u.name, e.title FROM rpart p JOIN ruser u ON u.id = p.user"
                     " JOIN revent e ON e.id = p.event WHERE p.id = ?",
                     id, pfull_row);
            continue;
        }
        const RPart *p = flash_table_find(fx.db, &RPart_model, flash_v_i64(id));
        if (!p) continue;
        PartFull r = {p->id, p->user, p->event, user_name(p->user), event_title(p->event)};
        flash_fetch_set_row(f, i, &r);
    }
    flash_fetch_done(f, 0, NULL);
}

static void users_of_event_fill(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx, (void)ud;
    fills++;
    fill_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t event = flash_fetch_key(f, i)[0].u.i64;
        if (sdb) {
            sql_rows(f, i, "SELECT p.event, u.id, u.name FROM rpart p JOIN ruser u ON u.id = p.user WHERE p.event = ?",
                     event, event_user_row);
            continue;
        }
        RPart ps[NPARTS_MAX];
        size_t n = parts_where(2, event, ps);
        for (size_t j = 0; j < n; j++) {
            EventUser r = {event, ps[j].user, user_name(ps[j].user)};
            flash_fetch_set_row(f, i, &r);
        }
    }
    flash_fetch_done(f, 0, NULL);
}

static void events_of_user_fill(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx, (void)ud;
    fills++;
    fill_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t user = flash_fetch_key(f, i)[0].u.i64;
        if (sdb) {
            sql_rows(f, i, "SELECT p.user, e.id, e.title FROM rpart p JOIN revent e ON e.id = p.event WHERE p.user = ?",
                     user, user_event_row);
            continue;
        }
        RPart ps[NPARTS_MAX];
        size_t n = parts_where(1, user, ps);
        for (size_t j = 0; j < n; j++) {
            UserEvent r = {user, ps[j].event, event_title(ps[j].event)};
            flash_fetch_set_row(f, i, &r);
        }
    }
    flash_fetch_done(f, 0, NULL);
}

/* Mappings: a changed user or event -> the keys of the rows joined with it. */
static void parts_of_user(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)ud;
    RPart ps[NPARTS_MAX];
    size_t n = parts_where(1, ((const RUser *)row)->id, ps);
    for (size_t j = 0; j < n; j++) {
        flash_value k = flash_v_i64(ps[j].id);
        flash_key_sink_add(sink, &k, 1);
    }
}
static void parts_of_event(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)ud;
    RPart ps[NPARTS_MAX];
    size_t n = parts_where(2, ((const REvent *)row)->id, ps);
    for (size_t j = 0; j < n; j++) {
        flash_value k = flash_v_i64(ps[j].id);
        flash_key_sink_add(sink, &k, 1);
    }
}
static void events_of_user_row(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)ud;
    RPart ps[NPARTS_MAX];
    size_t n = parts_where(1, ((const RUser *)row)->id, ps);
    for (size_t j = 0; j < n; j++) {
        flash_value k = flash_v_i64(ps[j].event);
        flash_key_sink_add(sink, &k, 1);
    }
}

/* ---- suites ---- */

static void sexec(const char *sql) {
    char *err = NULL;
    cr_assert_eq(sqlite3_exec(sdb, sql, NULL, NULL, &err), SQLITE_OK, "%s: %s", sql, err ? err : "?");
}

static void put_data(void) {
    for (int u = 1; u <= 5; u++) {
        char name[32];
        snprintf(name, sizeof name, "user%d", u);
        RUser r = {u, name};
        cr_assert_eq(flash_table_put(fx.db, &RUser_model, &r), 0);
    }
    for (int e = 1; e <= 4; e++) {
        char title[32];
        snprintf(title, sizeof title, "Event %d", e);
        REvent r = {e, title};
        cr_assert_eq(flash_table_put(fx.db, &REvent_model, &r), 0);
    }
    for (int u = 1; u <= 5; u++)
        for (int e = 1; e <= 3; e++) {
            RPart p = {(u - 1) * 3 + e, u, e};
            cr_assert_eq(flash_table_put(fx.db, &RPart_model, &p), 0);
        }
    if (sdb) {
        sexec("CREATE TABLE ruser (id INTEGER PRIMARY KEY, name TEXT);"
              "CREATE TABLE revent (id INTEGER PRIMARY KEY, title TEXT);"
              "CREATE TABLE rpart (id INTEGER PRIMARY KEY, user INTEGER, event INTEGER);");
        for (int u = 1; u <= 5; u++) {
            char sql[96];
            snprintf(sql, sizeof sql, "INSERT INTO ruser VALUES (%d, 'user%d')", u, u);
            sexec(sql);
        }
        for (int e = 1; e <= 4; e++) {
            char sql[96];
            snprintf(sql, sizeof sql, "INSERT INTO revent VALUES (%d, 'Event %d')", e, e);
            sexec(sql);
        }
        sexec("INSERT INTO rpart SELECT (u.id - 1) * 3 + e.id, u.id, e.id FROM ruser u, revent e WHERE e.id <= 3");
    }
}

static void setup_with(fixture_backend backend, bool sql) {
    fixture_use.loop = "poll";
    fixture_use.backend = backend;
    fixture_setup(NULL);
    fills = 0;
    fill_keys = 0;
    sdb = NULL;
    if (sql) cr_assert_eq(sqlite3_open(":memory:", &sdb), SQLITE_OK);
    put_data();
}
static void setup_memory(void) { setup_with(FIXTURE_MEMORY, false); }
static void setup_memcached(void) { setup_with(FIXTURE_MEMCACHED, false); }
static void setup_sqlite(void) { setup_with(FIXTURE_MEMORY, true); }
static void teardown(void) {
    fixture_teardown();
    if (sdb) sqlite3_close(sdb);
    sdb = NULL;
}
TestSuite(related, .init = setup_memory, .fini = teardown);
TestSuite(related_memcached, .init = setup_memcached, .fini = teardown);
TestSuite(related_sqlite, .init = setup_sqlite, .fini = teardown);

/* Another request on the same cache. */
static flash_ctx *other_ctx(void) {
    flash_desc d = {0};
    d.cache = fx.cache;
    flash_ctx *c = flash_ctx_create(&d);
    cr_assert(c);
    cr_assert_eq(fixture_attach(c), 0);
    return c;
}

/* Updates a user's name in the database(s), then invalidates. */
static void rename_user(int64_t id, const char *name) {
    RUser old = *(const RUser *)flash_table_find(fx.db, &RUser_model, flash_v_i64(id));
    char old_name[64];
    snprintf(old_name, sizeof old_name, "%s", old.name);
    old.name = old_name;
    RUser nw = {id, name};
    cr_assert_eq(flash_table_put(fx.db, &RUser_model, &nw), 0);
    if (sdb) {
        char sql[128];
        snprintf(sql, sizeof sql, "UPDATE ruser SET name = '%s' WHERE id = %lld", name, (long long)id);
        sexec(sql);
    }
    cr_assert_eq(flash_invalidate(fx.ctx, &RUser_model, &old, &nw), 0);
}

static void add_part(int64_t id, int64_t user, int64_t event) {
    RPart p = {id, user, event};
    cr_assert_eq(flash_table_put(fx.db, &RPart_model, &p), 0);
    if (sdb) {
        char sql[128];
        snprintf(sql, sizeof sql, "INSERT INTO rpart VALUES (%lld, %lld, %lld)", (long long)id, (long long)user,
                 (long long)event);
        sexec(sql);
    }
    cr_assert_eq(flash_invalidate(fx.ctx, &RPart_model, NULL, &p), 0);
}

/* Aggregates per event: N events in one tick are one cache round trip and
   one fallback call; then served from the cache (another request too). */
static void check_aggregates(void) {
    flash_promise *p[4];
    for (int e = 0; e < 4; e++) p[e] = EventSummaryCache_resolve_async(fx.ctx, e + 1);
    stats_delta();
    for (int e = 0; e < 4; e++) {
        EventSummary *s = NULL;
        cr_assert_eq(flash_wait(fx.ctx, p[e], (void **)&s), 0);
        cr_assert_eq(s->event_id, e + 1);
        cr_assert_eq(s->participants, e < 3 ? 5 : 0);
        cr_assert_eq(s->max_user, e < 3 ? 5 : 0);
    }
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(fills, 1);
    cr_assert_eq(fill_keys, 4);
    fixture_settle(); /* the fills land */

    flash_ctx *c = other_ctx();
    flash_query *qs[4];
    void **out = NULL;
    for (int e = 0; e < 4; e++) qs[e] = EventSummaryCache_resolve_query(c, e + 1);
    cr_assert_eq(flash_queries(c, 4, qs, 0, &out), 0);
    cr_assert_eq(((EventSummary *)out[1])->participants, 5);
    cr_assert_eq(fills, 1, "served from the cache");
    cr_assert_eq(flash_ctx_stats(c).cache_round_trips, 1);

    /* A new participant of event 4: its summary alone goes. */
    add_part(100, 2, 4);
    fixture_settle();
    flash_ctx_destroy(c);
    c = other_ctx();
    EventSummary *s = NULL;
    cr_assert_eq(EventSummaryCache_resolve(c, 4, &s), 0);
    cr_assert_eq(s->participants, 1);
    cr_assert_eq(s->max_user, 2);
    cr_assert_eq(fills, 2);
    cr_assert_eq(EventSummaryCache_resolve(c, 1, &s), 0);
    cr_assert_eq(fills, 2, "event 1 stays cached");
    flash_ctx_destroy(c);
}
FLASH_TEST(related, result_cache_of_aggregates) { check_aggregates(); }
FLASH_TEST(related_memcached, result_cache_of_aggregates) { check_aggregates(); }
FLASH_TEST(related_sqlite, result_cache_of_aggregates) { check_aggregates(); }

/* select_related: participants with their user's and event's names (one
   fallback call for all); renaming user 1 invalidates exactly its three
   participants' keys (and the users-of-event lists of its three events). */
static void check_related_instance(void) {
    flash_query *qs[15];
    void **out = NULL;
    for (int i = 0; i < 15; i++) qs[i] = PartFullCache_resolve_query(fx.ctx, i + 1);
    stats_delta();
    cr_assert_eq(flash_queries(fx.ctx, 15, qs, 0, &out), 0);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(fills, 1);
    PartFull *p5 = out[4]; /* user 2, event 2 */
    cr_assert_eq(p5->user, 2);
    cr_assert_str_eq(p5->username, "user2");
    cr_assert_str_eq(p5->event_title, "Event 2");
    cr_assert_str_eq(((PartFull *)out[0])->username, "user1");
    /* The users of event 1, cached too. */
    flash_list *l = NULL;
    cr_assert_eq(UsersOfEvent_resolve(fx.ctx, 1, &l), 0);
    cr_assert_eq(l->count, 5);
    fixture_settle();
    fills = 0;
    fill_keys = 0;

    stats_delta();
    rename_user(1, "ada");
    d = stats_delta();
    /* RUser.id (1), PartFullCache 1, 2, 3 (a mapping yielding three keys),
       UsersOfEvent 1, 2, 3. */
    cr_assert_eq(d.invalidations, 7, "%llu", (unsigned long long)d.invalidations);

    flash_ctx *c = other_ctx();
    for (int i = 0; i < 15; i++) qs[i] = PartFullCache_resolve_query(c, i + 1);
    cr_assert_eq(flash_queries(c, 15, qs, 0, &out), 0);
    cr_assert_eq(fills, 1);
    cr_assert_eq(fill_keys, 3, "exactly user 1's participants");
    for (int i = 0; i < 15; i++) {
        PartFull *r = out[i];
        cr_assert_eq(r->id, i + 1);
        char want[32];
        snprintf(want, sizeof want, "user%d", 1 + i / 3);
        cr_assert_str_eq(r->username, i < 3 ? "ada" : want);
    }
    cr_assert_eq(UsersOfEvent_resolve(c, 1, &l), 0);
    cr_assert_eq(fills, 2);
    cr_assert_str_eq(((EventUser *)l->items[0])->username, "ada");
    flash_ctx_destroy(c);
}
FLASH_TEST(related, related_instance_invalidated_by_user) { check_related_instance(); }
FLASH_TEST(related_memcached, related_instance_invalidated_by_user) { check_related_instance(); }
FLASH_TEST(related_sqlite, related_instance_invalidated_by_user) { check_related_instance(); }

/* The m2m through table: a new link invalidates both sides' lists, not the
   others. */
static void check_m2m(void) {
    flash_promise *a[4], *b[5];
    for (int e = 0; e < 4; e++) a[e] = UsersOfEvent_resolve_async(fx.ctx, e + 1);
    for (int u = 0; u < 5; u++) b[u] = EventsOfUser_resolve_async(fx.ctx, u + 1);
    stats_delta();
    for (int e = 0; e < 4; e++) cr_assert_eq(flash_wait(fx.ctx, a[e], NULL), 0);
    for (int u = 0; u < 5; u++) cr_assert_eq(flash_wait(fx.ctx, b[u], NULL), 0);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1, "both classes in one round trip");
    cr_assert_eq(fills, 2, "one fallback call per class");
    fixture_settle();
    fills = 0;
    fill_keys = 0;

    stats_delta();
    add_part(50, 3, 4); /* user 3 joins event 4 */
    d = stats_delta();
    /* RPart.id 50, EventSummaryCache 4, PartFullCache 50, UsersOfEvent 4,
       EventsOfUser 3. */
    cr_assert_eq(d.invalidations, 5, "%llu", (unsigned long long)d.invalidations);

    flash_ctx *c = other_ctx();
    flash_list *l = NULL;
    for (int e = 1; e <= 4; e++) cr_assert_eq(UsersOfEvent_resolve(c, e, &l), 0);
    cr_assert_eq(l->count, 1);
    cr_assert_eq(((EventUser *)l->items[0])->user, 3);
    for (int u = 1; u <= 5; u++) {
        cr_assert_eq(EventsOfUser_resolve(c, u, &l), 0);
        cr_assert_eq(l->count, u == 3 ? 4 : 3);
    }
    cr_assert_eq(((UserEvent *)l->items[2])->event, 3, "ordered by event");
    cr_assert_eq(fill_keys, 2, "event 4's users and user 3's events only");
    flash_ctx_destroy(c);
}
FLASH_TEST(related, m2m_through_table_invalidates_both_sides) { check_m2m(); }
FLASH_TEST(related_memcached, m2m_through_table_invalidates_both_sides) { check_m2m(); }
FLASH_TEST(related_sqlite, m2m_through_table_invalidates_both_sides) { check_m2m(); }

/* An event's rename reaches its participants' rows (a mapping of another
   model to the same class). */
FLASH_TEST(related, event_rename_reaches_participants) {
    PartFull *r = NULL;
    cr_assert_eq(PartFullCache_resolve(fx.ctx, 2, &r), 0);
    cr_assert_str_eq(r->event_title, "Event 2");
    fixture_settle();
    REvent old = {2, "Event 2"}, nw = {2, "Launch"};
    cr_assert_eq(flash_table_put(fx.db, &REvent_model, &nw), 0);
    stats_delta();
    cr_assert_eq(flash_invalidate(fx.ctx, &REvent_model, &old, &nw), 0);
    cr_assert_eq(stats_delta().invalidations, 1 + 5, "REvent.id and event 2's five participants");
    flash_ctx *c = other_ctx();
    cr_assert_eq(PartFullCache_resolve(c, 2, &r), 0);
    cr_assert_str_eq(r->event_title, "Launch");
    flash_ctx_destroy(c);
}

FLASH_TEST(related, bad_declarations_fail_cleanly) {
    EventSummary *s = NULL;
    flash_promise *p = GhostSummary_resolve_async(fx.ctx, 1);
    cr_assert_eq(flash_wait(fx.ctx, p, (void **)&s), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "GhostSummary"), "%s", flash_promise_message(p));
    cr_assert(strstr(flash_promise_message(p), "not registered"), "%s", flash_promise_message(p));

    p = OrphanSummary_resolve_async(fx.ctx, 1);
    cr_assert_eq(flash_wait(fx.ctx, p, NULL), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "fallback"), "%s", flash_promise_message(p));

    /* The mapping's wrong arity: at invalidation time. */
    cr_assert_eq(TaggedSummary_resolve(fx.ctx, 1, &s), 0, "the class itself is fine");
    RTag t = {1, 1};
    p = flash_invalidate_async(fx.ctx, &RTag_model, NULL, &t);
    cr_assert_eq(flash_wait(fx.ctx, p, NULL), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "TaggedSummary"), "%s", flash_promise_message(p));
    cr_assert(strstr(flash_promise_message(p), "arity"), "%s", flash_promise_message(p));

    /* Saving a result struct: no table holds it. */
    EventSummary row = {1, 2, 3};
    cr_assert_eq(flash_save(fx.ctx, &EventSummary_model, &row), FLASH_EINVAL);
}

/* A DYNAMIC dependent bumps its version instead of running the mapping. */
static int dyn_maps;
static void dyn_map(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *ud) {
    (void)ctx, (void)row, (void)sink, (void)ud;
    dyn_maps++;
}
FLASH_RESULT_CACHE(DynSummary, EventSummary, (event_id), .fallback = summary_fill,
                   .invalidation = FLASH_INVALIDATE_DYNAMIC)
#define RNOTE_FIELDS(F) F(I64, id) F(I64, event)
FLASH_MODEL(RNote, RNOTE_FIELDS)
FLASH_DEPENDS_ON(DynSummary, RNote, dyn_map)
FLASH_TEST(related_memcached, dynamic_dependent_bumps_its_version) {
    EventSummary *s = NULL;
    cr_assert_eq(DynSummary_resolve(fx.ctx, 1, &s), 0);
    fixture_settle();
    cr_assert_eq(fills, 1);
    RNote n = {1, 1};
    stats_delta();
    cr_assert_eq(flash_invalidate(fx.ctx, &RNote_model, NULL, &n), 0);
    cr_assert_eq(stats_delta().invalidations, 1);
    cr_assert_eq(dyn_maps, 0);
    flash_ctx *c = other_ctx();
    cr_assert_eq(DynSummary_resolve(c, 2, &s), 0);
    cr_assert_eq(fills, 2, "a new version: a miss");
    flash_ctx_destroy(c);
}
