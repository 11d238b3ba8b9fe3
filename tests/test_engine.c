/* The model cache end to end: one round trip per tick, one source call per
   class, request memo, fills, result kinds, query forms and bad input. */
#include <stdio.h>
#include <string.h>

#include "consistency.h"
#include "harness.h"
#include "models.h"

/* This file is also compiled as the same suite on memcached and on each loop
   (tests/test_engine_*.c define these first). */
#ifndef ENGINE_SUITE
#define ENGINE_SUITE engine
#define ENGINE_LOOP "poll"
#define ENGINE_BACKEND FIXTURE_MEMORY
#endif
#undef FLASH_TEST
#define FLASH_TEST(suite, name) FLASH_TEST_IN(ENGINE_SUITE, name)

static void setup(void) {
    fixture_use.loop = ENGINE_LOOP;
    fixture_use.backend = ENGINE_BACKEND;
    fixture_setup(NULL);
}
static void teardown(void) { fixture_teardown(); }
TestSuite(ENGINE_SUITE, .init = setup, .fini = teardown);

static void *wait_ok(flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(fx.ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

static int wait_rc(flash_promise *p) {
    void *v = NULL;
    return flash_wait(fx.ctx, p, &v);
}

/* ---- the issue's "done when" ---- */

FLASH_TEST(engine, gather_across_two_models_and_an_instance_cache_is_one_get_many) {
    flash_promise *ps[60];
    size_t n = 0;
    for (int i = 1; i <= 40; i++) ps[n++] = User_get_by_id_async(fx.ctx, i);
    for (int u = 1; u <= 5; u++) ps[n++] = Participant_get_by_user_event_async(fx.ctx, u, 2);
    for (int e = 1; e <= 5; e++) {
        char slug[24];
        snprintf(slug, sizeof slug, "event%d", e);
        ps[n++] = EventCacheOnSlug_resolve_async(fx.ctx, slug);
    }
    void **vals = wait_ok(flash_gather(fx.ctx, n, ps));
    cr_assert_eq(((User *)vals[0])->id, 1);
    cr_assert_str_eq(((User *)vals[39])->username, "user40");
    cr_assert_eq(((Participant *)vals[40])->user, 1);
    cr_assert_eq(((Participant *)vals[44])->event, 2);
    cr_assert_str_eq(((Event *)vals[49])->slug, "event5");
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1, "one get-many for the whole gather, got %llu",
                 (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.cache_keys, 50);
    cr_assert_eq(d.source_calls, 3, "one source call per class");
    cr_assert_eq(flash_table_fetches(fx.db), 3);
    cr_assert_eq(d.fills, 50);
}

FLASH_TEST(engine, repeated_query_in_a_request_costs_nothing_and_after_reset_is_one_hit) {
    User *a = wait_ok(User_get_by_id_async(fx.ctx, 7));
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(d.source_calls, 1);
    User *b = wait_ok(User_get_by_id_async(fx.ctx, 7));
    d = stats_delta();
    cr_assert_eq(a, b, "the memo gives the same row");
    cr_assert_eq(d.cache_round_trips, 0);
    cr_assert_eq(d.source_calls, 0);
    cr_assert_eq(d.memo_hits, 1);

    flash_ctx_reset(fx.ctx);
    User *c = wait_ok(User_get_by_id_async(fx.ctx, 7));
    d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(d.cache_hits, 1);
    cr_assert_eq(d.source_calls, 0);
    cr_assert_str_eq(c->username, "user7");
}

FLASH_TEST(engine, rows_round_trip_every_field_type_through_the_cache) {
    User *u = wait_ok(User_get_by_id_async(fx.ctx, 8));
    cr_assert_eq(u->id, 8);
    flash_ctx_reset(fx.ctx); /* u is gone with the request */
    User *v = wait_ok(User_get_by_id_async(fx.ctx, 8)); /* decoded from the cache */
    cr_assert_eq(stats_delta().cache_hits, 1);
    cr_assert_eq(v->id, 8);
    cr_assert_str_eq(v->first_name, "Edsger");
    cr_assert_str_eq(v->username, "user8");
    cr_assert_eq(v->age, 28);
    cr_assert_float_eq(v->score, 12.0, 1e-12);
    cr_assert_eq(v->active, true);
    cr_assert_eq(v->avatar.len, 3);
    cr_assert_eq(memcmp(v->avatar.data, "\0\1\2", 3), 0);
}

/* ---- the query forms ---- */

FLASH_TEST(engine, get_or_none_and_or_404_async_and_sync) {
    flash_promise *p = User_get_by_id_async(fx.ctx, 4242);
    cr_assert_eq(wait_rc(p), FLASH_ENOTFOUND);
    cr_assert(strstr(flash_promise_message(p), "User matching query does not exist"));
    cr_assert_null(wait_ok(User_get_by_id_async_or_none(fx.ctx, 4242)));
    cr_assert_eq(wait_rc(User_get_by_id_async_or_404(fx.ctx, 4242)), FLASH_E404);
    User *u = (User *)1;
    cr_assert_eq(User_get_by_id(fx.ctx, 4242, &u), FLASH_ENOTFOUND);
    cr_assert_null(u);
    cr_assert_eq(User_get_by_id_or_none(fx.ctx, 4242, &u), 0);
    cr_assert_null(u);
    cr_assert_eq(User_get_by_id_or_404(fx.ctx, 4242, &u), FLASH_E404);
    cr_assert_eq(User_get_by_username(fx.ctx, "user5", &u), 0);
    cr_assert_eq(u->id, 5);
    cr_assert_eq(User_get_by_id_or_404(fx.ctx, 5, &u), 0);
    cr_assert_eq(u->id, 5);
    /* Three keys in all (4242, "user5", 5): the or_ forms share the memo. */
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 3);
    cr_assert_eq(d.source_calls, 3);
}

FLASH_TEST(engine, not_found_is_cached_for_the_next_request) {
    cr_assert_eq(wait_rc(User_get_by_id_async(fx.ctx, 999)), FLASH_ENOTFOUND);
    cr_assert_eq(stats_delta().source_calls, 1);
    flash_ctx_reset(fx.ctx);
    cr_assert_eq(wait_rc(User_get_by_id_async(fx.ctx, 999)), FLASH_ENOTFOUND);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_hits, 1);
    cr_assert_eq(d.source_calls, 0);
}

FLASH_TEST(engine, filter_gives_lists_including_empty_ones_and_caches_them) {
    flash_list *ada = NULL, *nobody = NULL;
    cr_assert_eq(User_filter_by_first_name(fx.ctx, "Ada", &ada), 0);
    cr_assert_eq(ada->count, 20);
    for (size_t i = 0; i < ada->count; i++) cr_assert_str_eq(((User *)ada->items[i])->first_name, "Ada");
    cr_assert_eq(User_filter_by_first_name(fx.ctx, "Nobody", &nobody), 0);
    cr_assert_eq(nobody->count, 0);
    flash_ctx_reset(fx.ctx);
    stats_delta();
    cr_assert_eq(User_filter_by_first_name(fx.ctx, "Ada", &ada), 0);
    cr_assert_eq(User_filter_by_first_name(fx.ctx, "Nobody", &nobody), 0);
    flash_stats d = stats_delta();
    cr_assert_eq(ada->count, 20);
    cr_assert_eq(nobody->count, 0);
    cr_assert_eq(d.cache_hits, 2);
    cr_assert_eq(d.source_calls, 0);
}

FLASH_TEST(engine, count_ids_and_list_caches) {
    int64_t n = -1;
    flash_ids *ids = NULL;
    flash_list *evs = NULL;
    flash_promise *ps[3] = {ParticipantCount_resolve_async(fx.ctx, 2), ParticipantIds_resolve_async(fx.ctx, 2),
                            EventsOfOwner_resolve_async(fx.ctx, 1)};
    void **v = wait_ok(flash_gather(fx.ctx, 3, ps));
    cr_assert_eq(*(int64_t *)v[0], 5);
    ids = v[1];
    cr_assert_eq(ids->count, 5);
    evs = v[2];
    cr_assert_eq(evs->count, 4); /* events 1, 4, 7, 10 have owner 1 */
    cr_assert_eq(((Event *)evs->items[0])->id, 10, "the fallback's order is kept");
    cr_assert_eq(fx.fallback_calls, 1);
    cr_assert_eq(stats_delta().cache_round_trips, 1);

    flash_ctx_reset(fx.ctx);
    cr_assert_eq(ParticipantCount_resolve(fx.ctx, 2, &n), 0);
    cr_assert_eq(n, 5);
    cr_assert_eq(ParticipantIds_resolve(fx.ctx, 2, &ids), 0);
    cr_assert_eq(ids->count, 5);
    int64_t sum = 0;
    for (size_t i = 0; i < ids->count; i++) sum += ids->ids[i];
    cr_assert_eq(sum, 2 + 5 + 8 + 11 + 14, "the participants of event 2");
    cr_assert_eq(EventsOfOwner_resolve(fx.ctx, 1, &evs), 0);
    cr_assert_eq(evs->count, 4);
    cr_assert_eq(((Event *)evs->items[3])->id, 1);
    cr_assert_eq(fx.fallback_calls, 1, "served from the cache");
    cr_assert_eq(stats_delta().cache_hits, 3);
}

FLASH_TEST(engine, custom_fallback_gets_every_key_of_its_class_in_one_call_and_none_is_cached) {
    flash_promise *ps[3] = {EventCacheOnTitle_resolve_async(fx.ctx, "a"), EventCacheOnTitle_resolve_async(fx.ctx, "b"),
                            EventCacheOnTitle_resolve_async_or_none(fx.ctx, "none-c")};
    void **v = wait_ok(flash_gather(fx.ctx, 3, ps));
    cr_assert_str_eq(((Event *)v[0])->title, "a");
    cr_assert_null(v[2]);
    cr_assert_eq(fx.fallback_calls, 1);
    cr_assert_eq(fx.fallback_keys, 3);
    flash_ctx_reset(fx.ctx);
    cr_assert_null(wait_ok(EventCacheOnTitle_resolve_async_or_none(fx.ctx, "none-c")));
    cr_assert_eq(fx.fallback_calls, 1, "a cached none");
    /* With no_cache_none the fallback is asked again next time. */
    cr_assert_null(wait_ok(EventCacheOnTitleNoNone_resolve_async_or_none(fx.ctx, "none-d")));
    flash_ctx_reset(fx.ctx);
    cr_assert_null(wait_ok(EventCacheOnTitleNoNone_resolve_async_or_none(fx.ctx, "none-d")));
    cr_assert_eq(fx.fallback_calls, 3);
}

FLASH_TEST(engine, static_version_is_part_of_the_key) {
    char *key = NULL;
    size_t len = 0;
    bool hashed = true;
    flash_value v = flash_v_str("x y");
    cr_assert_eq(flash_cache_key(fx.ctx, &EventCacheOnTitle_class, &v, 1, &key, &len, &hashed), 0);
    cr_assert_str_eq(key, "flash:EventCacheOnTitle:v3:x%20y");
    cr_assert_eq(len, strlen(key));
    cr_assert_not(hashed);
}

FLASH_TEST(engine, lazy_queries_run_together_with_only_cache_and_none_on_exception) {
    flash_query *qs[3] = {User_get_by_id_query(fx.ctx, 1), EventCacheOnSlug_resolve_query(fx.ctx, "event1"),
                          User_get_by_id_query(fx.ctx, 5000)};
    void **out = NULL;
    /* only_cache on a cold cache: nothing is found and no source is asked. */
    cr_assert_eq(flash_queries(fx.ctx, 3, qs, FLASH_Q_ONLY_CACHE | FLASH_Q_NONE_ON_EXCEPTION, &out), 0);
    cr_assert_null(out[0]);
    cr_assert_null(out[1]);
    cr_assert_null(out[2]);
    flash_stats d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(d.source_calls, 0);
    /* Without only_cache: one batch, one round trip; the missing one fails
       the whole unless none_on_exception. */
    cr_assert_eq(flash_queries(fx.ctx, 3, qs, 0, &out), FLASH_ENOTFOUND);
    cr_assert_eq(flash_queries(fx.ctx, 3, qs, FLASH_Q_NONE_ON_EXCEPTION, &out), 0);
    cr_assert_eq(((User *)out[0])->id, 1);
    cr_assert_str_eq(((Event *)out[1])->slug, "event1");
    cr_assert_null(out[2]);
    d = stats_delta();
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(d.source_calls, 2);
    /* Now cached: only_cache finds them. */
    flash_ctx_reset(fx.ctx);
    flash_query *again[2] = {User_get_by_id_query(fx.ctx, 1), EventCacheOnSlug_resolve_query(fx.ctx, "event1")};
    cr_assert_eq(flash_queries(fx.ctx, 2, again, FLASH_Q_ONLY_CACHE, &out), 0);
    cr_assert_eq(((User *)out[0])->id, 1);
    cr_assert_eq(stats_delta().source_calls, 0);
}

FLASH_TEST(engine, max_batch_splits_a_tick_into_several_round_trips) {
    fixture_teardown();
    flash_desc d = {0};
    d.max_batch = 10;
    fixture_setup(&d);
    flash_promise *ps[25];
    for (int i = 0; i < 25; i++) ps[i] = User_get_by_id_async(fx.ctx, i + 1);
    void **v = wait_ok(flash_gather(fx.ctx, 25, ps));
    cr_assert_eq(((User *)v[24])->id, 25);
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_round_trips, 3);
    cr_assert_eq(s.source_calls, 3);
}

FLASH_TEST(engine, works_without_a_cache_backend) {
    fixture_teardown();
    flash_desc d = {0};
    d.cache.vt = NULL;
    fixture_setup(&d);
    flash_ctx_destroy(fx.ctx);
    flash_cache_destroy(fx.cache);
    fx.cache.vt = NULL;
    fx.ctx = flash_ctx_create(NULL); /* no cache at all */
    fixture_attach(fx.ctx);
    flash_ctx_set_source(fx.ctx, NULL, flash_table_source(fx.db));
    stats_delta();
    User *u = wait_ok(User_get_by_id_async(fx.ctx, 3));
    cr_assert_eq(u->id, 3);
    flash_stats s = flash_ctx_stats(fx.ctx);
    cr_assert_eq(s.cache_round_trips, 0);
    cr_assert_eq(s.source_calls, 1);
}

/* ---- failures: only the affected keys fail ---- */

FLASH_TEST(engine, a_failing_source_fails_its_class_only_and_is_not_cached) {
    flash_table_fail_next(fx.db, FLASH_ESOURCE, "database is down");
    flash_promise *ps[2] = {User_get_by_id_async(fx.ctx, 1), EventCacheOnSlug_resolve_async(fx.ctx, "event2")};
    void *v = NULL;
    cr_assert_eq(flash_wait(fx.ctx, flash_gather_settled(fx.ctx, 2, ps), &v), 0);
    flash_settled *s = v;
    /* The first fetch dispatched (User.id, first asked) fails. */
    cr_assert_eq(s[0].state, FLASH_REJECTED);
    cr_assert_eq(s[0].error, FLASH_ESOURCE);
    cr_assert_str_eq(s[0].message, "database is down");
    cr_assert_eq(s[1].state, FLASH_FULFILLED);
    cr_assert_str_eq(((Event *)s[1].value)->slug, "event2");
    flash_ctx_reset(fx.ctx);
    stats_delta();
    cr_assert_eq(((User *)wait_ok(User_get_by_id_async(fx.ctx, 1)))->id, 1);
    cr_assert_eq(stats_delta().source_calls, 1, "the failure was not cached");
}

FLASH_TEST(engine, no_source_is_a_clear_error) {
    flash_ctx_destroy(fx.ctx);
    fx.ctx = flash_ctx_create(NULL);
    flash_promise *p = User_get_by_id_async(fx.ctx, 1);
    cr_assert_eq(wait_rc(p), FLASH_ESOURCE);
    cr_assert(strstr(flash_promise_message(p), "no source for model User"));
}

/* A backend whose every operation fails: the engine falls back to the source
   (or fails the keys with fail_on_cache_error). It completes on the next
   tick, as the vtable requires. */
static void failing_fire(void *arg) {
    flash_cache_op *op = arg;
    op->status = FLASH_EBACKEND;
    for (size_t i = 0; i < op->count; i++) op->items[i].status = FLASH_EBACKEND;
    op->done(op);
}
static void failing_submit(void *self, flash_loop loop, flash_cache_op *op) {
    (void)self;
    op->priv[1] = (void *)loop.vt;
    op->priv[2] = loop.native;
    op->priv[0] = loop.vt->defer(loop.native, failing_fire, op);
}
static void failing_cancel(void *self, flash_cache_op *op) {
    (void)self;
    ((const flash_loop_vtable *)op->priv[1])->cancel(op->priv[2], op->priv[0]);
}
static size_t failing_max(void *self) {
    (void)self;
    return 1 << 20;
}
static void failing_destroy(void *self) { (void)self; }
static const flash_cache_vtable failing_vt = {"failing", failing_submit, failing_cancel, failing_max, failing_destroy, 0};

FLASH_TEST(engine, a_failing_cache_falls_back_to_the_source) {
    fixture_teardown();
    flash_desc d = {0};
    d.cache.vt = &failing_vt;
    fixture_setup(&d);
    User *u = wait_ok(User_get_by_id_async(fx.ctx, 9));
    cr_assert_eq(u->id, 9);
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_errors, 1);
    cr_assert_eq(s.source_calls, 1);
    cr_assert_eq(s.fills, 0, "nothing is written to a failing backend");
}

FLASH_TEST(engine, fail_on_cache_error_rejects_with_the_backend_error) {
    fixture_teardown();
    flash_desc d = {0};
    d.cache.vt = &failing_vt;
    d.fail_on_cache_error = true;
    fixture_setup(&d);
    flash_promise *p = User_get_by_id_async(fx.ctx, 9);
    cr_assert_eq(wait_rc(p), FLASH_EBACKEND);
    cr_assert(strstr(flash_promise_message(p), "cache backend failed"));
    cr_assert_eq(stats_delta().source_calls, 0);
}

FLASH_TEST(engine, a_value_over_the_backend_limit_is_answered_not_cached_and_logged) {
    fixture_teardown();
    flash_memory_desc md = {0};
    md.max_value = 64;
    flash_desc d = {0};
    d.cache = flash_memory_create(&md);
    fixture_setup(&d);
    fx.cache = d.cache;
    char big[200];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    User u = {500, "Big", big, 1, 1.0, true, {NULL, 0}};
    flash_table_put(fx.db, &User_model, &u);
    User *got = wait_ok(User_get_by_id_async(fx.ctx, 500));
    cr_assert_str_eq(got->username, big);
    flash_stats s = stats_delta();
    cr_assert_eq(s.fills_skipped, 1);
    cr_assert_eq(s.fills, 0);
    cr_assert(strstr(fx.log, "over the backend limit of 64: not cached"), "log: %s", fx.log);
    flash_ctx_reset(fx.ctx);
    wait_ok(User_get_by_id_async(fx.ctx, 500));
    cr_assert_eq(stats_delta().source_calls, 1, "it was not cached");
}

/* A fallback that answers with rows nobody asked for and a duplicate. */
static void sloppy_fallback(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx;
    (void)ud;
    Event stranger = {77, "stranger", "nobody asked", 0};
    cr_assert_eq(flash_fetch_row(f, &stranger), FLASH_ENOTFOUND);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        const char *slug = flash_fetch_key(f, i)[0].u.s.ptr;
        Event e = {(int64_t)i, slug, "first", 0};
        flash_fetch_row(f, &e);
        if (strcmp(slug, "twice") == 0) {
            e.title = "second";
            cr_assert_eq(flash_fetch_row(f, &e), FLASH_EMULTIPLE);
        }
    }
    flash_fetch_done(f, 0, NULL);
}
FLASH_INSTANCE_CACHE_OPT(SloppyEventCache, Event, (slug), .fallback = sloppy_fallback)

FLASH_TEST(engine, stray_rows_are_ignored_and_duplicates_fail_only_their_key) {
    flash_promise *ps[2] = {SloppyEventCache_resolve_async(fx.ctx, "once"), SloppyEventCache_resolve_async(fx.ctx, "twice")};
    void *v = NULL;
    cr_assert_eq(flash_wait(fx.ctx, flash_gather_settled(fx.ctx, 2, ps), &v), 0);
    flash_settled *s = v;
    cr_assert_eq(s[0].state, FLASH_FULFILLED);
    cr_assert_str_eq(((Event *)s[0].value)->title, "first");
    cr_assert_eq(s[1].state, FLASH_REJECTED);
    cr_assert_eq(s[1].error, FLASH_EMULTIPLE);
    cr_assert(strstr(s[1].message, "more than one Event"));
}

/* Write raw bytes under a query's key through the backend itself. */
static void raw_done(flash_cache_op *op) { *(int *)op->data = 1; }
/* GET values live only until done returns: keep a copy. */
static char raw_value[65536]; /* a 10 kB key is stored twice: key and row */
static size_t raw_value_len;
static void raw_get_done(flash_cache_op *op) {
    raw_value_len = op->items[0].value_len < sizeof raw_value ? op->items[0].value_len : 0;
    memcpy(raw_value, op->items[0].value, raw_value_len);
    *(int *)op->data = 1;
}
static void raw_set(const flash_class *c, flash_value v, const void *value, size_t len) {
    char *key;
    size_t klen;
    int done = 0;
    cr_assert_eq(flash_cache_key(fx.ctx, c, &v, 1, &key, &klen, NULL), 0);
    flash_cache_item it = {.key = key, .key_len = klen, .value = value, .value_len = len};
    flash_cache_op op = {.code = FLASH_CACHE_SET, .items = &it, .count = 1, .done = raw_done, .data = &done};
    fx.cache.vt->submit(fx.cache.self, flash_ctx_loop(fx.ctx), &op);
    while (!done) fixture_run_once(true);
    cr_assert_eq(it.status, 0);
}

/* ---- bad input ---- */

FLASH_TEST(engine, wrong_arity_and_wrong_types_are_rejected_clearly) {
    flash_value two[2] = {flash_v_i64(1), flash_v_i64(2)};
    flash_promise *p = flash_query_async(fx.ctx, &User__get_by_id, two, 2, 0);
    cr_assert_eq(wait_rc(p), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(p), "User.id takes 1 key value, got 2");
    flash_value s = flash_v_str("1");
    p = flash_query_async(fx.ctx, &User__get_by_id, &s, 1, 0);
    cr_assert_eq(wait_rc(p), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(p), "User.id: key field 'id' is I64, got STR");
    p = flash_query_async(fx.ctx, NULL, &s, 1, 0);
    cr_assert_eq(wait_rc(p), FLASH_EINVAL);
    /* With none_on_exception even bad input gives NULL. */
    cr_assert_null(wait_ok(flash_query_async(fx.ctx, &User__get_by_id, &s, 1, FLASH_Q_NONE_ON_EXCEPTION)));
    cr_assert_eq(stats_delta().cache_round_trips, 0);
}

FLASH_TEST(engine, string_keys_with_spaces_newlines_and_colons_round_trip) {
    const char *name = "a b\nc:d%N";
    User u = {600, "Odd", name, 1, 1.0, false, {NULL, 0}};
    flash_table_put(fx.db, &User_model, &u);
    User *got = NULL;
    cr_assert_eq(User_get_by_username(fx.ctx, name, &got), 0);
    cr_assert_eq(got->id, 600);
    char *key;
    size_t len;
    flash_value v = flash_v_str(name);
    cr_assert_eq(flash_cache_key(fx.ctx, &User__get_by_username, &v, 1, &key, &len, NULL), 0);
    cr_assert_str_eq(key, "flash:User.username:v1:a%20b%0Ac%3Ad%25N");
    for (size_t i = 0; i < len; i++) cr_assert(key[i] > ' ' && key[i] < 0x7f);
    flash_ctx_reset(fx.ctx);
    cr_assert_eq(User_get_by_username(fx.ctx, name, &got), 0);
    cr_assert_eq(got->id, 600);
    cr_assert_eq(stats_delta().cache_hits, 1);
}

FLASH_TEST(engine, nul_bytes_and_invalid_utf8_in_string_keys_are_rejected) {
    flash_value nul = flash_v_strn("a\0b", 3);
    flash_promise *p = flash_query_async(fx.ctx, &User__get_by_username, &nul, 1, 0);
    cr_assert_eq(wait_rc(p), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "NUL byte"));
    const char bad[] = {'a', (char)0xC3, (char)0x28, 0};
    User *u;
    p = User_get_by_username_async(fx.ctx, bad);
    cr_assert_eq(wait_rc(p), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "not valid UTF-8"));
    cr_assert_eq(User_get_by_username(fx.ctx, "caf\xc3\xa9", &u), FLASH_ENOTFOUND, "valid UTF-8 is fine");
    /* The bad ones never reached the backend; the good one did. */
    cr_assert_eq(stats_delta().cache_keys, 1);
}

FLASH_TEST(engine, a_10kB_key_is_hashed_and_its_full_key_checked_on_read) {
    static char name[10 * 1024 + 1];
    memset(name, 'n', sizeof name - 1);
    User u = {700, "Long", name, 1, 1.0, false, {NULL, 0}};
    flash_table_put(fx.db, &User_model, &u);
    char *key;
    size_t len;
    bool hashed = false;
    flash_value v = flash_v_str(name);
    cr_assert_eq(flash_cache_key(fx.ctx, &User__get_by_username, &v, 1, &key, &len, &hashed), 0);
    cr_assert(hashed);
    cr_assert_leq(len, 250);
    cr_assert_eq(strncmp(key, "flash:User.username:v1:#", 24), 0);
    char first_key[256];
    snprintf(first_key, sizeof first_key, "%s", key); /* key dies at reset */
    User *got = NULL;
    cr_assert_eq(User_get_by_username(fx.ctx, name, &got), 0);
    cr_assert_eq(got->id, 700);
    flash_ctx_reset(fx.ctx);
    stats_delta();
    cr_assert_eq(User_get_by_username(fx.ctx, name, &got), 0);
    cr_assert_eq(stats_delta().cache_hits, 1);
    /* Another long key whose value sits at this hashed key (a collision,
       forged): the full key inside the value does not match -> a miss. */
    name[0] = 'm';
    flash_ctx_reset(fx.ctx);
    User other = {701, "Long", name, 1, 1.0, false, {NULL, 0}};
    flash_table_put(fx.db, &User_model, &other);
    char *key2;
    size_t len2;
    flash_value v2 = flash_v_str(name);
    cr_assert_eq(flash_cache_key(fx.ctx, &User__get_by_username, &v2, 1, &key2, &len2, NULL), 0);
    cr_assert_str_neq(first_key, key2);
    /* Forge the collision: copy the first key's cached value under the
       second key. Reading it must not return user 700. */
    char *vkey = first_key;
    flash_cache_item get = {.key = vkey, .key_len = strlen(vkey)};
    int done = 0;
    flash_cache_op op = {.code = FLASH_CACHE_GET, .items = &get, .count = 1, .done = raw_get_done, .data = &done};
    fx.cache.vt->submit(fx.cache.self, flash_ctx_loop(fx.ctx), &op);
    while (!done) fixture_run_once(true);
    cr_assert_eq(get.status, 0);
    cr_assert_gt(raw_value_len, 10 * 1024, "the value holds the full key");
    raw_set(&User__get_by_username, v2, raw_value, raw_value_len);
    stats_delta();
    cr_assert_eq(User_get_by_username(fx.ctx, name, &got), 0);
    cr_assert_eq(got->id, 701, "the full key inside the value did not match: a miss");
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_misses, 1);
    cr_assert_eq(s.source_calls, 1);
}

FLASH_TEST(engine, a_corrupt_cached_value_is_a_miss_replaced_and_logged) {
    raw_set(&User__get_by_id, flash_v_i64(11), "\xF2\x00", 2); /* truncated header */
    User *u = wait_ok(User_get_by_id_async(fx.ctx, 11));
    cr_assert_eq(u->id, 11);
    cr_assert(strstr(fx.log, "corrupt cached value"), "log: %s", fx.log);
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_misses, 1);
    cr_assert_eq(s.fills, 1);
    flash_ctx_reset(fx.ctx);
    wait_ok(User_get_by_id_async(fx.ctx, 11));
    cr_assert_eq(stats_delta().cache_hits, 1, "the corrupt value was replaced");
}

/* "SchemaProbe" on ProbeB here, on ProbeA in models.c: same keys, other
   schema. */
#define PROBE_B_FIELDS(F) F(I64, id) F(I64, weight) F(BOOL, flag)
FLASH_MODEL(ProbeB, PROBE_B_FIELDS)
FLASH_INSTANCE_CACHE(SchemaProbe, ProbeB, (id))

FLASH_TEST(engine, a_value_of_another_schema_is_a_miss) {
    const char *name = schema_probe_a(fx.ctx, fx.db, 2, "from A"); /* cached with ProbeA's schema */
    cr_assert_str_eq(name, "from A");
    fixture_settle();
    flash_ctx_reset(fx.ctx);
    ProbeB b = {2, 77, true};
    flash_table_put(fx.db, &ProbeB_model, &b);
    stats_delta();
    ProbeB *got = wait_ok(SchemaProbe_resolve_async(fx.ctx, 2));
    cr_assert_eq(got->weight, 77, "never ProbeA's bytes read as a ProbeB");
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_misses, 1);
    cr_assert_eq(s.source_calls, 1);
    cr_assert_not(strstr(fx.log, "corrupt"), "another schema is not corruption: %s", fx.log);
}

/* ---- registration ---- */

FLASH_TEST(engine, models_and_classes_are_registered_once_across_files) {
    cr_assert_eq(other_tu_user_by_id()->canonical, User__get_by_id.canonical);
    cr_assert_eq(other_tu_user_model()->canonical, User_model.canonical);
    cr_assert_neq((const void *)other_tu_user_by_id(), (const void *)&User__get_by_id, "really two copies");
    const flash_model *m = flash_model_find("User");
    cr_assert_not_null(m);
    cr_assert_eq(m->nfields, 7);
    cr_assert_eq(flash_model_field(m, "username"), 2);
    cr_assert_eq(flash_model_field(m, "nope"), -1);
    int classes = 0;
    for (const flash_class *c = m->classes; c; c = c->next) classes++;
    cr_assert_eq(classes, 3, "User.id, User.username, User.filter.first_name");
    int models = 0;
    for (const flash_model *it = flash_models(); it; it = it->next) models++;
    cr_assert_geq(models, 3);
    cr_assert_eq(User__get_by_id.canonical->opts.timeout_s, 7 * 24 * 3600, "default timeout: one week");
    cr_assert_eq(EventCacheOnTitle_class.canonical->opts.version, 3);
}

/* ---- lifecycle ---- */

static int reset_done;
static flash_promise *reset_on_value(flash_ctx *ctx, void *value, void *arg) {
    (void)value;
    (void)arg;
    flash_ctx_reset(ctx);
    reset_done = 1;
    return flash_fulfilled(ctx, NULL);
}

FLASH_TEST(engine, reset_while_batches_and_fills_are_in_flight_is_safe) {
    /* Reset from a callback of the first query while its fill is in flight. */
    reset_done = 0;
    flash_then(fx.ctx, User_get_by_id_async(fx.ctx, 1), reset_on_value, NULL);
    for (int i = 0; i < 50 && !reset_done; i++) fixture_run_once(true);
    cr_assert(reset_done);
    /* The new request works, and the old request's fill still landed. */
    flash_promise *b = User_get_by_id_async(fx.ctx, 1);
    cr_assert_eq(((User *)wait_ok(b))->id, 1);
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_hits, 1, "the fill of the reset request completed");
    /* A GET in flight at reset is cancelled: no callback, no leak. A gate
       holds it in flight whatever the loop. */
    gate *g = gate_create(fx.cache, fx.lp);
    flash_desc d = {0};
    d.cache = gate_cache(g);
    flash_ctx *c = flash_ctx_create(&d);
    fixture_attach(c);
    flash_ctx_set_source(c, NULL, flash_table_source(fx.db));
    gate_shut(g, true);
    User_get_by_id_async(c, 3);
    for (int i = 0; i < 100 && !gate_waiting(g); i++) fixture_run_once(false);
    cr_assert_eq(gate_waiting(g), 1, "the GET is in flight");
    flash_ctx_reset(c); /* cancels it: the gate drops it */
    cr_assert_eq(gate_waiting(g), 0);
    fixture_settle();
    cr_assert_not(flash_ctx_busy(c));
    cr_assert_eq(flash_ctx_stats(c).cache_round_trips, 0, "the cancelled GET never completed");
    flash_ctx_destroy(c);
    gate_destroy(g);
}

FLASH_TEST(engine, destroy_with_work_in_flight_leaks_nothing) {
    for (int i = 1; i <= 20; i++) User_get_by_id_async(fx.ctx, i);
    fixture_run_once(false);
    fixture_run_once(false);
    /* fixture_teardown destroys the context with the batch in flight. */
}
