/* tests/test_adapters.c — the loop adapters as caller-owned structs on
   flash.h's adapter kit: their allocator (failing on demand, or counted),
   init / attach / close, and flash on a loop without post. The conformance
   of each adapter to flash_loop_vtable is tests/test_loops.c. */
#define _GNU_SOURCE /* uv.h needs the POSIX types */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "loops.h"
#include "models.h"
#include "backends/loop/libev.h"
#include "backends/loop/libevent.h"
#include "backends/loop/libuv.h"

TestSuite(adapters, .init = flash_test_watchdog);

/* An allocator that refuses while fail is set, and counts. */
typedef struct fail_alloc {
    bool fail;
    size_t allocs, refused, live;
} fail_alloc;
static void *fa_alloc(size_t n, void *ud) {
    fail_alloc *f = (fail_alloc *)ud;
    if (f->fail) {
        f->refused++;
        return NULL;
    }
    f->allocs++;
    f->live++;
    return malloc(n);
}
static void fa_free(void *p, void *ud) {
    if (p) ((fail_alloc *)ud)->live--;
    free(p);
}

static int fulfilled, rejected, enomem;
static void count_settled(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)ctx, (void)arg;
    if (flash_promise_state(p) == FLASH_FULFILLED) fulfilled++;
    else if (flash_promise_state(p) == FLASH_REJECTED) rejected++, enomem += flash_promise_error(p) == FLASH_ENOMEM;
}

/* Resolves every key in the batch call itself. */
static void sync_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    (void)ud;
    for (size_t i = 0; i < flash_batch_size(b); i++) {
        size_t len;
        const char *k = (const char *)flash_batch_key(b, i, &len);
        cr_assert_eq(flash_batch_resolve(b, i, flash_sprintf(ctx, "v:%.*s", (int)len, k)), 0);
    }
}
static const flash_loader_desc sync_loader = {.name = "sync", .batch = sync_batch};

static flash_promise *load_watched(flash_ctx *ctx, int i) {
    char key[16];
    flash_promise *p;
    snprintf(key, sizeof key, "k%d", i);
    p = flash_load_str(flash_loader_for(ctx, &sync_loader), key);
    cr_assert_not_null(p);
    cr_assert_eq(flash_on_settle(ctx, p, count_settled, NULL), 0);
    return p;
}

/* flash's ticks go through post, which takes the caller's node: with the
   adapter's allocator refusing everything, loads still dispatch and settle
   and their callbacks run, under the loop library's own run function. */
FLASH_LOOP_TEST(adapters, failing_allocator_loses_no_tick) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    void *native = L->create_with(&al);
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert(native && ctx);
    cr_assert_eq(L->attach(ctx, native), 0, "%s", L->name);
    fulfilled = rejected = 0;
    fa.fail = true;
    for (int round = 1; round <= 3; round++) {
        flash_promise *ps[40];
        for (int i = 0; i < 40; i++) ps[i] = load_watched(ctx, round * 100 + i);
        cr_assert_eq(L->run(native), 0, "%s", L->name);
        cr_assert_eq(fulfilled, 40 * round, "%s: round %d: %d fulfilled, %d rejected", L->name, round, fulfilled,
                     rejected);
        for (int i = 0; i < 40; i++) cr_assert_eq(flash_promise_state(ps[i]), FLASH_FULFILLED, "%s", L->name);
        cr_assert_str_eq((const char *)flash_promise_value(ps[7]), round == 1 ? "v:k107" : round == 2 ? "v:k207" : "v:k307");
        flash_ctx_reset(ctx);
    }
    cr_assert_eq(rejected, 0, "%s", L->name);
    fa.fail = false;
    flash_ctx_destroy(ctx);
    L->destroy(native);
    cr_assert_eq(fa.live, 0, "%s: %zu blocks of the adapter's allocator not freed", L->name, fa.live);
}

/* The same through the memory backend and the table source (their ticks
   are posted too): model queries settle on a loop that can allocate nothing. */
FLASH_LOOP_TEST(adapters, failing_allocator_model_queries_settle) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    flash_promise *ps[20];
    fixture_use.loop = L->name;
    fixture_use.loop_alloc = &al;
    fixture_setup(NULL);
    fulfilled = rejected = 0;
    fa.fail = true;
    for (int round = 0; round < 2; round++) { /* a miss (source), then a hit (cache) */
        for (int i = 0; i < 20; i++) {
            ps[i] = User_get_by_id_async(fx.ctx, i + 1);
            cr_assert_not_null(ps[i]);
            cr_assert_eq(flash_on_settle(fx.ctx, ps[i], count_settled, NULL), 0);
        }
        cr_assert_eq(L->run(fx.native), 0, "%s", L->name);
        cr_assert_eq(fulfilled, 20 * (round + 1), "%s: %d fulfilled, %d rejected", L->name, fulfilled, rejected);
        for (int i = 0; i < 20; i++) cr_assert_eq(((User *)flash_promise_value(ps[i]))->id, i + 1);
        flash_ctx_reset(fx.ctx);
    }
    fa.fail = false;
    fixture_teardown();
    memset(&fixture_use, 0, sizeof fixture_use);
    cr_assert_eq(fa.live, 0, "%s", L->name);
}

/* A third-party loop without post (here each adapter with post hidden) whose
   defer and timer fail: a load is rejected with FLASH_ENOMEM rather than put
   in a batch that never dispatches; once the loop can defer again, callbacks
   queued meanwhile run with the next drain. */
FLASH_LOOP_TEST(adapters, loop_without_post_rejects_loads_with_enomem) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    void *native = L->create_with(&al);
    flash_loop lp = L->loop(native);
    flash_loop_vtable nopost = *lp.vt;
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_promise *p, *q;
    nopost.post = NULL;
    nopost.unpost = NULL;
    lp.vt = &nopost;
    cr_assert_eq(flash_ctx_attach_loop(ctx, lp), 0);
    fulfilled = rejected = enomem = 0;
    fa.fail = true;
    p = load_watched(ctx, 1);
    cr_assert_eq(flash_promise_state(p), FLASH_REJECTED, "%s", L->name);
    cr_assert_eq(flash_promise_error(p), FLASH_ENOMEM, "%s", L->name);
    cr_assert_gt(fa.refused, 0);
    fa.fail = false;
    q = load_watched(ctx, 2);
    cr_assert_eq(L->run(native), 0);
    cr_assert_eq(flash_promise_state(q), FLASH_FULFILLED, "%s", L->name);
    cr_assert_eq(fulfilled, 1, "%s", L->name);
    cr_assert_eq(enomem, 1, "%s: the rejection's callback", L->name);
    flash_ctx_destroy(ctx);
    L->destroy(native);
    cr_assert_eq(fa.live, 0, "%s", L->name);
}

/* ---- a warm adapter allocates nothing ---------------------------------------- */

static void nop(void *arg) { (void)arg; }
static void nop_io(void *arg, int events) { (void)arg, (void)events; }

static void busy_round(flash_loop lp, int fd, flash_defer *d, void *native, const flash_test_loop *L) {
    const flash_loop_vtable *vt = lp.vt;
    for (int i = 0; i < 20; i++) cr_assert_not_null(vt->defer(lp.native, nop, NULL));
    vt->cancel(lp.native, vt->defer(lp.native, nop, NULL));
    cr_assert_eq(flash_loop_post(lp, d, nop, NULL), 0);
    for (int i = 0; i < 10; i++) cr_assert_not_null(vt->timer(lp.native, 0, nop, NULL));
    for (int i = 0; i < 5; i++) vt->cancel(lp.native, vt->timer(lp.native, 1000, nop, NULL));
    void *w = vt->io_start(lp.native, fd, FLASH_IO_WRITE, nop_io, NULL);
    cr_assert_not_null(w);
    vt->run_once(lp.native, false);
    vt->io_stop(lp.native, w);
    cr_assert_eq(L->run(native), 0);
}

FLASH_LOOP_TEST(adapters, warm_adapter_allocates_nothing) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    void *native = L->create_with(&al);
    flash_loop lp = L->loop(native);
    flash_defer d;
    int sv[2];
    size_t warm;
    memset(&d, 0, sizeof d);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    for (int i = 0; i < 3; i++) busy_round(lp, sv[0], &d, native, L);
    warm = fa.allocs;
    cr_assert_gt(warm, 0, "%s: the adapter's allocator is not used", L->name);
    for (int i = 0; i < 5; i++) busy_round(lp, sv[0], &d, native, L);
    cr_assert_eq(fa.allocs, warm, "%s: %zu allocations once warm", L->name, fa.allocs - warm);
    L->destroy(native);
    cr_assert_eq(fa.live, 0, "%s", L->name);
    close(sv[0]);
    close(sv[1]);
}

/* Nodes posted and never run are dropped with the adapter: fn never runs. */
static int posted_ran;
static void posted_fn(void *arg) { (void)arg, posted_ran++; }

FLASH_LOOP_TEST(adapters, destroy_drops_posted_nodes) {
    void *native = L->create();
    flash_loop lp = L->loop(native);
    flash_defer d[3];
    memset(d, 0, sizeof d);
    posted_ran = 0;
    for (int i = 0; i < 3; i++) cr_assert_eq(flash_loop_post(lp, &d[i], posted_fn, NULL), 0);
    cr_assert_not_null(lp.vt->timer(lp.native, 5000, posted_fn, NULL));
    flash_loop_unpost(lp, &d[1]);
    cr_assert(flash_defer_queued(&d[0]) && !flash_defer_queued(&d[1]));
    L->destroy(native);
    cr_assert(!flash_defer_queued(&d[0]) && !flash_defer_queued(&d[2]), "%s", L->name);
    cr_assert_eq(posted_ran, 0, "%s", L->name);
}

/* ---- init, attach, close ------------------------------------------------------- */

FLASH_TEST(adapters, libuv_init_attach_close) {
    flash_libuv a, zero;
    uv_loop_t loop;
    flash_ctx *ctx = flash_ctx_create(NULL), *ctx2 = flash_ctx_create(NULL);
    memset(&a, 0, sizeof a);
    memset(&zero, 0, sizeof zero);
    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(flash_libuv_init(NULL, &loop, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libuv_init(&a, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libuv_attach(ctx, &a), FLASH_ESTATE, "not initialised");
    a.data = &loop;
    cr_assert_eq(flash_libuv_init(&a, &loop, NULL), 0);
    cr_assert_eq(a.data, &loop, "init keeps the user's data");
    cr_assert_eq(flash_libuv_init(&a, &loop, NULL), FLASH_ESTATE);
    cr_assert_eq(flash_libuv_attach(NULL, &a), FLASH_EINVAL);
    cr_assert_eq(flash_libuv_attach(ctx, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libuv_attach(ctx, &a), 0);
    cr_assert_eq(flash_libuv_attach(ctx, &a), FLASH_ESTATE);
    cr_assert_eq(flash_libuv_attach(ctx2, &a), 0, "two contexts on one adapter");
    cr_assert_eq(flash_ctx_loop(ctx).native, &a);
    flash_ctx_destroy(ctx);
    flash_ctx_destroy(ctx2);
    flash_libuv_close(&a);
    flash_libuv_close(&a); /* a no-op */
    cr_assert_eq(flash_libuv_init(&a, &loop, NULL), FLASH_ESTATE, "still closing");
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(flash_libuv_init(&a, &loop, NULL), 0, "closed: may be initialised again");
    flash_libuv_close(&a);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
    flash_libuv_close(&zero); /* never initialised: a no-op */
}

FLASH_TEST(adapters, libev_init_attach_close) {
    flash_libev a;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    flash_ctx *ctx = flash_ctx_create(NULL);
    memset(&a, 0, sizeof a);
    cr_assert_eq(flash_libev_init(NULL, loop, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libev_init(&a, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libev_attach(ctx, &a), FLASH_ESTATE);
    cr_assert_eq(flash_libev_init(&a, loop, NULL), 0);
    cr_assert_eq(flash_libev_init(&a, loop, NULL), FLASH_ESTATE);
    cr_assert_eq(flash_libev_attach(NULL, &a), FLASH_EINVAL);
    cr_assert_eq(flash_libev_attach(ctx, &a), 0);
    cr_assert_eq(flash_libev_attach(ctx, &a), FLASH_ESTATE);
    flash_ctx_destroy(ctx);
    cr_assert_not_null(flash_libev_loop(&a).vt->timer(&a, 5000, nop, NULL));
    flash_libev_close(&a);
    cr_assert_eq(ev_run(loop, EVRUN_NOWAIT), 0, "closed: nothing of the adapter keeps the loop");
    cr_assert_eq(flash_libev_init(&a, loop, NULL), 0, "closed: may be initialised again");
    ev_loop_destroy(loop); /* closes it (ev_cleanup) */
    flash_libev_close(&a); /* a no-op */
}

FLASH_TEST(adapters, libevent_init_attach_close) {
    flash_libevent a;
    struct event_base *base = event_base_new();
    flash_ctx *ctx = flash_ctx_create(NULL);
    memset(&a, 0, sizeof a);
    cr_assert_eq(flash_libevent_init(NULL, base, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libevent_init(&a, NULL, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_libevent_attach(ctx, &a), FLASH_ESTATE);
    cr_assert_eq(flash_libevent_init(&a, base, NULL), 0);
    cr_assert_eq(flash_libevent_init(&a, base, NULL), FLASH_ESTATE);
    cr_assert_eq(flash_libevent_attach(NULL, &a), FLASH_EINVAL);
    cr_assert_eq(flash_libevent_attach(ctx, &a), 0);
    cr_assert_eq(flash_libevent_attach(ctx, &a), FLASH_ESTATE);
    flash_ctx_destroy(ctx);
    cr_assert_not_null(flash_libevent_loop(&a).vt->timer(&a, 5000, nop, NULL));
    flash_libevent_close(&a);
    flash_libevent_close(&a); /* a no-op */
    cr_assert_eq(event_base_loop(base, EVLOOP_NONBLOCK), 1, "closed: no event of the adapter left");
    cr_assert_eq(flash_libevent_init(&a, base, NULL), 0, "closed: may be initialised again");
    flash_libevent_close(&a);
    event_base_free(base);
}

FLASH_TEST(adapters, poll_attach_refusals_and_allocator) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    flash_ctx *ctx = flash_ctx_create(NULL);
    flash_poll *p;
    fa.fail = true;
    cr_assert_null(flash_poll_create_with(&al), "out of memory: NULL");
    fa.fail = false;
    p = flash_poll_create_with(&al);
    cr_assert_not_null(p);
    cr_assert_eq(flash_poll_attach(NULL, p), FLASH_EINVAL);
    cr_assert_eq(flash_poll_attach(ctx, NULL), FLASH_EINVAL);
    cr_assert_eq(flash_poll_attach(ctx, p), 0);
    cr_assert_eq(flash_poll_attach(ctx, p), FLASH_ESTATE);
    flash_ctx_destroy(ctx);
    flash_poll_destroy(p);
    cr_assert_eq(fa.live, 0);
}

/* ---- the kit alone, as a third-party adapter would use it ---------------- */

typedef struct kit_adapter {
    flash_loop_kit kit; /* first: the native pointer */
    int on, off, in_run_calls;
    bool running;
} kit_adapter;

static void kit_pending(flash_loop_kit *k, bool any) {
    kit_adapter *a = (kit_adapter *)(void *)k;
    if (a->running) a->in_run_calls++;
    if (any) a->on++;
    else a->off++;
}

static int kit_ran;
static flash_defer kit_again;
static void kit_count(void *arg) {
    kit_adapter *a = (kit_adapter *)arg;
    kit_ran++;
    /* a node posted from a run waits for the next run, and the adapter hears
       nothing until this run ends */
    if (kit_ran == 1) flash_loop_kit_post(a, &kit_again);
}

Test(adapters, kit_reports_the_queue_turning_empty_or_not_once) {
    kit_adapter a;
    flash_defer d[3];
    memset(&a, 0, sizeof a);
    memset(d, 0, sizeof d);
    memset(&kit_again, 0, sizeof kit_again);
    flash_loop_kit_init(&a.kit, 32, NULL, kit_pending);
    for (int i = 0; i < 3; i++) d[i].fn = kit_count, d[i].arg = &a;
    kit_again.fn = kit_count, kit_again.arg = &a;
    flash_loop_kit_post(&a, &d[0]);
    flash_loop_kit_post(&a, &d[1]);
    cr_assert_eq(a.on, 1, "empty -> queued once, not per post");
    flash_loop_kit_unpost(&a, &d[0]);
    cr_assert_eq(a.off, 0, "still one queued");
    flash_loop_kit_unpost(&a, &d[1]);
    cr_assert_eq(a.off, 1);
    void *h = flash_loop_kit_defer(&a, kit_count, &a);
    cr_assert_not_null(h);
    cr_assert_eq(a.on, 2);
    cr_assert(flash_loop_kit_cancel(&a.kit, h), "a defer's handle is the kit's");
    cr_assert_eq(a.off, 2);
    cr_assert(!flash_loop_kit_cancel(&a.kit, &d[2]), "not a defer node of the kit");

    kit_ran = 0;
    flash_loop_kit_post(&a, &d[2]);
    a.running = true;
    cr_assert_eq(flash_loop_kit_run(&a.kit), 1, "only what was queued before the run");
    a.running = false;
    cr_assert_eq(a.in_run_calls, 0, "nothing reported from inside the run");
    cr_assert_eq(a.on, 3);
    cr_assert_eq(a.off, 2, "the run ended with a node queued: still pending");
    cr_assert_eq(flash_loop_kit_run(&a.kit), 1);
    cr_assert_eq(kit_ran, 2);
    cr_assert_eq(a.off, 3, "empty at the end of the run: reported once");
    flash_loop_kit_close(&a.kit, NULL);
}

static int kit_dropped;
static void kit_drop(void *h) {
    kit_dropped++;
    memset(h, 0xab, 64); /* the handle's bytes are the adapter's until put back */
}

Test(adapters, kit_pool_lists_live_handles_and_close_frees_everything) {
    fail_alloc fa = {0};
    flash_allocator al = {fa_alloc, fa_free, &fa};
    flash_loop_kit k;
    void *hs[5], *h;
    size_t n = 0;
    flash_loop_kit_init(&k, 64, &al, NULL);
    for (int i = 0; i < 5; i++) {
        cr_assert_not_null(hs[i] = flash_handle_pool_get(&k.handles));
        cr_assert_eq(((uintptr_t)hs[i]) % sizeof(long double), 0, "aligned as malloc's memory");
        for (int j = 0; j < 64; j++) cr_assert_eq(((unsigned char *)hs[i])[j], 0, "zeroed");
    }
    flash_handle_pool_put(&k.handles, hs[2]);
    flash_handle_pool_put(&k.handles, hs[4]);
    for (h = flash_handle_pool_next_live(&k.handles, NULL); h; h = flash_handle_pool_next_live(&k.handles, h)) {
        cr_assert(h == hs[0] || h == hs[1] || h == hs[3], "only the live ones");
        n++;
    }
    cr_assert_eq(n, 3);
    cr_assert_eq(k.handles.live, 3);
    cr_assert_eq(flash_handle_pool_get(&k.handles), hs[4], "the spare one is reused");
    cr_assert_not_null(flash_loop_kit_defer(&k, kit_count, NULL));
    kit_dropped = 0;
    flash_loop_kit_close(&k, kit_drop);
    cr_assert_eq(kit_dropped, 4, "drop sees every live handle once");
    /* drop left them live (an adapter whose close completes later, as
       libuv's): they are the adapter's to put back, then clear */
    while ((h = flash_handle_pool_next_live(&k.handles, NULL)) != NULL) flash_handle_pool_put(&k.handles, h);
    flash_handle_pool_clear(&k.handles);
    cr_assert_eq(fa.live, 0, "every byte back to the allocator");
}

/* The queue alone: a late node posted in a run joins the end of the run's
   own nodes, before those queued for the next run, wherever they are. */
static char qlog[16];
static size_t qn;
static flash_defer_queue *qq;
static flash_defer qnodes[6];
static void qnote(void *arg) { qlog[qn++] = *(const char *)arg; }
static void qpost_mixed(void *arg) {
    qnote(arg);
    flash_defer_queue_push(qq, &qnodes[3]); /* next run */
    flash_defer_queue_push(qq, &qnodes[4]); /* late: this run, before "c"'s */
    flash_defer_queue_remove(qq, &qnodes[3]); /* the next run's first node goes... */
    flash_defer_queue_push(qq, &qnodes[3]);   /* ...and comes back */
}

Test(adapters, defer_queue_runs_late_nodes_at_the_end_of_the_run) {
    flash_defer_queue q;
    const char *names[6] = {"a", "b", "c", "n", "L", "x"};
    qq = &q;
    qn = 0;
    memset(qlog, 0, sizeof qlog);
    memset(qnodes, 0, sizeof qnodes);
    flash_defer_queue_init(&q, NULL);
    for (int i = 0; i < 6; i++) qnodes[i].fn = qnote, qnodes[i].arg = (void *)names[i];
    qnodes[1].fn = qpost_mixed;
    qnodes[4].late = true;
    flash_defer_queue_push(&q, &qnodes[0]);
    flash_defer_queue_push(&q, &qnodes[1]);
    flash_defer_queue_push(&q, &qnodes[2]);
    cr_assert_eq(flash_defer_queue_run(&q), 4);
    cr_assert_str_eq(qlog, "abcL");
    cr_assert_eq(flash_defer_queue_run(&q), 1);
    cr_assert_str_eq(qlog, "abcLn");
    cr_assert(flash_defer_queue_empty(&q));
    /* outside a run, late changes nothing: FIFO */
    flash_defer_queue_push(&q, &qnodes[4]);
    flash_defer_queue_push(&q, &qnodes[5]);
    cr_assert_eq(flash_defer_queue_run(&q), 2);
    cr_assert_str_eq(qlog, "abcLnLx");
    flash_defer_queue_clear(&q);
}
