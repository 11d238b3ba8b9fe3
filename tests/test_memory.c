/* The in-process cache backend driven directly through its vtable: statuses
   of every opcode, CAS tokens, INCR, TTLs on a fake clock, LRU eviction,
   key and value limits, completion order and cancel, stats, many keys and
   threads sharing one store. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"

/* ---- helpers ---- */

typedef struct fake_clock {
    int64_t now;
} fake_clock;

static int64_t fake_clock_ms(void *ud) { return ((fake_clock *)ud)->now; }

/* What a done callback saw. GET values are copied (they are only valid until
   done returns) and item->value is pointed at the copy. */
typedef struct capture {
    int calls;
    int seq;           /* global completion order */
    bool copy_values;
    char **copies;     /* one per item when copy_values */
} capture;

static int completion_counter;

static void capture_done(flash_cache_op *op) {
    capture *c = (capture *)op->data;
    c->calls++;
    c->seq = ++completion_counter;
    if (op->code == FLASH_CACHE_GET && c->copy_values) {
        size_t i;
        if (!c->copies) c->copies = (char **)calloc(op->count ? op->count : 1, sizeof *c->copies);
        for (i = 0; i < op->count; i++) {
            flash_cache_item *it = &op->items[i];
            if (it->status != FLASH_OK) continue;
            c->copies[i] = (char *)malloc(it->value_len + 1);
            if (it->value_len) memcpy(c->copies[i], it->value, it->value_len);
            c->copies[i][it->value_len] = 0;
            it->value = c->copies[i];
        }
    }
}

static void capture_free(capture *c, size_t n) {
    size_t i;
    if (!c->copies) return;
    for (i = 0; i < n; i++) free(c->copies[i]);
    free(c->copies);
    c->copies = NULL;
}

typedef struct mfix {
    flash_poll *loop;
    flash_cache cache;
    fake_clock clock;
} mfix;

static void mfix_init(mfix *f, const flash_memory_desc *desc_in) {
    flash_memory_desc d;
    memset(f, 0, sizeof *f);
    if (desc_in) d = *desc_in;
    else memset(&d, 0, sizeof d);
    f->clock.now = 1000000;
    if (!d.clock_ms) {
        d.clock_ms = fake_clock_ms;
        d.clock_user_data = &f->clock;
    }
    f->loop = flash_poll_create();
    f->cache = flash_memory_create(&d);
    cr_assert(f->loop);
    cr_assert(f->cache.vt && f->cache.self);
}

static void mfix_fini(mfix *f) {
    if (f->cache.vt) flash_cache_destroy(f->cache);
    if (f->loop) flash_poll_destroy(f->loop);
    memset(f, 0, sizeof *f);
}

/* The fixture of the running test: a global, so that a failed assertion
   leaves it reachable and the suite's fini frees it (no false leaks). */
static mfix M;
static void suite_init(void) { memset(&M, 0, sizeof M); }
static void suite_fini(void) { mfix_fini(&M); }
TestSuite(memory, .init = suite_init, .fini = suite_fini);

static void submit(mfix *f, flash_cache_op *op, flash_cache_opcode code, flash_cache_item *items, size_t n,
                   capture *cap) {
    memset(op, 0, sizeof *op);
    op->code = code;
    op->items = items;
    op->count = n;
    op->done = capture_done;
    op->data = cap;
    op->status = 12345;
    f->cache.vt->submit(f->cache.self, flash_poll_loop(f->loop), op);
}

/* Run one op to completion: done must not run inside submit, and must run
   exactly once on the next tick. Returns op.status. */
static int run_op(mfix *f, flash_cache_opcode code, flash_cache_item *items, size_t n) {
    flash_cache_op op;
    capture cap;
    memset(&cap, 0, sizeof cap);
    cap.copy_values = false;
    submit(f, &op, code, items, n, &cap);
    cr_assert_eq(cap.calls, 0, "done ran inside submit");
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(cap.calls, 1, "done must run exactly once on the next tick, ran %d times", cap.calls);
    cr_assert_eq(op.round_trips, 1);
    return op.status;
}

static flash_cache_item item_kv(const char *key, const char *value) {
    flash_cache_item it;
    memset(&it, 0, sizeof it);
    it.key = key;
    it.key_len = strlen(key);
    it.value = value;
    it.value_len = value ? strlen(value) : 0;
    it.status = 12345;
    return it;
}

static int set_one(mfix *f, const char *key, const char *value, uint32_t flags, uint32_t ttl) {
    flash_cache_item it = item_kv(key, value);
    it.flags = flags;
    it.ttl_s = ttl;
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, &it, 1), 0);
    return it.status;
}

static int store_one(mfix *f, flash_cache_opcode code, const char *key, const char *value, uint64_t cas) {
    flash_cache_item it = item_kv(key, value);
    it.cas = cas;
    cr_assert_eq(run_op(f, code, &it, 1), 0);
    return it.status;
}

/* GET one key; on a hit copies the value into buf (cap bytes). */
typedef struct got {
    int status;
    char value[512];
    size_t len;
    uint32_t flags;
    uint64_t cas;
} got;

static got get_one(mfix *f, const char *key) {
    flash_cache_op op;
    capture cap;
    got g;
    flash_cache_item it = item_kv(key, NULL);
    memset(&cap, 0, sizeof cap);
    memset(&g, 0, sizeof g);
    cap.copy_values = true;
    submit(f, &op, FLASH_CACHE_GET, &it, 1, &cap);
    cr_assert_eq(cap.calls, 0);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(cap.calls, 1);
    cr_assert_eq(op.status, 0);
    g.status = it.status;
    if (it.status == FLASH_OK) {
        cr_assert(it.value_len < sizeof g.value);
        memcpy(g.value, it.value, it.value_len);
        g.len = it.value_len;
        g.flags = it.flags;
        g.cas = it.cas;
    }
    capture_free(&cap, 1);
    return g;
}

static flash_cache_item incr_item(const char *key, uint64_t delta, bool create, uint64_t initial, uint32_t ttl) {
    flash_cache_item it = item_kv(key, NULL);
    it.number = delta;
    it.create = create;
    it.initial = initial;
    it.ttl_s = ttl;
    return it;
}

static int incr_one(mfix *f, const char *key, uint64_t delta, bool create, uint64_t initial, uint64_t *out) {
    flash_cache_item it = incr_item(key, delta, create, initial, 0);
    cr_assert_eq(run_op(f, FLASH_CACHE_INCR, &it, 1), 0);
    if (out) *out = it.number;
    return it.status;
}

/* ---- GET ---- */

FLASH_TEST(memory, get_hit_gives_value_flags_and_cas_and_miss_is_enotfound) {
    mfix *f = &M;
    mfix_init(f, NULL);
    cr_assert_eq(set_one(f, "k1", "hello", 0xdeadbeef, 0), FLASH_OK);
    got g = get_one(f, "k1");
    cr_assert_eq(g.status, FLASH_OK);
    cr_assert_eq(g.len, 5);
    cr_assert_eq(memcmp(g.value, "hello", 5), 0);
    cr_assert_eq(g.flags, 0xdeadbeef);
    cr_assert_neq(g.cas, 0, "a stored item has a non-zero CAS token");
    got m = get_one(f, "nope");
    cr_assert_eq(m.status, FLASH_ENOTFOUND);
    mfix_fini(f);
}

FLASH_TEST(memory, get_many_mixes_hits_misses_duplicates_and_binary_values) {
    mfix *f = &M;
    flash_cache_item set[2], get[5];
    flash_cache_op op;
    capture cap;
    mfix_init(f, NULL);
    set[0] = item_kv("a", NULL);
    set[0].value = "x\0y\r\nEND\r\n";
    set[0].value_len = 10;
    set[1] = item_kv("empty", "");
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, set, 2), 0);
    cr_assert_eq(set[0].status, 0);
    cr_assert_eq(set[1].status, 0);
    get[0] = item_kv("a", NULL);
    get[1] = item_kv("missing", NULL);
    get[2] = item_kv("a", NULL); /* twice in one op */
    get[3] = item_kv("empty", NULL);
    get[4] = item_kv("bad key", NULL);
    memset(&cap, 0, sizeof cap);
    cap.copy_values = true;
    submit(f, &op, FLASH_CACHE_GET, get, 5, &cap);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(cap.calls, 1);
    cr_assert_eq(get[0].status, FLASH_OK);
    cr_assert_eq(get[0].value_len, 10);
    cr_assert_eq(memcmp(get[0].value, "x\0y\r\nEND\r\n", 10), 0);
    cr_assert_eq(get[1].status, FLASH_ENOTFOUND);
    cr_assert_eq(get[2].status, FLASH_OK);
    cr_assert_eq(get[2].value_len, 10);
    cr_assert_eq(memcmp(get[2].value, "x\0y\r\nEND\r\n", 10), 0);
    cr_assert_eq(get[2].cas, get[0].cas);
    cr_assert_eq(get[3].status, FLASH_OK);
    cr_assert_eq(get[3].value_len, 0);
    cr_assert_eq(get[4].status, FLASH_EINVAL);
    capture_free(&cap, 5);
    mfix_fini(f);
}

/* ---- SET / ADD / CAS / DELETE ---- */

FLASH_TEST(memory, set_replaces_and_add_only_stores_when_absent) {
    mfix *f = &M;
    mfix_init(f, NULL);
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "k", "one", 0), FLASH_OK);
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "k", "two", 0), FLASH_ENOTSTORED);
    got g = get_one(f, "k");
    cr_assert_str_eq(g.value, "one", "a lost add leaves the value alone");
    cr_assert_eq(store_one(f, FLASH_CACHE_SET, "k", "three", 0), FLASH_OK);
    g = get_one(f, "k");
    cr_assert_str_eq(g.value, "three");
    mfix_fini(f);
}

FLASH_TEST(memory, cas_stores_with_the_current_token_only) {
    mfix *f = &M;
    mfix_init(f, NULL);
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "k", "v", 1), FLASH_ENOTFOUND, "cas on a missing key");
    cr_assert_eq(get_one(f, "k").status, FLASH_ENOTFOUND, "and nothing was stored");
    set_one(f, "k", "v1", 0, 0);
    got g1 = get_one(f, "k");
    set_one(f, "k", "v2", 0, 0); /* someone else writes: g1.cas is stale */
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "k", "mine", g1.cas), FLASH_ENOTSTORED);
    got g2 = get_one(f, "k");
    cr_assert_str_eq(g2.value, "v2");
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "k", "mine", g2.cas), FLASH_OK);
    got g3 = get_one(f, "k");
    cr_assert_str_eq(g3.value, "mine");
    cr_assert_neq(g3.cas, g2.cas, "a CAS store bumps the token");
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "k", "again", g2.cas), FLASH_ENOTSTORED, "tokens are single use");
    mfix_fini(f);
}

FLASH_TEST(memory, delete_removes_and_missing_is_enotfound) {
    mfix *f = &M;
    mfix_init(f, NULL);
    set_one(f, "k", "v", 0, 0);
    cr_assert_eq(store_one(f, FLASH_CACHE_DELETE, "k", NULL, 0), FLASH_OK);
    cr_assert_eq(get_one(f, "k").status, FLASH_ENOTFOUND);
    cr_assert_eq(store_one(f, FLASH_CACHE_DELETE, "k", NULL, 0), FLASH_ENOTFOUND);
    cr_assert_eq(store_one(f, FLASH_CACHE_DELETE, "never", NULL, 0), FLASH_ENOTFOUND);
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "k", "back", 0), FLASH_OK, "add works after a delete");
    mfix_fini(f);
}

FLASH_TEST(memory, every_store_bumps_the_cas_token) {
    mfix *f = &M;
    uint64_t seen[8];
    size_t n = 0;
    mfix_init(f, NULL);
    set_one(f, "k", "1", 0, 0);
    seen[n++] = get_one(f, "k").cas;
    set_one(f, "k", "1", 0, 0); /* same value: still a new token */
    seen[n++] = get_one(f, "k").cas;
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "k", "2", seen[n - 1]), FLASH_OK);
    seen[n++] = get_one(f, "k").cas;
    cr_assert_eq(incr_one(f, "k", 1, false, 0, NULL), FLASH_OK);
    seen[n++] = get_one(f, "k").cas;
    cr_assert_eq(store_one(f, FLASH_CACHE_DELETE, "k", NULL, 0), FLASH_OK);
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "k", "3", 0), FLASH_OK);
    seen[n++] = get_one(f, "k").cas;
    cr_assert_eq(incr_one(f, "new", 1, true, 5, NULL), FLASH_OK);
    seen[n++] = get_one(f, "new").cas;
    for (size_t i = 0; i < n; i++) {
        cr_assert_neq(seen[i], 0);
        for (size_t j = 0; j < i; j++) cr_assert_neq(seen[i], seen[j], "store %zu reused token of store %zu", i, j);
    }
    /* A GET does not change the token. */
    cr_assert_eq(get_one(f, "new").cas, seen[n - 1]);
    mfix_fini(f);
}

FLASH_TEST(memory, a_null_value_with_a_length_is_einval_and_empty_values_are_fine) {
    mfix *f = &M;
    flash_cache_item it[2];
    mfix_init(f, NULL);
    it[0] = item_kv("nullv", NULL);
    it[0].value_len = 3;
    it[1] = item_kv("empty", NULL); /* NULL, 0: an empty value */
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, it, 2), 0);
    cr_assert_eq(it[0].status, FLASH_EINVAL);
    cr_assert_eq(it[1].status, FLASH_OK);
    cr_assert_eq(get_one(f, "nullv").status, FLASH_ENOTFOUND);
    got g = get_one(f, "empty");
    cr_assert_eq(g.status, FLASH_OK);
    cr_assert_eq(g.len, 0);
    mfix_fini(f);
}

/* ---- INCR ---- */

FLASH_TEST(memory, incr_adds_to_a_numeric_value_and_keeps_flags) {
    mfix *f = &M;
    uint64_t n = 0;
    mfix_init(f, NULL);
    set_one(f, "ctr", "41", 7, 0);
    cr_assert_eq(incr_one(f, "ctr", 1, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, 42);
    cr_assert_eq(incr_one(f, "ctr", 1000, true, 5, &n), FLASH_OK, "create does not matter when present");
    cr_assert_eq(n, 1042);
    got g = get_one(f, "ctr");
    cr_assert_str_eq(g.value, "1042");
    cr_assert_eq(g.flags, 7, "incr keeps the client flags");
    cr_assert_eq(incr_one(f, "ctr", 0, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, 1042);
    set_one(f, "zeros", "007", 0, 0);
    cr_assert_eq(incr_one(f, "zeros", 1, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, 8);
    mfix_fini(f);
}

FLASH_TEST(memory, incr_on_a_non_numeric_value_is_einval_and_leaves_it) {
    mfix *f = &M;
    const char *bad[] = {"abc", "", "12a", "-1", " 1", "1 ", "123456789012345678901", "99999999999999999999"};
    mfix_init(f, NULL);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t n = 777;
        set_one(f, "v", bad[i], 0, 0);
        cr_assert_eq(incr_one(f, "v", 1, true, 0, &n), FLASH_EINVAL, "incr on \"%s\"", bad[i]);
        got g = get_one(f, "v");
        cr_assert_str_eq(g.value, bad[i]);
    }
    mfix_fini(f);
}

FLASH_TEST(memory, incr_on_a_missing_key_creates_only_when_asked) {
    mfix *f = &M;
    uint64_t n = 0;
    mfix_init(f, NULL);
    cr_assert_eq(incr_one(f, "c", 5, false, 100, &n), FLASH_ENOTFOUND);
    cr_assert_eq(get_one(f, "c").status, FLASH_ENOTFOUND);
    cr_assert_eq(incr_one(f, "c", 5, true, 100, &n), FLASH_OK);
    cr_assert_eq(n, 100, "created with `initial`, the delta is not added");
    got g = get_one(f, "c");
    cr_assert_str_eq(g.value, "100");
    cr_assert_eq(incr_one(f, "c", 5, true, 100, &n), FLASH_OK);
    cr_assert_eq(n, 105);
    cr_assert_eq(incr_one(f, "z", 5, true, 0, &n), FLASH_OK);
    cr_assert_eq(n, 0);
    cr_assert_str_eq(get_one(f, "z").value, "0");
    mfix_fini(f);
}

FLASH_TEST(memory, incr_wraps_at_2_to_the_64_like_memcached) {
    mfix *f = &M;
    uint64_t n = 0;
    mfix_init(f, NULL);
    set_one(f, "w", "18446744073709551615", 0, 0);
    cr_assert_eq(incr_one(f, "w", 1, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, 0);
    cr_assert_str_eq(get_one(f, "w").value, "0");
    set_one(f, "w", "18446744073709551610", 0, 0);
    cr_assert_eq(incr_one(f, "w", 10, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, 4);
    cr_assert_eq(incr_one(f, "big", 0, true, UINT64_MAX, &n), FLASH_OK);
    cr_assert_eq(n, UINT64_MAX);
    cr_assert_str_eq(get_one(f, "big").value, "18446744073709551615");
    cr_assert_eq(incr_one(f, "big", UINT64_MAX, false, 0, &n), FLASH_OK);
    cr_assert_eq(n, UINT64_MAX - 1);
    mfix_fini(f);
}

FLASH_TEST(memory, incr_create_uses_the_ttl) {
    mfix *f = &M;
    flash_cache_item it;
    mfix_init(f, NULL);
    it = incr_item("t", 1, true, 10, 5);
    cr_assert_eq(run_op(f, FLASH_CACHE_INCR, &it, 1), 0);
    cr_assert_eq(it.status, FLASH_OK);
    f->clock.now += 4999;
    cr_assert_eq(get_one(f, "t").status, FLASH_OK);
    f->clock.now += 2;
    cr_assert_eq(get_one(f, "t").status, FLASH_ENOTFOUND);
    mfix_fini(f);
}

/* memcached's incr changes the number, not the item's expiry. */
FLASH_TEST(memory, incr_keeps_the_expiry_of_an_existing_item) {
    mfix *f = &M;
    flash_cache_item it;
    mfix_init(f, NULL);
    it = incr_item("t", 1, true, 10, 5); /* created, expires in 5 s */
    cr_assert_eq(run_op(f, FLASH_CACHE_INCR, &it, 1), 0);
    f->clock.now += 1000;
    cr_assert_eq(incr_one(f, "t", 1, false, 0, NULL), FLASH_OK);
    set_one(f, "s", "1", 0, 5); /* set with a TTL, then incr */
    cr_assert_eq(incr_one(f, "s", 1, false, 0, NULL), FLASH_OK);
    f->clock.now += 5001;
    cr_expect_eq(get_one(f, "t").status, FLASH_ENOTFOUND, "an incr made a 5 s counter immortal");
    cr_assert_eq(get_one(f, "s").status, FLASH_ENOTFOUND, "an incr made a 5 s item immortal");
    mfix_fini(f);
}

/* ---- TTL ---- */

FLASH_TEST(memory, ttl_expires_on_the_injected_clock) {
    mfix *f = &M;
    mfix_init(f, NULL);
    set_one(f, "short", "v", 0, 10);
    set_one(f, "forever", "v", 0, 0);
    f->clock.now += 9999;
    cr_assert_eq(get_one(f, "short").status, FLASH_OK);
    f->clock.now += 2;
    cr_assert_eq(get_one(f, "short").status, FLASH_ENOTFOUND);
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "short", "again", 0), FLASH_OK, "an expired key counts as absent");
    cr_assert_eq(get_one(f, "forever").status, FLASH_OK);
    f->clock.now += (int64_t)10 * 365 * 24 * 3600 * 1000;
    cr_assert_eq(get_one(f, "forever").status, FLASH_OK, "ttl 0 never expires");
    cr_assert_eq(get_one(f, "short").status, FLASH_OK, "re-added without a ttl");
    mfix_fini(f);
}

FLASH_TEST(memory, expired_keys_are_absent_for_every_opcode) {
    mfix *f = &M;
    mfix_init(f, NULL);
    set_one(f, "a", "1", 0, 1);
    set_one(f, "b", "1", 0, 1);
    set_one(f, "c", "1", 0, 1);
    set_one(f, "d", "1", 0, 1);
    got gc = get_one(f, "c");
    f->clock.now += 1001;
    cr_assert_eq(store_one(f, FLASH_CACHE_DELETE, "a", NULL, 0), FLASH_ENOTFOUND);
    cr_assert_eq(incr_one(f, "b", 1, false, 0, NULL), FLASH_ENOTFOUND);
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "c", "x", gc.cas), FLASH_ENOTFOUND);
    uint64_t n = 0;
    cr_assert_eq(incr_one(f, "d", 1, true, 50, &n), FLASH_OK);
    cr_assert_eq(n, 50, "incr on an expired key creates afresh");
    mfix_fini(f);
}

/* TTLs are relative seconds (flash.h layer 6), also past memcached's 30-day
   limit for relative times. */
FLASH_TEST(memory, long_ttls_are_relative) {
    mfix *f = &M;
    const int64_t day = (int64_t)24 * 3600 * 1000;
    mfix_init(f, NULL);
    set_one(f, "k", "v", 0, 40u * 24u * 3600u);
    f->clock.now += 39 * day;
    cr_assert_eq(get_one(f, "k").status, FLASH_OK);
    f->clock.now += 2 * day;
    cr_assert_eq(get_one(f, "k").status, FLASH_ENOTFOUND);
    mfix_fini(f);
}

/* Many expired and live keys share hash chains: dropping an expired key
   must not touch its chain neighbours. */
FLASH_TEST(memory, expired_keys_do_not_disturb_other_keys_in_the_store) {
    enum { N = 480 };
    mfix *f = &M;
    static char ekeys[N][16], pkeys[N][16];
    flash_cache_item items[N];
    int wrong = 0, lost = 0;
    mfix_init(f, NULL);
    for (int i = 0; i < N; i++) {
        snprintf(ekeys[i], sizeof ekeys[i], "e%d", i);
        snprintf(pkeys[i], sizeof pkeys[i], "p%d", i);
        items[i] = item_kv(ekeys[i], "expiring");
        items[i].ttl_s = 1;
    }
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, items, N), 0);
    for (int i = 0; i < N; i++) {
        items[i] = item_kv(pkeys[i], "42");
        items[i].ttl_s = 0;
    }
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, items, N), 0);
    f->clock.now += 2000;
    /* Delete every expired key: each must be "not found". */
    for (int i = 0; i < N; i++) items[i] = item_kv(ekeys[i], NULL);
    cr_assert_eq(run_op(f, FLASH_CACHE_DELETE, items, N), 0);
    for (int i = 0; i < N; i++)
        if (items[i].status != FLASH_ENOTFOUND) wrong++;
    /* Every live key must still be there with its value. */
    for (int i = 0; i < N; i++) {
        got g = get_one(f, pkeys[i]);
        if (g.status != FLASH_OK || strcmp(g.value, "42") != 0) lost++;
    }
    cr_expect_eq(wrong, 0, "%d deletes of expired keys reported success", wrong);
    cr_expect_eq(lost, 0, "%d live keys were lost or changed after touching expired neighbours", lost);
    mfix_fini(f);
}

FLASH_TEST(memory, writes_to_expired_keys_do_not_hit_other_keys) {
    enum { N = 480 };
    mfix *f = &M;
    static char ekeys[N][16], pkeys[N][16];
    flash_cache_item items[N];
    int add_refused = 0, incr_wrong = 0, lost = 0;
    mfix_init(f, NULL);
    for (int i = 0; i < N; i++) {
        snprintf(ekeys[i], sizeof ekeys[i], "x%d", i);
        snprintf(pkeys[i], sizeof pkeys[i], "y%d", i);
        items[i] = item_kv(ekeys[i], "7");
        items[i].ttl_s = 1;
    }
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, items, N), 0);
    for (int i = 0; i < N; i++) items[i] = item_kv(pkeys[i], "1000");
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, items, N), 0);
    f->clock.now += 2000;
    /* Half the expired keys: add (absent, so it must store). */
    for (int i = 0; i < N / 2; i++) items[i] = item_kv(ekeys[i], "added");
    cr_assert_eq(run_op(f, FLASH_CACHE_ADD, items, N / 2), 0);
    for (int i = 0; i < N / 2; i++)
        if (items[i].status != FLASH_OK) add_refused++;
    /* The other half: incr with create (absent, so it must give initial). */
    for (int i = N / 2; i < N; i++) items[i - N / 2] = incr_item(ekeys[i], 1, true, 3, 0);
    cr_assert_eq(run_op(f, FLASH_CACHE_INCR, items, N / 2), 0);
    for (int i = 0; i < N / 2; i++)
        if (items[i].status != FLASH_OK || items[i].number != 3) incr_wrong++;
    for (int i = 0; i < N; i++) {
        got g = get_one(f, pkeys[i]);
        if (g.status != FLASH_OK || strcmp(g.value, "1000") != 0) lost++;
    }
    cr_expect_eq(add_refused, 0, "%d adds of expired keys were refused", add_refused);
    cr_expect_eq(incr_wrong, 0, "%d incrs of expired keys used another key's value", incr_wrong);
    cr_expect_eq(lost, 0, "%d live keys were lost", lost);
    mfix_fini(f);
}

/* ---- LRU ---- */

FLASH_TEST(memory, lru_eviction_keeps_recently_read_items) {
    mfix *f = &M;
    flash_memory_desc d;
    size_t one;
    char value[101];
    memset(value, 'v', 100);
    value[100] = 0;
    /* Measure what one item of this shape costs. */
    mfix_init(f, NULL);
    set_one(f, "key1", value, 0, 0);
    one = flash_memory_stats_get(f->cache).bytes;
    cr_assert_gt(one, 100);
    mfix_fini(f);

    memset(&d, 0, sizeof d);
    d.max_bytes = 3 * one + one / 2; /* room for three */
    mfix_init(f, &d);
    set_one(f, "key1", value, 0, 0);
    set_one(f, "key2", value, 0, 0);
    set_one(f, "key3", value, 0, 0);
    cr_assert_eq(flash_memory_stats_get(f->cache).evictions, 0);
    cr_assert_eq(get_one(f, "key1").status, FLASH_OK); /* key1 is now the most recent */
    set_one(f, "key4", value, 0, 0);                   /* evicts key2 */
    flash_memory_stats st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.evictions, 1);
    cr_assert_eq(st.items, 3);
    cr_assert_leq(st.bytes, d.max_bytes);
    set_one(f, "key5", value, 0, 0); /* evicts key3 */
    cr_assert_eq(get_one(f, "key2").status, FLASH_ENOTFOUND);
    cr_assert_eq(get_one(f, "key3").status, FLASH_ENOTFOUND);
    cr_assert_eq(get_one(f, "key1").status, FLASH_OK);
    cr_assert_eq(get_one(f, "key4").status, FLASH_OK);
    cr_assert_eq(get_one(f, "key5").status, FLASH_OK);
    st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.evictions, 2);
    cr_assert_eq(st.items, 3);
    mfix_fini(f);
}

FLASH_TEST(memory, replacing_an_item_does_not_count_as_eviction_and_updates_bytes) {
    mfix *f = &M;
    mfix_init(f, NULL);
    set_one(f, "k", "short", 0, 0);
    size_t b1 = flash_memory_stats_get(f->cache).bytes;
    set_one(f, "k", "a much longer value", 0, 0);
    flash_memory_stats st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items, 1);
    cr_assert_eq(st.bytes, b1 + strlen("a much longer value") - strlen("short"));
    cr_assert_eq(st.evictions, 0);
    store_one(f, FLASH_CACHE_DELETE, "k", NULL, 0);
    st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items, 0);
    cr_assert_eq(st.bytes, 0);
    mfix_fini(f);
}

/* ---- limits ---- */

FLASH_TEST(memory, bad_keys_fail_per_item_and_the_others_are_carried_out) {
    mfix *f = &M;
    char k250[251], k251[252];
    flash_cache_item it[10];
    memset(k250, 'a', 250);
    k250[250] = 0;
    memset(k251, 'b', 251);
    k251[251] = 0;
    mfix_init(f, NULL);
    it[0] = item_kv("good1", "v");
    it[1] = item_kv("", "v");
    it[2] = item_kv(k251, "v");
    it[3] = item_kv("has space", "v");
    it[4] = item_kv("new\nline", "v");
    it[5] = item_kv("del\x7f", "v");
    it[6] = item_kv("ctl\x01", "v");
    it[7] = item_kv(k250, "v");
    it[8] = item_kv("tab\t", "v");
    it[9] = item_kv("good2", "v");
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, it, 10), 0);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_EINVAL, "empty key");
    cr_assert_eq(it[2].status, FLASH_ETOOLARGE, "251-byte key");
    cr_assert_eq(it[3].status, FLASH_EINVAL, "space");
    cr_assert_eq(it[4].status, FLASH_EINVAL, "newline");
    cr_assert_eq(it[5].status, FLASH_EINVAL, "0x7f");
    cr_assert_eq(it[6].status, FLASH_EINVAL, "control byte");
    cr_assert_eq(it[7].status, FLASH_OK, "250 bytes is the limit, inclusive");
    cr_assert_eq(it[8].status, FLASH_EINVAL, "tab");
    cr_assert_eq(it[9].status, FLASH_OK);
    cr_assert_eq(get_one(f, "good1").status, FLASH_OK);
    cr_assert_eq(get_one(f, "good2").status, FLASH_OK);
    cr_assert_eq(get_one(f, k250).status, FLASH_OK);
    cr_assert_eq(get_one(f, "has").status, FLASH_ENOTFOUND);
    cr_assert_eq(flash_memory_stats_get(f->cache).items, 3);

    /* The same rules for every opcode. */
    flash_cache_opcode codes[] = {FLASH_CACHE_GET, FLASH_CACHE_ADD, FLASH_CACHE_CAS, FLASH_CACHE_DELETE,
                                  FLASH_CACHE_INCR};
    for (size_t c = 0; c < sizeof codes / sizeof codes[0]; c++) {
        flash_cache_item b[3];
        b[0] = item_kv("x y", "1");
        b[1] = item_kv(k251, "1");
        b[2] = item_kv("", "1");
        b[0].create = b[1].create = b[2].create = true;
        cr_assert_eq(run_op(f, codes[c], b, 3), 0);
        cr_assert_eq(b[0].status, FLASH_EINVAL, "opcode %d", (int)codes[c]);
        cr_assert_eq(b[1].status, FLASH_ETOOLARGE, "opcode %d", (int)codes[c]);
        cr_assert_eq(b[2].status, FLASH_EINVAL, "opcode %d", (int)codes[c]);
    }
    /* A NULL key pointer. */
    flash_cache_item nk;
    memset(&nk, 0, sizeof nk);
    cr_assert_eq(run_op(f, FLASH_CACHE_GET, &nk, 1), 0);
    cr_assert_eq(nk.status, FLASH_EINVAL);
    cr_assert_eq(flash_memory_stats_get(f->cache).items, 3);
    mfix_fini(f);
}

FLASH_TEST(memory, values_over_max_value_fail_for_that_item_only) {
    mfix *f = &M;
    flash_memory_desc d;
    char v100[101], v101[102];
    flash_cache_item it[3];
    memset(&d, 0, sizeof d);
    d.max_value = 100;
    memset(v100, 'x', 100);
    v100[100] = 0;
    memset(v101, 'y', 101);
    v101[101] = 0;
    mfix_init(f, &d);
    cr_assert_eq(f->cache.vt->max_value(f->cache.self), 100);
    it[0] = item_kv("a", v100);
    it[1] = item_kv("b", v101);
    it[2] = item_kv("c", "small");
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, it, 3), 0);
    cr_assert_eq(it[0].status, FLASH_OK);
    cr_assert_eq(it[1].status, FLASH_ETOOLARGE);
    cr_assert_eq(it[2].status, FLASH_OK);
    cr_assert_eq(get_one(f, "b").status, FLASH_ENOTFOUND);
    cr_assert_eq(get_one(f, "a").len, 100);
    cr_assert_str_eq(get_one(f, "c").value, "small");
    cr_assert_eq(store_one(f, FLASH_CACHE_ADD, "d", v101, 0), FLASH_ETOOLARGE);
    got ga = get_one(f, "a");
    cr_assert_eq(store_one(f, FLASH_CACHE_CAS, "a", v101, ga.cas), FLASH_ETOOLARGE);
    cr_assert_eq(get_one(f, "a").cas, ga.cas, "the refused cas left the item alone");
    mfix_fini(f);
}

FLASH_TEST(memory, defaults_are_64_mib_and_1_mib) {
    flash_cache c = M.cache = flash_memory_create(NULL);
    cr_assert(c.vt);
    cr_assert_eq(c.vt->max_value(c.self), (size_t)1 << 20);
    cr_assert_str_eq(c.vt->name, "memory");
    mfix_fini(&M);
}

/* ---- completion and cancel ---- */

FLASH_TEST(memory, ops_complete_on_the_next_tick_in_submission_order) {
    mfix *f = &M;
    flash_cache_op ops[4];
    capture caps[4];
    flash_cache_item it[4];
    mfix_init(f, NULL);
    memset(caps, 0, sizeof caps);
    completion_counter = 0;
    it[0] = item_kv("k", "first");
    it[1] = item_kv("k", NULL);
    it[2] = item_kv("k", "second");
    it[3] = item_kv("k", NULL);
    caps[1].copy_values = caps[3].copy_values = true;
    submit(f, &ops[0], FLASH_CACHE_SET, &it[0], 1, &caps[0]);
    submit(f, &ops[1], FLASH_CACHE_GET, &it[1], 1, &caps[1]);
    submit(f, &ops[2], FLASH_CACHE_SET, &it[2], 1, &caps[2]);
    submit(f, &ops[3], FLASH_CACHE_GET, &it[3], 1, &caps[3]);
    for (int i = 0; i < 4; i++) cr_assert_eq(caps[i].calls, 0, "op %d completed inside submit", i);
    cr_assert_eq(it[0].status, 12345, "nothing is applied before the tick");
    flash_poll_run_once(f->loop, false);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(caps[i].calls, 1);
        cr_assert_eq(caps[i].seq, i + 1, "op %d completed out of order", i);
        cr_assert_eq(ops[i].status, 0);
    }
    cr_assert_eq(it[1].status, FLASH_OK);
    cr_assert_eq(it[1].value_len, 5);
    cr_assert_eq(memcmp(it[1].value, "first", 5), 0);
    cr_assert_eq(memcmp(it[3].value, "second", 6), 0);
    flash_poll_run_once(f->loop, false);
    for (int i = 0; i < 4; i++) cr_assert_eq(caps[i].calls, 1, "done runs once");
    capture_free(&caps[1], 1);
    capture_free(&caps[3], 1);
    mfix_fini(f);
}

typedef struct chain {
    mfix *f;
    flash_cache_op second;
    flash_cache_item item;
    capture cap;
    int first_calls;
} chain;

static void chain_first_done(flash_cache_op *op) {
    chain *c = (chain *)op->data;
    c->first_calls++;
    memset(&c->second, 0, sizeof c->second);
    c->item = item_kv("chained", "v");
    c->second.code = FLASH_CACHE_SET;
    c->second.items = &c->item;
    c->second.count = 1;
    c->second.done = capture_done;
    c->second.data = &c->cap;
    c->f->cache.vt->submit(c->f->cache.self, flash_poll_loop(c->f->loop), &c->second);
    /* Not inside submit, even when submitted from a done callback. */
    if (c->cap.calls != 0) c->first_calls = -100;
}

FLASH_TEST(memory, an_op_submitted_from_done_completes_on_the_following_tick) {
    mfix *f = &M;
    chain c;
    flash_cache_op first;
    flash_cache_item it = item_kv("k", "v");
    mfix_init(f, NULL);
    memset(&c, 0, sizeof c);
    c.f = f;
    memset(&first, 0, sizeof first);
    first.code = FLASH_CACHE_SET;
    first.items = &it;
    first.count = 1;
    first.done = chain_first_done;
    first.data = &c;
    f->cache.vt->submit(f->cache.self, flash_poll_loop(f->loop), &first);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(c.first_calls, 1);
    cr_assert_eq(c.cap.calls, 0);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(c.cap.calls, 1);
    cr_assert_eq(c.item.status, FLASH_OK);
    mfix_fini(f);
}

FLASH_TEST(memory, cancel_before_the_tick_means_no_done_and_no_effect) {
    mfix *f = &M;
    flash_cache_op ops[3];
    capture caps[3];
    flash_cache_item it[3];
    mfix_init(f, NULL);
    memset(caps, 0, sizeof caps);
    set_one(f, "victim", "keep", 0, 0);
    it[0] = item_kv("a", "1");
    it[1] = item_kv("b", "2");
    it[2] = item_kv("victim", NULL);
    submit(f, &ops[0], FLASH_CACHE_SET, &it[0], 1, &caps[0]);
    submit(f, &ops[1], FLASH_CACHE_SET, &it[1], 1, &caps[1]);
    submit(f, &ops[2], FLASH_CACHE_DELETE, &it[2], 1, &caps[2]);
    f->cache.vt->cancel(f->cache.self, &ops[1]);
    f->cache.vt->cancel(f->cache.self, &ops[2]);
    memset(&ops[1], 0xa5, sizeof ops[1]); /* the op may be freed once cancel returns */
    flash_poll_run_once(f->loop, false);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(caps[0].calls, 1);
    cr_assert_eq(caps[1].calls, 0);
    cr_assert_eq(caps[2].calls, 0);
    cr_assert_eq(get_one(f, "a").status, FLASH_OK);
    cr_assert_eq(get_one(f, "b").status, FLASH_ENOTFOUND, "a cancelled set was applied");
    cr_assert_eq(get_one(f, "victim").status, FLASH_OK, "a cancelled delete was applied");
    /* Cancel after completion is harmless. */
    f->cache.vt->cancel(f->cache.self, &ops[0]);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(caps[0].calls, 1);
    mfix_fini(f);
}

FLASH_TEST(memory, cancel_then_destroying_the_loop_leaks_nothing) {
    mfix *f = &M;
    flash_cache_op op;
    capture cap;
    flash_cache_item it = item_kv("k", "v");
    mfix_init(f, NULL);
    memset(&cap, 0, sizeof cap);
    submit(f, &op, FLASH_CACHE_SET, &it, 1, &cap);
    f->cache.vt->cancel(f->cache.self, &op);
    mfix_fini(f); /* loop destroyed with the cancelled defer still queued */
    cr_assert_eq(cap.calls, 0);
}

/* ---- flush and stats ---- */

FLASH_TEST(memory, flush_empties_the_store_and_stats_count_ops_gets_and_hits) {
    mfix *f = &M;
    flash_cache_item it[3];
    mfix_init(f, NULL);
    flash_memory_stats st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items + st.bytes + st.ops + st.gets + st.hits + st.evictions, 0);
    it[0] = item_kv("a", "1");
    it[1] = item_kv("b", "22");
    it[2] = item_kv("c", "333");
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, it, 3), 0);
    st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items, 3);
    cr_assert_eq(st.ops, 1, "one op, whatever its item count");
    cr_assert_gt(st.bytes, 6);
    it[0] = item_kv("a", NULL);
    it[1] = item_kv("zz", NULL);
    it[2] = item_kv("c", NULL);
    cr_assert_eq(run_op(f, FLASH_CACHE_GET, it, 3), 0);
    st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.ops, 2);
    cr_assert_eq(st.gets, 3);
    cr_assert_eq(st.hits, 2);
    flash_memory_flush(f->cache);
    st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items, 0);
    cr_assert_eq(st.bytes, 0);
    cr_assert_eq(st.evictions, 0, "a flush is not eviction");
    cr_assert_eq(get_one(f, "a").status, FLASH_ENOTFOUND);
    cr_assert_eq(get_one(f, "c").status, FLASH_ENOTFOUND);
    /* Still usable. */
    set_one(f, "a", "again", 0, 0);
    cr_assert_str_eq(get_one(f, "a").value, "again");
    mfix_fini(f);
}

FLASH_TEST(memory, stats_and_flush_on_something_else_are_harmless) {
    flash_cache none = {NULL, NULL};
    flash_memory_stats st = flash_memory_stats_get(none);
    cr_assert_eq(st.items + st.bytes + st.ops, 0);
    flash_memory_flush(none);
}

/* ---- scale ---- */

FLASH_TEST(memory, ten_thousand_keys_in_one_op) {
    enum { N = 10000 };
    mfix *f = &M;
    static char keys[N][16], vals[N][16];
    static flash_cache_item items[N + 1];
    flash_cache_op op;
    capture cap;
    int bad = 0;
    mfix_init(f, NULL);
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "key:%d", i);
        snprintf(vals[i], sizeof vals[i], "val-%d", i * 7);
        items[i] = item_kv(keys[i], vals[i]);
    }
    cr_assert_eq(run_op(f, FLASH_CACHE_SET, items, N), 0);
    for (int i = 0; i < N; i++)
        if (items[i].status != FLASH_OK) bad++;
    cr_assert_eq(bad, 0);
    cr_assert_eq(flash_memory_stats_get(f->cache).items, N);
    for (int i = 0; i < N; i++) items[i] = item_kv(keys[N - 1 - i], NULL);
    items[N] = item_kv("key:missing", NULL);
    memset(&cap, 0, sizeof cap);
    cap.copy_values = true;
    submit(f, &op, FLASH_CACHE_GET, items, N + 1, &cap);
    flash_poll_run_once(f->loop, false);
    cr_assert_eq(cap.calls, 1);
    cr_assert_eq(op.round_trips, 1);
    for (int i = 0; i < N; i++) {
        char want[16];
        snprintf(want, sizeof want, "val-%d", (N - 1 - i) * 7);
        if (items[i].status != FLASH_OK || items[i].value_len != strlen(want) ||
            memcmp(items[i].value, want, items[i].value_len) != 0)
            bad++;
    }
    cr_assert_eq(bad, 0, "%d of %d keys came back wrong", bad, N);
    cr_assert_eq(items[N].status, FLASH_ENOTFOUND);
    capture_free(&cap, N + 1);
    /* And delete them all at once. */
    for (int i = 0; i < N; i++) items[i] = item_kv(keys[i], NULL);
    cr_assert_eq(run_op(f, FLASH_CACHE_DELETE, items, N), 0);
    for (int i = 0; i < N; i++)
        if (items[i].status != FLASH_OK) bad++;
    cr_assert_eq(bad, 0);
    cr_assert_eq(flash_memory_stats_get(f->cache).items, 0);
    cr_assert_eq(flash_memory_stats_get(f->cache).bytes, 0);
    mfix_fini(f);
}

/* ---- threads ---- */

enum { THREADS = 4, ROUNDS = 1500 };

typedef struct worker {
    flash_cache cache;
    int id;
    int errors;
    uint64_t *returned; /* the numbers incr gave this thread */
    size_t nreturned;
} worker;

static void worker_done(flash_cache_op *op) { (*(int *)op->data)++; }

static int worker_run(worker *w, flash_poll *loop, flash_cache_opcode code, flash_cache_item *items, size_t n) {
    flash_cache_op op;
    int calls = 0;
    memset(&op, 0, sizeof op);
    op.code = code;
    op.items = items;
    op.count = n;
    op.done = worker_done;
    op.data = &calls;
    w->cache.vt->submit(w->cache.self, flash_poll_loop(loop), &op);
    if (calls != 0) w->errors++;
    flash_poll_run_once(loop, false);
    if (calls != 1) w->errors++;
    return op.status;
}

static void *worker_main(void *arg) {
    worker *w = (worker *)arg;
    flash_poll *loop = flash_poll_create();
    char own[32], val[32];
    if (!loop) {
        w->errors++;
        return NULL;
    }
    snprintf(own, sizeof own, "own:%d", w->id);
    for (int r = 0; r < ROUNDS; r++) {
        flash_cache_item it[2];
        snprintf(val, sizeof val, "%d:%d", w->id, r);
        memset(it, 0, sizeof it);
        it[0].key = own;
        it[0].key_len = strlen(own);
        it[0].value = val;
        it[0].value_len = strlen(val);
        it[1].key = "shared:set";
        it[1].key_len = strlen("shared:set");
        it[1].value = val;
        it[1].value_len = strlen(val);
        worker_run(w, loop, FLASH_CACHE_SET, it, 2);
        if (it[0].status != FLASH_OK || it[1].status != FLASH_OK) w->errors++;

        memset(it, 0, sizeof it);
        it[0].key = own;
        it[0].key_len = strlen(own);
        it[1].key = "shared:set";
        it[1].key_len = strlen("shared:set");
        worker_run(w, loop, FLASH_CACHE_GET, it, 2);
        /* done has returned: compare through the statuses only, and the
           own key's length (its value is this thread's alone). */
        if (it[0].status != FLASH_OK || it[0].value_len != strlen(val)) w->errors++;
        if (it[1].status != FLASH_OK) w->errors++;

        memset(it, 0, sizeof it);
        it[0].key = "shared:ctr";
        it[0].key_len = strlen("shared:ctr");
        it[0].number = 1;
        it[0].create = true;
        it[0].initial = 1; /* the creating incr counts as one */
        it[1].key = own;
        it[1].key_len = strlen(own);
        it[1].number = 1; /* not numeric: EINVAL, per item */
        worker_run(w, loop, FLASH_CACHE_INCR, it, 2);
        if (it[0].status != FLASH_OK) w->errors++;
        else w->returned[w->nreturned++] = it[0].number;
        if (it[1].status != FLASH_EINVAL) w->errors++;
    }
    flash_poll_destroy(loop);
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

FLASH_TEST(memory, four_threads_share_one_store_and_incr_totals_are_exact) {
    static uint64_t returned[THREADS][ROUNDS], all[THREADS * ROUNDS];
    pthread_t th[THREADS];
    worker w[THREADS];
    size_t n = 0;
    char want[32];
    mfix *f = &M;
    f->cache = flash_memory_create(NULL);
    cr_assert(f->cache.vt);
    for (int i = 0; i < THREADS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].cache = f->cache;
        w[i].id = i;
        w[i].returned = returned[i];
        cr_assert_eq(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < THREADS; i++) {
        cr_assert_eq(w[i].errors, 0, "thread %d saw %d errors", i, w[i].errors);
        cr_assert_eq(w[i].nreturned, ROUNDS);
        memcpy(all + n, w[i].returned, w[i].nreturned * sizeof *all);
        n += w[i].nreturned;
    }
    /* Every incr got its own number: exactly 1..THREADS*ROUNDS. */
    qsort(all, n, sizeof *all, cmp_u64);
    for (size_t i = 0; i < n; i++) cr_assert_eq(all[i], i + 1, "incr results are not a permutation of 1..N");

    f->loop = flash_poll_create();
    got g = get_one(f, "shared:ctr");
    snprintf(want, sizeof want, "%d", THREADS * ROUNDS);
    cr_assert_str_eq(g.value, want);
    flash_memory_stats st = flash_memory_stats_get(f->cache);
    cr_assert_eq(st.items, THREADS + 2);
    cr_assert_eq(st.ops, (uint64_t)THREADS * ROUNDS * 3 + 1);
    mfix_fini(f);
}
