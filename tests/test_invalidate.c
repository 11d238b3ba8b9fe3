/* The invalidation API and the rules of the read path around it: markers
   and the lag window, CAS lost to eviction, dynamic versions and an evicted
   version key, allowtime with one refresher, OFF, bad input. */
#include <stdio.h>
#include <string.h>

#include "consistency.h"
#include "harness.h"
#include "models.h"

#define MEMBER_FIELDS(F) F(I64, id) F(STR, name) F(I64, team)
FLASH_MODEL_OPT(DynMember, MEMBER_FIELDS, .invalidation = FLASH_INVALIDATE_DYNAMIC)
FLASH_GET_KEYS(DynMember, (id))
FLASH_FILTER_KEYS(DynMember, (team))
FLASH_MODEL_OPT(SoftMember, MEMBER_FIELDS, .allowtime_s = 10)
FLASH_GET_KEYS(SoftMember, (id))
FLASH_MODEL_OPT(OffMember, MEMBER_FIELDS, .invalidation = FLASH_INVALIDATE_OFF)
FLASH_GET_KEYS(OffMember, (id))

static int64_t now_ms = 1800000000000;
static int64_t clock_fn(void *ud) {
    (void)ud;
    return now_ms;
}

static void setup(void) {
    flash_desc d = {0};
    d.clock_ms = clock_fn;
    fixture_setup(&d);
}
static void teardown(void) { fixture_teardown(); }
TestSuite(invalidate, .init = setup, .fini = teardown);

/* Another request: a context on cache and the fixture's loop and database. */
static flash_ctx *ctx_on(flash_cache cache) {
    flash_desc d = {0};
    d.cache = cache;
    d.clock_ms = clock_fn;
    flash_ctx *c = flash_ctx_create(&d);
    flash_poll_attach(c, fx.loop);
    flash_ctx_set_source(c, NULL, flash_table_source(fx.db));
    return c;
}
static flash_ctx *other_ctx(void) { return ctx_on(fx.cache); }

/* A reader r on gate g asks for User id: its GET is let through, the source
   answers, and its fill is held at the gate. */
static flash_promise *read_until_the_fill(gate *g, flash_ctx *r, int64_t id) {
    gate_shut(g, true);
    flash_promise *p = User_get_by_id_async(r, id);
    run_until_idle(fx.lp);
    cr_assert(gate_release(g), "the GET");
    run_until_idle(fx.lp); /* the source answers; the fill waits */
    cr_assert_eq(gate_waiting(g), 1, "the fill is held");
    return p;
}

static void *get(flash_ctx *ctx, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "%s: %s", flash_strerror(rc), flash_promise_message(p));
    return v;
}

static void settle_writes(void) {
    while (flash_poll_run_once(fx.loop, false) > 0) {
    }
}

FLASH_TEST(invalidate, a_write_then_invalidate_makes_every_class_answer_the_new_row) {
    /* Warm three classes of User with user 5. */
    User *u = get(fx.ctx, User_get_by_id_async(fx.ctx, 5));
    cr_assert_str_eq(u->username, "user5");
    get(fx.ctx, User_get_by_username_async(fx.ctx, "user5"));
    flash_list *l = get(fx.ctx, User_filter_by_first_name_async(fx.ctx, "Ada"));
    cr_assert_eq(l->count, 20);
    settle_writes();
    User old_row = *u;
    User new_row = *u;
    new_row.username = "renamed";
    new_row.first_name = "Grace";
    cr_assert_eq(flash_table_put(fx.db, &User_model, &new_row), 0);
    stats_delta();
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &old_row, &new_row), 0);
    flash_stats s = stats_delta();
    /* id (one key), username old+new, first_name old+new */
    cr_assert_eq(s.invalidations, 5);
    cr_assert_eq(s.writes, 1, "all markers in one multi-operation");

    now_ms += 1000; /* past the lag window */
    flash_ctx *c = other_ctx();
    cr_assert_str_eq(((User *)get(c, User_get_by_id_async(c, 5)))->username, "renamed");
    cr_assert_eq(((User *)get(c, User_get_by_username_async(c, "renamed")))->id, 5);
    cr_assert_eq(flash_wait(c, User_get_by_username_async(c, "user5"), NULL), FLASH_ENOTFOUND);
    cr_assert_eq(((flash_list *)get(c, User_filter_by_first_name_async(c, "Ada")))->count, 19);
    cr_assert_eq(((flash_list *)get(c, User_filter_by_first_name_async(c, "Grace")))->count, 21);
    flash_ctx_destroy(c);
}

FLASH_TEST(invalidate, created_and_deleted_rows_and_many_rows_at_once) {
    /* A cached not-found becomes the row once it is created. */
    cr_assert_eq(flash_wait(fx.ctx, User_get_by_id_async(fx.ctx, 300), NULL), FLASH_ENOTFOUND);
    settle_writes();
    User created = {300, "New", "newbie", 1, 1.0, true, {NULL, 0}};
    flash_table_put(fx.db, &User_model, &created);
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, NULL, &created), 0);
    /* A deleted row becomes not-found. */
    User *gone = get(fx.ctx, User_get_by_id_async(fx.ctx, 6));
    User gone_row = *gone;
    settle_writes();
    flash_table_delete(fx.db, &User_model, flash_v_i64(6));
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &gone_row, NULL), 0);
    now_ms += 1000;
    flash_ctx *c = other_ctx();
    cr_assert_str_eq(((User *)get(c, User_get_by_id_async(c, 300)))->username, "newbie");
    cr_assert_eq(flash_wait(c, User_get_by_id_async(c, 6), NULL), FLASH_ENOTFOUND);
    flash_ctx_destroy(c);

    /* Ten rows: one operation, deduplicated keys (first names repeat). */
    const User *rows[10];
    for (int i = 0; i < 10; i++) rows[i] = flash_table_find(fx.db, &User_model, flash_v_i64(10 + i));
    stats_delta();
    cr_assert_eq(flash_wait(fx.ctx, flash_invalidate_rows_async(fx.ctx, &User_model, 10, (const void *const *)rows, NULL), NULL), 0);
    flash_stats s = stats_delta();
    cr_assert_eq(s.invalidations, 10 + 10 + 5, "ids, usernames, five first names");
    cr_assert_eq(s.writes, 1);

    /* 20,000 rows, old and new (a bulk UPDATE): the keys are deduplicated
       by a hash set that grows with them, old and new rows sharing keys. */
    enum { N = 20000 };
    User *olds = flash_calloc(fx.ctx, N, sizeof *olds), *news = flash_calloc(fx.ctx, N, sizeof *news);
    const void **op = flash_calloc(fx.ctx, N, sizeof *op), **np = flash_calloc(fx.ctx, N, sizeof *np);
    static const char *const firsts[] = {"Ann", "Bob", "Cy"};
    for (int i = 0; i < N; i++) {
        olds[i].id = news[i].id = 100000 + i;
        olds[i].username = news[i].username = flash_sprintf(fx.ctx, "bulk%d", i);
        olds[i].first_name = firsts[i % 3];
        news[i].first_name = firsts[(i + 1) % 3];
        op[i] = &olds[i];
        np[i] = &news[i];
    }
    stats_delta();
    cr_assert_eq(flash_wait(fx.ctx, flash_invalidate_rows_async(fx.ctx, &User_model, N, op, np), NULL), 0);
    s = stats_delta();
    cr_assert_eq(s.invalidations, N + N + 3, "ids, usernames, three first names: %llu",
                 (unsigned long long)s.invalidations);
}

FLASH_TEST(invalidate, the_request_memo_forgets_what_was_written) {
    User *before = get(fx.ctx, User_get_by_id_async(fx.ctx, 7));
    User row = *before;
    row.username = "seven";
    flash_table_put(fx.db, &User_model, &row);
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, before, &row), 0);
    /* Same request: the memo no longer answers with the old row. */
    cr_assert_str_eq(((User *)get(fx.ctx, User_get_by_id_async(fx.ctx, 7)))->username, "seven");
}

FLASH_TEST(invalidate, inside_the_lag_window_readers_read_the_source_but_do_not_fill) {
    User *u = get(fx.ctx, User_get_by_id_async(fx.ctx, 8));
    User row = *u;
    settle_writes();
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &row, &row), 0);
    flash_ctx_reset(fx.ctx);
    stats_delta();
    now_ms += 100; /* inside the default 300 ms */
    get(fx.ctx, User_get_by_id_async(fx.ctx, 8));
    settle_writes();
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_misses, 1);
    cr_assert_eq(s.source_calls, 1);
    cr_assert_eq(s.fills, 0, "a replica may not have the write yet");
    flash_ctx_reset(fx.ctx);
    now_ms += 400; /* past it: the marker is replaced (CAS) */
    get(fx.ctx, User_get_by_id_async(fx.ctx, 8));
    settle_writes();
    s = stats_delta();
    cr_assert_eq(s.source_calls, 1);
    cr_assert_eq(s.fills, 1);
    cr_assert_eq(s.fills_skipped, 0);
    flash_ctx_reset(fx.ctx);
    get(fx.ctx, User_get_by_id_async(fx.ctx, 8));
    cr_assert_eq(stats_delta().cache_hits, 1);
}

/* Delete a key straight from the backend (eviction, as the reader sees it). */
static void done_flag(flash_cache_op *op) { *(int *)op->data = 1; }
static void evict(const char *key) {
    int done = 0;
    flash_cache_item it = {.key = key, .key_len = strlen(key)};
    flash_cache_op op = {.code = FLASH_CACHE_DELETE, .items = &it, .count = 1, .done = done_flag, .data = &done};
    fx.cache.vt->submit(fx.cache.self, flash_poll_loop(fx.loop), &op);
    while (!done) flash_poll_run_once(fx.loop, true);
}

FLASH_TEST(invalidate, a_marker_evicted_before_the_fill_drops_the_fill_and_stays_correct) {
    User *u = get(fx.ctx, User_get_by_id_async(fx.ctx, 9));
    User row = *u;
    settle_writes();
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &row, &row), 0);
    flash_ctx_reset(fx.ctx);
    now_ms += 1000;
    /* The reader sees the marker; the marker is evicted before its CAS. A
       gate holds the reader's operations until released. */
    gate *g = gate_create(fx.cache, fx.lp);
    flash_ctx *r = ctx_on(gate_cache(g));
    flash_promise *p = read_until_the_fill(g, r, 9); /* saw the marker: a CAS fill */
    evict("flash:User.id:v1:9");
    cr_assert(gate_release(g), "the fill");
    cr_assert_str_eq(((User *)get(r, p))->username, "user9");
    flash_stats s = flash_ctx_stats(r);
    flash_ctx_destroy(r);
    gate_destroy(g);
    cr_assert_eq(s.fills, 1);
    cr_assert_eq(s.fills_skipped, 1, "the CAS found nothing: not stored");
    stats_delta();
    /* The next reader finds nothing and fills with add. */
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((User *)get(fx.ctx, User_get_by_id_async(fx.ctx, 9)))->username, "user9");
    settle_writes();
    flash_ctx_reset(fx.ctx);
    get(fx.ctx, User_get_by_id_async(fx.ctx, 9));
    cr_assert_eq(stats_delta().cache_hits, 1);
}

/* Write raw bytes at a key, as a foreign or damaged writer would. */
static void put_raw(const char *key, const char *value, size_t len) {
    int done = 0;
    flash_cache_item it = {.key = key, .key_len = strlen(key), .value = value, .value_len = len, .ttl_s = 60};
    flash_cache_op op = {.code = FLASH_CACHE_SET, .items = &it, .count = 1, .done = done_flag, .data = &done};
    fx.cache.vt->submit(fx.cache.self, flash_poll_loop(fx.loop), &op);
    while (!done) flash_poll_run_once(fx.loop, true);
    cr_assert_eq(it.status, 0);
}

FLASH_TEST(invalidate, a_corrupt_value_replaced_while_a_write_lands_keeps_the_writers_marker) {
    /* A reader finds a corrupt value, reads the source (the old row) and
       is held before its fill; meanwhile a writer commits and invalidates.
       The fill must not overwrite the marker (a blind set would cache the
       old row until its timeout). */
    put_raw("flash:User.id:v1:12", "\xF2\x00garbage", 9);
    gate *g = gate_create(fx.cache, fx.lp);
    flash_ctx *r = ctx_on(gate_cache(g));
    flash_promise *p = read_until_the_fill(g, r, 12); /* saw the corrupt value */
    User old = *(User *)get(r, p), now = old;
    cr_assert_str_eq(old.username, "user12");
    now.username = "renamed12";
    flash_table_put(fx.db, &User_model, &now);
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &old, &now), 0);
    settle_writes();
    cr_assert(gate_release(g), "the fill");
    run_until_idle(fx.lp);
    flash_stats s = flash_ctx_stats(r);
    flash_ctx_destroy(r);
    gate_destroy(g);
    cr_assert_eq(s.fills, 1);
    cr_assert_eq(s.fills_skipped, 1, "the fill lost its CAS to the writer's marker");
    now_ms += 1000; /* past the lag window */
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((User *)get(fx.ctx, User_get_by_id_async(fx.ctx, 12)))->username, "renamed12");
}

FLASH_TEST(invalidate, dynamic_versions_are_bumped_and_an_evicted_version_key_is_version_zero) {
    DynMember m1 = {1, "one", 7}, m2 = {2, "two", 7};
    flash_table_put(fx.db, &DynMember_model, &m1);
    flash_table_put(fx.db, &DynMember_model, &m2);
    cr_assert_str_eq(((DynMember *)get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 1)))->name, "one");
    cr_assert_eq(((flash_list *)get(fx.ctx, DynMember_filter_by_team_async(fx.ctx, 7)))->count, 2);
    settle_writes();
    flash_ctx_reset(fx.ctx);
    stats_delta();
    get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 1));
    cr_assert_eq(stats_delta().cache_hits, 1, "version 0 values hit while the version key is absent");

    /* A write bumps the versions of both classes: one incr op. */
    m1.name = "uno";
    flash_table_put(fx.db, &DynMember_model, &m1);
    cr_assert_eq(flash_invalidate(fx.ctx, &DynMember_model, &m1, &m1), 0);
    flash_stats s = stats_delta();
    cr_assert_eq(s.invalidations, 2, "two classes, two version keys");
    cr_assert_eq(s.writes, 1);
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((DynMember *)get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 1)))->name, "uno");
    cr_assert_str_eq(((DynMember *)get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 2)))->name, "two");
    s = stats_delta();
    cr_assert_eq(s.cache_misses, 2, "every value of the old version is a miss, even untouched rows");
    cr_assert_eq(s.cache_round_trips, 2, "the version key travels in the same get-many");
    settle_writes();
    flash_ctx_reset(fx.ctx);
    get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 2));
    cr_assert_eq(stats_delta().cache_hits, 1, "refilled under the new version");

    /* The version key is evicted: version 0 again, the values written under
       the bumped version are misses, refilled; nothing stale is served. */
    evict("flash:DynMember.id:v1:@version");
    m2.name = "dos";
    flash_table_put(fx.db, &DynMember_model, &m2); /* written without invalidation */
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((DynMember *)get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 2)))->name, "dos");
    cr_assert_eq(stats_delta().cache_misses, 1);
    /* flash_bump_version bumps all DYNAMIC classes of the model. */
    settle_writes();
    cr_assert_eq(flash_bump_version(fx.ctx, &DynMember_model), 0);
    cr_assert_eq(stats_delta().invalidations, 2);
    flash_ctx_reset(fx.ctx);
    get(fx.ctx, DynMember_get_by_id_async(fx.ctx, 2));
    cr_assert_eq(stats_delta().cache_misses, 1);
}

FLASH_TEST(invalidate, allowtime_serves_the_stale_value_while_one_reader_refreshes) {
    SoftMember m = {1, "before", 1};
    flash_table_put(fx.db, &SoftMember_model, &m);
    get(fx.ctx, SoftMember_get_by_id_async(fx.ctx, 1));
    settle_writes();
    m.name = "after";
    flash_table_put(fx.db, &SoftMember_model, &m);
    cr_assert_eq(flash_invalidate(fx.ctx, &SoftMember_model, &m, &m), 0);
    flash_ctx_reset(fx.ctx);
    now_ms += 1000; /* past the lag window, inside allowtime (10 s) */
    /* Two requests at once: both are served the stale value at once, one of
       them takes the lock and refreshes. */
    flash_ctx *c = other_ctx();
    stats_delta();
    flash_promise *a = SoftMember_get_by_id_async(fx.ctx, 1);
    flash_promise *b = SoftMember_get_by_id_async(c, 1);
    cr_assert_str_eq(((SoftMember *)get(fx.ctx, a))->name, "before");
    cr_assert_str_eq(((SoftMember *)get(c, b))->name, "before");
    settle_writes();
    flash_stats s1 = stats_delta(), s2 = flash_ctx_stats(c);
    cr_assert_eq(s1.source_calls + s2.source_calls, 1, "one refresher");
    cr_assert_eq(s1.fills + s2.fills, 1);
    flash_ctx_destroy(c);
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((SoftMember *)get(fx.ctx, SoftMember_get_by_id_async(fx.ctx, 1)))->name, "after");
    cr_assert_eq(stats_delta().cache_hits, 1, "the refreshed value");

    /* Past allowtime a stale value is not served: a miss. */
    m.name = "later";
    flash_table_put(fx.db, &SoftMember_model, &m);
    cr_assert_eq(flash_invalidate(fx.ctx, &SoftMember_model, &m, &m), 0);
    flash_ctx_reset(fx.ctx);
    now_ms += 11000;
    cr_assert_str_eq(((SoftMember *)get(fx.ctx, SoftMember_get_by_id_async(fx.ctx, 1)))->name, "later");
}

FLASH_TEST(invalidate, off_classes_are_left_alone_until_their_timeout) {
    OffMember m = {1, "kept", 1};
    flash_table_put(fx.db, &OffMember_model, &m);
    get(fx.ctx, OffMember_get_by_id_async(fx.ctx, 1));
    settle_writes();
    m.name = "changed";
    flash_table_put(fx.db, &OffMember_model, &m);
    stats_delta();
    cr_assert_eq(flash_invalidate(fx.ctx, &OffMember_model, &m, &m), 0);
    cr_assert_eq(stats_delta().invalidations, 0);
    flash_ctx_reset(fx.ctx);
    cr_assert_str_eq(((OffMember *)get(fx.ctx, OffMember_get_by_id_async(fx.ctx, 1)))->name, "kept");
}

FLASH_TEST(invalidate, queries_can_be_invalidated_by_hand) {
    get(fx.ctx, User_get_by_id_async(fx.ctx, 11));
    get(fx.ctx, EventCacheOnSlug_resolve_async(fx.ctx, "event3"));
    settle_writes();
    flash_query *qs[2] = {User_get_by_id_query(fx.ctx, 11), EventCacheOnSlug_resolve_query(fx.ctx, "event3")};
    stats_delta();
    cr_assert_eq(flash_invalidate_queries(fx.ctx, 2, qs), 0);
    cr_assert_eq(stats_delta().invalidations, 2);
    flash_ctx_reset(fx.ctx);
    get(fx.ctx, User_get_by_id_async(fx.ctx, 11));
    get(fx.ctx, EventCacheOnSlug_resolve_async(fx.ctx, "event3"));
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_misses, 2);
    cr_assert_eq(s.cache_hits, 0);
}

/* A backend that fails every write. */
static void fail_fire(void *arg) {
    flash_cache_op *op = arg;
    op->status = FLASH_EBACKEND;
    for (size_t i = 0; i < op->count; i++) op->items[i].status = FLASH_EBACKEND;
    op->done(op);
}
static void fail_submit(void *self, flash_loop loop, flash_cache_op *op) {
    (void)self;
    op->priv[1] = (void *)loop.vt;
    op->priv[2] = loop.native;
    op->priv[0] = loop.vt->defer(loop.native, fail_fire, op);
}
static void fail_cancel(void *self, flash_cache_op *op) {
    (void)self;
    ((const flash_loop_vtable *)op->priv[1])->cancel(op->priv[2], op->priv[0]);
}
static size_t fail_max(void *self) {
    (void)self;
    return 1 << 20;
}
static void fail_destroy(void *self) { (void)self; }
static const flash_cache_vtable fail_vt = {"failing", fail_submit, fail_cancel, fail_max, fail_destroy, 0};

FLASH_TEST(invalidate, bad_input_and_a_failing_backend_are_reported) {
    User row = {1, "a", "b", 1, 1.0, true, {NULL, 0}};
    flash_promise *p = flash_invalidate_async(fx.ctx, NULL, &row, NULL);
    cr_assert_eq(flash_wait(fx.ctx, p, NULL), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(p), "invalidate: not a model");
    cr_assert_null(flash_invalidate_async(NULL, &User_model, &row, NULL));
    /* Nothing to invalidate: done at once. */
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, NULL, NULL), 0);
    /* A NULL key value (a NULL string field) is the NULL key, as filter(x=None). */
    User nulls = {2, NULL, NULL, 1, 1.0, true, {NULL, 0}};
    cr_assert_eq(flash_invalidate(fx.ctx, &User_model, &nulls, NULL), 0);

    flash_desc d = {0};
    d.cache.vt = &fail_vt;
    flash_ctx *c = flash_ctx_create(&d);
    flash_poll_attach(c, fx.loop);
    p = flash_invalidate_async(c, &User_model, &row, NULL);
    cr_assert_eq(flash_wait(c, p, NULL), FLASH_EBACKEND);
    cr_assert(strstr(flash_promise_message(p), "invalidation of flash:User."), "%s", flash_promise_message(p));
    flash_ctx_destroy(c);

    /* Without a backend there is nothing to invalidate. */
    c = flash_ctx_create(NULL);
    cr_assert_eq(flash_invalidate(c, &User_model, &row, &row), 0);
    flash_ctx_destroy(c);
}
