/* The memcached backend against real memcached processes (and a fake server
   for bad replies), driven directly through the layer-6 vtable on the poll
   loop. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/memcached.h"
#include "harness.h"
#include "cache_ops.h"

/* ---- helpers ------------------------------------------------------------- */

/* A FLASH_TEST with a watchdog: a hung test dies by SIGALRM in its own
   worker. (Criterion's .timeout option leaks in the runner process under
   --jobs 2, which the harness's exit-time leak check turns into a failure.) */
#define MC_TEST(name)                                                        \
    static void mc_body_##name(void);                                        \
    FLASH_TEST(memcached, name) {                                            \
        alarm(120);                                                          \
        mc_body_##name();                                                    \
        alarm(0);                                                            \
    }                                                                        \
    static void mc_body_##name(void)

typedef struct opts {
    uint32_t timeout_ms, connect_timeout_ms, retry_interval_ms;
    size_t max_value;
} opts;

static flash_cache make_cache(flash_poll *p, const uint16_t *ports, size_t n, const opts *o) {
    flash_memcached_server servers[8];
    flash_memcached_desc d;
    int err = 1;
    memset(&d, 0, sizeof d);
    for (size_t i = 0; i < n; i++) {
        servers[i].host = "127.0.0.1";
        servers[i].port = ports[i];
        servers[i].weight = 1;
    }
    d.loop = flash_poll_loop(p);
    d.servers = servers;
    d.server_count = n;
    if (o) {
        d.timeout_ms = o->timeout_ms;
        d.connect_timeout_ms = o->connect_timeout_ms;
        d.retry_interval_ms = o->retry_interval_ms;
        d.max_value = o->max_value;
    }
    flash_cache c = flash_memcached_create(&d, &err);
    cr_assert_not_null(c.self, "flash_memcached_create failed: %d", err);
    cr_assert_eq(err, 0);
    return c;
}

static flash_cache make_cache_on(flash_poll *p, flash_test_server *const *srv, size_t n, const opts *o) {
    uint16_t ports[8];
    for (size_t i = 0; i < n; i++) ports[i] = srv[i]->port;
    return make_cache(p, ports, n, o);
}

static flash_memcached_stats mstats(flash_cache c, size_t i) {
    flash_memcached_stats s;
    cr_assert_eq(flash_memcached_server_stats(c, i, &s), 0);
    return s;
}

/* Several counters from one `stats` (one connection to the server). */
static void server_stats(const flash_test_server *s, const char *const *names, long long *out, int n) {
    static char buf[32768];
    cr_assert_gt(flash_test_memcached_command(s, "stats\r\n", buf, sizeof buf), 0);
    for (int i = 0; i < n; i++) {
        char needle[96];
        snprintf(needle, sizeof needle, "STAT %s ", names[i]);
        char *at = strstr(buf, needle);
        cr_assert_not_null(at, "no stat %s", names[i]);
        out[i] = atoll(at + strlen(needle));
    }
}

/* ---- every opcode and status ------------------------------------------------- */

MC_TEST(set_get_flags_cas_and_miss) {
    static flash_test_server s; /* static: the harness keeps a pointer until exit */
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    cr_assert_str_eq(c.vt->name, "memcached");
    cr_assert_eq(c.vt->max_value(c.self), (size_t)1 << 20);

    flash_cache_item it[3];
    flash_cache_op op;
    int done;
    kv(&it[0], "alpha", "one");
    it[0].flags = 7;
    kv(&it[1], "beta", "");
    it[1].flags = 4000000000u;
    op_init(&op, FLASH_CACHE_SET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(op.status, 0);
    cr_assert_eq(op.round_trips, 1);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_OK);

    key(&it[0], "alpha");
    key(&it[1], "beta");
    key(&it[2], "gamma");
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(p, c, &op);
    cr_assert_eq(op.round_trips, 1);
    assert_value(&it[0], "one");
    cr_assert_eq(it[0].flags, 7);
    cr_assert_neq(it[0].cas, 0);
    assert_value(&it[1], "");
    cr_assert_eq(it[1].flags, 4000000000u);
    cr_assert_neq(it[1].cas, it[0].cas);
    cr_assert_eq(it[2].status, FLASH_ENOTFOUND);
    cr_assert_null(it[2].value);

    flash_memcached_stats st = mstats(c, 0);
    cr_assert_eq(st.requests, 2);
    cr_assert_eq(st.keys, 5);
    cr_assert_eq(st.connects, 1);
    cr_assert_eq(st.reconnects, 0);
    cr_assert(st.connected);
    cr_assert(!st.down);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(add_delete_and_cas_flow) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_item it[2];
    flash_cache_op op;
    int done;

    /* add: stored when absent, ENOTSTORED when present */
    kv(&it[0], "k", "first");
    op_init(&op, FLASH_CACHE_ADD, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    kv(&it[0], "k", "second");
    op_init(&op, FLASH_CACHE_ADD, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTSTORED);

    /* cas: token from a get; ok once, then ENOTSTORED; ENOTFOUND when absent */
    key(&it[0], "k");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    assert_value(&it[0], "first");
    uint64_t token = it[0].cas;
    kv(&it[0], "k", "by-cas");
    it[0].cas = token;
    kv(&it[1], "absent", "x");
    it[1].cas = token;
    op_init(&op, FLASH_CACHE_CAS, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);
    kv(&it[0], "k", "stale-cas");
    it[0].cas = token;
    op_init(&op, FLASH_CACHE_CAS, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTSTORED);
    key(&it[0], "k");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    assert_value(&it[0], "by-cas");
    cr_assert_neq(it[0].cas, token);

    /* delete: ok, then ENOTFOUND; the key is gone */
    key(&it[0], "k");
    key(&it[1], "absent");
    op_init(&op, FLASH_CACHE_DELETE, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);
    key(&it[0], "k");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(incr_create_and_errors) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_item it[3];
    flash_cache_op op;
    int done;

    key(&it[0], "n");
    it[0].number = 5;
    op_init(&op, FLASH_CACHE_INCR, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);

    key(&it[0], "n");
    it[0].number = 5;
    it[0].create = true;
    it[0].initial = 10;
    op_init(&op, FLASH_CACHE_INCR, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[0].number, 10); /* created with initial */
    it[0].number = 5;
    op_init(&op, FLASH_CACHE_INCR, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[0].number, 15);

    /* 64-bit values; incr on a non-number is EINVAL for that key only */
    kv(&it[0], "big", "18446744073709551610");
    kv(&it[1], "text", "abc");
    op_init(&op, FLASH_CACHE_SET, it, 2, &done);
    run(p, c, &op);
    key(&it[0], "big");
    it[0].number = 3;
    key(&it[1], "text");
    it[1].number = 1;
    key(&it[2], "n");
    it[2].number = 1;
    op_init(&op, FLASH_CACHE_INCR, it, 3, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[0].number, 18446744073709551613ull);
    cr_assert_eq(it[1].status, FLASH_EINVAL);
    cr_assert_eq(it[2].status, FLASH_OK);
    cr_assert_eq(it[2].number, 16);
    cr_assert_eq(mstats(c, 0).proto_errors, 0);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

/* Create-or-increment is one server-side step: 20 racing ops on 4
   connections see every value from 0 to 19 exactly once. */
MC_TEST(incr_create_is_atomic) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c[4];
    flash_cache_item it[20];
    flash_cache_op op[20];
    int done[20];
    for (int i = 0; i < 4; i++) c[i] = make_cache_on(p, &sp, 1, NULL);
    for (int i = 0; i < 20; i++) {
        key(&it[i], "counter");
        it[i].number = 1;
        it[i].create = true;
        it[i].initial = 0;
        it[i].ttl_s = 60;
        op_init(&op[i], FLASH_CACHE_INCR, &it[i], 1, &done[i]);
        submit(p, c[i % 4], &op[i]);
    }
    for (int i = 0; i < 20; i++) wait_done(p, &op[i]);
    bool seen[20] = {false};
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(it[i].status, FLASH_OK);
        cr_assert_lt(it[i].number, 20);
        cr_assert(!seen[it[i].number], "value %llu twice", (unsigned long long)it[i].number);
        seen[it[i].number] = true;
    }
    for (int i = 0; i < 4; i++) flash_cache_destroy(c[i]);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(quiet_ops_report_only_failures) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    enum { N = 100 };
    static flash_cache_item it[N];
    static char keys[N][16], vals[N][16];
    flash_cache_op op;
    int done;
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "q:%d", i);
        snprintf(vals[i], sizeof vals[i], "v%d", i);
        kv(&it[i], keys[i], vals[i]);
    }
    op_init(&op, FLASH_CACHE_SET, it, N, &done);
    op.quiet = true;
    run(p, c, &op);
    cr_assert_eq(op.status, 0);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, FLASH_OK);

    /* quiet add: the server still reports NS, naming the key */
    kv(&it[0], keys[0], "again");
    kv(&it[1], "q:new", "fresh");
    op_init(&op, FLASH_CACHE_ADD, it, 2, &done);
    op.quiet = true;
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTSTORED);
    cr_assert_eq(it[1].status, FLASH_OK);

    /* quiet delete and incr */
    key(&it[0], keys[1]);
    key(&it[1], "q:absent");
    op_init(&op, FLASH_CACHE_DELETE, it, 2, &done);
    op.quiet = true;
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);
    key(&it[0], "q:counter");
    it[0].create = true;
    it[0].initial = 3;
    key(&it[1], "q:nocounter");
    op_init(&op, FLASH_CACHE_INCR, it, 2, &done);
    op.quiet = true;
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);

    /* what the quiet ops did */
    for (int i = 0; i < N; i++) key(&it[i], keys[i]);
    op_init(&op, FLASH_CACHE_GET, it, N, &done);
    op.quiet = true; /* meaningless for GET: answered in full */
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);
    for (int i = 2; i < N; i++) assert_value(&it[i], vals[i]);
    key(&it[0], "q:counter");
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    assert_value(&it[0], "3");
    cr_assert_eq(mstats(c, 0).proto_errors, 0);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(ttl_expires) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_item it[4];
    flash_cache_op op;
    int done;
    kv(&it[0], "short", "x");
    it[0].ttl_s = 1;
    kv(&it[1], "forever", "y");
    kv(&it[2], "forty-days", "z");
    it[2].ttl_s = 40 * 86400; /* sent as an absolute time: must not expire now */
    key(&it[3], "made");
    it[3].create = true;
    it[3].ttl_s = 1;
    op_init(&op, FLASH_CACHE_SET, it, 3, &done);
    run(p, c, &op);
    op_init(&op, FLASH_CACHE_INCR, &it[3], 1, &done);
    run(p, c, &op);
    for (int i = 0; i < 4; i++) cr_assert_eq(it[i].status, FLASH_OK);
    flash_test_sleep_ms(2500);
    key(&it[0], "short");
    key(&it[1], "forever");
    key(&it[2], "forty-days");
    key(&it[3], "made");
    op_init(&op, FLASH_CACHE_GET, it, 4, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    assert_value(&it[1], "y");
    assert_value(&it[2], "z");
    cr_assert_eq(it[3].status, FLASH_ENOTFOUND);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

/* ---- bad input ------------------------------------------------------------------ */

MC_TEST(bad_keys_fail_only_their_item) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    char k250[251], k251[252];
    memset(k250, 'a', 250);
    k250[250] = 0;
    memset(k251, 'b', 251);
    k251[251] = 0;
    const char *keys[] = {"good", k250, k251, "has space", "new\nline", "", "tab\tkey", "del\x7f", "cr\r"};
    enum { N = sizeof keys / sizeof keys[0] };
    const int want[N] = {FLASH_OK, FLASH_OK, FLASH_ETOOLARGE, FLASH_EINVAL, FLASH_EINVAL,
                         FLASH_EINVAL, FLASH_EINVAL, FLASH_EINVAL, FLASH_EINVAL};
    flash_cache_item it[N];
    flash_cache_op op;
    int done;
    for (int i = 0; i < N; i++) kv(&it[i], keys[i], "v");
    op_init(&op, FLASH_CACHE_SET, it, N, &done);
    run(p, c, &op);
    for (int i = 0; i < N; i++) cr_assert_eq(it[i].status, want[i], "key %d: %d", i, it[i].status);
    cr_assert_eq(mstats(c, 0).keys, 2); /* only the good keys went out */
    for (int i = 0; i < N; i++) key(&it[i], keys[i]);
    it[N - 1].key = NULL; /* NULL key */
    it[N - 1].key_len = 3;
    op_init(&op, FLASH_CACHE_GET, it, N, &done);
    run(p, c, &op);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(it[i].status, want[i], "key %d: %d", i, it[i].status);
        if (want[i] == FLASH_OK) assert_value(&it[i], "v");
    }
    flash_memcached_stats st = mstats(c, 0);
    cr_assert_eq(st.proto_errors, 0);
    cr_assert_eq(st.failures, 0);
    cr_assert_eq(st.connects, 1);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

/* Every position of keys of many lengths (the check goes 8 bytes a step, the
   last step overlapping): a space, control byte or DEL fails the key; any
   other byte, 0x80..0xff included, is a key memcached stores and answers. */
MC_TEST(key_bytes_checked_at_every_position) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    static const size_t lens[] = {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33, 64, 250};
    static const unsigned char bad[] = {' ', 0, 1, '\t', '\r', '\n', 0x1f, 0x7f};
    static const unsigned char good[] = {'!', '~', 0x80, 0xff};
    enum { NLENS = sizeof lens / sizeof lens[0], MAXN = 6000 };
    static char keys[MAXN][251];
    static flash_cache_item it[MAXN];
    static int want[MAXN];
    size_t n = 0, ngood = 0;
    for (size_t l = 0; l < NLENS; l++) {
        for (size_t pos = 0; pos < lens[l]; pos++) {
            for (size_t b = 0; b < sizeof bad + sizeof good; b++) {
                if (b >= sizeof bad && pos % 3 != 0 && pos != lens[l] - 1) continue; /* fewer good keys */
                cr_assert_lt(n, MAXN);
                memset(keys[n], 'k', lens[l]);
                /* distinct keys: the position and the byte in the first bytes */
                if (lens[l] >= 4 && pos >= 3) {
                    char tag[8];
                    snprintf(tag, sizeof tag, "%c%02zu", (char)('a' + (int)b), pos % 100);
                    memcpy(keys[n], tag, 3);
                }
                keys[n][pos] = (char)(b < sizeof bad ? bad[b] : good[b - sizeof bad]);
                memset(&it[n], 0, sizeof it[n]);
                it[n].key = keys[n];
                it[n].key_len = lens[l];
                it[n].value = keys[n]; /* the value: the key itself */
                it[n].value_len = lens[l];
                want[n] = b < sizeof bad ? FLASH_EINVAL : FLASH_OK;
                ngood += b >= sizeof bad;
                n++;
            }
        }
    }
    flash_cache_op op;
    int done;
    op_init(&op, FLASH_CACHE_SET, it, n, &done);
    run(p, c, &op);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(it[i].status, want[i], "set key %zu (%zu bytes): %d", i, it[i].key_len, it[i].status);
    for (size_t i = 0; i < n; i++) it[i].value = NULL, it[i].value_len = 0;
    op_init(&op, FLASH_CACHE_GET, it, n, &done);
    run(p, c, &op);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(it[i].status, want[i], "get key %zu (%zu bytes): %d", i, it[i].key_len, it[i].status);
        if (want[i] == FLASH_OK)
            cr_assert(it[i].value_len == it[i].key_len && memcmp(it[i].value, keys[i], it[i].key_len) == 0);
    }
    flash_memcached_stats st = mstats(c, 0);
    cr_assert_eq(st.keys, 2 * ngood); /* only the good keys went out */
    cr_assert_eq(st.proto_errors, 0);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(values_over_the_limits) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL)); /* -I 1m: the server's own limit */
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    opts big = {0, 0, 0, (size_t)2 << 20};
    flash_cache c2 = make_cache_on(p, &sp, 1, &big);
    opts small = {0, 0, 0, 100000};
    flash_cache c3 = make_cache_on(p, &sp, 1, &small);
    size_t n = (size_t)3 << 20;
    char *v = (char *)malloc(n);
    for (size_t i = 0; i < n; i++) v[i] = (char)('a' + i % 26);
    flash_cache_item it[3];
    flash_cache_op op;
    int done;

    /* over the client's max_value: ETOOLARGE before anything is sent */
    kv(&it[0], "ok", "fine");
    key(&it[1], "huge");
    it[1].value = v;
    it[1].value_len = ((size_t)1 << 20) + 1;
    key(&it[2], "nullvalue");
    it[2].value_len = 3;
    op_init(&op, FLASH_CACHE_SET, it, 3, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ETOOLARGE);
    cr_assert_eq(it[2].status, FLASH_EINVAL);
    cr_assert_eq(mstats(c, 0).keys, 1);

    /* under ours, over the server's: its "object too large" for that key only */
    key(&it[0], "huge");
    it[0].value = v;
    it[0].value_len = (size_t)3 << 19; /* 1.5 MiB */
    kv(&it[1], "ok2", "fine");
    op_init(&op, FLASH_CACHE_SET, it, 2, &done);
    run(p, c2, &op);
    cr_assert_eq(it[0].status, FLASH_ETOOLARGE);
    cr_assert_eq(it[1].status, FLASH_OK);
    cr_assert_eq(mstats(c2, 0).proto_errors, 0);

    /* a large value round trip: replies split over many reads */
    key(&it[0], "large");
    it[0].value = v;
    it[0].value_len = 600000;
    op_init(&op, FLASH_CACHE_SET, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    key(&it[0], "large");
    key(&it[1], "ok");
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[0].value_len, 600000);
    cr_assert_eq(memcmp(it[0].value, v, 600000), 0);
    assert_value(&it[1], "fine");

    /* a stored value over the reader's max_value: skipped, ETOOLARGE, the
       rest of the reply still parsed on the same connection */
    key(&it[0], "large");
    key(&it[1], "ok");
    key(&it[2], "missing");
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(p, c3, &op);
    cr_assert_eq(it[0].status, FLASH_ETOOLARGE);
    assert_value(&it[1], "fine");
    cr_assert_eq(it[2].status, FLASH_ENOTFOUND);
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(p, c3, &op);
    cr_assert_eq(it[0].status, FLASH_ETOOLARGE);
    assert_value(&it[1], "fine");
    flash_memcached_stats st = mstats(c3, 0);
    cr_assert_eq(st.proto_errors, 0);
    cr_assert_eq(st.connects, 1);
    free(v);
    flash_cache_destroy(c);
    flash_cache_destroy(c2);
    flash_cache_destroy(c3);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(bad_ops_and_descs) {
    flash_poll *p = flash_poll_create();
    int err = 0;
    flash_memcached_desc d;
    memset(&d, 0, sizeof d);
    flash_cache none = flash_memcached_create(NULL, &err);
    cr_assert_null(none.self);
    cr_assert_eq(err, FLASH_EINVAL);
    none = flash_memcached_create(&d, &err); /* no loop, no servers */
    cr_assert_null(none.vt);
    cr_assert_eq(err, FLASH_EINVAL);
    flash_memcached_server bad = {"", 11211, 1};
    d.loop = flash_poll_loop(p);
    d.servers = &bad;
    d.server_count = 1;
    none = flash_memcached_create(&d, &err); /* empty host */
    cr_assert_null(none.self);
    cr_assert_eq(err, FLASH_EINVAL);
    bad.host = NULL;
    none = flash_memcached_create(&d, &err);
    cr_assert_null(none.self);
    cr_assert_eq(err, FLASH_EINVAL);
    cr_assert_eq(flash_memcached_server_for_key(none, "k", 1), FLASH_EINVAL);

    /* nothing listens on this port: connect refused, no hang */
    uint16_t port = flash_test_free_port();
    opts o = {0, 0, 1000, 0};
    flash_cache c = make_cache(p, &port, 1, &o);
    flash_memcached_stats st;
    cr_assert_eq(flash_memcached_server_stats(c, 1, &st), FLASH_EINVAL);
    flash_cache_item it[2];
    flash_cache_op op;
    int done;

    /* items NULL, unknown opcode, empty op: done still comes, later */
    op_init(&op, FLASH_CACHE_GET, NULL, 2, &done);
    run(p, c, &op);
    cr_assert_eq(op.status, FLASH_EINVAL);
    key(&it[0], "k");
    op_init(&op, (flash_cache_opcode)99, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(op.status, FLASH_EINVAL);
    cr_assert_eq(it[0].status, FLASH_EINVAL);
    op_init(&op, FLASH_CACHE_GET, it, 0, &done);
    run(p, c, &op);
    cr_assert_eq(op.status, 0);
    cr_assert_eq(op.round_trips, 0);

    key(&it[0], "k1");
    key(&it[1], "k2");
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    cr_assert_eq(it[1].status, FLASH_EBACKEND);
    cr_assert_eq(op.round_trips, 1);
    st = mstats(c, 0);
    cr_assert_eq(st.failures, 1);
    cr_assert(st.down);
    cr_assert_eq(st.connects, 0);
    /* down: fails fast, no request */
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    cr_assert_eq(op.round_trips, 0);
    st = mstats(c, 0);
    cr_assert_eq(st.fast_fails, 2);
    cr_assert_eq(st.requests, 1);
    /* after the retry interval: tried again */
    flash_test_sleep_ms(1100);
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    cr_assert_eq(op.round_trips, 1);
    cr_assert_eq(mstats(c, 0).failures, 2);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
}

/* ---- the pool ---------------------------------------------------------------------- */

enum { NKEYS = 1000 };
static char pool_keys[NKEYS][24], pool_vals[NKEYS][32];
static flash_cache_item pool_items[NKEYS];

static void pool_fill(flash_cache_opcode code) {
    for (int i = 0; i < NKEYS; i++) {
        snprintf(pool_keys[i], sizeof pool_keys[i], "user:%d", i);
        snprintf(pool_vals[i], sizeof pool_vals[i], "row-%d", i * 7);
        if (code == FLASH_CACHE_GET) key(&pool_items[i], pool_keys[i]);
        else kv(&pool_items[i], pool_keys[i], pool_vals[i]);
    }
}

MC_TEST(gather_of_1000_gets_is_3_round_trips) {
    static flash_test_server s[3];
    flash_test_server *sp[3] = {&s[0], &s[1], &s[2]};
    for (int i = 0; i < 3; i++) cr_assert(flash_test_memcached_start(&s[i], NULL));
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, sp, 3, NULL);
    flash_cache_op op;
    int done;
    long long per[3] = {0, 0, 0};

    pool_fill(FLASH_CACHE_SET);
    for (int i = 0; i < NKEYS; i++) {
        int at = flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i]));
        cr_assert(at >= 0 && at < 3);
        per[at]++;
    }
    for (int i = 0; i < 3; i++) cr_assert_gt(per[i], 100, "ketama put only %lld keys on server %d", per[i], i);
    op_init(&op, FLASH_CACHE_SET, pool_items, NKEYS, &done);
    run(p, c, &op);
    cr_assert_eq(op.round_trips, 3);
    for (int i = 0; i < NKEYS; i++) cr_assert_eq(pool_items[i].status, FLASH_OK);

    /* every key sits on the server ketama names */
    static const char *const names[] = {"cmd_get", "get_hits", "get_misses", "total_connections", "curr_items"};
    long long before[3][5], after[3][5];
    for (int i = 0; i < 3; i++) {
        server_stats(&s[i], names, before[i], 5);
        cr_assert_eq(before[i][4], per[i]);
    }
    for (int i = 0; i < NKEYS; i += 97) {
        int at = flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i]));
        for (int j = 0; j < 3; j++) {
            char cmd[64], buf[256];
            snprintf(cmd, sizeof cmd, "mg %s v\r\n", pool_keys[i]);
            cr_assert_gt(flash_test_memcached_command(&s[j], cmd, buf, sizeof buf), 0);
            cr_assert_eq(strncmp(buf, j == at ? "VA " : "EN", 2 + (j == at)), 0, "%s on %d: %s", pool_keys[i], j, buf);
        }
    }
    for (int i = 0; i < 3; i++) server_stats(&s[i], names, before[i], 5);

    flash_memcached_stats st0[3];
    for (int i = 0; i < 3; i++) st0[i] = mstats(c, (size_t)i);
    pool_fill(FLASH_CACHE_GET);
    op_init(&op, FLASH_CACHE_GET, pool_items, NKEYS, &done);
    run(p, c, &op);
    /* the library's count: one request per server */
    cr_assert_eq(op.round_trips, 3);
    for (int i = 0; i < NKEYS; i++) assert_value(&pool_items[i], pool_vals[i]);
    for (int i = 0; i < 3; i++) {
        flash_memcached_stats st = mstats(c, (size_t)i);
        cr_assert_eq(st.requests - st0[i].requests, 1, "server %d: %llu requests", i,
                     (unsigned long long)(st.requests - st0[i].requests));
        cr_assert_eq(st.keys - st0[i].keys, (uint64_t)per[i]);
        cr_assert_eq(st.connects, 1);
    }
    /* memcached's count: each server got exactly its keys (mg counts as a
       get per key), all hits, over the connection it already had (the one
       new connection is this `stats` call's own) */
    for (int i = 0; i < 3; i++) {
        server_stats(&s[i], names, after[i], 5);
        cr_assert_eq(after[i][0] - before[i][0], per[i], "server %d cmd_get", i);
        cr_assert_eq(after[i][1] - before[i][1], per[i], "server %d get_hits", i);
        cr_assert_eq(after[i][2] - before[i][2], 0);
        cr_assert_eq(after[i][3] - before[i][3], 1, "server %d: new connections", i);
    }
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    for (int i = 0; i < 3; i++) flash_test_server_stop(&s[i]);
}

/* Requests for several ops pipeline on one connection; ops for different
   servers are in flight at once. */
MC_TEST(ops_pipeline_on_one_connection) {
    static flash_test_server s[2];
    flash_test_server *sp[2] = {&s[0], &s[1]};
    for (int i = 0; i < 2; i++) cr_assert(flash_test_memcached_start(&s[i], NULL));
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, sp, 2, NULL);
    enum { OPS = 10, PER = 20 };
    static flash_cache_item it[OPS][PER];
    static char keys[OPS][PER][32];
    flash_cache_op op[OPS];
    int done[OPS];
    for (int o = 0; o < OPS; o++) {
        for (int k = 0; k < PER; k++) {
            snprintf(keys[o][k], sizeof keys[o][k], "p:%d:%d", o, k);
            kv(&it[o][k], keys[o][k], keys[o][k]);
        }
        op_init(&op[o], o % 2 ? FLASH_CACHE_SET : FLASH_CACHE_ADD, it[o], PER, &done[o]);
        submit(p, c, &op[o]);
    }
    for (int o = 0; o < OPS; o++) wait_done(p, &op[o]);
    for (int o = 0; o < OPS; o++) {
        for (int k = 0; k < PER; k++) key(&it[o][k], keys[o][k]);
        op_init(&op[o], FLASH_CACHE_GET, it[o], PER, &done[o]);
        submit(p, c, &op[o]);
    }
    for (int o = 0; o < OPS; o++) wait_done(p, &op[o]);
    for (int o = 0; o < OPS; o++)
        for (int k = 0; k < PER; k++) assert_value(&it[o][k], keys[o][k]);
    for (int i = 0; i < 2; i++) cr_assert_eq(mstats(c, (size_t)i).connects, 1);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    for (int i = 0; i < 2; i++) flash_test_server_stop(&s[i]);
}

/* ---- outages --------------------------------------------------------------------------- */

static int get_pool(flash_poll *p, flash_cache c, int *by_status_on_dead, int dead, int *hits_elsewhere) {
    flash_cache_op op;
    int done;
    pool_fill(FLASH_CACHE_GET);
    op_init(&op, FLASH_CACHE_GET, pool_items, NKEYS, &done);
    run(p, c, &op);
    *by_status_on_dead = 0;
    *hits_elsewhere = 0;
    int status_on_dead = 1;
    for (int i = 0; i < NKEYS; i++) {
        int at = flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i]));
        if (at == dead) {
            if (status_on_dead == 1) status_on_dead = pool_items[i].status;
            cr_assert_eq(pool_items[i].status, status_on_dead, "dead-server keys disagree");
            (*by_status_on_dead)++;
        } else {
            assert_value(&pool_items[i], pool_vals[i]);
            (*hits_elsewhere)++;
        }
    }
    return status_on_dead;
}

MC_TEST(killed_server_fails_only_its_keys_then_recovers) {
    static flash_test_server s[3];
    flash_test_server *sp[3] = {&s[0], &s[1], &s[2]};
    for (int i = 0; i < 3; i++) cr_assert(flash_test_memcached_start(&s[i], NULL));
    flash_poll *p = flash_poll_create();
    opts o = {0, 0, 1000, 0};
    flash_cache c = make_cache_on(p, sp, 3, &o);
    flash_cache_op op;
    int done, dead_keys, others;
    pool_fill(FLASH_CACHE_SET);
    op_init(&op, FLASH_CACHE_SET, pool_items, NKEYS, &done);
    run(p, c, &op);
    cr_assert_eq(get_pool(p, c, &dead_keys, 1, &others), FLASH_OK);

    flash_test_server_stop(&s[1]); /* killed between batches */
    cr_assert_eq(get_pool(p, c, &dead_keys, 1, &others), FLASH_EBACKEND);
    cr_assert_gt(dead_keys, 0);
    cr_assert_eq(dead_keys + others, NKEYS);
    flash_memcached_stats st = mstats(c, 1);
    cr_assert(st.down);
    cr_assert_geq(st.failures, 1);
    uint64_t requests = st.requests;

    /* while down: its keys fail at once, nothing is sent to it */
    cr_assert_eq(get_pool(p, c, &dead_keys, 1, &others), FLASH_EBACKEND);
    st = mstats(c, 1);
    cr_assert_eq(st.requests, requests);
    cr_assert_eq(st.fast_fails, (uint64_t)dead_keys);

    /* back (empty) after the retry interval: reachable, refilled, hits */
    cr_assert(flash_test_server_restart(&s[1]));
    flash_test_sleep_ms(1100);
    cr_assert_eq(get_pool(p, c, &dead_keys, 1, &others), FLASH_ENOTFOUND);
    st = mstats(c, 1);
    cr_assert(!st.down);
    cr_assert(st.connected);
    cr_assert_eq(st.reconnects, 1);
    pool_fill(FLASH_CACHE_SET);
    op_init(&op, FLASH_CACHE_SET, pool_items, NKEYS, &done);
    run(p, c, &op);
    cr_assert_eq(get_pool(p, c, &dead_keys, 1, &others), FLASH_OK);

    /* killed while a request is in flight */
    pool_fill(FLASH_CACHE_GET);
    op_init(&op, FLASH_CACHE_GET, pool_items, NKEYS, &done);
    flash_test_server_pause(&s[2], true);
    submit(p, c, &op);
    for (int i = 0; i < 5; i++) flash_poll_run_once(p, false);
    kill(s[2].pid, SIGKILL); /* dies stopped: never answers */
    waitpid(s[2].pid, NULL, 0);
    s[2].pid = 0;
    wait_done(p, &op);
    for (int i = 0; i < NKEYS; i++) {
        int at = flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i]));
        if (at == 2) cr_assert_eq(pool_items[i].status, FLASH_EBACKEND);
        else assert_value(&pool_items[i], pool_vals[i]);
    }
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    for (int i = 0; i < 3; i++) flash_test_server_stop(&s[i]);
}

typedef struct ticker {
    flash_loop loop;
    void *handle;
    int ticks;
} ticker;

static void tick(void *arg) {
    ticker *t = (ticker *)arg;
    t->ticks++;
    t->handle = t->loop.vt->timer(t->loop.native, 10, tick, t);
}

MC_TEST(stopped_server_times_out_without_blocking_the_loop) {
    static flash_test_server s[2];
    flash_test_server *sp[2] = {&s[0], &s[1]};
    for (int i = 0; i < 2; i++) cr_assert(flash_test_memcached_start(&s[i], NULL));
    flash_poll *p = flash_poll_create();
    opts o = {500, 0, 1000, 0};
    flash_cache c = make_cache_on(p, sp, 2, &o);
    flash_cache_op op, other;
    int done, other_done, dead_keys, others;
    pool_fill(FLASH_CACHE_SET);
    op_init(&op, FLASH_CACHE_SET, pool_items, NKEYS, &done);
    run(p, c, &op);

    flash_test_server_pause(&s[0], true);
    ticker t = {flash_poll_loop(p), NULL, 0};
    t.handle = t.loop.vt->timer(t.loop.native, 10, tick, &t);
    pool_fill(FLASH_CACHE_GET);
    op_init(&op, FLASH_CACHE_GET, pool_items, NKEYS, &done);
    /* a second op for the live server only */
    flash_cache_item one;
    const char *live_key = NULL;
    for (int i = 0; i < NKEYS && !live_key; i++)
        if (flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i])) == 1) live_key = pool_keys[i];
    key(&one, live_key);
    op_init(&other, FLASH_CACHE_GET, &one, 1, &other_done);
    int64_t start = flash_test_now_ms();
    submit(p, c, &op);
    submit(p, c, &other);
    int ticks_at_other = -1;
    while (!done) {
        cr_assert_geq(flash_poll_run_once(p, true), 0);
        if (other_done && ticks_at_other < 0) ticks_at_other = t.ticks;
    }
    int64_t took = flash_test_now_ms() - start;
    wait_done(p, &op);
    cr_assert_eq(one.status, FLASH_OK);
    cr_assert(ticks_at_other >= 0 && ticks_at_other < t.ticks, "the live server's op waited for the stopped one");
    cr_assert_geq(took, 490);
    cr_assert_lt(took, 5000);
    cr_assert_geq(t.ticks, 5, "the loop was blocked: %d ticks in %lld ms", t.ticks, (long long)took);
    int dead_status = 1;
    for (int i = 0; i < NKEYS; i++) {
        int at = flash_memcached_server_for_key(c, pool_keys[i], strlen(pool_keys[i]));
        if (at == 0) {
            dead_status = pool_items[i].status;
            cr_assert_eq(dead_status, FLASH_ETIMEDOUT);
        } else {
            assert_value(&pool_items[i], pool_vals[i]);
        }
    }
    cr_assert_eq(dead_status, FLASH_ETIMEDOUT);
    flash_memcached_stats st = mstats(c, 0);
    cr_assert_eq(st.timeouts, 1);
    cr_assert(st.down);
    cr_assert(!st.connected);
    /* marked down: fails at once, nothing sent to it */
    uint64_t requests = st.requests;
    cr_assert_eq(get_pool(p, c, &dead_keys, 0, &others), FLASH_EBACKEND);
    st = mstats(c, 0);
    cr_assert_eq(st.requests, requests);
    cr_assert_eq(st.fast_fails, (uint64_t)dead_keys);
    t.loop.vt->cancel(t.loop.native, t.handle);

    /* resumed: back after the retry interval */
    flash_test_server_pause(&s[0], false);
    flash_test_sleep_ms(1100);
    cr_assert_eq(get_pool(p, c, &dead_keys, 0, &others), FLASH_OK);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    for (int i = 0; i < 2; i++) flash_test_server_stop(&s[i]);
}

/* ---- a fake server that misbehaves ----------------------------------------------- */

enum {
    FAKE_GOOD, FAKE_GARBAGE, FAKE_CLOSE_MID_VALUE, FAKE_LONGER_VALUE, FAKE_NO_NEWLINE, FAKE_UNSOLICITED,
    FAKE_UNASKED_KEY /* a VALUE for a key the request did not name */
};

/* Serve one connection: answer each request line (a `gets k1 k2 ...`, which
   is what the backend sends for a GET) by mode. */
static void fake_serve(int fd, int mode) {
    static char buf[1 << 16];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n <= 0) return;
        len += (size_t)n;
        buf[len] = 0;
        char *end;
        while ((end = strstr(buf, "\r\n")) != NULL) {
            char out[512], first[256] = "";
            size_t olen = 0;
            *end = 0;
            if (strncmp(buf, "gets ", 5) == 0) sscanf(buf + 5, "%255s", first);
            switch (mode) {
            case FAKE_GOOD:
            case FAKE_UNSOLICITED: olen = (size_t)sprintf(out, "END\r\n"); break; /* all misses */
            case FAKE_GARBAGE: flash_test_write_all(fd, "WHAT IS THIS\r\n", 14); flash_test_drain_until_eof(fd); return;
            case FAKE_CLOSE_MID_VALUE: {
                int h = sprintf(out, "VALUE %s 0 10 1\r\nabc", first);
                flash_test_write_all(fd, out, (size_t)h);
                return; /* closes */
            }
            case FAKE_LONGER_VALUE: olen = (size_t)sprintf(out, "VALUE %s 0 3 1\r\nabcdef\r\nEND\r\n", first); break;
            case FAKE_UNASKED_KEY: olen = (size_t)sprintf(out, "VALUE nobody:asked 0 1 1\r\nx\r\nEND\r\n"); break;
            case FAKE_NO_NEWLINE: {
                static char junk[6000];
                memset(junk, 'x', sizeof junk);
                flash_test_write_all(fd, junk, sizeof junk);
                flash_test_drain_until_eof(fd);
                return;
            }
            }
            flash_test_write_all(fd, out, olen);
            if (mode == FAKE_UNSOLICITED) { /* answered; then a reply nobody asked for */
                flash_test_sleep_ms(50);
                flash_test_write_all(fd, "HD O1\r\n", 7);
            }
            if (mode != FAKE_GOOD) {
                flash_test_drain_until_eof(fd);
                return;
            }
            size_t used = (size_t)(end + 2 - buf);
            memmove(buf, buf + used, len - used + 1);
            len -= used;
        }
    }
}

/* A pool of [real memcached, fake]: the fake's keys get `want`, the real
   server's keys are unaffected; then the next op finds the fake recovered. */
static void misbehaving_server(int mode, int want, bool marks_down) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    int modes[1] = {mode};
    flash_test_fake f;
    flash_test_fake_start(&f, fake_serve, modes, 1, FAKE_GOOD);
    flash_poll *p = flash_poll_create();
    uint16_t ports[2] = {s.port, f.port};
    opts o = {2000, 0, 1000, 0};
    flash_cache c = make_cache(p, ports, 2, &o);
    enum { N = 40 };
    flash_cache_item it[N];
    char keys[N][32];
    flash_cache_op op;
    int done, on_fake = 0;
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "f:%d", i);
        kv(&it[i], keys[i], keys[i]);
    }
    /* fill the real server directly */
    for (int i = 0; i < N; i++) {
        char cmd[96], buf[64];
        snprintf(cmd, sizeof cmd, "set %s 0 0 %zu\r\n%s\r\n", keys[i], strlen(keys[i]), keys[i]);
        cr_assert_gt(flash_test_memcached_command(&s, cmd, buf, sizeof buf), 0);
    }
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) key(&it[i], keys[i]);
        op_init(&op, FLASH_CACHE_GET, it, N, &done);
        run(p, c, &op);
        for (int i = 0; i < N; i++) {
            if (flash_memcached_server_for_key(c, keys[i], strlen(keys[i])) == 1) {
                int expect = round == 0 ? want : (round == 1 && marks_down) ? FLASH_EBACKEND : FLASH_ENOTFOUND;
                cr_assert_eq(it[i].status, expect, "round %d key %s: %d", round, keys[i], it[i].status);
                on_fake += round == 0;
            } else {
                assert_value(&it[i], keys[i]);
            }
        }
        if (round == 1 && marks_down) flash_test_sleep_ms(1100);
    }
    cr_assert_gt(on_fake, 0);
    flash_memcached_stats st = mstats(c, 1);
    cr_assert_eq(st.connects, 2);
    cr_assert_eq(st.reconnects, 1);
    cr_assert_eq(st.proto_errors, want == FLASH_EPROTO);
    cr_assert_eq(mstats(c, 0).connects, 1);
    cr_assert_eq(mstats(c, 0).proto_errors, 0);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_fake_stop(&f);
    cr_assert_eq(f.conns, 2);
    flash_test_server_stop(&s);
}

MC_TEST(garbage_reply_is_eproto_and_reconnects) {
    misbehaving_server(FAKE_GARBAGE, FLASH_EPROTO, false);
}

MC_TEST(value_longer_than_announced_is_eproto) {
    misbehaving_server(FAKE_LONGER_VALUE, FLASH_EPROTO, false);
}

MC_TEST(value_for_a_key_not_asked_is_eproto) {
    misbehaving_server(FAKE_UNASKED_KEY, FLASH_EPROTO, false);
}

MC_TEST(reply_line_without_end_is_eproto) {
    misbehaving_server(FAKE_NO_NEWLINE, FLASH_EPROTO, false);
}

MC_TEST(close_mid_value_is_ebackend_and_marks_down) {
    misbehaving_server(FAKE_CLOSE_MID_VALUE, FLASH_EBACKEND, true);
}

MC_TEST(unsolicited_reply_resets_the_connection) {
    int modes[1] = {FAKE_UNSOLICITED};
    flash_test_fake f;
    flash_test_fake_start(&f, fake_serve, modes, 1, FAKE_GOOD);
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache(p, &f.port, 1, NULL);
    flash_cache_item it;
    flash_cache_op op;
    int done;
    key(&it, "k");
    op_init(&op, FLASH_CACHE_GET, &it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it.status, FLASH_ENOTFOUND);
    int64_t start = flash_test_now_ms();
    while (mstats(c, 0).proto_errors == 0 && flash_test_now_ms() - start < 5000) flash_poll_run_once(p, false);
    cr_assert_eq(mstats(c, 0).proto_errors, 1);
    cr_assert(!mstats(c, 0).down);
    op_init(&op, FLASH_CACHE_GET, &it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it.status, FLASH_ENOTFOUND);
    cr_assert_eq(mstats(c, 0).reconnects, 1);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_fake_stop(&f);
    cr_assert_eq(f.conns, 2);
}

/* ---- cancel and destroy ------------------------------------------------------------- */

MC_TEST(cancel_never_calls_done_nor_touches_the_op) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_op *op = (flash_cache_op *)calloc(1, sizeof *op);
    flash_cache_item *it = (flash_cache_item *)calloc(100, sizeof *it);
    flash_cache_item tail;
    flash_cache_op after;
    int done, after_done;
    static char keys[100][16];
    for (int i = 0; i < 100; i++) {
        snprintf(keys[i], sizeof keys[i], "c:%d", i);
        kv(&it[i], keys[i], "value");
    }
    op_init(op, FLASH_CACHE_SET, it, 100, &done);
    run(p, c, op);
    for (int i = 0; i < 100; i++) key(&it[i], keys[i]);
    op_init(op, FLASH_CACHE_GET, it, 100, &done);
    submit(p, c, op);
    c.vt->cancel(c.self, op);
    free(it); /* the backend must never touch these again (ASan) */
    free(op);
    /* an op queued behind it on the same connection: when it is done, the
       cancelled op's replies were read and thrown away */
    key(&tail, keys[5]);
    op_init(&after, FLASH_CACHE_GET, &tail, 1, &after_done);
    run(p, c, &after);
    assert_value(&tail, "value");
    cr_assert_eq(done, 0);

    /* cancelled after its replies are in but before done ran */
    flash_cache_item bad;
    key(&bad, "bad key");
    flash_cache_op op2;
    op_init(&op2, FLASH_CACHE_GET, &bad, 1, &done);
    submit(p, c, &op2);
    c.vt->cancel(c.self, &op2);
    c.vt->cancel(c.self, &op2); /* twice: harmless */
    for (int i = 0; i < 5; i++) flash_poll_run_once(p, false);
    cr_assert_eq(done, 0);
    cr_assert_eq(mstats(c, 0).proto_errors, 0);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

typedef struct seen {
    int calls;
    int status;
    int item_status;
} seen;

static void record_done(flash_cache_op *op) {
    seen *s = (seen *)op->data;
    s->calls++;
    s->status = op->status;
    s->item_status = op->items[0].status;
}

MC_TEST(destroy_completes_ops_in_flight_with_ecanceled) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_item warm;
    flash_cache_op op;
    int done;
    kv(&warm, "w", "1");
    op_init(&op, FLASH_CACHE_SET, &warm, 1, &done);
    run(p, c, &op); /* connected */

    flash_test_server_pause(&s, true);
    flash_cache_item it[4];
    flash_cache_op ops[4];
    seen seen_[4];
    memset(seen_, 0, sizeof seen_);
    const char *keys[4] = {"a", "b", "c", "bad key"};
    for (int i = 0; i < 4; i++) {
        kv(&it[i], keys[i], "v");
        memset(&ops[i], 0, sizeof ops[i]);
        ops[i].code = i == 1 ? FLASH_CACHE_SET : FLASH_CACHE_GET;
        ops[i].items = &it[i];
        ops[i].count = 1;
        ops[i].done = record_done;
        ops[i].data = &seen_[i];
        c.vt->submit(c.self, flash_poll_loop(p), &ops[i]);
    }
    c.vt->cancel(c.self, &ops[2]);
    for (int i = 0; i < 3; i++) flash_poll_run_once(p, false);
    /* op 3 (bad key only) is already done; 0 and 1 wait on the stopped server */
    cr_assert_eq(seen_[3].calls, 1);
    cr_assert_eq(seen_[3].item_status, FLASH_EINVAL);
    cr_assert_eq(seen_[0].calls, 0);
    flash_cache_destroy(c);
    cr_assert_eq(seen_[0].calls, 1);
    cr_assert_eq(seen_[0].status, FLASH_ECANCELED);
    cr_assert_eq(seen_[0].item_status, FLASH_ECANCELED);
    cr_assert_eq(seen_[1].calls, 1);
    cr_assert_eq(seen_[1].item_status, FLASH_ECANCELED);
    cr_assert_eq(seen_[2].calls, 0);
    cr_assert_eq(seen_[3].calls, 1);
    flash_poll_run_once(p, false);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

MC_TEST(destroy_delivers_finished_ops_and_cancels_while_connecting) {
    static flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, NULL));
    flash_test_server *sp = &s;
    flash_poll *p = flash_poll_create();
    flash_cache c = make_cache_on(p, &sp, 1, NULL);
    flash_cache_item it[2];
    flash_cache_op ops[2];
    seen seen_[2];
    memset(seen_, 0, sizeof seen_);
    key(&it[0], "");     /* finished at once: done pending on the loop */
    key(&it[1], "fine"); /* connecting */
    for (int i = 0; i < 2; i++) {
        memset(&ops[i], 0, sizeof ops[i]);
        ops[i].code = FLASH_CACHE_GET;
        ops[i].items = &it[i];
        ops[i].count = 1;
        ops[i].done = record_done;
        ops[i].data = &seen_[i];
        c.vt->submit(c.self, flash_poll_loop(p), &ops[i]);
    }
    cr_assert_eq(seen_[0].calls + seen_[1].calls, 0);
    flash_cache_destroy(c);
    cr_assert_eq(seen_[0].calls, 1);
    cr_assert_eq(seen_[0].status, 0);
    cr_assert_eq(seen_[0].item_status, FLASH_EINVAL);
    cr_assert_eq(seen_[1].calls, 1);
    cr_assert_eq(seen_[1].item_status, FLASH_ECANCELED);
    flash_poll_run_once(p, false);
    flash_poll_destroy(p);
    flash_test_server_stop(&s);
}

/* ---- the reply parser, on its own --------------------------------------------------- */

MC_TEST(parser_handles_any_chunking) {
    const char stream[] = "VA 5 O1 f7 c99\r\nhe\r\no\r\nEN O2\r\nHD O3 k\r\nVA 0 O4\r\n\r\nNS O5\r\nEX O6\r\n"
                          "NF O7\r\nSERVER_ERROR object too large for cache\r\nCLIENT_ERROR bad\r\nERROR\r\nMN\r\n"
                          "VALUE user:1 7 5 99\r\nhe\r\no\r\nVALUE k 0 0\r\n\r\nEND\r\n";
    const int kinds[] = {FLASH_MEMCACHED_VA, FLASH_MEMCACHED_EN, FLASH_MEMCACHED_HD, FLASH_MEMCACHED_VA,
                         FLASH_MEMCACHED_NS, FLASH_MEMCACHED_EX, FLASH_MEMCACHED_NF,
                         FLASH_MEMCACHED_SERVER_ERROR, FLASH_MEMCACHED_CLIENT_ERROR, FLASH_MEMCACHED_ERROR,
                         FLASH_MEMCACHED_MN, FLASH_MEMCACHED_VALUE, FLASH_MEMCACHED_VALUE, FLASH_MEMCACHED_END};
    const size_t total = sizeof stream - 1, nk = sizeof kinds / sizeof kinds[0];
    flash_memcached_reply r;
    /* whole buffer */
    size_t off = 0, k = 0;
    while (off < total) {
        ptrdiff_t n = flash_memcached_parse(stream + off, total - off, 1024, &r);
        cr_assert_gt(n, 0);
        cr_assert_eq(r.kind, kinds[k]);
        if (k == 0) {
            cr_assert(r.has_opaque && r.has_flags && r.has_cas);
            cr_assert_eq(r.opaque, 1);
            cr_assert_eq(r.flags, 7);
            cr_assert_eq(r.cas, 99);
            cr_assert_eq(r.value_len, 5);
            cr_assert_eq(memcmp(r.value, "he\r\no", 5), 0);
        }
        if (kinds[k] == FLASH_MEMCACHED_SERVER_ERROR)
            cr_assert_eq(strncmp(r.message, "object too large", 16), 0);
        if (k == 11) { /* the text protocol's VALUE: key, flags, length, cas */
            cr_assert(r.key_len == 6 && memcmp(r.key, "user:1", 6) == 0);
            cr_assert(r.has_flags && r.has_cas && !r.has_opaque);
            cr_assert_eq(r.flags, 7);
            cr_assert_eq(r.cas, 99);
            cr_assert_eq(r.value_len, 5);
            cr_assert_eq(memcmp(r.value, "he\r\no", 5), 0);
        }
        if (k == 12) cr_assert(r.key_len == 1 && !r.has_cas && r.value_len == 0);
        off += (size_t)n;
        k++;
    }
    cr_assert_eq(k, nk);
    /* fed byte by byte: never a reply before all of it is there */
    char *buf = (char *)malloc(total);
    size_t have = 0;
    off = 0;
    k = 0;
    for (size_t i = 0; i < total; i++) {
        buf[have++] = stream[i];
        for (;;) {
            ptrdiff_t n = flash_memcached_parse(buf + off, have - off, 1024, &r);
            cr_assert_geq(n, 0);
            if (n == 0) break;
            cr_assert_eq(r.kind, kinds[k]);
            off += (size_t)n;
            k++;
        }
    }
    cr_assert_eq(k, nk);
    cr_assert_eq(off, total);
    free(buf);
    /* split at every point */
    for (size_t cut = 1; cut < total; cut++) {
        ptrdiff_t n = flash_memcached_parse(stream, cut, 1024, &r);
        cr_assert(n == 0 || (n > 0 && (size_t)n <= cut));
    }
}

/* A VALUE line by its rules, written out plainly: the reference for the
   parser's one-pass path. "VALUE", then 3 or 4 tokens, each after exactly
   one space and none empty; a key of 1..250 bytes, none a control byte or
   DEL; flags <= 2^32-1, bytes <= 2^40, cas <= 2^64-1, decimal digits only
   (leading zeros allowed). */
typedef struct ref_value {
    const char *key;
    size_t key_len;
    uint64_t flags, bytes, cas;
    bool has_cas;
} ref_value;

static bool ref_dec(const char *s, size_t n, const char *max, uint64_t *out) {
    size_t mlen = strlen(max);
    uint64_t v = 0;
    if (!n) return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return false;
    while (n > 1 && *s == '0') s++, n--;
    if (n > mlen || (n == mlen && memcmp(s, max, n) > 0)) return false;
    for (size_t i = 0; i < n; i++) v = v * 10 + (uint64_t)(s[i] - '0');
    *out = v;
    return true;
}

static bool ref_value_line(const char *line, size_t n, ref_value *out) {
    const char *tok[4];
    size_t len[4], nt = 0, i = 5;
    if (n < 5 || memcmp(line, "VALUE", 5) != 0) return false;
    while (i < n) {
        size_t st;
        if (line[i] != ' ') return false;
        st = ++i;
        while (i < n && line[i] != ' ') i++;
        if (i == st || nt == 4) return false;
        tok[nt] = line + st;
        len[nt++] = i - st;
    }
    if (nt < 3 || len[0] > 250) return false;
    for (size_t k = 0; k < len[0]; k++)
        if ((unsigned char)tok[0][k] < ' ' || (unsigned char)tok[0][k] == 127) return false;
    out->key = tok[0];
    out->key_len = len[0];
    out->has_cas = nt == 4;
    out->cas = 0;
    return ref_dec(tok[1], len[1], "4294967295", &out->flags) && ref_dec(tok[2], len[2], "1099511627776", &out->bytes) &&
           (nt == 3 || ref_dec(tok[3], len[3], "18446744073709551615", &out->cas));
}

static uint64_t prng_state = 0x9E3779B97F4A7C15ull;
static uint64_t prng(void) { /* splitmix64 */
    uint64_t z = (prng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* One parse of line + "\r\n" (+ its data block when the reference takes it)
   against the reference. */
static void check_value_line(const char *line, size_t n, size_t max_value) {
    static char buf[8192];
    flash_memcached_reply r;
    ref_value want;
    bool ok = ref_value_line(line, n, &want);
    size_t len = n + 2, header = n + 2;
    cr_assert_lt(n + 2 + 64 + 2, sizeof buf);
    memcpy(buf, line, n);
    memcpy(buf + n, "\r\n", 2);
    if (ok && want.bytes <= 64) {
        for (size_t i = 0; i < want.bytes; i++) buf[len++] = "ab\r\n \0x"[prng() % 7]; /* "\r\n" inside too */
        memcpy(buf + len, "\r\n", 2);
        len += 2;
    }
    ptrdiff_t k = flash_memcached_parse(buf, len, max_value, &r);
    if (!ok) {
        cr_assert_eq(k, FLASH_EPROTO, "accepted: %.*s", (int)n, line);
        return;
    }
    cr_assert_eq(r.kind, FLASH_MEMCACHED_VALUE, "%.*s", (int)n, line);
    cr_assert(r.key == buf + (want.key - line) && r.key_len == want.key_len, "%.*s", (int)n, line);
    cr_assert(r.has_flags && r.flags == want.flags && r.value_len == want.bytes, "%.*s", (int)n, line);
    cr_assert(r.has_cas == want.has_cas && r.cas == want.cas && !r.has_opaque, "%.*s", (int)n, line);
    if (want.bytes > max_value) {
        cr_assert(k == (ptrdiff_t)header && r.skip && !r.value, "%.*s", (int)n, line);
    } else if (want.bytes > 64) {
        cr_assert_eq(k, 0, "%.*s", (int)n, line); /* the data block is not there yet */
    } else {
        cr_assert_eq(k, (ptrdiff_t)len, "%.*s", (int)n, line);
        cr_assert(r.value == buf + header && !r.skip);
        /* the line alone, and every cut of the block: more is needed */
        cr_assert_eq(flash_memcached_parse(buf, header, max_value, &r), 0);
        cr_assert_eq(flash_memcached_parse(buf, len - 1, max_value, &r), 0);
    }
}

MC_TEST(parser_value_lines_follow_the_token_rules) {
    static const char *const lines[] = {
        "VALUE k 0 0", "VALUE k 0 0 0", "VALUE k 4294967295 5 18446744073709551615",
        "VALUE k 4294967296 5", "VALUE k 0 5 18446744073709551616", "VALUE k 0 1099511627776",
        "VALUE k 0 1099511627777", "VALUE k 00000000000000000000000001 00000000000000000000000003 "
        "000000000000000000000000000000007", "VALUE k 0 99999999999999999999", "VALUE k 0 5 9999999999999999999",
        "VALUE k 0 5 99999999999999999999", "VALUE k 0 5 ", "VALUE k 0 5  1", "VALUE k 0 5 1 ", "VALUE k 0 5 1 2",
        "VALUE k 0", "VALUE k 0 ", "VALUE k", "VALUE k ", "VALUE  k 0 1", "VALUE k  0 1", "VALUE k -1 1",
        "VALUE k 0 +1", "VALUE k 0 1x", "VALUE k 0x 1", "VALUE k\x7f 0 1", "VALUE \x7fk 0 1", "VALUE k\x80\xff 0 1",
        "VALUE k\tk 0 1", "VALUE k\rk 0 1", "VALUE", "VALUE ", "VALUE\x01k 0 1", "VALUEk 0 1",
    };
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
        check_value_line(lines[i], strlen(lines[i]), 1024);
        check_value_line(lines[i], strlen(lines[i]), 3);
    }
    /* keys of 1..260 bytes with a bad byte anywhere, or none */
    char line[600];
    for (size_t klen = 1; klen <= 260; klen++) {
        for (size_t pos = 0; pos <= klen; pos = pos == klen ? pos + 1 : pos + (klen > 40 ? 7 : 1) > klen ? klen
                                                                         : pos + (klen > 40 ? 7 : 1)) {
            memcpy(line, "VALUE ", 6);
            for (size_t j = 0; j < klen; j++) line[6 + j] = (char)('!' + (j * 7) % 94);
            if (pos < klen) line[6 + pos] = (char)"\x01\x7f\t\x1f"[pos % 4];
            int m = snprintf(line + 6 + klen, sizeof line - 6 - klen, " %zu %zu %zu", klen, klen % 9, pos);
            check_value_line(line, 6 + klen + (size_t)m, 1024);
        }
    }
    /* random lines: tokens of digits, key bytes and junk, 1 or 2 spaces */
    static const char alphabet[] = "0123456789 kK:%-_.\x01\x7f\x80\xff\t\r";
    for (int t = 0; t < 200000; t++) {
        size_t n = 6, ntok = 1 + prng() % 5;
        memcpy(line, "VALUE ", 6);
        if (prng() % 16 == 0) n = 5 + prng() % 2; /* "VALUE" or "VALUE " only, or a bad first token */
        for (size_t k = 0; k < ntok && n < 500; k++) {
            uint64_t kind = prng() % 8, len = k == 0 && prng() % 4 == 0 ? 240 + prng() % 20 : prng() % 24;
            if (k) {
                line[n++] = ' ';
                if (prng() % 32 == 0) line[n++] = ' ';
            }
            for (uint64_t j = 0; j < len && n < 560; j++) {
                if (k == 0) line[n++] = prng() % 64 ? (char)('a' + prng() % 26) : alphabet[prng() % (sizeof alphabet - 1)];
                else if (kind < 6) line[n++] = (char)('0' + prng() % (kind < 2 ? 2 : 10));
                else line[n++] = alphabet[prng() % (sizeof alphabet - 1)];
            }
        }
        if (n > 6 && prng() % 64 == 0) line[n++] = ' ';
        check_value_line(line, n, prng() % 2 ? 1024 : 16);
    }
}

MC_TEST(parser_rejects_garbage) {
    static const char *const bad[] = {
        "XX\r\n", "HELLO WORLD\r\n", "VA 3 O1\r\nabcdef\r\n", "VA abc\r\n", "VA\r\n", "HD O1\n",
        "MN extra\r\n", "HD Oabc\r\n", "HD  O1\r\n", "HD O1 \r\n", "VA 3 O1\r\nabcXY", "\r\n",
        "HD O99999999999\r\n", "VA 99999999999999999999 O1\r\n", "HD \x01\r\n",
        "END x\r\n", "VALUE\r\n", "VALUE k 0\r\n", "VALUE k x 1\r\n1\r\n", "VALUE k 0 1 2 3\r\n",
        "VALUE k 0 3 1\r\nabcdef\r\n", "VALUE k  0 1\r\n1\r\n", "VALUE  0 1\r\n1\r\n", "VALUE k\x01 0 1\r\n1\r\n",
    };
    flash_memcached_reply r;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(flash_memcached_parse(bad[i], strlen(bad[i]), 1024, &r), FLASH_EPROTO, "accepted: %s", bad[i]);
    static char longline[5000];
    memset(longline, 'x', sizeof longline);
    cr_assert_eq(flash_memcached_parse(longline, 100, 1024, &r), 0);
    cr_assert_eq(flash_memcached_parse(longline, sizeof longline, 1024, &r), FLASH_EPROTO);
    cr_assert_eq(flash_memcached_parse(NULL, 0, 1024, &r), 0);
    /* over max_value: the header only, the caller skips the block */
    const char big[] = "VA 2000 O3 f1\r\n";
    ptrdiff_t n = flash_memcached_parse(big, strlen(big), 1024, &r);
    cr_assert_eq(n, (ptrdiff_t)strlen(big));
    cr_assert(r.skip);
    cr_assert_eq(r.value_len, 2000);
    cr_assert_null(r.value);
}
