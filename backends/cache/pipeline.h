/* backends/cache/pipeline.h — the connection under the network transports
   (memcached.h, redis.h); not used on its own.

   One non-blocking TCP connection, driven by a flash loop, carrying
   pipelined requests that the server answers in order: a write buffer
   flushed once per loop iteration (every request submitted in the
   iteration, from every context on the loop, leaves in one send) and then
   as the socket takes it, a read buffer handed to the protocol's
   parser, a FIFO of requests in flight with a deadline each (a timer on the
   oldest), a connect timeout, and the failure policy — a refused or lost
   connection with requests on it, or a timeout, fails those requests and
   marks the server down for retry_interval_ms (a transport then fails its
   keys fast, without I/O); garbage fails them and resets the connection;
   an idle connection the server closes is simply reopened on next use. The
   protocol plugs in through flash__pipe_hooks and owns its request type,
   which starts with a flash__pipe_req.

   A transport includes this header; its implementation comes with
   FLASH_IMPLEMENTATION, like theirs. LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_PIPELINE_H
#define FLASH_PIPELINE_H
#include "../../flash.h"
#endif

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_PIPELINE_IMPLEMENTED
#define FLASH_PIPELINE_IMPLEMENTED
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

#define FLASH__PIPE_READ_CHUNK 16384
#define FLASH__PIPE_KEEP_BUF (256u << 10) /* larger idle buffers are freed */

enum { FLASH__PIPE_CLOSED = 0, FLASH__PIPE_CONNECTING, FLASH__PIPE_READY };

/* The head of a transport's request. */
typedef struct flash__pipe_req {
    struct flash__pipe_req *next; /* the in-flight FIFO */
    int64_t deadline;             /* monotonic ms; 0 until the connection is up */
} flash__pipe_req;

typedef struct flash__pipe flash__pipe;

typedef struct flash__pipe_hooks {
    /* Consume the complete replies at the front of the read buffer (rbuf,
       rlen) with flash__pipe_skip / flash__pipe_consumed; false after
       failing the connection (flash__pipe_fail). */
    bool (*process)(flash__pipe *p);
    /* The connection failed with code: give req's unanswered keys code and
       complete it (it is off the FIFO already). */
    void (*fail_req)(flash__pipe *p, flash__pipe_req *req, int code);
    /* Optional: a connection is opening, its first bytes may go before the
       buffered requests (a handshake); false when out of memory. */
    bool (*opening)(flash__pipe *p);
    /* Optional: the connection closed; reset what the protocol kept of it. */
    void (*closed)(flash__pipe *p);
} flash__pipe_hooks;

typedef struct flash__pipe_counts {
    uint64_t connects, reconnects, failures, timeouts, proto_errors;
    bool connected;
} flash__pipe_counts;

struct flash__pipe {
    const flash__pipe_hooks *hooks;
    void *owner;                  /* the transport's */
    flash_loop loop;
    flash_allocator alloc;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    uint32_t connect_timeout_ms, timeout_ms, retry_interval_ms;
    int fd, state;
    void *io, *timer;
    int io_events;
    int64_t conn_deadline, down_until;
    char *wbuf, *rbuf;
    size_t wlen, woff, wcap, rlen, rcap;
    size_t skip;                  /* bytes of an oversized value (+ "\r\n") still to drop */
    flash__pipe_req *head, *tail; /* in flight, answered in order */
    flash_defer flush;            /* the iteration's one write (flash__pipe_send) */
    flash__pipe_counts counts;
};

/* The transports' shared checks: a loop that can drive a connection, an
   allocator (malloc / free unless given), and memcached's key rule — at
   most 250 bytes, none a space or control byte — on every transport, so
   that the engine behaves the same on each. */
static bool flash__pipe_loop_ok(const flash_loop *l) {
    const flash_loop_vtable *vt = l->vt;
    return vt && vt->defer && vt->timer && vt->cancel && vt->io_start && vt->io_set && vt->io_stop;
}

static void *flash__pipe_malloc(size_t n, void *ud) {
    (void)ud;
    return malloc(n);
}
static void flash__pipe_mfree(void *m, void *ud) {
    (void)ud;
    free(m);
}
static flash_allocator flash__pipe_allocator(flash_allocator al) {
    if (!al.alloc || !al.free) {
        al.alloc = flash__pipe_malloc;
        al.free = flash__pipe_mfree;
        al.user_data = NULL;
    }
    return al;
}

/* The offset of the first byte of s[0, n) that cannot be in a key — a
   space, a control byte or DEL (c <= ' ' || c == 127) — or n when there is
   none. Eight bytes a step (the last step overlaps the one before; a step
   that holds such a byte is looked at byte by byte): keys and the reply
   lines that name them are checked for every key of a get-many. */
static inline size_t flash__pipe_key_span(const char *s, size_t n) {
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    size_t i = 0;
    if (n >= 8) {
        for (;; i += 8) {
            uint64_t x, d;
            if (i + 8 > n) i = n - 8;
            memcpy(&x, s + i, 8);
            d = x ^ (ones * 0x7f);
            /* a byte below 0x21, or a byte equal to 0x7f: exact tests (no
               step without one is flagged, and the lowest flag is the first
               such byte: a borrow only carries upwards) */
            x = ((x - ones * 0x21) & ~x & highs) | ((d - ones) & ~d & highs);
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            if (x) return i + (size_t)__builtin_ctzll(x) / 8;
#else
            if (x) break;
#endif
            if (i + 8 == n) return n;
        }
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == 127) return i;
    }
    return n;
}

#define FLASH__PIPE_MAX_KEY 250
static int flash__pipe_key_status(const char *key, size_t len) {
    if (!key || !len) return FLASH_EINVAL;
    if (len > FLASH__PIPE_MAX_KEY) return FLASH_ETOOLARGE;
    return flash__pipe_key_span(key, len) == len ? FLASH_OK : FLASH_EINVAL;
}

static int64_t flash__pipe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *flash__pipe_alloc(flash__pipe *p, size_t n) { return p->alloc.alloc(n, p->alloc.user_data); }
static void flash__pipe_free(flash__pipe *p, void *m) {
    if (m) p->alloc.free(m, p->alloc.user_data);
}

/* A closed connection (no address yet); cannot fail. */
static void flash__pipe_setup(flash__pipe *p, const flash__pipe_hooks *hooks, void *owner, flash_loop loop,
                              flash_allocator alloc) {
    memset(p, 0, sizeof *p);
    p->hooks = hooks;
    p->owner = owner;
    p->loop = loop;
    p->alloc = alloc;
    p->fd = -1;
    p->flush.late = true; /* posted by this run's dispatches: sent in this run */
}

/* The server's address, resolved now (may block for DNS: give an IP
   literal); FLASH_EINVAL when host does not resolve. */
static int flash__pipe_resolve(flash__pipe *p, const char *host, uint16_t port) {
    struct addrinfo hints, *res = NULL;
    char service[8];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(service, sizeof service, "%u", (unsigned)port);
    if (!host || getaddrinfo(host, service, &hints, &res) != 0 || !res) return FLASH_EINVAL;
    if (res->ai_addrlen > sizeof p->addr) {
        freeaddrinfo(res);
        return FLASH_EINVAL;
    }
    memcpy(&p->addr, res->ai_addr, res->ai_addrlen);
    p->addrlen = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return FLASH_OK;
}

static bool flash__pipe_down(const flash__pipe *p, int64_t now) { return p->down_until > now; }

static void flash__pipe_on_io(void *arg, int events);
static void flash__pipe_on_timer(void *arg);

static void flash__pipe_update_io(flash__pipe *p) {
    int want;
    if (!p->io) return;
    want = p->state == FLASH__PIPE_CONNECTING ? FLASH_IO_WRITE
                                              : FLASH_IO_READ | (p->woff < p->wlen ? FLASH_IO_WRITE : 0);
    if (want != p->io_events) {
        p->loop.vt->io_set(p->loop.native, p->io, want);
        p->io_events = want;
    }
}

/* One timer: the connect deadline, or the oldest request's. */
static void flash__pipe_arm_timer(flash__pipe *p) {
    int64_t due, wait;
    if (p->timer) {
        p->loop.vt->cancel(p->loop.native, p->timer);
        p->timer = NULL;
    }
    if (p->state == FLASH__PIPE_CONNECTING) due = p->conn_deadline;
    else if (p->state == FLASH__PIPE_READY && p->head) due = p->head->deadline;
    else return;
    wait = due - flash__pipe_now();
    if (wait < 0) wait = 0;
    p->timer = p->loop.vt->timer(p->loop.native, (uint32_t)wait, flash__pipe_on_timer, p);
}

/* Close the socket; the requests stay queued (see flash__pipe_fail). */
static void flash__pipe_close(flash__pipe *p) {
    flash_loop_unpost(p->loop, &p->flush);
    if (p->io) p->loop.vt->io_stop(p->loop.native, p->io);
    if (p->timer) p->loop.vt->cancel(p->loop.native, p->timer);
    if (p->fd >= 0) close(p->fd);
    p->io = p->timer = NULL;
    p->io_events = 0;
    p->fd = -1;
    p->state = FLASH__PIPE_CLOSED;
    p->wlen = p->woff = p->rlen = p->skip = 0;
    p->counts.connected = false;
    if (p->hooks->closed) p->hooks->closed(p);
}

/* Reset the connection and fail every request on it with code. */
static void flash__pipe_fail(flash__pipe *p, int code, bool mark_down) {
    flash__pipe_req *req = p->head;
    bool had = req != NULL;
    flash__pipe_close(p);
    p->head = p->tail = NULL;
    while (req) {
        flash__pipe_req *next = req->next;
        p->hooks->fail_req(p, req, code);
        req = next;
    }
    if (code == FLASH_ETIMEDOUT) p->counts.timeouts++;
    else if (code == FLASH_EPROTO) p->counts.proto_errors++;
    else if (had || mark_down) p->counts.failures++;
    if (mark_down) p->down_until = flash__pipe_now() + p->retry_interval_ms;
}

static void flash__pipe_connected(flash__pipe *p) {
    flash__pipe_req *req;
    int64_t due = flash__pipe_now() + p->timeout_ms;
    p->state = FLASH__PIPE_READY;
    if (p->counts.connects++) p->counts.reconnects++;
    p->counts.connected = true;
    for (req = p->head; req; req = req->next) req->deadline = due;
    flash__pipe_arm_timer(p);
}

/* Open the connection; false after failing (and marking down) the server. */
static bool flash__pipe_connect(flash__pipe *p) {
    int one = 1, fl, rc;
    if (p->hooks->opening && !p->hooks->opening(p)) {
        flash__pipe_fail(p, FLASH_ENOMEM, false);
        return false;
    }
    p->fd = socket(p->addr.ss_family, SOCK_STREAM, 0);
    if (p->fd < 0) goto fail;
    fl = fcntl(p->fd, F_GETFL, 0);
    if (fl < 0 || fcntl(p->fd, F_SETFL, fl | O_NONBLOCK) < 0) goto fail;
    fcntl(p->fd, F_SETFD, FD_CLOEXEC);
    setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    do rc = connect(p->fd, (struct sockaddr *)&p->addr, p->addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS) goto fail;
    p->state = FLASH__PIPE_CONNECTING;
    p->io_events = FLASH_IO_WRITE;
    p->io = p->loop.vt->io_start(p->loop.native, p->fd, FLASH_IO_WRITE, flash__pipe_on_io, p);
    if (!p->io) goto fail;
    /* Even a connect that completed at once waits for the first write event:
       requests are written from the loop, never inside submit. */
    p->conn_deadline = flash__pipe_now() + p->connect_timeout_ms;
    flash__pipe_arm_timer(p);
    return true;
fail:
    flash__pipe_fail(p, FLASH_EBACKEND, true);
    return false;
}

/* Write what is buffered; false after failing the server. */
static bool flash__pipe_write(flash__pipe *p) {
    while (p->woff < p->wlen) {
        ssize_t n = send(p->fd, p->wbuf + p->woff, p->wlen - p->woff, MSG_NOSIGNAL);
        if (n > 0) {
            p->woff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            flash__pipe_fail(p, FLASH_EBACKEND, true);
            return false;
        }
    }
    if (p->woff == p->wlen) {
        p->woff = p->wlen = 0;
        if (p->wcap > FLASH__PIPE_KEEP_BUF) {
            flash__pipe_free(p, p->wbuf);
            p->wbuf = NULL;
            p->wcap = 0;
        }
    }
    flash__pipe_update_io(p);
    return true;
}

static void flash__pipe_read(flash__pipe *p) {
    int rounds;
    for (rounds = 0; rounds < 16; rounds++) {
        ssize_t n;
        size_t room;
        if (p->rcap - p->rlen < FLASH__PIPE_READ_CHUNK) {
            size_t cap = p->rcap ? p->rcap * 2 : 2 * FLASH__PIPE_READ_CHUNK;
            char *m;
            while (cap - p->rlen < FLASH__PIPE_READ_CHUNK) cap *= 2;
            m = (char *)flash__pipe_alloc(p, cap);
            if (!m) {
                flash__pipe_fail(p, FLASH_ENOMEM, false);
                return;
            }
            if (p->rlen) memcpy(m, p->rbuf, p->rlen);
            flash__pipe_free(p, p->rbuf);
            p->rbuf = m;
            p->rcap = cap;
        }
        room = p->rcap - p->rlen;
        n = recv(p->fd, p->rbuf + p->rlen, room, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0) { /* closed or reset: in-flight keys fail, an idle one just closes */
            if (p->head) flash__pipe_fail(p, FLASH_EBACKEND, true);
            else flash__pipe_close(p);
            return;
        }
        p->rlen += (size_t)n;
        if (!p->hooks->process(p)) return;
        if ((size_t)n < room) break;
    }
}

/* For process: drop the rest of an oversized value from rbuf at *off; its
   last two bytes must be "\r\n". False (connection failed) when not. */
static bool flash__pipe_skip(flash__pipe *p, size_t *off) {
    while (p->skip && *off < p->rlen) {
        if ((p->skip == 2 && p->rbuf[*off] != '\r') || (p->skip == 1 && p->rbuf[*off] != '\n')) {
            flash__pipe_fail(p, FLASH_EPROTO, false);
            return false;
        }
        if (p->skip > 2) {
            size_t take = p->rlen - *off < p->skip - 2 ? p->rlen - *off : p->skip - 2;
            *off += take;
            p->skip -= take;
        } else {
            ++*off;
            p->skip--;
        }
    }
    return true;
}

/* For process: the first off bytes of rbuf are parsed. */
static void flash__pipe_consumed(flash__pipe *p, size_t off) {
    if (off) {
        p->rlen -= off;
        if (p->rlen) memmove(p->rbuf, p->rbuf + off, p->rlen);
    }
    if (!p->rlen && p->rcap > FLASH__PIPE_KEEP_BUF) { /* a large value went by */
        flash__pipe_free(p, p->rbuf);
        p->rbuf = NULL;
        p->rcap = 0;
    }
}

static void flash__pipe_on_io(void *arg, int events) {
    flash__pipe *p = (flash__pipe *)arg;
    if (p->state == FLASH__PIPE_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) {
            flash__pipe_fail(p, FLASH_EBACKEND, true);
            return;
        }
        flash__pipe_connected(p);
        events |= FLASH_IO_WRITE;
    }
    if (p->state != FLASH__PIPE_READY) return;
    if ((events & FLASH_IO_WRITE) && !flash__pipe_write(p)) return;
    if (events & FLASH_IO_READ) flash__pipe_read(p);
    if (p->state == FLASH__PIPE_READY) flash__pipe_update_io(p);
}

static void flash__pipe_on_timer(void *arg) {
    flash__pipe *p = (flash__pipe *)arg;
    int64_t due = p->state == FLASH__PIPE_CONNECTING ? p->conn_deadline
                  : p->state == FLASH__PIPE_READY && p->head ? p->head->deadline
                                                              : 0;
    p->timer = NULL;
    if (!due) return;
    if (flash__pipe_now() >= due) flash__pipe_fail(p, FLASH_ETIMEDOUT, true);
    else flash__pipe_arm_timer(p);
}

/* Room for more bytes in the write buffer; false when out of memory. */
static bool flash__pipe_reserve(flash__pipe *p, size_t more) {
    size_t cap;
    char *m;
    if (p->wcap - p->wlen >= more) return true;
    if (p->woff) { /* drop what was sent */
        memmove(p->wbuf, p->wbuf + p->woff, p->wlen - p->woff);
        p->wlen -= p->woff;
        p->woff = 0;
        if (p->wcap - p->wlen >= more) return true;
    }
    cap = p->wcap ? p->wcap * 2 : 4096;
    while (cap - p->wlen < more) cap *= 2;
    m = (char *)flash__pipe_alloc(p, cap);
    if (!m) return false;
    if (p->wlen) memcpy(m, p->wbuf, p->wlen);
    flash__pipe_free(p, p->wbuf);
    p->wbuf = m;
    p->wcap = cap;
    return true;
}

/* Append n bytes (reserved before). */
static void flash__pipe_put(flash__pipe *p, const void *data, size_t n) {
    if (n) memcpy(p->wbuf + p->wlen, data, n);
    p->wlen += n;
}

/* Before a request is encoded: an idle connection the server closed
   (idle timeout, restart, CLIENT KILL) before the loop saw it is closed
   now, so that the request opens a new one instead of failing on it. */
static void flash__pipe_check_idle(flash__pipe *p) {
    char c;
    ssize_t n;
    if (p->state != FLASH__PIPE_READY || p->head) return;
    n = recv(p->fd, &c, 1, MSG_PEEK); /* non-blocking */
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) flash__pipe_close(p);
}

/* The posted flush: what the iteration's submits buffered, in one send. */
static void flash__pipe_on_flush(void *arg) {
    flash__pipe *p = (flash__pipe *)arg;
    if (p->state == FLASH__PIPE_READY && p->woff < p->wlen) flash__pipe_write(p);
}

/* req's bytes are in the write buffer: queue it, connecting or posting the
   flush. The bytes leave at the end of the loop iteration (the posted node
   runs after the iteration's I/O; posted from inside the loop's queue run —
   the engine's dispatch is one — it is a late node and runs at the end of
   that run), so that the requests of every context dispatching in this
   iteration share one send and their replies one read. A loop that cannot
   post (out of memory) gets the write now, as before. */
static void flash__pipe_send(flash__pipe *p, flash__pipe_req *req) {
    req->next = NULL;
    req->deadline = 0;
    if (p->tail) p->tail->next = req;
    else p->head = req;
    p->tail = req;
    if (p->state == FLASH__PIPE_CLOSED) {
        flash__pipe_connect(p); /* on failure the request already failed */
    } else if (p->state == FLASH__PIPE_READY) {
        req->deadline = flash__pipe_now() + p->timeout_ms;
        if (p->head == req) flash__pipe_arm_timer(p);
        /* a failure completes through the transport, not here */
        if (p->io_events & FLASH_IO_WRITE) return; /* the socket is full: its write event sends */
        if (flash_loop_post(p->loop, &p->flush, flash__pipe_on_flush, p) != FLASH_OK) flash__pipe_write(p);
    }
}

/* ---- finished operations ------------------------------------------------------
   done() runs from the loop (a deferred flush), never inside submit: a
   transport queues what finished (flash__pipe_fin, embedded in its state),
   and ops it had no memory for (their statuses set), chained by priv[1]. */

typedef struct flash__pipe_fin {
    struct flash__pipe_fin *next;
} flash__pipe_fin;

typedef struct flash__pipe_finq {
    flash_loop loop;
    void *owner;
    void (*finish)(void *owner, flash__pipe_fin *f); /* done() unless cancelled, then free */
    flash_defer tick;                                 /* the deferred flush */
    flash__pipe_fin *first, *last;
    flash_cache_op *oom_first;
    bool stopped;                                     /* destroying: no more flushes */
} flash__pipe_finq;

static void flash__pipe_finq_setup(flash__pipe_finq *q, flash_loop loop, void *owner,
                                   void (*finish)(void *owner, flash__pipe_fin *f)) {
    memset(q, 0, sizeof *q);
    q->loop = loop;
    q->owner = owner;
    q->finish = finish;
}

static void flash__pipe_flush(void *arg) {
    flash__pipe_finq *q = (flash__pipe_finq *)arg;
    flash__pipe_fin *f = q->first;
    flash_cache_op *oom = q->oom_first;
    q->first = q->last = NULL;
    q->oom_first = NULL;
    while (oom) {
        flash_cache_op *next = (flash_cache_op *)oom->priv[1];
        oom->priv[0] = oom->priv[1] = NULL;
        oom->done(oom);
        oom = next;
    }
    while (f) {
        flash__pipe_fin *next = f->next;
        q->finish(q->owner, f);
        f = next;
    }
}

static void flash__pipe_schedule(flash__pipe_finq *q) {
    if (q->stopped) return;
    /* Cannot fail on a loop with post; on another, when its defer and timer
       are both out of memory, the next submit or I/O event tries again. */
    flash_loop_post(q->loop, &q->tick, flash__pipe_flush, q);
}

static void flash__pipe_finished(flash__pipe_finq *q, flash__pipe_fin *f) {
    f->next = NULL;
    if (q->last) q->last->next = f;
    else q->first = f;
    q->last = f;
    flash__pipe_schedule(q);
}

/* op failed before any I/O (its statuses are set): done() on the next flush. */
static void flash__pipe_finished_oom(flash__pipe_finq *q, flash_cache_op *op) {
    op->priv[1] = q->oom_first;
    op->priv[0] = q; /* marks "in the oom list" for flash__pipe_cancel_oom */
    q->oom_first = op;
    flash__pipe_schedule(q);
}

/* cancel() of an op in the oom list: true when it was there (now forgotten). */
static bool flash__pipe_cancel_oom(flash__pipe_finq *q, flash_cache_op *op) {
    flash_cache_op *prev = NULL, *cur = q->oom_first;
    if (op->priv[0] != (void *)q) return false;
    while (cur && cur != op) {
        prev = cur;
        cur = (flash_cache_op *)cur->priv[1];
    }
    if (cur && prev) prev->priv[1] = cur->priv[1];
    else if (cur) q->oom_first = (flash_cache_op *)cur->priv[1];
    op->priv[0] = op->priv[1] = NULL;
    return true;
}

/* destroy(): no more flushes; done() for the oom list now. The finished
   ones are the transport's to complete (it walks its live list). */
static void flash__pipe_finq_stop(flash__pipe_finq *q) {
    q->stopped = true;
    flash_loop_unpost(q->loop, &q->tick);
    while (q->oom_first) {
        flash_cache_op *op = q->oom_first;
        q->oom_first = (flash_cache_op *)op->priv[1];
        op->priv[0] = op->priv[1] = NULL;
        op->done(op);
    }
    q->first = q->last = NULL;
}

/* Close and free the buffers (the transport cancels its requests first). */
static void flash__pipe_release(flash__pipe *p) {
    flash__pipe_close(p);
    flash__pipe_free(p, p->wbuf);
    flash__pipe_free(p, p->rbuf);
    p->wbuf = p->rbuf = NULL;
    p->wcap = p->rcap = 0;
}

#endif /* FLASH_PIPELINE_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
