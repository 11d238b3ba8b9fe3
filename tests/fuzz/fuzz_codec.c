/* tests/fuzz/fuzz_codec.c — libFuzzer harness for the value codec.

   Input: byte 0 is a selector: bits 0-3 pick a query (queries[], modulo
   their count), bits 4-5 what a DYNAMIC class's version key holds (absent,
   "0", "1", "x"), bit 6 asks with FLASH_Q_ONLY_CACHE. The rest is the
   cached value (for the row paths: a row payload).

   Paths, all on every input:
   1. flash_row_decode of the bytes as a row of T (a model with every field
      type). Decoding succeeds or fails with FLASH_EPROTO; when it succeeds
      the encoding is canonical: flash_row_encode gives the same bytes back.
   2. The engine's value decoder itself (flash__decode_value, static, visible
      here because this file holds the implementation) for the chosen query:
      1 (usable), 0 (miss) or a negative code; when usable, re-encoding the
      result (flash__encode_value, at the value's own time and version) gives
      the same bytes back, save the stale flag.
   3. End to end: the bytes are stored as the cached value of the query's key
      in a memory backend (and the version key as the selector says) and the
      query is resolved through the engine. It must settle exactly once, with
      a result or a not-found, never crash: answered from the cache, it is
      exactly what the decoder made of the bytes; otherwise it comes from the
      source and equals the table's. The next request gets the table's answer
      or, when the bytes were usable and kept, the decoder's again.
   4. A row built from the input bytes survives encode -> decode unchanged.
   Paths 1 and 4 run for N too (every nullable type, TIME, TIMEN: a null
   marker per nullable field), and two queries of N join queries[].

   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_codec.c
   With -DFUZZ_CODEC_WRITE_CORPUS (no -fsanitize=fuzzer) it is instead a
   program that writes the seed corpus into the directory given as argv[1].
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c)                                                                           \
    do {                                                                                        \
        if (!(c)) {                                                                             \
            fprintf(stderr, "fuzz_codec: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__);  \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

#define T_FIELDS(F) F(I64, id) F(I32, n) F(F64, x) F(BOOL, flag) F(STR, s) F(BYTES, raw) F(STR, title)
FLASH_MODEL(T, T_FIELDS)
FLASH_GET_KEYS(T, (id))
FLASH_FILTER_KEYS(T, (s))
FLASH_INSTANCE_CACHE(TOnTitle, T, (title))
FLASH_LIST_CACHE(TListOfFlag, T, (flag))
FLASH_COUNT_CACHE(TCountOfN, T, (n))
FLASH_IDS_CACHE(TIdsOfN, T, (n))
FLASH_INSTANCE_CACHE_OPT(TDynamic, T, (id), .invalidation = FLASH_INVALIDATE_DYNAMIC)
FLASH_INSTANCE_CACHE_OPT(TAllowtime, T, (id), .allowtime_s = 60)

/* The nullable types and timestamps. */
#define N_FIELDS(F) F(I64, id) F(I64N, mgr) F(I32N, rank) F(F64N, score) F(BOOLN, ok) F(TIME, at) F(TIMEN, seen)
FLASH_MODEL(N, N_FIELDS)
FLASH_GET_KEYS(N, (id))
FLASH_FILTER_KEYS(N, (mgr))

/* A fixed clock: ages and the lag window are the input's doing. */
static int64_t clock_now = 1700000000000;
static int64_t fake_clock(void *ud) {
    (void)ud;
    return clock_now;
}

static char long_title[400];

typedef struct fq {
    const flash_class *cls;
    flash_value v;
} fq;

static fq queries[12];
static size_t nqueries;

static void init_queries(void) {
    memset(long_title, 'L', sizeof long_title - 1); /* a key over 250 bytes: hashed */
    nqueries = 0;
    queries[nqueries++] = (fq){&T__get_by_id, flash_v_i64(1)};
    queries[nqueries++] = (fq){&T__get_by_id, flash_v_i64(999)}; /* no such row */
    queries[nqueries++] = (fq){&T__filter_by_s, flash_v_str("a")};
    queries[nqueries++] = (fq){&TOnTitle_class, flash_v_str(long_title)};
    queries[nqueries++] = (fq){&TOnTitle_class, flash_v_str("t2")};
    queries[nqueries++] = (fq){&TListOfFlag_class, flash_v_bool(true)};
    queries[nqueries++] = (fq){&TCountOfN_class, flash_v_i32(7)};
    queries[nqueries++] = (fq){&TIdsOfN_class, flash_v_i32(7)};
    queries[nqueries++] = (fq){&TDynamic_class, flash_v_i64(2)};
    queries[nqueries++] = (fq){&TAllowtime_class, flash_v_i64(3)};
    queries[nqueries++] = (fq){&N__get_by_id, flash_v_i64(2)};
    queries[nqueries++] = (fq){&N__filter_by_mgr, flash_v_null(FLASH_I64N)};
}

/* ---- the world: a table, a poll loop, a memory backend, a context ---- */

static flash_table *db;
static flash_poll *loop;
static flash_cache mem;
static flash_ctx *ctx;
static flash_ctx *truth_ctx; /* no cache: every answer from the source */

static void init_world(void) {
    static const unsigned char raw[] = {0, 1, 2, 0xff};
    db = flash_table_create();
    for (int i = 1; i <= 4; i++) {
        char s[8], t[8];
        snprintf(s, sizeof s, "%s", i % 2 ? "a" : "b");
        snprintf(t, sizeof t, "t%d", i);
        T row = {i, 7, i * 0.5, i % 2 == 1, s, {raw, (size_t)i}, t};
        if (i == 4) row.title = long_title, row.s = NULL, row.raw.data = NULL, row.raw.len = 0;
        FUZZ_CHECK(flash_table_put(db, &T_model, &row) == 0);
    }
    for (int i = 1; i <= 4; i++) {
        N row = {i, i % 2 ? flash_i64n_null() : flash_i64n_of(INT64_MIN + i), i == 3 ? flash_i32n_null() : flash_i32n_of(-i),
                 i == 2 ? flash_f64n_null() : flash_f64n_of(i * -0.25), i == 4 ? flash_booln_null() : flash_booln_of(i & 1),
                 (flash_time)(INT64_MAX - i), i == 1 ? flash_timen_null() : flash_timen_of(-i * FLASH_TIME_PER_S)};
        FUZZ_CHECK(flash_table_put(db, &N_model, &row) == 0);
    }
    flash_table_set_async(db, false);
    loop = flash_poll_create();
    mem = flash_memory_create(NULL);
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = mem;
    d.clock_ms = fake_clock;
    d.lag_window_ms = 100;
    ctx = flash_ctx_create(&d);
    FUZZ_CHECK(db && loop && mem.vt && ctx);
    FUZZ_CHECK(flash_poll_attach(ctx, loop) == 0);
    FUZZ_CHECK(flash_ctx_set_source(ctx, NULL, flash_table_source(db)) == 0);
    d.cache.vt = NULL;
    d.cache.self = NULL;
    truth_ctx = flash_ctx_create(&d);
    FUZZ_CHECK(truth_ctx);
    FUZZ_CHECK(flash_poll_attach(truth_ctx, loop) == 0);
    FUZZ_CHECK(flash_ctx_set_source(truth_ctx, NULL, flash_table_source(db)) == 0);
}

static void settle_loop(void) {
    for (int i = 0; i < 1000 && flash_poll_run_once(loop, false) > 0; i++) {
    }
}

/* ---- backend access through the vtable ---- */

static int op_done_calls;
static unsigned char got_value[1 << 16]; /* a GET's value, copied in done */
static void op_done(flash_cache_op *op) {
    op_done_calls++;
    if (op->code == FLASH_CACHE_GET && op->items[0].status == 0) {
        FUZZ_CHECK(op->items[0].value_len <= sizeof got_value);
        memcpy(got_value, op->items[0].value, op->items[0].value_len);
        op->items[0].value = got_value; /* valid after done */
    }
}

/* Run one single-item op on the memory backend to completion. */
static void run_op(flash_cache_opcode code, flash_cache_item *it) {
    flash_cache_op op;
    memset(&op, 0, sizeof op);
    op.code = code;
    op.items = it;
    op.count = 1;
    op.done = op_done;
    op_done_calls = 0;
    mem.vt->submit(mem.self, flash_poll_loop(loop), &op);
    for (int i = 0; i < 100 && !op_done_calls; i++) flash_poll_run_once(loop, false);
    FUZZ_CHECK(op_done_calls == 1);
}

static void store(const char *key, size_t klen, const void *value, size_t vlen) {
    flash_cache_item it;
    memset(&it, 0, sizeof it);
    it.key = key;
    it.key_len = klen;
    it.value = value;
    it.value_len = vlen;
    run_op(FLASH_CACHE_SET, &it);
}

/* ---- results ---- */

static bool row_eq(const flash_model *m, const void *a, const void *b) {
    if (!a || !b) return a == b;
    for (size_t i = 0; i < m->nfields; i++) {
        flash_value x = flash_row_value(m, a, (int)i), y = flash_row_value(m, b, (int)i);
        if (!flash_value_eq(&x, &y)) return false;
    }
    return true;
}

static bool result_eq(const flash_class *c, const void *a, const void *b) {
    if (!a || !b) return a == b;
    switch (c->kind) {
    case FLASH_CLASS_GET:
    case FLASH_CLASS_INSTANCE: return row_eq(c->model, a, b);
    case FLASH_CLASS_COUNT: return *(const int64_t *)a == *(const int64_t *)b;
    case FLASH_CLASS_IDS: {
        const flash_ids *x = a, *y = b;
        return x->count == y->count && (x->count == 0 || memcmp(x->ids, y->ids, x->count * sizeof *x->ids) == 0);
    }
    default: {
        const flash_list *x = a, *y = b;
        if (x->count != y->count) return false;
        for (size_t i = 0; i < x->count; i++)
            if (!row_eq(c->model, x->items[i], y->items[i])) return false;
        return true;
    }
    }
}

/* Strings of a decoded row are NUL-terminated C strings (touch every byte:
   ASan checks the bounds). */
static void touch_row(const flash_model *m, const void *row) {
    for (size_t i = 0; row && i < m->nfields; i++) {
        flash_value v = flash_row_value(m, row, (int)i);
        volatile unsigned sum = 0;
        if ((v.type == FLASH_STR || v.type == FLASH_BYTES) && !v.is_null)
            for (size_t k = 0; k < v.u.s.len; k++) sum += (unsigned char)v.u.s.ptr[k];
        if (v.type == FLASH_STR && !v.is_null) FUZZ_CHECK(v.u.s.ptr[v.u.s.len] == 0);
        (void)sum;
    }
}

static void touch_result(const flash_class *c, const void *r) {
    if (!r) return;
    switch (c->kind) {
    case FLASH_CLASS_GET:
    case FLASH_CLASS_INSTANCE: touch_row(c->model, r); break;
    case FLASH_CLASS_COUNT: (void)*(const volatile int64_t *)r; break;
    case FLASH_CLASS_IDS: {
        const flash_ids *x = r;
        for (size_t i = 0; i < x->count; i++) (void)((const volatile int64_t *)x->ids)[i];
        break;
    }
    default: {
        const flash_list *x = r;
        for (size_t i = 0; i < x->count; i++) touch_row(c->model, x->items[i]);
        break;
    }
    }
}

/* ---- the query through the engine ---- */

static int settle_calls;
static void count_settle(flash_ctx *c, flash_promise *p, void *arg) {
    (void)c;
    (void)p;
    (void)arg;
    settle_calls++;
}

/* Resolve q in context c; returns the code, the value through out. Checks
   that the promise settles exactly once. */
static int resolve(flash_ctx *c, const fq *q, int flags, void **out) {
    flash_promise *p = flash_query_async(c, q->cls, &q->v, 1, flags);
    FUZZ_CHECK(p);
    settle_calls = 0;
    FUZZ_CHECK(flash_on_settle(c, p, count_settle, NULL) == 0);
    int rc = flash_wait(c, p, out);
    settle_loop();
    flash_drain(c);
    FUZZ_CHECK(settle_calls == 1);
    FUZZ_CHECK(flash_promise_state(p) != FLASH_PENDING);
    return rc;
}

/* ---- the four paths ---- */

static void path_row(const uint8_t *data, size_t size) {
    T row;
    int rc = flash_row_decode(ctx, &T_model, data, size, &row);
    FUZZ_CHECK(rc == 0 || rc == FLASH_EPROTO);
    if (rc) return;
    touch_row(&T_model, &row);
    void *enc;
    size_t len;
    FUZZ_CHECK(flash_row_encode(ctx, &T_model, &row, &enc, &len) == 0);
    FUZZ_CHECK(len == size && memcmp(enc, data, size) == 0); /* one value, one byte string */
    N nrow;
    rc = flash_row_decode(ctx, &N_model, data, size, &nrow);
    FUZZ_CHECK(rc == 0 || rc == FLASH_EPROTO);
    if (rc) return;
    FUZZ_CHECK(!nrow.mgr.null || nrow.mgr.v == 0);
    FUZZ_CHECK(!nrow.score.null || nrow.score.v == 0);
    FUZZ_CHECK(flash_row_encode(ctx, &N_model, &nrow, &enc, &len) == 0);
    FUZZ_CHECK(len == size && memcmp(enc, data, size) == 0);
}

/* The engine's decoder on the bytes as q's cached value; 1 with *result
   when usable. */
static int path_direct(const fq *q, const uint8_t *data, size_t size, void **result, bool *none) {
    flash__query iq;
    flash__hdr h;
    int err = 0;
    memset(&iq, 0, sizeof iq);
    iq.cls = flash__class_of(q->cls, &err);
    FUZZ_CHECK(iq.cls);
    iq.values = (flash_value *)&q->v;
    FUZZ_CHECK(flash__build_key(ctx, iq.cls, iq.values, 1, 0, &iq.key, &iq.key_len, &iq.full, &iq.full_len) == 0);
    int r = flash__decode_value(ctx, &iq, data, size, result, none, &h);
    FUZZ_CHECK(r == 1 || r == 0 || r == FLASH_EPROTO);
    if (r != 1) return r;
    FUZZ_CHECK(*none == (*result == NULL));
    touch_result(iq.cls, *result);
    /* canonical: the same bytes again, save the stale flag */
    int64_t saved = clock_now;
    void *enc;
    size_t len;
    clock_now = h.time_ms;
    FUZZ_CHECK(flash__encode_value(ctx, &iq, *result, *none, h.version, &enc, &len) == 0);
    clock_now = saved;
    FUZZ_CHECK(len == size);
    FUZZ_CHECK(((const unsigned char *)enc)[1] == (data[1] & ~FLASH__VF_STALE));
    /* Bytes 6..9 are the check, which covers the flags: they differ exactly
       when the stale flag does. */
    FUZZ_CHECK(memcmp(enc, data, 1) == 0 && memcmp((const char *)enc + 2, data + 2, 4) == 0 &&
               memcmp((const char *)enc + FLASH__HDR_FIXED, data + FLASH__HDR_FIXED, size - FLASH__HDR_FIXED) == 0);
    if (!(data[1] & FLASH__VF_STALE)) FUZZ_CHECK(memcmp(enc, data, size) == 0);
    return 1;
}

/* Is r (code rc) the decoder's reading of data, now? */
static bool is_decoded(const fq *q, const uint8_t *data, size_t size, int rc, const void *r) {
    void *dec = NULL;
    bool none = false;
    if (path_direct(q, data, size, &dec, &none) != 1) return false;
    return rc == 0 ? result_eq(q->cls, r, dec) : (rc == FLASH_ENOTFOUND && dec == NULL);
}

static bool is_truth(const fq *q, int want_rc, const void *want, int rc, const void *r) {
    return rc == want_rc && (rc != 0 || result_eq(q->cls, r, want));
}

static void path_engine(const fq *q, uint8_t sel, const uint8_t *data, size_t size) {
    void *want = NULL, *got = NULL, *again = NULL;
    flash_ctx_reset(truth_ctx);
    int want_rc = resolve(truth_ctx, q, 0, &want);
    FUZZ_CHECK(want_rc == 0 || want_rc == FLASH_ENOTFOUND);
    /* a new request, the input as the cached value */
    flash_ctx_reset(ctx);
    flash_memory_flush(mem);
    char *key;
    size_t klen;
    bool hashed;
    FUZZ_CHECK(flash_cache_key(ctx, q->cls, &q->v, 1, &key, &klen, &hashed) == 0);
    store(key, klen, data, size);
    if (q->cls->opts.invalidation == FLASH_INVALIDATE_DYNAMIC && (sel >> 4) % 4) {
        static const char *const versions[] = {"", "0", "1", "x"};
        int err = 0;
        char *vk;
        size_t vlen;
        FUZZ_CHECK(flash__version_key(ctx, flash__class_of(q->cls, &err), &vk, &vlen) == 0);
        const char *v = versions[(sel >> 4) % 4];
        store(vk, vlen, v, strlen(v));
    }
    flash_ctx_stats_clear(ctx);
    int flags = (sel & 0x40) ? FLASH_Q_ONLY_CACHE : 0;
    int rc = resolve(ctx, q, flags, &got);
    flash_stats st = flash_ctx_stats(ctx);
    FUZZ_CHECK(rc == 0 || rc == FLASH_ENOTFOUND);
    if (rc == 0) touch_result(q->cls, got);
    if (st.cache_hits) {
        FUZZ_CHECK(st.cache_hits == 1);
        FUZZ_CHECK(is_decoded(q, data, size, rc, got)); /* answered from the input as decoded */
    } else if (!(flags & FLASH_Q_ONLY_CACHE)) {
        FUZZ_CHECK(st.source_calls == 1); /* not usable: the source's answer */
        FUZZ_CHECK(is_truth(q, want_rc, want, rc, got));
    } else {
        FUZZ_CHECK(rc == FLASH_ENOTFOUND && st.source_calls == 0);
    }
    /* The next request: a corrupt value was replaced, a usable one kept. */
    flash_ctx_reset(ctx);
    flash_ctx_stats_clear(ctx);
    rc = resolve(ctx, q, 0, &again);
    st = flash_ctx_stats(ctx);
    FUZZ_CHECK(rc == 0 || rc == FLASH_ENOTFOUND);
    if (st.cache_hits) FUZZ_CHECK(is_truth(q, want_rc, want, rc, again) || is_decoded(q, data, size, rc, again));
    else FUZZ_CHECK(is_truth(q, want_rc, want, rc, again));
}

/* A row from the input survives encode -> decode. */
static void path_roundtrip(const uint8_t *data, size_t size) {
    char s[64], title[64];
    unsigned char raw[64];
    T row;
    size_t k = 0;
    memset(&row, 0, sizeof row);
#define NEXT() (k < size ? data[k++] : 0)
    for (int i = 0; i < 8; i++) row.id |= (int64_t)((uint64_t)NEXT() << (8 * i));
    for (int i = 0; i < 4; i++) row.n |= (int32_t)((uint32_t)NEXT() << (8 * i));
    uint64_t bits = 0;
    for (int i = 0; i < 8; i++) bits |= (uint64_t)NEXT() << (8 * i);
    memcpy(&row.x, &bits, 8);
    row.flag = NEXT() & 1;
    size_t sl = NEXT() % sizeof s, tl = NEXT() % sizeof title, rl = NEXT() % (sizeof raw + 1);
    for (size_t i = 0; i < sl; i++) s[i] = (char)(NEXT() | 1);
    s[sl] = 0;
    for (size_t i = 0; i + 1 < tl; i++) title[i] = (char)(NEXT() | 1);
    title[tl ? tl - 1 : 0] = 0;
    for (size_t i = 0; i < rl && i < sizeof raw; i++) raw[i] = NEXT();
#undef NEXT
    row.s = sl % 3 == 2 ? NULL : s;
    row.title = title;
    row.raw.data = rl == sizeof raw ? NULL : raw;
    row.raw.len = rl == sizeof raw ? 0 : rl;
    void *enc;
    size_t len;
    T back;
    FUZZ_CHECK(flash_row_encode(ctx, &T_model, &row, &enc, &len) == 0);
    FUZZ_CHECK(flash_row_decode(ctx, &T_model, enc, len, &back) == 0);
    FUZZ_CHECK(back.id == row.id && back.n == row.n && back.flag == row.flag);
    FUZZ_CHECK(memcmp(&back.x, &row.x, sizeof row.x) == 0); /* bit for bit, NaNs too */
    FUZZ_CHECK((back.s == NULL) == (row.s == NULL) && (!row.s || strcmp(back.s, row.s) == 0));
    FUZZ_CHECK(strcmp(back.title, row.title) == 0);
    FUZZ_CHECK((back.raw.data == NULL) == (row.raw.data == NULL) && back.raw.len == row.raw.len);
    FUZZ_CHECK(!row.raw.len || memcmp(back.raw.data, row.raw.data, row.raw.len) == 0);

    /* N: every nullable type, NULL or not by the input's bits */
    N nr, nb;
    uint64_t w[6] = {0, 0, 0, 0, 0, 0};
    for (int j = 0; j < 6; j++)
        for (int i = 0; i < 8; i++) w[j] |= (uint64_t)(size ? data[(size_t)(j * 8 + i) % size] : 0) << (8 * i);
    uint8_t nulls = size ? data[size - 1] : 0;
    memset(&nr, 0, sizeof nr);
    nr.id = (int64_t)w[0];
    nr.mgr = nulls & 1 ? flash_i64n_null() : flash_i64n_of((int64_t)w[1]);
    nr.rank = nulls & 2 ? flash_i32n_null() : flash_i32n_of((int32_t)(uint32_t)w[2]);
    double d;
    memcpy(&d, &w[3], 8);
    nr.score = nulls & 4 ? flash_f64n_null() : flash_f64n_of(d);
    nr.ok = nulls & 8 ? flash_booln_null() : flash_booln_of(w[4] & 1);
    nr.at = (flash_time)w[4];
    nr.seen = nulls & 16 ? flash_timen_null() : flash_timen_of((flash_time)w[5]);
    FUZZ_CHECK(flash_row_encode(ctx, &N_model, &nr, &enc, &len) == 0);
    FUZZ_CHECK(flash_row_decode(ctx, &N_model, enc, len, &nb) == 0);
    FUZZ_CHECK(nb.id == nr.id && nb.at == nr.at);
    FUZZ_CHECK(nb.mgr.null == nr.mgr.null && nb.mgr.v == nr.mgr.v);
    FUZZ_CHECK(nb.rank.null == nr.rank.null && nb.rank.v == nr.rank.v);
    FUZZ_CHECK(nb.score.null == nr.score.null && memcmp(&nb.score.v, &nr.score.v, 8) == 0);
    FUZZ_CHECK(nb.ok.null == nr.ok.null && nb.ok.v == nr.ok.v);
    FUZZ_CHECK(nb.seen.null == nr.seen.null && nb.seen.v == nr.seen.v);
}

static void init(void) {
    static bool done;
    if (done) return;
    done = true;
    init_queries();
    init_world();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init();
    if (size < 1) return 0;
    uint8_t sel = data[0];
    const fq *q = &queries[(sel & 0x0f) % nqueries];
    const uint8_t *v = data + 1;
    size_t n = size - 1;

    flash_ctx_reset(ctx);
    path_row(v, n);
    void *decoded = NULL;
    bool none = false;
    path_direct(q, v, n, &decoded, &none);
    path_engine(q, sel, v, n);
    flash_ctx_reset(ctx);
    path_roundtrip(v, n);
    flash_ctx_reset(ctx);
    flash_memory_flush(mem);
    return 0;
}

#ifdef FUZZ_CODEC_WRITE_CORPUS
/* ---- seed corpus: genuine values of every kind, written by the engine ---- */

static void write_file(const char *dir, const char *name, uint8_t sel, const void *v, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    FUZZ_CHECK(f);
    fputc(sel, f);
    if (n) fwrite(v, 1, n, f);
    fclose(f);
}

/* The value the engine cached for q (after a miss filled it). */
static bool cached_value(const fq *q, void **out, size_t *len) {
    char *key;
    size_t klen;
    bool hashed;
    flash_cache_item it;
    FUZZ_CHECK(flash_cache_key(ctx, q->cls, &q->v, 1, &key, &klen, &hashed) == 0);
    memset(&it, 0, sizeof it);
    it.key = key;
    it.key_len = klen;
    run_op(FLASH_CACHE_GET, &it);
    if (it.status) return false;
    *out = flash_memdup(ctx, it.value, it.value_len);
    *len = it.value_len;
    return true;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    char name[64];
    init();
    for (size_t i = 0; i < nqueries; i++) {
        void *v, *got;
        size_t len;
        flash_ctx_reset(ctx);
        flash_memory_flush(mem);
        resolve(ctx, &queries[i], 0, &got);
        if (!cached_value(&queries[i], &v, &len)) continue;
        snprintf(name, sizeof name, "value-%02zu-%s", i, queries[i].cls->name);
        for (char *c = name; *c; c++)
            if (*c == '.') *c = '_';
        write_file(dir, name, (uint8_t)i, v, len);
        /* the same, stale (an allowtime class serves it) */
        void *st;
        size_t stlen;
        if (flash__restamp(ctx, v, len, &st, &stlen) == 0) {
            snprintf(name, sizeof name, "stale-%02zu", i);
            write_file(dir, name, (uint8_t)i, st, stlen);
        }
        /* only_cache, and each version-key state */
        snprintf(name, sizeof name, "onlycache-%02zu", i);
        write_file(dir, name, (uint8_t)(0x40 | i), v, len);
        if (queries[i].cls->opts.invalidation == FLASH_INVALIDATE_DYNAMIC) {
            for (int k = 1; k < 4; k++) {
                snprintf(name, sizeof name, "version%d-%02zu", k, i);
                write_file(dir, name, (uint8_t)((k << 4) | i), v, len);
            }
        }
    }
    /* a marker, an empty value, a bare header, a truncated header */
    {
        void *mk;
        size_t mlen;
        FUZZ_CHECK(flash__marker(ctx, &mk, &mlen) == 0);
        write_file(dir, "marker", 0, mk, mlen);
        write_file(dir, "marker-allowtime", 9, mk, mlen);
        write_file(dir, "empty", 0, "", 0);
        write_file(dir, "truncated-header", 0, mk, 3);
    }
    /* bare row encodings (the row path) */
    {
        static const unsigned char raw[] = {0, 1, 2};
        T rows[] = {
            {0, 0, 0.0, false, NULL, {NULL, 0}, ""},
            {-1, INT32_MIN, -0.0, true, "", {raw, 0}, "x"},
            {INT64_MAX, INT32_MAX, NAN, true, "héllo", {raw, 3}, "t"},
            {INT64_MIN, 1, INFINITY, false, "s", {raw, 1}, "a\xff"},
        };
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
            void *enc;
            size_t len;
            FUZZ_CHECK(flash_row_encode(ctx, &T_model, &rows[i], &enc, &len) == 0);
            snprintf(name, sizeof name, "row-%zu", i);
            write_file(dir, name, 0, enc, len);
        }
    }
    flash_ctx_destroy(ctx);
    flash_ctx_destroy(truth_ctx);
    flash_cache_destroy(mem);
    flash_poll_destroy(loop);
    flash_table_destroy(db);
    return 0;
}
#endif
