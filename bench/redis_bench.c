/* redis_bench.c — the same flash request on a 3-master Redis Cluster, on one
   Redis and on a 3-server memcached pool, in one process, interleaved.

   The model and the request are memcached_bench.c's: User {id, username,
   email, karma}; NMAX = 10,000 users seeded into each cache THROUGH flash
   (one request each: every key a miss, one source call, the fills written
   back); then, for N = 1,000 and 10,000 cached keys, each repetition times,
   per key, one request on each backend:

     flash_ctx_reset + N User_get_by_id_async + flash_gather + flash_wait,
     every key a hit, rows decoded into structs (max_batch = NMAX: one
     cache get-many op per request: one "tick")

   on cluster  (flash_redis_cluster_create, seeds = the 3 masters),
      redis    (flash_redis_create, one standalone server),
      mcpool   (flash_memcached_create, 3 servers, ketama).

   Checked on every repetition (outside the timed part), any difference fails
   the run:
     - flash_stats: 1 cache round trip, N hits, no miss, error, source call
       or fill; the decoded rows equal the table's;
     - cluster: per node, flash's requests +1 (0 for a node no key maps to),
       its commands +S (S = the distinct slots of the keys the node serves:
       the backend sends ONE pipelined request per node holding one MGET per
       slot, keys sorted by slot), no MOVED/ASK/retry/map load; and the node's
       own `INFO commandstats`: cmdstat_mget calls +S exactly;
     - redis: requests +1, commands +1; INFO commandstats: MGET calls +1;
     - mcpool: per server, flash's requests +1 and keys +K (K = the keys
       ketama gives the server); the server's `stats`: cmd_get +K, get_hits +K.
   The expected S per node comes from each node's `CLUSTER NODES` (its
   "myself" line's slot ranges) and flash_redis_key_slot of the keys.

   usage: redis_bench C1,C2,C3 R M1,M2,M3 [reps]    (ports on 127.0.0.1)
   prints "<backend>/<N> <ns_per_key>" reps times per backend and size (order
   rotated every repetition, after one warm-up each), and "verify" lines.
   Exit status: 0, or 1 when anything failed (printed on stderr).
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "backends/cache/redis_cluster.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { NMAX = 10000, NNODES = 3, NBACK = 3 };
static const size_t sizes[] = {1000, 10000};
#define NSIZES (sizeof sizes / sizeof sizes[0])
#define ARENA_RETAIN ((size_t)64 << 20)

#define USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, email) F(I32, karma)
FLASH_MODEL(User, USER_FIELDS)
FLASH_GET_KEYS(User, (id))

enum { B_CLUSTER, B_REDIS, B_MCPOOL };
static const char *const bnames[NBACK] = {"cluster", "redis", "mcpool"};

static uint16_t cports[NNODES], rport, mports[NNODES];
static flash_poll *loop;
static flash_table *db;
static flash_cache caches[NBACK];
static flash_ctx *ctxs[NBACK];

static char *keys[NMAX];
static size_t klens[NMAX];
static flash_promise *ps[NMAX];
static char expect_name[NMAX][16];
static char expect_email[NMAX][32];

/* cluster: the node (index into cports) serving each slot, from CLUSTER NODES */
static int slot_owner[16384];
/* per size: expected MGETs (distinct slots) and keys per cluster node; keys per memcached server */
static uint64_t want_mget[NSIZES][NNODES], want_ckeys[NSIZES][NNODES], want_mkeys[NSIZES][NNODES];
/* the class's version key, read in the same get-many (never bumped here: a
   miss), and the memcached server holding it */
static char *vkey;
static size_t vklen;
static int vkey_server;
/* flash's cluster node index of cports[i] */
static size_t cnode_of[NNODES];

static void die(const char *fmt, ...) FLASH__PRINTF(1, 2);
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("redis_bench: FAILED: ", stderr);
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

/* ---- the servers' own counters (a connection of their own each time) ----- */

/* Send cmd to 127.0.0.1:port and read until done(buf) says the reply is whole. */
static char *query(uint16_t port, const char *cmd, bool (*done)(const char *buf, size_t len)) {
    static char buf[1 << 20];
    struct sockaddr_in a;
    size_t used = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) die("cannot connect to 127.0.0.1:%u", port);
    if (write(fd, cmd, strlen(cmd)) != (ssize_t)strlen(cmd)) die("cannot send to port %u", port);
    for (;;) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n <= 0) break;
        used += (size_t)n;
        buf[used] = 0;
        if (done(buf, used) || used + 1 >= sizeof buf) break;
    }
    close(fd);
    buf[used] = 0;
    return buf;
}

/* A RESP bulk string reply is whole. */
static bool bulk_done(const char *buf, size_t len) {
    const char *nl = (const char *)memchr(buf, '\n', len);
    long n;
    if (!nl) return false;
    if (buf[0] != '$') return true; /* an error: one line */
    n = atol(buf + 1);
    return n < 0 || (size_t)(nl + 1 - buf) + (size_t)n + 2 <= len;
}
static bool mc_done(const char *buf, size_t len) { return len >= 5 && strstr(buf, "END\r\n") != NULL; }

static long long info_mget_calls(uint16_t port) {
    const char *buf = query(port, "INFO commandstats\r\n", bulk_done), *p;
    if (buf[0] != '$') die("INFO commandstats on port %u: %.80s", port, buf);
    p = strstr(buf, "cmdstat_mget:calls=");
    return p ? atoll(p + 19) : 0;
}

typedef struct mc_stats {
    long long cmd_get, get_hits;
} mc_stats;

static long long mc_stat(const char *buf, const char *name) {
    char needle[64];
    const char *p;
    snprintf(needle, sizeof needle, "STAT %s ", name);
    p = strstr(buf, needle);
    if (!p) die("no %s in memcached's stats", name);
    return atoll(p + strlen(needle));
}

static mc_stats mc_server_stats(uint16_t port) {
    const char *buf = query(port, "stats\r\n", mc_done);
    mc_stats s;
    s.cmd_get = mc_stat(buf, "cmd_get");
    s.get_hits = mc_stat(buf, "get_hits");
    return s;
}

/* The slots node i serves: the "myself" line of its CLUSTER NODES. */
static void load_slot_owners(void) {
    size_t i;
    int s;
    for (s = 0; s < 16384; s++) slot_owner[s] = -1;
    for (i = 0; i < NNODES; i++) {
        char *buf = query(cports[i], "CLUSTER NODES\r\n", bulk_done), *line, *save = NULL, *tok, *tsave = NULL;
        if (buf[0] != '$') die("CLUSTER NODES on port %u: %.80s", cports[i], buf);
        for (line = strtok_r(strchr(buf, '\n') + 1, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            int field = 0;
            bool myself = false;
            for (tok = strtok_r(line, " \r", &tsave); tok; tok = strtok_r(NULL, " \r", &tsave), field++) {
                if (field == 2) myself = strstr(tok, "myself") != NULL;
                if (field >= 8 && myself && tok[0] != '[') {
                    long lo = atol(tok), hi = lo;
                    const char *dash = strchr(tok, '-');
                    if (dash) hi = atol(dash + 1);
                    if (lo < 0 || hi > 16383 || lo > hi) die("CLUSTER NODES on port %u: slot range %s", cports[i], tok);
                    for (; lo <= hi; lo++) slot_owner[lo] = (int)i;
                }
            }
            if (myself) break;
        }
    }
    for (s = 0; s < 16384; s++)
        if (slot_owner[s] < 0) die("slot %d has no master among the 3 nodes (CLUSTER NODES)", s);
}

static void expectations(void) {
    static bool seen[16384];
    size_t si, i;
    load_slot_owners();
    for (si = 0; si < NSIZES; si++) {
        memset(seen, 0, sizeof seen);
        for (i = 0; i < sizes[si]; i++) {
            size_t slot = flash_redis_key_slot(keys[i], klens[i]);
            int m = flash_memcached_server_for_key(caches[B_MCPOOL], keys[i], klens[i]);
            if (m < 0 || m >= NNODES) die("flash_memcached_server_for_key");
            want_ckeys[si][slot_owner[slot]]++;
            want_mkeys[si][m]++;
            if (!seen[slot]) want_mget[si][slot_owner[slot]]++;
            seen[slot] = true;
        }
        {
            size_t slot = flash_redis_key_slot(vkey, vklen);
            vkey_server = flash_memcached_server_for_key(caches[B_MCPOOL], vkey, vklen);
            if (vkey_server < 0 || vkey_server >= NNODES) die("flash_memcached_server_for_key");
            want_ckeys[si][slot_owner[slot]]++;
            want_mkeys[si][vkey_server]++;
            if (!seen[slot]) want_mget[si][slot_owner[slot]]++;
        }
    }
    /* flash's node index of each port (the map names the nodes it knows) */
    {
        flash_redis_cluster_stats cs;
        size_t k, j;
        if (flash_redis_cluster_stats_get(caches[B_CLUSTER], &cs)) die("flash_redis_cluster_stats_get");
        for (j = 0; j < NNODES; j++) {
            cnode_of[j] = SIZE_MAX;
            for (k = 0; k < cs.nodes; k++) {
                flash_redis_cluster_node nd;
                if (flash_redis_cluster_node_get(caches[B_CLUSTER], k, &nd)) die("flash_redis_cluster_node_get");
                if (nd.port == cports[j] && strcmp(nd.host, "127.0.0.1") == 0) cnode_of[j] = k;
            }
            if (cnode_of[j] == SIZE_MAX) die("flash's cluster backend does not know node 127.0.0.1:%u", cports[j]);
        }
    }
}

/* ---- one request, checked ------------------------------------------------- */

static void check_rows(void **rows, size_t n, const char *what) {
    size_t i;
    for (i = 0; i < n; i++) {
        const User *u = (const User *)rows[i];
        if (!u || u->id != (int64_t)(i + 1) || strcmp(u->username, expect_name[i]) != 0 ||
            strcmp(u->email, expect_email[i]) != 0 || u->karma != (int32_t)(i % 1000))
            die("%s: row %zu is not user %zu", what, i, i + 1);
    }
}

/* The flash-side and server-side counters a request is checked against. */
typedef struct snap {
    flash_stats f;
    flash_redis_cluster_stats cs;
    flash_redis_stats node[NNODES]; /* cluster nodes, or the single server in [0] */
    flash_memcached_stats ms[NNODES];
    long long mget[NNODES];
    mc_stats mc[NNODES];
} snap;

static void take(int b, snap *s, bool server) {
    size_t i;
    s->f = flash_ctx_stats(ctxs[b]);
    if (b == B_CLUSTER) {
        if (flash_redis_cluster_stats_get(caches[b], &s->cs)) die("flash_redis_cluster_stats_get");
        for (i = 0; i < NNODES; i++) {
            flash_redis_cluster_node nd;
            if (flash_redis_cluster_node_get(caches[b], cnode_of[i], &nd)) die("flash_redis_cluster_node_get");
            s->node[i] = nd.stats;
            if (server) s->mget[i] = info_mget_calls(cports[i]);
        }
    } else if (b == B_REDIS) {
        if (flash_redis_stats_get(caches[b], &s->node[0])) die("flash_redis_stats_get");
        if (server) s->mget[0] = info_mget_calls(rport);
    } else {
        for (i = 0; i < NNODES; i++) {
            if (flash_memcached_server_stats(caches[b], i, &s->ms[i])) die("flash_memcached_server_stats");
            if (server) s->mc[i] = mc_server_stats(mports[i]);
        }
    }
}

static void run_request(int b, size_t n) {
    size_t i;
    void *v = NULL;
    int rc;
    flash_ctx *c = ctxs[b];
    flash_ctx_reset(c);
    for (i = 0; i < n; i++) ps[i] = User_get_by_id_async(c, (int64_t)(i + 1));
    rc = flash_wait(c, flash_gather(c, n, ps), &v);
    if (rc) die("%s: gather of %zu users: %s", bnames[b], n, flash_strerror(rc));
    check_rows((void **)v, n, bnames[b]);
}

/* One timed request on backend b plus its checks; returns ns/key. With
   print, the "verify" line. */
static double run_checked(int b, size_t si, bool print) {
    size_t n = sizes[si], i;
    snap s0, s1;
    double t0, t1;
    char line[1024];
    int off = 0;
    take(b, &s0, true);
    t0 = now_ns();
    run_request(b, n);
    t1 = now_ns();
    take(b, &s1, true);
    /* op->round_trips: the memcached pool counts its server requests (one per
       server touched), the cluster its waves of concurrent requests (1), one
       Redis its one request */
    uint64_t want_rt = 1;
    if (b == B_MCPOOL)
        for (want_rt = 0, i = 0; i < NNODES; i++) want_rt += want_mkeys[si][i] ? 1 : 0;
    if (s1.f.cache_round_trips - s0.f.cache_round_trips != want_rt || s1.f.cache_hits - s0.f.cache_hits != n ||
        s1.f.cache_misses != s0.f.cache_misses || s1.f.cache_errors != s0.f.cache_errors ||
        s1.f.source_calls != s0.f.source_calls || s1.f.fills != s0.f.fills)
        die("%s/%zu: flash_stats: round trips %llu, hits %llu, misses %llu, errors %llu, source calls %llu, fills "
            "%llu (want %llu, %zu, 0, 0, 0, 0)",
            bnames[b], n, (unsigned long long)(s1.f.cache_round_trips - s0.f.cache_round_trips),
            (unsigned long long)(s1.f.cache_hits - s0.f.cache_hits),
            (unsigned long long)(s1.f.cache_misses - s0.f.cache_misses),
            (unsigned long long)(s1.f.cache_errors - s0.f.cache_errors),
            (unsigned long long)(s1.f.source_calls - s0.f.source_calls), (unsigned long long)(s1.f.fills - s0.f.fills),
            (unsigned long long)want_rt, n);
    off += snprintf(line + off, sizeof line - (size_t)off,
                    "verify %s/%zu ok: flash_stats: %llu cache round trip%s (%s), %zu hits, rows decoded and equal;",
                    bnames[b], n, (unsigned long long)want_rt, want_rt == 1 ? "" : "s",
                    b == B_CLUSTER ? "1 wave of concurrent per-node requests" : b == B_REDIS ? "1 request" : "1 request per server",
                    n);
    if (b == B_CLUSTER) {
        if (s1.cs.moved != s0.cs.moved || s1.cs.ask != s0.cs.ask || s1.cs.tryagain != s0.cs.tryagain ||
            s1.cs.clusterdown != s0.cs.clusterdown || s1.cs.refreshes != s0.cs.refreshes ||
            s1.cs.failures != s0.cs.failures)
            die("cluster/%zu: redirects, retries, map loads or failures during the request", n);
        for (i = 0; i < NNODES; i++) {
            uint64_t req = s1.node[i].requests - s0.node[i].requests, cmd = s1.node[i].commands - s0.node[i].commands;
            long long mg = s1.mget[i] - s0.mget[i];
            uint64_t want_req = want_ckeys[si][i] ? 1 : 0;
            if (req != want_req || cmd != want_mget[si][i] || mg != (long long)want_mget[si][i])
                die("cluster/%zu node :%u: flash requests +%llu commands +%llu, INFO commandstats MGET calls +%lld "
                    "(want +%llu, +%llu, +%llu: one request holding one MGET per slot of its %llu keys)",
                    n, cports[i], (unsigned long long)req, (unsigned long long)cmd, mg, (unsigned long long)want_req,
                    (unsigned long long)want_mget[si][i], (unsigned long long)want_mget[si][i],
                    (unsigned long long)want_ckeys[si][i]);
            off += snprintf(line + off, sizeof line - (size_t)off,
                            " node :%u: %llu keys, flash 1 request / %llu MGETs, INFO cmdstat_mget +%lld;", cports[i],
                            (unsigned long long)want_ckeys[si][i], (unsigned long long)cmd, mg);
        }
    } else if (b == B_REDIS) {
        uint64_t req = s1.node[0].requests - s0.node[0].requests, cmd = s1.node[0].commands - s0.node[0].commands;
        long long mg = s1.mget[0] - s0.mget[0];
        if (req != 1 || cmd != 1 || mg != 1)
            die("redis/%zu: flash requests +%llu commands +%llu, INFO commandstats MGET calls +%lld (want 1 each)", n,
                (unsigned long long)req, (unsigned long long)cmd, mg);
        off += snprintf(line + off, sizeof line - (size_t)off,
                        " server :%u: flash 1 request / 1 MGET of %zu keys, INFO cmdstat_mget +%lld;", rport, n, mg);
    } else {
        for (i = 0; i < NNODES; i++) {
            uint64_t req = s1.ms[i].requests - s0.ms[i].requests, k = s1.ms[i].keys - s0.ms[i].keys;
            long long g = s1.mc[i].cmd_get - s0.mc[i].cmd_get, h = s1.mc[i].get_hits - s0.mc[i].get_hits;
            uint64_t want_req = want_mkeys[si][i] ? 1 : 0, want_hits = want_mkeys[si][i] - ((int)i == vkey_server);
            if (req != want_req || k != want_mkeys[si][i] || g != (long long)k || h != (long long)want_hits)
                die("mcpool/%zu server :%u: flash requests +%llu keys +%llu, server cmd_get +%lld get_hits +%lld "
                    "(want +%llu, +%llu, +%llu, +%llu: the version key is a miss)",
                    n, mports[i], (unsigned long long)req, (unsigned long long)k, g, h, (unsigned long long)want_req,
                    (unsigned long long)want_mkeys[si][i], (unsigned long long)want_mkeys[si][i],
                    (unsigned long long)want_hits);
            off += snprintf(line + off, sizeof line - (size_t)off,
                            " server :%u: flash 1 request / %llu keys, stats cmd_get +%lld get_hits +%lld;", mports[i],
                            (unsigned long long)k, g, h);
        }
    }
    if (print) printf("%s\n", line);
    return (t1 - t0) / (double)n;
}

/* ---- setup ------------------------------------------------------------------- */

static flash_ctx *make_ctx(flash_cache cache, const char *prefix) {
    flash_desc d;
    flash_ctx *c;
    memset(&d, 0, sizeof d);
    d.arena_retain = ARENA_RETAIN;
    d.max_batch = NMAX;
    d.cache = cache;
    d.key_prefix = prefix;
    c = flash_ctx_create(&d);
    if (!c) die("flash_ctx_create");
    if (flash_poll_attach(c, loop)) die("flash_poll_attach");
    if (flash_ctx_set_source(c, NULL, flash_table_source(db))) die("flash_ctx_set_source");
    return c;
}

static void make_rows_and_keys(void) {
    size_t i;
    flash_ctx *c = ctxs[B_REDIS];
    for (i = 0; i < NMAX; i++) {
        User u;
        snprintf(expect_name[i], sizeof expect_name[i], "user%zu", i + 1);
        snprintf(expect_email[i], sizeof expect_email[i], "user%zu@example.com", i + 1);
        u.id = (int64_t)(i + 1);
        u.username = expect_name[i];
        u.email = expect_email[i];
        u.karma = (int32_t)(i % 1000);
        if (flash_table_put(db, &User_model, &u)) die("flash_table_put");
    }
    flash_ctx_reset(c);
    for (i = 0; i < NMAX; i++) {
        flash_value k = flash_v_i64((int64_t)(i + 1));
        char *key;
        size_t len;
        bool hashed;
        if (flash_cache_key(c, &User__get_by_id, &k, 1, &key, &len, &hashed) || hashed) die("flash_cache_key");
        keys[i] = (char *)malloc(len + 1);
        if (!keys[i]) die("out of memory");
        memcpy(keys[i], key, len + 1);
        klens[i] = len;
    }
    {
        char *key;
        if (flash_cache_version_key(c, &User__get_by_id, &key, &vklen)) die("flash_cache_version_key");
        vkey = (char *)malloc(vklen + 1);
        if (!vkey) die("out of memory");
        memcpy(vkey, key, vklen + 1);
    }
}

/* One request through flash per backend: every key a miss, one source call,
   NMAX fills; waits for the fills to be written. */
static void seed(int b) {
    flash_stats s0 = flash_ctx_stats(ctxs[b]), s1;
    size_t i;
    void *v = NULL;
    int rc;
    flash_ctx_reset(ctxs[b]);
    for (i = 0; i < NMAX; i++) ps[i] = User_get_by_id_async(ctxs[b], (int64_t)(i + 1));
    rc = flash_wait(ctxs[b], flash_gather(ctxs[b], NMAX, ps), &v);
    if (rc) die("%s: seed request: %s", bnames[b], flash_strerror(rc));
    check_rows((void **)v, NMAX, "seed");
    while (flash_ctx_busy(ctxs[b]))
        if (flash_poll_run_once(loop, true) < 0) die("poll loop failed");
    s1 = flash_ctx_stats(ctxs[b]);
    if (s1.cache_misses - s0.cache_misses != NMAX || s1.source_calls - s0.source_calls != 1 ||
        s1.fills - s0.fills != NMAX || s1.cache_errors != s0.cache_errors)
        die("%s: seed: misses %llu, source calls %llu, fills %llu, errors %llu (want %d, 1, %d, 0)", bnames[b],
            (unsigned long long)(s1.cache_misses - s0.cache_misses),
            (unsigned long long)(s1.source_calls - s0.source_calls), (unsigned long long)(s1.fills - s0.fills),
            (unsigned long long)(s1.cache_errors - s0.cache_errors), NMAX, NMAX);
}

static void parse_ports(const char *s, uint16_t *out, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        long p = strtol(s, (char **)&s, 10);
        if (p <= 0 || p > 65535 || (i + 1 < n && *s++ != ',') || (i + 1 == n && *s)) {
            fprintf(stderr, "usage: redis_bench C1,C2,C3 R M1,M2,M3 [reps]\n");
            exit(2);
        }
        out[i] = (uint16_t)p;
    }
}

int main(int argc, char **argv) {
    int reps = 11, err = 0, r;
    size_t si, i;
    char prefix[64];
    flash_redis_node seeds[NNODES];
    flash_redis_cluster_desc cd;
    flash_redis_desc rd;
    flash_memcached_server ms[NNODES];
    flash_memcached_desc md;

    if (argc < 4) {
        fprintf(stderr, "usage: redis_bench C1,C2,C3 R M1,M2,M3 [reps]\n");
        return 2;
    }
    parse_ports(argv[1], cports, NNODES);
    parse_ports(argv[2], &rport, 1);
    parse_ports(argv[3], mports, NNODES);
    if (argc > 4 && (reps = atoi(argv[4])) < 1) die("reps must be >= 1");

    loop = flash_poll_create();
    db = flash_table_create();
    if (!loop || !db) die("out of memory");
    memset(&cd, 0, sizeof cd);
    memset(&rd, 0, sizeof rd);
    memset(&md, 0, sizeof md);
    for (i = 0; i < NNODES; i++) {
        seeds[i].host = "127.0.0.1";
        seeds[i].port = cports[i];
        ms[i].host = "127.0.0.1";
        ms[i].port = mports[i];
        ms[i].weight = 1;
    }
    cd.loop = rd.loop = md.loop = flash_poll_loop(loop);
    cd.seeds = seeds;
    cd.seed_count = NNODES;
    cd.timeout_ms = rd.timeout_ms = md.timeout_ms = 10000; /* a busy machine */
    rd.host = "127.0.0.1";
    rd.port = rport;
    md.servers = ms;
    md.server_count = NNODES;
    caches[B_CLUSTER] = flash_redis_cluster_create(&cd, &err);
    if (!caches[B_CLUSTER].vt) die("flash_redis_cluster_create: %s", flash_strerror(err));
    caches[B_REDIS] = flash_redis_create(&rd, &err);
    if (!caches[B_REDIS].vt) die("flash_redis_create: %s", flash_strerror(err));
    caches[B_MCPOOL] = flash_memcached_create(&md, &err);
    if (!caches[B_MCPOOL].vt) die("flash_memcached_create: %s", flash_strerror(err));
    snprintf(prefix, sizeof prefix, "rb%ld", (long)getpid()); /* fresh keys every run */
    for (i = 0; i < NBACK; i++) ctxs[i] = make_ctx(caches[i], prefix);

    make_rows_and_keys();
    for (i = 0; i < NBACK; i++) seed((int)i);
    expectations();

    printf("# flash %d.%d.%d, poll loop, max_batch=%d, arena_retain=%zu; cluster 127.0.0.1:%u,%u,%u; redis :%u; "
           "memcached pool :%u,%u,%u; reps=%d\n",
           FLASH_VERSION_MAJOR, FLASH_VERSION_MINOR, FLASH_VERSION_PATCH, NMAX, (size_t)ARENA_RETAIN, cports[0],
           cports[1], cports[2], rport, mports[0], mports[1], mports[2], reps);
    for (si = 0; si < NSIZES; si++) {
        size_t n = sizes[si];
        printf("# N=%zu: cluster keys per node %llu/%llu/%llu in %llu/%llu/%llu slots; memcached keys per server "
               "%llu/%llu/%llu\n",
               n, (unsigned long long)want_ckeys[si][0], (unsigned long long)want_ckeys[si][1],
               (unsigned long long)want_ckeys[si][2], (unsigned long long)want_mget[si][0],
               (unsigned long long)want_mget[si][1], (unsigned long long)want_mget[si][2],
               (unsigned long long)want_mkeys[si][0], (unsigned long long)want_mkeys[si][1],
               (unsigned long long)want_mkeys[si][2]);
        for (i = 0; i < NBACK; i++) run_checked((int)i, si, false); /* warm-up */
        for (i = 0; i < NBACK; i++) run_checked((int)i, si, true);  /* the verify lines */
        for (r = 0; r < reps; r++)
            for (i = 0; i < NBACK; i++) { /* order rotated: drift hits every backend alike */
                int b = (int)((i + (size_t)r) % NBACK);
                printf("%s/%zu %.2f\n", bnames[b], n, run_checked(b, si, false));
            }
        fflush(stdout);
    }
    for (i = 0; i < NBACK; i++) {
        flash_ctx_destroy(ctxs[i]);
        flash_cache_destroy(caches[i]);
    }
    flash_poll_destroy(loop);
    flash_table_destroy(db);
    for (i = 0; i < NMAX; i++) free(keys[i]);
    free(vkey);
    return 0;
}
