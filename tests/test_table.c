/* The in-memory table: put / delete / find / count with deep copies, and
   the table as the source of a context without a cache backend (sync and
   async answers, injected failures, counters, cancel on reset / destroy). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "models.h"

/* A model whose primary key is not its first field. */
#define TABLESLUG_FIELDS(F) F(I64, n) F(STR, slug) F(BYTES, blob)
FLASH_MODEL_OPT(TableSlug, TABLESLUG_FIELDS, .pk = 1, .table = "slugs")
FLASH_GET_KEYS(TableSlug, (slug), (n))

/* Per-test state, global so a failed assertion leaves it for fini. */
static flash_table *db;
static flash_ctx *ctx;
static flash_poll *loop;

static void setup(void) {
    db = flash_table_create();
    cr_assert(db);
    ctx = NULL;
    loop = NULL;
}
static void teardown(void) {
    flash_ctx_destroy(ctx); /* contexts before the table they read */
    flash_table_destroy(db);
    flash_poll_destroy(loop);
    ctx = NULL;
    db = NULL;
    loop = NULL;
}
TestSuite(table, .init = setup, .fini = teardown);

static void put_users(int n) {
    static const char *const names[] = {"Ada", "Alan", "Grace"};
    for (int i = 1; i <= n; i++) {
        char username[32];
        snprintf(username, sizeof username, "user%d", i);
        User u = {i, names[i % 3], username, 20 + i, i * 0.5, i % 2 == 0, {"\0\1", 2}};
        cr_assert_eq(flash_table_put(db, &User_model, &u), 0);
    }
}

/* A context with the default desc (no cache, the internal queue loop) and
   the table as the source of every model. */
static void make_ctx(void) {
    ctx = flash_ctx_create(NULL);
    cr_assert(ctx);
    cr_assert_null(flash_ctx_desc(ctx)->cache.vt, "the default desc has no cache backend");
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_table_source(db)), 0);
}

static void *wait_ok(flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

static int wait_rc(flash_promise *p) {
    void *v = NULL;
    return flash_wait(ctx, p, &v);
}

/* Run whatever the context's loop has queued, without blocking. */
static void spin_loop(int rounds) {
    flash_loop l = flash_ctx_loop(ctx);
    for (int i = 0; i < rounds; i++) l.vt->run_once(l.native, false);
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    cr_assert(c);
    memcpy(c, s, n);
    return c;
}

/* ---- the table itself ---- */

FLASH_TEST(table, put_inserts_and_replaces_by_primary_key) {
    User a = {1, "Ada", "ada", 36, 1.0, true, {NULL, 0}};
    User b = {2, "Alan", "alan", 41, 2.0, false, {NULL, 0}};
    cr_assert_eq(flash_table_count(db, &User_model), 0);
    cr_assert_eq(flash_table_put(db, &User_model, &a), 0);
    cr_assert_eq(flash_table_put(db, &User_model, &b), 0);
    cr_assert_eq(flash_table_count(db, &User_model), 2);
    User a2 = {1, "Augusta", "ada", 37, 1.0, true, {"x", 1}};
    cr_assert_eq(flash_table_put(db, &User_model, &a2), 0);
    cr_assert_eq(flash_table_count(db, &User_model), 2, "same pk: replaced, not added");
    const User *f = flash_table_find(db, &User_model, flash_v_i64(1));
    cr_assert_not_null(f);
    cr_assert_str_eq(f->first_name, "Augusta");
    cr_assert_eq(f->age, 37);
    cr_assert_eq(f->avatar.len, 1);
    f = flash_table_find(db, &User_model, flash_v_i64(2));
    cr_assert_not_null(f);
    cr_assert_str_eq(f->username, "alan");
    /* Models are kept apart. */
    cr_assert_eq(flash_table_count(db, &Event_model), 0);
    Event e = {1, "e", "E", 0};
    cr_assert_eq(flash_table_put(db, &Event_model, &e), 0);
    cr_assert_eq(flash_table_count(db, &Event_model), 1);
    cr_assert_eq(flash_table_count(db, &User_model), 2);
    cr_assert_str_eq(((const User *)flash_table_find(db, &User_model, flash_v_i64(1)))->first_name, "Augusta");
}

FLASH_TEST(table, find_missing_and_bad_arguments) {
    put_users(3);
    cr_assert_null(flash_table_find(db, &User_model, flash_v_i64(4)));
    cr_assert_null(flash_table_find(db, &User_model, flash_v_i32(1)), "the pk's type must match");
    cr_assert_null(flash_table_find(db, &Event_model, flash_v_i64(1)), "no rows of that model");
    cr_assert_null(flash_table_find(NULL, &User_model, flash_v_i64(1)));
    cr_assert_null(flash_table_find(db, NULL, flash_v_i64(1)));
    User u = {1, "a", "b", 1, 1.0, true, {NULL, 0}};
    cr_assert_eq(flash_table_put(NULL, &User_model, &u), FLASH_EINVAL);
    cr_assert_eq(flash_table_put(db, NULL, &u), FLASH_EINVAL);
    cr_assert_eq(flash_table_put(db, &User_model, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_table_count(NULL, &User_model), 0);
    cr_assert_eq(flash_table_count(db, NULL), 0);
    cr_assert_eq(flash_table_delete(NULL, &User_model, flash_v_i64(1)), FLASH_EINVAL);
    cr_assert_eq(flash_table_delete(db, NULL, flash_v_i64(1)), FLASH_EINVAL);
    cr_assert_eq(flash_table_count(db, &User_model), 3);
}

FLASH_TEST(table, delete_removes_one_row_and_missing_is_enotfound) {
    put_users(5);
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(3)), 0);
    cr_assert_eq(flash_table_count(db, &User_model), 4);
    cr_assert_null(flash_table_find(db, &User_model, flash_v_i64(3)));
    for (int i = 1; i <= 5; i++) {
        if (i == 3) continue;
        const User *u = flash_table_find(db, &User_model, flash_v_i64(i));
        cr_assert_not_null(u, "row %d lost by the delete", i);
        cr_assert_eq(u->id, i);
    }
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(3)), FLASH_ENOTFOUND);
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(99)), FLASH_ENOTFOUND);
    cr_assert_eq(flash_table_delete(db, &Event_model, flash_v_i64(1)), FLASH_ENOTFOUND, "no rows of that model");
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(5)), 0, "the last row");
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(1)), 0, "the first row");
    cr_assert_eq(flash_table_count(db, &User_model), 2);
    User u = {3, "back", "back", 1, 1.0, true, {NULL, 0}};
    cr_assert_eq(flash_table_put(db, &User_model, &u), 0);
    cr_assert_eq(flash_table_count(db, &User_model), 3);
}

FLASH_TEST(table, rows_are_deep_copies) {
    char *first = dup_str("Grace");
    char *user = dup_str("grace");
    unsigned char *av = malloc(3);
    memcpy(av, "\x01\x00\x02", 3);
    User u = {9, first, user, 85, 7.5, true, {av, 3}};
    cr_assert_eq(flash_table_put(db, &User_model, &u), 0);
    memset(first, 'X', 5);
    memset(av, 0xee, 3);
    free(first);
    free(user);
    free(av);
    const User *f = flash_table_find(db, &User_model, flash_v_i64(9));
    cr_assert_not_null(f);
    cr_assert_str_eq(f->first_name, "Grace");
    cr_assert_str_eq(f->username, "grace");
    cr_assert_eq(f->avatar.len, 3);
    cr_assert_eq(memcmp(f->avatar.data, "\x01\x00\x02", 3), 0);
    /* NULLs stay NULL, empty bytes stay non-NULL. */
    User n = {10, NULL, "", 0, 0.0, false, {"", 0}};
    cr_assert_eq(flash_table_put(db, &User_model, &n), 0);
    f = flash_table_find(db, &User_model, flash_v_i64(10));
    cr_assert_null(f->first_name);
    cr_assert_str_eq(f->username, "");
    cr_assert_not_null(f->avatar.data);
    cr_assert_eq(f->avatar.len, 0);
    User m = {11, "a", "b", 0, 0.0, false, {NULL, 0}};
    cr_assert_eq(flash_table_put(db, &User_model, &m), 0);
    cr_assert_null(((const User *)flash_table_find(db, &User_model, flash_v_i64(11)))->avatar.data);
}

FLASH_TEST(table, the_models_pk_option_decides_replacement) {
    TableSlug a = {1, "one", {"a", 1}}, b = {2, "two", {NULL, 0}}, a2 = {3, "one", {"b", 1}};
    cr_assert_eq(flash_table_put(db, &TableSlug_model, &a), 0);
    cr_assert_eq(flash_table_put(db, &TableSlug_model, &b), 0);
    cr_assert_eq(flash_table_put(db, &TableSlug_model, &a2), 0);
    cr_assert_eq(flash_table_count(db, &TableSlug_model), 2, "pk is slug: \"one\" replaced");
    const TableSlug *f = flash_table_find(db, &TableSlug_model, flash_v_str("one"));
    cr_assert_not_null(f);
    cr_assert_eq(f->n, 3);
    cr_assert_null(flash_table_find(db, &TableSlug_model, flash_v_i64(1)), "n is not the pk");
    cr_assert_eq(flash_table_delete(db, &TableSlug_model, flash_v_str("two")), 0);
    cr_assert_eq(flash_table_count(db, &TableSlug_model), 1);
}

FLASH_TEST(table, a_model_copy_from_another_file_shares_the_rows) {
    put_users(4);
    cr_assert_eq(flash_table_count(db, other_tu_user_model()), 4);
    const void *a = flash_table_find(db, &User_model, flash_v_i64(2));
    const void *b = flash_table_find(db, other_tu_user_model(), flash_v_i64(2));
    cr_assert_not_null(a);
    cr_assert_eq(a, b);
}

FLASH_TEST(table, many_rows) {
    enum { N = 1000 };
    put_users(N);
    cr_assert_eq(flash_table_count(db, &User_model), N);
    for (int i = 1; i <= N; i += 97) {
        const User *u = flash_table_find(db, &User_model, flash_v_i64(i));
        cr_assert_not_null(u);
        cr_assert_eq(u->age, 20 + i);
    }
    for (int i = 1; i <= N; i += 2) cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(i)), 0);
    cr_assert_eq(flash_table_count(db, &User_model), N / 2);
}

/* ---- as a source, no cache ---- */

FLASH_TEST(table, sync_mode_answers_inside_the_fetch) {
    put_users(10);
    make_ctx();
    flash_table_set_async(db, false);
    flash_promise *p = User_get_by_id_async(ctx, 4);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING, "nothing runs before the tick");
    cr_assert_eq(flash_table_fetches(db), 0);
    flash_drain(ctx);
    cr_assert_eq(flash_table_fetches(db), 1);
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED, "a sync table answers within the dispatch");
    User *u = wait_ok(p);
    cr_assert_eq(u->id, 4);
    cr_assert_str_eq(u->username, "user4");
    cr_assert_eq(u->age, 24);
    cr_assert_eq(u->avatar.len, 2);
    cr_assert_neq((const void *)u, flash_table_find(db, &User_model, flash_v_i64(4)), "results are copies");
    cr_assert_eq(flash_table_keys_fetched(db), 1);
    flash_stats st = flash_ctx_stats(ctx);
    cr_assert_eq(st.cache_round_trips, 0, "no cache backend");
    cr_assert_eq(st.source_calls, 1);
    cr_assert_eq(st.fills, 0);
}

FLASH_TEST(table, async_mode_answers_on_the_next_tick) {
    put_users(10);
    make_ctx();
    flash_promise *p = User_get_by_id_async(ctx, 6);
    flash_drain(ctx);
    cr_assert_eq(flash_table_fetches(db), 1, "the fetch was made");
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING, "but is answered later");
    User *u = wait_ok(p);
    cr_assert_eq(u->id, 6);
    cr_assert_str_eq(u->first_name, "Ada");
    cr_assert_eq(flash_table_fetches(db), 1);
}

static void check_batching(bool async) {
    put_users(50);
    make_ctx();
    flash_table_set_async(db, async);
    flash_promise *ps[25];
    for (int i = 0; i < 20; i++) ps[i] = User_get_by_id_async(ctx, i + 1);
    ps[20] = User_get_by_id_async(ctx, 3);           /* a repeat: memo */
    ps[21] = User_get_by_id_async_or_none(ctx, 999); /* absent */
    ps[22] = User_get_by_username_async(ctx, "user30");
    ps[23] = User_get_by_username_async(ctx, "user31");
    ps[24] = User_filter_by_first_name_async(ctx, "Grace");
    void **v = wait_ok(flash_gather(ctx, 25, ps));
    for (int i = 0; i < 20; i++) cr_assert_eq(((User *)v[i])->id, i + 1);
    cr_assert_eq(v[20], v[2], "the memo gives the same row");
    cr_assert_null(v[21]);
    cr_assert_eq(((User *)v[22])->id, 30);
    cr_assert_eq(((User *)v[23])->id, 31);
    flash_list *grace = v[24];
    cr_assert_eq(grace->count, 17, "ids 2, 5, ..., 50");
    for (size_t i = 0; i < grace->count; i++) cr_assert_str_eq(((User *)grace->items[i])->first_name, "Grace");
    cr_assert_eq(flash_table_fetches(db), 3, "one fetch per class: id, username, first_name");
    cr_assert_eq(flash_table_keys_fetched(db), 21 + 2 + 1);
    flash_stats st = flash_ctx_stats(ctx);
    cr_assert_eq(st.source_calls, 3);
    cr_assert_eq(st.source_keys, 24);
    cr_assert_eq(st.memo_hits, 1);
}

FLASH_TEST(table, one_fetch_per_class_per_tick_sync) { check_batching(false); }
FLASH_TEST(table, one_fetch_per_class_per_tick_async) { check_batching(true); }

static void check_not_found_and_kinds(bool async) {
    put_users(5);
    Participant p1 = {1, 1, 7}, p2 = {2, 2, 7}, p3 = {3, 3, 8};
    cr_assert_eq(flash_table_put(db, &Participant_model, &p1), 0);
    cr_assert_eq(flash_table_put(db, &Participant_model, &p2), 0);
    cr_assert_eq(flash_table_put(db, &Participant_model, &p3), 0);
    make_ctx();
    flash_table_set_async(db, async);
    flash_promise *missing = User_get_by_id_async(ctx, 77);
    cr_assert_eq(wait_rc(missing), FLASH_ENOTFOUND);
    cr_assert(strstr(flash_promise_message(missing), "does not exist"));
    cr_assert_eq(wait_rc(User_get_by_id_async_or_404(ctx, 78)), FLASH_E404);
    int64_t n = -1;
    cr_assert_eq(ParticipantCount_resolve(ctx, 7, &n), 0);
    cr_assert_eq(n, 2);
    flash_ids *ids = NULL;
    cr_assert_eq(ParticipantIds_resolve(ctx, 8, &ids), 0);
    cr_assert_eq(ids->count, 1);
    cr_assert_eq(ids->ids[0], 3);
    Participant *p = NULL;
    cr_assert_eq(Participant_get_by_user_event(ctx, 2, 7, &p), 0);
    cr_assert_eq(p->id, 2);
    cr_assert_eq(Participant_get_by_user_event(ctx, 2, 8, &p), FLASH_ENOTFOUND);
}

FLASH_TEST(table, not_found_counts_ids_and_two_field_keys_sync) { check_not_found_and_kinds(false); }
FLASH_TEST(table, not_found_counts_ids_and_two_field_keys_async) { check_not_found_and_kinds(true); }

FLASH_TEST(table, without_a_cache_every_request_goes_to_the_table) {
    put_users(5);
    make_ctx();
    for (int r = 0; r < 3; r++) {
        User *u = wait_ok(User_get_by_id_async(ctx, 2));
        cr_assert_eq(u->id, 2);
        wait_ok(User_get_by_id_async(ctx, 2)); /* memo within the request */
        cr_assert_eq(flash_table_fetches(db), (uint64_t)r + 1);
        flash_ctx_reset(ctx);
    }
    /* The table's current rows are what the next request sees. */
    User changed = {2, "Changed", "user2", 1, 1.0, true, {NULL, 0}};
    cr_assert_eq(flash_table_put(db, &User_model, &changed), 0);
    User *u = wait_ok(User_get_by_id_async(ctx, 2));
    cr_assert_str_eq(u->first_name, "Changed");
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(2)), 0);
    flash_ctx_reset(ctx);
    cr_assert_eq(wait_rc(User_get_by_id_async(ctx, 2)), FLASH_ENOTFOUND);
}

static void check_fail_next(bool async) {
    put_users(5);
    make_ctx();
    flash_table_set_async(db, async);
    flash_table_fail_next(db, FLASH_ESOURCE, "database is down");
    flash_promise *ps[2] = {User_get_by_id_async(ctx, 1), User_get_by_id_async(ctx, 2)};
    flash_promise *all = flash_gather_settled(ctx, 2, ps);
    flash_settled *s = wait_ok(all);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(s[i].state, FLASH_REJECTED);
        cr_assert_eq(s[i].error, FLASH_ESOURCE);
        cr_assert(strstr(s[i].message, "database is down"), "message: %s", s[i].message);
    }
    cr_assert_eq(flash_table_fetches(db), 1);
    /* One fetch only: the next succeeds (in a new request, errors are memoised). */
    flash_ctx_reset(ctx);
    User *u = wait_ok(User_get_by_id_async(ctx, 1));
    cr_assert_eq(u->id, 1);
    cr_assert_eq(flash_table_fetches(db), 2);
    /* Without a message: the code's text. */
    flash_table_fail_next(db, FLASH_ETIMEDOUT, NULL);
    flash_promise *p = User_get_by_id_async(ctx, 3);
    cr_assert_eq(wait_rc(p), FLASH_ETIMEDOUT);
    cr_assert_str_eq(flash_promise_message(p), flash_strerror(FLASH_ETIMEDOUT));
}

FLASH_TEST(table, fail_next_fails_one_fetch_sync) { check_fail_next(false); }
FLASH_TEST(table, fail_next_fails_one_fetch_async) { check_fail_next(true); }

FLASH_TEST(table, sources_per_model_override_the_default) {
    flash_table *other = flash_table_create();
    User u = {1, "Other", "other", 1, 1.0, true, {NULL, 0}};
    cr_assert_eq(flash_table_put(other, &User_model, &u), 0);
    put_users(3);
    Event e = {1, "e1", "E1", 0};
    cr_assert_eq(flash_table_put(db, &Event_model, &e), 0);
    make_ctx();
    cr_assert_eq(flash_ctx_set_source(ctx, &User_model, flash_table_source(other)), 0);
    User *got = wait_ok(User_get_by_id_async(ctx, 1));
    Event *ev = wait_ok(EventCacheOnSlug_resolve_async(ctx, "e1"));
    bool from_other = strcmp(got->first_name, "Other") == 0;
    int64_t ev_id = ev->id;
    int fetches_other = (int)flash_table_fetches(other), fetches_db = (int)flash_table_fetches(db);
    flash_ctx_destroy(ctx); /* before the table it reads */
    ctx = NULL;
    flash_table_destroy(other);
    cr_assert(from_other, "User rows come from the per-model source");
    cr_assert_eq(ev_id, 1);
    cr_assert_eq(fetches_other, 1);
    cr_assert_eq(fetches_db, 1);
}

/* ---- cancel ---- */

static int settled_calls;
static void count_settle(flash_ctx *c, flash_promise *p, void *arg) {
    (void)c;
    (void)p;
    (void)arg;
    settled_calls++;
}

static void check_reset_cancels(void) {
    settled_calls = 0;
    flash_promise *p = User_get_by_id_async(ctx, 1);
    cr_assert_eq(flash_on_settle(ctx, p, count_settle, NULL), 0);
    flash_drain(ctx);
    cr_assert_eq(flash_table_fetches(db), 1);
    cr_assert_eq(flash_promise_state(p), FLASH_PENDING);
    flash_ctx_reset(ctx);
    /* A deferred answer that was not cancelled would run here, on a fetch
       whose memory is gone (ASan). */
    spin_loop(5);
    cr_assert_eq(settled_calls, 0, "no callback of the old request runs");
    cr_assert(!flash_ctx_busy(ctx));
    /* The context is usable and the table answers the next request. */
    User *u = wait_ok(User_get_by_id_async(ctx, 1));
    cr_assert_eq(u->id, 1);
    cr_assert_eq(flash_table_fetches(db), 2);
    cr_assert_eq(settled_calls, 0);
    flash_ctx_destroy(ctx);
    ctx = NULL;
    flash_table_destroy(db); /* must not touch the destroyed context (ASan) */
    db = NULL;
}

FLASH_TEST(table, reset_cancels_a_pending_async_fetch) {
    put_users(5);
    make_ctx();
    check_reset_cancels();
}

FLASH_TEST(table, reset_cancels_a_pending_async_fetch_when_the_arena_is_freed) {
    flash_desc d;
    put_users(5);
    memset(&d, 0, sizeof d);
    d.arena_retain = 1; /* every block is freed at reset */
    ctx = flash_ctx_create(&d);
    cr_assert(ctx);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_table_source(db)), 0);
    check_reset_cancels();
}

FLASH_TEST(table, destroy_cancels_a_pending_async_fetch) {
    put_users(5);
    make_ctx();
    settled_calls = 0;
    flash_promise *ps[3] = {User_get_by_id_async(ctx, 1), User_get_by_username_async(ctx, "user2"),
                            User_filter_by_first_name_async(ctx, "Ada")};
    for (int i = 0; i < 3; i++) cr_assert_eq(flash_on_settle(ctx, ps[i], count_settle, NULL), 0);
    flash_drain(ctx);
    cr_assert_eq(flash_table_fetches(db), 3, "three fetches in flight");
    flash_ctx_destroy(ctx);
    ctx = NULL;
    cr_assert_eq(settled_calls, 0);
    /* The table must hold nothing of the destroyed context (ASan). */
    flash_table_destroy(db);
    db = NULL;
}

FLASH_TEST(table, destroy_with_an_attached_poll_loop_cancels_the_fetch) {
    put_users(5);
    make_ctx();
    flash_ctx_destroy(ctx);
    ctx = flash_ctx_create(NULL);
    loop = flash_poll_create();
    cr_assert_eq(flash_poll_attach(ctx, loop), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_table_source(db)), 0);
    settled_calls = 0;
    flash_promise *p = User_get_by_id_async(ctx, 2);
    cr_assert_eq(flash_on_settle(ctx, p, count_settle, NULL), 0);
    flash_drain(ctx);
    cr_assert_eq(flash_table_fetches(db), 1);
    flash_ctx_destroy(ctx);
    ctx = NULL;
    /* The table's deferred answer was on the poll loop: it must not fire. */
    for (int i = 0; i < 3; i++) flash_poll_run_once(loop, false);
    cr_assert_eq(settled_calls, 0);
}

FLASH_TEST(table, reset_then_destroy_the_table_before_running_the_loop) {
    put_users(5);
    make_ctx();
    flash_promise *p = User_get_by_id_async(ctx, 3);
    (void)p;
    flash_drain(ctx);
    flash_ctx_reset(ctx);
    /* The table is destroyed while the context's queue still holds the
       (cancelled) deferred answer; running the queue must do nothing. */
    flash_table_destroy(db);
    db = NULL;
    spin_loop(3);
    cr_assert(!flash_ctx_busy(ctx));
}

FLASH_TEST(table, the_result_outlives_the_table_until_reset) {
    put_users(3);
    make_ctx();
    User *u = wait_ok(User_get_by_id_async(ctx, 3));
    cr_assert_eq(flash_table_delete(db, &User_model, flash_v_i64(3)), 0);
    flash_table_destroy(db);
    db = NULL;
    /* The row was copied into the request's arena. */
    cr_assert_str_eq(u->username, "user3");
    cr_assert_eq(u->avatar.len, 2);
    cr_assert_eq(memcmp(u->avatar.data, "\0\1", 2), 0);
}
