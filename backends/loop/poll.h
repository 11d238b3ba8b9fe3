/* backends/loop/poll.h — flash's built-in event loop on poll(2).

   The default loop for tests, examples and services that have no loop of
   their own. Single-threaded. Defers are flash.h's flash_loop_kit queue (post
   and unpost never allocate); timers and watches come from its pool,
   so that a warm loop allocates nothing; callbacks may stop any handle.

       flash_poll *loop = flash_poll_create();   // or _with(&allocator)
       flash_poll_attach(ctx, loop);       // flash_wait / flash_run drive it
       ...
       flash_poll_run(loop);               // or drive it yourself
       flash_poll_destroy(loop);

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_POLL_H
#define FLASH_POLL_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_poll flash_poll;
FLASH_API flash_poll *flash_poll_create(void);
/* Everything of the loop from alloc (NULL: malloc). */
FLASH_API flash_poll *flash_poll_create_with(const flash_allocator *alloc);
/* Frees every handle; callbacks never run afterwards. */
FLASH_API void flash_poll_destroy(flash_poll *loop);
/* One iteration: > 0 while work remains, 0 when idle, < 0 on poll error. */
FLASH_API int flash_poll_run_once(flash_poll *loop, bool may_block);
/* Iterate until nothing is left to wait for. */
FLASH_API int flash_poll_run(flash_poll *loop);
FLASH_API flash_loop flash_poll_loop(flash_poll *loop);
FLASH_API int flash_poll_attach(flash_ctx *ctx, flash_poll *loop);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_POLL_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_POLL_IMPLEMENTED
#define FLASH_POLL_IMPLEMENTED
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>

typedef struct flash__poll_handle {
    flash_defer d; /* first, d.handle NULL: not one of the queue's defer nodes */
    bool dead;     /* stopped, cancelled or fired: back to the pool at the next sweep */
    int fd, events;
    flash_io_fn io; /* watches; timers use d.fn, d.arg */
    void *arg;
    int64_t due_ms;
    uint64_t seq; /* timers: fire only those older than this iteration */
    uint64_t id;  /* creation order: ties of due_ms fire first-made first */
} flash__poll_handle;

struct flash_poll {
    flash_loop_kit kit; /* first: the vtable's native pointer; its pool's allocator is the loop's */
    struct pollfd *pfds;
    flash__poll_handle **pfd_handles;
    size_t pfd_cap;
    uint64_t seq, next_id;
};

static int64_t flash__poll_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *flash__poll_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash_poll *l = (flash_poll *)native;
    flash__poll_handle *h = fn ? (flash__poll_handle *)flash_handle_pool_get(&l->kit.handles) : NULL;
    if (!h) return NULL;
    h->d.fn = fn, h->d.arg = arg;
    h->due_ms = flash__poll_now() + ms;
    h->seq = l->seq;
    h->id = l->next_id++;
    return h;
}

/* Both kinds of handle start with a flash_defer: the queue marks its own. */
static void flash__poll_cancel(void *native, void *handle) {
    flash_poll *l = (flash_poll *)native;
    if (!handle) return;
    if (!flash_loop_kit_cancel(&l->kit, handle)) ((flash__poll_handle *)handle)->dead = true;
}

static void *flash__poll_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash_poll *l = (flash_poll *)native;
    flash__poll_handle *h = fd >= 0 && fn ? (flash__poll_handle *)flash_handle_pool_get(&l->kit.handles) : NULL;
    if (!h) return NULL;
    h->io = fn, h->arg = arg, h->fd = fd;
    h->events = events & (FLASH_IO_READ | FLASH_IO_WRITE);
    return h;
}

static int flash__poll_io_set(void *native, void *handle, int events) {
    flash__poll_handle *h = (flash__poll_handle *)handle;
    (void)native;
    if (!h || h->dead || !h->io) return FLASH_EINVAL;
    h->events = events & (FLASH_IO_READ | FLASH_IO_WRITE);
    return FLASH_OK;
}

static void flash__poll_io_stop(void *native, void *handle) {
    (void)native;
    if (handle) ((flash__poll_handle *)handle)->dead = true;
}

/* The handles are the pool's live list, newest first. */
#define FLASH__POLL_EACH(l, h) \
    for (h = (flash__poll_handle *)flash_handle_pool_next_live(&(l)->kit.handles, NULL); h; \
         h = (flash__poll_handle *)flash_handle_pool_next_live(&(l)->kit.handles, h))

/* Pool the dead handles; only between callbacks, so that no callback of
   this iteration can see a handle reused. */
static void flash__poll_sweep(flash_poll *l) {
    flash__poll_handle *h = (flash__poll_handle *)flash_handle_pool_next_live(&l->kit.handles, NULL), *next;
    for (; h; h = next) {
        next = (flash__poll_handle *)flash_handle_pool_next_live(&l->kit.handles, h);
        if (h->dead) flash_handle_pool_put(&l->kit.handles, h);
    }
}

/* pfds grows by doubling through the loop's allocator (it has no realloc). */
static bool flash__poll_grow(flash_poll *l) {
    size_t cap = l->pfd_cap ? l->pfd_cap * 2 : 16;
    flash_allocator *a = &l->kit.handles.alloc;
    void *p = a->alloc(cap * (sizeof *l->pfds + sizeof *l->pfd_handles), a->user_data);
    if (!p) return false;
    if (l->pfd_cap) memcpy(p, l->pfds, l->pfd_cap * sizeof *l->pfds);
    if (l->pfd_cap) memcpy((char *)p + cap * sizeof *l->pfds, l->pfd_handles, l->pfd_cap * sizeof *l->pfd_handles);
    if (l->pfds) a->free(l->pfds, a->user_data);
    l->pfds = (struct pollfd *)p;
    l->pfd_handles = (flash__poll_handle **)(void *)((char *)p + cap * sizeof *l->pfds);
    l->pfd_cap = cap;
    return true;
}

FLASH_API int flash_poll_run_once(flash_poll *l, bool may_block) {
    flash__poll_handle *h;
    size_t n = 0, i;
    int timeout = -1, rc;
    int64_t now, wait;
    bool timers;
    if (!l) return FLASH_EINVAL;
    flash__poll_sweep(l);
    now = flash__poll_now();
    FLASH__POLL_EACH(l, h) {
        if (h->io) continue;
        wait = h->due_ms < now ? 0 : h->due_ms - now;
        if (timeout < 0 || wait < timeout) timeout = (int)(wait > 86400000 ? 86400000 : wait);
    }
    timers = timeout >= 0;
    if (!flash_defer_queue_empty(&l->kit.defers) || !may_block) timeout = 0;
    FLASH__POLL_EACH(l, h) {
        if (!h->io || !h->events) continue;
        if (n == l->pfd_cap && !flash__poll_grow(l)) return FLASH_ENOMEM;
        l->pfds[n].fd = h->fd;
        l->pfds[n].events = (short)(((h->events & FLASH_IO_READ) ? POLLIN : 0) |
                                    ((h->events & FLASH_IO_WRITE) ? POLLOUT : 0));
        l->pfds[n].revents = 0;
        l->pfd_handles[n++] = h;
    }
    if (!n && !timers && flash_defer_queue_empty(&l->kit.defers)) return 0;
    l->seq++;
    rc = poll(n ? l->pfds : NULL, (nfds_t)n, timeout);
    if (rc < 0 && errno != EINTR) return FLASH_EBACKEND;
    for (i = 0; rc > 0 && i < n; i++) {
        short re = l->pfds[i].revents;
        int ev = 0;
        h = l->pfd_handles[i];
        if (!re || h->dead) continue;
        if (re & (POLLERR | POLLHUP | POLLNVAL)) ev = FLASH_IO_READ | FLASH_IO_WRITE;
        if (re & POLLIN) ev |= FLASH_IO_READ;
        if (re & POLLOUT) ev |= FLASH_IO_WRITE;
        if ((ev &= h->events) != 0) h->io(h->arg, ev);
    }
    now = flash__poll_now();
    for (;;) { /* due timers in due order (then creation order) */
        flash__poll_handle *next = NULL;
        FLASH__POLL_EACH(l, h) {
            if (h->io || h->dead || h->seq >= l->seq || h->due_ms > now) continue;
            if (!next || h->due_ms < next->due_ms || (h->due_ms == next->due_ms && h->id < next->id)) next = h;
        }
        if (!next) break;
        next->dead = true; /* fired: the handle is gone for the caller */
        next->d.fn(next->d.arg);
    }
    flash_loop_kit_run(&l->kit); /* what they queue runs next iteration */
    if (!flash_defer_queue_empty(&l->kit.defers)) return 1;
    FLASH__POLL_EACH(l, h) {
        if (!h->dead && (!h->io || h->events)) return 1;
    }
    return 0;
}

FLASH_API int flash_poll_run(flash_poll *l) {
    int rc;
    while ((rc = flash_poll_run_once(l, true)) > 0) {
    }
    return rc;
}

static int flash__poll_run_once_v(void *native, bool may_block) {
    return flash_poll_run_once((flash_poll *)native, may_block);
}

static const flash_loop_vtable flash__poll_vt = {
    "poll", flash_loop_kit_defer, flash__poll_timer, flash__poll_cancel, flash__poll_io_start,
    flash__poll_io_set, flash__poll_io_stop, flash__poll_run_once_v, flash_loop_kit_post, flash_loop_kit_unpost,
};

FLASH_API flash_poll *flash_poll_create_with(const flash_allocator *alloc) {
    flash_loop_kit kit; /* empty yet, so it may be copied; NULL alloc: malloc */
    flash_poll *l;
    flash_loop_kit_init(&kit, sizeof(flash__poll_handle), alloc, NULL);
    if ((l = (flash_poll *)kit.handles.alloc.alloc(sizeof *l, kit.handles.alloc.user_data)) == NULL) return NULL;
    memset(l, 0, sizeof *l);
    l->kit = kit;
    return l;
}

FLASH_API flash_poll *flash_poll_create(void) { return flash_poll_create_with(NULL); }

FLASH_API void flash_poll_destroy(flash_poll *l) {
    if (!l) return;
    flash_allocator a = l->kit.handles.alloc;
    flash_loop_kit_close(&l->kit, NULL);
    if (l->pfds) a.free(l->pfds, a.user_data);
    a.free(l, a.user_data);
}

FLASH_API flash_loop flash_poll_loop(flash_poll *l) {
    flash_loop loop = {&flash__poll_vt, l};
    return loop;
}

FLASH_API int flash_poll_attach(flash_ctx *ctx, flash_poll *l) {
    if (!ctx || !l) return FLASH_EINVAL;
    return flash_ctx_attach_loop(ctx, flash_poll_loop(l));
}

#endif /* FLASH_POLL_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
