/* Layer 3: flash_gather (asyncio.gather) and flash_gather_settled
   (asyncio.gather(return_exceptions=True)). */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <unistd.h>
#include <stdlib.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include "flash.h"
#include "harness.h"

TestSuite(gather, .init = flash_test_watchdog);

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int)(intptr_t)(p))

static int cb_runs;
static void count_cb(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx; (void)p; (void)arg;
    cb_runs++;
}

FLASH_TEST(gather, zero_promises_fulfils) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *g = flash_gather(ctx, 0, NULL);
    cr_assert_not_null(g);
    cr_assert_eq(flash_wait(ctx, g, NULL), 0);
    cr_assert_eq(flash_promise_state(g), FLASH_FULFILLED);
    flash_promise *s = flash_gather_settled(ctx, 0, NULL);
    cr_assert_eq(flash_wait(ctx, s, NULL), 0);
    cr_assert_eq(flash_promise_state(s), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, already_settled_inputs) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[3] = {flash_fulfilled(ctx, IV(1)), flash_fulfilled(ctx, IV(2)), flash_fulfilled(ctx, IV(3))};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 3, ps), &v), 0);
    void **vals = (void **)v;
    cr_assert_eq(VI(vals[0]), 1);
    cr_assert_eq(VI(vals[1]), 2);
    cr_assert_eq(VI(vals[2]), 3);
    ps[1] = flash_rejected(ctx, FLASH_E404, "no page");
    flash_promise *g = flash_gather(ctx, 3, ps);
    cr_assert_eq(flash_wait(ctx, g, &v), FLASH_E404);
    cr_assert_null(v);
    cr_assert_str_eq(flash_promise_message(g), "no page");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, values_in_argument_order_whatever_the_settle_order) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    enum { N = 8 };
    flash_promise *ps[N];
    for (int i = 0; i < N; i++) ps[i] = flash_promise_new(ctx);
    flash_promise *g = flash_gather(ctx, N, ps);
    for (int i = N - 1; i >= 0; i--) {
        cr_assert_eq(flash_promise_state(g), FLASH_PENDING);
        flash_resolve(ctx, ps[i], IV(i * 10));
        flash_drain(ctx);
    }
    void *v;
    cr_assert_eq(flash_wait(ctx, g, &v), 0);
    for (int i = 0; i < N; i++) cr_assert_eq(VI(((void **)v)[i]), i * 10);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, pending_until_the_last_input_settles) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[2] = {flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 2, ps);
    flash_resolve(ctx, ps[0], IV(1));
    flash_drain(ctx);
    cr_assert_eq(flash_promise_state(g), FLASH_PENDING);
    flash_resolve(ctx, ps[1], IV(2));
    flash_drain(ctx);
    cr_assert_eq(flash_promise_state(g), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, same_promise_twice) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    flash_promise *ps[3] = {p, flash_fulfilled(ctx, IV(5)), p};
    flash_promise *g = flash_gather(ctx, 3, ps);
    flash_resolve(ctx, p, IV(9));
    void *v;
    cr_assert_eq(flash_wait(ctx, g, &v), 0);
    cr_assert_eq(VI(((void **)v)[0]), 9);
    cr_assert_eq(VI(((void **)v)[1]), 5);
    cr_assert_eq(VI(((void **)v)[2]), 9);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, first_rejection_in_time_wins_not_first_in_array) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[3] = {flash_promise_new(ctx), flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 3, ps);
    flash_reject(ctx, ps[2], FLASH_ETIMEDOUT, "third, first in time");
    flash_reject(ctx, ps[0], FLASH_ESOURCE, "first in array");
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ETIMEDOUT);
    cr_assert_str_eq(flash_promise_message(g), "third, first in time");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, first_rejection_in_time_wins_across_drains) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[3] = {flash_promise_new(ctx), flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 3, ps);
    flash_reject(ctx, ps[1], FLASH_EBACKEND, "b");
    flash_drain(ctx);
    cr_assert_eq(flash_promise_state(g), FLASH_REJECTED, "rejects without waiting for the others");
    flash_reject(ctx, ps[0], FLASH_ESOURCE, "a");
    flash_resolve(ctx, ps[2], IV(3));
    flash_drain(ctx);
    cr_assert_eq(flash_promise_error(g), FLASH_EBACKEND);
    cr_assert_str_eq(flash_promise_message(g), "b");
    flash_ctx_destroy(ctx);
}

/* The inputs here also have a second waiter, so their settle goes through
   the queue: the time order must still hold. */
FLASH_TEST(gather, first_rejection_in_time_wins_when_inputs_have_other_waiters) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[2] = {flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 2, ps);
    flash_on_settle(ctx, ps[0], count_cb, NULL);
    flash_on_settle(ctx, ps[1], count_cb, NULL);
    flash_reject(ctx, ps[1], FLASH_ETIMEDOUT, "second, first in time");
    flash_reject(ctx, ps[0], FLASH_ESOURCE, "first");
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ETIMEDOUT);
    flash_ctx_destroy(ctx);
}

/* Mixed: ps[0] has a second waiter (queued path), ps[1] has only the gather.
   ps[0] is rejected first, so its error must win. */
FLASH_TEST(gather, first_rejection_in_time_wins_when_only_the_earlier_input_is_shared) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[2] = {flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 2, ps);
    cb_runs = 0;
    flash_on_settle(ctx, ps[0], count_cb, NULL); /* someone else waits on ps[0] too */
    flash_reject(ctx, ps[0], FLASH_ESOURCE, "first in time");
    flash_reject(ctx, ps[1], FLASH_ETIMEDOUT, "second in time");
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ESOURCE, "got %d (%s)", flash_promise_error(g),
                 flash_promise_message(g));
    cr_assert_eq(cb_runs, 1);
    flash_ctx_destroy(ctx);
}

/* asyncio.gather on an already-failed future and one that fails later:
   the earlier failure is the one raised. */
FLASH_TEST(gather, already_rejected_input_wins_over_a_later_rejection) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *later = flash_promise_new(ctx);
    flash_promise *ps[2] = {later, flash_rejected(ctx, FLASH_EBACKEND, "already failed")};
    flash_promise *g = flash_gather(ctx, 2, ps);
    flash_reject(ctx, later, FLASH_ESOURCE, "failed later");
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_EBACKEND, "got %d (%s)", flash_promise_error(g),
                 flash_promise_message(g));
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, others_keep_running_after_a_rejection) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[3] = {flash_promise_new(ctx), flash_promise_new(ctx), flash_promise_new(ctx)};
    cb_runs = 0;
    for (int i = 0; i < 3; i++) flash_on_settle(ctx, ps[i], count_cb, NULL);
    flash_promise *g = flash_gather(ctx, 3, ps);
    flash_reject(ctx, ps[0], FLASH_ENOTFOUND, NULL);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(cb_runs, 1);
    flash_resolve(ctx, ps[1], IV(1));
    flash_resolve(ctx, ps[2], IV(2));
    flash_drain(ctx);
    cr_assert_eq(cb_runs, 3, "the others still settle and run their callbacks");
    cr_assert_eq(flash_promise_error(g), FLASH_ENOTFOUND, "the gather stays rejected");
    flash_ctx_destroy(ctx);
}

/* gather(User.get_async, Event.resolve_async): one fails at once, the other
   loader's batch still runs and fills. */
static int slow_batches;
static void slow_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    slow_batches++;
    for (size_t i = 0; i < flash_batch_size(b); i++)
        flash_batch_resolve(b, i, flash_sprintf(ctx, "row:%s", (const char *)flash_batch_key(b, i, NULL)));
}
static void failing_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    flash_batch_fail(b, FLASH_ENOTFOUND, "User matching query does not exist");
}
static const flash_loader_desc slow_desc = {.name = "event", .batch = slow_batch};
static const flash_loader_desc fail_desc = {.name = "user", .batch = failing_batch};

FLASH_TEST(gather, a_rejection_does_not_stop_other_loaders_batches) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    slow_batches = 0;
    flash_loader *user = flash_loader_for(ctx, &fail_desc);
    flash_loader *event = flash_loader_for(ctx, &slow_desc);
    flash_promise *ev = flash_load_str(event, "pycon");
    flash_promise *ps[2] = {flash_load_str(user, "42"), ev};
    flash_promise *g = flash_gather(ctx, 2, ps);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(g), "User matching query does not exist");
    void *v;
    cr_assert_eq(flash_wait(ctx, ev, &v), 0);
    cr_assert_eq(slow_batches, 1);
    cr_assert_str_eq((char *)v, "row:pycon");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, nested_gathers) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *a = flash_promise_new(ctx), *b = flash_promise_new(ctx), *c = flash_promise_new(ctx);
    flash_promise *ab[2] = {a, b};
    flash_promise *cc[1] = {c};
    flash_promise *outer_in[3] = {flash_gather(ctx, 2, ab), flash_gather(ctx, 1, cc), flash_fulfilled(ctx, IV(4))};
    flash_promise *outer = flash_gather(ctx, 3, outer_in);
    flash_resolve(ctx, c, IV(3));
    flash_resolve(ctx, b, IV(2));
    flash_resolve(ctx, a, IV(1));
    void *v;
    cr_assert_eq(flash_wait(ctx, outer, &v), 0);
    void **o = (void **)v;
    cr_assert_eq(VI(((void **)o[0])[0]), 1);
    cr_assert_eq(VI(((void **)o[0])[1]), 2);
    cr_assert_eq(VI(((void **)o[1])[0]), 3);
    cr_assert_eq(VI(o[2]), 4);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, nested_gather_propagates_inner_rejection) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *a = flash_promise_new(ctx);
    flash_promise *inner_in[2] = {a, flash_fulfilled(ctx, NULL)};
    flash_promise *outer_in[2] = {flash_fulfilled(ctx, NULL), flash_gather(ctx, 2, inner_in)};
    flash_promise *outer = flash_gather(ctx, 2, outer_in);
    flash_reject(ctx, a, FLASH_EPROTO, "garbage");
    cr_assert_eq(flash_wait(ctx, outer, NULL), FLASH_EPROTO);
    cr_assert_str_eq(flash_promise_message(outer), "garbage");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, null_element_rejects_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ok = flash_promise_new(ctx);
    flash_promise *ps[3] = {ok, NULL, flash_fulfilled(ctx, NULL)};
    flash_promise *g = flash_gather(ctx, 3, ps);
    cr_assert_not_null(g);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_EINVAL);
    /* the valid input is untouched */
    cr_assert_eq(flash_promise_state(ok), FLASH_PENDING);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, null_array_rejects_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *g = flash_gather(ctx, 2, NULL);
    cr_assert_not_null(g);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_EINVAL);
    flash_promise *s = flash_gather_settled(ctx, 2, NULL);
    cr_assert_not_null(s);
    cr_assert_eq(flash_wait(ctx, s, NULL), FLASH_EINVAL);
    cr_assert_null(flash_gather(NULL, 0, NULL));
    cr_assert_null(flash_gather_settled(NULL, 0, NULL));
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, many_inputs_keep_their_order) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    enum { N = 10000 };
    flash_promise **ps = flash_alloc(ctx, N * sizeof *ps);
    for (int i = 0; i < N; i++) ps[i] = flash_promise_new(ctx);
    flash_promise *g = flash_gather(ctx, N, ps);
    for (int i = 0; i < N; i += 2) flash_resolve(ctx, ps[i], IV(i));
    for (int i = 1; i < N; i += 2) flash_resolve(ctx, ps[i], IV(i));
    void *v;
    cr_assert_eq(flash_wait(ctx, g, &v), 0);
    for (int i = 0; i < N; i++) cr_assert_eq(VI(((void **)v)[i]), i);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, gather_result_can_be_chained) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[2] = {flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather(ctx, 2, ps);
    cb_runs = 0;
    flash_on_settle(ctx, g, count_cb, NULL);
    flash_resolve(ctx, ps[0], IV(1));
    flash_resolve(ctx, ps[1], IV(2));
    cr_assert_eq(cb_runs, 0);
    flash_drain(ctx);
    cr_assert_eq(cb_runs, 1);
    flash_ctx_destroy(ctx);
}

/* ---- gather_settled ------------------------------------------------------ */

FLASH_TEST(gather, settled_reports_each_slot) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *a = flash_promise_new(ctx), *b = flash_promise_new(ctx);
    flash_promise *ps[5] = {a, flash_rejected(ctx, FLASH_E404, "no event"), b, NULL, flash_fulfilled(ctx, IV(5))};
    flash_promise *g = flash_gather_settled(ctx, 5, ps);
    flash_reject(ctx, b, FLASH_ENOTFOUND, NULL);
    flash_resolve(ctx, a, IV(1));
    void *v;
    cr_assert_eq(flash_wait(ctx, g, &v), 0, "gather_settled never rejects");
    flash_settled *s = (flash_settled *)v;
    cr_assert_eq(s[0].state, FLASH_FULFILLED);
    cr_assert_eq(s[0].error, 0);
    cr_assert_eq(VI(s[0].value), 1);
    cr_assert_str_eq(s[0].message, "");
    cr_assert_eq(s[1].state, FLASH_REJECTED);
    cr_assert_eq(s[1].error, FLASH_E404);
    cr_assert_null(s[1].value);
    cr_assert_str_eq(s[1].message, "no event");
    cr_assert_eq(s[2].state, FLASH_REJECTED);
    cr_assert_eq(s[2].error, FLASH_ENOTFOUND);
    cr_assert_str_eq(s[2].message, flash_strerror(FLASH_ENOTFOUND));
    cr_assert_eq(s[3].state, FLASH_REJECTED, "a NULL element is an EINVAL slot");
    cr_assert_eq(s[3].error, FLASH_EINVAL);
    cr_assert_not_null(s[3].message);
    cr_assert_eq(s[4].state, FLASH_FULFILLED);
    cr_assert_eq(VI(s[4].value), 5);
    cr_assert_str_eq(s[4].message, "");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, settled_with_every_input_rejected_still_fulfils) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[3] = {flash_promise_new(ctx), flash_promise_new(ctx), flash_promise_new(ctx)};
    flash_promise *g = flash_gather_settled(ctx, 3, ps);
    for (int i = 0; i < 3; i++) {
        flash_drain(ctx);
        cr_assert_eq(flash_promise_state(g), FLASH_PENDING, "waits for every input");
        flash_reject(ctx, ps[i], FLASH_EBACKEND - i, NULL);
    }
    void *v;
    cr_assert_eq(flash_wait(ctx, g, &v), 0);
    flash_settled *s = (flash_settled *)v;
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(s[i].state, FLASH_REJECTED);
        cr_assert_eq(s[i].error, FLASH_EBACKEND - i);
    }
    flash_ctx_destroy(ctx);
}

FLASH_TEST(gather, settled_over_loads_with_a_failing_key) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *user = flash_loader_for(ctx, &fail_desc);
    flash_loader *event = flash_loader_for(ctx, &slow_desc);
    flash_promise *ps[2] = {flash_load_str(user, "42"), flash_load_str(event, "pycon")};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather_settled(ctx, 2, ps), &v), 0);
    flash_settled *s = (flash_settled *)v;
    cr_assert_eq(s[0].state, FLASH_REJECTED);
    cr_assert_eq(s[0].error, FLASH_ENOTFOUND);
    cr_assert_eq(s[1].state, FLASH_FULFILLED);
    cr_assert_str_eq((char *)s[1].value, "row:pycon");
    flash_ctx_destroy(ctx);
}
