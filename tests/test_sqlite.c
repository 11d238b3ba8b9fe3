/* The SQLite source against a real database file in a temp dir: the SQL it
   issues (one statement per class per batch, cached), type and NULL mapping,
   multi-field and NULL keys, bound metacharacters, rejected rows failing
   only their key, SQLite errors, chunking. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"
#include "backends/source/sqlite.h"

#define SQ_USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, first_name) F(I32, age) F(F64, score) F(BOOL, active) F(BYTES, avatar)
FLASH_MODEL_OPT(SqUser, SQ_USER_FIELDS, .table = "users")
FLASH_GET_KEYS(SqUser, (id), (username))
FLASH_FILTER_KEYS(SqUser, (first_name))

#define SQ_EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL_OPT(SqEvent, SQ_EVENT_FIELDS, .table = "events")
FLASH_INSTANCE_CACHE(SqEventOnSlug, SqEvent, (slug))

#define SQ_PART_FIELDS(F) F(I64, id) F(I64, user) F(I64, event) F(STR, role)
FLASH_MODEL_OPT(SqPart, SQ_PART_FIELDS, .table = "participants")
FLASH_GET_KEYS(SqPart, (user, event), (event, role))
FLASH_FILTER_KEYS(SqPart, (event))

/* A model whose table does not exist. */
#define SQ_GHOST_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(SqGhost, SQ_GHOST_FIELDS, .table = "no_such_table")
FLASH_GET_KEYS(SqGhost, (id))

/* Odd table names: a quote inside, and schema-qualified. */
#define SQ_ODD_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(SqOdd, SQ_ODD_FIELDS, .table = "we\"ird; --")
FLASH_GET_KEYS(SqOdd, (id))
#define SQ_QUALIFIED_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL_OPT(SqQualified, SQ_QUALIFIED_FIELDS, .table = "main.events")
FLASH_GET_KEYS(SqQualified, (id))

static char dir[64];
static char path[128];
static sqlite3 *db;
static flash_sqlite *sq;
static flash_poll *loop;
static flash_cache cache;
static flash_ctx *ctx;

static void exec(const char *sql) {
    char *err = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    cr_assert_eq(rc, SQLITE_OK, "%s: %s", sql, err ? err : "?");
}

static void setup(void) {
    snprintf(dir, sizeof dir, "/tmp/flash-sqlite-XXXXXX");
    cr_assert(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    exec("CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT UNIQUE, first_name TEXT, age INTEGER,"
         " score REAL, active INTEGER, avatar BLOB);"
         "CREATE TABLE events (id INTEGER PRIMARY KEY, slug TEXT UNIQUE, title TEXT);"
         "CREATE TABLE participants (id INTEGER PRIMARY KEY, user INTEGER, event INTEGER, role TEXT);");
    exec("BEGIN");
    {
        static const char *const names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara"};
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(db, "INSERT INTO users VALUES (?,?,?,?,?,?,?)", -1, &st, NULL), SQLITE_OK);
        for (int i = 1; i <= 100; i++) {
            char username[32];
            snprintf(username, sizeof username, "user%d", i);
            sqlite3_bind_int(st, 1, i);
            sqlite3_bind_text(st, 2, username, -1, SQLITE_TRANSIENT);
            sqlite3_bind_text(st, 3, names[i % 5], -1, SQLITE_STATIC);
            sqlite3_bind_int(st, 4, 20 + i % 50);
            sqlite3_bind_double(st, 5, i * 1.5);
            sqlite3_bind_int(st, 6, i % 2 == 0);
            sqlite3_bind_blob(st, 7, "\0\1\2", 3, SQLITE_STATIC);
            cr_assert_eq(sqlite3_step(st), SQLITE_DONE);
            sqlite3_reset(st);
        }
        sqlite3_finalize(st);
    }
    for (int e = 1; e <= 10; e++) {
        char sql[128];
        snprintf(sql, sizeof sql, "INSERT INTO events VALUES (%d, 'event%d', 'Event %d')", e, e, e);
        exec(sql);
    }
    {
        int id = 1;
        for (int u = 1; u <= 5; u++)
            for (int e = 1; e <= 3; e++) {
                char sql[128];
                snprintf(sql, sizeof sql, "INSERT INTO participants VALUES (%d, %d, %d, '%s')", id++, u, e,
                         u == 1 ? "host" : "guest");
                exec(sql);
            }
    }
    exec("COMMIT");
    sq = flash_sqlite_create(db);
    cr_assert(sq);
    loop = flash_poll_create();
    cache = flash_memory_create(NULL);
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = cache;
    ctx = flash_ctx_create(&d);
    cr_assert(ctx && loop && cache.vt);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_sqlite_source(sq)), 0);
}

static void teardown(void) {
    flash_ctx_destroy(ctx);
    flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    flash_sqlite_destroy(sq);
    sqlite3_close(db);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (dir[0] && system(cmd) != 0) {
    }
    ctx = NULL;
    sq = NULL;
    db = NULL;
}
TestSuite(sqlite, .init = setup, .fini = teardown);

static void *wait_ok(flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

static int wait_rc(flash_promise *p) {
    void *v = NULL;
    return flash_wait(ctx, p, &v);
}

FLASH_TEST(sqlite, gather_of_three_classes_is_one_statement_per_class) {
    flash_promise *ps[50];
    size_t n = 0;
    for (int i = 1; i <= 40; i++) ps[n++] = SqUser_get_by_id_async(ctx, i);
    for (int u = 1; u <= 5; u++) ps[n++] = SqPart_get_by_user_event_async(ctx, u, 2);
    ps[n++] = SqEventOnSlug_resolve_async(ctx, "event3");
    ps[n++] = SqEventOnSlug_resolve_async(ctx, "event7");
    void **v = wait_ok(flash_gather(ctx, n, ps));
    SqUser *u7 = v[6];
    cr_assert_eq(u7->id, 7);
    cr_assert_str_eq(u7->username, "user7");
    cr_assert_str_eq(u7->first_name, "Grace");
    cr_assert_eq(u7->age, 27);
    cr_assert_float_eq(u7->score, 10.5, 1e-12);
    cr_assert_eq(u7->active, false);
    cr_assert_eq(u7->avatar.len, 3);
    cr_assert_eq(memcmp(u7->avatar.data, "\0\1\2", 3), 0);
    cr_assert_eq(((SqPart *)v[42])->user, 3);
    cr_assert_eq(((SqPart *)v[42])->event, 2);
    cr_assert_str_eq(((SqEvent *)v[46])->title, "Event 7");
    flash_sqlite_stats s = flash_sqlite_stats_get(sq);
    cr_assert_eq(s.fetches, 3);
    cr_assert_eq(s.statements, 3, "one statement per class, got %llu", (unsigned long long)s.statements);
    cr_assert_eq(s.prepares, 3);
    cr_assert_eq(s.rows, 47);
    cr_assert_eq(flash_ctx_stats(ctx).cache_round_trips, 1);

    /* The next request: all from the cache, no statement. */
    flash_ctx_reset(ctx);
    SqUser *again = wait_ok(SqUser_get_by_id_async(ctx, 7));
    cr_assert_str_eq(again->username, "user7");
    cr_assert_eq(flash_sqlite_stats_get(sq).statements, 3);

    /* Another 40-key batch: a cached statement (same bucket), not a new prepare. */
    flash_ctx_reset(ctx);
    n = 0;
    for (int i = 41; i <= 80; i++) ps[n++] = SqUser_get_by_id_async(ctx, i);
    wait_ok(flash_gather(ctx, n, ps));
    s = flash_sqlite_stats_get(sq);
    cr_assert_eq(s.statements, 4);
    cr_assert_eq(s.prepares, 3, "the 64-tuple statement is reused");
}

FLASH_TEST(sqlite, filter_gives_lists_and_empty_lists) {
    flash_promise *ps[3] = {SqUser_filter_by_first_name_async(ctx, "Ada"),
                            SqUser_filter_by_first_name_async(ctx, "Nobody"),
                            SqPart_filter_by_event_async(ctx, 2)};
    void **v = wait_ok(flash_gather(ctx, 3, ps));
    flash_list *ada = v[0], *none = v[1], *parts = v[2];
    cr_assert_eq(ada->count, 20);
    for (size_t i = 0; i < ada->count; i++) cr_assert_str_eq(((SqUser *)ada->items[i])->first_name, "Ada");
    cr_assert_eq(none->count, 0);
    cr_assert_eq(parts->count, 5);
    cr_assert_eq(flash_sqlite_stats_get(sq).statements, 2, "two classes (users by first_name, parts by event)");
}

FLASH_TEST(sqlite, multi_field_keys_match_whole_tuples) {
    /* (user, event) pairs: (1,1) (2,3) exist; (1,9) and (9,1) do not. */
    flash_promise *ps[4] = {SqPart_get_by_user_event_async_or_none(ctx, 1, 1),
                            SqPart_get_by_user_event_async_or_none(ctx, 2, 3),
                            SqPart_get_by_user_event_async_or_none(ctx, 1, 9),
                            SqPart_get_by_user_event_async_or_none(ctx, 9, 1)};
    void **v = wait_ok(flash_gather(ctx, 4, ps));
    cr_assert_eq(((SqPart *)v[0])->id, 1);
    cr_assert_eq(((SqPart *)v[1])->id, 6);
    cr_assert_null(v[2]);
    cr_assert_null(v[3]);
    cr_assert_eq(flash_sqlite_stats_get(sq).statements, 1);
    /* (event, role): one host per event; "guest" matches several -> MULTIPLE. */
    SqPart *host = wait_ok(SqPart_get_by_event_role_async(ctx, 3, "host"));
    cr_assert_eq(host->user, 1);
    cr_assert_eq(wait_rc(SqPart_get_by_event_role_async(ctx, 3, "guest")), FLASH_EMULTIPLE);
}

FLASH_TEST(sqlite, sql_null_maps_to_null_strings_and_bytes_and_null_keys_use_is_null) {
    exec("INSERT INTO users VALUES (500, 'nulls', NULL, 1, 2.0, 1, NULL);"
         "INSERT INTO users VALUES (501, 'nulls2', NULL, 1, 2.0, 0, x'');"
         "INSERT INTO participants VALUES (900, 7, 8, NULL);");
    SqUser *u = wait_ok(SqUser_get_by_id_async(ctx, 500));
    cr_assert_null(u->first_name);
    cr_assert_null(u->avatar.data);
    cr_assert_eq(u->avatar.len, 0);
    SqUser *u2 = wait_ok(SqUser_get_by_id_async(ctx, 501));
    cr_assert_not_null(u2->avatar.data, "an empty blob is not NULL");
    cr_assert_eq(u2->avatar.len, 0);
    cr_assert_eq(u2->active, false);

    /* filter(first_name=None) is first_name IS NULL, in the same batch as a
       plain key. */
    flash_promise *ps[2] = {SqUser_filter_by_first_name_async(ctx, NULL),
                            SqUser_filter_by_first_name_async(ctx, "Alan")};
    void **v = wait_ok(flash_gather(ctx, 2, ps));
    flash_list *nulls = v[0], *alans = v[1];
    cr_assert_eq(nulls->count, 2);
    cr_assert_eq(alans->count, 20);
    /* A multi-field key with a NULL part. */
    SqPart *p = wait_ok(SqPart_get_by_event_role_async(ctx, 8, NULL));
    cr_assert_eq(p->id, 900);
    cr_assert_null(p->role);
    /* Round trip through the cache: NULLs survive. */
    flash_ctx_reset(ctx);
    u = wait_ok(SqUser_get_by_id_async(ctx, 500));
    cr_assert_null(u->first_name);
    cr_assert_null(u->avatar.data);
}

FLASH_TEST(sqlite, sql_metacharacters_in_keys_are_bound_never_spliced) {
    static const char *const evil[] = {"'; DROP TABLE events; --", "\" OR 1=1 --", "x' OR '1'='1", "?1 ?2 ?",
                                       "a\\b'c\"d", "robert'); DELETE FROM users; --"};
    flash_promise *ps[6];
    for (int i = 0; i < 6; i++) ps[i] = SqEventOnSlug_resolve_async_or_none(ctx, evil[i]);
    void **v = wait_ok(flash_gather(ctx, 6, ps));
    for (int i = 0; i < 6; i++) cr_assert_null(v[i], "%s matched something", evil[i]);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(db, "SELECT count(*) FROM events", -1, &st, NULL), SQLITE_OK, "events is still there");
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_eq(sqlite3_column_int(st, 0), 10);
    sqlite3_finalize(st);
    cr_assert_eq(SqUser_get_by_id(ctx, 1, &(SqUser *){NULL}), 0, "users is still there");
    /* And such a value is found when it is there. */
    exec("INSERT INTO events VALUES (99, '''; DROP TABLE events; --', 'evil')");
    flash_ctx_reset(ctx);
    flash_cache_destroy(cache); /* forget the cached not-found */
    cache.vt = NULL;
    flash_ctx_destroy(ctx);
    ctx = flash_ctx_create(NULL);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_sqlite_source(sq)), 0);
    SqEvent *e = wait_ok(SqEventOnSlug_resolve_async(ctx, evil[0]));
    cr_assert_eq(e->id, 99);
}

FLASH_TEST(sqlite, table_names_are_quoted_identifiers_and_may_name_a_schema) {
    exec("CREATE TABLE \"we\"\"ird; --\" (id INTEGER PRIMARY KEY, name TEXT);"
         "INSERT INTO \"we\"\"ird; --\" VALUES (1, 'odd one');");
    SqOdd *odd = wait_ok(SqOdd_get_by_id_async(ctx, 1));
    cr_assert_str_eq(odd->name, "odd one");
    SqQualified *e = wait_ok(SqQualified_get_by_id_async(ctx, 3));
    cr_assert_str_eq(e->slug, "event3");
    flash_strbuf b = {0};
    flash_sql_ident(&b, "s.t\"x", true);
    flash_sql_ident(&b, "s.t", false);
    cr_assert_str_eq(b.data, "\"s\".\"t\"\"x\"\"s.t\"");
    flash_strbuf_free(&b);
}

FLASH_TEST(sqlite, a_null_in_a_non_null_field_fails_only_that_key) {
    exec("UPDATE users SET age = NULL WHERE id = 3; UPDATE users SET score = NULL WHERE id = 4;"
         "UPDATE users SET active = NULL WHERE id = 5");
    flash_promise *ps[5];
    for (int i = 0; i < 5; i++) ps[i] = SqUser_get_by_id_async(ctx, i + 1);
    void **v = wait_ok(flash_gather_settled(ctx, 5, ps));
    flash_settled *r = (flash_settled *)v;
    cr_assert_eq(r[0].state, FLASH_FULFILLED);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
    for (int i = 2; i < 5; i++) {
        cr_assert_eq(r[i].error, FLASH_ESOURCE, "user %d: %d", i + 1, r[i].error);
        cr_assert(strstr(r[i].message, "users."), "%s", r[i].message);
        cr_assert(strstr(r[i].message, "NULL"), "%s", r[i].message);
    }
    cr_assert(strstr(r[2].message, "users.age"), "%s", r[2].message);
    cr_assert(strstr(r[3].message, "users.score"), "%s", r[3].message);
    cr_assert_eq(flash_sqlite_stats_get(sq).rejected, 3);
    /* A list with a bad row fails as a whole; other lists are fine. */
    flash_ctx_reset(ctx);
    flash_promise *ls[2] = {SqUser_filter_by_first_name_async(ctx, "Edsger"), /* ids 3, 8, ... */
                            SqUser_filter_by_first_name_async(ctx, "Alan")};  /* ids 1, 6, ... */
    r = wait_ok(flash_gather_settled(ctx, 2, ls));
    cr_assert_eq(r[0].error, FLASH_ESOURCE);
    cr_assert_eq(r[1].state, FLASH_FULFILLED);
    cr_assert_eq(((flash_list *)r[1].value)->count, 20);
    /* Failures are not cached: fixed, it reads fine. */
    exec("UPDATE users SET age = 33 WHERE id = 3");
    flash_ctx_reset(ctx);
    SqUser *u = wait_ok(SqUser_get_by_id_async(ctx, 3));
    cr_assert_eq(u->age, 33);
}

FLASH_TEST(sqlite, a_type_mismatch_fails_only_that_key) {
    exec("UPDATE users SET age = 'abc' WHERE id = 10;"     /* TEXT in an INTEGER column */
         "UPDATE users SET active = 2.5 WHERE id = 11;"    /* REAL in a BOOL field */
         "UPDATE users SET age = 5000000000 WHERE id = 12;" /* over I32 */
         "UPDATE users SET username = x'00ff' WHERE id = 13;" /* BLOB in a STR field */
         "UPDATE users SET score = 7 WHERE id = 14;"       /* INTEGER in an F64 field: fine */
         "UPDATE users SET avatar = 'text' WHERE id = 15"); /* TEXT in a BYTES field: fine */
    flash_promise *ps[6];
    for (int i = 0; i < 6; i++) ps[i] = SqUser_get_by_id_async(ctx, 10 + i);
    flash_settled *r = wait_ok(flash_gather_settled(ctx, 6, ps));
    for (int i = 0; i < 4; i++) cr_assert_eq(r[i].error, FLASH_ESOURCE, "user %d", 10 + i);
    cr_assert(strstr(r[0].message, "users.age holds a TEXT value"), "%s", r[0].message);
    cr_assert(strstr(r[1].message, "users.active holds a REAL value"), "%s", r[1].message);
    cr_assert(strstr(r[2].message, "out of range"), "%s", r[2].message);
    cr_assert(strstr(r[3].message, "users.username holds a BLOB"), "%s", r[3].message);
    cr_assert_eq(r[4].state, FLASH_FULFILLED);
    cr_assert_float_eq(((SqUser *)r[4].value)->score, 7.0, 1e-12);
    cr_assert_eq(r[5].state, FLASH_FULFILLED);
    cr_assert_eq(((SqUser *)r[5].value)->avatar.len, 4);
    cr_assert_eq(memcmp(((SqUser *)r[5].value)->avatar.data, "text", 4), 0);
}

FLASH_TEST(sqlite, sqlite_errors_fail_the_fetch_with_esource_and_a_message) {
    flash_promise *ps[2] = {SqGhost_get_by_id_async(ctx, 1), SqUser_get_by_id_async(ctx, 1)};
    flash_settled *r = wait_ok(flash_gather_settled(ctx, 2, ps));
    cr_assert_eq(r[0].error, FLASH_ESOURCE);
    cr_assert(strstr(r[0].message, "no such table: no_such_table"), "%s", r[0].message);
    cr_assert_eq(r[1].state, FLASH_FULFILLED, "the other class of the batch is fine");
    cr_assert_eq(flash_sqlite_stats_get(sq).errors, 1);
    /* A dropped table after its statement was cached. */
    flash_ctx_reset(ctx);
    exec("DROP TABLE events");
    flash_promise *p = SqEventOnSlug_resolve_async(ctx, "event1");
    cr_assert_eq(wait_rc(p), FLASH_ESOURCE);
    cr_assert(strstr(flash_promise_message(p), "events"), "%s", flash_promise_message(p));
}

FLASH_TEST(sqlite, large_batches_are_split_by_max_keys_and_statements_are_reused) {
    flash_sqlite_set_max_keys(sq, 6); /* rounds down to 4 */
    flash_promise *ps[10];
    for (int i = 0; i < 10; i++) ps[i] = SqUser_get_by_id_async(ctx, i + 1);
    void **v = wait_ok(flash_gather(ctx, 10, ps));
    for (int i = 0; i < 10; i++) cr_assert_eq(((SqUser *)v[i])->id, i + 1);
    flash_sqlite_stats s = flash_sqlite_stats_get(sq);
    cr_assert_eq(s.fetches, 1);
    cr_assert_eq(s.statements, 3, "4 + 4 + 2");
    cr_assert_eq(s.prepares, 2, "the 4-tuple statement twice, the 2-tuple once");
    /* The default: 1000 keys in one statement. */
    flash_sqlite_set_max_keys(sq, 1024);
    flash_ctx_reset(ctx);
    flash_promise **many = flash_alloc(ctx, 1000 * sizeof *many);
    for (int i = 0; i < 1000; i++) many[i] = SqUser_get_by_id_async_or_none(ctx, i + 1);
    v = wait_ok(flash_gather(ctx, 1000, many));
    cr_assert_eq(((SqUser *)v[99])->id, 100);
    cr_assert_null(v[100]);
    cr_assert_eq(flash_sqlite_stats_get(sq).statements, 4);
}

FLASH_TEST(sqlite, sync_api_and_or_404) {
    SqUser *u = NULL;
    cr_assert_eq(SqUser_get_by_username(ctx, "user9", &u), 0);
    cr_assert_eq(u->id, 9);
    cr_assert_eq(SqUser_get_by_id_or_404(ctx, 12345, &u), FLASH_E404);
    SqEvent *e = NULL;
    cr_assert_eq(SqEventOnSlug_resolve(ctx, "event2", &e), 0);
    cr_assert_str_eq(e->title, "Event 2");
}
