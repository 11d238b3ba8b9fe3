/* Consistency: invalidation on write, race-free fills, stale markers with
   CAS, the replication-lag window, dynamic versions, allowtime, per-key
   stale serving, write-through, flushes by hand — and the
   interleaving harness that runs every schedule of a reader against a
   writer, on the memory backend, on real memcached and on real Redis. */
#include <stdio.h>
#include <string.h>

#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "backends/cache/redis_cluster.h"
#include "backends/cache/memory.h"
#include "cluster.h"
#include "consistency.h"
#include "harness.h"

#define ACCOUNT_FIELDS(F) F(I64, id) F(STR, name) F(I64, owner)
FLASH_MODEL(Account, ACCOUNT_FIELDS)
FLASH_GET_KEYS(Account, (id))
FLASH_FILTER_KEYS(Account, (owner))
FLASH_MODEL_OPT(DynAccount, ACCOUNT_FIELDS, .invalidation = FLASH_INVALIDATE_DYNAMIC)
FLASH_GET_KEYS(DynAccount, (id))
FLASH_MODEL_OPT(SoftAccount, ACCOUNT_FIELDS, .allowtime_s = 10)
FLASH_GET_KEYS(SoftAccount, (id))
FLASH_MODEL_OPT(OffAccount, ACCOUNT_FIELDS, .invalidation = FLASH_INVALIDATE_OFF)
FLASH_GET_KEYS(OffAccount, (id))
FLASH_MODEL_OPT(StaleAccount, ACCOUNT_FIELDS, .invalidation = FLASH_INVALIDATE_STALE)
FLASH_GET_KEYS(StaleAccount, (id))
FLASH_MODEL_OPT(ResetAccount, ACCOUNT_FIELDS, .invalidation = FLASH_INVALIDATE_RESET)
FLASH_GET_KEYS(ResetAccount, (id))
FLASH_MODEL_OPT(DynSoftAccount, ACCOUNT_FIELDS, .invalidation = FLASH_INVALIDATE_DYNAMIC, .allowtime_s = 10)
FLASH_GET_KEYS(DynSoftAccount, (id))
FLASH_MODEL(BumpAccount, ACCOUNT_FIELDS) /* UNSET; its writer flushes it by hand */
FLASH_GET_KEYS(BumpAccount, (id))
/* Leases on misses (issue 17): the reader that misses wins a stub and
   fills by CAS against it. */
FLASH_MODEL_OPT(LeaseAccount, ACCOUNT_FIELDS, .lease_s = 5)
FLASH_GET_KEYS(LeaseAccount, (id))
/* Stale-while-revalidate on the server (allowtime with leases): a write
   marks the value stale (MARK_STALE) for allowtime; one lease reader
   refreshes it by CAS, the others are served the stale value. */
FLASH_MODEL_OPT(SwrAccount, ACCOUNT_FIELDS, .allowtime_s = 10, .lease_s = 5)
FLASH_GET_KEYS(SwrAccount, (id))

static int64_t fake_now = 1700000000000;
static int64_t fake_clock(void *ud) {
    (void)ud;
    return fake_now;
}

/* The class modes. MODE_OFF (no invalidation) is a deliberately broken
   variant: the harness must find it inconsistent.
     MODE_STALE     per key: the writer marks the value stale; readers are
                    served it while one refreshes (no time bound)
     MODE_RESET     write-through: markers, then the writer refreshes
     MODE_DYN_SOFT  DYNAMIC with allowtime: an older version's value written
                    less than allowtime ago is served while one refreshes
     MODE_BUMP      an UNSET class whose writer flushes by hand
                    (flash_bump_version) instead of invalidating rows
     MODE_LEASE     UNSET with leases on misses (issue 17): a cold reader
                    wins a stub and fills by CAS against it
     MODE_SWR       allowtime with leases (issue 17): stale-while-revalidate
                    on the server (MARK_STALE; one lease reader refreshes) */
typedef enum mode { MODE_UNSET, MODE_DYNAMIC, MODE_ALLOWTIME, MODE_STALE, MODE_RESET, MODE_DYN_SOFT, MODE_BUMP, MODE_OFF,
                    MODE_LEASE, MODE_SWR } mode;
static const char *const mode_names[] = {"unset", "dynamic", "allowtime", "stale", "reset", "dynamic+allowtime", "bump", "off",
                                         "lease", "stale-while-revalidate"};
/* Every mode that must stay consistent. */
static const mode good_modes[] = {MODE_UNSET, MODE_DYNAMIC, MODE_ALLOWTIME, MODE_STALE, MODE_RESET, MODE_DYN_SOFT, MODE_BUMP};
#define NGOOD ((int)(sizeof good_modes / sizeof good_modes[0]))

static const flash_model *model_of(mode m) {
    static const flash_model *const ms[] = {&Account_model,      &DynAccount_model,     &SoftAccount_model,
                                            &StaleAccount_model, &ResetAccount_model,   &DynSoftAccount_model,
                                            &BumpAccount_model,  &OffAccount_model,     &LeaseAccount_model,
                                            &SwrAccount_model};
    return ms[m];
}
static const flash_class *class_of(mode m) {
    static const flash_class *const cs[] = {&Account__get_by_id,      &DynAccount__get_by_id,   &SoftAccount__get_by_id,
                                            &StaleAccount__get_by_id, &ResetAccount__get_by_id, &DynSoftAccount__get_by_id,
                                            &BumpAccount__get_by_id,  &OffAccount__get_by_id,   &LeaseAccount__get_by_id,
                                            &SwrAccount__get_by_id};
    return cs[m];
}
/* Served stale values, by design, until this much later. */
static int64_t stale_bound_ms(mode m) {
    return m == MODE_ALLOWTIME || m == MODE_DYN_SOFT || m == MODE_SWR ? 11000 : 0;
}

/* Broken on purpose: the backend stores every CAS fill blindly. */
static bool blind_cas;

/* Who invalidates the write.
     WR_DIRECT   the writer itself, flash_invalidate_async after its commit.
     WR_STREAM   the change-stream consumer (backends/changes/postgres.h):
                 the writer only commits; later the consumer applies the
                 transaction on a context of its own, exactly as its
                 flash__pgc_flight_start does: flash_ctx_reset, then
                 flash_invalidate_rows_async(ctx, m, n, olds, news) with the
                 row images decoded from the stream (copies: REPLICA IDENTITY
                 FULL gives the whole old row), gathered with flash_gather;
                 the acknowledgement waits for that promise. The real
                 consumer needs PostgreSQL's stream, which cannot be held
                 step by step at the gate: its apply step is reproduced
                 call for call.
     WR_DELETE   deliberately broken: the writer deletes the key instead of
                 leaving a marker (a reader's fill from before the write
                 then lands on the empty key)
     WR_STREAM_LOST  deliberately broken: the consumer drops the change
                 (acknowledges without applying); must be found inconsistent. */
typedef enum writer { WR_DIRECT, WR_STREAM, WR_STREAM_LOST, WR_DELETE } writer;
static const char *const writer_names[] = {"direct", "stream", "stream-lost", "delete"};

/* ---- the world a scenario runs in ---- */

/* Makes the backend a scenario uses, on the scenario's loop. */
typedef flash_cache (*store_fn)(flash_poll *loop);

typedef struct world {
    flash_poll *loop;
    flash_table *db;
    flash_cache store; /* memory, memcached or Redis */
    gate *g;
    gated_source *gs;
    flash_ctx *reader, *writer;
    flash_ctx *consumer; /* the change stream's: no source, the readers' desc */
} world;

static flash_ctx *world_ctx(world *w, flash_cache cache, flash_source src) {
    flash_desc d = {0};
    d.cache = cache;
    d.clock_ms = fake_clock;
    flash_ctx *ctx = flash_ctx_create(&d);
    cr_assert(ctx);
    cr_assert_eq(flash_poll_attach(ctx, w->loop), 0);
    flash_ctx_set_source(ctx, NULL, src);
    return ctx;
}

static void world_init(world *w, store_fn make_store) {
    memset(w, 0, sizeof *w);
    w->loop = flash_poll_create();
    w->db = flash_table_create();
    w->store = make_store(w->loop);
    cr_assert(w->store.vt, "no cache backend");
    w->g = gate_create(w->store, flash_poll_loop(w->loop));
    gate_blind_cas(w->g, blind_cas);
    w->gs = gated_source_create(w->db, flash_poll_loop(w->loop));
    w->reader = world_ctx(w, gate_cache(w->g), gated_source_get(w->gs));
    w->writer = world_ctx(w, gate_cache(w->g), flash_table_source(w->db));
    w->consumer = world_ctx(w, gate_cache(w->g), flash_table_source(w->db));
}

static void world_free(world *w) {
    flash_ctx_destroy(w->reader);
    flash_ctx_destroy(w->writer);
    flash_ctx_destroy(w->consumer);
    gated_source_destroy(w->gs);
    gate_destroy(w->g);
    flash_cache_destroy(w->store);
    flash_table_destroy(w->db);
    flash_poll_destroy(w->loop);
}

static flash_cache memory_store(flash_poll *loop) {
    flash_memory_desc md = {0};
    (void)loop; /* completes on each submitter's loop */
    md.clock_ms = fake_clock;
    return flash_memory_create(&md);
}

/* A reader outside the scenario: what anyone would see now. only_cache:
   never reads the database. Returns the name, "" for nothing. */
static const char *outside_read(world *w, mode m, int64_t id, bool only_cache, char *buf, size_t cap) {
    flash_ctx *ctx = world_ctx(w, w->store, flash_table_source(w->db));
    flash_value k = flash_v_i64(id);
    void *v = NULL;
    int rc = flash_wait(ctx, flash_query_async(ctx, class_of(m), &k, 1, only_cache ? FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE : 0), &v);
    cr_assert_eq(rc, 0, "outside read failed: %s", flash_strerror(rc));
    snprintf(buf, cap, "%s", v ? ((Account *)v)->name : "");
    /* its own fills, refresh lock and refresh (on a real server: replies) */
    while (flash_ctx_busy(ctx)) flash_poll_run_once(w->loop, true);
    run_until_idle(flash_poll_loop(w->loop));
    flash_ctx_destroy(ctx);
    return buf;
}

/* ---- one schedule ---- */

enum { R_MISS, R_READ, R_FILL, W_UPDATE, W_INVALIDATE };
static const char *const step_names[] = {"reader-get", "source-read", "reader-fill", "writer-update", "writer-invalidate"};

/* What the cache holds when the reader starts. */
typedef enum start { START_COLD, START_WARM, START_MARKED } start;
static const char *const start_names[] = {"cold", "warm", "marked"};

typedef struct scenario {
    mode m;
    writer wr;
    start from;      /* cold; the old row cached; or an earlier write's
                        invalidation already there (outside the lag window) */
    int step_ms;     /* time between steps: 0 (inside the lag window) or 400 */
    int steps[5];
} scenario;

static void describe(const scenario *s, char *out, size_t cap) {
    int n = snprintf(out, cap, "%s/%s/%s/%dms:", writer_names[s->wr], mode_names[s->m], start_names[s->from],
                     s->step_ms);
    for (int i = 0; i < 5 && n > 0 && (size_t)n < cap; i++) n += snprintf(out + n, cap - (size_t)n, " %s", step_names[s->steps[i]]);
}

/* Release the writer's operations (the newest at the gate, ahead of the
   reader's) until its invalidation settled: allowtime takes a get, then a
   cas. */
static void release_writer(world *w, flash_promise *inv) {
    for (int i = 0; i < 10 && flash_promise_state(inv) == FLASH_PENDING; i++) {
        run_until_idle(flash_poll_loop(w->loop));
        if (!gate_release_newest(w->g)) break;
    }
    run_until_idle(flash_poll_loop(w->loop));
    cr_assert_neq(flash_promise_state(inv), FLASH_PENDING, "the invalidation never finished");
    cr_assert_eq(flash_promise_error(inv), 0, "invalidation failed: %s", flash_promise_message(inv));
}

/* The broken writer's delete: a DELETE of the key through the gate,
   settling p when the backend answered. */
typedef struct raw_delete {
    flash_cache_op op;
    flash_cache_item item;
    flash_ctx *ctx;
    flash_promise *p;
} raw_delete;
static void raw_delete_done(flash_cache_op *op) {
    raw_delete *d = (raw_delete *)op->data;
    flash_resolve(d->ctx, d->p, NULL);
}
static flash_promise *delete_key(world *w, mode m, int64_t id) {
    raw_delete *d = flash_calloc(w->writer, 1, sizeof *d);
    flash_value k = flash_v_i64(id);
    char *key;
    cr_assert_eq(flash_cache_key(w->writer, class_of(m), &k, 1, &key, &d->item.key_len, NULL), 0);
    d->item.key = key;
    d->ctx = w->writer;
    d->p = flash_promise_new(w->writer);
    d->op.code = FLASH_CACHE_DELETE;
    d->op.items = &d->item;
    d->op.count = 1;
    d->op.done = raw_delete_done;
    d->op.data = d;
    flash_cache c = gate_cache(w->g);
    c.vt->submit(c.self, flash_poll_loop(w->loop), &d->op);
    return d->p;
}

/* The write's invalidation, as mode m's writer makes it. */
static flash_promise *invalidate_for(flash_ctx *ctx, mode m, const Account *old_row, const Account *new_row) {
    if (m == MODE_BUMP) return flash_bump_version_async(ctx, model_of(m));
    return flash_invalidate_async(ctx, model_of(m), old_row, new_row);
}

/* Runs s; returns false (with a message) when the cache ends inconsistent. */
static bool run_scenario(const scenario *s, store_fn make_store, int64_t id, char *why, size_t cap) {
    world w;
    char buf[64], name[64];
    const flash_model *model = model_of(s->m);
    Account old_row = {id, "old", 1}, new_row = {id, "new", 1};
    world_init(&w, make_store);
    cr_assert_eq(flash_table_put(w.db, model, &old_row), 0);
    if (s->from != START_COLD) {
        cr_assert_str_eq(outside_read(&w, s->m, id, false, buf, sizeof buf), "old");
        fake_now += 1000;
    }
    if (s->from == START_MARKED) {
        /* An earlier write (to the same value): its marker, bump or stale
           mark is in the cache, and its lag window has passed. */
        cr_assert_eq(flash_wait(w.writer, invalidate_for(w.writer, s->m, &old_row, &old_row), NULL), 0);
        run_until_idle(flash_poll_loop(w.loop)); /* a RESET refresh's fill */
        flash_ctx_reset(w.writer);
        fake_now += 1000;
    }
    gate_shut(w.g, true);
    flash_value k = flash_v_i64(id);
    flash_promise *r = flash_query_async(w.reader, class_of(s->m), &k, 1, 0);
    flash_promise *inv = NULL;
    run_until_idle(flash_poll_loop(w.loop));
    cr_assert_eq(gate_waiting(w.g), 1, "the reader's get-many waits at the gate");
    for (int i = 0; i < 5; i++) {
        switch (s->steps[i]) {
        case R_MISS: gate_release(w.g); break;
        case R_READ: gated_source_release(w.gs); break;
        case R_FILL:
            /* The reader's fill, if it made one, is what waits now. */
            while (gate_waiting(w.g)) gate_release(w.g);
            break;
        case W_UPDATE: cr_assert_eq(flash_table_put(w.db, model, &new_row), 0); break;
        case W_INVALIDATE:
            if (s->wr == WR_DIRECT) {
                inv = invalidate_for(w.writer, s->m, &old_row, &new_row);
            } else if (s->wr == WR_DELETE) {
                inv = delete_key(&w, s->m, id);
            } else {
                /* The consumer's apply step (see writer). */
                flash_ctx_reset(w.consumer);
                const void *olds[1] = {flash_row_copy(w.consumer, model, &old_row)};
                const void *news[1] = {flash_row_copy(w.consumer, model, &new_row)};
                flash_promise *ps[1];
                if (s->wr == WR_STREAM_LOST) ps[0] = flash_fulfilled(w.consumer, NULL);
                else if (s->m == MODE_BUMP) ps[0] = flash_bump_version_async(w.consumer, model);
                else ps[0] = flash_invalidate_rows_async(w.consumer, model, 1, olds, news);
                inv = flash_gather(w.consumer, 1, ps);
            }
            release_writer(&w, inv);
            break;
        }
        fake_now += s->step_ms;
    }
    /* Anything still waiting (a fill made after its step) goes now. */
    gate_shut(w.g, false);
    while (gate_waiting(w.g)) gate_release(w.g);
    while (gated_source_release(w.gs)) {
    }
    run_until_idle(flash_poll_loop(w.loop));
    cr_assert_neq(flash_promise_state(r), FLASH_PENDING, "the reader never got an answer");
    cr_assert_eq(flash_promise_error(r), 0, "the reader failed: %s", flash_promise_message(r));
    const char *got = ((Account *)flash_promise_value(r))->name;
    cr_assert(strcmp(got, "old") == 0 || strcmp(got, "new") == 0);
    int miss_at = 0, inv_at = 0;
    for (int i = 0; i < 5; i++) {
        if (s->steps[i] == R_MISS) miss_at = i;
        if (s->steps[i] == W_INVALIDATE) inv_at = i;
    }
    if (s->m == MODE_LEASE && s->from == START_COLD && (w.store.vt->caps & FLASH_CACHE_CAP_LEASES)) {
        /* a cold key the reader asks for before the writer's marker: a
           lease the reader wins (after the marker: a plain marker miss) */
        cr_assert_eq(flash_ctx_stats(w.reader).lease_wins, miss_at < inv_at ? 1u : 0u,
                     "a cold start is a lease the reader wins");
    }
    if (s->m == MODE_SWR && s->from == START_MARKED && miss_at < inv_at && (w.store.vt->caps & FLASH_CACHE_CAP_LEASES)) {
        /* the earlier write's stale mark, past its lag window: the reader
           is served the stale value and wins its refresh */
        flash_stats st = flash_ctx_stats(w.reader);
        cr_assert_eq(st.stale_hits, 1);
        cr_assert_eq(st.stale_refreshes, 1);
        cr_assert_str_eq(got, "old");
    }

    /* The invariant: after the writer's invalidation no reader sees the old
       row from the cache. Stale values of allowtime are served by design
       until allowtime passes: look after it. A STALE class serves them until
       one reader refreshed it: let one read (past the lag window) first. A
       RESET writer refreshed the key itself: the cache holds the new row. */
    bool ok = true;
    if (s->m == MODE_RESET && s->wr != WR_STREAM_LOST && strcmp(outside_read(&w, s->m, id, true, buf, sizeof buf), "new") != 0) {
        snprintf(why, cap, "after the write-through the cache holds '%s', not the new row", buf);
        ok = false;
    }
    fake_now += stale_bound_ms(s->m);
    if (s->m == MODE_STALE) {
        fake_now += 1000;
        outside_read(&w, s->m, id, false, buf, sizeof buf);
    }
    outside_read(&w, s->m, id, true, name, sizeof name);
    if (ok && strcmp(name, "old") == 0) {
        snprintf(why, cap, "the cache still serves the old row");
        ok = false;
    }
    if (ok && strcmp(outside_read(&w, s->m, id, false, buf, sizeof buf), "new") != 0) {
        snprintf(why, cap, "a reader got '%s', not the new row", buf);
        ok = false;
    }
    if (ok && strcmp(outside_read(&w, s->m, id, true, buf, sizeof buf), "old") == 0) {
        snprintf(why, cap, "after a refill the cache serves the old row");
        ok = false;
    }
    world_free(&w);
    fake_now += 60000; /* markers of this scenario expire */
    return ok;
}

/* Every placement of the writer's two steps among the reader's three. */
static int schedules(int out[][5]) {
    int n = 0;
    for (int a = 0; a < 5; a++)
        for (int b = a + 1; b < 5; b++) {
            int r = R_MISS;
            for (int i = 0; i < 5; i++) out[n][i] = i == a ? W_UPDATE : i == b ? W_INVALIDATE : r++;
            n++;
        }
    return n;
}

/* Every schedule of the modes with writer wr; returns the inconsistent
   ones (expect_bad: a broken variant, whose failures are not errors). */
static int run_writer(writer wr, const mode *modes, int nmodes, store_fn make_store, int64_t id_base,
                      const char *label, bool expect_bad, int *nruns) {
    int orders[10][5], n = schedules(orders), runs = 0, bad = 0;
    static const int step_ms[] = {0, 400};
    for (int mi = 0; mi < nmodes; mi++)
        for (int from = START_COLD; from <= START_MARKED; from++)
            for (int si = 0; si < 2; si++)
                for (int o = 0; o < n; o++) {
                    scenario s = {modes[mi], wr, (start)from, step_ms[si], {0}};
                    memcpy(s.steps, orders[o], sizeof s.steps);
                    char why[128] = "", name[256];
                    if (!run_scenario(&s, make_store, id_base + runs, why, sizeof why)) {
                        describe(&s, name, sizeof name);
                        if (!expect_bad) {
                            cr_log_error("inconsistent: %s: %s", name, why);
                            fprintf(stderr, "inconsistent: %s: %s\n", name, why);
                        }
                        bad++;
                    }
                    runs++;
                }
    fprintf(stderr, "consistency (%s, %s writer): %d schedules run, %d inconsistent%s\n", label, writer_names[wr],
            runs, bad, expect_bad ? " (a broken variant: expected)" : "");
    *nruns = runs;
    return bad;
}

static int run_all(const mode *modes, int nmodes, store_fn make_store, int64_t id_base, const char *label) {
    int runs = 0, bad = run_writer(WR_DIRECT, modes, nmodes, make_store, id_base, label, false, &runs);
    cr_assert_eq(bad, 0, "%d of %d schedules left a stale value", bad, runs);
    return runs;
}

/* The change-stream writer: the same schedules, the invalidation applied
   by the consumer's context. */
static int run_stream(const mode *modes, int nmodes, store_fn make_store, int64_t id_base, const char *label) {
    int runs = 0, bad = run_writer(WR_STREAM, modes, nmodes, make_store, id_base, label, false, &runs);
    cr_assert_eq(bad, 0, "%d of %d stream schedules left a stale value", bad, runs);
    return runs;
}

FLASH_TEST(consistency, every_schedule_on_the_memory_backend_ends_consistent) {
    int runs = run_all(good_modes, NGOOD, memory_store, 1000, "memory backend");
    cr_assert_eq(runs, NGOOD * 3 * 2 * 10);
}

static flash_test_server mc;
static flash_cache memcached_store(flash_poll *loop) {
    flash_memcached_server server = {"127.0.0.1", mc.port, 1};
    flash_memcached_desc d = {0};
    int err = 0;
    d.loop = flash_poll_loop(loop);
    d.servers = &server;
    d.server_count = 1;
    flash_cache c = flash_memcached_create(&d, &err);
    cr_assert(c.vt, "memcached backend: %s", flash_strerror(err));
    return c;
}

FLASH_TEST(consistency, the_same_schedules_on_real_memcached) {
    cr_assert(flash_test_memcached_start(&mc, "-m 16"));
    /* Markers live on memcached's real clock (5 s); lag windows and
       allowtime on the contexts' fake clock, as in the memory runs. */
    int runs = run_all(good_modes, NGOOD, memcached_store, 500000, "memcached");
    cr_assert_eq(runs, NGOOD * 3 * 2 * 10);
    flash_test_server_stop(&mc);
}

static flash_test_server rs;
static flash_cache redis_store(flash_poll *loop) {
    flash_redis_desc d = {0};
    int err = 0;
    d.loop = flash_poll_loop(loop);
    d.host = "127.0.0.1";
    d.port = rs.port;
    flash_cache c = flash_redis_create(&d, &err);
    cr_assert(c.vt, "redis backend: %s", flash_strerror(err));
    return c;
}

FLASH_TEST(consistency, the_same_schedules_on_real_redis) {
    cr_assert(flash_test_redis_start(&rs));
    int runs = run_all(good_modes, NGOOD, redis_store, 700000, "redis");
    cr_assert_eq(runs, NGOOD * 3 * 2 * 10);
    flash_test_server_stop(&rs);
}

static const flash_test_cluster *rcl;
static flash_cache cluster_store(flash_poll *loop) {
    flash_redis_node seeds[3];
    flash_redis_cluster_desc d = {0};
    int err = 0;
    for (int i = 0; i < 3; i++) seeds[i] = (flash_redis_node){"127.0.0.1", rcl->ports[i]};
    d.loop = flash_poll_loop(loop);
    d.seeds = seeds;
    d.seed_count = 3;
    flash_cache c = flash_redis_cluster_create(&d, &err);
    cr_assert(c.vt, "redis cluster backend: %s", flash_strerror(err));
    return flash_test_prefixed(c); /* this process's keys only, on the shared cluster */
}

FLASH_TEST(consistency, the_same_schedules_on_a_redis_cluster) {
    rcl = flash_test_cluster_shared();
    cr_assert(rcl, "no Redis Cluster");
    int runs = run_all(good_modes, NGOOD, cluster_store, 900000, "redis cluster");
    cr_assert_eq(runs, NGOOD * 3 * 2 * 10);
}

/* ---- the change-stream writer (issue 14) ---- */

FLASH_TEST(consistency, stream_writer_every_schedule_on_the_memory_backend_ends_consistent) {
    cr_assert_eq(run_stream(good_modes, NGOOD, memory_store, 2000, "memory backend"), NGOOD * 3 * 2 * 10);
}

FLASH_TEST(consistency, stream_writer_the_same_schedules_on_real_memcached) {
    cr_assert(flash_test_memcached_start(&mc, "-m 16"));
    cr_assert_eq(run_stream(good_modes, NGOOD, memcached_store, 600000, "memcached"), NGOOD * 3 * 2 * 10);
    flash_test_server_stop(&mc);
}

FLASH_TEST(consistency, stream_writer_the_same_schedules_on_real_redis) {
    cr_assert(flash_test_redis_start(&rs));
    cr_assert_eq(run_stream(good_modes, NGOOD, redis_store, 800000, "redis"), NGOOD * 3 * 2 * 10);
    flash_test_server_stop(&rs);
}

FLASH_TEST(consistency, stream_writer_the_same_schedules_on_a_redis_cluster) {
    rcl = flash_test_cluster_shared();
    cr_assert(rcl, "no Redis Cluster");
    cr_assert_eq(run_stream(good_modes, NGOOD, cluster_store, 950000, "redis cluster"), NGOOD * 3 * 2 * 10);
}

/* The broken variants: the harness must catch them. A consumer that
   acknowledges without applying, and a class without invalidation. */
FLASH_TEST(consistency, broken_variants_are_caught) {
    int runs = 0;
    int bad = run_writer(WR_STREAM_LOST, good_modes, NGOOD, memory_store, 3000, "memory backend", true, &runs);
    cr_assert_gt(bad, 0, "a lost stream change must leave stale values");
    cr_log_info("stream-lost: %d of %d schedules inconsistent", bad, runs);
    mode off[] = {MODE_OFF};
    bad = run_writer(WR_STREAM, off, 1, memory_store, 4000, "memory backend", true, &runs);
    cr_assert_gt(bad, 0, "a class without invalidation must leave stale values");
    bad = run_writer(WR_DIRECT, off, 1, memory_store, 5000, "memory backend", true, &runs);
    cr_assert_gt(bad, 0, "a class without invalidation must leave stale values");
    mode unset[] = {MODE_UNSET};
    bad = run_writer(WR_DELETE, unset, 1, memory_store, 6000, "memory backend", true, &runs);
    cr_assert_gt(bad, 0, "a delete instead of a marker must let an old fill land");
}

/* ---- leases (issue 17) ---- */

/* The lease class: cold starts take a stub (the reader wins it) and fill by
   CAS against it; every writer placement must still end consistent. */
FLASH_TEST(consistency, leases_every_schedule_on_the_memory_backend_ends_consistent) {
    mode modes[] = {MODE_LEASE};
    cr_assert_eq(run_all(modes, 1, memory_store, 10000, "memory backend, leases"), 3 * 2 * 10);
    cr_assert_eq(run_stream(modes, 1, memory_store, 10500, "memory backend, leases"), 3 * 2 * 10);
}

FLASH_TEST(consistency, leases_the_same_schedules_on_real_memcached) {
    cr_assert(flash_test_memcached_start(&mc, "-m 16"));
    mode modes[] = {MODE_LEASE};
    cr_assert_eq(run_all(modes, 1, memcached_store, 1100000, "memcached, leases"), 3 * 2 * 10);
    cr_assert_eq(run_stream(modes, 1, memcached_store, 1200000, "memcached, leases"), 3 * 2 * 10);
    flash_test_server_stop(&mc);
}

FLASH_TEST(consistency, leases_the_same_schedules_on_real_redis) {
    cr_assert(flash_test_redis_start(&rs));
    mode modes[] = {MODE_LEASE};
    cr_assert_eq(run_all(modes, 1, redis_store, 1300000, "redis, leases"), 3 * 2 * 10);
    cr_assert_eq(run_stream(modes, 1, redis_store, 1400000, "redis, leases"), 3 * 2 * 10);
    flash_test_server_stop(&rs);
}

/* A fill that does not compare-and-swap (the backend turns CAS into SET):
   the lease winner's late fill overwrites the writer's marker; caught. */
FLASH_TEST(consistency, leases_with_a_blind_fill_are_caught) {
    mode modes[] = {MODE_LEASE};
    int runs = 0;
    blind_cas = true;
    int bad = run_writer(WR_DIRECT, modes, 1, memory_store, 11000, "memory backend, leases, blind fill", true, &runs);
    blind_cas = false;
    cr_assert_gt(bad, 0, "a fill without CAS must leave stale values");
    cr_log_info("blind fill: %d of %d schedules inconsistent", bad, runs);
}

/* Stale-while-revalidate on the server, on the memory backend, whose TTLs
   run on the scenario's fake clock as the contexts' lag windows do (on
   memcached and Redis the stale mark lives on the server's own clock: see
   tests/test_hotkeys.c for them). */
FLASH_TEST(consistency, stale_while_revalidate_every_schedule_on_the_memory_backend_ends_consistent) {
    mode modes[] = {MODE_SWR};
    cr_assert_eq(run_all(modes, 1, memory_store, 12000, "memory backend, stale-while-revalidate"), 3 * 2 * 10);
    cr_assert_eq(run_stream(modes, 1, memory_store, 12500, "memory backend, stale-while-revalidate"), 3 * 2 * 10);
}

FLASH_TEST(consistency, stale_while_revalidate_with_a_blind_fill_is_caught) {
    mode modes[] = {MODE_SWR};
    int runs = 0;
    blind_cas = true;
    int bad = run_writer(WR_DIRECT, modes, 1, memory_store, 13000, "memory backend, stale-while-revalidate, blind fill",
                         true, &runs);
    blind_cas = false;
    cr_assert_gt(bad, 0, "a refresh without CAS must leave stale values");
}
