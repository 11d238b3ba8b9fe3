/* flash_fetch_dont_cache: django-flash's DontCache(value). A fallback
   answers a key but writes nothing back for it; the other keys of the same
   fetch are cached as usual. On the memory backend and on real memcached. */
#define _GNU_SOURCE
#include "harness.h"
#include "models.h"

#include <string.h>

/* Titles starting with "live" are answered but not cached (a live score,
   say); the others are answered and cached. */
static int calls;
static void live_or_cached(flash_ctx *ctx, flash_fetch *f, void *user_data) {
    (void)ctx;
    (void)user_data;
    calls++;
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        const flash_value *k = flash_fetch_key(f, i);
        Event e = {(int64_t)(100 + i), "slug", k[0].u.s.ptr, 7};
        cr_assert_eq(flash_fetch_set_row(f, i, &e), 0);
        if (strncmp(k[0].u.s.ptr, "live", 4) == 0) cr_assert_eq(flash_fetch_dont_cache(f, i), 0);
    }
    cr_assert_eq(flash_fetch_dont_cache(f, flash_fetch_count(f)), FLASH_EINVAL, "out of range");
    flash_fetch_done(f, 0, NULL);
}
FLASH_INSTANCE_CACHE_OPT(EventOnTitleLive, Event, (title), .fallback = live_or_cached)

static void run(void) {
    calls = 0;
    for (int round = 0; round < 3; round++) {
        flash_ctx_reset(fx.ctx);
        stats_delta();
        flash_promise *ps[2] = {EventOnTitleLive_resolve_async(fx.ctx, "live score"),
                                EventOnTitleLive_resolve_async(fx.ctx, "final score")};
        void *v;
        cr_assert_eq(flash_wait(fx.ctx, flash_gather(fx.ctx, 2, ps), &v), 0);
        cr_assert_str_eq(((Event **)v)[0]->title, "live score");
        cr_assert_str_eq(((Event **)v)[1]->title, "final score");
        fixture_settle(); /* fills land */
        flash_stats d = stats_delta();
        if (round == 0) {
            cr_assert_eq(d.source_keys, 2);
            cr_assert_eq(d.fills, 1, "only the cacheable answer is written back");
        } else {
            cr_assert_eq(d.cache_hits, 1, "round %d: the cached one hits", round);
            cr_assert_eq(d.source_keys, 1, "round %d: the other is asked again", round);
            cr_assert_eq(d.fills, 0);
        }
    }
    cr_assert_eq(calls, 3);
}

static void setup_memory(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(NULL);
}
static void setup_memcached(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMCACHED;
    fixture_setup(NULL);
}
TestSuite(dont_cache, .init = setup_memory, .fini = fixture_teardown);
TestSuite(dont_cache_memcached, .init = setup_memcached, .fini = fixture_teardown);

FLASH_TEST(dont_cache, answered_but_not_written_back) { run(); }
FLASH_TEST(dont_cache_memcached, answered_but_not_written_back) { run(); }
