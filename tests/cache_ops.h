/* tests/cache_ops.h — driving a cache backend directly through the layer-6
   vtable on the poll loop (tests/test_memcached.c, tests/test_redis.c):
   build an op, submit it (done must not run inside submit), run the loop
   until done ran exactly once, and keep copies of GET values (they live
   only until done returns). */
#ifndef FLASH_TEST_CACHE_OPS_H
#define FLASH_TEST_CACHE_OPS_H
#include <string.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "harness.h"

static char value_store[8 << 20];
static size_t value_used;

static inline void count_done(flash_cache_op *op) {
    ++*(int *)op->data;
    if (op->code != FLASH_CACHE_GET || !op->items) return;
    for (size_t i = 0; i < op->count; i++) {
        flash_cache_item *it = &op->items[i];
        if (it->status != FLASH_OK) continue;
        cr_assert_leq(value_used + it->value_len, sizeof value_store);
        memcpy(value_store + value_used, it->value, it->value_len);
        it->value = value_store + value_used;
        value_used += it->value_len;
    }
}

static inline void op_init(flash_cache_op *op, flash_cache_opcode code, flash_cache_item *items, size_t n,
                           int *done) {
    memset(op, 0, sizeof *op);
    op->code = code;
    op->items = items;
    op->count = n;
    op->done = count_done;
    op->data = done;
    *done = 0;
}

static inline void submit(flash_poll *p, flash_cache c, flash_cache_op *op) {
    c.vt->submit(c.self, flash_poll_loop(p), op);
    cr_assert_eq(*(int *)op->data, 0, "done ran inside submit");
}

static inline void wait_done(flash_poll *p, flash_cache_op *op) {
    int64_t start = flash_test_now_ms();
    while (*(int *)op->data == 0) {
        cr_assert_geq(flash_poll_run_once(p, true), 0);
        cr_assert_lt(flash_test_now_ms() - start, 10000, "op never completed");
    }
    for (int i = 0; i < 3; i++) flash_poll_run_once(p, false);
    cr_assert_eq(*(int *)op->data, 1, "done ran more than once");
}

static inline void run(flash_poll *p, flash_cache c, flash_cache_op *op) {
    submit(p, c, op);
    wait_done(p, op);
}

static inline void key(flash_cache_item *it, const char *k) {
    memset(it, 0, sizeof *it);
    it->key = k;
    it->key_len = strlen(k);
}

static inline void kv(flash_cache_item *it, const char *k, const char *v) {
    key(it, k);
    it->value = v;
    it->value_len = strlen(v);
}

static inline void assert_value(const flash_cache_item *it, const char *v) {
    cr_assert_eq(it->status, FLASH_OK, "%.*s: status %d", (int)it->key_len, it->key, it->status);
    cr_assert_eq(it->value_len, strlen(v));
    cr_assert_eq(memcmp(it->value, v, it->value_len), 0);
}

#endif
