/* The model registry's value layer: the row codec (round trips, corrupt
   input, a fuzz loop), deep copies, cache keys (escaping, hashing of long
   keys, prefixes), values and the registry look-ups. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "models.h"

/* Models of this file: one key class per field type, and several fields. */
#define CODECKEY_FIELDS(F) F(I64, id) F(F64, f) F(BOOL, b) F(I32, i) F(BYTES, raw) F(STR, s)
FLASH_MODEL(CodecKey, CODECKEY_FIELDS)
FLASH_GET_KEYS(CodecKey, (f), (b), (i), (raw), (s), (id, f, b, s))
FLASH_INSTANCE_CACHE_OPT(CodecKeyV7, CodecKey, (id), .version = 7)

/* Only scalars: every byte of an encoding is a fixed-size field. */
#define CODECSCALAR_FIELDS(F) F(BOOL, a) F(F64, x) F(BOOL, c)
FLASH_MODEL(CodecScalar, CODECSCALAR_FIELDS)

static flash_ctx *ctx;
static void setup(void) {
    ctx = flash_ctx_create(NULL);
    cr_assert(ctx);
}
static void teardown(void) {
    flash_ctx_destroy(ctx);
    ctx = NULL;
}
TestSuite(codec, .init = setup, .fini = teardown);

/* ---- helpers ---- */

static uint64_t bits_of(double d) {
    uint64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}
static double double_of(uint64_t b) {
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
}

static void encode(const flash_model *m, const void *row, void **out, size_t *len) {
    int rc = flash_row_encode(ctx, m, row, out, len);
    cr_assert_eq(rc, 0, "encode: %d", rc);
    cr_assert(*out);
}

/* Decode from an exact-size heap copy, so that ASan sees any overrun. */
static int decode_exact(const flash_model *m, const void *data, size_t len, void *row) {
    unsigned char *copy = (unsigned char *)malloc(len ? len : 1);
    int rc;
    cr_assert(copy);
    if (len) memcpy(copy, data, len);
    rc = flash_row_decode(ctx, m, copy, len, row);
    free(copy);
    return rc;
}

static void assert_str_field(const char *got, const char *want, const char *what) {
    if (!want) {
        cr_assert_null(got, "%s: want NULL", what);
        return;
    }
    cr_assert_not_null(got, "%s: want \"%s\", got NULL", what, want);
    cr_assert_str_eq(got, want, "%s", what);
}

static void assert_bytes_field(flash_bytes got, flash_bytes want, const char *what) {
    if (!want.data) {
        cr_assert_null(got.data, "%s: want NULL bytes", what);
        cr_assert_eq(got.len, 0, "%s", what);
        return;
    }
    cr_assert_not_null(got.data, "%s: want non-NULL bytes (len %zu)", what, want.len);
    cr_assert_eq(got.len, want.len, "%s: length %zu, want %zu", what, got.len, want.len);
    if (want.len) cr_assert_eq(memcmp(got.data, want.data, want.len), 0, "%s: content", what);
}

static void assert_users_equal(const User *a, const User *b) {
    cr_assert_eq(a->id, b->id);
    assert_str_field(a->first_name, b->first_name, "first_name");
    assert_str_field(a->username, b->username, "username");
    cr_assert_eq(a->age, b->age);
    cr_assert_eq(bits_of(a->score), bits_of(b->score), "score bits %016llx vs %016llx",
                 (unsigned long long)bits_of(a->score), (unsigned long long)bits_of(b->score));
    cr_assert_eq(a->active, b->active);
    assert_bytes_field(a->avatar, b->avatar, "avatar");
}

static void round_trip(const User *u) {
    void *buf = NULL;
    size_t len = 0;
    User out;
    encode(&User_model, u, &buf, &len);
    memset(&out, 0x5a, sizeof out);
    int rc = decode_exact(&User_model, buf, len, &out);
    cr_assert_eq(rc, 0, "decode of a fresh encoding: %d", rc);
    assert_users_equal(&out, u);
    /* Deterministic: the same row encodes to the same bytes. */
    void *buf2 = NULL;
    size_t len2 = 0;
    encode(&User_model, u, &buf2, &len2);
    cr_assert_eq(len2, len);
    cr_assert_eq(memcmp(buf, buf2, len), 0);
}

/* ---- round trips ---- */

FLASH_TEST(codec, round_trip_an_ordinary_row) {
    User u = {42, "Ada", "ada", 36, 99.5, true, {"\x89PNG", 4}};
    round_trip(&u);
}

FLASH_TEST(codec, round_trip_null_and_empty_strings) {
    User u = {1, NULL, "", 0, 0.0, false, {NULL, 0}};
    round_trip(&u);
    User v = {2, "", NULL, 0, 0.0, false, {NULL, 0}};
    round_trip(&v);
}

FLASH_TEST(codec, null_bytes_and_empty_bytes_stay_distinct) {
    User a = {1, "a", "a", 1, 1.0, true, {NULL, 0}};
    User b = {1, "a", "a", 1, 1.0, true, {"", 0}};
    void *ba, *bb;
    size_t la, lb;
    encode(&User_model, &a, &ba, &la);
    encode(&User_model, &b, &bb, &lb);
    cr_assert(la != lb || memcmp(ba, bb, la) != 0, "NULL and empty bytes encode the same");
    User oa, ob;
    cr_assert_eq(decode_exact(&User_model, ba, la, &oa), 0);
    cr_assert_eq(decode_exact(&User_model, bb, lb, &ob), 0);
    cr_assert_null(oa.avatar.data);
    cr_assert_eq(oa.avatar.len, 0);
    cr_assert_not_null(ob.avatar.data, "empty bytes decoded as NULL");
    cr_assert_eq(ob.avatar.len, 0);
}

FLASH_TEST(codec, bytes_containing_nul_and_every_byte_value) {
    unsigned char all[256];
    for (int i = 0; i < 256; i++) all[i] = (unsigned char)i;
    User u = {7, "x", "y", 1, 2.0, false, {all, sizeof all}};
    round_trip(&u);
    User v = {7, "x", "y", 1, 2.0, false, {"\0\0\0", 3}};
    round_trip(&v);
    /* A long value: its length prefix takes several varint bytes. */
    size_t n = 100000;
    unsigned char *big = malloc(n);
    cr_assert(big);
    for (size_t i = 0; i < n; i++) big[i] = (unsigned char)(i * 31);
    User w = {8, "x", "y", 1, 2.0, false, {big, n}};
    round_trip(&w);
    free(big);
}

FLASH_TEST(codec, utf8_and_long_strings) {
    char *longs = malloc(70001);
    cr_assert(longs);
    memset(longs, 'q', 70000);
    longs[70000] = 0;
    User u = {9, "Zoë ✓ 日本 \xf0\x9f\x98\x80", longs, 1, 2.0, true, {NULL, 0}};
    round_trip(&u);
    free(longs);
}

FLASH_TEST(codec, extreme_integers) {
    const int64_t i64s[] = {0, 1, -1, 63, -64, 64, -65, INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1,
                            (int64_t)1 << 40, -((int64_t)1 << 40)};
    const int32_t i32s[] = {0, 1, -1, INT32_MAX, INT32_MIN, INT32_MAX - 1, INT32_MIN + 1, 1 << 20, -(1 << 20)};
    for (size_t i = 0; i < sizeof i64s / sizeof i64s[0]; i++) {
        for (size_t j = 0; j < sizeof i32s / sizeof i32s[0]; j++) {
            User u = {i64s[i], "n", "n", i32s[j], 0.0, false, {NULL, 0}};
            round_trip(&u);
        }
    }
}

FLASH_TEST(codec, doubles_keep_their_exact_bits) {
    const uint64_t patterns[] = {
        0x0000000000000000ull, /* 0.0 */
        0x8000000000000000ull, /* -0.0 */
        0x7ff8000000000000ull, /* quiet NaN */
        0xfff8000000000000ull, /* negative quiet NaN */
        0x7ff8000000001234ull, /* NaN with a payload */
        0x7ff0000000000001ull, /* signalling NaN */
        0x7ff0000000000000ull, /* +inf */
        0xfff0000000000000ull, /* -inf */
        0x0000000000000001ull, /* smallest subnormal */
        0x800fffffffffffffull, /* largest negative subnormal */
        0x0010000000000000ull, /* DBL_MIN */
        0x7fefffffffffffffull, /* DBL_MAX */
        0x3ff8000000000000ull, /* 1.5 */
        0xbfd0000000000000ull, /* -0.25 */
        0x400921fb54442d18ull, /* pi */
    };
    for (size_t i = 0; i < sizeof patterns / sizeof patterns[0]; i++) {
        User u = {1, "d", "d", 1, double_of(patterns[i]), true, {NULL, 0}};
        void *buf;
        size_t len;
        User out;
        encode(&User_model, &u, &buf, &len);
        cr_assert_eq(decode_exact(&User_model, buf, len, &out), 0);
        cr_assert_eq(bits_of(out.score), patterns[i], "pattern %016llx came back as %016llx",
                     (unsigned long long)patterns[i], (unsigned long long)bits_of(out.score));
    }
}

FLASH_TEST(codec, bools_both_ways) {
    User t = {1, "b", "b", 1, 1.0, true, {NULL, 0}};
    User f = {1, "b", "b", 1, 1.0, false, {NULL, 0}};
    round_trip(&t);
    round_trip(&f);
    CodecScalar s = {true, -0.0, false}, o;
    void *buf;
    size_t len;
    encode(&CodecScalar_model, &s, &buf, &len);
    cr_assert_eq(len, 10, "bool, double, bool: 1 + 8 + 1 bytes");
    cr_assert_eq(((unsigned char *)buf)[0], 1);
    cr_assert_eq(((unsigned char *)buf)[9], 0);
    cr_assert_eq(decode_exact(&CodecScalar_model, buf, len, &o), 0);
    cr_assert_eq(o.a, true);
    cr_assert_eq(o.c, false);
    cr_assert_eq(bits_of(o.x), bits_of(-0.0));
}

FLASH_TEST(codec, encode_and_decode_reject_null_arguments) {
    User u = {1, "a", "b", 1, 1.0, true, {NULL, 0}};
    void *buf = NULL;
    size_t len = 0;
    cr_assert_eq(flash_row_encode(NULL, &User_model, &u, &buf, &len), FLASH_EINVAL);
    cr_assert_eq(flash_row_encode(ctx, NULL, &u, &buf, &len), FLASH_EINVAL);
    cr_assert_eq(flash_row_encode(ctx, &User_model, NULL, &buf, &len), FLASH_EINVAL);
    cr_assert_eq(flash_row_encode(ctx, &User_model, &u, NULL, &len), FLASH_EINVAL);
    cr_assert_eq(flash_row_encode(ctx, &User_model, &u, &buf, NULL), FLASH_EINVAL);
    encode(&User_model, &u, &buf, &len);
    User out;
    cr_assert_eq(flash_row_decode(NULL, &User_model, buf, len, &out), FLASH_EINVAL);
    cr_assert_eq(flash_row_decode(ctx, NULL, buf, len, &out), FLASH_EINVAL);
    cr_assert_eq(flash_row_decode(ctx, &User_model, NULL, len, &out), FLASH_EINVAL);
    cr_assert_eq(flash_row_decode(ctx, &User_model, buf, len, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_row_decode(ctx, &User_model, NULL, 0, &out), FLASH_EPROTO, "no bytes: fields missing");
}

/* ---- corrupt input ---- */

FLASH_TEST(codec, every_truncation_is_eproto) {
    unsigned char all[40];
    for (int i = 0; i < 40; i++) all[i] = (unsigned char)(i * 7);
    const User rows[] = {
        {INT64_MIN, "first name", "user name", INT32_MIN, -1.25, true, {all, sizeof all}},
        {0, NULL, NULL, 0, 0.0, false, {NULL, 0}},
        {300, "", "", 300, 1e300, true, {"", 0}},
    };
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        void *buf;
        size_t len;
        encode(&User_model, &rows[r], &buf, &len);
        for (size_t cut = 0; cut < len; cut++) {
            User out;
            int rc = decode_exact(&User_model, buf, cut, &out);
            cr_assert_eq(rc, FLASH_EPROTO, "row %zu cut at %zu of %zu: got %d", r, cut, len, rc);
        }
    }
}

FLASH_TEST(codec, trailing_bytes_are_eproto) {
    User u = {5, "a", "b", 3, 4.0, true, {"z", 1}};
    void *buf;
    size_t len;
    unsigned char more[256];
    encode(&User_model, &u, &buf, &len);
    cr_assert_lt(len + 3, sizeof more);
    memcpy(more, buf, len);
    more[len] = 0;
    User out;
    cr_assert_eq(decode_exact(&User_model, more, len + 1, &out), FLASH_EPROTO);
    more[len + 1] = 0xff;
    more[len + 2] = 0x01;
    cr_assert_eq(decode_exact(&User_model, more, len + 3, &out), FLASH_EPROTO);
    cr_assert_eq(decode_exact(&User_model, more, len, &out), 0, "the exact prefix still decodes");
}

/* A hand-made User encoding: id, first_name, username, age (as given), score,
   active (as given), avatar. */
static size_t user_bytes(unsigned char *out, const unsigned char *age, size_t age_len, unsigned char active) {
    size_t n = 0;
    out[n++] = 0x02; /* id = 1 (zigzag 2) */
    out[n++] = 0x00; /* first_name NULL */
    out[n++] = 0x02; /* username "x" (length + 1) */
    out[n++] = 'x';
    memcpy(out + n, age, age_len);
    n += age_len;
    memset(out + n, 0, 8); /* score 0.0 */
    n += 8;
    out[n++] = active;
    out[n++] = 0x00; /* avatar NULL */
    return n;
}

FLASH_TEST(codec, hand_made_encoding_matches_the_format) {
    unsigned char b[64];
    const unsigned char age[] = {0x54}; /* zigzag(42) = 84 */
    size_t n = user_bytes(b, age, 1, 1);
    User out;
    cr_assert_eq(decode_exact(&User_model, b, n, &out), 0);
    cr_assert_eq(out.id, 1);
    cr_assert_null(out.first_name);
    cr_assert_str_eq(out.username, "x");
    cr_assert_eq(out.age, 42);
    cr_assert_eq(out.active, true);
    cr_assert_null(out.avatar.data);
    /* And the encoder produces exactly these bytes. */
    void *enc;
    size_t len;
    encode(&User_model, &out, &enc, &len);
    cr_assert_eq(len, n);
    cr_assert_eq(memcmp(enc, b, n), 0);
}

FLASH_TEST(codec, i32_field_with_an_out_of_range_varint_is_eproto) {
    unsigned char b[64];
    User out;
    /* zigzag(INT32_MAX) = 4294967294: fits. */
    const unsigned char max_ok[] = {0xfe, 0xff, 0xff, 0xff, 0x0f};
    size_t n = user_bytes(b, max_ok, sizeof max_ok, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), 0);
    cr_assert_eq(out.age, INT32_MAX);
    /* zigzag(INT32_MIN) = 4294967295: fits. */
    const unsigned char min_ok[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    n = user_bytes(b, min_ok, sizeof min_ok, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), 0);
    cr_assert_eq(out.age, INT32_MIN);
    /* zigzag(2^31) = 2^32. */
    const unsigned char over[] = {0x80, 0x80, 0x80, 0x80, 0x10};
    n = user_bytes(b, over, sizeof over, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), FLASH_EPROTO);
    /* zigzag(-2^31 - 1) = 2^32 + 1. */
    const unsigned char under[] = {0x81, 0x80, 0x80, 0x80, 0x10};
    n = user_bytes(b, under, sizeof under, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), FLASH_EPROTO);
    /* A huge value: zigzag(INT64_MAX). */
    const unsigned char huge[] = {0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    n = user_bytes(b, huge, sizeof huge, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), FLASH_EPROTO);
}

FLASH_TEST(codec, a_bool_byte_other_than_0_or_1_is_eproto) {
    unsigned char b[64];
    const unsigned char age[] = {0x00};
    User out;
    const unsigned char bad[] = {2, 3, 0x7f, 0x80, 0xff};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = user_bytes(b, age, 1, bad[i]);
        cr_assert_eq(decode_exact(&User_model, b, n, &out), FLASH_EPROTO, "bool byte %u", bad[i]);
    }
    size_t n = user_bytes(b, age, 1, 0);
    cr_assert_eq(decode_exact(&User_model, b, n, &out), 0);
    cr_assert_eq(out.active, false);
}

FLASH_TEST(codec, overlong_varints_and_lengths_past_the_end_are_eproto) {
    User out;
    /* id: eleven continuation bytes. */
    unsigned char b[32];
    memset(b, 0x80, 11);
    b[11] = 0x00;
    cr_assert_eq(decode_exact(&User_model, b, 12, &out), FLASH_EPROTO);
    /* first_name claiming 2^63 bytes. */
    const unsigned char longstr[] = {0x02, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 'a'};
    cr_assert_eq(decode_exact(&User_model, longstr, sizeof longstr, &out), FLASH_EPROTO);
    /* first_name claiming UINT64_MAX bytes (length + 1 wraps). */
    const unsigned char maxstr[] = {0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 'a'};
    cr_assert_eq(decode_exact(&User_model, maxstr, sizeof maxstr, &out), FLASH_EPROTO);
    /* first_name one byte longer than what is left. */
    const unsigned char short1[] = {0x02, 0x04, 'a', 'b'};
    cr_assert_eq(decode_exact(&User_model, short1, sizeof short1, &out), FLASH_EPROTO);
}

FLASH_TEST(codec, a_string_field_holding_nul_is_eproto_but_bytes_may) {
    unsigned char b[64];
    size_t n = 0;
    User out;
    b[n++] = 0x02;
    b[n++] = 0x04; /* first_name: 3 bytes with a NUL */
    b[n++] = 'a';
    b[n++] = 0;
    b[n++] = 'b';
    b[n++] = 0x00;
    b[n++] = 0x00;
    memset(b + n, 0, 8);
    n += 8;
    b[n++] = 0;
    b[n++] = 0;
    cr_assert_eq(decode_exact(&User_model, b, n, &out), FLASH_EPROTO);
}

/* Strings are copied 8 bytes a step (the last step overlapping): a NUL at
   any position of a string of any length up to 40 is found, and every
   byte of the others comes back. */
FLASH_TEST(codec, strings_of_every_length_with_a_nul_anywhere) {
    for (size_t len = 0; len <= 40; len++) {
        for (size_t nul = 0; nul <= len; nul++) { /* nul == len: none */
            char str[48];
            User u = {7, NULL, NULL, 3, 0.5, true, {NULL, 0}}, out;
            void *buf = NULL;
            size_t n = 0;
            for (size_t i = 0; i < len; i++) str[i] = (char)('A' + (i * 7 + len) % 58);
            str[len] = 0;
            u.first_name = str;
            u.username = "u";
            encode(&User_model, &u, &buf, &n);
            if (nul < len) { /* the NUL written over the encoded string's byte */
                unsigned char *b = (unsigned char *)buf;
                size_t at = 0;
                for (at = 0; at + len <= n && memcmp(b + at, str, len) != 0; at++) {
                }
                cr_assert(at + len <= n);
                b[at + nul] = 0;
            }
            memset(&out, 0x5a, sizeof out);
            int rc = decode_exact(&User_model, buf, n, &out);
            if (nul < len) {
                cr_assert_eq(rc, FLASH_EPROTO, "length %zu, NUL at %zu", len, nul);
            } else {
                cr_assert_eq(rc, 0, "length %zu", len);
                assert_str_field(out.first_name, str, "first_name");
                assert_str_field(out.username, "u", "username");
            }
            /* BYTES may hold them: the bytes back as they were */
            flash_bytes raw = {str, len};
            char copy[48];
            memcpy(copy, str, len);
            if (nul < len) copy[nul] = 0;
            raw.data = copy;
            u.avatar = raw;
            u.first_name = "f";
            encode(&User_model, &u, &buf, &n);
            memset(&out, 0x5a, sizeof out);
            cr_assert_eq(decode_exact(&User_model, buf, n, &out), 0);
            assert_bytes_field(out.avatar, raw, "avatar");
            cr_assert_eq(((const char *)out.avatar.data)[len], 0, "a NUL after bytes too");
        }
    }
}

/* ---- fuzz ---- */

static uint64_t rng_state;
static uint64_t rng(void) {
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static void touch_user(const User *u) {
    /* Read everything a caller might read; ASan catches bad pointers. */
    volatile size_t sink = 0;
    if (u->first_name) sink += strlen(u->first_name);
    if (u->username) sink += strlen(u->username);
    if (u->avatar.data) {
        const unsigned char *p = (const unsigned char *)u->avatar.data;
        for (size_t i = 0; i < u->avatar.len; i++) sink += p[i];
    } else {
        cr_assert_eq(u->avatar.len, 0);
    }
    (void)sink;
}

FLASH_TEST(codec, fuzz_decode_never_crashes) {
    enum { ITER = 20000 };
    void *seeds[4];
    size_t seed_len[4];
    unsigned char blob[]= {1, 2, 3, 0, 255};
    const User rows[4] = {
        {1, "Ada", "ada", 36, 1.5, true, {blob, sizeof blob}},
        {INT64_MIN, NULL, "", INT32_MAX, -0.0, false, {"", 0}},
        {123456789, "a longer first name to have a length", NULL, -7, 1e-310, true, {NULL, 0}},
        {-1, "", "x", INT32_MIN, 3.0, false, {blob, 1}},
    };
    int ok = 0, proto = 0, other = 0;
    rng_state = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 4; i++) {
        void *b;
        encode(&User_model, &rows[i], &b, &seed_len[i]);
        seeds[i] = malloc(seed_len[i]);
        memcpy(seeds[i], b, seed_len[i]);
    }
    flash_ctx_reset(ctx);
    for (int it = 0; it < ITER; it++) {
        unsigned char buf[160];
        size_t len;
        uint64_t mode = rng() % 4;
        if (mode == 0) {
            len = (size_t)(rng() % 64);
            for (size_t k = 0; k < len; k++) buf[k] = (unsigned char)rng();
        } else {
            int s = (int)(rng() % 4);
            int edits = 1 + (int)(rng() % 4);
            len = seed_len[s];
            memcpy(buf, seeds[s], len);
            for (int e = 0; e < edits; e++) {
                uint64_t kind = rng() % 5;
                if (kind == 0 && len) { /* flip bits */
                    buf[rng() % len] ^= (unsigned char)(1u << (rng() % 8));
                } else if (kind == 1 && len) { /* random byte */
                    buf[rng() % len] = (unsigned char)rng();
                } else if (kind == 2 && len) { /* truncate */
                    len = (size_t)(rng() % len);
                } else if (kind == 3 && len + 1 < sizeof buf) { /* insert a byte */
                    size_t at = (size_t)(rng() % (len + 1));
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = (unsigned char)rng();
                    len++;
                } else if (len) { /* delete a byte */
                    size_t at = (size_t)(rng() % len);
                    memmove(buf + at, buf + at + 1, len - at - 1);
                    len--;
                }
            }
        }
        User out;
        int rc = decode_exact(&User_model, buf, len, &out);
        if (rc == 0) {
            ok++;
            touch_user(&out);
            /* What decoded re-encodes and decodes to the same row. */
            void *re;
            size_t relen;
            User again;
            encode(&User_model, &out, &re, &relen);
            cr_assert_leq(relen, len, "iteration %d: the canonical encoding is never longer", it);
            cr_assert_eq(decode_exact(&User_model, re, relen, &again), 0, "iteration %d", it);
            assert_users_equal(&again, &out);
        } else if (rc == FLASH_EPROTO) {
            proto++;
        } else {
            other++;
        }
        cr_assert_leq(rc, 0);
        if (it % 512 == 0) flash_ctx_reset(ctx);
    }
    for (int i = 0; i < 4; i++) free(seeds[i]);
    cr_assert_eq(other, 0, "only 0 or FLASH_EPROTO expected, %d others", other);
    cr_assert_gt(proto, ITER / 2, "most random inputs are corrupt");
    cr_assert_gt(ok, 0, "some mutations stay valid");
}

/* ---- copies ---- */

FLASH_TEST(codec, row_copy_is_deep) {
    char first[] = "Grace", user[] = "grace";
    unsigned char av[] = {9, 8, 7};
    User u = {3, first, user, 85, 7.25, true, {av, sizeof av}};
    User *c = flash_row_copy(ctx, &User_model, &u);
    cr_assert_not_null(c);
    cr_assert_neq(c, &u);
    cr_assert_neq((const void *)c->first_name, (const void *)first);
    cr_assert_neq((const void *)c->username, (const void *)user);
    cr_assert_neq(c->avatar.data, (const void *)av);
    first[0] = 'X';
    user[0] = 'X';
    av[0] = 0;
    u.id = 99;
    u.age = 1;
    cr_assert_eq(c->id, 3);
    cr_assert_str_eq(c->first_name, "Grace");
    cr_assert_str_eq(c->username, "grace");
    cr_assert_eq(c->age, 85);
    cr_assert_eq(c->score, 7.25);
    cr_assert_eq(c->active, true);
    cr_assert_eq(c->avatar.len, 3);
    cr_assert_eq(memcmp(c->avatar.data, "\x09\x08\x07", 3), 0);
}

FLASH_TEST(codec, row_copy_keeps_nulls_and_empty_bytes) {
    User u = {4, NULL, "", 0, 0.0, false, {"", 0}};
    User *c = flash_row_copy(ctx, &User_model, &u);
    cr_assert_not_null(c);
    cr_assert_null(c->first_name);
    cr_assert_str_eq(c->username, "");
    cr_assert_not_null(c->avatar.data, "empty bytes stay non-NULL");
    cr_assert_eq(c->avatar.len, 0);
    User v = {5, "a", "b", 0, 0.0, false, {NULL, 0}};
    c = flash_row_copy(ctx, &User_model, &v);
    cr_assert_null(c->avatar.data);
    cr_assert_null(flash_row_copy(NULL, &User_model, &v));
    cr_assert_null(flash_row_copy(ctx, NULL, &v));
    cr_assert_null(flash_row_copy(ctx, &User_model, NULL));
}

/* ---- cache keys ---- */

static const char *key_of(const flash_class *c, const flash_value *v, size_t n, bool *hashed) {
    char *key = NULL;
    size_t len = 0;
    bool h = true;
    int rc = flash_cache_key(ctx, c, v, n, &key, &len, &h);
    cr_assert_eq(rc, 0, "flash_cache_key: %d", rc);
    cr_assert_not_null(key);
    cr_assert_eq(strlen(key), len, "key is NUL-terminated at its length");
    if (hashed) *hashed = h;
    else cr_assert(!h);
    return key;
}

static const char *key1(const flash_class *c, flash_value v) { return key_of(c, &v, 1, NULL); }

FLASH_TEST(codec, keys_of_integers) {
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_i64(42)), "flash:User.id:v1:42");
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_i64(-7)), "flash:User.id:v1:-7");
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_i64(0)), "flash:User.id:v1:0");
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_i64(INT64_MIN)), "flash:User.id:v1:-9223372036854775808");
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_i64(INT64_MAX)), "flash:User.id:v1:9223372036854775807");
    cr_assert_str_eq(key1(&CodecKey__get_by_i, flash_v_i32(INT32_MIN)), "flash:CodecKey.i:v1:-2147483648");
    cr_assert_str_eq(key1(&CodecKey__get_by_i, flash_v_i32(-3)), "flash:CodecKey.i:v1:-3");
    cr_assert_str_eq(key1(&CodecKeyV7_class, flash_v_i64(5)), "flash:CodecKeyV7:v7:5", "named class, version 7");
    cr_assert_str_eq(key1(&EventCacheOnTitle_class, flash_v_str("t")), "flash:EventCacheOnTitle:v3:t");
}

FLASH_TEST(codec, keys_of_doubles_and_bools) {
    cr_assert_str_eq(key1(&CodecKey__get_by_f, flash_v_f64(1.5)), "flash:CodecKey.f:v1:1.5");
    cr_assert_str_eq(key1(&CodecKey__get_by_f, flash_v_f64(-0.25)), "flash:CodecKey.f:v1:-0.25");
    cr_assert_str_eq(key1(&CodecKey__get_by_f, flash_v_f64(0.0)), "flash:CodecKey.f:v1:0");
    cr_assert_str_eq(key1(&CodecKey__get_by_f, flash_v_f64(0.1)), "flash:CodecKey.f:v1:0.10000000000000001",
                     "17 significant digits: round-trippable");
    cr_assert_str_eq(key1(&CodecKey__get_by_f, flash_v_f64(1e300)), "flash:CodecKey.f:v1:1.0000000000000001e%2B300");
    /* Distinct doubles give distinct keys. */
    double a = 1.0, b = nextafter(1.0, 2.0);
    cr_assert_str_neq(key1(&CodecKey__get_by_f, flash_v_f64(a)), key1(&CodecKey__get_by_f, flash_v_f64(b)));
    cr_assert_str_eq(key1(&CodecKey__get_by_b, flash_v_bool(true)), "flash:CodecKey.b:v1:1");
    cr_assert_str_eq(key1(&CodecKey__get_by_b, flash_v_bool(false)), "flash:CodecKey.b:v1:0");
}

FLASH_TEST(codec, keys_of_strings_null_and_empty) {
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("ada")), "flash:User.username:v1:ada");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str(NULL)), "flash:User.username:v1:%N");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_null(FLASH_STR)), "flash:User.username:v1:%N");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("")), "flash:User.username:v1:");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("%N")), "flash:User.username:v1:%25N",
                     "data never collides with NULL");
    cr_assert_str_eq(key1(&User__get_by_id, flash_v_null(FLASH_I64)), "flash:User.id:v1:%N");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_strn("abcdef", 3)), "flash:User.username:v1:abc");
}

FLASH_TEST(codec, keys_escape_everything_but_safe_characters) {
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("a:b")), "flash:User.username:v1:a%3Ab");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("100%")), "flash:User.username:v1:100%25");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("a b")), "flash:User.username:v1:a%20b");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("a\nb")), "flash:User.username:v1:a%0Ab");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("Zo\xc3\xab")), "flash:User.username:v1:Zo%C3%AB");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("\xe2\x9c\x93")), "flash:User.username:v1:%E2%9C%93");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("A-z_0.9")), "flash:User.username:v1:A-z_0.9");
    cr_assert_str_eq(key1(&User__get_by_username, flash_v_str("\x7f/\\~")), "flash:User.username:v1:%7F%2F%5C%7E");
    /* Bytes keys: every byte value, NUL included. */
    flash_bytes raw = {"\x00\xff:a", 4};
    cr_assert_str_eq(key1(&CodecKey__get_by_raw, flash_v_bytes(raw)), "flash:CodecKey.raw:v1:%00%FF%3Aa");
    flash_bytes empty = {"", 0}, none = {NULL, 0};
    cr_assert_str_eq(key1(&CodecKey__get_by_raw, flash_v_bytes(empty)), "flash:CodecKey.raw:v1:");
    cr_assert_str_eq(key1(&CodecKey__get_by_raw, flash_v_bytes(none)), "flash:CodecKey.raw:v1:%N");
    /* Every escaped key is a valid memcached key. */
    for (int half = 0; half < 2; half++) {
        char all[65];
        for (int i = 0; i < 64; i++) all[i] = (char)(half * 64 + i + 1 > 127 ? 'x' : half * 64 + i + 1);
        all[64] = 0;
        const char *k = key1(&User__get_by_username, flash_v_str(all));
        for (const char *p = k; *p; p++) cr_assert((unsigned char)*p > ' ' && (unsigned char)*p < 0x7f);
    }
}

FLASH_TEST(codec, multi_field_keys_are_joined_with_colons) {
    flash_value v[4] = {flash_v_i64(3), flash_v_f64(-0.25), flash_v_bool(true), flash_v_str("a:b")};
    cr_assert_str_eq(key_of(&CodecKey__get_by_id_f_b_s, v, 4, NULL), "flash:CodecKey.id.f.b.s:v1:3:-0.25:1:a%3Ab");
    flash_value p[2] = {flash_v_i64(3), flash_v_i64(7)};
    cr_assert_str_eq(key_of(&Participant__get_by_user_event, p, 2, NULL), "flash:Participant.user.event:v1:3:7");
    flash_value q[4] = {flash_v_null(FLASH_I64), flash_v_f64(0.0), flash_v_bool(false), flash_v_str(NULL)};
    cr_assert_str_eq(key_of(&CodecKey__get_by_id_f_b_s, q, 4, NULL), "flash:CodecKey.id.f.b.s:v1:%N:0:0:%N");
}

FLASH_TEST(codec, long_keys_are_hashed) {
    const char *head = "flash:User.username:v1:";
    size_t hl = strlen(head);
    char val[400];
    bool hashed = true;
    /* Exactly 250 bytes: kept as is. */
    memset(val, 'a', 250 - hl);
    val[250 - hl] = 0;
    const char *k = key_of(&User__get_by_username, (flash_value[]){flash_v_str(val)}, 1, &hashed);
    cr_assert(!hashed);
    cr_assert_eq(strlen(k), 250);
    cr_assert_eq(strncmp(k, head, hl), 0);
    /* 251 bytes: hashed. */
    memset(val, 'a', 251 - hl);
    val[251 - hl] = 0;
    k = key_of(&User__get_by_username, (flash_value[]){flash_v_str(val)}, 1, &hashed);
    cr_assert(hashed);
    cr_assert_eq(strlen(k), hl + 1 + 32, "prefix:Class:vN:#<32 hex>, got %s", k);
    cr_assert_eq(strncmp(k, head, hl), 0);
    cr_assert_eq(k[hl], '#');
    for (size_t i = hl + 1; i < hl + 33; i++)
        cr_assert((k[i] >= '0' && k[i] <= '9') || (k[i] >= 'a' && k[i] <= 'f'), "hex digit at %zu: %c", i, k[i]);
    /* Deterministic, also across contexts. */
    char first[64];
    snprintf(first, sizeof first, "%s", k);
    cr_assert_str_eq(key_of(&User__get_by_username, (flash_value[]){flash_v_str(val)}, 1, &hashed),
                     first);
    flash_ctx *other = flash_ctx_create(NULL);
    char *ok = NULL;
    size_t olen = 0;
    flash_value ov = flash_v_str(val);
    cr_assert_eq(flash_cache_key(other, &User__get_by_username, &ov, 1, &ok, &olen, NULL), 0);
    cr_assert_str_eq(ok, first);
    flash_ctx_destroy(other);
    /* The escaped length counts: 76 spaces escape to 228 bytes. */
    memset(val, ' ', 76);
    val[76] = 0;
    k = key_of(&User__get_by_username, (flash_value[]){flash_v_str(val)}, 1, &hashed);
    cr_assert(hashed, "23 + 3 * 76 = 251 bytes once escaped");
    memset(val, ' ', 75);
    val[75] = 0;
    k = key_of(&User__get_by_username, (flash_value[]){flash_v_str(val)}, 1, &hashed);
    cr_assert(!hashed);
    cr_assert_eq(strlen(k), hl + 225);
}

FLASH_TEST(codec, different_long_values_give_different_hashed_keys) {
    enum { N = 2000 };
    static char keys[N][64];
    char val[300];
    memset(val, 'v', 290);
    val[290] = 0;
    for (int i = 0; i < N; i++) {
        bool hashed = false;
        /* Differ in one position, in the middle or at the end. */
        char digits[16];
        snprintf(digits, sizeof digits, "%05u", (unsigned)i % 100000u);
        memcpy(val + (i % 2 ? 100 : 280), digits, 5);
        flash_value v = flash_v_str(val);
        const char *k = key_of(&User__get_by_username, &v, 1, &hashed);
        cr_assert(hashed);
        snprintf(keys[i], sizeof keys[i], "%s", k);
        memset(val, 'v', 290);
        if (i % 64 == 0) flash_ctx_reset(ctx);
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < i; j++) cr_assert_str_neq(keys[i], keys[j], "values %d and %d share a hashed key", i, j);
}

/* Integer keys take a path of their own once the class's key head is
   cached (the first key of a class in a context builds it): the same bytes
   either way, for every digit count, both signs and several fields. */
FLASH_TEST(codec, integer_keys_are_the_same_before_and_after_the_head_is_cached) {
    static const int64_t vals[] = {0, 1, -1, 9, 10, -10, 99, 100, 999, 1000, 12345, -12345, 99999999,
                                   100000000, 4294967296ll, 999999999999999999ll, 1000000000000000000ll,
                                   INT64_MAX, INT64_MIN, INT64_MIN + 1};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        for (size_t j = 0; j < sizeof vals / sizeof vals[0]; j += 3) {
            char want[128];
            flash_value p[2] = {flash_v_i64(vals[i]), flash_v_i64(vals[j])};
            snprintf(want, sizeof want, "flash:Participant.user.event:v1:%lld:%lld", (long long)vals[i],
                     (long long)vals[j]);
            flash_ctx *fresh = flash_ctx_create(NULL);
            char *k1 = NULL, *k2 = NULL;
            size_t l1 = 0, l2 = 0;
            cr_assert(fresh);
            cr_assert_eq(flash_cache_key(fresh, &Participant__get_by_user_event, p, 2, &k1, &l1, NULL), 0);
            cr_assert_eq(flash_cache_key(fresh, &Participant__get_by_user_event, p, 2, &k2, &l2, NULL), 0);
            cr_assert_str_eq(k1, want);
            cr_assert_str_eq(k2, want, "cached head");
            cr_assert(l1 == strlen(want) && l2 == l1);
            flash_ctx_destroy(fresh);
        }
        int32_t i32 = (int32_t)(vals[i] % 2147483648ll);
        char want32[64];
        snprintf(want32, sizeof want32, "flash:CodecKey.i:v1:%ld", (long)i32);
        cr_assert_str_eq(key1(&CodecKey__get_by_i, flash_v_i32(i32)), want32);
    }
}

/* An integer key over 250 bytes (a long prefix, two 20-byte values) is
   hashed, whether the class's head was cached or not, and the two agree. */
FLASH_TEST(codec, long_integer_keys_are_hashed_on_either_path) {
    flash_desc d;
    char prefix[260];
    memset(prefix, 'p', 188); /* head 215 bytes: 256 with the values, 248 hashed */
    prefix[188] = 0;
    memset(&d, 0, sizeof d);
    d.key_prefix = prefix;
    flash_value small[2] = {flash_v_i64(5), flash_v_i64(6)}, big[2] = {flash_v_i64(INT64_MIN), flash_v_i64(INT64_MIN)};
    static char seen[2][300];
    for (int first = 0; first < 2; first++) {
        flash_ctx *c = flash_ctx_create(&d);
        char *k = NULL, *kb = NULL;
        size_t len = 0, lenb = 0;
        bool hashed = true, hashedb = false;
        cr_assert(c);
        /* first == 0: the long key builds the head; 1: a short key did */
        if (first) cr_assert_eq(flash_cache_key(c, &Participant__get_by_user_event, small, 2, &k, &len, &hashed), 0);
        cr_assert_eq(flash_cache_key(c, &Participant__get_by_user_event, big, 2, &kb, &lenb, &hashedb), 0);
        cr_assert(hashedb, "a 256-byte key is hashed");
        cr_assert_eq(lenb, 248);
        cr_assert_eq(strlen(kb), lenb);
        cr_assert_eq(strncmp(kb, prefix, 188), 0);
        if (first) {
            cr_assert(!hashed && strlen(k) == len && len == 218);
            cr_assert_eq(strcmp(k + 188, ":Participant.user.event:v1:5:6"), 0);
        }
        snprintf(seen[first], sizeof seen[first], "%s", kb);
        flash_ctx_destroy(c);
    }
    cr_assert_str_eq(seen[0], seen[1]);
}

FLASH_TEST(codec, a_custom_prefix_is_escaped) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.key_prefix = "my app:v2";
    flash_ctx *c = flash_ctx_create(&d);
    char *k = NULL;
    size_t len = 0;
    flash_value v = flash_v_i64(5);
    cr_assert_eq(flash_cache_key(c, &User__get_by_id, &v, 1, &k, &len, NULL), 0);
    cr_expect_str_eq(k, "my%20app%3Av2:User.id:v1:5");
    flash_ctx_destroy(c);
}

FLASH_TEST(codec, a_prefix_too_long_for_a_hashed_key_is_etoolarge) {
    flash_desc d;
    char prefix[260];
    memset(prefix, 'p', 240);
    prefix[240] = 0;
    memset(&d, 0, sizeof d);
    d.key_prefix = prefix;
    flash_ctx *c = flash_ctx_create(&d);
    char *k = NULL;
    size_t len = 0;
    flash_value v = flash_v_i64(5);
    int rc = flash_cache_key(c, &User__get_by_id, &v, 1, &k, &len, NULL);
    flash_ctx_destroy(c);
    cr_assert_eq(rc, FLASH_ETOOLARGE);
}

FLASH_TEST(codec, bad_key_values_are_einval) {
    char *k;
    size_t len;
    flash_value v = flash_v_i32(5); /* User.id is I64 */
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, &v, 1, &k, &len, NULL), FLASH_EINVAL);
    flash_value two[2] = {flash_v_i64(1), flash_v_i64(2)};
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, two, 2, &k, &len, NULL), FLASH_EINVAL, "arity");
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, two, 0, &k, &len, NULL), FLASH_EINVAL, "arity");
    flash_value nul = flash_v_strn("a\0b", 3);
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_username, &nul, 1, &k, &len, NULL), FLASH_EINVAL, "NUL in STR");
    flash_value bad8 = flash_v_str("\xff\xfe");
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_username, &bad8, 1, &k, &len, NULL), FLASH_EINVAL, "bad UTF-8");
    flash_value surrogate = flash_v_str("\xed\xa0\x80");
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_username, &surrogate, 1, &k, &len, NULL), FLASH_EINVAL);
    flash_value overlong = flash_v_str("\xc0\xaf");
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_username, &overlong, 1, &k, &len, NULL), FLASH_EINVAL);
    flash_bytes nodata = {NULL, 3};
    flash_value nb = flash_v_bytes(nodata); /* NULL data means SQL NULL whatever the length */
    cr_assert_eq(flash_cache_key(ctx, &CodecKey__get_by_raw, &nb, 1, &k, &len, NULL), 0);
    cr_assert_str_eq(k, "flash:CodecKey.raw:v1:%N");
    flash_value ok = flash_v_i64(1);
    cr_assert_eq(flash_cache_key(NULL, &User__get_by_id, &ok, 1, &k, &len, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_cache_key(ctx, NULL, &ok, 1, &k, &len, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, &ok, 1, NULL, &len, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, &ok, 1, &k, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, NULL, 1, &k, &len, NULL), FLASH_EINVAL);
}

FLASH_TEST(codec, a_class_copy_from_another_file_gives_the_same_key) {
    flash_value v = flash_v_i64(77);
    char *a, *b;
    size_t la, lb;
    cr_assert_eq(flash_cache_key(ctx, &User__get_by_id, &v, 1, &a, &la, NULL), 0);
    cr_assert_eq(flash_cache_key(ctx, other_tu_user_by_id(), &v, 1, &b, &lb, NULL), 0);
    cr_assert_str_eq(a, b);
}

/* ---- values ---- */

FLASH_TEST(codec, value_constructors) {
    flash_value v = flash_v_i64(INT64_MIN);
    cr_assert_eq(v.type, FLASH_I64);
    cr_assert(!v.is_null);
    cr_assert_eq(v.u.i64, INT64_MIN);
    v = flash_v_i32(-5);
    cr_assert_eq(v.type, FLASH_I32);
    cr_assert_eq(v.u.i32, -5);
    v = flash_v_f64(2.5);
    cr_assert_eq(v.type, FLASH_F64);
    cr_assert_eq(v.u.f64, 2.5);
    v = flash_v_bool(true);
    cr_assert_eq(v.type, FLASH_BOOL);
    cr_assert_eq(v.u.b, true);
    const char *s = "hello";
    v = flash_v_str(s);
    cr_assert_eq(v.type, FLASH_STR);
    cr_assert(!v.is_null);
    cr_assert_eq(v.u.s.ptr, s);
    cr_assert_eq(v.u.s.len, 5);
    v = flash_v_str(NULL);
    cr_assert_eq(v.type, FLASH_STR);
    cr_assert(v.is_null);
    cr_assert_eq(v.u.s.len, 0);
    v = flash_v_strn(s, 2);
    cr_assert_eq(v.u.s.len, 2);
    v = flash_v_strn(NULL, 9);
    cr_assert(v.is_null);
    cr_assert_eq(v.u.s.len, 0);
    flash_bytes b = {"\0\1", 2};
    v = flash_v_bytes(b);
    cr_assert_eq(v.type, FLASH_BYTES);
    cr_assert(!v.is_null);
    cr_assert_eq(v.u.s.len, 2);
    flash_bytes e = {"", 0};
    v = flash_v_bytes(e);
    cr_assert(!v.is_null, "empty bytes are not NULL");
    flash_bytes n = {NULL, 0};
    v = flash_v_bytes(n);
    cr_assert(v.is_null);
    for (int t = FLASH_I64; t <= FLASH_BYTES; t++) {
        v = flash_v_null((flash_type)t);
        cr_assert_eq(v.type, (flash_type)t);
        cr_assert(v.is_null);
    }
    /* flash_v picks by C type. */
    int64_t i64 = 1;
    int32_t i32 = 2;
    double d = 3.0;
    bool bo = true;
    char *mut = (char *)"m";
    cr_assert_eq(flash_v(i64).type, FLASH_I64);
    cr_assert_eq(flash_v(i32).type, FLASH_I32);
    cr_assert_eq(flash_v(d).type, FLASH_F64);
    cr_assert_eq(flash_v(bo).type, FLASH_BOOL);
    cr_assert_eq(flash_v(s).type, FLASH_STR);
    cr_assert_eq(flash_v(mut).type, FLASH_STR);
    cr_assert_eq(flash_v(b).type, FLASH_BYTES);
}

static bool eq(flash_value a, flash_value b) { return flash_value_eq(&a, &b); }

FLASH_TEST(codec, value_equality) {
    cr_assert(eq(flash_v_i64(5), flash_v_i64(5)));
    cr_assert(!eq(flash_v_i64(5), flash_v_i64(6)));
    cr_assert(!eq(flash_v_i64(5), flash_v_i32(5)), "types must match");
    cr_assert(eq(flash_v_i32(-1), flash_v_i32(-1)));
    cr_assert(eq(flash_v_f64(1.5), flash_v_f64(1.5)));
    cr_assert(eq(flash_v_f64(0.0), flash_v_f64(-0.0)), "0.0 == -0.0 as numbers");
    cr_assert(!eq(flash_v_f64(1.0), flash_v_f64(nextafter(1.0, 2.0))));
    cr_assert(eq(flash_v_bool(true), flash_v_bool(true)));
    cr_assert(!eq(flash_v_bool(true), flash_v_bool(false)));
    /* Strings compare by content, not pointer. */
    char a[] = "abc", b[] = "abc";
    cr_assert(eq(flash_v_str(a), flash_v_str(b)));
    cr_assert(!eq(flash_v_str("abc"), flash_v_str("abd")));
    cr_assert(!eq(flash_v_str("abc"), flash_v_str("ab")));
    cr_assert(eq(flash_v_strn("abcX", 3), flash_v_str("abc")));
    cr_assert(eq(flash_v_str(""), flash_v_str("")));
    /* NULLs: equal to NULLs of the same type only. */
    cr_assert(eq(flash_v_str(NULL), flash_v_null(FLASH_STR)));
    cr_assert(!eq(flash_v_str(NULL), flash_v_str("")), "NULL is not the empty string");
    cr_assert(!eq(flash_v_null(FLASH_I64), flash_v_i64(0)));
    cr_assert(!eq(flash_v_null(FLASH_I64), flash_v_null(FLASH_I32)));
    cr_assert(eq(flash_v_null(FLASH_I64), flash_v_null(FLASH_I64)));
    /* Bytes. */
    flash_bytes x = {"\0a", 2}, y = {"\0a", 2}, z = {"\0b", 2}, e = {"", 0}, n = {NULL, 0};
    cr_assert(eq(flash_v_bytes(x), flash_v_bytes(y)));
    cr_assert(!eq(flash_v_bytes(x), flash_v_bytes(z)), "compared past a NUL");
    cr_assert(!eq(flash_v_bytes(e), flash_v_bytes(n)), "empty bytes are not NULL");
    cr_assert(!eq(flash_v_bytes((flash_bytes){"ab", 2}), flash_v_str("ab")), "BYTES vs STR");
    flash_value v = flash_v_i64(1);
    cr_assert(!flash_value_eq(NULL, &v));
    cr_assert(!flash_value_eq(&v, NULL));
}

FLASH_TEST(codec, row_value_reads_each_field) {
    User u = {11, "F", NULL, -4, 0.5, true, {"\1", 1}};
    int f = flash_model_field(&User_model, "id");
    flash_value v = flash_row_value(&User_model, &u, f);
    cr_assert(eq(v, flash_v_i64(11)));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "first_name")), flash_v_str("F")));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "username")), flash_v_str(NULL)));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "age")), flash_v_i32(-4)));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "score")), flash_v_f64(0.5)));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "active")), flash_v_bool(true)));
    cr_assert(eq(flash_row_value(&User_model, &u, flash_model_field(&User_model, "avatar")),
                 flash_v_bytes((flash_bytes){"\1", 1})));
    v = flash_row_value(&User_model, &u, 99);
    cr_assert_eq((int)v.type, 0, "out of range: a zero value");
    v = flash_row_value(&User_model, &u, -1);
    cr_assert_eq((int)v.type, 0);
}

/* ---- registry ---- */

FLASH_TEST(codec, model_find_and_field) {
    flash_model *m = flash_model_find("User");
    cr_assert_not_null(m);
    cr_assert_eq(m, User_model.canonical);
    cr_assert_eq(m, other_tu_user_model()->canonical);
    cr_assert_str_eq(m->name, "User");
    cr_assert_eq(m->nfields, 7);
    cr_assert_eq(m->size, sizeof(User));
    cr_assert_eq(flash_model_find("CodecKey"), CodecKey_model.canonical);
    cr_assert_null(flash_model_find("NoSuchModel"));
    cr_assert_null(flash_model_find("user"), "names are case-sensitive");
    cr_assert_null(flash_model_find(NULL));
    cr_assert_eq(flash_model_field(&User_model, "id"), 0);
    cr_assert_eq(flash_model_field(&User_model, "first_name"), 1);
    cr_assert_eq(flash_model_field(&User_model, "avatar"), 6);
    cr_assert_eq(flash_model_field(&User_model, "nope"), -1);
    cr_assert_eq(flash_model_field(&User_model, NULL), -1);
    cr_assert_eq(flash_model_field(NULL, "id"), -1);
    cr_assert_eq(m->fields[3].type, FLASH_I32);
    cr_assert_eq(m->fields[6].type, FLASH_BYTES);
    cr_assert_eq(m->fields[4].offset, offsetof(User, score));
    /* Defaults filled in at registration. */
    cr_assert_str_eq(m->opts.table, "User");
    cr_assert_eq(m->opts.version, 1);
    cr_assert_eq(m->opts.pk, 0);
    /* Every model of this binary is on the list. */
    bool seen_user = false, seen_codec = false;
    for (flash_model *it = flash_models(); it; it = it->next) {
        if (it == m) seen_user = true;
        if (it == CodecKey_model.canonical) seen_codec = true;
    }
    cr_assert(seen_user && seen_codec);
}
