/* Writes with invalidation (Django's save()/delete() and their signals):
   flash_save / flash_delete and the bulk forms on the SQLite and table
   sources, on the memory backend and a real memcached: the next read of
   another context sees the write, old and new keys are invalidated, a failed
   write invalidates nothing, one transaction for a bulk save. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "models.h"
#include "backends/source/sqlite.h"
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

#define WUSER_FIELDS(F) F(I64, id) F(STR, username) F(STR, name) F(I64N, team)
FLASH_MODEL_OPT(WUser, WUSER_FIELDS, .table = "wusers")
FLASH_GET_KEYS(WUser, (id), (username))
FLASH_COUNT_CACHE(WUsersOfTeam, WUser, (team))

static sqlite3 *sdb;
static flash_sqlite *sq;
static char sdir[64];
static int begins;
static flash_ctx *ctx2;

static int trace_cb(unsigned type, void *ud, void *p, void *x) {
    (void)ud;
    (void)x;
    if (type == SQLITE_TRACE_STMT && strstr(sqlite3_sql((sqlite3_stmt *)p), "BEGIN IMMEDIATE")) begins++;
    return 0;
}

static WUser wuser(int64_t id, const char *username, const char *name, int64_t team) {
    WUser u;
    u.id = id;
    u.username = username;
    u.name = name;
    u.team = flash_i64n_of(team);
    return u;
}

typedef enum { SRC_TABLE, SRC_SQLITE, SRC_PG } src_kind;
static src_kind src;
static flash_test_server pgserver;
static PGconn *admin;
static flash_pg *pg;
static uint32_t pg_conns = 2;

static void pg_sql(const char *q) {
    PGresult *r = PQexec(admin, q);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    PQclear(r);
}

static void use_source(src_kind k) {
    src = k;
    begins = 0;
    if (k == SRC_PG) {
        alarm(90);
        cr_assert(flash_test_postgres_start(&pgserver), "postgres did not start");
        admin = PQconnectdb(pgserver.extra);
        cr_assert_eq(PQstatus(admin), CONNECTION_OK, "%s", PQerrorMessage(admin));
        pg_sql("CREATE TABLE wusers (id int8 PRIMARY KEY, username text UNIQUE NOT NULL, name text, team int8);"
               "INSERT INTO wusers VALUES (1,'user1','N',1),(2,'user2','N',1),(3,'user3','N',1);");
        int err = -1;
        flash_pg_desc pd;
        memset(&pd, 0, sizeof pd);
        pd.conninfo = pgserver.extra;
        pd.loop = fx.lp;
        pd.connections = pg_conns;
        pg = flash_pg_create(&pd, &err);
        cr_assert(pg, "%s", flash_strerror(err));
        cr_assert_eq(flash_ctx_set_source(fx.ctx, &WUser_model, flash_pg_source(pg)), 0);
    } else if (k == SRC_TABLE) {
        for (int i = 1; i <= 3; i++) {
            char un[16];
            snprintf(un, sizeof un, "user%d", i);
            WUser u = wuser(i, un, "N", 1);
            cr_assert_eq(flash_table_put(fx.db, &WUser_model, &u), 0);
        }
    } else {
        char path[128];
        snprintf(sdir, sizeof sdir, "/tmp/flash-writes-XXXXXX");
        cr_assert(mkdtemp(sdir));
        snprintf(path, sizeof path, "%s/t.db", sdir);
        cr_assert_eq(sqlite3_open(path, &sdb), SQLITE_OK);
        cr_assert_eq(sqlite3_exec(sdb,
                                  "CREATE TABLE wusers (id INTEGER PRIMARY KEY, username TEXT UNIQUE NOT NULL,"
                                  " name TEXT, team INTEGER);"
                                  "INSERT INTO wusers VALUES (1,'user1','N',1),(2,'user2','N',1),(3,'user3','N',1);",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
        sqlite3_trace_v2(sdb, SQLITE_TRACE_STMT, trace_cb, NULL);
        sq = flash_sqlite_create(sdb);
        cr_assert_eq(flash_ctx_set_source(fx.ctx, &WUser_model, flash_sqlite_source(sq)), 0);
    }
    /* Another context (another request, another process) on the same cache. */
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = fx.cache;
    ctx2 = flash_ctx_create(&d);
    cr_assert(ctx2);
    cr_assert_eq(fixture_attach(ctx2), 0);
    cr_assert_eq(flash_ctx_set_source(ctx2, NULL, flash_table_source(fx.db)), 0);
    if (sq) cr_assert_eq(flash_ctx_set_source(ctx2, &WUser_model, flash_sqlite_source(sq)), 0);
    if (pg) cr_assert_eq(flash_ctx_set_source(ctx2, &WUser_model, flash_pg_source(pg)), 0);
}

static long db_count(const char *where) {
    if (src == SRC_TABLE) return (long)flash_table_count(fx.db, &WUser_model);
    char q[128];
    if (src == SRC_PG) {
        snprintf(q, sizeof q, "SELECT COUNT(*) FROM wusers WHERE %s", where);
        PGresult *r = PQexec(admin, q);
        cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
        long n = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
        return n;
    }
    sqlite3_stmt *st;
    snprintf(q, sizeof q, "SELECT COUNT(*) FROM wusers WHERE %s", where);
    cr_assert_eq(sqlite3_prepare_v2(sdb, q, -1, &st, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    long n = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

static void setup_memory(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(NULL);
}
static void setup_memcached(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMCACHED;
    fixture_setup(NULL);
}
static void teardown(void) {
    flash_ctx_destroy(ctx2);
    ctx2 = NULL;
    flash_ctx_destroy(fx.ctx);
    fx.ctx = NULL;
    if (pg) {
        flash_pg_destroy(pg);
        pg = NULL;
    }
    if (admin) {
        PQfinish(admin);
        admin = NULL;
        flash_test_postgres_stop(&pgserver);
    }
    if (sq) {
        char cmd[128];
        flash_sqlite_destroy(sq);
        sqlite3_close(sdb);
        sq = NULL;
        sdb = NULL;
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", sdir);
        if (system(cmd) != 0) {
        }
    }
    fixture_teardown();
}
TestSuite(writes, .init = setup_memory, .fini = teardown);
TestSuite(writes_memcached, .init = setup_memcached, .fini = teardown);

/* Cached by id and username, then a save that renames: another context
   reads the new row; the old username is gone, the new one found; the team
   counts of the old and the new team are both fresh. */
static void save_renames(void) {
    WUser *u = NULL;
    int64_t n1 = 0, n2 = 0;
    cr_assert_eq(WUser_get_by_id(fx.ctx, 2, &u), 0);
    cr_assert_eq(WUser_get_by_username(fx.ctx, "user2", &u), 0);
    cr_assert_eq(WUsersOfTeam_resolve(fx.ctx, flash_i64n_of(1), &n1), 0);
    cr_assert_eq(WUsersOfTeam_resolve(fx.ctx, flash_i64n_of(2), &n2), 0);
    cr_assert_eq(n1, 3);
    cr_assert_eq(n2, 0);
    flash_ctx_reset(fx.ctx);
    WUser changed = wuser(2, "renamed", "New", 2);
    cr_assert_eq(flash_save(fx.ctx, &WUser_model, &changed), 0);
    cr_assert_eq(WUser_get_by_id(ctx2, 2, &u), 0);
    cr_assert_str_eq(u->username, "renamed");
    cr_assert_str_eq(u->name, "New");
    cr_assert_eq(WUser_get_by_username(ctx2, "user2", &u), FLASH_ENOTFOUND, "the old username is invalidated");
    cr_assert_eq(WUser_get_by_username(ctx2, "renamed", &u), 0);
    cr_assert_eq(u->id, 2);
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(1), &n1), 0);
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(2), &n2), 0);
    cr_assert_eq(n1, 2, "old team's count invalidated");
    cr_assert_eq(n2, 1, "new team's count invalidated");
    /* An insert: the key cached as not found becomes found. */
    cr_assert_eq(WUser_get_by_id(fx.ctx, 50, &u), FLASH_ENOTFOUND);
    WUser fresh = wuser(50, "fresh", "F", 1);
    cr_assert_eq(flash_save(fx.ctx, &WUser_model, &fresh), 0);
    cr_assert_eq(WUser_get_by_id(ctx2, 50, &u), 0);
    cr_assert_str_eq(u->username, "fresh");
}

static void delete_rows(void) {
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_id(fx.ctx, 3, &u), 0);
    WUser key = {0};
    key.id = 3; /* only the primary key is read */
    cr_assert_eq(flash_delete(fx.ctx, &WUser_model, &key), 0);
    cr_assert_eq(WUser_get_by_id(ctx2, 3, &u), FLASH_ENOTFOUND);
    cr_assert_eq(WUser_get_by_username(ctx2, "user3", &u), FLASH_ENOTFOUND, "keys of the old row");
    key.id = 999; /* missing: fine, nothing to invalidate */
    cr_assert_eq(flash_delete(fx.ctx, &WUser_model, &key), 0);
}

FLASH_TEST(writes, sqlite_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_SQLITE);
    save_renames();
    cr_assert_eq(begins, 2, "one transaction per save");
}
FLASH_TEST(writes_memcached, sqlite_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_SQLITE);
    save_renames();
}
FLASH_TEST(writes, table_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_TABLE);
    save_renames();
}
FLASH_TEST(writes_memcached, table_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_TABLE);
    save_renames();
}
FLASH_TEST(writes, sqlite_delete_and_delete_missing) {
    use_source(SRC_SQLITE);
    delete_rows();
    cr_assert_eq(db_count("1"), 2);
}
FLASH_TEST(writes_memcached, sqlite_delete_and_delete_missing) {
    use_source(SRC_SQLITE);
    delete_rows();
}
FLASH_TEST(writes, table_delete_and_delete_missing) {
    use_source(SRC_TABLE);
    delete_rows();
    cr_assert_eq(db_count("1"), 2);
}

/* A constraint violation: rejected with the source's error, nothing written
   (the whole bulk rolled back), nothing invalidated: the cached row is
   still served from the cache. */
FLASH_TEST(writes, sqlite_failed_write_invalidates_nothing) {
    use_source(SRC_SQLITE);
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_id(fx.ctx, 2, &u), 0);
    flash_ctx_reset(fx.ctx);
    flash_stats before = flash_ctx_stats(fx.ctx);
    WUser ok = wuser(2, "fine", "X", 1), clash = wuser(3, "user1", "X", 1); /* username taken */
    const void *rows[] = {&ok, &clash};
    flash_promise *p = flash_save_rows_async(fx.ctx, &WUser_model, 2, rows);
    void *v;
    int rc = flash_wait(fx.ctx, p, &v);
    cr_assert_eq(rc, FLASH_ESOURCE);
    cr_assert(strstr(flash_promise_message(p), "UNIQUE"), "message: %s", flash_promise_message(p));
    flash_stats after = flash_ctx_stats(fx.ctx);
    cr_assert_eq(after.invalidations - before.invalidations, 0);
    cr_assert_eq(db_count("username = 'fine'"), 0, "rolled back");
    cr_assert_eq(WUser_get_by_id(fx.ctx, 2, &u), 0);
    cr_assert_str_eq(u->username, "user2");
    cr_assert_eq(flash_ctx_stats(fx.ctx).source_calls, after.source_calls, "still cached");
}

FLASH_TEST(writes, table_failed_write_invalidates_nothing) {
    use_source(SRC_TABLE);
    flash_table_fail_next(fx.db, FLASH_ESOURCE, "disk full");
    WUser x = wuser(2, "x", "X", 1);
    flash_stats before = flash_ctx_stats(fx.ctx);
    cr_assert_eq(flash_save(fx.ctx, &WUser_model, &x), FLASH_ESOURCE);
    cr_assert_eq(flash_ctx_stats(fx.ctx).invalidations, before.invalidations);
    cr_assert_str_eq(((const WUser *)flash_table_find(fx.db, &WUser_model, flash_v_i64(2)))->username, "user2");
}

/* 1,000 rows in one transaction, one invalidation. */
FLASH_TEST(writes, sqlite_bulk_save_of_1000_rows_is_one_transaction) {
    use_source(SRC_SQLITE);
    static WUser us[1000];
    static char names[1000][16];
    const void *rows[1000];
    for (int i = 0; i < 1000; i++) {
        snprintf(names[i], sizeof names[i], "bulk%d", i);
        us[i] = wuser(100 + i, names[i], "B", 7);
        rows[i] = &us[i];
    }
    int64_t n = -1;
    cr_assert_eq(WUsersOfTeam_resolve(fx.ctx, flash_i64n_of(7), &n), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(flash_save_rows(fx.ctx, &WUser_model, 1000, rows), 0);
    cr_assert_eq(begins, 1);
    cr_assert_eq(db_count("team = 7"), 1000);
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(7), &n), 0);
    cr_assert_eq(n, 1000);
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_username(ctx2, "bulk999", &u), 0);
    cr_assert_eq(u->id, 1099);
}

/* A source without writes. */
static void nofetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    (void)self;
    (void)ctx;
    flash_fetch_done(f, 0, NULL);
}
static const flash_source_vtable readonly_vt = {"readonly", nofetch, NULL, NULL};
FLASH_TEST(writes, source_without_writes_is_unsupported) {
    flash_source s = {&readonly_vt, NULL};
    cr_assert_eq(flash_ctx_set_source(fx.ctx, &WUser_model, s), 0);
    WUser x = wuser(1, "x", "X", 1);
    cr_assert_eq(flash_save(fx.ctx, &WUser_model, &x), FLASH_EUNSUPPORTED);
    cr_assert_eq(flash_delete(fx.ctx, &WUser_model, &x), FLASH_EUNSUPPORTED);
}

/* ---- PostgreSQL: one statement per batch, asynchronous on the loop ---- */

FLASH_TEST(writes, pg_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_PG);
    save_renames();
    flash_pg_stats st = flash_pg_stats_get(pg);
    cr_assert_eq(st.writes, 2);
    cr_assert_eq(st.write_rows, 2);
}
FLASH_TEST(writes_memcached, pg_save_renames_and_invalidates_old_and_new_keys) {
    use_source(SRC_PG);
    save_renames();
}
FLASH_TEST(writes, pg_delete_and_delete_missing) {
    use_source(SRC_PG);
    delete_rows();
    cr_assert_eq(db_count("true"), 2);
}
FLASH_TEST(writes_memcached, pg_delete_and_delete_missing) {
    use_source(SRC_PG);
    delete_rows();
    cr_assert_eq(db_count("true"), 2);
}

static void pg_failed_write(void) {
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_id(fx.ctx, 2, &u), 0);
    flash_ctx_reset(fx.ctx);
    flash_stats before = flash_ctx_stats(fx.ctx);
    WUser ok = wuser(2, "fine", "X", 1), clash = wuser(3, "user1", "X", 1); /* username taken */
    const void *rows[] = {&ok, &clash};
    flash_promise *p = flash_save_rows_async(fx.ctx, &WUser_model, 2, rows);
    void *v;
    cr_assert_eq(flash_wait(fx.ctx, p, &v), FLASH_ESOURCE);
    cr_assert(strstr(flash_promise_message(p), "unique"), "message: %s", flash_promise_message(p));
    flash_stats after = flash_ctx_stats(fx.ctx);
    cr_assert_eq(after.invalidations - before.invalidations, 0);
    cr_assert_eq(db_count("username = 'fine'"), 0, "rolled back");
    cr_assert_eq(WUser_get_by_id(fx.ctx, 2, &u), 0);
    cr_assert_str_eq(u->username, "user2");
    cr_assert_eq(flash_ctx_stats(fx.ctx).source_calls, after.source_calls, "still cached");
    /* The connection and the statement still work. */
    WUser fine = wuser(2, "fine", "X", 1);
    cr_assert_eq(flash_save(fx.ctx, &WUser_model, &fine), 0);
    cr_assert_eq(WUser_get_by_id(ctx2, 2, &u), 0);
    cr_assert_str_eq(u->username, "fine");
}
FLASH_TEST(writes, pg_failed_write_invalidates_nothing) {
    use_source(SRC_PG);
    pg_failed_write();
}
FLASH_TEST(writes_memcached, pg_failed_write_invalidates_nothing) {
    use_source(SRC_PG);
    pg_failed_write();
}

static void pg_bulk(void) {
    static WUser us[1000];
    static char names[1000][16];
    const void *rows[1000];
    for (int i = 0; i < 1000; i++) {
        snprintf(names[i], sizeof names[i], "bulk%d", i);
        us[i] = wuser(i < 3 ? i + 1 : 100 + i, names[i], "B", 7); /* 3 updates, 997 inserts */
        rows[i] = &us[i];
    }
    int64_t n = -1;
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_username(fx.ctx, "user1", &u), 0);
    cr_assert_eq(WUsersOfTeam_resolve(fx.ctx, flash_i64n_of(7), &n), 0);
    cr_assert_eq(n, 0);
    long logged = flash_test_postgres_log_count(&pgserver, "json_populate_recordset");
    uint64_t queries = flash_pg_stats_get(pg).queries;
    cr_assert_eq(flash_save_rows(fx.ctx, &WUser_model, 1000, rows), 0);
    cr_assert_eq(flash_pg_stats_get(pg).queries - queries, 1, "one statement (one transaction)");
    cr_assert_eq(flash_test_postgres_log_count(&pgserver, "json_populate_recordset") - logged, 1, "executed once");
    cr_assert_eq(db_count("team = 7"), 1000);
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(7), &n), 0);
    cr_assert_eq(n, 1000);
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(1), &n), 0);
    cr_assert_eq(n, 0, "the old team of the 3 updated rows");
    cr_assert_eq(WUser_get_by_username(ctx2, "user1", &u), FLASH_ENOTFOUND, "old username invalidated");
    cr_assert_eq(WUser_get_by_username(ctx2, "bulk999", &u), 0);
    cr_assert_eq(u->id, 1099);
    /* A bulk delete: one statement too. */
    queries = flash_pg_stats_get(pg).queries;
    cr_assert_eq(flash_delete_rows(fx.ctx, &WUser_model, 1000, rows), 0);
    cr_assert_eq(flash_pg_stats_get(pg).queries - queries, 1);
    cr_assert_eq(db_count("true"), 0);
    flash_ctx_reset(ctx2); /* its request memo */
    cr_assert_eq(WUsersOfTeam_resolve(ctx2, flash_i64n_of(7), &n), 0);
    cr_assert_eq(n, 0);
}
FLASH_TEST(writes, pg_bulk_save_of_1000_rows_is_one_statement) {
    use_source(SRC_PG);
    pg_bulk();
}
FLASH_TEST(writes_memcached, pg_bulk_save_of_1000_rows_is_one_statement) {
    use_source(SRC_PG);
    pg_bulk();
}

/* flash_save inside a task suspends that task only: another task's read
   runs meanwhile (the row is locked by another session, so the save waits). */
static int save_task(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    return flash_save(ctx, &WUser_model, arg);
}
static int read_task(flash_ctx *ctx, void *arg, void **result) {
    WUser *u = NULL;
    (void)arg;
    int rc = WUser_get_by_id(ctx, 1, &u);
    *result = u;
    return rc;
}
FLASH_TEST(writes, pg_save_in_a_task_suspends_only_that_task) {
    use_source(SRC_PG);
    pg_sql("BEGIN");
    pg_sql("SELECT * FROM wusers WHERE id = 2 FOR UPDATE");
    WUser changed = wuser(2, "tasked", "T", 1);
    flash_promise *pw = flash_spawn(fx.ctx, save_task, &changed);
    cr_assert_eq(flash_promise_state(pw), FLASH_PENDING);
    flash_promise *pr = flash_spawn(fx.ctx, read_task, NULL);
    void *v = NULL;
    cr_assert_eq(flash_wait(fx.ctx, pr, &v), 0);
    cr_assert_str_eq(((WUser *)v)->username, "user1");
    cr_assert_eq(flash_promise_state(pw), FLASH_PENDING, "still waiting for the row lock: %s", flash_promise_message(pw));
    pg_sql("COMMIT");
    cr_assert_eq(flash_wait(fx.ctx, pw, &v), 0);
    cr_assert_eq(db_count("username = 'tasked'"), 1);
}

/* Run the loop until the source sent its statement (waiting for a lock). */
static void pg_wait_sent(uint64_t queries) {
    int64_t end = flash_test_now_ms() + 5000;
    while (flash_pg_stats_get(pg).queries == queries && flash_test_now_ms() < end) {
        fixture_run_once(false);
        flash_test_sleep_ms(1);
    }
    cr_assert_gt(flash_pg_stats_get(pg).queries, queries, "the write was sent");
    for (int i = 0; i < 10; i++) {
        fixture_run_once(false);
        flash_test_sleep_ms(2);
    }
}

/* Run the loop until the write in flight has finished on the server. */
static void pg_settle_write(const char *where) {
    int64_t end = flash_test_now_ms() + 5000;
    while (db_count(where) == 0 && flash_test_now_ms() < end) fixture_run_once(false);
    for (int i = 0; i < 20; i++) {
        fixture_run_once(false);
        flash_test_sleep_ms(5);
    }
}

FLASH_TEST(writes, pg_reset_with_a_write_in_flight_still_invalidates) {
    use_source(SRC_PG);
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_username(ctx2, "user2", &u), 0); /* cached */
    flash_ctx_reset(ctx2);
    uint64_t q0 = flash_pg_stats_get(pg).queries;
    pg_sql("BEGIN");
    pg_sql("SELECT * FROM wusers WHERE id = 2 FOR UPDATE");
    WUser changed = wuser(2, "after_reset", "R", 1);
    flash_promise *p = flash_save_async(fx.ctx, &WUser_model, &changed);
    cr_assert(p);
    pg_wait_sent(q0); /* sent, waiting for the lock */
    uint64_t inv = flash_ctx_stats(fx.ctx).invalidations;
    flash_ctx_reset(fx.ctx);
    pg_sql("COMMIT");
    pg_settle_write("username = 'after_reset'");
    cr_assert_gt(flash_ctx_stats(fx.ctx).invalidations, inv, "committed: invalidated after the reset");
    cr_assert_eq(WUser_get_by_username(ctx2, "user2", &u), FLASH_ENOTFOUND);
    cr_assert_eq(WUser_get_by_id(ctx2, 2, &u), 0);
    cr_assert_str_eq(u->username, "after_reset");
}

FLASH_TEST(writes, pg_destroy_with_a_write_in_flight_cancels_it) {
    pg_conns = 1;
    use_source(SRC_PG);
    pg_sql("BEGIN");
    pg_sql("SELECT * FROM wusers WHERE id = 2 FOR UPDATE");
    WUser changed = wuser(2, "orphan", "O", 1), other = wuser(60, "queued", "Q", 1);
    cr_assert(flash_save_async(fx.ctx, &WUser_model, &changed));
    pg_wait_sent(0);
    cr_assert(flash_save_async(fx.ctx, &WUser_model, &other)); /* queued behind it (one connection) */
    cr_assert_eq(flash_pg_stats_get(pg).queued, 1);
    flash_ctx_destroy(fx.ctx);
    fx.ctx = NULL;
    cr_assert_eq(flash_pg_stats_get(pg).canceled, 2, "one in flight, one queued");
    cr_assert_eq(flash_pg_stats_get(pg).queued, 0);
    pg_sql("COMMIT");
    pg_settle_write("username = 'orphan'"); /* the result comes and is discarded */
    cr_assert_eq(db_count("username = 'queued'"), 0, "a queued write never ran");
    /* The source goes on serving other contexts. */
    WUser *u = NULL;
    cr_assert_eq(WUser_get_by_id(ctx2, 2, &u), 0);
    cr_assert_str_eq(u->username, "orphan");
}

/* Every field type the source reads, written and read back. */
#define WALL_FIELDS(F)                                                                                    \
    F(I64, id) F(I32, small) F(F64, score) F(BOOL, active) F(STR, name) F(BYTES, blob) F(TIME, born)    \
    F(TIMEN, seen) F(TIMEN, day) F(I64N, ref) F(I32N, rank) F(F64N, ratio) F(BOOLN, ok)
FLASH_MODEL_OPT(WAll, WALL_FIELDS, .table = "wall")
FLASH_GET_KEYS(WAll, (id))

FLASH_TEST(writes, pg_every_field_type_round_trips) {
    use_source(SRC_PG);
    pg_sql("SET TimeZone = 'America/New_York'");
    pg_sql("CREATE TABLE wall (id int8 PRIMARY KEY, small int4, score float8, active bool, name text, blob bytea,"
           " born timestamptz, seen timestamp, day date, ref int8, rank int4, ratio float8, ok bool)");
    cr_assert_eq(flash_ctx_set_source(fx.ctx, &WAll_model, flash_pg_source(pg)), 0);
    cr_assert_eq(flash_ctx_set_source(ctx2, &WAll_model, flash_pg_source(pg)), 0);
    static const char bin[] = {0, 1, '"', '\\', (char)0xff, '\n'};
    WAll a;
    memset(&a, 0, sizeof a);
    a.id = 1;
    a.small = -7;
    a.score = 0.1;
    a.active = true;
    a.name = "quote \" backslash \\ tab \t newline \n unicode \xc3\xa9";
    a.blob.data = bin;
    a.blob.len = sizeof bin;
    a.born = (flash_time)1714564800123456LL; /* 2024-05-01 12:00:00.123456 UTC */
    a.seen = flash_timen_of((flash_time)-62135596800000000LL + 86400000000LL); /* 0001-01-02 */
    a.day = flash_timen_of((flash_time)1714521600000000LL);                        /* 2024-05-01 */
    a.ref = flash_i64n_null();
    a.rank = flash_i32n_of(3);
    a.ratio = flash_f64n_of(1.0 / 0.0);
    a.ok = flash_booln_null();
    WAll b = a;
    b.id = 2;
    b.name = NULL;
    b.blob.data = NULL;
    b.blob.len = 0;
    b.seen = flash_timen_null();
    b.ref = flash_i64n_of(INT64_MIN);
    b.rank = flash_i32n_null();
    b.ratio = flash_f64n_null();
    b.ok = flash_booln_of(false);
    b.score = -0.0;
    const void *rows[] = {&a, &b};
    cr_assert_eq(flash_save_rows(fx.ctx, &WAll_model, 2, rows), 0);
    WAll *x = NULL;
    cr_assert_eq(WAll_get_by_id(ctx2, 1, &x), 0);
    cr_assert_eq(x->small, -7);
    cr_assert_eq(x->score, 0.1);
    cr_assert(x->active);
    cr_assert_str_eq(x->name, a.name);
    cr_assert_eq(x->blob.len, sizeof bin);
    cr_assert_eq(memcmp(x->blob.data, bin, sizeof bin), 0);
    cr_assert_eq(x->born, a.born);
    cr_assert(!x->seen.null);
    cr_assert_eq(x->seen.v, a.seen.v);
    cr_assert_eq(x->day.v, a.day.v);
    cr_assert(x->ref.null);
    cr_assert_eq(x->rank.v, 3);
    cr_assert(!x->ratio.null && x->ratio.v > 1e308);
    cr_assert(x->ok.null);
    cr_assert_eq(WAll_get_by_id(ctx2, 2, &x), 0);
    cr_assert_null(x->name);
    cr_assert_null(x->blob.data);
    cr_assert(x->seen.null);
    cr_assert_eq(x->ref.v, INT64_MIN);
    cr_assert(x->rank.null && x->ratio.null);
    cr_assert(!x->ok.null && !x->ok.v);
    /* The old rows are read back with the same types: a change of a TIME
       value is an update whose old row is reported (then invalidated). */
    a.born += 1;
    flash_ctx_reset(ctx2);
    cr_assert_eq(flash_save(fx.ctx, &WAll_model, &a), 0);
    cr_assert_eq(WAll_get_by_id(ctx2, 1, &x), 0);
    cr_assert_eq(x->born, a.born);
}
