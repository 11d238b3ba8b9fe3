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

typedef enum { SRC_TABLE, SRC_SQLITE } src_kind;
static src_kind src;

static void use_source(src_kind k) {
    src = k;
    begins = 0;
    if (k == SRC_TABLE) {
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
}

static long db_count(const char *where) {
    if (src == SRC_TABLE) return (long)flash_table_count(fx.db, &WUser_model);
    char q[128];
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
