/* mc_cost_bench.c — what a read costs memcached, per key, by command.

   N = 1,000 keys (flash-like names, ~60-byte values with client flags) are
   set once; then each sample sends REQS requests of the N keys over one
   connection (one write per request, replies read to the end marker) with
   one of

     get       get k1 .. kN                  (one command; no CAS token)
     gets      gets k1 .. kN                 (one command; what flash sends)
     mg_v      mg k v      per key, + mn     (pipelined meta, one write)
     mg_vf     mg k v f    per key, + mn     (value + client flags)
     mg_vfc    mg k v f c  per key, + mn     (value + flags + CAS token)

   and reads memcached's `stats` (rusage_user + rusage_system, over a
   connection of its own) before and after: server CPU ns per key. Every
   request checks that all N keys hit (value bytes and the get_hits counter).
   Variants are interleaved, their order rotated per round; each prints
   "<variant> <server_cpu_ns_per_key> <client_wall_ns_per_key>" per round.

   usage: mc_cost_bench PORT [rounds] [reqs_per_sample]   (defaults 11, 200)
   Exit status 0, or 1 when anything failed.
*/
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define N 1000
#define VLEN 60

static unsigned short port;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mc_cost_bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int dial(void) {
    struct sockaddr_in a;
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) die("cannot connect to memcached on %u", port);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void send_all(int fd, const char *b, size_t n) {
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w <= 0) die("write failed");
        b += w;
        n -= (size_t)w;
    }
}

/* Read until the buffer ends with tail; returns the length. */
static char *rbuf;
static size_t rcap;
static size_t read_until(int fd, const char *tail) {
    size_t used = 0, tl = strlen(tail);
    for (;;) {
        ssize_t r;
        if (rcap - used < 65536) {
            rcap = rcap ? rcap * 2 : 1 << 20;
            rbuf = (char *)realloc(rbuf, rcap);
            if (!rbuf) die("out of memory");
        }
        r = read(fd, rbuf + used, rcap - used);
        if (r <= 0) die("read failed");
        used += (size_t)r;
        if (used >= tl && memcmp(rbuf + used - tl, tail, tl) == 0) return used;
    }
}

static double server_cpu(long long *hits) {
    char buf[16384];
    size_t used = 0;
    const char *u, *y, *h;
    int fd = dial();
    send_all(fd, "stats\r\n", 7);
    for (;;) {
        ssize_t r = read(fd, buf + used, sizeof buf - 1 - used);
        if (r <= 0) break;
        used += (size_t)r;
        buf[used] = 0;
        if (strstr(buf, "END\r\n")) break;
    }
    close(fd);
    buf[used] = 0;
    u = strstr(buf, "STAT rusage_user ");
    y = strstr(buf, "STAT rusage_system ");
    h = strstr(buf, "STAT get_hits ");
    if (!u || !y || !h) die("no rusage / get_hits in stats");
    *hits = atoll(h + 14);
    return atof(u + 17) + atof(y + 19);
}

static char keys[N][48];

enum { V_GET, V_GETS, V_MG_V, V_MG_VF, V_MG_VFC, NV };
static const char *vname[NV] = {"get", "gets", "mg_v", "mg_vf", "mg_vfc"};
static char *req[NV];
static size_t reqlen[NV];

static void build(void) {
    int v, i;
    for (v = 0; v < NV; v++) {
        size_t cap = (size_t)N * 80 + 64, len = 0;
        char *b = (char *)malloc(cap);
        if (!b) die("out of memory");
        if (v == V_GET || v == V_GETS) {
            len += (size_t)sprintf(b + len, "%s", v == V_GET ? "get" : "gets");
            for (i = 0; i < N; i++) len += (size_t)sprintf(b + len, " %s", keys[i]);
            len += (size_t)sprintf(b + len, "\r\n");
        } else {
            const char *fl = v == V_MG_V ? " v" : v == V_MG_VF ? " v f" : " v f c";
            for (i = 0; i < N; i++) len += (size_t)sprintf(b + len, "mg %s%s\r\n", keys[i], fl);
            len += (size_t)sprintf(b + len, "mn\r\n");
        }
        req[v] = b;
        reqlen[v] = len;
    }
}

/* One request; checks that every key came back with its value. */
static void one(int fd, int v) {
    size_t len, vals = 0;
    const char *p, *end;
    send_all(fd, req[v], reqlen[v]);
    len = read_until(fd, v <= V_GETS ? "END\r\n" : "MN\r\n");
    end = rbuf + len;
    for (p = rbuf; p < end; p++) { /* count value lines: "VALUE " or "VA " headers */
        if ((v <= V_GETS && end - p > 6 && memcmp(p, "VALUE ", 6) == 0) ||
            (v > V_GETS && end - p > 3 && memcmp(p, "VA ", 3) == 0)) {
            vals++;
            p = memchr(p, '\n', (size_t)(end - p));
            if (!p) break;
            p += VLEN + 2 - 1; /* skip the value and its "\r\n" (loop adds 1) */
        }
    }
    if (vals != N) die("%s: %zu values of %d", vname[v], vals, N);
}

int main(int argc, char **argv) {
    int rounds = argc > 2 ? atoi(argv[2]) : 11, reqs = argc > 3 ? atoi(argv[3]) : 200;
    int fd, i, r, k;
    char value[VLEN + 1];
    if (argc < 2 || !(port = (unsigned short)atoi(argv[1])) || rounds < 1 || reqs < 1)
        die("usage: mc_cost_bench PORT [rounds] [reqs_per_sample]");
    fd = dial();
    memset(value, 'x', VLEN);
    value[VLEN] = 0;
    { /* seed: set with client flags, noreply, then mn to know they are in */
        size_t len = 0;
        char *b = (char *)malloc((size_t)N * 160);
        if (!b) die("out of memory");
        for (i = 0; i < N; i++) {
            snprintf(keys[i], sizeof keys[i], "flash:cost:User:v1:%d", 100000 + i);
            len += (size_t)sprintf(b + len, "set %s 1 0 %d noreply\r\n%s\r\n", keys[i], VLEN, value);
        }
        len += (size_t)sprintf(b + len, "mn\r\n");
        send_all(fd, b, len);
        read_until(fd, "MN\r\n");
        free(b);
    }
    build();
    for (k = 0; k < NV; k++) one(fd, k); /* warm-up */
    printf("keys %d value_bytes %d reqs_per_sample %d\n", N, VLEN, reqs);
    for (r = 0; r < rounds; r++) {
        for (k = 0; k < NV; k++) {
            int v = (k + r) % NV;
            long long h0, h1;
            double c0 = server_cpu(&h0), t0 = now_ns(), t1, c1;
            for (i = 0; i < reqs; i++) one(fd, v);
            t1 = now_ns();
            c1 = server_cpu(&h1);
            if (h1 - h0 != (long long)reqs * N) die("%s: get_hits grew by %lld, not %lld", vname[v], h1 - h0,
                                                    (long long)reqs * N);
            printf("%s %.1f %.1f\n", vname[v], (c1 - c0) * 1e9 / ((double)reqs * N),
                   (t1 - t0) / ((double)reqs * N));
        }
        fflush(stdout);
    }
    close(fd);
    return 0;
}
