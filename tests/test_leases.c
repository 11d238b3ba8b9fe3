/* Leases and stale-while-revalidate at layer 6 (FLASH_CACHE_CAP_LEASES), the
   same script on every backend that offers them: the memory backend (fake
   clock), memcached (mg N / md I T / ms C) and Redis (Lua), the last two as
   real servers. Each step is one op through the vtable on the poll loop. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/memory.h"
#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "harness.h"
#include "cache_ops.h"

#define LS_TEST(name)                                                        \
    static void ls_body_##name(void);                                        \
    FLASH_TEST(leases, name) {                                               \
        alarm(60);                                                           \
        ls_body_##name();                                                    \
        alarm(0);                                                            \
    }                                                                        \
    static void ls_body_##name(void)

typedef struct fake_clock {
    int64_t now;
} fake_clock;
static int64_t fake_ms(void *ud) { return ((fake_clock *)ud)->now; }

/* One backend under test. */
typedef struct lenv {
    flash_poll *p;
    flash_cache c;
    fake_clock clock;       /* memory: TTLs run on it */
    bool real_time;         /* servers: TTLs need real seconds */
    flash_test_server srv;
} lenv;

enum { MEMORY, MEMCACHED, REDIS };

static void lenv_start(lenv *e, int kind) {
    memset(e, 0, sizeof *e);
    e->p = flash_poll_create();
    cr_assert_not_null(e->p);
    if (kind == MEMORY) {
        flash_memory_desc d;
        memset(&d, 0, sizeof d);
        e->clock.now = 5000000;
        d.clock_ms = fake_ms;
        d.clock_user_data = &e->clock;
        e->c = flash_memory_create(&d);
    } else if (kind == MEMCACHED) {
        flash_memcached_server s;
        flash_memcached_desc d;
        int err = 1;
        cr_assert(flash_test_memcached_start(&e->srv, NULL));
        memset(&d, 0, sizeof d);
        s.host = "127.0.0.1";
        s.port = e->srv.port;
        s.weight = 1;
        d.loop = flash_poll_loop(e->p);
        d.servers = &s;
        d.server_count = 1;
        e->c = flash_memcached_create(&d, &err);
        cr_assert_eq(err, 0);
        e->real_time = true;
    } else {
        flash_redis_desc d;
        int err = 1;
        cr_assert(flash_test_redis_start(&e->srv));
        memset(&d, 0, sizeof d);
        d.loop = flash_poll_loop(e->p);
        d.host = "127.0.0.1";
        d.port = e->srv.port;
        e->c = flash_redis_create(&d, &err);
        cr_assert_eq(err, 0);
        e->real_time = true;
    }
    cr_assert_not_null(e->c.self);
    cr_assert(e->c.vt->caps & FLASH_CACHE_CAP_LEASES, "%s offers no leases", e->c.vt->name);
}

static void lenv_stop(lenv *e) {
    flash_cache_destroy(e->c);
    flash_poll_destroy(e->p);
    if (e->srv.pid) flash_test_server_stop(&e->srv);
}

/* Let seconds pass for the backend's TTLs. */
static void lenv_pass(lenv *e, int ms) {
    if (e->real_time) flash_test_sleep_ms(ms);
    else e->clock.now += ms;
}

static int one(lenv *e, flash_cache_opcode code, flash_cache_item *it) {
    flash_cache_op op;
    int done;
    op_init(&op, code, it, 1, &done);
    run(e->p, e->c, &op);
    cr_assert_eq(op.status, 0, "%s: op status %d", e->c.vt->name, op.status);
    return it->status;
}

static void set(lenv *e, const char *k, const char *v) {
    flash_cache_item it;
    kv(&it, k, v);
    cr_assert_eq(one(e, FLASH_CACHE_SET, &it), FLASH_OK);
}

/* A lease read of k; *it holds the answer. */
static int lease_get(lenv *e, const char *k, uint32_t lease_s, flash_cache_item *it) {
    key(it, k);
    it->lease_s = lease_s;
    return one(e, FLASH_CACHE_GET, it);
}

static int fill(lenv *e, const char *k, const char *v, uint64_t cas) {
    flash_cache_item it;
    kv(&it, k, v);
    it.cas = cas;
    return one(e, FLASH_CACHE_CAS, &it);
}

static int mark_stale(lenv *e, const char *k, uint32_t ttl_s) {
    flash_cache_item it;
    key(&it, k);
    it.ttl_s = ttl_s;
    return one(e, FLASH_CACHE_MARK_STALE, &it);
}

/* ---- the scripts ------------------------------------------------------------- */

/* A miss: the first lease reader wins a stub, the others lose; a plain read
   sees the stub as an empty value; the winner fills by CAS; then a hit with
   no lease. */
static void miss_one_winner(int kind) {
    lenv e;
    flash_cache_item a, b, c;
    lenv_start(&e, kind);
    cr_assert_eq(lease_get(&e, "hot", 10, &a), FLASH_ENOTFOUND);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    cr_assert_neq(a.cas, 0);
    cr_assert(!a.stale);
    /* memcached: whole seconds, plus one (never less than the true value) */
    cr_assert(a.ttl_left_ms > 8000 && a.ttl_left_ms <= 11000, "%s: stub ttl %lld ms", e.c.vt->name,
              (long long)a.ttl_left_ms);
    for (int i = 0; i < 3; i++) { /* every other reader loses while the stub lives */
        cr_assert_eq(lease_get(&e, "hot", 10, &b), FLASH_ENOTFOUND);
        cr_assert_eq(b.lease, FLASH_LEASE_LOST, "%s: reader %d: lease %d", e.c.vt->name, i, b.lease);
    }
    key(&c, "hot");
    cr_assert_eq(one(&e, FLASH_CACHE_GET, &c), FLASH_OK); /* a plain read: the empty stub */
    cr_assert_eq(c.value_len, 0);
    cr_assert_eq(c.lease, FLASH_LEASE_NONE);
    flash_cache_item add; /* a plain fill with add cannot take the winner's place */
    kv(&add, "hot", "intruder");
    cr_assert_eq(one(&e, FLASH_CACHE_ADD, &add), FLASH_ENOTSTORED);
    cr_assert_eq(fill(&e, "hot", "v1", a.cas), FLASH_OK);
    cr_assert_eq(lease_get(&e, "hot", 10, &b), FLASH_OK);
    assert_value(&b, "v1");
    cr_assert_eq(b.lease, FLASH_LEASE_NONE);
    cr_assert(!b.stale);
    cr_assert_eq(b.ttl_left_ms, -1, "%s: a fill without ttl: %lld", e.c.vt->name, (long long)b.ttl_left_ms);
    lenv_stop(&e);
}

/* A write (set, delete, mark stale) between the win and the fill: the late
   fill fails, whatever the write was. */
static void late_fill_fails(int kind) {
    lenv e;
    flash_cache_item a, w;
    lenv_start(&e, kind);
    cr_assert_eq(lease_get(&e, "k1", 10, &a), FLASH_ENOTFOUND);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    set(&e, "k1", "marker");
    cr_assert_eq(fill(&e, "k1", "old", a.cas), FLASH_ENOTSTORED);
    key(&w, "k1");
    cr_assert_eq(one(&e, FLASH_CACHE_GET, &w), FLASH_OK);
    assert_value(&w, "marker");

    cr_assert_eq(lease_get(&e, "k2", 10, &a), FLASH_ENOTFOUND);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    key(&w, "k2");
    cr_assert_eq(one(&e, FLASH_CACHE_DELETE, &w), FLASH_OK);
    cr_assert_eq(fill(&e, "k2", "old", a.cas), FLASH_ENOTFOUND);

    /* the stub itself marked stale (an invalidation that raced the winner):
       the fill fails, and the next lease reader wins the refresh */
    cr_assert_eq(lease_get(&e, "k3", 10, &a), FLASH_ENOTFOUND);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    cr_assert_eq(mark_stale(&e, "k3", 10), FLASH_OK);
    cr_assert_eq(fill(&e, "k3", "old", a.cas), FLASH_ENOTSTORED);
    cr_assert_eq(lease_get(&e, "k3", 10, &w), FLASH_ENOTFOUND);
    cr_assert_eq(w.lease, FLASH_LEASE_WON);
    cr_assert(w.stale);
    cr_assert_eq(fill(&e, "k3", "new", w.cas), FLASH_OK);
    cr_assert_eq(lease_get(&e, "k3", 10, &w), FLASH_OK);
    assert_value(&w, "new");
    cr_assert(!w.stale);
    lenv_stop(&e);
}

/* Stale-while-revalidate: MARK_STALE keeps the value with a new cas; the
   first lease reader wins its refresh, the others are served the stale
   value; the refresh by CAS makes it fresh. */
static void stale_one_refresher(int kind) {
    lenv e;
    flash_cache_item a, b, pl;
    lenv_start(&e, kind);
    cr_assert_eq(mark_stale(&e, "absent", 10), FLASH_ENOTFOUND);
    set(&e, "s", "v1");
    key(&pl, "s");
    cr_assert_eq(one(&e, FLASH_CACHE_GET, &pl), FLASH_OK);
    uint64_t before = pl.cas;
    cr_assert_eq(mark_stale(&e, "s", 4), FLASH_OK);
    key(&pl, "s"); /* a plain read: the value, a new cas, no lease taken */
    cr_assert_eq(one(&e, FLASH_CACHE_GET, &pl), FLASH_OK);
    assert_value(&pl, "v1");
    cr_assert_neq(pl.cas, before);
    cr_assert_eq(fill(&e, "s", "from-before", before), FLASH_ENOTSTORED); /* older than the mark */
    cr_assert_eq(lease_get(&e, "s", 10, &a), FLASH_OK);
    assert_value(&a, "v1");
    cr_assert(a.stale);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    cr_assert_eq(a.cas, pl.cas);
    cr_assert(a.ttl_left_ms > 2000 && a.ttl_left_ms <= 5000, "%s: the mark's ttl %lld ms", e.c.vt->name,
              (long long)a.ttl_left_ms);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(lease_get(&e, "s", 10, &b), FLASH_OK);
        assert_value(&b, "v1");
        cr_assert(b.stale);
        cr_assert_eq(b.lease, FLASH_LEASE_LOST);
    }
    cr_assert_eq(fill(&e, "s", "v2", a.cas), FLASH_OK);
    cr_assert_eq(lease_get(&e, "s", 10, &b), FLASH_OK);
    assert_value(&b, "v2");
    cr_assert(!b.stale);
    cr_assert_eq(b.lease, FLASH_LEASE_NONE);
    lenv_stop(&e);
}

/* A second write while a refresh is out: the refresh (read before it) fails,
   and a new reader wins the next refresh. */
static void refresh_loses_to_newer_write(int kind) {
    lenv e;
    flash_cache_item a, b;
    lenv_start(&e, kind);
    set(&e, "s", "v1");
    cr_assert_eq(mark_stale(&e, "s", 10), FLASH_OK);
    cr_assert_eq(lease_get(&e, "s", 10, &a), FLASH_OK);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    cr_assert_eq(mark_stale(&e, "s", 10), FLASH_OK); /* the newer write */
    cr_assert_eq(lease_get(&e, "s", 10, &b), FLASH_OK);
    cr_assert_eq(b.lease, FLASH_LEASE_WON);
    cr_assert(b.stale);
    cr_assert_neq(b.cas, a.cas);
    cr_assert_eq(fill(&e, "s", "read-before", a.cas), FLASH_ENOTSTORED);
    cr_assert_eq(fill(&e, "s", "read-after", b.cas), FLASH_OK);
    cr_assert_eq(lease_get(&e, "s", 10, &b), FLASH_OK);
    assert_value(&b, "read-after");
    lenv_stop(&e);
}

/* A winner that never fills: the stub's lifetime bounds it, then a new
   reader wins. A stale value nobody refreshes is gone after its ttl. */
static void crashed_winner_expires(int kind) {
    lenv e;
    flash_cache_item a, b;
    lenv_start(&e, kind);
    cr_assert_eq(lease_get(&e, "c", 1, &a), FLASH_ENOTFOUND);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    cr_assert_eq(lease_get(&e, "c", 1, &b), FLASH_ENOTFOUND);
    cr_assert_eq(b.lease, FLASH_LEASE_LOST);
    set(&e, "st", "v1");
    cr_assert_eq(mark_stale(&e, "st", 1), FLASH_OK);
    cr_assert_eq(lease_get(&e, "st", 10, &a), FLASH_OK);
    cr_assert_eq(a.lease, FLASH_LEASE_WON);
    lenv_pass(&e, 2200); /* memcached's clock ticks in whole seconds */
    cr_assert_eq(lease_get(&e, "c", 1, &b), FLASH_ENOTFOUND);
    cr_assert_eq(b.lease, FLASH_LEASE_WON, "%s: the crashed winner's stub outlived its ttl", e.c.vt->name);
    cr_assert_neq(b.cas, a.cas);
    cr_assert_eq(lease_get(&e, "st", 10, &b), FLASH_ENOTFOUND); /* the stale value is gone: a new stub */
    cr_assert_eq(b.lease, FLASH_LEASE_WON);
    cr_assert(!b.stale);
    lenv_stop(&e);
}

/* One GET op mixing plain and lease reads, hits and misses: each item gets
   its own answer, in place. */
static void mixed_op(int kind) {
    lenv e;
    flash_cache_item it[5];
    flash_cache_op op;
    int done;
    lenv_start(&e, kind);
    set(&e, "p-hit", "one");
    set(&e, "l-hit", "two");
    set(&e, "l-stale", "three");
    cr_assert_eq(mark_stale(&e, "l-stale", 10), FLASH_OK);
    key(&it[0], "l-miss");
    it[0].lease_s = 10;
    key(&it[1], "p-hit");
    key(&it[2], "l-hit");
    it[2].lease_s = 10;
    key(&it[3], "p-miss");
    key(&it[4], "l-stale");
    it[4].lease_s = 10;
    op_init(&op, FLASH_CACHE_GET, it, 5, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.status, 0);
    cr_assert_eq(op.round_trips, 1);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND, "%s: status %d", e.c.vt->name, it[0].status);
    cr_assert_eq(it[0].lease, FLASH_LEASE_WON);
    assert_value(&it[1], "one");
    cr_assert_eq(it[1].lease, FLASH_LEASE_NONE);
    assert_value(&it[2], "two");
    cr_assert_eq(it[2].lease, FLASH_LEASE_NONE);
    cr_assert(!it[2].stale);
    cr_assert_eq(it[3].status, FLASH_ENOTFOUND);
    cr_assert_eq(it[3].lease, FLASH_LEASE_NONE);
    assert_value(&it[4], "three");
    cr_assert(it[4].stale);
    cr_assert_eq(it[4].lease, FLASH_LEASE_WON);
    /* twice in one op: the first wins, the second loses */
    key(&it[0], "twice");
    it[0].lease_s = 10;
    key(&it[1], "twice");
    it[1].lease_s = 10;
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(it[0].lease, FLASH_LEASE_WON);
    cr_assert_eq(it[1].lease, FLASH_LEASE_LOST);
    cr_assert_eq(it[0].cas, it[1].cas);
    lenv_stop(&e);
}

#define ALL(script)                                                          \
    LS_TEST(script##_memory) { script(MEMORY); }                             \
    LS_TEST(script##_memcached) { script(MEMCACHED); }                       \
    LS_TEST(script##_redis) { script(REDIS); }

ALL(miss_one_winner)
ALL(late_fill_fails)
ALL(stale_one_refresher)
ALL(refresh_loses_to_newer_write)
ALL(crashed_winner_expires)
ALL(mixed_op)

/* The memcached wire: W/X/Z parsed as returned flags, nothing else. */
LS_TEST(memcached_parser_reads_lease_flags) {
    flash_memcached_reply r;
    const char *s = "VA 2 c7 f0 t-1 W X\r\nab\r\n";
    cr_assert_eq(flash_memcached_parse(s, strlen(s), 100, &r), (ptrdiff_t)strlen(s));
    cr_assert(r.win && r.stale && !r.lost && r.cas == 7);
    cr_assert(r.has_ttl && r.ttl == -1);
    s = "VA 0 c8 t42 Z\r\n\r\n";
    cr_assert_eq(flash_memcached_parse(s, strlen(s), 100, &r), (ptrdiff_t)strlen(s));
    cr_assert(r.has_ttl && r.ttl == 42 && r.lost);
    s = "VA 0 c8 f0 Z\r\n\r\n";
    cr_assert_eq(flash_memcached_parse(s, strlen(s), 100, &r), (ptrdiff_t)strlen(s));
    cr_assert(!r.win && !r.stale && r.lost);
    s = "VA 0 c8 Wx\r\n\r\n";
    cr_assert_eq(flash_memcached_parse(s, strlen(s), 100, &r), FLASH_EPROTO);
}

/* An opcode past MARK_STALE is refused, per item. */
LS_TEST(unknown_opcode_refused) {
    lenv e;
    flash_cache_item it;
    flash_cache_op op;
    int done;
    lenv_start(&e, MEMCACHED);
    key(&it, "x");
    op_init(&op, (flash_cache_opcode)(FLASH_CACHE_MARK_STALE + 1), &it, 1, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(it.status, FLASH_EINVAL);
    lenv_stop(&e);
}

/* ---- the gutter pool (memcached) ------------------------------------------------ */

/* Three servers and a gutter server; one server is killed. The op that finds
   it dead fails its keys; then its keys' reads and fills go to the gutter
   (TTLs capped), invalidations and INCR fail fast and never reach it, the
   other servers' keys are untouched, and reads of the gutter's values hit. */
LS_TEST(gutter_takes_a_dead_servers_reads_and_fills) {
    static flash_test_server s[4]; /* s[3]: the gutter */
    for (int i = 0; i < 4; i++) cr_assert(flash_test_memcached_start(&s[i], NULL));
    flash_poll *p = flash_poll_create();
    flash_memcached_server servers[3], gutter[1];
    for (int i = 0; i < 3; i++) servers[i] = (flash_memcached_server){"127.0.0.1", s[i].port, 1};
    gutter[0] = (flash_memcached_server){"127.0.0.1", s[3].port, 1};
    flash_memcached_desc d;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(p);
    d.servers = servers;
    d.server_count = 3;
    d.gutter = gutter;
    d.gutter_count = 1;
    d.gutter_ttl_s = 7;
    d.retry_interval_ms = 60000;
    int err = 1;
    flash_cache c = flash_memcached_create(&d, &err);
    cr_assert_eq(err, 0);
    /* a key on server 0 (the one to die) and one on another server */
    char dead_key[32] = "", live_key[32] = "";
    for (int i = 0; i < 1000 && (!dead_key[0] || !live_key[0]); i++) {
        char k[32];
        snprintf(k, sizeof k, "g:%d", i);
        int srv = flash_memcached_server_for_key(c, k, strlen(k));
        if (srv == 0 && !dead_key[0]) strcpy(dead_key, k);
        if (srv != 0 && !live_key[0]) strcpy(live_key, k);
    }
    flash_cache_item it[2];
    flash_cache_op op;
    int done;
    kv(&it[0], dead_key, "before");
    kv(&it[1], live_key, "live");
    op_init(&op, FLASH_CACHE_SET, it, 2, &done);
    run(p, c, &op);
    cr_assert(it[0].status == FLASH_OK && it[1].status == FLASH_OK);

    flash_test_server_stop(&s[0]);
    key(&it[0], dead_key); /* finds it dead: fails, marks it down */
    key(&it[1], live_key);
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert(it[0].status == FLASH_EBACKEND || it[0].status == FLASH_ETIMEDOUT, "status %d", it[0].status);
    assert_value(&it[1], "live");
    flash_memcached_stats st;
    cr_assert_eq(flash_memcached_server_stats(c, 0, &st), 0);
    cr_assert(st.down);

    key(&it[0], dead_key); /* now the gutter: a miss, then an add with no expiry */
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    kv(&it[0], dead_key, "filled");
    op_init(&op, FLASH_CACHE_ADD, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_OK);
    key(&it[0], dead_key);
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    assert_value(&it[0], "filled");
    char cmd[96], buf[512];
    snprintf(cmd, sizeof cmd, "mg %s t v\r\n", dead_key); /* on the gutter, with the capped TTL */
    cr_assert_gt(flash_test_memcached_command(&s[3], cmd, buf, sizeof buf), 0);
    int ttl = -2;
    char *t = strstr(buf, " t");
    cr_assert_not_null(t, "gutter reply: %s", buf);
    ttl = atoi(t + 2);
    cr_assert(ttl > 0 && ttl <= 7, "gutter ttl %d", ttl);
    /* a lease read of another of its keys there too: a stub with the capped TTL */
    char lease_key[32];
    for (int i = 0;; i++) {
        snprintf(lease_key, sizeof lease_key, "gl:%d", i);
        if (flash_memcached_server_for_key(c, lease_key, strlen(lease_key)) == 0) break;
    }
    key(&it[0], lease_key);
    it[0].lease_s = 100;
    op_init(&op, FLASH_CACHE_GET, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    cr_assert_eq(it[0].lease, FLASH_LEASE_WON);
    snprintf(cmd, sizeof cmd, "mg %s t\r\n", lease_key);
    cr_assert_gt(flash_test_memcached_command(&s[3], cmd, buf, sizeof buf), 0);
    t = strstr(buf, " t");
    cr_assert(t && atoi(t + 2) > 0 && atoi(t + 2) <= 7, "gutter stub: %s", buf);
    snprintf(cmd, sizeof cmd, "mg %s t v\r\n", dead_key);
    /* invalidations and INCR do not go to the gutter */
    key(&it[0], dead_key);
    op_init(&op, FLASH_CACHE_DELETE, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    key(&it[0], dead_key);
    it[0].ttl_s = 5;
    op_init(&op, FLASH_CACHE_MARK_STALE, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    key(&it[0], dead_key);
    it[0].number = 1;
    op_init(&op, FLASH_CACHE_INCR, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_EBACKEND);
    cr_assert_gt(flash_test_memcached_command(&s[3], cmd, buf, sizeof buf), 0);
    cr_assert_not_null(strstr(buf, "filled"), "the delete reached the gutter: %s", buf);
    cr_assert_eq(flash_memcached_server_stats(c, 0, &st), 0);
    cr_assert_eq(st.gutter_keys, 4, "gutter keys %llu", (unsigned long long)st.gutter_keys);
    cr_assert_eq(st.fast_fails, 3);
    cr_assert_eq(flash_memcached_server_stats(c, 3, &st), 0); /* the gutter server's own counters */
    cr_assert_geq(st.requests, 3);
    cr_assert_eq(flash_memcached_server_stats(c, 4, &st), FLASH_EINVAL);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    for (int i = 1; i < 4; i++) flash_test_server_stop(&s[i]);
}

LS_TEST(gutter_desc_is_checked) {
    flash_poll *p = flash_poll_create();
    flash_memcached_server servers[1] = {{"127.0.0.1", 1, 1}}, bad[1] = {{"", 2, 1}};
    flash_memcached_desc d;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(p);
    d.servers = servers;
    d.server_count = 1;
    d.gutter_count = 1; /* no list */
    int err = 0;
    flash_cache c = flash_memcached_create(&d, &err);
    cr_assert(!c.self && err == FLASH_EINVAL);
    d.gutter = bad; /* an empty host */
    c = flash_memcached_create(&d, &err);
    cr_assert(!c.self && err == FLASH_EINVAL);
    flash_poll_destroy(p);
}
