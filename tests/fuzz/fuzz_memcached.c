/* tests/fuzz/fuzz_memcached.c — libFuzzer harness for flash_memcached_parse.

   The input is a reply stream the way the memcached backend reads it off a
   socket, plus how it is cut into reads:

     byte 0        max_value choice (see max_values[])
     byte 1        c = byte % 16: how many chunk-size bytes follow
     c bytes       chunk sizes (each byte + 1), used in turn; none: 1-byte reads
     the rest      the bytes the "server" sends

   The stream is consumed twice with the backend's own read loop (parse at the
   front, drop what a reply took, skip an oversized value and check its
   "\r\n"): once fed in the chosen chunks, each parse seeing a buffer of
   exactly the bytes received so far (so any read past them is an ASan
   error), and once whole. Both must produce the same replies, the same final
   outcome (garbage or not) and leave the same bytes unparsed. Every reply is
   also checked on its own (lengths, pointers inside the buffer, terminator).

   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_memcached.c
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c)                                                                              \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "fuzz_memcached: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static const size_t max_values[8] = {(size_t)1 << 20, 0, 1, 2, 3, 5, 10, 64};

/* What one parsed reply looked like, position-independent. */
typedef struct event {
    int kind;
    bool has_opaque, has_flags, has_cas, skip;
    uint32_t opaque, flags;
    uint64_t cas;
    size_t value_len, message_len, taken;
    uint64_t digest; /* FNV-1a of the value or message bytes */
} event;

typedef struct run {
    event *ev;
    size_t nev, cap;
    int outcome;     /* 0, or FLASH_EPROTO (garbage seen: the connection would reset) */
    size_t leftover; /* bytes received but not consumed when the stream ended */
    size_t skipping; /* bytes of an oversized value still to drop at the end */
} run;

static uint64_t fnv(const char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 0x100000001b3ull;
    return h;
}

static void push(run *r, const flash_memcached_reply *rep, size_t taken) {
    if (r->nev == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->ev = (event *)realloc(r->ev, r->cap * sizeof *r->ev);
        FUZZ_CHECK(r->ev);
    }
    event *e = &r->ev[r->nev++];
    memset(e, 0, sizeof *e);
    e->kind = rep->kind;
    e->has_opaque = rep->has_opaque;
    e->has_flags = rep->has_flags;
    e->has_cas = rep->has_cas;
    e->skip = rep->skip;
    e->opaque = rep->opaque;
    e->flags = rep->flags;
    e->cas = rep->cas;
    e->value_len = rep->value_len;
    e->message_len = rep->message_len;
    e->taken = taken;
    if (rep->kind == FLASH_MEMCACHED_VA && !rep->skip) e->digest = fnv(rep->value, rep->value_len);
    else if (rep->kind >= FLASH_MEMCACHED_ERROR) e->digest = fnv(rep->message, rep->message_len);
}

/* One reply's own invariants, buf holding exactly len bytes. */
static void check_reply(const char *buf, size_t len, size_t max_value, ptrdiff_t n,
                        const flash_memcached_reply *rep) {
    FUZZ_CHECK(n == 0 || n == FLASH_EPROTO || (n > 0 && (size_t)n <= len));
    if (n <= 0) return;
    FUZZ_CHECK(rep->kind >= FLASH_MEMCACHED_VA && rep->kind <= FLASH_MEMCACHED_SERVER_ERROR);
    /* a reply line ends with "\r\n" */
    const char *nl = memchr(buf, '\n', (size_t)n);
    FUZZ_CHECK(nl && nl > buf && nl[-1] == '\r');
    size_t header = (size_t)(nl - buf) + 1;
    if (rep->kind == FLASH_MEMCACHED_VA) {
        if (rep->skip) {
            FUZZ_CHECK(rep->value_len > max_value);
            FUZZ_CHECK(rep->value == NULL);
            FUZZ_CHECK((size_t)n == header);
        } else {
            FUZZ_CHECK(rep->value_len <= max_value);
            FUZZ_CHECK(rep->value == buf + header);
            FUZZ_CHECK((size_t)n == header + rep->value_len + 2);
            FUZZ_CHECK(buf[header + rep->value_len] == '\r' && buf[header + rep->value_len + 1] == '\n');
        }
    } else {
        FUZZ_CHECK((size_t)n == header);
        FUZZ_CHECK(!rep->skip);
    }
    if (rep->kind >= FLASH_MEMCACHED_ERROR) {
        FUZZ_CHECK(rep->message >= buf && rep->message + rep->message_len <= buf + header - 2);
    }
}

/* The backend's read loop over what has arrived: parse replies from the
   front, skip oversized values. acc holds exactly *len bytes (heap, exact
   size). Returns false once garbage was seen. */
static bool consume(run *r, char **acc, size_t *len, size_t max_value) {
    size_t off = 0;
    bool ok = true;
    for (;;) {
        if (r->skipping) { /* dropping an oversized value; its last two bytes are "\r\n" */
            while (r->skipping && off < *len) {
                if ((r->skipping == 2 && (*acc)[off] != '\r') || (r->skipping == 1 && (*acc)[off] != '\n')) {
                    r->outcome = FLASH_EPROTO;
                    ok = false;
                    break;
                }
                if (r->skipping > 2) {
                    size_t take = *len - off < r->skipping - 2 ? *len - off : r->skipping - 2;
                    off += take;
                    r->skipping -= take;
                } else {
                    off++;
                    r->skipping--;
                }
            }
            if (!ok || r->skipping) break;
        }
        if (off == *len) break;
        /* The parser sees exactly the unconsumed bytes: an exact-size copy,
           so that reading one byte past them is caught. */
        size_t avail = *len - off;
        char *view = (char *)malloc(avail);
        FUZZ_CHECK(view);
        memcpy(view, *acc + off, avail);
        flash_memcached_reply rep;
        ptrdiff_t n = flash_memcached_parse(view, avail, max_value, &rep);
        check_reply(view, avail, max_value, n, &rep);
        if (n > 0) push(r, &rep, (size_t)n);
        free(view);
        if (n == 0) break;
        if (n < 0) {
            r->outcome = FLASH_EPROTO;
            ok = false;
            break;
        }
        off += (size_t)n;
        if (rep.skip) r->skipping = rep.value_len + 2;
    }
    /* Keep only the unconsumed bytes, in an exact-size buffer. */
    size_t rest = *len - off;
    char *nb = (char *)malloc(rest ? rest : 1);
    FUZZ_CHECK(nb);
    if (rest) memcpy(nb, *acc + off, rest);
    free(*acc);
    *acc = nb;
    *len = rest;
    return ok;
}

static void feed(run *r, const uint8_t *stream, size_t n, const uint8_t *chunks, size_t nchunks, size_t max_value) {
    char *acc = (char *)malloc(1);
    size_t len = 0, pos = 0, k = 0;
    FUZZ_CHECK(acc);
    while (pos < n) {
        size_t step = nchunks ? (size_t)chunks[k++ % nchunks] + 1 : 1;
        if (step > n - pos) step = n - pos;
        char *grown = (char *)malloc(len + step);
        FUZZ_CHECK(grown);
        if (len) memcpy(grown, acc, len);
        memcpy(grown + len, stream + pos, step);
        free(acc);
        acc = grown;
        len += step;
        pos += step;
        if (!consume(r, &acc, &len, max_value)) break;
    }
    r->leftover = r->outcome ? 0 : len;
    free(acc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    size_t max_value = max_values[data[0] % 8];
    size_t nchunks = data[1] % 16;
    if (2 + nchunks > size) return 0;
    const uint8_t *chunks = data + 2;
    const uint8_t *stream = data + 2 + nchunks;
    size_t n = size - 2 - nchunks;

    run inc, whole;
    memset(&inc, 0, sizeof inc);
    memset(&whole, 0, sizeof whole);
    feed(&inc, stream, n, chunks, nchunks, max_value);
    /* Whole: one read of everything; the parser runs on the input buffer
       itself (libFuzzer's copy is exact-size too). */
    {
        size_t off = 0;
        for (;;) {
            if (whole.skipping) {
                size_t need = whole.skipping;
                if (n - off < need) {
                    /* the stream ends inside the value: drop what is there,
                       but the terminator bytes that did arrive must match */
                    size_t have = n - off;
                    for (size_t i = 0; i < have; i++) {
                        size_t left = need - i; /* bytes still to drop before this one */
                        if ((left == 2 && stream[off + i] != '\r') || (left == 1 && stream[off + i] != '\n')) {
                            whole.outcome = FLASH_EPROTO;
                            break;
                        }
                    }
                    if (!whole.outcome) whole.skipping -= have;
                    off = n;
                    break;
                }
                if (stream[off + need - 2] != '\r' || stream[off + need - 1] != '\n') {
                    whole.outcome = FLASH_EPROTO;
                    break;
                }
                off += need;
                whole.skipping = 0;
            }
            if (off == n) break;
            flash_memcached_reply rep;
            ptrdiff_t k = flash_memcached_parse((const char *)stream + off, n - off, max_value, &rep);
            check_reply((const char *)stream + off, n - off, max_value, k, &rep);
            if (k == 0) break;
            if (k < 0) {
                whole.outcome = FLASH_EPROTO;
                break;
            }
            push(&whole, &rep, (size_t)k);
            off += (size_t)k;
            if (rep.skip) whole.skipping = rep.value_len + 2;
        }
        whole.leftover = whole.outcome ? 0 : n - off;
    }

    /* Incremental parsing agrees with parsing the whole buffer. */
    FUZZ_CHECK(inc.outcome == whole.outcome);
    FUZZ_CHECK(inc.nev == whole.nev);
    for (size_t i = 0; i < inc.nev; i++) FUZZ_CHECK(memcmp(&inc.ev[i], &whole.ev[i], sizeof inc.ev[i]) == 0);
    FUZZ_CHECK(inc.leftover == whole.leftover);
    FUZZ_CHECK(inc.outcome || inc.skipping == whole.skipping);
    free(inc.ev);
    free(whole.ev);
    return 0;
}
