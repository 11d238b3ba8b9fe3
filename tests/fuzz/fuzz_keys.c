/* tests/fuzz/fuzz_keys.c — libFuzzer harness for the cache-key builder.

   flash_cache_key over arbitrary values (STR, BYTES, I64, I32, F64, BOOL,
   SQL NULL) of one- to four-field classes, under an arbitrary key prefix.
   Checked for every key:
     - the return is 0 or a negative FLASH_E* code;
     - a key is 1..250 bytes, none of them <= 0x20 or 0x7f (memcached's rule),
       NUL-terminated; hashed keys are "<head>#<32 hex>" and only they hold '#';
     - the same values give the same key (twice, and from a second context);
     - injectivity: pairs of values derived from the input (one field
       changed, a string cut or grown by a byte, 0.0 / -0.0, NaNs, NULL /
       empty) give equal keys exactly when the values are equal
       (flash_value_eq), and keys of different classes never meet.

   Input: a stream of choices (see the reader below); running out reads zeros.
   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_keys.c
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c)                                                                          \
    do {                                                                                       \
        if (!(c)) {                                                                            \
            fprintf(stderr, "fuzz_keys: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__);  \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define K_FIELDS(F) F(I64, i) F(I32, j) F(F64, f) F(BOOL, b) F(STR, s) F(STR, t) F(BYTES, r) F(BYTES, q) \
    F(I64N, in) F(I32N, jn) F(F64N, fn) F(BOOLN, bn) F(TIME, tm) F(TIMEN, tn)
FLASH_MODEL(K, K_FIELDS)
FLASH_GET_KEYS(K, (i), (j), (f), (b), (s), (r), (s, t), (r, q))
FLASH_FILTER_KEYS(K, (i, s, f), (s, r, t, q), (b, j), (f, i), (t), (q, i))
/* The nullable types and timestamps, alone and next to strings. */
FLASH_GET_KEYS(K, (in), (jn), (fn), (bn), (tm), (tn), (in, s), (s, tn))
FLASH_FILTER_KEYS(K, (in, jn, fn, bn), (tm, tn, s, in))
/* A class name long enough that a long prefix leaves no room for a hash. */
FLASH_INSTANCE_CACHE_OPT(K_instance_cache_with_a_rather_long_name_to_push_the_key_head_towards_the_limit, K,
                         (s, i), .version = 4294967295u)

static const flash_class *const classes[] = {
    &K__get_by_i,         &K__get_by_j,         &K__get_by_f,       &K__get_by_b,
    &K__get_by_s,         &K__get_by_r,         &K__get_by_s_t,     &K__get_by_r_q,
    &K__filter_by_i_s_f,  &K__filter_by_s_r_t_q, &K__filter_by_b_j, &K__filter_by_f_i,
    &K__filter_by_t,      &K__filter_by_q_i,
    &K_instance_cache_with_a_rather_long_name_to_push_the_key_head_towards_the_limit_class,
    &K__get_by_in,        &K__get_by_jn,        &K__get_by_fn,      &K__get_by_bn,
    &K__get_by_tm,        &K__get_by_tn,        &K__get_by_in_s,    &K__get_by_s_tn,
    &K__filter_by_in_jn_fn_bn, &K__filter_by_tm_tn_s_in,
};
#define NCLASSES (sizeof classes / sizeof classes[0])

/* ---- input reader ---- */

typedef struct rd {
    const uint8_t *p;
    size_t n;
} rd;

static uint8_t u8(rd *r) {
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}
static uint64_t u64(rd *r) {
    uint64_t v = 0;
    for (int k = 0; k < 8; k++) v |= (uint64_t)u8(r) << (8 * k);
    return v;
}
/* Up to max bytes, length from the input. */
static size_t take(rd *r, uint8_t *out, size_t max) {
    size_t len = u8(r);
    if (len == 255) len = 255 + (size_t)u8(r) * 4; /* long strings: hashed keys */
    if (len > max) len = max;
    for (size_t k = 0; k < len; k++) out[k] = r->n ? u8(r) : (uint8_t)('a' + k % 26);
    return len;
}

/* Make bytes valid UTF-8 without NUL: ASCII kept, others become a 2- or
   3-byte sequence (which may grow the string). */
static size_t utf8ify(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
    size_t o = 0;
    for (size_t k = 0; k < n && o + 3 <= cap; k++) {
        uint8_t c = in[k];
        if (c == 0) {
            out[o++] = '0';
        } else if (c < 0x80) {
            out[o++] = c;
        } else if (c < 0xC0) { /* U+0080..U+00BF */
            out[o++] = 0xC2;
            out[o++] = c;
        } else { /* U+0800 + c: three bytes */
            uint32_t cp = 0x800u + c;
            out[o++] = (uint8_t)(0xE0 | (cp >> 12));
            out[o++] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
            out[o++] = (uint8_t)(0x80 | (cp & 0x3F));
        }
    }
    return o;
}

#define MAXS 1400

typedef struct vals {
    flash_value v[4];
    uint8_t buf[4][MAXS];
} vals;

static double special_double(uint8_t k, uint64_t bits) {
    switch (k % 10) {
    case 0: return 0.0;
    case 1: return -0.0;
    case 2: return NAN;
    case 3: return -NAN;
    case 4: return INFINITY;
    case 5: return -INFINITY;
    case 6: return 1e308;
    case 7: return 5e-324;
    case 8: return 0.1;
    default: {
        double d;
        memcpy(&d, &bits, sizeof d); /* any bit pattern: signalling NaNs too */
        return d;
    }
    }
}

/* One value of type t from the input into slot k of vs. */
static void make_value(rd *r, vals *vs, int k, flash_type t) {
    uint8_t mode = u8(r);
    if (mode % 16 == 15) { /* SQL NULL */
        vs->v[k] = flash_v_null(t);
        return;
    }
    t = flash_value_type(t); /* I64N, TIME, TIMEN: I64 values; I32N: I32 ... */
    switch (t) {
    case FLASH_I64: {
        static const int64_t edge[] = {0, -1, 1, INT64_MIN, INT64_MAX, 10, -10};
        vs->v[k] = flash_v_i64(mode % 4 == 0 ? edge[u8(r) % 7] : (int64_t)u64(r));
        break;
    }
    case FLASH_I32: vs->v[k] = flash_v_i32((int32_t)(uint32_t)u64(r)); break;
    case FLASH_F64: {
        uint64_t bits = u64(r);
        vs->v[k] = flash_v_f64(mode % 2 ? special_double(u8(r), bits) : special_double(9, bits));
        break;
    }
    case FLASH_BOOL: vs->v[k] = flash_v_bool(u8(r) & 1); break;
    case FLASH_STR:
    case FLASH_BYTES: {
        uint8_t raw[MAXS];
        size_t n = take(r, raw, sizeof raw / 3);
        if (t == FLASH_STR && mode % 4 != 3) n = utf8ify(raw, n, vs->buf[k], MAXS); /* mostly valid */
        else memcpy(vs->buf[k], raw, n);
        if (t == FLASH_STR) vs->v[k] = flash_v_strn((const char *)vs->buf[k], n);
        else {
            flash_bytes b = {vs->buf[k], n};
            vs->v[k] = flash_v_bytes(b);
        }
        break;
    }
    default: break;
    }
}

/* A copy of a whose values point into b's own buffers. */
static void copy_vals(vals *b, const vals *a, size_t n) {
    for (size_t k = 0; k < n; k++) {
        b->v[k] = a->v[k];
        if ((a->v[k].type == FLASH_STR || a->v[k].type == FLASH_BYTES) && !a->v[k].is_null) {
            memcpy(b->buf[k], a->v[k].u.s.ptr, a->v[k].u.s.len);
            b->v[k].u.s.ptr = (const char *)b->buf[k];
        }
    }
}

/* A neighbour of value k: the kind of difference an escaper gets wrong. */
static void mutate(rd *r, vals *vs, int k) {
    flash_value *v = &vs->v[k];
    uint8_t how = u8(r);
    if (how % 8 == 7) { /* toggle NULL / empty */
        if (v->is_null) {
            if (v->type == FLASH_STR) *v = flash_v_strn((const char *)vs->buf[k], 0);
            else if (v->type == FLASH_BYTES) {
                flash_bytes e = {vs->buf[k], 0};
                *v = flash_v_bytes(e);
            } else {
                flash_type t = v->type;
                memset(v, 0, sizeof *v);
                v->type = t;
            }
        } else {
            *v = flash_v_null(v->type);
        }
        return;
    }
    if (v->is_null) return;
    switch (v->type) {
    case FLASH_I64: v->u.i64 = (int64_t)((uint64_t)v->u.i64 + (uint64_t)(int8_t)u8(r)); break;
    case FLASH_I32: v->u.i32 = (int32_t)((uint32_t)v->u.i32 ^ (1u << (u8(r) % 32))); break;
    case FLASH_F64: {
        if (how % 3 == 0) v->u.f64 = -v->u.f64; /* 0.0 <-> -0.0, NaN <-> -NaN */
        else {
            uint64_t bits;
            memcpy(&bits, &v->u.f64, 8);
            bits ^= (uint64_t)1 << (u8(r) % 64);
            memcpy(&v->u.f64, &bits, 8);
        }
        break;
    }
    case FLASH_BOOL: v->u.b = !v->u.b; break;
    case FLASH_STR:
    case FLASH_BYTES: {
        size_t len = v->u.s.len, at = len ? u8(r) % len : 0;
        switch (how % 4) {
        case 0: /* change one byte */
            if (len) vs->buf[k][at] = (uint8_t)(vs->buf[k][at] ^ (u8(r) | 1));
            break;
        case 1: /* cut the last byte */
            if (len) v->u.s.len--;
            break;
        case 2: /* grow by one */
            if (len < MAXS) {
                vs->buf[k][len] = u8(r);
                v->u.s.len++;
            }
            break;
        default: /* swap two bytes */
            if (len > 1) {
                uint8_t c = vs->buf[k][0];
                vs->buf[k][0] = vs->buf[k][at];
                vs->buf[k][at] = c;
            }
            break;
        }
        v->u.s.ptr = (const char *)vs->buf[k];
        break;
    }
    default: break;
    }
}

static bool vals_eq(const vals *a, const vals *b, size_t n) {
    for (size_t k = 0; k < n; k++)
        if (!flash_value_eq(&a->v[k], &b->v[k])) return false;
    return true;
}

static bool is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

typedef struct key {
    int rc;
    char *k;
    size_t len;
    bool hashed;
} key;

static key make_key(flash_ctx *ctx, const flash_class *c, const vals *vs) {
    key out;
    memset(&out, 0, sizeof out);
    out.rc = flash_cache_key(ctx, c, vs->v, c->nfields, &out.k, &out.len, &out.hashed);
    FUZZ_CHECK(out.rc <= 0);
    FUZZ_CHECK(out.rc >= FLASH_EUNSUPPORTED);
    if (out.rc) return out;
    FUZZ_CHECK(out.k != NULL);
    FUZZ_CHECK(out.len >= 1 && out.len <= 250);
    FUZZ_CHECK(out.k[out.len] == 0);
    bool has_hash = false;
    for (size_t i = 0; i < out.len; i++) {
        unsigned char ch = (unsigned char)out.k[i];
        FUZZ_CHECK(ch > 0x20 && ch != 0x7f);
        if (ch == '#') has_hash = true;
    }
    FUZZ_CHECK(has_hash == out.hashed);
    if (out.hashed) {
        FUZZ_CHECK(out.len > 33 && out.k[out.len - 33] == '#');
        for (size_t i = out.len - 32; i < out.len; i++) FUZZ_CHECK(is_hex(out.k[i]));
    }
    return out;
}

static bool key_eq(const key *a, const key *b) { return a->len == b->len && memcmp(a->k, b->k, a->len) == 0; }

/* Is this a valid key value set (the checks flash_cache_key makes)? */
static bool values_valid(const vals *vs, size_t n) {
    for (size_t k = 0; k < n; k++) {
        const flash_value *v = &vs->v[k];
        if (v->type != FLASH_STR || v->is_null) continue;
        if (memchr(v->u.s.ptr, 0, v->u.s.len)) return false;
        if (!flash__utf8_valid((const unsigned char *)v->u.s.ptr, v->u.s.len)) return false;
    }
    return true;
}

static flash_ctx *new_ctx(const char *prefix) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.key_prefix = prefix;
    flash_ctx *ctx = flash_ctx_create(&d);
    FUZZ_CHECK(ctx);
    return ctx;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rd r = {data, size};
    char prefix[320];
    uint8_t pm = u8(&r);
    switch (pm % 4) {
    case 0: prefix[0] = 0; break; /* "" means: the default, "flash" */
    case 1: snprintf(prefix, sizeof prefix, "app"); break;
    case 2: { /* arbitrary bytes (escaped by the builder) */
        uint8_t raw[300];
        size_t n = take(&r, raw, sizeof raw);
        for (size_t k = 0; k < n; k++) prefix[k] = raw[k] ? (char)raw[k] : 'z';
        prefix[n] = 0;
        break;
    }
    default: /* long: the key head nears or passes the limit */
        memset(prefix, 'p', 150 + pm / 4 % 100);
        prefix[150 + pm / 4 % 100] = 0;
        break;
    }
    flash_ctx *ctx = new_ctx(prefix[0] ? prefix : NULL);
    flash_ctx *ctx2 = new_ctx(prefix[0] ? prefix : NULL);
    static vals a, b, c2;
    int rounds = 1 + u8(&r) % 4;
    for (int round = 0; round < rounds && r.n; round++) {
        const flash_class *c = classes[u8(&r) % NCLASSES];
        size_t n = c->nfields;
        FUZZ_CHECK(n >= 1 && n <= 4);
        for (size_t k = 0; k < n; k++) make_value(&r, &a, (int)k, c->model->fields[c->fields[k]].type);
        key ka = make_key(ctx, c, &a);
        /* validity: the builder refuses exactly the invalid strings */
        if (values_valid(&a, n)) FUZZ_CHECK(ka.rc == 0 || ka.rc == FLASH_ETOOLARGE);
        else FUZZ_CHECK(ka.rc == FLASH_EINVAL);
        /* determinism: same context, another context */
        key ka2 = make_key(ctx, c, &a), ka3 = make_key(ctx2, c, &a);
        FUZZ_CHECK(ka.rc == ka2.rc && ka.rc == ka3.rc);
        if (ka.rc == 0) {
            FUZZ_CHECK(key_eq(&ka, &ka2) && key_eq(&ka, &ka3));
            FUZZ_CHECK(ka.hashed == ka2.hashed);
        }
        /* injectivity on neighbours */
        int pairs = 1 + u8(&r) % 4;
        for (int p = 0; p < pairs; p++) {
            copy_vals(&b, &a, n);
            mutate(&r, &b, u8(&r) % (int)n);
            if (u8(&r) & 1) mutate(&r, &b, u8(&r) % (int)n);
            key kb = make_key(ctx, c, &b);
            if (ka.rc || kb.rc) continue;
            bool same_vals = vals_eq(&a, &b, n);
            if (same_vals) FUZZ_CHECK(key_eq(&ka, &kb));
            else if (!key_eq(&ka, &kb)) {
            } else {
                fprintf(stderr, "fuzz_keys: distinct values of %s share the key %.*s\n", c->name, (int)ka.len, ka.k);
                abort();
            }
        }
        /* another class's key for values of its own: never the same key */
        {
            const flash_class *d = classes[u8(&r) % NCLASSES];
            if (d != c) {
                for (size_t k = 0; k < d->nfields; k++)
                    make_value(&r, &c2, (int)k, d->model->fields[d->fields[k]].type);
                key kd = make_key(ctx, d, &c2);
                if (!ka.rc && !kd.rc) FUZZ_CHECK(!key_eq(&ka, &kd));
            }
        }
        /* bad arity and a wrong type are refused, never built */
        {
            char *k = NULL;
            size_t len = 0;
            FUZZ_CHECK(flash_cache_key(ctx, c, a.v, n + 1 <= 4 ? n + 1 : 0, &k, &len, NULL) == FLASH_EINVAL);
            flash_value wrong[4];
            memcpy(wrong, a.v, sizeof wrong);
            wrong[0].type = wrong[0].type == FLASH_I64 ? FLASH_BOOL : FLASH_I64;
            FUZZ_CHECK(flash_cache_key(ctx, c, wrong, n, &k, &len, NULL) == FLASH_EINVAL);
        }
    }
    flash_ctx_destroy(ctx);
    flash_ctx_destroy(ctx2);
    return 0;
}
