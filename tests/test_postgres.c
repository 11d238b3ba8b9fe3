/* The PostgreSQL source against a real server the test starts (initdb in a
   temp dir, a free port): one prepared statement per class per batch
   (counted by the source and in the server's statement log), type and NULL
   mapping, multi-field and NULL keys, bound metacharacters, rejected rows
   failing only their key, column type mismatches, SQL errors, the server
   down and back, a slow query timing out, cancel on reset, a pool, every
   loop adapter. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "loops.h"
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"
#include "backends/source/postgres.h"

#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

#define PG_USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, first_name) F(I32, age) F(F64, score) F(BOOL, active) F(BYTES, avatar)
FLASH_MODEL_OPT(PgUser, PG_USER_FIELDS, .table = "users")
FLASH_GET_KEYS(PgUser, (id), (username))
FLASH_FILTER_KEYS(PgUser, (first_name))

#define PG_EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL_OPT(PgEvent, PG_EVENT_FIELDS, .table = "events")
FLASH_INSTANCE_CACHE(PgEventOnSlug, PgEvent, (slug))

#define PG_PART_FIELDS(F) F(I64, id) F(I64, user) F(I64, event) F(STR, role)
FLASH_MODEL_OPT(PgPart, PG_PART_FIELDS, .table = "participants")
FLASH_GET_KEYS(PgPart, (user, event), (event, role))
FLASH_FILTER_KEYS(PgPart, (event))

/* A view whose id calls pg_sleep(2): a slow query. */
#define PG_SLOW_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL_OPT(PgSlow, PG_SLOW_FIELDS, .table = "slow_events")
FLASH_INSTANCE_CACHE(PgSlowOnSlug, PgSlow, (slug))
/* The same with pg_sleep(0.3). */
FLASH_MODEL_OPT(PgSlowish, PG_SLOW_FIELDS, .table = "slowish_events")
FLASH_INSTANCE_CACHE(PgSlowishOnSlug, PgSlowish, (slug))

/* An I32 field over an int8 column: values out of range are rejected. */
#define PG_NARROW_FIELDS(F) F(I64, id) F(I32, n)
FLASH_MODEL_OPT(PgNarrow, PG_NARROW_FIELDS, .table = "narrow")
FLASH_GET_KEYS(PgNarrow, (id))

/* title is text in the database: the column does not map to I64. */
#define PG_WRONG_FIELDS(F) F(I64, id) F(STR, slug) F(I64, title)
FLASH_MODEL_OPT(PgWrong, PG_WRONG_FIELDS, .table = "events")
FLASH_INSTANCE_CACHE(PgWrongOnSlug, PgWrong, (slug))

#define PG_GHOST_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(PgGhost, PG_GHOST_FIELDS, .table = "no_such_table")
FLASH_GET_KEYS(PgGhost, (id))

static flash_test_server server;
static PGconn *admin;
static flash_poll *loop;
static flash_cache cache;
static flash_ctx *ctx, *ctx2;
static flash_pg *pg;

static void sql(const char *q) {
    PGresult *r = PQexec(admin, q);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    PQclear(r);
}

static long sql_count(const char *q) {
    PGresult *r = PQexec(admin, q);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    long n = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

static const char schema[] =
    "CREATE TABLE users (id int8 PRIMARY KEY, username text UNIQUE, first_name varchar(40), age int4,"
    "  score float8, active bool, avatar bytea);"
    "INSERT INTO users SELECT i, 'user' || i, (ARRAY['Ada','Alan','Grace','Edsger','Barbara'])[i % 5 + 1],"
    "  20 + i % 50, i * 1.5, i % 2 = 0, '\\x000102'::bytea FROM generate_series(1, 100) i;"
    "CREATE TABLE events (id int8 PRIMARY KEY, slug text UNIQUE, title text);"
    "INSERT INTO events SELECT i, 'event' || i, 'Event ' || i FROM generate_series(1, 10) i;"
    "CREATE TABLE participants (id int8 PRIMARY KEY, \"user\" int8, event int8, role text);"
    "INSERT INTO participants SELECT (u - 1) * 3 + e, u, e, CASE WHEN u = 1 THEN 'host' ELSE 'guest' END"
    "  FROM generate_series(1, 5) u, generate_series(1, 3) e;"
    "CREATE FUNCTION slow_id(int8, float8) RETURNS int8 LANGUAGE sql VOLATILE AS 'SELECT $1 FROM pg_sleep($2)';"
    "CREATE VIEW slow_events AS SELECT slow_id(id, 2) AS id, slug, title FROM events;"
    "CREATE VIEW slowish_events AS SELECT slow_id(id, 0.3) AS id, slug, title FROM events;"
    "CREATE TABLE narrow (id int8 PRIMARY KEY, n int8);"
    "INSERT INTO narrow VALUES (1, 5), (2, 5000000000), (3, -7);";

/* Start the server, load the schema, and make a context (poll loop, memory
   cache) reading from a source with these options. */
static void start(uint32_t query_timeout_ms, uint32_t connections) {
    alarm(90); /* a watchdog: a hang fails the test instead of the run */
    cr_assert(flash_test_postgres_start(&server), "postgres did not start");
    admin = PQconnectdb(server.extra);
    cr_assert_eq(PQstatus(admin), CONNECTION_OK, "%s", PQerrorMessage(admin));
    sql(schema);
    loop = flash_poll_create();
    cache = flash_memory_create(NULL);
    flash_pg_desc d;
    memset(&d, 0, sizeof d);
    d.conninfo = server.extra;
    d.loop = flash_poll_loop(loop);
    d.query_timeout_ms = query_timeout_ms;
    d.connections = connections;
    d.retry_interval_ms = 200;
    int err = -1;
    pg = flash_pg_create(&d, &err);
    cr_assert(pg, "flash_pg_create: %s", flash_strerror(err));
    cr_assert_eq(err, 0);
    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    cd.cache = cache;
    ctx = flash_ctx_create(&cd);
    cr_assert(ctx);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_pg_source(pg)), 0);
}

static void teardown(void) {
    flash_ctx_destroy(ctx); /* contexts, then the source, then the loop */
    flash_ctx_destroy(ctx2);
    flash_pg_destroy(pg);
    if (cache.vt) flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    if (admin) PQfinish(admin);
    if (server.dir[0]) flash_test_postgres_stop(&server);
    ctx = ctx2 = NULL;
    pg = NULL;
    loop = NULL;
    admin = NULL;
    memset(&cache, 0, sizeof cache);
    alarm(0);
}
TestSuite(postgres, .fini = teardown);

static void *wait_ok_in(flash_ctx *c, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(c, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}
static void *wait_ok(flash_promise *p) { return wait_ok_in(ctx, p); }

static int wait_rc(flash_promise *p) {
    void *v = NULL;
    return flash_wait(ctx, p, &v);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Statements the server executed for us (log_statement=all). */
static long executions(void) { return flash_test_postgres_log_count(&server, "execute flash_"); }

FLASH_TEST(postgres, gather_of_three_classes_is_one_prepared_statement_per_class) {
    start(0, 0);
    cr_assert_eq(flash_pg_stats_get(pg).connected, 0, "create does not connect");
    flash_promise *ps[50];
    size_t n = 0;
    for (int i = 1; i <= 40; i++) ps[n++] = PgUser_get_by_id_async(ctx, i);
    for (int u = 1; u <= 5; u++) ps[n++] = PgPart_get_by_user_event_async(ctx, u, 2);
    ps[n++] = PgEventOnSlug_resolve_async(ctx, "event3");
    ps[n++] = PgEventOnSlug_resolve_async(ctx, "event7");
    void **v = wait_ok(flash_gather(ctx, n, ps));
    PgUser *u7 = v[6];
    cr_assert_eq(u7->id, 7);
    cr_assert_str_eq(u7->username, "user7");
    cr_assert_str_eq(u7->first_name, "Grace");
    cr_assert_eq(u7->age, 27);
    cr_assert_float_eq(u7->score, 10.5, 1e-12);
    cr_assert_eq(u7->active, false);
    cr_assert_eq(((PgUser *)v[7])->active, true);
    cr_assert_eq(u7->avatar.len, 3);
    cr_assert_eq(memcmp(u7->avatar.data, "\0\1\2", 3), 0);
    cr_assert_eq(((PgPart *)v[42])->user, 3);
    cr_assert_eq(((PgPart *)v[42])->event, 2);
    cr_assert_str_eq(((PgEvent *)v[46])->title, "Event 7");
    flash_pg_stats s = flash_pg_stats_get(pg);
    cr_assert_eq(s.fetches, 3);
    cr_assert_eq(s.queries, 3, "one statement per class, got %llu", (unsigned long long)s.queries);
    cr_assert_eq(s.prepares, 3);
    cr_assert_eq(s.rows, 47);
    cr_assert_eq(s.connects, 1);
    cr_assert_eq(s.connected, 1);
    cr_assert_eq(executions(), 3, "the server ran 3 statements");
    cr_assert_eq(flash_ctx_stats(ctx).cache_round_trips, 1);

    /* Next request: from the cache. */
    flash_ctx_reset(ctx);
    PgUser *again = wait_ok(PgUser_get_by_id_async(ctx, 7));
    cr_assert_str_eq(again->username, "user7");
    cr_assert_eq(flash_pg_stats_get(pg).queries, 3);

    /* Another batch of the same class: the prepared statement again. */
    flash_ctx_reset(ctx);
    n = 0;
    for (int i = 41; i <= 45; i++) ps[n++] = PgUser_get_by_id_async(ctx, i);
    wait_ok(flash_gather(ctx, n, ps));
    s = flash_pg_stats_get(pg);
    cr_assert_eq(s.queries, 4);
    cr_assert_eq(s.prepares, 3, "prepared once per connection");
    cr_assert_eq(executions(), 4);
}

FLASH_TEST(postgres, a_thousand_keys_are_one_statement) {
    start(0, 0);
    flash_promise **ps = flash_alloc(ctx, 1000 * sizeof *ps);
    for (int i = 0; i < 1000; i++) ps[i] = PgUser_get_by_id_async_or_none(ctx, i + 1);
    void **v = wait_ok(flash_gather(ctx, 1000, ps));
    cr_assert_eq(((PgUser *)v[99])->id, 100);
    cr_assert_null(v[100]);
    cr_assert_eq(flash_pg_stats_get(pg).queries, 1);
    cr_assert_eq(executions(), 1);
}

FLASH_TEST(postgres, filters_multi_field_keys_and_null_mapping) {
    start(0, 0);
    sql("INSERT INTO users VALUES (500, 'nulls', NULL, 1, 2.0, true, NULL),"
        " (501, 'empty', NULL, 1, 2.0, false, ''::bytea),"
        " (502, 'odd bytes', 'Odd', -5, -0.25, true, '\\x00ff5c22277b7d2c'::bytea);"
        "INSERT INTO participants VALUES (900, 7, 8, NULL)");
    flash_promise *ps[8] = {
        PgUser_filter_by_first_name_async(ctx, "Ada"),
        PgUser_filter_by_first_name_async(ctx, "Nobody"),
        PgUser_filter_by_first_name_async(ctx, NULL), /* first_name IS NULL */
        PgPart_get_by_user_event_async_or_none(ctx, 2, 3),
        PgPart_get_by_user_event_async_or_none(ctx, 1, 9),
        PgPart_get_by_event_role_async(ctx, 8, NULL), /* a NULL key part */
        PgUser_get_by_id_async(ctx, 500),
        PgUser_get_by_id_async(ctx, 502),
    };
    void **v = wait_ok(flash_gather(ctx, 8, ps));
    flash_list *ada = v[0], *nobody = v[1], *nulls = v[2];
    cr_assert_eq(ada->count, 20);
    for (size_t i = 0; i < ada->count; i++) cr_assert_str_eq(((PgUser *)ada->items[i])->first_name, "Ada");
    cr_assert_eq(nobody->count, 0);
    cr_assert_eq(nulls->count, 2);
    cr_assert_null(((PgUser *)nulls->items[0])->first_name);
    cr_assert_eq(((PgPart *)v[3])->id, 6);
    cr_assert_null(v[4]);
    cr_assert_eq(((PgPart *)v[5])->id, 900);
    cr_assert_null(((PgPart *)v[5])->role);
    PgUser *n500 = v[6], *odd = v[7];
    cr_assert_null(n500->first_name);
    cr_assert_null(n500->avatar.data);
    cr_assert_eq(odd->age, -5);
    cr_assert_float_eq(odd->score, -0.25, 1e-12);
    cr_assert_eq(odd->avatar.len, 8);
    cr_assert_eq(memcmp(odd->avatar.data, "\x00\xff\\\"'{},", 8), 0);
    PgUser *empty = NULL;
    cr_assert_eq(PgUser_get_by_username(ctx, "empty", &empty), 0);
    cr_assert_not_null(empty->avatar.data, "an empty bytea is not NULL");
    cr_assert_eq(empty->avatar.len, 0);
    /* Classes: users.first_name (with the NULL form), parts.(user,event),
       parts.(event,role) (NULL form), users.id; then users.username. */
    cr_assert_eq(flash_pg_stats_get(pg).queries, 5);
    /* A multi-field get that matches two rows. */
    cr_assert_eq(wait_rc(PgPart_get_by_event_role_async(ctx, 3, "guest")), FLASH_EMULTIPLE);
    /* Bytes keys and the cache round trip of NULLs. */
    flash_ctx_reset(ctx);
    n500 = wait_ok(PgUser_get_by_id_async(ctx, 500));
    cr_assert_null(n500->first_name);
    cr_assert_null(n500->avatar.data);
}

FLASH_TEST(postgres, sql_metacharacters_in_keys_are_bound_never_spliced) {
    start(0, 0);
    static const char *const evil[] = {"'; DROP TABLE events; --", "\" OR 1=1 --", "x' OR '1'='1", "$1 $2 ?",
                                       "a\\b'c\"d", "{a,b}", "NULL", "\\x00", "robert'); DELETE FROM users; --",
                                       "'}; DROP TABLE users; --", "é ü 日本"};
    enum { N = sizeof evil / sizeof evil[0] };
    flash_promise *ps[N];
    for (int i = 0; i < N; i++) ps[i] = PgEventOnSlug_resolve_async_or_none(ctx, evil[i]);
    void **v = wait_ok(flash_gather(ctx, N, ps));
    for (int i = 0; i < N; i++) cr_assert_null(v[i], "%s matched something", evil[i]);
    cr_assert_eq(sql_count("SELECT count(*) FROM events"), 10, "events is still there");
    cr_assert_eq(sql_count("SELECT count(*) FROM users"), 100, "users is untouched");
    /* Now with those slugs in the table: each finds exactly its row. */
    PGresult *r;
    for (int i = 0; i < N; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", 100 + i);
        const char *params[2] = {id, evil[i]};
        r = PQexecParams(admin, "INSERT INTO events VALUES ($1::int8, $2, 'evil')", 2, NULL, params, NULL, NULL, 0);
        cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(r));
        PQclear(r);
    }
    flash_ctx_destroy(ctx); /* a context without the cached not-founds */
    ctx = flash_ctx_create(NULL);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_pg_source(pg)), 0);
    for (int i = 0; i < N; i++) ps[i] = PgEventOnSlug_resolve_async(ctx, evil[i]);
    v = wait_ok(flash_gather(ctx, N, ps));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(((PgEvent *)v[i])->id, 100 + i, "%s", evil[i]);
        cr_assert_str_eq(((PgEvent *)v[i])->slug, evil[i]);
    }
    /* The string "NULL" is not SQL NULL, and a NULL key is not "NULL". */
    flash_list *l = wait_ok(PgUser_filter_by_first_name_async(ctx, "NULL"));
    cr_assert_eq(l->count, 0);
}

FLASH_TEST(postgres, a_null_in_a_non_null_field_fails_only_that_key) {
    start(0, 0);
    sql("UPDATE users SET age = NULL WHERE id = 3; UPDATE users SET score = NULL WHERE id = 4;"
        "UPDATE users SET active = NULL WHERE id = 5");
    flash_promise *ps[5];
    for (int i = 0; i < 5; i++) ps[i] = PgUser_get_by_id_async(ctx, i + 1);
    flash_settled *r = wait_ok(flash_gather_settled(ctx, 5, ps));
    cr_assert_eq(r[0].state, FLASH_FULFILLED);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
    for (int i = 2; i < 5; i++) {
        cr_assert_eq(r[i].error, FLASH_ESOURCE, "user %d: %d", i + 1, r[i].error);
        cr_assert(strstr(r[i].message, "is NULL"), "%s", r[i].message);
    }
    cr_assert(strstr(r[2].message, "users.age"), "%s", r[2].message);
    cr_assert(strstr(r[3].message, "users.score"), "%s", r[3].message);
    cr_assert(strstr(r[4].message, "users.active"), "%s", r[4].message);
    cr_assert_eq(flash_pg_stats_get(pg).rejected, 3);
    /* A list holding a bad row fails; the other list of the batch does not. */
    flash_ctx_reset(ctx);
    flash_promise *ls[2] = {PgUser_filter_by_first_name_async(ctx, "Edsger"), /* 3, 8, ... */
                            PgUser_filter_by_first_name_async(ctx, "Grace")}; /* 1, 6, ... */
    r = wait_ok(flash_gather_settled(ctx, 2, ls));
    cr_assert_eq(r[0].error, FLASH_ESOURCE);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
    cr_assert_eq(((flash_list *)r[1].value)->count, 20);
}

FLASH_TEST(postgres, a_type_mismatch_fails_that_key_or_that_class) {
    start(0, 0);
    /* Per row: an int8 value out of I32 range fails only its key. */
    flash_promise *ps[3] = {PgNarrow_get_by_id_async(ctx, 1), PgNarrow_get_by_id_async(ctx, 2),
                            PgNarrow_get_by_id_async(ctx, 3)};
    flash_settled *r = wait_ok(flash_gather_settled(ctx, 3, ps));
    cr_assert_eq(r[0].state, FLASH_FULFILLED);
    cr_assert_eq(((PgNarrow *)r[0].value)->n, 5);
    cr_assert_eq(r[1].error, FLASH_ESOURCE);
    cr_assert(strstr(r[1].message, "narrow.n = 5000000000 is out of range"), "%s", r[1].message);
    cr_assert_eq(r[2].state, FLASH_FULFILLED);
    cr_assert_eq(((PgNarrow *)r[2].value)->n, -7);
    /* Per column: a text column for an I64 field fails the class's keys
       with a message naming both; other classes of the batch are fine. */
    flash_ctx_reset(ctx);
    flash_promise *qs[2] = {PgWrongOnSlug_resolve_async(ctx, "event1"), PgEventOnSlug_resolve_async(ctx, "event1")};
    r = wait_ok(flash_gather_settled(ctx, 2, qs));
    cr_assert_eq(r[0].error, FLASH_ESOURCE);
    cr_assert(strstr(r[0].message, "events.title is text, which does not map to PgWrong.title (I64)"), "%s",
              r[0].message);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
}

FLASH_TEST(postgres, sql_errors_fail_the_class_with_the_server_message) {
    start(0, 0);
    flash_promise *ps[2] = {PgGhost_get_by_id_async(ctx, 1), PgUser_get_by_id_async(ctx, 1)};
    flash_settled *r = wait_ok(flash_gather_settled(ctx, 2, ps));
    cr_assert_eq(r[0].error, FLASH_ESOURCE);
    cr_assert(strstr(r[0].message, "relation \"no_such_table\" does not exist"), "%s", r[0].message);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
    /* The connection is still good, and the statement is retried later. */
    sql("CREATE TABLE no_such_table (id int8, name text); INSERT INTO no_such_table VALUES (1, 'boo')");
    flash_ctx_reset(ctx);
    PgGhost *g = wait_ok(PgGhost_get_by_id_async(ctx, 1));
    cr_assert_str_eq(g->name, "boo");
    cr_assert_eq(flash_pg_stats_get(pg).connects, 1);
    /* A schema change under a prepared statement: one failure at most, then fine. */
    sql("ALTER TABLE no_such_table ALTER COLUMN name TYPE varchar(10)");
    flash_ctx_destroy(ctx);
    ctx = flash_ctx_create(NULL);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_pg_source(pg)), 0);
    if (wait_rc(PgGhost_get_by_id_async(ctx, 1)) != 0) {
        flash_ctx_reset(ctx);
        g = wait_ok(PgGhost_get_by_id_async(ctx, 1));
    }
}

FLASH_TEST(postgres, database_down_fails_fast_and_the_source_reconnects) {
    start(0, 0);
    wait_ok(PgUser_get_by_id_async(ctx, 1));
    flash_test_postgres_halt(&server);
    flash_ctx_reset(ctx);
    double t0 = now_s();
    flash_promise *p = PgUser_get_by_id_async(ctx, 2);
    cr_assert_eq(wait_rc(p), FLASH_ESOURCE);
    double took = now_s() - t0;
    cr_assert_lt(took, 1.0, "failed in %.3f s", took);
    cr_assert(strstr(flash_promise_message(p), "postgres:"), "%s", flash_promise_message(p));
    /* While marked down: no connect attempt at all. */
    flash_ctx_reset(ctx);
    flash_pg_stats before = flash_pg_stats_get(pg);
    p = PgUser_get_by_id_async(ctx, 3);
    cr_assert_eq(wait_rc(p), FLASH_ESOURCE);
    flash_pg_stats after = flash_pg_stats_get(pg);
    cr_assert_eq(after.fast_fails, before.fast_fails + 1);
    cr_assert_eq(after.connect_failures, before.connect_failures);
    cr_assert(strstr(flash_promise_message(p), "marked down"), "%s", flash_promise_message(p));
    /* Back up: after the rest, the next fetch connects again. */
    cr_assert(flash_test_postgres_restart(&server));
    usleep(250 * 1000); /* > retry_interval_ms */
    flash_poll_run_once(loop, false); /* the rest's timer */
    flash_ctx_reset(ctx);
    PgUser *u = wait_ok(PgUser_get_by_id_async(ctx, 4));
    cr_assert_eq(u->id, 4);
    cr_assert_eq(flash_pg_stats_get(pg).connects, 2);
}

FLASH_TEST(postgres, a_server_restart_under_an_idle_connection_is_transparent) {
    start(0, 0);
    wait_ok(PgUser_get_by_id_async(ctx, 1));
    cr_assert(flash_test_postgres_restart(&server));
    flash_ctx_reset(ctx);
    PgUser *u = wait_ok(PgUser_get_by_id_async(ctx, 2)); /* noticed when idle, or retried once */
    cr_assert_eq(u->id, 2);
    flash_pg_stats s = flash_pg_stats_get(pg);
    cr_assert_eq(s.connects, 2);
    cr_assert_eq(s.lost, 1);
    /* Without a cache the fetch leaves before the loop polls: the query goes
       out on the dead connection, fails, and is retried once on a new one. */
    ctx2 = flash_ctx_create(NULL);
    cr_assert_eq(flash_poll_attach(ctx2, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx2, NULL, flash_pg_source(pg)), 0);
    cr_assert(flash_test_postgres_restart(&server));
    uint64_t retries = s.retries;
    flash_promise *p = PgUser_get_by_id_async(ctx2, 3);
    flash_drain(ctx2); /* dispatch now, before the loop could notice */
    u = wait_ok_in(ctx2, p);
    cr_assert_eq(u->id, 3);
    s = flash_pg_stats_get(pg);
    cr_assert_eq(s.connects, 3);
    cr_assert_eq(s.retries, retries + 1, "retries %llu, lost %llu", (unsigned long long)s.retries, (unsigned long long)s.lost);
    cr_assert_eq(s.errors, 0);
}

FLASH_TEST(postgres, a_slow_query_times_out_and_the_connection_is_reset) {
    start(300, 0);
    wait_ok(PgUser_get_by_id_async(ctx, 1));
    flash_ctx_reset(ctx);
    double t0 = now_s();
    flash_promise *p = PgSlowOnSlug_resolve_async(ctx, "event1");
    cr_assert_eq(wait_rc(p), FLASH_ETIMEDOUT, "%s", flash_promise_message(p));
    double took = now_s() - t0;
    cr_assert(took >= 0.25 && took < 1.9, "timed out after %.3f s (the query sleeps 2 s)", took);
    cr_assert(strstr(flash_promise_message(p), "slow_events"), "%s", flash_promise_message(p));
    flash_pg_stats s = flash_pg_stats_get(pg);
    cr_assert_eq(s.timeouts, 1);
    cr_assert_eq(s.connected, 0, "the connection was closed");
    /* The next fetch opens a new connection. */
    flash_ctx_reset(ctx);
    PgUser *u = wait_ok(PgUser_get_by_id_async(ctx, 9));
    cr_assert_eq(u->id, 9);
    cr_assert_eq(flash_pg_stats_get(pg).connects, 2);
}

FLASH_TEST(postgres, cancel_drops_queued_fetches_and_discards_results_in_flight) {
    start(0, 1);
    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    ctx2 = flash_ctx_create(&cd);
    cr_assert_eq(flash_poll_attach(ctx2, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx2, NULL, flash_pg_source(pg)), 0);
    /* ctx: a slowish query in flight; ctx2: a fetch queued behind it. */
    flash_promise *slow = PgSlowishOnSlug_resolve_async(ctx, "event1");
    for (int i = 0; i < 200; i++) {
        flash_pg_stats s = flash_pg_stats_get(pg);
        if (s.fetches == 1 && s.connected == 1 && s.queued == 0) break;
        flash_poll_run_once(loop, true);
    }
    flash_promise *queued = PgUser_get_by_id_async(ctx2, 5);
    (void)slow;
    (void)queued;
    for (int i = 0; i < 200 && flash_pg_stats_get(pg).fetches < 2; i++) flash_poll_run_once(loop, true);
    flash_pg_stats s0 = flash_pg_stats_get(pg);
    cr_assert_eq(s0.fetches, 2);
    cr_assert_eq(s0.connected, 1);
    cr_assert_eq(s0.queued, 1, "the second fetch waits for the connection");
    flash_ctx_reset(ctx2); /* the queued one goes */
    cr_assert_eq(flash_pg_stats_get(pg).queued, 0);
    flash_ctx_reset(ctx); /* the one in flight is forgotten */
    cr_assert_eq(flash_pg_stats_get(pg).canceled, 2, "canceled %llu", (unsigned long long)flash_pg_stats_get(pg).canceled);
    /* Its result arrives and is discarded; the connection serves the next. */
    for (int i = 0; i < 500 && flash_pg_stats_get(pg).queries == 0; i++) flash_poll_run_once(loop, true);
    PgUser *u = wait_ok(PgUser_get_by_id_async(ctx, 6));
    cr_assert_eq(u->id, 6);
    flash_pg_stats s = flash_pg_stats_get(pg);
    cr_assert_eq(s.connects, 1);
    cr_assert_eq(s.queries, 2);
    /* A context destroyed with a fetch in flight, before the source. */
    flash_ctx_reset(ctx);
    PgSlowishOnSlug_resolve_async(ctx, "event2");
    flash_poll_run_once(loop, false);
    flash_poll_run_once(loop, false);
    flash_ctx_destroy(ctx);
    ctx = NULL;
}

FLASH_TEST(postgres, a_pool_runs_fetches_of_two_contexts_at_once) {
    start(0, 2);
    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    ctx2 = flash_ctx_create(&cd);
    cr_assert_eq(flash_poll_attach(ctx2, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx2, NULL, flash_pg_source(pg)), 0);
    flash_promise *a = PgSlowishOnSlug_resolve_async(ctx, "event1");
    flash_promise *b = PgSlowishOnSlug_resolve_async(ctx2, "event2");
    /* Each query sleeps 0.3 s: both sent before either answered means they
       ran at once, on two connections. */
    for (int i = 0; i < 1000 && flash_pg_stats_get(pg).queries < 2; i++) flash_poll_run_once(loop, true);
    cr_assert_eq(flash_pg_stats_get(pg).queries, 2);
    cr_assert_eq(flash_promise_state(a), FLASH_PENDING);
    cr_assert_eq(flash_promise_state(b), FLASH_PENDING);
    PgSlowish *ea = wait_ok_in(ctx, a);
    PgSlowish *eb = wait_ok_in(ctx2, b);
    cr_assert_eq(ea->id, 1);
    cr_assert_eq(eb->id, 2);
    flash_pg_stats s = flash_pg_stats_get(pg);
    cr_assert_eq(s.connects, 2);
    cr_assert_eq(s.connected, 2);
}

FLASH_TEST(postgres, bad_arguments) {
    int err = 0;
    flash_poll *l = flash_poll_create();
    cr_assert_null(flash_pg_source_create(NULL, flash_poll_loop(l), &err));
    cr_assert_eq(err, FLASH_EINVAL);
    flash_loop none = {NULL, NULL};
    cr_assert_null(flash_pg_source_create("dbname=x", none, &err));
    cr_assert_eq(err, FLASH_EINVAL);
    cr_assert_null(flash_pg_source_create("this is = not 'a conninfo", flash_poll_loop(l), &err));
    cr_assert_eq(err, FLASH_EINVAL);
    /* Nothing listens there: the fetch fails with libpq's message. */
    flash_pg *p = flash_pg_source_create("host=127.0.0.1 port=1 connect_timeout=2", flash_poll_loop(l), &err);
    cr_assert(p);
    flash_ctx *c = flash_ctx_create(NULL);
    cr_assert_eq(flash_poll_attach(c, l), 0);
    cr_assert_eq(flash_ctx_set_source(c, NULL, flash_pg_source(p)), 0);
    flash_promise *q = PgUser_get_by_id_async(c, 1);
    void *v;
    cr_assert_eq(flash_wait(c, q, &v), FLASH_ESOURCE);
    cr_assert(strstr(flash_promise_message(q), "refused"), "%s", flash_promise_message(q));
    cr_assert_str_neq(flash_pg_last_error(p), "");
    flash_ctx_destroy(c);
    flash_pg_destroy(p);
    flash_poll_destroy(l);
}

/* The same round trip and timeout on every loop adapter, one server. */
FLASH_TEST(postgres, works_on_every_loop) {
    alarm(90);
    cr_assert(flash_test_postgres_start(&server));
    admin = PQconnectdb(server.extra);
    cr_assert_eq(PQstatus(admin), CONNECTION_OK);
    sql(schema);
    for (size_t i = 0; i < flash_test_loop_count; i++) {
        const flash_test_loop *L = &flash_test_loops[i];
        void *native = L->create();
        flash_pg_desc d;
        memset(&d, 0, sizeof d);
        d.conninfo = server.extra;
        d.loop = L->loop(native);
        d.query_timeout_ms = 300;
        int err;
        flash_pg *p = flash_pg_create(&d, &err);
        cr_assert(p);
        flash_ctx *c = flash_ctx_create(NULL);
        cr_assert_eq(L->attach(c, native), 0);
        cr_assert_eq(flash_ctx_set_source(c, NULL, flash_pg_source(p)), 0);
        void *v = NULL;
        flash_promise *ps[3] = {PgUser_get_by_id_async(c, 3), PgEventOnSlug_resolve_async(c, "event2"),
                                PgPart_filter_by_event_async(c, 1)};
        cr_assert_eq(flash_wait(c, flash_gather(c, 3, ps), &v), 0, "%s", L->name);
        cr_assert_str_eq(((PgUser *)((void **)v)[0])->username, "user3");
        cr_assert_eq(((flash_list *)((void **)v)[2])->count, 5);
        flash_ctx_reset(c);
        cr_assert_eq(flash_wait(c, PgSlowOnSlug_resolve_async(c, "event1"), &v), FLASH_ETIMEDOUT, "%s", L->name);
        flash_ctx_reset(c);
        cr_assert_eq(flash_wait(c, PgUser_get_by_id_async(c, 4), &v), 0, "%s", L->name);
        cr_assert_eq(flash_pg_stats_get(p).connects, 2, "%s", L->name);
        flash_ctx_destroy(c);
        flash_pg_destroy(p);
        L->destroy(native);
    }
}
