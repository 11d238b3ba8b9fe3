/* The engine over a real memcached that fails: killed in the middle of a
   get-many, restarted, stopped (accepts, never answers), and slow (a proxy
   thread in the test that forwards its replies late and in small pieces).
   Every case goes through queries (flash_query_async / gather), not the
   backend alone: the request must complete with the table's rows, from the
   source when the cache fails (the default policy), and the cache must be
   used again once the server is back. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backends/cache/memcached.h"
#include "harness.h"
#include "models.h"

/* A FLASH_TEST with a watchdog: a hang dies by SIGALRM in its own worker
   (no Criterion .timeout: it leaks in the runner under ASan). */
static void watchdog_fired(int sig) {
    static const char m[] = "outage: watchdog: test still running after 90 s, aborting\n";
    (void)sig;
    (void)!write(2, m, sizeof m - 1);
    abort();
}

#define OUTAGE_TEST(name)                                                    \
    static void outage_body_##name(void);                                    \
    FLASH_TEST(outage, name) {                                               \
        signal(SIGALRM, watchdog_fired);                                     \
        alarm(90);                                                           \
        outage_body_##name();                                                \
        alarm(0);                                                            \
    }                                                                        \
    static void outage_body_##name(void)

#define TIMEOUT_MS 300   /* the backend's request timeout in these tests */
#define RETRY_MS 1000    /* a down server's rest */
#define SLACK_MS 1500    /* scheduling slack on a loaded 2-core machine (ASan) */

/* ---- a slow proxy: forwards requests at once, replies late and in pieces ---- */

typedef struct proxy {
    int lfd;
    uint16_t port, target;
    int delay_ms;            /* before forwarding each read of the server's replies */
    atomic_bool stop;
    atomic_ulong pieces;     /* writes of reply bytes to the client */
    pthread_t th;
    int cfd, ufd;            /* the one connection pair (the backend opens one per server) */
} proxy;

static bool write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void proxy_close_pair(proxy *px) {
    if (px->cfd >= 0) close(px->cfd);
    if (px->ufd >= 0) close(px->ufd);
    px->cfd = px->ufd = -1;
}

static void *proxy_main(void *arg) {
    proxy *px = arg;
    char buf[8192];
    unsigned piece = 0;
    while (!atomic_load(&px->stop)) {
        struct pollfd fds[3] = {{px->lfd, POLLIN, 0}, {px->cfd, POLLIN, 0}, {px->ufd, POLLIN, 0}};
        int n = poll(fds, 3, 20);
        if (n <= 0) continue;
        if (fds[0].revents & POLLIN) {
            int c = accept(px->lfd, NULL, NULL);
            if (c >= 0) {
                int one = 1;
                proxy_close_pair(px); /* a reconnect replaces the old pair */
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                px->cfd = c;
                px->ufd = flash_test_connect(px->target);
                if (px->ufd < 0) proxy_close_pair(px);
            }
            continue;
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) { /* requests: forwarded at once */
            ssize_t r = recv(px->cfd, buf, sizeof buf, 0);
            if (r <= 0 || !write_all(px->ufd, buf, (size_t)r)) proxy_close_pair(px);
            continue;
        }
        if (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) { /* replies: late, in 1..61-byte pieces */
            ssize_t r = recv(px->ufd, buf, sizeof buf, 0);
            if (r <= 0) {
                proxy_close_pair(px);
                continue;
            }
            flash_test_sleep_ms(px->delay_ms);
            for (ssize_t off = 0; off < r;) {
                size_t k = 1 + (piece * 7u) % 61u;
                if (k > (size_t)(r - off)) k = (size_t)(r - off);
                if (!write_all(px->cfd, buf + off, k)) {
                    proxy_close_pair(px);
                    break;
                }
                off += (ssize_t)k;
                atomic_fetch_add(&px->pieces, 1);
                if (++piece % 16 == 0) flash_test_sleep_ms(1); /* let the client read a piece at a time */
            }
        }
    }
    proxy_close_pair(px);
    return NULL;
}

static void proxy_start(proxy *px, uint16_t target, int delay_ms) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(px, 0, sizeof *px);
    px->cfd = px->ufd = -1;
    px->target = target;
    px->delay_ms = delay_ms;
    px->lfd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(px->lfd, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(px->lfd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(px->lfd, 8), 0);
    cr_assert_eq(getsockname(px->lfd, (struct sockaddr *)&a, &len), 0);
    px->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&px->th, NULL, proxy_main, px), 0);
}

static void proxy_stop(proxy *px) {
    atomic_store(&px->stop, true);
    pthread_join(px->th, NULL);
    close(px->lfd);
}

/* ---- the world: the fixture's table and loop, a context on memcached ---- */

static flash_test_server srv;
static flash_cache mc;
static flash_ctx *ctx;

/* Is the memcached on s's port the process s started? (The harness's
   readiness check accepts any listener on the port; a port freed by a kill
   could be taken by another test worker's server before the restart.) */
static bool own_server(const flash_test_server *s) {
    return s->pid > 0 && flash_test_memcached_stat(s, "pid") == (long long)s->pid;
}

/* Stop the server and wait until it is stopped: kill(SIGSTOP) returns
   before the process stops, and a server running on the other core can
   still answer a request sent right after it. The server is our child
   (the harness forks it from this worker), so waitpid sees the stop. */
static void pause_server(flash_test_server *s) {
    cr_assert(flash_test_server_pause(s, true), "memcached did not stop");
}

static void setup(void) {
    fixture_use.loop = "poll";
    fixture_use.backend = FIXTURE_MEMORY;
    fixture_setup(NULL); /* its own context stays unused */
    for (int attempt = 0; attempt < 5; attempt++) {
        cr_assert(flash_test_memcached_start(&srv, "-m 32"));
        if (own_server(&srv)) return;
        flash_test_server_stop(&srv); /* another worker's server answered on that port */
    }
    cr_assert_fail("could not start a memcached of our own");
}

/* A context on a memcached backend at port (the server or a proxy). */
static void connect_ctx(uint16_t port, uint32_t timeout_ms) {
    flash_memcached_server server = {"127.0.0.1", port, 1};
    flash_memcached_desc md;
    int err = 0;
    memset(&md, 0, sizeof md);
    md.loop = fx.lp;
    md.servers = &server;
    md.server_count = 1;
    md.timeout_ms = timeout_ms;
    md.connect_timeout_ms = timeout_ms;
    md.retry_interval_ms = RETRY_MS;
    mc = flash_memcached_create(&md, &err);
    cr_assert(mc.vt, "memcached backend: %s", flash_strerror(err));
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = mc;
    ctx = flash_ctx_create(&d);
    cr_assert(ctx);
    cr_assert_eq(fixture_attach(ctx), 0);
    cr_assert_eq(flash_ctx_set_source(ctx, NULL, flash_table_source(fx.db)), 0);
}

static void teardown(void) {
    flash_ctx_destroy(ctx);
    ctx = NULL;
    if (mc.vt) flash_cache_destroy(mc); /* before the loop */
    mc.vt = NULL;
    fixture_teardown();
    flash_test_server_stop(&srv);
}
TestSuite(outage, .init = setup, .fini = teardown);

static flash_stats last;
static flash_stats delta(void) {
    flash_stats now = flash_ctx_stats(ctx), d = stats_sub(now, last);
    last = now;
    return d;
}

static flash_memcached_stats mstats(void) {
    flash_memcached_stats st;
    cr_assert_eq(flash_memcached_server_stats(mc, 0, &st), 0);
    return st;
}

/* Run the loop until the context has nothing in flight (fills included). */
static void settle(void) {
    int64_t end = flash_test_now_ms() + 10000;
    while (flash_ctx_busy(ctx) && flash_test_now_ms() < end) fixture_run_once(true);
    cr_assert(!flash_ctx_busy(ctx), "the context is still busy after 10 s");
}

/* A new request for users 1..n in one gather; waits for it and checks every
   row against the table. Returns the milliseconds it took. */
static flash_promise *ask_users(int n) {
    flash_promise *ps[100];
    flash_ctx_reset(ctx);
    for (int i = 0; i < n; i++) ps[i] = User_get_by_id_async(ctx, i + 1);
    return flash_gather(ctx, (size_t)n, ps);
}

static void check_users(flash_promise *g, int n) {
    void *v = NULL;
    int rc = flash_wait(ctx, g, &v);
    cr_assert_eq(rc, 0, "the request failed: %d (%s): %s", rc, flash_strerror(rc), flash_promise_message(g));
    void **rows = v;
    for (int i = 0; i < n; i++) {
        const User *got = rows[i], *want = flash_table_find(fx.db, &User_model, flash_v_i64(i + 1));
        cr_assert(got && want);
        cr_assert_eq(got->id, want->id);
        cr_assert_str_eq(got->username, want->username);
        cr_assert_str_eq(got->first_name, want->first_name);
        cr_assert_eq(got->age, want->age);
    }
}

static int64_t users(int n) {
    int64_t t0 = flash_test_now_ms();
    check_users(ask_users(n), n);
    int64_t took = flash_test_now_ms() - t0;
    settle();
    return took;
}

/* ---- the cases ---- */

OUTAGE_TEST(memcached_killed_mid_batch_falls_back_to_the_source_then_hits_after_restart) {
    connect_ctx(srv.port, TIMEOUT_MS);
    users(100); /* misses, filled */
    delta();
    users(100);
    flash_stats d = delta();
    cr_assert_eq(d.cache_hits, 100, "warm: every key from memcached");
    cr_assert_eq(d.source_calls, 0);

    /* Stopped, so that the get-many stays in flight; killed while it is,
       and restarted at once on the same port (so that no other test worker
       takes the port meanwhile). */
    pause_server(&srv);
    uint64_t sent = mstats().requests;
    flash_promise *g = ask_users(100);
    for (int i = 0; i < 200 && mstats().requests == sent; i++) fixture_run_once(false);
    cr_assert_eq(mstats().requests, sent + 1, "the get-many was sent");
    for (int i = 0; i < 5; i++) fixture_run_once(false);
    cr_assert_eq(flash_promise_state(g), FLASH_PENDING, "no answer from a stopped server");
    int64_t t0 = flash_test_now_ms();
    kill(srv.pid, SIGKILL); /* dies stopped, mid-batch */
    cr_assert(flash_test_server_restart(&srv));
    cr_assert(own_server(&srv), "another test's memcached took the port on restart (harness race)");
    check_users(g, 100);
    int64_t took = flash_test_now_ms() - t0;
    d = delta();
    cr_assert_eq(d.cache_errors, 100, "every key of the batch failed in the cache");
    cr_assert_eq(d.source_keys, 100, "and was read from the source");
    cr_assert_lt(took, RETRY_MS, "a dead connection is seen at once, not at the timeout (%lld ms)", (long long)took);
    flash_memcached_stats st = mstats();
    cr_assert(st.down);
    cr_assert_geq(st.failures, 1);
    settle();

    /* Marked down for the retry interval: its keys fail fast, the source
       answers. */
    users(20);
    d = delta();
    cr_assert_eq(d.source_keys, 20);
    cr_assert_gt(mstats().fast_fails, 0);

    /* Back (empty) after the retry interval: the next batch misses and
       refills, and the one after hits again. */
    while (mstats().down) flash_test_sleep_ms(20);
    users(100);
    d = delta();
    st = mstats();
    cr_assert_eq(d.cache_errors, 0, "%llu errors after the restart (server: down %d, failures %llu, fast fails %llu, "
                 "timeouts %llu, connects %llu)", (unsigned long long)d.cache_errors, (int)st.down,
                 (unsigned long long)st.failures, (unsigned long long)st.fast_fails, (unsigned long long)st.timeouts,
                 (unsigned long long)st.connects);
    cr_assert_eq(d.cache_misses, 100);
    cr_assert_eq(d.fills, 100);
    users(100);
    d = delta();
    cr_assert_eq(d.cache_hits, 100, "hits again after the refill");
    cr_assert_eq(d.source_calls, 0);
    st = mstats();
    cr_assert(st.connected && !st.down);
    cr_assert_geq(st.reconnects, 1);
}

OUTAGE_TEST(server_that_accepts_but_never_answers_times_out_and_the_source_answers) {
    connect_ctx(srv.port, TIMEOUT_MS);
    users(50);
    users(50);
    delta();
    pause_server(&srv); /* the connection stays open: the kernel takes the request */
    int64_t took = users(50);
    flash_stats d = delta();
    cr_assert_eq(d.cache_errors, 50, "every key timed out in the cache: %llu errors, %llu hits, %lld ms",
                 (unsigned long long)d.cache_errors, (unsigned long long)d.cache_hits, (long long)took);
    cr_assert_eq(d.source_keys, 50, "and was read from the source");
    cr_assert_geq(took, TIMEOUT_MS - 10, "answered before the timeout? %lld ms", (long long)took);
    cr_assert_leq(took, TIMEOUT_MS + SLACK_MS, "took %lld ms with a %d ms timeout", (long long)took, TIMEOUT_MS);
    flash_memcached_stats st = mstats();
    cr_assert_eq(st.timeouts, 1);
    cr_assert(st.down);

    /* A brand-new connection to the stopped server: connect succeeds (the
       kernel's backlog), the request times out the same way. */
    flash_ctx_destroy(ctx);
    flash_cache_destroy(mc);
    connect_ctx(srv.port, TIMEOUT_MS);
    last = flash_ctx_stats(ctx);
    took = users(30);
    d = delta();
    cr_assert_eq(d.source_keys, 30);
    cr_assert_geq(took, TIMEOUT_MS - 10);
    cr_assert_leq(took, TIMEOUT_MS + SLACK_MS);

    /* Resumed: after the retry interval the values written before the stop
       are served again. */
    flash_test_server_pause(&srv, false);
    while (mstats().down) flash_test_sleep_ms(20);
    users(30);
    d = delta();
    cr_assert_eq(d.cache_hits, 30, "served by memcached again");
    cr_assert_eq(d.source_calls, 0);
}

OUTAGE_TEST(slow_server_answers_correctly_in_pieces_within_the_timeout) {
    proxy px;
    proxy_start(&px, srv.port, 60);
    connect_ctx(px.port, 2000);
    users(100); /* misses, filled through the proxy */
    delta();
    int64_t took = users(100);
    flash_stats d = delta();
    cr_assert_eq(d.cache_hits, 100, "every row from the slow server");
    cr_assert_eq(d.cache_errors, 0);
    cr_assert_eq(d.source_calls, 0);
    cr_assert_geq(took, 60, "the proxy did delay the replies (%lld ms)", (long long)took);
    flash_memcached_stats st = mstats();
    cr_assert_eq(st.timeouts, 0);
    cr_assert_eq(st.proto_errors, 0, "replies cut in pieces parse as a whole");
    cr_assert_gt(atomic_load(&px.pieces), 100, "the replies came in small pieces");
    flash_ctx_destroy(ctx);
    ctx = NULL;
    flash_cache_destroy(mc);
    mc.vt = NULL;
    proxy_stop(&px);
}

OUTAGE_TEST(server_slower_than_the_timeout_is_answered_by_the_source) {
    proxy px;
    proxy_start(&px, srv.port, 2 * TIMEOUT_MS);
    connect_ctx(px.port, TIMEOUT_MS);
    int64_t took = users(40);
    flash_stats d = delta();
    cr_assert_eq(d.source_keys, 40);
    cr_assert_eq(d.cache_errors, 40, "timed out in the cache");
    cr_assert_geq(took, TIMEOUT_MS - 10);
    cr_assert_leq(took, TIMEOUT_MS + SLACK_MS);
    cr_assert_geq(mstats().timeouts, 1);
    flash_ctx_destroy(ctx);
    ctx = NULL;
    flash_cache_destroy(mc);
    mc.vt = NULL;
    proxy_stop(&px);
}
