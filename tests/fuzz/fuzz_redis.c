/* tests/fuzz/fuzz_redis.c — libFuzzer harness for flash_redis_parse.

   The input is a RESP2 reply stream the way the Redis backend reads it off a
   socket, plus how it is cut into reads (the layout is in stream.h). The
   stream is consumed twice, in the chosen chunks and whole, by the driver in
   stream.h: both must produce the same elements, the same outcome and leave
   the same bytes unparsed. Every element is also checked on its own here:
   its line ends in "\r\n", a bulk's data lies inside the buffer and is
   followed by "\r\n", an oversized bulk took only its header, strings and
   integers agree with the bytes.

   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_redis.c
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/redis.h"

#include "stream.h"

static void check_reply(const char *buf, size_t len, size_t max_value, ptrdiff_t n, const flash_redis_reply *rep) {
    if (n <= 0) return;
    STREAM_CHECK(rep->kind >= FLASH_REDIS_SIMPLE && rep->kind <= FLASH_REDIS_ARRAY);
    const char *nl = (const char *)memchr(buf, '\n', (size_t)n);
    STREAM_CHECK(nl && nl > buf && nl[-1] == '\r');
    size_t header = (size_t)(nl - buf) + 1;
    (void)len;
    switch (rep->kind) {
    case FLASH_REDIS_SIMPLE:
    case FLASH_REDIS_ERROR:
        STREAM_CHECK(buf[0] == (rep->kind == FLASH_REDIS_SIMPLE ? '+' : '-'));
        STREAM_CHECK(rep->str == buf + 1 && rep->len == header - 3);
        STREAM_CHECK((size_t)n == header);
        break;
    case FLASH_REDIS_INTEGER:
        STREAM_CHECK(buf[0] == ':' && (size_t)n == header);
        break;
    case FLASH_REDIS_NIL:
        STREAM_CHECK((buf[0] == '$' || buf[0] == '*') && (size_t)n == header);
        break;
    case FLASH_REDIS_ARRAY:
        STREAM_CHECK(buf[0] == '*' && (size_t)n == header && rep->integer >= 0);
        break;
    case FLASH_REDIS_BULK:
        STREAM_CHECK(buf[0] == '$');
        if (rep->skip) {
            STREAM_CHECK(rep->len > max_value && rep->str == NULL && (size_t)n == header);
        } else {
            STREAM_CHECK(rep->len <= max_value);
            STREAM_CHECK(rep->str == buf + header);
            STREAM_CHECK((size_t)n == header + rep->len + 2);
            STREAM_CHECK(buf[header + rep->len] == '\r' && buf[header + rep->len + 1] == '\n');
        }
        break;
    }
}

static ptrdiff_t parse_one(const char *buf, size_t len, size_t max_value, stream_event *e) {
    flash_redis_reply rep;
    ptrdiff_t n = flash_redis_parse(buf, len, max_value, &rep);
    check_reply(buf, len, max_value, n, &rep);
    if (n <= 0) return n;
    e->kind = rep.kind;
    e->a = (uint64_t)rep.integer;
    e->bits = rep.skip;
    e->len = rep.len;
    if (rep.str) e->digest = stream_fnv(rep.str, rep.len);
    if (rep.skip) e->skip_len = rep.len + 2;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return stream_fuzz(data, size, parse_one); }
