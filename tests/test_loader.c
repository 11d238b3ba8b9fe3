/* Layer 5: the loader, with graphql/dataloader's contract. Most tests mirror
   a test of graphql/dataloader's own suite (named in the comment). */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <unistd.h>
#include <stdlib.h>
#include <signal.h>
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "flash.h"
#include "backends/loop/poll.h"
#include "harness.h"

/* This file is also compiled as the same suite on each loop adapter
   (tests/test_loader_*.c define LOADER_SUITE and LOADER_LOOP first): every
   context a test creates is then attached to a new loop of that kind. */
#ifndef LOADER_SUITE
#define LOADER_SUITE loader
#endif
#undef FLASH_TEST
#define FLASH_TEST(suite, name) FLASH_TEST_IN(LOADER_SUITE, name)
TestSuite(LOADER_SUITE, .init = flash_test_watchdog);

/* A context on its own (tests that attach a poll loop themselves). */
static flash_ctx *plain_ctx(void) { return (flash_ctx_create)(NULL); }

#ifdef LOADER_LOOP
#include "loops.h"
static struct {
    flash_ctx *ctx;
    void *native;
} loop_of[64];
static const flash_test_loop *loader_loop(void) {
    const flash_test_loop *L = flash_test_loop_find(LOADER_LOOP);
    cr_assert(L, "no loop %s", LOADER_LOOP);
    return L;
}
static flash_ctx *ctx_on_loop(const flash_desc *d) {
    flash_ctx *ctx = (flash_ctx_create)(d);
    if (!ctx) return NULL;
    for (int i = 0; i < 64; i++) {
        if (!loop_of[i].ctx) {
            loop_of[i].ctx = ctx;
            loop_of[i].native = loader_loop()->create();
            cr_assert_eq(loader_loop()->attach(ctx, loop_of[i].native), 0);
            return ctx;
        }
    }
    cr_assert_fail("too many contexts");
    return ctx;
}
static void ctx_off_loop(flash_ctx *ctx) {
    (flash_ctx_destroy)(ctx);
    for (int i = 0; i < 64; i++) {
        if (loop_of[i].ctx == ctx) {
            loader_loop()->destroy(loop_of[i].native);
            loop_of[i].ctx = NULL;
        }
    }
}
#define flash_ctx_create(d) ctx_on_loop(d)
#define flash_ctx_destroy(c) ctx_off_loop(c)
#endif

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int)(intptr_t)(p))

/* ---- a recording batch function ----------------------------------------- */

/* Every batch call is logged as "name:k1,k2,..." in call order (all loaders
   share one log, so the order across loaders is visible too). */
static char calls[64][512];
static int ncalls;

static void log_batch(const char *name, flash_batch *b) {
    char *out = calls[ncalls < 64 ? ncalls : 63];
    size_t n = (size_t)snprintf(out, 512, "%s:", name);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        n += (size_t)snprintf(out + n, 512 - n, "%s%.*s", i ? "," : "", (int)len, k);
    }
    ncalls++;
}

static void reset_log(void) {
    ncalls = 0;
    memset(calls, 0, sizeof calls);
}

/* Resolves "v:<key>"; keys starting with '!' are rejected ENOTFOUND. */
static void record_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    log_batch(ud ? (const char *)ud : "L", b);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        if (len && k[0] == '!')
            cr_assert_eq(flash_batch_reject(b, i, FLASH_ENOTFOUND, flash_sprintf(ctx, "no %.*s", (int)len, k)), 0);
        else
            cr_assert_eq(flash_batch_resolve(b, i, flash_sprintf(ctx, "v:%.*s", (int)len, k)), 0);
    }
}

static const flash_loader_desc L = {.name = "L", .batch = record_batch, .user_data = "L"};

static const char *value_of(flash_ctx *ctx, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "wait failed: %d %s", rc, flash_promise_message(p));
    return (const char *)v;
}

/* ---- batching -------------------------------------------------------------- */

/* "Batches multiple requests" */
FLASH_TEST(loader, loads_in_one_tick_make_one_batch_with_unique_keys_in_first_asked_order) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *c = flash_load_str(l, "c");
    flash_promise *a = flash_load_str(l, "a");
    flash_promise *c2 = flash_load_str(l, "c");
    flash_promise *b = flash_load_str(l, "b");
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_eq(ncalls, 0, "nothing is dispatched before the end of the tick");
    cr_assert_eq(flash_promise_state(c), FLASH_PENDING);
    cr_assert_eq(c, c2, "same key, same promise");
    cr_assert_eq(a, a2);
    cr_assert_str_eq(value_of(ctx, b), "v:b");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "L:c,a,b");
    cr_assert_str_eq(value_of(ctx, c), "v:c");
    cr_assert_str_eq(value_of(ctx, a2), "v:a");
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.loads, 5);
    cr_assert_eq(s.memo_hits, 2);
    cr_assert_eq(s.batches, 1);
    cr_assert_eq(s.batch_keys, 3);
    flash_ctx_destroy(ctx);
}

static void key_echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    log_batch((const char *)ud, b);
    for (size_t i = 0; i < flash_batch_size(b); i++) flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL));
}

FLASH_TEST(loader, binary_keys_with_nul_bytes_are_distinct) {
    static const flash_loader_desc d = {.batch = key_echo_batch, .user_data = "B"};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *x = flash_load(l, "x\0y", 3); /* binary keys with a NUL */
    flash_promise *z = flash_load(l, "x\0z", 3);
    cr_assert_neq(x, z, "keys differ after the NUL byte");
    reset_log();
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    cr_assert_eq(flash_promise_state(x), FLASH_FULFILLED);
    cr_assert_eq(memcmp(flash_promise_value(x), "x\0y", 4), 0);
    cr_assert_eq(memcmp(flash_promise_value(z), "x\0z", 4), 0);
    cr_assert_eq(flash_load(l, "x\0y", 3), x);
    cr_assert_neq(flash_load(l, "x", 1), x, "a prefix is another key");
    flash_ctx_destroy(ctx);
}

static flash_batch *seen_batch;
static flash_promise *seen_promise0;
static void inspect_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    seen_batch = b;
    seen_promise0 = flash_batch_promise(b, 0);
    cr_assert_eq(flash_batch_ctx(b), ctx);
    cr_assert_eq(flash_batch_size(b), 2);
    size_t len = 99;
    const char *k = (const char *)flash_batch_key(b, 1, &len);
    cr_assert_eq(len, 5);
    cr_assert_str_eq(k, "hello", "keys are NUL-terminated copies");
    cr_assert_null(flash_batch_key(b, 2, &len));
    cr_assert_eq(len, 0);
    cr_assert_null(flash_batch_promise(b, 2));
    cr_assert_null(flash_batch_payload(b, 2));
    flash_batch_resolve(b, 0, IV(1));
    flash_batch_resolve(b, 1, IV(2));
}
static const flash_loader_desc inspect_desc = {.batch = inspect_batch};

FLASH_TEST(loader, batch_accessors) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &inspect_desc);
    char key[8] = "hello";
    flash_promise *p0 = flash_load_str(l, "k");
    flash_promise *p1 = flash_load_str(l, key);
    memset(key, 'X', 5); /* the loader copied the key */
    flash_drain(ctx);
    cr_assert_eq(seen_promise0, p0, "flash_batch_promise is the promise load returned");
    cr_assert_eq(VI(flash_promise_value(p1)), 2);
    cr_assert_eq(flash_loader_ctx(l), ctx);
    cr_assert_eq(flash_batch_size(NULL), 0);
    cr_assert_null(flash_batch_key(NULL, 0, NULL));
    cr_assert_null(flash_batch_ctx(NULL));
    flash_ctx_destroy(ctx);
}

/* "Batches multiple requests with max batch sizes" */
FLASH_TEST(loader, max_batch_splits_in_order) {
    static const flash_loader_desc d = {.name = "M", .batch = record_batch, .user_data = "M", .max_batch = 2};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    const char *keys[5] = {"1", "2", "3", "4", "5"};
    flash_promise *ps[5];
    for (int i = 0; i < 5; i++) ps[i] = flash_load_str(l, keys[i]);
    cr_assert_eq(flash_load_str(l, "1"), ps[0], "a key of a full batch is still memoised");
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 5, ps), NULL), 0);
    cr_assert_eq(ncalls, 3);
    cr_assert_str_eq(calls[0], "M:1,2");
    cr_assert_str_eq(calls[1], "M:3,4");
    cr_assert_str_eq(calls[2], "M:5");
    for (int i = 0; i < 5; i++) cr_assert_str_eq(flash_promise_value(ps[i]), flash_sprintf(ctx, "v:%s", keys[i]));
    flash_ctx_destroy(ctx);
}

/* "May disable batching" */
FLASH_TEST(loader, no_batch_calls_once_per_key) {
    static const flash_loader_desc d = {.name = "N", .batch = record_batch, .user_data = "N", .no_batch = true};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    flash_promise *a = flash_load_str(l, "a");
    flash_promise *b = flash_load_str(l, "b");
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_eq(a, a2, "memo still applies");
    cr_assert_str_eq(value_of(ctx, b), "v:b");
    cr_assert_eq(flash_promise_state(a), FLASH_FULFILLED);
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[0], "N:a");
    cr_assert_str_eq(calls[1], "N:b");
    flash_ctx_destroy(ctx);
}

/* "Coalesces identical requests" / memo across ticks */
FLASH_TEST(loader, memo_hit_on_settled_key_is_the_same_promise_without_a_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_str_eq(value_of(ctx, a), "v:a");
    flash_promise *again = flash_load_str(l, "a");
    cr_assert_eq(again, a);
    cr_assert_eq(flash_promise_state(again), FLASH_FULFILLED, "answers at once");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    cr_assert_not(flash_ctx_busy(ctx), "a memo hit opens no batch");
    cr_assert_eq(flash_ctx_stats(ctx).memo_hits, 1);
    flash_ctx_destroy(ctx);
}

/* "May disable caching" — but keys stay unique within one batch (graphql
   bug #280), and a later tick asks again. */
FLASH_TEST(loader, no_memo_dedupes_within_a_batch_but_asks_again_later) {
    static const flash_loader_desc d = {.name = "U", .batch = record_batch, .user_data = "U", .no_memo = true};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    flash_promise *a = flash_load_str(l, "a");
    flash_promise *a2 = flash_load_str(l, "a");
    flash_promise *b = flash_load_str(l, "b");
    cr_assert_eq(a, a2);
    cr_assert_str_eq(value_of(ctx, b), "v:b");
    cr_assert_str_eq(value_of(ctx, a2), "v:a");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "U:a,b");
    flash_promise *a3 = flash_load_str(l, "a");
    cr_assert_eq(flash_promise_state(a3), FLASH_PENDING, "not served from a memo");
    cr_assert_str_eq(value_of(ctx, a3), "v:a");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "U:a");
    flash_ctx_destroy(ctx);
}

/* "Does not cache errors by default" / "Can clear values from cache after errors" */
FLASH_TEST(loader, failed_key_is_asked_again_by_default) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *e = flash_load_str(l, "!x");
    flash_promise *ok = flash_load_str(l, "y");
    cr_assert_eq(flash_wait(ctx, e, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(e), "no !x");
    cr_assert_str_eq(value_of(ctx, ok), "v:y");
    flash_promise *e2 = flash_load_str(l, "!x");
    cr_assert_neq(e2, e, "a failed key is not memoised");
    cr_assert_eq(flash_wait(ctx, e2, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(flash_load_str(l, "y"), ok, "successes stay memoised");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "L:!x");
    flash_ctx_destroy(ctx);
}

/* graphql request #258: an option to keep errors in the memo. */
FLASH_TEST(loader, memo_errors_keeps_the_rejection) {
    static const flash_loader_desc d = {.name = "E", .batch = record_batch, .user_data = "E", .memo_errors = true};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    flash_promise *e = flash_load_str(l, "!x");
    cr_assert_eq(flash_wait(ctx, e, NULL), FLASH_ENOTFOUND);
    flash_promise *e2 = flash_load_str(l, "!x");
    cr_assert_eq(e2, e);
    cr_assert_eq(flash_promise_state(e2), FLASH_REJECTED);
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    flash_ctx_destroy(ctx);
}

/* ---- prime / clear ------------------------------------------------------- */

/* "Allows priming the cache" / "Does not prime keys that already exist" */
FLASH_TEST(loader, prime_answers_without_a_batch_and_never_overwrites) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    cr_assert_eq(flash_prime(l, "a", 1, "primed-a"), 0);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_promise_state(a), FLASH_FULFILLED);
    cr_assert_str_eq(flash_promise_value(a), "primed-a");
    cr_assert_eq(flash_prime(l, "a", 1, "other"), 0);
    cr_assert_str_eq(flash_promise_value(flash_load_str(l, "a")), "primed-a", "prime does not overwrite");
    flash_promise *b = flash_load_str(l, "b"); /* pending in the open batch */
    cr_assert_eq(flash_prime(l, "b", 1, "primed-b"), 0);
    cr_assert_str_eq(value_of(ctx, b), "v:b", "prime does not overwrite a pending load");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "L:b");
    /* clear then prime does set the new value ("Allows forcefully priming") */
    cr_assert_eq(flash_clear(l, "a", 1), 0);
    cr_assert_eq(flash_prime(l, "a", 1, "new-a"), 0);
    cr_assert_str_eq(flash_promise_value(flash_load_str(l, "a")), "new-a");
    cr_assert_eq(ncalls, 1);
    flash_ctx_destroy(ctx);
}

/* "Clears single value in loader" */
FLASH_TEST(loader, clear_forgets_one_key) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *ps[2] = {flash_load_str(l, "a"), flash_load_str(l, "b")};
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 2, ps), NULL), 0);
    cr_assert_eq(flash_clear(l, "a", 1), 0);
    cr_assert_eq(flash_clear(l, "never-loaded", 12), 0, "clearing an absent key is fine");
    flash_promise *a2 = flash_load_str(l, "a");
    flash_promise *b2 = flash_load_str(l, "b");
    cr_assert_eq(b2, ps[1]);
    cr_assert_eq(flash_promise_state(a2), FLASH_PENDING);
    cr_assert_str_eq(value_of(ctx, a2), "v:a");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "L:a");
    flash_ctx_destroy(ctx);
}

/* "Clears all values in loader" */
FLASH_TEST(loader, clear_all_forgets_every_key) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *ps[2] = {flash_load_str(l, "a"), flash_load_str(l, "b")};
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 2, ps), NULL), 0);
    flash_prime(l, "c", 1, "primed");
    flash_clear_all(l);
    flash_promise *ps2[3] = {flash_load_str(l, "a"), flash_load_str(l, "b"), flash_load_str(l, "c")};
    cr_assert_eq(flash_promise_state(ps2[2]), FLASH_PENDING, "primed values are cleared too");
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 3, ps2), NULL), 0);
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "L:a,b,c");
    flash_clear_all(NULL); /* no crash */
    flash_ctx_destroy(ctx);
}

/* ---- options ------------------------------------------------------------ */

static size_t lower_key(const void *key, size_t len, void *out, size_t cap, void *ud) {
    (void)ud;
    if (len <= cap)
        for (size_t i = 0; i < len; i++) ((char *)out)[i] = (char)tolower(((const unsigned char *)key)[i]);
    return len;
}

/* "Accepts objects with a complex key" (cacheKeyFn) */
FLASH_TEST(loader, key_fn_maps_equivalent_keys_to_one_entry) {
    static const flash_loader_desc d = {.name = "K", .batch = record_batch, .user_data = "K", .key_fn = lower_key};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    flash_promise *a = flash_load_str(l, "Alice");
    flash_promise *a2 = flash_load_str(l, "ALICE");
    flash_promise *b = flash_load_str(l, "bob");
    cr_assert_eq(a, a2);
    cr_assert_str_eq(value_of(ctx, a2), "v:Alice", "the batch sees the first-asked form");
    cr_assert_str_eq(value_of(ctx, b), "v:bob");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "K:Alice,bob");
    cr_assert_eq(flash_load_str(l, "alice"), a);
    cr_assert_eq(flash_clear(l, "aLiCe", 5), 0);
    flash_promise *a3 = flash_load_str(l, "alice");
    cr_assert_neq(a3, a);
    cr_assert_str_eq(value_of(ctx, a3), "v:alice");
    cr_assert_eq(flash_prime(l, "CAROL", 5, "primed"), 0);
    cr_assert_str_eq(flash_promise_value(flash_load_str(l, "carol")), "primed");
    flash_ctx_destroy(ctx);
}

/* The key_fn contract: "when that exceeds cap you are called again with
   room" — long memo keys must work for load, prime and clear alike. */
FLASH_TEST(loader, key_fn_with_memo_keys_longer_than_256_bytes) {
    static const flash_loader_desc d = {.name = "K", .batch = record_batch, .user_data = "K", .key_fn = lower_key};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    char upper[301], lower[301];
    memset(upper, 'A', 300);
    memset(lower, 'a', 300);
    upper[300] = lower[300] = 0;
    reset_log();
    flash_promise *p = flash_load_str(l, upper);
    cr_assert_eq(flash_load_str(l, lower), p);
    cr_assert_eq(flash_wait(ctx, p, NULL), 0);
    cr_assert_eq(ncalls, 1);
    cr_assert_eq(flash_clear(l, lower, 300), 0, "clear with a long memo key");
    cr_assert_neq(flash_load_str(l, upper), p, "clear forgot the key");
    char other[301];
    memset(other, 'B', 300);
    other[300] = 0;
    cr_assert_eq(flash_prime(l, other, 300, "primed"), 0, "prime with a long memo key");
    flash_promise *q = flash_load_str(l, other);
    cr_assert_eq(flash_promise_state(q), FLASH_FULFILLED);
    cr_assert_str_eq(flash_promise_value(q), "primed");
    flash_ctx_destroy(ctx);
}

/* graphql #194: a bounded memo evicts the oldest entries. */
FLASH_TEST(loader, max_memo_evicts_the_oldest) {
    static const flash_loader_desc d = {.name = "B", .batch = record_batch, .user_data = "B", .max_memo = 2};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    flash_promise *ps[3] = {flash_load_str(l, "a"), flash_load_str(l, "b"), flash_load_str(l, "c")};
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 3, ps), NULL), 0);
    cr_assert_eq(ncalls, 1);
    cr_assert_eq(flash_load_str(l, "c"), ps[2]);
    cr_assert_eq(flash_load_str(l, "b"), ps[1]);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_neq(a, ps[0], "the oldest key was evicted");
    cr_assert_str_eq(value_of(ctx, a), "v:a");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "B:a");
    flash_ctx_destroy(ctx);
}

static void *payloads[8];
static size_t npayloads;
static void payload_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    npayloads = flash_batch_size(b);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        if (i < 8) payloads[i] = flash_batch_payload(b, i);
        flash_batch_resolve(b, i, flash_batch_payload(b, i));
    }
}
static const flash_loader_desc payload_desc = {.batch = payload_batch};

FLASH_TEST(loader, payload_reaches_the_batch_and_first_load_wins) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &payload_desc);
    int x, y, z;
    flash_promise *a = flash_load_with(l, "a", 1, &x);
    flash_promise *a2 = flash_load_with(l, "a", 1, &y);
    flash_promise *b = flash_load_with(l, "b", 1, &z);
    flash_promise *c = flash_load_str(l, "c");
    cr_assert_eq(a, a2);
    flash_drain(ctx);
    cr_assert_eq(npayloads, 3);
    cr_assert_eq(payloads[0], &x, "first load's payload wins");
    cr_assert_eq(payloads[1], &z);
    cr_assert_null(payloads[2], "flash_load has no payload");
    cr_assert_eq(flash_promise_value(b), &z);
    cr_assert_eq(flash_promise_state(c), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

/* "Supports loading multiple keys in one call" */
FLASH_TEST(loader, load_many_gathers_in_order_in_one_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    const void *keys[4] = {"b", "a", "b", "c"};
    size_t lens[4] = {1, 1, 1, 1};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 4, keys, lens), &v), 0);
    char **vals = (char **)v;
    cr_assert_str_eq(vals[0], "v:b");
    cr_assert_str_eq(vals[1], "v:a");
    cr_assert_str_eq(vals[2], "v:b");
    cr_assert_str_eq(vals[3], "v:c");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "L:b,a,c");
    /* empty */
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 0, NULL, NULL), NULL), 0);
    /* one failing key rejects the gather; NULL arrays are EINVAL */
    const void *k2[2] = {"a", "!z"};
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 2, k2, lens), NULL), FLASH_ENOTFOUND);
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 2, NULL, lens), NULL), FLASH_EINVAL);
    cr_assert_null(flash_load_many(NULL, 1, keys, lens));
    flash_ctx_destroy(ctx);
}

/* ---- batch function results ---------------------------------------------- */

static int batch_rc;
static void fail_whole_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    batch_rc = flash_batch_fail(b, FLASH_ESOURCE, "database is down");
}

/* "Resolves to error to indicate failure" at the batch level */
FLASH_TEST(loader, batch_fail_rejects_every_key) {
    static const flash_loader_desc d = {.batch = fail_whole_batch};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_ESOURCE);
    cr_assert_eq(batch_rc, 0);
    cr_assert_eq(flash_promise_error(b), FLASH_ESOURCE);
    cr_assert_str_eq(flash_promise_message(a), "database is down");
    cr_assert_str_eq(flash_promise_message(b), "database is down");
    cr_assert_neq(flash_load_str(l, "a"), a, "failed keys are forgotten");
    flash_ctx_destroy(ctx);
}

static void complete_mixed(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    flash_result r[3] = {{0, IV(10), NULL}, {FLASH_ENOTFOUND, NULL, "no b"}, {0, IV(30), NULL}};
    batch_rc = flash_batch_complete(b, flash_batch_size(b), r);
}

/* "Can represent failures and successes simultaneously" */
FLASH_TEST(loader, batch_complete_settles_each_key) {
    static const flash_loader_desc d = {.batch = complete_mixed};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *ps[3] = {flash_load_str(l, "a"), flash_load_str(l, "b"), flash_load_str(l, "c")};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather_settled(ctx, 3, ps), &v), 0);
    cr_assert_eq(batch_rc, 0);
    flash_settled *s = (flash_settled *)v;
    cr_assert_eq(VI(s[0].value), 10);
    cr_assert_eq(s[1].error, FLASH_ENOTFOUND);
    cr_assert_str_eq(s[1].message, "no b");
    cr_assert_eq(VI(s[2].value), 30);
    flash_ctx_destroy(ctx);
}

static void complete_short(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    flash_result r[1] = {{0, IV(1), NULL}};
    batch_rc = flash_batch_complete(b, 1, r);
}

/* "Must be a function that returns an Array of the same length as the Array of keys" */
FLASH_TEST(loader, batch_complete_with_wrong_count_rejects_every_key_ebatch) {
    static const flash_loader_desc d = {.name = "short", .batch = complete_short};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    batch_rc = 0;
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_EBATCH);
    cr_assert_eq(flash_promise_error(b), FLASH_EBATCH);
    cr_assert_eq(batch_rc, FLASH_EBATCH);
    cr_assert_not_null(strstr(flash_promise_message(a), "short"), "message names the loader: %s",
                       flash_promise_message(a));
    cr_assert_not(flash_ctx_busy(ctx), "the batch ended");
    flash_ctx_destroy(ctx);
}

static void complete_null_results(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    batch_rc = flash_batch_complete(b, flash_batch_size(b), NULL);
}

FLASH_TEST(loader, batch_complete_with_null_results_is_ebatch) {
    static const flash_loader_desc d = {.batch = complete_null_results};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_EBATCH);
    cr_assert_eq(batch_rc, FLASH_EBATCH);
    flash_ctx_destroy(ctx);
}

static int rc_twice, rc_reject_twice, rc_range, rc_after_end, rc_fail_after_end, rc_complete_after_end, rc_end_again;
static void settle_twice(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    flash_batch_resolve(b, 0, IV(1));
    rc_twice = flash_batch_resolve(b, 0, IV(2));
    rc_reject_twice = flash_batch_reject(b, 0, FLASH_ESOURCE, NULL);
    rc_range = flash_batch_resolve(b, 5, IV(3));
    flash_batch_resolve(b, 1, IV(4)); /* all settled: the batch ends */
    rc_after_end = flash_batch_resolve(b, 1, IV(5));
    rc_fail_after_end = flash_batch_fail(b, FLASH_ESOURCE, NULL);
    flash_result r[2] = {{0, NULL, NULL}, {0, NULL, NULL}};
    rc_complete_after_end = flash_batch_complete(b, 2, r);
    rc_end_again = flash_batch_end(b);
}

FLASH_TEST(loader, settling_a_key_twice_is_ebatch_and_keeps_the_first) {
    static const flash_loader_desc d = {.batch = settle_twice};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b");
    void *v;
    cr_assert_eq(flash_wait(ctx, a, &v), 0);
    cr_assert_eq(VI(v), 1);
    cr_assert_eq(VI(flash_promise_value(b)), 4);
    cr_assert_eq(rc_twice, FLASH_EBATCH);
    cr_assert_eq(rc_reject_twice, FLASH_EBATCH);
    cr_assert_eq(rc_range, FLASH_EBATCH);
    cr_assert_eq(rc_after_end, FLASH_EBATCH);
    cr_assert_eq(rc_fail_after_end, FLASH_EBATCH);
    cr_assert_eq(rc_complete_after_end, FLASH_EBATCH);
    cr_assert_eq(rc_end_again, 0, "ending an ended batch is harmless");
    flash_ctx_destroy(ctx);
}

static void end_with_unsettled(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    flash_batch_resolve(b, 0, IV(1));
    batch_rc = flash_batch_end(b);
}

FLASH_TEST(loader, batch_end_rejects_unsettled_keys_ebatch) {
    static const flash_loader_desc d = {.name = "lazy", .batch = end_with_unsettled};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b"), *c = flash_load_str(l, "c");
    cr_assert_eq(flash_wait(ctx, c, NULL), FLASH_EBATCH);
    cr_assert_eq(batch_rc, 0);
    cr_assert_eq(flash_promise_state(a), FLASH_FULFILLED);
    cr_assert_eq(flash_promise_error(b), FLASH_EBATCH);
    cr_assert_not_null(strstr(flash_promise_message(b), "lazy"));
    cr_assert_not(flash_ctx_busy(ctx));
    /* the EBATCH keys are forgotten (errors are not memoised) */
    cr_assert_neq(flash_load_str(l, "b"), b);
    flash_drain(ctx);
    flash_ctx_destroy(ctx);
}

/* A batch function that neither settles nor ends its batch and schedules
   nothing: no one can ever settle the keys, so a wait must not spin. */
static void forgetful_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)b; (void)ud;
}

FLASH_TEST(loader, wait_on_a_batch_that_never_settles_returns_eidle) {
    static const flash_loader_desc d = {.batch = forgetful_batch};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, "a"), NULL), FLASH_EIDLE);
    flash_ctx_destroy(ctx);
}

/* ---- what forms a batch --------------------------------------------------- */

/* "Can call a loader from a loader": both outer batches feed one deep batch. */
static const flash_loader_desc deep_desc = {.name = "deep", .batch = record_batch, .user_data = "deep"};
static void outer_settle(flash_ctx *ctx, flash_promise *p, void *arg) {
    flash_batch *b = (flash_batch *)arg;
    (void)ctx;
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED);
    for (size_t i = 0; i < flash_batch_size(b); i++) flash_batch_resolve(b, i, flash_promise_value(p));
}
static void outer_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    log_batch((const char *)ud, b);
    /* load one deep key named after all of ours */
    char key[128] = "";
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        strcat(key, i ? "+" : "");
        strcat(key, (const char *)flash_batch_key(b, i, NULL));
    }
    flash_promise *p = flash_load_str(flash_loader_for(ctx, &deep_desc), key);
    flash_on_settle(ctx, p, outer_settle, b);
}
static const flash_loader_desc a_desc = {.name = "a", .batch = outer_batch, .user_data = "a"};
static const flash_loader_desc b_desc = {.name = "b", .batch = outer_batch, .user_data = "b"};

FLASH_TEST(loader, loader_called_from_inside_batch_functions_forms_one_deeper_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *a = flash_loader_for(ctx, &a_desc), *b = flash_loader_for(ctx, &b_desc);
    reset_log();
    flash_promise *ps[4] = {flash_load_str(a, "A1"), flash_load_str(b, "B1"), flash_load_str(a, "A2"),
                            flash_load_str(b, "B2")};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 4, ps), &v), 0);
    cr_assert_eq(ncalls, 3);
    cr_assert_str_eq(calls[0], "a:A1,A2");
    cr_assert_str_eq(calls[1], "b:B1,B2");
    cr_assert_str_eq(calls[2], "deep:A1+A2,B1+B2");
    cr_assert_str_eq(((char **)v)[0], "v:A1+A2");
    cr_assert_str_eq(((char **)v)[3], "v:B1+B2");
    flash_ctx_destroy(ctx);
}

/* The same loader from its own batch function: the new keys are the next
   batch, and loads of keys already in flight are memo hits. */
static flash_loader *self_l;
static void self_loading_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    log_batch("S", b);
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        const char *k = (const char *)flash_batch_key(b, i, NULL);
        if (strlen(k) < 3) flash_load_str(self_l, flash_sprintf(ctx, "%s'", k));
        flash_load_str(self_l, k); /* in flight: a memo hit, no new batch */
        flash_batch_resolve(b, i, (void *)k);
    }
}

FLASH_TEST(loader, loads_from_inside_the_batch_function_form_the_next_batch) {
    static const flash_loader_desc d = {.batch = self_loading_batch};
    flash_ctx *ctx = flash_ctx_create(NULL);
    self_l = flash_loader_for(ctx, &d);
    reset_log();
    flash_load_str(self_l, "x");
    flash_load_str(self_l, "y");
    flash_drain(ctx); /* one drain runs every level */
    cr_assert_eq(ncalls, 3);
    cr_assert_str_eq(calls[0], "S:x,y");
    cr_assert_str_eq(calls[1], "S:x',y'");
    cr_assert_str_eq(calls[2], "S:x'',y''");
    cr_assert_not(flash_ctx_busy(ctx));
    flash_ctx_destroy(ctx);
}

/* A load from a promise callback runs after the batch that settled it. */
static flash_loader *cb_l;
static flash_promise *cb_loaded;
static void load_on_settle(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx; (void)p;
    cb_loaded = flash_load_str(cb_l, (const char *)arg);
}

FLASH_TEST(loader, loads_from_a_promise_callback_form_the_next_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    cb_l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *a = flash_load_str(cb_l, "a");
    flash_load_str(cb_l, "b");
    flash_on_settle(ctx, a, load_on_settle, "c");
    flash_drain(ctx);
    cr_assert_not_null(cb_loaded);
    cr_assert_str_eq(value_of(ctx, cb_loaded), "v:c");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[0], "L:a,b");
    cr_assert_str_eq(calls[1], "L:c");
    flash_ctx_destroy(ctx);
}

/* "Batches loads occuring within promises": loads several promise hops deep
   in the same tick join the same batch. */
static flash_loader *hop_l;
static flash_promise *hop(flash_ctx *ctx, void *value, void *arg) {
    intptr_t left = (intptr_t)arg;
    if (left == 0) return flash_load_str(hop_l, "deep");
    return flash_then(ctx, flash_fulfilled(ctx, value), hop, (void *)(left - 1));
}

FLASH_TEST(loader, loads_many_promise_hops_deep_join_the_same_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    hop_l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *top = flash_load_str(hop_l, "top");
    flash_promise *deep = flash_then(ctx, flash_fulfilled(ctx, NULL), hop, (void *)(intptr_t)6);
    flash_promise *mid = flash_then(ctx, flash_fulfilled(ctx, NULL), hop, (void *)(intptr_t)2);
    flash_promise *ps[3] = {top, deep, mid};
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 3, ps), &v), 0);
    cr_assert_eq(ncalls, 1, "calls: %s | %s", calls[0], calls[1]);
    cr_assert_str_eq(calls[0], "L:top,deep");
    cr_assert_str_eq(((char **)v)[1], "v:deep");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, two_loaders_dispatch_in_the_order_their_batches_opened) {
    static const flash_loader_desc x = {.batch = record_batch, .user_data = "X"};
    static const flash_loader_desc y = {.batch = record_batch, .user_data = "Y"};
    static const flash_loader_desc z = {.batch = record_batch, .user_data = "Z", .max_batch = 1};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *lx = flash_loader_for(ctx, &x), *ly = flash_loader_for(ctx, &y), *lz = flash_loader_for(ctx, &z);
    reset_log();
    flash_load_str(ly, "1"); /* Y's batch opens first */
    flash_load_str(lz, "1");
    flash_load_str(lx, "1");
    flash_load_str(ly, "2");
    flash_load_str(lz, "2"); /* a second Z batch, opened after X's */
    flash_drain(ctx);
    cr_assert_eq(ncalls, 4);
    cr_assert_str_eq(calls[0], "Y:1,2");
    cr_assert_str_eq(calls[1], "Z:1");
    cr_assert_str_eq(calls[2], "X:1");
    cr_assert_str_eq(calls[3], "Z:2");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, loader_for_gives_one_loader_per_desc) {
    static const flash_loader_desc other = {.batch = record_batch, .user_data = "O"};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    cr_assert_eq(flash_loader_for(ctx, &L), l);
    cr_assert_neq(flash_loader_for(ctx, &other), l);
    flash_ctx_destroy(ctx);
}

/* ---- bad input ----------------------------------------------------------- */

FLASH_TEST(loader, empty_key_rejects_einval) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *e = flash_load(l, "", 0);
    cr_assert_not_null(e);
    cr_assert_eq(flash_wait(ctx, e, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, ""), NULL), FLASH_EINVAL);
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, NULL), NULL), FLASH_EINVAL);
    cr_assert_eq(flash_wait(ctx, flash_load(l, NULL, 4), NULL), FLASH_EINVAL);
    cr_assert_eq(ncalls, 0, "bad keys never reach the batch function");
    cr_assert_eq(flash_prime(l, "", 0, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_clear(l, NULL, 1), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

static size_t empty_key_fn(const void *key, size_t len, void *out, size_t cap, void *ud) {
    (void)key; (void)len; (void)out; (void)cap; (void)ud;
    return 0;
}

FLASH_TEST(loader, key_fn_giving_an_empty_key_rejects_einval) {
    static const flash_loader_desc d = {.batch = record_batch, .key_fn = empty_key_fn};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, "a"), NULL), FLASH_EINVAL);
    cr_assert_eq(ncalls, 0);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, null_loader_and_missing_batch_fn) {
    static const flash_loader_desc nobatch = {.name = "x"};
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert_null(flash_load(NULL, "a", 1));
    cr_assert_null(flash_load_str(NULL, "a"));
    cr_assert_null(flash_load_with(NULL, "a", 1, NULL));
    cr_assert_eq(flash_prime(NULL, "a", 1, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_clear(NULL, "a", 1), FLASH_EINVAL);
    cr_assert_eq(flash_loader_dispatch(NULL), FLASH_EINVAL);
    cr_assert_null(flash_loader_ctx(NULL));
    cr_assert_null(flash_loader_create(ctx, NULL));
    cr_assert_null(flash_loader_create(ctx, &nobatch));
    cr_assert_null(flash_loader_for(ctx, &nobatch));
    cr_assert_null(flash_loader_for(NULL, &L));
    cr_assert_null(flash_loader_create(NULL, &L));
    cr_assert_eq(flash_batch_resolve(NULL, 0, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_batch_reject(NULL, 0, FLASH_ESOURCE, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_batch_fail(NULL, FLASH_ESOURCE, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_batch_end(NULL), FLASH_EINVAL);
    cr_assert_eq(flash_batch_complete(NULL, 0, NULL), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

/* ---- scheduling ------------------------------------------------------------ */

/* A custom schedule: dispatch from a poll timer instead of at the end of
   the tick ("May provide a custom batch scheduler"). */
static int schedule_calls;
static void dispatch_timer(void *arg) { flash_loader_dispatch((flash_loader *)arg); }
static void timer_schedule(flash_ctx *ctx, flash_loader *l, void *ud) {
    (void)ud;
    schedule_calls++;
    flash_loop loop = flash_ctx_loop(ctx);
    cr_assert_not_null(loop.vt->timer(loop.native, 2, dispatch_timer, l));
}

FLASH_TEST(loader, custom_schedule_dispatches_from_a_poll_timer) {
    static const flash_loader_desc d = {.batch = record_batch, .user_data = "T", .schedule = timer_schedule};
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    schedule_calls = 0;
    flash_promise *a = flash_load_str(l, "a");
    flash_promise *b = flash_load_str(l, "b");
    cr_assert_eq(schedule_calls, 1, "called once, when the batch opens");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 0, "the end of the tick does not dispatch a custom-scheduled batch");
    flash_load_str(l, "c"); /* still before the timer: joins the batch */
    cr_assert_str_eq(value_of(ctx, b), "v:b");
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "T:a,b,c");
    cr_assert_eq(flash_promise_state(a), FLASH_FULFILLED);
    cr_assert_str_eq(value_of(ctx, flash_load_str(l, "d")), "v:d");
    cr_assert_eq(schedule_calls, 2);
    cr_assert_eq(ncalls, 2);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

/* With max_batch, a custom schedule is told about every batch that opens;
   every one of them must eventually be dispatched. */
FLASH_TEST(loader, custom_schedule_with_max_batch_dispatches_every_batch) {
    static const flash_loader_desc d = {
        .batch = record_batch, .user_data = "T", .schedule = timer_schedule, .max_batch = 2};
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &d);
    reset_log();
    schedule_calls = 0;
    const void *keys[5] = {"1", "2", "3", "4", "5"};
    size_t lens[5] = {1, 1, 1, 1, 1};
    flash_promise *all = flash_load_many(l, 5, keys, lens);
    cr_assert_eq(schedule_calls, 3);
    int rc = flash_wait(ctx, all, NULL);
    cr_assert_eq(rc, 0, "rc %d; %d batch calls: [%s] [%s] [%s]", rc, ncalls, calls[0], calls[1], calls[2]);
    cr_assert_eq(ncalls, 3);
    cr_assert_str_eq(calls[0], "T:1,2");
    cr_assert_str_eq(calls[1], "T:3,4");
    cr_assert_str_eq(calls[2], "T:5");
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

FLASH_TEST(loader, dispatch_now_sends_the_open_batch_early) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_load_str(l, "a");
    cr_assert_eq(flash_loader_dispatch(l), 0);
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "L:a");
    cr_assert_eq(flash_loader_dispatch(l), 0, "nothing open is fine");
    flash_load_str(l, "b");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 2, "the dispatched batch is not dispatched again");
    cr_assert_str_eq(calls[1], "L:b");
    flash_ctx_destroy(ctx);
}

/* ---- asynchronous batch functions (completing from the poll loop) -------- */

typedef struct pending_batch {
    flash_batch *b;
    void *timer;
    flash_loop loop;
    int rc[4];
    int end_rc;
    bool fired;
    bool call_end;
} pending_batch;
static pending_batch pend[8];
static int npend, cancels;

static void complete_later(void *arg) {
    pending_batch *pb = (pending_batch *)arg;
    const char *keys[4];
    size_t n = flash_batch_size(pb->b);
    pb->fired = true;
    pb->timer = NULL;
    /* read everything first: after a reset the batch may go away with its
       last key settled */
    for (size_t i = 0; i < n && i < 4; i++) keys[i] = (const char *)flash_batch_key(pb->b, i, NULL);
    for (size_t i = 0; i < n && i < 4; i++) pb->rc[i] = flash_batch_resolve(pb->b, i, (void *)keys[i]);
    if (pb->call_end) pb->end_rc = flash_batch_end(pb->b);
}
static void async_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    pending_batch *pb = &pend[npend++];
    memset(pb, 0, sizeof *pb);
    pb->b = b;
    pb->call_end = ud != NULL;
    pb->loop = flash_ctx_loop(ctx);
    log_batch("A", b);
    pb->timer = pb->loop.vt->timer(pb->loop.native, 3, complete_later, pb);
    cr_assert_not_null(pb->timer);
}
static void cancel_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    cancels++;
    for (int i = 0; i < npend; i++)
        if (pend[i].b == b && pend[i].timer) {
            pend[i].loop.vt->cancel(pend[i].loop.native, pend[i].timer);
            pend[i].timer = NULL;
        }
}
static const flash_loader_desc async_desc = {.name = "async", .batch = async_batch};
static const flash_loader_desc async_end_desc = {.name = "async", .batch = async_batch, .user_data = "end"};
static const flash_loader_desc async_cancel_desc = {.name = "async", .batch = async_batch, .cancel = cancel_batch};

FLASH_TEST(loader, async_batch_completes_later_from_a_poll_timer) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_desc);
    reset_log();
    npend = 0;
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    cr_assert(flash_ctx_busy(ctx), "a batch in flight keeps the context busy");
    cr_assert_eq(flash_promise_state(a), FLASH_PENDING);
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_eq(a2, a, "an in-flight key is a memo hit");
    cr_assert_str_eq(value_of(ctx, b), "b");
    cr_assert_str_eq(value_of(ctx, a), "a");
    cr_assert_eq(ncalls, 1);
    cr_assert_not(flash_ctx_busy(ctx));
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

FLASH_TEST(loader, reset_with_cancel_fn_cancels_in_flight_and_drops_open_batches) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_cancel_desc);
    reset_log();
    npend = cancels = 0;
    flash_load_str(l, "a");
    flash_load_str(l, "b");
    flash_drain(ctx); /* batch 1 in flight */
    cr_assert_eq(ncalls, 1);
    flash_load_str(l, "c"); /* batch 2 open, not dispatched */
    flash_ctx_reset(ctx);
    cr_assert_eq(cancels, 1, "the in-flight batch is cancelled");
    cr_assert_not(flash_ctx_busy(ctx));
    flash_poll_run(loop);
    cr_assert_eq(ncalls, 1, "the open batch of the old request is never dispatched");
    cr_assert_not(pend[0].fired);
    /* the next request works and does not see the old memo */
    l = flash_loader_for(ctx, &async_cancel_desc);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_promise_state(a), FLASH_PENDING);
    cr_assert_str_eq(value_of(ctx, a), "a");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "A:a");
    cr_assert_eq(cancels, 1);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

FLASH_TEST(loader, reset_without_cancel_fn_late_resolve_is_ecanceled) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_desc);
    reset_log();
    npend = 0;
    flash_load_str(l, "a");
    flash_load_str(l, "b");
    flash_drain(ctx);
    cr_assert_eq(ncalls, 1);
    flash_ctx_reset(ctx);
    flash_poll_run(loop); /* the timer fires and settles into the old request */
    cr_assert(pend[0].fired);
    cr_assert_eq(pend[0].rc[0], FLASH_ECANCELED);
    cr_assert_eq(pend[0].rc[1], FLASH_ECANCELED);
    cr_assert_eq(ncalls, 1);
    /* the context keeps serving */
    l = flash_loader_for(ctx, &async_desc);
    cr_assert_str_eq(value_of(ctx, flash_load_str(l, "z")), "z");
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

/* Same, but the batch function ends its batch after settling every key, the
   usual shape of an async batch function. */
FLASH_TEST(loader, reset_without_cancel_fn_late_resolve_then_end_is_ecanceled) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_end_desc);
    npend = 0;
    flash_load_str(l, "a");
    flash_load_str(l, "b");
    flash_drain(ctx);
    flash_ctx_reset(ctx);
    flash_poll_run(loop);
    cr_assert(pend[0].fired);
    cr_assert_eq(pend[0].rc[0], FLASH_ECANCELED);
    cr_assert_eq(pend[0].rc[1], FLASH_ECANCELED);
    cr_assert_eq(pend[0].end_rc, FLASH_ECANCELED);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}

FLASH_TEST(loader, destroy_calls_cancel_for_in_flight_batches) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_cancel_desc);
    static const flash_loader_desc other = {.name = "other", .batch = async_batch, .cancel = cancel_batch, .max_batch = 1};
    flash_loader *l2 = flash_loader_for(ctx, &other);
    npend = cancels = 0;
    flash_load_str(l, "a");
    flash_load_str(l2, "x");
    flash_load_str(l2, "y");
    flash_drain(ctx);
    cr_assert_eq(npend, 3);
    flash_ctx_destroy(ctx);
    cr_assert_eq(cancels, 3);
    cr_assert_eq(flash_poll_run(loop), 0);
    for (int i = 0; i < 3; i++) cr_assert_not(pend[i].fired);
    flash_poll_destroy(loop);
}

/* A batch function that resets the context (e.g. a request aborted inside
   it): nothing crashes, later batches of that request are not called. */
static void resetting_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    log_batch("R", b);
    flash_ctx_reset(ctx);
    batch_rc = flash_batch_resolve(b, 0, NULL);
}

FLASH_TEST(loader, batch_function_that_resets_the_context) {
    static const flash_loader_desc r = {.batch = resetting_batch};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *lr = flash_loader_for(ctx, &r);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    flash_promise *p = flash_load_str(lr, "a");
    flash_load_str(l, "b"); /* opened after R's batch: dropped by the reset */
    cr_assert_eq(flash_wait(ctx, p, NULL), FLASH_ECANCELED);
    cr_assert_eq(batch_rc, FLASH_ECANCELED);
    cr_assert_eq(ncalls, 1);
    cr_assert_str_eq(calls[0], "R:a");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, reset_gives_a_fresh_loader_and_memo) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &L);
    reset_log();
    cr_assert_str_eq(value_of(ctx, flash_load_str(l, "a")), "v:a");
    flash_prime(l, "p", 1, "primed");
    flash_ctx_reset(ctx);
    l = flash_loader_for(ctx, &L);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_promise_state(a), FLASH_PENDING, "the memo is gone");
    flash_promise *p = flash_load_str(l, "p");
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING, "primed values are gone");
    cr_assert_str_eq(value_of(ctx, a), "v:a");
    cr_assert_eq(ncalls, 2);
    cr_assert_str_eq(calls[1], "L:a,p");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, many_keys_in_one_batch) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &payload_desc);
    enum { N = 50000 };
    flash_promise **ps = flash_alloc(ctx, N * sizeof *ps);
    for (int i = 0; i < N; i++) {
        char k[16];
        int n = snprintf(k, sizeof k, "%d", i);
        ps[i] = flash_load_with(l, k, (size_t)n, IV(i));
    }
    int bad = -1;
    for (int i = 0; i < N && bad < 0; i += 7) {
        char k[16];
        int n = snprintf(k, sizeof k, "%d", i);
        if (flash_load(l, k, (size_t)n) != ps[i]) bad = i;
    }
    cr_assert_eq(bad, -1, "memo miss for key %d", bad);
    void *v;
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, N, ps), &v), 0);
    for (int i = 0; i < N && bad < 0; i++)
        if (VI(((void **)v)[i]) != i) bad = i;
    cr_assert_eq(bad, -1, "wrong value at %d", bad);
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.batches, 1);
    cr_assert_eq(s.batch_keys, N);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, orphaned_batch_never_completed_is_freed_at_destroy) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    flash_loader *l = flash_loader_for(ctx, &async_desc);
    npend = 0;
    flash_load_str(l, "a");
    flash_drain(ctx);
    cr_assert_eq(npend, 1);
    flash_ctx_reset(ctx); /* no cancel fn: the batch is orphaned */
    flash_loop lp = flash_ctx_loop(ctx);
    lp.vt->cancel(lp.native, pend[0].timer); /* and its owner never completes it */
    cr_assert_eq(flash_poll_run(loop), 0);
    flash_ctx_destroy(ctx); /* LeakSanitizer checks the old request's memory went too */
    flash_poll_destroy(loop);
}

/* ---- batch data ------------------------------------------------------------ */

static void *data_seen_in_cancel;
static void data_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    cr_assert_null(flash_batch_data(b), "no data until set");
    flash_batch_set_data(b, &data_seen_in_cancel);
}
static void data_cancel(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx; (void)ud;
    data_seen_in_cancel = flash_batch_data(b);
}

FLASH_TEST(loader, batch_data_reaches_the_cancel_fn) {
    static const flash_loader_desc d = {.batch = data_batch, .cancel = data_cancel};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_load_str(flash_loader_for(ctx, &d), "a");
    flash_drain(ctx);
    data_seen_in_cancel = NULL;
    flash_ctx_destroy(ctx);
    cr_assert_eq(data_seen_in_cancel, &data_seen_in_cancel);
    flash_batch_set_data(NULL, NULL); /* no crash */
    cr_assert_null(flash_batch_data(NULL));
}

/* ---- the memo against a model ---------------------------------------------- */

/* Random loads, clears, clear_alls, primes, failing keys and drains over a
   small key space (so the table grows, probes collide and deletions shift),
   checked op by op against a plain array model of what is memoised. */
enum { MK = 300 };
enum { M_NONE, M_LOADED, M_PRIMED };
static uint64_t rng_state;
static uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static void memo_model_run(uint64_t seed, const flash_loader_desc *d) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, d);
    int kind[MK] = {0};
    flash_promise *memo[MK] = {0};
    int primed_value[MK] = {0};
    char key[16];
    rng_state = seed;
    for (int op = 0; op < 20000; op++) {
        uint32_t r = rng() % 1000, k = rng() % MK;
        /* keys divisible by 7 fail in the batch ("!" prefix) */
        int n = snprintf(key, sizeof key, "%s%u", k % 7 == 0 ? "!" : "", k);
        if (r < 600) {
            flash_promise *p = flash_load(l, key, (size_t)n);
            cr_assert_not_null(p);
            if (kind[k] == M_LOADED) {
                cr_assert_eq(p, memo[k], "op %d seed %llu: key %s should be a memo hit", op,
                             (unsigned long long)seed, key);
            } else if (kind[k] == M_PRIMED) {
                cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED, "op %d: primed key %s", op, key);
                cr_assert_eq(VI(flash_promise_value(p)), primed_value[k], "op %d: primed key %s", op, key);
                memo[k] = p;
                kind[k] = M_LOADED;
            } else {
                cr_assert_eq(flash_promise_state(p), FLASH_PENDING, "op %d seed %llu: key %s should be a miss", op,
                             (unsigned long long)seed, key);
                for (int j = 0; j < MK; j++) cr_assert_neq(p, memo[j], "op %d: a miss returned an old promise", op);
                memo[k] = p;
                kind[k] = M_LOADED;
            }
        } else if (r < 750) {
            cr_assert_eq(flash_clear(l, key, (size_t)n), 0);
            kind[k] = M_NONE;
            memo[k] = NULL;
        } else if (r < 850) {
            int v = (int)(rng() % 100000) + 1;
            cr_assert_eq(flash_prime(l, key, (size_t)n, IV(v)), 0);
            if (kind[k] == M_NONE) {
                kind[k] = M_PRIMED;
                primed_value[k] = v;
            }
        } else if (r < 855) {
            flash_clear_all(l);
            for (int j = 0; j < MK; j++) {
                kind[j] = M_NONE;
                memo[j] = NULL;
            }
        } else if (r < 857) {
            flash_ctx_reset(ctx);
            l = flash_loader_for(ctx, d);
            for (int j = 0; j < MK; j++) {
                kind[j] = M_NONE;
                memo[j] = NULL;
            }
        } else {
            flash_drain(ctx);
            /* failed keys that went through a batch are forgotten */
            for (int j = 0; j < MK; j++)
                if (kind[j] == M_LOADED && memo[j] && flash_promise_state(memo[j]) == FLASH_REJECTED) {
                    cr_assert_eq(j % 7, 0);
                    kind[j] = M_NONE;
                    memo[j] = NULL;
                }
            for (int j = 0; j < MK; j++)
                if (kind[j] == M_LOADED) cr_assert_neq(flash_promise_state(memo[j]), FLASH_PENDING);
        }
    }
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader, memo_matches_a_model_under_random_operations) {
    for (uint64_t seed = 1; seed <= 8; seed++) memo_model_run(seed * 0x9E3779B97F4A7C15ull, &L);
}

FLASH_TEST(loader, memo_matches_a_model_with_a_key_fn) {
    static const flash_loader_desc d = {.batch = record_batch, .user_data = "K", .key_fn = lower_key};
    for (uint64_t seed = 11; seed <= 14; seed++) memo_model_run(seed * 0x9E3779B97F4A7C15ull, &d);
}

FLASH_TEST(loader, orphaned_batches_of_two_old_requests_complete_late) {
    flash_ctx *ctx = plain_ctx();
    flash_poll *loop = flash_poll_create();
    flash_poll_attach(ctx, loop);
    npend = 0;
    flash_load_str(flash_loader_for(ctx, &async_desc), "gen1");
    flash_drain(ctx);
    flash_ctx_reset(ctx);
    flash_load_str(flash_loader_for(ctx, &async_desc), "gen2");
    flash_drain(ctx);
    flash_ctx_reset(ctx);
    cr_assert_eq(npend, 2);
    flash_poll_run(loop);
    cr_assert(pend[0].fired && pend[1].fired);
    cr_assert_eq(pend[0].rc[0], FLASH_ECANCELED);
    cr_assert_eq(pend[1].rc[0], FLASH_ECANCELED);
    cr_assert_str_eq(value_of(ctx, flash_load_str(flash_loader_for(ctx, &async_desc), "gen3")), "gen3");
    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
}
