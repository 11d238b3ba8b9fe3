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
     op->quiet is ignored: every command is answered. Every connection
     starts with AUTH and SELECT (when desc asks for them) and SCRIPT LOAD of
     both scripts, in the same write as the first request (no extra round
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

#ifdef __cplusplus
}
#endif
#endif /* FLASH_REDIS_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_REDIS_IMPLEMENTED
#define FLASH_REDIS_IMPLEMENTED
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

#define FLASH__REDIS_MAX_LINE 65536
#define FLASH__REDIS_MAX_KEY 250
#define FLASH__REDIS_HDR 12 /* [cas u64 LE][flags u32 LE] before every value */
#define FLASH__REDIS_READ_CHUNK 16384
#define FLASH__REDIS_KEEP_BUF (256u << 10) /* larger idle buffers are freed */

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

/* ---- Lua scripts ------------------------------------------------------------
   Loaded with SCRIPT LOAD first on every connection, run with EVALSHA: the
   text travels once per connection, not once per key. Each *_sha is the
   SHA1 of its script's text: edit both together (the load checks it). */

/* KEYS[1]; ARGV: expected cas (8 bytes), new header+value, ttl ("0": none).
   0 absent, 2 changed, 1 stored. */
static const char flash__redis_cas_lua[] =
    "local v=redis.call('GET',KEYS[1]) if not v then return 0 end "
    "if v:sub(1,8)~=ARGV[1] then return 2 end "
    "if ARGV[3]=='0' then redis.call('SET',KEYS[1],ARGV[2]) "
    "else redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[3]) end return 1";
static const char flash__redis_cas_sha[] = "076958ea4df2b47e0a58b4da0ac07d13e9f07684";

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

/* ---- state ----------------------------------------------------------------- */

enum { FLASH__REDIS_CLOSED = 0, FLASH__REDIS_CONNECTING, FLASH__REDIS_READY };

typedef struct flash__redis flash__redis;

typedef struct flash__redis_val { /* a GET value copy; its bytes follow */
    struct flash__redis_val *next;
} flash__redis_val;

/* One op's request: its commands, answered in order. */
typedef struct flash__redis_req {
    struct flash__redis_req *next;        /* the in-flight FIFO */
    struct flash__redis_req *prev_live, *next_live, *ready_next;
    flash_cache_op *op;                   /* NULL once cancelled */
    flash_cache_opcode code;
    uint32_t *idx;                        /* item indices, in command order */
    uint32_t count, pos;                  /* keys sent; the next one not answered */
    bool in_array;                        /* GET: MGET's array header is in */
    int64_t deadline;                     /* monotonic ms; 0 until connected */
    flash__redis_val *vals;
} flash__redis_req;

struct flash__redis {
    flash_loop loop;
    flash_allocator alloc;
    uint32_t connect_timeout_ms, timeout_ms, retry_interval_ms;
    size_t max_value;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *hello;                          /* AUTH, SELECT, SCRIPT LOADs: first on a connection */
    size_t hello_len;
    uint32_t hello_replies, hello_left;   /* replies to them; still to read */
    bool scripts_lost;                    /* NOSCRIPT (SCRIPT FLUSH): reconnect when idle */
    int fd, state;
    void *io, *timer, *flush_handle;
    int io_events;
    int64_t conn_deadline, down_until;
    char *wbuf, *rbuf;
    size_t wlen, woff, wcap, rlen, rcap, skip;
    flash__redis_req *head, *tail;        /* in flight */
    flash__redis_req *live;               /* every request not freed */
    flash__redis_req *ready_first, *ready_last;
    flash_cache_op *oom_first;            /* ops we had no memory for, chained by priv[1] */
    uint64_t next_cas;
    bool destroying;
    flash_redis_stats stats;
};

static void *flash__redis_alloc(flash__redis *rd, size_t n) { return rd->alloc.alloc(n, rd->alloc.user_data); }
static void flash__redis_free(flash__redis *rd, void *p) {
    if (p) rd->alloc.free(p, rd->alloc.user_data);
}

static int64_t flash__redis_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- op completion ---------------------------------------------------------- */

static void flash__redis_req_free(flash__redis *rd, flash__redis_req *req) {
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

static void flash__redis_flush(void *arg);

static void flash__redis_schedule_flush(flash__redis *rd) {
    if (rd->flush_handle || rd->destroying) return;
    rd->flush_handle = rd->loop.vt->defer(rd->loop.native, flash__redis_flush, rd);
    if (!rd->flush_handle) rd->flush_handle = rd->loop.vt->timer(rd->loop.native, 0, flash__redis_flush, rd);
    /* Both out of memory: the next submit or I/O event schedules it again. */
}

/* The request has all its statuses: done() on the next flush. */
static void flash__redis_complete(flash__redis *rd, flash__redis_req *req) {
    if (!req->op) {
        flash__redis_req_free(rd, req);
        return;
    }
    req->ready_next = NULL;
    if (rd->ready_last) rd->ready_last->ready_next = req;
    else rd->ready_first = req;
    rd->ready_last = req;
    flash__redis_schedule_flush(rd);
}

/* Runs from the loop: done() for every finished op. */
static void flash__redis_flush(void *arg) {
    flash__redis *rd = (flash__redis *)arg;
    flash__redis_req *req = rd->ready_first;
    flash_cache_op *oom = rd->oom_first;
    rd->flush_handle = NULL;
    rd->ready_first = rd->ready_last = NULL;
    rd->oom_first = NULL;
    while (oom) {
        flash_cache_op *next = (flash_cache_op *)oom->priv[1];
        oom->priv[0] = oom->priv[1] = NULL;
        oom->done(oom);
        oom = next;
    }
    while (req) {
        flash__redis_req *next = req->ready_next;
        flash_cache_op *op = req->op;
        if (op) { /* not cancelled meanwhile */
            op->priv[0] = NULL;
            op->done(op);
        }
        flash__redis_req_free(rd, req);
        req = next;
    }
}

static void flash__redis_set_status(flash__redis_req *req, uint32_t k, int code) {
    if (req->op) req->op->items[req->idx[k]].status = code;
}

/* ---- connection ------------------------------------------------------------- */

static void flash__redis_on_io(void *arg, int events);
static void flash__redis_on_timer(void *arg);

static void flash__redis_update_io(flash__redis *rd) {
    int want;
    if (!rd->io) return;
    want = rd->state == FLASH__REDIS_CONNECTING ? FLASH_IO_WRITE
                                             : FLASH_IO_READ | (rd->woff < rd->wlen ? FLASH_IO_WRITE : 0);
    if (want != rd->io_events) {
        rd->loop.vt->io_set(rd->loop.native, rd->io, want);
        rd->io_events = want;
    }
}

static void flash__redis_arm_timer(flash__redis *rd) {
    int64_t due, wait;
    if (rd->timer) {
        rd->loop.vt->cancel(rd->loop.native, rd->timer);
        rd->timer = NULL;
    }
    if (rd->state == FLASH__REDIS_CONNECTING) due = rd->conn_deadline;
    else if (rd->state == FLASH__REDIS_READY && rd->head) due = rd->head->deadline;
    else return;
    wait = due - flash__redis_now();
    if (wait < 0) wait = 0;
    rd->timer = rd->loop.vt->timer(rd->loop.native, (uint32_t)wait, flash__redis_on_timer, rd);
}

static void flash__redis_close(flash__redis *rd) {
    if (rd->io) rd->loop.vt->io_stop(rd->loop.native, rd->io);
    if (rd->timer) rd->loop.vt->cancel(rd->loop.native, rd->timer);
    if (rd->fd >= 0) close(rd->fd);
    rd->io = rd->timer = NULL;
    rd->io_events = 0;
    rd->fd = -1;
    rd->state = FLASH__REDIS_CLOSED;
    rd->wlen = rd->woff = rd->rlen = rd->skip = 0;
    rd->hello_left = 0;
    rd->scripts_lost = false;
    rd->stats.connected = false;
}

/* Reset the connection and fail every request on it with code. */
static void flash__redis_fail(flash__redis *rd, int code, bool mark_down) {
    flash__redis_req *req = rd->head;
    bool had = req != NULL;
    flash__redis_close(rd);
    rd->head = rd->tail = NULL;
    while (req) {
        flash__redis_req *next = req->next;
        uint32_t k;
        for (k = req->pos; k < req->count; k++) flash__redis_set_status(req, k, code);
        flash__redis_complete(rd, req);
        req = next;
    }
    if (code == FLASH_ETIMEDOUT) rd->stats.timeouts++;
    else if (code == FLASH_EPROTO) rd->stats.proto_errors++;
    else if (had || mark_down) rd->stats.failures++;
    if (mark_down) rd->down_until = flash__redis_now() + rd->retry_interval_ms;
}

static void flash__redis_connected(flash__redis *rd) {
    flash__redis_req *req;
    int64_t due = flash__redis_now() + rd->timeout_ms;
    rd->state = FLASH__REDIS_READY;
    if (rd->stats.connects++) rd->stats.reconnects++;
    rd->stats.connected = true;
    for (req = rd->head; req; req = req->next) req->deadline = due;
    flash__redis_arm_timer(rd);
}

static bool flash__redis_reserve(flash__redis *rd, size_t more);

/* Open the connection, the hello first in the write buffer; false after
   failing (and marking down) the server. */
static bool flash__redis_connect(flash__redis *rd) {
    int one = 1, fl, rc;
    if (!flash__redis_reserve(rd, rd->hello_len)) {
        flash__redis_fail(rd, FLASH_ENOMEM, false);
        return false;
    }
    memmove(rd->wbuf + rd->hello_len, rd->wbuf + rd->woff, rd->wlen - rd->woff);
    memcpy(rd->wbuf, rd->hello, rd->hello_len);
    rd->wlen = rd->wlen - rd->woff + rd->hello_len;
    rd->woff = 0;
    rd->hello_left = rd->hello_replies;
    rd->fd = socket(rd->addr.ss_family, SOCK_STREAM, 0);
    if (rd->fd < 0) goto fail;
    fl = fcntl(rd->fd, F_GETFL, 0);
    if (fl < 0 || fcntl(rd->fd, F_SETFL, fl | O_NONBLOCK) < 0) goto fail;
    fcntl(rd->fd, F_SETFD, FD_CLOEXEC);
    setsockopt(rd->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    do rc = connect(rd->fd, (struct sockaddr *)&rd->addr, rd->addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS) goto fail;
    rd->state = FLASH__REDIS_CONNECTING;
    rd->io_events = FLASH_IO_WRITE;
    rd->io = rd->loop.vt->io_start(rd->loop.native, rd->fd, FLASH_IO_WRITE, flash__redis_on_io, rd);
    if (!rd->io) goto fail;
    /* Even a connect that completed at once waits for the first write event:
       the request is then written from the loop, never inside submit. */
    rd->conn_deadline = flash__redis_now() + rd->connect_timeout_ms;
    flash__redis_arm_timer(rd);
    return true;
fail:
    flash__redis_fail(rd, FLASH_EBACKEND, true);
    return false;
}

/* Write what is buffered; false after failing the server. */
static bool flash__redis_write(flash__redis *rd) {
    while (rd->woff < rd->wlen) {
        ssize_t n = send(rd->fd, rd->wbuf + rd->woff, rd->wlen - rd->woff, MSG_NOSIGNAL);
        if (n > 0) {
            rd->woff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            flash__redis_fail(rd, FLASH_EBACKEND, true);
            return false;
        }
    }
    if (rd->woff == rd->wlen) {
        rd->woff = rd->wlen = 0;
        if (rd->wcap > FLASH__REDIS_KEEP_BUF) {
            flash__redis_free(rd, rd->wbuf);
            rd->wbuf = NULL;
            rd->wcap = 0;
        }
    }
    flash__redis_update_io(rd);
    return true;
}

static uint64_t flash__redis_le(const char *p, int n) {
    uint64_t v = 0;
    while (n--) v = v << 8 | (unsigned char)p[n];
    return v;
}

/* Apply one reply element to the head request; FLASH_EPROTO when it does not fit. */
static int flash__redis_apply(flash__redis *rd, const flash_redis_reply *r) {
    flash__redis_req *req = rd->head;
    flash_cache_item *it;
    int st = FLASH_EPROTO;
    if (rd->hello_left) { /* AUTH / SELECT: +OK; SCRIPT LOAD: the digest we use */
        uint32_t left = rd->hello_left--; /* the SCRIPT LOADs come last: cas at 2, incr at 1 */
        const char *sha = left == 2 ? flash__redis_cas_sha : flash__redis_incr_sha;
        if (r->kind == FLASH_REDIS_ERROR) return FLASH_EBACKEND; /* a wrong password, ... */
        if (left > 2) return r->kind == FLASH_REDIS_SIMPLE ? FLASH_OK : FLASH_EPROTO;
        return r->kind == FLASH_REDIS_BULK && r->len == 40 && memcmp(r->str, sha, 40) == 0 ? FLASH_OK : FLASH_EPROTO;
    }
    if (!req) return FLASH_EPROTO; /* nothing was asked */
    if (req->code == FLASH_CACHE_GET && !req->in_array) {
        if (r->kind == FLASH_REDIS_ERROR) { /* MGET refused: every key */
            while (req->pos < req->count) flash__redis_set_status(req, req->pos++, FLASH_EBACKEND);
        } else if (r->kind != FLASH_REDIS_ARRAY || r->integer != (int64_t)req->count) {
            return FLASH_EPROTO;
        }
        req->in_array = true;
    } else {
        if (req->pos >= req->count) return FLASH_EPROTO;
        it = req->op ? &req->op->items[req->idx[req->pos]] : NULL;
        if (r->kind == FLASH_REDIS_ERROR) {
            st = FLASH_EBACKEND; /* OOM, READONLY, a script error ...: this key only */
            if (r->len >= 8 && memcmp(r->str, "NOSCRIPT", 8) == 0) rd->scripts_lost = true;
        } else if (r->kind == FLASH_REDIS_ARRAY) {
            return FLASH_EPROTO;
        } else {
            switch (req->code) {
            case FLASH_CACHE_GET:
                if (r->kind == FLASH_REDIS_NIL) st = FLASH_ENOTFOUND;
                else if (r->kind != FLASH_REDIS_BULK) return FLASH_EPROTO;
                else if (r->skip) st = FLASH_ETOOLARGE;
                else if (r->len < FLASH__REDIS_HDR) st = FLASH_EPROTO; /* not written by flash */
                else if (!it) st = FLASH_OK;
                else {
                    size_t n = r->len - FLASH__REDIS_HDR;
                    flash__redis_val *v = (flash__redis_val *)flash__redis_alloc(rd, sizeof *v + n + 1);
                    st = v ? FLASH_OK : FLASH_ENOMEM;
                    if (v) {
                        char *p = (char *)(v + 1);
                        v->next = req->vals;
                        req->vals = v;
                        if (n) memcpy(p, r->str + FLASH__REDIS_HDR, n);
                        p[n] = 0;
                        it->value = p;
                        it->value_len = n;
                        it->cas = flash__redis_le(r->str, 8);
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
    }
    if (req->pos == req->count) { /* the request is in */
        rd->head = req->next;
        if (!rd->head) rd->tail = NULL;
        flash__redis_complete(rd, req);
        flash__redis_arm_timer(rd);
    }
    return FLASH_OK;
}

/* Consume every complete element in the read buffer; false after failing. */
static bool flash__redis_process(flash__redis *rd) {
    size_t off = 0;
    for (;;) {
        flash_redis_reply r;
        ptrdiff_t n;
        int rc;
        if (rd->skip) { /* dropping an oversized bulk; its last two bytes are "\r\n" */
            while (rd->skip && off < rd->rlen) {
                if ((rd->skip == 2 && rd->rbuf[off] != '\r') || (rd->skip == 1 && rd->rbuf[off] != '\n')) {
                    flash__redis_fail(rd, FLASH_EPROTO, false);
                    return false;
                }
                if (rd->skip > 2) {
                    size_t take = rd->rlen - off < rd->skip - 2 ? rd->rlen - off : rd->skip - 2;
                    off += take;
                    rd->skip -= take;
                } else {
                    off++;
                    rd->skip--;
                }
            }
            if (rd->skip) break;
        }
        if (off == rd->rlen) break;
        n = flash_redis_parse(rd->rbuf + off, rd->rlen - off, rd->max_value + FLASH__REDIS_HDR, &r);
        if (n == 0) break;
        rc = n < 0 ? FLASH_EPROTO : flash__redis_apply(rd, &r);
        if (rc) {
            flash__redis_fail(rd, rc, rc == FLASH_EBACKEND);
            return false;
        }
        off += (size_t)n;
        if (r.skip) rd->skip = r.len + 2;
    }
    if (off) {
        rd->rlen -= off;
        if (rd->rlen) memmove(rd->rbuf, rd->rbuf + off, rd->rlen);
    }
    if (!rd->rlen && rd->rcap > FLASH__REDIS_KEEP_BUF) { /* a large value went by */
        flash__redis_free(rd, rd->rbuf);
        rd->rbuf = NULL;
        rd->rcap = 0;
    }
    return true;
}

static void flash__redis_read(flash__redis *rd) {
    int rounds;
    for (rounds = 0; rounds < 16; rounds++) {
        ssize_t n;
        size_t room;
        if (rd->rcap - rd->rlen < FLASH__REDIS_READ_CHUNK) {
            size_t cap = rd->rcap ? rd->rcap * 2 : 2 * FLASH__REDIS_READ_CHUNK;
            char *p;
            while (cap - rd->rlen < FLASH__REDIS_READ_CHUNK) cap *= 2;
            p = (char *)flash__redis_alloc(rd, cap);
            if (!p) {
                flash__redis_fail(rd, FLASH_ENOMEM, false);
                return;
            }
            if (rd->rlen) memcpy(p, rd->rbuf, rd->rlen);
            flash__redis_free(rd, rd->rbuf);
            rd->rbuf = p;
            rd->rcap = cap;
        }
        room = rd->rcap - rd->rlen;
        n = recv(rd->fd, rd->rbuf + rd->rlen, room, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0) { /* closed or reset: in-flight keys fail, an idle one just closes */
            if (rd->head) flash__redis_fail(rd, FLASH_EBACKEND, true);
            else flash__redis_close(rd);
            return;
        }
        rd->rlen += (size_t)n;
        if (!flash__redis_process(rd)) return;
        if ((size_t)n < room) break;
    }
}

static void flash__redis_on_io(void *arg, int events) {
    flash__redis *rd = (flash__redis *)arg;
    if (rd->state == FLASH__REDIS_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(rd->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) {
            flash__redis_fail(rd, FLASH_EBACKEND, true);
            return;
        }
        flash__redis_connected(rd);
        events |= FLASH_IO_WRITE;
    }
    if (rd->state != FLASH__REDIS_READY) return;
    if ((events & FLASH_IO_WRITE) && !flash__redis_write(rd)) return;
    if (events & FLASH_IO_READ) flash__redis_read(rd);
    if (rd->state == FLASH__REDIS_READY) flash__redis_update_io(rd);
}

static void flash__redis_on_timer(void *arg) {
    flash__redis *rd = (flash__redis *)arg;
    int64_t due = rd->state == FLASH__REDIS_CONNECTING ? rd->conn_deadline : rd->head ? rd->head->deadline : 0;
    rd->timer = NULL;
    if (rd->state == FLASH__REDIS_CLOSED || !due) return;
    if (flash__redis_now() >= due) flash__redis_fail(rd, FLASH_ETIMEDOUT, true);
    else flash__redis_arm_timer(rd);
}

/* ---- request encoding ---------------------------------------------------------- */

static bool flash__redis_reserve(flash__redis *rd, size_t more) {
    size_t cap;
    char *p;
    if (rd->wcap - rd->wlen >= more) return true;
    if (rd->woff) { /* drop what was sent */
        memmove(rd->wbuf, rd->wbuf + rd->woff, rd->wlen - rd->woff);
        rd->wlen -= rd->woff;
        rd->woff = 0;
        if (rd->wcap - rd->wlen >= more) return true;
    }
    cap = rd->wcap ? rd->wcap * 2 : 4096;
    while (cap - rd->wlen < more) cap *= 2;
    p = (char *)flash__redis_alloc(rd, cap);
    if (!p) return false;
    if (rd->wlen) memcpy(p, rd->wbuf, rd->wlen);
    flash__redis_free(rd, rd->wbuf);
    rd->wbuf = p;
    rd->wcap = cap;
    return true;
}

static void flash__redis_put(flash__redis *rd, const void *p, size_t n) {
    if (n) memcpy(rd->wbuf + rd->wlen, p, n);
    rd->wlen += n;
}

/* "<c><decimal>\r\n" */
static void flash__redis_put_len(flash__redis *rd, char c, uint64_t v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    rd->wbuf[rd->wlen++] = c;
    while (n) rd->wbuf[rd->wlen++] = tmp[--n];
    flash__redis_put(rd, "\r\n", 2);
}

/* One bulk string, optionally prefixed by a 12-byte value header. */
static void flash__redis_put_bulk(flash__redis *rd, const char *hdr, const void *p, size_t n) {
    flash__redis_put_len(rd, '$', n + (hdr ? FLASH__REDIS_HDR : 0));
    if (hdr) flash__redis_put(rd, hdr, FLASH__REDIS_HDR);
    flash__redis_put(rd, p, n);
    flash__redis_put(rd, "\r\n", 2);
}

static void flash__redis_put_str(flash__redis *rd, const char *s) { flash__redis_put_bulk(rd, NULL, s, strlen(s)); }

static void flash__redis_put_dec(flash__redis *rd, uint64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    flash__redis_put_bulk(rd, NULL, tmp, (size_t)n);
}

/* [cas u64 LE][flags u32 LE] with a fresh cas token. */
static void flash__redis_header(flash__redis *rd, uint32_t flags, char out[FLASH__REDIS_HDR]) {
    uint64_t cas = rd->next_cas++;
    int i;
    if (!cas) cas = rd->next_cas++; /* 0 means "no token" */
    for (i = 0; i < 8; i++) out[i] = (char)(cas >> (8 * i));
    for (i = 0; i < 4; i++) out[8 + i] = (char)(flags >> (8 * i));
}

/* Append the request; false when out of memory. */
static bool flash__redis_encode(flash__redis *rd, flash__redis_req *req, const flash_cache_op *op) {
    uint32_t k;
    if (op->code == FLASH_CACHE_GET) {
        size_t need = 32;
        for (k = 0; k < req->count; k++) need += op->items[req->idx[k]].key_len + 32;
        if (!flash__redis_reserve(rd, need)) return false;
        flash__redis_put_len(rd, '*', (uint64_t)req->count + 1);
        flash__redis_put_str(rd, "MGET");
        for (k = 0; k < req->count; k++)
            flash__redis_put_bulk(rd, NULL, op->items[req->idx[k]].key, op->items[req->idx[k]].key_len);
        return true;
    }
    for (k = 0; k < req->count; k++) {
        const flash_cache_item *it = &op->items[req->idx[k]];
        char hdr[FLASH__REDIS_HDR], cas[8];
        size_t need = it->key_len + (op->code == FLASH_CACHE_DELETE || op->code == FLASH_CACHE_INCR ? 0 : it->value_len) +
                      256;
        int i;
        if (!flash__redis_reserve(rd, need)) return false;
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

static int flash__redis_key_status(const char *key, size_t len) {
    size_t i;
    if (!key || !len) return FLASH_EINVAL;
    if (len > FLASH__REDIS_MAX_KEY) return FLASH_ETOOLARGE;
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)key[i];
        if (c <= ' ' || c == 127) return FLASH_EINVAL; /* memcached's rule, for one behaviour everywhere */
    }
    return FLASH_OK;
}

/* An idle connection the server closed (timeout, restart, CLIENT KILL)
   before the loop saw it. */
static bool flash__redis_peer_closed(flash__redis *rd) {
    char c;
    ssize_t n = recv(rd->fd, &c, 1, MSG_PEEK); /* the fd is non-blocking */
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void flash__redis_submit(void *self, flash_loop loop, flash_cache_op *op) {
    flash__redis *rd = (flash__redis *)self;
    flash__redis_req *req = NULL;
    size_t i, n, unsent;
    bool store, valid_code, down;
    (void)loop; /* desc.loop drives everything */
    if (!rd || !op) return;
    n = op->count;
    op->status = FLASH_OK;
    op->round_trips = 0;
    op->priv[0] = op->priv[1] = NULL;
    valid_code = op->code >= FLASH_CACHE_GET && op->code <= FLASH_CACHE_INCR;
    store = op->code == FLASH_CACHE_SET || op->code == FLASH_CACHE_ADD || op->code == FLASH_CACHE_CAS;
    if (!rd->destroying && (!n || op->items) && n < UINT32_MAX && n < (SIZE_MAX - sizeof *req) / sizeof(uint32_t))
        req = (flash__redis_req *)flash__redis_alloc(rd, sizeof *req + n * sizeof(uint32_t));
    if (!req) {
        int code = rd->destroying ? FLASH_ECANCELED : (n && !op->items) ? FLASH_EINVAL : FLASH_ENOMEM;
        op->status = code;
        for (i = 0; op->items && i < n; i++) op->items[i].status = code;
        if (rd->destroying) return; /* documented: no submit from destroy */
        op->priv[1] = rd->oom_first;
        op->priv[0] = rd; /* marks "in the oom list" for cancel */
        rd->oom_first = op;
        flash__redis_schedule_flush(rd);
        return;
    }
    memset(req, 0, sizeof *req);
    req->op = op;
    req->code = op->code;
    req->idx = (uint32_t *)(req + 1);
    req->next_live = rd->live;
    if (rd->live) rd->live->prev_live = req;
    rd->live = req;
    op->priv[0] = req;
    if (!valid_code) op->status = FLASH_EINVAL;
    down = rd->down_until > flash__redis_now();
    for (i = 0; i < n; i++) {
        flash_cache_item *it = &op->items[i];
        int st = valid_code ? flash__redis_key_status(it->key, it->key_len) : FLASH_EINVAL;
        if (op->code == FLASH_CACHE_GET) {
            it->value = NULL;
            it->value_len = 0;
            it->flags = 0;
            it->cas = 0;
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
    if (!req->count) { /* nothing to send */
        flash__redis_complete(rd, req);
        return;
    }
    if (rd->state == FLASH__REDIS_READY && !rd->head && (rd->scripts_lost || flash__redis_peer_closed(rd)))
        flash__redis_close(rd); /* closed while idle (unnoticed yet) or scripts flushed: reopen */
    unsent = rd->wlen - rd->woff;
    if (!flash__redis_encode(rd, req, op)) { /* out of memory: drop the partial request */
        rd->wlen = rd->woff + unsent;
        for (i = 0; i < req->count; i++) op->items[req->idx[i]].status = FLASH_ENOMEM;
        flash__redis_complete(rd, req);
        return;
    }
    op->round_trips = 1;
    rd->stats.requests++;
    rd->stats.commands += op->code == FLASH_CACHE_GET ? 1 : req->count;
    if (rd->tail) rd->tail->next = req;
    else rd->head = req;
    rd->tail = req;
    if (rd->state == FLASH__REDIS_CLOSED) {
        flash__redis_connect(rd); /* on failure the request already failed */
    } else if (rd->state == FLASH__REDIS_READY) {
        req->deadline = flash__redis_now() + rd->timeout_ms;
        if (rd->head == req) flash__redis_arm_timer(rd);
        flash__redis_write(rd); /* a failure completes through the flush, not here */
    }
}

static void flash__redis_cancel(void *self, flash_cache_op *op) {
    flash__redis *rd = (flash__redis *)self;
    if (!rd || !op || !op->priv[0]) return;
    if (op->priv[0] == (void *)rd) { /* in the oom list */
        flash_cache_op *prev = NULL, *cur = rd->oom_first;
        while (cur && cur != op) {
            prev = cur;
            cur = (flash_cache_op *)cur->priv[1];
        }
        if (cur && prev) prev->priv[1] = cur->priv[1];
        else if (cur) rd->oom_first = (flash_cache_op *)cur->priv[1];
    } else {
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
    rd->destroying = true;
    if (rd->flush_handle) {
        rd->loop.vt->cancel(rd->loop.native, rd->flush_handle);
        rd->flush_handle = NULL;
    }
    flash__redis_close(rd);
    for (req = rd->head; req; req = req->next) { /* unanswered keys: cancelled */
        uint32_t k;
        if (!req->op) continue;
        for (k = req->pos; k < req->count; k++) flash__redis_set_status(req, k, FLASH_ECANCELED);
        req->op->status = FLASH_ECANCELED;
    }
    rd->head = rd->tail = NULL;
    while (rd->oom_first) {
        flash_cache_op *op = rd->oom_first;
        rd->oom_first = (flash_cache_op *)op->priv[1];
        op->priv[0] = op->priv[1] = NULL;
        op->done(op);
    }
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
    flash__redis_free(rd, rd->wbuf);
    flash__redis_free(rd, rd->rbuf);
    rd->alloc.free(rd, rd->alloc.user_data);
}

static const flash_cache_vtable flash__redis_vt = {
    "redis", flash__redis_submit, flash__redis_cancel, flash__redis_max_value, flash__redis_destroy,
};

static void *flash__redis_default_alloc(size_t n, void *ud) {
    (void)ud;
    return malloc(n);
}
static void flash__redis_default_free(void *p, void *ud) {
    (void)ud;
    free(p);
}

/* AUTH [user] password, SELECT db, SCRIPT LOAD x2: built once, sent first
   on every connection (in the same write as the first request). */
static int flash__redis_build_hello(flash__redis *rd, const flash_redis_desc *d) {
    size_t need = 256 + sizeof flash__redis_cas_lua + sizeof flash__redis_incr_lua +
                  (d->username ? strlen(d->username) : 0) + (d->password ? strlen(d->password) : 0);
    char *saved = rd->wbuf;
    size_t wl = rd->wlen, wc = rd->wcap;
    rd->wbuf = (char *)flash__redis_alloc(rd, need);
    if (!rd->wbuf) {
        rd->wbuf = saved;
        return FLASH_ENOMEM;
    }
    rd->wlen = 0;
    rd->wcap = need;
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
    flash__redis_put_len(rd, '*', 3); /* the last two replies: cas, then incr */
    flash__redis_put_str(rd, "SCRIPT");
    flash__redis_put_str(rd, "LOAD");
    flash__redis_put_str(rd, flash__redis_cas_lua);
    flash__redis_put_len(rd, '*', 3);
    flash__redis_put_str(rd, "SCRIPT");
    flash__redis_put_str(rd, "LOAD");
    flash__redis_put_str(rd, flash__redis_incr_lua);
    rd->hello_replies += 2;
    rd->hello = rd->wbuf;
    rd->hello_len = rd->wlen;
    rd->wbuf = saved;
    rd->wlen = wl;
    rd->wcap = wc;
    return FLASH_OK;
}

FLASH_API flash_cache flash_redis_create(const flash_redis_desc *desc, int *error) {
    flash_cache none = {NULL, NULL}, out;
    flash_allocator al;
    flash__redis *rd;
    struct addrinfo hints, *res = NULL;
    char port[8];
    uint64_t seed;
    struct timespec ts;
    int rc = FLASH_EINVAL;
    if (error) *error = FLASH_OK;
    if (!desc || !desc->loop.vt || !desc->loop.vt->defer || !desc->loop.vt->timer || !desc->loop.vt->cancel ||
        !desc->loop.vt->io_start || !desc->loop.vt->io_set || !desc->loop.vt->io_stop || !desc->host ||
        !desc->host[0] || strlen(desc->host) > 255 || (desc->username && !desc->password)) {
        if (error) *error = FLASH_EINVAL;
        return none;
    }
    al = desc->allocator;
    if (!al.alloc || !al.free) {
        al.alloc = flash__redis_default_alloc;
        al.free = flash__redis_default_free;
        al.user_data = NULL;
    }
    rd = (flash__redis *)al.alloc(sizeof *rd, al.user_data);
    if (!rd) {
        if (error) *error = FLASH_ENOMEM;
        return none;
    }
    memset(rd, 0, sizeof *rd);
    rd->alloc = al;
    rd->loop = desc->loop;
    rd->fd = -1;
    rd->connect_timeout_ms = desc->connect_timeout_ms ? desc->connect_timeout_ms : 1000;
    rd->timeout_ms = desc->timeout_ms ? desc->timeout_ms : 1000;
    rd->retry_interval_ms = desc->retry_interval_ms ? desc->retry_interval_ms : 1000;
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
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(port, sizeof port, "%u", (unsigned)(desc->port ? desc->port : 6379));
    rc = FLASH_EINVAL;
    if (getaddrinfo(desc->host, port, &hints, &res) != 0 || !res) goto fail;
    if (res->ai_addrlen > sizeof rd->addr) {
        freeaddrinfo(res);
        goto fail;
    }
    memcpy(&rd->addr, res->ai_addr, res->ai_addrlen);
    rd->addrlen = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    out.vt = &flash__redis_vt;
    out.self = rd;
    return out;
fail:
    if (error) *error = rc;
    flash__redis_destroy(rd);
    return none;
}

FLASH_API int flash_redis_stats_get(flash_cache cache, flash_redis_stats *out) {
    const flash__redis *rd = (const flash__redis *)cache.self;
    if (cache.vt != &flash__redis_vt || !rd || !out) return FLASH_EINVAL;
    *out = rd->stats;
    out->down = rd->down_until > flash__redis_now();
    return FLASH_OK;
}

#endif /* FLASH_REDIS_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
