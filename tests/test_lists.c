/* Ordered and limited lists (order_by, limit), counts (COUNT(*) ... GROUP BY
   in SQL sources) and exists caches, per key across a batch of several keys,
   on every source (table, SQLite, PostgreSQL) and on the memory backend and
   a real memcached; the order kept by the cache. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "models.h"
#include "backends/source/postgres.h"
#include "backends/source/sqlite.h"

#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

#define LPOST_FIELDS(F) F(I64, id) F(I64, author) F(TIMEN, created) F(STR, title) F(F64N, score)
FLASH_MODEL_OPT(LPost, LPOST_FIELDS, .table = "posts")
/* The newest three; NULL (no date) first in a descending order. */
FLASH_LIST_CACHE_OPT(PostsLatest, LPost, (author), .order_by = "-created, id", .limit = 3)
FLASH_LIST_CACHE_OPT(PostsByTitle, LPost, (author), .order_by = "title")
FLASH_LIST_CACHE_OPT(PostsLowScore, LPost, (author), .order_by = "score", .limit = 2)
FLASH_IDS_CACHE_OPT(PostIdsTop, LPost, (author), .order_by = "-score", .limit = 2)
FLASH_LIST_CACHE_OPT(PostsFirstTwo, LPost, (author), .limit = 2) /* by primary key */
FLASH_COUNT_CACHE(PostCount, LPost, (author))
FLASH_EXISTS_CACHE(PostExists, LPost, (author))
FLASH_LIST_CACHE_OPT(PostsBadOrder, LPost, (author), .order_by = "-nope")
FLASH_COUNT_CACHE_OPT(PostCountLimited, LPost, (author), .limit = 3)

#define T(s) ((flash_time)(s) * FLASH_TIME_PER_S + INT64_C(1700000000000000))
typedef struct post_data {
    int64_t id, author;
    bool dated;
    int64_t created_s;
    const char *title;
    bool scored;
    double score;
} post_data;
static const post_data posts[] = {
    {1, 1, true, 100, "b", true, 1.0},  {2, 1, true, 300, "a", true, 2.0},   {3, 1, false, 0, "c", false, 0},
    {4, 1, true, 300, "a", true, 5.0},  {5, 1, true, 200, "d", true, 3.0},   {6, 1, true, 50, "e", true, 4.0},
    {7, 2, true, 10, "x", true, 1.0},   {8, 2, true, 20, "y", false, 0},
};
#define NPOSTS (sizeof posts / sizeof posts[0])

static LPost post_row(const post_data *p) {
    LPost r;
    r.id = p->id;
    r.author = p->author;
    r.created = p->dated ? flash_timen_of(T(p->created_s)) : flash_timen_null();
    r.title = p->title;
    r.score = p->scored ? flash_f64n_of(p->score) : flash_f64n_null();
    return r;
}

typedef enum src_kind { SRC_TABLE, SRC_SQLITE, SRC_PG } src_kind;

static void *wait_ok(flash_ctx *ctx, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

static void expect_list(const flash_list *l, const int64_t *ids, size_t n, const char *what) {
    cr_assert(l, "%s: no list", what);
    cr_assert_eq(l->count, n, "%s: %zu rows, expected %zu", what, l->count, n);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(((LPost *)l->items[i])->id, ids[i], "%s[%zu]: id %lld, expected %lld", what, i,
                     (long long)((LPost *)l->items[i])->id, (long long)ids[i]);
}

/* Every class for authors 1, 2, 3 (no posts) in one batch; then again from
   the cache (no source call), same order. */
static void check_all(flash_ctx *ctx) {
    for (int pass = 0; pass < 2; pass++) {
        flash_stats before = flash_ctx_stats(ctx);
        flash_promise *ps[24];
        size_t n = 0;
        for (int a = 1; a <= 3; a++) {
            ps[n++] = PostsLatest_resolve_async(ctx, a);
            ps[n++] = PostsByTitle_resolve_async(ctx, a);
            ps[n++] = PostsLowScore_resolve_async(ctx, a);
            ps[n++] = PostIdsTop_resolve_async(ctx, a);
            ps[n++] = PostsFirstTwo_resolve_async(ctx, a);
            ps[n++] = PostCount_resolve_async(ctx, a);
            ps[n++] = PostExists_resolve_async(ctx, a);
        }
        void **v = wait_ok(ctx, flash_gather(ctx, n, ps));
        flash_stats after = flash_ctx_stats(ctx);
        if (pass == 0) cr_assert_eq(after.source_calls - before.source_calls, 7, "one fetch per class for 3 keys");
        else cr_assert_eq(after.source_calls - before.source_calls, 0, "all from the cache");
        /* author 1: NULL date first (descending), the tie 2/4 at 300 by id */
        expect_list(v[0], (int64_t[]){3, 2, 4}, 3, "latest(1)");
        expect_list(v[1], (int64_t[]){2, 4, 1, 3, 5, 6}, 6, "by title(1)");
        expect_list(v[2], (int64_t[]){1, 2}, 2, "low score(1)");
        flash_ids *ids = v[3];
        cr_assert_eq(ids->count, 2);
        cr_assert_eq(ids->ids[0], 3, "NULL score first descending, got %lld", (long long)ids->ids[0]);
        cr_assert_eq(ids->ids[1], 4);
        expect_list(v[4], (int64_t[]){1, 2}, 2, "first two(1)");
        cr_assert_eq(*(int64_t *)v[5], 6);
        cr_assert_eq(*(bool *)v[6], true);
        /* author 2 */
        expect_list(v[7], (int64_t[]){8, 7}, 2, "latest(2)");
        expect_list(v[8], (int64_t[]){7, 8}, 2, "by title(2)");
        expect_list(v[9], (int64_t[]){7, 8}, 2, "low score(2): NULL last ascending");
        ids = v[10];
        cr_assert_eq(ids->count, 2);
        cr_assert_eq(ids->ids[0], 8);
        cr_assert_eq(ids->ids[1], 7);
        cr_assert_eq(*(int64_t *)v[12], 2);
        cr_assert_eq(*(bool *)v[13], true);
        /* author 3: nothing */
        expect_list(v[14], NULL, 0, "latest(3)");
        cr_assert_eq(((flash_ids *)v[17])->count, 0);
        cr_assert_eq(*(int64_t *)v[19], 0);
        cr_assert_eq(*(bool *)v[20], false);
        flash_ctx_reset(ctx); /* next request: the memo is gone, the cache stays */
    }
    /* The sync forms, and bad classes. */
    bool e = true;
    int64_t cnt = -1;
    cr_assert_eq(PostExists_resolve(ctx, 3, &e), 0);
    cr_assert_eq(e, false);
    cr_assert_eq(PostCount_resolve(ctx, 1, &cnt), 0);
    cr_assert_eq(cnt, 6);
    flash_list *l = NULL;
    cr_assert_eq(PostsBadOrder_resolve(ctx, 1, &l), FLASH_EINVAL);
    cr_assert_eq(PostCountLimited_resolve(ctx, 1, &cnt), FLASH_EINVAL);
}

/* ---- sources ---- */

static sqlite3 *sdb;
static flash_sqlite *sq;
static char sdir[64];
static int sql_seen_group, sql_seen_window, sql_seen_distinct, sql_seen_order;

static int trace_cb(unsigned type, void *ud, void *p, void *x) {
    (void)ud;
    (void)x;
    if (type == SQLITE_TRACE_STMT) {
        char *sqltext = sqlite3_expanded_sql((sqlite3_stmt *)p);
        if (sqltext) {
            if (strstr(sqltext, "COUNT(*)") && strstr(sqltext, "GROUP BY")) sql_seen_group++;
            if (strstr(sqltext, "ROW_NUMBER() OVER (PARTITION BY")) sql_seen_window++;
            if (strstr(sqltext, "SELECT DISTINCT")) sql_seen_distinct++;
            if (strstr(sqltext, "ORDER BY \"title\" ASC NULLS LAST")) sql_seen_order++;
            sqlite3_free(sqltext);
        }
    }
    return 0;
}

static void sqlite_open(void) {
    char path[128];
    snprintf(sdir, sizeof sdir, "/tmp/flash-lists-XXXXXX");
    cr_assert(mkdtemp(sdir));
    snprintf(path, sizeof path, "%s/t.db", sdir);
    cr_assert_eq(sqlite3_open(path, &sdb), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(sdb,
                              "CREATE TABLE posts (id INTEGER PRIMARY KEY, author INTEGER, created TEXT, title TEXT,"
                              " score REAL)",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(sdb, "INSERT INTO posts VALUES (?,?,?,?,?)", -1, &st, NULL), SQLITE_OK);
    for (size_t i = 0; i < NPOSTS; i++) {
        char when[48];
        sqlite3_bind_int64(st, 1, posts[i].id);
        sqlite3_bind_int64(st, 2, posts[i].author);
        if (posts[i].dated) {
            flash_time_format(T(posts[i].created_s), when, sizeof when);
            sqlite3_bind_text(st, 3, when, -1, SQLITE_TRANSIENT);
        } else {
            sqlite3_bind_null(st, 3);
        }
        sqlite3_bind_text(st, 4, posts[i].title, -1, SQLITE_STATIC);
        if (posts[i].scored) sqlite3_bind_double(st, 5, posts[i].score);
        else sqlite3_bind_null(st, 5);
        cr_assert_eq(sqlite3_step(st), SQLITE_DONE);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    sqlite3_trace_v2(sdb, SQLITE_TRACE_STMT, trace_cb, NULL);
    sq = flash_sqlite_create(sdb);
    cr_assert(sq);
}

static void sqlite_close(void) {
    char cmd[128];
    flash_sqlite_destroy(sq);
    sqlite3_close(sdb);
    sq = NULL;
    sdb = NULL;
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", sdir);
    if (sdir[0] && system(cmd) != 0) {
    }
}

static flash_test_server pgserver;
static flash_pg *pg;

static void pg_open(void) {
    alarm(90);
    cr_assert(flash_test_postgres_start(&pgserver), "postgres did not start");
    PGconn *admin = PQconnectdb(pgserver.extra);
    cr_assert_eq(PQstatus(admin), CONNECTION_OK, "%s", PQerrorMessage(admin));
    PGresult *r = PQexec(admin,
                         "SET TimeZone = 'UTC';"
                         "CREATE TABLE posts (id int8 PRIMARY KEY, author int8, created timestamptz, title text,"
                         " score float8);");
    cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(r));
    PQclear(r);
    for (size_t i = 0; i < NPOSTS; i++) {
        char q[256], when[48] = "NULL", score[32] = "NULL";
        if (posts[i].dated) {
            char t[40];
            flash_time_format(T(posts[i].created_s), t, sizeof t);
            snprintf(when, sizeof when, "'%s+00'", t);
        }
        if (posts[i].scored) snprintf(score, sizeof score, "%g", posts[i].score);
        snprintf(q, sizeof q, "INSERT INTO posts VALUES (%lld, %lld, %s, '%s', %s)", (long long)posts[i].id,
                 (long long)posts[i].author, when, posts[i].title, score);
        r = PQexec(admin, q);
        cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s: %s", q, PQresultErrorMessage(r));
        PQclear(r);
    }
    PQfinish(admin);
    flash_pg_desc d;
    memset(&d, 0, sizeof d);
    d.conninfo = pgserver.extra;
    d.loop = fx.lp;
    int err = 0;
    pg = flash_pg_create(&d, &err);
    cr_assert(pg, "flash_pg_create: %s", flash_strerror(err));
}

static void use_source(src_kind k) {
    if (k == SRC_TABLE) {
        for (size_t i = 0; i < NPOSTS; i++) {
            LPost row = post_row(&posts[i]);
            cr_assert_eq(flash_table_put(fx.db, &LPost_model, &row), 0);
        }
    } else if (k == SRC_SQLITE) {
        sqlite_open();
        cr_assert_eq(flash_ctx_set_source(fx.ctx, &LPost_model, flash_sqlite_source(sq)), 0);
    } else {
        pg_open();
        cr_assert_eq(flash_ctx_set_source(fx.ctx, &LPost_model, flash_pg_source(pg)), 0);
    }
}

static void done_source(void) {
    if (sq) sqlite_close();
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
static void teardown(void) {
    flash_ctx_destroy(fx.ctx); /* contexts, then the sources */
    fx.ctx = NULL;
    done_source();
    if (pg) {
        flash_pg_destroy(pg);
        pg = NULL;
        flash_test_postgres_stop(&pgserver);
    }
    fixture_teardown();
}
TestSuite(lists, .init = setup_memory, .fini = teardown);
TestSuite(lists_memcached, .init = setup_memcached, .fini = teardown);

FLASH_TEST(lists, table_order_limit_count_exists) {
    use_source(SRC_TABLE);
    check_all(fx.ctx);
}
FLASH_TEST(lists_memcached, table_order_limit_count_exists) {
    use_source(SRC_TABLE);
    check_all(fx.ctx);
}

FLASH_TEST(lists, sqlite_order_limit_count_exists) {
    use_source(SRC_SQLITE);
    check_all(fx.ctx);
    cr_assert_eq(sql_seen_group, 1, "COUNT(*) ... GROUP BY once, got %d", sql_seen_group);
    cr_assert_geq(sql_seen_window, 4, "a ROW_NUMBER window per limited class");
    cr_assert_eq(sql_seen_distinct, 1, "exists: SELECT DISTINCT once");
    cr_assert_eq(sql_seen_order, 1, "an ORDER BY for the unlimited ordered list");
}
FLASH_TEST(lists_memcached, sqlite_order_limit_count_exists) {
    use_source(SRC_SQLITE);
    check_all(fx.ctx);
}

FLASH_TEST(lists, postgres_order_limit_count_exists) {
    use_source(SRC_PG);
    check_all(fx.ctx);
    cr_assert_eq(flash_test_postgres_log_count(&pgserver, "GROUP BY"), 1);
    cr_assert_geq(flash_test_postgres_log_count(&pgserver, "ROW_NUMBER() OVER (PARTITION BY"), 4);
    cr_assert_eq(flash_test_postgres_log_count(&pgserver, "SELECT DISTINCT"), 1);
}
FLASH_TEST(lists_memcached, postgres_order_limit_count_exists) {
    use_source(SRC_PG);
    check_all(fx.ctx);
}

/* The engine sorts what any source gives: a custom fallback answering in
   reverse gets the class's order; the cut keeps the first. */
static void reverse_fallback(flash_ctx *ctx, flash_fetch *f, void *ud) {
    (void)ctx;
    (void)ud;
    for (size_t i = 0; i < flash_fetch_count(f); i++)
        for (size_t k = NPOSTS; k-- > 0;) {
            LPost row = post_row(&posts[k]);
            if (row.author == flash_fetch_key(f, i)[0].u.i64) flash_fetch_set_row(f, i, &row);
        }
    flash_fetch_done(f, 0, NULL);
}
FLASH_LIST_CACHE_OPT(PostsFallbackOrdered, LPost, (author), .order_by = "-created", .limit = 4,
                     .fallback = reverse_fallback)
FLASH_TEST(lists, fallback_rows_are_sorted_and_cut) {
    flash_list *l = NULL;
    cr_assert_eq(PostsFallbackOrdered_resolve(fx.ctx, 1, &l), 0);
    expect_list(l, (int64_t[]){3, 2, 4, 5}, 4, "fallback");
}

/* A row change moves it between keys: count, exists and the ordered list of
   the old and the new author are invalidated. */
FLASH_TEST(lists, invalidation_of_old_and_new_keys) {
    use_source(SRC_TABLE);
    int64_t c1 = 0, c3 = 0;
    bool e3 = true;
    flash_list *l = NULL;
    cr_assert_eq(PostCount_resolve(fx.ctx, 1, &c1), 0);
    cr_assert_eq(PostCount_resolve(fx.ctx, 3, &c3), 0);
    cr_assert_eq(PostExists_resolve(fx.ctx, 3, &e3), 0);
    cr_assert_eq(c1, 6);
    cr_assert_eq(e3, false);
    LPost old = post_row(&posts[2]), moved = old; /* id 3 */
    moved.author = 3;
    cr_assert_eq(flash_table_put(fx.db, &LPost_model, &moved), 0);
    cr_assert_eq(flash_invalidate(fx.ctx, &LPost_model, &old, &moved), 0);
    flash_ctx_reset(fx.ctx);
    cr_assert_eq(PostCount_resolve(fx.ctx, 1, &c1), 0);
    cr_assert_eq(PostCount_resolve(fx.ctx, 3, &c3), 0);
    cr_assert_eq(PostExists_resolve(fx.ctx, 3, &e3), 0);
    cr_assert_eq(PostsLatest_resolve(fx.ctx, 1, &l), 0);
    cr_assert_eq(c1, 5);
    cr_assert_eq(c3, 1);
    cr_assert_eq(e3, true);
    expect_list(l, (int64_t[]){2, 4, 5}, 3, "latest(1) after the move");
}

/* A list key's meaning depends on its order and limit: they are part of the
   key (a fingerprint after the version), so changing them needs no version
   bump; classes without either keep the plain head. */
FLASH_TEST(lists, order_and_limit_are_part_of_the_key) {
    flash_ctx *c = flash_ctx_create(NULL);
    flash_value a = flash_v_i64(1);
    char *k1, *k2, *k3, *k4;
    size_t n1, n2, n3, n4;
    cr_assert_eq(flash_cache_key(c, &PostsLatest_class, &a, 1, &k1, &n1, NULL), 0);
    cr_assert_eq(flash_cache_key(c, &PostsByTitle_class, &a, 1, &k2, &n2, NULL), 0);
    cr_assert_eq(flash_cache_key(c, &PostsFirstTwo_class, &a, 1, &k3, &n3, NULL), 0);
    cr_assert_eq(flash_cache_key(c, &PostCount_class, &a, 1, &k4, &n4, NULL), 0);
    const char *f1 = strstr(k1, ":v1."), *f2 = strstr(k2, ":v1."), *f3 = strstr(k3, ":v1.");
    cr_assert(f1 && f2 && f3, "ordered or limited keys carry a fingerprint: %s %s %s", k1, k2, k3);
    cr_assert_neq(strncmp(f1, f2, 13), 0, "different orders, different keys: %s %s", k1, k2);
    cr_assert_neq(strncmp(f1, f3, 13), 0, "a limit alone changes the key: %s %s", k1, k3);
    cr_assert(strstr(k4, ":v1:1") != NULL, "an unordered class keeps its plain key: %s", k4);
    /* Stable: the same class gives the same key in another context. */
    flash_ctx *d = flash_ctx_create(NULL);
    char *k5;
    size_t n5;
    cr_assert_eq(flash_cache_key(d, &PostsLatest_class, &a, 1, &k5, &n5, NULL), 0);
    cr_assert_str_eq(k1, k5);
    flash_ctx_destroy(c);
    flash_ctx_destroy(d);
}
