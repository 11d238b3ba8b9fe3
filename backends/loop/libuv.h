/* backends/loop/libuv.h — flash on a libuv loop (uv_loop_t).

       uv_loop_t *loop = uv_default_loop();
       flash_libuv_attach(ctx, loop);  // flash_wait / flash_run drive it with uv_run
       ...                              // or run it yourself: uv_run(loop, UV_RUN_DEFAULT)
       flash_libuv_release(loop);       // only if flash handles may still be pending
       uv_run(loop, UV_RUN_DEFAULT);    // runs the close callbacks that free them
       uv_loop_close(loop);

   Timers are uv_timer_t and watches uv_poll_t (one per fd; libuv makes the fd
   non-blocking), each freed in its uv_close callback. Defers are a FIFO queue
   per loop run by one uv_check, after the iteration's I/O; a uv_idle is on
   while it is not empty, so that the loop polls without blocking. That
   per-loop state sits in a small process-wide list while the adapter has a
   handle on the loop and closes itself with the last one. Before closing the
   loop's handles yourself (uv_walk), call flash_libuv_release. Include after
   flash.h; the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_LIBUV_H
#define FLASH_LIBUV_H
/* uv.h needs POSIX types (pthread_rwlock_t): flash.h asks for them when first. */
#define FLASH__WANT_POSIX 1
#include "../../flash.h"
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

FLASH_API flash_loop flash_libuv_loop(uv_loop_t *loop);
/* FLASH_ESTATE when the context already has a loop. */
FLASH_API int flash_libuv_attach(flash_ctx *ctx, uv_loop_t *loop);
/* Drop the adapter's handles on loop (callbacks never run); the close callbacks
   free them: run the loop once more before uv_loop_close. Not from inside one
   of the adapter's callbacks. */
FLASH_API void flash_libuv_release(uv_loop_t *loop);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBUV_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBUV_IMPLEMENTED
#define FLASH_LIBUV_IMPLEMENTED
#include <stdlib.h>
#ifndef FLASH_NO_THREADS
#include <pthread.h>
static pthread_mutex_t flash__uv_mu = PTHREAD_MUTEX_INITIALIZER;
#define FLASH__UV_LOCK(on) (void)((on) ? pthread_mutex_lock(&flash__uv_mu) : pthread_mutex_unlock(&flash__uv_mu))
#else
#define FLASH__UV_LOCK(on) (void)(on)
#endif

enum { FLASH__UV_DEFER, FLASH__UV_TIMER, FLASH__UV_IO };

typedef struct flash__uv_h {
    struct flash__uv_h *prev, *next; /* in the state's defer queue or handle list */
    struct flash__uv_st *st;
    int kind, events;
    bool dead;                       /* cancelled, stopped, fired or running */
    uint64_t pass;                   /* defers: the check pass that runs it */
    flash_loop_fn fn; flash_io_fn io; void *arg;
    union { uv_handle_t handle; uv_timer_t timer; uv_poll_t poll; } u;
} flash__uv_h;

typedef struct flash__uv_list { flash__uv_h *first, *last; } flash__uv_list;

typedef struct flash__uv_st {
    struct flash__uv_st *next; /* the process-wide list, one state per loop */
    uv_loop_t *loop;
    flash__uv_list dq, hs;     /* defers (FIFO); timers and watches until closed */
    uint64_t pass;
    int closing;               /* check and idle closing: the state is ending */
    bool in_check;
    uv_check_t check;
    uv_idle_t idle;
} flash__uv_st;

static flash__uv_st *flash__uv_states;

static void flash__uv_link(flash__uv_list *l, flash__uv_h *h) {
    h->next = NULL;
    h->prev = l->last;
    *(l->last ? &l->last->next : &l->first) = h;
    l->last = h;
}

static void flash__uv_unlink(flash__uv_list *l, flash__uv_h *h) {
    *(h->prev ? &h->prev->next : &l->first) = h->next;
    *(h->next ? &h->next->prev : &l->last) = h->prev;
}

static void flash__uv_nop(uv_idle_t *idle) { (void)idle; }
static void flash__uv_check_cb(uv_check_t *check);

static flash__uv_st *flash__uv_state(uv_loop_t *loop, bool create) {
    flash__uv_st *st;
    FLASH__UV_LOCK(1);
    for (st = flash__uv_states; st && st->loop != loop; st = st->next) continue;
    if (!st && create && loop && (st = (flash__uv_st *)calloc(1, sizeof *st)) != NULL) {
        st->loop = loop;
        uv_check_init(loop, &st->check);
        uv_idle_init(loop, &st->idle);
        st->check.data = st->idle.data = st;
        st->next = flash__uv_states;
        flash__uv_states = st;
    }
    FLASH__UV_LOCK(0);
    return st;
}

/* Check and idle are on exactly while defers are queued. */
static void flash__uv_queue_changed(flash__uv_st *st) {
    if (st->dq.first) {
        uv_check_start(&st->check, flash__uv_check_cb);
        uv_idle_start(&st->idle, flash__uv_nop);
    } else {
        uv_check_stop(&st->check);
        uv_idle_stop(&st->idle);
    }
}

static void flash__uv_state_closed(uv_handle_t *handle) {
    flash__uv_st *st = (flash__uv_st *)handle->data;
    if (--st->closing == 0) free(st);
}

/* Once nothing of the adapter is left on the loop, the state goes too. */
static void flash__uv_gc(flash__uv_st *st) {
    flash__uv_st **pp;
    if (st->dq.first || st->hs.first || st->in_check || st->closing) return;
    FLASH__UV_LOCK(1);
    for (pp = &flash__uv_states; *pp && *pp != st; pp = &(*pp)->next) continue;
    if (*pp) *pp = st->next;
    FLASH__UV_LOCK(0);
    st->closing = 2;
    uv_close((uv_handle_t *)&st->check, flash__uv_state_closed);
    uv_close((uv_handle_t *)&st->idle, flash__uv_state_closed);
}

static flash__uv_h *flash__uv_new(void *native, int kind, flash_loop_fn fn, flash_io_fn io, void *arg) {
    flash__uv_st *st = flash__uv_state((uv_loop_t *)native, true);
    flash__uv_h *h = st ? (flash__uv_h *)calloc(1, sizeof *h) : NULL;
    if (!h) {
        if (st) flash__uv_gc(st);
        return NULL;
    }
    h->st = st, h->kind = kind, h->pass = st->pass;
    h->fn = fn, h->io = io, h->arg = arg;
    flash__uv_link(kind == FLASH__UV_DEFER ? &st->dq : &st->hs, h);
    if (kind == FLASH__UV_DEFER) flash__uv_queue_changed(st);
    return h;
}

/* Unlink and free a defer, or a timer or watch libuv is done with. */
static void flash__uv_drop(flash__uv_h *h) {
    flash__uv_st *st = h->st;
    flash__uv_unlink(h->kind == FLASH__UV_DEFER ? &st->dq : &st->hs, h);
    free(h);
    flash__uv_queue_changed(st);
    flash__uv_gc(st);
}

static void flash__uv_closed(uv_handle_t *handle) { flash__uv_drop((flash__uv_h *)handle->data); }

/* Run the defers queued before this pass; those they queue wait for the next. */
static void flash__uv_check_cb(uv_check_t *check) {
    flash__uv_st *st = (flash__uv_st *)check->data;
    uint64_t pass = st->pass++;
    flash__uv_h *h;
    st->in_check = true;
    while ((h = st->dq.first) != NULL && h->pass <= pass) {
        h->dead = true;
        h->fn(h->arg);
        flash__uv_drop(h);
    }
    st->in_check = false;
    flash__uv_gc(st);
}

static void flash__uv_close(flash__uv_h *h) {
    h->dead = true;
    if (!uv_is_closing(&h->u.handle)) uv_close(&h->u.handle, flash__uv_closed);
}

static void *flash__uv_defer(void *native, flash_loop_fn fn, void *arg) {
    return fn ? flash__uv_new(native, FLASH__UV_DEFER, fn, NULL, arg) : NULL;
}

static void flash__uv_timer_cb(uv_timer_t *timer) {
    flash__uv_h *h = (flash__uv_h *)timer->data;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->fn(h->arg);
    flash__uv_close(h);
}

static void *flash__uv_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash__uv_h *h = fn ? flash__uv_new(native, FLASH__UV_TIMER, fn, NULL, arg) : NULL;
    if (!h) return NULL;
    uv_timer_init(h->st->loop, &h->u.timer);
    h->u.timer.data = h;
    uv_update_time(h->st->loop); /* ms from now, not from the iteration's start */
    uv_timer_start(&h->u.timer, flash__uv_timer_cb, ms, 0);
    return h;
}

/* Cancel a defer or timer; stop a watch. */
static void flash__uv_cancel(void *native, void *handle) {
    flash__uv_h *h = (flash__uv_h *)handle;
    (void)native;
    if (h && !h->dead) {
        if (h->kind == FLASH__UV_DEFER) flash__uv_drop(h);
        else flash__uv_close(h);
    }
}

static void flash__uv_poll_cb(uv_poll_t *poll, int status, int events) {
    flash__uv_h *h = (flash__uv_h *)poll->data;
    int ev = FLASH_IO_READ | FLASH_IO_WRITE; /* errors and hang-ups */
    if (status >= 0 && !(events & UV_DISCONNECT))
        ev = ((events & UV_READABLE) ? FLASH_IO_READ : 0) | ((events & UV_WRITABLE) ? FLASH_IO_WRITE : 0);
    if (!h->dead && (ev &= h->events) != 0) h->io(h->arg, ev);
}

static int flash__uv_io_set(void *native, void *handle, int events) {
    flash__uv_h *h = (flash__uv_h *)handle;
    int uv_events;
    (void)native;
    if (!h || h->dead || h->kind != FLASH__UV_IO) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    /* Unchanged and still polling (libuv stops a handle after an error). */
    if (events == h->events && (uv_is_active(&h->u.handle) != 0) == (events != 0)) return FLASH_OK;
    h->events = events;
    if (!events) return uv_poll_stop(&h->u.poll) ? FLASH_EBACKEND : FLASH_OK;
    uv_events = ((events & FLASH_IO_READ) ? UV_READABLE : 0) | ((events & FLASH_IO_WRITE) ? UV_WRITABLE : 0);
    return uv_poll_start(&h->u.poll, uv_events, flash__uv_poll_cb) ? FLASH_EBACKEND : FLASH_OK;
}

static void *flash__uv_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash__uv_h *h = fd >= 0 && fn ? flash__uv_new(native, FLASH__UV_IO, NULL, fn, arg) : NULL;
    if (!h) return NULL;
    if (uv_poll_init(h->st->loop, &h->u.poll, fd) != 0) { /* not a libuv handle yet */
        flash__uv_drop(h);
        return NULL;
    }
    h->u.poll.data = h;
    if (flash__uv_io_set(native, h, events) == FLASH_OK) return h;
    flash__uv_close(h);
    return NULL;
}

static int flash__uv_run_once(void *native, bool may_block) {
    uv_loop_t *loop = (uv_loop_t *)native;
    flash__uv_st *st;
    int alive = uv_run(loop, may_block ? UV_RUN_ONCE : UV_RUN_NOWAIT);
    /* UV_RUN_ONCE runs the timers due after the poll once more, past the check
       phase: whatever they deferred runs now, in a non-blocking iteration. */
    if ((st = flash__uv_state(loop, false)) != NULL && st->dq.first) alive = uv_run(loop, UV_RUN_NOWAIT);
    return alive != 0;
}

static const flash_loop_vtable flash__uv_vt = {
    "libuv", flash__uv_defer, flash__uv_timer, flash__uv_cancel,
    flash__uv_io_start, flash__uv_io_set, flash__uv_cancel, flash__uv_run_once,
};

FLASH_API flash_loop flash_libuv_loop(uv_loop_t *loop) {
    flash_loop l = {&flash__uv_vt, loop};
    return l;
}

FLASH_API int flash_libuv_attach(flash_ctx *ctx, uv_loop_t *loop) {
    return ctx && loop ? flash_ctx_attach_loop(ctx, flash_libuv_loop(loop)) : FLASH_EINVAL;
}

FLASH_API void flash_libuv_release(uv_loop_t *loop) {
    flash__uv_st *st = loop ? flash__uv_state(loop, false) : NULL;
    flash__uv_h *h;
    if (!st) return;
    for (h = st->hs.first; h; h = h->next) flash__uv_close(h); /* freed when closed */
    while (st->dq.first) flash__uv_drop(st->dq.first);   /* st lives until closed */
}

#endif /* FLASH_LIBUV_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
