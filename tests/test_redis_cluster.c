/* Redis Cluster and Sentinel: key slots, routing on the run's shared
   3-master cluster, a slot migrated live (ASK, MOVED), redirect garbage from
   a fake node, a master failing over to its replica, and a Sentinel-managed
   primary failing over. All servers on loopback, started by the suite. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/redis.h"
#include "backends/cache/redis_cluster.h"
#include "backends/source/table.h"
#include "harness.h"
#include "cluster.h"
#include "cache_ops.h"

#define RC_TEST(name)                                                        \
    static void rc_body_##name(void);                                        \
    FLASH_TEST(redis_cluster, name) {                                        \
        alarm(60);                                                           \
        rc_body_##name();                                                    \
        alarm(0);                                                            \
    }                                                                        \
    static void rc_body_##name(void)

static flash_cache cluster_backend(flash_poll *p, const uint16_t *ports, int n, uint32_t timeout_ms) {
    flash_redis_node seeds[8];
    flash_redis_cluster_desc d = {0};
    int err = 0;
    for (int i = 0; i < n; i++) seeds[i] = (flash_redis_node){"127.0.0.1", ports[i]};
    d.loop = flash_poll_loop(p);
    d.seeds = seeds;
    d.seed_count = (size_t)n;
    d.timeout_ms = timeout_ms;
    d.retry_interval_ms = 200;
    flash_cache c = flash_redis_cluster_create(&d, &err);
    cr_assert(c.vt, "cluster backend: %s", flash_strerror(err));
    return c;
}

static long long commandstat(uint16_t port, const char *cmd) {
    char out[8192], needle[64];
    flash_test_redis_cli(port, out, sizeof out, "info commandstats");
    snprintf(needle, sizeof needle, "cmdstat_%s:calls=", cmd);
    const char *p = strstr(out, needle);
    return p ? atoll(p + strlen(needle)) : 0;
}

RC_TEST(key_slot_matches_the_server_and_honours_hash_tags) {
    const char *keys[] = {"foo", "bar", "hello", "somekey", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap",
                          "{}", "a{b", "x}y{z}", "flash:User.id:v1:42"};
    const flash_test_cluster *c = flash_test_cluster_shared();
    cr_assert(c);
    cr_assert_eq(flash_redis_key_slot("foo", 3), 12182);
    cr_assert_eq(flash_redis_key_slot("{user1000}.following", 20), flash_redis_key_slot("{user1000}.followers", 20));
    cr_assert_eq(flash_redis_key_slot("foo{}{bar}", 10), flash_redis_key_slot("foo{}{bar}", 10));
    cr_assert_eq(flash_redis_key_slot("foo{{bar}}zap", 13), flash_redis_key_slot("{bar", 4));
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char out[64];
        flash_test_redis_cli(c->ports[0], out, sizeof out, "cluster keyslot '%s'", keys[i]);
        cr_assert_eq((long)flash_redis_key_slot(keys[i], strlen(keys[i])), atol(out), "%s", keys[i]);
    }
}

RC_TEST(every_operation_on_keys_across_all_slots) {
    const flash_test_cluster *c = flash_test_cluster_shared();
    cr_assert(c);
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, c->ports, 1, 1000); /* one seed: the map finds the rest */
    enum { N = 300 };
    static char names[N][32], vals[N][32];
    flash_cache_item it[N];
    flash_cache_op op;
    int done;
    pid_t me = getpid();
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "ops%d:%d", (int)me, i);
        snprintf(vals[i], sizeof vals[i], "value-%d", i);
        kv(&it[i], names[i], vals[i]);
    }
    op_init(&op, FLASH_CACHE_SET, it, N, &done);
    run(p, rc, &op);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, FLASH_OK);
    for (int i = 0; i < N; i++) key(&it[i], names[i]);
    op_init(&op, FLASH_CACHE_GET, it, N, &done);
    run(p, rc, &op);
    cr_assert_eq(op.round_trips, 1, "one wave to every node");
    for (int i = 0; i < N; i++) assert_value(&it[i], vals[i]);
    /* ADD on a present key, CAS with the token just read, a stale CAS */
    uint64_t tok = it[7].cas;
    kv(&it[0], names[7], "x");
    op_init(&op, FLASH_CACHE_ADD, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTSTORED);
    kv(&it[0], names[7], "cas-1");
    it[0].cas = tok;
    op_init(&op, FLASH_CACHE_CAS, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    kv(&it[0], names[7], "cas-2");
    it[0].cas = tok;
    op_init(&op, FLASH_CACHE_CAS, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTSTORED);
    /* INCR create and add, DELETE, a bad key among good ones */
    char ctr[48];
    snprintf(ctr, sizeof ctr, "ctr%d", (int)me);
    key(&it[0], ctr);
    it[0].create = true;
    it[0].initial = 5;
    it[0].number = 1;
    key(&it[1], "bad key");
    key(&it[2], names[9]);
    op_init(&op, FLASH_CACHE_INCR, it, 3, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[0].number, 5);
    cr_assert_eq(it[1].status, FLASH_EINVAL);
    cr_assert_eq(it[2].status, FLASH_EINVAL, "not a number");
    key(&it[0], ctr);
    it[0].number = 10;
    op_init(&op, FLASH_CACHE_INCR, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].number, 15);
    for (int i = 0; i < N; i++) key(&it[i], names[i]);
    op_init(&op, FLASH_CACHE_DELETE, it, N, &done);
    run(p, rc, &op);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, FLASH_OK);
    op_init(&op, FLASH_CACHE_GET, it, N, &done);
    run(p, rc, &op);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, FLASH_ENOTFOUND);
    flash_redis_cluster_stats st;
    cr_assert_eq(flash_redis_cluster_stats_get(rc, &st), 0);
    cr_assert_eq(st.nodes, 3);
    cr_assert_eq(st.slots_served, 16384);
    cr_assert_eq(st.moved + st.ask, 0);
    flash_cache_destroy(rc);
    flash_poll_destroy(p);
}

RC_TEST(a_get_many_is_one_request_per_node_with_one_mget_per_slot) {
    const flash_test_cluster *c = flash_test_cluster_shared();
    cr_assert(c);
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, c->ports, 3, 1000);
    enum { N = 2000 };
    static char names[N][32];
    static flash_cache_item it[N];
    flash_cache_op op;
    int done;
    key(&it[0], "warm");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, rc, &op); /* the map */
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "g%d:%d", (int)getpid(), i % 1500); /* duplicates too */
        key(&it[i], names[i]);
    }
    flash_redis_cluster_node before[3], after[3];
    long long mget_before[3], slots_per_node[3] = {0, 0, 0};
    for (int n = 0; n < 3; n++) cr_assert_eq(flash_redis_cluster_node_get(rc, (size_t)n, &before[n]), 0);
    for (int n = 0; n < 3; n++) mget_before[n] = commandstat(c->ports[n], "mget");
    op_init(&op, FLASH_CACHE_GET, it, N, &done);
    run(p, rc, &op);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, FLASH_ENOTFOUND);
    /* distinct slots per node, from the keys */
    static bool seen[16384];
    memset(seen, 0, sizeof seen);
    for (int n = 0; n < 3; n++) cr_assert_eq(flash_redis_cluster_node_get(rc, (size_t)n, &after[n]), 0);
    for (int i = 0; i < N; i++) {
        size_t s = flash_redis_key_slot(names[i], strlen(names[i]));
        if (seen[s]) continue;
        seen[s] = true;
    }
    for (int n = 0; n < 3; n++) {
        cr_assert_eq(after[n].stats.requests - before[n].stats.requests, 1, "node %u: one request", after[n].port);
        /* commands = MGETs = distinct slots of its keys, and the server saw exactly those */
        long long mgets = (long long)(after[n].stats.commands - before[n].stats.commands);
        slots_per_node[n] = mgets;
        int port_index = -1;
        for (int k = 0; k < 3; k++)
            if (c->ports[k] == after[n].port) port_index = k;
        cr_assert_geq(port_index, 0);
        cr_assert_eq(commandstat(after[n].port, "mget") - mget_before[port_index], mgets);
    }
    size_t distinct = 0;
    for (int s = 0; s < 16384; s++) distinct += seen[s];
    cr_assert_eq((size_t)(slots_per_node[0] + slots_per_node[1] + slots_per_node[2]), distinct);
    cr_assert_eq(op.round_trips, 1);
    flash_cache_destroy(rc);
    flash_poll_destroy(p);
}

/* The node (index into c->ports) that serves slot s. */
static int owner_of(const flash_test_cluster *c, int n, const char *key) {
    for (int i = 0; i < n; i++) {
        char out[256];
        if (c->pids[i] <= 0) continue;
        flash_test_redis_cli(c->ports[i], out, sizeof out, "get '%s'", key);
        if (!strstr(out, "MOVED")) return i;
    }
    return -1;
}

static void node_id(uint16_t port, char *out, size_t cap) {
    flash_test_redis_cli(port, out, cap, "cluster myid");
    out[strcspn(out, "\r\n")] = 0;
}

RC_TEST(a_slot_migrated_live_loses_no_answer_ask_then_moved) {
    flash_test_cluster c;
    cr_assert(flash_test_cluster_start(&c, 3, 0, 5000));
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, c.ports, 3, 1000);
    enum { N = 200 };
    static char names[N][32], vals[N][32];
    flash_cache_item it[N + 1];
    flash_cache_op op;
    int done;
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "{mig}:%d", i);
        snprintf(vals[i], sizeof vals[i], "v%d", i);
        kv(&it[i], names[i], vals[i]);
    }
    op_init(&op, FLASH_CACHE_SET, it, N, &done);
    run(p, rc, &op);
    size_t slot = flash_redis_key_slot("{mig}", 5);
    int src = owner_of(&c, 3, names[0]), dst = (src + 1) % 3;
    cr_assert_geq(src, 0);
    char src_id[64], dst_id[64], out[512];
    node_id(c.ports[src], src_id, sizeof src_id);
    node_id(c.ports[dst], dst_id, sizeof dst_id);
    flash_test_redis_cli(c.ports[dst], out, sizeof out, "cluster setslot %zu importing %s", slot, src_id);
    flash_test_redis_cli(c.ports[src], out, sizeof out, "cluster setslot %zu migrating %s", slot, dst_id);
    /* Half the keys move; reads and writes go on meanwhile. */
    for (int step = 0; step < 4; step++) {
        char args[4096];
        int len = snprintf(args, sizeof args, "migrate 127.0.0.1 %u '' 0 5000 keys", (unsigned)c.ports[dst]);
        for (int i = step * 25; i < step * 25 + 25; i++) len += snprintf(args + len, sizeof args - (size_t)len, " '%s'", names[i]);
        cr_assert_eq(flash_test_redis_cli(c.ports[src], out, sizeof out, "%s", args), 0, "%s", out);
        for (int i = 0; i < N; i++) key(&it[i], names[i]);
        op_init(&op, FLASH_CACHE_GET, it, N, &done);
        run(p, rc, &op);
        for (int i = 0; i < N; i++) assert_value(&it[i], vals[i]);
    }
    /* a new key of the slot, written while it migrates: ASK to the importer */
    kv(&it[0], "{mig}:new", "fresh");
    op_init(&op, FLASH_CACHE_SET, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    flash_redis_cluster_stats st;
    flash_redis_cluster_stats_get(rc, &st);
    cr_assert_gt(st.ask, 0, "ASK followed");
    cr_assert_eq(st.moved, 0);
    /* the rest moves, then the slot is the importer's */
    {
        char args[4096];
        int len = snprintf(args, sizeof args, "migrate 127.0.0.1 %u '' 0 5000 keys", (unsigned)c.ports[dst]);
        for (int i = 100; i < N; i++) len += snprintf(args + len, sizeof args - (size_t)len, " '%s'", names[i]);
        cr_assert_eq(flash_test_redis_cli(c.ports[src], out, sizeof out, "%s", args), 0, "%s", out);
    }
    for (int n = 0; n < 3; n++) flash_test_redis_cli(c.ports[n], out, sizeof out, "cluster setslot %zu node %s", slot, dst_id);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) key(&it[i], names[i]);
        key(&it[N], "{mig}:new");
        op_init(&op, FLASH_CACHE_GET, it, N + 1, &done);
        run(p, rc, &op);
        for (int i = 0; i < N; i++) assert_value(&it[i], vals[i]);
        assert_value(&it[N], "fresh");
    }
    flash_redis_cluster_stats_get(rc, &st);
    for (int64_t end = flash_test_now_ms() + 1000; st.refreshes < 2 && flash_test_now_ms() < end;) {
        flash_poll_run_once(p, false); /* the reload is rate-limited: let it run */
        flash_test_sleep_ms(10);
        flash_redis_cluster_stats_get(rc, &st);
    }
    cr_assert_gt(st.moved, 0, "MOVED followed");
    cr_assert_geq(st.refreshes, 2, "the map was reloaded after MOVED");
    fprintf(stderr, "migration: %llu ASK, %llu MOVED, %llu map loads\n", (unsigned long long)st.ask,
            (unsigned long long)st.moved, (unsigned long long)st.refreshes);
    flash_cache_destroy(rc);
    flash_poll_destroy(p);
    flash_test_cluster_stop(&c);
}

/* ---- a fake node: redirects and garbage ---- */

static uint16_t fake_port;
enum { FAKE_MOVED_SELF = 1, FAKE_BAD_MOVED, FAKE_GARBAGE, FAKE_HALF_MAP, FAKE_TRYAGAIN, FAKE_BAD_MAP, FAKE_NAMED_MOVED, FAKE_READONLY };

/* One command off buf: argv of bulk strings; 0 when incomplete. */
static size_t fake_command(const char *buf, size_t len, char argv[8][64], int *argc) {
    const char *p = buf, *end = buf + len;
    char *nl;
    if (p >= end || *p != '*' || !(nl = memchr(p, '\n', (size_t)(end - p)))) return 0;
    int n = atoi(p + 1);
    p = nl + 1;
    *argc = 0;
    for (int i = 0; i < n; i++) {
        if (p >= end || !(nl = memchr(p, '\n', (size_t)(end - p)))) return 0;
        size_t l = (size_t)atoi(p + 1);
        p = nl + 1;
        if ((size_t)(end - p) < l + 2) return 0;
        if (i < 8) {
            size_t c = l < 63 ? l : 63;
            memcpy(argv[i], p, c);
            argv[i][c] = 0;
            (*argc)++;
        }
        p += l + 2;
    }
    return (size_t)(p - buf);
}

static void fake_node(int fd, int mode) {
    char buf[65536];
    size_t len = 0;
    for (;;) {
        ssize_t n = recv(fd, buf + len, sizeof buf - len, 0);
        if (n <= 0) return;
        len += (size_t)n;
        for (;;) {
            char argv[8][64], reply[1024];
            int argc = 0;
            size_t used = fake_command(buf, len, argv, &argc);
            if (!used) break;
            memmove(buf, buf + used, len - used);
            len -= used;
            if (!strcasecmp(argv[0], "SCRIPT")) {
                /* the digests redis.h checks: answer what it expects */
                static int k;
                const char *sha = k++ % 2 == 0 ? "81960881acb9f20da2ffbcdb461192d9ffb9380a" : "a65ad6a7c27ab94615bf32aef62973994f68b99d";
                snprintf(reply, sizeof reply, "$40\r\n%s\r\n", sha);
            } else if (!strcasecmp(argv[0], "CLUSTER")) {
                int hi = mode == FAKE_HALF_MAP ? 8191 : 16383;
                if (mode == FAKE_BAD_MAP)
                    snprintf(reply, sizeof reply, "*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:99999\r\n$5\r\nnodes\r\n*0\r\n");
                else
                    snprintf(reply, sizeof reply,
                             "*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:%d\r\n$5\r\nnodes\r\n*1\r\n*6\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n"
                             "$4\r\nport\r\n:%u\r\n$4\r\nrole\r\n$6\r\nmaster\r\n",
                             hi, (unsigned)fake_port);
            } else if (!strcasecmp(argv[0], "MGET")) {
                int keys = argc - 1;
                size_t slot = flash_redis_key_slot(argv[1], strlen(argv[1]));
                if (mode == FAKE_MOVED_SELF)
                    snprintf(reply, sizeof reply, "-MOVED %zu 127.0.0.1:%u\r\n", slot, (unsigned)fake_port);
                else if (mode == FAKE_NAMED_MOVED) /* a host name: never looked up */
                    snprintf(reply, sizeof reply, "-MOVED %zu localhost:%u\r\n", slot, (unsigned)fake_port);
                else if (mode == FAKE_BAD_MOVED)
                    snprintf(reply, sizeof reply, "-MOVED %zu nowhere\r\n", slot);
                else if (mode == FAKE_TRYAGAIN)
                    snprintf(reply, sizeof reply, "-TRYAGAIN Multiple keys request during rehashing of slot\r\n");
                else if (mode == FAKE_GARBAGE)
                    snprintf(reply, sizeof reply, "?garbage\r\n");
                else {
                    int o = snprintf(reply, sizeof reply, "*%d\r\n", keys);
                    for (int i = 0; i < keys; i++) o += snprintf(reply + o, sizeof reply - (size_t)o, "$-1\r\n");
                }
            } else if (mode == FAKE_READONLY && !strcasecmp(argv[0], "SET")) {
                snprintf(reply, sizeof reply, "-READONLY You can't write against a read only replica.\r\n");
            } else {
                snprintf(reply, sizeof reply, "+OK\r\n");
            }
            flash_test_write_all(fd, reply, strlen(reply));
        }
    }
}

static int fake_get(int mode, const char *k, flash_redis_cluster_stats *st) {
    flash_test_fake f;
    flash_test_fake_start(&f, fake_node, &mode, 1, mode);
    fake_port = f.port;
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, &f.port, 1, 300);
    flash_cache_item it[2];
    flash_cache_op op;
    int done;
    key(&it[0], k);
    key(&it[1], "bad key");
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, rc, &op);
    cr_assert_eq(it[1].status, FLASH_EINVAL, "the bad key alone");
    flash_redis_cluster_stats_get(rc, st);
    flash_cache_destroy(rc);
    flash_poll_destroy(p);
    flash_test_fake_stop(&f);
    return it[0].status;
}

RC_TEST(redirect_loops_garbage_and_unserved_slots_fail_only_their_keys) {
    flash_redis_cluster_stats st;
    cr_assert_eq(fake_get(FAKE_MOVED_SELF, "a", &st), FLASH_EBACKEND, "a MOVED loop");
    cr_assert_eq(st.moved, 5, "max_redirects (5) followed, then given up");
    cr_assert_eq(fake_get(FAKE_BAD_MOVED, "a", &st), FLASH_EPROTO);
    cr_assert_eq(fake_get(FAKE_GARBAGE, "a", &st), FLASH_EPROTO);
    cr_assert_eq(fake_get(FAKE_TRYAGAIN, "a", &st), FLASH_ETIMEDOUT, "retried within the deadline");
    cr_assert_gt(st.tryagain, 2);
    /* "a" is slot 15495: outside a map that ends at 8191 */
    cr_assert_eq(fake_get(FAKE_HALF_MAP, "a", &st), FLASH_EBACKEND, "a slot no node serves");
    cr_assert_eq(fake_get(FAKE_HALF_MAP, "b{x}", &st) == FLASH_ENOTFOUND || flash_redis_key_slot("b{x}", 4) > 8191, 1);
    cr_assert_eq(fake_get(FAKE_BAD_MAP, "a", &st), FLASH_EBACKEND, "a map that does not parse");
    cr_assert_gt(st.refresh_failures, 0);
    /* fuzz_redis_cluster: a name in a redirect was resolved (getaddrinfo on
       the loop) and became a node; now only IP literals are followed */
    cr_assert_eq(fake_get(FAKE_NAMED_MOVED, "a", &st), FLASH_EBACKEND, "a MOVED to a host name");
    cr_assert_eq(st.moved, 0);
    cr_assert_eq(st.nodes, 1, "no node made for the name");
}

/* READONLY (a demoted master, its connection still open): the map is
   reloaded and the key sent again, up to max_redirects, then FLASH_EBACKEND. */
RC_TEST(readonly_reloads_the_map_and_retries) {
    int mode = FAKE_READONLY;
    flash_test_fake f;
    flash_test_fake_start(&f, fake_node, &mode, 1, mode);
    fake_port = f.port;
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, &f.port, 1, 2000);
    flash_cache_item it[1];
    flash_cache_op op;
    flash_redis_cluster_stats st;
    int done;
    key(&it[0], "a");
    it[0].value = "v";
    it[0].value_len = 1;
    op_init(&op, FLASH_CACHE_SET, it, 1, &done);
    run(p, rc, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND, "given up after max_redirects");
    flash_redis_cluster_stats_get(rc, &st);
    cr_assert_geq(st.refreshes, 2, "the first map and a reload after READONLY (%llu)", (unsigned long long)st.refreshes);
    cr_assert_geq(st.requests, 6, "the SET sent again (requests %llu)", (unsigned long long)st.requests);
    flash_cache_destroy(rc);
    flash_poll_destroy(p);
    flash_test_fake_stop(&f);
}

/* ---- failover ---- */

#define FO_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(FoRow, FO_FIELDS)
FLASH_GET_KEYS(FoRow, (id))

RC_TEST(a_master_killed_fails_over_promises_settle_and_the_cluster_is_used_again) {
    flash_test_cluster c;
    cr_assert(flash_test_cluster_start(&c, 3, 1, 1000));
    flash_poll *p = flash_poll_create();
    flash_cache rc = cluster_backend(p, c.ports, 3, 400);
    flash_table *db = flash_table_create();
    for (int i = 1; i <= 60; i++) {
        char name[16];
        snprintf(name, sizeof name, "row%d", i);
        FoRow r = {i, name};
        cr_assert_eq(flash_table_put(db, &FoRow_model, &r), 0);
    }
    flash_desc d = {0};
    d.cache = rc;
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert(ctx);
    cr_assert_eq(flash_poll_attach(ctx, p), 0);
    flash_ctx_set_source(ctx, NULL, flash_table_source(db));
    flash_value keys[60];
    for (int i = 0; i < 60; i++) keys[i] = flash_v_i64(i + 1);
    for (int i = 0; i < 60; i++) { /* warm */
        void *v = NULL;
        cr_assert_eq(flash_wait(ctx, flash_query_async(ctx, &FoRow__get_by_id, &keys[i], 1, 0), &v), 0);
    }
    flash_ctx_reset(ctx);
    flash_test_cluster_kill(&c, 0);
    int64_t t0 = flash_test_now_ms();
    for (int i = 0; i < 60; i++) {
        void *v = NULL;
        cr_assert_eq(flash_wait(ctx, flash_query_async(ctx, &FoRow__get_by_id, &keys[i], 1, 0), &v), 0,
                     "the source answers");
        char want[16];
        snprintf(want, sizeof want, "row%d", i + 1);
        cr_assert_str_eq(((FoRow *)v)->name, want);
    }
    cr_assert_lt(flash_test_now_ms() - t0, 3000, "promises settle within the timeouts");
    flash_ctx_reset(ctx);
    /* the replica takes over; the backend follows on its own */
    int64_t deadline = flash_test_now_ms() + 15000;
    bool all_ok = false;
    enum { N = 120 };
    static char names[N][24];
    flash_cache_item it[N];
    flash_cache_op op;
    int done;
    while (!all_ok && flash_test_now_ms() < deadline) {
        for (int i = 0; i < N; i++) {
            snprintf(names[i], sizeof names[i], "fo:%d", i);
            kv(&it[i], names[i], "x");
        }
        op_init(&op, FLASH_CACHE_SET, it, N, &done);
        run(p, rc, &op);
        all_ok = true;
        for (int i = 0; i < N; i++) all_ok = all_ok && it[i].status == FLASH_OK;
        if (!all_ok && getenv("FO_DEBUG")) {
            flash_redis_cluster_stats st;
            flash_redis_cluster_stats_get(rc, &st);
            int bad = 0, code = 0;
            for (int i = 0; i < N; i++)
                if (it[i].status) bad++, code = it[i].status;
            char cn[2048];
            flash_test_redis_cli(c.ports[1], cn, sizeof cn, "cluster nodes");
            fprintf(stderr, "%s", cn);
            fprintf(stderr, "t+%lld: %d bad (%d), down %llu again %llu moved %llu nodes %u slots %u refreshes %llu fails %llu\n",
                    (long long)(flash_test_now_ms() - t0), bad, code, (unsigned long long)st.clusterdown,
                    (unsigned long long)st.tryagain, (unsigned long long)st.moved, st.nodes, st.slots_served,
                    (unsigned long long)st.refreshes, (unsigned long long)st.refresh_failures);
            for (size_t n = 0; n < st.nodes; n++) {
                flash_redis_cluster_node nd;
                flash_redis_cluster_node_get(rc, n, &nd);
                fprintf(stderr, "  %u slots %u down %d fails %llu fast %llu\n", nd.port, nd.slots, nd.stats.down,
                        (unsigned long long)nd.stats.failures, (unsigned long long)nd.stats.fast_fails);
            }
        }
        if (!all_ok) flash_test_sleep_ms(100);
    }
    cr_assert(all_ok, "every slot served again after the failover");
    flash_redis_cluster_stats st;
    flash_redis_cluster_stats_get(rc, &st);
    cr_assert_geq(st.refreshes, 2);
    fprintf(stderr, "failover: used again after %lld ms, %llu map loads\n", (long long)(flash_test_now_ms() - t0),
            (unsigned long long)st.refreshes);
    flash_ctx_destroy(ctx);
    flash_cache_destroy(rc);
    flash_table_destroy(db);
    flash_poll_destroy(p);
    flash_test_cluster_stop(&c);
}

/* ---- Sentinel ---- */

RC_TEST(sentinel_finds_the_primary_and_follows_a_failover) {
    char dir[] = "/tmp/flash-sentinel-XXXXXX", out[512];
    cr_assert(mkdtemp(dir));
    uint16_t mport, rport, sport;
    pid_t mpid, rpid, spid;
    char extra[96];
    cr_assert(flash_test_redis_spawn(&mport, &mpid, dir, NULL));
    snprintf(extra, sizeof extra, "--replicaof 127.0.0.1 %u", (unsigned)mport);
    cr_assert(flash_test_redis_spawn(&rport, &rpid, dir, extra));
    cr_assert(flash_test_sentinel_start(&sport, &spid, dir, "mymaster", mport));
    flash_poll *p = flash_poll_create();
    flash_redis_node sentinels[2] = {{"127.0.0.1", flash_test_free_port()}, {"127.0.0.1", sport}}; /* the first: nobody */
    flash_redis_sentinel_desc d = {0};
    int err = 0;
    d.loop = flash_poll_loop(p);
    d.sentinels = sentinels;
    d.sentinel_count = 2;
    d.master_name = "mymaster";
    d.timeout_ms = 500;
    d.retry_interval_ms = 100;
    flash_cache rs = flash_redis_sentinel_create(&d, &err);
    cr_assert(rs.vt, "%s", flash_strerror(err));
    flash_cache_item it[1];
    flash_cache_op op;
    int done;
    kv(&it[0], "s:k", "one");
    op_init(&op, FLASH_CACHE_SET, it, 1, &done);
    run(p, rs, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    flash_redis_sentinel_stats st;
    flash_redis_sentinel_stats_get(rs, &st);
    cr_assert_eq(st.master_port, mport);
    cr_assert_eq(st.resolutions, 1);
    cr_assert_geq(st.sentinel_errors, 1, "the dead sentinel was skipped");
    /* wait for the replica to be in sync and known, then fail over */
    int64_t end = flash_test_now_ms() + 10000;
    do {
        flash_test_redis_cli(sport, out, sizeof out, "sentinel failover mymaster");
        if (strstr(out, "OK")) break;
        flash_test_sleep_ms(200);
    } while (flash_test_now_ms() < end);
    cr_assert(strstr(out, "OK"), "failover refused: %s", out);
    end = flash_test_now_ms() + 15000;
    do {
        flash_test_redis_cli(sport, out, sizeof out, "sentinel get-master-addr-by-name mymaster");
        if (atoi(strchr(out, '\n') ? strchr(out, '\n') + 1 : "0") == rport) break;
        flash_test_sleep_ms(100);
    } while (flash_test_now_ms() < end);
    /* ops go on; within a few seconds they reach the new primary */
    bool ok = false;
    end = flash_test_now_ms() + 15000;
    while (!ok && flash_test_now_ms() < end) {
        kv(&it[0], "s:k", "two");
        op_init(&op, FLASH_CACHE_SET, it, 1, &done);
        run(p, rs, &op);
        flash_redis_sentinel_stats_get(rs, &st);
        ok = it[0].status == FLASH_OK && st.master_port == rport;
        if (!ok) flash_test_sleep_ms(100);
    }
    cr_assert(ok, "the new primary (%u) is used: status %d, port %u", (unsigned)rport, it[0].status, st.master_port);
    cr_assert_geq(st.failovers, 1);
    key(&it[0], "s:k");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, rs, &op);
    assert_value(&it[0], "two");
    flash_test_redis_cli(rport, out, sizeof out, "role");
    cr_assert(strncmp(out, "master", 6) == 0, "%s", out);
    flash_cache_destroy(rs);
    flash_poll_destroy(p);
    kill(spid, SIGKILL);
    kill(mpid, SIGKILL);
    kill(rpid, SIGKILL);
    waitpid(spid, NULL, 0);
    waitpid(mpid, NULL, 0);
    waitpid(rpid, NULL, 0);
    char cmd[96];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) {
    }
}
