/* Issue #13 (1, 2): nullable numbers (I64N, I32N, F64N, BOOLN), timestamps
   (TIME, TIMEN) and foreign keys. The codec and keys, NULL as a key value
   (one source call, the NULL rows only), on the memory backend and a real
   memcached with the table source, on SQLite and on PostgreSQL (timestamp,
   timestamptz under a non-UTC session TimeZone, date), and
   FLASH_FOREIGN_KEY batched in one round trip, in tasks too. */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "models.h"
#include "backends/source/sqlite.h"
#include "backends/source/postgres.h"
#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

#define TY_USER_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(TyUser, TY_USER_FIELDS, .table = "ty_users")
FLASH_GET_KEYS(TyUser, (id))

#define TY_ROW_FIELDS(F) \
    F(I64, id) F(I64N, manager) F(I32N, rank) F(F64N, score) F(BOOLN, ok) F(TIME, created) F(TIMEN, seen) F(STR, name)
FLASH_MODEL_OPT(TyRow, TY_ROW_FIELDS, .table = "ty_rows")
FLASH_GET_KEYS(TyRow, (id), (created))
FLASH_FILTER_KEYS(TyRow, (manager), (manager, ok), (seen), (rank, created))
FLASH_FOREIGN_KEY(TyRow, manager, TyUser, id)
/* An I32 field pointing at an I64 key: FLASH_EINVAL at run time. */
FLASH_FOREIGN_KEY(TyRow, rank, TyUser, id)

static const flash_time T_2024 = INT64_C(1714564800123456); /* 2024-05-01 12:00:00.123456 UTC */
static const flash_time T_1900 = INT64_C(-2208988800000000); /* 1900-01-01 00:00:00 UTC */

static TyRow ty_row(int64_t id, flash_i64n manager, flash_time created, flash_timen seen) {
    TyRow r;
    memset(&r, 0, sizeof r);
    r.id = id;
    r.manager = manager;
    r.rank = id % 2 ? flash_i32n_null() : flash_i32n_of((int32_t)id);
    r.score = id % 3 ? flash_f64n_of(id * 0.5) : flash_f64n_null();
    r.ok = id % 4 == 0 ? flash_booln_null() : flash_booln_of(id % 4 == 1);
    r.created = created;
    r.seen = seen;
    r.name = "row";
    return r;
}

static void assert_rows_eq(const TyRow *a, const TyRow *b) {
    cr_assert_eq(a->id, b->id);
    cr_assert_eq(a->manager.null, b->manager.null, "id %lld", (long long)a->id);
    if (!a->manager.null) cr_assert_eq(a->manager.v, b->manager.v);
    cr_assert_eq(a->rank.null, b->rank.null);
    if (!a->rank.null) cr_assert_eq(a->rank.v, b->rank.v);
    cr_assert_eq(a->score.null, b->score.null);
    if (!a->score.null) cr_assert(a->score.v == b->score.v || (isnan(a->score.v) && isnan(b->score.v)));
    cr_assert_eq(a->ok.null, b->ok.null);
    if (!a->ok.null) cr_assert_eq(a->ok.v, b->ok.v);
    cr_assert_eq(a->created, b->created);
    cr_assert_eq(a->seen.null, b->seen.null);
    if (!a->seen.null) cr_assert_eq(a->seen.v, b->seen.v);
}

/* ---- codec, keys, schema: no I/O ---- */

static flash_ctx *plain_ctx(void) {
    flash_ctx *c = flash_ctx_create(NULL);
    cr_assert(c);
    return c;
}

FLASH_TEST(types, codec_round_trips_nulls_and_extremes) {
    flash_ctx *c = plain_ctx();
    TyRow rows[6];
    rows[0] = ty_row(1, flash_i64n_null(), 0, flash_timen_null());
    rows[1] = ty_row(2, flash_i64n_of(INT64_MIN), INT64_MIN, flash_timen_of(INT64_MAX));
    rows[2] = ty_row(3, flash_i64n_of(INT64_MAX), INT64_MAX, flash_timen_of(INT64_MIN));
    rows[3] = ty_row(4, flash_i64n_of(0), -1, flash_timen_of(T_1900));
    rows[4] = ty_row(5, flash_i64n_of(-5), T_2024, flash_timen_of(0));
    rows[5] = ty_row(6, flash_i64n_of(7), T_1900, flash_timen_null());
    rows[1].rank = flash_i32n_of(INT32_MIN);
    rows[2].rank = flash_i32n_of(INT32_MAX);
    rows[2].score = flash_f64n_of(NAN);
    rows[3].score = flash_f64n_of(-0.0);
    for (size_t i = 0; i < 6; i++) {
        void *data;
        size_t len;
        TyRow back;
        cr_assert_eq(flash_row_encode(c, &TyRow_model, &rows[i], &data, &len), 0);
        cr_assert_eq(flash_row_decode(c, &TyRow_model, data, len, &back), 0, "row %zu", i);
        assert_rows_eq(&rows[i], &back);
        /* every truncation is refused, never a short row */
        for (size_t k = 0; k < len; k++)
            cr_assert_neq(flash_row_decode(c, &TyRow_model, data, k, &back), 0, "row %zu cut at %zu", i, k);
    }
    /* a NULL's v does not travel: it decodes as 0 */
    TyRow odd = rows[0];
    odd.manager.v = 99;
    void *data;
    size_t len, len0;
    void *data0;
    cr_assert_eq(flash_row_encode(c, &TyRow_model, &odd, &data, &len), 0);
    cr_assert_eq(flash_row_encode(c, &TyRow_model, &rows[0], &data0, &len0), 0);
    cr_assert_eq(len, len0);
    cr_assert_eq(memcmp(data, data0, len), 0, "one NULL, one encoding");
    flash_ctx_destroy(c);
}

FLASH_TEST(types, codec_refuses_a_bad_null_marker) {
    flash_ctx *c = plain_ctx();
    TyRow r = ty_row(1, flash_i64n_null(), 5, flash_timen_null()), back;
    unsigned char *data;
    size_t len;
    cr_assert_eq(flash_row_encode(c, &TyRow_model, &r, (void **)&data, &len), 0);
    /* id 1 is one varint byte; the manager's marker follows */
    cr_assert_eq(data[1], 0);
    data[1] = 2;
    cr_assert_eq(flash_row_decode(c, &TyRow_model, data, len, &back), FLASH_EPROTO);
    data[1] = 1; /* "present" with the next field's bytes as its value: trailing or short */
    cr_assert_neq(flash_row_decode(c, &TyRow_model, data, len, &back), 0);
    flash_ctx_destroy(c);
}

static const flash_field *schema_a(size_t *n) {
    static const flash_field f[] = {{"id", FLASH_I64, 0}, {"manager", FLASH_I64, 8}};
    *n = 2;
    return f;
}
static const flash_field *schema_b(size_t *n) {
    static const flash_field f[] = {{"id", FLASH_I64, 0}, {"manager", FLASH_I64N, 8}};
    *n = 2;
    return f;
}
static const flash_field *schema_c(size_t *n) {
    static const flash_field f[] = {{"id", FLASH_I64, 0}, {"manager", FLASH_TIME, 8}};
    *n = 2;
    return f;
}

FLASH_TEST(types, schema_hash_changes_when_a_field_becomes_nullable_or_a_time) {
    static flash_model a = {.name = "TySchemaProbe", .size = 24, .field_table = schema_a};
    static flash_model b = {.name = "TySchemaProbe", .size = 32, .field_table = schema_b};
    static flash_model t = {.name = "TySchemaProbe", .size = 16, .field_table = schema_c};
    flash_register_model(&a);
    flash_register_model(&b);
    flash_register_model(&t);
    cr_assert_neq(a.schema, b.schema);
    cr_assert_neq(a.schema, t.schema);
    cr_assert_neq(b.schema, t.schema);
    cr_assert_eq(a.canonical, &a);
    cr_assert_eq(b.canonical, &b, "another schema under the same name stays apart");
}

FLASH_TEST(types, type_names_values_and_keys) {
    static const char *const names[] = {"I64", "I32", "F64", "BOOL", "STR", "BYTES", "TIME", "I64N", "I32N", "F64N", "BOOLN", "TIMEN"};
    for (int t = FLASH_I64; t <= FLASH_TIMEN; t++) cr_assert_str_eq(flash_type_name((flash_type)t), names[t - 1]);
    cr_assert_eq(flash_value_type(FLASH_TIMEN), FLASH_I64);
    cr_assert_eq(flash_value_type(FLASH_I32N), FLASH_I32);
    cr_assert(flash_type_nullable(FLASH_BOOLN));
    cr_assert(!flash_type_nullable(FLASH_TIME));
    flash_value v = flash_v(flash_i64n_null());
    cr_assert(v.is_null);
    cr_assert_eq(v.type, FLASH_I64);
    v = flash_v(flash_f64n_of(2.5));
    cr_assert(!v.is_null);
    cr_assert_eq(v.type, FLASH_F64);
    cr_assert_eq(flash_v(flash_booln_null()).type, FLASH_BOOL);
    cr_assert_eq(flash_v(flash_i32n_of(3)).u.i32, 3);
    cr_assert_eq(flash_v_null(FLASH_TIMEN).type, FLASH_I64);

    flash_ctx *c = plain_ctx();
    char *k;
    size_t len;
    bool hashed;
    flash_value null_mgr = flash_v(flash_i64n_null());
    cr_assert_eq(flash_cache_key(c, &TyRow__filter_by_manager, &null_mgr, 1, &k, &len, &hashed), 0);
    cr_assert_str_eq(k, "flash:TyRow.filter.manager:v1:%N");
    flash_value seen = flash_v_i64(T_1900);
    cr_assert_eq(flash_cache_key(c, &TyRow__filter_by_seen, &seen, 1, &k, &len, &hashed), 0);
    cr_assert_str_eq(k, "flash:TyRow.filter.seen:v1:-2208988800000000");
    /* NULL and the string "%N" never share a key */
    char *k1, *k2;
    flash_value s1 = flash_v_str("%N"), s2 = flash_v_null(FLASH_STR);
    cr_assert_eq(flash_cache_key(c, &TyUser__get_by_id, &null_mgr, 1, &k1, &len, &hashed), 0);
    cr_assert_eq(flash_cache_key(c, &EventCacheOnSlug_class, &s1, 1, &k1, &len, &hashed), 0);
    cr_assert_eq(flash_cache_key(c, &EventCacheOnSlug_class, &s2, 1, &k2, &len, &hashed), 0);
    cr_assert_str_neq(k1, k2);
    cr_assert_str_eq(k1, "flash:EventCacheOnSlug:v1:%25N");
    /* a key of the wrong value type is refused, naming both types */
    flash_value wrong = flash_v_i32(1);
    flash_promise *p = flash_query_async(c, &TyRow__filter_by_manager, &wrong, 1, 0);
    void *out;
    cr_assert_eq(flash_wait(c, p, &out), FLASH_EINVAL);
    cr_assert_str_eq(flash_promise_message(p), "TyRow.filter.manager: key field 'manager' is I64N (I64 values), got I32");
    flash_ctx_destroy(c);
}

FLASH_TEST(types, time_text_forms) {
    static const struct {
        const char *text;
        int rc;
        flash_time t;
    } cases[] = {
        {"2024-05-01", 0, INT64_C(1714521600000000)},
        {"2024-05-01 12:00:00.123456", 0, INT64_C(1714564800123456)},
        {"2024-05-01T12:00:00.123456Z", 0, INT64_C(1714564800123456)},
        {"2024-05-01T14:30:00.123456+02:30", 0, INT64_C(1714564800123456)},
        {"2024-05-01 07:00:00.123456-0500", 0, INT64_C(1714564800123456)},
        {"2024-05-01 13:00:00.123456+01", 0, INT64_C(1714564800123456)},
        {"2024-05-01 12:00", 0, INT64_C(1714564800000000)},
        {"2024-05-01 12:00:00.1234569", 0, INT64_C(1714564800123456)},
        {"1900-01-01 00:00:00", 0, INT64_C(-2208988800000000)},
        {"1969-12-31 23:59:59.999999", 0, -1},
        {"0001-01-01 BC", 0, INT64_C(-62167219200000000)},
        {"-290308-12-21 19:59:05.224192", 0, INT64_MIN},
        {"+294247-01-10 04:00:54.775807", 0, INT64_MAX},
        {"294247-01-10 04:00:54.775808", FLASH_ETOOLARGE, 0},
        {"2023-02-29", FLASH_EINVAL, 0},
        {"2024-05-01 24:00:00", FLASH_EINVAL, 0},
        {"2024-5-1", FLASH_EINVAL, 0},
        {"2024-05-01 12:00:00 ", FLASH_EINVAL, 0},
        {"infinity", FLASH_EINVAL, 0},
        {"", FLASH_EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        flash_time t = 0;
        int rc = flash_time_parse(cases[i].text, strlen(cases[i].text), &t);
        cr_assert_eq(rc, cases[i].rc, "%s: %d", cases[i].text, rc);
        if (rc == 0) {
            char buf[48], again[48];
            cr_assert_eq(t, cases[i].t, "%s: %lld", cases[i].text, (long long)t);
            size_t n = flash_time_format(t, buf, sizeof buf);
            cr_assert_eq(n, strlen(buf));
            flash_time back;
            cr_assert_eq(flash_time_parse(buf, n, &back), 0, "%s", buf);
            cr_assert_eq(back, t, "format/parse %s", buf);
            flash_time_format(back, again, sizeof again);
            cr_assert_str_eq(buf, again);
        }
    }
    char small[8];
    cr_assert_eq(flash_time_format(0, small, sizeof small), 19);
    cr_assert_str_eq(small, "1970-01");
}

/* ---- the table source, memory backend and memcached ---- */

static void put_rows(void) {
    for (int64_t i = 1; i <= 12; i++) {
        flash_i64n mgr = i % 3 == 0 ? flash_i64n_null() : flash_i64n_of(i % 3);
        TyRow r = ty_row(i, mgr, T_2024 + i, i % 2 ? flash_timen_null() : flash_timen_of(T_1900));
        cr_assert_eq(flash_table_put(fx.db, &TyRow_model, &r), 0);
    }
    for (int64_t i = 1; i <= 2; i++) {
        TyUser u = {i, i == 1 ? "boss" : "chief"};
        cr_assert_eq(flash_table_put(fx.db, &TyUser_model, &u), 0);
    }
}

static void null_keys_body(void) {
    put_rows();
    for (int round = 0; round < 2; round++) { /* cold: the source; warm: the cache */
        uint64_t fetches = flash_table_fetches(fx.db);
        flash_list *nulls = NULL, *ones = NULL, *seen_null = NULL;
        flash_promise *ps[3] = {TyRow_filter_by_manager_async(fx.ctx, flash_i64n_null()),
                                TyRow_filter_by_manager_async(fx.ctx, flash_i64n_of(1)),
                                TyRow_filter_by_seen_async(fx.ctx, flash_timen_null())};
        void *v;
        cr_assert_eq(flash_wait(fx.ctx, flash_gather(fx.ctx, 3, ps), &v), 0);
        nulls = ((void **)v)[0];
        ones = ((void **)v)[1];
        seen_null = ((void **)v)[2];
        cr_assert_eq(nulls->count, 4, "ids 3, 6, 9, 12");
        for (size_t i = 0; i < nulls->count; i++) {
            const TyRow *r = nulls->items[i];
            cr_assert(r->manager.null);
            cr_assert_eq(r->manager.v, 0);
            cr_assert_eq(r->id % 3, 0);
            TyRow want = ty_row(r->id, flash_i64n_null(), T_2024 + r->id,
                                r->id % 2 ? flash_timen_null() : flash_timen_of(T_1900));
            assert_rows_eq(r, &want);
        }
        cr_assert_eq(ones->count, 4);
        for (size_t i = 0; i < ones->count; i++) cr_assert_eq(((TyRow *)ones->items[i])->manager.v, 1);
        cr_assert_eq(seen_null->count, 6);
        /* two filter classes, one fetch each; none when warm */
        cr_assert_eq(flash_table_fetches(fx.db) - fetches, round == 0 ? 2 : 0);
        /* a nullable multi-field key with a NULL part */
        flash_list *l;
        cr_assert_eq(TyRow_filter_by_manager_ok(fx.ctx, flash_i64n_null(), flash_booln_null(), &l), 0);
        cr_assert_eq(l->count, 1, "id 12: manager NULL and ok NULL");
        cr_assert_eq(((TyRow *)l->items[0])->id, 12);
        /* a timestamp key */
        TyRow *r;
        cr_assert_eq(TyRow_get_by_created(fx.ctx, T_2024 + 7, &r), 0);
        cr_assert_eq(r->id, 7);
        cr_assert_eq(TyRow_get_by_created_or_none(fx.ctx, T_1900, &r), 0);
        cr_assert_null(r);
        flash_ctx_reset(fx.ctx);
    }
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
static void teardown_fixture(void) { fixture_teardown(); }
TestSuite(types_memory, .init = setup_memory, .fini = teardown_fixture);
TestSuite(types_memcached, .init = setup_memcached, .fini = teardown_fixture);

FLASH_TEST(types_memory, null_and_time_keys_through_table_and_cache) { null_keys_body(); }
FLASH_TEST(types_memcached, null_and_time_keys_through_table_and_cache) { null_keys_body(); }

/* ---- foreign keys ---- */

static void fk_batched_body(void) {
    put_rows();
    for (int round = 0; round < 2; round++) {
        flash_list *all;
        flash_promise *ps[3] = {TyRow_filter_by_manager_async(fx.ctx, flash_i64n_of(1)),
                                TyRow_filter_by_manager_async(fx.ctx, flash_i64n_of(2)),
                                TyRow_filter_by_manager_async(fx.ctx, flash_i64n_null())};
        void *v;
        cr_assert_eq(flash_wait(fx.ctx, flash_gather(fx.ctx, 3, ps), &v), 0);
        TyRow *rows[12];
        size_t n = 0;
        for (int k = 0; k < 3; k++) {
            all = ((void **)v)[k];
            for (size_t i = 0; i < all->count; i++) rows[n++] = all->items[i];
        }
        cr_assert_eq(n, 12);
        flash_stats before = flash_ctx_stats(fx.ctx);
        flash_promise *us[12];
        for (size_t i = 0; i < n; i++) us[i] = TyRow_manager_async(fx.ctx, rows[i]);
        cr_assert_eq(flash_wait(fx.ctx, flash_gather(fx.ctx, n, us), &v), 0);
        flash_stats d = stats_sub(flash_ctx_stats(fx.ctx), before);
        cr_assert_eq(d.cache_round_trips, 1, "12 rows' managers: one round trip, got %llu",
                     (unsigned long long)d.cache_round_trips);
        cr_assert_eq(d.source_calls, round == 0 ? 1 : 0);
        for (size_t i = 0; i < n; i++) {
            TyUser *u = ((void **)v)[i];
            if (rows[i]->manager.null) cr_assert_null(u, "a NULL foreign key gives NULL");
            else {
                cr_assert(u);
                cr_assert_eq(u->id, rows[i]->manager.v);
                cr_assert_str_eq(u->name, u->id == 1 ? "boss" : "chief");
            }
        }
        flash_ctx_reset(fx.ctx);
    }
}
FLASH_TEST(types_memory, foreign_keys_of_n_rows_in_one_round_trip) { fk_batched_body(); }
FLASH_TEST(types_memcached, foreign_keys_of_n_rows_in_one_round_trip) { fk_batched_body(); }

FLASH_TEST(types_memory, foreign_key_missing_target_null_and_wrong_type) {
    put_rows();
    TyRow orphan = ty_row(50, flash_i64n_of(404), 0, flash_timen_null());
    TyRow none = ty_row(51, flash_i64n_null(), 0, flash_timen_null());
    TyUser *u = (TyUser *)&orphan;
    cr_assert_eq(TyRow_manager(fx.ctx, &orphan, &u), FLASH_ENOTFOUND);
    cr_assert_eq(TyRow_manager_or_404(fx.ctx, &orphan, &u), FLASH_E404);
    u = (TyUser *)&orphan;
    cr_assert_eq(TyRow_manager_or_none(fx.ctx, &orphan, &u), 0, "a dangling reference is NULL in the _or_none form");
    cr_assert_null(u);
    void *dangling = &orphan;
    cr_assert_eq(flash_wait(fx.ctx, TyRow_manager_async_or_none(fx.ctx, &orphan), &dangling), 0);
    cr_assert_null(dangling);
    u = (TyUser *)&orphan;
    cr_assert_eq(TyRow_manager_or_none(fx.ctx, &none, &u), 0);
    cr_assert_null(u);
    u = (TyUser *)&orphan;
    cr_assert_eq(TyRow_manager(fx.ctx, &none, &u), 0);
    cr_assert_null(u);
    u = (TyUser *)&orphan;
    cr_assert_eq(TyRow_manager_or_404(fx.ctx, &none, &u), 0, "NULL is not a missing row");
    cr_assert_null(u);
    void *v;
    flash_promise *p = TyRow_manager_async(fx.ctx, NULL);
    cr_assert_eq(flash_wait(fx.ctx, p, &v), FLASH_EINVAL);
    /* an I32N field pointing at an I64 key */
    TyRow ranked = ty_row(2, flash_i64n_null(), 0, flash_timen_null());
    p = TyRow_rank_async(fx.ctx, &ranked);
    cr_assert_eq(flash_wait(fx.ctx, p, &v), FLASH_EINVAL);
    cr_assert(strstr(flash_promise_message(p), "is I64, got I32"), "%s", flash_promise_message(p));
}

typedef struct fk_job {
    const TyRow *row;
    int rc;
    TyUser *user;
} fk_job;

static int fk_task(flash_ctx *ctx, void *arg, void **result) {
    fk_job *j = arg;
    (void)result;
    j->rc = TyRow_manager_or_404(ctx, j->row, &j->user); /* suspends this task */
    return j->rc;
}

static flash_promise *fk_many(flash_ctx *ctx, void *arg) {
    fk_job *jobs = arg;
    flash_promise *ps[4];
    for (int i = 0; i < 4; i++) ps[i] = flash_spawn(ctx, fk_task, &jobs[i]);
    return flash_gather_settled(ctx, 4, ps);
}

FLASH_TEST(types_memory, foreign_keys_in_tasks_join_one_batch) {
    put_rows();
    TyRow rows[4] = {ty_row(1, flash_i64n_of(1), 0, flash_timen_null()), ty_row(2, flash_i64n_of(2), 0, flash_timen_null()),
                     ty_row(3, flash_i64n_null(), 0, flash_timen_null()),
                     ty_row(4, flash_i64n_of(77), 0, flash_timen_null())};
    fk_job jobs[4];
    for (int i = 0; i < 4; i++) jobs[i] = (fk_job){&rows[i], -100, NULL};
    void *v;
    flash_stats before = flash_ctx_stats(fx.ctx);
    cr_assert_eq(flash_run(fx.ctx, fk_many, jobs, &v), 0);
    flash_stats d = stats_sub(flash_ctx_stats(fx.ctx), before);
    cr_assert_eq(d.tasks, 4);
    cr_assert_eq(d.cache_round_trips, 1, "four tasks, one batch: %llu", (unsigned long long)d.cache_round_trips);
    cr_assert_eq(d.source_calls, 1);
    cr_assert_eq(jobs[0].rc, 0);
    cr_assert_str_eq(jobs[0].user->name, "boss");
    cr_assert_eq(jobs[1].rc, 0);
    cr_assert_str_eq(jobs[1].user->name, "chief");
    cr_assert_eq(jobs[2].rc, 0);
    cr_assert_null(jobs[2].user);
    cr_assert_eq(jobs[3].rc, FLASH_E404);
}

/* ---- README's examples (Field types, Foreign keys), compiled ---- */

#define MEMBER_FIELDS(F) F(I64, id) F(I64N, manager) F(TIME, created_at) F(TIMEN, left_at)
FLASH_MODEL_OPT(Member, MEMBER_FIELDS, .table = "members")
FLASH_GET_KEYS(Member, (id), (created_at))
FLASH_FILTER_KEYS(Member, (manager))
FLASH_FOREIGN_KEY(Member, manager, User, id)      /* needs FLASH_GET_KEYS(User, (id)) */

static int readme_task(flash_ctx *ctx, void *arg, void **result) {
    int rc;
    void *v;
    (void)arg;
    Member m = {1, flash_i64n_of(42), 1714564800000000, flash_timen_null()};
    cr_assert_eq(flash_table_put(fx.db, &Member_model, &m), 0);
    Member m2 = {2, flash_i64n_null(), 0, flash_timen_of(5)};
    cr_assert_eq(flash_table_put(fx.db, &Member_model, &m2), 0);
    flash_list *unmanaged;    /* WHERE manager IS NULL: the NULL rows only */
    rc = Member_filter_by_manager(ctx, flash_i64n_null(), &unmanaged);
    cr_assert_eq(rc, 0);
    cr_assert_eq(unmanaged->count, 1);
    flash_time t;             /* text <-> microseconds, UTC */
    rc = flash_time_parse("2024-05-01T12:00:00+02:00", 25, &t);
    cr_assert_eq(rc, 0);
    char text[48];
    flash_time_format(t, text, sizeof text);  /* "2024-05-01 10:00:00" */
    cr_assert_str_eq(text, "2024-05-01 10:00:00");

    flash_list *members;
    cr_assert_eq(Member_filter_by_manager(ctx, flash_i64n_of(42), &members), 0);
    flash_promise *ps[100];                            /* 100 members' managers: one get-many */
    for (size_t i = 0; i < members->count; i++) ps[i] = Member_manager_async(ctx, members->items[i]);
    rc = flash_await(ctx, flash_gather(ctx, members->count, ps), &v);
    cr_assert_eq(rc, 0);
    User *u;
    cr_assert_eq(Member_manager(ctx, &m, &u), 0);
    cr_assert_eq(u->id, 42);
    cr_assert_eq(Member_manager_or_404(ctx, &m2, &u), 0);
    cr_assert_null(u);
    *result = NULL;
    return 0;
}
static flash_promise *readme_view(flash_ctx *ctx, void *arg) { return flash_spawn(ctx, readme_task, arg); }

FLASH_TEST(types_memory, readme_examples) {
    void *v;
    cr_assert_eq(flash_run(fx.ctx, readme_view, NULL, &v), 0);
}

/* ---- SQLite ---- */

static char sq_dir[64];
static sqlite3 *sq_db;
static flash_sqlite *sq;
static flash_ctx *sq_ctx;
static flash_cache sq_cache;

static void sq_exec(const char *q) {
    char *err = NULL;
    cr_assert_eq(sqlite3_exec(sq_db, q, NULL, NULL, &err), SQLITE_OK, "%s: %s", q, err ? err : "?");
}

static void sq_setup(void) {
    char path[128];
    snprintf(sq_dir, sizeof sq_dir, "/tmp/flash-types-XXXXXX");
    cr_assert(mkdtemp(sq_dir));
    snprintf(path, sizeof path, "%s/t.db", sq_dir);
    cr_assert_eq(sqlite3_open(path, &sq_db), SQLITE_OK);
    sq_exec("CREATE TABLE ty_users (id INTEGER PRIMARY KEY, name TEXT);"
            "INSERT INTO ty_users VALUES (1, 'boss'), (2, 'chief');"
            "CREATE TABLE ty_rows (id INTEGER PRIMARY KEY, manager INTEGER, rank INTEGER, score REAL, ok INTEGER,"
            "  created, seen, name TEXT);"
            /* every text form, unix seconds, NULLs */
            "INSERT INTO ty_rows VALUES"
            " (1, 1, 10, 0.5, 1, '2024-05-01 12:00:00.123456', '2024-05-01', 'a'),"
            " (2, NULL, NULL, NULL, NULL, '2024-05-01T12:00:00.123456Z', NULL, 'b'),"
            " (3, 2, -3, 1.5, 0, '2024-05-01T14:30:00.123456+02:30', 0, 'c'),"
            " (4, NULL, 4, NULL, 1, '2024-05-01 07:00:00.123456-05:00', -2208988800, 'd'),"
            " (5, 9223372036854775807, 2147483647, -0.0, NULL, '1900-01-01', '1969-12-31 23:59:59.999999', 'e'),"
            " (6, -9223372036854775808, -2147483648, 2.5, 0, 1714564800, '2024-05-01 12:00:00', 'f'),"
            " (7, NULL, NULL, NULL, NULL, 'yesterday', NULL, 'g'),"
            " (8, NULL, NULL, NULL, NULL, 1.5, NULL, 'h'),"
            " (9, NULL, NULL, NULL, NULL, NULL, NULL, 'i');");
    sq = flash_sqlite_create(sq_db);
    sq_cache = flash_memory_create(NULL);
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = sq_cache;
    sq_ctx = flash_ctx_create(&d);
    cr_assert(sq && sq_ctx);
    cr_assert_eq(flash_ctx_set_source(sq_ctx, NULL, flash_sqlite_source(sq)), 0);
}

static void sq_teardown(void) {
    char cmd[128];
    flash_ctx_destroy(sq_ctx);
    flash_sqlite_destroy(sq);
    sqlite3_close(sq_db);
    flash_cache_destroy(sq_cache);
    snprintf(cmd, sizeof cmd, "rm -rf %s", sq_dir);
    cr_assert_eq(system(cmd), 0);
}
TestSuite(types_sqlite, .init = sq_setup, .fini = sq_teardown);

FLASH_TEST(types_sqlite, nulls_extremes_and_time_forms) {
    for (int round = 0; round < 2; round++) { /* from SQLite, then decoded from the cache */
        TyRow *r[7];
        for (int i = 0; i < 6; i++) cr_assert_eq(TyRow_get_by_id(sq_ctx, i + 1, &r[i]), 0, "id %d", i + 1);
        cr_assert_eq(r[0]->manager.v, 1);
        cr_assert(!r[0]->manager.null);
        cr_assert_eq(r[0]->rank.v, 10);
        cr_assert(r[0]->ok.v && !r[0]->ok.null);
        cr_assert_eq(r[0]->created, T_2024);
        cr_assert_eq(r[0]->seen.v, INT64_C(1714521600000000));
        cr_assert(r[1]->manager.null && r[1]->rank.null && r[1]->score.null && r[1]->ok.null && r[1]->seen.null);
        cr_assert_eq(r[1]->created, T_2024, "'T' and Z");
        cr_assert_eq(r[2]->created, T_2024, "+02:30");
        cr_assert_eq(r[2]->seen.v, 0, "unix 0");
        cr_assert(!r[2]->seen.null);
        cr_assert_eq(r[3]->created, T_2024, "-05:00");
        cr_assert_eq(r[3]->seen.v, T_1900, "negative unix seconds");
        cr_assert_eq(r[4]->manager.v, INT64_MAX);
        cr_assert_eq(r[4]->rank.v, INT32_MAX);
        cr_assert_eq(r[4]->created, T_1900);
        cr_assert_eq(r[4]->seen.v, -1);
        cr_assert_eq(r[5]->manager.v, INT64_MIN);
        cr_assert_eq(r[5]->rank.v, INT32_MIN);
        cr_assert_eq(r[5]->created, INT64_C(1714564800000000));
        /* not a timestamp: the key fails, naming table and column */
        flash_promise *p = TyRow_get_by_id_async(sq_ctx, 7);
        void *v;
        if (round == 0) {
            cr_assert_eq(flash_wait(sq_ctx, p, &v), FLASH_ESOURCE);
            cr_assert(strstr(flash_promise_message(p), "ty_rows.created = 'yesterday' is not a timestamp"), "%s",
                      flash_promise_message(p));
            p = TyRow_get_by_id_async(sq_ctx, 8);
            cr_assert_eq(flash_wait(sq_ctx, p, &v), FLASH_ESOURCE);
            cr_assert(strstr(flash_promise_message(p), "holds a REAL value"), "%s", flash_promise_message(p));
            p = TyRow_get_by_id_async(sq_ctx, 9);
            cr_assert_eq(flash_wait(sq_ctx, p, &v), FLASH_ESOURCE, "a NULL in TIME (not TIMEN) is rejected");
            cr_assert(strstr(flash_promise_message(p), "is NULL, but TyRow.created is a non-null TIME field"), "%s",
                      flash_promise_message(p));
        }
        flash_ctx_reset(sq_ctx);
    }
}

FLASH_TEST(types_sqlite, null_key_gives_the_null_rows_in_one_fetch) {
    flash_sqlite_stats before = flash_sqlite_stats_get(sq);
    flash_promise *ps[3] = {TyRow_filter_by_manager_async(sq_ctx, flash_i64n_null()),
                            TyRow_filter_by_manager_async(sq_ctx, flash_i64n_of(1)),
                            TyRow_filter_by_manager_async(sq_ctx, flash_i64n_of(2))};
    void *v;
    /* rows 7..9 fail (bad created): filters of NULL reject; read the others */
    flash_promise *all = flash_gather_settled(sq_ctx, 3, ps);
    cr_assert_eq(flash_wait(sq_ctx, all, &v), 0);
    flash_settled *res = v;
    flash_sqlite_stats s = flash_sqlite_stats_get(sq);
    cr_assert_eq(s.fetches - before.fetches, 1, "one source call for the three keys");
    cr_assert_eq(res[0].state, FLASH_REJECTED, "rows 7-9 cannot be read: %s", res[0].message ? res[0].message : "");
    cr_assert_eq(((flash_list *)res[1].value)->count, 1);
    cr_assert_eq(((flash_list *)res[2].value)->count, 1);
    /* with readable rows only */
    sq_exec("DELETE FROM ty_rows WHERE id >= 7");
    flash_ctx_reset(sq_ctx);
    flash_list *l;
    cr_assert_eq(TyRow_filter_by_manager(sq_ctx, flash_i64n_null(), &l), 0);
    cr_assert_eq(l->count, 2);
    for (size_t i = 0; i < l->count; i++) {
        const TyRow *r = l->items[i];
        cr_assert(r->manager.null);
        cr_assert(r->id == 2 || r->id == 4);
    }
    /* NULL in a multi-field key */
    cr_assert_eq(TyRow_filter_by_manager_ok(sq_ctx, flash_i64n_null(), flash_booln_null(), &l), 0);
    cr_assert_eq(l->count, 1);
    cr_assert_eq(((TyRow *)l->items[0])->id, 2);
    /* a timestamp key: canonical text */
    sq_exec("UPDATE ty_rows SET created = '2024-05-01 12:00:00.123456' WHERE id = 1");
    TyRow *r;
    cr_assert_eq(TyRow_get_by_created(sq_ctx, T_2024, &r), 0);
    cr_assert_eq(r->id, 1);
    cr_assert_eq(TyRow_filter_by_rank_created(sq_ctx, flash_i32n_of(10), T_2024, &l), 0);
    cr_assert_eq(l->count, 1);
}

FLASH_TEST(types_sqlite, foreign_keys_through_sqlite) {
    flash_list *l;
    sq_exec("DELETE FROM ty_rows WHERE id >= 7; UPDATE ty_rows SET manager = 404 WHERE id = 5;");
    cr_assert_eq(TyRow_filter_by_manager(sq_ctx, flash_i64n_null(), &l), 0);
    flash_promise *ps[4];
    TyRow *r1, *r3, *r5;
    cr_assert_eq(TyRow_get_by_id(sq_ctx, 1, &r1), 0);
    cr_assert_eq(TyRow_get_by_id(sq_ctx, 3, &r3), 0);
    cr_assert_eq(TyRow_get_by_id(sq_ctx, 5, &r5), 0);
    flash_sqlite_stats before = flash_sqlite_stats_get(sq);
    ps[0] = TyRow_manager_async(sq_ctx, r1);
    ps[1] = TyRow_manager_async(sq_ctx, r3);
    ps[2] = TyRow_manager_async(sq_ctx, l->items[0]);
    ps[3] = TyRow_manager_async_or_404(sq_ctx, r5);
    void *v;
    cr_assert_eq(flash_wait(sq_ctx, flash_gather_settled(sq_ctx, 4, ps), &v), 0);
    flash_settled *res = v;
    cr_assert_eq(flash_sqlite_stats_get(sq).statements - before.statements, 1);
    cr_assert_str_eq(((TyUser *)res[0].value)->name, "boss");
    cr_assert_str_eq(((TyUser *)res[1].value)->name, "chief");
    cr_assert_eq(res[2].state, FLASH_FULFILLED);
    cr_assert_null(res[2].value);
    cr_assert_eq(res[3].error, FLASH_E404);
}

/* ---- PostgreSQL ---- */

static flash_test_server pg_server;
static PGconn *pg_admin;
static flash_poll *pg_loop;
static flash_cache pg_cache;
static flash_ctx *pg_ctx;
static flash_pg *pg_src;

#define PG_TIME_FIELDS(F) F(I64, id) F(TIME, tz) F(TIMEN, plain) F(TIMEN, day) F(I64N, manager)
FLASH_MODEL_OPT(TyPgTime, PG_TIME_FIELDS, .table = "ty_times")
FLASH_GET_KEYS(TyPgTime, (id), (tz), (plain), (day), (id, tz))
FLASH_FILTER_KEYS(TyPgTime, (manager), (manager, day))
FLASH_FOREIGN_KEY(TyPgTime, manager, TyUser, id)

static void pg_sql(const char *q) {
    PGresult *r = PQexec(pg_admin, q);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", q, PQresultErrorMessage(r));
    PQclear(r);
}

static void pg_start(void) {
    alarm(90);
    cr_assert(flash_test_postgres_start(&pg_server), "postgres did not start");
    pg_admin = PQconnectdb(pg_server.extra);
    cr_assert_eq(PQstatus(pg_admin), CONNECTION_OK, "%s", PQerrorMessage(pg_admin));
    pg_sql("CREATE TABLE ty_users (id int8 PRIMARY KEY, name text);"
           "INSERT INTO ty_users VALUES (1, 'boss'), (2, 'chief');"
           "CREATE TABLE ty_rows (id int8 PRIMARY KEY, manager int8, rank int4, score float8, ok bool,"
           "  created timestamptz NOT NULL, seen timestamp, name text);"
           "INSERT INTO ty_rows VALUES"
           " (1, 1, 10, 0.5, true, '2024-05-01 12:00:00.123456+00', '2024-05-01', 'a'),"
           " (2, NULL, NULL, NULL, NULL, '2024-05-01 14:30:00.123456+02:30', NULL, 'b'),"
           " (3, 9223372036854775807, 2147483647, 'NaN', false, '1900-01-01 00:00:00+00', '1969-12-31 23:59:59.999999', 'c'),"
           " (4, -9223372036854775808, -2147483648, NULL, NULL, '4713-01-01 00:00:00+00 BC', '200000-01-01', 'd'),"
           " (5, NULL, 5, 1, NULL, 'infinity', NULL, 'e');"
           "CREATE TABLE ty_times (id int8 PRIMARY KEY, tz timestamptz NOT NULL, plain timestamp, day date, manager int8);"
           "INSERT INTO ty_times VALUES"
           " (1, '2024-05-01 12:00:00.123456+00', '2024-05-01 12:00:00.123456', '2024-05-01', 1),"
           " (2, '1900-01-01 00:00:00+00', '1900-01-01 00:00:00', '1900-01-01', NULL),"
           " (3, '1969-12-31 23:59:59.999999+00', NULL, NULL, 2),"
           " (4, '0044-03-15 12:00:00+00 BC', '0044-03-15 12:00:00 BC', '0044-03-15 BC', NULL),"
           " (5, '2024-05-01 12:00:00+00', NULL, '2024-05-01', 404);");
    pg_loop = flash_poll_create();
    pg_cache = flash_memory_create(NULL);
    /* the source's session runs in another time zone and DateStyle order */
    char conninfo[512];
    snprintf(conninfo, sizeof conninfo, "%s options='-c TimeZone=Asia/Kolkata -c DateStyle=ISO,DMY'", pg_server.extra);
    flash_pg_desc d;
    memset(&d, 0, sizeof d);
    d.conninfo = conninfo;
    d.loop = flash_poll_loop(pg_loop);
    int err = -1;
    pg_src = flash_pg_create(&d, &err);
    cr_assert(pg_src, "flash_pg_create: %s", flash_strerror(err));
    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    cd.cache = pg_cache;
    pg_ctx = flash_ctx_create(&cd);
    cr_assert(pg_ctx);
    cr_assert_eq(flash_poll_attach(pg_ctx, pg_loop), 0);
    cr_assert_eq(flash_ctx_set_source(pg_ctx, NULL, flash_pg_source(pg_src)), 0);
}

static void pg_teardown(void) {
    flash_ctx_destroy(pg_ctx);
    flash_pg_destroy(pg_src);
    if (pg_cache.vt) flash_cache_destroy(pg_cache);
    flash_poll_destroy(pg_loop);
    if (pg_admin) PQfinish(pg_admin);
    if (pg_server.dir[0]) flash_test_postgres_stop(&pg_server);
    pg_ctx = NULL;
    pg_src = NULL;
    pg_loop = NULL;
    pg_admin = NULL;
    memset(&pg_cache, 0, sizeof pg_cache);
    memset(&pg_server, 0, sizeof pg_server);
    alarm(0);
}
TestSuite(types_pg, .fini = pg_teardown);

static flash_time t_of(const char *s) {
    flash_time t;
    cr_assert_eq(flash_time_parse(s, strlen(s), &t), 0, "%s", s);
    return t;
}

FLASH_TEST(types_pg, nulls_extremes_time_zones_and_dates) {
    pg_start();
    for (int round = 0; round < 2; round++) {
        TyRow *r[4];
        for (int i = 0; i < 4; i++) cr_assert_eq(TyRow_get_by_id(pg_ctx, i + 1, &r[i]), 0, "id %d", i + 1);
        cr_assert_eq(r[0]->created, T_2024, "timestamptz under Asia/Kolkata: the same UTC instant");
        cr_assert_eq(r[0]->seen.v, INT64_C(1714521600000000));
        cr_assert(r[0]->ok.v && !r[0]->ok.null);
        cr_assert(r[1]->manager.null && r[1]->rank.null && r[1]->score.null && r[1]->ok.null && r[1]->seen.null);
        cr_assert_eq(r[1]->created, T_2024);
        cr_assert_eq(r[2]->manager.v, INT64_MAX);
        cr_assert_eq(r[2]->rank.v, INT32_MAX);
        cr_assert(isnan(r[2]->score.v) && !r[2]->score.null);
        cr_assert(!r[2]->ok.v && !r[2]->ok.null);
        cr_assert_eq(r[2]->created, T_1900);
        cr_assert_eq(r[2]->seen.v, -1);
        cr_assert_eq(r[3]->manager.v, INT64_MIN);
        cr_assert_eq(r[3]->rank.v, INT32_MIN);
        cr_assert_eq(r[3]->created, t_of("-4712-01-01"), "4713 BC is astronomical year -4712");
        cr_assert_eq(r[3]->seen.v, t_of("200000-01-01"));
        if (round == 0) {
            void *v;
            flash_promise *p = TyRow_get_by_id_async(pg_ctx, 5);
            cr_assert_eq(flash_wait(pg_ctx, p, &v), FLASH_ESOURCE);
            cr_assert(strstr(flash_promise_message(p), "ty_rows.created = 'infinity' is not a finite TIME"), "%s",
                      flash_promise_message(p));
        }
        flash_ctx_reset(pg_ctx);
    }
    /* times, dates and NULLs */
    TyPgTime *t[5];
    for (int i = 0; i < 5; i++) cr_assert_eq(TyPgTime_get_by_id(pg_ctx, i + 1, &t[i]), 0);
    cr_assert_eq(t[0]->tz, T_2024);
    cr_assert_eq(t[0]->plain.v, T_2024, "timestamp: read as UTC");
    cr_assert_eq(t[0]->day.v, INT64_C(1714521600000000), "date: midnight UTC");
    cr_assert_eq(t[1]->day.v, T_1900);
    cr_assert(t[2]->plain.null && t[2]->day.null);
    cr_assert_eq(t[2]->tz, -1);
    cr_assert_eq(t[3]->tz, t_of("-0043-03-15 12:00:00"));
    cr_assert_eq(t[3]->plain.v, t[3]->tz);
    cr_assert_eq(t[3]->day.v, t_of("-0043-03-15"));
}

FLASH_TEST(types_pg, time_and_null_keys_whatever_the_session_time_zone) {
    pg_start();
    TyPgTime *t;
    /* one-field time keys: timestamptz, timestamp, date columns */
    cr_assert_eq(TyPgTime_get_by_tz(pg_ctx, T_2024, &t), 0);
    cr_assert_eq(t->id, 1);
    cr_assert_eq(TyPgTime_get_by_plain(pg_ctx, flash_timen_of(T_1900), &t), 0);
    cr_assert_eq(t->id, 2);
    cr_assert_eq(TyPgTime_get_by_day(pg_ctx, flash_timen_of(T_1900), &t), 0);
    cr_assert_eq(t->id, 2);
    cr_assert_eq(TyPgTime_get_by_tz(pg_ctx, -1, &t), 0);
    cr_assert_eq(t->id, 3);
    cr_assert_eq(TyPgTime_get_by_tz(pg_ctx, t_of("-0043-03-15 12:00:00"), &t), 0, "BC");
    cr_assert_eq(t->id, 4);
    cr_assert_eq(TyPgTime_get_by_plain(pg_ctx, flash_timen_of(t_of("-0043-03-15 12:00:00")), &t), 0);
    cr_assert_eq(t->id, 4);
    cr_assert_eq(TyPgTime_get_by_tz_or_none(pg_ctx, T_2024 + 1, &t), 0);
    cr_assert_null(t);
    /* several fields with a time part */
    cr_assert_eq(TyPgTime_get_by_id_tz(pg_ctx, 3, -1, &t), 0);
    cr_assert_eq(t->id, 3);
    /* NULL keys: the NULL rows only, one statement for all three keys */
    flash_pg_stats before = flash_pg_stats_get(pg_src);
    flash_promise *ps[3] = {TyPgTime_filter_by_manager_async(pg_ctx, flash_i64n_null()),
                            TyPgTime_filter_by_manager_async(pg_ctx, flash_i64n_of(1)),
                            TyPgTime_get_by_day_async(pg_ctx, flash_timen_null())};
    void *v;
    cr_assert_eq(flash_wait(pg_ctx, flash_gather(pg_ctx, 3, ps), &v), 0);
    flash_list *nulls = ((void **)v)[0], *ones = ((void **)v)[1];
    cr_assert_eq(flash_pg_stats_get(pg_src).fetches - before.fetches, 2, "one fetch per class");
    cr_assert_eq(flash_pg_stats_get(pg_src).queries - before.queries, 2, "one statement per class");
    cr_assert_eq(nulls->count, 2);
    for (size_t i = 0; i < nulls->count; i++) {
        const TyPgTime *r = nulls->items[i];
        cr_assert(r->manager.null);
        cr_assert(r->id == 2 || r->id == 4);
    }
    cr_assert_eq(ones->count, 1);
    cr_assert_eq(flash_wait(pg_ctx, ps[2], &v), 0);
    cr_assert_eq(((TyPgTime *)v)->id, 3, "day IS NULL: row 3 only");
    flash_list *l;
    cr_assert_eq(TyPgTime_filter_by_manager_day(pg_ctx, flash_i64n_null(), flash_timen_of(T_1900), &l), 0);
    cr_assert_eq(l->count, 1);
    cr_assert_eq(((TyPgTime *)l->items[0])->id, 2);
    cr_assert_eq(TyPgTime_filter_by_manager_day(pg_ctx, flash_i64n_of(2), flash_timen_null(), &l), 0);
    cr_assert_eq(l->count, 1);
    cr_assert_eq(((TyPgTime *)l->items[0])->id, 3);
}

FLASH_TEST(types_pg, foreign_keys_through_postgres) {
    pg_start();
    TyPgTime *t[5];
    flash_promise *ps[5];
    void *v;
    for (int i = 0; i < 5; i++) ps[i] = TyPgTime_get_by_id_async(pg_ctx, i + 1);
    cr_assert_eq(flash_wait(pg_ctx, flash_gather(pg_ctx, 5, ps), &v), 0);
    for (int i = 0; i < 5; i++) t[i] = ((void **)v)[i];
    flash_pg_stats before = flash_pg_stats_get(pg_src);
    flash_stats sb = flash_ctx_stats(pg_ctx);
    for (int i = 0; i < 5; i++) ps[i] = TyPgTime_manager_async(pg_ctx, t[i]);
    cr_assert_eq(flash_wait(pg_ctx, flash_gather_settled(pg_ctx, 5, ps), &v), 0);
    flash_settled *res = v;
    flash_stats d = stats_sub(flash_ctx_stats(pg_ctx), sb);
    cr_assert_eq(d.cache_round_trips, 1);
    cr_assert_eq(flash_pg_stats_get(pg_src).queries - before.queries, 1);
    cr_assert_str_eq(((TyUser *)res[0].value)->name, "boss");
    cr_assert_null(res[1].value);
    cr_assert_str_eq(((TyUser *)res[2].value)->name, "chief");
    cr_assert_eq(res[4].error, FLASH_ENOTFOUND);
}
