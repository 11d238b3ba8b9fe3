/* backends/cache/redis.h — flash's Redis transport.

   An asynchronous, pipelined Redis client behind the layer-6 cache vtable:
   one server, RESP2 over non-blocking TCP driven by a flash loop; no hiredis.

       flash_redis_desc d;
       memset(&d, 0, sizeof d);
       d.loop = flash_poll_loop(poll);           // the loop your contexts use
       d.host = "127.0.0.1";
       d.port = 6379;
       int err;
       flash_cache rc = flash_redis_create(&d, &err);
       ... flash_desc.cache = rc ...
       flash_cache_destroy(rc);                  // after the contexts, before the loop

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
   Needs Redis 2.6 or later (Lua scripting).

   WIRE
     One flash_cache_op becomes ONE pipelined request (one write; replies
     read in order): GET is a single `MGET k1 .. kn`; SET is `SET k v [EX t]`
     per key, ADD `SET k v NX [EX t]`, DELETE `DEL k`; CAS and INCR are
     `EVALSHA` of a short Lua script per key (a GET, a compare, a SET: atomic).
     op->round_trips is 1 for an op that reached the server, else 0. Every
     value is stored as a Redis string: a 12-byte header [cas u64 LE][flags
     u32 LE], then the bytes. CAS tokens come from a per-backend counter that
     starts at a random point (never 0); every write stores a new one. INCR
     keeps the number as ASCII decimal after the header (so GET returns it
     as decimal text), with 64-bit wrap-around, and keeps the key's flags and
     TTL; a created key holds `initial`. ttl_s is seconds from now, 0 none.
     op->quiet is ignored: every command is answered.
     LEASES (FLASH_CACHE_CAP_LEASES, memcached's mg N / md I semantics): the
     top two bits of the stored cas word are the key's lease state (stale,
     won), masked off every cas a reader sees (tokens are 62-bit). GET items
     with lease_s > 0 leave the MGET for an `EVALSHA` of a lease script each,
     after it in the same request: absent -> store an empty stub (a header
     with the won bit, EX lease_s) and win; won bit set -> lose; stale and
     not won -> set the won bit (SETRANGE, the TTL stays) and win. The reply
     is one state byte, the PTTL and ':', then the stored header and value. MARK_STALE is a
     script that rewrites the cas word (a new token, stale bit) and the TTL.
     Any store writes a fresh header: a CAS fill clears the state, and a
     write in between changed the token, so a late fill fails. Cluster nodes
     (redis_cluster.h) take neither. Every connection
     starts with AUTH and SELECT (when desc asks for them) and SCRIPT LOAD of
     the four scripts, in the same write as the first request (no extra round
     trip); a NOSCRIPT reply (someone ran SCRIPT FLUSH) fails that key with
     FLASH_EBACKEND and the connection is reopened when next idle.

   STATUSES (per item; op->status is 0 unless the whole op failed)
     FLASH_OK, FLASH_ENOTFOUND (miss; CAS/DELETE/INCR on an absent key),
     FLASH_ENOTSTORED (ADD on an existing key, CAS after a change),
     FLASH_EINVAL (empty or NULL key, key with a space or control byte, value
     NULL with a length, INCR on a value that is not a number),
     FLASH_ETOOLARGE (key over 250 bytes, value over max_value: not sent;
     a stored value over max_value: not read), FLASH_EBACKEND (server down,
     refused, closed the connection, I/O error, an error reply such as OOM or
     a failed AUTH), FLASH_ETIMEDOUT (connect or request timeout),
     FLASH_EPROTO (garbage: the connection is reset and the next op
     reconnects at once; a stored value without flash's header fails only
     its key), FLASH_ENOMEM. A bad key or value fails only its own item. A
     refused or lost connection with requests on it, or a timeout, marks the
     server down: keys then fail fast with FLASH_EBACKEND, without I/O, until
     retry_interval_ms has passed, when the next op reconnects. An idle
     connection the server closes is simply reopened on next use.

   CONTRACT
     Exactly memcached.h's: submit() never calls done(); done() runs from the
     loop, exactly once per op unless it is cancelled. GET values are copies
     owned by the backend, valid until done() returns. After cancel() the op
     and its items are never touched again; its replies are still read and
     dropped. destroy() calls done() for every op not cancelled: ops whose
     replies were all in keep their statuses; the others get FLASH_ECANCELED
     (op->status and every unanswered item). Never submit, cancel or destroy
     from inside a done() that destroy() runs, and never destroy the backend
     from inside any done(). Destroy the backend before its loop.
     Single-threaded. desc.loop drives everything (submit's loop argument is
     ignored); the host is resolved once, at create (give an IP literal to
     avoid blocking on DNS). It uses op->priv[0] and priv[1].

   The connection itself (buffers, the FIFO of requests, deadlines, down
   marking, deferred done() calls) is backends/cache/pipeline.h, shared
   with the other network transport; this file is the protocol.

   LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_REDIS_H
#define FLASH_REDIS_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Zero-initialise; every zero field means its default. */
typedef struct flash_redis_desc {
    flash_loop loop;              /* required: drives the connection */
    const char *host;             /* required: IP literal or host name */
    uint16_t port;                /* default: 6379 */
    const char *username;         /* default: none (AUTH password alone) */
    const char *password;         /* default: none (no AUTH) */
    uint32_t db;                  /* default: 0 (no SELECT) */
    uint32_t connect_timeout_ms;  /* default: 1000 */
    uint32_t timeout_ms;          /* default: 1000, per request, from send */
    uint32_t retry_interval_ms;   /* default: 1000, a down server's rest */
    size_t max_value;             /* default: 1 MiB, largest value stored or read */
    flash_allocator allocator;    /* default: malloc / free */
} flash_redis_desc;

/* Counters (cumulative), for tests and monitoring. */
typedef struct flash_redis_stats {
    uint64_t requests;     /* pipelined requests sent: the round trips */
    uint64_t commands;     /* commands in them */
    uint64_t connects;     /* connections established */
    uint64_t reconnects;   /* connections established after the first */
    uint64_t failures;     /* connections refused or lost with requests on them */
    uint64_t timeouts;     /* connect or request timeouts */
    uint64_t proto_errors; /* garbage replies (connection reset) */
    uint64_t fast_fails;   /* keys failed without I/O while the server was down */
    bool connected;        /* a connection is open now */
    bool down;             /* marked down now */
} flash_redis_stats;

/* A Redis backend, or {NULL, NULL} with *error set to FLASH_EINVAL (bad
   desc, a host that does not resolve) or FLASH_ENOMEM. Connects on first use. */
FLASH_API flash_cache flash_redis_create(const flash_redis_desc *desc, int *error);
/* FLASH_EINVAL when cache is not a Redis backend or out is NULL. */
FLASH_API int flash_redis_stats_get(flash_cache cache, flash_redis_stats *out);

/* The RESP2 reply parser, a pure function over a buffer. It reads ONE
   element: an array gives only its count, and its elements are the
   following elements (so nesting is the caller's: a running count). */
enum {
    FLASH_REDIS_SIMPLE = 1, /* +text */
    FLASH_REDIS_ERROR,      /* -text */
    FLASH_REDIS_INTEGER,    /* :n */
    FLASH_REDIS_BULK,       /* $n then n bytes */
    FLASH_REDIS_NIL,        /* $-1 or *-1 */
    FLASH_REDIS_ARRAY       /* *n: n elements follow */
};
typedef struct flash_redis_reply {
    int kind;         /* FLASH_REDIS_* */
    const char *str;  /* SIMPLE / ERROR text, BULK data: inside buf (NULL when skip) */
    size_t len;
    int64_t integer;  /* INTEGER: the number; ARRAY: the element count */
    bool skip;        /* BULK over max_value: only its header was consumed;
                         len bytes and "\r\n" follow, to discard */
} flash_redis_reply;
/* Returns the bytes the element takes (> 0), 0 when buf holds only part of
   it, or FLASH_EPROTO for garbage: an unknown type byte, a bad number, a
   line over 64 KiB, a bulk not followed by "\r\n". */
FLASH_API ptrdiff_t flash_redis_parse(const char *buf, size_t len, size_t max_value, flash_redis_reply *out);

/* The Redis Cluster hash slot of a key, 0..16383: CRC16 (XMODEM) of the key,
   or of the part between the first '{' and the next '}' when that part is
   not empty (a hash tag: "{user1}:a" and "{user1}:b" share a slot). The
   cluster client is backends/cache/redis_cluster.h. */
FLASH_API size_t flash_redis_key_slot(const char *key, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_REDIS_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_REDIS_IMPLEMENTED
#define FLASH_REDIS_IMPLEMENTED
#include "pipeline.h" /* the connection: buffers, FIFO, timeouts, failures */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FLASH__REDIS_MAX_LINE 65536
#define FLASH__REDIS_HDR 12 /* [cas u64 LE][flags u32 LE] before every value */

/* ---- reply parser -------------------------------------------------------- */

/* A signed decimal [p, end) into *out; false when malformed or out of range. */
static bool flash__redis_num(const char *p, const char *end, int64_t *out) {
    bool neg = p < end && *p == '-';
    uint64_t v = 0, max = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    if (neg) p++;
    if (p >= end) return false;
    for (; p < end; p++) {
        unsigned d = (unsigned)(unsigned char)*p - '0';
        if (d > 9 || v > (max - d) / 10) return false;
        v = v * 10 + d;
    }
    *out = neg ? (int64_t)(0 - v) : (int64_t)v; /* two's complement: INT64_MIN too */
    return true;
}

FLASH_API ptrdiff_t flash_redis_parse(const char *buf, size_t len, size_t max_value, flash_redis_reply *r) {
    size_t scan = len < FLASH__REDIS_MAX_LINE ? len : FLASH__REDIS_MAX_LINE, header, i;
    const char *nl, *end;
    memset(r, 0, sizeof *r);
    if (!buf) return len ? FLASH_EPROTO : 0;
    if (!len) return 0;
    switch (buf[0]) {
    case '+': r->kind = FLASH_REDIS_SIMPLE; break;
    case '-': r->kind = FLASH_REDIS_ERROR; break;
    case ':': r->kind = FLASH_REDIS_INTEGER; break;
    case '$': r->kind = FLASH_REDIS_BULK; break;
    case '*': r->kind = FLASH_REDIS_ARRAY; break;
    default: return FLASH_EPROTO;
    }
    nl = (const char *)memchr(buf, '\n', scan);
    if (!nl) {
        /* a "\r" not followed by "\n" is garbage: say so before the line ends */
        for (i = 1; i < scan; i++)
            if (buf[i] == '\r' && i + 1 < scan) return FLASH_EPROTO;
        return len >= FLASH__REDIS_MAX_LINE ? FLASH_EPROTO : 0;
    }
    if (nl[-1] != '\r' || nl - buf < 2) return FLASH_EPROTO;
    end = nl - 1;
    header = (size_t)(nl - buf) + 1;
    if (memchr(buf + 1, '\r', (size_t)(end - buf - 1))) return FLASH_EPROTO;
    if (r->kind == FLASH_REDIS_SIMPLE || r->kind == FLASH_REDIS_ERROR) {
        r->str = buf + 1;
        r->len = (size_t)(end - buf - 1);
        return (ptrdiff_t)header;
    }
    if (!flash__redis_num(buf + 1, end, &r->integer)) return FLASH_EPROTO;
    if (r->kind == FLASH_REDIS_INTEGER) return (ptrdiff_t)header;
    if (r->integer == -1) {
        r->kind = FLASH_REDIS_NIL;
        r->integer = 0;
        return (ptrdiff_t)header;
    }
    if (r->integer < 0 || r->integer > ((int64_t)1 << 40)) return FLASH_EPROTO;
    if (r->kind == FLASH_REDIS_ARRAY) return (ptrdiff_t)header;
    r->len = (size_t)r->integer;
    r->integer = 0;
    if (r->len > max_value) {
        r->skip = true;
        return (ptrdiff_t)header;
    }
    if (len - header < r->len + 2) {
        /* what is there of the terminator must already be right */
        if (len - header > r->len && buf[header + r->len] != '\r') return FLASH_EPROTO;
        return 0;
    }
    if (buf[header + r->len] != '\r' || buf[header + r->len + 1] != '\n') return FLASH_EPROTO;
    r->str = buf + header;
    return (ptrdiff_t)(header + r->len + 2);
}

/* ---- cluster key slots ------------------------------------------------------ */

static uint16_t flash__redis_crc16(const char *p, size_t n) {
    uint16_t crc = 0;
    while (n--) {
        int b;
        crc ^= (uint16_t)((unsigned char)*p++ << 8);
        for (b = 0; b < 8; b++) crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

FLASH_API size_t flash_redis_key_slot(const char *key, size_t len) {
    const char *open, *close;
    if (!key) return 0;
    open = (const char *)memchr(key, '{', len);
    if (open) {
        close = (const char *)memchr(open + 1, '}', len - (size_t)(open + 1 - key));
        if (close && close > open + 1) { /* a non-empty tag: only it is hashed */
            key = open + 1;
            len = (size_t)(close - open - 1);
        }
    }
    return flash__redis_crc16(key, len) & 16383u;
}

/* ---- Lua scripts ------------------------------------------------------------
   Loaded with SCRIPT LOAD first on every connection, run with EVALSHA: the
   text travels once per connection, not once per key. Each *_sha is the
   SHA1 of its script's text: edit both together (the load checks it). */

/* The two top bits of a stored cas word (byte 8's 0x80 and 0x40) are the
   lease state: stale (MARK_STALE) and won (a lease reader holds it). Tokens
   are 62-bit; the state bits are masked off every cas a reader sees. */

/* KEYS[1]; ARGV: expected cas (8 bytes), new header+value, ttl ("0": none).
   0 absent, 2 changed, 1 stored (a fresh value: no state bits). */
static const char flash__redis_cas_lua[] =
    "local v=redis.call('GET',KEYS[1]) if not v then return 0 end "
    "if #v<8 or v:sub(1,7)~=ARGV[1]:sub(1,7) or v:byte(8)%64~=ARGV[1]:byte(8) then return 2 end "
    "if ARGV[3]=='0' then redis.call('SET',KEYS[1],ARGV[2]) "
    "else redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[3]) end return 1";
static const char flash__redis_cas_sha[] = "81960881acb9f20da2ffbcdb461192d9ffb9380a";

/* A lease read (memcached's mg N). KEYS[1]; ARGV: stub ttl, a stub (a
   12-byte header, won bit set). Returns one byte, W (won) Z (lost) or 0
   (no lease), the key's PTTL in decimal and ':', then the stored header
   and value: absent -> the stub, won; won bit set -> lost; stale and not
   won -> set the won bit, won. */
static const char flash__redis_lease_lua[] =
    "local k=KEYS[1] local v=redis.call('GET',k) "
    "local function r(c,x) return c..redis.call('PTTL',k)..':'..x end "
    "if not v then redis.call('SET',k,ARGV[2],'EX',ARGV[1]) return r('W',ARGV[2]) end "
    "if #v<12 then return r('0',v) end local b=v:byte(8) "
    "if b%128>=64 then return r('Z',v) end "
    "if b>=128 then redis.call('SETRANGE',k,7,string.char(b+64)) "
    "return r('W',v:sub(1,7)..string.char(b+64)..v:sub(9)) end return r('0',v)";
static const char flash__redis_lease_sha[] = "f240189c10c3478708fa894cd4055724b604abb3";

/* MARK_STALE (memcached's md I T). KEYS[1]; ARGV: new cas (8 bytes, stale
   bit set, won bit clear), ttl ("0": keep). 0 absent, 2 not flash's, 1 done. */
static const char flash__redis_stale_lua[] =
    "local k=KEYS[1] local v=redis.call('GET',k) if not v then return 0 end "
    "if #v<12 then return 2 end redis.call('SETRANGE',k,0,ARGV[1]) "
    "if ARGV[2]~='0' then redis.call('EXPIRE',k,ARGV[2]) end return 1";
static const char flash__redis_stale_sha[] = "606da338cc5b0c9efc5667efefe9bb9b09c403fb";

#define FLASH__REDIS_CAS_MASK ((UINT64_C(1) << 62) - 1)
#define FLASH__REDIS_STALE_BIT (UINT64_C(1) << 63)
#define FLASH__REDIS_WON_BIT (UINT64_C(1) << 62)

/* KEYS[1]; ARGV: delta, new cas (8 bytes), create ("1"/"0"), initial, ttl.
   -1 absent, -2 not a number, else the new number as a string (Lua numbers
   are doubles: 64-bit decimal arithmetic is done on digit strings). */
static const char flash__redis_incr_lua[] =
    "local function f(a,b,g) local r,c,i,j={},0,#a,#b "
    "while i>0 or j>0 do local s=(i>0 and a:byte(i)-48 or 0)+g*(j>0 and b:byte(j)-48 or 0)+c c=0 "
    "if s<0 then s=s+10 c=-1 elseif s>9 then s=s-10 c=1 end table.insert(r,1,s) i=i-1 j=j-1 end "
    "if c>0 then table.insert(r,1,c) end local n=table.concat(r):gsub('^0+','') "
    "if n=='' then n='0' end return n end "
    "local M='18446744073709551615' "
    "local function big(n) return #n>20 or (#n==20 and n>M) end "
    "local k=KEYS[1] local v=redis.call('GET',k) "
    "if not v then if ARGV[3]~='1' then return -1 end "
    "local x=ARGV[2]..'\\0\\0\\0\\0'..ARGV[4] "
    "if ARGV[5]=='0' then redis.call('SET',k,x) else redis.call('SET',k,x,'EX',ARGV[5]) end "
    "return ARGV[4] end "
    "local d=v:sub(13) if #v<12 or not d:match('^%d+$') then return -2 end "
    "d=f(d,'0',1) if big(d) then return -2 end "
    "local n=f(d,ARGV[1],1) if big(n) then n=f(n,'18446744073709551616',-1) end "
    "local t=redis.call('PTTL',k) local x=ARGV[2]..v:sub(9,12)..n "
    "if t>0 then redis.call('SET',k,x,'PX',t) else redis.call('SET',k,x) end return n";
static const char flash__redis_incr_sha[] = "a65ad6a7c27ab94615bf32aef62973994f68b99d";

/* In the order the hello loads them. */
static const char *const flash__redis_shas[4] = {flash__redis_cas_sha, flash__redis_incr_sha, flash__redis_lease_sha,
                                                 flash__redis_stale_sha};

/* ---- state ----------------------------------------------------------------- */

typedef struct flash__redis flash__redis;

typedef struct flash__redis_val { /* a GET value copy; its bytes follow */
    struct flash__redis_val *next;
} flash__redis_val;

/* One op's request: its commands, answered in order. */
typedef struct flash__redis_req {
    flash__pipe_req in_pipe;              /* first: the in-flight FIFO, deadline */
    struct flash__redis_req *prev_live, *next_live;
    flash__pipe_fin fin;                  /* in the queue of finished ops */
    flash_cache_op *op;                   /* NULL once cancelled */
    flash_cache_opcode code;
    uint32_t *idx;                        /* item indices, in command order */
    uint32_t count, pos;                  /* keys sent; the next one not answered */
    uint32_t nplain;                      /* GET: keys in the MGET; the rest are lease reads */
    bool in_array;                        /* GET: MGET's array header is in */
    flash__redis_val *vals;
    /* Cluster nodes only (redis_cluster.h): */
    uint32_t *groups;                     /* GET: keys per MGET (one slot each); NULL: one MGET */
    uint32_t gpos, gleft;                 /* the MGET being read; its keys still to come */
    bool asking, ask_pending;             /* ASKING before each command; its reply next */
    bool raw;                             /* a raw command: its reply tree is kept flat */
    int64_t raw_left;                     /* raw: elements still to come */
    char *raw_buf;                        /* raw: records [kind u8][integer i64][len u32][bytes] */
    size_t raw_len, raw_cap;
} flash__redis_req;

/* A cluster node's per-key error reply (MOVED, ASK, TRYAGAIN, ...): the
   item gets this status and its text as value, for the cluster to route. */
#define FLASH__REDIS_ERRTEXT (-1000)
#define FLASH__REDIS_RAW_REC 13 /* a raw record's header */

struct flash__redis {
    flash_allocator alloc;
    size_t max_value;
    flash__pipe pipe;                     /* the connection */
    char *hello;                          /* AUTH, SELECT, SCRIPT LOADs: first on a connection */
    size_t hello_len;
    uint32_t hello_replies, hello_left;   /* replies to them; still to read */
    bool scripts_lost;                    /* NOSCRIPT (SCRIPT FLUSH): reconnect when idle */
    flash__redis_req *live;               /* every request not freed */
    flash__pipe_finq finished;            /* done() calls, from the loop */
    uint64_t next_cas;
    flash_redis_stats stats;              /* requests, commands, fast_fails (the rest: pipe.counts) */
    /* Set by redis_cluster.h on the backends it makes: */
    bool cluster;                         /* MGET per slot; error replies kept as text */
    bool no_scripts;                      /* a Sentinel: no SCRIPT LOAD in the hello */
    bool raw_next, asking_next;           /* the next submit: a raw command; ASKING first */
    bool single_next;                     /* the next submit: one MGET per key */
};

static void *flash__redis_alloc(flash__redis *rd, size_t n) { return rd->alloc.alloc(n, rd->alloc.user_data); }
static void flash__redis_free(flash__redis *rd, void *p) {
    if (p) rd->alloc.free(p, rd->alloc.user_data);
}

/* ---- op completion ---------------------------------------------------------- */

static void flash__redis_req_free(flash__redis *rd, flash__redis_req *req) {
    flash__redis_free(rd, req->raw_buf);
    while (req->vals) {
        flash__redis_val *n = req->vals->next;
        flash__redis_free(rd, req->vals);
        req->vals = n;
    }
    if (req->prev_live) req->prev_live->next_live = req->next_live;
    else rd->live = req->next_live;
    if (req->next_live) req->next_live->prev_live = req->prev_live;
    flash__redis_free(rd, req);
}

/* done() unless cancelled, then free (the finished queue's callback). */
static void flash__redis_finish(void *owner, flash__pipe_fin *f) {
    flash__redis_req *req = (flash__redis_req *)((char *)f - offsetof(flash__redis_req, fin));
    flash_cache_op *op = req->op;
    if (op) {
        op->priv[0] = NULL;
        op->done(op);
    }
    flash__redis_req_free((flash__redis *)owner, req);
}

/* The request has all its statuses: done() on the next flush. */
static void flash__redis_complete(flash__redis *rd, flash__redis_req *req) {
    if (req->op) flash__pipe_finished(&rd->finished, &req->fin);
    else flash__redis_req_free(rd, req);
}

static void flash__redis_set_status(flash__redis_req *req, uint32_t k, int code) {
    if (req->op) req->op->items[req->idx[k]].status = code;
}

/* ---- replies ------------------------------------------------------------------- */

static uint64_t flash__redis_le(const char *p, int n) {
    uint64_t v = 0;
    while (n--) v = v << 8 | (unsigned char)p[n];
    return v;
}

/* A NUL-terminated copy of n bytes, kept with the request's values (freed
   with them); NULL when out of memory. */
static char *flash__redis_keep(flash__redis *rd, flash__redis_req *req, const char *src, size_t n) {
    flash__redis_val *v = (flash__redis_val *)flash__redis_alloc(rd, sizeof *v + n + 1);
    char *p;
    if (!v) return NULL;
    p = (char *)(v + 1);
    if (n) memcpy(p, src, n);
    p[n] = 0;
    v->next = req->vals;
    req->vals = v;
    return p;
}

/* A copy of an error reply's text; NULL when out of memory (the key then
   fails with FLASH_EBACKEND). */
static const char *flash__redis_errtext(flash__redis *rd, flash__redis_req *req, const flash_redis_reply *r) {
    return flash__redis_keep(rd, req, r->str, r->len);
}

/* A raw command's reply, element by element, appended as flat records
   (the caller walks the tree: an array's integer is its element count). */
static int flash__redis_apply_raw(flash__redis *rd, flash__redis_req *req, const flash_redis_reply *r) {
    size_t need = FLASH__REDIS_RAW_REC + (r->str ? r->len : 0);
    char *m;
    int i;
    if (r->skip) return FLASH_EPROTO; /* no raw reply is that large */
    if (req->raw_cap - req->raw_len < need) {
        size_t cap = req->raw_cap ? req->raw_cap * 2 : 1024;
        while (cap - req->raw_len < need) cap *= 2;
        m = (char *)flash__redis_alloc(rd, cap);
        if (!m) return FLASH_ENOMEM;
        if (req->raw_len) memcpy(m, req->raw_buf, req->raw_len);
        flash__redis_free(rd, req->raw_buf);
        req->raw_buf = m;
        req->raw_cap = cap;
    }
    m = req->raw_buf + req->raw_len;
    m[0] = (char)r->kind;
    for (i = 0; i < 8; i++) m[1 + i] = (char)((uint64_t)r->integer >> (8 * i));
    for (i = 0; i < 4; i++) m[9 + i] = (char)((uint32_t)(r->str ? r->len : 0) >> (8 * i));
    if (r->str && r->len) memcpy(m + FLASH__REDIS_RAW_REC, r->str, r->len);
    req->raw_len += need;
    req->raw_left += (r->kind == FLASH_REDIS_ARRAY ? r->integer : 0) - 1;
    if (req->raw_left > 0) return FLASH_OK;
    if (req->op) {
        req->op->items[0].value = req->raw_buf;
        req->op->items[0].value_len = req->raw_len;
        req->op->items[0].status = FLASH_OK;
    }
    req->pos = req->count;
    rd->pipe.head = req->in_pipe.next;
    if (!rd->pipe.head) rd->pipe.tail = NULL;
    flash__redis_complete(rd, req);
    flash__pipe_arm_timer(&rd->pipe);
    return FLASH_OK;
}

/* A lease reply's prefix: the state byte, the PTTL in decimal, ':'. Its
   length, or 0 when it does not parse. */
static size_t flash__redis_lease_prefix(const char *p, size_t len, int64_t *pttl) {
    size_t i = 1;
    int64_t v = 0;
    bool neg = false;
    if (len < 3 || (p[0] != 'W' && p[0] != 'Z' && p[0] != '0')) return 0;
    if (p[i] == '-') {
        neg = true;
        i++;
    }
    for (; i < len && i < 24 && p[i] >= '0' && p[i] <= '9'; i++) v = v * 10 + (p[i] - '0');
    if (i >= len || p[i] != ':' || p[i - 1] == '-' || i == 1) return 0;
    *pttl = neg ? -v : v;
    return i + 1;
}

/* Apply one reply element to the head request; FLASH_EPROTO when it does not fit. */
static int flash__redis_apply(flash__redis *rd, const flash_redis_reply *r) {
    flash__redis_req *req = (flash__redis_req *)rd->pipe.head;
    flash_cache_item *it;
    int st = FLASH_EPROTO;
    if (rd->hello_left) { /* AUTH / SELECT: +OK; SCRIPT LOAD: the digest we use */
        /* the SCRIPT LOADs come last: cas, incr, then (not on cluster nodes) lease, stale */
        uint32_t left = rd->hello_left--, nscripts = rd->cluster ? 2 : 4;
        const char *sha = left > nscripts ? NULL : flash__redis_shas[nscripts - left];
        if (r->kind == FLASH_REDIS_ERROR) return FLASH_EBACKEND; /* a wrong password, ... */
        if (!sha || rd->no_scripts) return r->kind == FLASH_REDIS_SIMPLE ? FLASH_OK : FLASH_EPROTO;
        return r->kind == FLASH_REDIS_BULK && r->len == 40 && memcmp(r->str, sha, 40) == 0 ? FLASH_OK : FLASH_EPROTO;
    }
    if (!req) return FLASH_EPROTO; /* nothing was asked */
    if (req->raw) return flash__redis_apply_raw(rd, req, r);
    if (req->ask_pending) { /* ASKING's +OK (an error shows in the command's reply) */
        if (r->kind == FLASH_REDIS_ARRAY) return FLASH_EPROTO;
        req->ask_pending = false;
        return FLASH_OK;
    }
    if (req->code == FLASH_CACHE_GET && req->pos >= req->nplain) { /* a lease read's reply */
        size_t pre;
        int64_t pttl = 0;
        if (req->pos >= req->count) return FLASH_EPROTO;
        it = req->op ? &req->op->items[req->idx[req->pos]] : NULL;
        if (r->kind == FLASH_REDIS_ERROR) {
            st = FLASH_EBACKEND;
            if (r->len >= 8 && memcmp(r->str, "NOSCRIPT", 8) == 0) rd->scripts_lost = true;
        } else if (r->kind != FLASH_REDIS_BULK) {
            return FLASH_EPROTO;
        } else if (r->skip) {
            st = FLASH_ETOOLARGE;
        } else if ((pre = flash__redis_lease_prefix(r->str, r->len, &pttl)) == 0 ||
                   r->len < pre + FLASH__REDIS_HDR) {
            st = FLASH_EPROTO; /* not written by flash */
        } else if (r->len - pre - FLASH__REDIS_HDR > rd->max_value) {
            st = FLASH_ETOOLARGE;
        } else if (!it) {
            st = FLASH_OK;
        } else {
            size_t n = r->len - pre - FLASH__REDIS_HDR;
            const char *h = r->str + pre;
            uint64_t word = flash__redis_le(h, 8);
            st = FLASH_ENOTFOUND; /* a stub: no value yet */
            it->cas = word & FLASH__REDIS_CAS_MASK;
            it->flags = (uint32_t)flash__redis_le(h + 8, 4);
            it->stale = (word & FLASH__REDIS_STALE_BIT) != 0;
            it->lease = (uint8_t)(r->str[0] == 'W' ? FLASH_LEASE_WON : r->str[0] == 'Z' ? FLASH_LEASE_LOST
                                                                                       : FLASH_LEASE_NONE);
            it->ttl_left_ms = pttl < 0 ? -1 : pttl;
            if (n) {
                char *p = flash__redis_keep(rd, req, h + FLASH__REDIS_HDR, n);
                st = p ? FLASH_OK : FLASH_ENOMEM;
                if (p) {
                    it->value = p;
                    it->value_len = n;
                }
            }
        }
        if (it) it->status = st;
        req->pos++;
    } else if (req->code == FLASH_CACHE_GET && !req->in_array) {
        uint32_t size = req->groups ? req->groups[req->gpos] : req->nplain;
        if (r->kind == FLASH_REDIS_ERROR) { /* MGET refused: each of its keys */
            const char *text = NULL;
            if (rd->cluster && req->op) text = flash__redis_errtext(rd, req, r);
            while (size--) {
                if (text) {
                    it = &req->op->items[req->idx[req->pos]];
                    it->value = text;
                    it->value_len = r->len;
                }
                flash__redis_set_status(req, req->pos++, text ? FLASH__REDIS_ERRTEXT : FLASH_EBACKEND);
            }
            req->gpos++;
            req->ask_pending = req->asking && req->pos < req->count;
        } else if (r->kind != FLASH_REDIS_ARRAY || r->integer != (int64_t)size) {
            return FLASH_EPROTO;
        } else {
            req->in_array = true;
            req->gleft = size;
        }
    } else {
        if (req->pos >= req->count) return FLASH_EPROTO;
        it = req->op ? &req->op->items[req->idx[req->pos]] : NULL;
        if (r->kind == FLASH_REDIS_ERROR) {
            st = FLASH_EBACKEND; /* OOM, READONLY, a script error ...: this key only */
            if (r->len >= 8 && memcmp(r->str, "NOSCRIPT", 8) == 0) rd->scripts_lost = true;
            if (rd->cluster && it) { /* the cluster decides: redirect, retry or fail */
                const char *text = flash__redis_errtext(rd, req, r);
                if (text) {
                    it->value = text;
                    it->value_len = r->len;
                    st = FLASH__REDIS_ERRTEXT;
                }
            }
        } else if (r->kind == FLASH_REDIS_ARRAY) {
            return FLASH_EPROTO;
        } else {
            switch (req->code) {
            case FLASH_CACHE_GET:
                if (r->kind == FLASH_REDIS_NIL) st = FLASH_ENOTFOUND;
                else if (r->kind != FLASH_REDIS_BULK) return FLASH_EPROTO;
                else if (r->skip) st = FLASH_ETOOLARGE;
                else if (r->len < FLASH__REDIS_HDR) st = FLASH_EPROTO; /* not written by flash */
                else if (r->len - FLASH__REDIS_HDR > rd->max_value) st = FLASH_ETOOLARGE;
                else if (!it) st = FLASH_OK;
                else {
                    size_t n = r->len - FLASH__REDIS_HDR;
                    char *p = flash__redis_keep(rd, req, r->str + FLASH__REDIS_HDR, n);
                    st = p ? FLASH_OK : FLASH_ENOMEM;
                    if (p) {
                        it->value = p;
                        it->value_len = n;
                        it->cas = flash__redis_le(r->str, 8) & FLASH__REDIS_CAS_MASK;
                        it->flags = (uint32_t)flash__redis_le(r->str + 8, 4);
                    }
                }
                break;
            case FLASH_CACHE_SET:
                if (r->kind == FLASH_REDIS_SIMPLE) st = FLASH_OK;
                break;
            case FLASH_CACHE_ADD:
                if (r->kind == FLASH_REDIS_SIMPLE) st = FLASH_OK;
                else if (r->kind == FLASH_REDIS_NIL) st = FLASH_ENOTSTORED;
                break;
            case FLASH_CACHE_CAS:
                if (r->kind == FLASH_REDIS_INTEGER && r->integer >= 0 && r->integer <= 2)
                    st = r->integer == 1 ? FLASH_OK : r->integer == 0 ? FLASH_ENOTFOUND : FLASH_ENOTSTORED;
                break;
            case FLASH_CACHE_DELETE:
                if (r->kind == FLASH_REDIS_INTEGER) st = r->integer > 0 ? FLASH_OK : FLASH_ENOTFOUND;
                break;
            case FLASH_CACHE_MARK_STALE:
                if (r->kind == FLASH_REDIS_INTEGER && r->integer >= 0 && r->integer <= 2)
                    st = r->integer == 1 ? FLASH_OK : r->integer == 0 ? FLASH_ENOTFOUND : FLASH_EINVAL;
                break;
            case FLASH_CACHE_INCR:
                if (r->kind == FLASH_REDIS_INTEGER && (r->integer == -1 || r->integer == -2)) {
                    st = r->integer == -1 ? FLASH_ENOTFOUND : FLASH_EINVAL;
                } else if (r->kind == FLASH_REDIS_BULK && !r->skip) {
                    uint64_t v = 0;
                    size_t i;
                    for (i = 0; i < r->len; i++) {
                        unsigned d = (unsigned)(unsigned char)r->str[i] - '0';
                        if (d > 9 || v > (UINT64_MAX - d) / 10) break;
                        v = v * 10 + d;
                    }
                    if (i == r->len && i) {
                        st = FLASH_OK;
                        if (it) it->number = v;
                    }
                }
                break;
            }
            if (st == FLASH_EPROTO && req->code != FLASH_CACHE_GET) return FLASH_EPROTO;
        }
        if (it) it->status = st;
        req->pos++;
        if (req->code != FLASH_CACHE_GET || !--req->gleft) { /* a command is answered */
            req->in_array = false;
            req->gpos++;
            req->ask_pending = req->asking && req->pos < req->count;
        }
    }
    if (req->pos == req->count) { /* the request is in */
        rd->pipe.head = req->in_pipe.next;
        if (!rd->pipe.head) rd->pipe.tail = NULL;
        flash__redis_complete(rd, req);
        flash__pipe_arm_timer(&rd->pipe);
    }
    return FLASH_OK;
}

/* The pipe's hooks. */

/* Consume every complete element in the read buffer; false after failing. */
static bool flash__redis_process(flash__pipe *p) {
    flash__redis *rd = (flash__redis *)p->owner;
    size_t off = 0;
    for (;;) {
        flash_redis_reply r;
        ptrdiff_t n;
        int rc;
        if (!flash__pipe_skip(p, &off)) return false;
        if (p->skip || off == p->rlen) break;
        /* + 32: a lease read's reply starts with its state byte and PTTL */
        n = flash_redis_parse(p->rbuf + off, p->rlen - off, rd->max_value + FLASH__REDIS_HDR + 32, &r);
        if (n == 0) break;
        rc = n < 0 ? FLASH_EPROTO : flash__redis_apply(rd, &r);
        if (rc) {
            flash__pipe_fail(p, rc, rc == FLASH_EBACKEND);
            return false;
        }
        off += (size_t)n;
        if (r.skip) p->skip = r.len + 2;
    }
    flash__pipe_consumed(p, off);
    return true;
}

static void flash__redis_fail_req(flash__pipe *p, flash__pipe_req *in_pipe, int code) {
    flash__redis_req *req = (flash__redis_req *)in_pipe;
    uint32_t k;
    for (k = req->pos; k < req->count; k++) flash__redis_set_status(req, k, code);
    flash__redis_complete((flash__redis *)p->owner, req);
}

/* Every connection starts with the hello (AUTH, SELECT, SCRIPT LOADs), in
   front of the requests already buffered. */
static bool flash__redis_opening(flash__pipe *p) {
    flash__redis *rd = (flash__redis *)p->owner;
    if (!flash__pipe_reserve(p, rd->hello_len)) return false;
    memmove(p->wbuf + rd->hello_len, p->wbuf + p->woff, p->wlen - p->woff);
    memcpy(p->wbuf, rd->hello, rd->hello_len);
    p->wlen = p->wlen - p->woff + rd->hello_len;
    p->woff = 0;
    rd->hello_left = rd->hello_replies;
    return true;
}

static void flash__redis_closed(flash__pipe *p) {
    flash__redis *rd = (flash__redis *)p->owner;
    rd->hello_left = 0;
    rd->scripts_lost = false;
}

static const flash__pipe_hooks flash__redis_hooks = {flash__redis_process, flash__redis_fail_req,
                                                     flash__redis_opening, flash__redis_closed};


/* ---- request encoding ---------------------------------------------------------- */

/* "<c><decimal>\r\n" */
static void flash__redis_put_len(flash__redis *rd, char c, uint64_t v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    rd->pipe.wbuf[rd->pipe.wlen++] = c;
    while (n) rd->pipe.wbuf[rd->pipe.wlen++] = tmp[--n];
    flash__pipe_put(&rd->pipe, "\r\n", 2);
}

/* One bulk string, optionally prefixed by a 12-byte value header. */
static void flash__redis_put_bulk(flash__redis *rd, const char *hdr, const void *p, size_t n) {
    flash__redis_put_len(rd, '$', n + (hdr ? FLASH__REDIS_HDR : 0));
    if (hdr) flash__pipe_put(&rd->pipe, hdr, FLASH__REDIS_HDR);
    flash__pipe_put(&rd->pipe, p, n);
    flash__pipe_put(&rd->pipe, "\r\n", 2);
}

static void flash__redis_put_str(flash__redis *rd, const char *s) { flash__redis_put_bulk(rd, NULL, s, strlen(s)); }

static void flash__redis_put_dec(flash__redis *rd, uint64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    flash__redis_put_bulk(rd, NULL, tmp, (size_t)n);
}

/* [cas u64 LE][flags u32 LE] with a fresh cas token. */
static void flash__redis_header(flash__redis *rd, uint32_t flags, char out[FLASH__REDIS_HDR]) {
    uint64_t cas = rd->next_cas++ & FLASH__REDIS_CAS_MASK; /* the top bits: lease state */
    int i;
    if (!cas) cas = rd->next_cas++ & FLASH__REDIS_CAS_MASK; /* 0 means "no token" */
    for (i = 0; i < 8; i++) out[i] = (char)(cas >> (8 * i));
    for (i = 0; i < 4; i++) out[8 + i] = (char)(flags >> (8 * i));
}

/* Append the request; false when out of memory. */
static bool flash__redis_encode(flash__redis *rd, flash__redis_req *req, const flash_cache_op *op) {
    uint32_t k, g;
    static const char asking[] = "*1\r\n$6\r\nASKING\r\n";
    if (req->raw) { /* the caller's RESP bytes, as they are */
        if (!flash__pipe_reserve(&rd->pipe, op->items[0].key_len)) return false;
        flash__pipe_put(&rd->pipe, op->items[0].key, op->items[0].key_len);
        return true;
    }
    if (op->code == FLASH_CACHE_GET) {
        uint32_t ngroups = req->groups ? 0 : req->nplain ? 1 : 0, size;
        size_t need = 32;
        for (k = 0; k < req->count; k++) need += op->items[req->idx[k]].key_len + 32;
        if (req->groups)
            for (k = 0; k < req->count; k += req->groups[ngroups++]) {
            }
        need += (size_t)ngroups * (48 + sizeof asking);
        if (!flash__pipe_reserve(&rd->pipe, need)) return false;
        for (g = 0, k = 0; g < ngroups; g++) { /* one MGET per slot on a cluster node */
            uint32_t end;
            size = req->groups ? req->groups[g] : req->nplain;
            if (req->asking) flash__pipe_put(&rd->pipe, asking, sizeof asking - 1);
            flash__redis_put_len(rd, '*', (uint64_t)size + 1);
            flash__redis_put_str(rd, "MGET");
            for (end = k + size; k < end; k++)
                flash__redis_put_bulk(rd, NULL, op->items[req->idx[k]].key, op->items[req->idx[k]].key_len);
        }
        rd->stats.commands += ngroups + (req->count - req->nplain);
        for (k = req->nplain; k < req->count; k++) { /* lease reads: EVALSHA lease 1 key ttl stub */
            const flash_cache_item *it = &op->items[req->idx[k]];
            char stub[FLASH__REDIS_HDR];
            if (!flash__pipe_reserve(&rd->pipe, it->key_len + 192)) return false;
            flash__redis_header(rd, 0, stub);
            stub[7] = (char)(stub[7] | 0x40); /* won: the reader that creates it */
            flash__redis_put_len(rd, '*', 6);
            flash__redis_put_str(rd, "EVALSHA");
            flash__redis_put_str(rd, flash__redis_lease_sha);
            flash__redis_put_str(rd, "1");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            flash__redis_put_dec(rd, it->lease_s);
            flash__redis_put_bulk(rd, NULL, stub, FLASH__REDIS_HDR);
        }
        return true;
    }
    for (k = 0; k < req->count; k++) {
        const flash_cache_item *it = &op->items[req->idx[k]];
        char hdr[FLASH__REDIS_HDR], cas[8];
        size_t need = it->key_len + (op->code == FLASH_CACHE_DELETE || op->code == FLASH_CACHE_INCR ? 0 : it->value_len) +
                      256;
        int i;
        if (!flash__pipe_reserve(&rd->pipe, need + sizeof asking)) return false;
        if (req->asking) flash__pipe_put(&rd->pipe, asking, sizeof asking - 1);
        switch (op->code) {
        case FLASH_CACHE_SET:
        case FLASH_CACHE_ADD:
            flash__redis_put_len(rd, '*', 3u + (op->code == FLASH_CACHE_ADD) + (it->ttl_s ? 2u : 0u));
            flash__redis_put_str(rd, "SET");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            flash__redis_header(rd, it->flags, hdr);
            flash__redis_put_bulk(rd, hdr, it->value, it->value_len);
            if (op->code == FLASH_CACHE_ADD) flash__redis_put_str(rd, "NX");
            if (it->ttl_s) {
                flash__redis_put_str(rd, "EX");
                flash__redis_put_dec(rd, it->ttl_s);
            }
            break;
        case FLASH_CACHE_CAS:
            flash__redis_put_len(rd, '*', 7);
            flash__redis_put_str(rd, "EVALSHA");
            flash__redis_put_str(rd, flash__redis_cas_sha);
            flash__redis_put_str(rd, "1");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            for (i = 0; i < 8; i++) cas[i] = (char)(it->cas >> (8 * i));
            flash__redis_put_bulk(rd, NULL, cas, 8);
            flash__redis_header(rd, it->flags, hdr);
            flash__redis_put_bulk(rd, hdr, it->value, it->value_len);
            flash__redis_put_dec(rd, it->ttl_s);
            break;
        case FLASH_CACHE_DELETE:
            flash__redis_put_len(rd, '*', 2);
            flash__redis_put_str(rd, "DEL");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            break;
        case FLASH_CACHE_MARK_STALE:
            flash__redis_put_len(rd, '*', 6);
            flash__redis_put_str(rd, "EVALSHA");
            flash__redis_put_str(rd, flash__redis_stale_sha);
            flash__redis_put_str(rd, "1");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            flash__redis_header(rd, 0, hdr);
            hdr[7] = (char)(hdr[7] | 0x80); /* stale, not won */
            flash__redis_put_bulk(rd, NULL, hdr, 8);
            flash__redis_put_dec(rd, it->ttl_s);
            break;
        default: /* INCR */
            flash__redis_put_len(rd, '*', 9);
            flash__redis_put_str(rd, "EVALSHA");
            flash__redis_put_str(rd, flash__redis_incr_sha);
            flash__redis_put_str(rd, "1");
            flash__redis_put_bulk(rd, NULL, it->key, it->key_len);
            flash__redis_put_dec(rd, it->number);
            flash__redis_header(rd, 0, hdr);
            flash__redis_put_bulk(rd, NULL, hdr, 8);
            flash__redis_put_str(rd, it->create ? "1" : "0");
            flash__redis_put_dec(rd, it->initial);
            flash__redis_put_dec(rd, it->ttl_s);
            break;
        }
    }
    return true;
}

/* ---- vtable ------------------------------------------------------------------- */

static void flash__redis_submit(void *self, flash_loop loop, flash_cache_op *op) {
    flash__redis *rd = (flash__redis *)self;
    flash__redis_req *req = NULL;
    size_t i, n, unsent;
    bool store, valid_code, down, raw, asking, single;
    (void)loop; /* desc.loop drives everything */
    if (!rd || !op) return;
    raw = rd->raw_next && op->count == 1; /* redis_cluster.h's own commands */
    asking = rd->asking_next;
    single = rd->single_next;
    rd->raw_next = rd->asking_next = rd->single_next = false;
    n = op->count;
    op->status = FLASH_OK;
    op->round_trips = 0;
    op->priv[0] = op->priv[1] = NULL;
    /* a cluster node: no MARK_STALE nor lease reads (its slot routing does not carry them) */
    valid_code = op->code >= FLASH_CACHE_GET && op->code <= (rd->cluster ? FLASH_CACHE_INCR : FLASH_CACHE_MARK_STALE);
    store = op->code == FLASH_CACHE_SET || op->code == FLASH_CACHE_ADD || op->code == FLASH_CACHE_CAS;
    if (!rd->finished.stopped && (!n || op->items) && n < UINT32_MAX && n < (SIZE_MAX - sizeof *req) / sizeof(uint32_t))
        req = (flash__redis_req *)flash__redis_alloc(rd, sizeof *req + n * sizeof(uint32_t) * 2);
    if (!req) {
        int code = rd->finished.stopped ? FLASH_ECANCELED : (n && !op->items) ? FLASH_EINVAL : FLASH_ENOMEM;
        op->status = code;
        for (i = 0; op->items && i < n; i++) op->items[i].status = code;
        if (rd->finished.stopped) return; /* documented: no submit from destroy */
        flash__pipe_finished_oom(&rd->finished, op);
        return;
    }
    memset(req, 0, sizeof *req);
    req->op = op;
    req->code = op->code;
    req->idx = (uint32_t *)(req + 1);
    req->raw = raw;
    req->raw_left = 1;
    req->asking = req->ask_pending = asking;
    req->next_live = rd->live;
    if (rd->live) rd->live->prev_live = req;
    rd->live = req;
    op->priv[0] = req;
    if (!valid_code) op->status = FLASH_EINVAL;
    down = flash__pipe_down(&rd->pipe, flash__pipe_now());
    for (i = 0; i < n; i++) {
        flash_cache_item *it = &op->items[i];
        int st = !valid_code ? FLASH_EINVAL
                 : raw       ? (it->key && it->key_len ? FLASH_OK : FLASH_EINVAL)
                             : flash__pipe_key_status(it->key, it->key_len);
        if (op->code == FLASH_CACHE_GET) {
            it->value = NULL;
            it->value_len = 0;
            it->flags = 0;
            it->cas = 0;
            it->lease = FLASH_LEASE_NONE;
            it->stale = false;
            it->ttl_left_ms = 0;
        }
        if (!st && store && it->value_len > rd->max_value) st = FLASH_ETOOLARGE;
        if (!st && store && it->value_len && !it->value) st = FLASH_EINVAL;
        if (!st && down) {
            st = FLASH_EBACKEND;
            rd->stats.fast_fails++;
        }
        it->status = st;
        if (!st) req->idx[req->count++] = (uint32_t)i;
    }
    req->nplain = req->count;
    if (op->code == FLASH_CACHE_GET && !raw && !rd->cluster) { /* plain reads (the MGET) first, then lease reads */
        uint32_t *lease = req->idx + n, nl = 0, k, np = 0;
        for (k = 0; k < req->count; k++) {
            uint32_t j = req->idx[k];
            if (op->items[j].lease_s) lease[nl++] = j;
            else req->idx[np++] = j;
        }
        memcpy(req->idx + np, lease, nl * sizeof *lease);
        req->nplain = np;
    }
    if (!req->count) { /* nothing to send */
        flash__redis_complete(rd, req);
        return;
    }
    if (rd->cluster && op->code == FLASH_CACHE_GET && !raw) {
        /* One MGET per run of keys of one slot (CROSSSLOT is per slot even
           on one node); the cluster hands the keys sorted by slot. */
        uint32_t g = 0, k;
        size_t slot = (size_t)-1;
        req->groups = req->idx + n;
        for (k = 0; k < req->count; k++) {
            const flash_cache_item *it = &op->items[req->idx[k]];
            size_t s = flash_redis_key_slot(it->key, it->key_len);
            if (k && s == slot && !single) req->groups[g - 1]++;
            else req->groups[g++] = 1;
            slot = s;
        }
    }
    if (rd->scripts_lost && !rd->pipe.head) flash__pipe_close(&rd->pipe); /* SCRIPT FLUSH: reload them */
    flash__pipe_check_idle(&rd->pipe);
    unsent = rd->pipe.wlen - rd->pipe.woff;
    if (!flash__redis_encode(rd, req, op)) { /* out of memory: drop the partial request */
        rd->pipe.wlen = rd->pipe.woff + unsent;
        for (i = 0; i < req->count; i++) op->items[req->idx[i]].status = FLASH_ENOMEM;
        flash__redis_complete(rd, req);
        return;
    }
    op->round_trips = 1;
    rd->stats.requests++;
    rd->stats.commands += op->code == FLASH_CACHE_GET && !raw ? 0 : req->count; /* GET: counted by encode */
    flash__pipe_send(&rd->pipe, &req->in_pipe);
}

static void flash__redis_cancel(void *self, flash_cache_op *op) {
    flash__redis *rd = (flash__redis *)self;
    if (!rd || !op || !op->priv[0] || flash__pipe_cancel_oom(&rd->finished, op)) return;
    {
        flash__redis_req *req = (flash__redis_req *)op->priv[0];
        if (req->op == op) req->op = NULL; /* freed when its replies are in */
    }
    op->priv[0] = op->priv[1] = NULL;
}

static size_t flash__redis_max_value(void *self) { return self ? ((flash__redis *)self)->max_value : 0; }

static void flash__redis_destroy(void *self) {
    flash__redis *rd = (flash__redis *)self;
    flash__redis_req *req;
    if (!rd) return;
    flash__pipe_finq_stop(&rd->finished); /* done() for the oom list */
    flash__pipe_close(&rd->pipe);
    for (req = (flash__redis_req *)rd->pipe.head; req; req = (flash__redis_req *)req->in_pipe.next) {
        /* unanswered keys: cancelled */
        uint32_t k;
        if (!req->op) continue;
        for (k = req->pos; k < req->count; k++) flash__redis_set_status(req, k, FLASH_ECANCELED);
        req->op->status = FLASH_ECANCELED;
    }
    rd->pipe.head = rd->pipe.tail = NULL;
    while (rd->live) { /* done for every op not cancelled, then free */
        flash_cache_op *op;
        req = rd->live;
        op = req->op;
        if (op) {
            op->priv[0] = NULL;
            op->done(op);
        }
        flash__redis_req_free(rd, req);
    }
    flash__redis_free(rd, rd->hello);
    flash__pipe_release(&rd->pipe);
    rd->alloc.free(rd, rd->alloc.user_data);
}

static const flash_cache_vtable flash__redis_vt = {
    "redis", flash__redis_submit, flash__redis_cancel, flash__redis_max_value, flash__redis_destroy,
    FLASH_CACHE_CAP_LEASES,
};

/* AUTH [user] password, SELECT db, SCRIPT LOAD x2: built once, sent first
   on every connection (in the same write as the first request). */
static int flash__redis_build_hello(flash__redis *rd, const flash_redis_desc *d) {
    size_t need = 512 + sizeof flash__redis_cas_lua + sizeof flash__redis_incr_lua + sizeof flash__redis_lease_lua +
                  sizeof flash__redis_stale_lua +
                  (d->username ? strlen(d->username) : 0) + (d->password ? strlen(d->password) : 0);
    char *saved = rd->pipe.wbuf;
    size_t wl = rd->pipe.wlen, wc = rd->pipe.wcap;
    rd->pipe.wbuf = (char *)flash__redis_alloc(rd, need);
    if (!rd->pipe.wbuf) {
        rd->pipe.wbuf = saved;
        return FLASH_ENOMEM;
    }
    rd->pipe.wlen = 0;
    rd->pipe.wcap = need;
    if (d->password) {
        flash__redis_put_len(rd, '*', d->username ? 3 : 2);
        flash__redis_put_str(rd, "AUTH");
        if (d->username) flash__redis_put_str(rd, d->username);
        flash__redis_put_str(rd, d->password);
        rd->hello_replies++;
    }
    if (d->db) {
        flash__redis_put_len(rd, '*', 2);
        flash__redis_put_str(rd, "SELECT");
        flash__redis_put_dec(rd, d->db);
        rd->hello_replies++;
    }
    if (rd->no_scripts) goto done;
    { /* the last replies: cas, incr, lease, stale (cluster nodes: the first two) */
        const char *const lua[4] = {flash__redis_cas_lua, flash__redis_incr_lua, flash__redis_lease_lua,
                                    flash__redis_stale_lua};
        int i, nscripts = rd->cluster ? 2 : 4;
        for (i = 0; i < nscripts; i++) {
            flash__redis_put_len(rd, '*', 3);
            flash__redis_put_str(rd, "SCRIPT");
            flash__redis_put_str(rd, "LOAD");
            flash__redis_put_str(rd, lua[i]);
        }
        rd->hello_replies += (uint32_t)nscripts;
    }
done:
    rd->hello = rd->pipe.wbuf;
    rd->hello_len = rd->pipe.wlen;
    rd->pipe.wbuf = saved;
    rd->pipe.wlen = wl;
    rd->pipe.wcap = wc;
    return FLASH_OK;
}

/* A backend; cluster / no_scripts for the ones redis_cluster.h makes. */
static flash__redis *flash__redis_make(const flash_redis_desc *desc, bool cluster, bool no_scripts, int *error) {
    flash_allocator al;
    flash__redis *rd;
    uint64_t seed;
    struct timespec ts;
    int rc = FLASH_EINVAL;
    if (error) *error = FLASH_OK;
    if (!desc || !flash__pipe_loop_ok(&desc->loop) || !desc->host ||
        !desc->host[0] || strlen(desc->host) > 255 || (desc->username && !desc->password)) {
        if (error) *error = FLASH_EINVAL;
        return NULL;
    }
    al = flash__pipe_allocator(desc->allocator);
    rd = (flash__redis *)al.alloc(sizeof *rd, al.user_data);
    if (!rd) {
        if (error) *error = FLASH_ENOMEM;
        return NULL;
    }
    memset(rd, 0, sizeof *rd);
    rd->alloc = al;
    rd->cluster = cluster;
    rd->no_scripts = no_scripts;
    flash__pipe_setup(&rd->pipe, &flash__redis_hooks, rd, desc->loop, al);
    flash__pipe_finq_setup(&rd->finished, desc->loop, rd, flash__redis_finish);
    rd->pipe.connect_timeout_ms = desc->connect_timeout_ms ? desc->connect_timeout_ms : 1000;
    rd->pipe.timeout_ms = desc->timeout_ms ? desc->timeout_ms : 1000;
    rd->pipe.retry_interval_ms = desc->retry_interval_ms ? desc->retry_interval_ms : 1000;
    rd->max_value = desc->max_value ? desc->max_value : (size_t)1 << 20;
    if (rd->max_value > ((size_t)1 << 40)) rd->max_value = (size_t)1 << 40;
    /* CAS tokens: start at a random point (splitmix64 of time, address, pid),
       so that writers in other processes practically never reuse one. */
    clock_gettime(CLOCK_REALTIME, &ts);
    seed = (uint64_t)ts.tv_sec * 1000000007u ^ (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)rd ^
           ((uint64_t)getpid() << 32);
    seed += 0x9E3779B97F4A7C15ull;
    seed = (seed ^ (seed >> 30)) * 0xBF58476D1CE4E5B9ull;
    seed = (seed ^ (seed >> 27)) * 0x94D049BB133111EBull;
    rd->next_cas = seed ^ (seed >> 31);
    rc = flash__redis_build_hello(rd, desc);
    if (rc) goto fail;
    rc = flash__pipe_resolve(&rd->pipe, desc->host, desc->port ? desc->port : 6379);
    if (rc) goto fail;
    return rd;
fail:
    if (error) *error = rc;
    flash__redis_destroy(rd);
    return NULL;
}

FLASH_API flash_cache flash_redis_create(const flash_redis_desc *desc, int *error) {
    flash_cache out = {NULL, NULL};
    flash__redis *rd = flash__redis_make(desc, false, false, error);
    if (rd) {
        out.vt = &flash__redis_vt;
        out.self = rd;
    }
    return out;
}

FLASH_API int flash_redis_stats_get(flash_cache cache, flash_redis_stats *out) {
    const flash__redis *rd = (const flash__redis *)cache.self;
    if (cache.vt != &flash__redis_vt || !rd || !out) return FLASH_EINVAL;
    *out = rd->stats;
    out->connects = rd->pipe.counts.connects;
    out->reconnects = rd->pipe.counts.reconnects;
    out->failures = rd->pipe.counts.failures;
    out->timeouts = rd->pipe.counts.timeouts;
    out->proto_errors = rd->pipe.counts.proto_errors;
    out->connected = rd->pipe.counts.connected;
    out->down = flash__pipe_down(&rd->pipe, flash__pipe_now());
    return FLASH_OK;
}

#endif /* FLASH_REDIS_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
