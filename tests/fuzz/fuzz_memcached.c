/* tests/fuzz/fuzz_memcached.c — libFuzzer harness for flash_memcached_parse.

   The input is a reply stream the way the memcached backend reads it off a
   socket, plus how it is cut into reads (the layout is in stream.h). The
   stream is consumed twice with the backend's read loop, in the chosen
   chunks and whole, by the driver in stream.h: both must produce the same
   replies, the same outcome and leave the same bytes unparsed. Every reply
   is also checked on its own here (lengths, pointers inside the buffer,
   terminator).

   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_memcached.c
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"

#include "stream.h"

/* One reply's own invariants, buf holding exactly len bytes. */
static void check_reply(const char *buf, size_t len, size_t max_value, ptrdiff_t n,
                        const flash_memcached_reply *rep) {
    if (n <= 0) return;
    STREAM_CHECK(rep->kind >= FLASH_MEMCACHED_VA && rep->kind <= FLASH_MEMCACHED_SERVER_ERROR);
    /* a reply line ends with "\r\n" */
    const char *nl = (const char *)memchr(buf, '\n', (size_t)n);
    STREAM_CHECK(nl && nl > buf && nl[-1] == '\r');
    size_t header = (size_t)(nl - buf) + 1;
    (void)len;
    if (rep->kind == FLASH_MEMCACHED_VALUE) { /* the key lies in the header line */
        STREAM_CHECK(rep->key > buf && rep->key + rep->key_len <= buf + header - 2);
        STREAM_CHECK(rep->key_len > 0 && rep->key_len <= 250);
    } else {
        STREAM_CHECK(rep->key == NULL && rep->key_len == 0);
    }
    if (rep->kind == FLASH_MEMCACHED_VA || rep->kind == FLASH_MEMCACHED_VALUE) {
        if (rep->skip) {
            STREAM_CHECK(rep->value_len > max_value);
            STREAM_CHECK(rep->value == NULL);
            STREAM_CHECK((size_t)n == header);
        } else {
            STREAM_CHECK(rep->value_len <= max_value);
            STREAM_CHECK(rep->value == buf + header);
            STREAM_CHECK((size_t)n == header + rep->value_len + 2);
            STREAM_CHECK(buf[header + rep->value_len] == '\r' && buf[header + rep->value_len + 1] == '\n');
        }
    } else {
        STREAM_CHECK((size_t)n == header);
        STREAM_CHECK(!rep->skip);
    }
    if (rep->kind >= FLASH_MEMCACHED_ERROR) {
        STREAM_CHECK(rep->message >= buf && rep->message + rep->message_len <= buf + header - 2);
    }
}

static ptrdiff_t parse_one(const char *buf, size_t len, size_t max_value, stream_event *e) {
    flash_memcached_reply rep;
    ptrdiff_t n = flash_memcached_parse(buf, len, max_value, &rep);
    check_reply(buf, len, max_value, n, &rep);
    if (n <= 0) return n;
    e->kind = rep.kind;
    e->bits = (uint32_t)rep.has_opaque | (uint32_t)rep.has_flags << 1 | (uint32_t)rep.has_cas << 2 |
              (uint32_t)rep.skip << 3;
    e->a = rep.opaque;
    e->b = rep.flags;
    e->c = rep.cas;
    e->len = rep.kind >= FLASH_MEMCACHED_ERROR ? rep.message_len : rep.value_len;
    if ((rep.kind == FLASH_MEMCACHED_VA || rep.kind == FLASH_MEMCACHED_VALUE) && !rep.skip)
        e->digest = stream_fnv(rep.value, rep.value_len);
    if (rep.kind == FLASH_MEMCACHED_VALUE) e->digest ^= stream_fnv(rep.key, rep.key_len) * 31;
    else if (rep.kind >= FLASH_MEMCACHED_ERROR) e->digest = stream_fnv(rep.message, rep.message_len);
    if (rep.skip) e->skip_len = rep.value_len + 2;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return stream_fuzz(data, size, parse_one); }
