/* Invalidation from PostgreSQL's change stream (backends/changes/postgres.h)
   against a real server (wal_level=logical) and a real memcached: writes
   made by a plain libpq connection (no flash) reach the next flash read; a
   bulk UPDATE of 10,000 rows; a consumer killed before acknowledging; the
   server restarted; memcached stopped (retried, not acknowledged: the
   slot's confirmed_flush_lsn stays behind); default replica identity (and
   its documented limits); TRUNCATE; schema changes; values that do not
   parse. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/loop/poll.h"
#include "backends/source/postgres.h"
#include "backends/changes/postgres.h"

#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

#define CH_USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, name)
FLASH_MODEL_OPT(ChUser, CH_USER_FIELDS, .table = "ch_users")
FLASH_GET_KEYS(ChUser, (id), (username))

/* Default replica identity. */
FLASH_MODEL_OPT(ChPlain, CH_USER_FIELDS, .table = "public.ch_plain")
FLASH_GET_KEYS(ChPlain, (id), (username))

/* A DYNAMIC class (TRUNCATE bumps it) and an I32 field over an int8 column
   (a value out of range does not parse). */
#define CH_ITEM_FIELDS(F) F(I64, id) F(STR, slug) F(I32, n)
FLASH_MODEL_OPT(ChItem, CH_ITEM_FIELDS, .table = "ch_items")
FLASH_INSTANCE_CACHE_OPT(ChItemOnSlug, ChItem, (slug), .invalidation = FLASH_INVALIDATE_DYNAMIC)
FLASH_GET_KEYS(ChItem, (id))

static flash_test_server server, mc;
static PGconn *admin;
static flash_poll *loop;
static flash_cache cache;
static flash_ctx *rctx; /* the reader's */
static flash_pg *pg;
static flash_pg_changes *ch;
static char logbuf[8192];

static void logger(int level, const char *msg, void *ud) {
    (void)ud;
    size_t n = strlen(logbuf);
    snprintf(logbuf + n, sizeof logbuf - n, "%d %s\n", level, msg);
}

static void sql(const char *q) {
    PGresult *r = PQexec(admin, q);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    PQclear(r);
}

static char *sql_text(const char *q, char *out, size_t cap) {
    PGresult *r = PQexec(admin, q);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    snprintf(out, cap, "%s", PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return out;
}

static uint64_t current_lsn(void) {
    char b[64];
    return flash_pg_lsn_parse(sql_text("SELECT pg_current_wal_insert_lsn()", b, sizeof b));
}

static uint64_t confirmed_lsn(void) {
    char b[64];
    return flash_pg_lsn_parse(
        sql_text("SELECT coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = 'flash_test'",
                 b, sizeof b));
}

static const char schema[] =
    "CREATE TABLE ch_users (id int8 PRIMARY KEY, username text UNIQUE, name text);"
    "ALTER TABLE ch_users REPLICA IDENTITY FULL;"
    "INSERT INTO ch_users SELECT i, 'user' || i, 'name' || i FROM generate_series(1, 10000) i;"
    "CREATE TABLE ch_plain (id int8 PRIMARY KEY, username text UNIQUE, name text);"
    "INSERT INTO ch_plain SELECT i, 'user' || i, 'name' || i FROM generate_series(1, 10) i;"
    "CREATE TABLE ch_items (id int8 PRIMARY KEY, slug text UNIQUE, n int8);"
    "ALTER TABLE ch_items REPLICA IDENTITY FULL;"
    "INSERT INTO ch_items SELECT i, 'item' || i, i FROM generate_series(1, 10) i;";

static const flash_model *const models[] = {&ChUser_model, &ChPlain_model, &ChItem_model};

static flash_pg_changes *consumer(flash_cache c) {
    flash_pg_changes_desc d;
    flash_desc cd;
    memset(&d, 0, sizeof d);
    memset(&cd, 0, sizeof cd);
    cd.logger.func = logger;
    d.conninfo = server.extra;
    d.loop = flash_poll_loop(loop);
    d.cache = c;
    d.ctx = &cd;
    d.publication = "flash_test";
    d.slot = "flash_test";
    d.create_publication = d.create_slot = true;
    d.models = models;
    d.nmodels = 3;
    d.retry_min_ms = 50;
    d.retry_max_ms = 400;
    d.status_interval_ms = 100;
    int err = -1;
    flash_pg_changes *c2 = flash_pg_changes_create(&d, &err);
    cr_assert(c2, "flash_pg_changes_create: %s", flash_strerror(err));
    return c2;
}

static flash_cache memcached_cache(uint16_t port) {
    flash_memcached_server srv = {"127.0.0.1", port, 0};
    flash_memcached_desc md;
    memset(&md, 0, sizeof md);
    md.loop = flash_poll_loop(loop);
    md.servers = &srv;
    md.server_count = 1;
    md.timeout_ms = 300;
    md.retry_interval_ms = 100;
    int err = -1;
    flash_cache c = flash_memcached_create(&md, &err);
    cr_assert(c.vt, "memcached: %s", flash_strerror(err));
    return c;
}

/* Servers, schema, the reader (memcached + the PostgreSQL source); the
   consumer too when with_consumer. */
static void start(bool with_consumer) {
    alarm(60);
    cr_assert(flash_test_postgres_start(&server), "postgres did not start");
    cr_assert(flash_test_memcached_start(&mc, NULL), "memcached did not start");
    admin = PQconnectdb(server.extra);
    cr_assert_eq(PQstatus(admin), CONNECTION_OK, "%s", PQerrorMessage(admin));
    sql(schema);
    loop = flash_poll_create();
    cache = memcached_cache(mc.port);
    int err = -1;
    pg = flash_pg_source_create(server.extra, flash_poll_loop(loop), &err);
    cr_assert(pg);
    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    cd.cache = cache;
    cd.logger.func = logger;
    rctx = flash_ctx_create(&cd);
    cr_assert(rctx);
    cr_assert_eq(flash_poll_attach(rctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(rctx, NULL, flash_pg_source(pg)), 0);
    logbuf[0] = 0;
    if (with_consumer) ch = consumer(cache);
}

static void teardown(void) {
    flash_pg_changes_destroy(ch); /* before the cache */
    flash_ctx_destroy(rctx);
    flash_pg_destroy(pg);
    if (cache.vt) flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    if (admin) PQfinish(admin);
    if (server.dir[0]) flash_test_postgres_stop(&server);
    if (mc.pid > 0) flash_test_server_stop(&mc);
    ch = NULL;
    rctx = NULL;
    pg = NULL;
    loop = NULL;
    admin = NULL;
    memset(&cache, 0, sizeof cache);
    alarm(0);
}
TestSuite(changes, .init = flash_test_watchdog, .fini = teardown);

/* Run the loop until cond holds or ms passed. */
static bool pump_until(bool (*cond)(void), int ms) {
    int64_t end = flash_test_now_ms() + ms;
    while (flash_test_now_ms() < end) {
        if (cond()) return true;
        flash_poll_run_once(loop, true); /* the consumer's 100 ms status timer bounds the wait */
    }
    return cond();
}
static void pump_for(int ms) {
    int64_t end = flash_test_now_ms() + ms;
    while (flash_test_now_ms() < end) flash_poll_run_once(loop, true);
}

static bool streaming(void) { return flash_pg_changes_stats_get(ch).streaming; }

/* A fresh request's read of user id (NULL when not found). */
static ChUser *read_user(int64_t id) {
    ChUser *u = NULL;
    flash_ctx_reset(rctx);
    int rc = ChUser_get_by_id_or_none(rctx, id, &u);
    cr_assert_eq(rc, 0, "read %lld: %s", (long long)id, flash_strerror(rc));
    return u;
}
static ChUser *read_username(const char *name) {
    ChUser *u = NULL;
    flash_ctx_reset(rctx);
    int rc = ChUser_get_by_username_or_none(rctx, name, &u);
    cr_assert_eq(rc, 0, "read %s: %s", name, flash_strerror(rc));
    return u;
}

static const char *want_name;
static int64_t want_id;
static bool user_has_name(void) {
    ChUser *u = read_user(want_id);
    return u && strcmp(u->name, want_name) == 0;
}

static void fill_user(int64_t id, const char *name) {
    ChUser *u = read_user(id);
    cr_assert(u);
    cr_assert_str_eq(u->name, name);
    flash_stats before = flash_ctx_stats(rctx);
    u = read_user(id);
    cr_assert_eq(flash_ctx_stats(rctx).cache_hits, before.cache_hits + 1, "the second read is a cache hit");
}

FLASH_TEST(changes, write_by_another_connection_is_seen_by_the_next_read) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    fill_user(1, "name1");
    cr_assert(read_username("user1"));
    int64_t t0 = flash_test_now_ms();
    sql("UPDATE ch_users SET name = 'renamed', username = 'alice' WHERE id = 1");
    want_id = 1;
    want_name = "renamed";
    cr_assert(pump_until(user_has_name, 5000), "the write was never seen");
    int64_t lag = flash_test_now_ms() - t0;
    cr_assert_null(read_username("user1"), "the old username's key was invalidated (old row: REPLICA IDENTITY FULL)");
    cr_assert_str_eq(read_username("alice")->name, "renamed");
    cr_log_info("write -> visible to flash readers in %lld ms", (long long)lag);

    /* A schema change: the Relation message comes again, columns re-mapped. */
    sql("ALTER TABLE ch_users ADD COLUMN extra int");
    fill_user(2, "name2");
    sql("UPDATE ch_users SET name = 'after alter', extra = 1 WHERE id = 2");
    want_id = 2;
    want_name = "after alter";
    cr_assert(pump_until(user_has_name, 5000), "the write after ALTER TABLE was never seen");
    /* A DELETE. */
    fill_user(3, "name3");
    sql("DELETE FROM ch_users WHERE id = 3");
    int64_t end = flash_test_now_ms() + 5000;
    while (read_user(3) && flash_test_now_ms() < end) pump_for(20);
    cr_assert_null(read_user(3), "the DELETE was never seen");
    flash_pg_changes_stats s = flash_pg_changes_stats_get(ch);
    cr_assert_geq(s.transactions, 3);
    cr_assert_geq(s.changes, 3);
    cr_assert_geq(s.rows_invalidated, 5);
    cr_assert_eq(s.errors, 0, "errors: %s", flash_pg_changes_last_error(ch));
    cr_assert(pump_until(streaming, 10));
    /* Acknowledged: the slot's position moved past the writes. */
    uint64_t lsn = current_lsn();
    sql("UPDATE ch_users SET name = 'x' WHERE id = 4");
    int64_t end2 = flash_test_now_ms() + 5000;
    while (confirmed_lsn() < lsn && flash_test_now_ms() < end2) pump_for(20);
    cr_assert_geq(confirmed_lsn(), lsn, "confirmed_flush_lsn follows the applied invalidations");
}

static bool bulk_done(void) { return flash_pg_changes_stats_get(ch).rows_invalidated >= 20000; }

FLASH_TEST(changes, bulk_update_of_10000_rows_invalidates_every_key) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    enum { N = 10000 };
    static flash_promise *ps[N];
    flash_ctx_reset(rctx);
    for (int i = 0; i < N; i++) ps[i] = ChUser_get_by_id_async(rctx, i + 1);
    void *v = NULL;
    cr_assert_eq(flash_wait(rctx, flash_gather(rctx, N, ps), &v), 0);
    flash_ctx_reset(rctx);
    for (int i = 0; i < N; i++) ps[i] = ChUser_get_by_id_async(rctx, i + 1);
    cr_assert_eq(flash_wait(rctx, flash_gather(rctx, N, ps), &v), 0);
    cr_assert_eq(flash_ctx_stats(rctx).cache_hits, N, "all cached");
    int64_t t0 = flash_test_now_ms();
    sql("UPDATE ch_users SET name = name || '!'");
    cr_assert(pump_until(bulk_done, 8000), "rows invalidated: %llu",
              (unsigned long long)flash_pg_changes_stats_get(ch).rows_invalidated);
    cr_log_info("10,000-row UPDATE invalidated in %lld ms", (long long)(flash_test_now_ms() - t0));
    flash_ctx_reset(rctx);
    flash_ctx_stats_clear(rctx);
    for (int i = 0; i < N; i++) ps[i] = ChUser_get_by_id_async(rctx, i + 1);
    void **rows = NULL;
    cr_assert_eq(flash_wait(rctx, flash_gather(rctx, N, ps), (void **)&rows), 0);
    for (int i = 0; i < N; i++) {
        char want[32];
        snprintf(want, sizeof want, "name%d!", i + 1);
        cr_assert_str_eq(((ChUser *)rows[i])->name, want);
    }
    cr_assert_eq(flash_ctx_stats(rctx).cache_hits, 0, "every key was invalidated");
    flash_pg_changes_stats s = flash_pg_changes_stats_get(ch);
    cr_assert_eq(s.changes, N);
    cr_assert_eq(s.errors, 0, "errors: %s", flash_pg_changes_last_error(ch));
}

static bool slot_active(void) {
    char b[16];
    return strcmp(sql_text("SELECT active FROM pg_replication_slots WHERE slot_name = 'flash_test'", b, sizeof b),
                  "t") == 0;
}

FLASH_TEST(changes, consumer_killed_before_its_ack_loses_nothing) {
    start(false);
    fill_user(5, "name5");
    /* The first consumer, in a child: its cache is a port nobody listens
       on, so it receives the write and cannot apply it. */
    uint16_t dead = flash_test_free_port();
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        flash_poll *l2 = flash_poll_create();
        loop = l2;
        flash_cache c2 = memcached_cache(dead);
        flash_pg_changes *c = consumer(c2);
        int64_t end = flash_test_now_ms() + 15000;
        while (flash_test_now_ms() < end) flash_poll_run_once(l2, true);
        (void)c;
        _exit(0);
    }
    int64_t end = flash_test_now_ms() + 5000;
    while (!slot_active() && flash_test_now_ms() < end) flash_test_sleep_ms(20);
    cr_assert(slot_active(), "the child's stream did not start");
    sql("UPDATE ch_users SET name = 'killed' WHERE id = 5");
    uint64_t after = current_lsn();
    flash_test_sleep_ms(600); /* received, failed, retrying */
    cr_assert_lt(confirmed_lsn(), after, "not acknowledged");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    /* Still stale: nobody invalidated. */
    cr_assert_str_eq(read_user(5)->name, "name5");
    ch = consumer(cache); /* resumes from the slot: the write comes again */
    want_id = 5;
    want_name = "killed";
    cr_assert(pump_until(user_has_name, 8000), "the write was lost with the killed consumer: %s",
              flash_pg_changes_last_error(ch));
    cr_assert_geq(flash_pg_changes_stats_get(ch).transactions, 1);
}

FLASH_TEST(changes, postgres_restart_and_the_consumer_resumes) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    fill_user(6, "name6");
    cr_assert(flash_test_postgres_restart(&server), "restart");
    PQreset(admin);
    cr_assert_eq(PQstatus(admin), CONNECTION_OK);
    sql("UPDATE ch_users SET name = 'after restart' WHERE id = 6");
    want_id = 6;
    want_name = "after restart";
    cr_assert(pump_until(user_has_name, 8000), "not seen after the restart: %s", flash_pg_changes_last_error(ch));
    flash_pg_changes_stats s = flash_pg_changes_stats_get(ch);
    cr_assert_geq(s.reconnects, 1);
    cr_assert_geq(s.connects, 2);
}

static uint64_t retries_floor;
static bool retried(void) { return flash_pg_changes_stats_get(ch).retries >= retries_floor; }

FLASH_TEST(changes, memcached_down_is_retried_and_not_acknowledged) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    fill_user(7, "name7");
    cr_assert(flash_test_server_pause(&mc, true));
    sql("UPDATE ch_users SET name = 'while down' WHERE id = 7");
    uint64_t after = current_lsn();
    retries_floor = 2;
    cr_assert(pump_until(retried, 5000), "no retry");
    flash_pg_changes_stats s = flash_pg_changes_stats_get(ch);
    char a1[24], a2[24];
    flash_pg_lsn_format(s.acked_lsn, a1);
    flash_pg_lsn_format(after, a2);
    cr_assert_lt(s.acked_lsn, after, "acked %s, write at %s, retries %llu, batches %llu, tx %llu", a1, a2,
                 (unsigned long long)s.retries, (unsigned long long)s.batches, (unsigned long long)s.transactions);
    cr_assert_lt(confirmed_lsn(), after, "the slot did not move past the unapplied write");
    cr_assert_eq(s.rows_invalidated, 0);
    cr_assert(strstr(flash_pg_changes_last_error(ch), "not acknowledged"), "%s", flash_pg_changes_last_error(ch));
    cr_assert(flash_test_server_pause(&mc, false));
    want_id = 7;
    want_name = "while down";
    cr_assert(pump_until(user_has_name, 5000), "not applied after memcached came back");
    sql("UPDATE ch_users SET name = 'later' WHERE id = 8");
    int64_t end = flash_test_now_ms() + 5000;
    while (confirmed_lsn() < after && flash_test_now_ms() < end) pump_for(20);
    cr_assert_geq(confirmed_lsn(), after, "acknowledged once applied");
}

static ChPlain *read_plain(bool by_name, int64_t id, const char *name) {
    ChPlain *u = NULL;
    flash_ctx_reset(rctx);
    int rc = by_name ? ChPlain_get_by_username_or_none(rctx, name, &u) : ChPlain_get_by_id_or_none(rctx, id, &u);
    cr_assert_eq(rc, 0);
    return u;
}
static bool plain1_renamed(void) {
    ChPlain *u = read_plain(false, 1, NULL);
    return u && strcmp(u->name, "renamed") == 0;
}
static bool plain2_gone(void) { return read_plain(false, 2, NULL) == NULL; }

FLASH_TEST(changes, default_replica_identity_and_its_limits) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    for (int i = 1; i <= 2; i++) {
        char un[16];
        snprintf(un, sizeof un, "user%d", i);
        cr_assert(read_plain(false, i, NULL));
        cr_assert(read_plain(true, 0, un));
    }
    /* UPDATE keeping the key: no old tuple; the new row's keys are invalidated. */
    sql("UPDATE ch_plain SET name = 'renamed', username = 'bob' WHERE id = 1");
    cr_assert(pump_until(plain1_renamed, 5000), "the UPDATE was never seen");
    cr_assert_str_eq(read_plain(true, 0, "bob")->name, "renamed");
    /* The documented limit: the old username's key is not known. */
    ChPlain *stale = read_plain(true, 0, "user1");
    cr_assert(stale && strcmp(stale->name, "name1") == 0, "old-username key: stale until its timeout (documented)");
    /* DELETE: only the key columns (id) are sent. */
    sql("DELETE FROM ch_plain WHERE id = 2");
    cr_assert(pump_until(plain2_gone, 5000), "the DELETE was never seen");
    cr_assert(read_plain(true, 0, "user2"), "username key: stale until its timeout (documented)");
    cr_assert(strstr(logbuf, "REPLICA IDENTITY DEFAULT"), "a warning names the limit: %s", logbuf);
    cr_assert_eq(flash_pg_changes_stats_get(ch).errors, 0, "%s", flash_pg_changes_last_error(ch));
}

static ChItem *read_item(int64_t id) {
    ChItem *it = NULL;
    flash_ctx_reset(rctx);
    cr_assert_eq(ChItem_get_by_id_or_none(rctx, id, &it), 0);
    return it;
}
static ChItem *read_item_slug(const char *slug) {
    ChItem *it = NULL;
    flash_ctx_reset(rctx);
    int rc = ChItemOnSlug_resolve(rctx, slug, &it);
    cr_assert_eq(rc, 0, "resolve %s: %s %s", slug, flash_strerror(rc), logbuf);
    return it;
}
static bool item_slug_gone(void) {
    ChItem *it = NULL;
    flash_ctx_reset(rctx);
    return ChItemOnSlug_resolve(rctx, "item1", &it) == FLASH_ENOTFOUND;
}
/* The TRUNCATE's transaction applied. stats.truncates counts Truncate
   messages as they are received, before their Commit: a transaction applied
   is one whose Commit was received (transactions moved past txs_before) and
   acknowledged (acked_lsn reached received_lsn). A truncate adds no rows, so
   pending_rows == 0 and acked == received also hold between the Truncate
   message and a Commit that arrives in a later read of the socket (the
   walsender flushes each message): waiting on those alone let the test read
   before the bump was even sent, about 1 run in 6. */
static uint64_t txs_before;
static bool truncated(void) {
    flash_pg_changes_stats s = flash_pg_changes_stats_get(ch);
    return s.truncates >= 1 && s.transactions > txs_before && s.pending_rows == 0 && s.acked_lsn >= s.received_lsn;
}
static bool item2_fresh(void) { return read_item(2) == NULL; }

FLASH_TEST(changes, truncate_flushes_every_class_and_bad_values_are_logged) {
    start(true);
    cr_assert(pump_until(streaming, 5000), "not streaming: %s", flash_pg_changes_last_error(ch));
    cr_assert_eq(read_item_slug("item1")->n, 1);
    cr_assert(read_item(2));
    /* A value that does not parse for its field: logged, the other keys
       still invalidated (the id class; n is no key). */
    sql("UPDATE ch_items SET n = 5000000000 WHERE id = 3");
    sql("DELETE FROM ch_items WHERE id = 2");
    cr_assert(pump_until(item2_fresh, 5000), "the DELETE after a bad value was never seen");
    cr_assert(strstr(logbuf, "'5000000000' is not a valid I32"), "%s", logbuf);
    cr_assert_geq(flash_pg_changes_stats_get(ch).errors, 1);
    /* TRUNCATE: the DYNAMIC class's version moves. First item1 cached
       again (past the lag window of the bumps above): a hit. */
    pump_for(400);
    cr_assert(read_item_slug("item1"));
    cr_assert(read_item(4));
    flash_stats before = flash_ctx_stats(rctx);
    cr_assert(read_item_slug("item1"));
    cr_assert_eq(flash_ctx_stats(rctx).cache_hits, before.cache_hits + 1, "item1 is cached");
    txs_before = flash_pg_changes_stats_get(ch).transactions;
    sql("TRUNCATE ch_items");
    cr_assert(pump_until(truncated, 5000), "TRUNCATE was never seen");
    /* Applied and acknowledged: the very first read misses. */
    cr_assert(item_slug_gone(), "the cached item1 is gone: its class's version moved");
    /* The UNSET get class too: no key list is needed to flush it. */
    ChItem *it = NULL;
    flash_ctx_reset(rctx);
    cr_assert_eq(ChItem_get_by_id_or_none(rctx, 4, &it), 0);
    cr_assert_null(it, "item 4 was flushed by the TRUNCATE");
}
