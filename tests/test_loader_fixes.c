/* The loader fixes of issue #12: batch-level failures are never memoised
   (even with memo_errors), flash_prime_error, flash_batch_follow,
   flash_batch_loader, and fills_skipped counted inside the lag window. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "models.h"

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int64_t)(intptr_t)(p))

TestSuite(loader_fixes, .init = flash_test_watchdog);

/* ---- batch-level failures with memo_errors ---------------------------------- */

enum { MODE_FAIL, MODE_WRONG_COUNT, MODE_END_UNSETTLED, MODE_REJECT_EACH, MODE_MIXED };
static int mode, ncalls;
static size_t last_size;
static int complete_rc, end_rc, fail_rc;
static flash_loader *seen_loader;

/* Keys "ok*" resolve, "bad*" reject per key, the rest is left to the mode. */
static void mode_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    ncalls++;
    last_size = flash_batch_size(b);
    seen_loader = flash_batch_loader(b);
    cr_assert_eq(flash_batch_ctx(b), ctx);
    switch (mode) {
    case MODE_FAIL:
        fail_rc = flash_batch_fail(b, FLASH_EBACKEND, "down");
        break;
    case MODE_WRONG_COUNT: {
        flash_result r[8];
        memset(r, 0, sizeof r);
        for (size_t i = 0; i < 8; i++) r[i].value = IV(i + 1);
        complete_rc = flash_batch_complete(b, flash_batch_size(b) + 1, r);
        break;
    }
    case MODE_END_UNSETTLED:
        end_rc = flash_batch_end(b);
        break;
    case MODE_REJECT_EACH:
        for (size_t i = 0; i < flash_batch_size(b); i++)
            flash_batch_reject(b, i, FLASH_ENOTFOUND, flash_sprintf(ctx, "no %s", (const char *)flash_batch_key(b, i, NULL)));
        break;
    case MODE_MIXED:
        for (size_t i = 0; i < flash_batch_size(b); i++) {
            const char *k = (const char *)flash_batch_key(b, i, NULL);
            if (strncmp(k, "ok", 2) == 0) flash_batch_resolve(b, i, IV(100 + (int)i));
            else if (strncmp(k, "bad", 3) == 0) flash_batch_reject(b, i, FLASH_ENOTFOUND, "bad key");
        }
        end_rc = flash_batch_end(b);
        break;
    }
}
static const flash_loader_desc MEMO_ERR = {.name = "memo_err", .batch = mode_batch, .memo_errors = true};
static const flash_loader_desc NO_MEMO_ERR = {.name = "plain", .batch = mode_batch};

static void reset_calls(int m) {
    mode = m;
    ncalls = 0;
    complete_rc = end_rc = fail_rc = 12345;
}

FLASH_TEST(loader_fixes, batch_fail_is_not_memoised_even_with_memo_errors) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &MEMO_ERR);
    reset_calls(MODE_FAIL);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_EBACKEND);
    cr_assert_str_eq(flash_promise_message(a), "down");
    cr_assert_eq(fail_rc, 0);
    cr_assert_eq(ncalls, 1);
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_neq(a2, a, "forgotten: a new promise");
    cr_assert_eq(flash_promise_state(a2), FLASH_PENDING);
    cr_assert_eq(flash_wait(ctx, a2, NULL), FLASH_EBACKEND);
    cr_assert_eq(ncalls, 2, "the batch function is called again");
    cr_assert_eq(flash_ctx_stats(ctx).memo_hits, 0);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, a_wrong_result_count_is_not_memoised_even_with_memo_errors) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &MEMO_ERR);
    reset_calls(MODE_WRONG_COUNT);
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_EBATCH);
    cr_assert_eq(flash_wait(ctx, b, NULL), FLASH_EBATCH);
    cr_assert_eq(complete_rc, FLASH_EBATCH);
    cr_assert_eq(ncalls, 1);
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_neq(a2, a);
    cr_assert_eq(flash_wait(ctx, a2, NULL), FLASH_EBATCH);
    cr_assert_eq(ncalls, 2);
    cr_assert_eq(last_size, 1);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, batch_end_with_keys_unsettled_is_not_memoised_but_per_key_results_are) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &MEMO_ERR);
    reset_calls(MODE_MIXED);
    flash_promise *ok = flash_load_str(l, "ok1"), *bad = flash_load_str(l, "bad1"), *left = flash_load_str(l, "left1");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    cr_assert_eq(end_rc, 0);
    cr_assert_eq(flash_promise_state(ok), FLASH_FULFILLED);
    cr_assert_eq(flash_promise_error(bad), FLASH_ENOTFOUND);
    cr_assert_eq(flash_promise_error(left), FLASH_EBATCH);
    /* ok and bad stay memoised (memo_errors), left is forgotten */
    cr_assert_eq(flash_load_str(l, "ok1"), ok);
    cr_assert_eq(flash_load_str(l, "bad1"), bad, "a key's own rejection stays memoised with memo_errors");
    flash_promise *left2 = flash_load_str(l, "left1");
    cr_assert_neq(left2, left);
    cr_assert_eq(flash_wait(ctx, left2, NULL), FLASH_EBATCH);
    cr_assert_eq(ncalls, 2);
    cr_assert_eq(last_size, 1, "only the forgotten key was asked again");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, batch_end_with_every_key_unsettled_is_not_memoised) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &MEMO_ERR);
    reset_calls(MODE_END_UNSETTLED);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_EBATCH);
    cr_assert_eq(end_rc, 0);
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_neq(a2, a);
    cr_assert_eq(flash_wait(ctx, a2, NULL), FLASH_EBATCH);
    cr_assert_eq(ncalls, 2);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, per_key_rejections_stay_memoised_only_with_memo_errors) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &MEMO_ERR);
    reset_calls(MODE_REJECT_EACH);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(a), "no a");
    cr_assert_eq(flash_load_str(l, "a"), a);
    cr_assert_eq(ncalls, 1, "memoised: no second call");
    cr_assert_eq(flash_ctx_stats(ctx).memo_hits, 1);

    flash_loader *p = flash_loader_for(ctx, &NO_MEMO_ERR);
    flash_promise *b = flash_load_str(p, "b");
    cr_assert_eq(flash_wait(ctx, b, NULL), FLASH_ENOTFOUND);
    flash_promise *b2 = flash_load_str(p, "b");
    cr_assert_neq(b2, b, "without memo_errors a failed key is forgotten");
    cr_assert_eq(flash_wait(ctx, b2, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(ncalls, 3);
    flash_ctx_destroy(ctx);
}

/* ---- flash_prime_error -------------------------------------------------------- */

static void echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    ncalls++;
    seen_loader = flash_batch_loader(b);
    for (size_t i = 0; i < flash_batch_size(b); i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}
static const flash_loader_desc ECHO = {.name = "echo", .batch = echo_batch};

FLASH_TEST(loader_fixes, prime_error_rejects_loads_without_calling_the_batch_function) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &ECHO);
    ncalls = 0;
    cr_assert_eq(flash_prime_error(l, "x", 1, FLASH_ENOTFOUND, "gone"), 0);
    flash_promise *x = flash_load(l, "x", 1);
    cr_assert_eq(flash_promise_state(x), FLASH_REJECTED, "settled from the start");
    cr_assert_eq(flash_promise_error(x), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(x), "gone");
    cr_assert_eq(flash_wait(ctx, x, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(flash_load(l, "x", 1), x, "memoised");
    cr_assert_eq(ncalls, 0);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 0);

    /* a NULL message: the code's own */
    cr_assert_eq(flash_prime_error(l, "y", 1, FLASH_ETIMEDOUT, NULL), 0);
    cr_assert_str_eq(flash_promise_message(flash_load(l, "y", 1)), flash_strerror(FLASH_ETIMEDOUT));

    /* never overwrites: a primed value, a primed error, a pending load */
    cr_assert_eq(flash_prime(l, "v", 1, IV(5)), 0);
    cr_assert_eq(flash_prime_error(l, "v", 1, FLASH_ESOURCE, "no"), 0);
    cr_assert_eq(VI(flash_promise_value(flash_load(l, "v", 1))), 5);
    cr_assert_eq(flash_prime_error(l, "x", 1, FLASH_ESOURCE, "other"), 0);
    cr_assert_eq(flash_promise_error(flash_load(l, "x", 1)), FLASH_ENOTFOUND);
    cr_assert_eq(flash_prime(l, "x", 1, IV(1)), 0);
    cr_assert_eq(flash_promise_state(flash_load(l, "x", 1)), FLASH_REJECTED);
    flash_promise *pend = flash_load(l, "pend", 4);
    cr_assert_eq(flash_prime_error(l, "pend", 4, FLASH_ESOURCE, "no"), 0);
    cr_assert_eq(flash_load(l, "pend", 4), pend);
    cr_assert_eq(flash_wait(ctx, pend, NULL), 0, "the pending load is untouched");
    cr_assert_eq(ncalls, 1);

    /* bad input */
    cr_assert_eq(flash_prime_error(l, "z", 1, 0, "zero"), FLASH_EINVAL);
    cr_assert_eq(flash_prime_error(l, NULL, 1, FLASH_ENOTFOUND, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_prime_error(l, "z", 0, FLASH_ENOTFOUND, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_prime_error(NULL, "z", 1, FLASH_ENOTFOUND, NULL), FLASH_EINVAL);
    flash_promise *z = flash_load(l, "z", 1);
    cr_assert_eq(flash_wait(ctx, z, NULL), 0, "code 0 primed nothing");
    cr_assert_eq(ncalls, 2);

    /* flash_clear removes it: the next load asks the batch function */
    cr_assert_eq(flash_clear(l, "x", 1), 0);
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, flash_load(l, "x", 1), &v), 0);
    cr_assert_str_eq((const char *)v, "x");
    cr_assert_eq(ncalls, 3);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, prime_error_is_a_memo_entry_cleared_by_clear_all_and_reset) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &ECHO);
    ncalls = 0;
    cr_assert_eq(flash_prime_error(l, "a", 1, FLASH_ENOTFOUND, "gone"), 0);
    cr_assert_eq(flash_prime_error(l, "b", 1, FLASH_ENOTFOUND, "gone"), 0);
    flash_clear_all(l);
    cr_assert_eq(flash_wait(ctx, flash_load(l, "a", 1), NULL), 0);
    cr_assert_eq(ncalls, 1);
    cr_assert_eq(flash_prime_error(l, "c", 1, FLASH_ENOTFOUND, "gone"), 0);
    flash_ctx_reset(ctx);
    l = flash_loader_for(ctx, &ECHO);
    cr_assert_eq(flash_wait(ctx, flash_load(l, "c", 1), NULL), 0);
    cr_assert_eq(ncalls, 2);
    flash_ctx_destroy(ctx);
}

/* ---- flash_batch_follow: a loader over a loader -------------------------------- */

/* inner: "n<k>" resolves to k*10, "e<k>" rejects ENOTFOUND "inner no <key>". */
static int inner_calls, outer_calls;
static void inner_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    inner_calls++;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        const char *k = (const char *)flash_batch_key(b, i, NULL);
        if (k[0] == 'e') flash_batch_reject(b, i, FLASH_ENOTFOUND, flash_sprintf(ctx, "inner no %s", k));
        else flash_batch_resolve(b, i, IV(atoi(k + 1) * 10));
    }
}
static const flash_loader_desc INNER = {.name = "inner", .batch = inner_batch};

static int follow_rcs[16];
/* outer keys: "n*"/"e*" follow the inner load of the same key, "s<k>" a
   settled promise, "p*" an inner key primed beforehand, "null" NULL,
   "self" its own promise. */
static void outer_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    outer_calls++;
    cr_assert_eq(flash_batch_loader(b), flash_loader_for(ctx, (const flash_loader_desc *)ud));
    flash_loader *in = flash_loader_for(ctx, &INNER);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        const char *k = (const char *)flash_batch_key(b, i, NULL);
        flash_promise *p;
        if (strcmp(k, "null") == 0) p = NULL;
        else if (strcmp(k, "self") == 0) p = flash_batch_promise(b, i);
        else if (k[0] == 's') p = flash_fulfilled(ctx, IV(atoi(k + 1)));
        else if (k[0] == 'r') p = flash_rejected(ctx, FLASH_ESOURCE, "settled rejection");
        else p = flash_load_str(in, k);
        follow_rcs[i < 16 ? i : 15] = flash_batch_follow(b, i, p);
    }
}
static const flash_loader_desc OUTER;
static const flash_loader_desc OUTER = {.name = "outer", .batch = outer_batch, .user_data = (void *)&OUTER};

/* The same pair with an inner loader dispatched by hand (a custom
   schedule), so that the test sees the tick the inner batch runs in. */
static void manual_schedule(flash_ctx *ctx, flash_loader *l, void *ud) {
    (void)ctx;
    (void)l;
    (void)ud;
}
static const flash_loader_desc INNER_MANUAL = {.name = "inner_manual", .batch = inner_batch, .schedule = manual_schedule};
static void outer_manual_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    outer_calls++;
    flash_loader *in = flash_loader_for(ctx, &INNER_MANUAL);
    for (size_t i = 0; i < flash_batch_size(b); i++)
        flash_batch_follow(b, i, flash_load_str(in, (const char *)flash_batch_key(b, i, NULL)));
}
static const flash_loader_desc OUTER_MANUAL = {.name = "outer_manual", .batch = outer_manual_batch};

static bool outer_settled_when_inner_did;
static flash_promise *watched_outer;
static void on_inner(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx;
    (void)p;
    (void)arg;
    outer_settled_when_inner_did = flash_promise_state(watched_outer) != FLASH_PENDING;
}

FLASH_TEST(loader_fixes, batch_follow_a_loader_over_a_loader) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *out = flash_loader_for(ctx, &OUTER), *in = flash_loader_for(ctx, &INNER);
    inner_calls = outer_calls = 0;
    const char *keys[] = {"n1", "e2", "s3", "r4", "null", "self", "n5"};
    enum { NK = sizeof keys / sizeof keys[0] };
    flash_promise *ps[NK];
    for (size_t i = 0; i < NK; i++) ps[i] = flash_load_str(out, keys[i]);
    flash_settled *st = NULL;
    cr_assert_eq(flash_wait(ctx, flash_gather_settled(ctx, NK, ps), (void **)&st), 0);
    cr_assert_eq(outer_calls, 1);
    cr_assert_eq(inner_calls, 1, "the inner keys of the outer batch make one inner batch");
    cr_assert_eq(st[0].state, FLASH_FULFILLED);
    cr_assert_eq(VI(st[0].value), 10);
    cr_assert_eq(st[1].error, FLASH_ENOTFOUND);
    cr_assert_str_eq(st[1].message, "inner no e2", "the inner rejection's message");
    cr_assert_eq(VI(st[2].value), 3, "an already settled promise");
    cr_assert_eq(st[2].state, FLASH_FULFILLED);
    cr_assert_eq(st[3].error, FLASH_ESOURCE);
    cr_assert_str_eq(st[3].message, "settled rejection");
    cr_assert_eq(st[4].error, FLASH_EINVAL, "NULL promise");
    cr_assert_eq(st[5].error, FLASH_EINVAL, "its own promise");
    cr_assert_eq(VI(st[6].value), 50);
    cr_assert_eq(follow_rcs[0], 0);
    cr_assert_eq(follow_rcs[2], 0);
    cr_assert_eq(follow_rcs[4], FLASH_EINVAL);
    cr_assert_eq(follow_rcs[5], FLASH_EINVAL);
    /* memoised in both */
    cr_assert_eq(flash_load_str(out, "n1"), ps[0]);
    cr_assert_eq(flash_promise_state(flash_load_str(in, "n1")), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, batch_follow_settles_the_outer_key_in_the_inner_keys_tick) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *out = flash_loader_for(ctx, &OUTER_MANUAL), *in = flash_loader_for(ctx, &INNER_MANUAL);
    inner_calls = outer_calls = 0;
    outer_settled_when_inner_did = false;
    watched_outer = flash_load_str(out, "n7");
    flash_promise *err = flash_load_str(out, "e8");
    flash_drain(ctx); /* the outer batch: it loads the inner keys, whose batch waits */
    cr_assert_eq(outer_calls, 1);
    cr_assert_eq(inner_calls, 0);
    flash_promise *inner = flash_load_str(in, "n7");
    cr_assert_eq(flash_promise_state(inner), FLASH_PENDING);
    cr_assert_eq(flash_on_settle(ctx, inner, on_inner, NULL), 0);
    cr_assert_eq(flash_loader_dispatch(in), 0); /* the inner batch settles its keys now */
    cr_assert_eq(inner_calls, 1);
    cr_assert_eq(flash_promise_state(inner), FLASH_FULFILLED);
    cr_assert_eq(flash_promise_state(watched_outer), FLASH_FULFILLED, "settled with the inner key, no extra tick");
    cr_assert_eq(VI(flash_promise_value(watched_outer)), 70);
    cr_assert_eq(flash_promise_error(err), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(err), "inner no e8");
    cr_assert_not(outer_settled_when_inner_did, "callbacks run from the queue");
    flash_drain(ctx);
    cr_assert(outer_settled_when_inner_did, "the outer key was settled before the inner's first callback ran");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fixes, batch_follow_and_batch_loader_bad_input) {
    cr_assert_null(flash_batch_loader(NULL));
    cr_assert_eq(flash_batch_follow(NULL, 0, NULL), FLASH_EINVAL);
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &ECHO);
    ncalls = 0;
    seen_loader = NULL;
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, "k"), NULL), 0);
    cr_assert_eq(seen_loader, l, "flash_batch_loader gives the batch's loader");
    flash_ctx_destroy(ctx);
}

/* ---- fills_skipped in the lag window ------------------------------------------- */

static int64_t now_ms = 1800000000000;
static int64_t clock_fn(void *ud) {
    (void)ud;
    return now_ms;
}
static void setup_clock(void) {
    flash_desc d = {0};
    d.clock_ms = clock_fn;
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(&d);
}
static void teardown_clock(void) { fixture_teardown(); }
TestSuite(loader_fixes_lag, .init = setup_clock, .fini = teardown_clock);

static void *get_ok(flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(fx.ctx, p, &v);
    cr_assert_eq(rc, 0, "%s: %s", flash_strerror(rc), flash_promise_message(p));
    return v;
}

FLASH_TEST(loader_fixes_lag, fills_skipped_inside_the_lag_window_are_counted) {
    User rows[3];
    for (int i = 0; i < 3; i++) rows[i] = *(User *)get_ok(User_get_by_id_async(fx.ctx, 20 + i));
    fixture_settle();
    for (int i = 0; i < 3; i++) cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &rows[i], &rows[i]), 0);
    fixture_settle();
    flash_ctx_reset(fx.ctx);
    stats_delta();
    now_ms += 100; /* inside the default 300 ms */
    flash_promise *ps[3];
    for (int i = 0; i < 3; i++) ps[i] = User_get_by_id_async(fx.ctx, 20 + i);
    get_ok(flash_gather(fx.ctx, 3, ps));
    fixture_settle();
    flash_stats s = stats_delta();
    cr_assert_eq(s.source_calls, 1);
    cr_assert_eq(s.fills, 0);
    cr_assert_eq(s.fills_skipped, 3, "every skipped fill is counted, got %llu", (unsigned long long)s.fills_skipped);

    /* only-cache queries never fill: not counted as skipped */
    flash_ctx_reset(fx.ctx);
    stats_delta();
    flash_query *q = User_get_by_id_query(fx.ctx, 20);
    flash_promise *p = flash_query_run_async(fx.ctx, q, FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE);
    cr_assert_null(get_ok(p), "a marker is a miss");
    fixture_settle();
    s = stats_delta();
    cr_assert_eq(s.fills_skipped, 0);

    /* past the window: filled, nothing skipped */
    flash_ctx_reset(fx.ctx);
    now_ms += 400;
    stats_delta();
    for (int i = 0; i < 3; i++) ps[i] = User_get_by_id_async(fx.ctx, 20 + i);
    get_ok(flash_gather(fx.ctx, 3, ps));
    fixture_settle();
    s = stats_delta();
    cr_assert_eq(s.fills, 3);
    cr_assert_eq(s.fills_skipped, 0);
}
