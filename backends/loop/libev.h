/* backends/loop/libev.h — flash on a libev loop (struct ev_loop *).

       flash_libev ev = {0};                      // yours: embed it anywhere
       flash_libev_init(&ev, EV_DEFAULT, NULL);   // NULL: malloc
       flash_libev_attach(ctx, &ev);  // flash_wait / flash_run drive it with ev_run
       ...                            // or run it yourself: ev_run(loop, 0)
       flash_libev_close(&ev);        // or ev_loop_destroy(loop), which closes it

   All the adapter's state is in the caller's flash_libev: no global list, no
   lock. Defers are flash.h's flash_loop_kit queue run by one ev_check at
   EV_MINPRI, after the iteration's I/O and timer callbacks; an ev_idle is on
   while it is not empty, so that the loop polls without blocking. Timers
   (ev_timer) and watches (ev_io) come from the kit's pool: a warm adapter
   allocates nothing. Include after flash.h (libevent.h: either order); the
   implementation comes with FLASH_IMPLEMENTATION.
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

typedef struct flash_libev {
    flash_loop_kit kit;       /* private, and first: the vtable's native pointer */
    void *data;               /* the caller's */
    /* private: */
    struct ev_loop *loop;
    bool live;
    ev_check check;           /* EV_MINPRI, always on, unref'd: runs the defers */
    ev_idle idle;             /* on while defers are queued: do not block */
    ev_cleanup cleanup;       /* ev_loop_destroy closes the adapter */
} flash_libev;

/* a zero-initialised or closed; FLASH_ESTATE while live, FLASH_EINVAL for NULL. */
FLASH_API int flash_libev_init(flash_libev *a, struct ev_loop *loop, const flash_allocator *alloc);
FLASH_API flash_loop flash_libev_loop(flash_libev *a);
/* FLASH_ESTATE when the context already has a loop or a is not live. */
FLASH_API int flash_libev_attach(flash_ctx *ctx, flash_libev *a);
/* Drop every handle of the adapter (callbacks never run) and free them; a
   may then be freed or initialised again. Not from inside one of its
   callbacks. ev_loop_destroy does it too. */
FLASH_API void flash_libev_close(flash_libev *a);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBEV_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBEV_IMPLEMENTED
#define FLASH_LIBEV_IMPLEMENTED
#include <string.h>

typedef struct flash__ev_h {
    flash_defer d;                   /* first, d.handle NULL: not a defer node; d.fn, d.arg */
    flash_libev *a;
    int events;
    bool io, dead;                   /* dead: fired (timers) */
    flash_io_fn io_fn;
    union { ev_timer timer; ev_io io; } w;
} flash__ev_h;

static void flash__ev_idle_cb(struct ev_loop *loop, ev_idle *w, int revents) { (void)loop, (void)w, (void)revents; }

static void flash__ev_pending(flash_loop_kit *kit, bool any) {
    flash_libev *a = (flash_libev *)(void *)kit;
    if (any) ev_idle_start(a->loop, &a->idle);
    else ev_idle_stop(a->loop, &a->idle);
}

static void flash__ev_check_cb(struct ev_loop *loop, ev_check *w, int revents) {
    (void)loop, (void)revents;
    flash_loop_kit_run(&((flash_libev *)w->data)->kit);
}

static flash__ev_h *flash__ev_new(flash_libev *a) {
    flash__ev_h *h = (flash__ev_h *)flash_handle_pool_get(&a->kit.handles);
    if (h) h->a = a;
    return h;
}

/* Stopped: libev forgets a stopped watcher (pending events too), so its
   memory goes back to the pool at once. */
static void flash__ev_free(flash__ev_h *h) {
    flash_libev *a = h->a;
    if (h->io) ev_io_stop(a->loop, &h->w.io);
    else ev_timer_stop(a->loop, &h->w.timer);
    flash_handle_pool_put(&a->kit.handles, h);
}
static void flash__ev_drop(void *h) { flash__ev_free((flash__ev_h *)h); }

static void flash__ev_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    flash__ev_h *h = (flash__ev_h *)w->data;
    (void)loop, (void)revents;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->d.fn(h->d.arg);
    flash__ev_free(h);
}

static void *flash__ev_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash_libev *a = (flash_libev *)native;
    flash__ev_h *h = fn ? flash__ev_new(a) : NULL;
    if (!h) return NULL;
    h->d.fn = fn, h->d.arg = arg;
    ev_timer_init(&h->w.timer, flash__ev_timer_cb, ms / 1000.0, 0.);
    h->w.timer.data = h;
    ev_now_update(a->loop); /* ms from now, not from the iteration's start */
    ev_timer_start(a->loop, &h->w.timer);
    return h;
}

/* Cancel a defer or timer; stop a watch. */
static void flash__ev_cancel(void *native, void *handle) {
    flash_libev *a = (flash_libev *)native;
    flash__ev_h *h = (flash__ev_h *)handle;
    if (h && !flash_loop_kit_cancel(&a->kit, handle) && !h->dead) flash__ev_free(h);
}

static void flash__ev_io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    flash__ev_h *h = (flash__ev_h *)w->data;
    int ev = FLASH_IO_READ | FLASH_IO_WRITE; /* errors */
    (void)loop;
    if (!(revents & EV_ERROR))
        ev = ((revents & FLASH__EV_READ) ? FLASH_IO_READ : 0) | ((revents & FLASH__EV_WRITE) ? FLASH_IO_WRITE : 0);
    if ((ev &= h->events) != 0) h->io_fn(h->d.arg, ev); /* h may be gone after this */
}

static int flash__ev_io_set(void *native, void *handle, int events) {
    flash__ev_h *h = (flash__ev_h *)handle;
    (void)native;
    if (!h || !h->io) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    /* Unchanged and still watching (libev stops a watcher on a bad fd). */
    if (events == h->events && (ev_is_active(&h->w.io) != 0) == (events != 0)) return FLASH_OK;
    h->events = events;
    ev_io_stop(h->a->loop, &h->w.io);
    ev_io_set(&h->w.io, h->w.io.fd,
              ((events & FLASH_IO_READ) ? FLASH__EV_READ : 0) | ((events & FLASH_IO_WRITE) ? FLASH__EV_WRITE : 0));
    if (events) ev_io_start(h->a->loop, &h->w.io);
    return FLASH_OK;
}

static void *flash__ev_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash__ev_h *h = fd >= 0 && fn ? flash__ev_new((flash_libev *)native) : NULL;
    if (!h) return NULL;
    h->io = true, h->io_fn = fn, h->d.arg = arg;
    ev_io_init(&h->w.io, flash__ev_io_cb, fd, 0);
    h->w.io.data = h;
    flash__ev_io_set(native, h, events);
    return h;
}

static int flash__ev_run_once(void *native, bool may_block) {
    return ev_run(((flash_libev *)native)->loop, may_block ? EVRUN_ONCE : EVRUN_NOWAIT) != 0;
}

static const flash_loop_vtable flash__ev_vt = {
    "libev", flash_loop_kit_defer, flash__ev_timer, flash__ev_cancel, flash__ev_io_start,
    flash__ev_io_set, flash__ev_cancel, flash__ev_run_once, flash_loop_kit_post, flash_loop_kit_unpost,
};

static void flash__ev_cleanup_cb(struct ev_loop *loop, ev_cleanup *w, int revents) {
    (void)loop, (void)revents;
    flash_libev_close((flash_libev *)w->data);
}

FLASH_API int flash_libev_init(flash_libev *a, struct ev_loop *loop, const flash_allocator *alloc) {
    void *data;
    if (!a || !loop) return FLASH_EINVAL;
    if (a->live) return FLASH_ESTATE;
    data = a->data;
    memset(a, 0, sizeof *a);
    a->data = data;
    a->loop = loop;
    flash_loop_kit_init(&a->kit, sizeof(flash__ev_h), alloc, flash__ev_pending);
    ev_check_init(&a->check, flash__ev_check_cb);
    ev_set_priority(&a->check, EV_MINPRI);
    ev_idle_init(&a->idle, flash__ev_idle_cb);
    ev_cleanup_init(&a->cleanup, flash__ev_cleanup_cb);
    a->check.data = a->cleanup.data = a;
    ev_check_start(loop, &a->check);
    ev_unref(loop); /* the check alone keeps nothing alive */
    ev_cleanup_start(loop, &a->cleanup); /* libev unrefs it itself */
    /* Made inside a callback: this iteration's checks are already queued. */
    if (ev_depth(loop)) ev_feed_event(loop, &a->check, EV_CHECK);
    a->live = true;
    return FLASH_OK;
}

FLASH_API flash_loop flash_libev_loop(flash_libev *a) {
    flash_loop l = {&flash__ev_vt, a};
    return l;
}

FLASH_API int flash_libev_attach(flash_ctx *ctx, flash_libev *a) {
    if (!ctx || !a) return FLASH_EINVAL;
    return a->live ? flash_ctx_attach_loop(ctx, flash_libev_loop(a)) : FLASH_ESTATE;
}

FLASH_API void flash_libev_close(flash_libev *a) {
    if (!a || !a->live) return;
    a->live = false;
    flash_loop_kit_close(&a->kit, flash__ev_drop);
    ev_ref(a->loop); /* the check was unref'd */
    ev_check_stop(a->loop, &a->check);
    ev_idle_stop(a->loop, &a->idle);
    ev_cleanup_stop(a->loop, &a->cleanup);
}

#endif /* FLASH_LIBEV_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
