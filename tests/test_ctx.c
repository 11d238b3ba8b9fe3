/* Layers 1, 2 and 4: errors, context and arena, flash_wait / flash_run. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <unistd.h>
#include <signal.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "flash.h"
#include "backends/loop/poll.h"
#include "harness.h"

TestSuite(ctx, .init = flash_test_watchdog);

#define IV(n) ((void *)(intptr_t)(n))
#define VI(p) ((int)(intptr_t)(p))

/* ---- a counting allocator --------------------------------------------------- */

typedef struct counter {
    atomic_long allocs, frees, live;
    atomic_long live_bytes;
} counter;

#define HDR 16 /* keep the 16-byte alignment malloc gives */
static void *count_alloc(size_t n, void *ud) {
    counter *c = (counter *)ud;
    char *p = (char *)malloc(n + HDR);
    if (!p) return NULL;
    memcpy(p, &n, sizeof n);
    atomic_fetch_add(&c->allocs, 1);
    atomic_fetch_add(&c->live, 1);
    atomic_fetch_add(&c->live_bytes, (long)n);
    return p + HDR;
}
static void count_free(void *ptr, void *ud) {
    counter *c = (counter *)ud;
    size_t n;
    if (!ptr) return;
    memcpy(&n, (char *)ptr - HDR, sizeof n);
    atomic_fetch_add(&c->frees, 1);
    atomic_fetch_sub(&c->live, 1);
    atomic_fetch_sub(&c->live_bytes, (long)n);
    free((char *)ptr - HDR);
}
static flash_desc counted(counter *c) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    memset(c, 0, sizeof *c);
    d.allocator.alloc = count_alloc;
    d.allocator.free = count_free;
    d.allocator.user_data = c;
    return d;
}

static void echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        flash_batch_resolve(b, i, flash_sprintf(ctx, "v:%.*s", (int)len, k));
    }
}
static const flash_loader_desc echo = {.name = "echo", .batch = echo_batch};

/* ---- layer 1: errors ------------------------------------------------------- */

FLASH_TEST(ctx, every_error_code_has_a_distinct_text) {
    static const int codes[] = {
        FLASH_OK,       FLASH_ENOTFOUND, FLASH_E404,     FLASH_EINVAL,    FLASH_ENOMEM,      FLASH_EBACKEND,
        FLASH_ETIMEDOUT, FLASH_ESOURCE,  FLASH_ETOOLARGE, FLASH_ECANCELED, FLASH_EBATCH,     FLASH_EPROTO,
        FLASH_EMULTIPLE, FLASH_ESTATE,   FLASH_ENOTSTORED, FLASH_EIDLE,    FLASH_EUNSUPPORTED,
    };
    enum { N = sizeof codes / sizeof codes[0] };
    const char *unknown = flash_strerror(-9999);
    cr_assert_not_null(unknown);
    cr_assert_str_eq(flash_strerror(12345), unknown);
    for (int i = 0; i < N; i++) {
        const char *t = flash_strerror(codes[i]);
        cr_assert_not_null(t);
        cr_assert_gt(strlen(t), 0, "code %d has an empty text", codes[i]);
        cr_assert_str_neq(t, unknown, "code %d has no text of its own", codes[i]);
        for (int j = 0; j < i; j++)
            cr_assert_str_neq(t, flash_strerror(codes[j]), "codes %d and %d share \"%s\"", codes[i], codes[j], t);
    }
    /* codes are negative and distinct */
    for (int i = 1; i < N; i++) {
        cr_assert_lt(codes[i], 0);
        for (int j = 1; j < i; j++) cr_assert_neq(codes[i], codes[j]);
    }
}

FLASH_TEST(ctx, version_macros) {
    cr_assert_geq(FLASH_VERSION_MAJOR, 0);
    cr_assert_geq(FLASH_VERSION_MINOR, 0);
    cr_assert_geq(FLASH_VERSION_PATCH, 0);
}

/* ---- layer 2: context ---------------------------------------------------- */

FLASH_TEST(ctx, desc_defaults_are_filled_in) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert_not_null(ctx);
    const flash_desc *d = flash_ctx_desc(ctx);
    cr_assert_eq(d->arena_block, (size_t)64 << 10);
    cr_assert_eq(d->arena_retain, (size_t)1 << 20);
    cr_assert_eq(d->max_batch, 1000);
    cr_assert_str_eq(d->key_prefix, "flash");
    cr_assert_eq(d->lag_window_ms, 300);
    cr_assert_eq(d->stale_marker_ttl_s, 5);
    cr_assert_not_null(d->clock_ms);
    cr_assert_not_null(d->allocator.alloc);
    cr_assert_not_null(d->allocator.free);
    cr_assert_null(flash_ctx_user_data(ctx));
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, desc_values_and_user_data_are_kept) {
    int token;
    flash_desc d = {.arena_block = 4096, .max_batch = 7, .key_prefix = "app", .user_data = &token};
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert_eq(flash_ctx_user_data(ctx), &token);
    cr_assert_eq(flash_ctx_desc(ctx)->arena_block, 4096);
    cr_assert_eq(flash_ctx_desc(ctx)->max_batch, 7);
    cr_assert_str_eq(flash_ctx_desc(ctx)->key_prefix, "app");
    d.max_batch = 99; /* the context copied the desc */
    cr_assert_eq(flash_ctx_desc(ctx)->max_batch, 7);
    flash_ctx_destroy(ctx);
}

static int64_t fake_clock(void *ud) { return *(int64_t *)ud; }

FLASH_TEST(ctx, clock_is_injectable) {
    int64_t now = 1234567;
    flash_desc d = {.clock_ms = fake_clock, .clock_user_data = &now};
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert_eq(flash_ctx_now_ms(ctx), 1234567);
    now += 10;
    cr_assert_eq(flash_ctx_now_ms(ctx), 1234577);
    flash_ctx_destroy(ctx);
    flash_ctx *real = flash_ctx_create(NULL);
    cr_assert_gt(flash_ctx_now_ms(real), (int64_t)1600000000000, "default clock is realtime in ms");
    flash_ctx_destroy(real);
}

static char logged[256];
static int logged_level = -1;
static void capture_log(int level, const char *message, void *ud) {
    (void)ud;
    logged_level = level;
    snprintf(logged, sizeof logged, "%s", message);
}

FLASH_TEST(ctx, log_formats_and_reaches_the_logger) {
    flash_desc d = {.logger = {.func = capture_log}};
    flash_ctx *ctx = flash_ctx_create(&d);
    flash_ctx_log(ctx, FLASH_LOG_WARN, "fill of %s skipped: %d", "User:42", 7);
    cr_assert_eq(logged_level, FLASH_LOG_WARN);
    cr_assert_str_eq(logged, "fill of User:42 skipped: 7");
    flash_ctx_destroy(ctx);
    flash_ctx *silent = flash_ctx_create(NULL);
    flash_ctx_log(silent, FLASH_LOG_ERROR, "nobody listens %d", 1); /* no crash */
    flash_ctx_log(NULL, FLASH_LOG_ERROR, "x");
    flash_ctx_destroy(silent);
}

FLASH_TEST(ctx, null_context_is_harmless) {
    flash_ctx_destroy(NULL);
    flash_ctx_reset(NULL);
    flash_ctx_stats_clear(NULL);
    cr_assert_null(flash_ctx_user_data(NULL));
    cr_assert_null(flash_ctx_desc(NULL));
    cr_assert_null(flash_alloc(NULL, 8));
    cr_assert_null(flash_calloc(NULL, 1, 8));
    cr_assert_null(flash_strdup(NULL, "x"));
    cr_assert_null(flash_ctx_loop(NULL).vt);
    flash_stats s = flash_ctx_stats(NULL);
    cr_assert_eq(s.loads, 0);
    cr_assert_eq(s.batches, 0);
}

/* ---- layer 2: arena ------------------------------------------------------- */

FLASH_TEST(ctx, alloc_is_16_byte_aligned) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    static const size_t sizes[] = {0, 1, 3, 7, 15, 16, 17, 31, 33, 100, 1000, 5000, 20000, 70000, 1 << 20};
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            unsigned char *p = flash_alloc(ctx, sizes[i]);
            cr_assert_not_null(p);
            cr_assert_eq((uintptr_t)p % 16, 0, "size %zu gave %p", sizes[i], (void *)p);
            memset(p, 0x5A, sizes[i]); /* ASan: the whole size is ours */
        }
        flash_ctx_reset(ctx);
    }
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, allocations_do_not_overlap) {
    flash_ctx *ctx = flash_ctx_create(&(flash_desc){.arena_block = 1024});
    enum { N = 2000 };
    unsigned char *ps[N];
    size_t sz[N];
    for (int i = 0; i < N; i++) {
        sz[i] = (size_t)(i * 37 % 700) + 1;
        ps[i] = flash_alloc(ctx, sz[i]);
        memset(ps[i], i & 0xFF, sz[i]);
    }
    int bad = -1;
    for (int i = 0; i < N && bad < 0; i++)
        for (size_t j = 0; j < sz[i]; j++)
            if (ps[i][j] != (i & 0xFF)) bad = i;
    cr_assert_eq(bad, -1, "allocation %d was overwritten", bad);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, large_allocations) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    char *small = flash_strdup(ctx, "before");
    char *big = flash_alloc(ctx, (size_t)10 << 20);
    cr_assert_not_null(big);
    cr_assert_eq((uintptr_t)big % 16, 0);
    memset(big, 1, (size_t)10 << 20);
    char *after = flash_strdup(ctx, "after");
    char *big2 = flash_alloc(ctx, (size_t)3 << 20);
    memset(big2, 2, (size_t)3 << 20);
    cr_assert_str_eq(small, "before");
    cr_assert_str_eq(after, "after");
    cr_assert_eq(big[(10 << 20) - 1], 1);
    cr_assert_null(flash_calloc(ctx, SIZE_MAX / 2, 4), "calloc overflow");
    flash_ctx_reset(ctx);
    char *again = flash_alloc(ctx, (size_t)10 << 20);
    memset(again, 3, (size_t)10 << 20);
    flash_ctx_destroy(ctx);
}

/* A size near SIZE_MAX (e.g. a corrupt length read from the network) must
   fail, not wrap around to a tiny allocation that is then overrun. */
FLASH_TEST(ctx, alloc_of_an_impossible_size_returns_null) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_strdup(ctx, "warm"); /* a current block exists */
    cr_assert_null(flash_alloc(ctx, SIZE_MAX - 8), "alloc(SIZE_MAX - 8) returned memory");
    cr_assert_null(flash_alloc(ctx, SIZE_MAX), "alloc(SIZE_MAX) returned memory");
    cr_assert_null(flash_memdup(ctx, "x", SIZE_MAX), "memdup(SIZE_MAX) returned memory");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, calloc_zeroes) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    unsigned char *dirty = flash_alloc(ctx, 4096);
    memset(dirty, 0xFF, 4096);
    flash_ctx_reset(ctx); /* the block is reused */
    unsigned char *z = flash_calloc(ctx, 512, 8);
    cr_assert_not_null(z);
    int nonzero = 0;
    for (int i = 0; i < 4096; i++) nonzero += z[i] != 0;
    cr_assert_eq(nonzero, 0);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, strdup_memdup_sprintf) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    char src[16] = "hello";
    char *s = flash_strdup(ctx, src);
    src[0] = 'J';
    cr_assert_str_eq(s, "hello");
    cr_assert_null(flash_strdup(ctx, NULL));
    cr_assert_str_eq(flash_strdup(ctx, ""), "");
    const char bin[5] = {'a', 0, 'b', 0, 'c'};
    char *m = flash_memdup(ctx, bin, 5);
    cr_assert_eq(memcmp(m, bin, 5), 0);
    cr_assert_eq(m[5], 0, "memdup adds a terminating NUL");
    char *e = flash_memdup(ctx, NULL, 0);
    cr_assert_not_null(e);
    cr_assert_eq(e[0], 0);
    cr_assert_str_eq(flash_sprintf(ctx, "%s:%d:%05.1f", "User", 42, 3.14159), "User:42:003.1");
    /* longer than any internal stack buffer */
    char *longs = flash_sprintf(ctx, "%0*d|%s", 3000, 7, "end");
    cr_assert_eq(strlen(longs), 3004);
    cr_assert_eq(longs[2999], '7');
    cr_assert_str_eq(longs + 3000, "|end");
    cr_assert_str_eq(flash_sprintf(ctx, "%s", ""), "");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, reset_clears_loader_memo_and_loader_for_gives_a_new_loader) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &echo);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert_eq(flash_wait(ctx, a, NULL), 0);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 1);
    cr_assert_eq(flash_load_str(l, "a"), a, "memoised before the reset");
    flash_ctx_reset(ctx);
    l = flash_loader_for(ctx, &echo);
    flash_promise *a2 = flash_load_str(l, "a");
    cr_assert_eq(flash_promise_state(a2), FLASH_PENDING, "no memo after the reset");
    void *v;
    cr_assert_eq(flash_wait(ctx, a2, &v), 0);
    cr_assert_str_eq(v, "v:a");
    cr_assert_eq(flash_ctx_stats(ctx).batches, 2, "the new loader asks again");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, reset_drops_queued_callbacks_and_open_batches) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &echo);
    flash_load_str(l, "a");
    flash_promise *p = flash_promise_new(ctx);
    flash_then(ctx, p, NULL, NULL);
    flash_resolve(ctx, p, NULL);
    cr_assert(flash_ctx_busy(ctx));
    flash_ctx_reset(ctx);
    cr_assert_not(flash_ctx_busy(ctx));
    flash_drain(ctx);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 0, "the old request's batch never ran");
    flash_ctx_destroy(ctx);
}

/* One request's worth of work: loads, chained values, strings, a large
   allocation and a memo table that grows. */
static flash_promise *workload(flash_ctx *ctx, void *arg) {
    int cycle = VI(arg);
    flash_loader *l = flash_loader_for(ctx, &echo);
    enum { N = 300 };
    flash_promise **ps = flash_alloc(ctx, N * sizeof *ps);
    for (int i = 0; i < N; i++) ps[i] = flash_load_str(l, flash_sprintf(ctx, "key-%d-%d", cycle % 3, i % 250));
    char *big = flash_alloc(ctx, 200000);
    memset(big, cycle & 0xFF, 200000);
    flash_sprintf(ctx, "%0*d", 5000, cycle);
    return flash_gather(ctx, N, ps);
}

FLASH_TEST(ctx, memory_stays_flat_over_many_reset_cycles) {
    counter c;
    flash_desc d = counted(&c);
    flash_ctx *ctx = flash_ctx_create(&d);
    enum { CYCLES = 400, WARM = 20 };
    long live_at_warm = -1, bytes_at_warm = -1, max_bytes = 0;
    for (int cycle = 0; cycle < CYCLES; cycle++) {
        void *v;
        cr_assert_eq(flash_run(ctx, workload, IV(cycle), &v), 0);
        cr_assert_str_eq(((char **)v)[1], flash_sprintf(ctx, "v:key-%d-1", cycle % 3));
        flash_ctx_reset(ctx);
        long live = atomic_load(&c.live), bytes = atomic_load(&c.live_bytes);
        if (bytes > max_bytes) max_bytes = bytes;
        if (getenv("FLASH_TEST_VERBOSE") && cycle % 50 == 0) fprintf(stderr, "cycle %d: live %ld bytes %ld\n", cycle, live, bytes);
        if (cycle == WARM) {
            live_at_warm = live;
            bytes_at_warm = bytes;
        } else if (cycle > WARM) {
            cr_assert_eq(live, live_at_warm, "cycle %d: %ld live allocations, %ld after warm-up", cycle, live,
                         live_at_warm);
            cr_assert_eq(bytes, bytes_at_warm, "cycle %d: %ld live bytes, %ld after warm-up", cycle, bytes,
                         bytes_at_warm);
        }
    }
    /* what is kept between requests is bounded by arena_retain (plus the
       memo tables, also within arena_retain, and the context itself) */
    cr_assert_leq(bytes_at_warm, (long)(2 * d.arena_retain + ((size_t)2 << 20)) , "%ld bytes kept", bytes_at_warm);
    cr_assert_leq(max_bytes, (long)(3 << 20) + (long)(2 << 20), "%ld bytes at most", max_bytes);
    flash_ctx_destroy(ctx);
    cr_assert_eq(atomic_load(&c.live), 0, "every allocation freed at destroy");
    cr_assert_eq(atomic_load(&c.live_bytes), 0);
    cr_assert_eq(atomic_load(&c.allocs), atomic_load(&c.frees));
}

static void noop_cb(flash_ctx *ctx, flash_promise *p, void *arg) { (void)ctx; (void)p; (void)arg; }

FLASH_TEST(ctx, custom_allocator_sees_every_allocation_freed_at_destroy) {
    counter c;
    flash_desc d = counted(&c);
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert_gt(atomic_load(&c.allocs), 0, "the context itself comes from the allocator");
    flash_loader *l = flash_loader_for(ctx, &echo);
    for (int i = 0; i < 5000; i++) flash_load_str(l, flash_sprintf(ctx, "k%d", i));
    flash_alloc(ctx, (size_t)5 << 20);
    flash_drain(ctx);
    long during = atomic_load(&c.live);
    cr_assert_gt(during, 3);
    /* leave work pending: an open batch, queued callbacks, pending promises */
    flash_load_str(l, "open");
    flash_promise *p = flash_promise_new(ctx);
    flash_on_settle(ctx, flash_fulfilled(ctx, NULL), noop_cb, NULL);
    flash_on_settle(ctx, p, noop_cb, NULL);
    flash_then(ctx, flash_fulfilled(ctx, NULL), NULL, NULL);
    (void)p;
    flash_ctx_destroy(ctx);
    cr_assert_eq(atomic_load(&c.live), 0, "%ld allocations not freed", atomic_load(&c.live));
    cr_assert_eq(atomic_load(&c.allocs), atomic_load(&c.frees));
    cr_assert_eq(atomic_load(&c.live_bytes), 0);
}

static void reset_in_cb(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p; (void)arg;
    flash_ctx_reset(ctx);
    flash_alloc(ctx, 100000); /* the new request allocates right away */
}

FLASH_TEST(ctx, reset_inside_a_callback_frees_the_old_request_when_it_unwinds) {
    counter c;
    flash_desc d = counted(&c);
    flash_ctx *ctx = flash_ctx_create(&d);
    flash_alloc(ctx, 100000);
    flash_promise *p = flash_promise_new(ctx);
    flash_on_settle(ctx, p, reset_in_cb, NULL);
    flash_resolve(ctx, p, NULL);
    cr_assert_eq(flash_wait(ctx, p, NULL), FLASH_ECANCELED);
    long live = atomic_load(&c.live);
    flash_ctx_reset(ctx);
    flash_ctx_reset(ctx);
    cr_assert_leq(atomic_load(&c.live), live, "no record of the old request is left behind");
    flash_ctx_destroy(ctx);
    cr_assert_eq(atomic_load(&c.live), 0);
}

FLASH_TEST(ctx, stats_count_loads_hits_batches_and_keys) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &echo);
    static const flash_loader_desc split = {.batch = echo_batch, .max_batch = 2};
    flash_loader *l2 = flash_loader_for(ctx, &split);
    flash_load_str(l, "a");
    flash_load_str(l, "b");
    flash_load_str(l, "a");
    flash_load_str(l2, "x");
    flash_load_str(l2, "y");
    flash_load_str(l2, "z");
    flash_load_str(l, ""); /* counted as a load, rejected */
    flash_drain(ctx);
    flash_load_str(l, "b"); /* settled memo hit */
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.loads, 8);
    cr_assert_eq(s.memo_hits, 2);
    cr_assert_eq(s.batches, 3);
    cr_assert_eq(s.batch_keys, 5);
    cr_assert_eq(s.cache_round_trips, 0);
    cr_assert_eq(s.source_calls, 0);
    flash_ctx_reset(ctx);
    cr_assert_eq(flash_ctx_stats(ctx).loads, 8, "stats are cumulative across resets");
    flash_ctx_stats_clear(ctx);
    s = flash_ctx_stats(ctx);
    cr_assert_eq(s.loads, 0);
    cr_assert_eq(s.memo_hits, 0);
    cr_assert_eq(s.batches, 0);
    cr_assert_eq(s.batch_keys, 0);
    flash_ctx_destroy(ctx);
}

/* ---- per-thread contexts ------------------------------------------------- */

typedef struct thread_result {
    counter *c;
    pthread_barrier_t *barrier;
    flash_ctx *first, *second;
    int rc;
} thread_result;

static void *thread_main(void *arg) {
    thread_result *r = (thread_result *)arg;
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.allocator.alloc = count_alloc;
    d.allocator.free = count_free;
    d.allocator.user_data = r->c;
    r->first = flash_thread_ctx(&d);
    r->second = flash_thread_ctx(NULL); /* desc only matters on first use */
    flash_loader *l = flash_loader_for(r->first, &echo);
    void *v = NULL;
    r->rc = flash_wait(r->first, flash_load_str(l, "t"), &v);
    if (r->rc == 0 && strcmp((char *)v, "v:t") != 0) r->rc = -1000;
    pthread_barrier_wait(r->barrier); /* both contexts alive at once */
    return NULL;
}

FLASH_TEST(ctx, thread_ctx_is_per_thread_and_destroyed_at_thread_exit) {
    counter c;
    memset(&c, 0, sizeof c);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, 2);
    thread_result r1 = {.c = &c, .barrier = &barrier}, r2 = {.c = &c, .barrier = &barrier};
    pthread_t t1, t2;
    cr_assert_eq(pthread_create(&t1, NULL, thread_main, &r1), 0);
    cr_assert_eq(pthread_create(&t2, NULL, thread_main, &r2), 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    pthread_barrier_destroy(&barrier);
    cr_assert_not_null(r1.first);
    cr_assert_not_null(r2.first);
    cr_assert_eq(r1.first, r1.second, "same thread, same context");
    cr_assert_eq(r2.first, r2.second);
    cr_assert_neq(r1.first, r2.first, "two threads, two contexts");
    cr_assert_eq(r1.rc, 0);
    cr_assert_eq(r2.rc, 0);
    cr_assert_gt(atomic_load(&c.allocs), 0, "the threads' desc (allocator) was used");
    cr_assert_eq(atomic_load(&c.live), 0, "thread exit destroyed both contexts");

    flash_ctx *mine = flash_thread_ctx(NULL);
    cr_assert_not_null(mine);
    cr_assert_eq(flash_thread_ctx(NULL), mine);
    flash_thread_ctx_destroy();
    flash_thread_ctx_destroy(); /* twice is harmless */
    flash_ctx *fresh = flash_thread_ctx(NULL);
    cr_assert_not_null(fresh);
    flash_thread_ctx_destroy();
}

/* ---- layer 4: flash_wait / flash_run on the internal queue --------------- */

FLASH_TEST(ctx, wait_returns_value_or_error) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v = IV(1);
    cr_assert_eq(flash_wait(ctx, flash_fulfilled(ctx, IV(5)), &v), 0);
    cr_assert_eq(VI(v), 5);
    cr_assert_eq(flash_wait(ctx, flash_rejected(ctx, FLASH_E404, NULL), &v), FLASH_E404);
    cr_assert_null(v);
    cr_assert_eq(flash_wait(ctx, flash_fulfilled(ctx, NULL), NULL), 0, "value pointer may be NULL");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, wait_on_a_promise_nothing_can_settle_is_eidle) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_promise_new(ctx);
    void *v = IV(1);
    cr_assert_eq(flash_wait(ctx, p, &v), FLASH_EIDLE);
    cr_assert_null(v);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    /* a chain on it too, with unrelated work around it */
    flash_promise *q = flash_then(ctx, p, NULL, NULL);
    flash_load_str(flash_loader_for(ctx, &echo), "unrelated");
    cr_assert_eq(flash_wait(ctx, q, NULL), FLASH_EINVAL, "then(NULL fn) is an EINVAL rejection");
    flash_promise *r = flash_gather(ctx, 1, &p);
    cr_assert_eq(flash_wait(ctx, r, NULL), FLASH_EIDLE);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 1, "the unrelated batch still ran");
    /* settled later, the wait succeeds */
    flash_resolve(ctx, p, IV(3));
    cr_assert_eq(flash_wait(ctx, r, &v), 0);
    flash_ctx_destroy(ctx);
}

static int run_calls;
static flash_promise *run_loads(flash_ctx *ctx, void *arg) {
    run_calls++;
    flash_loader *l = flash_loader_for(ctx, &echo);
    return flash_load_str(l, (const char *)arg);
}

FLASH_TEST(ctx, run_resets_first_then_returns_the_value) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_for(ctx, &echo);
    cr_assert_eq(flash_wait(ctx, flash_load_str(l, "a"), NULL), 0);
    flash_load_str(l, "pending-before-run"); /* an open batch of the old request */
    void *v;
    run_calls = 0;
    cr_assert_eq(flash_run(ctx, run_loads, "a", &v), 0);
    cr_assert_eq(run_calls, 1);
    cr_assert_str_eq(v, "v:a");
    flash_stats s = flash_ctx_stats(ctx);
    cr_assert_eq(s.batches, 2, "the memo was reset, and the old open batch dropped");
    cr_assert_eq(s.batch_keys, 2);
    cr_assert_str_eq(v, "v:a", "the value stays valid until the next reset");
    flash_ctx_destroy(ctx);
}

static flash_promise *fire_and_forget(flash_ctx *ctx, void *arg) {
    (void)arg;
    flash_loader *l = flash_loader_for(ctx, &echo);
    flash_load_str(l, "background"); /* not awaited */
    return flash_fulfilled(ctx, IV(1));
}

FLASH_TEST(ctx, run_drives_batches_it_started_to_completion) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v;
    cr_assert_eq(flash_run(ctx, fire_and_forget, NULL, &v), 0);
    cr_assert_eq(VI(v), 1);
    cr_assert_eq(flash_ctx_stats(ctx).batches, 1, "the un-awaited batch still ran");
    cr_assert_not(flash_ctx_busy(ctx));
    flash_ctx_destroy(ctx);
}

static flash_promise *run_rejects(flash_ctx *ctx, void *arg) {
    (void)arg;
    return flash_rejected(ctx, FLASH_E404, "Http404");
}
static flash_promise *run_null(flash_ctx *ctx, void *arg) {
    (void)ctx; (void)arg;
    return NULL;
}

FLASH_TEST(ctx, run_errors) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v = IV(1);
    cr_assert_eq(flash_run(ctx, run_rejects, NULL, &v), FLASH_E404);
    cr_assert_null(v);
    cr_assert_eq(flash_run(ctx, run_null, NULL, &v), FLASH_ENOMEM);
    cr_assert_eq(flash_run(ctx, NULL, NULL, &v), FLASH_EINVAL);
    cr_assert_eq(flash_run(NULL, run_loads, "a", &v), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

static int nested_run_rc = 1;
static void run_inside(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p; (void)arg;
    nested_run_rc = flash_run(ctx, run_loads, "nested", NULL);
}
static flash_promise *run_with_nested(flash_ctx *ctx, void *arg) {
    (void)arg;
    flash_promise *p = flash_fulfilled(ctx, IV(7));
    flash_on_settle(ctx, p, run_inside, NULL);
    return flash_then(ctx, p, NULL, NULL) ? p : NULL;
}

FLASH_TEST(ctx, run_inside_a_callback_is_estate) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p = flash_fulfilled(ctx, NULL);
    flash_on_settle(ctx, p, run_inside, NULL);
    run_calls = 0;
    flash_drain(ctx);
    cr_assert_eq(nested_run_rc, FLASH_ESTATE);
    cr_assert_eq(run_calls, 0, "fn is not called");
    /* and from inside flash_run itself */
    nested_run_rc = 1;
    void *v;
    cr_assert_eq(flash_run(ctx, run_with_nested, NULL, &v), 0);
    cr_assert_eq(VI(v), 7, "the outer run was not disturbed");
    cr_assert_eq(nested_run_rc, FLASH_ESTATE);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, drain_and_busy) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert_not(flash_ctx_busy(ctx));
    flash_loader *l = flash_loader_for(ctx, &echo);
    flash_promise *a = flash_load_str(l, "a");
    cr_assert(flash_ctx_busy(ctx), "an open batch");
    flash_drain(ctx);
    cr_assert_not(flash_ctx_busy(ctx));
    cr_assert_eq(flash_promise_state(a), FLASH_FULFILLED, "drain dispatched the batch synchronously");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(ctx, attach_loop_twice_or_after_use_is_estate) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *p1 = flash_poll_create(), *p2 = flash_poll_create();
    cr_assert_str_eq(flash_ctx_loop(ctx).vt->name, "queue", "the internal queue until attached");
    cr_assert_eq(flash_ctx_attach_loop(ctx, flash_poll_loop(p1)), 0);
    cr_assert_eq(flash_ctx_loop(ctx).native, p1);
    cr_assert_eq(flash_ctx_attach_loop(ctx, flash_poll_loop(p2)), FLASH_ESTATE);
    cr_assert_eq(flash_poll_attach(ctx, p1), FLASH_ESTATE, "the same loop twice too");
    cr_assert_eq(flash_ctx_loop(ctx).native, p1);
    flash_ctx_destroy(ctx);

    ctx = flash_ctx_create(NULL);
    flash_load_str(flash_loader_for(ctx, &echo), "a"); /* work queued on the internal loop */
    cr_assert_eq(flash_poll_attach(ctx, p2), FLASH_ESTATE, "attach before use");
    flash_ctx_destroy(ctx);

    ctx = flash_ctx_create(NULL);
    flash_loop bad = {NULL, NULL};
    cr_assert_eq(flash_ctx_attach_loop(ctx, bad), FLASH_EINVAL);
    cr_assert_eq(flash_ctx_attach_loop(NULL, flash_poll_loop(p2)), FLASH_EINVAL);
    cr_assert_eq(flash_poll_attach(ctx, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_poll_attach(NULL, p2), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(p1);
    flash_poll_destroy(p2);
}
