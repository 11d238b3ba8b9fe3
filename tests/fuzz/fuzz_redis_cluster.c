/* tests/fuzz/fuzz_redis_cluster.c — libFuzzer harness for the Redis Cluster
   backend's reply handling (backends/cache/redis_cluster.h): what a garbage
   or hostile node can send back.

   Input: byte 0 picks what the rest is (byte 0 % 4):
     0  a CLUSTER SHARDS reply (RESP bytes)
     1  a CLUSTER SLOTS reply (RESP bytes)
     2  error replies, one per line ("\n"; a trailing "\r" dropped), each fed
        to the per-key error handling of one in-flight GET key (MOVED / ASK /
        TRYAGAIN / CLUSTERDOWN / NOSCRIPT / anything else), the same key
        again and again (its redirect count grows as in a redirect loop)
     3  the same with a SET op (no per-key MGET fallback on TRYAGAIN)
   Map replies go through the backend's own path: flash_redis_parse element
   by element into the flat records redis.h hands the cluster code
   (flash__redis_apply_raw's layout), then the backend's checks and parser
   (flash__rc_parse_shards / flash__rc_parse_slots, "the whole reply used").
   Records are also fed when the stream stops early (garbage or a cut), so
   the walkers see truncated trees too.

   Checked: no crash, leak or UB (ASan/UBSan); a parsed map names only known
   nodes; every node has an address and a port; a redirect parsed by
   flash__rc_parse_redirect lies inside the text, with slot < 16384 and a
   port in 1..65535; after each error the key is settled with an error
   status, or due to be sent (MOVED: its slot now points at a known node;
   ASK: to a known node), or waiting for a backoff (TRYAGAIN/CLUSTERDOWN).
   No I/O happens: the nodes' connections are never opened (a map reload a
   MOVED asks for is held back), and node addresses are never looked up.

   Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_redis_cluster.c
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/redis_cluster.h"
#include "backends/loop/poll.h"

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

static flash_poll *fz_loop;

/* RESP bytes -> the raw records of one reply (at most one top-level tree). */
static size_t to_records(const uint8_t *data, size_t n, char **out) {
    size_t off = 0, len = 0, cap = 64;
    int64_t left = 1;
    char *m = (char *)malloc(cap);
    STREAM_CHECK(m);
    while (left > 0 && off < n) {
        flash_redis_reply r;
        ptrdiff_t k = flash_redis_parse((const char *)data + off, n - off, (size_t)1 << 20, &r);
        size_t need;
        if (k <= 0 || r.skip) break;
        need = FLASH__REDIS_RAW_REC + (r.str ? r.len : 0);
        while (cap - len < need) {
            cap *= 2;
            m = (char *)realloc(m, cap);
            STREAM_CHECK(m);
        }
        m[len] = (char)r.kind;
        for (int i = 0; i < 8; i++) m[len + 1 + (size_t)i] = (char)((uint64_t)r.integer >> (8 * i));
        for (int i = 0; i < 4; i++) m[len + 9 + (size_t)i] = (char)((uint32_t)(r.str ? r.len : 0) >> (8 * i));
        if (r.str && r.len) memcpy(m + len + FLASH__REDIS_RAW_REC, r.str, r.len);
        len += need;
        left += (r.kind == FLASH_REDIS_ARRAY ? r.integer : 0) - 1;
        off += (size_t)k;
    }
    /* an exact-size copy: a read past the records is an ASan error */
    char *exact = (char *)malloc(len ? len : 1);
    STREAM_CHECK(exact);
    if (len) memcpy(exact, m, len);
    free(m);
    *out = exact;
    return len;
}

static void check_nodes(const flash__rc *rc) {
    STREAM_CHECK(rc->nnodes >= 1 && rc->nnodes <= FLASH__RC_MAX_NODES);
    for (size_t i = 0; i < rc->nnodes; i++) {
        size_t hl = strnlen(rc->nodes[i].host, sizeof rc->nodes[i].host);
        STREAM_CHECK(hl > 0 && hl < sizeof rc->nodes[i].host);
        STREAM_CHECK(rc->nodes[i].port != 0 && rc->nodes[i].rd);
    }
}

static void fuzz_map(flash__rc *rc, const uint8_t *data, size_t n, bool slots_cmd) {
    char *rec = NULL;
    size_t len = to_records(data, n, &rec);
    flash__rr r, first_r;
    flash__rr_el first;
    r.p = rec;
    r.end = rec + len;
    first_r = r;
    /* flash__rc_refresh_done: an error reply means "unknown command" */
    if (!(flash__rr_next(&first_r, &first) && first.kind == FLASH_REDIS_ERROR)) {
        uint16_t *map = (uint16_t *)malloc(FLASH__RC_SLOTS * sizeof *map);
        STREAM_CHECK(map);
        for (size_t i = 0; i < FLASH__RC_SLOTS; i++) map[i] = FLASH__RC_NONE;
        bool ok = slots_cmd ? flash__rc_parse_slots(rc, &r, map) : flash__rc_parse_shards(rc, &r, map);
        STREAM_CHECK(r.p >= rec && r.p <= rec + len);
        ok = ok && r.p == r.end;
        check_nodes(rc);
        for (size_t i = 0; i < FLASH__RC_SLOTS; i++) STREAM_CHECK(map[i] == FLASH__RC_NONE || map[i] < rc->nnodes);
        if (ok) memcpy(rc->slots, map, FLASH__RC_SLOTS * sizeof *map);
        free(map);
    }
    free(rec);
}

static void check_redirect(const char *t, size_t n, size_t skip) {
    uint32_t slot = 0;
    const char *host = NULL;
    size_t hlen = 0;
    uint16_t port = 0;
    if (n < skip) return;
    if (!flash__rc_parse_redirect(t, n, skip, &slot, &host, &hlen, &port)) return;
    STREAM_CHECK(slot < FLASH__RC_SLOTS);
    STREAM_CHECK(host >= t + skip && host + hlen < t + n && host[hlen] == ':');
    STREAM_CHECK(port >= 1);
}

static void fuzz_errors(flash__rc *rc, const uint8_t *data, size_t n, int code) {
    flash_cache_op op;
    flash_cache_item item;
    flash__rc_op *rop = (flash__rc_op *)calloc(1, sizeof *rop);
    int32_t ask = -1;
    uint16_t slot = 1234;
    uint8_t tries = 0, st = FLASH__RC_FLIGHT, single = 0;
    STREAM_CHECK(rop);
    memset(&op, 0, sizeof op);
    memset(&item, 0, sizeof item);
    item.key = "k";
    item.key_len = 1;
    op.code = code;
    op.items = &item;
    op.count = 1;
    rop->rc = rc;
    rop->op = &op;
    rop->ask = &ask;
    rop->slot = &slot;
    rop->tries = &tries;
    rop->st = &st;
    rop->single = &single;
    size_t start = 0;
    uint16_t slot_before = rc->slots[slot];
    while (start < n) {
        const uint8_t *nl = (const uint8_t *)memchr(data + start, '\n', n - start);
        size_t end = nl ? (size_t)(nl - data) : n, tl = end - start;
        if (tl && data[start + tl - 1] == '\r') tl--;
        char *text = (char *)malloc(tl ? tl : 1); /* exact size */
        STREAM_CHECK(text);
        if (tl) memcpy(text, data + start, tl);
        check_redirect(text, tl, 5);
        check_redirect(text, tl, 3);
        /* the node that answered: one the backend knows */
        uint32_t node = (uint32_t)(tl ? (unsigned char)text[0] : 0) % (uint32_t)rc->nnodes;
        item.status = FLASH_OK;
        st = FLASH__RC_FLIGHT;
        flash__rc_on_error(rop, node, 0, text, tl);
        check_nodes(rc);
        STREAM_CHECK(st == FLASH__RC_SETTLED || st == FLASH__RC_SEND || st == FLASH__RC_BACKOFF);
        if (st == FLASH__RC_SETTLED) STREAM_CHECK(item.status != FLASH_OK);
        if (st == FLASH__RC_SEND) {
            STREAM_CHECK(ask == -1 || (ask >= 0 && (size_t)ask < rc->nnodes));
            if (ask == -1) STREAM_CHECK(rc->slots[slot] == FLASH__RC_NONE || rc->slots[slot] < rc->nnodes);
        }
        if (!(tl >= 5 && memcmp(text, "MOVED", 5) == 0)) STREAM_CHECK(rc->slots[slot] == slot_before);
        slot_before = rc->slots[slot];
        free(text);
        start = end + 1;
    }
    free(rop);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    if (!fz_loop) {
        fz_loop = flash_poll_create();
        STREAM_CHECK(fz_loop);
    }
    flash_redis_node seed = {"127.0.0.1", 7000};
    flash_redis_cluster_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(fz_loop);
    d.seeds = &seed;
    d.seed_count = 1;
    d.max_redirects = 1 + data[0] / 4 % 8;
    flash_cache c = flash_redis_cluster_create(&d, &err);
    STREAM_CHECK(c.vt && err == FLASH_OK);
    flash__rc *rc = (flash__rc *)c.self;
    rc->have_map = true;
    rc->refreshing = true; /* a reload a MOVED asks for waits: no I/O here */
    for (size_t i = 0; i < FLASH__RC_SLOTS; i++) rc->slots[i] = 0;
    switch (data[0] % 4) {
    case 0: fuzz_map(rc, data + 1, size - 1, false); break;
    case 1: fuzz_map(rc, data + 1, size - 1, true); break;
    case 2: fuzz_errors(rc, data + 1, size - 1, FLASH_CACHE_GET); break;
    default: fuzz_errors(rc, data + 1, size - 1, FLASH_CACHE_SET); break;
    }
    rc->refreshing = false;
    flash_cache_destroy(c);
    return 0;
}
