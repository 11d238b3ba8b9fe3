/* loader_bench.c — flash's loader + promise overhead, the same work per
   scenario as dataloader_bench.js (graphql's dataloader on node) and
   aiodataloader_bench.py:

     distinct  100k distinct keys loaded in one tick, one gather, one wait
     dup50     100k loads of 50k keys (each twice, shuffled), one gather
     ticks     1,000 ticks of 100 distinct loads; each tick is a gather that
               is flash_wait-ed before the next tick starts (one context,
               one loader for all ticks: the memo grows to 100k keys)
     memo      100k memo hits: the 100k keys of a resolved first pass loaded
               again from the same loader, one gather, one wait (only the
               second pass is timed)

     many/<scenario>   the same four with flash_load_many (the loads and
               their gather in one call: each load joins the gather as it
               is made) instead of n x flash_load + flash_gather; the same
               loads, batches and results (its check lines match the
               peers' once "many/" is taken off)

   Keys are the strings "k<i>"; the batch function resolves each key with
   the key itself (flash: the pointer to the loader's copy of the key; the
   peers: the key string). distinct, dup50 and ticks time a whole request:
   flash_ctx_reset + flash_loader_create + loads + gather + wait (the peers:
   new DataLoader + loads + Promise.all/gather + await).

   usage: loader_bench [reps]          prints "<scenario> <ns_per_load>" reps
                                       times per scenario after one warm-up,
                                       and one "check ..." line per scenario
          loader_bench --callgrind S   one warm-up of scenario S (or many/S), then one
                                       run inside cg_measure() (for
                                       valgrind --toggle-collect='cg_measure*'; GCC may clone it)
          loader_bench --scale [reps]  the scale sweep: one request of n
                                       distinct loads (reset + loader + n
                                       loads + gather + wait, like distinct)
                                       for n = 10, 100, ..., 1,000,000;
                                       each sample repeats the request until
                                       it made at least 1M loads; prints
                                       "scale/<n> <ns_per_load>" reps times
                                       per n after a warm-up, and one
                                       "check scale/<n> ..." line per n
          loader_bench --callgrind scale/<n>   one request of n loads after a
                                       warm-up, inside cg_measure()
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#define BENCH_NOINLINE __attribute__((noinline))
#else
#define BENCH_NOINLINE
#endif

enum { N = 100000, DUP_UNIQUE = 50000, TICKS = 1000, PER_TICK = 100 };

/* Everything a run allocates fits the retained arena, so steady-state
   requests reuse memory instead of calling malloc (the documented knob). */
#define ARENA_RETAIN ((size_t)64 << 20)

static const char *keys[N];
static size_t lens[N];
/* FNV-1a over a result string and its NUL: the check lines the peers print too. */
static uint32_t fnv_fold(uint32_t h, const char *c) {
    for (;; c++) {
        h ^= (unsigned char)*c;
        h *= 16777619u;
        if (!*c) return h;
    }
}

static uint32_t dup_seq[N];
static const char *dup_keys[N]; /* keys[dup_seq[i]], for flash_load_many */
static size_t dup_lens[N];
static flash_promise *ps[N];
/* The gathers' value arrays (valid until the next reset): read after the
   clock stopped. */
static void **result_vec;
static void **tick_vecs[TICKS];
static flash_ctx *ctx;
static flash_loader_desc ldesc;
static unsigned long batch_calls, batch_keys;

static void die(const char *what, int rc) {
    fprintf(stderr, "loader_bench: %s: %s\n", what, rc ? flash_strerror(rc) : "failed");
    exit(1);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* The batch function: every key resolves to (its copy of) itself. */
static void batch_fn(flash_ctx *c, flash_batch *b, void *ud) {
    size_t i, n = flash_batch_size(b);
    (void)c;
    (void)ud;
    batch_calls++;
    batch_keys += n;
    for (i = 0; i < n; i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}

/* xorshift32, the same generator as the peers' scripts. */
static uint32_t rng_state = 2463534242u;
static uint32_t rng_next(void) {
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

static void make_keys(void) {
    static char buf[N * 8];
    size_t i, off = 0;
    for (i = 0; i < N; i++) {
        int n = snprintf(buf + off, sizeof buf - off, "k%zu", i);
        keys[i] = buf + off;
        lens[i] = (size_t)n;
        off += (size_t)n + 1;
    }
    /* 0..49999 twice, Fisher-Yates shuffled. */
    for (i = 0; i < N; i++) dup_seq[i] = (uint32_t)(i % DUP_UNIQUE);
    for (i = N - 1; i > 0; i--) {
        uint32_t j = rng_next() % (uint32_t)(i + 1), t = dup_seq[i];
        dup_seq[i] = dup_seq[j];
        dup_seq[j] = t;
    }
    for (i = 0; i < N; i++) {
        dup_keys[i] = keys[dup_seq[i]];
        dup_lens[i] = lens[dup_seq[i]];
    }
}

static void wait_gather(size_t n, flash_promise **p, void ***values) {
    void *v = NULL;
    int rc = flash_wait(ctx, flash_gather(ctx, n, p), &v);
    if (rc) die("gather", rc);
    *values = (void **)v;
}

/* ---- scenarios: each leaves its results in result_vec / tick_vecs ------ */

static void run_distinct(void) {
    flash_loader *l;
    size_t i;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    for (i = 0; i < N; i++) ps[i] = flash_load(l, keys[i], lens[i]);
    wait_gather(N, ps, &result_vec);
}

static void run_dup50(void) {
    flash_loader *l;
    size_t i;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    for (i = 0; i < N; i++) ps[i] = flash_load(l, keys[dup_seq[i]], lens[dup_seq[i]]);
    wait_gather(N, ps, &result_vec);
}

static void run_ticks(void) {
    flash_loader *l;
    size_t t, j;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    for (t = 0; t < TICKS; t++) {
        for (j = 0; j < PER_TICK; j++) ps[j] = flash_load(l, keys[t * PER_TICK + j], lens[t * PER_TICK + j]);
        wait_gather(PER_TICK, ps, &tick_vecs[t]);
    }
}

static flash_loader *memo_loader;
static void memo_setup(void) {
    void **v;
    size_t i;
    flash_ctx_reset(ctx);
    memo_loader = flash_loader_create(ctx, &ldesc);
    for (i = 0; i < N; i++) ps[i] = flash_load(memo_loader, keys[i], lens[i]);
    wait_gather(N, ps, &v);
}
static void run_memo(void) {
    size_t i;
    for (i = 0; i < N; i++) ps[i] = flash_load(memo_loader, keys[i], lens[i]);
    wait_gather(N, ps, &result_vec);
}

/* ---- the same with flash_load_many: loads and gather in one call ---------- */

static void wait_many(flash_loader *l, size_t n, const char *const *k, const size_t *len, void ***values) {
    void *v = NULL;
    int rc = flash_wait(ctx, flash_load_many(l, n, (const void *const *)k, len), &v);
    if (rc) die("load_many", rc);
    *values = (void **)v;
}

static void run_many_distinct(void) {
    flash_loader *l;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    wait_many(l, N, keys, lens, &result_vec);
}

static void run_many_dup50(void) {
    flash_loader *l;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    wait_many(l, N, dup_keys, dup_lens, &result_vec);
}

static void run_many_ticks(void) {
    flash_loader *l;
    size_t t;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    for (t = 0; t < TICKS; t++) wait_many(l, PER_TICK, keys + t * PER_TICK, lens + t * PER_TICK, &tick_vecs[t]);
}

static void run_many_memo(void) { wait_many(memo_loader, N, keys, lens, &result_vec); }

typedef struct scenario {
    const char *name;
    void (*setup)(void); /* untimed, before every run */
    void (*run)(void);
    const uint32_t *seq; /* key index of load i (NULL: i) */
} scenario;

static const scenario scenarios[] = {
    {"distinct", NULL, run_distinct, NULL},
    {"dup50", NULL, run_dup50, dup_seq},
    {"ticks", NULL, run_ticks, NULL},
    {"memo", memo_setup, run_memo, NULL},
    {"many/distinct", NULL, run_many_distinct, NULL},
    {"many/dup50", NULL, run_many_dup50, dup_seq},
    {"many/ticks", NULL, run_many_ticks, NULL},
    {"many/memo", memo_setup, run_many_memo, NULL},
};
#define NSCEN (sizeof scenarios / sizeof scenarios[0])

/* FNV-1a over the result strings, each followed by a 0 byte; a result
   that is not its own key fails the run. */
static uint32_t check_results(const scenario *s) {
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < N; i++) {
        size_t k = s->seq ? s->seq[i] : i;
        bool ticks = s->run == run_ticks || s->run == run_many_ticks;
        const char *r = (const char *)(ticks ? tick_vecs[i / PER_TICK][i % PER_TICK] : result_vec[i]);
        if (!r || strcmp(r, keys[k]) != 0) {
            fprintf(stderr, "loader_bench: %s: result %zu is not key %s\n", s->name, i, keys[k]);
            exit(1);
        }
        h = fnv_fold(h, r);
    }
    return h;
}

static BENCH_NOINLINE void cg_measure(const scenario *s) { s->run(); }

/* ---- the scale sweep: n distinct loads per request, n = 10 .. 1M ---------- */

enum { SCALE_MAX = 1000000, SCALE_MIN_LOADS = 1000000 };
#define SCALE_RETAIN ((size_t)512 << 20)
static const size_t scale_sizes[] = {10, 100, 1000, 10000, 100000, 1000000};
static const char **skeys;
static size_t *slens;
static flash_promise **sps;
static void **svals;

static void scale_keys(void) {
    static char *buf;
    size_t i, off = 0, cap = (size_t)SCALE_MAX * 9;
    if (skeys) return;
    buf = (char *)malloc(cap);
    skeys = (const char **)malloc(SCALE_MAX * sizeof *skeys);
    slens = (size_t *)malloc(SCALE_MAX * sizeof *slens);
    sps = (flash_promise **)malloc(SCALE_MAX * sizeof *sps);
    if (!buf || !skeys || !slens || !sps) die("malloc", 0);
    for (i = 0; i < SCALE_MAX; i++) {
        int n = snprintf(buf + off, cap - off, "k%zu", i);
        skeys[i] = buf + off;
        slens[i] = (size_t)n;
        off += (size_t)n + 1;
    }
}

/* One request of n distinct loads: the distinct scenario at size n. */
static void scale_request(size_t n) {
    flash_loader *l;
    size_t i;
    flash_ctx_reset(ctx);
    l = flash_loader_create(ctx, &ldesc);
    for (i = 0; i < n; i++) sps[i] = flash_load(l, skeys[i], slens[i]);
    wait_gather(n, sps, &svals);
}

static uint32_t scale_check(size_t n) {
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) {
        const char *r = (const char *)svals[i];
        if (!r || strcmp(r, skeys[i]) != 0) {
            fprintf(stderr, "loader_bench: scale/%zu: result %zu is not key %s\n", n, i, skeys[i]);
            exit(1);
        }
        h = fnv_fold(h, r);
    }
    return h;
}

static size_t cg_scale_n;
static BENCH_NOINLINE void cg_measure_scale(void) { scale_request(cg_scale_n); }

static int run_scale(int reps) {
    size_t si;
    int r;
    scale_keys();
    printf("# flash %d.%d.%d scale arena_retain=%zu min_loads_per_sample=%d reps=%d\n", FLASH_VERSION_MAJOR,
           FLASH_VERSION_MINOR, FLASH_VERSION_PATCH, flash_ctx_desc(ctx)->arena_retain, SCALE_MIN_LOADS, reps);
    for (si = 0; si < sizeof scale_sizes / sizeof scale_sizes[0]; si++) {
        size_t n = scale_sizes[si], k, per = (SCALE_MIN_LOADS + n - 1) / n;
        unsigned long calls = 0, bkeys = 0;
        for (r = -1; r < reps; r++) { /* r == -1: warm-up, not printed */
            double t0, t1;
            batch_calls = batch_keys = 0;
            t0 = now_ns();
            for (k = 0; k < per; k++) scale_request(n);
            t1 = now_ns();
            calls = batch_calls / per;
            bkeys = batch_keys / per;
            if (r >= 0) printf("scale/%zu %.2f\n", n, (t1 - t0) / (double)(per * n));
        }
        printf("check scale/%zu loads=%zu batches=%lu batch_keys=%lu hash=%08x\n", n, n, calls, bkeys,
               (unsigned)scale_check(n));
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv) {
    flash_desc desc;
    int reps = 11, r;
    size_t si;
    const char *only = NULL;
    bool scale = false;
    if (argc > 2 && strcmp(argv[1], "--callgrind") == 0) {
        only = argv[2];
    } else if (argc > 1 && strcmp(argv[1], "--scale") == 0) {
        scale = true;
        if (argc > 2 && (reps = atoi(argv[2])) < 1) {
            fprintf(stderr, "usage: loader_bench --scale [reps]\n");
            return 2;
        }
    } else if (argc > 1) {
        reps = atoi(argv[1]);
        if (reps < 1) {
            fprintf(stderr, "usage: loader_bench [reps] | --callgrind [many/]distinct|dup50|ticks|memo\n");
            return 2;
        }
    }
    make_keys();
    memset(&desc, 0, sizeof desc);
    /* The sweep keeps up to 1M loads' memory (entries, memo table) across
       requests, so that each size measures a steady state, not page faults. */
    desc.arena_retain = (scale || (only && strncmp(only, "scale/", 6) == 0)) ? SCALE_RETAIN : ARENA_RETAIN;
    ctx = flash_ctx_create(&desc);
    if (!ctx) die("flash_ctx_create", FLASH_ENOMEM);
    memset(&ldesc, 0, sizeof ldesc);
    ldesc.name = "bench";
    ldesc.batch = batch_fn;

    if (scale) {
        r = run_scale(reps);
        flash_ctx_destroy(ctx);
        return r;
    }
    if (only && strncmp(only, "scale/", 6) == 0) {
        cg_scale_n = (size_t)strtoul(only + 6, NULL, 10);
        if (cg_scale_n < 1 || cg_scale_n > SCALE_MAX) {
            fprintf(stderr, "loader_bench: scale/N with 1 <= N <= %d\n", SCALE_MAX);
            return 2;
        }
        scale_keys();
        scale_request(cg_scale_n); /* warm-up: arena blocks and memo tables now retained */
        cg_measure_scale();
        scale_check(cg_scale_n);
        flash_ctx_destroy(ctx);
        return 0;
    }
    if (only) {
        for (si = 0; si < NSCEN; si++) {
            const scenario *s = &scenarios[si];
            if (strcmp(s->name, only) != 0) continue;
            if (s->setup) s->setup();
            s->run(); /* warm-up: arena blocks and memo tables now retained */
            if (s->setup) s->setup();
            cg_measure(s);
            check_results(s);
            flash_ctx_destroy(ctx);
            return 0;
        }
        fprintf(stderr, "loader_bench: no scenario %s\n", only);
        return 2;
    }

    printf("# flash %d.%d.%d arena_retain=%zu loads_per_scenario=%d reps=%d\n", FLASH_VERSION_MAJOR,
           FLASH_VERSION_MINOR, FLASH_VERSION_PATCH, flash_ctx_desc(ctx)->arena_retain, N, reps);
    for (si = 0; si < NSCEN; si++) {
        const scenario *s = &scenarios[si];
        unsigned long calls = 0, bkeys = 0;
        uint32_t h = 0;
        for (r = -1; r < reps; r++) { /* r == -1: warm-up, not printed */
            double t0, t1;
            if (s->setup) s->setup();
            batch_calls = batch_keys = 0;
            t0 = now_ns();
            s->run();
            t1 = now_ns();
            calls = batch_calls;
            bkeys = batch_keys;
            h = check_results(s);
            if (r >= 0) printf("%s %.2f\n", s->name, (t1 - t0) / N);
        }
        printf("check %s loads=%d batches=%lu batch_keys=%lu hash=%08x\n", s->name, N, calls, bkeys, (unsigned)h);
        fflush(stdout);
    }
    flash_ctx_destroy(ctx);
    return 0;
}
