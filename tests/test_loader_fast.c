/* The loader's fast paths (issue #16): the plain load inlined into
   flash_load (keys of 1..16 bytes hashed with one folded multiply, copied
   and compared without libc, longer keys compared on the general path),
   the memo entry written in place, a gather's value recorded at settle
   time without its callback, and settled promises recorded by the gather
   itself. Every key length and every differing byte position must keep
   keys apart; memo hits must give the same promise. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "flash.h"

TestSuite(loader_fast, .init = flash_test_watchdog);

static size_t calls, keys_seen;

/* Resolves each key with its own copy of the key (a NUL-terminated string). */
static void echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    calls++;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        keys_seen++;
        cr_assert_eq(flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL)), FLASH_OK);
    }
}

/* "bad..." keys reject, the others resolve with their key. */
static void mixed_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    calls++;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        if (len >= 3 && memcmp(k, "bad", 3) == 0) flash_batch_reject(b, i, FLASH_ENOTFOUND, "bad key");
        else flash_batch_resolve(b, i, (void *)k);
    }
}

static const flash_loader_desc ECHO = {.name = "echo", .batch = echo_batch};
static const flash_loader_desc MIXED = {.name = "mixed", .batch = mixed_batch};

enum { MAXLEN = 40 };

/* For every length 1..MAXLEN: a base key of that length and one key per
   byte position differing from it only there (binary bytes, NUL included). */
static size_t make_keys(char keys[][MAXLEN], size_t *lens) {
    size_t n = 0;
    for (size_t len = 1; len <= MAXLEN; len++) {
        for (size_t pos = 0; pos <= len; pos++) {
            for (size_t j = 0; j < len; j++) keys[n][j] = (char)('a' + (j * 7 + len) % 26);
            if (pos < len) keys[n][pos] = (char)(keys[n][pos] ^ (pos % 2 ? 0x01 : 0x80));
            lens[n++] = len;
        }
    }
    return n;
}

static size_t nkeys(void) { return (size_t)MAXLEN * (MAXLEN + 3) / 2; }

FLASH_TEST(loader_fast, every_length_and_byte_position_is_a_distinct_key) {
    size_t total = nkeys();
    char (*keys)[MAXLEN] = calloc(total, MAXLEN);
    size_t *lens = calloc(total, sizeof *lens);
    flash_promise **ps = calloc(total, sizeof *ps);
    size_t n = make_keys(keys, lens);
    cr_assert_eq(n, total);
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &ECHO);
    calls = keys_seen = 0;
    for (size_t i = 0; i < n; i++) ps[i] = flash_load(l, keys[i], lens[i]);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < i; j++) cr_assert_neq(ps[i], ps[j], "keys %zu and %zu share a promise", i, j);
    /* Every key again: memo hits, the same promises, nothing new. */
    for (size_t i = 0; i < n; i++) cr_assert_eq(flash_load(l, keys[i], lens[i]), ps[i], "key %zu: no memo hit", i);
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, n, ps), &v), FLASH_OK);
    cr_assert_eq(calls, 1);
    cr_assert_eq(keys_seen, n);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(memcmp(((void **)v)[i], keys[i], lens[i]), 0, "key %zu resolved with another key", i);
        cr_assert_eq(((char *)((void **)v)[i])[lens[i]], 0, "key %zu: copy not NUL-terminated", i);
    }
    /* Hits on settled entries, through the gather's settled path. */
    for (size_t i = 0; i < n; i++) cr_assert_eq(flash_load(l, keys[i], lens[i]), ps[i]);
    flash_stats st = flash_ctx_stats(ctx);
    cr_assert_eq(st.loads, 3 * n);
    cr_assert_eq(st.memo_hits, 2 * n);
    flash_ctx_destroy(ctx);
    free(keys);
    free(lens);
    free(ps);
}

FLASH_TEST(loader_fast, memo_survives_growth_and_clear) {
    enum { N = 20000 };
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &ECHO);
    static flash_promise *ps[N];
    static char buf[N][24];
    calls = keys_seen = 0;
    for (int i = 0; i < N; i++) {
        /* Lengths 1..23 by turns: short, middle and long keys in one table. */
        int len = snprintf(buf[i], sizeof buf[i], "%0*d", 1 + i % 23, i);
        ps[i] = flash_load(l, buf[i], (size_t)len);
        if (i % 3 == 0) cr_assert_eq(flash_load(l, buf[i / 2], strlen(buf[i / 2])), ps[i / 2]);
    }
    for (int i = 0; i < N; i++) cr_assert_eq(flash_load_str(l, buf[i]), ps[i], "key %d lost while the table grew", i);
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, N, ps), NULL), FLASH_OK);
    cr_assert_eq(keys_seen, (size_t)N);
    cr_assert_eq(flash_clear(l, buf[7], strlen(buf[7])), FLASH_OK);
    flash_promise *again = flash_load_str(l, buf[7]);
    cr_assert_neq(again, ps[7]);
    cr_assert_eq(flash_promise_state(again), FLASH_PENDING);
    cr_assert_eq(flash_load_str(l, buf[8]), ps[8]);
    flash_clear_all(l);
    cr_assert_neq(flash_load_str(l, buf[8]), ps[8]);
    cr_assert_eq(flash_wait(ctx, again, NULL), FLASH_OK);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fast, gather_records_values_and_rejections_at_settle_time) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &MIXED);
    const char *ks[] = {"a1", "bad1", "a2", "a3", "bad2", "a4"};
    flash_promise *ps[6], *dup[12];
    for (int i = 0; i < 6; i++) ps[i] = flash_load_str(l, ks[i]);
    /* Each promise twice in a second gather: a second callback per promise. */
    for (int i = 0; i < 12; i++) dup[i] = ps[i % 6];
    flash_promise *g = flash_gather(ctx, 6, ps);
    flash_promise *gs = flash_gather_settled(ctx, 12, dup);
    flash_promise *only_ok[] = {ps[0], ps[2], ps[3], ps[5]};
    flash_promise *gok = flash_gather(ctx, 4, only_ok);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(g), "bad key");
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, gs, &v), FLASH_OK);
    flash_settled *s = (flash_settled *)v;
    for (int i = 0; i < 12; i++) {
        if (strncmp(ks[i % 6], "bad", 3) == 0) {
            cr_assert_eq(s[i].state, FLASH_REJECTED);
            cr_assert_eq(s[i].error, FLASH_ENOTFOUND);
        } else {
            cr_assert_eq(s[i].state, FLASH_FULFILLED);
            cr_assert_str_eq((const char *)s[i].value, ks[i % 6]);
        }
    }
    cr_assert_eq(flash_wait(ctx, gok, &v), FLASH_OK);
    cr_assert_str_eq(((const char **)v)[0], "a1");
    cr_assert_str_eq(((const char **)v)[3], "a4");
    /* A gather over settled entries (memo hits) answers without a tick. */
    flash_promise *hits[] = {flash_load_str(l, "a2"), flash_load_str(l, "a3")};
    flash_promise *gh = flash_gather(ctx, 2, hits);
    cr_assert_eq(flash_promise_state(gh), FLASH_FULFILLED);
    cr_assert_str_eq(((const char **)flash_promise_value(gh))[1], "a3");
    /* The rejected keys were forgotten: loading them again is a new batch. */
    calls = 0;
    flash_promise *b1 = flash_load_str(l, "bad1");
    cr_assert_neq(b1, ps[1]);
    cr_assert_eq(flash_wait(ctx, b1, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(calls, 1);
    flash_ctx_destroy(ctx);
}

static size_t fold_key(const void *key, size_t len, void *out, size_t cap, void *ud) {
    (void)ud;
    /* Case-insensitive memo key, longer than the key by a prefix. */
    size_t n = len + 4;
    if (n <= cap) {
        memcpy(out, "key:", 4);
        for (size_t i = 0; i < len; i++) {
            char c = ((const char *)key)[i];
            ((char *)out)[4 + i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        }
    }
    return n;
}

FLASH_TEST(loader_fast, key_fn_max_memo_and_no_memo_take_the_general_path) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader_desc kd = {.name = "fold", .batch = echo_batch, .key_fn = fold_key};
    flash_loader *l = flash_loader_create(ctx, &kd);
    flash_promise *a = flash_load_str(l, "Hello-World-Long-Key-Over-16");
    cr_assert_eq(flash_load_str(l, "hello-world-long-key-over-16"), a);
    cr_assert_eq(flash_load_str(l, "HI"), flash_load_str(l, "hi"));
    cr_assert_eq(flash_wait(ctx, a, NULL), FLASH_OK);
    cr_assert_str_eq((const char *)flash_promise_value(a), "Hello-World-Long-Key-Over-16");

    flash_loader_desc md = {.name = "bounded", .batch = echo_batch, .max_memo = 2};
    flash_loader *m = flash_loader_create(ctx, &md);
    flash_promise *x = flash_load_str(m, "x"), *y = flash_load_str(m, "y");
    cr_assert_eq(flash_load_str(m, "x"), x);
    flash_promise *z = flash_load_str(m, "z"); /* evicts x */
    cr_assert_eq(flash_load_str(m, "y"), y);
    cr_assert_eq(flash_load_str(m, "z"), z);
    flash_promise *x2 = flash_load_str(m, "x");
    cr_assert_neq(x2, x);
    cr_assert_eq(flash_wait(ctx, x2, NULL), FLASH_OK); /* dispatches m's batches */

    flash_loader_desc nd = {.name = "nomemo", .batch = echo_batch, .no_memo = true};
    flash_loader *n = flash_loader_create(ctx, &nd);
    calls = keys_seen = 0;
    flash_promise *p1 = flash_load_str(n, "same-key-longer-than-16-bytes");
    cr_assert_eq(flash_load_str(n, "same-key-longer-than-16-bytes"), p1, "unique within one batch");
    cr_assert_eq(flash_wait(ctx, p1, NULL), FLASH_OK);
    cr_assert_eq(keys_seen, 1);
    cr_assert_neq(flash_load_str(n, "same-key-longer-than-16-bytes"), p1, "no memo across batches");
    cr_assert_eq(flash_promise_state(x), FLASH_FULFILLED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fast, empty_and_null_keys_are_refused) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &ECHO);
    cr_assert_null(flash_load(NULL, "k", 1));
    cr_assert_eq(flash_promise_error(flash_load(l, NULL, 3)), FLASH_EINVAL);
    cr_assert_eq(flash_promise_error(flash_load(l, "k", 0)), FLASH_EINVAL);
    cr_assert_eq(flash_promise_error(flash_load_str(l, "")), FLASH_EINVAL);
    cr_assert_eq(flash_promise_error(flash_load_str(l, NULL)), FLASH_EINVAL);
    flash_ctx_destroy(ctx);
}

static void *payload_seen[8];
static size_t payload_n;
static void payload_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    payload_n = flash_batch_size(b);
    for (size_t i = 0; i < flash_batch_size(b) && i < 8; i++) payload_seen[i] = flash_batch_payload(b, i);
    for (size_t i = 0; i < flash_batch_size(b); i++) flash_batch_resolve(b, i, flash_batch_payload(b, i));
}

FLASH_TEST(loader_fast, payloads_follow_keys_of_every_shape) {
    /* The payload lives after the key (and the memo key of a key_fn), only
       when there is one: plain short and long keys, and key_fn keys. */
    static int v[6];
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader_desc pd = {.name = "payload", .batch = payload_batch};
    flash_loader_desc kd = {.name = "payload_fold", .batch = payload_batch, .key_fn = fold_key};
    flash_loader *l = flash_loader_create(ctx, &pd), *k = flash_loader_create(ctx, &kd);
    flash_promise *a = flash_load_with(l, "a", 1, &v[0]);
    flash_promise *b = flash_load(l, "b", 1); /* no payload: NULL */
    flash_promise *c = flash_load_with(l, "a-key-longer-than-sixteen", 25, &v[1]);
    flash_promise *d = flash_load_with(l, "1234567", 7, &v[2]);
    cr_assert_eq(flash_load_with(l, "a", 1, &v[3]), a, "first load's payload wins");
    cr_assert_eq(flash_wait(ctx, flash_gather(ctx, 4, (flash_promise *[]){a, b, c, d}), NULL), FLASH_OK);
    cr_assert_eq(payload_n, 4);
    cr_assert_eq(flash_promise_value(a), &v[0]);
    cr_assert_null(flash_promise_value(b));
    cr_assert_eq(flash_promise_value(c), &v[1]);
    cr_assert_eq(flash_promise_value(d), &v[2]);
    flash_promise *e = flash_load_with(k, "Mixed-Case-Key", 14, &v[4]);
    flash_promise *f = flash_load_with(k, "x", 1, &v[5]);
    cr_assert_eq(flash_load_with(k, "mixed-case-key", 14, &v[3]), e);
    cr_assert_eq(flash_wait(ctx, e, NULL), FLASH_OK);
    cr_assert_eq(flash_promise_value(e), &v[4]);
    cr_assert_eq(flash_promise_value(f), &v[5]);
    flash_ctx_destroy(ctx);
}

/* Batch sizes seen by sizes_batch, in dispatch order. */
static size_t sizes[512], nsizes;
static void sizes_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    if (nsizes < 512) sizes[nsizes++] = flash_batch_size(b);
    for (size_t i = 0; i < flash_batch_size(b); i++)
        cr_assert_eq(flash_batch_resolve(b, i, (void *)flash_batch_key(b, i, NULL)), FLASH_OK);
}

FLASH_TEST(loader_fast, max_batch_around_the_key_array_and_small_arena_blocks) {
    /* The fast path appends while count < room (the key array's capacity,
       or max_batch when less): every max_batch near the array's doublings
       (16, 32, 64, ...), with the memo table growing (at 32, 64, 128 keys)
       and the arena's blocks running out (1 KiB blocks) in the same tick. */
    static const uint32_t maxes[] = {0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 299, 300, 1000};
    enum { N = 300 };
    static char buf[N][16];
    static flash_promise *ps[N];
    for (size_t m = 0; m < sizeof maxes / sizeof maxes[0]; m++) {
        for (int small = 0; small < 2; small++) {
            flash_desc d = {0};
            if (small) d.arena_block = 1024;
            flash_ctx *ctx = flash_ctx_create(&d);
            flash_loader_desc ld = {.name = "sizes", .batch = sizes_batch, .max_batch = maxes[m]};
            flash_loader *l = flash_loader_create(ctx, &ld);
            nsizes = 0;
            for (int i = 0; i < N; i++) {
                snprintf(buf[i], sizeof buf[i], "k%d", i * 7919);
                ps[i] = flash_load_str(l, buf[i]);
                cr_assert_not_null(ps[i]);
                /* a memo hit on an older key in between */
                cr_assert_eq(flash_load_str(l, buf[i / 2]), ps[i / 2]);
            }
            void *v = NULL;
            cr_assert_eq(flash_wait(ctx, flash_gather(ctx, N, ps), &v), FLASH_OK);
            size_t per = maxes[m] ? maxes[m] : N, want = (N + per - 1) / per, total = 0;
            cr_assert_eq(nsizes, want, "max_batch %u: %zu batches, not %zu", maxes[m], nsizes, want);
            for (size_t k = 0; k < nsizes; k++) {
                cr_assert_eq(sizes[k], k + 1 < nsizes ? per : N - per * (nsizes - 1), "max_batch %u: batch %zu",
                             maxes[m], k);
                total += sizes[k];
            }
            cr_assert_eq(total, (size_t)N);
            for (int i = 0; i < N; i++) cr_assert_str_eq(((const char **)v)[i], buf[i]);
            flash_stats st = flash_ctx_stats(ctx);
            cr_assert_eq(st.loads, 2 * N);
            cr_assert_eq(st.memo_hits, N);
            flash_ctx_destroy(ctx);
        }
    }
}

/* ---- a gather holding the same promise more than once (issue #16) -------- */

static void count_cb(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx;
    (void)p;
    ++*(int *)arg;
}

static void *refuse_alloc(size_t n, void *ud) { return *(bool *)ud ? NULL : malloc(n); }
static void refuse_free(void *p, void *ud) {
    (void)ud;
    free(p);
}

FLASH_TEST(loader_fast, a_gather_waits_once_per_promise_and_fills_every_position) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &MIXED);
    flash_promise *a = flash_load_str(l, "a"), *b = flash_load_str(l, "b"), *c = flash_load_str(l, "c");
    /* a thrice, b twice: one callback each; positions filled at completion. */
    flash_promise *ps[] = {a, b, a, a, c, b};
    flash_promise *g = flash_gather(ctx, 6, ps);
    /* a promise whose only waiter is another gather: a second callback. */
    flash_promise *g2 = flash_gather(ctx, 3, (flash_promise *[]){c, a, c});
    /* the settled form keeps one callback per position. */
    flash_promise *gs = flash_gather_settled(ctx, 3, (flash_promise *[]){b, b, a});
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, g, &v), FLASH_OK);
    const char *want[] = {"a", "b", "a", "a", "c", "b"};
    for (int i = 0; i < 6; i++) cr_assert_str_eq(((const char **)v)[i], want[i], "position %d", i);
    cr_assert_eq(flash_wait(ctx, g2, &v), FLASH_OK);
    cr_assert_str_eq(((const char **)v)[0], "c");
    cr_assert_str_eq(((const char **)v)[1], "a");
    cr_assert_str_eq(((const char **)v)[2], "c");
    cr_assert_eq(flash_wait(ctx, gs, &v), FLASH_OK);
    flash_settled *s = (flash_settled *)v;
    cr_assert_str_eq((const char *)s[0].value, "b");
    cr_assert_str_eq((const char *)s[1].value, "b");
    cr_assert_str_eq((const char *)s[2].value, "a");

    /* A repeated promise that rejects rejects the gather once. */
    flash_promise *bad = flash_load_str(l, "bad-x"), *ok = flash_load_str(l, "ok-x");
    flash_promise *gb = flash_gather(ctx, 4, (flash_promise *[]){bad, ok, bad, bad});
    cr_assert_eq(flash_wait(ctx, gb, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq(flash_promise_message(gb), "bad key");

    /* A promise with a user callback first, then repeated: callbacks kept. */
    int runs = 0;
    flash_promise *u = flash_load_str(l, "u");
    cr_assert_eq(flash_on_settle(ctx, u, count_cb, &runs), FLASH_OK);
    flash_promise *gu = flash_gather(ctx, 3, (flash_promise *[]){u, u, u});
    cr_assert_eq(flash_wait(ctx, gu, &v), FLASH_OK);
    for (int i = 0; i < 3; i++) cr_assert_str_eq(((const char **)v)[i], "u");
    cr_assert_eq(runs, 1);

    /* Repeated, one of them already settled by then: a hit and a pending one. */
    flash_promise *d = flash_load_str(l, "d");
    flash_promise *gd = flash_gather(ctx, 4, (flash_promise *[]){d, a, d, a});
    cr_assert_eq(flash_wait(ctx, gd, &v), FLASH_OK);
    cr_assert_str_eq(((const char **)v)[2], "d");
    cr_assert_str_eq(((const char **)v)[3], "a");
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fast, a_repeated_promise_out_of_memory_rejects_the_gather_cleanly) {
    /* Every arena fill level before the gather: somewhere its record of the
       repeated position finds no memory; then the gather rejects with
       FLASH_ENOMEM (or is NULL when its own struct found none), never hangs. */
    size_t oom = 0, ok = 0;
    for (size_t pad = 0; pad <= 2048; pad += 8) {
        bool refuse = false;
        flash_desc d = {.arena_block = 1024, .allocator = {refuse_alloc, refuse_free, &refuse}};
        flash_ctx *ctx = flash_ctx_create(&d);
        flash_promise *p = flash_promise_new(ctx);
        cr_assert_not_null(p);
        refuse = true;
        (void)flash_alloc(ctx, pad);
        flash_promise *g = flash_gather(ctx, 3, (flash_promise *[]){p, p, p});
        refuse = false;
        if (g && flash_promise_state(g) == FLASH_REJECTED) {
            cr_assert_eq(flash_promise_error(g), FLASH_ENOMEM);
            oom++;
        } else if (g) {
            void *v = NULL;
            cr_assert_eq(flash_resolve(ctx, p, (void *)"x"), FLASH_OK);
            cr_assert_eq(flash_wait(ctx, g, &v), FLASH_OK);
            for (int i = 0; i < 3; i++) cr_assert_str_eq(((const char **)v)[i], "x");
            ok++;
        }
        flash_ctx_destroy(ctx);
    }
    cr_assert_gt(oom, 0, "no fill level reached the repeated position's record");
    cr_assert_gt(ok, 0);
}

/* ---- flash_batch_resolve's checks (issue #16: one `live` flag) ------------ */

static flash_batch *held;
static void hold_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ctx;
    (void)ud;
    held = b;
}

FLASH_TEST(loader_fast, resolve_checks_every_misuse_and_a_reset) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader_desc hd = {.name = "hold", .batch = hold_batch};
    flash_loader *l = flash_loader_create(ctx, &hd);
    flash_promise *x = flash_load_str(l, "x"), *y = flash_load_str(l, "y"), *z = flash_load_str(l, "z");
    flash_promise *g = flash_gather(ctx, 3, (flash_promise *[]){x, y, z});
    held = NULL;
    cr_assert_eq(flash_loader_dispatch(l), FLASH_OK);
    cr_assert_not_null(held);
    cr_assert_eq(flash_batch_resolve(NULL, 0, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_batch_resolve(held, 3, NULL), FLASH_EBATCH);
    cr_assert_eq(flash_batch_resolve(held, 0, (void *)"X"), FLASH_OK);
    cr_assert_eq(flash_batch_resolve(held, 0, (void *)"X2"), FLASH_EBATCH, "settled twice");
    cr_assert_eq(flash_batch_reject(held, 1, FLASH_ENOTFOUND, "gone"), FLASH_OK);
    cr_assert_eq(flash_batch_resolve(held, 1, NULL), FLASH_EBATCH);
    cr_assert_eq(flash_batch_resolve(held, 2, (void *)"Z"), FLASH_OK); /* the last key ends the batch */
    cr_assert_eq(flash_batch_resolve(held, 2, NULL), FLASH_EBATCH, "an ended batch");
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    cr_assert_str_eq((const char *)flash_promise_value(x), "X");
    cr_assert_str_eq((const char *)flash_promise_value(z), "Z");

    /* A batch of a reset request (no cancel function): its calls answer
       FLASH_ECANCELED, and the next request's batch resolves normally. */
    (void)flash_load_str(l, "old1");
    (void)flash_load_str(l, "old2");
    held = NULL;
    cr_assert_eq(flash_loader_dispatch(l), FLASH_OK);
    flash_batch *old = held;
    cr_assert_not_null(old);
    flash_ctx_reset(ctx);
    cr_assert_eq(flash_batch_resolve(old, 0, NULL), FLASH_ECANCELED);
    l = flash_loader_create(ctx, &hd);
    flash_promise *n1 = flash_load_str(l, "new1"), *n2 = flash_load_str(l, "new2");
    held = NULL;
    cr_assert_eq(flash_loader_dispatch(l), FLASH_OK);
    cr_assert_eq(flash_batch_resolve(held, 1, (void *)"N2"), FLASH_OK);
    cr_assert_eq(flash_batch_resolve(held, 0, (void *)"N1"), FLASH_OK);
    cr_assert_str_eq((const char *)flash_promise_value(n1), "N1");
    cr_assert_str_eq((const char *)flash_promise_value(n2), "N2");
    cr_assert_eq(flash_batch_resolve(old, 1, NULL), FLASH_ECANCELED); /* the orphan ends */
    cr_assert_eq(flash_batch_end(old), FLASH_ECANCELED);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fast, key_arrays_sized_by_the_last_batch_of_the_desc) {
    /* A batch's key array starts as large as the last batch of its desc
       (capped by max_batch), and still grows past it: requests of varying
       sizes on one context, with and without max_batch. */
    static const size_t sizes_per_request[] = {300, 5, 1000, 1, 64, 65, 2000, 17};
    static char buf[2000][24];
    static flash_promise *ps[2000];
    flash_ctx *ctx = flash_ctx_create(NULL);
    for (int capped = 0; capped < 2; capped++) {
        flash_loader_desc ld = {.name = "sizes", .batch = sizes_batch, .max_batch = capped ? 100 : 0};
        for (size_t r = 0; r < sizeof sizes_per_request / sizeof sizes_per_request[0]; r++) {
            size_t n = sizes_per_request[r];
            flash_ctx_reset(ctx);
            flash_loader *l = flash_loader_create(ctx, &ld);
            nsizes = 0;
            for (size_t i = 0; i < n; i++) {
                snprintf(buf[i], sizeof buf[i], "r%u-%u", (unsigned)r, (unsigned)i);
                ps[i] = flash_load_str(l, buf[i]);
            }
            void *v = NULL;
            cr_assert_eq(flash_wait(ctx, flash_gather(ctx, n, ps), &v), FLASH_OK);
            size_t total = 0;
            for (size_t k = 0; k < nsizes; k++) {
                cr_assert_leq(sizes[k], capped ? (size_t)100 : n);
                total += sizes[k];
            }
            cr_assert_eq(total, n);
            cr_assert_eq(nsizes, capped ? (n + 99) / 100 : 1);
            for (size_t i = 0; i < n; i++) cr_assert_str_eq(((const char **)v)[i], buf[i]);
        }
    }
    flash_ctx_destroy(ctx);
}

/* ---- flash_load_many: each load joins its gather as it is made ------------ */

FLASH_TEST(loader_fast, load_many_joins_hits_repeats_failures_and_bad_keys) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader *l = flash_loader_create(ctx, &MIXED);
    /* a settled entry first: a memo hit inside load_many */
    flash_promise *pre = flash_load_str(l, "pre");
    cr_assert_eq(flash_wait(ctx, pre, NULL), FLASH_OK);
    calls = 0;
    const void *keys[] = {"x", "pre", "y", "x", "a-key-longer-than-16-bytes", "x", "y"};
    size_t lens[] = {1, 3, 1, 1, 26, 1, 1};
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 7, keys, lens), &v), FLASH_OK);
    for (int i = 0; i < 7; i++) cr_assert_eq(memcmp(((void **)v)[i], keys[i], lens[i]), 0, "position %d", i);
    cr_assert_eq(calls, 1, "one batch");
    /* a repeated key that fails rejects once; an empty key rejects too */
    const void *bad[] = {"ok1", "bad-1", "bad-1", "ok2"};
    size_t blens[] = {3, 5, 5, 3};
    flash_promise *g = flash_load_many(l, 4, bad, blens);
    cr_assert_eq(flash_wait(ctx, g, NULL), FLASH_ENOTFOUND);
    const void *empty[] = {"ok3", ""};
    size_t elens[] = {3, 0};
    cr_assert_eq(flash_wait(ctx, flash_load_many(l, 2, empty, elens), NULL), FLASH_EINVAL);
    /* the same call twice: the second is all memo hits, settled at once */
    g = flash_load_many(l, 7, keys, lens);
    cr_assert_eq(flash_promise_state(g), FLASH_FULFILLED);
    cr_assert_eq(memcmp(((void **)flash_promise_value(g))[6], "y", 1), 0);
    flash_ctx_destroy(ctx);
}

static flash_ctx *reset_ctx;
static int reset_after;
static void resetting_schedule(flash_ctx *ctx, flash_loader *l, void *ud) {
    (void)l;
    (void)ud;
    if (--reset_after == 0) flash_ctx_reset(ctx);
}

FLASH_TEST(loader_fast, load_many_stops_when_a_load_resets_the_context) {
    /* max_batch 2 opens a batch every second key; the schedule hook of the
       third batch resets the context: the loads stop there and the answer
       is FLASH_ECANCELED, on the new request's memory. */
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_loader_desc rd = {.name = "resetting", .batch = echo_batch, .max_batch = 2, .schedule = resetting_schedule};
    flash_loader *l = flash_loader_create(ctx, &rd);
    reset_ctx = ctx;
    reset_after = 3;
    const void *keys[] = {"a", "b", "c", "d", "e", "f", "g"};
    size_t lens[] = {1, 1, 1, 1, 1, 1, 1};
    flash_promise *g = flash_load_many(l, 7, keys, lens);
    cr_assert_not_null(g);
    cr_assert_eq(flash_promise_error(g), FLASH_ECANCELED);
    cr_assert_eq(reset_after, 0);
    /* the context serves the next request */
    flash_loader *l2 = flash_loader_create(ctx, &ECHO);
    void *v = NULL;
    cr_assert_eq(flash_wait(ctx, flash_load_many(l2, 3, keys, lens), &v), FLASH_OK);
    cr_assert_eq(memcmp(((void **)v)[2], "c", 1), 0);
    flash_ctx_destroy(ctx);
}

FLASH_TEST(loader_fast, load_many_out_of_memory_answers_null_or_rejects) {
    /* Every arena fill level: the gather finds no memory (NULL), or a load
       does (its position rejects the gather), never a hang or a crash. */
    size_t null_or_rejected = 0, ok = 0;
    const void *keys[] = {"k1", "k2", "k3", "k1", "k4", "k5", "k6", "k7"};
    size_t lens[] = {2, 2, 2, 2, 2, 2, 2, 2};
    for (size_t pad = 0; pad <= 4096; pad += 8) {
        bool refuse = false;
        flash_desc d = {.arena_block = 4096, .allocator = {refuse_alloc, refuse_free, &refuse}};
        flash_ctx *ctx = flash_ctx_create(&d);
        flash_loader *l = flash_loader_create(ctx, &ECHO);
        cr_assert_not_null(l);
        /* the memo table and the loop's queue exist before memory runs out */
        cr_assert_eq(flash_wait(ctx, flash_load_str(l, "warm"), NULL), FLASH_OK);
        refuse = true;
        for (size_t k = 0; k < pad / 8; k++) (void)flash_alloc(ctx, 8); /* small: the current block */
        flash_promise *g = flash_load_many(l, 8, keys, lens);
        refuse = false;
        if (!g || flash_promise_state(g) == FLASH_REJECTED) {
            null_or_rejected++;
            if (g) (void)flash_wait(ctx, g, NULL);
        } else {
            void *v = NULL;
            int rc = flash_wait(ctx, g, &v);
            if (rc == FLASH_OK) {
                for (int i = 0; i < 8; i++) cr_assert_eq(memcmp(((void **)v)[i], keys[i], 2), 0);
                ok++;
            } else {
                cr_assert(rc == FLASH_ENOMEM || rc == FLASH_EINVAL, "rc %d", rc);
                null_or_rejected++;
            }
        }
        flash_ctx_destroy(ctx);
    }
    cr_assert_gt(null_or_rejected, 0);
    cr_assert_gt(ok, 0);
}

FLASH_TEST(loader_fast, load_many_hashes_ahead_every_key_shape) {
    /* Keys hashed a few loads ahead: short and long keys, a first load with
       no memo table yet, the table growing under the loads, fewer keys than
       the look-ahead, and a key_fn loader (no look-ahead hash is usable). */
    enum { N = 3000 };
    static char buf[N][48];
    static const void *ks[N];
    static size_t ls[N];
    for (int i = 0; i < N; i++) {
        ls[i] = (size_t)snprintf(buf[i], sizeof buf[i], "%0*d", 1 + i % 40, i % 2000); /* repeats after 2000 */
        ks[i] = buf[i];
    }
    flash_loader_desc kd = {.name = "fold", .batch = echo_batch, .key_fn = fold_key};
    for (int k = 0; k < 2; k++) {
        for (size_t n = 0; n <= N; n = n ? n * 3 : 1) {
            flash_ctx *ctx = flash_ctx_create(NULL);
            flash_loader *l = flash_loader_create(ctx, k ? &kd : &ECHO);
            calls = keys_seen = 0;
            void *v = NULL;
            cr_assert_eq(flash_wait(ctx, flash_load_many(l, n, ks, ls), &v), FLASH_OK);
            for (size_t i = 0; i < n; i++) {
                cr_assert_eq(memcmp(((void **)v)[i], ks[i], ls[i]), 0, "n %zu: position %zu", n, i);
                cr_assert_eq(flash_load(l, ks[i], ls[i]), flash_load(l, ks[i], ls[i]));
            }
            cr_assert_leq(calls, 1);
            /* a second call: every key a memo hit */
            flash_promise *g = flash_load_many(l, n, ks, ls);
            cr_assert_eq(flash_promise_state(g), FLASH_FULFILLED);
            flash_ctx_destroy(ctx);
            if (n == N) break;
            if (n * 3 > N) n = N / 3;
        }
    }
}
