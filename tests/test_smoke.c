/* The shortest end-to-end path: a loader batch through flash_run. */
#include <criterion/criterion.h>
#include <string.h>
#include "flash.h"
#include "harness.h"

static int batch_calls;
static void echo_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    batch_calls++;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        flash_batch_resolve(b, i, flash_sprintf(ctx, "v:%.*s", (int)len, k));
    }
}
static const flash_loader_desc echo = {.name = "echo", .batch = echo_batch};

static flash_promise *three_loads(flash_ctx *ctx, void *arg) {
    (void)arg;
    flash_loader *l = flash_loader_for(ctx, &echo);
    flash_promise *ps[3] = {flash_load_str(l, "a"), flash_load_str(l, "b"), flash_load_str(l, "a")};
    return flash_gather(ctx, 3, ps);
}

FLASH_TEST(smoke, run_batches_one_tick_and_dedupes) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    void *v = NULL;
    batch_calls = 0;
    cr_assert_eq(flash_run(ctx, three_loads, NULL, &v), 0);
    char **vals = (char **)v;
    cr_assert_eq(batch_calls, 1);
    cr_assert_str_eq(vals[0], "v:a");
    cr_assert_str_eq(vals[1], "v:b");
    cr_assert_str_eq(vals[2], "v:a");
    cr_assert_eq(flash_ctx_stats(ctx).batch_keys, 2);
    flash_ctx_destroy(ctx);
}

#include "harness.h"

FLASH_TEST(harness, memcached_starts_on_a_free_port_and_answers_stats) {
    flash_test_server s;
    cr_assert(flash_test_memcached_start(&s, "-m 16"));
    cr_assert_gt(s.port, 0);
    cr_assert_eq(flash_test_memcached_stat(&s, "curr_items"), 0);
    char buf[256];
    cr_assert_gt(flash_test_memcached_command(&s, "set k 0 0 1\r\nx\r\n", buf, sizeof buf), 0);
    cr_assert_str_eq(buf, "STORED\r\n");
    cr_assert_eq(flash_test_memcached_stat(&s, "curr_items"), 1);
    flash_test_server_stop(&s);
}
