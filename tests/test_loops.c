/* tests/test_loops.c — every loop adapter against the contract of
   flash_loop_vtable in flash.h: defers, timers, fd watches, run_once, cleanup,
   and flash_wait / flash_run on top. Each test runs once per loop (loops.h). */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "loops.h"

/* A test that spins aborts after 20 s (tests/harness.h: flash_test_watchdog). */
TestSuite(loops, .init = flash_test_watchdog);
#define LOOP_TEST(name) FLASH_LOOP_TEST(loops, name)

/* What the callbacks saw: one letter per call, with the run_once call it
   came in, and the handles callbacks act on. */
static struct {
    flash_loop lp;
    const char *name;
    int run;
    char log[64];
    int at[64];
    int n;
    void *h[8];
    int fd[4];
    int calls, ev[8];
} P;

#define VT P.lp.vt
#define NATIVE P.lp.native

static void *start(const flash_test_loop *L) {
    void *native = L->create();
    memset(&P, 0, sizeof P);
    cr_assert_not_null(native, "%s: create", L->name);
    P.lp = L->loop(native);
    P.name = L->name;
    P.fd[0] = P.fd[1] = P.fd[2] = P.fd[3] = -1;
    return native;
}

static void finish(const flash_test_loop *L, void *native) {
    L->destroy(native);
    for (int i = 0; i < 4; i++)
        if (P.fd[i] >= 0) close(P.fd[i]);
}

static void pair(int i) {
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, &P.fd[i]), 0);
}

static void poke(int fd) {
    cr_assert_eq(write(fd, "x", 1), 1);
}

static void note(char c) {
    if (P.n < 63) {
        P.at[P.n] = P.run;
        P.log[P.n++] = c;
        P.log[P.n] = 0;
    }
}

/* The run_once call in which c was logged, or -1. */
static int at(char c) {
    for (int i = 0; i < P.n; i++)
        if (P.log[i] == c) return P.at[i];
    return -1;
}

static int run(bool may_block) {
    P.run++;
    return VT->run_once(NATIVE, may_block);
}

/* Run without blocking until the loop reports idle: the calls it took, or -1. */
static int settle(void) {
    for (int i = 1; i <= 10; i++)
        if (run(false) == 0) return i;
    return -1;
}

static void run_until(char c, int max) {
    while (at(c) < 0 && max-- > 0) run(true);
    cr_assert_geq(at(c), 0, "%s: '%c' never ran (log \"%s\")", P.name, c, P.log);
}

static void log_fn(void *arg) { note(*(const char *)arg); }
static void *defer(const char *s) { return VT->defer(NATIVE, log_fn, (void *)s); }
static void *timer(uint32_t ms, const char *s) { return VT->timer(NATIVE, ms, log_fn, (void *)s); }

/* ---- defers ---------------------------------------------------------------- */

LOOP_TEST(defers_run_once_in_order_within_one_run_once) {
    void *native = start(L);
    defer("a");
    void *b = defer("b");
    defer("c");
    cr_assert_not_null(b);
    VT->cancel(NATIVE, b);
    run(true);
    cr_assert_str_eq(P.log, "ac", "%s", L->name);
    cr_assert_gt(settle(), 0, "%s: never idle", L->name);
    cr_assert_str_eq(P.log, "ac", "%s", L->name);
    finish(L, native);
}

static void io_then_defer(void *arg, int events) {
    char buf[8];
    (void)arg;
    cr_assert_eq(events, FLASH_IO_READ);
    cr_assert_eq(read(P.fd[0], buf, sizeof buf), 1);
    note('i');
    VT->io_stop(NATIVE, P.h[0]);
    defer("d");
}

LOOP_TEST(defer_from_io_callback_runs_in_the_same_run_once) {
    void *native = start(L);
    pair(0);
    poke(P.fd[1]);
    P.h[0] = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_then_defer, NULL);
    cr_assert_not_null(P.h[0]);
    run_until('d', 20);
    cr_assert_str_eq(P.log, "id", "%s", L->name);
    cr_assert_eq(at('i'), at('d'), "%s: I/O in run %d, its defer in run %d", L->name, at('i'), at('d'));
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

static void timer_then_defer(void *arg) {
    char c = *(const char *)arg;
    note(c);
    defer(c == 't' ? "u" : "U");
}

/* The 5 ms timer comes due while the loop blocks: libuv runs such timers after
   its check phase, the case the adapter must still finish in the same call. */
LOOP_TEST(defer_from_timer_callback_runs_in_the_same_run_once) {
    void *native = start(L);
    cr_assert_not_null(VT->timer(NATIVE, 0, timer_then_defer, (void *)"t"));
    cr_assert_not_null(VT->timer(NATIVE, 5, timer_then_defer, (void *)"T"));
    run_until('U', 50);
    cr_assert_eq(at('t'), at('u'), "%s: timer in run %d, its defer in run %d", L->name, at('t'), at('u'));
    cr_assert_eq(at('T'), at('U'), "%s: timer in run %d, its defer in run %d", L->name, at('T'), at('U'));
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

static void io_note_stop(void *arg, int events) {
    (void)events;
    note(*(const char *)arg);
    VT->io_stop(NATIVE, P.h[0]);
}

LOOP_TEST(defer_runs_after_the_iterations_io) {
    void *native = start(L);
    pair(0);
    poke(P.fd[1]);
    P.h[0] = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_note_stop, (void *)"i");
    defer("d");
    run(true);
    cr_assert_str_eq(P.log, "id", "%s", L->name);
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

static void defer_again(void *arg) {
    (void)arg;
    note('a');
    defer("b");
}

/* A defer queued by a defer runs by the next run_once, which must not block
   for the far timer meanwhile (a blocking loop trips the test timeout). */
LOOP_TEST(defer_from_defer_runs_by_the_next_run_once_without_blocking) {
    void *native = start(L);
    void *far = timer(10000, "x");
    VT->defer(NATIVE, defer_again, NULL);
    cr_assert_gt(run(true), 0);
    cr_assert_eq(at('a'), 1, "%s", L->name);
    if (at('b') < 0) run(true);
    cr_assert_str_eq(P.log, "ab", "%s", L->name);
    VT->cancel(NATIVE, far);
    cr_assert_gt(settle(), 0, "%s: never idle", L->name);
    finish(L, native);
}

/* ---- timers ---------------------------------------------------------------- */

LOOP_TEST(timers_fire_in_due_order) {
    void *native = start(L);
    timer(30, "d");
    timer(20, "c");
    timer(10, "b");
    timer(0, "a");
    run_until('d', 200);
    cr_assert_str_eq(P.log, "abcd", "%s", L->name);
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

LOOP_TEST(zero_ms_timer_fires_in_the_next_run_once) {
    void *native = start(L);
    timer(0, "z");
    run(true);
    cr_assert_str_eq(P.log, "z", "%s", L->name);
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

LOOP_TEST(cancelled_timers_and_defers_never_run) {
    void *native = start(L);
    timer(0, "a");
    VT->cancel(NATIVE, timer(0, "b"));
    VT->cancel(NATIVE, timer(10000, "c"));
    defer("d");
    VT->cancel(NATIVE, defer("e"));
    run_until('a', 20);
    run_until('d', 20);
    cr_assert_gt(settle(), 0, "%s: a cancelled handle kept the loop busy", L->name);
    cr_assert_eq(strpbrk(P.log, "bce"), NULL, "%s: log \"%s\"", L->name, P.log);
    finish(L, native);
}

/* h[0], h[1]: two timers due together that cancel each other, and the far
   timer h[2]; h[3] a defer that cancels the defer h[4]; h[5], h[6] a timer and
   a defer that cancel themselves. */
static void cancel_other(void *arg) {
    int me = (int)(intptr_t)arg;
    note((char)('x' + me));
    VT->cancel(NATIVE, P.h[1 - me]);
    VT->cancel(NATIVE, P.h[2]);
}
static void cancel_next_defer(void *arg) {
    (void)arg;
    note('e');
    VT->cancel(NATIVE, P.h[4]);
}
static void cancel_self(void *arg) {
    int i = (int)(intptr_t)arg;
    note((char)('0' + i));
    VT->cancel(NATIVE, P.h[i]);
}

LOOP_TEST(cancel_from_inside_callbacks) {
    void *native = start(L);
    P.h[0] = VT->timer(NATIVE, 0, cancel_other, (void *)(intptr_t)0);
    P.h[1] = VT->timer(NATIVE, 0, cancel_other, (void *)(intptr_t)1);
    P.h[2] = timer(10000, "w");
    P.h[3] = VT->defer(NATIVE, cancel_next_defer, NULL);
    P.h[4] = defer("f");
    P.h[5] = VT->timer(NATIVE, 0, cancel_self, (void *)(intptr_t)5);
    P.h[6] = VT->defer(NATIVE, cancel_self, (void *)(intptr_t)6);
    for (int i = 0; i < 7; i++) cr_assert_not_null(P.h[i]);
    run_until('5', 20);
    run_until('6', 20);
    cr_assert_gt(settle(), 0, "%s: the far timer was not cancelled", L->name);
    cr_assert((at('x') < 0) != (at('y') < 0), "%s: log \"%s\"", L->name, P.log);
    cr_assert_geq(at('e'), 0);
    cr_assert_lt(at('f'), 0, "%s: a cancelled defer ran", L->name);
    cr_assert_lt(at('w'), 0);
    finish(L, native);
}

/* ---- fd watches -------------------------------------------------------------- */

static void io_record(void *arg, int events) {
    (void)arg;
    if (P.calls < 8) P.ev[P.calls] = events;
    P.calls++;
}

LOOP_TEST(io_set_changes_interest_and_zero_pauses) {
    void *native = start(L);
    void *h;
    pair(0);
    h = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_record, NULL);
    cr_assert_not_null(h, "%s", L->name);
    for (int i = 0; i < 3; i++) run(false);
    cr_assert_eq(P.calls, 0, "%s: READ fired with nothing to read", L->name);

    cr_assert_eq(VT->io_set(NATIVE, h, FLASH_IO_WRITE), 0);
    cr_assert_eq(VT->io_set(NATIVE, h, FLASH_IO_WRITE), 0); /* idempotent */
    run(true);
    cr_assert_geq(P.calls, 1, "%s", L->name);
    cr_assert_eq(P.ev[0], FLASH_IO_WRITE, "%s: events %d", L->name, P.ev[0]);

    cr_assert_eq(VT->io_set(NATIVE, h, 0), 0);
    poke(P.fd[1]);
    P.calls = 0;
    cr_assert_eq(run(false), 0, "%s: a paused watch is nothing to wait for", L->name);
    run(false);
    cr_assert_eq(P.calls, 0, "%s: a paused watch fired", L->name);

    cr_assert_eq(VT->io_set(NATIVE, h, FLASH_IO_READ), 0);
    run(true);
    cr_assert_geq(P.calls, 1, "%s", L->name);
    cr_assert_eq(P.ev[0], FLASH_IO_READ, "%s: events %d", L->name, P.ev[0]);

    P.calls = 0;
    cr_assert_eq(VT->io_set(NATIVE, h, FLASH_IO_READ | FLASH_IO_WRITE), 0);
    run(true);
    cr_assert_geq(P.calls, 1, "%s", L->name);
    cr_assert_eq(P.ev[0], FLASH_IO_READ | FLASH_IO_WRITE, "%s: events %d", L->name, P.ev[0]);

    VT->io_stop(NATIVE, h);
    P.calls = 0;
    cr_assert_gt(settle(), 0, "%s: a stopped watch kept the loop busy", L->name);
    cr_assert_eq(P.calls, 0);
    finish(L, native);
}

/* First READ: switch itself to WRITE; then WRITE: stop itself. */
static void io_flip(void *arg, int events) {
    (void)arg;
    io_record(NULL, events);
    if (events & FLASH_IO_READ) cr_assert_eq(VT->io_set(NATIVE, P.h[0], FLASH_IO_WRITE), 0);
    else VT->io_stop(NATIVE, P.h[0]);
}

LOOP_TEST(io_set_and_io_stop_inside_own_callback) {
    void *native = start(L);
    pair(0);
    poke(P.fd[1]); /* stays unread: READ would fire forever */
    P.h[0] = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_flip, NULL);
    for (int i = 0; i < 10 && P.calls < 2; i++) run(true);
    cr_assert_gt(settle(), 0, "%s", L->name);
    cr_assert_eq(P.calls, 2, "%s: %d calls", L->name, P.calls);
    cr_assert_eq(P.ev[0], FLASH_IO_READ);
    cr_assert_eq(P.ev[1], FLASH_IO_WRITE);
    finish(L, native);
}

/* Two readable watches: whichever runs first stops the other and itself. */
static void io_stop_both(void *arg, int events) {
    (void)arg; (void)events;
    P.calls++;
    VT->io_stop(NATIVE, P.h[0]);
    VT->io_stop(NATIVE, P.h[1]);
}

LOOP_TEST(io_stop_of_another_ready_watch) {
    void *native = start(L);
    pair(0);
    pair(2);
    poke(P.fd[1]);
    poke(P.fd[3]);
    P.h[0] = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_stop_both, NULL);
    P.h[1] = VT->io_start(NATIVE, P.fd[2], FLASH_IO_READ, io_stop_both, NULL);
    run(true);
    cr_assert_gt(settle(), 0, "%s", L->name);
    cr_assert_eq(P.calls, 1, "%s: %d calls", L->name, P.calls);
    finish(L, native);
}

LOOP_TEST(hang_up_is_reported_on_every_watched_direction) {
    void *native = start(L);
    pair(0);
    pair(2);
    close(P.fd[1]);
    close(P.fd[3]);
    P.fd[1] = P.fd[3] = -1;
    P.h[0] = VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ | FLASH_IO_WRITE, io_record, NULL);
    for (int i = 0; i < 5 && !P.calls; i++) run(true);
    VT->io_stop(NATIVE, P.h[0]);
    cr_assert_eq(P.ev[0], FLASH_IO_READ | FLASH_IO_WRITE, "%s: events %d", L->name, P.ev[0]);

    P.calls = 0;
    P.h[1] = VT->io_start(NATIVE, P.fd[2], FLASH_IO_READ, io_record, NULL);
    for (int i = 0; i < 5 && !P.calls; i++) run(true);
    VT->io_stop(NATIVE, P.h[1]);
    cr_assert_eq(P.ev[0], FLASH_IO_READ, "%s: events %d", L->name, P.ev[0]);
    char c;
    cr_assert_eq(read(P.fd[2], &c, 1), 0, "%s: EOF", L->name);
    cr_assert_gt(settle(), 0);
    finish(L, native);
}

/* ---- run_once and cleanup ------------------------------------------------------ */

LOOP_TEST(run_once_returns_zero_when_idle) {
    void *native = start(L);
    cr_assert_eq(run(true), 0, "%s: a fresh loop", L->name);
    cr_assert_eq(run(false), 0, "%s: a fresh loop", L->name);
    timer(1, "t");
    cr_assert_gt(run(false), 0, "%s: a pending timer", L->name);
    run_until('t', 20);
    cr_assert_gt(settle(), 0, "%s: never idle after the timer", L->name);
    cr_assert_eq(run(true), 0, "%s: idle again", L->name);
    finish(L, native);
}

static void add_pending(void) {
    defer("a");
    VT->cancel(NATIVE, defer("b"));
    timer(0, "c");
    timer(10000, "d");
    VT->cancel(NATIVE, timer(5000, "e"));
    cr_assert_not_null(VT->io_start(NATIVE, P.fd[0], FLASH_IO_READ, io_record, NULL));
    void *h = VT->io_start(NATIVE, P.fd[1], FLASH_IO_WRITE, io_record, NULL);
    cr_assert_eq(VT->io_set(NATIVE, h, 0), 0);
    VT->io_stop(NATIVE, VT->io_start(NATIVE, P.fd[2], FLASH_IO_READ, io_record, NULL));
}

/* Under LeakSanitizer: the handles made here are freed with the loop. */
LOOP_TEST(destroy_with_pending_handles_leaks_nothing) {
    void *native = start(L);
    pair(0);
    pair(2);
    add_pending();
    L->destroy(native); /* never run */

    native = L->create();
    P.lp = L->loop(native);
    add_pending();
    run(false);
    defer("f");
    timer(0, "g");
    finish(L, native); /* after one iteration, with more queued */
    cr_assert_eq(strpbrk(P.log, "bde"), NULL, "%s: log \"%s\"", L->name, P.log);
}

/* ---- flash on the loop ------------------------------------------------------------ */

static int batch_calls;

static void complete_batch(void *arg) {
    flash_batch *b = (flash_batch *)arg;
    flash_ctx *ctx = flash_batch_ctx(b);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        cr_assert_eq(flash_batch_resolve(b, i, flash_sprintf(ctx, "v:%.*s", (int)len, k)), 0);
    }
}

/* The batch completes later, from a loop timer, as a network reply would. */
static void async_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    flash_loop lp = flash_ctx_loop(ctx);
    (void)ud;
    batch_calls++;
    cr_assert_not_null(lp.vt->timer(lp.native, 2, complete_batch, b));
}

static const flash_loader_desc async_loader = {.name = "async", .batch = async_batch};

static flash_promise *three_loads(flash_ctx *ctx, void *arg) {
    (void)arg;
    flash_loader *l = flash_loader_for(ctx, &async_loader);
    flash_promise *ps[3] = {flash_load_str(l, "a"), flash_load_str(l, "b"), flash_load_str(l, "a")};
    return flash_gather(ctx, 3, ps);
}

LOOP_TEST(flash_run_and_wait_drive_an_async_batch) {
    void *native = start(L);
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v = NULL;
    char **vals;
    cr_assert_not_null(ctx);
    cr_assert_eq(L->attach(ctx, native), 0, "%s", L->name);
    cr_assert_eq(flash_ctx_loop(ctx).vt, P.lp.vt);
    batch_calls = 0;

    cr_assert_eq(flash_run(ctx, three_loads, NULL, &v), 0, "%s", L->name);
    vals = (char **)v;
    cr_assert_eq(batch_calls, 1, "%s: %d batches", L->name, batch_calls);
    cr_assert_str_eq(vals[0], "v:a");
    cr_assert_str_eq(vals[1], "v:b");
    cr_assert_str_eq(vals[2], "v:a");
    cr_assert_eq(flash_ctx_stats(ctx).batch_keys, 2);

    flash_ctx_reset(ctx);
    flash_loader *l = flash_loader_for(ctx, &async_loader);
    flash_promise *ps[2] = {flash_load_str(l, "x"), flash_load_str(l, "y")};
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 2, ps), &v), 0, "%s", L->name);
    vals = (char **)v;
    cr_assert_eq(batch_calls, 2, "%s: %d batches", L->name, batch_calls);
    cr_assert_str_eq(vals[0], "v:x");
    cr_assert_str_eq(vals[1], "v:y");

    cr_assert_eq(flash_wait(ctx, flash_promise_new(ctx), &v), FLASH_EIDLE, "%s", L->name);
    flash_ctx_destroy(ctx);
    finish(L, native);
}

LOOP_TEST(double_attach_is_refused) {
    void *native = start(L), *other = L->create();
    flash_ctx *ctx = flash_ctx_create(NULL), *ctx2 = flash_ctx_create(NULL);
    cr_assert_eq(L->attach(ctx, native), 0, "%s", L->name);
    cr_assert_eq(L->attach(ctx, native), FLASH_ESTATE, "%s", L->name);
    cr_assert_eq(L->attach(ctx, other), FLASH_ESTATE, "%s", L->name);
    cr_assert_eq(L->attach(ctx2, native), 0, "%s: a second context on the same loop", L->name);
    flash_ctx_destroy(ctx);
    flash_ctx_destroy(ctx2);
    L->destroy(other);
    finish(L, native);
}

/* ---- post / unpost: flash_defer nodes of the caller's ------------------------------ */

static flash_defer posted[3];

static void repost(void *arg) {
    (void)arg;
    note('p');
    cr_assert_eq(flash_loop_post(P.lp, &posted[2], log_fn, (void *)"q"), 0);
}

LOOP_TEST(post_shares_the_defer_fifo_and_unpost_forgets) {
    void *native = start(L);
    void *far = timer(10000, "x");
    memset(posted, 0, sizeof posted);
    cr_assert_not_null(VT->post, "%s: no post", L->name);
    defer("a");
    cr_assert_eq(flash_loop_post(P.lp, &posted[0], log_fn, (void *)"b"), 0);
    cr_assert_eq(flash_loop_post(P.lp, &posted[0], log_fn, (void *)"X"), 0); /* queued: a no-op */
    cr_assert_eq(flash_loop_post(P.lp, &posted[1], log_fn, (void *)"c"), 0);
    defer("d");
    cr_assert_eq(flash_loop_post(P.lp, &posted[2], repost, NULL), 0);
    flash_loop_unpost(P.lp, &posted[1]);
    cr_assert(flash_defer_queued(&posted[0]) && !flash_defer_queued(&posted[1]));
    run(true);
    cr_assert_eq(strncmp(P.log, "abdp", 4), 0, "%s: log \"%s\"", L->name, P.log);
    cr_assert(!flash_defer_queued(&posted[0]), "%s: ran, so no longer queued", L->name);
    /* posted from a posted call: by the next run_once, which must not block
       (libuv's may run it in the same call, as with defers) */
    if (at('q') < 0) run(true);
    cr_assert_str_eq(P.log, "abdpq", "%s", L->name);
    VT->cancel(NATIVE, far);
    cr_assert_gt(settle(), 0, "%s: never idle", L->name);
    finish(L, native);
}

/* A late node posted from inside a run runs in that run, after what was
   queued before it and before what was queued during it (a transport's
   flush after this pass's dispatches); one posted by a late node's own call
   waits for the next run, as any node. */
static flash_defer late_nodes[4];

static void late_again(void *arg) {
    (void)arg;
    note('L');
    cr_assert_eq(flash_loop_post(P.lp, &late_nodes[3], log_fn, (void *)"M"), 0);
}

static void post_late(void *arg) {
    (void)arg;
    note('b');
    cr_assert_eq(flash_loop_post(P.lp, &late_nodes[1], log_fn, (void *)"n"), 0);
    cr_assert_eq(flash_loop_post(P.lp, &late_nodes[2], late_again, NULL), 0);
}

LOOP_TEST(late_node_posted_in_a_run_runs_in_that_run) {
    void *native = start(L);
    memset(late_nodes, 0, sizeof late_nodes);
    late_nodes[2].late = late_nodes[3].late = true;
    defer("a");
    cr_assert_eq(flash_loop_post(P.lp, &late_nodes[0], post_late, NULL), 0);
    defer("c");
    run(true);
    cr_assert_eq(strncmp(P.log, "abcL", 4), 0, "%s: log \"%s\"", L->name, P.log);
    cr_assert_eq(at('L'), at('b'), "%s: in the same run_once", L->name);
    if (at('M') < 0) run(true);
    cr_assert_str_eq(P.log, "abcLnM", "%s", L->name);
    cr_assert_gt(settle(), 0, "%s: never idle", L->name);
    finish(L, native);
}

/* Unposting the only queued node leaves nothing to wait for. */
LOOP_TEST(unpost_of_the_last_node_leaves_the_loop_idle) {
    void *native = start(L);
    memset(posted, 0, sizeof posted);
    cr_assert_eq(flash_loop_post(P.lp, &posted[0], log_fn, (void *)"a"), 0);
    flash_loop_unpost(P.lp, &posted[0]);
    cr_assert_eq(settle(), 1, "%s", L->name);
    cr_assert_str_eq(P.log, "", "%s", L->name);
    finish(L, native);
}
