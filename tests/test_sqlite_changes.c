/* In-process writes through the SQLite connection invalidate after commit
   (flash_sqlite_track_changes): raw sqlite3_exec UPDATE / INSERT / DELETE,
   never through flash; the old and new username keys and first_name lists;
   nothing before the commit, nothing for a rollback; a savepoint rolled
   back; a bulk UPDATE of 10,000 rows. Both paths (preupdate, update hook)
   on the memory backend and on a real memcached. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/cache/memcached.h"
#include "backends/loop/poll.h"
#include "backends/source/sqlite.h"

#define SC_USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, first_name) F(I32, age)
FLASH_MODEL_OPT(ScUser, SC_USER_FIELDS, .table = "sc_users")
FLASH_GET_KEYS(ScUser, (id), (username))
FLASH_FILTER_KEYS(ScUser, (first_name))

enum { NROWS = 10000 };
static char dir[64];
static sqlite3 *db;
static flash_sqlite *sq;
static flash_poll *loop;
static flash_cache cache;
static flash_ctx *ctx;
static flash_sqlite_changes *tr;
static flash_test_server mc;

static void exec(const char *sql) {
    char *err = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    cr_assert_eq(rc, SQLITE_OK, "%s: %s", sql, err ? err : "?");
}

static void start(bool memcached, unsigned flags) {
    char path[128];
    snprintf(dir, sizeof dir, "/tmp/flash-sqc-XXXXXX");
    cr_assert(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    exec("CREATE TABLE sc_users (id INTEGER PRIMARY KEY, username TEXT UNIQUE, first_name TEXT, age INTEGER);"
         "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000)"
         " INSERT INTO sc_users SELECT i, 'user' || i, CASE i % 2 WHEN 0 THEN 'Ann' ELSE 'Bob' END, i % 90 FROM n;");
    sq = flash_sqlite_create(db);
    loop = flash_poll_create();
    if (memcached) {
        cr_assert(flash_test_memcached_start(&mc, "-m 64"));
        flash_memcached_server server = {"127.0.0.1", mc.port, 1};
        flash_memcached_desc md;
        int err = 0;
        memset(&md, 0, sizeof md);
        md.loop = flash_poll_loop(loop);
        md.servers = &server;
        md.server_count = 1;
        cache = flash_memcached_create(&md, &err);
        cr_assert(cache.vt, "memcached: %s", flash_strerror(err));
    } else {
        cache = flash_memory_create(NULL);
    }
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = cache;
    ctx = flash_ctx_create(&d);
    cr_assert(ctx && sq && loop && cache.vt);
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_sqlite_source(sq)), 0);
    int err = -1;
    tr = flash_sqlite_track_changes(sq, ctx, flags, &err);
    cr_assert(tr, "track: %s", flash_strerror(err));
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).preupdate, !(flags & FLASH_SQLITE_TRACK_UPDATE_HOOK),
                 "the path in use");
}

static void teardown(void) {
    flash_sqlite_untrack_changes(tr);
    flash_ctx_destroy(ctx);
    if (cache.vt) flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    flash_sqlite_destroy(sq);
    sqlite3_close(db);
    if (mc.pid > 0) flash_test_server_stop(&mc);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (dir[0] && system(cmd) != 0) {
    }
    tr = NULL;
    ctx = NULL;
    sq = NULL;
    db = NULL;
    loop = NULL;
    memset(&cache, 0, sizeof cache);
    memset(&mc, 0, sizeof mc);
}
TestSuite(sqlite_changes, .init = flash_test_watchdog, .fini = teardown);

/* The loop's ready work, as the next ticks would run it. */
static void settle(void) {
    for (int i = 0; i < 1000; i++)
        if (flash_poll_run_once(loop, false) <= 0 && !flash_ctx_busy(ctx)) return;
}

static uint64_t hits(void) { return flash_ctx_stats(ctx).cache_hits; }

static ScUser *by_id(int64_t id) {
    ScUser *u = NULL;
    flash_ctx_reset(ctx);
    cr_assert_eq(ScUser_get_by_id_or_none(ctx, id, &u), 0);
    return u;
}
static ScUser *by_name(const char *name) {
    ScUser *u = NULL;
    flash_ctx_reset(ctx);
    cr_assert_eq(ScUser_get_by_username_or_none(ctx, name, &u), 0);
    return u;
}
/* Whether the first_name list holds id. */
static bool list_has(const char *first, int64_t id) {
    flash_list *l = NULL;
    flash_ctx_reset(ctx);
    cr_assert_eq(flash_wait(ctx, ScUser_filter_by_first_name_async(ctx, first), (void **)&l), 0);
    for (size_t i = 0; i < l->count; i++)
        if (((ScUser *)l->items[i])->id == id) return true;
    return false;
}

/* Cached (a second read hits) and equal to name ("" for none). */
static void cached_user(int64_t id, const char *name) {
    ScUser *u = by_id(id);
    cr_assert_str_eq(u ? u->username : "", name);
    uint64_t h = hits();
    u = by_id(id);
    cr_assert_eq(hits(), h + 1, "user %lld is cached", (long long)id);
}

static void update_insert_delete(bool memcached, unsigned flags) {
    start(memcached, flags);
    bool pre = !(flags & FLASH_SQLITE_TRACK_UPDATE_HOOK);
    /* warm: id and username keys, a none for "alice", both lists */
    cached_user(1, "user1");
    cr_assert(by_name("user1"));
    cr_assert_null(by_name("alice"));
    cr_assert(list_has("Bob", 1));
    cr_assert(!list_has("Ann", 1));
    cached_user(20001, "");

    /* UPDATE in a transaction: nothing before the commit. */
    exec("BEGIN; UPDATE sc_users SET username = 'alice', first_name = 'Ann' WHERE id = 1");
    settle();
    uint64_t h = hits();
    cr_assert_str_eq(by_id(1)->username, "user1", "the open transaction invalidated nothing");
    cr_assert_eq(hits(), h + 1);
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 0);
    exec("COMMIT");
    settle();
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 1);
    cr_assert_str_eq(by_id(1)->username, "alice", "the id key was invalidated");
    cr_assert(by_name("alice"), "the new username's key (a cached none) was invalidated");
    cr_assert(list_has("Ann", 1), "the new first_name's list was invalidated");
    if (pre) {
        cr_assert_null(by_name("user1"), "the old username's key was invalidated (preupdate: old values)");
        cr_assert(!list_has("Bob", 1), "the old first_name's list was invalidated");
    } else {
        /* The documented limit of the update path: old values are unknown. */
        cr_assert(by_name("user1"), "update hook: the old username's key stays until its timeout");
        cr_assert(list_has("Bob", 1), "update hook: the old first_name's list stays until its timeout");
    }

    /* INSERT (autocommit): the none cached for id 20001 goes. */
    exec("INSERT INTO sc_users VALUES (20001, 'new1', 'Ann', 3)");
    settle();
    cr_assert_str_eq(by_id(20001) ? by_id(20001)->username : "", "new1");
    /* DELETE: the id key always (rowid), the username key with preupdate. */
    cached_user(2, "user2");
    cr_assert(by_name("user2"));
    exec("DELETE FROM sc_users WHERE id = 2");
    settle();
    cr_assert_null(by_id(2), "the DELETE invalidated the id key");
    if (pre) cr_assert_null(by_name("user2"), "and the username key");
    else cr_assert(by_name("user2"), "update hook: the username key of a deleted row stays (documented)");

    /* A rolled-back transaction invalidates nothing. */
    cached_user(3, "user3");
    flash_sqlite_changes_stats s0 = flash_sqlite_changes_stats_get(tr);
    exec("BEGIN; UPDATE sc_users SET username = 'rolled' WHERE id = 3; ROLLBACK");
    settle();
    h = hits();
    cr_assert_str_eq(by_id(3)->username, "user3");
    cr_assert_eq(hits(), h + 1, "still cached: nothing invalidated");
    flash_sqlite_changes_stats s1 = flash_sqlite_changes_stats_get(tr);
    cr_assert_eq(s1.rollbacks, s0.rollbacks + 1);
    cr_assert_eq(s1.commits, s0.commits);
    cr_assert_eq(s1.rows, s0.rows);

    /* A savepoint rolled back, then the outer transaction commits: the
       undone change is invalidated too (an extra invalidation). */
    cached_user(4, "user4");
    cached_user(5, "user5");
    exec("BEGIN; SAVEPOINT a; UPDATE sc_users SET username = 'sp' WHERE id = 4; ROLLBACK TO a;"
         " UPDATE sc_users SET username = 'five' WHERE id = 5; COMMIT");
    settle();
    h = hits();
    cr_assert_str_eq(by_id(4)->username, "user4");
    cr_assert_eq(hits(), h, "id 4 was invalidated although its change was undone (documented)");
    cr_assert_str_eq(by_id(5)->username, "five");
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).errors, 0);
}

FLASH_TEST(sqlite_changes, preupdate_memory) { update_insert_delete(false, 0); }
FLASH_TEST(sqlite_changes, update_hook_memory) { update_insert_delete(false, FLASH_SQLITE_TRACK_UPDATE_HOOK); }
FLASH_TEST(sqlite_changes, preupdate_memcached) { update_insert_delete(true, 0); }
FLASH_TEST(sqlite_changes, update_hook_memcached) { update_insert_delete(true, FLASH_SQLITE_TRACK_UPDATE_HOOK); }

static void bulk(bool memcached, unsigned flags) {
    static flash_promise *ps[NROWS];
    void **rows = NULL;
    start(memcached, flags);
    for (int pass = 0; pass < 2; pass++) {
        flash_ctx_reset(ctx);
        for (int i = 0; i < NROWS; i++) ps[i] = ScUser_get_by_id_async(ctx, i + 1);
        cr_assert_eq(flash_wait(ctx, flash_gather(ctx, NROWS, ps), (void **)&rows), 0);
    }
    cr_assert_eq(hits(), NROWS, "all cached");
    int64_t t0 = flash_test_now_ms();
    exec("UPDATE sc_users SET age = age + 1000");
    int64_t t1 = flash_test_now_ms();
    cr_assert_eq(flash_sqlite_changes_flush(tr), 0);
    int64_t t2 = flash_test_now_ms();
    cr_log_info("%s/%s: UPDATE of %d rows %lld ms, invalidated in %lld ms", memcached ? "memcached" : "memory",
                flags ? "update hook" : "preupdate", NROWS, (long long)(t1 - t0), (long long)(t2 - t1));
    fprintf(stderr, "sqlite changes %s/%s: UPDATE of %d rows %lld ms, invalidated in %lld ms\n",
            memcached ? "memcached" : "memory", flags ? "update hook" : "preupdate", NROWS, (long long)(t1 - t0),
            (long long)(t2 - t1));
    flash_ctx_reset(ctx);
    flash_ctx_stats_clear(ctx);
    for (int i = 0; i < NROWS; i++) ps[i] = ScUser_get_by_id_async(ctx, i + 1);
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, NROWS, ps), (void **)&rows), 0);
    cr_assert_eq(hits(), 0, "every key was invalidated");
    for (int i = 0; i < NROWS; i++) cr_assert_eq(((ScUser *)rows[i])->age, (i + 1) % 90 + 1000);
    flash_sqlite_changes_stats s = flash_sqlite_changes_stats_get(tr);
    cr_assert_eq(s.changes, NROWS);
    cr_assert_eq(s.errors, 0);
}

FLASH_TEST(sqlite_changes, bulk_update_of_10000_rows_preupdate_memory) { bulk(false, 0); }
FLASH_TEST(sqlite_changes, bulk_update_of_10000_rows_update_hook_memory) { bulk(false, FLASH_SQLITE_TRACK_UPDATE_HOOK); }
FLASH_TEST(sqlite_changes, bulk_update_of_10000_rows_preupdate_memcached) { bulk(true, 0); }
FLASH_TEST(sqlite_changes, bulk_update_of_10000_rows_update_hook_memcached) {
    bulk(true, FLASH_SQLITE_TRACK_UPDATE_HOOK);
}

/* A COMMIT that fails (SQLITE_BUSY: another connection reads, rollback
   journal) leaves its transaction open: nothing is invalidated until the
   retried COMMIT went through. */
FLASH_TEST(sqlite_changes, a_busy_commit_invalidates_only_once_retried) {
    start(false, 0);
    char path[128];
    sqlite3 *other = NULL;
    snprintf(path, sizeof path, "%s/test.db", dir);
    cr_assert_eq(sqlite3_open(path, &other), SQLITE_OK);
    cached_user(7, "user7");
    cr_assert_eq(sqlite3_exec(other, "BEGIN; SELECT count(*) FROM sc_users", NULL, NULL, NULL), SQLITE_OK);
    exec("BEGIN; UPDATE sc_users SET username = 'busy' WHERE id = 7");
    cr_assert_eq(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_BUSY);
    settle();
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 0, "not committed: not applied");
    uint64_t h = hits();
    by_id(7);
    cr_assert_eq(hits(), h + 1, "still cached");
    cr_assert_eq(sqlite3_exec(other, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    exec("COMMIT");
    settle();
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 1);
    cr_assert_str_eq(by_id(7)->username, "busy");
    sqlite3_close(other);
}

/* The update path re-reads rows after the commit: not while a later
   transaction is open on the connection (it would read that one's
   uncommitted row, and miss the committed value's keys). */
FLASH_TEST(sqlite_changes, update_hook_rereads_outside_a_later_transaction) {
    start(false, FLASH_SQLITE_TRACK_UPDATE_HOOK);
    cr_assert_null(by_name("alice"));
    exec("UPDATE sc_users SET username = 'alice' WHERE id = 1");
    exec("BEGIN; UPDATE sc_users SET username = 'carol' WHERE id = 1");
    settle();
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 0, "waits for the open transaction");
    exec("ROLLBACK");
    settle();
    cr_assert_eq(flash_sqlite_changes_stats_get(tr).commits, 1);
    ScUser *u = by_name("alice");
    cr_assert(u && u->id == 1, "the committed username's key (a cached none) was invalidated");
}
