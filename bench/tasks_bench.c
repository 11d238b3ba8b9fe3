/* tasks_bench.c — what a task costs (flash_spawn / flash_await, layer 3b):

     spawn      ns per empty flash_spawn + finish (the task returns at once;
                its promise fulfils): 10 x 10,000 spawns per repetition, a
                flash_ctx_reset (untimed) between the groups of 10,000
     await      ns per await/resume pair: one task awaits a fresh pending
                promise 100,000 times; the caller resolves it and runs
                flash_drain, which resumes the task up to its next await
     resolvers  ns per load: 1,000 tasks each doing 3 sequential loads
                (flash_await(flash_load(...)) three times) on one loader
                whose batch function resolves every key to itself; a whole
                request per repetition: flash_run = reset + loader + 1,000
                spawns + gather, driven to the end (3 batches of 1,000 keys).
                resolvers_bench.js does the same with async functions and
                graphql's dataloader on node
     rss_10k    RSS growth (/proc/self/statm) for 10,000 tasks suspended at
                once on a pending promise, in a fresh context (stacks mapped
                and touched for the first time); printed once

     await_cb, resolvers_cb
                the same work without tasks (a callback per promise; each
                resolver a chain of flash_then): what the tasks add

   usage: tasks_bench [reps]   prints "<scenario> <ns>" reps times per timed
                               scenario after a warm-up (20 for the resolvers), "rss_10k <bytes>"
                               and "check resolvers ..." (compared with
                               node's) */
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef FLASH__TASK_SWITCH_NAME /* the implementation's name for its switch */
#define TASK_SWITCH FLASH__TASK_SWITCH_NAME
#else
#define TASK_SWITCH "?"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define BENCH_NOINLINE __attribute__((noinline)) /* a symbol for callgrind --toggle-collect */
#else
#define BENCH_NOINLINE
#endif

enum { SPAWN_GROUP = 10000, SPAWN_GROUPS = 10, AWAITS = 100000, TASKS = 1000, LOADS = 3, SUSPENDED = 10000, WARMUP = 20 };

static flash_ctx *ctx;

static void die(const char *what, int rc) {
    fprintf(stderr, "tasks_bench: %s: %s\n", what, rc ? flash_strerror(rc) : "failed");
    exit(1);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* ---- spawn ---- */

static int empty_task(flash_ctx *c, void *arg, void **result) {
    (void)c;
    *result = arg;
    return 0;
}

BENCH_NOINLINE static double bench_spawn(void) {
    double total = 0;
    for (int g = 0; g < SPAWN_GROUPS; g++) {
        flash_promise *last = NULL;
        flash_ctx_reset(ctx);
        double t0 = now_ns();
        for (int i = 0; i < SPAWN_GROUP; i++) last = flash_spawn(ctx, empty_task, NULL);
        total += now_ns() - t0;
        if (!last || flash_promise_state(last) != FLASH_FULFILLED) die("spawn", flash_promise_error(last));
    }
    return total / (SPAWN_GROUP * SPAWN_GROUPS);
}

/* ---- await/resume ---- */

static flash_promise *pending;
static int awaiter(flash_ctx *c, void *arg, void **result) {
    uintptr_t sum = 0;
    (void)arg;
    for (int i = 0; i < AWAITS; i++) {
        void *v;
        int rc;
        if ((pending = flash_promise_new(c)) == NULL) return FLASH_ENOMEM;
        if ((rc = flash_await(c, pending, &v)) != 0) return rc;
        sum += (uintptr_t)v;
    }
    pending = NULL;
    *result = (void *)sum;
    return 0;
}

BENCH_NOINLINE static double bench_await(void) {
    flash_ctx_reset(ctx);
    flash_promise *t = flash_spawn(ctx, awaiter, NULL); /* runs to its first await */
    double t0 = now_ns();
    while (pending) {
        flash_resolve(ctx, pending, (void *)(uintptr_t)1);
        flash_drain(ctx); /* resumes the task: it makes the next promise and awaits it */
    }
    double dt = now_ns() - t0;
    if (flash_promise_state(t) != FLASH_FULFILLED || (uintptr_t)flash_promise_value(t) != AWAITS)
        die("await", flash_promise_error(t));
    return dt / AWAITS;
}

/* The same without a task (the reference for the switch's share): a
   callback on a fresh pending promise, resolve, flash_drain. */
static unsigned long settled;
static void on_settled(flash_ctx *c, flash_promise *p, void *arg) {
    (void)c;
    (void)arg;
    settled += (uintptr_t)flash_promise_value(p);
}
BENCH_NOINLINE static double bench_await_cb(void) {
    flash_ctx_reset(ctx);
    settled = 0;
    double t0 = now_ns();
    for (int i = 0; i < AWAITS; i++) {
        flash_promise *p = flash_promise_new(ctx);
        if (!p || flash_on_settle(ctx, p, on_settled, NULL) != 0) die("await_cb", FLASH_ENOMEM);
        flash_resolve(ctx, p, (void *)(uintptr_t)1);
        flash_drain(ctx);
    }
    double dt = now_ns() - t0;
    if (settled != AWAITS) die("await_cb: callbacks missing", 0);
    return dt / AWAITS;
}

/* ---- resolvers: 1,000 tasks x 3 sequential loads ---- */

static char keybuf[TASKS * LOADS][16];
static size_t keylen[TASKS * LOADS];
static const char *results[TASKS * LOADS];
static int task_index[TASKS];
static unsigned long batch_calls, batch_keys;

static void batch_fn(flash_ctx *c, flash_batch *b, void *ud) {
    size_t n = flash_batch_size(b);
    (void)c;
    (void)ud;
    batch_calls++;
    batch_keys += n;
    for (size_t i = 0; i < n; i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}
static const flash_loader_desc ldesc = {.name = "bench", .batch = batch_fn};

/* One resolver: three loads, each after the previous one answered. */
static int resolver(flash_ctx *c, void *arg, void **result) {
    int i = *(const int *)arg;
    flash_loader *l = flash_loader_for(c, &ldesc);
    for (int k = 0; k < LOADS; k++) {
        void *v;
        int j = i * LOADS + k, rc;
        if ((rc = flash_await(c, flash_load(l, keybuf[j], keylen[j]), &v)) != 0) return rc;
        results[j] = (const char *)v;
    }
    *result = NULL;
    return 0;
}

static flash_promise *resolvers_request(flash_ctx *c, void *arg) {
    static flash_promise *ps[TASKS];
    (void)arg;
    for (int i = 0; i < TASKS; i++) ps[i] = flash_spawn(c, resolver, &task_index[i]);
    return flash_gather(c, TASKS, ps);
}

BENCH_NOINLINE static double bench_resolvers(void) {
    void *v;
    int rc;
    batch_calls = batch_keys = 0;
    memset(results, 0, sizeof results);
    double t0 = now_ns();
    rc = flash_run(ctx, resolvers_request, NULL, &v);
    double dt = now_ns() - t0;
    if (rc) die("resolvers", rc);
    return dt / (TASKS * LOADS);
}

/* The same 3,000 loads in 3 ticks with callbacks instead of tasks: each
   resolver a chain of flash_then (the reference for the tasks' share). */
static int load_index[TASKS * LOADS];
static flash_promise *next_load(flash_ctx *c, void *value, void *arg) {
    int j = *(const int *)arg;
    results[j] = (const char *)value;
    if (j % LOADS == LOADS - 1) return flash_fulfilled(c, NULL);
    flash_loader *l = flash_loader_for(c, &ldesc);
    return flash_then(c, flash_load(l, keybuf[j + 1], keylen[j + 1]), next_load, &load_index[j + 1]);
}
static flash_promise *resolvers_cb_request(flash_ctx *c, void *arg) {
    static flash_promise *ps[TASKS];
    flash_loader *l = flash_loader_for(c, &ldesc);
    (void)arg;
    for (int i = 0; i < TASKS; i++) {
        int j = i * LOADS;
        ps[i] = flash_then(c, flash_load(l, keybuf[j], keylen[j]), next_load, &load_index[j]);
    }
    return flash_gather(c, TASKS, ps);
}
BENCH_NOINLINE static double bench_resolvers_cb(void) {
    void *v;
    int rc;
    batch_calls = batch_keys = 0;
    memset(results, 0, sizeof results);
    double t0 = now_ns();
    rc = flash_run(ctx, resolvers_cb_request, NULL, &v);
    double dt = now_ns() - t0;
    if (rc) die("resolvers_cb", rc);
    return dt / (TASKS * LOADS);
}

/* FNV-1a over the results (each key's string and a 0 byte), as node's. */
static unsigned check_hash(void) {
    uint32_t h = 2166136261u;
    for (int j = 0; j < TASKS * LOADS; j++) {
        const char *r = results[j];
        if (!r || strcmp(r, keybuf[j]) != 0) die("resolvers: a result is not its key", 0);
        for (size_t c = 0; c <= strlen(r); c++) {
            h ^= (unsigned char)r[c];
            h *= 16777619u;
        }
    }
    return h;
}

/* ---- RSS of suspended tasks ---- */

static long rss_bytes(void) {
    long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * sysconf(_SC_PAGESIZE);
}

static int sleeper(flash_ctx *c, void *arg, void **result) {
    (void)result;
    return flash_await(c, (flash_promise *)arg, NULL); /* FLASH_ECANCELED at the reset */
}

static long bench_rss(void) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.max_tasks = SUSPENDED;
    flash_ctx *c = flash_ctx_create(&d);
    if (!c) die("rss: context", 0);
    flash_promise *never = flash_promise_new(c);
    long before = rss_bytes();
    for (int i = 0; i < SUSPENDED; i++) {
        flash_promise *p = flash_spawn(c, sleeper, never);
        if (!p || flash_promise_state(p) != FLASH_PENDING) die("rss: spawn", flash_promise_error(p));
    }
    long after = rss_bytes();
    flash_stats s = flash_ctx_stats(c);
    if (s.task_stacks < SUSPENDED) die("rss: fewer stacks than tasks", 0);
    flash_ctx_destroy(c); /* cancels them: each returns FLASH_ECANCELED */
    return before < 0 || after < 0 ? -1 : after - before;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 11;
    if (reps < 1) {
        fprintf(stderr, "usage: tasks_bench [reps]\n");
        return 2;
    }
    for (int j = 0; j < TASKS * LOADS; j++) keylen[j] = (size_t)snprintf(keybuf[j], sizeof keybuf[j], "k%d", j);
    for (int i = 0; i < TASKS; i++) task_index[i] = i;
    for (int j = 0; j < TASKS * LOADS; j++) load_index[j] = j;

    flash_desc d;
    memset(&d, 0, sizeof d);
    d.arena_retain = (size_t)64 << 20; /* steady state: no malloc per request */
    if ((ctx = flash_ctx_create(&d)) == NULL) die("context", 0);

    printf("# flash %d.%d.%d tasks (%s switch) task_stack=%u spawns=%d awaits=%d resolvers=%dx%d\n",
           FLASH_VERSION_MAJOR, FLASH_VERSION_MINOR, FLASH_VERSION_PATCH, TASK_SWITCH,
           flash_ctx_desc(ctx)->task_stack, SPAWN_GROUP * SPAWN_GROUPS, AWAITS, TASKS, LOADS);
    for (int r = -1; r < reps; r++) {
        double ns = bench_spawn();
        if (r >= 0) printf("spawn %.2f\n", ns);
    }
    for (int r = -1; r < reps; r++) {
        double ns = bench_await();
        if (r >= 0) printf("await %.2f\n", ns);
    }
    for (int r = -1; r < reps; r++) {
        double ns = bench_await_cb();
        if (r >= 0) printf("await_cb %.2f\n", ns);
    }
    unsigned h = 0, hcb = 0;
    for (int r = -WARMUP; r < reps; r++) {
        double ns = bench_resolvers();
        h = check_hash();
        if (r >= 0) printf("resolvers %.2f\n", ns);
    }
    for (int r = -WARMUP; r < reps; r++) {
        double ns = bench_resolvers_cb();
        hcb = check_hash();
        if (r >= 0) printf("resolvers_cb %.2f\n", ns);
    }
    if (hcb != h) die("resolvers_cb computed other results than resolvers", 0);
    printf("check resolvers loads=%d batches=%lu batch_keys=%lu hash=%08x\n", TASKS * LOADS, batch_calls, batch_keys, h);
    printf("rss_10k %ld\n", bench_rss());
    flash_ctx_destroy(ctx);
    return 0;
}
