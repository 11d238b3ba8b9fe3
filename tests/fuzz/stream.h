/* tests/fuzz/stream.h — the shared driver of the reply-parser harnesses
   (fuzz_memcached.c, fuzz_redis.c).

   A harness's input is a reply stream the way a backend reads it off a
   socket, plus how it is cut into reads:

     byte 0        max_value choice (see stream_max_values[])
     byte 1        c = byte % 16: how many chunk-size bytes follow
     c bytes       chunk sizes (each byte + 1), used in turn; none: 1-byte reads
     the rest      the bytes the "server" sends

   The stream is consumed twice with a backend's read loop (parse at the
   front, drop what a reply took, skip an oversized value and check its
   "\r\n"): once fed in the chosen chunks, each parse seeing a buffer of
   exactly the bytes received so far (so any read past them is an ASan
   error), and once whole. Both must produce the same replies, the same
   final outcome (garbage or not) and leave the same bytes unparsed.

   A harness supplies one function: parse one reply at the start of buf
   (exactly len bytes), check that reply's own invariants, and describe it
   position-independently in *ev (ev->skip_len: bytes of an oversized value
   that follow, "\r\n" included, to be dropped). It returns what the parser
   returned: > 0 bytes taken, 0 for "need more", FLASH_EPROTO for garbage. */
#ifndef FLASH_FUZZ_STREAM_H
#define FLASH_FUZZ_STREAM_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_CHECK(c)                                                                          \
    do {                                                                                         \
        if (!(c)) {                                                                              \
            fprintf(stderr, "fuzz: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__);        \
            abort();                                                                             \
        }                                                                                        \
    } while (0)

static const size_t stream_max_values[8] = {(size_t)1 << 20, 0, 1, 2, 3, 5, 10, 64};

/* One parsed reply, position-independent (compared with memcmp: zero it). */
typedef struct stream_event {
    int kind;
    uint64_t a, b, c;   /* the parser's numbers (opaque, flags, cas, integer...) */
    uint32_t bits;      /* its booleans */
    size_t len, taken;
    size_t skip_len;    /* > 0: an oversized value follows, to drop */
    uint64_t digest;    /* FNV-1a of the value or message bytes */
} stream_event;

typedef ptrdiff_t (*stream_parse_fn)(const char *buf, size_t len, size_t max_value, stream_event *ev);

static uint64_t stream_fnv(const char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 0x100000001b3ull;
    return h;
}

typedef struct stream_run {
    stream_event *ev;
    size_t nev, cap;
    int outcome;     /* 0, or FLASH_EPROTO (garbage seen: the connection would reset) */
    size_t leftover; /* bytes received but not consumed when the stream ended */
    size_t skipping; /* bytes of an oversized value still to drop at the end */
} stream_run;

static void stream_push(stream_run *r, const stream_event *e, size_t taken) {
    if (r->nev == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->ev = (stream_event *)realloc(r->ev, r->cap * sizeof *r->ev);
        STREAM_CHECK(r->ev);
    }
    r->ev[r->nev] = *e;
    r->ev[r->nev++].taken = taken;
}

/* Parse buf[off..n) as far as it goes (n: what has arrived), dropping
   oversized values; sets r->outcome on garbage. Returns the new offset. */
static size_t stream_consume(stream_run *r, stream_parse_fn parse, const char *buf, size_t off, size_t n,
                             size_t max_value, bool exact_views) {
    for (;;) {
        while (r->skipping && off < n) { /* its last two bytes are "\r\n" */
            if ((r->skipping == 2 && buf[off] != '\r') || (r->skipping == 1 && buf[off] != '\n')) {
                r->outcome = FLASH_EPROTO;
                return off;
            }
            if (r->skipping > 2) {
                size_t take = n - off < r->skipping - 2 ? n - off : r->skipping - 2;
                off += take;
                r->skipping -= take;
            } else {
                off++;
                r->skipping--;
            }
        }
        if (r->skipping || off == n) return off;
        /* The parser sees exactly the unconsumed bytes: an exact-size copy,
           so that reading one byte past them is caught. */
        size_t avail = n - off;
        char *view = exact_views ? (char *)malloc(avail) : NULL;
        if (exact_views) {
            STREAM_CHECK(view);
            memcpy(view, buf + off, avail);
        }
        stream_event e;
        memset(&e, 0, sizeof e);
        ptrdiff_t k = parse(view ? view : buf + off, avail, max_value, &e);
        free(view);
        STREAM_CHECK(k == 0 || k == FLASH_EPROTO || (k > 0 && (size_t)k <= avail));
        if (k == 0) return off;
        if (k < 0) {
            r->outcome = FLASH_EPROTO;
            return off;
        }
        stream_push(r, &e, (size_t)k);
        off += (size_t)k;
        r->skipping = e.skip_len;
    }
}

/* In chunks: each read appends to an exact-size buffer of what is unparsed. */
static void stream_feed(stream_run *r, stream_parse_fn parse, const uint8_t *stream, size_t n,
                        const uint8_t *chunks, size_t nchunks, size_t max_value) {
    char *acc = (char *)malloc(1);
    size_t len = 0, pos = 0, k = 0;
    STREAM_CHECK(acc);
    while (pos < n && !r->outcome) {
        size_t step = nchunks ? (size_t)chunks[k++ % nchunks] + 1 : 1;
        if (step > n - pos) step = n - pos;
        char *grown = (char *)malloc(len + step);
        STREAM_CHECK(grown);
        if (len) memcpy(grown, acc, len);
        memcpy(grown + len, stream + pos, step);
        free(acc);
        acc = grown;
        len += step;
        pos += step;
        size_t off = stream_consume(r, parse, acc, 0, len, max_value, true);
        char *rest = (char *)malloc(len - off ? len - off : 1);
        STREAM_CHECK(rest);
        if (len - off) memcpy(rest, acc + off, len - off);
        free(acc);
        acc = rest;
        len -= off;
    }
    r->leftover = r->outcome ? 0 : len;
    free(acc);
}

/* The whole harness: chunked and whole parses agree. */
static int stream_fuzz(const uint8_t *data, size_t size, stream_parse_fn parse) {
    if (size < 2) return 0;
    size_t max_value = stream_max_values[data[0] % 8];
    size_t nchunks = data[1] % 16;
    if (2 + nchunks > size) return 0;
    const uint8_t *chunks = data + 2;
    const uint8_t *stream = data + 2 + nchunks;
    size_t n = size - 2 - nchunks;

    stream_run inc, whole;
    memset(&inc, 0, sizeof inc);
    memset(&whole, 0, sizeof whole);
    stream_feed(&inc, parse, stream, n, chunks, nchunks, max_value);
    /* Whole: one read of everything, parsed in place (libFuzzer's copy of
       the input is exact-size too). */
    size_t off = stream_consume(&whole, parse, (const char *)stream, 0, n, max_value, false);
    whole.leftover = whole.outcome ? 0 : n - off;

    STREAM_CHECK(inc.outcome == whole.outcome);
    STREAM_CHECK(inc.nev == whole.nev);
    for (size_t i = 0; i < inc.nev; i++) STREAM_CHECK(memcmp(&inc.ev[i], &whole.ev[i], sizeof inc.ev[i]) == 0);
    STREAM_CHECK(inc.leftover == whole.leftover);
    STREAM_CHECK(inc.outcome || inc.skipping == whole.skipping);
    free(inc.ev);
    free(whole.ev);
    return 0;
}

#endif
