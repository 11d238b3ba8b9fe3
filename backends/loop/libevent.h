/* backends/loop/libevent.h — flash on a libevent 2.1 loop (struct event_base *).

       flash_libevent le = {0};                   // yours: embed it anywhere
       flash_libevent_init(&le, base, NULL);      // NULL: malloc
       flash_libevent_attach(ctx, &le);  // flash_wait / flash_run drive it
       ...                               // or run it yourself: event_base_dispatch(base)
       flash_libevent_close(&le);        // before event_base_free: no destroy hook
       event_base_free(base);

   All the adapter's state is in the caller's flash_libevent: no global list,
   no lock. Timers and watches are one struct event each (event_assign'd in
   handles from a pool: a warm adapter allocates nothing). Defers are
   flash.h's flash_loop_kit queue run by one event made active: its first call
   only re-activates it, which puts it behind the pass's other callbacks (the
   iteration's I/O), and the second runs the queue, in the same
   event_base_loop call; defers queued by defers wait for the next iteration
   (0 ms timeout). Link -levent before -lev (Debian's libev exports
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

typedef struct flash_libevent {
    flash_loop_kit kit;         /* private, and first: the vtable's native pointer */
    void *data;                 /* the caller's */
    /* private: */
    struct event_base *base;
    struct flash__le_h *run;    /* its event runs the defers, on its second call */
    bool live, bounced;
} flash_libevent;

/* a zero-initialised or closed; FLASH_ESTATE while live, FLASH_EINVAL for
   NULL, FLASH_EUNSUPPORTED when libev's libevent emulation shadows libevent
   (link -levent before -lev), FLASH_ENOMEM. */
FLASH_API int flash_libevent_init(flash_libevent *a, struct event_base *base, const flash_allocator *alloc);
FLASH_API flash_loop flash_libevent_loop(flash_libevent *a);
/* FLASH_ESTATE when the context already has a loop or a is not live. */
FLASH_API int flash_libevent_attach(flash_ctx *ctx, flash_libevent *a);
/* Drop every handle of the adapter (callbacks never run) and free them; a
   may then be freed or initialised again. Before event_base_free; not from
   inside one of the adapter's callbacks. */
FLASH_API void flash_libevent_close(flash_libevent *a);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_LIBEVENT_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_LIBEVENT_IMPLEMENTED
#define FLASH_LIBEVENT_IMPLEMENTED
#include <stdio.h>
#include <string.h>

typedef struct flash__le_h {
    flash_defer d;                   /* first, d.handle NULL: not a defer node; d.fn, d.arg */
    flash_libevent *a;
    int events;
    bool io, dead;                   /* dead: fired (timers) */
    flash_io_fn io_fn;
} flash__le_h; /* followed by its struct event (event_get_struct_event_size) */

#define FLASH__LE_EV(h) ((struct event *)(void *)((h) + 1))

/* Queued: run later in this pass, after its I/O callbacks (or in the next
   one); nothing queued: nothing to run. */
static void flash__le_pending(flash_loop_kit *kit, bool any) {
    flash_libevent *a = (flash_libevent *)(void *)kit;
    if (any) {
        event_active(FLASH__LE_EV(a->run), EV_TIMEOUT, 1);
    } else {
        event_del(FLASH__LE_EV(a->run));
        a->bounced = false;
    }
}

/* Run the defers queued before this run; those they queue wait for the next. */
static void flash__le_run_cb(evutil_socket_t fd, short what, void *arg) {
    flash_libevent *a = (flash_libevent *)arg;
    struct timeval zero = {0, 0};
    (void)fd, (void)what;
    if ((a->bounced = !a->bounced)) { /* first call: go behind the pass's I/O callbacks */
        event_active(FLASH__LE_EV(a->run), EV_TIMEOUT, 1);
        return;
    }
    flash_loop_kit_run(&a->kit);
    /* a defer from a defer: after the next iteration's I/O */
    if (!flash_defer_queue_empty(&a->kit.defers)) event_add(FLASH__LE_EV(a->run), &zero);
}

static flash__le_h *flash__le_new(flash_libevent *a) {
    flash__le_h *h = (flash__le_h *)flash_handle_pool_get(&a->kit.handles);
    if (h) h->a = a;
    return h;
}

/* Deleted, its event's memory is ours again: back to the pool. */
static void flash__le_free(flash__le_h *h) {
    flash_libevent *a = h->a;
    if (event_initialized(FLASH__LE_EV(h))) event_del(FLASH__LE_EV(h));
    flash_handle_pool_put(&a->kit.handles, h);
}
static void flash__le_drop(void *h) { flash__le_free((flash__le_h *)h); }

static void flash__le_timer_cb(evutil_socket_t fd, short what, void *arg) {
    flash__le_h *h = (flash__le_h *)arg;
    (void)fd, (void)what;
    h->dead = true; /* fired: a cancel from inside fn changes nothing */
    h->d.fn(h->d.arg);
    flash__le_free(h);
}

static void *flash__le_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash_libevent *a = (flash_libevent *)native;
    flash__le_h *h = fn ? flash__le_new(a) : NULL;
    struct timeval tv;
    if (!h) return NULL;
    h->d.fn = fn, h->d.arg = arg;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
    event_base_update_cache_time(a->base); /* ms from now, not from the pass's start */
    if (event_assign(FLASH__LE_EV(h), a->base, -1, 0, flash__le_timer_cb, h) == 0 &&
        event_add(FLASH__LE_EV(h), &tv) == 0)
        return h;
    flash__le_free(h);
    return NULL;
}

/* Cancel a defer or timer; stop a watch. */
static void flash__le_cancel(void *native, void *handle) {
    flash_libevent *a = (flash_libevent *)native;
    flash__le_h *h = (flash__le_h *)handle;
    if (h && !flash_loop_kit_cancel(&a->kit, handle) && !h->dead) flash__le_free(h);
}

static void flash__le_io_cb(evutil_socket_t fd, short what, void *arg) {
    flash__le_h *h = (flash__le_h *)arg;
    /* libevent reports errors and hang-ups as EV_READ|EV_WRITE itself */
    int ev = ((what & EV_READ) ? FLASH_IO_READ : 0) | ((what & EV_WRITE) ? FLASH_IO_WRITE : 0);
    (void)fd;
    if ((ev &= h->events) != 0) h->io_fn(h->d.arg, ev); /* h may be gone after this */
}

static int flash__le_io_set(void *native, void *handle, int events) {
    flash__le_h *h = (flash__le_h *)handle;
    struct event *e = h ? FLASH__LE_EV(h) : NULL;
    short what;
    (void)native;
    if (!h || !h->io) return FLASH_EINVAL;
    events &= FLASH_IO_READ | FLASH_IO_WRITE;
    if (events == h->events) return FLASH_OK;
    event_del(e);
    h->events = 0;
    if (!events) return FLASH_OK;
    what = (short)(EV_PERSIST | ((events & FLASH_IO_READ) ? EV_READ : 0) | ((events & FLASH_IO_WRITE) ? EV_WRITE : 0));
    if (event_assign(e, h->a->base, event_get_fd(e), what, flash__le_io_cb, h) != 0 || event_add(e, NULL) != 0)
        return FLASH_EBACKEND;
    h->events = events;
    return FLASH_OK;
}

static void *flash__le_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash_libevent *a = (flash_libevent *)native;
    flash__le_h *h = fd >= 0 && fn ? flash__le_new(a) : NULL;
    if (!h) return NULL;
    h->io = true, h->io_fn = fn, h->d.arg = arg;
    if (event_assign(FLASH__LE_EV(h), a->base, fd, EV_PERSIST, flash__le_io_cb, h) == 0 &&
        flash__le_io_set(native, h, events) == FLASH_OK)
        return h;
    flash__le_free(h);
    return NULL;
}

static int flash__le_run_once(void *native, bool may_block) {
    struct event_base *base = ((flash_libevent *)native)->base;
    int rc = event_base_loop(base, EVLOOP_ONCE | (may_block ? 0 : EVLOOP_NONBLOCK));
    if (rc < 0) return FLASH_EBACKEND;
    return rc == 0 && event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) > 0;
}

static const flash_loop_vtable flash__le_vt = {
    "libevent", flash_loop_kit_defer, flash__le_timer, flash__le_cancel, flash__le_io_start,
    flash__le_io_set, flash__le_cancel, flash__le_run_once, flash_loop_kit_post, flash_loop_kit_unpost,
};

/* Debian's libev exports libevent's names (its emulation layer): linked first,
   it takes libevent's own calls too. Refuse rather than corrupt memory. */
static bool flash__le_linked_right(void) {
    char want[24];
    ev_uint32_t v = event_get_version_number();
    snprintf(want, sizeof want, "%u.%u.", (unsigned)(v >> 24), (unsigned)(v >> 16 & 0xff));
    return strncmp(event_get_version(), want, strlen(want)) == 0;
}

FLASH_API int flash_libevent_init(flash_libevent *a, struct event_base *base, const flash_allocator *alloc) {
    void *data;
    if (!a || !base) return FLASH_EINVAL;
    if (a->live) return FLASH_ESTATE;
    if (!flash__le_linked_right()) return FLASH_EUNSUPPORTED; /* link -levent before -lev */
    data = a->data;
    memset(a, 0, sizeof *a);
    a->data = data;
    a->base = base;
    flash_loop_kit_init(&a->kit, sizeof(flash__le_h) + event_get_struct_event_size(), alloc, flash__le_pending);
    if ((a->run = flash__le_new(a)) == NULL) return FLASH_ENOMEM; /* the runner is a handle too */
    a->run->dead = true; /* not a timer: cancel leaves it */
    event_assign(FLASH__LE_EV(a->run), base, -1, 0, flash__le_run_cb, a);
    a->live = true;
    return FLASH_OK;
}

FLASH_API flash_loop flash_libevent_loop(flash_libevent *a) {
    flash_loop l = {&flash__le_vt, a};
    return l;
}

FLASH_API int flash_libevent_attach(flash_ctx *ctx, flash_libevent *a) {
    if (!ctx || !a) return FLASH_EINVAL;
    return a->live ? flash_ctx_attach_loop(ctx, flash_libevent_loop(a)) : FLASH_ESTATE;
}

FLASH_API void flash_libevent_close(flash_libevent *a) {
    if (!a || !a->live) return;
    a->live = false;
    flash_loop_kit_close(&a->kit, flash__le_drop); /* the runner too */
}

#endif /* FLASH_LIBEVENT_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
