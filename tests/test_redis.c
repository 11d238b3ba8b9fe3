/* The Redis backend: its RESP parser alone, then the backend against a real
   redis-server (and a fake server for bad replies), driven directly through
   the layer-6 vtable on the poll loop. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/redis.h"
#include "harness.h"
#include "cache_ops.h"

/* A FLASH_TEST with a watchdog: a hung test dies by SIGALRM in its own worker. */
#define RD_TEST(name)                                                        \
    static void rd_body_##name(void);                                        \
    FLASH_TEST(redis, name) {                                                \
        alarm(60);                                                           \
        rd_body_##name();                                                    \
        alarm(0);                                                            \
    }                                                                        \
    static void rd_body_##name(void)

/* ---- the parser ----------------------------------------------------------- */

static ptrdiff_t parse(const char *s, size_t max, flash_redis_reply *r) {
    return flash_redis_parse(s, strlen(s), max, r);
}

RD_TEST(parser_reads_every_type) {
    flash_redis_reply r;
    cr_assert_eq(parse("+OK\r\n", 100, &r), 5);
    cr_assert(r.kind == FLASH_REDIS_SIMPLE && r.len == 2 && memcmp(r.str, "OK", 2) == 0);
    cr_assert_eq(parse("+\r\n", 100, &r), 3);
    cr_assert(r.kind == FLASH_REDIS_SIMPLE && r.len == 0);
    cr_assert_eq(parse("-ERR wrong type\r\n", 100, &r), 17);
    cr_assert(r.kind == FLASH_REDIS_ERROR && r.len == 14 && memcmp(r.str, "ERR wrong type", 14) == 0);
    cr_assert_eq(parse(":42\r\n", 100, &r), 5);
    cr_assert(r.kind == FLASH_REDIS_INTEGER && r.integer == 42);
    cr_assert_eq(parse(":-9223372036854775808\r\n", 100, &r), 23);
    cr_assert(r.kind == FLASH_REDIS_INTEGER && r.integer == INT64_MIN);
    cr_assert_eq(parse(":9223372036854775807\r\n", 100, &r), 22);
    cr_assert(r.integer == INT64_MAX);
    cr_assert_eq(parse("$5\r\nhe\r\no\r\n", 100, &r), 11); /* binary-safe */
    cr_assert(r.kind == FLASH_REDIS_BULK && r.len == 5 && memcmp(r.str, "he\r\no", 5) == 0);
    cr_assert_eq(parse("$0\r\n\r\n", 100, &r), 6);
    cr_assert(r.kind == FLASH_REDIS_BULK && r.len == 0 && r.str);
    cr_assert_eq(parse("$-1\r\n", 100, &r), 5);
    cr_assert_eq(r.kind, FLASH_REDIS_NIL);
    cr_assert_eq(parse("*-1\r\n", 100, &r), 5);
    cr_assert_eq(r.kind, FLASH_REDIS_NIL);
    cr_assert_eq(parse("*0\r\n", 100, &r), 4);
    cr_assert(r.kind == FLASH_REDIS_ARRAY && r.integer == 0);
    /* a nested reply, walked element by element with a running count */
    const char *nested = "*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n+x\r\n";
    size_t off = 0, len = strlen(nested);
    int64_t left = 1;
    int kinds[8], n = 0;
    while (left > 0) {
        ptrdiff_t k = flash_redis_parse(nested + off, len - off, 100, &r);
        cr_assert_gt(k, 0);
        off += (size_t)k;
        kinds[n++] = r.kind;
        left += (r.kind == FLASH_REDIS_ARRAY ? r.integer : 0) - 1;
    }
    cr_assert_eq(off, len);
    cr_assert_eq(n, 6);
    cr_assert(kinds[0] == FLASH_REDIS_ARRAY && kinds[1] == FLASH_REDIS_BULK && kinds[2] == FLASH_REDIS_ARRAY &&
              kinds[3] == FLASH_REDIS_INTEGER && kinds[4] == FLASH_REDIS_NIL && kinds[5] == FLASH_REDIS_SIMPLE);
    cr_assert_eq(flash_redis_parse(NULL, 0, 100, &r), 0);
    cr_assert_eq(flash_redis_parse("", 0, 100, &r), 0);
}

RD_TEST(parser_needs_more_at_every_cut_point) {
    static const char *const full[] = {"+OK\r\n", "-ERR x\r\n", ":123\r\n", "$5\r\nhello\r\n", "$0\r\n\r\n",
                                       "$-1\r\n", "*2\r\n", "*-1\r\n"};
    for (size_t i = 0; i < sizeof full / sizeof full[0]; i++) {
        size_t len = strlen(full[i]);
        flash_redis_reply r;
        for (size_t cut = 0; cut < len; cut++)
            cr_assert_eq(flash_redis_parse(full[i], cut, 100, &r), 0, "%s cut at %zu", full[i], cut);
        cr_assert_eq(flash_redis_parse(full[i], len, 100, &r), (ptrdiff_t)len);
    }
}

RD_TEST(parser_rejects_garbage) {
    static const char *const bad[] = {"?\r\n", "OK\r\n", "+OK\n", "+O\rK\r\n", ":\r\n", ":12a\r\n", ":-\r\n",
                                      ":99999999999999999999\r\n", "$abc\r\n", "$-2\r\n", "$+5\r\n",
                                      "$5\r\nhelloXY", "$5\r\nhello\rX", "*-5\r\n", "*x\r\n", "$\r\n",
                                      "$2199023255553\r\n", "\r\n"};
    flash_redis_reply r;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(parse(bad[i], 100, &r), FLASH_EPROTO, "accepted %s", bad[i]);
    static char line[70000];
    memset(line, 'x', sizeof line);
    line[0] = '+';
    cr_assert_eq(flash_redis_parse(line, sizeof line, 100, &r), FLASH_EPROTO); /* no end of line */
}

RD_TEST(parser_skips_values_over_max_value) {
    flash_redis_reply r;
    cr_assert_eq(parse("$10\r\n0123456789\r\n", 9, &r), 5); /* the header only */
    cr_assert(r.kind == FLASH_REDIS_BULK && r.skip && r.len == 10 && !r.str);
    cr_assert_eq(parse("$10\r\n0123456789\r\n", 10, &r), 17);
    cr_assert(!r.skip);
}

/* ---- helpers ------------------------------------------------------------- */

typedef struct opts {
    uint32_t timeout_ms, connect_timeout_ms, retry_interval_ms;
    size_t max_value;
    const char *password;
    uint32_t db;
} opts;

static flash_cache make_cache(flash_poll *p, uint16_t port, const opts *o) {
    flash_redis_desc d;
    int err = 1;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(p);
    d.host = "127.0.0.1";
    d.port = port;
    if (o) {
        d.timeout_ms = o->timeout_ms;
        d.connect_timeout_ms = o->connect_timeout_ms;
        d.retry_interval_ms = o->retry_interval_ms;
        d.max_value = o->max_value;
        d.password = o->password;
        d.db = o->db;
    }
    flash_cache c = flash_redis_create(&d, &err);
    cr_assert_not_null(c.self, "flash_redis_create failed: %d", err);
    cr_assert_eq(err, 0);
    return c;
}

/* One op of one item; returns its status. */
static int one(flash_poll *p, flash_cache c, flash_cache_opcode code, flash_cache_item *it) {
    flash_cache_op op;
    int done;
    op_init(&op, code, it, 1, &done);
    run(p, c, &op);
    cr_assert_eq(op.status, 0);
    return it->status;
}

static flash_redis_stats rstats(flash_cache c) {
    flash_redis_stats s;
    cr_assert_eq(flash_redis_stats_get(c, &s), 0);
    return s;
}

/* Send inline commands on a fresh blocking connection and read `replies`
   top-level replies; the last one (its first element, for an array) is
   copied into out. Returns its kind, or -1. */
static int redis_raw(uint16_t port, const char *cmds, int replies, char *out, size_t cap) {
    static char buf[1 << 20];
    size_t len = 0, off = 0;
    int fd = flash_test_connect(port), kind = -1;
    struct timeval tv = {3, 0};
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (write(fd, cmds, strlen(cmds)) < 0) replies = 0;
    while (replies > 0) {
        flash_redis_reply r;
        ptrdiff_t n = flash_redis_parse(buf + off, len - off, sizeof buf, &r);
        if (n < 0) break;
        if (n == 0) {
            ssize_t got = read(fd, buf + len, sizeof buf - len);
            if (got <= 0) break;
            len += (size_t)got;
            continue;
        }
        off += (size_t)n;
        if (r.kind == FLASH_REDIS_ARRAY && r.integer > 0) continue; /* its first element */
        if (--replies == 0) {
            kind = r.kind;
            if (out) snprintf(out, cap, "%.*s", r.kind == FLASH_REDIS_INTEGER ? 0 : (int)r.len, r.str ? r.str : "");
            if (out && r.kind == FLASH_REDIS_INTEGER) snprintf(out, cap, "%lld", (long long)r.integer);
        }
    }
    close(fd);
    return kind;
}

/* "calls=N" of one command in INFO commandstats, or -1. */
static long long command_calls(uint16_t port, const char *cmd) {
    static char info[1 << 16];
    char needle[64];
    if (redis_raw(port, "INFO commandstats\r\n", 1, info, sizeof info) != FLASH_REDIS_BULK) return -1;
    snprintf(needle, sizeof needle, "cmdstat_%s:calls=", cmd);
    char *p = strstr(info, needle);
    return p ? atoll(p + strlen(needle)) : 0;
}

typedef struct env {
    flash_test_server s;
    flash_poll *p;
    flash_cache c;
} env;

static void env_start(env *e, const opts *o) {
    cr_assert(flash_test_redis_start(&e->s));
    e->p = flash_poll_create();
    cr_assert_not_null(e->p);
    e->c = make_cache(e->p, e->s.port, o);
}

static void env_stop(env *e) {
    flash_cache_destroy(e->c);
    flash_poll_destroy(e->p);
    flash_test_server_stop(&e->s);
}

static void never_done(flash_cache_op *op) {
    (void)op;
    cr_assert_fail("done called after cancel");
}

/* ---- opcodes ----------------------------------------------------------------- */

RD_TEST(get_set_round_trip_flags_and_cas) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it[3];
    flash_cache_op op;
    int done;
    kv(&it[0], "a", "alpha");
    it[0].flags = 0xDEADBEEFu;
    kv(&it[1], "b", "");
    kv(&it[2], "c", "with\r\nbinary\0");
    it[2].value_len = 13;
    op_init(&op, FLASH_CACHE_SET, it, 3, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 1);
    for (int i = 0; i < 3; i++) cr_assert_eq(it[i].status, FLASH_OK);
    key(&it[0], "a");
    key(&it[1], "b");
    key(&it[2], "missing");
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 1);
    assert_value(&it[0], "alpha");
    cr_assert_eq(it[0].flags, 0xDEADBEEFu);
    cr_assert_neq(it[0].cas, 0);
    assert_value(&it[1], "");
    cr_assert_neq(it[1].cas, it[0].cas);
    cr_assert_eq(it[2].status, FLASH_ENOTFOUND);
    /* a rewrite changes the cas token */
    uint64_t old = it[0].cas;
    kv(&it[0], "a", "beta");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it[0]), FLASH_OK);
    key(&it[0], "a");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it[0]), FLASH_OK);
    assert_value(&it[0], "beta");
    cr_assert_neq(it[0].cas, old);
    key(&it[0], "c");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it[0]), FLASH_OK);
    cr_assert(it[0].value_len == 13 && memcmp(it[0].value, "with\r\nbinary\0", 13) == 0);
    env_stop(&e);
}

RD_TEST(add_cas_delete_statuses) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it;
    kv(&it, "k", "v1");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_ADD, &it), FLASH_OK);
    kv(&it, "k", "v2");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_ADD, &it), FLASH_ENOTSTORED);
    key(&it, "k");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "v1");
    uint64_t cas = it.cas;
    /* cas: matches, then changed, then absent */
    kv(&it, "k", "v3");
    it.cas = cas;
    it.flags = 7;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_CAS, &it), FLASH_OK);
    kv(&it, "k", "v4");
    it.cas = cas;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_CAS, &it), FLASH_ENOTSTORED);
    key(&it, "k");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "v3");
    cr_assert_eq(it.flags, 7);
    cr_assert_neq(it.cas, cas);
    kv(&it, "absent", "x");
    it.cas = cas;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_CAS, &it), FLASH_ENOTFOUND);
    key(&it, "k");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_DELETE, &it), FLASH_OK);
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_DELETE, &it), FLASH_ENOTFOUND);
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_ENOTFOUND);
    env_stop(&e);
}

RD_TEST(incr_create_absent_not_a_number_and_wrap) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it;
    key(&it, "n");
    it.number = 5;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_ENOTFOUND);
    key(&it, "n");
    it.number = 5;
    it.create = true;
    it.initial = 1700000000123ull;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(it.number, 1700000000123ull); /* created with initial */
    key(&it, "n");
    it.number = 2;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(it.number, 1700000000125ull);
    /* GET returns the number as ASCII decimal (how the engine reads versions) */
    key(&it, "n");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "1700000000125");
    cr_assert_neq(it.cas, 0);
    /* 64-bit arithmetic, beyond a double's precision, wrapping like memcached */
    key(&it, "big");
    it.create = true;
    it.initial = UINT64_MAX - 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    key(&it, "big");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(it.number, UINT64_MAX);
    key(&it, "big");
    it.number = 3;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(it.number, 2);
    /* not a number */
    kv(&it, "text", "hello");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    key(&it, "text");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_EINVAL);
    kv(&it, "huge", "99999999999999999999999");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    key(&it, "huge");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_EINVAL);
    /* incr keeps flags and TTL */
    kv(&it, "kept", "10");
    it.flags = 42;
    it.ttl_s = 100;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    key(&it, "kept");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(it.number, 11);
    key(&it, "kept");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "11");
    cr_assert_eq(it.flags, 42);
    char out[64];
    cr_assert_eq(redis_raw(e.s.port, "TTL kept\r\n", 1, out, sizeof out), FLASH_REDIS_INTEGER);
    cr_assert(atoi(out) > 90 && atoi(out) <= 100, "ttl %s", out);
    env_stop(&e);
}

RD_TEST(ttl_expires) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it[3];
    flash_cache_op op;
    int done;
    kv(&it[0], "short", "x");
    it[0].ttl_s = 1;
    kv(&it[1], "forever", "y");
    key(&it[2], "counter");
    it[2].create = true;
    it[2].ttl_s = 1;
    it[2].initial = 1;
    op_init(&op, FLASH_CACHE_SET, it, 2, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it[2]), FLASH_OK);
    kv(&it[0], "added", "z");
    it[0].ttl_s = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_ADD, &it[0]), FLASH_OK);
    flash_test_sleep_ms(2100);
    key(&it[0], "short");
    key(&it[1], "forever");
    key(&it[2], "counter");
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    assert_value(&it[1], "y");
    cr_assert_eq(it[2].status, FLASH_ENOTFOUND);
    key(&it[0], "added");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it[0]), FLASH_ENOTFOUND);
    env_stop(&e);
}

#define NKEYS 1000
static char many_keys[NKEYS][24], many_vals[NKEYS][24];
static flash_cache_item many[NKEYS];

RD_TEST(a_thousand_keys_are_one_request_and_one_mget) {
    env e;
    env_start(&e, NULL);
    flash_cache_op op;
    int done;
    for (int i = 0; i < NKEYS; i++) {
        snprintf(many_keys[i], sizeof many_keys[i], "key:%d", i);
        snprintf(many_vals[i], sizeof many_vals[i], "value %d", i);
        kv(&many[i], many_keys[i], many_vals[i]);
    }
    op_init(&op, FLASH_CACHE_SET, many, NKEYS, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 1);
    for (int i = 0; i < NKEYS; i++) cr_assert_eq(many[i].status, FLASH_OK);
    flash_redis_stats before = rstats(e.c);
    long long mget_before = command_calls(e.s.port, "mget");
    for (int i = 0; i < NKEYS; i++) key(&many[i], many_keys[i]);
    many[NKEYS - 1].key = "key:missing";
    many[NKEYS - 1].key_len = strlen("key:missing");
    op_init(&op, FLASH_CACHE_GET, many, NKEYS, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 1);
    for (int i = 0; i < NKEYS - 1; i++) assert_value(&many[i], many_vals[i]);
    cr_assert_eq(many[NKEYS - 1].status, FLASH_ENOTFOUND);
    flash_redis_stats after = rstats(e.c);
    cr_assert_eq(after.requests - before.requests, 1);
    cr_assert_eq(after.commands - before.commands, 1);
    cr_assert_eq(command_calls(e.s.port, "mget") - mget_before, 1);
    cr_assert_eq(command_calls(e.s.port, "get"), 0);
    cr_assert_eq(after.connects, 1);
    /* deletes: 1000 commands, still one request */
    op_init(&op, FLASH_CACHE_DELETE, many, NKEYS, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 1);
    cr_assert_eq(rstats(e.c).requests - after.requests, 1);
    cr_assert_eq(command_calls(e.s.port, "del"), NKEYS);
    env_stop(&e);
}

RD_TEST(bad_keys_and_values_fail_only_their_item) {
    env e;
    opts o = {0, 0, 0, 100, NULL, 0};
    env_start(&e, &o);
    static char long_key[252], big[101];
    memset(long_key, 'k', 251);
    memset(big, 'v', 101);
    flash_cache_item it[6];
    flash_cache_op op;
    int done;
    kv(&it[0], long_key, "x");
    kv(&it[1], "has space", "x");
    kv(&it[2], "big", "");
    it[2].value = big;
    it[2].value_len = 101;
    kv(&it[3], "good", "fine");
    kv(&it[4], "", "x");
    kv(&it[5], "ctl\x01", "x");
    op_init(&op, FLASH_CACHE_SET, it, 6, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.status, 0);
    cr_assert_eq(it[0].status, FLASH_ETOOLARGE);
    cr_assert_eq(it[1].status, FLASH_EINVAL);
    cr_assert_eq(it[2].status, FLASH_ETOOLARGE);
    cr_assert_eq(it[3].status, FLASH_OK);
    cr_assert_eq(it[4].status, FLASH_EINVAL);
    cr_assert_eq(it[5].status, FLASH_EINVAL);
    /* nothing valid: no I/O at all */
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.round_trips, 0);
    /* a stored value over max_value (written by someone else) is not read,
       and the connection goes on */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "SET huge %0200d\r\n", 0);
    cr_assert_eq(redis_raw(e.s.port, cmd, 1, NULL, 0), FLASH_REDIS_SIMPLE);
    cr_assert_eq(redis_raw(e.s.port, "SET foreign abc\r\n", 1, NULL, 0), FLASH_REDIS_SIMPLE);
    key(&it[0], "huge");
    key(&it[1], "good");
    key(&it[2], "foreign");
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(it[0].status, FLASH_ETOOLARGE);
    assert_value(&it[1], "fine");
    cr_assert_eq(it[2].status, FLASH_EPROTO); /* no flash header */
    cr_assert_eq(rstats(e.c).connects, 1);
    cr_assert_eq(rstats(e.c).proto_errors, 0);
    env_stop(&e);
}

RD_TEST(auth_and_select) {
    env e;
    cr_assert(flash_test_redis_start(&e.s));
    cr_assert_eq(redis_raw(e.s.port, "CONFIG SET requirepass s3cret\r\n", 1, NULL, 0), FLASH_REDIS_SIMPLE);
    e.p = flash_poll_create();
    opts o = {0, 0, 0, 0, "s3cret", 3};
    e.c = make_cache(e.p, e.s.port, &o);
    flash_cache_item it;
    kv(&it, "in3", "x");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    char out[64];
    cr_assert_eq(redis_raw(e.s.port, "AUTH s3cret\r\nSELECT 3\r\nEXISTS in3\r\n", 3, out, sizeof out),
                 FLASH_REDIS_INTEGER);
    cr_assert_str_eq(out, "1");
    cr_assert_eq(redis_raw(e.s.port, "AUTH s3cret\r\nEXISTS in3\r\n", 2, out, sizeof out), FLASH_REDIS_INTEGER);
    cr_assert_str_eq(out, "0");
    /* the server drops the idle connection: the next op reconnects (AUTH and
       SELECT again), without failing */
    cr_assert_eq(redis_raw(e.s.port, "AUTH s3cret\r\nCLIENT KILL TYPE normal\r\n", 2, out, sizeof out),
                 FLASH_REDIS_INTEGER);
    cr_assert_str_eq(out, "1");
    kv(&it, "again3", "x");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    cr_assert_eq(redis_raw(e.s.port, "AUTH s3cret\r\nSELECT 3\r\nEXISTS again3\r\n", 3, out, sizeof out),
                 FLASH_REDIS_INTEGER);
    cr_assert_str_eq(out, "1");
    cr_assert_eq(rstats(e.c).reconnects, 1);
    cr_assert_eq(rstats(e.c).failures, 0);
    flash_cache_destroy(e.c);
    /* a wrong password: the keys fail with EBACKEND, the server is down */
    o.password = "wrong";
    e.c = make_cache(e.p, e.s.port, &o);
    kv(&it, "in3", "y");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_EBACKEND);
    cr_assert(rstats(e.c).down);
    env_stop(&e);
}

RD_TEST(pipelined_ops_answer_in_order) {
    env e;
    env_start(&e, NULL);
    /* queued while connecting, then more while connected: each op one request */
    flash_cache_item a[2], b[2], c, d[2];
    flash_cache_op ops[4];
    int done[4];
    for (int round = 0; round < 2; round++) {
        kv(&a[0], "p1", "one");
        kv(&a[1], "p2", "two");
        op_init(&ops[0], FLASH_CACHE_SET, a, 2, &done[0]);
        key(&b[0], "p2");
        key(&b[1], "p1");
        op_init(&ops[1], FLASH_CACHE_GET, b, 2, &done[1]);
        key(&c, "p3");
        c.create = true;
        c.initial = 10;
        c.number = 1;
        op_init(&ops[2], FLASH_CACHE_INCR, &c, 1, &done[2]);
        key(&d[0], "p1");
        key(&d[1], "p3");
        op_init(&ops[3], FLASH_CACHE_DELETE, d, 2, &done[3]);
        ops[3].quiet = true; /* answered anyway */
        for (int i = 0; i < 4; i++) submit(e.p, e.c, &ops[i]);
        for (int i = 0; i < 4; i++) wait_done(e.p, &ops[i]);
        for (int i = 0; i < 4; i++) cr_assert_eq(ops[i].round_trips, 1);
        assert_value(&b[0], "two");
        assert_value(&b[1], "one");
        cr_assert_eq(c.status, FLASH_OK);
        cr_assert_eq(c.number, 10);
        cr_assert_eq(d[0].status, FLASH_OK);
        cr_assert_eq(d[1].status, FLASH_OK);
    }
    flash_redis_stats s = rstats(e.c);
    cr_assert_eq(s.requests, 8);
    cr_assert_eq(s.connects, 1);
    env_stop(&e);
}

RD_TEST(large_values_round_trip) {
    env e;
    env_start(&e, NULL);
    static char big[3][1 << 20];
    static char keys[3][16];
    flash_cache_item it[3];
    flash_cache_op op;
    int done;
    for (int i = 0; i < 3; i++) {
        for (size_t k = 0; k < sizeof big[i]; k++) big[i][k] = (char)('a' + (k * 7 + (size_t)i) % 26);
        snprintf(keys[i], sizeof keys[i], "big%d", i);
        kv(&it[i], keys[i], "");
        it[i].value = big[i];
        it[i].value_len = sizeof big[i]; /* exactly max_value */
    }
    op_init(&op, FLASH_CACHE_SET, it, 3, &done);
    run(e.p, e.c, &op);
    for (int i = 0; i < 3; i++) cr_assert_eq(it[i].status, FLASH_OK);
    for (int i = 0; i < 3; i++) key(&it[i], keys[i]);
    value_used = 0;
    op_init(&op, FLASH_CACHE_GET, it, 3, &done);
    run(e.p, e.c, &op);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(it[i].status, FLASH_OK);
        cr_assert_eq(it[i].value_len, sizeof big[i]);
        cr_assert_eq(memcmp(it[i].value, big[i], sizeof big[i]), 0);
    }
    value_used = 0;
    env_stop(&e);
}

RD_TEST(a_bad_opcode_or_missing_items_fail_without_io) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it;
    flash_cache_op op;
    int done;
    key(&it, "k");
    op_init(&op, (flash_cache_opcode)99, &it, 1, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.status, FLASH_EINVAL);
    cr_assert_eq(it.status, FLASH_EINVAL);
    cr_assert_eq(op.round_trips, 0);
    op_init(&op, FLASH_CACHE_GET, NULL, 3, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.status, FLASH_EINVAL);
    op_init(&op, FLASH_CACHE_GET, NULL, 0, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(op.status, 0);
    cr_assert_eq(op.round_trips, 0);
    cr_assert_eq(rstats(e.c).connects, 0);
    cr_assert_eq(e.c.vt->max_value(e.c.self), (size_t)1 << 20);
    env_stop(&e);
}

RD_TEST(two_backends_never_share_cas_tokens) {
    env e;
    env_start(&e, NULL);
    flash_cache other = make_cache(e.p, e.s.port, NULL);
    flash_cache_item it;
    uint64_t seen[2];
    flash_cache both[2] = {e.c, other};
    for (int i = 0; i < 2; i++) {
        kv(&it, i ? "y" : "x", "v");
        cr_assert_eq(one(e.p, both[i], FLASH_CACHE_SET, &it), FLASH_OK);
        key(&it, i ? "y" : "x");
        cr_assert_eq(one(e.p, both[i], FLASH_CACHE_GET, &it), FLASH_OK);
        seen[i] = it.cas;
    }
    uint64_t gap = seen[0] > seen[1] ? seen[0] - seen[1] : seen[1] - seen[0];
    cr_assert_gt(gap, 1000000, "cas counters start close together");
    flash_cache_destroy(other);
    env_stop(&e);
}

static int alloc_fail; /* allocations fail while set */
static size_t alloc_live;
static void *test_alloc(size_t n, void *ud) {
    (void)ud;
    if (alloc_fail) return NULL;
    alloc_live++;
    return malloc(n);
}
static void test_free(void *p, void *ud) {
    (void)ud;
    alloc_live--;
    free(p);
}

RD_TEST(out_of_memory_fails_the_op_later_and_cancel_works) {
    flash_test_server srv;
    cr_assert(flash_test_redis_start(&srv));
    flash_poll *p = flash_poll_create();
    flash_redis_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(p);
    d.host = "127.0.0.1";
    d.port = srv.port;
    d.allocator.alloc = test_alloc;
    d.allocator.free = test_free;
    alloc_live = 0;
    flash_cache c = flash_redis_create(&d, &err);
    cr_assert_not_null(c.self);
    flash_cache_item it[2];
    flash_cache_op op, cancelled;
    int done, c_done;
    kv(&it[0], "k", "v");
    alloc_fail = 1;
    op_init(&op, FLASH_CACHE_SET, it, 1, &done);
    submit(p, c, &op);
    key(&it[1], "k");
    op_init(&cancelled, FLASH_CACHE_GET, &it[1], 1, &c_done);
    cancelled.done = never_done;
    submit(p, c, &cancelled);
    c.vt->cancel(c.self, &cancelled);
    alloc_fail = 0;
    wait_done(p, &op);
    cr_assert_eq(op.status, FLASH_ENOMEM);
    cr_assert_eq(it[0].status, FLASH_ENOMEM);
    kv(&it[0], "k", "v");
    cr_assert_eq(one(p, c, FLASH_CACHE_SET, &it[0]), FLASH_OK);
    flash_cache_destroy(c);
    cr_assert_eq(alloc_live, 0);
    flash_poll_destroy(p);
    flash_test_server_stop(&srv);
}

RD_TEST(scripts_flushed_fail_one_key_then_reload) {
    env e;
    env_start(&e, NULL);
    flash_cache_item it;
    key(&it, "n");
    it.create = true;
    it.initial = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK);
    cr_assert_eq(redis_raw(e.s.port, "SCRIPT FLUSH\r\n", 1, NULL, 0), FLASH_REDIS_SIMPLE);
    key(&it, "n");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_EBACKEND); /* NOSCRIPT */
    key(&it, "n");
    it.number = 1;
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_INCR, &it), FLASH_OK); /* reconnected, reloaded */
    cr_assert_eq(it.number, 2);
    flash_redis_stats s = rstats(e.c);
    cr_assert_eq(s.reconnects, 1);
    cr_assert(!s.down);
    cr_assert_eq(command_calls(e.s.port, "eval"), 0); /* the text is sent by SCRIPT LOAD only */
    env_stop(&e);
}

/* ---- a fake server that misbehaves ----------------------------------------------- */

enum { FAKE_GOOD, FAKE_GARBAGE, FAKE_WRONG_COUNT, FAKE_UNSOLICITED };

/* The digests of the backend's four scripts (what SCRIPT LOAD answers). */
static const char cas_sha[] = "81960881acb9f20da2ffbcdb461192d9ffb9380a";
static const char incr_sha[] = "a65ad6a7c27ab94615bf32aef62973994f68b99d";
static const char lease_sha[] = "f240189c10c3478708fa894cd4055724b604abb3";
static const char stale_sha[] = "606da338cc5b0c9efc5667efefe9bb9b09c403fb";

/* Serve one connection: every read holds one MGET, the first one after the
   four SCRIPT LOADs of the connection's hello. */
static void fake_serve(int fd, int mode) {
    char buf[1 << 14], out[1 << 14];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n <= 0) return;
        buf[n] = 0;
        char *mget = strstr(buf, "$4\r\nMGET\r\n"), *star = mget;
        while (star && star > buf && *star != '*') star--;
        int keys = star ? atoi(star + 1) - 1 : 0;
        size_t olen = 0;
        if (mode == FAKE_GARBAGE) {
            flash_test_write_all(fd, "%what is this\r\n", 15);
            flash_test_drain_until_eof(fd);
            return;
        }
        if (strstr(buf, "$6\r\nSCRIPT\r\n"))
            olen += (size_t)sprintf(out, "$40\r\n%s\r\n$40\r\n%s\r\n$40\r\n%s\r\n$40\r\n%s\r\n", cas_sha, incr_sha,
                                    lease_sha, stale_sha);
        olen += (size_t)sprintf(out + olen, "*%d\r\n", keys + (mode == FAKE_WRONG_COUNT));
        for (int i = 0; i < keys + (mode == FAKE_WRONG_COUNT); i++) olen += (size_t)sprintf(out + olen, "$-1\r\n");
        flash_test_write_all(fd, out, olen);
        if (mode == FAKE_UNSOLICITED) {
            flash_test_sleep_ms(50);
            flash_test_write_all(fd, "+OK\r\n", 5);
        }
        if (mode != FAKE_GOOD) {
            flash_test_drain_until_eof(fd);
            return;
        }
    }
}

/* The first connection misbehaves: EPROTO, not marked down; the next op
   reconnects at once and works. */
static void misbehaving(int mode) {
    int modes[1] = {mode};
    flash_test_fake f;
    flash_test_fake_start(&f, fake_serve, modes, 1, FAKE_GOOD);
    flash_poll *p = flash_poll_create();
    opts o = {2000, 0, 60000, 0, NULL, 0};
    flash_cache c = make_cache(p, f.port, &o);
    flash_cache_item it[2];
    key(&it[0], "a");
    key(&it[1], "b");
    flash_cache_op op;
    int done;
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    if (mode == FAKE_UNSOLICITED) { /* answered well; the stray reply comes later */
        cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
        int64_t start = flash_test_now_ms();
        while (rstats(c).proto_errors == 0 && flash_test_now_ms() - start < 3000) flash_poll_run_once(p, true);
    } else {
        cr_assert_eq(it[0].status, FLASH_EPROTO);
        cr_assert_eq(it[1].status, FLASH_EPROTO);
    }
    flash_redis_stats s = rstats(c);
    cr_assert_eq(s.proto_errors, 1);
    cr_assert(!s.down);
    key(&it[0], "a");
    key(&it[1], "b");
    op_init(&op, FLASH_CACHE_GET, it, 2, &done);
    run(p, c, &op);
    cr_assert_eq(it[0].status, FLASH_ENOTFOUND);
    cr_assert_eq(it[1].status, FLASH_ENOTFOUND);
    cr_assert_eq(rstats(c).reconnects, 1);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
    flash_test_fake_stop(&f);
}

RD_TEST(garbage_is_eproto_and_the_connection_recovers) { misbehaving(FAKE_GARBAGE); }
RD_TEST(a_wrong_array_count_is_eproto) { misbehaving(FAKE_WRONG_COUNT); }
RD_TEST(an_unsolicited_reply_resets_the_connection) { misbehaving(FAKE_UNSOLICITED); }

/* ---- outages ----------------------------------------------------------------------- */

RD_TEST(a_killed_server_fails_fast_then_comes_back) {
    env e;
    opts o = {2000, 500, 500, 0, NULL, 0};
    env_start(&e, &o);
    flash_cache_item it;
    kv(&it, "k", "v");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    /* killed with an op in flight (paused first, so that it cannot answer;
       restarted at once on the same port): EBACKEND, long before the timeout */
    flash_cache_op op;
    int done;
    key(&it, "k");
    op_init(&op, FLASH_CACHE_GET, &it, 1, &done);
    cr_assert(flash_test_server_pause(&e.s, true));
    submit(e.p, e.c, &op);
    for (int i = 0; i < 3; i++) flash_poll_run_once(e.p, false); /* sent */
    int64_t t0 = flash_test_now_ms();
    cr_assert(flash_test_server_restart(&e.s)); /* SIGKILL, then a new process */
    wait_done(e.p, &op);
    cr_assert_eq(it.status, FLASH_EBACKEND);
    cr_assert_lt(flash_test_now_ms() - t0, 1000);
    cr_assert(rstats(e.c).down);
    /* down: fail fast without I/O, although the server is back */
    key(&it, "k");
    op_init(&op, FLASH_CACHE_GET, &it, 1, &done);
    run(e.p, e.c, &op);
    cr_assert_eq(it.status, FLASH_EBACKEND);
    cr_assert_eq(op.round_trips, 0);
    cr_assert_eq(rstats(e.c).fast_fails, 1);
    /* works again once retry_interval has passed */
    flash_test_sleep_ms(600);
    kv(&it, "k", "again");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    key(&it, "k");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "again");
    cr_assert_eq(rstats(e.c).reconnects, 1);
    env_stop(&e);
}

RD_TEST(a_refused_connection_is_ebackend) {
    flash_poll *p = flash_poll_create();
    opts o = {500, 500, 200, 0, NULL, 0};
    flash_cache c = make_cache(p, flash_test_free_port(), &o);
    flash_cache_item it;
    kv(&it, "k", "v");
    int64_t t0 = flash_test_now_ms();
    cr_assert_eq(one(p, c, FLASH_CACHE_SET, &it), FLASH_EBACKEND);
    cr_assert_lt(flash_test_now_ms() - t0, 400);
    cr_assert(rstats(c).down);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
}

RD_TEST(a_paused_server_times_out) {
    env e;
    opts o = {300, 300, 60000, 0, NULL, 0};
    env_start(&e, &o);
    flash_cache_item it;
    kv(&it, "k", "v");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_SET, &it), FLASH_OK);
    cr_assert(flash_test_server_pause(&e.s, true));
    key(&it, "k");
    int64_t t0 = flash_test_now_ms();
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_ETIMEDOUT);
    int64_t took = flash_test_now_ms() - t0;
    cr_assert(took >= 290 && took < 800, "took %lld ms", (long long)took);
    flash_redis_stats s = rstats(e.c);
    cr_assert_eq(s.timeouts, 1);
    cr_assert(s.down);
    cr_assert(flash_test_server_pause(&e.s, false));
    env_stop(&e);
}

RD_TEST(cancel_and_destroy_with_ops_in_flight) {
    env e;
    env_start(&e, NULL);
    for (int i = 0; i < NKEYS; i++) {
        snprintf(many_keys[i], sizeof many_keys[i], "key:%d", i);
        kv(&many[i], many_keys[i], "some value");
    }
    flash_cache_op set, cancelled, get;
    int set_done, get_done, c_done;
    op_init(&set, FLASH_CACHE_SET, many, NKEYS, &set_done);
    run(e.p, e.c, &set);
    /* cancel a GET in flight: never done, its replies dropped */
    flash_cache_item *items = (flash_cache_item *)calloc(NKEYS, sizeof *items);
    for (int i = 0; i < NKEYS; i++) key(&items[i], many_keys[i]);
    op_init(&cancelled, FLASH_CACHE_GET, items, NKEYS, &c_done);
    cancelled.done = never_done;
    submit(e.p, e.c, &cancelled); /* written now: its replies come later */
    cr_assert_eq(rstats(e.c).requests, 2);
    e.c.vt->cancel(e.c.self, &cancelled);
    free(items); /* the op may be freed once cancel returns */
    /* the next op on the same connection still reads its own replies */
    flash_cache_item it;
    key(&it, "key:7");
    cr_assert_eq(one(e.p, e.c, FLASH_CACHE_GET, &it), FLASH_OK);
    assert_value(&it, "some value");
    /* destroy with ops in flight (one paused server): ECANCELED */
    cr_assert(flash_test_server_pause(&e.s, true));
    for (int i = 0; i < NKEYS; i++) key(&many[i], many_keys[i]);
    op_init(&get, FLASH_CACHE_GET, many, NKEYS, &get_done);
    submit(e.p, e.c, &get);
    for (int i = 0; i < 3; i++) flash_poll_run_once(e.p, false);
    flash_cache_destroy(e.c);
    cr_assert_eq(get_done, 1);
    cr_assert_eq(get.status, FLASH_ECANCELED);
    cr_assert_eq(many[0].status, FLASH_ECANCELED);
    cr_assert(flash_test_server_pause(&e.s, false));
    flash_poll_destroy(e.p);
    flash_test_server_stop(&e.s);
}

RD_TEST(create_rejects_a_bad_desc) {
    flash_redis_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    cr_assert_null(flash_redis_create(&d, &err).self);
    cr_assert_eq(err, FLASH_EINVAL);
    flash_poll *p = flash_poll_create();
    d.loop = flash_poll_loop(p);
    d.host = "no such host.invalid";
    cr_assert_null(flash_redis_create(&d, &err).self);
    cr_assert_eq(err, FLASH_EINVAL);
    flash_redis_stats s;
    flash_cache none = {NULL, NULL};
    cr_assert_eq(flash_redis_stats_get(none, &s), FLASH_EINVAL);
    flash_poll_destroy(p);
}
