/* Layer 3: promises — settle, callbacks, chaining, re-entrancy. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <unistd.h>
#include <stdlib.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include "flash.h"
#include "harness.h"

TestSuite(promise, .init = flash_test_watchdog);

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int)(intptr_t)(p))

/* A log of callback runs: each callback appends its tag. */
static int order[64];
static int norder;
static void log_cb(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx; (void)p;
    if (norder < 64) order[norder++] = VI(arg);
}

FLASH_TEST(promise, new_promise_is_pending_with_empty_outcome) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_not_null(p);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    cr_assert_null(flash_promise_value(p));
    cr_assert_eq(flash_promise_error(p), 0);
    cr_assert_str_eq(flash_promise_message(p), "");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, resolve_fulfils_once_and_second_settle_is_estate) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_eq(flash_resolve(ctx, p, IV(42)), 0);
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED);
    cr_assert_eq(VI(flash_promise_value(p)), 42);
    cr_assert_eq(flash_promise_error(p), 0);
    cr_assert_str_eq(flash_promise_message(p), "");
    cr_assert_eq(flash_resolve(ctx, p, IV(7)), FLASH_ESTATE);
    cr_assert_eq(flash_reject(ctx, p, FLASH_ESOURCE, "x"), FLASH_ESTATE);
    cr_assert_eq(flash_rejectf(ctx, p, FLASH_ESOURCE, "x %d", 1), FLASH_ESTATE);
    cr_assert_eq(VI(flash_promise_value(p)), 42, "a second settle must not change the value");
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, reject_stores_code_and_copies_message) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    char msg[32];
    strcpy(msg, "row 7 is gone");
    cr_assert_eq(flash_reject(ctx, p, FLASH_ENOTFOUND, msg), 0);
    msg[0] = 'X'; /* the promise holds its own copy */
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(p), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(p), "row 7 is gone");
    cr_assert_null(flash_promise_value(p));
    cr_assert_eq(flash_resolve(ctx, p, IV(1)), FLASH_ESTATE);
    cr_assert_eq(flash_reject(ctx, p, FLASH_EBACKEND, NULL), FLASH_ESTATE);
    cr_assert_eq(flash_promise_error(p), FLASH_ENOTFOUND);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, message_defaults_to_strerror) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_eq(flash_reject(ctx, p, FLASH_ETIMEDOUT, NULL), 0);
    cr_assert_str_eq(flash_promise_message(p), flash_strerror(FLASH_ETIMEDOUT));
    flash_promise *r = flash_rejected(ctx, FLASH_EBACKEND, NULL);
    cr_assert_eq(flash_promise_error(r), FLASH_EBACKEND);
    cr_assert_str_eq(flash_promise_message(r), flash_strerror(FLASH_EBACKEND));
    /* pending and fulfilled promises have an empty message */
    cr_assert_str_eq(flash_promise_message(flash_fulfilled(ctx, NULL)), "");
    /* a NULL promise has some explanatory, non-empty text */
    cr_assert_not_null(flash_promise_message(NULL));
    cr_assert_gt(strlen(flash_promise_message(NULL)), 0);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, reject_with_code_zero_becomes_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_eq(flash_reject(ctx, p, 0, NULL), 0);
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(p), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(p), flash_strerror(FLASH_EINVAL));
    flash_promise *r = flash_rejected(ctx, 0, "m");
    cr_assert_eq(flash_promise_error(r), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(r), "m");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, rejectf_formats_the_message) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_eq(flash_rejectf(ctx, p, FLASH_ESOURCE, "query %s failed: %d", "users", 1045), 0);
    cr_assert_eq(flash_promise_error(p), FLASH_ESOURCE);
    cr_assert_str_eq(flash_promise_message(p), "query users failed: 1045");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, fulfilled_and_rejected_constructors_are_settled) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *f = flash_fulfilled(ctx, IV(5));
    flash_promise *r = flash_rejected(ctx, FLASH_E404, "nope");
    cr_assert_eq(flash_promise_state(f), FLASH_FULFILLED);
    cr_assert_eq(VI(flash_promise_value(f)), 5);
    cr_assert_eq(flash_promise_state(r), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(r), FLASH_E404);
    cr_assert_str_eq(flash_promise_message(r), "nope");
    cr_assert_eq(flash_resolve(ctx, f, IV(1)), FLASH_ESTATE);
    cr_assert_eq(flash_resolve(ctx, r, IV(1)), FLASH_ESTATE);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, callbacks_run_from_the_queue_in_registration_order) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    norder = 0;
    for (int i = 1; i <= 5; i++) cr_assert_eq(flash_on_settle(ctx, p, log_cb, IV(i)), 0);
    cr_assert_eq(flash_resolve(ctx, p, NULL), 0);
    cr_assert_eq(norder, 0, "callbacks must not run inside flash_resolve");
    cr_assert(flash_ctx_busy(ctx));
    flash_drain(ctx);
    cr_assert_eq(norder, 5);
    for (int i = 0; i < 5; i++) cr_assert_eq(order[i], i + 1);
    flash_drain(ctx);
    cr_assert_eq(norder, 5, "callbacks run once");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, single_callback_not_run_inside_reject) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    norder = 0;
    flash_on_settle(ctx, p, log_cb, IV(1));
    cr_assert_eq(flash_reject(ctx, p, FLASH_ESOURCE, NULL), 0);
    cr_assert_eq(norder, 0);
    flash_drain(ctx);
    cr_assert_eq(norder, 1);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, callbacks_run_by_flash_wait_without_explicit_drain) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    flash_promise *q = flash_promise_new(ctx);
    norder = 0;
    flash_on_settle(ctx, p, log_cb, IV(1));
    flash_resolve(ctx, p, NULL);
    flash_resolve(ctx, q, IV(3));
    void *v;
    cr_assert_eq(flash_wait(ctx, q, &v), 0);
    cr_assert_eq(VI(v), 3);
    cr_assert_eq(norder, 1, "wait drains the queue");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, callback_added_after_settling_still_runs_later) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    norder = 0;
    flash_on_settle(ctx, p, log_cb, IV(1));
    flash_resolve(ctx, p, NULL);
    flash_on_settle(ctx, p, log_cb, IV(2)); /* settled, callbacks not yet run */
    cr_assert_eq(norder, 0);
    flash_drain(ctx);
    cr_assert_eq(norder, 2);
    cr_assert_eq(order[0], 1);
    cr_assert_eq(order[1], 2);
    /* and long after the drain */
    cr_assert_eq(flash_on_settle(ctx, p, log_cb, IV(3)), 0);
    cr_assert_eq(norder, 2, "not run synchronously by flash_on_settle");
    flash_drain(ctx);
    cr_assert_eq(norder, 3);
    cr_assert_eq(order[2], 3);
    /* on a constructor-settled promise too */
    flash_on_settle(ctx, flash_rejected(ctx, FLASH_EBACKEND, NULL), log_cb, IV(4));
    flash_drain(ctx);
    cr_assert_eq(norder, 4);
    cr_assert_eq(order[3], 4);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, callbacks_of_several_promises_run_in_settle_order) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *a = flash_promise_new(ctx), *b = flash_promise_new(ctx), *c = flash_promise_new(ctx);
    norder = 0;
    flash_on_settle(ctx, a, log_cb, IV(1));
    flash_on_settle(ctx, b, log_cb, IV(2));
    flash_on_settle(ctx, c, log_cb, IV(3));
    flash_resolve(ctx, c, NULL);
    flash_reject(ctx, a, FLASH_ESOURCE, NULL);
    flash_resolve(ctx, b, NULL);
    flash_drain(ctx);
    cr_assert_eq(norder, 3);
    cr_assert_eq(order[0], 3);
    cr_assert_eq(order[1], 1);
    cr_assert_eq(order[2], 2);
    flash_ctx_destroy(ctx);
}

/* ---- chaining ------------------------------------------------------------ */

static int then_calls, catch_calls;
static flash_promise *add_one(flash_ctx *ctx, void *value, void *arg) {
    (void)arg;
    then_calls++;
    return flash_fulfilled(ctx, IV(VI(value) + 1));
}
static flash_promise *return_arg(flash_ctx *ctx, void *value, void *arg) {
    (void)ctx; (void)value;
    then_calls++;
    return (flash_promise *)arg;
}
static flash_promise *return_null(flash_ctx *ctx, void *value, void *arg) {
    (void)ctx; (void)value; (void)arg;
    then_calls++;
    return NULL;
}
static flash_promise *then_reject(flash_ctx *ctx, void *value, void *arg) {
    (void)value; (void)arg;
    then_calls++;
    return flash_rejected(ctx, FLASH_EMULTIPLE, "two rows");
}
static flash_promise *recover(flash_ctx *ctx, int code, const char *message, void *arg) {
    (void)arg;
    catch_calls++;
    return flash_fulfilled(ctx, flash_sprintf(ctx, "recovered %d %s", code, message));
}
static flash_promise *catch_return_arg(flash_ctx *ctx, int code, const char *message, void *arg) {
    (void)ctx; (void)code; (void)message;
    catch_calls++;
    return (flash_promise *)arg;
}

FLASH_TEST(promise, then_transforms_and_chains) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    then_calls = 0;
    flash_promise *q = flash_then(ctx, p, add_one, NULL);
    flash_promise *r = flash_then(ctx, q, add_one, NULL);
    flash_promise *s = flash_then(ctx, r, add_one, NULL);
    cr_assert_eq(flash_promise_state(s), FLASH_PENDING);
    flash_resolve(ctx, p, IV(10));
    cr_assert_eq(then_calls, 0, "then functions run from the queue");
    void *v;
    cr_assert_eq(flash_wait(ctx, s, &v), 0);
    cr_assert_eq(VI(v), 13);
    cr_assert_eq(then_calls, 3);
    cr_assert_eq(VI(flash_promise_value(q)), 11);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, then_on_an_already_settled_promise_runs_on_next_drain) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    then_calls = 0;
    flash_promise *q = flash_then(ctx, flash_fulfilled(ctx, IV(1)), add_one, NULL);
    cr_assert_eq(then_calls, 0);
    cr_assert_eq(flash_promise_state(q), FLASH_PENDING);
    flash_drain(ctx);
    cr_assert_eq(then_calls, 1);
    cr_assert_eq(flash_promise_state(q), FLASH_FULFILLED);
    cr_assert_eq(VI(flash_promise_value(q)), 2);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, then_returning_a_pending_promise_follows_it) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_fulfilled(ctx, IV(1));
    flash_promise *inner = flash_promise_new(ctx);
    then_calls = 0;
    flash_promise *q = flash_then(ctx, p, return_arg, inner);
    flash_drain(ctx);
    cr_assert_eq(then_calls, 1);
    cr_assert_eq(flash_promise_state(q), FLASH_PENDING, "q follows inner, still pending");
    flash_resolve(ctx, inner, IV(99));
    void *v;
    cr_assert_eq(flash_wait(ctx, q, &v), 0);
    cr_assert_eq(VI(v), 99);
    /* and a rejection of the followed promise */
    flash_promise *inner2 = flash_promise_new(ctx);
    flash_promise *q2 = flash_then(ctx, p, return_arg, inner2);
    flash_drain(ctx);
    flash_reject(ctx, inner2, FLASH_ETIMEDOUT, "slow");
    cr_assert_eq(flash_wait(ctx, q2, &v), FLASH_ETIMEDOUT);
    cr_assert_str_eq(flash_promise_message(q2), "slow");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, then_returning_null_rejects_with_enomem) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *q = flash_then(ctx, flash_fulfilled(ctx, NULL), return_null, NULL);
    void *v = IV(1);
    cr_assert_eq(flash_wait(ctx, q, &v), FLASH_ENOMEM);
    cr_assert_null(v, "value is cleared on error");
    cr_assert_eq(flash_promise_error(q), FLASH_ENOMEM);
    /* catch returning NULL too */
    flash_promise *c = flash_catch(ctx, flash_rejected(ctx, FLASH_ESOURCE, NULL), catch_return_arg, NULL);
    cr_assert_eq(flash_wait(ctx, c, NULL), FLASH_ENOMEM);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, then_returning_a_rejection_rejects) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *q = flash_then(ctx, flash_fulfilled(ctx, NULL), then_reject, NULL);
    cr_assert_eq(flash_wait(ctx, q, NULL), FLASH_EMULTIPLE);
    cr_assert_str_eq(flash_promise_message(q), "two rows");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, rejection_passes_then_untouched) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    then_calls = 0;
    flash_promise *q = flash_then(ctx, flash_then(ctx, p, add_one, NULL), add_one, NULL);
    flash_reject(ctx, p, FLASH_ENOTFOUND, "User 42");
    cr_assert_eq(flash_wait(ctx, q, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(q), "User 42");
    cr_assert_eq(then_calls, 0, "then functions are skipped on rejection");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, catch_recovers_and_fulfilment_passes_catch_untouched) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    catch_calls = 0;
    flash_promise *r = flash_catch(ctx, flash_rejected(ctx, FLASH_ENOTFOUND, "gone"), recover, NULL);
    void *v;
    cr_assert_eq(flash_wait(ctx, r, &v), 0);
    cr_assert_str_eq((char *)v, "recovered -1 gone");
    cr_assert_eq(catch_calls, 1);
    flash_promise *f = flash_catch(ctx, flash_fulfilled(ctx, IV(8)), recover, NULL);
    cr_assert_eq(flash_wait(ctx, f, &v), 0);
    cr_assert_eq(VI(v), 8);
    cr_assert_eq(catch_calls, 1, "catch function skipped on fulfilment");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, catch_returning_pending_promise_follows_it) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *inner = flash_promise_new(ctx);
    flash_promise *c = flash_catch(ctx, flash_rejected(ctx, FLASH_EBACKEND, NULL), catch_return_arg, inner);
    flash_drain(ctx);
    cr_assert_eq(flash_promise_state(c), FLASH_PENDING);
    flash_resolve(ctx, inner, IV(5));
    void *v;
    cr_assert_eq(flash_wait(ctx, c, &v), 0);
    cr_assert_eq(VI(v), 5);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, then_then_catch_chain_like_python_try) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    then_calls = catch_calls = 0;
    flash_promise *p = flash_then(ctx, flash_fulfilled(ctx, IV(1)), then_reject, NULL);
    p = flash_then(ctx, p, add_one, NULL); /* skipped */
    p = flash_catch(ctx, p, recover, NULL);
    void *v;
    cr_assert_eq(flash_wait(ctx, p, &v), 0);
    cr_assert_str_eq((char *)v, "recovered -12 two rows");
    cr_assert_eq(then_calls, 1);
    cr_assert_eq(catch_calls, 1);
    flash_ctx_destroy(ctx);
}

static flash_promise *self_ref;
static flash_promise *return_self(flash_ctx *ctx, void *value, void *arg) {
    (void)ctx; (void)value; (void)arg;
    return self_ref;
}

FLASH_TEST(promise, then_returning_its_own_result_rejects_instead_of_hanging) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *q = flash_then(ctx, flash_fulfilled(ctx, NULL), return_self, NULL);
    self_ref = q; /* the handler runs later, from the queue */
    cr_assert_eq(flash_wait(ctx, q, NULL), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, null_arguments_are_einval_and_do_not_crash) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    cr_assert_null(flash_promise_new(NULL));
    cr_assert_null(flash_fulfilled(NULL, NULL));
    cr_assert_null(flash_rejected(NULL, FLASH_EINVAL, NULL));
    cr_assert_eq(flash_resolve(ctx, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_resolve(NULL, p, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_reject(ctx, NULL, FLASH_ESOURCE, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_reject(NULL, p, FLASH_ESOURCE, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_rejectf(ctx, NULL, FLASH_ESOURCE, "%d", 1), FLASH_EINVAL);
    cr_assert_eq(flash_on_settle(ctx, NULL, log_cb, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_on_settle(NULL, p, log_cb, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_on_settle(ctx, p, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING, "failed calls leave p alone");
    cr_assert_eq(flash_promise_state(NULL), FLASH_REJECTED);
    cr_assert_eq(flash_promise_error(NULL), FLASH_EINVAL);
    cr_assert_null(flash_promise_value(NULL));
    /* then/catch with a NULL promise or function reject with EINVAL */
    flash_promise *t = flash_then(ctx, NULL, add_one, NULL);
    cr_assert_not_null(t);
    cr_assert_eq(flash_promise_error(t), FLASH_EINVAL);
    flash_promise *t2 = flash_then(ctx, p, NULL, NULL);
    cr_assert_not_null(t2);
    cr_assert_eq(flash_promise_error(t2), FLASH_EINVAL);
    flash_promise *c = flash_catch(ctx, NULL, recover, NULL);
    cr_assert_eq(flash_promise_error(c), FLASH_EINVAL);
    flash_promise *c2 = flash_catch(ctx, p, NULL, NULL);
    cr_assert_eq(flash_promise_error(c2), FLASH_EINVAL);
    cr_assert_null(flash_then(NULL, p, add_one, NULL));
    cr_assert_eq(flash_wait(ctx, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_wait(NULL, p, NULL), FLASH_EINVAL);
    flash_drain(NULL);
    cr_assert_not(flash_ctx_busy(NULL));
    flash_ctx_destroy(ctx);
}

/* ---- re-entrancy ---------------------------------------------------------- */

static flash_promise *made_in_cb;
static void cb_creates_chains_gathers(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p; (void)arg;
    flash_promise *a = flash_promise_new(ctx);
    flash_promise *b = flash_then(ctx, a, add_one, NULL);
    flash_promise *c = flash_fulfilled(ctx, IV(100));
    flash_promise *both[2] = {b, c};
    made_in_cb = flash_gather(ctx, 2, both);
    flash_resolve(ctx, a, IV(1));
}

FLASH_TEST(promise, callback_may_create_chain_and_gather_in_the_same_drain) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    made_in_cb = NULL;
    then_calls = 0;
    flash_on_settle(ctx, p, cb_creates_chains_gathers, NULL);
    flash_resolve(ctx, p, NULL);
    flash_drain(ctx); /* one drain runs everything the callback started */
    cr_assert_not_null(made_in_cb);
    cr_assert_eq(flash_promise_state(made_in_cb), FLASH_FULFILLED);
    void **vals = (void **)flash_promise_value(made_in_cb);
    cr_assert_eq(VI(vals[0]), 2);
    cr_assert_eq(VI(vals[1]), 100);
    cr_assert_not(flash_ctx_busy(ctx));
    flash_ctx_destroy(ctx);
}

static void cb_settles_other(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p;
    flash_resolve(ctx, (flash_promise *)arg, IV(VI(flash_promise_value(p)) * 2));
}

FLASH_TEST(promise, callbacks_settling_other_promises_cascade) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *ps[20];
    for (int i = 0; i < 20; i++) ps[i] = flash_promise_new(ctx);
    for (int i = 0; i < 19; i++) flash_on_settle(ctx, ps[i], cb_settles_other, ps[i + 1]);
    flash_resolve(ctx, ps[0], IV(1));
    void *v;
    cr_assert_eq(flash_wait(ctx, ps[19], &v), 0);
    cr_assert_eq(VI(v), 1 << 19);
    flash_ctx_destroy(ctx);
}

static int reset_cb_runs;
static void cb_resets(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p; (void)arg;
    reset_cb_runs++;
    flash_ctx_reset(ctx);
}

FLASH_TEST(promise, callback_that_resets_does_not_crash_and_wait_is_canceled) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    flash_promise *other = flash_promise_new(ctx);
    reset_cb_runs = 0;
    norder = 0;
    flash_on_settle(ctx, p, cb_resets, NULL);
    flash_on_settle(ctx, p, log_cb, IV(1)); /* after the reset: cancelled */
    flash_on_settle(ctx, other, log_cb, IV(2));
    flash_resolve(ctx, p, NULL);
    flash_resolve(ctx, other, NULL);
    cr_assert_eq(flash_wait(ctx, other, NULL), FLASH_ECANCELED);
    cr_assert_eq(reset_cb_runs, 1);
    cr_assert_eq(norder, 0, "work of the old request is cancelled by the reset");
    /* the context serves the next request normally */
    flash_promise *n = flash_then(ctx, flash_fulfilled(ctx, IV(1)), add_one, NULL);
    void *v;
    cr_assert_eq(flash_wait(ctx, n, &v), 0);
    cr_assert_eq(VI(v), 2);
    flash_ctx_destroy(ctx);
}

static void *alloc_after_reset;
static void cb_resets_then_allocates(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)arg;
    /* p and its memory must stay readable until this callback returns */
    int before = VI(flash_promise_value(p));
    flash_ctx_reset(ctx);
    alloc_after_reset = flash_alloc(ctx, 64);
    memset(alloc_after_reset, 0xAB, 64);
    cr_assert_eq(VI(flash_promise_value(p)), before);
}

FLASH_TEST(promise, memory_of_old_request_lives_until_the_resetting_callback_returns) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    flash_on_settle(ctx, p, cb_resets_then_allocates, NULL);
    flash_resolve(ctx, p, IV(77));
    flash_drain(ctx);
    cr_assert_not_null(alloc_after_reset);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, reset_inside_then_handler_cancels_the_chain) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    then_calls = 0;
    reset_cb_runs = 0;
    flash_on_settle(ctx, p, cb_resets, NULL);
    flash_promise *q = flash_then(ctx, p, add_one, NULL);
    flash_resolve(ctx, p, IV(1));
    cr_assert_eq(flash_wait(ctx, q, NULL), FLASH_ECANCELED);
    cr_assert_eq(then_calls, 0);
    cr_assert_eq(reset_cb_runs, 1);
    flash_ctx_destroy(ctx);
}

/* An asynchronous loop of N steps: step(i) = then(step(i+1)). Each outer
   promise follows the inner one, so settling the innermost one settles a
   chain of N followers. */
static flash_promise *step_fn(flash_ctx *ctx, void *value, void *arg) {
    intptr_t left = (intptr_t)arg;
    if (left == 0) return flash_fulfilled(ctx, value);
    return flash_then(ctx, flash_fulfilled(ctx, IV(VI(value) + 1)), step_fn, (void *)(left - 1));
}

FLASH_TEST(promise, long_async_loop_of_follows_does_not_overflow_the_stack) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_then(ctx, flash_fulfilled(ctx, IV(0)), step_fn, (void *)(intptr_t)200000);
    void *v;
    cr_assert_eq(flash_wait(ctx, p, &v), 0);
    cr_assert_eq(VI(v), 200000);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(promise, deep_then_chain_built_upfront) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *root = flash_promise_new(ctx), *p = root;
    for (int i = 0; i < 100000; i++) p = flash_then(ctx, p, add_one, NULL);
    flash_resolve(ctx, root, IV(0));
    void *v;
    cr_assert_eq(flash_wait(ctx, p, &v), 0);
    cr_assert_eq(VI(v), 100000);
    flash_ctx_destroy(ctx);
}
