/* backends/loop/libuv.h — flash on a libuv loop (uv_loop_t).

       flash_libuv uv = {0};                 // yours: embed it anywhere
       flash_libuv_init(&uv, uv_default_loop(), NULL);   // NULL: malloc
       flash_libuv_attach(ctx, &uv);  // flash_wait / flash_run drive it with uv_run
       ...                            // or run it yourself: uv_run(loop, UV_RUN_DEFAULT)
       flash_libuv_close(&uv);        // stops every handle of the adapter
       uv_run(loop, UV_RUN_DEFAULT);  // runs the close callbacks that pool them
       uv_loop_close(loop);           // uv stays valid until here

   The adapter's state is all in the caller's flash_libuv (no global list or
   lock). Defers: flash.h's flash_loop_kit queue, run by a uv_check after the
   iteration's I/O, with a uv_idle on while it is not empty so that the loop
   polls without blocking. Timers (uv_timer_t, reused) and watches (uv_poll_t;
   libuv makes the fd non-blocking) come from the kit's pool: once warm, the
   adapter allocates nothing. Include after flash.h (FLASH_IMPLEMENTATION).
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

typedef struct flash_libuv {
    flash_loop_kit kit;          /* private, and first: the vtable's native pointer */
    void *data;                  /* the caller's */
    /* private: */
    uv_loop_t *loop;
    struct flash__uv_h *spare;   /* stopped timers, ready for reuse */
    int state;                   /* 0: free, 1: live, 2: closing */
    size_t closing;              /* close callbacks still to come */
    uv_check_t check;
    uv_idle_t idle;
} flash_libuv;

/* a zero-initialised or closed; FLASH_ESTATE while live, FLASH_EINVAL for NULL. */
FLASH_API int flash_libuv_init(flash_libuv *a, uv_loop_t *loop, const flash_allocator *alloc);
FLASH_API flash_loop flash_libuv_loop(flash_libuv *a);
/* FLASH_ESTATE when the context already has a loop or a is not live. */
FLASH_API int flash_libuv_attach(flash_ctx *ctx, flash_libuv *a);
/* Drop queued defers and close every handle (callbacks never run); then run
   the loop until the close callbacks have run (they free the handles) before
   uv_loop_close or reusing a. Not from inside one of the adapter's callbacks. */
FLASH_API void flash_libuv_close(flash_libuv *a);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBUV_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBUV_IMPLEMENTED
#define FLASH_LIBUV_IMPLEMENTED
#include <stddef.h>
#include <string.h>
typedef struct flash__uv_h {
    flash_defer d;               /* first, d.handle NULL: not a defer node; d.fn, d.arg */
    struct flash__uv_h *spare;   /* a->spare */
    flash_libuv *a;
    int events;
    bool io, dead;               /* dead: cancelled, stopped or fired */
    flash_io_fn io_fn;
    union { uv_handle_t handle; uv_timer_t timer; uv_poll_t poll; } u;
} flash__uv_h;

static void flash__uv_nop(uv_idle_t *idle) { (void)idle; }

static void flash__uv_check_cb(uv_check_t *check) {
    flash_loop_kit_run(&((flash_libuv *)check->data)->kit); /* what they queue waits for the next pass */
}

/* Check and idle are on exactly while defers are queued. */
static void flash__uv_pending(flash_loop_kit *kit, bool any) {
    flash_libuv *a = (flash_libuv *)(void *)kit;
    if (any) {
        uv_check_start(&a->check, flash__uv_check_cb);
        uv_idle_start(&a->idle, flash__uv_nop);
    } else {
        uv_check_stop(&a->check);
        uv_idle_stop(&a->idle);
    }
}

/* The last close callback after flash_libuv_close frees the pool. */
static void flash__uv_closed(uv_handle_t *handle) {
    flash_libuv *a = (flash_libuv *)handle->data;
    if (handle != (uv_handle_t *)&a->check && handle != (uv_handle_t *)&a->idle) {
        flash__uv_h *h = (flash__uv_h *)(void *)((char *)handle - offsetof(flash__uv_h, u));
        flash_handle_pool_put(&a->kit.handles, h);
    }
    if (--a->closing == 0 && a->state == 2) {
        flash_handle_pool_clear(&a->kit.handles);
        a->state = 0;
    }
}

static void flash__uv_close_handle(flash_libuv *a, uv_handle_t *handle) {
    handle->data = a;
    a->closing++;
    uv_close(handle, flash__uv_closed);
}

static flash__uv_h *flash__uv_new(flash_libuv *a) {
    flash__uv_h *h = (flash__uv_h *)flash_handle_pool_get(&a->kit.handles);
    if (h) h->a = a;
    return h;
}

/* Teardown: every handle not closing yet (spare timers included). */
static void flash__uv_drop(void *handle) {
    flash__uv_h *h = (flash__uv_h *)handle;
    if (!uv_is_closing(&h->u.handle)) flash__uv_close_handle(h->a, &h->u.handle);
}

static void flash__uv_timer_cb(uv_timer_t *timer) {
    flash__uv_h *h = (flash__uv_h *)timer->data;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->d.fn(h->d.arg);
    h->spare = h->a->spare; /* not earlier: fn's timers must not reuse it */
    h->a->spare = h;
}

static void *flash__uv_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash_libuv *a = (flash_libuv *)native;
    flash__uv_h *h = fn ? a->spare : NULL;
    if (!fn) return NULL;
    if (h) {
        a->spare = h->spare;
    } else if ((h = flash__uv_new(a)) == NULL) {
        return NULL;
    } else {
        uv_timer_init(a->loop, &h->u.timer);
    }
    h->dead = false, h->u.timer.data = h;
    h->d.fn = fn, h->d.arg = arg;
    uv_update_time(a->loop); /* ms from now, not from the iteration's start */
    uv_timer_start(&h->u.timer, flash__uv_timer_cb, ms, 0);
    return h;
}

/* Cancel a defer or timer; stop a watch (closed: a uv_poll_t is per fd). */
static void flash__uv_cancel(void *native, void *handle) {
    flash_libuv *a = (flash_libuv *)native;
    flash__uv_h *h = (flash__uv_h *)handle;
    if (h && !flash_loop_kit_cancel(&a->kit, handle) && !h->dead) {
        h->dead = true;
        if (h->io) {
            flash__uv_close_handle(a, &h->u.handle);
        } else {
            uv_timer_stop(&h->u.timer);
            h->spare = a->spare;
            a->spare = h;
        }
    }
}

static void flash__uv_poll_cb(uv_poll_t *poll, int status, int events) {
    flash__uv_h *h = (flash__uv_h *)poll->data;
    int ev = FLASH_IO_READ | FLASH_IO_WRITE; /* errors and hang-ups */
    if (status >= 0 && !(events & UV_DISCONNECT))
        ev = ((events & UV_READABLE) ? FLASH_IO_READ : 0) | ((events & UV_WRITABLE) ? FLASH_IO_WRITE : 0);
    if (!h->dead && (ev &= h->events) != 0) h->io_fn(h->d.arg, ev);
}

static int flash__uv_io_set(void *native, void *handle, int events) {
    flash__uv_h *h = (flash__uv_h *)handle;
    int uv_events;
    (void)native;
    if (!h || h->dead || !h->io) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    /* Unchanged and still polling (libuv stops a handle after an error). */
    if (events == h->events && (uv_is_active(&h->u.handle) != 0) == (events != 0)) return FLASH_OK;
    h->events = events;
    if (!events) return uv_poll_stop(&h->u.poll) ? FLASH_EBACKEND : FLASH_OK;
    uv_events = ((events & FLASH_IO_READ) ? UV_READABLE : 0) | ((events & FLASH_IO_WRITE) ? UV_WRITABLE : 0);
    return uv_poll_start(&h->u.poll, uv_events, flash__uv_poll_cb) ? FLASH_EBACKEND : FLASH_OK;
}

static void *flash__uv_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash_libuv *a = (flash_libuv *)native;
    flash__uv_h *h = fd >= 0 && fn ? flash__uv_new(a) : NULL;
    if (!h) return NULL;
    h->io = true, h->io_fn = fn, h->d.arg = arg;
    if (uv_poll_init(a->loop, &h->u.poll, fd) != 0) { /* not a libuv handle yet */
        flash_handle_pool_put(&a->kit.handles, h);
        return NULL;
    }
    h->u.poll.data = h;
    if (flash__uv_io_set(native, h, events) == FLASH_OK) return h;
    flash__uv_cancel(native, h);
    return NULL;
}

static int flash__uv_run_once(void *native, bool may_block) {
    flash_libuv *a = (flash_libuv *)native;
    int alive = uv_run(a->loop, may_block ? UV_RUN_ONCE : UV_RUN_NOWAIT);
    /* UV_RUN_ONCE runs the timers due after the poll once more, past the check
       phase: whatever they deferred runs now, in a non-blocking iteration. */
    if (!flash_defer_queue_empty(&a->kit.defers)) alive = uv_run(a->loop, UV_RUN_NOWAIT);
    return alive != 0;
}

static const flash_loop_vtable flash__uv_vt = {
    "libuv", flash_loop_kit_defer, flash__uv_timer, flash__uv_cancel, flash__uv_io_start,
    flash__uv_io_set, flash__uv_cancel, flash__uv_run_once, flash_loop_kit_post, flash_loop_kit_unpost,
};

FLASH_API int flash_libuv_init(flash_libuv *a, uv_loop_t *loop, const flash_allocator *alloc) {
    void *data;
    if (!a || !loop) return FLASH_EINVAL;
    if (a->state) return FLASH_ESTATE;
    data = a->data;
    memset(a, 0, sizeof *a);
    a->data = data;
    a->loop = loop;
    flash_loop_kit_init(&a->kit, sizeof(flash__uv_h), alloc, flash__uv_pending);
    uv_check_init(loop, &a->check);
    uv_idle_init(loop, &a->idle);
    a->check.data = a->idle.data = a;
    a->state = 1;
    return FLASH_OK;
}

FLASH_API flash_loop flash_libuv_loop(flash_libuv *a) {
    flash_loop l = {&flash__uv_vt, a};
    return l;
}

FLASH_API int flash_libuv_attach(flash_ctx *ctx, flash_libuv *a) {
    if (!ctx || !a) return FLASH_EINVAL;
    return a->state == 1 ? flash_ctx_attach_loop(ctx, flash_libuv_loop(a)) : FLASH_ESTATE;
}

FLASH_API void flash_libuv_close(flash_libuv *a) {
    if (!a || a->state != 1) return;
    a->state = 2;
    flash_loop_kit_close(&a->kit, flash__uv_drop); /* the pool itself: after the close callbacks */
    a->spare = NULL;
    flash__uv_close_handle(a, (uv_handle_t *)&a->check);
    flash__uv_close_handle(a, (uv_handle_t *)&a->idle);
}

#endif /* FLASH_LIBUV_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
