/* backends/loop/poll.h: the built-in poll(2) loop, through its vtable, and
   flash_wait / flash_run driving it. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdlib.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "flash.h"
#include "backends/loop/poll.h"
#include "harness.h"

TestSuite(poll, .init = flash_test_watchdog);

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int)(intptr_t)(p))

/* What ran, in order: each callback appends a small tag. */
static int seq[64];
static int nseq;
static void tag(int t) {
    if (nseq < 64) seq[nseq++] = t;
}
static void tag_fn(void *arg) { tag(VI(arg)); }

typedef struct fixture {
    flash_poll *poll;
    flash_loop loop;
    const flash_loop_vtable *vt;
    void *n; /* native */
} fixture;
static fixture fx(void) {
    fixture f;
    f.poll = flash_poll_create();
    cr_assert_not_null(f.poll);
    f.loop = flash_poll_loop(f.poll);
    f.vt = f.loop.vt;
    f.n = f.loop.native;
    nseq = 0;
    return f;
}

static int run_until_idle(flash_poll *p) {
    int iterations = 0;
    while (flash_poll_run_once(p, true) > 0 && iterations < 10000) iterations++;
    return iterations;
}

FLASH_TEST(poll, vtable_is_complete_and_named) {
    fixture f = fx();
    cr_assert_str_eq(f.vt->name, "poll");
    cr_assert_not_null(f.vt->defer);
    cr_assert_not_null(f.vt->timer);
    cr_assert_not_null(f.vt->cancel);
    cr_assert_not_null(f.vt->io_start);
    cr_assert_not_null(f.vt->io_set);
    cr_assert_not_null(f.vt->io_stop);
    cr_assert_not_null(f.vt->run_once);
    cr_assert_eq(f.n, f.poll);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, run_once_on_an_idle_loop_returns_zero_without_blocking) {
    fixture f = fx();
    cr_assert_eq(flash_poll_run_once(f.poll, true), 0);
    cr_assert_eq(flash_poll_run_once(f.poll, false), 0);
    cr_assert_eq(f.vt->run_once(f.n, true), 0);
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(flash_poll_run_once(NULL, true), FLASH_EINVAL);
    flash_poll_destroy(f.poll);
    flash_poll_destroy(NULL);
}

/* ---- defer ------------------------------------------------------------------ */

static fixture *defer_fx;
static void defer_again(void *arg) {
    tag(VI(arg));
    defer_fx->vt->defer(defer_fx->n, tag_fn, IV(VI(arg) + 10));
}

FLASH_TEST(poll, defers_run_in_order_and_those_they_queue_run_next_iteration) {
    fixture f = fx();
    defer_fx = &f;
    cr_assert_not_null(f.vt->defer(f.n, defer_again, IV(1)));
    cr_assert_not_null(f.vt->defer(f.n, tag_fn, IV(2)));
    cr_assert_eq(nseq, 0, "defer does not run anything now");
    cr_assert_gt(flash_poll_run_once(f.poll, true), 0, "the new defer remains");
    cr_assert_eq(nseq, 2);
    cr_assert_eq(seq[0], 1);
    cr_assert_eq(seq[1], 2);
    cr_assert_eq(flash_poll_run_once(f.poll, true), 0);
    cr_assert_eq(nseq, 3);
    cr_assert_eq(seq[2], 11);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, cancelled_defer_does_not_run) {
    fixture f = fx();
    void *h = f.vt->defer(f.n, tag_fn, IV(1));
    f.vt->defer(f.n, tag_fn, IV(2));
    f.vt->cancel(f.n, h);
    run_until_idle(f.poll);
    cr_assert_eq(nseq, 1);
    cr_assert_eq(seq[0], 2);
    flash_poll_destroy(f.poll);
}

static void *victim;
static void cancel_victim(void *arg) {
    fixture *f = (fixture *)arg;
    tag(100);
    f->vt->cancel(f->n, victim);
}

FLASH_TEST(poll, a_defer_can_cancel_a_later_defer_of_the_same_iteration) {
    fixture f = fx();
    f.vt->defer(f.n, cancel_victim, &f);
    victim = f.vt->defer(f.n, tag_fn, IV(1));
    f.vt->defer(f.n, tag_fn, IV(2));
    run_until_idle(f.poll);
    cr_assert_eq(nseq, 2);
    cr_assert_eq(seq[0], 100);
    cr_assert_eq(seq[1], 2);
    flash_poll_destroy(f.poll);
}

/* ---- I/O ---------------------------------------------------------------------- */

typedef struct io_rec {
    fixture *f;
    void *h;
    int fd;
    int events[16];
    int n;
    bool stop_self;
    void *other; /* stopped from this callback */
} io_rec;
static void io_cb(void *arg, int events) {
    io_rec *r = (io_rec *)arg;
    if (r->n < 16) r->events[r->n] = events;
    r->n++;
    tag(1000 + r->fd);
    if (events & FLASH_IO_READ) {
        char buf[64];
        (void)!read(r->fd, buf, sizeof buf);
    }
    if (r->stop_self) r->f->vt->io_stop(r->f->n, r->h);
    if (r->other) r->f->vt->io_stop(r->f->n, r->other);
}

FLASH_TEST(poll, io_reports_write_then_read_on_a_socketpair) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    io_rec r = {.f = &f, .fd = sv[0]};
    r.h = f.vt->io_start(f.n, sv[0], FLASH_IO_READ | FLASH_IO_WRITE, io_cb, &r);
    cr_assert_not_null(r.h);
    cr_assert_gt(flash_poll_run_once(f.poll, false), 0, "a watched fd keeps the loop alive");
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.events[0], FLASH_IO_WRITE, "writable, nothing to read yet");
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_READ), 0);
    cr_assert_eq(write(sv[1], "x", 1), 1);
    flash_poll_run_once(f.poll, true);
    cr_assert_eq(r.n, 2);
    cr_assert_eq(r.events[1], FLASH_IO_READ);
    f.vt->io_stop(f.n, r.h);
    cr_assert_eq(flash_poll_run_once(f.poll, true), 0, "nothing left after io_stop");
    close(sv[0]);
    close(sv[1]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, io_set_changes_interest_idempotently_and_zero_pauses) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    io_rec r = {.f = &f, .fd = sv[0]};
    r.h = f.vt->io_start(f.n, sv[0], FLASH_IO_READ, io_cb, &r);
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_READ), 0);
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_READ), 0);
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(r.n, 0, "not readable yet, and WRITE is not asked for");
    cr_assert_eq(f.vt->io_set(f.n, r.h, 0), 0);
    cr_assert_eq(f.vt->io_set(f.n, r.h, 0), 0);
    cr_assert_eq(write(sv[1], "x", 1), 1);
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(r.n, 0, "paused");
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_WRITE), 0);
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_WRITE), 0);
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.events[0], FLASH_IO_WRITE, "only what is asked for is reported");
    cr_assert_eq(f.vt->io_set(f.n, r.h, FLASH_IO_READ | FLASH_IO_WRITE), 0);
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(r.n, 2);
    cr_assert_eq(r.events[1], FLASH_IO_READ | FLASH_IO_WRITE);
    f.vt->io_stop(f.n, r.h);
    flash_poll_run_once(f.poll, false);
    close(sv[0]);
    close(sv[1]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, io_stop_inside_its_own_callback_is_safe) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    io_rec r = {.f = &f, .fd = sv[0], .stop_self = true};
    r.h = f.vt->io_start(f.n, sv[0], FLASH_IO_WRITE, io_cb, &r);
    cr_assert_eq(flash_poll_run_once(f.poll, false), 0, "the only handle stopped itself");
    cr_assert_eq(flash_poll_run_once(f.poll, false), 0);
    cr_assert_eq(r.n, 1);
    close(sv[0]);
    close(sv[1]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, io_stop_of_another_ready_handle_skips_its_callback) {
    fixture f = fx();
    int a[2], b[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, a), 0);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, b), 0);
    io_rec ra = {.f = &f, .fd = a[0]}, rb = {.f = &f, .fd = b[0]};
    ra.h = f.vt->io_start(f.n, a[0], FLASH_IO_WRITE, io_cb, &ra);
    rb.h = f.vt->io_start(f.n, b[0], FLASH_IO_WRITE, io_cb, &rb);
    ra.other = rb.h; /* whichever runs first stops the other */
    rb.other = ra.h;
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(ra.n + rb.n, 1, "a stopped handle's callback does not run, even if it was ready");
    close(a[0]);
    close(a[1]);
    close(b[0]);
    close(b[1]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, hang_up_is_reported_as_read_and_write) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    io_rec r = {.f = &f, .fd = sv[0]};
    r.h = f.vt->io_start(f.n, sv[0], FLASH_IO_READ | FLASH_IO_WRITE, io_cb, &r);
    close(sv[1]);
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.events[0], FLASH_IO_READ | FLASH_IO_WRITE);
    f.vt->io_stop(f.n, r.h);
    close(sv[0]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, io_start_rejects_bad_arguments) {
    fixture f = fx();
    io_rec r = {.f = &f};
    cr_assert_null(f.vt->io_start(f.n, -1, FLASH_IO_READ, io_cb, &r));
    cr_assert_null(f.vt->io_start(f.n, 0, FLASH_IO_READ, NULL, &r));
    cr_assert_eq(f.vt->io_set(f.n, NULL, FLASH_IO_READ), FLASH_EINVAL);
    flash_poll_destroy(f.poll);
}

static void defer_after_io(void *arg) { tag(VI(arg)); }

FLASH_TEST(poll, defer_runs_after_the_io_of_its_iteration) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    cr_assert_eq(write(sv[1], "x", 1), 1);
    f.vt->defer(f.n, defer_after_io, IV(1)); /* queued before the watch */
    io_rec r = {.f = &f, .fd = sv[0], .stop_self = true};
    r.h = f.vt->io_start(f.n, sv[0], FLASH_IO_READ, io_cb, &r);
    flash_poll_run_once(f.poll, true);
    cr_assert_eq(nseq, 2);
    cr_assert_eq(seq[0], 1000 + sv[0], "I/O first");
    cr_assert_eq(seq[1], 1, "then the defer");
    close(sv[0]);
    close(sv[1]);
    flash_poll_destroy(f.poll);
}

/* ---- timers ---------------------------------------------------------------------- */

FLASH_TEST(poll, timers_fire_in_due_order) {
    fixture f = fx();
    f.vt->timer(f.n, 30, tag_fn, IV(30));
    f.vt->timer(f.n, 10, tag_fn, IV(10));
    f.vt->timer(f.n, 20, tag_fn, IV(20));
    f.vt->timer(f.n, 1, tag_fn, IV(1));
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(nseq, 4);
    cr_assert_eq(seq[0], 1);
    cr_assert_eq(seq[1], 10);
    cr_assert_eq(seq[2], 20);
    cr_assert_eq(seq[3], 30);
    flash_poll_destroy(f.poll);
}

/* Both timers are due by the time the loop runs: still earliest first. */
FLASH_TEST(poll, timers_due_in_the_same_iteration_fire_in_due_order) {
    fixture f = fx();
    f.vt->timer(f.n, 1, tag_fn, IV(1));
    f.vt->timer(f.n, 5, tag_fn, IV(5));
    flash_test_sleep_ms(20); /* not a timing assertion: makes both due before run_once */
    flash_poll_run_once(f.poll, true);
    cr_assert_eq(nseq, 2);
    cr_assert_eq(seq[0], 1, "fired %d before %d", seq[0], seq[1]);
    cr_assert_eq(seq[1], 5);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, timers_with_equal_due_time_fire_in_creation_order) {
    fixture f = fx();
    for (int i = 1; i <= 4; i++) f.vt->timer(f.n, 0, tag_fn, IV(i));
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(nseq, 4);
    for (int i = 0; i < 4; i++) cr_assert_eq(seq[i], i + 1, "order: %d %d %d %d", seq[0], seq[1], seq[2], seq[3]);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, cancelled_timer_does_not_fire) {
    fixture f = fx();
    void *h = f.vt->timer(f.n, 1, tag_fn, IV(1));
    f.vt->timer(f.n, 2, tag_fn, IV(2));
    f.vt->cancel(f.n, h);
    f.vt->cancel(f.n, NULL); /* harmless */
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(nseq, 1);
    cr_assert_eq(seq[0], 2);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, a_timer_can_cancel_another_from_its_callback) {
    fixture f = fx();
    f.vt->timer(f.n, 1, cancel_victim, &f);
    victim = f.vt->timer(f.n, 20, tag_fn, IV(2));
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(nseq, 1);
    cr_assert_eq(seq[0], 100);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, a_timer_can_cancel_a_defer) {
    fixture f = fx();
    f.vt->timer(f.n, 0, cancel_victim, &f);
    victim = f.vt->defer(f.n, tag_fn, IV(2)); /* runs after the timers of the iteration */
    cr_assert_eq(flash_poll_run(f.poll), 0);
    cr_assert_eq(nseq, 1);
    cr_assert_eq(seq[0], 100);
    flash_poll_destroy(f.poll);
}

static void rearm(void *arg) {
    fixture *f = (fixture *)arg;
    tag(nseq + 1);
    if (nseq < 3) f->vt->timer(f->n, 0, rearm, f);
}

FLASH_TEST(poll, zero_ms_timer_armed_in_a_timer_fires_next_iteration) {
    fixture f = fx();
    f.vt->timer(f.n, 0, rearm, &f);
    cr_assert_gt(flash_poll_run_once(f.poll, true), 0, "the re-armed timer remains");
    cr_assert_eq(nseq, 1, "one timer per iteration, no livelock");
    cr_assert_gt(flash_poll_run_once(f.poll, true), 0);
    cr_assert_eq(nseq, 2);
    cr_assert_eq(flash_poll_run_once(f.poll, true), 0);
    cr_assert_eq(nseq, 3);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, run_once_without_blocking_returns_while_a_timer_is_pending) {
    fixture f = fx();
    void *h = f.vt->timer(f.n, 60000, tag_fn, IV(1));
    cr_assert_gt(flash_poll_run_once(f.poll, false), 0, "> 0 while handles remain");
    cr_assert_eq(nseq, 0);
    f.vt->cancel(f.n, h);
    cr_assert_eq(flash_poll_run_once(f.poll, false), 0);
    flash_poll_destroy(f.poll);
}

FLASH_TEST(poll, destroy_with_pending_handles_frees_them_and_runs_nothing) {
    fixture f = fx();
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    io_rec r = {.f = &f, .fd = sv[0]};
    f.vt->io_start(f.n, sv[0], FLASH_IO_READ | FLASH_IO_WRITE, io_cb, &r);
    f.vt->io_start(f.n, sv[1], FLASH_IO_READ, io_cb, &r);
    f.vt->timer(f.n, 0, tag_fn, IV(1));
    f.vt->timer(f.n, 100000, tag_fn, IV(2));
    f.vt->defer(f.n, tag_fn, IV(3));
    void *cancelled = f.vt->defer(f.n, tag_fn, IV(4));
    f.vt->cancel(f.n, cancelled);
    flash_poll_destroy(f.poll); /* LeakSanitizer checks every handle was freed */
    cr_assert_eq(nseq, 0);
    cr_assert_eq(r.n, 0);
    close(sv[0]);
    close(sv[1]);
}

FLASH_TEST(poll, destroy_after_running_frees_swept_and_unswept_handles) {
    fixture f = fx();
    void *t = f.vt->timer(f.n, 100000, tag_fn, IV(1));
    flash_poll_run_once(f.poll, false);
    f.vt->cancel(f.n, t); /* dead but not yet swept */
    f.vt->defer(f.n, tag_fn, IV(2));
    flash_poll_run_once(f.poll, false);
    cr_assert_eq(nseq, 1);
    f.vt->timer(f.n, 100000, tag_fn, IV(3));
    flash_poll_destroy(f.poll);
}

/* ---- with a context ---------------------------------------------------------- */

typedef struct settle_later {
    flash_ctx *ctx;
    flash_promise *p;
    int value;
    int code;
} settle_later;
static void settle_from_timer(void *arg) {
    settle_later *s = (settle_later *)arg;
    if (s->code) flash_reject(s->ctx, s->p, s->code, "from a timer");
    else flash_resolve(s->ctx, s->p, IV(s->value));
}

FLASH_TEST(poll, wait_drives_an_attached_poll_loop) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    cr_assert_eq(flash_poll_attach(ctx, poll), 0);
    cr_assert_eq(flash_ctx_loop(ctx).native, poll);
    flash_loop loop = flash_ctx_loop(ctx);
    settle_later a = {ctx, flash_promise_new(ctx), 42, 0};
    settle_later b = {ctx, flash_promise_new(ctx), 0, FLASH_ETIMEDOUT};
    loop.vt->timer(loop.native, 5, settle_from_timer, &a);
    loop.vt->timer(loop.native, 2, settle_from_timer, &b);
    void *v;
    cr_assert_eq(flash_wait(ctx, a.p, &v), 0);
    cr_assert_eq(VI(v), 42);
    cr_assert_eq(flash_wait(ctx, b.p, &v), FLASH_ETIMEDOUT);
    cr_assert_str_eq(flash_promise_message(b.p), "from a timer");
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

static int chained_runs;
static flash_promise *count_then(flash_ctx *ctx, void *value, void *arg) {
    (void)arg;
    chained_runs++;
    return flash_fulfilled(ctx, IV(VI(value) + 1));
}

FLASH_TEST(poll, callbacks_after_a_timer_settle_run_in_the_same_iteration) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    flash_loop loop = flash_ctx_loop(ctx);
    settle_later a = {ctx, flash_promise_new(ctx), 1, 0};
    flash_promise *q = flash_then(ctx, flash_then(ctx, a.p, count_then, NULL), count_then, NULL);
    loop.vt->timer(loop.native, 1, settle_from_timer, &a);
    chained_runs = 0;
    flash_test_sleep_ms(3);
    flash_poll_run_once(poll, true); /* driven by hand, not by flash_wait */
    cr_assert_eq(chained_runs, 2, "the settle scheduled a drain at the end of the iteration");
    cr_assert_eq(flash_promise_state(q), FLASH_FULFILLED);
    cr_assert_eq(VI(flash_promise_value(q)), 3);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

FLASH_TEST(poll, wait_with_poll_attached_and_nothing_scheduled_is_eidle) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    cr_assert_eq(flash_wait(ctx, flash_promise_new(ctx), NULL), FLASH_EIDLE);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

typedef struct io_settle {
    flash_ctx *ctx;
    flash_promise *p;
    void *h;
    int fd;
} io_settle;
static void io_resolves(void *arg, int events) {
    io_settle *s = (io_settle *)arg;
    char buf[16] = {0};
    if (!(events & FLASH_IO_READ)) return;
    ssize_t n = read(s->fd, buf, sizeof buf - 1);
    flash_loop loop = flash_ctx_loop(s->ctx);
    loop.vt->io_stop(loop.native, s->h);
    flash_resolve(s->ctx, s->p, flash_strdup(s->ctx, n > 0 ? buf : "?"));
}
static void write_later(void *arg) { (void)!write(*(int *)arg, "pong", 4); }

FLASH_TEST(poll, wait_on_a_promise_settled_by_socket_io) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    int sv[2];
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    flash_loop loop = flash_ctx_loop(ctx);
    io_settle s = {ctx, flash_promise_new(ctx), NULL, sv[0]};
    s.h = loop.vt->io_start(loop.native, sv[0], FLASH_IO_READ, io_resolves, &s);
    loop.vt->timer(loop.native, 2, write_later, &sv[1]);
    void *v;
    cr_assert_eq(flash_wait(ctx, s.p, &v), 0);
    cr_assert_str_eq(v, "pong");
    cr_assert_eq(flash_poll_run(poll), 0, "the watch was stopped");
    close(sv[0]);
    close(sv[1]);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

/* flash_run over poll: the request's async batch (completed by a timer) and
   a batch it did not await are both finished when flash_run returns. */
typedef struct timed_batch {
    flash_batch *b;
} timed_batch;
static int timed_batches, timed_done;
static timed_batch tb[8];
static void finish_timed(void *arg) {
    flash_batch *b = ((timed_batch *)arg)->b;
    size_t n = flash_batch_size(b);
    for (size_t i = 0; i < n; i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
    timed_done++;
}
static void timed_batch_fn(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    flash_loop loop = flash_ctx_loop(ctx);
    tb[timed_batches].b = b;
    loop.vt->timer(loop.native, 2, finish_timed, &tb[timed_batches]);
    timed_batches++;
}
static const flash_loader_desc timed_desc = {.name = "timed", .batch = timed_batch_fn};
static const flash_loader_desc timed_desc2 = {.name = "timed2", .batch = timed_batch_fn};
static flash_promise *request(flash_ctx *ctx, void *arg) {
    (void)arg;
    flash_load_str(flash_loader_for(ctx, &timed_desc2), "background");
    return flash_load_str(flash_loader_for(ctx, &timed_desc), "user:1");
}

FLASH_TEST(poll, run_drives_async_batches_over_poll_to_completion) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    timed_batches = timed_done = 0;
    void *v;
    cr_assert_eq(flash_run(ctx, request, NULL, &v), 0);
    cr_assert_str_eq(v, "user:1");
    cr_assert_eq(timed_batches, 2);
    cr_assert_eq(timed_done, 2, "flash_run waited for the un-awaited batch too");
    cr_assert_not(flash_ctx_busy(ctx));
    /* again: a new request on the same context and loop */
    cr_assert_eq(flash_run(ctx, request, NULL, &v), 0);
    cr_assert_eq(timed_batches, 4, "reset between runs: asked again");
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

static int inner_run_rc = 1;
static flash_promise *noop_request(flash_ctx *ctx, void *arg) {
    (void)arg;
    return flash_fulfilled(ctx, NULL);
}
static void run_from_timer(void *arg) {
    settle_later *s = (settle_later *)arg;
    inner_run_rc = flash_run(s->ctx, noop_request, NULL, NULL);
    flash_resolve(s->ctx, s->p, IV(1));
}

FLASH_TEST(poll, run_from_a_loop_callback_during_wait_is_estate) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    flash_loop loop = flash_ctx_loop(ctx);
    settle_later s = {ctx, flash_promise_new(ctx), 0, 0};
    loop.vt->timer(loop.native, 1, run_from_timer, &s);
    void *v;
    cr_assert_eq(flash_wait(ctx, s.p, &v), 0);
    cr_assert_eq(VI(v), 1);
    cr_assert_eq(inner_run_rc, FLASH_ESTATE);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

static void reset_from_timer(void *arg) { flash_ctx_reset((flash_ctx *)arg); }

FLASH_TEST(poll, reset_from_a_timer_during_wait_is_ecanceled) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    flash_loop loop = flash_ctx_loop(ctx);
    flash_promise *p = flash_promise_new(ctx);
    loop.vt->timer(loop.native, 1, reset_from_timer, ctx);
    cr_assert_eq(flash_wait(ctx, p, NULL), FLASH_ECANCELED);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(poll);
}

FLASH_TEST(poll, context_destroyed_before_its_loop_leaves_no_callbacks_behind) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *poll = flash_poll_create();
    flash_poll_attach(ctx, poll);
    flash_promise *p = flash_promise_new(ctx);
    flash_then(ctx, p, count_then, NULL);
    flash_resolve(ctx, p, IV(1)); /* schedules a drain on the poll loop */
    chained_runs = 0;
    flash_ctx_destroy(ctx);
    cr_assert_eq(flash_poll_run(poll), 0, "the deferred drain was cancelled");
    cr_assert_eq(chained_runs, 0);
    flash_poll_destroy(poll);
}
