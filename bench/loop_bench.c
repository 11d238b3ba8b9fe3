/* bench/loop_bench.c — the loop adapters' hot paths, in ns per operation:
   the cost flash pays per tick and per timeout on each loop.

     defer   vt->defer, then the adapter running it (run_once every 64 defers)
     post    flash_loop_post of a caller's node, then run (same batches)
     timer   vt->timer (1 s) then vt->cancel (run_once every 64)

       bench/out/loop_bench [N]          N operations per measure (default 1000000)
       bench/out/loop_bench N libuv defer   one adapter, one measure

   Instructions per operation: run one measure under callgrind, counting only
   inside measure(), and divide the total by N:

       valgrind --tool=callgrind --collect-atstart=no --toggle-collect=measure \
         bench/out/loop_bench 100000 libuv defer

   -DLOOP_BENCH_OLD_API builds it against the adapters before they were
   caller-owned structs (flash_<loop>_attach(ctx, native), state in a global
   list), for the before/after figures of the README. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/loop/libev.h"
#include "backends/loop/libevent.h"
#include "backends/loop/libuv.h"
#include "backends/loop/poll.h"

enum { BATCH = 64 };
#ifdef LOOP_BENCH_OLD_API
#define HAS_POST(lp) false /* flash_loop_post came with the adapter kit */
#define POST(lp, d) (void)0
#else
#define HAS_POST(lp) ((lp).vt->post != NULL)
#define POST(lp, d) flash_loop_post(lp, d, count, NULL)
#endif
static const char *const adapters[] = {"poll", "libuv", "libev", "libevent"};
static const char *const measures[] = {"defer", "post", "timer"};

/* One adapter on a loop of its own. */
typedef struct bench_loop {
    flash_loop lp;
    flash_poll *poll;
    uv_loop_t uv;
    struct ev_loop *ev;
    struct event_base *base;
#ifndef LOOP_BENCH_OLD_API
    flash_libuv a_uv;
    flash_libev a_ev;
    flash_libevent a_le;
#endif
} bench_loop;

static void open_loop(bench_loop *b, int which) {
    memset(b, 0, sizeof *b);
    switch (which) {
    case 0: b->poll = flash_poll_create(), b->lp = flash_poll_loop(b->poll); break;
#ifdef LOOP_BENCH_OLD_API
    case 1: uv_loop_init(&b->uv), b->lp = flash_libuv_loop(&b->uv); break;
    case 2: b->ev = ev_loop_new(EVFLAG_AUTO), b->lp = flash_libev_loop(b->ev); break;
    default: b->base = event_base_new(), b->lp = flash_libevent_loop(b->base); break;
#else
    case 1: uv_loop_init(&b->uv), flash_libuv_init(&b->a_uv, &b->uv, NULL), b->lp = flash_libuv_loop(&b->a_uv); break;
    case 2: b->ev = ev_loop_new(EVFLAG_AUTO), flash_libev_init(&b->a_ev, b->ev, NULL), b->lp = flash_libev_loop(&b->a_ev); break;
    default: b->base = event_base_new(), flash_libevent_init(&b->a_le, b->base, NULL), b->lp = flash_libevent_loop(&b->a_le); break;
#endif
    }
}

static void close_loop(bench_loop *b, int which) {
    switch (which) {
    case 0: flash_poll_destroy(b->poll); break;
#ifdef LOOP_BENCH_OLD_API
    case 1: flash_libuv_release(&b->uv), uv_run(&b->uv, UV_RUN_DEFAULT), uv_loop_close(&b->uv); break;
    case 2: ev_loop_destroy(b->ev); break;
    default: flash_libevent_release(b->base), event_base_free(b->base); break;
#else
    case 1: flash_libuv_close(&b->a_uv), uv_run(&b->uv, UV_RUN_DEFAULT), uv_loop_close(&b->uv); break;
    case 2: flash_libev_close(&b->a_ev), ev_loop_destroy(b->ev); break;
    default: flash_libevent_close(&b->a_le), event_base_free(b->base); break;
#endif
    }
}

static size_t calls;
static void count(void *arg) { (void)arg, calls++; }

/* The measured loop (callgrind: --toggle-collect=measure). */
__attribute__((noinline)) void measure(flash_loop lp, int what, size_t n);
__attribute__((noinline)) void measure(flash_loop lp, int what, size_t n) {
#ifndef LOOP_BENCH_OLD_API
    static flash_defer nodes[BATCH];
#endif
    const flash_loop_vtable *vt = lp.vt;
    for (size_t done = 0; done < n; done += BATCH) {
        for (size_t i = 0; i < BATCH; i++) {
            if (what == 0) vt->defer(lp.native, count, NULL);
            else if (what == 1) POST(lp, &nodes[i]);
            else vt->cancel(lp.native, vt->timer(lp.native, 1000, count, NULL));
        }
        vt->run_once(lp.native, false);
    }
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void run(int which, int what, size_t n) {
    bench_loop b;
    double best = 0;
    open_loop(&b, which);
    if (what == 1 && !HAS_POST(b.lp)) {
        printf("%-9s %-6s  (no post)\n", adapters[which], measures[what]);
        close_loop(&b, which);
        return;
    }
    measure(b.lp, what, n < 4 * BATCH ? n : 4 * BATCH); /* warm: pools filled */
    for (int rep = 0; rep < 5; rep++) { /* the best of 5 */
        double t0 = now_ns(), ns;
        measure(b.lp, what, n);
        ns = (now_ns() - t0) / (double)n;
        if (rep == 0 || ns < best) best = ns;
    }
    printf("%-9s %-6s %8.1f ns/op\n", adapters[which], measures[what], best);
    close_loop(&b, which);
}

static int find(const char *const *names, int count_, const char *s) {
    for (int i = 0; i < count_; i++)
        if (strcmp(names[i], s) == 0) return i;
    fprintf(stderr, "loop_bench: unknown '%s'\n", s);
    exit(2);
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 1000000;
    if (n < BATCH) n = BATCH;
    n -= n % BATCH;
    if (argc > 3) {
        int which = find(adapters, 4, argv[2]), what = find(measures, 3, argv[3]);
        bench_loop b;
        open_loop(&b, which);
        if (what == 1 && !HAS_POST(b.lp)) return 2;
        measure(b.lp, what, n);
        close_loop(&b, which);
        return 0;
    }
    printf("loop adapters, %zu operations per measure, best of 5\n", n);
    for (int which = 0; which < 4; which++)
        for (int what = 0; what < 3; what++) run(which, what, n);
    return calls ? 0 : 1;
}
