/* memory_bench.c — flash's memory per memo entry and across resets.

   memo    1M distinct loads in one context (one loader, one batch that
           resolves every key, then one gather over all of them):
           peak RSS (VmHWM), RSS delta per entry, and the exact bytes flash
           asked its allocator for (a counting flash_allocator) per entry.
   cycles  100k flash_run cycles (reset + a few loads + gather each; every
           100th cycle a bigger request of 2,000 loads so arena blocks past
           the retain budget are freed and re-made): RSS and allocator bytes
           after the first 1k cycles and after all 100k. Fails (exit 1) when
           RSS grew by more than max(1 MiB, 10%) or the allocator's live bytes
           grew by more than 64 KiB: either is a leak.

   Each part runs in a forked child so that one's heap does not colour the
   other's RSS. Output: "memory <name> <value> [# note]" lines, and
   "memory FAIL ..." on failure.

   usage: memory_bench [memo|cycles]   (default both) */
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum { MEMO_N = 1000000, CYCLES = 100000, CYCLES_EARLY = 1000, SMALL_LOADS = 8, BIG_LOADS = 2000 };

/* ---- counting allocator ---------------------------------------------- */

static size_t live_bytes, peak_bytes, n_allocs;

static void *count_alloc(size_t n, void *ud) {
    size_t *p = (size_t *)malloc(n + 16); /* 16: keeps the 16-byte alignment */
    (void)ud;
    if (!p) return NULL;
    p[0] = n;
    live_bytes += n;
    if (live_bytes > peak_bytes) peak_bytes = live_bytes;
    n_allocs++;
    return (char *)p + 16;
}

static void count_free(void *ptr, void *ud) {
    size_t *p;
    (void)ud;
    if (!ptr) return;
    p = (size_t *)((char *)ptr - 16);
    live_bytes -= p[0];
    free(p);
}

/* ---- /proc/self/status ------------------------------------------------- */

static long status_kib(const char *field) {
    char line[256];
    size_t n = strlen(field);
    long v = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, field, n) == 0 && line[n] == ':') {
            v = strtol(line + n + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

static long rss_kib(void) {
    long v = status_kib("VmRSS");
    if (v < 0) { /* no procfs: getrusage's peak is the best we have */
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        v = ru.ru_maxrss;
    }
    return v;
}

static long peak_rss_kib(void) {
    long v = status_kib("VmHWM");
    if (v < 0) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        v = ru.ru_maxrss;
    }
    return v;
}

static flash_ctx *make_ctx(size_t retain) {
    flash_desc d;
    flash_ctx *ctx;
    memset(&d, 0, sizeof d);
    d.arena_retain = retain;
    d.allocator.alloc = count_alloc;
    d.allocator.free = count_free;
    ctx = flash_ctx_create(&d);
    if (!ctx) {
        fprintf(stderr, "memory_bench: flash_ctx_create failed\n");
        exit(1);
    }
    return ctx;
}

static void batch_fn(flash_ctx *c, flash_batch *b, void *ud) {
    size_t i, n = flash_batch_size(b);
    (void)c;
    (void)ud;
    for (i = 0; i < n; i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}

/* ---- memo: 1M entries in one context --------------------------------- */

static int part_memo(void) {
    flash_loader_desc ld;
    flash_ctx *ctx;
    flash_loader *l;
    flash_promise **ps;
    flash_stats st;
    void *v = NULL;
    long rss0, rss1, rss2;
    size_t live0, live1, live2, i;
    int rc;

    ps = (flash_promise **)malloc(MEMO_N * sizeof *ps);
    if (!ps) return 1;
    memset(ps, 0, MEMO_N * sizeof *ps); /* touched: not part of the delta */
    ctx = make_ctx(0);
    memset(&ld, 0, sizeof ld);
    ld.batch = batch_fn;
    l = flash_loader_create(ctx, &ld);
    rss0 = rss_kib();
    live0 = live_bytes;

    for (i = 0; i < MEMO_N; i++) {
        char key[32];
        int n = snprintf(key, sizeof key, "k%zu", i);
        ps[i] = flash_load(l, key, (size_t)n);
    }
    flash_drain(ctx); /* dispatch: the batch function resolves every key */
    rss1 = rss_kib();
    live1 = live_bytes;
    st = flash_ctx_stats(ctx);
    if (st.batches != 1 || st.batch_keys != MEMO_N || flash_promise_state(ps[MEMO_N - 1]) != FLASH_FULFILLED) {
        fprintf(stderr, "memory_bench: memo: loads did not resolve\n");
        return 1;
    }

    rc = flash_wait(ctx, flash_gather(ctx, MEMO_N, ps), &v);
    if (rc) {
        fprintf(stderr, "memory_bench: memo: gather: %s\n", flash_strerror(rc));
        return 1;
    }
    rss2 = rss_kib();
    live2 = live_bytes;

    printf("memory memo_entries %d  # distinct loads in one context, one loader\n", MEMO_N);
    printf("memory memo_alloc_bytes_per_entry %.1f  # flash's allocations: arena (entry + key) + memo table + batch key list\n",
           (double)(live1 - live0) / MEMO_N);
    printf("memory memo_rss_bytes_per_entry %.1f  # VmRSS delta / entries\n", (double)(rss1 - rss0) * 1024.0 / MEMO_N);
    printf("memory gather_alloc_bytes_per_load %.1f  # then one gather over the 1M resolved promises\n",
           (double)(live2 - live1) / MEMO_N);
    printf("memory gather_rss_bytes_per_load %.1f\n", (double)(rss2 - rss1) * 1024.0 / MEMO_N);
    printf("memory memo_alloc_peak_bytes_per_entry %.1f  # allocator peak (includes memo tables outgrown on the way)\n",
           (double)(peak_bytes - live0) / MEMO_N);
    printf("memory memo_peak_rss_kib %ld  # VmHWM, whole process (includes the 8 MB promise array)\n", peak_rss_kib());
    flash_ctx_destroy(ctx);
    free(ps);
    if (live_bytes != 0) {
        printf("memory FAIL memo: %zu bytes still allocated after flash_ctx_destroy\n", live_bytes);
        return 1;
    }
    return 0;
}

/* ---- cycles: 100k flash_run ------------------------------------------ */

static flash_loader_desc cycle_loader;

static flash_promise *one_request(flash_ctx *ctx, void *arg) {
    size_t cycle = *(size_t *)arg, n = cycle % 100 == 99 ? BIG_LOADS : SMALL_LOADS, i;
    flash_loader *l = flash_loader_for(ctx, &cycle_loader);
    flash_promise **ps = (flash_promise **)flash_alloc(ctx, (n + 1) * sizeof *ps);
    if (!l || !ps) return NULL;
    for (i = 0; i < n; i++) {
        char key[48];
        int len = snprintf(key, sizeof key, "c%zu-%zu", cycle, i);
        ps[i] = flash_load(l, key, (size_t)len);
    }
    ps[n] = flash_load(l, "c-dup-0", 7); /* a duplicate inside the request */
    ps[0] = flash_load(l, "c-dup-0", 7);
    return flash_gather(ctx, n + 1, ps);
}

static int part_cycles(void) {
    flash_ctx *ctx = make_ctx(0); /* default arena_retain */
    long rss_early = 0, rss_end, grow_kib, tol_kib;
    size_t live_early = 0, live_end, cycle;
    int failed = 0;
    memset(&cycle_loader, 0, sizeof cycle_loader);
    cycle_loader.batch = batch_fn;
    for (cycle = 0; cycle < CYCLES; cycle++) {
        void *v = NULL;
        int rc = flash_run(ctx, one_request, &cycle, &v);
        if (rc || !v) {
            fprintf(stderr, "memory_bench: cycles: run %zu: %s\n", cycle, flash_strerror(rc));
            return 1;
        }
        if (cycle + 1 == CYCLES_EARLY) {
            rss_early = rss_kib();
            live_early = live_bytes;
        }
    }
    rss_end = rss_kib();
    live_end = live_bytes;
    grow_kib = rss_end - rss_early;
    tol_kib = rss_early / 10 > 1024 ? rss_early / 10 : 1024;
    printf("memory cycles %d  # flash_run: reset + %d loads (%d every 100th) + 1 duplicate + gather; arena_retain=%zu\n",
           CYCLES, SMALL_LOADS, BIG_LOADS, flash_ctx_desc(ctx)->arena_retain);
    printf("memory cycles_rss_kib_after_1k %ld\n", rss_early);
    printf("memory cycles_rss_kib_after_100k %ld\n", rss_end);
    printf("memory cycles_rss_ratio %.3f  # after 100k / after 1k; tolerance +%ld KiB\n",
           rss_early > 0 ? (double)rss_end / (double)rss_early : 0.0, tol_kib);
    printf("memory cycles_alloc_bytes_after_1k %zu\n", live_early);
    printf("memory cycles_alloc_bytes_after_100k %zu\n", live_end);
    if (grow_kib > tol_kib) {
        printf("memory FAIL cycles: RSS grew by %ld KiB (> %ld KiB)\n", grow_kib, tol_kib);
        failed = 1;
    }
    if (live_end > live_early + 64 * 1024) {
        printf("memory FAIL cycles: allocator live bytes grew by %zu\n", live_end - live_early);
        failed = 1;
    }
    flash_ctx_destroy(ctx);
    if (live_bytes != 0) {
        printf("memory FAIL cycles: %zu bytes still allocated after flash_ctx_destroy\n", live_bytes);
        failed = 1;
    }
    return failed;
}

static int in_child(int (*part)(void)) {
    pid_t pid;
    int status;
    fflush(stdout);
    pid = fork();
    if (pid < 0) return part(); /* no fork: run here */
    if (pid == 0) {
        int rc = part();
        fflush(stdout);
        _exit(rc);
    }
    if (waitpid(pid, &status, 0) != pid) return 1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int main(int argc, char **argv) {
    int rc = 0;
    const char *only = argc > 1 ? argv[1] : NULL;
    if (!only || strcmp(only, "memo") == 0) rc |= in_child(part_memo);
    if (!only || strcmp(only, "cycles") == 0) rc |= in_child(part_cycles);
    return rc;
}
