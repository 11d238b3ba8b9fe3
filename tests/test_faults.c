/* The engine over a misbehaving cache: tests/faulty.h drops, fails, delays,
   reorders and corrupts the memory backend's replies by seeded schedules,
   and every query of every batch is checked against the table:
     - every promise settles exactly once (flash_on_settle counts), within
       the backend timeout (plus slack for a loaded machine);
     - a query gives the table's row(s), a not-found where the row does not
       exist (or only_cache), or a documented error code: with
       fail_on_cache_error the failed keys' FLASH_EBACKEND / FLASH_ETIMEDOUT,
       FLASH_ESOURCE when the source was made to fail; never a wrong row;
     - the rest of a batch is answered when some keys fail;
     - with the default policy (fail_on_cache_error = false) every key is
       answered from the source when the cache fails;
     - nothing leaks (FLASH_TEST's LeakSanitizer check), no operation is left
       in the wrapper.
   The schedules corrupt values every way the wrapper knows (cut short,
   grown, bits flipped in the header or in a row). Allowtime classes (stale
   values served while one reader refreshes) run schedules of their own. */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "faulty.h"
#include "harness.h"
#include "models.h"

/* A FLASH_TEST with a watchdog: a hang dies by SIGALRM in its own worker
   (no Criterion .timeout: it leaks in the runner under ASan). */
#define FAULT_TEST(name)                                                     \
    static void fault_body_##name(void);                                     \
    FLASH_TEST(faults, name) {                                               \
        alarm(240);                                                          \
        fault_body_##name();                                                 \
        alarm(0);                                                            \
    }                                                                        \
    static void fault_body_##name(void)

/* A model of this file's own (other suites count User's invalidations):
   classes with dynamic versions (their version key rides in the get-many)
   and with allowtime (stale values served while one reader refreshes). */
#define FITEM_FIELDS(F) F(I64, id) F(STR, name) F(I64, grp)
FLASH_MODEL(FaultItem, FITEM_FIELDS)
FLASH_INSTANCE_CACHE_OPT(FaultItemDyn, FaultItem, (id), .invalidation = FLASH_INVALIDATE_DYNAMIC)
FLASH_INSTANCE_CACHE_OPT(FaultItemStale, FaultItem, (id), .allowtime_s = 30)
FLASH_LIST_CACHE_OPT(FaultItemsOfGroup, FaultItem, (grp), .invalidation = FLASH_INVALIDATE_DYNAMIC)
#define NITEMS 30

#define TIMEOUT_MS 8      /* the wrapper's backend timeout */
#define SLACK_MS 1500     /* scheduling slack on a loaded 2-core machine (ASan) */

static const char *const names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara", "Nobody"};

static uint64_t rnd(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- the world ---- */

static flash_cache mem;
static faulty *fw;
static flash_ctx *strict_ctx; /* fail_on_cache_error = true */

static void setup(void) {
    faulty_desc fd;
    memset(&fd, 0, sizeof fd);
    fd.timeout_ms = TIMEOUT_MS;
    mem = flash_memory_create(NULL);
    cr_assert(mem.vt);
    fw = faulty_create(mem, &fd);
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = faulty_cache(fw);
    d.lag_window_ms = 1; /* markers and stale values are refreshed at once: more paths */
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(&d);
    d.fail_on_cache_error = true;
    strict_ctx = flash_ctx_create(&d);
    cr_assert(strict_ctx);
    cr_assert_eq(fixture_attach(strict_ctx), 0);
    cr_assert_eq(flash_ctx_set_source(strict_ctx, NULL, flash_table_source(fx.db)), 0);
    for (int i = 1; i <= NITEMS; i++) {
        char name[16];
        snprintf(name, sizeof name, "item%d", i);
        FaultItem it = {i, name, i % 4};
        cr_assert_eq(flash_table_put(fx.db, &FaultItem_model, &it), 0);
    }
}

static void teardown(void) {
    flash_ctx_destroy(strict_ctx);
    strict_ctx = NULL;
    fixture_teardown(); /* destroys fx.ctx: every operation is cancelled or done */
    size_t left = faulty_pending(fw);
    faulty_destroy(fw);
    flash_cache_destroy(mem);
    cr_assert_eq(left, 0, "operations left in the wrapper after the contexts were destroyed");
}
TestSuite(faults, .init = setup, .fini = teardown);

static void configure(const faulty_desc *d) {
    faulty_desc c = *d;
    if (!c.timeout_ms) c.timeout_ms = TIMEOUT_MS;
    faulty_configure(fw, &c);
}

static void no_faults(void) {
    faulty_desc d;
    memset(&d, 0, sizeof d);
    configure(&d);
}

/* ---- probes: one query each, with what it must give ---- */

typedef enum qkind {
    Q_USER_ID, Q_USER_NAME, Q_USER_FIRST, Q_EVENT_SLUG, Q_PART, Q_PCOUNT, Q_PIDS, Q_EV_OWNER, Q_EV_TITLE,
    Q_EV_TITLE_NONONE, Q_ITEM_DYN, Q_ITEM_STALE, Q_ITEM_GROUP, NKINDS
} qkind;

typedef struct probe {
    qkind kind;
    int a, b;
    char s[32];
    int flags;
    flash_promise *p;
    int settles;
    int64_t t0, t1;
} probe;

static void on_settled(flash_ctx *ctx, flash_promise *p, void *arg) {
    probe *q = arg;
    (void)ctx;
    (void)p;
    q->settles++;
    q->t1 = flash_test_now_ms();
}

/* Queries of the allowtime class (stale values served while a lock-holder
   refreshes) run in schedules of their own, so that a failure there names
   that path (it found the bug replayed in tests/test_regressions.c,
   allowtime_refresh_lock_in_flight_survives_a_reset). */
static bool stale_probes;

static void random_probe(probe *q, uint64_t *rng) {
    memset(q, 0, sizeof *q);
    q->kind = (qkind)(rnd(rng) % NKINDS);
    if (q->kind == Q_ITEM_STALE && !stale_probes) q->kind = Q_ITEM_DYN;
    switch (q->kind) {
    case Q_USER_ID: q->a = 1 + (int)(rnd(rng) % 110); break;
    case Q_USER_NAME:
        q->a = 1 + (int)(rnd(rng) % 110);
        snprintf(q->s, sizeof q->s, "user%d", q->a);
        break;
    case Q_USER_FIRST: q->a = (int)(rnd(rng) % 6); break;
    case Q_EVENT_SLUG:
        q->a = 1 + (int)(rnd(rng) % 12);
        snprintf(q->s, sizeof q->s, "event%d", q->a);
        break;
    case Q_PART:
        q->a = 1 + (int)(rnd(rng) % 6);
        q->b = 1 + (int)(rnd(rng) % 4);
        break;
    case Q_PCOUNT:
    case Q_PIDS: q->a = 1 + (int)(rnd(rng) % 4); break;
    case Q_EV_OWNER: q->a = (int)(rnd(rng) % 4); break;
    case Q_EV_TITLE:
    case Q_EV_TITLE_NONONE:
        q->a = (int)(rnd(rng) % 8);
        snprintf(q->s, sizeof q->s, q->a < 2 ? "none-%d" : "title %d", q->a);
        break;
    case Q_ITEM_DYN:
    case Q_ITEM_STALE: q->a = 1 + (int)(rnd(rng) % (NITEMS + 5)); break;
    case Q_ITEM_GROUP: q->a = (int)(rnd(rng) % 5); break;
    default: break;
    }
    static const int flag_sets[] = {0, 0, 0, FLASH_Q_OR_NONE, FLASH_Q_OR_404, FLASH_Q_ONLY_CACHE,
                                    FLASH_Q_ONLY_CACHE | FLASH_Q_OR_NONE};
    q->flags = flag_sets[rnd(rng) % (sizeof flag_sets / sizeof flag_sets[0])];
}

static flash_promise *issue(flash_ctx *ctx, probe *q) {
    flash_value v[2];
    const flash_class *c = NULL;
    size_t n = 1;
    switch (q->kind) {
    case Q_USER_ID: c = &User__get_by_id, v[0] = flash_v_i64(q->a); break;
    case Q_USER_NAME: c = &User__get_by_username, v[0] = flash_v_str(q->s); break;
    case Q_USER_FIRST: c = &User__filter_by_first_name, v[0] = flash_v_str(names[q->a]); break;
    case Q_EVENT_SLUG: c = &EventCacheOnSlug_class, v[0] = flash_v_str(q->s); break;
    case Q_PART: c = &Participant__get_by_user_event, v[0] = flash_v_i64(q->a), v[1] = flash_v_i64(q->b), n = 2; break;
    case Q_PCOUNT: c = &ParticipantCount_class, v[0] = flash_v_i64(q->a); break;
    case Q_PIDS: c = &ParticipantIds_class, v[0] = flash_v_i64(q->a); break;
    case Q_EV_OWNER: c = &EventsOfOwner_class, v[0] = flash_v_i64(q->a); break;
    case Q_EV_TITLE: c = &EventCacheOnTitle_class, v[0] = flash_v_str(q->s); break;
    case Q_EV_TITLE_NONONE: c = &EventCacheOnTitleNoNone_class, v[0] = flash_v_str(q->s); break;
    case Q_ITEM_DYN: c = &FaultItemDyn_class, v[0] = flash_v_i64(q->a); break;
    case Q_ITEM_STALE: c = &FaultItemStale_class, v[0] = flash_v_i64(q->a); break;
    case Q_ITEM_GROUP: c = &FaultItemsOfGroup_class, v[0] = flash_v_i64(q->a); break;
    default: break;
    }
    q->t0 = flash_test_now_ms();
    q->p = flash_query_async(ctx, c, v, n, q->flags);
    cr_assert(q->p, "flash_query_async: out of memory");
    cr_assert_eq(flash_on_settle(ctx, q->p, on_settled, q), 0);
    return q->p;
}

static bool rows_eq(const flash_model *m, const void *a, const void *b) {
    if (!a || !b) return a == b;
    for (size_t i = 0; i < m->nfields; i++) {
        flash_value x = flash_row_value(m, a, (int)i), y = flash_row_value(m, b, (int)i);
        if (!flash_value_eq(&x, &y)) return false;
    }
    return true;
}

/* The table's row of m with primary key id, or NULL. */
static const void *row(const flash_model *m, int64_t id) { return flash_table_find(fx.db, m, flash_v_i64(id)); }

/* Does list l hold exactly the rows of m with these ids, in this order? */
static bool list_is(const flash_list *l, const flash_model *m, const int64_t *ids, size_t n) {
    if (!l || l->count != n) return false;
    for (size_t i = 0; i < n; i++)
        if (!rows_eq(m, l->items[i], row(m, ids[i]))) return false;
    return true;
}

/* What the probe must give: exists (else a not-found), and a checker. */
static bool exists(const probe *q) {
    switch (q->kind) {
    case Q_USER_ID:
    case Q_USER_NAME: return q->a <= 100;
    case Q_EVENT_SLUG: return q->a <= 10;
    case Q_PART: return q->a <= 5 && q->b <= 3;
    case Q_EV_TITLE:
    case Q_EV_TITLE_NONONE: return q->a >= 2;
    case Q_ITEM_DYN:
    case Q_ITEM_STALE: return q->a <= NITEMS;
    default: return true; /* lists, counts, ids: an empty one is an answer */
    }
}

static bool value_ok(const probe *q, const void *v, char *why, size_t cap) {
    int64_t ids[100];
    size_t n = 0;
    switch (q->kind) {
    case Q_USER_ID:
    case Q_USER_NAME:
        if (rows_eq(&User_model, v, row(&User_model, q->a))) return true;
        snprintf(why, cap, "wrong user row (want id %d, got id %lld)", q->a, v ? (long long)((const User *)v)->id : -1LL);
        return false;
    case Q_EVENT_SLUG:
        if (rows_eq(&Event_model, v, row(&Event_model, q->a))) return true;
        snprintf(why, cap, "wrong event row for slug %s", q->s);
        return false;
    case Q_PART:
        if (rows_eq(&Participant_model, v, row(&Participant_model, (q->a - 1) * 3 + q->b))) return true;
        snprintf(why, cap, "wrong participant row for (%d, %d)", q->a, q->b);
        return false;
    case Q_USER_FIRST:
        for (int i = 1; i <= 100; i++)
            if (q->a < 5 && i % 5 == q->a) ids[n++] = i;
        if (list_is(v, &User_model, ids, n)) return true;
        snprintf(why, cap, "wrong user list for %s", names[q->a]);
        return false;
    case Q_EV_OWNER:
        for (int e = 10; e >= 1; e--)
            if (e % 3 == q->a) ids[n++] = e;
        if (list_is(v, &Event_model, ids, n)) return true;
        snprintf(why, cap, "wrong event list for owner %d", q->a);
        return false;
    case Q_PCOUNT:
        if (v && *(const int64_t *)v == (q->a <= 3 ? 5 : 0)) return true;
        snprintf(why, cap, "wrong count for event %d", q->a);
        return false;
    case Q_PIDS: {
        const flash_ids *x = v;
        bool ok = x && x->count == (q->a <= 3 ? 5u : 0u);
        for (size_t i = 0; ok && i < x->count; i++) ok = x->ids[i] == (int64_t)(i * 3) + q->a;
        if (ok) return true;
        snprintf(why, cap, "wrong ids for event %d", q->a);
        return false;
    }
    case Q_EV_TITLE:
    case Q_EV_TITLE_NONONE: { /* the fallback makes rows up: id 1000 + its position in the fetch */
        const Event *e = v;
        if (e && e->id >= 1000 && e->id < 2000 && strcmp(e->slug, "made-up") == 0 && strcmp(e->title, q->s) == 0 &&
            e->owner == 0)
            return true;
        snprintf(why, cap, "wrong made-up event for title %s", q->s);
        return false;
    }
    case Q_ITEM_DYN:
    case Q_ITEM_STALE:
        if (rows_eq(&FaultItem_model, v, row(&FaultItem_model, q->a))) return true;
        snprintf(why, cap, "wrong item row (want id %d, got id %lld)", q->a,
                 v ? (long long)((const FaultItem *)v)->id : -1LL);
        return false;
    case Q_ITEM_GROUP:
        for (int i = 1; i <= NITEMS; i++)
            if (i % 4 == q->a) ids[n++] = i;
        if (list_is(v, &FaultItem_model, ids, n)) return true;
        snprintf(why, cap, "wrong item list for group %d", q->a);
        return false;
    default: break;
    }
    snprintf(why, cap, "unknown probe");
    return false;
}

typedef struct tally {
    uint64_t probes, answered, not_found, errors, violations;
    uint64_t mixed_batches;   /* batches with both failed and answered keys */
    int64_t max_latency_ms;
} tally;

/* Check one settled probe; a violation is logged (the first few) and counted. */
static void check(const probe *q, bool strict, bool source_failed, tally *t, uint64_t seed, int *batch_err,
                  int *batch_ok) {
    char why[160] = "";
    bool ok = false;
    int code = flash_promise_error(q->p);
    void *v = flash_promise_value(q->p);
    t->probes++;
    if (q->settles != 1) {
        snprintf(why, sizeof why, "settled %d times", q->settles);
    } else if (flash_promise_state(q->p) == FLASH_PENDING) {
        snprintf(why, sizeof why, "still pending");
    } else if (q->t1 - q->t0 > TIMEOUT_MS + SLACK_MS) {
        snprintf(why, sizeof why, "settled after %lld ms", (long long)(q->t1 - q->t0));
    } else {
        bool not_found = (flash_promise_state(q->p) == FLASH_REJECTED &&
                          code == ((q->flags & FLASH_Q_OR_404) ? FLASH_E404 : FLASH_ENOTFOUND)) ||
                         (flash_promise_state(q->p) == FLASH_FULFILLED && !v && (q->flags & FLASH_Q_OR_NONE));
        if (not_found) {
            ok = !exists(q) || (q->flags & FLASH_Q_ONLY_CACHE);
            if (!ok) snprintf(why, sizeof why, "not found, but the row exists");
            t->not_found++;
            (*batch_ok)++;
        } else if (flash_promise_state(q->p) == FLASH_REJECTED) {
            /* a version key damaged in transit is not a number: EPROTO */
            bool versioned = q->kind == Q_ITEM_DYN || q->kind == Q_ITEM_GROUP;
            ok = (strict && (code == FLASH_EBACKEND || code == FLASH_ETIMEDOUT)) ||
                 (strict && versioned && code == FLASH_EPROTO) || (source_failed && code == FLASH_ESOURCE);
            if (!ok) snprintf(why, sizeof why, "rejected with %d (%s): %s", code, flash_strerror(code),
                              flash_promise_message(q->p));
            t->errors++;
            (*batch_err)++;
        } else {
            ok = exists(q) && value_ok(q, v, why, sizeof why);
            if (!exists(q) && ok == false && !why[0]) snprintf(why, sizeof why, "a row for a key that has none");
            t->answered++;
            (*batch_ok)++;
        }
    }
    if (q->t1 - q->t0 > t->max_latency_ms) t->max_latency_ms = q->t1 - q->t0;
    if (!ok) {
        if (t->violations < 10)
            cr_log_error("schedule %llu: probe kind %d (%d, %d, '%s', flags %d): %s", (unsigned long long)seed,
                         (int)q->kind, q->a, q->b, q->s, q->flags, why);
        t->violations++;
    }
}

/* Run the loop until cond() or the deadline; false on timeout. */
static bool drive(bool (*cond)(void *), void *arg, int64_t budget_ms) {
    int64_t end = flash_test_now_ms() + budget_ms;
    while (!cond(arg)) {
        if (flash_test_now_ms() > end) return false;
        if (fixture_run_once(true) < 0) return false;
    }
    return true;
}

typedef struct batch {
    probe *q;
    size_t n;
    int inv_settles;
    flash_promise *inv;
    flash_ctx *ctx;
} batch;

static bool all_settled(void *arg) {
    batch *b = arg;
    for (size_t i = 0; i < b->n; i++)
        if (!b->q[i].settles) return false;
    return !b->inv || b->inv_settles;
}

static bool quiet(void *arg) {
    (void)arg;
    return faulty_pending(fw) == 0 && !flash_ctx_busy(fx.ctx) && !flash_ctx_busy(strict_ctx);
}

static void on_inv_settled(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx;
    (void)p;
    ((batch *)arg)->inv_settles++;
}

/* One request: a batch of n random probes, and maybe an invalidation of
   unchanged rows (markers, version bumps, stale-marking: the rows stay what
   the table says, so every answer can be checked against it). */
static void request(flash_ctx *ctx, bool strict, uint64_t *rng, size_t n, tally *t, uint64_t seed) {
    probe qs[64];
    batch b = {qs, n, 0, NULL, ctx};
    bool source_failed = rnd(rng) % 8 == 0;
    int errs = 0, oks = 0;
    cr_assert_leq(n, 64);
    flash_ctx_reset(ctx);
    if (source_failed) flash_table_fail_next(fx.db, FLASH_ESOURCE, "injected source failure");
    for (size_t i = 0; i < n; i++) {
        random_probe(&qs[i], rng);
        issue(ctx, &qs[i]);
    }
    switch (rnd(rng) % 8) { /* rows do not change: invalidation only costs refills */
    case 0: {
        const User *u = row(&User_model, 1 + (int64_t)(rnd(rng) % 100));
        b.inv = flash_invalidate_async(ctx, &User_model, u, u); /* markers */
        break;
    }
    case 1:
    case 2: {
        const FaultItem *it = row(&FaultItem_model, 1 + (int64_t)(rnd(rng) % NITEMS));
        b.inv = flash_invalidate_async(ctx, &FaultItem_model, it, it); /* version bumps, stale-marking */
        break;
    }
    case 3: b.inv = flash_bump_version_async(ctx, &FaultItem_model); break;
    default: break;
    }
    if (b.inv) cr_assert_eq(flash_on_settle(ctx, b.inv, on_inv_settled, &b), 0);
    int64_t t0 = flash_test_now_ms();
    if (!drive(all_settled, &b, 3 * TIMEOUT_MS + SLACK_MS + 2000)) {
        cr_log_error("schedule %llu: the batch did not settle", (unsigned long long)seed);
        t->violations++;
    }
    for (size_t i = 0; i < n; i++) check(&qs[i], strict, source_failed, t, seed, &errs, &oks);
    if (b.inv) {
        int code = flash_promise_error(b.inv);
        bool ok = b.inv_settles == 1 && flash_promise_state(b.inv) != FLASH_PENDING &&
                  (code == 0 || code == FLASH_EBACKEND || code == FLASH_ETIMEDOUT) &&
                  flash_test_now_ms() - t0 <= 3 * TIMEOUT_MS + SLACK_MS;
        if (!ok) {
            cr_log_error("schedule %llu: invalidation settled %d times with %d", (unsigned long long)seed,
                         b.inv_settles, code);
            t->violations++;
        }
    }
    if (errs && oks) t->mixed_batches++;
    flash_table_fail_next(fx.db, 0, NULL); /* an unused injected failure ends with the request */
    /* Writes outlive the request: let them finish, or (sometimes) not. */
    if (rnd(rng) % 2 && !drive(quiet, NULL, 3 * TIMEOUT_MS + SLACK_MS + 2000)) {
        cr_log_error("schedule %llu: writes did not finish", (unsigned long long)seed);
        t->violations++;
    }
}

/* ---- the seeded schedules ---- */

static void schedule_desc(uint64_t seed, faulty_desc *d) {
    uint64_t r = seed * 7919 + 17;
    memset(d, 0, sizeof *d);
    d->seed = seed;
    d->timeout_ms = TIMEOUT_MS;
    d->corrupt_mode = FAULTY_CORRUPT_ANY;
    switch (seed % 5) {
    case 0: /* a little of everything */
        d->p_drop = d->p_fail = d->p_delay = d->p_reorder = 30;
        d->p_item_fail = d->p_corrupt = 30;
        break;
    case 1: /* a failing backend */
        d->p_drop = 150 + (uint32_t)(rnd(&r) % 200);
        d->p_fail = 150 + (uint32_t)(rnd(&r) % 200);
        break;
    case 2: /* slow and out of order */
        d->p_delay = 300 + (uint32_t)(rnd(&r) % 300);
        d->p_reorder = 300;
        break;
    case 3: /* a pool with servers down, values damaged in transit */
        d->p_item_fail = 100 + (uint32_t)(rnd(&r) % 400);
        d->p_corrupt = 100 + (uint32_t)(rnd(&r) % 400);
        d->p_reorder = 100;
        break;
    default: /* everything at once */
        d->p_drop = d->p_fail = 100;
        d->p_delay = d->p_reorder = 150;
        d->p_item_fail = d->p_corrupt = 200;
        break;
    }
}

static void run_schedules(uint64_t nschedules, const char *label) {
    tally t[2];
    uint64_t faulted = 0, ops = 0;
    memset(t, 0, sizeof t);
    for (uint64_t s = 1; s <= nschedules; s++) {
        faulty_desc d;
        uint64_t rng = s * 0x2545F4914F6CDD1Dull;
        bool strict = s % 2 == 0;
        schedule_desc(s, &d);
        configure(&d);
        faulty_stats_clear(fw);
        for (int r = 0; r < 3; r++)
            request(strict ? strict_ctx : fx.ctx, strict, &rng, 1 + rnd(&rng) % 40, &t[strict], s);
        cr_assert(drive(quiet, NULL, 5000), "schedule %llu: writes did not finish", (unsigned long long)s);
        faulty_stats fs = faulty_get_stats(fw);
        faulted += fs.faulted_ops;
        ops += fs.ops;
    }
    uint64_t violations = t[0].violations + t[1].violations;
    printf("%s: %llu schedules, %llu operations faulted (of %llu), %llu violations\n", label,
           (unsigned long long)nschedules, (unsigned long long)faulted, (unsigned long long)ops,
           (unsigned long long)violations);
    printf("%s: default policy: %llu queries, %llu answered, %llu not found, %llu errors; "
           "fail_on_cache_error: %llu queries, %llu answered, %llu not found, %llu errors, %llu mixed batches; "
           "slowest settle %lld ms (timeout %d ms)\n",
           label, (unsigned long long)t[0].probes, (unsigned long long)t[0].answered,
           (unsigned long long)t[0].not_found, (unsigned long long)t[0].errors, (unsigned long long)t[1].probes,
           (unsigned long long)t[1].answered, (unsigned long long)t[1].not_found, (unsigned long long)t[1].errors,
           (unsigned long long)t[1].mixed_batches,
           (long long)(t[0].max_latency_ms > t[1].max_latency_ms ? t[0].max_latency_ms : t[1].max_latency_ms),
           TIMEOUT_MS);
    fflush(stdout);
    cr_assert_eq(violations, 0, "%llu violations (first ones logged above)", (unsigned long long)violations);
    /* the schedules did what they are for */
    cr_assert_gt(faulted, ops / 10);
    cr_assert_gt(t[1].errors, 0, "fail_on_cache_error saw no failure");
    cr_assert_gt(t[1].mixed_batches, 0, "no batch had both failed and answered keys");
}

FAULT_TEST(seeded_schedules_settle_every_promise_once_with_a_correct_answer_or_a_documented_error) {
    stale_probes = false;
    run_schedules(1000, "faults");
}

/* The same with the allowtime class in the mix: delayed refresh locks that
   complete after their request was reset. */
FAULT_TEST(seeded_schedules_with_stale_serving_allowtime_classes) {
    stale_probes = true;
    run_schedules(300, "faults (allowtime)");
}

/* ---- deterministic cases ---- */

static void *wait_ok(flash_ctx *ctx, flash_promise *p) {
    void *v = NULL;
    int rc = flash_wait(ctx, p, &v);
    cr_assert_eq(rc, 0, "expected success, got %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(p));
    return v;
}

/* Users 1..n in one batch; each checked against the table. */
static void users_batch(flash_ctx *ctx, int n, int *ok, int *failed, int *wrong) {
    flash_promise *ps[100];
    *ok = *failed = *wrong = 0;
    for (int i = 0; i < n; i++) ps[i] = User_get_by_id_async(ctx, i + 1);
    void *v = wait_ok(ctx, flash_gather_settled(ctx, (size_t)n, ps));
    flash_settled *st = v;
    for (int i = 0; i < n; i++) {
        if (st[i].state == FLASH_REJECTED) (*failed)++;
        else if (rows_eq(&User_model, st[i].value, row(&User_model, i + 1))) (*ok)++;
        else (*wrong)++;
    }
}

FAULT_TEST(every_get_dropped_default_policy_answers_from_the_source_within_the_timeout) {
    faulty_desc d;
    memset(&d, 0, sizeof d);
    d.p_drop = 1000;
    configure(&d);
    int ok, failed, wrong;
    int64_t t0 = flash_test_now_ms();
    users_batch(fx.ctx, 50, &ok, &failed, &wrong);
    int64_t took = flash_test_now_ms() - t0;
    flash_stats s = stats_delta();
    cr_assert_eq(ok, 50);
    cr_assert_eq(s.cache_errors, 50, "every key's cache read timed out");
    cr_assert_eq(s.source_keys, 50, "and was read from the source");
    cr_assert_geq(took, TIMEOUT_MS - 1, "answered before the timeout: %lld ms", (long long)took);
    cr_assert_leq(took, TIMEOUT_MS + SLACK_MS, "took %lld ms", (long long)took);
}

FAULT_TEST(every_op_failing_default_policy_answers_every_kind_of_query_from_the_source) {
    faulty_desc d;
    memset(&d, 0, sizeof d);
    d.p_fail = 1000;
    configure(&d);
    uint64_t rng = 99;
    tally t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < 20; r++) request(fx.ctx, false, &rng, 40, &t, 0);
    cr_assert_eq(t.violations, 0);
    cr_assert_eq(t.probes, 800);
    cr_assert_gt(t.answered, 0);
    flash_stats s = stats_delta();
    cr_assert_eq(s.cache_hits, 0);
    cr_assert_gt(s.cache_errors, 0);
}

FAULT_TEST(fail_on_cache_error_fails_only_the_failed_keys_and_answers_the_rest) {
    int ok, failed, wrong;
    no_faults();
    users_batch(strict_ctx, 60, &ok, &failed, &wrong); /* warm */
    cr_assert_eq(ok, 60);
    cr_assert(drive(quiet, NULL, 5000));
    faulty_desc d;
    memset(&d, 0, sizeof d);
    d.seed = 7;
    d.p_item_fail = 400;
    configure(&d);
    faulty_stats_clear(fw);
    flash_ctx_reset(strict_ctx);
    users_batch(strict_ctx, 60, &ok, &failed, &wrong);
    faulty_stats fs = faulty_get_stats(fw);
    cr_assert_eq(wrong, 0);
    /* Users are an UNSET class: its version key failing fails none of them. */
    cr_assert_eq((uint64_t)failed, fs.item_failures - fs.version_item_failures, "exactly the keys the backend failed");
    cr_assert_gt(failed, 0);
    cr_assert_gt(ok, 0);
    cr_assert_eq(ok + failed, 60);
}

/* Every cached User value comes back damaged (mode): each is a miss read
   from the source, never a wrong row, and is replaced for the next request. */
static void corrupt_every_value(uint64_t seed, uint32_t mode) {
    int ok, failed, wrong;
    no_faults();
    users_batch(fx.ctx, 100, &ok, &failed, &wrong); /* warm */
    cr_assert(drive(quiet, NULL, 5000));
    faulty_desc d;
    memset(&d, 0, sizeof d);
    d.seed = seed;
    d.p_corrupt = 1000;
    d.corrupt_mode = mode;
    configure(&d);
    faulty_stats_clear(fw);
    stats_delta();
    flash_ctx_reset(fx.ctx);
    users_batch(fx.ctx, 100, &ok, &failed, &wrong);
    cr_assert_eq(faulty_get_stats(fw).corrupted, 100);
    cr_assert_eq(wrong, 0, "%d of 100 users served wrong from a damaged cached value", wrong);
    cr_assert_eq(ok, 100);
    cr_assert(drive(quiet, NULL, 5000));
    /* the next request: the replaced values hit, the others (another
       schema's, markers) still go to the source; all correct */
    no_faults();
    flash_ctx_reset(fx.ctx);
    stats_delta();
    users_batch(fx.ctx, 100, &ok, &failed, &wrong);
    flash_stats s = stats_delta();
    cr_assert_eq(ok, 100);
    cr_assert_eq(s.cache_hits + s.source_keys, 100);
    cr_assert_gt(s.cache_hits, 0, "corrupt values were replaced");
}

FAULT_TEST(detectably_corrupt_values_are_refetched_from_the_source) {
    corrupt_every_value(11, FAULTY_CORRUPT_DETECTABLE); /* cut, grown, header bits */
}

/* A bit flipped inside a cached value's payload: value format 1 decoded it
   as another valid row and served it (tests/test_regressions.c); format 2's
   check makes it a miss, answered by the source. */
FAULT_TEST(payload_corruption_never_serves_a_wrong_row) {
    corrupt_every_value(13, FAULTY_CORRUPT_PAYLOAD);
}

FAULT_TEST(reset_and_destroy_with_faulty_operations_in_flight_leave_nothing_behind) {
    faulty_desc d;
    memset(&d, 0, sizeof d);
    d.seed = 3;
    d.p_drop = 250;
    d.p_delay = 250;
    d.p_reorder = 250;
    d.p_item_fail = 100;
    d.p_corrupt = 100;
    configure(&d);
    uint64_t rng = 5;
    for (int r = 0; r < 200; r++) {
        probe qs[20];
        flash_ctx *ctx = r % 2 ? strict_ctx : fx.ctx;
        flash_ctx_reset(ctx);
        for (int i = 0; i < 20; i++) {
            random_probe(&qs[i], &rng);
            issue(ctx, &qs[i]);
        }
        /* a few iterations: some answered, some in flight; then reset */
        for (int k = (int)(rnd(&rng) % 4); k > 0; k--) fixture_run_once(false);
        flash_ctx_reset(ctx);
        for (int i = 0; i < 20; i++) cr_assert_leq(qs[i].settles, 1);
    }
    /* destroy one context with its operations in flight */
    {
        probe qs[20];
        for (int i = 0; i < 20; i++) {
            random_probe(&qs[i], &rng);
            issue(strict_ctx, &qs[i]);
        }
        fixture_run_once(false);
        flash_ctx_destroy(strict_ctx);
        strict_ctx = NULL;
    }
    cr_assert(drive(quiet, NULL, 5000));
    cr_assert_gt(faulty_get_stats(fw).canceled, 0, "some operations were cancelled in flight");
}

