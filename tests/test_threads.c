/* Several threads, each with its own contexts and poll loop, against ONE
   memcached (each thread its own backend instance: connections are per
   backend) and ONE shared memory backend (it has a mutex), over one table
   behind a mutex. Each thread runs many requests (gets, filters, counts,
   writes with invalidation) and checks every answer: rows of other threads'
   users are some version that existed; its own users are exactly what it
   last wrote once its invalidation succeeded (read-your-writes through both
   caches).

   Also built alone with -fsanitize=thread and -DFLASH_THREADS_MAIN (a plain
   main instead of Criterion's runner, which cannot start under TSan:
   Snaipe/Criterion#274), by tests/tsan.sh: ThreadSanitizer must report
   nothing. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "backends/cache/memcached.h"
#include "harness.h"
#include "models.h"

#ifdef FLASH_THREADS_MAIN
#include <stdlib.h>
#define T_ASSERT(c, ...)                                                      \
    do {                                                                      \
        if (!(c)) {                                                           \
            fprintf(stderr, "threads: check failed: %s: ", #c);               \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
            exit(1);                                                          \
        }                                                                     \
    } while (0)
#define T_LOG(...) (fprintf(stderr, __VA_ARGS__), fprintf(stderr, "\n"))
#else
#define T_ASSERT(c, ...) cr_assert(c, __VA_ARGS__)
#define T_LOG(...) cr_log_error(__VA_ARGS__)
#endif

#define NTHREADS 4
#define REQUESTS 250      /* per thread and cache */
#define NUSERS 100

static void watchdog_fired(int sig) {
    static const char m[] = "threads: watchdog: test still running after 240 s, aborting\n";
    (void)sig;
    (void)!write(2, m, sizeof m - 1);
    abort();
}

/* ---- the shared database: a table behind a mutex ---- */

static pthread_mutex_t db_lock = PTHREAD_MUTEX_INITIALIZER;
static flash_table *db;

static void locked_fetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    flash_source inner = flash_table_source((flash_table *)self);
    pthread_mutex_lock(&db_lock);
    inner.vt->fetch(inner.self, ctx, f); /* the table answers inside the call (sync) */
    pthread_mutex_unlock(&db_lock);
}
static const flash_source_vtable locked_vt = {"locked-table", locked_fetch, NULL, NULL};

static const char *const first_names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara"};

static void db_create(void) {
    static const unsigned char avatar[] = {0, 1, 2};
    db = flash_table_create();
    T_ASSERT(db, "table");
    flash_table_set_async(db, false);
    for (int i = 1; i <= NUSERS; i++) {
        char username[32];
        snprintf(username, sizeof username, "user%d", i);
        User u = {i, first_names[i % 5], username, 20 + i % 50, i * 1.5, i % 2 == 0, {avatar, 3}};
        T_ASSERT(flash_table_put(db, &User_model, &u) == 0, "put");
    }
    int id = 1;
    for (int u = 1; u <= 5; u++)
        for (int e = 1; e <= 3; e++) {
            Participant p = {id++, u, e};
            T_ASSERT(flash_table_put(db, &Participant_model, &p) == 0, "put");
        }
}

/* A copy of user id's current row, its strings and bytes in *buf. */
typedef struct user_copy {
    User u;
    char username[32], first_name[32];
    unsigned char avatar[8];
} user_copy;

static void db_user(int id, user_copy *c) {
    pthread_mutex_lock(&db_lock);
    const User *r = flash_table_find(db, &User_model, flash_v_i64(id));
    c->u = *r;
    snprintf(c->username, sizeof c->username, "%s", r->username);
    snprintf(c->first_name, sizeof c->first_name, "%s", r->first_name);
    memcpy(c->avatar, r->avatar.data, r->avatar.len < sizeof c->avatar ? r->avatar.len : sizeof c->avatar);
    pthread_mutex_unlock(&db_lock);
    c->u.username = c->username;
    c->u.first_name = c->first_name;
    c->u.avatar.data = c->avatar;
}

/* ---- one thread ---- */

typedef struct worker {
    int id;
    uint16_t port;
    flash_cache shared_mem;
    pthread_t th;
    /* results, read after join */
    uint64_t requests, task_requests, queries, writes, checks, own_checks, violations, backend_errors;
    char first_violation[256];
    /* what this thread last wrote: age by user id (0: never wrote; -1: its
       invalidation failed, so no read-your-writes promise) */
    int32_t wrote[NUSERS + 1];
} worker;

static uint64_t rnd(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void violation(worker *w, const char *what, int a, int b) {
    if (!w->violations)
        snprintf(w->first_violation, sizeof w->first_violation, "thread %d: %s (%d, %d)", w->id, what, a, b);
    w->violations++;
}

static bool owner_of(const worker *w, int user) { return user % NTHREADS == w->id; }

/* A user row as seen by thread w: fixed fields exact; age the original or a
   written one (>= 1000); for its own users, exactly what it last wrote. */
static void check_user(worker *w, const User *u, int id) {
    w->checks++;
    char name[32];
    snprintf(name, sizeof name, "user%d", id);
    if (!u || u->id != id || strcmp(u->username, name) != 0 || strcmp(u->first_name, first_names[id % 5]) != 0 ||
        u->score != id * 1.5 || u->active != (id % 2 == 0) || u->avatar.len != 3) {
        violation(w, "wrong user row", id, u ? (int)u->id : -1);
        return;
    }
    if (u->age != 20 + id % 50 && u->age < 1000) violation(w, "an age nobody wrote", id, u->age);
    if (owner_of(w, id) && w->wrote[id] > 0) {
        w->own_checks++;
        if (u->age != w->wrote[id]) violation(w, "own write not read back", id, u->age);
    }
}

/* One query as a task: the sync forms suspend it, and the tasks of one
   request batch together as the async forms do. The value is what the
   async form would have given. */
typedef struct query_arg {
    int kind, key;
} query_arg;

static int query_task(flash_ctx *ctx, void *arg, void **result) {
    const query_arg *q = arg;
    char name[32];
    int rc;
    switch (q->kind) {
    case 0: return User_get_by_id_or_none(ctx, q->key, (User **)result);
    case 1:
        snprintf(name, sizeof name, "user%d", q->key);
        return User_get_by_username(ctx, name, (User **)result);
    case 2: return User_filter_by_first_name(ctx, first_names[q->key], (flash_list **)result);
    default: {
        int64_t *count = flash_alloc(ctx, sizeof *count);
        if (!count) return FLASH_ENOMEM;
        rc = ParticipantCount_resolve(ctx, q->key, count);
        *result = count;
        return rc;
    }
    }
}

static flash_promise *query_async(flash_ctx *ctx, int kind, int key) {
    char name[32];
    switch (kind) {
    case 0: return User_get_by_id_async_or_none(ctx, key);
    case 1:
        snprintf(name, sizeof name, "user%d", key);
        return User_get_by_username_async(ctx, name);
    case 2: return User_filter_by_first_name_async(ctx, first_names[key]);
    default: return ParticipantCount_resolve_async(ctx, key);
    }
}

static void one_request(worker *w, flash_ctx *ctx, uint64_t *rng) {
    flash_promise *ps[32];
    int kinds[32], keys[32];
    query_arg args[32];
    size_t n = 1 + rnd(rng) % 24;
    bool tasks = rnd(rng) % 2; /* half the requests run each query as a task */
    flash_ctx_reset(ctx);
    w->requests++;
    for (size_t i = 0; i < n; i++) {
        kinds[i] = (int)(rnd(rng) % 4);
        switch (kinds[i]) {
        case 0: keys[i] = 1 + (int)(rnd(rng) % (NUSERS + 10)); break;
        case 1: keys[i] = 1 + (int)(rnd(rng) % NUSERS); break;
        case 2: keys[i] = (int)(rnd(rng) % 5); break;
        default: keys[i] = 1 + (int)(rnd(rng) % 4); break;
        }
        args[i].kind = kinds[i];
        args[i].key = keys[i];
        ps[i] = tasks ? flash_spawn(ctx, query_task, &args[i]) : query_async(ctx, kinds[i], keys[i]);
    }
    w->task_requests += tasks;
    w->queries += n;
    void *v = NULL;
    int rc = flash_wait(ctx, flash_gather_settled(ctx, n, ps), &v);
    if (rc) {
        violation(w, "gather failed", rc, 0);
        return;
    }
    flash_settled *st = v;
    for (size_t i = 0; i < n; i++) {
        if (st[i].state != FLASH_FULFILLED) {
            violation(w, "query rejected", kinds[i], st[i].error);
            continue;
        }
        switch (kinds[i]) {
        case 0:
            if (keys[i] > NUSERS) {
                if (st[i].value) violation(w, "a user that does not exist", keys[i], 0);
            } else {
                check_user(w, st[i].value, keys[i]);
            }
            break;
        case 1: check_user(w, st[i].value, keys[i]); break;
        case 2: {
            const flash_list *l = st[i].value;
            w->checks++;
            if (!l || l->count != NUSERS / 5) {
                violation(w, "wrong filter size", keys[i], l ? (int)l->count : -1);
                break;
            }
            for (size_t k = 0; k < l->count; k++) {
                const User *u = l->items[k];
                if (!u || u->id % 5 != keys[i]) violation(w, "wrong filter row", keys[i], u ? (int)u->id : -1);
                else check_user(w, u, (int)u->id);
            }
            break;
        }
        default: {
            w->checks++;
            int64_t c = st[i].value ? *(const int64_t *)st[i].value : -1;
            if (c != (keys[i] <= 3 ? 5 : 0)) violation(w, "wrong count", keys[i], (int)c);
            break;
        }
        }
    }
}

/* Update one of this thread's users, then invalidate it in both caches. */
static void one_write(worker *w, flash_ctx *const ctxs[2], uint64_t *rng) {
    int id = (int)(1 + rnd(rng) % NUSERS);
    while (!owner_of(w, id)) id = id % NUSERS + 1;
    user_copy old, nu;
    db_user(id, &old);
    db_user(id, &nu);
    nu.u.age = 1000 + (int32_t)(w->writes++ % 100000);
    pthread_mutex_lock(&db_lock);
    int rc = flash_table_put(db, &User_model, &nu.u);
    pthread_mutex_unlock(&db_lock);
    if (rc) {
        violation(w, "table put failed", id, rc);
        return;
    }
    bool ok = true;
    for (int k = 0; k < 2; k++) {
        flash_ctx_reset(ctxs[k]);
        rc = flash_invalidate(ctxs[k], &User_model, &old.u, &nu.u);
        if (rc) {
            w->backend_errors++;
            ok = false;
        }
    }
    w->wrote[id] = ok ? nu.u.age : -1;
}

static void *worker_main(void *arg) {
    worker *w = arg;
    uint64_t rng = 0x1234u + (uint64_t)w->id * 7919u;
    flash_poll *loop = flash_poll_create();
    flash_memcached_server server = {"127.0.0.1", w->port, 1};
    flash_memcached_desc md;
    int err = 0;
    memset(&md, 0, sizeof md);
    md.loop = flash_poll_loop(loop);
    md.servers = &server;
    md.server_count = 1;
    md.timeout_ms = 5000; /* a loaded machine under TSan is slow; nothing should time out */
    flash_cache mc = flash_memcached_create(&md, &err);
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.fail_on_cache_error = true; /* a backend error shows up as a failed query */
    d.cache = mc;
    flash_ctx *ctx_mc = flash_ctx_create(&d);
    d.cache = w->shared_mem;
    flash_ctx *ctx_mem = flash_ctx_create(&d);
    flash_source src = {&locked_vt, db};
    if (!loop || !mc.vt || !ctx_mc || !ctx_mem || flash_poll_attach(ctx_mc, loop) || flash_poll_attach(ctx_mem, loop) ||
        flash_ctx_set_source(ctx_mc, NULL, src) || flash_ctx_set_source(ctx_mem, NULL, src)) {
        violation(w, "setup failed", err, 0);
    } else {
        flash_ctx *const ctxs[2] = {ctx_mc, ctx_mem};
        for (int r = 0; r < 2 * REQUESTS; r++) {
            if (rnd(&rng) % 10 == 0) one_write(w, ctxs, &rng);
            one_request(w, ctxs[r % 2], &rng);
        }
        /* let the last fills land before the contexts go */
        for (int i = 0; i < 1000 && (flash_ctx_busy(ctx_mc) || flash_ctx_busy(ctx_mem)); i++)
            flash_poll_run_once(loop, true);
    }
    flash_ctx_destroy(ctx_mc);
    flash_ctx_destroy(ctx_mem);
    if (mc.vt) flash_cache_destroy(mc);
    flash_poll_destroy(loop);
    return NULL;
}

static void threads_run(void) {
    signal(SIGALRM, watchdog_fired);
    alarm(240);
    static flash_test_server srv;
    T_ASSERT(flash_test_memcached_start(&srv, "-m 64 -t 4"), "memcached did not start");
    db_create();
    flash_cache mem = flash_memory_create(NULL);
    T_ASSERT(mem.vt, "memory backend");
    static worker ws[NTHREADS];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < NTHREADS; i++) {
        ws[i].id = i;
        ws[i].port = srv.port;
        ws[i].shared_mem = mem;
        T_ASSERT(pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) == 0, "pthread_create");
    }
    uint64_t requests = 0, task_requests = 0, queries = 0, writes = 0, checks = 0, own = 0, violations = 0, errors = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(ws[i].th, NULL);
        requests += ws[i].requests;
        task_requests += ws[i].task_requests;
        queries += ws[i].queries;
        writes += ws[i].writes;
        checks += ws[i].checks;
        own += ws[i].own_checks;
        violations += ws[i].violations;
        errors += ws[i].backend_errors;
        if (ws[i].violations) T_LOG("%s (%llu in all)", ws[i].first_violation, (unsigned long long)ws[i].violations);
    }
    flash_memory_stats ms = flash_memory_stats_get(mem);
    long long mc_gets = flash_test_memcached_stat(&srv, "cmd_get"), mc_hits = flash_test_memcached_stat(&srv, "get_hits");
    printf("threads: %d threads, %llu requests (%llu as tasks), %llu queries, %llu writes, %llu checks (%llu read-your-writes), "
           "%llu violations; memcached %lld gets, %lld hits; shared memory backend %llu ops, %llu hits\n",
           NTHREADS, (unsigned long long)requests, (unsigned long long)task_requests, (unsigned long long)queries, (unsigned long long)writes,
           (unsigned long long)checks, (unsigned long long)own, (unsigned long long)violations, mc_gets, mc_hits,
           (unsigned long long)ms.ops, (unsigned long long)ms.hits);
    fflush(stdout);
    flash_cache_destroy(mem);
    flash_table_destroy(db);
    flash_test_server_stop(&srv);
    alarm(0);
    T_ASSERT(violations == 0, "%llu violations (first ones logged above)", (unsigned long long)violations);
    T_ASSERT(errors == 0, "%llu invalidations failed", (unsigned long long)errors);
    T_ASSERT(ms.hits > 0, "the shared memory backend served no hits");
    T_ASSERT(mc_hits > 0, "memcached served no hits");
    T_ASSERT(own > 0, "read-your-writes was never checked");
    T_ASSERT(task_requests > 0, "no request ran its queries as tasks");
    T_ASSERT(requests == (uint64_t)NTHREADS * 2 * REQUESTS, "%llu requests", (unsigned long long)requests);
}

#ifdef FLASH_THREADS_MAIN
int main(void) {
    threads_run();
    return 0;
}
#else
FLASH_TEST(threads, four_threads_own_contexts_one_memcached_one_shared_memory_backend) { threads_run(); }
#endif
