/* Layer 3b: tasks (flash_spawn / flash_await), issue #12. A task runs at
   once until its first await, suspends only itself, and the loads of every
   task of a tick join one batch; reset and destroy cancel suspended tasks;
   stacks are guarded, pooled and capped; the FP control state is per task. */
#define _GNU_SOURCE
#include <errno.h>
#include <fenv.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

#include "harness.h"
#include "loops.h"
#include "models.h"

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int64_t)(intptr_t)(p))

TestSuite(tasks, .init = flash_test_watchdog);

/* ---- helpers ---------------------------------------------------------------- */

/* A plain loader: an int64 key k resolves to 2k; negative keys reject
   ENOTFOUND with the message "no <k>". */
static void double_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        int64_t k;
        memcpy(&k, flash_batch_key(b, i, NULL), sizeof k);
        if (k < 0) flash_batch_reject(b, i, FLASH_ENOTFOUND, flash_sprintf(ctx, "no %lld", (long long)k));
        else flash_batch_resolve(b, i, IV(2 * k));
    }
}
static const flash_loader_desc DOUBLE = {.name = "double", .batch = double_batch};

static flash_promise *load_i(flash_ctx *ctx, int64_t k) {
    return flash_load(flash_loader_for(ctx, &DOUBLE), &k, sizeof k);
}

static void *wait_ok(flash_ctx *ctx, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

static flash_desc desc_tasks(uint32_t max_tasks, uint32_t stack) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.max_tasks = max_tasks;
    d.task_stack = stack;
    return d;
}

/* ---- 1. semantics --------------------------------------------------------- */

static int side;
static int t_gate(flash_ctx *ctx, void *arg, void **result) {
    void *v = NULL;
    side = 1;
    int rc = flash_await(ctx, (flash_promise *)arg, &v);
    side = 2;
    if (rc) return rc;
    *result = IV(VI(v) + 1);
    return 0;
}

FLASH_TEST(tasks, spawn_runs_at_once_until_the_first_await_and_fulfils_with_the_result) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    side = 0;
    cr_assert_not(flash_in_task(ctx));
    flash_promise *p = flash_spawn(ctx, t_gate, gate);
    cr_assert_not_null(p);
    cr_assert_eq(side, 1, "the task ran before flash_spawn returned");
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    cr_assert_eq(flash_resolve(ctx, gate, IV(41)), 0);
    cr_assert_eq(side, 1, "resumed from the queue, never inside flash_resolve");
    cr_assert_eq(VI(wait_ok(ctx, p)), 42);
    cr_assert_eq(side, 2);
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.tasks, 1);
    cr_assert_eq(s.task_switches, 2, "spawn and one resume");
    cr_assert_geq(s.task_stacks, 1);
    flash_ctx_destroy(ctx);
}

static int t_return(flash_ctx *ctx, void *arg, void **result) {
    (void)ctx;
    *result = IV(7);
    return (int)(intptr_t)arg;
}

FLASH_TEST(tasks, return_code_propagates_and_a_task_without_await_settles_before_spawn_returns) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ok = flash_spawn(ctx, t_return, IV(0));
    cr_assert_eq(flash_promise_state(ok), FLASH_FULFILLED);
    cr_assert_eq(VI(flash_promise_value(ok)), 7);
    flash_promise *bad = flash_spawn(ctx, t_return, IV(FLASH_ESOURCE));
    cr_assert_eq(flash_promise_state(bad), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(bad), FLASH_ESOURCE);
    cr_assert_str_eq(flash_promise_message(bad), flash_strerror(FLASH_ESOURCE));
    cr_assert_null(flash_promise_value(bad), "a rejected task has no value even though *result was set");
    cr_assert_eq(flash_wait(ctx, bad, NULL), FLASH_ESOURCE);
    cr_assert_eq(flash_ctx_stats(ctx).tasks, 2);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, null_function_and_null_promise_are_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_spawn(ctx, NULL, NULL);
    cr_assert_not_null(p);
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(p), FLASH_EINVAL);
    cr_assert_null(flash_spawn(NULL, t_return, NULL));
    void *v = IV(1);
    cr_assert_eq(flash_await(ctx, NULL, &v), FLASH_EINVAL);
    cr_assert_null(v, "the value is cleared");
    cr_assert_eq(flash_await(NULL, flash_fulfilled(ctx, IV(1)), NULL), FLASH_EINVAL);
    cr_assert_eq(flash_ctx_stats(ctx).tasks, 0);
    flash_ctx_destroy(ctx);
}

static int t_null_await(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    (void)result;
    return flash_await(ctx, NULL, NULL);
}

FLASH_TEST(tasks, await_null_inside_a_task_is_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_spawn(ctx, t_null_await, NULL);
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(p), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

static uint64_t switches_before, switches_after;
static int t_settled(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    void *v = NULL;
    switches_before = flash_ctx_stats(ctx).task_switches;
    int rc = flash_await(ctx, flash_fulfilled(ctx, IV(5)), &v);
    if (rc) return rc;
    rc = flash_await(ctx, flash_rejected(ctx, FLASH_ETIMEDOUT, "slow"), NULL);
    cr_assert_eq(rc, FLASH_ETIMEDOUT);
    switches_after = flash_ctx_stats(ctx).task_switches;
    *result = v;
    return 0;
}

FLASH_TEST(tasks, awaiting_a_settled_promise_does_not_suspend) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_spawn(ctx, t_settled, NULL);
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED, "the task ran to its end inside flash_spawn");
    cr_assert_eq(VI(flash_promise_value(p)), 5);
    cr_assert_eq(switches_after, switches_before, "no switch for a settled promise");
    cr_assert_eq(flash_ctx_stats(ctx).task_switches, 1, "the spawn only");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, outside_a_task_await_is_wait) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v = NULL;
    cr_assert_eq(flash_await(ctx, load_i(ctx, 21), &v), 0);
    cr_assert_eq(VI(v), 42);
    cr_assert_eq(flash_await(ctx, load_i(ctx, -3), &v), FLASH_ENOTFOUND);
    cr_assert_eq(flash_await(ctx, flash_promise_new(ctx), &v), FLASH_EIDLE, "nothing can settle it: as flash_wait");
    flash_ctx_destroy(ctx);
}

/* A failed await's message becomes the task's when fn returns its code. */
static int t_msg(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    int rc = flash_await(ctx, load_i(ctx, -5), NULL);
    if (arg) return FLASH_ESOURCE; /* another code: the generic message */
    return rc;
}

FLASH_TEST(tasks, rejection_message_is_the_last_failed_awaits_when_the_code_is_its) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *a = flash_spawn(ctx, t_msg, NULL);
    flash_promise *b = flash_spawn(ctx, t_msg, IV(1));
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(a), "no -5");
    cr_assert_eq(flash_wait(ctx, b, NULL), FLASH_ESOURCE);
    cr_assert_str_eq(flash_promise_message(b), flash_strerror(FLASH_ESOURCE));
    flash_ctx_destroy(ctx);
}

/* ---- 2. batching across tasks (plain loader) ------------------------------ */

typedef struct job {
    int64_t id;
    int k, done, rc;
    int64_t sum;
} job;

static int t_loads(flash_ctx *ctx, void *arg, void **result) {
    job *j = (job *)arg;
    for (int s = 0; s < j->k; s++) {
        void *v = NULL;
        int rc = flash_await(ctx, load_i(ctx, j->id * 16 + s), &v);
        if (rc) return j->rc = rc;
        j->sum += VI(v);
        j->done++;
    }
    *result = IV(j->id);
    return 0;
}

FLASH_TEST(tasks, a_thousand_tasks_with_three_sequential_loads_make_three_batches) {
    enum { N = 1000, K = 3 };
    flash_ctx *ctx = flash_ctx_create(NULL);
    static job jobs[N];
    static flash_promise *ps[N];
    for (int i = 0; i < N; i++) {
        jobs[i] = (job){.id = i, .k = K};
        ps[i] = flash_spawn(ctx, t_loads, &jobs[i]);
        cr_assert_eq(flash_promise_state(ps[i]), FLASH_PENDING);
    }
    cr_assert_eq(flash_ctx_stats(ctx).batches, 0, "dispatched at the end of the tick");
    void **vals = wait_ok(ctx, flash_gather(ctx, N, ps));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(VI(vals[i]), i);
        cr_assert_eq(jobs[i].done, K);
        cr_assert_eq(jobs[i].sum, 2 * (3 * i * 16 + 0 + 1 + 2));
    }
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.batches, K, "k batches, not N*k: got %llu", (unsigned long long)s.batches);
    cr_assert_eq(s.batch_keys, N * K);
    cr_assert_eq(s.tasks, N);
    cr_assert_eq(s.task_switches, N * (K + 1), "spawn plus one resume per load");
    flash_ctx_destroy(ctx);
}

/* ---- 3. tasks spawning and awaiting tasks; gather -------------------------- */

static int t_nested(flash_ctx *ctx, void *arg, void **result) {
    intptr_t depth = (intptr_t)arg;
    void *v = NULL;
    int rc;
    if (depth == 0) {
        rc = flash_await(ctx, load_i(ctx, 100), &v); /* 200 */
    } else {
        flash_promise *child = flash_spawn(ctx, t_nested, IV(depth - 1));
        rc = flash_await(ctx, child, &v);
        if (!rc) {
            void *w = NULL;
            rc = flash_await(ctx, load_i(ctx, depth), &w);
            v = IV(VI(v) + VI(w));
        }
    }
    if (rc) return rc;
    *result = v;
    return 0;
}

FLASH_TEST(tasks, tasks_spawn_and_await_tasks_several_levels_deep) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_spawn(ctx, t_nested, IV(6));
    cr_assert_eq(flash_ctx_stats(ctx).tasks, 7, "every level ran at once down to the leaf's await");
    /* leaf 200, then each level d adds 2d: 200 + 2(1+...+6) = 242 */
    cr_assert_eq(VI(wait_ok(ctx, p)), 242);
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.tasks, 7);
    cr_assert_eq(s.batches, 7, "one load per level, one level per tick");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, gather_and_gather_settled_over_task_promises) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    job jobs[10];
    flash_promise *ps[10];
    for (int i = 0; i < 10; i++) {
        jobs[i] = (job){.id = i, .k = 2};
        ps[i] = flash_spawn(ctx, t_loads, &jobs[i]);
    }
    void **vals = wait_ok(ctx, flash_gather(ctx, 10, ps));
    for (int i = 0; i < 10; i++) cr_assert_eq(VI(vals[i]), i);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 2);

    /* One task fails (a negative key rejects): gather rejects with its code
       and message, gather_settled reports each. */
    flash_ctx_reset(ctx);
    for (int i = 0; i < 10; i++) {
        jobs[i] = (job){.id = i == 3 ? -1 : i, .k = 2};
        ps[i] = flash_spawn(ctx, t_loads, &jobs[i]);
    }
    flash_promise *g = flash_gather(ctx, 10, ps);
    flash_settled *st = wait_ok(ctx, flash_gather_settled(ctx, 10, ps));
    for (int i = 0; i < 10; i++) {
        if (i == 3) {
            cr_assert_eq(st[i].state, FLASH_REJECTED);
            cr_assert_eq(st[i].error, FLASH_ENOTFOUND);
            cr_assert_str_eq(st[i].message, "no -16");
        } else {
            cr_assert_eq(st[i].state, FLASH_FULFILLED);
            cr_assert_eq(VI(st[i].value), i);
        }
    }
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(g), "no -16");
    flash_ctx_destroy(ctx);
}

/* ---- 4. 100,000 concurrent tasks --------------------------------------------- */

static int nfinished;
static int t_wait_gate(flash_ctx *ctx, void *arg, void **result) {
    void *v = NULL;
    int rc = flash_await(ctx, (flash_promise *)arg, &v);
    if (rc) return rc;
    nfinished++;
    *result = v;
    return 0;
}

FLASH_TEST(tasks, a_hundred_thousand_tasks_suspended_on_one_promise) {
    /* valgrind is ~50x slower: 10,000 there, to stay within the watchdog */
    const int N = RUNNING_ON_VALGRIND ? 10000 : 100000;
    flash_desc d = desc_tasks((uint32_t)N, 32 << 10);
    flash_ctx *ctx = flash_ctx_create(&d);
    flash_promise *gate = flash_promise_new(ctx);
    flash_promise **ps = malloc((size_t)N * sizeof *ps);
    cr_assert_not_null(ps);
    nfinished = 0;
    for (int i = 0; i < N; i++) {
        ps[i] = flash_spawn(ctx, t_wait_gate, gate);
        cr_assert_eq(flash_promise_state(ps[i]), FLASH_PENDING, "task %d: %s", i, flash_promise_message(ps[i]));
    }
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.tasks, N);
    cr_assert_geq(s.task_stacks, N);
    cr_assert_lt(s.task_stacks, N + 256, "slabs of at most 256");
    /* one over the cap */
    flash_promise *over = flash_spawn(ctx, t_wait_gate, gate);
    cr_assert_eq(flash_promise_error(over), FLASH_ENOMEM);
    cr_assert_eq(flash_resolve(ctx, gate, IV(9)), 0);
    void **vals = wait_ok(ctx, flash_gather(ctx, (size_t)N, ps));
    cr_assert_eq(nfinished, N);
    cr_assert_eq(VI(vals[0]), 9);
    cr_assert_eq(VI(vals[N - 1]), 9);
    s = flash_ctx_stats(ctx);
    cr_assert_eq(s.task_switches, 2 * (uint64_t)N);
    free(ps);
    flash_ctx_destroy(ctx);
}

/* ---- 5. the max_tasks cap -------------------------------------------------- */

FLASH_TEST(tasks, past_max_tasks_spawn_rejects_enomem_and_works_again_once_tasks_finish) {
    flash_desc d = desc_tasks(10, 0);
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert_eq(flash_ctx_desc(ctx)->max_tasks, 10);
    flash_promise *gate = flash_promise_new(ctx), *ps[10];
    nfinished = 0;
    for (int i = 0; i < 10; i++) ps[i] = flash_spawn(ctx, t_wait_gate, gate);
    flash_promise *over = flash_spawn(ctx, t_wait_gate, gate);
    cr_assert_eq(flash_promise_state(over), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(over), FLASH_ENOMEM);
    cr_assert(strstr(flash_promise_message(over), "max_tasks"), "%s", flash_promise_message(over));
    cr_assert_eq(flash_ctx_stats(ctx).tasks, 10, "the refused one is not counted");
    /* a task returning at once still counts against the cap while alive only */
    flash_resolve(ctx, gate, IV(1));
    wait_ok(ctx, flash_gather(ctx, 10, ps));
    cr_assert_eq(nfinished, 10);
    flash_promise *again = flash_spawn(ctx, t_return, IV(0));
    cr_assert_eq(flash_promise_state(again), FLASH_FULFILLED);
    flash_promise *gate2 = flash_promise_new(ctx);
    for (int i = 0; i < 10; i++) ps[i] = flash_spawn(ctx, t_wait_gate, gate2);
    for (int i = 0; i < 10; i++) cr_assert_eq(flash_promise_state(ps[i]), FLASH_PENDING);
    cr_assert_eq(flash_promise_error(flash_spawn(ctx, t_wait_gate, gate2)), FLASH_ENOMEM);
    flash_resolve(ctx, gate2, NULL);
    wait_ok(ctx, flash_gather(ctx, 10, ps));
    flash_ctx_destroy(ctx);
}

/* ---- 6. cancellation ------------------------------------------------------- */

static int n_first_cancel, n_second_cancel, n_spawn_cancel, n_returned;
static int t_cancellable(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    int rc = flash_await(ctx, (flash_promise *)arg, NULL);
    if (rc == FLASH_ECANCELED) n_first_cancel++;
    /* later awaits return at once, even of a pending promise */
    int rc2 = flash_await(ctx, flash_promise_new(ctx), NULL);
    if (rc2 == FLASH_ECANCELED) n_second_cancel++;
    flash_promise *child = flash_spawn(ctx, t_return, IV(0));
    if (child && flash_promise_state(child) == FLASH_REJECTED && flash_promise_error(child) == FLASH_ECANCELED)
        n_spawn_cancel++;
    n_returned++;
    return rc;
}

static void reset_counts(void) { n_first_cancel = n_second_cancel = n_spawn_cancel = n_returned = 0; }

FLASH_TEST(tasks, reset_cancels_a_thousand_suspended_tasks_and_the_context_is_reusable) {
    enum { N = 1000 };
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    reset_counts();
    for (int i = 0; i < N; i++) flash_spawn(ctx, t_cancellable, gate);
    /* some tasks also wait on loads that are in an open batch */
    job jobs[20];
    for (int i = 0; i < 20; i++) {
        jobs[i] = (job){.id = i, .k = 3};
        flash_spawn(ctx, t_loads, &jobs[i]);
    }
    cr_assert_eq(n_returned, 0);
    flash_ctx_reset(ctx);
    cr_assert_eq(n_first_cancel, N, "every pending await gave ECANCELED");
    cr_assert_eq(n_second_cancel, N, "and every later await at once");
    cr_assert_eq(n_spawn_cancel, N, "spawn from a cancelled task rejects ECANCELED");
    cr_assert_eq(n_returned, N);
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(jobs[i].rc, FLASH_ECANCELED);
        cr_assert_eq(jobs[i].done, 0);
    }
    cr_assert_eq(flash_ctx_stats(ctx).batches, 0, "the open batch was cancelled, never dispatched");
    /* reusable */
    job j = {.id = 5, .k = 3};
    cr_assert_eq(VI(wait_ok(ctx, flash_spawn(ctx, t_loads, &j))), 5);
    cr_assert_eq(j.done, 3);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, destroy_cancels_suspended_tasks_without_leaks) {
    enum { N = 1000 };
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    reset_counts();
    for (int i = 0; i < N; i++) flash_spawn(ctx, t_cancellable, gate);
    job jobs[20];
    for (int i = 0; i < 20; i++) {
        jobs[i] = (job){.id = i, .k = 3};
        flash_spawn(ctx, t_loads, &jobs[i]);
    }
    flash_ctx_destroy(ctx);
    cr_assert_eq(n_first_cancel, N);
    cr_assert_eq(n_second_cancel, N);
    cr_assert_eq(n_spawn_cancel, N);
    cr_assert_eq(n_returned, N);
    for (int i = 0; i < 20; i++) cr_assert_eq(jobs[i].rc, FLASH_ECANCELED);
}

/* Reset from inside a task. */
static int rs_after_reset_others, rs_next_await;
static char *rs_mem;
static int t_resetter(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    rs_mem = flash_alloc(ctx, 4096);
    memset(rs_mem, 'x', 4096);
    if (arg) { /* suspend first, reset after a resume */
        int rc = flash_await(ctx, (flash_promise *)arg, NULL);
        if (rc) return rc;
    }
    flash_ctx_reset(ctx);
    rs_after_reset_others = n_first_cancel; /* the others were cancelled now */
    /* this task's request memory is still valid (ASan would tell) */
    for (int i = 0; i < 4096; i++) cr_assert_eq(rs_mem[i], 'x');
    memset(rs_mem, 'y', 4096);
    rs_next_await = flash_await(ctx, flash_fulfilled(ctx, IV(1)), NULL);
    return rs_next_await;
}

FLASH_TEST(tasks, reset_from_inside_a_task_before_its_first_await) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    reset_counts();
    for (int i = 0; i < 5; i++) flash_spawn(ctx, t_cancellable, gate);
    rs_after_reset_others = -1;
    rs_next_await = 0;
    flash_promise *p = flash_spawn(ctx, t_resetter, NULL);
    cr_assert_eq(rs_after_reset_others, 5, "the other tasks were cancelled by the reset itself");
    cr_assert_eq(rs_next_await, FLASH_ECANCELED, "the calling task sees ECANCELED at its next await");
    cr_assert_not_null(p);
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(p), FLASH_ECANCELED);
    /* the context is usable */
    job j = {.id = 2, .k = 2};
    cr_assert_eq(VI(wait_ok(ctx, flash_spawn(ctx, t_loads, &j))), 2);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, reset_from_inside_a_resumed_task) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx), *go = flash_promise_new(ctx);
    reset_counts();
    for (int i = 0; i < 5; i++) flash_spawn(ctx, t_cancellable, gate);
    rs_after_reset_others = -1;
    rs_next_await = 0;
    flash_promise *p = flash_spawn(ctx, t_resetter, go);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    cr_assert_eq(flash_resolve(ctx, go, NULL), 0);
    flash_drain(ctx); /* resumes the resetter, which resets */
    cr_assert_eq(rs_after_reset_others, 5);
    cr_assert_eq(rs_next_await, FLASH_ECANCELED);
    cr_assert_eq(n_returned, 5);
    job j = {.id = 3, .k = 2};
    cr_assert_eq(VI(wait_ok(ctx, flash_spawn(ctx, t_loads, &j))), 3);
    flash_ctx_destroy(ctx);
}

static flash_promise *own_promise;
static int own_rc;
static int t_await_self(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    int rc = flash_await(ctx, (flash_promise *)arg, NULL);
    if (rc) return rc;
    own_rc = flash_await(ctx, own_promise, NULL);
    return 0;
}

FLASH_TEST(tasks, awaiting_its_own_promise_is_estate_not_a_hang) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    own_rc = 0;
    own_promise = flash_spawn(ctx, t_await_self, gate);
    flash_resolve(ctx, gate, NULL);
    wait_ok(ctx, own_promise);
    cr_assert_eq(own_rc, FLASH_ESTATE);
    flash_ctx_destroy(ctx);
}

static flash_promise *run_fn(flash_ctx *ctx, void *arg) {
    (void)arg;
    return flash_fulfilled(ctx, NULL);
}
static int run_rc, destroy_logged;
static flash_ctx *destroy_ctx;
static int t_run_and_destroy(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    (void)result;
    cr_assert(flash_in_task(ctx));
    run_rc = flash_run(ctx, run_fn, NULL, NULL);
    flash_ctx_destroy(ctx); /* refused: logged, a no-op */
    void *v = NULL;
    int rc = flash_await(ctx, load_i(ctx, 4), &v);
    if (rc) return rc;
    *result = v;
    return 0;
}
static void count_log(int level, const char *message, void *ud) {
    (void)ud;
    if (level == FLASH_LOG_ERROR && strstr(message, "flash_ctx_destroy")) destroy_logged++;
}

FLASH_TEST(tasks, flash_run_inside_a_task_is_estate_and_destroy_inside_a_task_is_refused) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.logger.func = count_log;
    flash_ctx *ctx = flash_ctx_create(&d);
    destroy_ctx = ctx;
    run_rc = 0;
    destroy_logged = 0;
    flash_promise *p = flash_spawn(ctx, t_run_and_destroy, NULL);
    cr_assert_eq(run_rc, FLASH_ESTATE);
    cr_assert_eq(destroy_logged, 1);
    cr_assert_eq(VI(wait_ok(ctx, p)), 8, "the context survived");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, reset_from_a_task_resumed_by_flash_wait_makes_the_wait_return_ecanceled) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *go = flash_promise_new(ctx);
    reset_counts();
    rs_next_await = 0;
    flash_promise *p = flash_spawn(ctx, t_resetter, go);
    flash_resolve(ctx, go, NULL);
    cr_assert_eq(flash_wait(ctx, p, NULL), FLASH_ECANCELED);
    cr_assert_eq(rs_next_await, FLASH_ECANCELED);
    cr_assert_eq(VI(wait_ok(ctx, flash_spawn(ctx, t_return, IV(0)))), 7);
    flash_ctx_destroy(ctx);
}

/* A reset by a task spawned (before its first await) inside another task
   that is itself still inside flash_spawn. */
static int nested_inner_spawn_error, nested_outer_next;
static int t_outer_of_resetter(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    (void)result;
    flash_promise *p = flash_spawn(ctx, t_resetter, NULL);
    nested_inner_spawn_error = flash_promise_error(p);
    nested_outer_next = flash_await(ctx, flash_fulfilled(ctx, NULL), NULL);
    return nested_outer_next;
}

FLASH_TEST(tasks, reset_by_a_nested_task_cancels_its_spawner_too) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    reset_counts();
    for (int i = 0; i < 3; i++) flash_spawn(ctx, t_cancellable, gate);
    nested_inner_spawn_error = nested_outer_next = 0;
    flash_promise *p = flash_spawn(ctx, t_outer_of_resetter, NULL);
    cr_assert_eq(n_first_cancel, 3);
    cr_assert_eq(nested_inner_spawn_error, FLASH_ECANCELED);
    cr_assert_eq(nested_outer_next, FLASH_ECANCELED, "the running spawner is cancelled from its next await");
    cr_assert_eq(flash_promise_error(p), FLASH_ECANCELED);
    cr_assert_eq(VI(wait_ok(ctx, flash_spawn(ctx, t_return, IV(0)))), 7);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(tasks, waiting_for_a_task_that_can_never_finish_is_eidle_not_a_hang) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    reset_counts();
    flash_promise *p = flash_spawn(ctx, t_cancellable, flash_promise_new(ctx));
    cr_assert_eq(flash_wait(ctx, p, NULL), FLASH_EIDLE);
    flash_ctx_destroy(ctx);
    cr_assert_eq(n_first_cancel, 1);
    cr_assert_eq(n_returned, 1);
}

static flash_promise *run_spawn(flash_ctx *ctx, void *arg) { return flash_spawn(ctx, t_loads, arg); }

FLASH_TEST(tasks, flash_run_of_a_task) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    job j = {.id = 9, .k = 3};
    void *v = NULL;
    cr_assert_eq(flash_run(ctx, run_spawn, &j, &v), 0);
    cr_assert_eq(VI(v), 9);
    cr_assert_eq(j.done, 3);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 3);
    flash_ctx_destroy(ctx);
}

/* ---- 7. pooling ------------------------------------------------------------ */

FLASH_TEST(tasks, stacks_are_pooled_across_a_thousand_resets) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    uint64_t stacks = 0;
    for (int cycle = 0; cycle < 1000; cycle++) {
        flash_promise *gate = flash_promise_new(ctx), *ps[25];
        nfinished = 0;
        reset_counts();
        for (int i = 0; i < 25; i++) flash_spawn(ctx, t_cancellable, gate); /* cancelled by the reset */
        for (int i = 0; i < 25; i++) ps[i] = flash_spawn(ctx, t_wait_gate, gate);
        if (cycle % 2 == 0) { /* half the cycles let some finish first */
            flash_resolve(ctx, gate, NULL);
            wait_ok(ctx, flash_gather(ctx, 25, ps));
            cr_assert_eq(nfinished, 25);
        }
        flash_ctx_reset(ctx);
        if (cycle % 2 == 1) cr_assert_eq(n_first_cancel, 25);
        cr_assert_eq(n_returned, 25);
        if (cycle == 0) stacks = flash_ctx_stats(ctx).task_stacks;
        else cr_assert_eq(flash_ctx_stats(ctx).task_stacks, stacks, "cycle %d mapped new stacks", cycle);
    }
    cr_assert_geq(stacks, 50);
    cr_assert_eq(flash_ctx_stats(ctx).tasks, 1000 * 50);
    flash_ctx_destroy(ctx);
}

/* A burst above task_retain is unmapped by the next reset: steady traffic
   below it maps nothing new, the next burst maps again. */
FLASH_TEST(tasks, a_burst_beyond_task_retain_is_unmapped_at_reset) {
    flash_desc d = {0};
    d.task_retain = 64;
    d.task_stack = 16 << 10;
    flash_ctx *ctx = flash_ctx_create(&d);
    flash_promise *gate = flash_promise_new(ctx);
    for (int i = 0; i < 3000; i++) flash_spawn(ctx, t_wait_gate, gate);
    uint64_t burst = flash_ctx_stats(ctx).task_stacks;
    cr_assert_geq(burst, 3000);
    flash_ctx_reset(ctx); /* cancels the 3,000 and unmaps all but ~64 stacks */
    for (int cycle = 0; cycle < 20; cycle++) {
        gate = flash_promise_new(ctx);
        flash_promise *ps[40];
        for (int i = 0; i < 40; i++) ps[i] = flash_spawn(ctx, t_wait_gate, gate);
        flash_resolve(ctx, gate, NULL);
        wait_ok(ctx, flash_gather(ctx, 40, ps));
        flash_ctx_reset(ctx);
    }
    cr_assert_eq(flash_ctx_stats(ctx).task_stacks, burst, "40 tasks a request fit in the stacks kept");
    gate = flash_promise_new(ctx);
    for (int i = 0; i < 3000; i++) flash_spawn(ctx, t_wait_gate, gate);
    cr_assert_gt(flash_ctx_stats(ctx).task_stacks, burst, "the burst's stacks were unmapped, a new burst maps again");
    flash_resolve(ctx, gate, NULL);
    flash_drain(ctx);
    flash_ctx_destroy(ctx);
}

/* ---- 8. stack overflow hits the guard page --------------------------------- */

static volatile uintptr_t so_top;   /* an address near the top of the task's stack */
static volatile size_t so_size;     /* its usable size */
static volatile uintptr_t so_fault; /* where it faulted */

static void so_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t top = (so_top + page - 1) & ~(page - 1); /* the top of the usable area */
    uintptr_t lo = top - so_size;                      /* its bottom */
    uintptr_t a = (uintptr_t)si->si_addr;
    so_fault = a;
    /* below the usable area, within its guard page */
    _exit(a < lo && a >= lo - page ? 42 : 43);
}

#if defined(__clang__) || defined(__GNUC__)
__attribute__((noinline, no_sanitize_address))
#endif
static int so_recurse(volatile char *prev, long n) {
    volatile char frame[512];
    frame[0] = (char)n;
    frame[511] = prev ? prev[0] : 0;
    if (n <= 0) return frame[0];
    return so_recurse(frame, n - 1) + frame[511]; /* not a tail call */
}

static int t_overflow(flash_ctx *ctx, void *arg, void **result) {
    (void)ctx;
    (void)result;
    so_top = (uintptr_t)__builtin_frame_address(0);
    so_size = (size_t)(uintptr_t)arg;
    return so_recurse(NULL, 1L << 30);
}

FLASH_TEST(tasks, stack_overflow_faults_on_the_guard_page) {
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        static char alt[64 << 10];
        stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt, .ss_flags = 0};
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = so_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaltstack(&ss, NULL) || sigaction(SIGSEGV, &sa, NULL) || sigaction(SIGBUS, &sa, NULL)) _exit(44);
        flash_desc d = desc_tasks(0, 64 << 10);
        flash_ctx *ctx = flash_ctx_create(&d);
        size_t usable = flash_ctx_desc(ctx)->task_stack;
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        usable = (usable + page - 1) / page * page;
        flash_spawn(ctx, t_overflow, (void *)(uintptr_t)usable);
        _exit(45); /* never here: the recursion has no end */
    }
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 42) {
        cr_log_info("stack overflow: the child's SIGSEGV handler saw the fault in the guard page");
    } else if (WIFEXITED(status)) {
        cr_assert_fail("the child exited with %d (43: fault outside the guard page, 44: setup, 45: no fault)",
                       WEXITSTATUS(status));
    } else {
#ifdef FLASH_TEST_ASAN
        /* ASan may catch the SIGSEGV before our handler and abort. */
        cr_assert(WIFSIGNALED(status) && (WTERMSIG(status) == SIGABRT || WTERMSIG(status) == SIGSEGV),
                  "the child died of signal %d", WIFSIGNALED(status) ? WTERMSIG(status) : -1);
        cr_log_info("stack overflow: ASan intercepted the fault (signal %d)", WTERMSIG(status));
#else
        cr_assert_fail("the child died of signal %d", WIFSIGNALED(status) ? WTERMSIG(status) : -1);
#endif
    }
}

/* ---- 11. FP control state is per task --------------------------------------- */

static int task_round_before, task_round_after;
static int t_round(flash_ctx *ctx, void *arg, void **result) {
    (void)result;
    task_round_before = fegetround();
    fesetround(FE_UPWARD);
    int rc = flash_await(ctx, (flash_promise *)arg, NULL);
    task_round_after = fegetround();
    return rc;
}

FLASH_TEST(tasks, the_rounding_mode_is_per_task) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *gate = flash_promise_new(ctx);
    cr_assert_eq(fegetround(), FE_TONEAREST);
    flash_promise *p = flash_spawn(ctx, t_round, gate);
    cr_assert_eq(task_round_before, FE_TONEAREST, "a task starts with its spawner's mode");
    cr_assert_eq(fegetround(), FE_TONEAREST, "the task's mode did not leak into its spawner");
    fesetround(FE_DOWNWARD); /* the resumer's own mode */
    flash_resolve(ctx, gate, NULL);
    cr_assert_eq(flash_wait(ctx, p, NULL), 0);
    cr_assert_eq(task_round_after, FE_UPWARD, "the task got its own mode back");
    cr_assert_eq(fegetround(), FE_DOWNWARD, "and the resumer kept its own");
    fesetround(FE_TONEAREST);
    flash_ctx_destroy(ctx);
}

/* ---- 2 (models), memory backend --------------------------------------------- */

static void setup_models(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(NULL);
}
static void setup_memcached(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMCACHED;
    fixture_setup(NULL);
}
static void teardown_models(void) { fixture_teardown(); }
TestSuite(tasks_models, .init = setup_models, .fini = teardown_models);
TestSuite(tasks_memcached, .init = setup_memcached, .fini = teardown_models);

typedef struct ujob {
    int i, n, k, done;
    bool async;
} ujob;

static int t_users(flash_ctx *ctx, void *arg, void **result) {
    ujob *j = (ujob *)arg;
    (void)result;
    for (int s = 0; s < j->k; s++) {
        int64_t id = (int64_t)s * j->n + j->i + 1;
        User *u = NULL;
        int rc;
        if (j->async) rc = flash_await(ctx, User_get_by_id_async(ctx, id), (void **)&u);
        else rc = User_get_by_id(ctx, id, &u);
        if (rc) return rc;
        cr_assert_eq(u->id, id);
        j->done++;
    }
    return 0;
}

static void users_in_tasks(int n, int k, bool async) {
    ujob *jobs = calloc((size_t)n, sizeof *jobs);
    flash_promise **ps = calloc((size_t)n, sizeof *ps);
    stats_delta();
    for (int i = 0; i < n; i++) {
        jobs[i] = (ujob){.i = i, .n = n, .k = k, .async = async};
        ps[i] = flash_spawn(fx.ctx, t_users, &jobs[i]);
    }
    wait_ok(fx.ctx, flash_gather(fx.ctx, (size_t)n, ps));
    for (int i = 0; i < n; i++) cr_assert_eq(jobs[i].done, k);
    free(jobs);
    free(ps);
}

FLASH_TEST(tasks_models, n_tasks_with_k_sequential_gets_cost_k_round_trips) {
    users_in_tasks(30, 3, true);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 3, "got %llu", (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.cache_keys, 90);
    cr_assert_eq(d.source_calls, 3);
    cr_assert_eq(d.tasks, 30);
    fixture_settle();
    flash_ctx_reset(fx.ctx);
    stats_delta();
    users_in_tasks(30, 3, true); /* warm: all hits */
    d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 3);
    cr_assert_eq(d.cache_hits, 90);
    cr_assert_eq(d.source_calls, 0);
}

FLASH_TEST(tasks_models, sync_forms_inside_tasks_suspend_and_batch_the_same_way) {
    users_in_tasks(25, 4, false);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 4, "got %llu", (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.cache_keys, 100);
    cr_assert_eq(d.source_calls, 4);
}

/* Each sync form in turn; per step every task makes one query. */
static int sync_steps_ok;
static int t_forms(flash_ctx *ctx, void *arg, void **result) {
    int i = (int)(intptr_t)arg;
    (void)result;
    User *u = NULL;
    int rc = User_get_by_id(ctx, 1000 + i, &u); /* not found */
    cr_assert_eq(rc, FLASH_ENOTFOUND);
    rc = User_get_by_id_or_none(ctx, 2000 + i, &u);
    cr_assert_eq(rc, 0);
    cr_assert_null(u);
    rc = User_get_by_id_or_404(ctx, 3000 + i, &u);
    cr_assert_eq(rc, FLASH_E404);
    char name[32];
    snprintf(name, sizeof name, "user%d", i + 1);
    rc = User_get_by_username(ctx, name, &u);
    cr_assert_eq(rc, 0);
    cr_assert_eq(u->id, i + 1);
    flash_query *qs[2] = {User_get_by_id_query(ctx, i + 1), User_get_by_id_query(ctx, i + 50)};
    void **out = NULL;
    rc = flash_queries(ctx, 2, qs, 0, &out);
    cr_assert_eq(rc, 0);
    cr_assert_eq(((User *)out[0])->id, i + 1);
    cr_assert_eq(((User *)out[1])->id, i + 50);
    Event *e = NULL;
    snprintf(name, sizeof name, "event%d", i % 10 + 1);
    rc = EventCacheOnSlug_resolve(ctx, name, &e);
    cr_assert_eq(rc, 0);
    cr_assert_str_eq(e->slug, name);
    sync_steps_ok++;
    return FLASH_ENOTFOUND == User_get_by_id(ctx, 4000 + i, &u) ? FLASH_ENOTFOUND : -999;
}

FLASH_TEST(tasks_models, every_sync_form_suspends_the_task_and_not_found_propagates) {
    enum { N = 10 };
    flash_promise *ps[N];
    sync_steps_ok = 0;
    stats_delta();
    for (int i = 0; i < N; i++) ps[i] = flash_spawn(fx.ctx, t_forms, IV(i));
    for (int i = 0; i < N; i++) cr_assert_eq(flash_promise_state(ps[i]), FLASH_PENDING);
    flash_settled *st = wait_ok(fx.ctx, flash_gather_settled(fx.ctx, N, ps));
    cr_assert_eq(sync_steps_ok, N);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(st[i].state, FLASH_REJECTED);
        cr_assert_eq(st[i].error, FLASH_ENOTFOUND, "the not-found of the last get is the task's code");
    }
    flash_stats d = stats_delta();
    /* get, or_none, or_404, username, queries, resolve, get: seven steps */
    cr_assert_eq(d.cache_round_trips, 7, "got %llu", (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.task_switches, N * 8);
}

/* flash_invalidate (a sync form) inside a task, then a read in the same task. */
static int t_rename(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    (void)result;
    User *u = NULL;
    int rc = User_get_by_id(ctx, 12, &u);
    if (rc) return rc;
    User old_row = *u, new_row = *u;
    new_row.username = "twelve";
    cr_assert_eq(flash_table_put(fx.db, &User_model, &new_row), 0);
    rc = flash_invalidate(ctx, &User_model, &old_row, &new_row);
    if (rc) return rc;
    rc = User_get_by_id(ctx, 12, &u);
    if (rc) return rc;
    *result = (void *)u->username;
    return 0;
}

FLASH_TEST(tasks_models, invalidate_inside_a_task) {
    flash_promise *p = flash_spawn(fx.ctx, t_rename, NULL);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    cr_assert_str_eq((const char *)wait_ok(fx.ctx, p), "twelve");
}

/* ---- 10. real memcached ------------------------------------------------------ */

FLASH_TEST(tasks_memcached, n_tasks_with_k_sequential_gets_cost_k_round_trips) {
    users_in_tasks(30, 3, false);
    flash_stats d = stats_delta();
    /* one server: one get-many per step */
    cr_assert_eq(d.cache_round_trips, 3, "got %llu", (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.source_calls, 3);
    fixture_settle(); /* the fills */
    flash_ctx_reset(fx.ctx);
    stats_delta();
    users_in_tasks(30, 3, true);
    d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 3);
    cr_assert_eq(d.cache_hits, 90);
    cr_assert_eq(d.source_calls, 0);
}

/* ---- 9. every loop adapter ----------------------------------------------------- */

static void timer_fire(void *arg) {
    void **pair = (void **)arg;
    flash_resolve((flash_ctx *)pair[0], (flash_promise *)pair[1], IV(77));
}

static int t_timer(flash_ctx *ctx, void *arg, void **result) {
    void *v = NULL;
    int rc = flash_await(ctx, (flash_promise *)arg, &v);
    if (rc) return rc;
    void *w = NULL;
    rc = flash_await(ctx, load_i(ctx, VI(v)), &w);
    if (rc) return rc;
    *result = w;
    return 0;
}

FLASH_LOOP_TEST(tasks_loops, tasks_on_every_loop) {
    void *native = L->create();
    cr_assert_not_null(native, "%s", L->name);
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert_eq(L->attach(ctx, native), 0, "%s", L->name);

    /* loads, the loop driven by flash_wait */
    job jobs[50];
    flash_promise *ps[50];
    for (int i = 0; i < 50; i++) {
        jobs[i] = (job){.id = i, .k = 3};
        ps[i] = flash_spawn(ctx, t_loads, &jobs[i]);
    }
    void **vals = wait_ok(ctx, flash_gather(ctx, 50, ps));
    for (int i = 0; i < 50; i++) cr_assert_eq(VI(vals[i]), i, "%s", L->name);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 3, "%s", L->name);

    /* a promise resolved by a loop timer, awaited in tasks */
    flash_ctx_reset(ctx);
    flash_promise *gate = flash_promise_new(ctx);
    void *pair[2] = {ctx, gate};
    flash_loop lp = L->loop(native);
    cr_assert_not_null(lp.vt->timer(lp.native, 5, timer_fire, pair), "%s", L->name);
    for (int i = 0; i < 10; i++) ps[i] = flash_spawn(ctx, t_timer, gate);
    int64_t t0 = flash_test_now_ms();
    vals = wait_ok(ctx, flash_gather(ctx, 10, ps));
    cr_assert_geq(flash_test_now_ms() - t0, 4, "%s: waited for the timer", L->name);
    for (int i = 0; i < 10; i++) cr_assert_eq(VI(vals[i]), 154, "%s", L->name);

    flash_ctx_destroy(ctx);
    L->destroy(native);
}
