/* memcached_bench.c — flash's full path over a real memcached against
   libmemcached (the reference C client; linked by this benchmark only), with
   the same keys on the same server, in one process, interleaved.

   The model: User {id, username, email, karma} (two strings and two ints,
   ~60-byte cached values). NMAX = 10,000 users are seeded into memcached
   THROUGH flash (one request: every key a miss, one source call, the fills
   written back by flash); then, for N = 1,000 and 10,000 cached keys, each
   repetition times, per key:

     flash       one request: flash_ctx_reset + N User_get_by_id_async +
                 flash_gather + flash_wait; every key a cache hit, rows decoded
                 into structs (context max_batch = NMAX: one get-many)
     flash_mb    the same with the default max_batch (1,000): N/1000 get-many
                 operations, pipelined on the connection (N > 1,000 only)
     raw         flash's memcached backend without the model layer: one
                 FLASH_CACHE_GET op of the same N keys through the vtable,
                 values as bytes (no decode), driven on the poll loop
     libmc       libmemcached, text protocol: memcached_mget of the N keys +
                 memcached_fetch_result until the end (values as bytes)
     libmc_bin   the same with MEMCACHED_BEHAVIOR_BINARY_PROTOCOL (skipped
                 with a note when the server or library refuses it)
     flash_n1    the N+1 pattern with flash: one flash_wait per key (one
                 request, N round trips)
     libmc_n1    the N+1 pattern with libmemcached: memcached_get per key

   libmemcached gets TCP_NODELAY (flash sets it on its sockets) and otherwise
   its defaults. Before the timed repetitions every scenario is verified once
   on its own against the server's `stats`: cmd_get and get_hits grew by
   exactly N (by NMAX for the seed: cmd_set), and for flash against its own
   statistics: one cache round trip (one backend request), N hits, no miss, no
   source call, no fill. Every timed repetition checks its results again
   (flash: the decoded rows equal the table's; the others: N hits and the same
   value bytes as flash's backend) and flash's statistics (round trips, no
   source call); any difference fails the run.

   Timed wall-clock ns/key includes the server's work: on one machine the
   client and memcached share the cores. The server CPU column separates
   what each protocol costs memcached (flash's multi-key gets vs libmemcached's get).

   usage: memcached_bench PORT [reps]     "<scenario>/<N> <ns_per_key>
                                          <server_cpu_ns_per_key>" reps times
                                          each, after one warm-up, order
                                          rotated every repetition, and the
                                          "verify" lines. The server's CPU
                                          time is memcached's rusage_user +
                                          rusage_system from `stats` before
                                          and after the sample (untimed)
          memcached_bench PORT --callgrind SCENARIO N [PREFIX]
                                          seed (or, with PREFIX, reuse the keys
                                          a run with that "prefix" line
                                          seeded), warm up, then one run
                                          inside cg_measure() for valgrind
                                          --toggle-collect='cg_measure*';
                                          run.sh subtracts the inclusive cost
                                          of the cg_skip_* functions (the
                                          benchmark's own checks: the value
                                          hash of the byte rows, the row
                                          compare of flash's)
   Exit status: 0, or 1 when anything failed (printed on stderr).
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

#include <libmemcached/memcached.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#if defined(__GNUC__) || defined(__clang__)
#define BENCH_NOINLINE __attribute__((noinline))
#else
#define BENCH_NOINLINE
#endif

enum { NMAX = 100000, DEFAULT_MAX_BATCH = 1000 }; /* 100k: the --scale sweep's largest tick */
static const size_t sizes[] = {1000, 10000};
#define NSIZES (sizeof sizes / sizeof sizes[0])
#define ARENA_RETAIN ((size_t)64 << 20)

#define USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, email) F(I32, karma)
FLASH_MODEL(User, USER_FIELDS)
FLASH_GET_KEYS(User, (id))

static uint16_t port;
static flash_poll *loop;
static flash_cache mcache;
static flash_table *db;
static flash_ctx *ctx;      /* max_batch = NMAX */
static flash_ctx *ctx_mb;   /* default max_batch */
static memcached_st *lm, *lm_bin;
static memcached_result_st lm_result, lm_bin_result;
static char lm_bin_note[160];

static char *keys[NMAX];   /* flash's cache keys of users 1..NMAX */
static size_t klens[NMAX];
static flash_promise *ps[NMAX];
static void **result_vec;
static void *n1_vals[NMAX];
static flash_cache_item raw_items[NMAX];
static char expect_name[NMAX][16];
static char expect_email[NMAX][32];

/* What a bytes-returning scenario saw: hits and total value bytes. */
static uint64_t got_hits, got_bytes, got_hash;
static uint64_t raw_bytes_ref[NSIZES], raw_hash_ref[NSIZES]; /* flash's backend, per size */

static void die(const char *fmt, ...) FLASH__PRINTF(1, 2);
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("memcached_bench: FAILED: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* FNV-1a over bytes, chained. The benchmark's own checks are not the
   client's work: run.sh subtracts the callgrind cost of every cg_skip_*
   function (never inlined: a symbol of their own) from the rows' counts. */
static BENCH_NOINLINE uint64_t cg_skip_fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h;
}

/* ---- memcached's own counters ------------------------------------------- */

typedef struct srv_stats {
    long long cmd_get, get_hits, get_misses, cmd_set, curr_items, total_connections;
    double cpu_s; /* rusage_user + rusage_system: the server's CPU time */
} srv_stats;

static long long stat_of(const char *buf, const char *name) {
    char needle[64];
    const char *p;
    snprintf(needle, sizeof needle, "STAT %s ", name);
    p = strstr(buf, needle);
    return p ? atoll(p + strlen(needle)) : -1;
}

/* `stats` over a connection of its own (not counted in cmd_get). */
static srv_stats server_stats(void) {
    static char buf[65536];
    struct sockaddr_in a;
    size_t used = 0;
    srv_stats s;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) die("cannot connect to memcached for stats");
    if (write(fd, "stats\r\n", 7) != 7) die("cannot send stats");
    for (;;) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n <= 0) break;
        used += (size_t)n;
        buf[used] = 0;
        if (strstr(buf, "END\r\n") || used + 1 >= sizeof buf) break;
    }
    close(fd);
    buf[used] = 0;
    s.cmd_get = stat_of(buf, "cmd_get");
    s.get_hits = stat_of(buf, "get_hits");
    s.get_misses = stat_of(buf, "get_misses");
    s.cmd_set = stat_of(buf, "cmd_set");
    s.curr_items = stat_of(buf, "curr_items");
    s.total_connections = stat_of(buf, "total_connections");
    {
        const char *u = strstr(buf, "STAT rusage_user "), *y = strstr(buf, "STAT rusage_system ");
        s.cpu_s = (u && y) ? atof(u + 17) + atof(y + 19) : -1;
    }
    if (s.cmd_get < 0 || s.get_hits < 0 || s.cmd_set < 0) die("no counters in memcached's stats reply");
    return s;
}

static void server_version(char *out, size_t cap) {
    static char buf[65536];
    struct sockaddr_in a;
    size_t used = 0;
    const char *p;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    snprintf(out, cap, "?");
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) die("cannot connect to memcached on port %u", port);
    if (write(fd, "version\r\n", 9) != 9) die("cannot send version");
    for (;;) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n <= 0) break;
        used += (size_t)n;
        buf[used] = 0;
        if (strstr(buf, "\r\n")) break;
    }
    close(fd);
    buf[used] = 0;
    p = strstr(buf, "VERSION ");
    if (p) snprintf(out, cap, "%.*s", (int)strcspn(p + 8, "\r\n"), p + 8);
}

/* ---- the scenarios ---------------------------------------------------------- */

static BENCH_NOINLINE void cg_skip_check_rows(void **rows, size_t n, const char *what) {
    size_t i;
    for (i = 0; i < n; i++) {
        const User *u = (const User *)rows[i];
        if (!u || u->id != (int64_t)(i + 1) || strcmp(u->username, expect_name[i]) != 0 ||
            strcmp(u->email, expect_email[i]) != 0 || u->karma != (int32_t)(i % 1000))
            die("%s: row %zu is not user %zu", what, i, i + 1);
    }
}

static void run_flash_on(flash_ctx *c, size_t n) {
    size_t i;
    void *v = NULL;
    int rc;
    flash_ctx_reset(c);
    for (i = 0; i < n; i++) ps[i] = User_get_by_id_async(c, (int64_t)(i + 1));
    rc = flash_wait(c, flash_gather(c, n, ps), &v);
    if (rc) die("flash gather of %zu users: %s", n, flash_strerror(rc));
    result_vec = (void **)v;
}
static void run_flash(size_t n) { run_flash_on(ctx, n); }
static void run_flash_mb(size_t n) { run_flash_on(ctx_mb, n); }

static void run_flash_n1(size_t n) {
    size_t i;
    flash_ctx_reset(ctx);
    for (i = 0; i < n; i++) {
        int rc = flash_wait(ctx, User_get_by_id_async(ctx, (int64_t)(i + 1)), &n1_vals[i]);
        if (rc) die("flash get of user %zu: %s", i + 1, flash_strerror(rc));
    }
}

static int raw_done_flag;
static void raw_done(flash_cache_op *op) {
    size_t i;
    for (i = 0; i < op->count; i++) {
        const flash_cache_item *it = &op->items[i];
        if (it->status != FLASH_OK) continue;
        got_hits++;
        got_bytes += it->value_len;
        got_hash = cg_skip_fnv(got_hash, it->value, it->value_len); /* values live until done returns */
    }
    raw_done_flag = 1;
}

static void run_raw(size_t n) {
    flash_cache_op op;
    size_t i;
    memset(&op, 0, sizeof op);
    for (i = 0; i < n; i++) {
        raw_items[i].key = keys[i];
        raw_items[i].key_len = klens[i];
    }
    op.code = FLASH_CACHE_GET;
    op.items = raw_items;
    op.count = n;
    op.done = raw_done;
    raw_done_flag = 0;
    mcache.vt->submit(mcache.self, flash_poll_loop(loop), &op);
    while (!raw_done_flag)
        if (flash_poll_run_once(loop, true) < 0) die("poll loop failed");
    if (op.status) die("raw GET of %zu keys: %s", n, flash_strerror(op.status));
}

static void run_libmc_on(memcached_st *m, memcached_result_st *res, size_t n) {
    memcached_return_t rc = memcached_mget(m, (const char *const *)keys, klens, n);
    memcached_result_st *r;
    if (rc != MEMCACHED_SUCCESS) die("memcached_mget: %s", memcached_strerror(m, rc));
    while ((r = memcached_fetch_result(m, res, &rc)) != NULL) {
        got_hits++;
        got_bytes += memcached_result_length(r);
        got_hash = cg_skip_fnv(got_hash, memcached_result_value(r), memcached_result_length(r));
    }
    if (rc != MEMCACHED_END && rc != MEMCACHED_SUCCESS && rc != MEMCACHED_NOTFOUND)
        die("memcached_fetch_result: %s", memcached_strerror(m, rc));
}
static void run_libmc(size_t n) { run_libmc_on(lm, &lm_result, n); }
static void run_libmc_bin(size_t n) { run_libmc_on(lm_bin, &lm_bin_result, n); }

static void run_libmc_n1(size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        size_t vlen = 0;
        uint32_t flags = 0;
        memcached_return_t rc;
        char *v = memcached_get(lm, keys[i], klens[i], &vlen, &flags, &rc);
        if (!v) die("memcached_get %s: %s", keys[i], memcached_strerror(lm, rc));
        got_hits++;
        got_bytes += vlen;
        got_hash = cg_skip_fnv(got_hash, v, vlen);
        free(v);
    }
}

typedef enum { K_FLASH, K_BYTES, K_FLASH_N1 } kind;
typedef struct scenario {
    const char *name;
    void (*run)(size_t n);
    kind k;
    size_t min_n; /* run only for N >= min_n */
    bool *enabled;
} scenario;

static bool yes = true, have_bin;
static const scenario scenarios[] = {
    {"flash", run_flash, K_FLASH, 0, &yes},
    {"flash_mb", run_flash_mb, K_FLASH, DEFAULT_MAX_BATCH + 1, &yes},
    {"raw", run_raw, K_BYTES, 0, &yes},
    {"libmc", run_libmc, K_BYTES, 0, &yes},
    {"libmc_bin", run_libmc_bin, K_BYTES, 0, &have_bin},
    {"flash_n1", run_flash_n1, K_FLASH_N1, 0, &yes},
    {"libmc_n1", run_libmc_n1, K_BYTES, 0, &yes},
};
#define NSCEN (sizeof scenarios / sizeof scenarios[0])

static bool active(const scenario *s, size_t n) { return *s->enabled && n >= s->min_n; }

static flash_ctx *ctx_of(const scenario *s) { return s->run == run_flash_mb ? ctx_mb : ctx; }

/* Expected cache round trips of a flash scenario. */
static uint64_t want_round_trips(const scenario *s, size_t n) {
    if (s->k == K_FLASH_N1) return n;
    if (s->run == run_flash_mb) return (n + DEFAULT_MAX_BATCH - 1) / DEFAULT_MAX_BATCH;
    return 1;
}

/* One run of s plus the checks every repetition makes; returns ns/key and,
   when server_ns is not NULL, the server's CPU time per key (from `stats`
   before and after, outside the timed part). */
static double run_checked(const scenario *s, size_t n, size_t si, double *server_ns) {
    flash_stats before = {0}, after;
    double t0, t1, cpu0 = 0;
    flash_ctx *c = ctx_of(s);
    if (server_ns) cpu0 = server_stats().cpu_s;
    if (s->k != K_BYTES) before = flash_ctx_stats(c);
    got_hits = got_bytes = 0;
    got_hash = 14695981039346656037ull;
    t0 = now_ns();
    s->run(n);
    t1 = now_ns();
    if (server_ns) *server_ns = (server_stats().cpu_s - cpu0) * 1e9 / (double)n;
    if (s->k == K_BYTES) {
        if (got_hits != n) die("%s/%zu: %llu hits, want %zu", s->name, n, (unsigned long long)got_hits, n);
        if (!raw_bytes_ref[si] && s->run == run_raw) {
            raw_bytes_ref[si] = got_bytes;
            raw_hash_ref[si] = got_hash;
        }
        if (!raw_bytes_ref[si]) die("%s/%zu: run before raw", s->name, n);
        if (got_bytes != raw_bytes_ref[si] || got_hash != raw_hash_ref[si])
            die("%s/%zu: %llu value bytes (hash %016llx), flash's backend read %llu (hash %016llx)", s->name, n,
                (unsigned long long)got_bytes, (unsigned long long)got_hash, (unsigned long long)raw_bytes_ref[si],
                (unsigned long long)raw_hash_ref[si]);
    } else {
        uint64_t rt;
        after = flash_ctx_stats(c);
        rt = after.cache_round_trips - before.cache_round_trips;
        cg_skip_check_rows(s->k == K_FLASH ? result_vec : n1_vals, n, s->name);
        if (rt != want_round_trips(s, n) || after.cache_hits - before.cache_hits != n ||
            after.source_calls != before.source_calls || after.cache_misses != before.cache_misses ||
            after.cache_errors != before.cache_errors || after.fills != before.fills)
            die("%s/%zu: round trips %llu (want %llu), hits %llu, misses %llu, errors %llu, source calls %llu, "
                "fills %llu",
                s->name, n, (unsigned long long)rt, (unsigned long long)want_round_trips(s, n),
                (unsigned long long)(after.cache_hits - before.cache_hits),
                (unsigned long long)(after.cache_misses - before.cache_misses),
                (unsigned long long)(after.cache_errors - before.cache_errors),
                (unsigned long long)(after.source_calls - before.source_calls),
                (unsigned long long)(after.fills - before.fills));
    }
    return (t1 - t0) / (double)n;
}

/* ---- setup ---------------------------------------------------------------- */

static flash_ctx *make_ctx(uint32_t max_batch, const char *prefix) {
    flash_desc d;
    flash_ctx *c;
    memset(&d, 0, sizeof d);
    d.arena_retain = ARENA_RETAIN;
    d.max_batch = max_batch;
    d.cache = mcache;
    d.key_prefix = prefix;
    c = flash_ctx_create(&d);
    if (!c) die("flash_ctx_create");
    if (flash_poll_attach(c, loop)) die("flash_poll_attach");
    if (flash_ctx_set_source(c, NULL, flash_table_source(db))) die("flash_ctx_set_source");
    return c;
}

static memcached_st *make_libmc(bool binary, char *why, size_t cap) {
    memcached_st *m = memcached_create(NULL);
    memcached_return_t rc;
    if (!m) die("memcached_create");
    rc = memcached_server_add(m, "127.0.0.1", port);
    if (rc != MEMCACHED_SUCCESS) die("memcached_server_add: %s", memcached_strerror(m, rc));
    rc = memcached_behavior_set(m, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
    if (rc != MEMCACHED_SUCCESS) die("MEMCACHED_BEHAVIOR_TCP_NODELAY: %s", memcached_strerror(m, rc));
    if (binary) {
        rc = memcached_behavior_set(m, MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1);
        if (rc != MEMCACHED_SUCCESS) {
            snprintf(why, cap, "MEMCACHED_BEHAVIOR_BINARY_PROTOCOL refused: %s", memcached_strerror(m, rc));
            memcached_free(m);
            return NULL;
        }
    }
    return m;
}

/* The rows the cache must answer with, and the keys flash uses (libmemcached
   asks for the same ones); with fill_table, the table holds the rows too. */
static void make_rows_and_keys(bool fill_table) {
    size_t i;
    for (i = 0; i < NMAX; i++) {
        User u;
        snprintf(expect_name[i], sizeof expect_name[i], "user%zu", i + 1);
        snprintf(expect_email[i], sizeof expect_email[i], "user%zu@example.com", i + 1);
        u.id = (int64_t)(i + 1);
        u.username = expect_name[i];
        u.email = expect_email[i];
        u.karma = (int32_t)(i % 1000);
        if (fill_table && flash_table_put(db, &User_model, &u)) die("flash_table_put");
    }
    flash_ctx_reset(ctx);
    for (i = 0; i < NMAX; i++) {
        flash_value k = flash_v_i64((int64_t)(i + 1));
        char *key;
        size_t len;
        bool hashed;
        if (flash_cache_key(ctx, &User__get_by_id, &k, 1, &key, &len, &hashed) || hashed) die("flash_cache_key");
        keys[i] = (char *)malloc(len + 1);
        if (!keys[i]) die("out of memory");
        memcpy(keys[i], key, len + 1);
        klens[i] = len;
    }
}

static void seed(void) {
    srv_stats s0, s1;
    flash_stats b, a;
    size_t i;
    void *v = NULL;
    bool in_flight;
    int rc;
    make_rows_and_keys(true);
    /* One request: every key a miss, one source call, the fills written
       back without the request waiting for them. */
    s0 = server_stats();
    b = flash_ctx_stats(ctx);
    flash_ctx_reset(ctx);
    for (i = 0; i < NMAX; i++) ps[i] = User_get_by_id_async(ctx, (int64_t)(i + 1));
    rc = flash_wait(ctx, flash_gather(ctx, NMAX, ps), &v);
    if (rc) die("seed request: %s", flash_strerror(rc));
    in_flight = flash_ctx_busy(ctx); /* the fill write has not completed */
    a = flash_ctx_stats(ctx);
    cg_skip_check_rows((void **)v, NMAX, "seed");
    while (flash_ctx_busy(ctx))
        if (flash_poll_run_once(loop, true) < 0) die("poll loop failed");
    s1 = server_stats();
    if (a.cache_round_trips - b.cache_round_trips != 1 || a.cache_misses - b.cache_misses != NMAX ||
        a.cache_hits != b.cache_hits || a.source_calls - b.source_calls != 1 ||
        a.source_keys - b.source_keys != NMAX || a.fills - b.fills != NMAX || !in_flight ||
        s1.cmd_set - s0.cmd_set != NMAX || s1.cmd_get - s0.cmd_get != NMAX + 1 || s1.get_misses - s0.get_misses != NMAX + 1 ||
        (s1.curr_items >= 0 && s1.curr_items - s0.curr_items != NMAX))
        die("seed: round trips %llu, misses %llu, hits %llu, source calls %llu (keys %llu), fills %llu, fill in flight "
            "at return %d; server cmd_get +%lld, get_misses +%lld, cmd_set +%lld, curr_items +%lld (want 1, %d, 0, 1 "
            "(%d), %d, 1; +%d each, the gets and misses +1: the class's version key)",
            (unsigned long long)(a.cache_round_trips - b.cache_round_trips),
            (unsigned long long)(a.cache_misses - b.cache_misses), (unsigned long long)(a.cache_hits - b.cache_hits),
            (unsigned long long)(a.source_calls - b.source_calls), (unsigned long long)(a.source_keys - b.source_keys),
            (unsigned long long)(a.fills - b.fills), (int)in_flight, s1.cmd_get - s0.cmd_get,
            s1.get_misses - s0.get_misses, s1.cmd_set - s0.cmd_set, s1.curr_items - s0.curr_items, NMAX, NMAX, NMAX,
            NMAX);
    printf("verify seed/%d ok: one request through flash: 1 cache round trip, %d misses, 1 source call (%d keys), "
           "%d fills, fill write still in flight when flash_wait returned (no wait on fills); server: cmd_get +%lld, "
           "get_misses +%lld, cmd_set +%lld, curr_items +%lld\n",
           NMAX, NMAX, NMAX, NMAX, s1.cmd_get - s0.cmd_get, s1.get_misses - s0.get_misses, s1.cmd_set - s0.cmd_set,
           s1.curr_items - s0.curr_items);
}

/* Each scenario once, alone, against the server's counters (and flash's). */
static void verify(size_t n, size_t si) {
    size_t k;
    for (k = 0; k < NSCEN; k++) {
        const scenario *s = &scenarios[k];
        srv_stats s0, s1;
        flash_memcached_stats m0, m1;
        flash_stats b = {0}, a = {0};
        flash_ctx *c = ctx_of(s);
        if (!active(s, n)) continue;
        if (flash_memcached_server_stats(mcache, 0, &m0)) die("flash_memcached_server_stats");
        if (s->k != K_BYTES) b = flash_ctx_stats(c);
        s0 = server_stats();
        run_checked(s, n, si, NULL);
        s1 = server_stats();
        if (s->k != K_BYTES) a = flash_ctx_stats(c);
        if (flash_memcached_server_stats(mcache, 0, &m1)) die("flash_memcached_server_stats");
        /* flash reads its class's version key (never bumped here: a miss)
           in each get-many: one per batch */
        long long vk = s->k == K_BYTES ? 0 : (long long)want_round_trips(s, n);
        if (s1.cmd_get - s0.cmd_get != (long long)n + vk || s1.get_hits - s0.get_hits != (long long)n ||
            s1.total_connections - s0.total_connections != 1)
            die("%s/%zu: server cmd_get +%lld, get_hits +%lld, new connections %lld (want +%lld, +%zu, 0; the stats connection not counted)",
                s->name, n, s1.cmd_get - s0.cmd_get, s1.get_hits - s0.get_hits,
                s1.total_connections - s0.total_connections - 1, (long long)n + vk, n);
        if (s->k == K_BYTES && s->run == run_raw && (m1.requests - m0.requests != 1 || m1.keys - m0.keys != n))
            die("%s/%zu: backend requests +%llu keys +%llu (want 1, %zu)", s->name, n,
                (unsigned long long)(m1.requests - m0.requests), (unsigned long long)(m1.keys - m0.keys), n);
        if (s->k == K_BYTES) {
            printf("verify %s/%zu ok: %zu hits, %llu value bytes (the bytes flash's backend read); server: cmd_get "
                   "+%lld, get_hits +%lld\n",
                   s->name, n, n, (unsigned long long)got_bytes, s1.cmd_get - s0.cmd_get, s1.get_hits - s0.get_hits);
        } else {
            uint64_t reqs = m1.requests - m0.requests;
            if (reqs != want_round_trips(s, n) || m1.keys - m0.keys != n + (uint64_t)vk)
                die("%s/%zu: backend requests +%llu keys +%llu (want %llu, %zu + %lld version keys)", s->name, n,
                    (unsigned long long)reqs, (unsigned long long)(m1.keys - m0.keys),
                    (unsigned long long)want_round_trips(s, n), n, vk);
            printf("verify %s/%zu ok: flash_stats: %llu cache round trip%s, %llu hits, 0 misses, 0 source calls, 0 "
                   "fills; backend: %llu request%s, %llu keys; server: cmd_get +%lld, get_hits +%lld; rows decoded "
                   "and equal to the table's\n",
                   s->name, n, (unsigned long long)(a.cache_round_trips - b.cache_round_trips),
                   a.cache_round_trips - b.cache_round_trips == 1 ? "" : "s",
                   (unsigned long long)(a.cache_hits - b.cache_hits), (unsigned long long)reqs, reqs == 1 ? "" : "s",
                   (unsigned long long)(m1.keys - m0.keys), s1.cmd_get - s0.cmd_get, s1.get_hits - s0.get_hits);
        }
    }
}

static BENCH_NOINLINE void cg_measure(const scenario *s, size_t n, size_t si) { run_checked(s, n, si, NULL); }

static void usage(void) {
    fprintf(stderr, "usage: memcached_bench PORT [reps] | PORT --scale [reps] | PORT --callgrind SCENARIO N [PREFIX]\n");
    exit(2);
}

/* --scale: ns/key of flash (one gather, decoded; one GET op of N keys, and
   with the default max_batch: N/1000 ops), flash's backend alone (one GET
   op) and libmemcached's mget for 1 .. 100k keys per tick; each
   sample runs the tick max(1, 20000 / N) times (20,000 keys or one tick),
   the rows interleaved, order rotated per rep. Prints "scale <row>/<N>
   <ns_per_key>" per sample. Every sample checks its hits (and the decoded
   rows of the last tick). */
static void scale(int reps) {
    static const size_t ns[] = {1, 10, 100, 1000, 10000, 100000};
    static const struct {
        const char *name;
        void (*run)(size_t n);
    } rows[] = {{"flash", run_flash}, {"flash_mb", run_flash_mb}, {"raw", run_raw}, {"libmc", run_libmc}};
    const size_t nrows = sizeof rows / sizeof rows[0];
    size_t si, k;
    int r;
    for (si = 0; si < sizeof ns / sizeof ns[0]; si++) {
        size_t n = ns[si], iters = n >= 20000 ? 1 : 20000 / n, it;
        for (k = 0; k < nrows; k++) rows[k].run(n); /* warm-up */
        for (r = 0; r < reps; r++) {
            for (k = 0; k < nrows; k++) {
                size_t w = (k + (size_t)r) % nrows;
                double t0, t1;
                got_hits = 0;
                t0 = now_ns();
                for (it = 0; it < iters; it++) rows[w].run(n);
                t1 = now_ns();
                if (rows[w].run == run_flash || rows[w].run == run_flash_mb) cg_skip_check_rows(result_vec, n, "scale flash");
                else if (got_hits != n * iters) die("scale %s/%zu: %llu hits, want %zu", rows[w].name, n,
                                                    (unsigned long long)got_hits, n * iters);
                printf("scale %s/%zu %.2f\n", rows[w].name, n, (t1 - t0) / (double)(n * iters));
            }
        }
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    int reps = 11, r, err = 0;
    size_t si, k;
    const char *only = NULL;
    size_t only_n = 0;
    const char *reuse = NULL; /* --callgrind: the key prefix of a run that seeded */
    bool scale_mode = false;
    char prefix[64], version[64];
    flash_memcached_server server;
    flash_memcached_desc md;
    long p;

    if (argc < 2) usage();
    p = atol(argv[1]);
    if (p <= 0 || p > 65535) usage();
    port = (uint16_t)p;
    if (argc > 4 && strcmp(argv[2], "--callgrind") == 0) {
        only = argv[3];
        only_n = (size_t)atol(argv[4]);
        if (argc > 5) reuse = argv[5];
    } else if (argc > 2 && strcmp(argv[2], "--scale") == 0) {
        scale_mode = true;
        reps = argc > 3 ? atoi(argv[3]) : 5;
        if (reps < 1) usage();
    } else if (argc > 2) {
        reps = atoi(argv[2]);
        if (reps < 1) usage();
    }
    server_version(version, sizeof version);

    loop = flash_poll_create();
    db = flash_table_create();
    if (!loop || !db) die("out of memory");
    memset(&server, 0, sizeof server);
    server.host = "127.0.0.1";
    server.port = port;
    memset(&md, 0, sizeof md);
    md.loop = flash_poll_loop(loop);
    md.servers = &server;
    md.server_count = 1;
    md.timeout_ms = 10000; /* generous: the machine may be busy (valgrind too) */
    mcache = flash_memcached_create(&md, &err);
    if (!mcache.vt) die("flash_memcached_create: %s", flash_strerror(err));
    /* A key prefix of this process: every run seeds fresh keys. */
    if (reuse) snprintf(prefix, sizeof prefix, "%s", reuse);
    else snprintf(prefix, sizeof prefix, "fb%ld", (long)getpid());
    ctx = make_ctx(NMAX, prefix);
    ctx_mb = make_ctx(0, prefix);
    lm = make_libmc(false, NULL, 0);
    if (!memcached_result_create(lm, &lm_result)) die("memcached_result_create");

    if (reuse) make_rows_and_keys(false); /* seeded by an earlier run: every key must hit */
    else seed();
    lm_bin = make_libmc(true, lm_bin_note, sizeof lm_bin_note);
    if (lm_bin) {
        /* Probe: some servers refuse the binary protocol (memcached -B ascii). */
        size_t vlen = 0;
        uint32_t flags = 0;
        memcached_return_t rc;
        char *v = memcached_get(lm_bin, keys[0], klens[0], &vlen, &flags, &rc);
        if (v && vlen) {
            have_bin = true;
            if (!memcached_result_create(lm_bin, &lm_bin_result)) die("memcached_result_create");
        } else {
            snprintf(lm_bin_note, sizeof lm_bin_note, "binary protocol get failed: %s", memcached_strerror(lm_bin, rc));
        }
        free(v);
    }

    if (only) {
        for (si = 0; si < NSIZES && sizes[si] != only_n; si++) {
        }
        if (si == NSIZES) usage();
        for (k = 0; k < NSCEN; k++) {
            const scenario *s = &scenarios[k];
            if (strcmp(s->name, only) != 0) continue;
            if (!active(s, only_n)) die("scenario %s does not run for N=%zu%s%s", only, only_n,
                                        *s->enabled ? "" : ": ", *s->enabled ? "" : lm_bin_note);
            run_checked(&scenarios[2], only_n, si, NULL); /* raw: the reference bytes */
            run_checked(s, only_n, si, NULL);              /* warm-up */
            cg_measure(s, only_n, si);
            goto done;
        }
        usage();
    }

    if (scale_mode) {
        printf("# scale: flash (one op; default max_batch) / flash backend alone / libmemcached, ns per key for 1 .. 100k "
               "keys per tick; reps=%d\n",
               reps);
        scale(reps);
        goto done;
    }
    printf("# flash %d.%d.%d memcached backend (gets + meta writes), poll loop, arena_retain=%zu max_batch=%d; "
           "libmemcached %s (text; TCP_NODELAY); memcached %s on 127.0.0.1:%u; reps=%d\n",
           FLASH_VERSION_MAJOR, FLASH_VERSION_MINOR, FLASH_VERSION_PATCH, flash_ctx_desc(ctx)->arena_retain, NMAX,
           LIBMEMCACHED_VERSION_STRING, version, (unsigned)port, reps);
    printf("prefix %s\n", prefix);
    if (!have_bin) printf("# libmc_bin: n/a (%s)\n", lm_bin_note);
    for (si = 0; si < NSIZES; si++) {
        size_t n = sizes[si], order[NSCEN], m = 0;
        for (k = 0; k < NSCEN; k++) {
            if (!active(&scenarios[k], n)) continue;
            order[m++] = k;
            run_checked(&scenarios[k], n, si, NULL); /* warm-up: connections open, buffers grown */
        }
        verify(n, si);
        for (r = 0; r < reps; r++) {
            /* Rotate who goes first so drift hits every scenario alike. */
            for (k = 0; k < m; k++) {
                const scenario *s = &scenarios[order[(k + (size_t)r) % m]];
                double server_ns = 0, ns = run_checked(s, n, si, &server_ns);
                printf("%s/%zu %.2f %.2f\n", s->name, n, ns, server_ns);
            }
        }
        fflush(stdout);
    }
done:
    memcached_result_free(&lm_result);
    memcached_free(lm);
    if (lm_bin) {
        if (have_bin) memcached_result_free(&lm_bin_result);
        memcached_free(lm_bin);
    }
    flash_ctx_destroy(ctx);
    flash_ctx_destroy(ctx_mb);
    flash_cache_destroy(mcache);
    flash_poll_destroy(loop);
    flash_table_destroy(db);
    for (k = 0; k < NMAX; k++) free(keys[k]);
    return 0;
}
