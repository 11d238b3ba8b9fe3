/* backends/loop/libev.h — flash on a libev loop (struct ev_loop *).

       struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
       flash_libev_attach(ctx, loop);  // flash_wait / flash_run drive it with ev_run
       ...                              // or run it yourself: ev_run(loop, 0)
       ev_loop_destroy(loop);           // frees what the adapter still holds

   Timers are ev_timer and watches ev_io, freed once fired or stopped.
   Defers are a FIFO queue per loop run by one ev_check at EV_MINPRI, after the
   iteration's I/O and timer callbacks; an ev_idle is on while it is not empty,
   so that the loop polls without blocking. That per-loop state is made on
   first use, kept in a small process-wide list and freed by an ev_cleanup
   watcher in ev_loop_destroy. Include after flash.h (libevent.h: either order);
   the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_LIBEV_H
#define FLASH_LIBEV_H
#include "../../flash.h"

/* libevent's <event2/event.h> #defines EV_READ, EV_WRITE, ... over libev's
   enum: hide them while ev.h is read, and keep libev's values for ourselves. */
#ifdef EV_READ
#define FLASH__EV_HIDE_LIBEVENT
#pragma push_macro("EV_READ")
#pragma push_macro("EV_WRITE")
#pragma push_macro("EV_TIMEOUT")
#pragma push_macro("EV_SIGNAL")
#undef EV_READ
#undef EV_WRITE
#undef EV_TIMEOUT
#undef EV_SIGNAL
#endif
#include <ev.h>
enum { FLASH__EV_READ = EV_READ, FLASH__EV_WRITE = EV_WRITE };
#ifdef FLASH__EV_HIDE_LIBEVENT
#pragma pop_macro("EV_READ")
#pragma pop_macro("EV_WRITE")
#pragma pop_macro("EV_TIMEOUT")
#pragma pop_macro("EV_SIGNAL")
#endif

#ifdef __cplusplus
extern "C" {
#endif

FLASH_API flash_loop flash_libev_loop(struct ev_loop *loop);
/* FLASH_ESTATE when the context already has a loop. */
FLASH_API int flash_libev_attach(flash_ctx *ctx, struct ev_loop *loop);
/* Drop the adapter's handles on loop (callbacks never run) and free its state,
   as ev_loop_destroy does. Not from inside one of the adapter's callbacks. */
FLASH_API void flash_libev_release(struct ev_loop *loop);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBEV_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBEV_IMPLEMENTED
#define FLASH_LIBEV_IMPLEMENTED
#include <stdlib.h>
#ifndef FLASH_NO_THREADS
#include <pthread.h>
static pthread_mutex_t flash__ev_mu = PTHREAD_MUTEX_INITIALIZER;
#define FLASH__EV_LOCK(on) (void)((on) ? pthread_mutex_lock(&flash__ev_mu) : pthread_mutex_unlock(&flash__ev_mu))
#else
#define FLASH__EV_LOCK(on) (void)(on)
#endif

enum { FLASH__EV_DEFER, FLASH__EV_TIMER, FLASH__EV_IO };

typedef struct flash__ev_h {
    struct flash__ev_h *prev, *next; /* the state's defer queue or handle list */
    struct flash__ev_st *st;
    int kind, events;
    bool dead, busy;                 /* busy: inside its own io callback */
    uint64_t pass;                   /* defers: the check pass that runs it */
    flash_loop_fn fn; flash_io_fn io; void *arg;
    union { ev_timer timer; ev_io io; } w;
} flash__ev_h;

typedef struct flash__ev_list { flash__ev_h *first, *last; } flash__ev_list;

typedef struct flash__ev_st {
    struct flash__ev_st *next; /* the process-wide list, one state per loop */
    struct ev_loop *loop;
    flash__ev_list dq, hs;     /* defers (FIFO); timers and watches */
    uint64_t pass;
    ev_check check;            /* EV_MINPRI, always on, unref'd: runs the defers */
    ev_idle idle;              /* on while defers are queued: do not block */
    ev_cleanup cleanup;        /* ev_loop_destroy releases the state */
} flash__ev_st;

static flash__ev_st *flash__ev_states;

static flash__ev_list *flash__ev_list_of(flash__ev_h *h) {
    return h->kind == FLASH__EV_DEFER ? &h->st->dq : &h->st->hs;
}

/* Unlink from the state's list and free. */
static void flash__ev_free(flash__ev_h *h) {
    flash__ev_list *l = flash__ev_list_of(h);
    *(h->prev ? &h->prev->next : &l->first) = h->next;
    *(h->next ? &h->next->prev : &l->last) = h->prev;
    free(h);
}

static void flash__ev_stop(flash__ev_h *h) {
    if (h->kind == FLASH__EV_TIMER) ev_timer_stop(h->st->loop, &h->w.timer);
    else if (h->kind == FLASH__EV_IO) ev_io_stop(h->st->loop, &h->w.io);
}

static void flash__ev_idle_cb(struct ev_loop *loop, ev_idle *w, int revents) { (void)loop, (void)w, (void)revents; }

static void flash__ev_queue_changed(flash__ev_st *st) {
    if (st->dq.first) ev_idle_start(st->loop, &st->idle);
    else ev_idle_stop(st->loop, &st->idle);
}

/* Run the defers queued before this pass; those they queue wait for the next. */
static void flash__ev_check_cb(struct ev_loop *loop, ev_check *w, int revents) {
    flash__ev_st *st = (flash__ev_st *)w->data;
    uint64_t pass = st->pass++;
    flash__ev_h *h;
    (void)loop, (void)revents;
    while ((h = st->dq.first) != NULL && h->pass <= pass) {
        h->dead = true;
        h->fn(h->arg);
        flash__ev_free(h);
    }
    flash__ev_queue_changed(st);
}

static void flash__ev_cleanup_cb(struct ev_loop *loop, ev_cleanup *w, int revents) {
    (void)w, (void)revents;
    flash_libev_release(loop);
}

static flash__ev_st *flash__ev_state(struct ev_loop *loop, bool create) {
    flash__ev_st *st;
    FLASH__EV_LOCK(1);
    for (st = flash__ev_states; st && st->loop != loop; st = st->next) continue;
    if (!st && create && loop && (st = (flash__ev_st *)calloc(1, sizeof *st)) != NULL) {
        st->loop = loop;
        ev_check_init(&st->check, flash__ev_check_cb);
        ev_set_priority(&st->check, EV_MINPRI);
        ev_idle_init(&st->idle, flash__ev_idle_cb);
        ev_cleanup_init(&st->cleanup, flash__ev_cleanup_cb);
        st->check.data = st;
        ev_check_start(loop, &st->check);
        ev_unref(loop);
        ev_cleanup_start(loop, &st->cleanup);
        /* Made inside a callback: this iteration's checks are already queued. */
        if (ev_depth(loop)) ev_feed_event(loop, &st->check, EV_CHECK);
        st->next = flash__ev_states;
        flash__ev_states = st;
    }
    FLASH__EV_LOCK(0);
    return st;
}

static flash__ev_h *flash__ev_new(void *native, int kind, flash_loop_fn fn, flash_io_fn io, void *arg) {
    flash__ev_st *st = flash__ev_state((struct ev_loop *)native, true);
    flash__ev_h *h = st ? (flash__ev_h *)calloc(1, sizeof *h) : NULL;
    flash__ev_list *l;
    if (!h) return NULL;
    h->st = st, h->kind = kind, h->pass = st->pass;
    h->fn = fn, h->io = io, h->arg = arg;
    l = flash__ev_list_of(h);
    h->prev = l->last;
    *(l->last ? &l->last->next : &l->first) = h;
    l->last = h;
    if (kind == FLASH__EV_DEFER) flash__ev_queue_changed(st);
    return h;
}

static void *flash__ev_defer(void *native, flash_loop_fn fn, void *arg) {
    return fn ? flash__ev_new(native, FLASH__EV_DEFER, fn, NULL, arg) : NULL;
}

static void flash__ev_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    flash__ev_h *h = (flash__ev_h *)w->data;
    (void)loop, (void)revents;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->fn(h->arg);
    flash__ev_free(h);
}

static void *flash__ev_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash__ev_h *h = fn ? flash__ev_new(native, FLASH__EV_TIMER, fn, NULL, arg) : NULL;
    if (!h) return NULL;
    ev_timer_init(&h->w.timer, flash__ev_timer_cb, ms / 1000.0, 0.);
    h->w.timer.data = h;
    ev_now_update(h->st->loop); /* ms from now, not from the iteration's start */
    ev_timer_start(h->st->loop, &h->w.timer);
    return h;
}

/* Cancel a defer or timer; stop a watch. */
static void flash__ev_cancel(void *native, void *handle) {
    flash__ev_h *h = (flash__ev_h *)handle;
    flash__ev_st *st;
    (void)native;
    if (!h || h->dead) return;
    h->dead = true;
    flash__ev_stop(h);
    if (h->busy) return; /* its own callback frees it */
    st = h->st;
    flash__ev_free(h);
    flash__ev_queue_changed(st);
}

static void flash__ev_io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    flash__ev_h *h = (flash__ev_h *)w->data;
    int ev = FLASH_IO_READ | FLASH_IO_WRITE; /* errors */
    (void)loop;
    if (!(revents & EV_ERROR))
        ev = ((revents & FLASH__EV_READ) ? FLASH_IO_READ : 0) | ((revents & FLASH__EV_WRITE) ? FLASH_IO_WRITE : 0);
    if (h->dead || !(ev &= h->events)) return;
    h->busy = true;
    h->io(h->arg, ev);
    h->busy = false;
    if (h->dead) flash__ev_free(h);
}

static int flash__ev_io_set(void *native, void *handle, int events) {
    flash__ev_h *h = (flash__ev_h *)handle;
    (void)native;
    if (!h || h->dead || h->kind != FLASH__EV_IO) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    /* Unchanged and still watching (libev stops a watcher on a bad fd). */
    if (events == h->events && (ev_is_active(&h->w.io) != 0) == (events != 0)) return FLASH_OK;
    h->events = events;
    ev_io_stop(h->st->loop, &h->w.io);
    ev_io_set(&h->w.io, h->w.io.fd,
              ((events & FLASH_IO_READ) ? FLASH__EV_READ : 0) | ((events & FLASH_IO_WRITE) ? FLASH__EV_WRITE : 0));
    if (events) ev_io_start(h->st->loop, &h->w.io);
    return FLASH_OK;
}

static void *flash__ev_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash__ev_h *h = fd >= 0 && fn ? flash__ev_new(native, FLASH__EV_IO, NULL, fn, arg) : NULL;
    if (!h) return NULL;
    ev_io_init(&h->w.io, flash__ev_io_cb, fd, 0);
    h->w.io.data = h;
    flash__ev_io_set(native, h, events);
    return h;
}

static int flash__ev_run_once(void *native, bool may_block) {
    return ev_run((struct ev_loop *)native, may_block ? EVRUN_ONCE : EVRUN_NOWAIT) != 0;
}

static const flash_loop_vtable flash__ev_vt = {
    "libev", flash__ev_defer, flash__ev_timer, flash__ev_cancel,
    flash__ev_io_start, flash__ev_io_set, flash__ev_cancel, flash__ev_run_once, NULL, NULL
};

FLASH_API flash_loop flash_libev_loop(struct ev_loop *loop) {
    flash_loop l = {&flash__ev_vt, loop};
    return l;
}

FLASH_API int flash_libev_attach(flash_ctx *ctx, struct ev_loop *loop) {
    return ctx && loop ? flash_ctx_attach_loop(ctx, flash_libev_loop(loop)) : FLASH_EINVAL;
}

FLASH_API void flash_libev_release(struct ev_loop *loop) {
    flash__ev_st *st, **pp;
    FLASH__EV_LOCK(1);
    for (pp = &flash__ev_states; *pp && (*pp)->loop != loop; pp = &(*pp)->next) continue;
    if ((st = *pp) != NULL) *pp = st->next;
    FLASH__EV_LOCK(0);
    if (!st) return;
    while (st->dq.first) flash__ev_free(st->dq.first);
    while (st->hs.first) {
        flash__ev_stop(st->hs.first);
        flash__ev_free(st->hs.first);
    }
    ev_ref(loop); /* the check was unref'd */
    ev_check_stop(loop, &st->check);
    ev_idle_stop(loop, &st->idle);
    ev_cleanup_stop(loop, &st->cleanup);
    free(st);
}

#endif /* FLASH_LIBEV_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
