/* tests/loops.h — every event loop flash has an adapter for, as a table, so
   that a suite can run the same test on each.

       for (size_t i = 0; i < flash_test_loop_count; i++) {
           const flash_test_loop *L = &flash_test_loops[i];
           void *native = L->create();    // the adapter, on a loop of its own
           flash_ctx *ctx = flash_ctx_create(NULL);
           cr_assert_eq(L->attach(ctx, native), 0, "%s", L->name);
           ...
           flash_ctx_destroy(ctx);
           L->destroy(native);            // frees every adapter handle too
       }

   or one Criterion test per loop, leak-checked like FLASH_TEST:

       FLASH_LOOP_TEST(suite, name) { ... L->create() ... }
       FLASH_LOOP_TEST_OPT(suite, name, .disabled = true) { ... }
*/
#ifndef FLASH_TEST_LOOPS_H
#define FLASH_TEST_LOOPS_H
#include <stddef.h>
#include "flash.h"
#include "harness.h"
#include <criterion/parameterized.h>

/* "native" below is the adapter (flash_poll *, or a flash_libuv, flash_libev
   or flash_libevent with the native loop it was made on), not the loop
   library's own object. */
typedef struct flash_test_loop {
    const char *name;                 /* "poll", "libuv", "libev", "libevent" */
    void *(*create)(void);            /* a new loop and adapter, NULL on failure */
    /* The same, the adapter allocating through alloc (NULL: malloc). */
    void *(*create_with)(const flash_allocator *alloc);
    /* Drop the adapter's handles (callbacks never run), free them, and
       destroy the native loop. */
    void (*destroy)(void *native);
    flash_loop (*loop)(void *native); /* the vtable view */
    int (*attach)(flash_ctx *ctx, void *native); /* flash_<loop>_attach */
    /* The loop library's own run until nothing is left to wait for
       (flash_poll_run, uv_run, ev_run, event_base_dispatch): < 0 on error. */
    int (*run)(void *native);
} flash_test_loop;

extern const flash_test_loop flash_test_loops[];
extern const size_t flash_test_loop_count;
/* 0, 1, 2, ...: the Criterion parameters (indexes survive the worker process). */
extern const size_t flash_test_loop_indexes[];
/* The loop called name, or NULL. */
const flash_test_loop *flash_test_loop_find(const char *name);

#define FLASH__LOOP_TEST(suite, name, ...)                                         \
    static void flash_loop_body_##suite##_##name(const flash_test_loop *L);        \
    ParameterizedTestParameters(suite, name) {                                     \
        return cr_make_param_array(size_t, (void *)flash_test_loop_indexes,        \
                                   flash_test_loop_count, NULL);                   \
    }                                                                              \
    ParameterizedTest(const size_t *flash_loop_index, suite, name, __VA_ARGS__) {  \
        flash_loop_body_##suite##_##name(&flash_test_loops[*flash_loop_index]);    \
        flash_test_check_leaks();                                                  \
    }                                                                              \
    static void flash_loop_body_##suite##_##name(const flash_test_loop *L)
/* One test per loop; the body sees `const flash_test_loop *L`. */
#define FLASH_LOOP_TEST(suite, name) FLASH__LOOP_TEST(suite, name, .description = "")
#define FLASH_LOOP_TEST_OPT(suite, name, ...) FLASH__LOOP_TEST(suite, name, __VA_ARGS__)

#endif
