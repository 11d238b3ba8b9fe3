/* The model cache over a pool of three real memcached servers: one request
   per server per tick by flash's statistics and by memcached's own counters;
   a dead server's keys (only those) fall back to the source, and hit again
   after a restart. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "backends/cache/memcached.h"
#include "harness.h"
#include "models.h"

#define NKEYS 1000
#define POOL_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(PoolRow, POOL_FIELDS)
FLASH_GET_KEYS(PoolRow, (id))

static flash_test_server servers[3];
static flash_poll *loop;
static flash_cache mc;
static flash_table *db;

static void start_pool(uint32_t retry_ms) {
    flash_memcached_server list[3];
    for (int i = 0; i < 3; i++) {
        cr_assert(flash_test_memcached_start(&servers[i], "-m 16"));
        list[i].host = "127.0.0.1";
        list[i].port = servers[i].port;
        list[i].weight = 1;
    }
    loop = flash_poll_create();
    flash_memcached_desc d = {0};
    d.loop = flash_poll_loop(loop);
    d.servers = list;
    d.server_count = 3;
    d.retry_interval_ms = retry_ms;
    d.timeout_ms = 1000;
    int err = 0;
    mc = flash_memcached_create(&d, &err);
    cr_assert(mc.vt, "%s", flash_strerror(err));
    db = flash_table_create();
    for (int i = 1; i <= NKEYS; i++) {
        char name[32];
        snprintf(name, sizeof name, "row%d", i);
        PoolRow r = {i, name};
        flash_table_put(db, &PoolRow_model, &r);
    }
}

static void stop_pool(void) {
    flash_cache_destroy(mc);
    flash_poll_destroy(loop);
    flash_table_destroy(db);
    for (int i = 0; i < 3; i++) flash_test_server_stop(&servers[i]);
}

static flash_ctx *new_ctx(void) {
    flash_desc d = {0};
    d.cache = mc;
    flash_ctx *ctx = flash_ctx_create(&d);
    flash_poll_attach(ctx, loop);
    flash_ctx_set_source(ctx, NULL, flash_table_source(db));
    return ctx;
}

/* One request: a gather of every key. Returns its statistics. */
static flash_stats request(flash_ctx *ctx) {
    static flash_promise *ps[NKEYS];
    void *v = NULL;
    flash_ctx_stats_clear(ctx);
    flash_ctx_reset(ctx);
    for (int i = 0; i < NKEYS; i++) ps[i] = PoolRow_get_by_id_async(ctx, i + 1);
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, NKEYS, ps), &v), 0);
    PoolRow **rows = v;
    for (int i = 0; i < NKEYS; i += 97) cr_assert_eq(rows[i]->id, i + 1);
    /* The fills land (memcached's connections keep the loop busy, so wait
       for the context, not for the loop). */
    while (flash_ctx_busy(ctx)) flash_poll_run_once(loop, true);
    return flash_ctx_stats(ctx);
}

/* How many of the keys live on server s (ketama); with_version: and the
   class's version key, read in the same get-many. */
static long long keys_on(flash_ctx *ctx, int s, bool with_version) {
    long long n = 0;
    for (int i = 1; i <= NKEYS; i++) {
        char *key;
        size_t len;
        flash_value k = flash_v_i64(i);
        cr_assert_eq(flash_cache_key(ctx, &PoolRow__get_by_id, &k, 1, &key, &len, NULL), 0);
        if (flash_memcached_server_for_key(mc, key, len) == s) n++;
    }
    if (!with_version) return n;
    char *vkey;
    size_t vlen;
    cr_assert_eq(flash_cache_version_key(ctx, &PoolRow__get_by_id, &vkey, &vlen), 0);
    if (flash_memcached_server_for_key(mc, vkey, vlen) == s) n++;
    return n;
}

FLASH_TEST(pool, a_gather_of_1000_gets_over_3_servers_is_3_requests) {
    start_pool(2000);
    flash_ctx *ctx = new_ctx();
    flash_stats cold = request(ctx);
    cr_assert_eq(cold.cache_round_trips, 3, "one request per server, got %llu",
                 (unsigned long long)cold.cache_round_trips);
    cr_assert_eq(cold.source_calls, 1);
    cr_assert_eq(cold.fills, NKEYS);
    long long before[3];
    for (int s = 0; s < 3; s++) before[s] = flash_test_memcached_stat(&servers[s], "cmd_get");
    flash_stats warm = request(ctx);
    cr_assert_eq(warm.cache_round_trips, 3);
    cr_assert_eq(warm.cache_hits, NKEYS);
    cr_assert_eq(warm.source_calls, 0);
    long long total = 0;
    for (int s = 0; s < 3; s++) {
        long long got = flash_test_memcached_stat(&servers[s], "cmd_get") - before[s];
        cr_assert_eq(got, keys_on(ctx, s, true), "server %d: memcached counted %lld gets", s, got);
        cr_assert_gt(got, 0);
        total += got;
    }
    cr_assert_eq(total, NKEYS + 1); /* the keys and the version key */
    flash_ctx_destroy(ctx);
    stop_pool();
}

FLASH_TEST(pool, a_dead_server_fails_over_only_its_keys_and_hits_again_after_restart) {
    start_pool(200);
    flash_ctx *ctx = new_ctx();
    request(ctx); /* fill */
    /* (the class's version key, if it was there, is not a key of a row: an
       UNSET class takes its values as they are without it) */
    long long dead_keys = keys_on(ctx, 1, false);
    flash_test_server_stop(&servers[1]);
    flash_stats s = request(ctx);
    cr_assert_eq(s.cache_hits, NKEYS - dead_keys, "the other servers' keys still hit");
    cr_assert_eq(s.cache_errors, dead_keys, "only the dead server's keys failed");
    cr_assert_eq(s.source_calls, 1);
    cr_assert_eq(s.source_keys, dead_keys, "and only they went to the source");
    cr_assert(flash_test_server_restart(&servers[1]));
    flash_test_sleep_ms(300); /* past retry_interval_ms */
    s = request(ctx); /* reconnects; the restarted server is empty: refill */
    cr_assert_eq(s.cache_errors, 0);
    cr_assert_eq(s.source_keys, dead_keys);
    s = request(ctx);
    cr_assert_eq(s.cache_hits, NKEYS, "the next batch hits again");
    cr_assert_eq(s.cache_round_trips, 3);
    flash_ctx_destroy(ctx);
    stop_pool();
}
