/* Regressions: every crash or wrong answer found by the fuzzers
   (tests/fuzz/), the fault-injection schedules (tests/test_faults.c) or the
   outage tests, replayed through the same path as a test that fails until
   it is fixed. Also replays every saved fuzz input (tests/fuzz/crashes/ and
   the seed corpus) through the public-API paths of its harness. */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "harness.h"
#include "models.h"

#ifndef FLASH_SOURCE_DIR
#define FLASH_SOURCE_DIR "."
#endif

/* A model of this file's own: an allowtime instance cache. */
#define REG_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(RegItem, REG_FIELDS)
FLASH_INSTANCE_CACHE_OPT(RegItemStale, RegItem, (id), .allowtime_s = 30)

/* ---- found by tests/test_faults.c (seeded schedules with a delayed lock) ----

   An allowtime class serves a stale value and sends the refresh lock (an
   ADD of prefix:lock:<hash>) to the backend. Every key of the batch is
   already settled, so the loader ends the batch at once: it leaves the
   loader's in-flight list and its request's memory is no longer held. The
   lock operation (its flash__eop, items and the batch state eb, all in the
   request's arena) was neither held, nor linked in ctx->writes, nor cancelled
   by flash_ctx_reset / flash_ctx_destroy (flash__engine_cancel only runs for
   batches still in flight). When the backend completed it after a reset, it
   called flash__engine_lock_done on freed (or reused) memory: ASan reported
   a heap-use-after-free, without ASan the done pointer could be garbage
   (seen: a jump to 0x19 under the fault schedules). flash_ctx_busy() was
   also false while the lock was in flight, so flash_run could return before
   it. Fixed: the lock is tracked like a write (held, cancelled, busy). */
FLASH_TEST(regressions, allowtime_refresh_lock_in_flight_survives_a_reset) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.lag_window_ms = 1;  /* a stale value is refreshed (lock first) at once */
    d.arena_retain = 1;   /* a reset frees the request's blocks: ASan sees any later use */
    fixture_setup(&d);
    RegItem it = {1, "one"};
    cr_assert_eq(flash_table_put(fx.db, &RegItem_model, &it), 0);
    RegItem *got = NULL;
    cr_assert_eq(RegItemStale_resolve(fx.ctx, 1, &got), 0); /* miss: filled */
    fixture_settle();
    flash_ctx_reset(fx.ctx);
    cr_assert_eq(flash_invalidate(fx.ctx, &RegItem_model, &it, &it), 0); /* marked stale */
    fixture_settle();
    flash_test_sleep_ms(5); /* past the lag window */

    flash_ctx_reset(fx.ctx);
    stats_delta();
    cr_assert_eq(RegItemStale_resolve(fx.ctx, 1, &got), 0); /* served stale; the lock ADD is in flight */
    cr_assert_str_eq(got->name, "one");
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_hits, 1);
    cr_assert_eq(s.writes, 1, "the refresh lock was sent");
    bool busy = flash_ctx_busy(fx.ctx);
    flash_ctx_reset(fx.ctx); /* the request ends before the lock's reply */
    fixture_settle();         /* the backend completes the lock: must not touch freed memory */
    cr_assert_eq(RegItemStale_resolve(fx.ctx, 1, &got), 0);
    cr_assert_str_eq(got->name, "one");
    fixture_settle();
    fixture_teardown();
    cr_assert(busy, "the lock in flight is work of the request: flash_ctx_busy() should say so");
}

/* ---- found by tests/test_faults.c (payload corruption) -----------------------

   Value format 1 had no integrity check (its header held a magic byte,
   flags, the schema hash, the version and the time). A bit flipped anywhere
   in a cached row decoded to another valid row, and the engine served it
   for the query's key without comparing the row's key fields with the
   query: here the value cached for User id 5, with one bit of its id varint
   flipped (zigzag 10 -> 8), was served as User 4 to a query for id 5.
   (tests/test_faults.c payload_corruption_never_serves_a_wrong_row: 65 of
   100 users wrong after one random bit flip each.) Fixed by format 2's
   check and by decoded rows having to carry the queried key. */
static int reg_done;
static unsigned char reg_value[4096];
static size_t reg_value_len;
static void reg_op_done(flash_cache_op *op) {
    reg_done++;
    if (op->code == FLASH_CACHE_GET && op->items[0].status == FLASH_OK && op->items[0].value_len <= sizeof reg_value) {
        memcpy(reg_value, op->items[0].value, op->items[0].value_len); /* valid until done returns */
        reg_value_len = op->items[0].value_len;
    }
}
static int reg_cache_op(flash_cache_opcode code, const char *key, size_t klen, const void *value, size_t vlen) {
    flash_cache_item it;
    flash_cache_op op;
    memset(&it, 0, sizeof it);
    memset(&op, 0, sizeof op);
    it.key = key;
    it.key_len = klen;
    it.value = value;
    it.value_len = vlen;
    op.code = code;
    op.items = &it;
    op.count = 1;
    op.done = reg_op_done;
    reg_done = 0;
    fx.cache.vt->submit(fx.cache.self, fx.lp, &op);
    for (int i = 0; i < 100 && !reg_done; i++) fixture_run_once(false);
    cr_assert_eq(reg_done, 1);
    return it.status;
}

FLASH_TEST(regressions, a_flipped_bit_in_a_cached_row_is_never_served_as_another_row) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(NULL);
    User *u = NULL;
    cr_assert_eq(User_get_by_id(fx.ctx, 5, &u), 0); /* filled */
    fixture_settle();
    flash_value v = flash_v_i64(5);
    char *key;
    size_t klen;
    cr_assert_eq(flash_cache_key(fx.ctx, &User__get_by_id, &v, 1, &key, &klen, NULL), 0);
    cr_assert_eq(reg_cache_op(FLASH_CACHE_GET, key, klen, NULL, 0), FLASH_OK);
    /* the value ends with the row's encoding; its first byte is the id */
    void *row;
    size_t rlen;
    cr_assert_eq(flash_row_encode(fx.ctx, &User_model, flash_table_find(fx.db, &User_model, flash_v_i64(5)), &row,
                                  &rlen), 0);
    cr_assert_geq(reg_value_len, rlen);
    size_t at = reg_value_len - rlen;
    cr_assert_eq(memcmp(reg_value + at, row, rlen), 0);
    cr_assert_eq(reg_value[at], 10, "id 5 as a zigzag varint");
    reg_value[at] ^= 0x02; /* one bit: 10 -> 8, id 4 */
    cr_assert_eq(reg_cache_op(FLASH_CACHE_SET, key, klen, reg_value, reg_value_len), FLASH_OK);

    flash_ctx_reset(fx.ctx);
    cr_assert_eq(User_get_by_id(fx.ctx, 5, &u), 0);
    long long got = (long long)u->id;
    fixture_teardown();
    cr_assert_eq(got, 5, "the query for User 5 was answered with User %lld (a corrupt cached value)", got);
}

/* ---- replay of saved fuzz inputs through the public API ---------------------- */

/* The row model of tests/fuzz/fuzz_codec.c's row path (every field type). */
#define REGROW_FIELDS(F) F(I64, id) F(I32, n) F(F64, x) F(BOOL, flag) F(STR, s) F(BYTES, raw) F(STR, title)
FLASH_MODEL(RegRow, REGROW_FIELDS)

typedef void (*replay_fn)(const unsigned char *data, size_t size, const char *name);

static size_t replay_dir(const char *dir, const char *prefix, replay_fn fn) {
    char path[1024];
    size_t n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || (prefix && strncmp(e->d_name, prefix, strlen(prefix)) != 0)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        unsigned char *buf = malloc(1 << 20);
        cr_assert(buf);
        size_t len = fread(buf, 1, 1 << 20, f);
        fclose(f);
        unsigned char *exact = malloc(len ? len : 1); /* exact size: overreads are caught */
        cr_assert(exact);
        memcpy(exact, buf, len);
        free(buf);
        fn(exact, len, e->d_name);
        free(exact);
        n++;
    }
    closedir(d);
    return n;
}

/* fuzz_codec's row path: decodes or fails with FLASH_EPROTO; a decoded row
   re-encodes to the same bytes. */
static flash_ctx *replay_ctx;
static void replay_row(const unsigned char *data, size_t size, const char *name) {
    if (size < 1) return;
    RegRow row;
    int rc = flash_row_decode(replay_ctx, &RegRow_model, data + 1, size - 1, &row);
    cr_assert(rc == 0 || rc == FLASH_EPROTO, "%s: flash_row_decode gave %d", name, rc);
    if (rc == 0) {
        void *enc;
        size_t len;
        cr_assert_eq(flash_row_encode(replay_ctx, &RegRow_model, &row, &enc, &len), 0, "%s", name);
        cr_assert(len == size - 1 && memcmp(enc, data + 1, len) == 0, "%s: not canonical", name);
    }
    flash_ctx_reset(replay_ctx);
}

/* The reply parsers, as one shape: bytes taken (0: more needed, < 0:
   garbage) and, for an oversized value, the bytes that follow it to drop. */
typedef ptrdiff_t (*reply_parse_fn)(const char *buf, size_t len, size_t max_value, size_t *skip);

static ptrdiff_t parse_memcached(const char *buf, size_t len, size_t max_value, size_t *skip) {
    flash_memcached_reply r;
    ptrdiff_t k = flash_memcached_parse(buf, len, max_value, &r);
    *skip = k > 0 && r.skip ? r.value_len + 2 : 0;
    return k;
}

static ptrdiff_t parse_redis(const char *buf, size_t len, size_t max_value, size_t *skip) {
    flash_redis_reply r;
    ptrdiff_t k = flash_redis_parse(buf, len, max_value, &r);
    *skip = k > 0 && r.skip ? r.len + 2 : 0;
    return k;
}

/* fuzz_memcached / fuzz_redis (tests/fuzz/stream.h's input layout): every
   strict prefix of a reply asks for more bytes. */
static void replay_stream(const unsigned char *data, size_t size, const char *name, reply_parse_fn parse) {
    static const size_t max_values[8] = {(size_t)1 << 20, 0, 1, 2, 3, 5, 10, 64};
    if (size < 2) return;
    size_t max_value = max_values[data[0] % 8], nchunks = data[1] % 16;
    if (2 + nchunks > size) return;
    const char *s = (const char *)data + 2 + nchunks;
    size_t n = size - 2 - nchunks, off = 0, skip, skip_part;
    while (off < n) {
        ptrdiff_t k = parse(s + off, n - off, max_value, &skip);
        cr_assert(k == 0 || k == FLASH_EPROTO || (k > 0 && (size_t)k <= n - off), "%s", name);
        if (k <= 0) break;
        for (size_t cut = 1; cut < (size_t)k; cut++) {
            char *pre = malloc(cut);
            cr_assert(pre);
            memcpy(pre, s + off, cut);
            ptrdiff_t kp = parse(pre, cut, max_value, &skip_part);
            free(pre);
            cr_assert(kp == 0, "%s: a %zu-byte prefix of a %td-byte reply parsed as %td", name, cut, k, kp);
        }
        off += (size_t)k;
        off += skip < n - off ? skip : n - off;
    }
}

static void replay_memcached(const unsigned char *data, size_t size, const char *name) {
    replay_stream(data, size, name, parse_memcached);
}
static void replay_redis(const unsigned char *data, size_t size, const char *name) {
    replay_stream(data, size, name, parse_redis);
}

FLASH_TEST(regressions, saved_fuzz_inputs_replay_cleanly) {
    replay_ctx = flash_ctx_create(NULL);
    cr_assert(replay_ctx);
    size_t n = 0;
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/corpus/fuzz_codec", NULL, replay_row);
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/crashes", "fuzz_codec-", replay_row);
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/corpus/fuzz_memcached", NULL, replay_memcached);
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/crashes", "fuzz_memcached-", replay_memcached);
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/corpus/fuzz_redis", NULL, replay_redis);
    n += replay_dir(FLASH_SOURCE_DIR "/tests/fuzz/crashes", "fuzz_redis-", replay_redis);
    flash_ctx_destroy(replay_ctx);
    cr_assert_gt(n, 0, "no saved fuzz input found (run from the source tree)");
}
