/* backends/loop/libevent.h — flash on a libevent 2.1 loop (struct event_base *).

       struct event_base *base = event_base_new();
       flash_libevent_attach(ctx, base);  // flash_wait / flash_run drive it
       ...                                 // or run it yourself: event_base_dispatch(base)
       flash_libevent_release(base);       // only if flash handles may still be pending
       event_base_free(base);

   Timers and watches are one struct event each, freed once fired or stopped.
   Defers are a FIFO queue per base run by one event made active: its first
   call only re-activates it, which puts it behind the pass's other callbacks
   (the iteration's I/O), and the second runs the queue, in the same
   event_base_loop call; defers queued by defers wait for the next iteration
   (0 ms timeout). That per-base state sits in a small process-wide list while
   the adapter has a handle on the base and goes with the last. libevent has no
   destroy hook: call flash_libevent_release before event_base_free when flash
   handles may be pending. Link -levent before -lev (Debian's libev exports
   libevent's function names). Include after flash.h (libev.h: either order);
   the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_LIBEVENT_H
#define FLASH_LIBEVENT_H
#include "../../flash.h"
#include <event2/event.h>

#ifdef __cplusplus
extern "C" {
#endif

FLASH_API flash_loop flash_libevent_loop(struct event_base *base);
/* FLASH_ESTATE when the context already has a loop; FLASH_EUNSUPPORTED when
   libev's libevent emulation shadows libevent (link -levent before -lev). */
FLASH_API int flash_libevent_attach(flash_ctx *ctx, struct event_base *base);
/* Drop the adapter's handles on base (callbacks never run) and free its
   state. Not from inside one of the adapter's callbacks. */
FLASH_API void flash_libevent_release(struct event_base *base);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBEVENT_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBEVENT_IMPLEMENTED
#define FLASH_LIBEVENT_IMPLEMENTED
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef FLASH_NO_THREADS
#include <pthread.h>
static pthread_mutex_t flash__le_mu = PTHREAD_MUTEX_INITIALIZER;
#define FLASH__LE_LOCK(on) (void)((on) ? pthread_mutex_lock(&flash__le_mu) : pthread_mutex_unlock(&flash__le_mu))
#else
#define FLASH__LE_LOCK(on) (void)(on)
#endif

enum { FLASH__LE_DEFER, FLASH__LE_TIMER, FLASH__LE_IO };

typedef struct flash__le_h {
    struct flash__le_h *prev, *next; /* in the state's defer queue or handle list */
    struct flash__le_st *st;
    int kind, events;
    bool dead, busy;                 /* busy: inside its own io callback */
    uint64_t pass;                   /* defers: the run that runs it */
    flash_loop_fn fn; flash_io_fn io; void *arg;
    struct event *ev;                /* timers and watches */
} flash__le_h;

typedef struct flash__le_list { flash__le_h *first, *last; } flash__le_list;

typedef struct flash__le_st {
    struct flash__le_st *next; /* the process-wide list, one state per base */
    struct event_base *base;
    flash__le_list dq, hs;     /* defers (FIFO); timers and watches */
    uint64_t pass;
    struct event *run;         /* runs the defers, on its second call */
    bool bounced, in_run;
} flash__le_st;

static flash__le_st *flash__le_states;

/* Free the state once nothing of the adapter is left on its base. */
static void flash__le_gc(flash__le_st *st) {
    flash__le_st **pp;
    if (st->dq.first || st->hs.first || st->in_run) return;
    FLASH__LE_LOCK(1);
    for (pp = &flash__le_states; *pp && *pp != st; pp = &(*pp)->next) continue;
    if (*pp) *pp = st->next;
    FLASH__LE_LOCK(0);
    event_free(st->run);
    free(st);
}

/* Unlink from the state's list and free it (and the state after the last). */
static void flash__le_free(flash__le_h *h) {
    flash__le_st *st = h->st;
    flash__le_list *l = h->kind == FLASH__LE_DEFER ? &st->dq : &st->hs;
    *(h->prev ? &h->prev->next : &l->first) = h->next;
    *(h->next ? &h->next->prev : &l->last) = h->prev;
    if (h->ev) event_free(h->ev);
    free(h);
    if (!st->dq.first) {
        event_del(st->run);
        st->bounced = false;
    }
    flash__le_gc(st);
}

/* Run the defers queued before this run; those they queue wait for the next. */
static void flash__le_run_cb(evutil_socket_t fd, short what, void *arg) {
    flash__le_st *st = (flash__le_st *)arg;
    uint64_t pass;
    flash__le_h *h;
    (void)fd, (void)what;
    if ((st->bounced = !st->bounced)) { /* first call: go behind the pass's I/O callbacks */
        event_active(st->run, EV_TIMEOUT, 1);
        return;
    }
    pass = st->pass++;
    st->in_run = true;
    while ((h = st->dq.first) != NULL && h->pass <= pass) {
        h->dead = true;
        h->fn(h->arg);
        flash__le_free(h);
    }
    st->in_run = false;
    flash__le_gc(st);
}

static flash__le_st *flash__le_state(struct event_base *base, bool create) {
    flash__le_st *st;
    FLASH__LE_LOCK(1);
    for (st = flash__le_states; st && st->base != base; st = st->next) continue;
    if (!st && create && base && (st = (flash__le_st *)calloc(1, sizeof *st)) != NULL) {
        if ((st->run = event_new(base, -1, 0, flash__le_run_cb, st)) != NULL) {
            st->base = base;
            st->next = flash__le_states;
            flash__le_states = st;
        } else {
            free(st);
            st = NULL;
        }
    }
    FLASH__LE_LOCK(0);
    return st;
}

static flash__le_h *flash__le_new(void *native, int kind, flash_loop_fn fn, flash_io_fn io, void *arg) {
    flash__le_st *st = flash__le_state((struct event_base *)native, true);
    flash__le_h *h = st ? (flash__le_h *)calloc(1, sizeof *h) : NULL;
    flash__le_list *l;
    if (!h) {
        if (st) flash__le_gc(st);
        return NULL;
    }
    h->st = st, h->kind = kind, h->pass = st->pass;
    h->fn = fn, h->io = io, h->arg = arg;
    l = kind == FLASH__LE_DEFER ? &st->dq : &st->hs;
    h->prev = l->last;
    *(l->last ? &l->last->next : &l->first) = h;
    l->last = h;
    if (kind != FLASH__LE_DEFER) return h;
    if (st->in_run) { /* a defer from a defer: after the next iteration's I/O */
        struct timeval zero = {0, 0};
        event_add(st->run, &zero);
    } else {          /* later in this pass, or the next one */
        event_active(st->run, EV_TIMEOUT, 1);
    }
    return h;
}

static void *flash__le_defer(void *native, flash_loop_fn fn, void *arg) {
    return fn ? flash__le_new(native, FLASH__LE_DEFER, fn, NULL, arg) : NULL;
}

static void flash__le_timer_cb(evutil_socket_t fd, short what, void *arg) {
    flash__le_h *h = (flash__le_h *)arg;
    (void)fd, (void)what;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->fn(h->arg);
    flash__le_free(h);
}

static void *flash__le_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash__le_h *h = fn ? flash__le_new(native, FLASH__LE_TIMER, fn, NULL, arg) : NULL;
    struct timeval tv;
    if (!h) return NULL;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
    event_base_update_cache_time(h->st->base); /* ms from now, not from the pass's start */
    h->ev = event_new(h->st->base, -1, 0, flash__le_timer_cb, h);
    if (h->ev && event_add(h->ev, &tv) == 0) return h;
    flash__le_free(h);
    return NULL;
}

/* Cancel a defer or timer; stop a watch. */
static void flash__le_cancel(void *native, void *handle) {
    flash__le_h *h = (flash__le_h *)handle;
    (void)native;
    if (!h || h->dead) return;
    h->dead = true;
    if (h->ev) event_del(h->ev);
    if (!h->busy) flash__le_free(h); /* else its own callback frees it */
}

static void flash__le_io_cb(evutil_socket_t fd, short what, void *arg) {
    flash__le_h *h = (flash__le_h *)arg;
    /* libevent reports errors and hang-ups as EV_READ|EV_WRITE itself */
    int ev = ((what & EV_READ) ? FLASH_IO_READ : 0) | ((what & EV_WRITE) ? FLASH_IO_WRITE : 0);
    (void)fd;
    if (h->dead || !(ev &= h->events)) return;
    h->busy = true;
    h->io(h->arg, ev);
    h->busy = false;
    if (h->dead) flash__le_free(h);
}

static int flash__le_io_set(void *native, void *handle, int events) {
    flash__le_h *h = (flash__le_h *)handle;
    short what;
    (void)native;
    if (!h || h->dead || h->kind != FLASH__LE_IO) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    if (events == h->events) return FLASH_OK;
    event_del(h->ev);
    h->events = 0;
    if (!events) return FLASH_OK;
    what = (short)(EV_PERSIST | ((events & FLASH_IO_READ) ? EV_READ : 0) | ((events & FLASH_IO_WRITE) ? EV_WRITE : 0));
    if (event_assign(h->ev, h->st->base, event_get_fd(h->ev), what, flash__le_io_cb, h) != 0 ||
        event_add(h->ev, NULL) != 0)
        return FLASH_EBACKEND;
    h->events = events;
    return FLASH_OK;
}

static void *flash__le_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash__le_h *h = fd >= 0 && fn ? flash__le_new(native, FLASH__LE_IO, NULL, fn, arg) : NULL;
    if (!h) return NULL;
    h->ev = event_new(h->st->base, fd, EV_PERSIST, flash__le_io_cb, h);
    if (h->ev && flash__le_io_set(native, h, events) == FLASH_OK) return h;
    flash__le_free(h);
    return NULL;
}

static int flash__le_run_once(void *native, bool may_block) {
    struct event_base *base = (struct event_base *)native;
    int rc = event_base_loop(base, EVLOOP_ONCE | (may_block ? 0 : EVLOOP_NONBLOCK));
    if (rc < 0) return FLASH_EBACKEND;
    return rc == 0 && event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) > 0;
}

static const flash_loop_vtable flash__le_vt = {
    "libevent", flash__le_defer, flash__le_timer, flash__le_cancel,
    flash__le_io_start, flash__le_io_set, flash__le_cancel, flash__le_run_once, NULL, NULL
};

FLASH_API flash_loop flash_libevent_loop(struct event_base *base) {
    flash_loop l = {&flash__le_vt, base};
    return l;
}

/* Debian's libev exports libevent's names (its emulation layer): linked first,
   it takes libevent's own calls too. Refuse rather than corrupt memory. */
static bool flash__le_linked_right(void) {
    char want[24];
    ev_uint32_t v = event_get_version_number();
    snprintf(want, sizeof want, "%u.%u.", (unsigned)(v >> 24), (unsigned)(v >> 16 & 0xff));
    return strncmp(event_get_version(), want, strlen(want)) == 0;
}

FLASH_API int flash_libevent_attach(flash_ctx *ctx, struct event_base *base) {
    if (!ctx || !base) return FLASH_EINVAL;
    if (!flash__le_linked_right()) return FLASH_EUNSUPPORTED; /* link -levent before -lev */
    return flash_ctx_attach_loop(ctx, flash_libevent_loop(base));
}

FLASH_API void flash_libevent_release(struct event_base *base) {
    flash__le_st *st = base ? flash__le_state(base, false) : NULL;
    if (!st) return;
    st->in_run = true; /* keeps the state until the end */
    while (st->dq.first) flash__le_free(st->dq.first);
    while (st->hs.first) flash__le_free(st->hs.first);
    st->in_run = false;
    flash__le_gc(st);
}

#endif /* FLASH_LIBEVENT_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
