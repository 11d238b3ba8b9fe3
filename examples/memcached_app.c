/* examples/memcached_app.c — flash over memcached, step by step.

   The memcached backend (backends/cache/memcached.h) on the built-in poll
   loop, with an in-memory table as the database. Shows a batched gather
   leaving as one memcached request, the statistics, a write followed by
   flash_invalidate and a fresh read, and what an outage looks like (reads
   fall back to the database; cache_errors counts them).

       memcached_app [host:port[:weight] ...]
       FLASH_MEMCACHED="host:port[:weight],..." memcached_app

   Default server: 127.0.0.1:11211. A host may be an IPv6 literal in brackets
   ("[::1]:11211"); port and weight default to 11211 and 1. When no server
   answers, every step still runs (from the database) and the program exits 0.

       memcached -l 127.0.0.1 -p 11211 &     # or: apt-get install memcached
       make && ./build/examples/memcached_app
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
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

/* class User(Model): get_key_fields_list = [('id',), ('username',)];
   cached values live 10 minutes (the default is a week). */
#define USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, email) F(I32, karma)
FLASH_MODEL_OPT(User, USER_FIELDS, .timeout_s = 600)
FLASH_GET_KEYS(User, (id), (username))

enum { MAX_SERVERS = 16, NUSERS = 100, GATHER = 20 };

/* ---- servers: "host:port[:weight],..." ------------------------------------- */

static char host_store[MAX_SERVERS][256];

/* Parse one "host[:port[:weight]]" (host may be "[v6]"); false when malformed. */
static bool parse_server(const char *s, size_t len, size_t i, flash_memcached_server *out) {
    const char *end = s + len, *h = s, *he, *p;
    unsigned long port = 11211, weight = 1;
    char num[16];
    if (len == 0) return false;
    if (*s == '[') {
        h = s + 1;
        he = memchr(h, ']', len - 1);
        if (!he) return false;
        p = he + 1;
    } else {
        he = memchr(s, ':', len);
        if (!he) he = end;
        p = he;
    }
    if (he == h || (size_t)(he - h) >= sizeof host_store[i]) return false;
    memcpy(host_store[i], h, (size_t)(he - h));
    host_store[i][he - h] = 0;
    if (p < end) {
        const char *c;
        char *stop;
        size_t n;
        if (*p != ':') return false;
        p++;
        c = memchr(p, ':', (size_t)(end - p));
        n = (size_t)((c ? c : end) - p);
        if (n == 0 || n >= sizeof num) return false;
        memcpy(num, p, n);
        num[n] = 0;
        port = strtoul(num, &stop, 10);
        if (*stop || port == 0 || port > 65535) return false;
        if (c) {
            n = (size_t)(end - c - 1);
            if (n == 0 || n >= sizeof num) return false;
            memcpy(num, c + 1, n);
            num[n] = 0;
            weight = strtoul(num, &stop, 10);
            if (*stop || weight == 0 || weight > 1000000) return false;
        }
    }
    out->host = host_store[i];
    out->port = (uint16_t)port;
    out->weight = (uint32_t)weight;
    return true;
}

/* Append the comma-separated servers of spec; false (with a message) on error. */
static bool parse_servers(const char *spec, flash_memcached_server *out, size_t *n) {
    const char *p = spec;
    for (;;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        while (len && (*p == ' ' || *p == '\t')) p++, len--;
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        if (len) {
            if (*n == MAX_SERVERS) {
                fprintf(stderr, "memcached_app: at most %d servers\n", MAX_SERVERS);
                return false;
            }
            if (!parse_server(p, len, *n, &out[*n])) {
                fprintf(stderr, "memcached_app: bad server \"%.*s\" (want host:port[:weight])\n", (int)len, p);
                return false;
            }
            ++*n;
        }
        if (!c) return true;
        p = c + 1;
    }
}

/* ---- helpers ------------------------------------------------------------------- */

static flash_poll *loop;

/* Let the writes a request started (fills, markers) finish. */
static void settle(flash_ctx *ctx) {
    while (flash_ctx_busy(ctx))
        if (flash_poll_run_once(loop, true) <= 0) break;
}

static void print_stats(const flash_stats *b, const flash_stats *a) {
    printf("    -> cache round trips %llu, hits %llu, misses %llu, cache errors %llu, source calls %llu, fills %llu\n",
           (unsigned long long)(a->cache_round_trips - b->cache_round_trips),
           (unsigned long long)(a->cache_hits - b->cache_hits), (unsigned long long)(a->cache_misses - b->cache_misses),
           (unsigned long long)(a->cache_errors - b->cache_errors),
           (unsigned long long)(a->source_calls - b->source_calls), (unsigned long long)(a->fills - b->fills));
}

static void print_servers(flash_cache cache, const flash_memcached_server *servers, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        flash_memcached_stats s;
        if (flash_memcached_server_stats(cache, i, &s)) continue;
        printf("       server %s:%u: %llu requests, %llu keys, %llu connects, %llu failures, %llu fast fails%s\n",
               servers[i].host, (unsigned)servers[i].port, (unsigned long long)s.requests,
               (unsigned long long)s.keys, (unsigned long long)s.connects, (unsigned long long)s.failures,
               (unsigned long long)s.fast_fails, s.down ? " (marked down)" : "");
    }
}

/* One request: reset, gather users first..first+count-1, print a summary. */
static int gather_users(flash_ctx *ctx, int64_t first, size_t count) {
    flash_promise *ps[GATHER];
    flash_stats b, a;
    void *v = NULL;
    size_t i;
    int rc;
    flash_ctx_reset(ctx); /* a new request: the request memo starts empty */
    b = flash_ctx_stats(ctx);
    for (i = 0; i < count; i++) ps[i] = User_get_by_id_async(ctx, first + (int64_t)i);
    rc = flash_wait(ctx, flash_gather(ctx, count, ps), &v);
    a = flash_ctx_stats(ctx);
    if (rc) {
        printf("    gather failed: %s\n", flash_strerror(rc));
    } else {
        User **users = (User **)v;
        printf("    %zu users: %s (%s) ... %s (%s)\n", count, users[0]->username, users[0]->email,
               users[count - 1]->username, users[count - 1]->email);
    }
    print_stats(&b, &a);
    settle(ctx);
    return rc;
}

static int read_user(flash_ctx *ctx, int64_t id, const char *label) {
    flash_stats b, a;
    User *u = NULL;
    int rc;
    flash_ctx_reset(ctx);
    b = flash_ctx_stats(ctx);
    rc = User_get_by_id(ctx, id, &u);
    a = flash_ctx_stats(ctx);
    if (rc) printf("    %s: %s\n", label, flash_strerror(rc));
    else printf("    %s: User(id=%lld, username=%s, karma=%d)\n", label, (long long)u->id, u->username, (int)u->karma);
    print_stats(&b, &a);
    settle(ctx);
    return rc;
}

/* A loopback port nobody listens on (for the outage step). */
static uint16_t closed_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    uint16_t port = 9; /* discard: normally closed */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd); /* never listened: connecting is refused */
    return port;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    static char names[NUSERS][16], emails[NUSERS][32];
    flash_memcached_server servers[MAX_SERVERS];
    size_t nservers = 0, i;
    const char *env = getenv("FLASH_MEMCACHED");
    flash_memcached_desc md;
    flash_desc desc;
    flash_table *db;
    flash_cache cache;
    flash_ctx *ctx;
    flash_stats b, a;
    char prefix[64];
    bool reachable;
    int err = 0, rc;

    if (argc > 1) {
        for (i = 1; i < (size_t)argc; i++)
            if (!parse_servers(argv[i], servers, &nservers)) return 2;
    } else if (env && *env) {
        if (!parse_servers(env, servers, &nservers)) return 2;
    }
    if (nservers == 0 && !parse_servers("127.0.0.1:11211", servers, &nservers)) return 2;

    /* The "database": NUSERS users. */
    db = flash_table_create();
    for (i = 0; i < NUSERS; i++) {
        User u;
        snprintf(names[i], sizeof names[i], "user%zu", i + 1);
        snprintf(emails[i], sizeof emails[i], "user%zu@example.com", i + 1);
        u.id = (int64_t)(i + 1);
        u.username = names[i];
        u.email = emails[i];
        u.karma = (int32_t)(i * 7 % 100);
        flash_table_put(db, &User_model, &u);
    }

    /* The backend: every field of flash_memcached_desc, defaults spelled out. */
    loop = flash_poll_create();
    memset(&md, 0, sizeof md);
    md.loop = flash_poll_loop(loop);   /* required: the loop the contexts use */
    md.servers = servers;              /* required (copied); ketama-hashed like libmemcached */
    md.server_count = nservers;
    md.connect_timeout_ms = 1000;      /* default 1000 */
    md.timeout_ms = 1000;              /* default 1000, per request */
    md.retry_interval_ms = 2000;       /* default 2000: a down server rests this long */
    md.max_value = 1 << 20;            /* default 1 MiB */
    cache = flash_memcached_create(&md, &err);
    if (!cache.vt) {
        fprintf(stderr, "memcached_app: flash_memcached_create: %s (a host that does not resolve?)\n",
                flash_strerror(err));
        flash_poll_destroy(loop);
        flash_table_destroy(db);
        return 2;
    }

    /* A key prefix of this run, so that every run starts with a cold cache
       (a service keeps one fixed prefix). */
    snprintf(prefix, sizeof prefix, "memcached_app-%ld", (long)getpid());
    memset(&desc, 0, sizeof desc);
    desc.cache = cache;
    desc.key_prefix = prefix;
    ctx = flash_ctx_create(&desc);
    flash_poll_attach(ctx, loop);
    flash_ctx_set_source(ctx, NULL, flash_table_source(db));

    printf("flash %d.%d.%d over memcached: ", FLASH_VERSION_MAJOR, FLASH_VERSION_MINOR, FLASH_VERSION_PATCH);
    for (i = 0; i < nservers; i++)
        printf("%s%s:%u (weight %u)", i ? ", " : "", servers[i].host, (unsigned)servers[i].port,
               (unsigned)servers[i].weight);
    printf("; key prefix %s\n", prefix);

    printf("\n1. users = await gather(*[User.cache.get_async(id=i) for i in 1..%d])  (cold cache)\n", GATHER);
    b = flash_ctx_stats(ctx);
    gather_users(ctx, 1, GATHER);
    a = flash_ctx_stats(ctx);
    reachable = a.cache_errors == b.cache_errors;
    if (reachable) {
        printf("       one get-many for the %d keys (one request per server holding some), one database call\n"
               "       for the misses, then the fills written back (a request per server) after the gather returned\n",
               GATHER);
    } else {
        printf("       memcached is unreachable: every key failed (cache errors) and came from the database\n");
    }
    print_servers(cache, servers, nservers);

    printf("\n2. the same gather in a new request%s\n", reachable ? "  (warm cache: all hits, no database call)" : "");
    gather_users(ctx, 1, GATHER);
    print_servers(cache, servers, nservers);

    printf("\n3. a write: user 7 renamed, then flash_invalidate(User, old_row, new_row)\n");
    {
        const User *found = (const User *)flash_table_find(db, &User_model, flash_v_i64(7));
        char old_name[32], old_email[32];
        User old, renamed;
        old = *found;
        snprintf(old_name, sizeof old_name, "%s", found->username); /* the table frees them on put */
        snprintf(old_email, sizeof old_email, "%s", found->email);
        old.username = old_name;
        old.email = old_email;
        renamed = old;
        renamed.username = "grace";
        flash_table_put(db, &User_model, &renamed); /* the database write, committed */
        flash_ctx_reset(ctx);
        b = flash_ctx_stats(ctx);
        rc = flash_invalidate(ctx, &User_model, &old, &renamed); /* the keys of both rows, every class */
        a = flash_ctx_stats(ctx);
        printf("    flash_invalidate: %s; %llu keys invalidated (User.id:7, User.username:user7, User.username:grace)\n",
               rc ? flash_strerror(rc) : "ok", (unsigned long long)(a.invalidations - b.invalidations));
        if (rc) printf("       (with the cache down a stale value may stay until its timeout: the caller is told)\n");
        settle(ctx);
    }
    read_user(ctx, 7, "fresh read");
    if (reachable)
        printf("       a stale marker replaced the value: the read went to the database; inside the lag window\n"
               "       (%u ms) the value is not written back, a replica may not have the write yet\n",
               (unsigned)flash_ctx_desc(ctx)->lag_window_ms);
    sleep_ms((int)flash_ctx_desc(ctx)->lag_window_ms + 50);
    read_user(ctx, 7, "after the lag window");
    read_user(ctx, 7, "and again");

    printf("\n4. an outage: a second backend whose only server refuses connections\n");
    {
        flash_memcached_server dead;
        flash_memcached_desc dd;
        flash_cache down;
        flash_ctx *dctx;
        flash_desc ddesc;
        memset(&dead, 0, sizeof dead);
        dead.host = "127.0.0.1";
        dead.port = closed_port();
        memset(&dd, 0, sizeof dd);
        dd.loop = flash_poll_loop(loop);
        dd.servers = &dead;
        dd.server_count = 1;
        dd.connect_timeout_ms = 200;
        down = flash_memcached_create(&dd, &err);
        if (!down.vt) {
            printf("    flash_memcached_create: %s\n", flash_strerror(err));
        } else {
            memset(&ddesc, 0, sizeof ddesc);
            ddesc.cache = down;
            ddesc.key_prefix = prefix;
            dctx = flash_ctx_create(&ddesc);
            flash_poll_attach(dctx, loop);
            flash_ctx_set_source(dctx, NULL, flash_table_source(db));
            printf("    gather of 5 users, server 127.0.0.1:%u down:\n", (unsigned)dead.port);
            gather_users(dctx, 1, 5);
            print_servers(down, &dead, 1);
            printf("    again, within retry_interval_ms (2000): the keys fail fast, without I/O:\n");
            gather_users(dctx, 6, 5);
            print_servers(down, &dead, 1);
            printf("       reads never fail because of the cache (unless flash_desc.fail_on_cache_error);\n"
                   "       nothing is written to a failing server; it is retried after retry_interval_ms\n");
            flash_ctx_destroy(dctx);
            flash_cache_destroy(down);
        }
    }

    {
        flash_stats t = flash_ctx_stats(ctx);
        printf("\ntotals (main context): %llu cache round trips, %llu hits, %llu misses, %llu cache errors, "
               "%llu source calls, %llu fills, %llu invalidations\n",
               (unsigned long long)t.cache_round_trips, (unsigned long long)t.cache_hits,
               (unsigned long long)t.cache_misses, (unsigned long long)t.cache_errors,
               (unsigned long long)t.source_calls, (unsigned long long)t.fills, (unsigned long long)t.invalidations);
        if (!reachable) printf("memcached was unreachable: every read above came from the database (exit 0)\n");
    }
    /* Contexts first, then the backend, then its loop. */
    flash_ctx_destroy(ctx);
    flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    flash_table_destroy(db);
    return 0;
}
