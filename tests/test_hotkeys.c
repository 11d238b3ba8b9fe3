/* Hot keys through the engine: leases on misses (flash_desc.lease_s,
   flash_cache_opts.lease_s) on the memory backend and on real memcached and
   Redis. Many contexts on one loop read one missing key at once: with
   leases one reads the source and fills, the others wait for its fill; a
   winner that never fills holds the others at most lease_wait_ms; a write
   in between still wins over the winner's late fill. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/memory.h"
#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "backends/source/table.h"
#include "consistency.h"
#include "harness.h"

#define HOT_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(Hot, HOT_FIELDS)
FLASH_GET_KEYS(Hot, (id))
FLASH_MODEL_OPT(HotLeased, HOT_FIELDS, .lease_s = 5)
FLASH_GET_KEYS(HotLeased, (id))

/* allowtime with leases: stale-while-revalidate on the server */
FLASH_MODEL_OPT(HotSwr, HOT_FIELDS, .allowtime_s = 5, .lease_s = 5)
FLASH_GET_KEYS(HotSwr, (id))

#define HK_TEST(name)                                                        \
    static void hk_body_##name(void);                                        \
    FLASH_TEST(hotkeys, name) {                                              \
        alarm(60);                                                           \
        hk_body_##name();                                                    \
        alarm(0);                                                            \
    }                                                                        \
    static void hk_body_##name(void)

enum { MEMORY, MEMCACHED, REDIS };

typedef struct henv {
    flash_poll *p;
    flash_cache c;
    flash_table *db;
    flash_test_server srv;
} henv;

static void henv_start(henv *e, int kind) {
    memset(e, 0, sizeof *e);
    e->p = flash_poll_create();
    e->db = flash_table_create();
    if (kind == MEMORY) {
        e->c = flash_memory_create(NULL);
    } else if (kind == MEMCACHED) {
        cr_assert(flash_test_memcached_start(&e->srv, NULL));
        flash_memcached_server s = {"127.0.0.1", e->srv.port, 1};
        flash_memcached_desc d;
        int err = 1;
        memset(&d, 0, sizeof d);
        d.loop = flash_poll_loop(e->p);
        d.servers = &s;
        d.server_count = 1;
        e->c = flash_memcached_create(&d, &err);
    } else {
        cr_assert(flash_test_redis_start(&e->srv));
        flash_redis_desc d;
        int err = 1;
        memset(&d, 0, sizeof d);
        d.loop = flash_poll_loop(e->p);
        d.host = "127.0.0.1";
        d.port = e->srv.port;
        e->c = flash_redis_create(&d, &err);
    }
    cr_assert_not_null(e->c.self);
}

static void henv_stop(henv *e) {
    flash_cache_destroy(e->c);
    flash_table_destroy(e->db);
    flash_poll_destroy(e->p);
    if (e->srv.pid) flash_test_server_stop(&e->srv);
}

static flash_ctx *hctx(henv *e, uint32_t lease_s, uint32_t lease_wait_ms, flash_source src) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = e->c;
    d.lease_s = lease_s;
    d.lease_wait_ms = lease_wait_ms;
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert_not_null(ctx);
    cr_assert_eq(flash_poll_attach(ctx, e->p), 0);
    flash_ctx_set_source(ctx, NULL, src);
    return ctx;
}

static void run_until_settled(henv *e, flash_promise *const *ps, int n) {
    int64_t start = flash_test_now_ms();
    for (;;) {
        int pending = 0;
        for (int i = 0; i < n; i++) pending += flash_promise_state(ps[i]) == FLASH_PENDING;
        if (!pending) break;
        cr_assert_lt(flash_test_now_ms() - start, 10000, "%d reads never settled", pending);
        flash_poll_run_once(e->p, true);
    }
    for (int i = 0; i < 20; i++) flash_poll_run_once(e->p, false); /* fills land */
}

static const char *name_of(flash_promise *p) {
    cr_assert_eq(flash_promise_state(p), FLASH_FULFILLED, "read failed: %s", flash_promise_message(p));
    return ((Hot *)flash_promise_value(p))->name;
}

/* 16 contexts read one cold key in the same tick: the source sees it once
   with leases, 16 times without. */
static void herd(int kind, bool leases) {
    henv e;
    henv_start(&e, kind);
    const flash_class *cls = leases ? &HotLeased__get_by_id : &Hot__get_by_id;
    Hot row = {7, "seven"};
    cr_assert_eq(flash_table_put(e.db, leases ? &HotLeased_model : &Hot_model, &row), 0);
    enum { N = 16 };
    flash_ctx *ctx[N];
    flash_promise *ps[N];
    flash_value k = flash_v_i64(7);
    for (int i = 0; i < N; i++) ctx[i] = hctx(&e, 0, 0, flash_table_source(e.db));
    for (int i = 0; i < N; i++) ps[i] = flash_query_async(ctx[i], cls, &k, 1, 0);
    run_until_settled(&e, ps, N);
    uint64_t wins = 0, waits = 0, hits = 0;
    for (int i = 0; i < N; i++) {
        cr_assert_str_eq(name_of(ps[i]), "seven");
        flash_stats st = flash_ctx_stats(ctx[i]);
        wins += st.lease_wins;
        waits += st.lease_waits;
        hits += st.cache_hits;
    }
    if (leases) {
        cr_assert_eq(flash_table_keys_fetched(e.db), 1, "%s: %llu source reads", e.c.vt->name,
                     (unsigned long long)flash_table_keys_fetched(e.db));
        cr_assert_eq(wins, 1);
        cr_assert_geq(waits, N - 1);
        cr_assert_eq(hits, N - 1, "the losers read the winner's fill");
    } else {
        cr_assert_eq(flash_table_keys_fetched(e.db), N);
        cr_assert_eq(wins, 0);
    }
    /* the fill is a plain value now: a new reader hits */
    flash_ctx *late = hctx(&e, 0, 0, flash_table_source(e.db));
    flash_promise *lp = flash_query_async(late, cls, &k, 1, 0);
    run_until_settled(&e, &lp, 1);
    cr_assert_str_eq(name_of(lp), "seven");
    cr_assert_eq(flash_ctx_stats(late).cache_hits, 1);
    flash_ctx_destroy(late);
    for (int i = 0; i < N; i++) flash_ctx_destroy(ctx[i]);
    henv_stop(&e);
}

HK_TEST(herd_memory_one_source_read_with_leases) { herd(MEMORY, true); }
HK_TEST(herd_memory_sixteen_without) { herd(MEMORY, false); }
HK_TEST(herd_memcached_one_source_read_with_leases) { herd(MEMCACHED, true); }
HK_TEST(herd_memcached_sixteen_without) { herd(MEMCACHED, false); }
HK_TEST(herd_redis_one_source_read_with_leases) { herd(REDIS, true); }
HK_TEST(herd_redis_sixteen_without) { herd(REDIS, false); }

/* A winner that never fills (its source hangs, then its context is gone):
   the loser waits lease_wait_ms, reads the source itself and fills by CAS
   against the stub; the next reader hits. */
static void crashed_winner(int kind) {
    henv e;
    henv_start(&e, kind);
    Hot row = {8, "eight"};
    cr_assert_eq(flash_table_put(e.db, &HotLeased_model, &row), 0);
    gated_source *hang = gated_source_create(e.db, flash_poll_loop(e.p));
    flash_ctx *a = hctx(&e, 0, 0, gated_source_get(hang));
    flash_ctx *b = hctx(&e, 0, 60, flash_table_source(e.db));
    flash_value k = flash_v_i64(8);
    flash_promise *pa = flash_query_async(a, &HotLeased__get_by_id, &k, 1, 0);
    for (int i = 0; i < 200 && !gated_source_waiting(hang); i++) flash_poll_run_once(e.p, true);
    cr_assert_eq(gated_source_waiting(hang), 1, "the winner reads the source");
    cr_assert_eq(flash_ctx_stats(a).lease_wins, 1);
    (void)pa;
    flash_ctx_destroy(a); /* crashed: its stub stays */
    int64_t t0 = flash_test_now_ms();
    flash_promise *pb = flash_query_async(b, &HotLeased__get_by_id, &k, 1, 0);
    run_until_settled(&e, &pb, 1);
    int64_t waited = flash_test_now_ms() - t0;
    cr_assert_str_eq(name_of(pb), "eight");
    flash_stats st = flash_ctx_stats(b);
    cr_assert_eq(st.lease_timeouts, 1);
    cr_assert_geq(st.lease_waits, 3, "backoff re-reads: %llu", (unsigned long long)st.lease_waits);
    cr_assert_geq(waited, 55, "waited %lld ms", (long long)waited);
    cr_assert_lt(waited, 2000, "waited %lld ms", (long long)waited);
    cr_assert_eq(flash_table_keys_fetched(e.db), 1);
    flash_ctx *c = hctx(&e, 0, 0, flash_table_source(e.db));
    flash_promise *pc = flash_query_async(c, &HotLeased__get_by_id, &k, 1, 0);
    run_until_settled(&e, &pc, 1);
    cr_assert_str_eq(name_of(pc), "eight");
    cr_assert_eq(flash_ctx_stats(c).cache_hits, 1, "the loser's fill replaced the stub");
    flash_ctx_destroy(b);
    flash_ctx_destroy(c);
    gated_source_destroy(hang);
    henv_stop(&e);
}

HK_TEST(crashed_winner_memory) { crashed_winner(MEMORY); }
HK_TEST(crashed_winner_memcached) { crashed_winner(MEMCACHED); }
HK_TEST(crashed_winner_redis) { crashed_winner(REDIS); }

/* A winner reads the old row; a loser waits; the writer updates the row and
   invalidates (its marker replaces the stub) before the winner's fill: the
   fill fails, the loser reads the marker, then the source: the new row, and
   the cache ends holding nothing older. */
static void writer_between(int kind) {
    henv e;
    henv_start(&e, kind);
    Hot old_row = {9, "old"}, new_row = {9, "new"};
    cr_assert_eq(flash_table_put(e.db, &HotLeased_model, &old_row), 0);
    gated_source *gs = gated_source_create(e.db, flash_poll_loop(e.p));
    gate *g = gate_create(e.c, flash_poll_loop(e.p));
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = gate_cache(g);
    flash_ctx *a = flash_ctx_create(&d);
    cr_assert_eq(flash_poll_attach(a, e.p), 0);
    flash_ctx_set_source(a, NULL, gated_source_get(gs));
    flash_ctx *b = hctx(&e, 0, 2000, flash_table_source(e.db));
    flash_ctx *w = hctx(&e, 0, 0, flash_table_source(e.db));
    flash_value k = flash_v_i64(9);
    flash_promise *pa = flash_query_async(a, &HotLeased__get_by_id, &k, 1, 0);
    for (int i = 0; i < 200 && !gated_source_waiting(gs); i++) flash_poll_run_once(e.p, true);
    cr_assert_eq(flash_ctx_stats(a).lease_wins, 1);
    gate_shut(g, true); /* a's fill will wait at the gate */
    gated_source_release(gs); /* a reads "old" */
    cr_assert_eq(gate_waiting(g), 1, "the winner's fill waits");
    flash_promise *pb = flash_query_async(b, &HotLeased__get_by_id, &k, 1, 0);
    for (int i = 0; i < 20; i++) flash_poll_run_once(e.p, true);
    cr_assert_eq(flash_promise_state(pb), FLASH_PENDING, "the loser waits for the winner");
    cr_assert_geq(flash_ctx_stats(b).lease_waits, 1);
    cr_assert_eq(flash_table_put(e.db, &HotLeased_model, &new_row), 0);
    cr_assert_eq(flash_invalidate(w, &HotLeased_model, &old_row, &new_row), 0);
    gate_shut(g, false);
    while (gate_waiting(g)) gate_release(g); /* the late fill: refused */
    run_until_settled(&e, &pb, 1);
    cr_assert_str_eq(name_of(pa), "old");
    cr_assert_str_eq(name_of(pb), "new", "the loser must not get the winner's stale read");
    /* nothing older in the cache: an only_cache read finds "new" or nothing */
    flash_ctx *c = hctx(&e, 0, 0, flash_table_source(e.db));
    flash_promise *pc = flash_query_async(c, &HotLeased__get_by_id, &k, 1, FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE);
    run_until_settled(&e, &pc, 1);
    cr_assert_eq(flash_promise_state(pc), FLASH_FULFILLED);
    Hot *got = (Hot *)flash_promise_value(pc);
    cr_assert(!got || strcmp(got->name, "new") == 0, "the cache serves '%s'", got ? got->name : "");
    flash_ctx_destroy(a);
    flash_ctx_destroy(b);
    flash_ctx_destroy(c);
    flash_ctx_destroy(w);
    gate_destroy(g);
    gated_source_destroy(gs);
    henv_stop(&e);
}

HK_TEST(writer_between_winner_and_fill_memory) { writer_between(MEMORY); }
HK_TEST(writer_between_winner_and_fill_memcached) { writer_between(MEMCACHED); }
HK_TEST(writer_between_winner_and_fill_redis) { writer_between(REDIS); }

/* An only_cache read takes no lease (it never fills): the next reader wins
   at once. A backend without leases (the gate) keeps the plain path. */
HK_TEST(only_cache_takes_no_lease_and_a_backend_without_leases_is_plain) {
    henv e;
    henv_start(&e, MEMORY);
    Hot row = {10, "ten"};
    cr_assert_eq(flash_table_put(e.db, &HotLeased_model, &row), 0);
    flash_ctx *a = hctx(&e, 0, 0, flash_table_source(e.db));
    flash_value k = flash_v_i64(10);
    flash_promise *pa = flash_query_async(a, &HotLeased__get_by_id, &k, 1, FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE);
    run_until_settled(&e, &pa, 1);
    cr_assert_null(flash_promise_value(pa));
    cr_assert_eq(flash_ctx_stats(a).lease_wins, 0);
    pa = flash_query_async(a, &HotLeased__get_by_id, &k, 1, 0);
    run_until_settled(&e, &pa, 1);
    cr_assert_str_eq(name_of(pa), "ten");
    cr_assert_eq(flash_ctx_stats(a).lease_wins, 1);
    cr_assert_eq(flash_ctx_stats(a).lease_waits, 0);
    gate *g = gate_create(e.c, flash_poll_loop(e.p));
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = gate_cache_plain(g); /* caps 0 */
    d.lease_s = 5;
    flash_ctx *b = flash_ctx_create(&d);
    cr_assert_eq(flash_poll_attach(b, e.p), 0);
    flash_ctx_set_source(b, NULL, flash_table_source(e.db));
    flash_value k2 = flash_v_i64(11);
    Hot row2 = {11, "eleven"};
    cr_assert_eq(flash_table_put(e.db, &HotLeased_model, &row2), 0);
    flash_promise *pb = flash_query_async(b, &HotLeased__get_by_id, &k2, 1, 0);
    run_until_settled(&e, &pb, 1);
    cr_assert_str_eq(name_of(pb), "eleven");
    cr_assert_eq(flash_ctx_stats(b).lease_wins, 0, "no leases through a backend without them");
    flash_ctx_destroy(a);
    flash_ctx_destroy(b);
    gate_destroy(g);
    henv_stop(&e);
}

/* ---- stale-while-revalidate on the server (allowtime with leases) ---- */

static int read_many(henv *e, int n, int64_t id, const char *want, flash_stats *sum) {
    flash_ctx *ctx[16];
    flash_promise *ps[16];
    flash_value k = flash_v_i64(id);
    cr_assert_leq(n, 16);
    for (int i = 0; i < n; i++) ctx[i] = hctx(e, 0, 0, flash_table_source(e->db));
    for (int i = 0; i < n; i++) ps[i] = flash_query_async(ctx[i], &HotSwr__get_by_id, &k, 1, 0);
    run_until_settled(e, ps, n);
    memset(sum, 0, sizeof *sum);
    for (int i = 0; i < n; i++) {
        cr_assert_str_eq(name_of(ps[i]), want, "reader %d", i);
        flash_stats st = flash_ctx_stats(ctx[i]);
        sum->stale_hits += st.stale_hits;
        sum->stale_refreshes += st.stale_refreshes;
        sum->cache_hits += st.cache_hits;
        sum->writes += st.writes;
        flash_ctx_destroy(ctx[i]);
    }
    return n;
}

/* A hot key invalidated under reads: one op marks it stale; inside the lag
   window every reader is served the stale value and nobody reads the
   source; after it, of 16 readers in one tick one refreshes (one source
   read) and all are served; then the new row is a plain hit. */
static void stale_one_refresh(int kind) {
    henv e;
    henv_start(&e, kind);
    Hot v1 = {20, "v1"}, v2 = {20, "v2"};
    flash_stats sum;
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v1), 0);
    read_many(&e, 1, 20, "v1", &sum); /* cached */
    cr_assert_eq(flash_table_keys_fetched(e.db), 1);
    flash_ctx *w = hctx(&e, 0, 0, flash_table_source(e.db));
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v2), 0);
    flash_stats before = flash_ctx_stats(w);
    cr_assert_eq(flash_invalidate(w, &HotSwr_model, &v1, &v2), 0);
    flash_stats after = flash_ctx_stats(w);
    cr_assert_eq(after.writes - before.writes, 1, "one cache operation per invalidation");
    read_many(&e, 8, 20, "v1", &sum); /* inside the lag window */
    cr_assert_eq(sum.stale_hits, 8);
    cr_assert_eq(sum.stale_refreshes, 0);
    cr_assert_eq(flash_table_keys_fetched(e.db), 1, "no source read inside the lag window");
    flash_test_sleep_ms(2300); /* past the lag window (memcached: whole seconds, rounded against us) */
    read_many(&e, 16, 20, "v1", &sum);
    cr_assert_eq(sum.stale_hits, 16);
    cr_assert_eq(sum.stale_refreshes, 1, "one reader refreshes");
    cr_assert_eq(flash_table_keys_fetched(e.db), 2, "one source read for the invalidation");
    read_many(&e, 4, 20, "v2", &sum);
    cr_assert_eq(sum.cache_hits, 4);
    cr_assert_eq(sum.stale_hits, 0);
    cr_assert_eq(flash_table_keys_fetched(e.db), 2);
    flash_ctx_destroy(w);
    henv_stop(&e);
}

HK_TEST(stale_one_refresh_memory) { stale_one_refresh(MEMORY); }
HK_TEST(stale_one_refresh_memcached) { stale_one_refresh(MEMCACHED); }
HK_TEST(stale_one_refresh_redis) { stale_one_refresh(REDIS); }

/* The refresher reads the old row, a second write marks the key again
   before its fill: the fill fails (CAS), the stale value stays stale, and
   the next refresh brings the newest row. A refresher that never fills
   (its context is gone): the stale value is served at most allowtime,
   then the key is a miss. */
static void stale_refresh_races(int kind) {
    henv e;
    henv_start(&e, kind);
    Hot v1 = {21, "v1"}, v2 = {21, "v2"}, v3 = {21, "v3"};
    flash_stats sum;
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v1), 0);
    read_many(&e, 1, 21, "v1", &sum);
    flash_ctx *w = hctx(&e, 0, 0, flash_table_source(e.db));
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v2), 0);
    cr_assert_eq(flash_invalidate(w, &HotSwr_model, &v1, &v2), 0);
    flash_test_sleep_ms(2300);
    /* the refresher: its source answers when released, its fill waits at a gate */
    gated_source *gs = gated_source_create(e.db, flash_poll_loop(e.p));
    gate *g = gate_create(e.c, flash_poll_loop(e.p));
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = gate_cache(g);
    flash_ctx *a = flash_ctx_create(&d);
    cr_assert_eq(flash_poll_attach(a, e.p), 0);
    flash_ctx_set_source(a, NULL, gated_source_get(gs));
    flash_value k = flash_v_i64(21);
    flash_promise *pa = flash_query_async(a, &HotSwr__get_by_id, &k, 1, 0);
    run_until_settled(&e, &pa, 1);
    cr_assert_str_eq(name_of(pa), "v1", "served stale");
    cr_assert_eq(flash_ctx_stats(a).stale_refreshes, 1);
    gate_shut(g, true);
    cr_assert(gated_source_release(gs)); /* reads v2 */
    cr_assert_eq(gate_waiting(g), 1);
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v3), 0);
    cr_assert_eq(flash_invalidate(w, &HotSwr_model, &v2, &v3), 0); /* marks it again */
    gate_shut(g, false);
    while (gate_waiting(g)) gate_release(g); /* the refresh: refused */
    read_many(&e, 4, 21, "v1", &sum); /* still the stale value: the refresh did not land */
    cr_assert_eq(sum.stale_hits, 4);
    flash_test_sleep_ms(2300);
    read_many(&e, 4, 21, "v1", &sum); /* one of them refreshes now */
    cr_assert_eq(sum.stale_refreshes, 1);
    read_many(&e, 4, 21, "v3", &sum);
    cr_assert_eq(sum.cache_hits, 4);
    /* a refresher that never fills: stale for at most allowtime (5 s) */
    Hot v4 = {21, "v4"};
    cr_assert_eq(flash_table_put(e.db, &HotSwr_model, &v4), 0);
    cr_assert_eq(flash_invalidate(w, &HotSwr_model, &v3, &v4), 0);
    int64_t marked = flash_test_now_ms();
    flash_test_sleep_ms(2300);
    flash_ctx_reset(a);
    pa = flash_query_async(a, &HotSwr__get_by_id, &k, 1, 0);
    run_until_settled(&e, &pa, 1);
    cr_assert_str_eq(name_of(pa), "v3");
    cr_assert_eq(gated_source_waiting(gs), 1, "the refresher reads the source");
    flash_ctx_destroy(a); /* and is gone */
    read_many(&e, 2, 21, "v3", &sum); /* stale, nobody refreshes */
    cr_assert_eq(sum.stale_refreshes, 0);
    flash_test_sleep_ms((int)(5000 + 1100 - (flash_test_now_ms() - marked)));
    read_many(&e, 2, 21, "v4", &sum); /* the stale value expired with its mark */
    cr_assert_eq(sum.stale_hits, 0);
    flash_ctx_destroy(w);
    gate_destroy(g);
    gated_source_destroy(gs);
    henv_stop(&e);
}

HK_TEST(stale_refresh_races_memory) { stale_refresh_races(MEMORY); }
HK_TEST(stale_refresh_races_memcached) { stale_refresh_races(MEMCACHED); }
HK_TEST(stale_refresh_races_redis) { stale_refresh_races(REDIS); }
