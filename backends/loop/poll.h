/* backends/loop/poll.h — flash's built-in event loop on poll(2).

   The default loop for tests, examples and services that have no loop of
   their own. Single-threaded; handles are allocated per watch/timer/defer
   and freed by the loop, so callbacks may stop any handle at any time.

       flash_poll *loop = flash_poll_create();
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
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { FLASH__POLL_IO, FLASH__POLL_TIMER, FLASH__POLL_DEFER };

typedef struct flash__poll_handle {
    struct flash__poll_handle *next;
    int kind;
    bool dead;
    int fd, events;
    flash_io_fn io;
    flash_loop_fn fn;
    void *arg;
    int64_t due_ms;
    uint64_t seq; /* timers: fire only those older than this iteration */
    uint64_t id;  /* creation order: ties of due_ms fire first-made first */
} flash__poll_handle;

struct flash_poll {
    flash__poll_handle *ios, *timers;
    flash__poll_handle *defers, *defers_last;
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

static flash__poll_handle *flash__poll_new(int kind, flash_loop_fn fn, flash_io_fn io, void *arg) {
    flash__poll_handle *h = (flash__poll_handle *)calloc(1, sizeof *h);
    if (!h) return NULL;
    h->kind = kind;
    h->fn = fn;
    h->io = io;
    h->arg = arg;
    return h;
}

static void *flash__poll_defer(void *native, flash_loop_fn fn, void *arg) {
    flash_poll *l = (flash_poll *)native;
    flash__poll_handle *h = flash__poll_new(FLASH__POLL_DEFER, fn, NULL, arg);
    if (!h) return NULL;
    if (l->defers_last) l->defers_last->next = h;
    else l->defers = h;
    l->defers_last = h;
    return h;
}

static void *flash__poll_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    flash_poll *l = (flash_poll *)native;
    flash__poll_handle *h = flash__poll_new(FLASH__POLL_TIMER, fn, NULL, arg);
    if (!h) return NULL;
    h->due_ms = flash__poll_now() + ms;
    h->seq = l->seq;
    h->id = l->next_id++;
    h->next = l->timers;
    l->timers = h;
    return h;
}

static void flash__poll_cancel(void *native, void *handle) {
    (void)native;
    if (handle) ((flash__poll_handle *)handle)->dead = true;
}

static void *flash__poll_io_start(void *native, int fd, int events, flash_io_fn fn, void *arg) {
    flash_poll *l = (flash_poll *)native;
    flash__poll_handle *h;
    if (fd < 0 || !fn) return NULL;
    h = flash__poll_new(FLASH__POLL_IO, NULL, fn, arg);
    if (!h) return NULL;
    h->fd = fd;
    h->events = events & (FLASH_IO_READ | FLASH_IO_WRITE);
    h->next = l->ios;
    l->ios = h;
    return h;
}

static int flash__poll_io_set(void *native, void *handle, int events) {
    flash__poll_handle *h = (flash__poll_handle *)handle;
    (void)native;
    if (!h || h->dead) return FLASH_EINVAL;
    h->events = events & (FLASH_IO_READ | FLASH_IO_WRITE);
    return FLASH_OK;
}

static void flash__poll_io_stop(void *native, void *handle) { flash__poll_cancel(native, handle); }

/* Free the dead handles of a list; called only between callbacks. */
static void flash__poll_sweep(flash__poll_handle **list, flash__poll_handle **last) {
    flash__poll_handle *prev = NULL, *h = *list;
    while (h) {
        flash__poll_handle *next = h->next;
        if (h->dead) {
            if (prev) prev->next = next;
            else *list = next;
            free(h);
        } else {
            prev = h;
        }
        h = next;
    }
    if (last) *last = prev;
}

FLASH_API int flash_poll_run_once(flash_poll *l, bool may_block) {
    flash__poll_handle *h, *defers;
    size_t n = 0, i;
    int timeout = -1, rc;
    int64_t now;
    if (!l) return FLASH_EINVAL;
    flash__poll_sweep(&l->ios, NULL);
    flash__poll_sweep(&l->timers, NULL);
    flash__poll_sweep(&l->defers, &l->defers_last);
    now = flash__poll_now();
    for (h = l->timers; h; h = h->next) {
        int64_t wait = h->due_ms - now;
        if (wait < 0) wait = 0;
        if (timeout < 0 || wait < timeout) timeout = (int)(wait > 86400000 ? 86400000 : wait);
    }
    if (l->defers || !may_block) timeout = 0;
    for (h = l->ios; h; h = h->next) {
        if (!h->events) continue;
        if (n == l->pfd_cap) {
            size_t cap = l->pfd_cap ? l->pfd_cap * 2 : 16;
            struct pollfd *p = (struct pollfd *)realloc(l->pfds, cap * sizeof *p);
            flash__poll_handle **ph;
            if (!p) return FLASH_ENOMEM;
            l->pfds = p;
            ph = (flash__poll_handle **)realloc(l->pfd_handles, cap * sizeof *ph);
            if (!ph) return FLASH_ENOMEM;
            l->pfd_handles = ph;
            l->pfd_cap = cap;
        }
        l->pfds[n].fd = h->fd;
        l->pfds[n].events = (short)(((h->events & FLASH_IO_READ) ? POLLIN : 0) |
                                    ((h->events & FLASH_IO_WRITE) ? POLLOUT : 0));
        l->pfds[n].revents = 0;
        l->pfd_handles[n] = h;
        n++;
    }
    if (!n && !l->timers && !l->defers) return 0;
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
        ev &= h->events ? h->events : 0;
        if (ev) h->io(h->arg, ev);
    }
    now = flash__poll_now();
    for (;;) { /* due timers in due order (then creation order) */
        flash__poll_handle *next = NULL;
        for (h = l->timers; h; h = h->next) {
            if (h->dead || h->seq >= l->seq || h->due_ms > now) continue;
            if (!next || h->due_ms < next->due_ms || (h->due_ms == next->due_ms && h->id < next->id)) next = h;
        }
        if (!next) break;
        next->dead = true; /* fired: the handle is gone for the caller */
        next->fn(next->arg);
    }
    /* Defers queued so far run now; those they queue run next iteration. */
    defers = l->defers;
    l->defers = l->defers_last = NULL;
    while (defers) {
        flash__poll_handle *next = defers->next;
        if (!defers->dead) {
            defers->dead = true;
            defers->fn(defers->arg);
        }
        free(defers);
        defers = next;
    }
    for (h = l->ios; h; h = h->next)
        if (!h->dead && h->events) return 1;
    for (h = l->timers; h; h = h->next)
        if (!h->dead) return 1;
    for (h = l->defers; h; h = h->next)
        if (!h->dead) return 1;
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
    "poll", flash__poll_defer, flash__poll_timer, flash__poll_cancel,
    flash__poll_io_start, flash__poll_io_set, flash__poll_io_stop, flash__poll_run_once_v,
};

FLASH_API flash_poll *flash_poll_create(void) { return (flash_poll *)calloc(1, sizeof(flash_poll)); }

FLASH_API void flash_poll_destroy(flash_poll *l) {
    flash__poll_handle *lists[3], *h;
    int i;
    if (!l) return;
    lists[0] = l->ios;
    lists[1] = l->timers;
    lists[2] = l->defers;
    for (i = 0; i < 3; i++) {
        for (h = lists[i]; h;) {
            flash__poll_handle *next = h->next;
            free(h);
            h = next;
        }
    }
    free(l->pfds);
    free(l->pfd_handles);
    free(l);
}

FLASH_API flash_loop flash_poll_loop(flash_poll *l) {
    flash_loop loop;
    loop.vt = &flash__poll_vt;
    loop.native = l;
    return loop;
}

FLASH_API int flash_poll_attach(flash_ctx *ctx, flash_poll *l) {
    if (!ctx || !l) return FLASH_EINVAL;
    return flash_ctx_attach_loop(ctx, flash_poll_loop(l));
}

#endif /* FLASH_POLL_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
