/* backends/cache/memcached.h — flash's memcached transport.

   An asynchronous, pipelined memcached client behind the layer-6 cache
   vtable. It speaks memcached's meta protocol (1.6+: ms/md/ma/mn) and the
   text protocol's multi-key `gets` over non-blocking TCP driven by a flash
   loop; no libmemcached at run time.

       flash_memcached_server servers[] = {{"127.0.0.1", 11211, 1}, {"127.0.0.1", 11212, 2}};
       flash_memcached_desc d;
       memset(&d, 0, sizeof d);
       d.loop = flash_poll_loop(poll);           // the loop your contexts use
       d.servers = servers;
       d.server_count = 2;
       int err;
       flash_cache mc = flash_memcached_create(&d, &err);
       ... flash_desc.cache = mc ...
       flash_cache_destroy(mc);                  // after the contexts, before the loop

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.

   WIRE
     One flash_cache_op becomes, for every server that holds one of its keys,
     ONE pipelined request, written with one send. A GET is one text-protocol
     `gets k1 k2 ...` (memcached spends about a third less CPU per key on it
     than on an `mg` per key; the VALUE replies come in request order, then
     END). Other ops are a meta command per key (ms / md / ma, each tagged
     with an opaque O<n>) followed by `mn`. Requests to different servers are
     in flight at once; ops are pipelined on a single connection per server
     and answered in order. op->round_trips is the number of such requests
     (servers touched). ADD is
     `ms ... ME`, CAS is `ms ... C<cas>`, INCR is `ma <key> D<delta> v`, with
     `N<ttl> J<initial>` when create is set (atomic create-or-increment: a
     created key holds `initial`). Quiet ops (op->quiet, not GET) add `q`:
     the server only answers failures. TTLs over 30 days are sent as absolute
     Unix times, so ttl_s always means seconds from now.
     LEASES (FLASH_CACHE_CAP_LEASES): GET items with lease_s > 0 go after the
     server's `gets` as pipelined `mg <key> v c f N<lease_s> t O<n>`, closed by
     `mn`; the W/Z/X returned flags become item.lease and item.stale, and a
     0-byte value (the stub `N` creates) is FLASH_ENOTFOUND; item.ttl_left_ms
     is the `t` flag plus one second (whole seconds, rounded so that an age
     computed from it is never overstated). MARK_STALE is
     `md <key> I T<ttl>`. A store (the winner's `ms ... C<cas>`) replaces a
     stub or a stale value with a fresh one; a write in between changed the
     cas, so a late fill gets FLASH_ENOTSTORED.

   SERVERS AND KEYS
     Keys go to servers by ketama consistent hashing, placing every key on the
     same server as libmemcached with MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED set
     (MD5, 160 points per server scaled by weight, 4 points per digest, points
     named "host-N", or "host:port-N" when port != 11211), for the same server
     list in the same order. flash_memcached_server_for_key() tells which.
     Host names are resolved once, at create (which may block for DNS; give
     IP literals to avoid it).
     GUTTER POOL (desc.gutter): while a server is marked down, its keys' GETs
     (plain and lease) and stores go to the gutter server of the key instead
     (ketama over the gutter list), with TTLs capped at gutter_ttl_s (no
     expiry becomes the cap); DELETE, MARK_STALE and INCR are never sent
     there and fail fast as before. The keys of the request that found the
     server dead fail with it (FLASH_EBACKEND or FLASH_ETIMEDOUT); so do the
     keys of the one op that retries it every retry_interval_ms. A down
     gutter server fails its keys fast too.

   STATUSES (per item; op->status is 0 unless the whole op failed)
     FLASH_OK, FLASH_ENOTFOUND (miss; CAS/DELETE/INCR on an absent key),
     FLASH_ENOTSTORED (ADD on an existing key, CAS after a change),
     FLASH_EINVAL (empty or NULL key, key with a space or control byte, value
     NULL with a length, INCR on a value that is not a number),
     FLASH_ETOOLARGE (key over 250 bytes, value over max_value, or the server's
     "object too large"), FLASH_EBACKEND (server down, refused, closed the
     connection, I/O error), FLASH_ETIMEDOUT (connect or request timeout),
     FLASH_EPROTO (garbage, a value longer than announced, a missing
     terminator), FLASH_ENOMEM. A bad key or value fails only its own item. A server error
     fails only that server's keys: garbage resets the connection (the next op
     reconnects at once); a refused or lost connection with requests on it, or
     a timeout, also marks the server down, and its keys then fail fast with
     FLASH_EBACKEND, without I/O, until retry_interval_ms has passed, when the
     next op that needs it reconnects. An idle connection the server closes is
     simply reopened on next use.
     Quiet ops: keys the server does not complain about are FLASH_OK; an error
     line the server sends without naming a key sets op->status.

   CONTRACT
     submit() never calls done(); done() runs from the loop (a deferred call),
     exactly once per op unless the op is cancelled. GET values are copies
     owned by the backend, valid until done() returns. After cancel() the op
     and its items are never touched again; replies for it are still read and
     thrown away. destroy() calls done() for every op not cancelled: ops whose
     replies were all in keep their statuses; the others get FLASH_ECANCELED
     (op->status and every unanswered item). So destroy contexts (which cancel
     their ops) before the backend, or destroy the backend first while its
     contexts are alive. Never submit, cancel or destroy from inside a done()
     that destroy() is running, and never destroy the backend from inside any
     done(). Destroy the backend before its loop. Single-threaded: use it from
     the loop's thread. The backend ignores submit()'s loop argument: desc.loop
     (the loop the contexts are attached to) drives everything. It uses
     op->priv[0] and priv[1].

   The connection itself (buffers, the FIFO of requests, deadlines, down
   marking, deferred done() calls) is backends/cache/pipeline.h, shared
   with the other network transport; this file is the protocol.

   LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_MEMCACHED_H
#define FLASH_MEMCACHED_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_memcached_server {
    const char *host; /* required: IP literal or host name (copied) */
    uint16_t port;    /* default: 11211 */
    uint32_t weight;  /* default: 1 */
} flash_memcached_server;

/* Zero-initialise; every zero field means its default. */
typedef struct flash_memcached_desc {
    flash_loop loop;                       /* required: its fd watches, timers and
                                              defers drive every connection */
    const flash_memcached_server *servers; /* required (copied) */
    size_t server_count;                   /* required, >= 1 */
    uint32_t connect_timeout_ms;           /* default: 1000 */
    uint32_t timeout_ms;                   /* default: 1000, per request, from send */
    uint32_t retry_interval_ms;            /* default: 2000, a down server's rest */
    size_t max_value;                      /* default: 1 MiB, largest value stored or read */
    flash_allocator allocator;             /* default: malloc / free */
    /* Gutter pool (Facebook's memcache paper): a small second pool that takes
       the keys of a server while it is marked down, so that its keys do not
       all fall through to the database. Reads and fills go to the gutter
       server of the key (ketama over the gutter list) with their TTLs capped
       at gutter_ttl_s; invalidations (DELETE, MARK_STALE) and INCR are not
       sent to it: they fail fast with FLASH_EBACKEND as without a gutter,
       and the short TTL bounds how long the gutter serves a value a write
       changed. */
    const flash_memcached_server *gutter;  /* default: none (copied) */
    size_t gutter_count;
    uint32_t gutter_ttl_s;                 /* default: 10 */
} flash_memcached_desc;

/* Per-server counters (cumulative), for tests and monitoring. */
typedef struct flash_memcached_stats {
    uint64_t requests;     /* pipelined requests sent (one per op touching the server) */
    uint64_t keys;         /* commands sent */
    uint64_t connects;     /* connections established */
    uint64_t reconnects;   /* connections established after the first one */
    uint64_t failures;     /* connections refused or lost with requests in flight */
    uint64_t timeouts;     /* connect or request timeouts */
    uint64_t proto_errors; /* garbage replies (connection reset) */
    uint64_t fast_fails;   /* keys failed without I/O while the server was down */
    bool connected;        /* a connection is open now */
    bool down;             /* marked down now */
    uint64_t gutter_keys;  /* keys of this server sent to the gutter pool while it was down */
} flash_memcached_stats;

/* A memcached backend, or {NULL, NULL} with *error (when error is not NULL)
   set to FLASH_EINVAL (bad desc, a host that does not resolve) or
   FLASH_ENOMEM. Connections are opened on first use. */
FLASH_API flash_cache flash_memcached_create(const flash_memcached_desc *desc, int *error);
/* The index (in desc->servers) of the server that holds key, or FLASH_EINVAL
   when cache is not a memcached backend. */
FLASH_API int flash_memcached_server_for_key(flash_cache cache, const char *key, size_t len);
/* Counters of one server: 0 .. server_count-1 the servers, then
   server_count .. server_count+gutter_count-1 the gutter servers.
   FLASH_EINVAL for a bad cache or index. */
FLASH_API int flash_memcached_server_stats(flash_cache cache, size_t server, flash_memcached_stats *out);

/* The reply parser, a pure function over a buffer (exposed for fuzzing). */
enum {
    FLASH_MEMCACHED_VA = 1,    /* value follows */
    FLASH_MEMCACHED_HD,        /* success, no value */
    FLASH_MEMCACHED_EN,        /* miss */
    FLASH_MEMCACHED_NF,        /* not found */
    FLASH_MEMCACHED_NS,        /* not stored */
    FLASH_MEMCACHED_EX,        /* exists (CAS mismatch) */
    FLASH_MEMCACHED_MN,        /* end of a pipeline */
    FLASH_MEMCACHED_VALUE,     /* text protocol: VALUE <key> <flags> <bytes> [<cas>], value follows */
    FLASH_MEMCACHED_END,       /* text protocol: end of a get's values */
    FLASH_MEMCACHED_ERROR,     /* unknown command */
    FLASH_MEMCACHED_CLIENT_ERROR,
    FLASH_MEMCACHED_SERVER_ERROR
};
typedef struct flash_memcached_reply {
    int kind;               /* FLASH_MEMCACHED_* */
    bool has_opaque, has_flags, has_cas;
    uint32_t opaque;        /* O<n> */
    uint32_t flags;         /* f<n> */
    uint64_t cas;           /* c<n> */
    const char *key;        /* VALUE: the key, inside buf */
    size_t key_len;
    const char *value;      /* VA / VALUE: the data block, inside buf (NULL when skip) */
    size_t value_len;
    bool skip;              /* VA / VALUE over max_value: only the header was
                               consumed; value_len bytes and "\r\n" follow, to discard */
    const char *message;    /* error lines: the text after the code */
    size_t message_len;
    bool win, stale, lost;  /* meta returned flags W (you won the recache), X
                               (stale), Z (someone else won it) */
    bool has_ttl;
    int64_t ttl;            /* t<n>: remaining seconds, -1 none */
} flash_memcached_reply;
/* Parse one reply at the start of buf. Returns the bytes it takes (> 0),
   0 when buf holds only part of it, or FLASH_EPROTO for garbage: an unknown
   code, a malformed token, a line over 4 KiB, a data block not followed by
   "\r\n". */
FLASH_API ptrdiff_t flash_memcached_parse(const char *buf, size_t len, size_t max_value,
                                          flash_memcached_reply *out);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_MEMCACHED_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_MEMCACHED_IMPLEMENTED
#define FLASH_MEMCACHED_IMPLEMENTED
#include "pipeline.h" /* the connection: buffers, FIFO, timeouts, failures */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FLASH__MC_MAX_LINE 4096
#define FLASH__MC_BLOCK 16384

/* ---- MD5 (RFC 1321), for ketama ----------------------------------------- */

static const uint32_t flash__mc_md5_k[64] = {
    0xd76aa478u, 0xe8c7b756u, 0x242070dbu, 0xc1bdceeeu, 0xf57c0fafu, 0x4787c62au, 0xa8304613u, 0xfd469501u,
    0x698098d8u, 0x8b44f7afu, 0xffff5bb1u, 0x895cd7beu, 0x6b901122u, 0xfd987193u, 0xa679438eu, 0x49b40821u,
    0xf61e2562u, 0xc040b340u, 0x265e5a51u, 0xe9b6c7aau, 0xd62f105du, 0x02441453u, 0xd8a1e681u, 0xe7d3fbc8u,
    0x21e1cde6u, 0xc33707d6u, 0xf4d50d87u, 0x455a14edu, 0xa9e3e905u, 0xfcefa3f8u, 0x676f02d9u, 0x8d2a4c8au,
    0xfffa3942u, 0x8771f681u, 0x6d9d6122u, 0xfde5380cu, 0xa4beea44u, 0x4bdecfa9u, 0xf6bb4b60u, 0xbebfbc70u,
    0x289b7ec6u, 0xeaa127fau, 0xd4ef3085u, 0x04881d05u, 0xd9d4d039u, 0xe6db99e5u, 0x1fa27cf8u, 0xc4ac5665u,
    0xf4292244u, 0x432aff97u, 0xab9423a7u, 0xfc93a039u, 0x655b59c3u, 0x8f0ccc92u, 0xffeff47du, 0x85845dd1u,
    0x6fa87e4fu, 0xfe2ce6e0u, 0xa3014314u, 0x4e0811a1u, 0xf7537e82u, 0xbd3af235u, 0x2ad7d2bbu, 0xeb86d391u,
};
static const unsigned char flash__mc_md5_r[16] = {7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21};

static void flash__mc_md5_block(uint32_t h[4], const unsigned char *p) {
    uint32_t m[16], a = h[0], b = h[1], c = h[2], d = h[3];
    int i;
    for (i = 0; i < 16; i++)
        m[i] = (uint32_t)p[i * 4] | (uint32_t)p[i * 4 + 1] << 8 | (uint32_t)p[i * 4 + 2] << 16 |
               (uint32_t)p[i * 4 + 3] << 24;
    for (i = 0; i < 64; i++) {
        uint32_t f, t;
        int g;
        switch (i >> 4) {
        case 0: f = (b & c) | (~b & d); g = i; break;
        case 1: f = (d & b) | (~d & c); g = (5 * i + 1) & 15; break;
        case 2: f = b ^ c ^ d; g = (3 * i + 5) & 15; break;
        default: f = c ^ (b | ~d); g = (7 * i) & 15; break;
        }
        t = a + f + flash__mc_md5_k[i] + m[g];
        a = d;
        d = c;
        c = b;
        {
            unsigned s = flash__mc_md5_r[((i >> 4) << 2) | (i & 3)];
            b = b + ((t << s) | (t >> (32 - s)));
        }
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
}

static void flash__mc_md5(const void *data, size_t len, unsigned char out[16]) {
    uint32_t h[4] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u};
    const unsigned char *p = (const unsigned char *)data;
    unsigned char tail[128];
    size_t rest = len, n, i;
    uint64_t bits = (uint64_t)len * 8;
    while (rest >= 64) {
        flash__mc_md5_block(h, p);
        p += 64;
        rest -= 64;
    }
    memset(tail, 0, sizeof tail);
    if (rest) memcpy(tail, p, rest);
    tail[rest] = 0x80;
    n = rest + 1 + 8 <= 64 ? 64 : 128;
    for (i = 0; i < 8; i++) tail[n - 8 + i] = (unsigned char)(bits >> (8 * i));
    flash__mc_md5_block(h, tail);
    if (n == 128) flash__mc_md5_block(h, tail + 64);
    for (i = 0; i < 16; i++) out[i] = (unsigned char)(h[i / 4] >> (8 * (i % 4)));
}

/* ---- reply parser -------------------------------------------------------- */

/* Decimal digits [p, end) into *out; false when empty, not digits or over max. */
static bool flash__mc_num(const char *p, const char *end, uint64_t max, uint64_t *out) {
    uint64_t v = 0;
    if (p >= end) return false;
    for (; p < end; p++) {
        unsigned d = (unsigned)(unsigned char)*p - '0';
        if (d > 9 || v > (max - d) / 10) return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

/* A decimal token at p, up to a space or end, without a check per digit
   (19 digits cannot wrap; longer ones take flash__mc_num): where it ends,
   or NULL when it is empty, not digits up to there, or over max. */
static inline const char *flash__mc_dec(const char *p, const char *end, uint64_t max, uint64_t *out) {
    const char *s = p;
    uint64_t v = 0;
    unsigned d;
    while (p < end && (d = (unsigned)(unsigned char)*p - '0') <= 9) {
        v = v * 10 + d;
        p++;
    }
    if (p == s || (p - s > 19 ? !flash__mc_num(s, p, max, &v) : v > max)) return NULL;
    *out = v;
    return p;
}

/* The data block of a VA / VALUE reply whose line takes header bytes. */
static ptrdiff_t flash__mc_data(const char *buf, size_t len, size_t header, size_t max_value,
                                 flash_memcached_reply *r) {
    if (r->value_len > max_value) {
        r->skip = true;
        return (ptrdiff_t)header;
    }
    if (len - header < r->value_len + 2) return 0;
    if (buf[header + r->value_len] != '\r' || buf[header + r->value_len + 1] != '\n') return FLASH_EPROTO;
    r->value = buf + header;
    return (ptrdiff_t)(header + r->value_len + 2);
}

FLASH_API ptrdiff_t flash_memcached_parse(const char *buf, size_t len, size_t max_value,
                                          flash_memcached_reply *r) {
    const char *nl, *p, *end, *tok;
    size_t scan = len < FLASH__MC_MAX_LINE ? len : FLASH__MC_MAX_LINE, header, clen;
    uint64_t v;
    memset(r, 0, sizeof *r);
    if (!buf) return len ? FLASH_EPROTO : 0;
    nl = (const char *)memchr(buf, '\n', scan);
    if (!nl) return len >= FLASH__MC_MAX_LINE ? FLASH_EPROTO : 0;
    if (nl == buf || nl[-1] != '\r') return FLASH_EPROTO;
    end = nl - 1;
    header = (size_t)(nl - buf) + 1;
    if (end - buf > 6 && memcmp(buf, "VALUE ", 6) == 0) {
        /* A get's value, the reply of every key read: "VALUE <key> <flags>
           <bytes>[ <cas>]", one pass over it (the same rules as the
           general path below: tokens of one space each, a key of 1..250
           bytes and no control byte, numbers in range). */
        const char *k = buf + 6;
        size_t klen = flash__pipe_key_span(k, (size_t)(end - k));
        p = k + klen;
        if (!klen || klen > 250 || p == end || *p != ' ') return FLASH_EPROTO;
        p = flash__mc_dec(p + 1, end, UINT32_MAX, &v);
        if (!p || p == end || *p != ' ') return FLASH_EPROTO;
        r->flags = (uint32_t)v;
        p = flash__mc_dec(p + 1, end, (uint64_t)1 << 40, &v);
        if (!p) return FLASH_EPROTO;
        r->value_len = (size_t)v;
        if (p != end) {
            if (*p != ' ') return FLASH_EPROTO;
            p = flash__mc_dec(p + 1, end, UINT64_MAX, &v);
            if (p != end) return FLASH_EPROTO; /* also NULL: a bad token */
            r->has_cas = true;
            r->cas = v;
        }
        r->kind = FLASH_MEMCACHED_VALUE;
        r->key = k;
        r->key_len = klen;
        r->has_flags = true;
        return flash__mc_data(buf, len, header, max_value, r);
    }
    tok = (const char *)memchr(buf, ' ', (size_t)(end - buf));
    if (!tok) tok = end;
    clen = (size_t)(tok - buf);
    if (clen == 2) {
        static const char codes[] = "VAHDENNFNSEXMN";
        int i;
        for (i = 0; i < 7; i++)
            if (buf[0] == codes[2 * i] && buf[1] == codes[2 * i + 1]) break;
        if (i == 7) return FLASH_EPROTO;
        r->kind = FLASH_MEMCACHED_VA + i;
    } else if (clen == 5 && memcmp(buf, "VALUE", 5) == 0) {
        r->kind = FLASH_MEMCACHED_VALUE;
    } else if (clen == 3 && memcmp(buf, "END", 3) == 0) {
        if (tok != end) return FLASH_EPROTO;
        r->kind = FLASH_MEMCACHED_END;
        return (ptrdiff_t)header;
    } else if (clen == 5 && memcmp(buf, "ERROR", 5) == 0) {
        r->kind = FLASH_MEMCACHED_ERROR;
    } else if (clen == 12 && memcmp(buf, "CLIENT_ERROR", 12) == 0) {
        r->kind = FLASH_MEMCACHED_CLIENT_ERROR;
    } else if (clen == 12 && memcmp(buf, "SERVER_ERROR", 12) == 0) {
        r->kind = FLASH_MEMCACHED_SERVER_ERROR;
    } else {
        return FLASH_EPROTO;
    }
    if (r->kind >= FLASH_MEMCACHED_ERROR) {
        r->message = tok < end ? tok + 1 : tok;
        r->message_len = (size_t)(end - r->message);
        return (ptrdiff_t)header;
    }
    p = tok;
    if (r->kind == FLASH_MEMCACHED_VALUE) { /* " <key> <flags> <bytes>[ <cas>]" */
        const char *s[4], *e[4];
        int n = 0;
        while (p < end && n < 4) {
            if (*p != ' ' || p + 1 >= end) return FLASH_EPROTO;
            s[n] = ++p;
            while (p < end && *p != ' ') p++;
            if (p == s[n]) return FLASH_EPROTO; /* an empty token */
            e[n++] = p;
        }
        if (p != end || n < 3 || e[0] - s[0] > 250) return FLASH_EPROTO;
        for (const char *q = s[0]; q < e[0]; q++)
            if ((unsigned char)*q < ' ' || (unsigned char)*q == 127) return FLASH_EPROTO;
        r->key = s[0];
        r->key_len = (size_t)(e[0] - s[0]);
        if (!flash__mc_num(s[1], e[1], UINT32_MAX, &v)) return FLASH_EPROTO;
        r->has_flags = true;
        r->flags = (uint32_t)v;
        if (!flash__mc_num(s[2], e[2], (uint64_t)1 << 40, &v)) return FLASH_EPROTO;
        r->value_len = (size_t)v;
        if (n == 4) {
            if (!flash__mc_num(s[3], e[3], UINT64_MAX, &v)) return FLASH_EPROTO;
            r->has_cas = true;
            r->cas = v;
        }
        p = end;
    } else if (r->kind == FLASH_MEMCACHED_VA) {
        const char *s;
        if (p >= end) return FLASH_EPROTO;
        s = ++p;
        while (p < end && *p != ' ') p++;
        if (!flash__mc_num(s, p, (uint64_t)1 << 40, &v)) return FLASH_EPROTO;
        r->value_len = (size_t)v;
    }
    while (p < end) { /* flags: " <letter><token>" */
        const char *s = ++p;
        while (p < end && *p != ' ') p++;
        if (p == s) return FLASH_EPROTO;
        switch (*s) {
        case 'O':
            if (!flash__mc_num(s + 1, p, UINT32_MAX, &v)) return FLASH_EPROTO;
            r->has_opaque = true;
            r->opaque = (uint32_t)v;
            break;
        case 'f':
            if (!flash__mc_num(s + 1, p, UINT32_MAX, &v)) return FLASH_EPROTO;
            r->has_flags = true;
            r->flags = (uint32_t)v;
            break;
        case 'c':
            if (!flash__mc_num(s + 1, p, UINT64_MAX, &v)) return FLASH_EPROTO;
            r->has_cas = true;
            r->cas = v;
            break;
        case 't':
            if (p - s == 3 && s[1] == '-' && s[2] == '1') {
                r->ttl = -1;
            } else {
                if (!flash__mc_num(s + 1, p, INT32_MAX, &v)) return FLASH_EPROTO;
                r->ttl = (int64_t)v;
            }
            r->has_ttl = true;
            break;
        case 'W':
        case 'X':
        case 'Z':
            if (p != s + 1) return FLASH_EPROTO; /* no token follows them */
            if (*s == 'W') r->win = true;
            else if (*s == 'X') r->stale = true;
            else r->lost = true;
            break;
        default:
            /* other returned flags (k, t, s, ...): printable tokens */
            if ((unsigned char)*s <= ' ' || (unsigned char)*s >= 127) return FLASH_EPROTO;
            break;
        }
    }
    if (r->kind == FLASH_MEMCACHED_MN && tok != end) return FLASH_EPROTO;
    if (r->kind != FLASH_MEMCACHED_VA && r->kind != FLASH_MEMCACHED_VALUE) return (ptrdiff_t)header;
    return flash__mc_data(buf, len, header, max_value, r);
}

/* ---- state ----------------------------------------------------------------- */

typedef struct flash__mc flash__mc;
typedef struct flash__mc_server flash__mc_server;
typedef struct flash__mc_opstate flash__mc_opstate;

/* One server's share of one op: its commands, answered in order. */
typedef struct flash__mc_req {
    flash__pipe_req in_pipe;    /* first: the server's in-flight FIFO, deadline */
    flash__mc_opstate *os;
    uint32_t *idx;              /* item indices, in command order */
    uint32_t count, pos;        /* commands; the next one not yet answered */
    uint32_t base;              /* opaque of the first command */
    uint32_t nplain;            /* GET: the first nplain keys go in one `gets`,
                                   the others (lease reads) as `mg ... N` */
    uint32_t ttl_cap;           /* a gutter server's request: TTLs at most this; 0 none */
    bool gets_done;             /* GET: the `gets` part is answered (its END) */
} flash__mc_req;

typedef struct flash__mc_block {
    struct flash__mc_block *next;
    size_t cap, used;
} flash__mc_block;

struct flash__mc_opstate {
    flash__mc_opstate *prev, *next; /* every live opstate */
    flash__pipe_fin fin;            /* in the queue of finished ops */
    flash_cache_op *op;             /* NULL once cancelled */
    flash_cache_opcode code;
    bool quiet;
    uint32_t pending;               /* requests not complete */
    flash__mc_block *blocks;        /* GET values */
    flash__mc_req *reqs;
};

struct flash__mc_server {
    flash__mc *mc;
    char *host;
    uint16_t port;
    uint32_t weight;
    flash__pipe pipe;               /* the connection */
    uint32_t next_opaque;
    flash_memcached_stats stats;    /* requests, keys, fast_fails (the rest: pipe.counts) */
};

typedef struct flash__mc_point {
    uint32_t value, index;
} flash__mc_point;

struct flash__mc {
    flash_allocator alloc;
    uint32_t connect_timeout_ms, timeout_ms, retry_interval_ms;
    size_t max_value;
    flash__mc_server *servers;
    size_t nservers;                /* the servers, then the gutter servers */
    size_t nprimary;                /* the servers: points index them */
    flash__mc_point *points;
    size_t npoints;
    flash__mc_point *gpoints;       /* the gutter pool's continuum (server indices >= nprimary) */
    size_t ngpoints;
    uint32_t gutter_ttl_s;
    flash__mc_opstate *live;
    flash__pipe_finq finished;      /* done() calls, from the loop */
};


static void *flash__mc_alloc(flash__mc *mc, size_t n) { return mc->alloc.alloc(n, mc->alloc.user_data); }
static void flash__mc_free(flash__mc *mc, void *p) {
    if (p) mc->alloc.free(p, mc->alloc.user_data);
}
/* ---- ketama ------------------------------------------------------------------ */

static int flash__mc_point_cmp(const void *a, const void *b) {
    const flash__mc_point *x = (const flash__mc_point *)a, *y = (const flash__mc_point *)b;
    if (x->value != y->value) return x->value < y->value ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* libmemcached's weighted ketama: per server floor(w/total * 160/4 * n) * 4
   points computed in float, from MD5("host-i") (or "host:port-i"), four
   little-endian words per digest; sorted by (value, server). */
static int flash__mc_build_continuum(flash__mc *mc, size_t first, size_t count, flash__mc_point **out,
                                     size_t *nout) {
    uint64_t total = 0;
    size_t i, n = 0;
    flash__mc_point *points;
    uint32_t *per = (uint32_t *)flash__mc_alloc(mc, count * sizeof *per);
    if (!per) return FLASH_ENOMEM;
    for (i = 0; i < count; i++) total += mc->servers[first + i].weight;
    for (i = 0; i < count; i++) {
        /* volatile: keep each float step rounded as libmemcached's is (no FMA) */
        volatile float pct = (float)mc->servers[first + i].weight / (float)total;
        volatile float x = pct * 160;
        x = x / 4;
        x = x * (float)count;
        x = x + 0.0000000001F;
        per[i] = (uint32_t)x * 4; /* x > 0: truncation is floor */
        n += per[i];
    }
    *out = points = (flash__mc_point *)flash__mc_alloc(mc, (n ? n : 1) * sizeof *points);
    if (!points) {
        flash__mc_free(mc, per);
        return FLASH_ENOMEM;
    }
    *nout = 0;
    for (i = 0; i < count; i++) {
        const flash__mc_server *s = &mc->servers[first + i];
        uint32_t h, k;
        for (h = 0; h < per[i] / 4; h++) {
            char name[320];
            unsigned char d[16];
            int len = s->port == 11211 ? snprintf(name, sizeof name, "%s-%u", s->host, (unsigned)h)
                                       : snprintf(name, sizeof name, "%s:%u-%u", s->host, (unsigned)s->port,
                                                  (unsigned)h);
            if (len < 0 || (size_t)len >= sizeof name) len = (int)sizeof name - 1;
            flash__mc_md5(name, (size_t)len, d);
            for (k = 0; k < 4; k++) {
                flash__mc_point *pt = &points[(*nout)++];
                pt->value = (uint32_t)d[k * 4] | (uint32_t)d[k * 4 + 1] << 8 | (uint32_t)d[k * 4 + 2] << 16 |
                            (uint32_t)d[k * 4 + 3] << 24;
                pt->index = (uint32_t)(first + i);
            }
        }
    }
    flash__mc_free(mc, per);
    qsort(points, *nout, sizeof *points, flash__mc_point_cmp);
    return FLASH_OK;
}

static uint32_t flash__mc_point_of(const flash__mc_point *points, size_t npoints, size_t count, uint32_t first,
                                   const char *key, size_t len) {
    unsigned char d[16];
    uint32_t h;
    size_t lo = 0, hi = npoints;
    if (count == 1 || !npoints) return first;
    flash__mc_md5(key, len, d);
    h = (uint32_t)d[0] | (uint32_t)d[1] << 8 | (uint32_t)d[2] << 16 | (uint32_t)d[3] << 24;
    while (lo < hi) { /* first point >= h, wrapping to the first */
        size_t mid = lo + (hi - lo) / 2;
        if (points[mid].value < h) lo = mid + 1;
        else hi = mid;
    }
    return points[lo == npoints ? 0 : lo].index;
}

static uint32_t flash__mc_server_of(const flash__mc *mc, const char *key, size_t len) {
    return flash__mc_point_of(mc->points, mc->npoints, mc->nprimary, 0, key, len);
}

/* The gutter server that takes key while its server is down. */
static uint32_t flash__mc_gutter_of(const flash__mc *mc, const char *key, size_t len) {
    return flash__mc_point_of(mc->gpoints, mc->ngpoints, mc->nservers - mc->nprimary, (uint32_t)mc->nprimary, key,
                              len);
}

/* ---- op completion ---------------------------------------------------------- */

static void flash__mc_opstate_free(flash__mc *mc, flash__mc_opstate *os) {
    flash__mc_block *b = os->blocks;
    while (b) {
        flash__mc_block *n = b->next;
        flash__mc_free(mc, b);
        b = n;
    }
    if (os->prev) os->prev->next = os->next;
    else mc->live = os->next;
    if (os->next) os->next->prev = os->prev;
    flash__mc_free(mc, os);
}

static void *flash__mc_value_alloc(flash__mc *mc, flash__mc_opstate *os, size_t n) {
    flash__mc_block *b = os->blocks;
    char *p;
    n = (n + 7) & ~(size_t)7;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > FLASH__MC_BLOCK ? n : FLASH__MC_BLOCK;
        b = (flash__mc_block *)flash__mc_alloc(mc, sizeof *b + cap);
        if (!b) return NULL;
        b->cap = cap;
        b->used = 0;
        b->next = os->blocks;
        os->blocks = b;
    }
    p = (char *)(b + 1) + b->used;
    b->used += n;
    return p;
}

/* done() unless cancelled, then free (the finished queue's callback). */
static void flash__mc_finish(void *owner, flash__pipe_fin *f) {
    flash__mc_opstate *os = (flash__mc_opstate *)((char *)f - offsetof(flash__mc_opstate, fin));
    flash_cache_op *op = os->op;
    if (op) {
        op->priv[0] = NULL;
        op->done(op);
    }
    flash__mc_opstate_free((flash__mc *)owner, os);
}

static void flash__mc_req_complete(flash__mc *mc, flash__mc_req *req) {
    flash__mc_opstate *os = req->os;
    if (--os->pending) return;
    if (os->op) flash__pipe_finished(&mc->finished, &os->fin);
    else flash__mc_opstate_free(mc, os);
}

static void flash__mc_set_status(flash__mc_req *req, uint32_t k, int code) {
    flash_cache_op *op = req->os->op;
    if (op) op->items[req->idx[k]].status = code;
}

/* ---- replies ------------------------------------------------------------------- */

static bool flash__mc_starts(const char *p, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && memcmp(p, prefix, k) == 0;
}

/* Map an error line to an item status. */
static int flash__mc_error_code(const flash_memcached_reply *r) {
    if (r->kind == FLASH_MEMCACHED_SERVER_ERROR)
        return flash__mc_starts(r->message, r->message_len, "object too large") ? FLASH_ETOOLARGE : FLASH_EBACKEND;
    /* CLIENT_ERROR: the command was refused, e.g. incr on a non-number */
    if (flash__mc_starts(r->message, r->message_len, "cannot increment")) return FLASH_EINVAL;
    return FLASH_EPROTO;
}

/* The head request has all its replies. */
static void flash__mc_req_done(flash__mc_server *s, flash__mc_req *req) {
    s->pipe.head = req->in_pipe.next;
    if (!s->pipe.head) s->pipe.tail = NULL;
    flash__mc_req_complete(s->mc, req);
    flash__pipe_arm_timer(&s->pipe);
}

/* A copy of a value for item it of os; the item's status. */
static int flash__mc_take_value(flash__mc *mc, flash__mc_opstate *os, flash_cache_item *it,
                                const flash_memcached_reply *r) {
    char *v;
    if (r->skip) return FLASH_ETOOLARGE;
    if (!it) return FLASH_OK;
    v = (char *)flash__mc_value_alloc(mc, os, r->value_len + 1);
    if (!v) return FLASH_ENOMEM;
    if (r->value_len) memcpy(v, r->value, r->value_len);
    v[r->value_len] = 0;
    it->value = v;
    it->value_len = r->value_len;
    it->flags = r->flags;
    it->cas = r->cas;
    return FLASH_OK;
}

/* The reply to one lease read, `mg <key> v c f N<ttl> t O<n>`: VA with W (won:
   a stub we created, or a stale value to refresh), Z (someone else holds the
   lease), X (stale); EN only if the server could not create the stub. */
static int flash__mc_apply_lease(flash__mc_server *s, flash__mc_req *req, const flash_memcached_reply *r) {
    flash__mc_opstate *os = req->os;
    flash_cache_item *it;
    uint32_t j;
    if (r->kind == FLASH_MEMCACHED_MN) {
        if (req->pos != req->count) return FLASH_EPROTO;
        flash__mc_req_done(s, req);
        return FLASH_OK;
    }
    if (r->kind == FLASH_MEMCACHED_CLIENT_ERROR || r->kind == FLASH_MEMCACHED_SERVER_ERROR) {
        if (req->pos >= req->count) return FLASH_EPROTO;
        flash__mc_set_status(req, req->pos++, flash__mc_error_code(r));
        return FLASH_OK;
    }
    if ((r->kind != FLASH_MEMCACHED_VA && r->kind != FLASH_MEMCACHED_EN) || !r->has_opaque) return FLASH_EPROTO;
    j = r->opaque - req->base;
    if (j != req->pos || j >= req->count) return FLASH_EPROTO;
    req->pos++;
    it = os->op ? &os->op->items[req->idx[j]] : NULL;
    if (r->kind == FLASH_MEMCACHED_EN) {
        if (it) it->status = FLASH_ENOTFOUND;
        return FLASH_OK;
    }
    if (!r->has_cas) return FLASH_EPROTO;
    if (!it) return FLASH_OK;
    it->status = flash__mc_take_value(s->mc, os, it, r);
    it->lease = (uint8_t)(r->win ? FLASH_LEASE_WON : r->lost ? FLASH_LEASE_LOST : FLASH_LEASE_NONE);
    it->stale = r->stale;
    /* memcached counts whole seconds on a clock that ticks once a second:
       the true remaining lifetime is at most t s, and the time since the
       TTL was set at least (TTL - t - 1) s; report t + 1 s, so that
       "TTL minus ttl_left" never overstates an age (the lag window). */
    it->ttl_left_ms = !r->has_ttl ? 0 : r->ttl < 0 ? -1 : (r->ttl + 1) * 1000;
    if (!it->status && !it->value_len) { /* a stub: no value yet */
        it->status = FLASH_ENOTFOUND;
        it->value = NULL;
    }
    return FLASH_OK;
}

/* A GET request is one `gets k1 k2 ...`: a VALUE for each key found, in the
   request's order, then END; the keys without one are misses. (A cancelled
   op's keys are gone: its VALUEs are only read past.) Lease reads follow it
   as pipelined `mg`s closed by `mn`. */
static int flash__mc_apply_get(flash__mc_server *s, flash__mc_req *req, const flash_memcached_reply *r) {
    flash__mc_opstate *os = req->os;
    flash_cache_item *it;
    uint32_t k;
    if (req->gets_done) return flash__mc_apply_lease(s, req, r);
    if (r->kind == FLASH_MEMCACHED_END) {
        while (req->pos < req->nplain) flash__mc_set_status(req, req->pos++, FLASH_ENOTFOUND);
        req->gets_done = true;
        if (req->nplain == req->count) flash__mc_req_done(s, req);
        return FLASH_OK;
    }
    if (r->kind != FLASH_MEMCACHED_VALUE || !r->has_cas) return FLASH_EPROTO;
    if (!os->op) return FLASH_OK;
    k = req->pos;
    it = k < req->nplain ? &os->op->items[req->idx[k]] : NULL;
    if (!it || it->key_len != r->key_len || memcmp(it->key, r->key, r->key_len) != 0) {
        /* Not the next key asked (the usual case: all hits): a miss or
           more before it. */
        for (k = req->pos + 1; k < req->nplain; k++) {
            const flash_cache_item *want = &os->op->items[req->idx[k]];
            if (want->key_len == r->key_len && memcmp(want->key, r->key, r->key_len) == 0) break;
        }
        /* A key nobody asked for, or out of order: garbage, and the keys not
           yet answered fail with it (they are not known to be misses). */
        if (k >= req->nplain) return FLASH_EPROTO;
        while (req->pos < k) flash__mc_set_status(req, req->pos++, FLASH_ENOTFOUND);
        it = &os->op->items[req->idx[k]];
    }
    req->pos++;
    it->status = flash__mc_take_value(s->mc, os, it, r);
    return FLASH_OK;
}

/* Apply one reply to the head request; FLASH_EPROTO when it does not fit. */
static int flash__mc_apply(flash__mc_server *s, const flash_memcached_reply *r) {
    flash__mc_req *req = (flash__mc_req *)s->pipe.head;
    flash__mc_opstate *os = req->os;
    flash_cache_item *it;
    uint32_t j;
    int st;
    if (os->code == FLASH_CACHE_GET) return flash__mc_apply_get(s, req, r);
    if (r->kind == FLASH_MEMCACHED_MN) {
        if (!os->quiet && req->pos != req->count) return FLASH_EPROTO;
        flash__mc_req_done(s, req);
        return FLASH_OK;
    }
    if (r->kind == FLASH_MEMCACHED_ERROR) return FLASH_EPROTO;
    if (r->kind == FLASH_MEMCACHED_CLIENT_ERROR || r->kind == FLASH_MEMCACHED_SERVER_ERROR) {
        if (os->quiet) { /* the key is not named: tell the op */
            if (os->op && !os->op->status) os->op->status = flash__mc_error_code(r);
            return FLASH_OK;
        }
        if (req->pos >= req->count) return FLASH_EPROTO;
        flash__mc_set_status(req, req->pos++, flash__mc_error_code(r));
        return FLASH_OK;
    }
    if (!r->has_opaque) return FLASH_EPROTO;
    j = r->opaque - req->base;
    if (j >= req->count || j < req->pos || (!os->quiet && j != req->pos)) return FLASH_EPROTO;
    req->pos = j + 1;
    it = os->op ? &os->op->items[req->idx[j]] : NULL;
    if (os->code == FLASH_CACHE_INCR && r->kind == FLASH_MEMCACHED_VA) {
        uint64_t v = 0;
        if (r->skip || !flash__mc_num(r->value, r->value + r->value_len, UINT64_MAX, &v)) {
            st = FLASH_EPROTO;
        } else {
            st = FLASH_OK;
            if (it) it->number = v;
        }
    } else {
        switch (r->kind) { /* HD (also quiet INCR), NF, NS, EX */
        case FLASH_MEMCACHED_HD: st = FLASH_OK; break;
        case FLASH_MEMCACHED_NF: st = FLASH_ENOTFOUND; break;
        case FLASH_MEMCACHED_NS:
        case FLASH_MEMCACHED_EX: st = FLASH_ENOTSTORED; break;
        default: return FLASH_EPROTO;
        }
    }
    if (it) it->status = st;
    return FLASH_OK;
}

/* The pipe's hooks. */

/* Consume every complete reply in the read buffer; false after failing. */
static bool flash__mc_process(flash__pipe *p) {
    flash__mc_server *s = (flash__mc_server *)p->owner;
    size_t off = 0;
    for (;;) {
        flash_memcached_reply r;
        ptrdiff_t n;
        if (!flash__pipe_skip(p, &off)) return false;
        if (p->skip || off == p->rlen) break;
        if (!p->head) { /* nothing was asked: unsolicited bytes */
            flash__pipe_fail(p, FLASH_EPROTO, false);
            return false;
        }
        n = flash_memcached_parse(p->rbuf + off, p->rlen - off, s->mc->max_value, &r);
        if (n == 0) break;
        if (n < 0 || flash__mc_apply(s, &r) != FLASH_OK) {
            flash__pipe_fail(p, FLASH_EPROTO, false);
            return false;
        }
        off += (size_t)n;
        if (r.skip) p->skip = r.value_len + 2;
    }
    flash__pipe_consumed(p, off);
    return true;
}

static void flash__mc_fail_req(flash__pipe *p, flash__pipe_req *in_pipe, int code) {
    flash__mc_server *s = (flash__mc_server *)p->owner;
    flash__mc_req *req = (flash__mc_req *)in_pipe;
    uint32_t k;
    for (k = req->pos; k < req->count; k++) flash__mc_set_status(req, k, code);
    flash__mc_req_complete(s->mc, req);
}

static const flash__pipe_hooks flash__mc_hooks = {flash__mc_process, flash__mc_fail_req, NULL, NULL};

/* ---- request encoding ---------------------------------------------------------- */

/* " <c><decimal>" */
static void flash__mc_put_num(flash__pipe *p, char c, uint64_t v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    p->wbuf[p->wlen++] = ' ';
    if (c) p->wbuf[p->wlen++] = c;
    while (n) p->wbuf[p->wlen++] = tmp[--n];
}

static uint64_t flash__mc_ttl(uint32_t ttl_s) {
    /* memcached reads more than 30 days as an absolute Unix time */
    if (ttl_s > 2592000u) return (uint64_t)time(NULL) + ttl_s;
    return ttl_s;
}

/* ttl_s under a gutter server's cap (0, no expiry, becomes the cap). */
static uint32_t flash__mc_capped(const flash__mc_req *req, uint32_t ttl_s) {
    if (req->ttl_cap && (!ttl_s || ttl_s > req->ttl_cap)) return req->ttl_cap;
    return ttl_s;
}

/* Append one request (its commands and "mn"); false when out of memory. */
static bool flash__mc_encode(flash__pipe *p, flash__mc_req *req, const flash_cache_op *op) {
    uint32_t k;
    bool quiet = req->os->quiet;
    if (op->code == FLASH_CACHE_GET) { /* one multi-key `gets`: cheaper for memcached than an mg per key */
        size_t need = 8;
        for (k = 0; k < req->count; k++) need += op->items[req->idx[k]].key_len + 64;
        if (!flash__pipe_reserve(p, need)) return false;
        if (req->nplain) {
            flash__pipe_put(p, "gets", 4);
            for (k = 0; k < req->nplain; k++) {
                const flash_cache_item *it = &op->items[req->idx[k]];
                flash__pipe_put(p, " ", 1);
                flash__pipe_put(p, it->key, it->key_len);
            }
            flash__pipe_put(p, "\r\n", 2);
        }
        if (req->nplain == req->count) return true;
        for (k = req->nplain; k < req->count; k++) { /* lease reads: mg <key> v c f N<ttl> t O<n> */
            const flash_cache_item *it = &op->items[req->idx[k]];
            flash__pipe_put(p, "mg ", 3);
            flash__pipe_put(p, it->key, it->key_len);
            flash__pipe_put(p, " v c f", 6);
            /* N before t: memcached answers flags in order, and N sets the new stub's TTL */
            flash__mc_put_num(p, 'N', flash__mc_ttl(flash__mc_capped(req, it->lease_s)));
            flash__pipe_put(p, " t", 2);
            flash__mc_put_num(p, 'O', (uint32_t)(req->base + k));
            flash__pipe_put(p, "\r\n", 2);
        }
        flash__pipe_put(p, "mn\r\n", 4);
        return true;
    }
    for (k = 0; k < req->count; k++) {
        const flash_cache_item *it = &op->items[req->idx[k]];
        uint64_t opaque = (uint32_t)(req->base + k);
        size_t need = it->key_len + 128 + (op->code >= FLASH_CACHE_SET && op->code <= FLASH_CACHE_CAS ? it->value_len : 0);
        if (!flash__pipe_reserve(p, need)) return false;
        switch (op->code) {
        case FLASH_CACHE_GET: /* encoded above */
            break;
        case FLASH_CACHE_SET:
        case FLASH_CACHE_ADD:
        case FLASH_CACHE_CAS:
            flash__pipe_put(p, "ms ", 3);
            flash__pipe_put(p, it->key, it->key_len);
            flash__mc_put_num(p, 0, it->value_len);
            if (it->flags) flash__mc_put_num(p, 'F', it->flags);
            if (flash__mc_capped(req, it->ttl_s))
                flash__mc_put_num(p, 'T', flash__mc_ttl(flash__mc_capped(req, it->ttl_s)));
            if (op->code == FLASH_CACHE_ADD) flash__pipe_put(p, " ME", 3);
            if (op->code == FLASH_CACHE_CAS) flash__mc_put_num(p, 'C', it->cas);
            flash__mc_put_num(p, 'O', opaque);
            if (quiet) flash__pipe_put(p, " q", 2);
            flash__pipe_put(p, "\r\n", 2);
            if (it->value_len) flash__pipe_put(p, it->value, it->value_len);
            break;
        case FLASH_CACHE_DELETE:
            flash__pipe_put(p, "md ", 3);
            flash__pipe_put(p, it->key, it->key_len);
            flash__mc_put_num(p, 'O', opaque);
            break;
        case FLASH_CACHE_MARK_STALE: /* md <key> I T<ttl>: keep it, stale, new cas */
            flash__pipe_put(p, "md ", 3);
            flash__pipe_put(p, it->key, it->key_len);
            flash__pipe_put(p, " I", 2);
            if (it->ttl_s) flash__mc_put_num(p, 'T', flash__mc_ttl(it->ttl_s));
            flash__mc_put_num(p, 'O', opaque);
            break;
        case FLASH_CACHE_INCR:
            flash__pipe_put(p, "ma ", 3);
            flash__pipe_put(p, it->key, it->key_len);
            flash__mc_put_num(p, 'D', it->number);
            if (it->create) {
                flash__mc_put_num(p, 'N', flash__mc_ttl(it->ttl_s));
                flash__mc_put_num(p, 'J', it->initial);
            }
            if (!quiet) flash__pipe_put(p, " v", 2);
            flash__mc_put_num(p, 'O', opaque);
            break;
        }
        if (quiet && op->code != FLASH_CACHE_SET && op->code != FLASH_CACHE_ADD && op->code != FLASH_CACHE_CAS)
            flash__pipe_put(p, " q", 2);
        flash__pipe_put(p, "\r\n", 2);
    }
    if (!flash__pipe_reserve(p, 4)) return false;
    flash__pipe_put(p, "mn\r\n", 4);
    return true;
}

/* ---- vtable ------------------------------------------------------------------- */

static void flash__mc_submit(void *self, flash_loop loop, flash_cache_op *op) {
    flash__mc *mc = (flash__mc *)self;
    flash__mc_opstate *os;
    uint32_t *srv_of, *counts, *idx, nreqs = 0;
    size_t nlease = 0; /* GET: lease reads among the keys sent */
    size_t i, n, bytes;
    int64_t now = flash__pipe_now();
    size_t unsent;
    bool store, valid_code;
    (void)loop; /* the backend's own loop drives everything */
    if (!mc || !op) return;
    n = op->count;
    op->status = FLASH_OK;
    op->round_trips = 0;
    op->priv[0] = op->priv[1] = NULL;
    valid_code = op->code >= FLASH_CACHE_GET && op->code <= FLASH_CACHE_MARK_STALE;
    store = op->code == FLASH_CACHE_SET || op->code == FLASH_CACHE_ADD || op->code == FLASH_CACHE_CAS;
    bytes = sizeof *os + mc->nservers * sizeof(flash__mc_req) + (2 * n + mc->nservers) * sizeof(uint32_t);
    os = NULL;
    if (!mc->finished.stopped && (!n || op->items) && n <= UINT32_MAX / 2 &&
        n < (SIZE_MAX - sizeof *os) / (sizeof(flash__mc_req) + 3 * sizeof(uint32_t)))
        os = (flash__mc_opstate *)flash__mc_alloc(mc, bytes);
    if (!os) {
        int code = mc->finished.stopped ? FLASH_ECANCELED : (n && !op->items) ? FLASH_EINVAL : FLASH_ENOMEM;
        op->status = code;
        for (i = 0; op->items && i < n; i++) op->items[i].status = code;
        if (mc->finished.stopped) return; /* documented: no submit from destroy */
        flash__pipe_finished_oom(&mc->finished, op);
        return;
    }
    memset(os, 0, sizeof *os);
    os->op = op;
    os->code = op->code;
    os->quiet = op->quiet && op->code != FLASH_CACHE_GET;
    os->reqs = (flash__mc_req *)(os + 1);
    srv_of = (uint32_t *)(os->reqs + mc->nservers);
    idx = srv_of + n;
    counts = idx + n;
    memset(counts, 0, mc->nservers * sizeof *counts);
    os->next = mc->live;
    if (mc->live) mc->live->prev = os;
    mc->live = os;
    op->priv[0] = os;
    if (!valid_code) op->status = FLASH_EINVAL;
    for (i = 0; i < n; i++) {
        flash_cache_item *it = &op->items[i];
        int st = valid_code ? flash__pipe_key_status(it->key, it->key_len) : FLASH_EINVAL;
        uint32_t srv;
        if (op->code == FLASH_CACHE_GET) {
            it->value = NULL;
            it->value_len = 0;
            it->flags = 0;
            it->cas = 0;
            it->lease = FLASH_LEASE_NONE;
            it->stale = false;
            it->ttl_left_ms = 0;
        }
        if (!st && store && it->value_len > mc->max_value) st = FLASH_ETOOLARGE;
        if (!st && store && it->value_len && !it->value) st = FLASH_EINVAL;
        srv_of[i] = UINT32_MAX;
        it->status = st;
        if (st) continue;
        srv = flash__mc_server_of(mc, it->key, it->key_len);
        if (flash__pipe_down(&mc->servers[srv].pipe, now)) {
            /* the gutter pool takes reads and fills, never invalidations */
            uint32_t g = mc->nservers > mc->nprimary && op->code >= FLASH_CACHE_GET && op->code <= FLASH_CACHE_CAS
                             ? flash__mc_gutter_of(mc, it->key, it->key_len)
                             : UINT32_MAX;
            if (g == UINT32_MAX || flash__pipe_down(&mc->servers[g].pipe, now)) {
                it->status = FLASH_EBACKEND;
                mc->servers[srv].stats.fast_fails++;
                continue;
            }
            mc->servers[srv].stats.gutter_keys++;
            srv = g;
        }
        srv_of[i] = srv;
        counts[srv]++;
        nlease += op->code == FLASH_CACHE_GET && it->lease_s;
    }
    /* one request per touched server, items in their original order */
    {
        uint32_t start = 0;
        for (i = 0; i < mc->nservers; i++) {
            if (!counts[i]) continue;
            os->reqs[nreqs].idx = idx + start;
            os->reqs[nreqs].count = 0;
            os->reqs[nreqs].os = os;
            start += counts[i];
            counts[i] = nreqs++; /* now: the request of server i */
        }
        /* GET: plain reads first (one `gets`), then lease reads (an mg each) */
        for (i = 0; i < n; i++) {
            flash__mc_req *req;
            if (srv_of[i] == UINT32_MAX || (op->code == FLASH_CACHE_GET && op->items[i].lease_s)) continue;
            req = &os->reqs[counts[srv_of[i]]];
            req->idx[req->count++] = (uint32_t)i;
        }
        for (i = 0; i < nreqs; i++) os->reqs[i].nplain = os->reqs[i].count;
        for (i = 0; nlease && i < n; i++) {
            flash__mc_req *req;
            if (srv_of[i] == UINT32_MAX || !op->items[i].lease_s) continue;
            req = &os->reqs[counts[srv_of[i]]];
            req->idx[req->count++] = (uint32_t)i;
        }
    }
    os->pending = nreqs + 1; /* + 1: held until every request is queued */
    op->round_trips = nreqs;
    for (i = 0; i < nreqs; i++) {
        flash__mc_req *req = &os->reqs[i];
        flash__mc_server *s = &mc->servers[srv_of[req->idx[0]]];
        req->base = s->next_opaque;
        s->next_opaque += req->count;
        req->pos = 0;
        req->gets_done = op->code == FLASH_CACHE_GET && req->nplain == 0;
        req->ttl_cap = srv_of[req->idx[0]] >= mc->nprimary ? mc->gutter_ttl_s : 0;
        flash__pipe_check_idle(&s->pipe);
        unsent = s->pipe.wlen - s->pipe.woff;
        if (!flash__mc_encode(&s->pipe, req, op)) { /* out of memory: this server's keys fail */
            uint32_t k;
            s->pipe.wlen = s->pipe.woff + unsent; /* drop the partial request */
            for (k = 0; k < req->count; k++) op->items[req->idx[k]].status = FLASH_ENOMEM;
            req->count = 0;
            flash__mc_req_complete(mc, req);
            continue;
        }
        s->stats.requests++;
        s->stats.keys += req->count;
        flash__pipe_send(&s->pipe, &req->in_pipe);
    }
    if (--os->pending == 0) flash__pipe_finished(&mc->finished, &os->fin);
}

static void flash__mc_cancel(void *self, flash_cache_op *op) {
    flash__mc *mc = (flash__mc *)self;
    if (!mc || !op || !op->priv[0] || flash__pipe_cancel_oom(&mc->finished, op)) return;
    {
        flash__mc_opstate *os = (flash__mc_opstate *)op->priv[0];
        if (os->op == op) os->op = NULL; /* freed when its requests are in */
    }
    op->priv[0] = op->priv[1] = NULL;
}

static size_t flash__mc_max_value(void *self) { return self ? ((flash__mc *)self)->max_value : 0; }

static void flash__mc_destroy(void *self) {
    flash__mc *mc = (flash__mc *)self;
    size_t i;
    if (!mc) return;
    flash__pipe_finq_stop(&mc->finished); /* done() for the oom list */
    for (i = 0; i < mc->nservers; i++) { /* unanswered keys: cancelled */
        flash__mc_server *s = &mc->servers[i];
        flash__mc_req *req;
        flash__pipe_close(&s->pipe);
        for (req = (flash__mc_req *)s->pipe.head; req; req = (flash__mc_req *)req->in_pipe.next) {
            uint32_t k;
            if (!req->os->op) continue;
            for (k = req->pos; k < req->count; k++) flash__mc_set_status(req, k, FLASH_ECANCELED);
            req->os->op->status = FLASH_ECANCELED;
        }
        s->pipe.head = s->pipe.tail = NULL;
    }
    while (mc->live) { /* done for every op not cancelled, then free */
        flash__mc_opstate *os = mc->live;
        flash_cache_op *op = os->op;
        mc->live = os->next;
        if (mc->live) mc->live->prev = NULL;
        os->next = os->prev = NULL;
        if (op) {
            op->priv[0] = NULL;
            op->done(op);
        }
        {
            flash__mc_block *b = os->blocks;
            while (b) {
                flash__mc_block *nb = b->next;
                flash__mc_free(mc, b);
                b = nb;
            }
        }
        flash__mc_free(mc, os);
    }
    for (i = 0; i < mc->nservers; i++) {
        flash__mc_free(mc, mc->servers[i].host);
        flash__pipe_release(&mc->servers[i].pipe);
    }
    flash__mc_free(mc, mc->servers);
    flash__mc_free(mc, mc->points);
    flash__mc_free(mc, mc->gpoints);
    mc->alloc.free(mc, mc->alloc.user_data);
}

static const flash_cache_vtable flash__mc_vt = {
    "memcached", flash__mc_submit, flash__mc_cancel, flash__mc_max_value, flash__mc_destroy, FLASH_CACHE_CAP_LEASES,
};

FLASH_API flash_cache flash_memcached_create(const flash_memcached_desc *desc, int *error) {
    flash_cache none = {NULL, NULL}, out;
    flash_allocator al;
    flash__mc *mc;
    size_t i;
    int rc = FLASH_EINVAL;
    if (error) *error = FLASH_OK;
    if (!desc || !flash__pipe_loop_ok(&desc->loop) || !desc->servers ||
        !desc->server_count || desc->server_count > UINT32_MAX / 4) {
        if (error) *error = FLASH_EINVAL;
        return none;
    }
    if ((desc->gutter_count && !desc->gutter) || desc->gutter_count > UINT32_MAX / 4 - desc->server_count) {
        if (error) *error = FLASH_EINVAL;
        return none;
    }
    for (i = 0; i < desc->server_count + desc->gutter_count; i++) {
        const flash_memcached_server *d = i < desc->server_count ? &desc->servers[i]
                                                                  : &desc->gutter[i - desc->server_count];
        if (!d->host || !d->host[0] || strlen(d->host) > 255) {
            if (error) *error = FLASH_EINVAL;
            return none;
        }
    }
    al = flash__pipe_allocator(desc->allocator);
    mc = (flash__mc *)al.alloc(sizeof *mc, al.user_data);
    if (!mc) {
        if (error) *error = FLASH_ENOMEM;
        return none;
    }
    memset(mc, 0, sizeof *mc);
    mc->alloc = al;
    flash__pipe_finq_setup(&mc->finished, desc->loop, mc, flash__mc_finish);
    mc->connect_timeout_ms = desc->connect_timeout_ms ? desc->connect_timeout_ms : 1000;
    mc->timeout_ms = desc->timeout_ms ? desc->timeout_ms : 1000;
    mc->retry_interval_ms = desc->retry_interval_ms ? desc->retry_interval_ms : 2000;
    mc->max_value = desc->max_value ? desc->max_value : (size_t)1 << 20;
    mc->gutter_ttl_s = desc->gutter_ttl_s ? desc->gutter_ttl_s : 10;
    mc->nprimary = desc->server_count;
    mc->nservers = desc->server_count + desc->gutter_count;
    mc->servers = (flash__mc_server *)flash__mc_alloc(mc, mc->nservers * sizeof *mc->servers);
    if (!mc->servers) {
        mc->nservers = 0;
        rc = FLASH_ENOMEM;
        goto fail;
    }
    memset(mc->servers, 0, mc->nservers * sizeof *mc->servers);
    for (i = 0; i < mc->nservers; i++) {
        flash__pipe *p = &mc->servers[i].pipe;
        flash__pipe_setup(p, &flash__mc_hooks, &mc->servers[i], desc->loop, mc->alloc);
        p->connect_timeout_ms = mc->connect_timeout_ms;
        p->timeout_ms = mc->timeout_ms;
        p->retry_interval_ms = mc->retry_interval_ms;
    }
    for (i = 0; i < mc->nservers; i++) {
        flash__mc_server *s = &mc->servers[i];
        const flash_memcached_server *d = i < mc->nprimary ? &desc->servers[i] : &desc->gutter[i - mc->nprimary];
        size_t hl = strlen(d->host);
        s->mc = mc;
        s->port = d->port ? d->port : 11211;
        s->weight = d->weight ? d->weight : 1;
        s->host = (char *)flash__mc_alloc(mc, hl + 1);
        if (!s->host) {
            rc = FLASH_ENOMEM;
            goto fail;
        }
        memcpy(s->host, d->host, hl + 1);
        rc = flash__pipe_resolve(&s->pipe, d->host, s->port);
        if (rc) goto fail;
    }
    rc = flash__mc_build_continuum(mc, 0, mc->nprimary, &mc->points, &mc->npoints);
    if (!rc && mc->nservers > mc->nprimary)
        rc = flash__mc_build_continuum(mc, mc->nprimary, mc->nservers - mc->nprimary, &mc->gpoints, &mc->ngpoints);
    if (rc) goto fail;
    out.vt = &flash__mc_vt;
    out.self = mc;
    return out;
fail:
    if (error) *error = rc;
    flash__mc_destroy(mc);
    return none;
}

FLASH_API int flash_memcached_server_for_key(flash_cache cache, const char *key, size_t len) {
    if (cache.vt != &flash__mc_vt || !cache.self || (!key && len)) return FLASH_EINVAL;
    return (int)flash__mc_server_of((const flash__mc *)cache.self, key, len);
}

FLASH_API int flash_memcached_server_stats(flash_cache cache, size_t server, flash_memcached_stats *out) {
    const flash__mc *mc = (const flash__mc *)cache.self;
    if (cache.vt != &flash__mc_vt || !mc || server >= mc->nservers || !out) return FLASH_EINVAL;
    *out = mc->servers[server].stats;
    {
        const flash__pipe *p = &mc->servers[server].pipe;
        out->connects = p->counts.connects;
        out->reconnects = p->counts.reconnects;
        out->failures = p->counts.failures;
        out->timeouts = p->counts.timeouts;
        out->proto_errors = p->counts.proto_errors;
        out->connected = p->counts.connected;
        out->down = flash__pipe_down(p, flash__pipe_now());
    }
    return FLASH_OK;
}

#endif /* FLASH_MEMCACHED_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
