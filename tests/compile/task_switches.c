/* Tasks with each context switch flash can be built with, as a program
   (run by `make headers`): the built-in assembly (x86-64 here, AArch64
   under qemu when a cross compiler is installed), -DFLASH_TASK_UCONTEXT,
   a switch brought by the user (-DBYO_SWITCH: FLASH_TASK_CONTEXT/MAKE/
   SWITCH over ucontext), and -DFLASH_NO_TASKS. Exits non-zero on any
   failed check. */
#ifdef BYO_SWITCH
#define _DEFAULT_SOURCE 1
#include <ucontext.h>
static void byo_make(ucontext_t *c, char *stack, size_t size, void (*fn)(void *), void *arg);
#define FLASH_TASK_CONTEXT ucontext_t
#define FLASH_TASK_MAKE(c, stack, size, fn, arg) byo_make(c, stack, size, fn, arg)
#define FLASH_TASK_SWITCH(from, to) swapcontext(from, to)
#endif
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <fenv.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifdef BYO_SWITCH
static void (*byo_fn)(void *);
static void *byo_arg;
static void byo_boot(void) { byo_fn(byo_arg); } /* one task is made at a time: globals are enough */
static void byo_make(ucontext_t *c, char *stack, size_t size, void (*fn)(void *), void *arg) {
    byo_fn = fn;
    byo_arg = arg;
    getcontext(c);
    c->uc_stack.ss_sp = stack;
    c->uc_stack.ss_size = size;
    c->uc_link = NULL;
    makecontext(c, byo_boot, 0);
}
#define SWITCH_NAME "user's switch (ucontext)"
#elif defined(FLASH_NO_TASKS)
#define SWITCH_NAME "FLASH_NO_TASKS"
#elif defined(FLASH_TASK_UCONTEXT)
#define SWITCH_NAME "ucontext"
#elif defined(__aarch64__)
#define SWITCH_NAME "AArch64 assembly"
#else
#define SWITCH_NAME "x86-64 assembly"
#endif

static int failures;
#define CHECK(c, ...)                                                 \
    do {                                                              \
        if (!(c)) {                                                   \
            failures++;                                               \
            fprintf(stderr, "task_switches (%s): ", SWITCH_NAME);     \
            fprintf(stderr, __VA_ARGS__);                             \
            fputc('\n', stderr);                                      \
        }                                                             \
    } while (0)

static void echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    size_t i;
    (void)ctx;
    (void)ud;
    for (i = 0; i < flash_batch_size(b); i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}
static const flash_loader_desc echo = {.batch = echo_batch};

static FLASH__UNUSED int three_loads(flash_ctx *ctx, void *arg, void **result) {
    flash_loader *l = flash_loader_for(ctx, &echo);
    char key[32];
    void *v = NULL;
    int step, rc;
    for (step = 0; step < 3; step++) {
        snprintf(key, sizeof key, "%d.%d", (int)(intptr_t)arg, step);
        if ((rc = flash_await(ctx, flash_load_str(l, key), &v)) != 0) return rc;
    }
    *result = v;
    return 0;
}

static flash_promise *gate;
static int canceled;

/* The rounding mode is the task's own: MXCSR / FPCR are switched. */
static FLASH__UNUSED int rounding_task(flash_ctx *ctx, void *arg, void **result) {
    (void)arg;
    (void)result;
    fesetround(FE_UPWARD);
    if (flash_await(ctx, gate, NULL) != 0) return FLASH_EINVAL;
    return fegetround() == FE_UPWARD ? 0 : FLASH_EBATCH;
}

static FLASH__UNUSED int waits_forever(flash_ctx *ctx, void *arg, void **result) {
    int rc = flash_await(ctx, (flash_promise *)arg, NULL);
    (void)result;
    if (rc == FLASH_ECANCELED && flash_await(ctx, gate, NULL) == FLASH_ECANCELED) canceled++;
    return rc;
}

int main(void) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[500], *never;
    void *v = NULL;
    int i, rc;
    flash_stats st;
    CHECK(ctx != NULL, "no context");
    if (!ctx) return 1;
#ifdef FLASH_NO_TASKS
    rc = flash_wait(ctx, flash_spawn(ctx, three_loads, NULL), NULL);
    CHECK(rc == FLASH_EUNSUPPORTED, "spawn gave %d, not FLASH_EUNSUPPORTED", rc);
    CHECK(!flash_in_task(ctx), "in a task");
    rc = flash_await(ctx, flash_fulfilled(ctx, (void *)"x"), &v);
    CHECK(rc == 0 && v && strcmp((const char *)v, "x") == 0, "await outside a task is flash_wait");
    (void)never;
    (void)ps;
    (void)i;
    (void)st;
#else
    for (i = 0; i < 500; i++) ps[i] = flash_spawn(ctx, three_loads, (void *)(intptr_t)i);
    rc = flash_wait(ctx, flash_gather(ctx, 500, ps), &v);
    st = flash_ctx_stats(ctx);
    CHECK(rc == 0, "gather of 500 tasks: %s", flash_strerror(rc));
    CHECK(rc || strcmp((const char *)((void **)v)[499], "499.2") == 0, "task 499's value");
    CHECK(st.batches == 3, "500 tasks x 3 sequential loads took %llu batches, not 3", (unsigned long long)st.batches);
    CHECK(st.tasks == 500 && st.task_switches == 2000, "%llu tasks, %llu switches", (unsigned long long)st.tasks,
          (unsigned long long)st.task_switches);

    flash_ctx_reset(ctx);
    gate = flash_promise_new(ctx);
    fesetround(FE_TONEAREST);
    ps[0] = flash_spawn(ctx, rounding_task, NULL);
    CHECK(fegetround() == FE_TONEAREST, "the task's rounding mode leaked into its spawner");
    flash_resolve(ctx, gate, NULL);
    rc = flash_wait(ctx, ps[0], NULL);
    CHECK(rc == 0, "the task's rounding mode was not restored after its await (%d)", rc);
    CHECK(fegetround() == FE_TONEAREST, "the rounding mode leaked out of the task");

    flash_ctx_reset(ctx);
    never = flash_promise_new(ctx);
    gate = flash_promise_new(ctx);
    for (i = 0; i < 100; i++) flash_spawn(ctx, waits_forever, never);
    flash_ctx_reset(ctx);
    CHECK(canceled == 100, "%d of 100 suspended tasks saw FLASH_ECANCELED twice at reset", canceled);
#endif
    flash_ctx_destroy(ctx);
    if (failures) return 1;
#ifdef FLASH_NO_TASKS
    printf("tasks (%s): flash_spawn rejects with FLASH_EUNSUPPORTED, flash_await is flash_wait\n", SWITCH_NAME);
#else
    printf("tasks (%s): spawn, batching across tasks, FP control per task, cancel at reset\n", SWITCH_NAME);
#endif
    return 0;
}
