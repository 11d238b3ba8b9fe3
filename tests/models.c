/* tests/models.c — see models.h. */
#include "models.h"
#include <criterion/criterion.h>

#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "backends/cache/redis_cluster.h"
#include "cluster.h"
#include "harness.h"
#include "loops.h"
#include <stdio.h>
#include <string.h>

test_fixture fx;
fixture_config fixture_use;
static const flash_test_loop *fx_loop_kind;
static flash_test_server fx_memcached, fx_redis;
static flash_stats last;
static const char *const first_names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara"};

static void capture_log(int level, const char *message, void *ud) {
    size_t used = strlen(fx.log);
    (void)level;
    (void)ud;
    snprintf(fx.log + used, sizeof fx.log - used, "%s\n", message);
}

void events_of_owner(flash_ctx *ctx, flash_fetch *f, void *user_data) {
    (void)ctx;
    (void)user_data;
    fx.fallback_calls++;
    fx.fallback_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t owner = flash_fetch_key(f, i)[0].u.i64;
        for (int e = 10; e >= 1; e--) { /* newest first: a custom order */
            const Event *ev = flash_table_find(fx.db, &Event_model, flash_v_i64(e));
            if (ev && ev->owner == owner) flash_fetch_set_row(f, i, ev);
        }
    }
    flash_fetch_done(f, 0, NULL);
}

void event_by_title(flash_ctx *ctx, flash_fetch *f, void *user_data) {
    (void)ctx;
    (void)user_data;
    fx.fallback_calls++;
    fx.fallback_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        const char *title = flash_fetch_key(f, i)[0].u.s.ptr;
        if (strncmp(title, "none", 4) == 0) continue; /* cache "none" */
        Event e = {1000 + (int64_t)i, "made-up", title, 0};
        flash_fetch_set_row(f, i, &e);
    }
    flash_fetch_done(f, 0, NULL);
}

int fixture_run_once(bool may_block) { return fx.lp.vt->run_once(fx.lp.native, may_block); }
int fixture_attach(flash_ctx *ctx) { return fx_loop_kind->attach(ctx, fx.native); }

/* Until the fixture's context has nothing in flight, then what is ready.
   (Not "until the loop is idle": a network backend's connections keep it
   busy for ever.) */
void fixture_settle(void) {
    for (int i = 0; i < 100000 && fx.ctx && flash_ctx_busy(fx.ctx); i++) fixture_run_once(true);
    for (int i = 0; i < 100 && fixture_run_once(false) > 0; i++) {
    }
}

void fixture_setup(const flash_desc *desc) {
    flash_desc d;
    memset(&fx, 0, sizeof fx);
    fx.db = flash_table_create();
    fx_loop_kind = flash_test_loop_find(fixture_use.loop ? fixture_use.loop : "poll");
    cr_assert(fx_loop_kind, "no loop called %s", fixture_use.loop);
    fx.native = fx_loop_kind->create_with(fixture_use.loop_alloc);
    cr_assert(fx.db && fx.native);
    fx.lp = fx_loop_kind->loop(fx.native);
    if (strcmp(fx_loop_kind->name, "poll") == 0) fx.loop = (flash_poll *)fx.native;
    for (int i = 1; i <= 100; i++) {
        char username[32];
        snprintf(username, sizeof username, "user%d", i);
        User u = {i, first_names[i % 5], username, 20 + i % 50, i * 1.5, i % 2 == 0, {"\0\1\2", 3}};
        cr_assert_eq(flash_table_put(fx.db, &User_model, &u), 0);
    }
    for (int i = 1; i <= 10; i++) {
        char slug[32], title[32];
        snprintf(slug, sizeof slug, "event%d", i);
        snprintf(title, sizeof title, "Event %d", i);
        Event e = {i, slug, title, i % 3};
        cr_assert_eq(flash_table_put(fx.db, &Event_model, &e), 0);
    }
    int id = 1;
    for (int u = 1; u <= 5; u++)
        for (int e = 1; e <= 3; e++) {
            Participant p = {id++, u, e};
            cr_assert_eq(flash_table_put(fx.db, &Participant_model, &p), 0);
        }
    if (desc) d = *desc;
    else memset(&d, 0, sizeof d);
    if (!d.cache.vt && fixture_use.backend == FIXTURE_MEMCACHED) {
        cr_assert(flash_test_memcached_start(&fx_memcached, "-m 32"));
        flash_memcached_server server = {"127.0.0.1", fx_memcached.port, 1};
        flash_memcached_desc md = {0};
        int err = 0;
        md.loop = fx.lp;
        md.servers = &server;
        md.server_count = 1;
        fx.cache = flash_memcached_create(&md, &err);
        cr_assert(fx.cache.vt, "memcached backend: %s", flash_strerror(err));
        d.cache = fx.cache;
    } else if (!d.cache.vt && fixture_use.backend == FIXTURE_REDIS) {
        cr_assert(flash_test_redis_start(&fx_redis));
        flash_redis_desc rd = {0};
        int err = 0;
        rd.loop = fx.lp;
        rd.host = "127.0.0.1";
        rd.port = fx_redis.port;
        fx.cache = flash_redis_create(&rd, &err);
        cr_assert(fx.cache.vt, "redis backend: %s", flash_strerror(err));
        d.cache = fx.cache;
    } else if (!d.cache.vt && fixture_use.backend == FIXTURE_REDIS_CLUSTER) {
        /* The run's shared cluster; keys renamed per test process, so that
           tests running at once do not see each other's. */
        const flash_test_cluster *c = flash_test_cluster_shared();
        cr_assert(c, "no Redis Cluster");
        flash_redis_node seeds[3];
        for (int i = 0; i < 3; i++) seeds[i] = (flash_redis_node){"127.0.0.1", c->ports[i]};
        flash_redis_cluster_desc cd = {0};
        int err = 0;
        cd.loop = fx.lp;
        cd.seeds = seeds;
        cd.seed_count = 3;
        flash_cache inner = flash_redis_cluster_create(&cd, &err);
        cr_assert(inner.vt, "redis cluster backend: %s", flash_strerror(err));
        fx.cache = flash_test_prefixed(inner);
        d.cache = fx.cache;
    } else if (!d.cache.vt) {
        fx.cache = flash_memory_create(NULL);
        d.cache = fx.cache;
    }
    if (!d.logger.func) d.logger.func = capture_log;
    fx.ctx = flash_ctx_create(&d);
    cr_assert(fx.ctx);
    cr_assert_eq(fx_loop_kind->attach(fx.ctx, fx.native), 0);
    cr_assert_eq(flash_ctx_set_source(fx.ctx, NULL, flash_table_source(fx.db)), 0);
    last = flash_ctx_stats(fx.ctx);
}

void fixture_teardown(void) {
    flash_ctx_destroy(fx.ctx);
    if (fx.cache.vt) flash_cache_destroy(fx.cache); /* before its loop */
    fx_loop_kind->destroy(fx.native);
    flash_table_destroy(fx.db);
    if (fx_memcached.pid > 0) flash_test_server_stop(&fx_memcached);
    if (fx_redis.pid > 0) flash_test_server_stop(&fx_redis);
    memset(&fx, 0, sizeof fx);
}

flash_stats stats_sub(flash_stats now, flash_stats before) {
    /* flash_stats is all uint64_t counters: subtract field by field. */
    flash_stats d;
    uint64_t n[sizeof now / sizeof(uint64_t)], b[sizeof now / sizeof(uint64_t)];
    memcpy(n, &now, sizeof now);
    memcpy(b, &before, sizeof before);
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++) n[i] -= b[i];
    memcpy(&d, n, sizeof d);
    return d;
}

flash_stats stats_delta(void) {
    flash_stats now = flash_ctx_stats(fx.ctx), d = stats_sub(now, last);
    last = now;
    return d;
}

const flash_class *other_tu_user_by_id(void) { return &User__get_by_id; }

/* The class name "SchemaProbe" on ProbeA here and on ProbeB in
   test_engine.c: the same cache keys, another schema (what two deployments
   with different model definitions see). */
#define PROBE_A_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(ProbeA, PROBE_A_FIELDS)
FLASH_INSTANCE_CACHE(SchemaProbe, ProbeA, (id))
const char *schema_probe_a(flash_ctx *ctx, flash_table *db, int64_t id, const char *name) {
    ProbeA row = {id, name};
    void *v = NULL;
    flash_table_put(db, &ProbeA_model, &row);
    return flash_wait(ctx, SchemaProbe_resolve_async(ctx, id), &v) == 0 ? ((ProbeA *)v)->name : NULL;
}
const flash_model *other_tu_user_model(void) { return &User_model; }
