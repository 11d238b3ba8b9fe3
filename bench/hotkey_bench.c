/* hotkey_bench.c — hot keys over real memcached processes: leases, stale
   serving, the gutter pool (issue 17). Real processes throughout: this
   program starts its memcached servers (free loopback ports, killed on
   exit), forks PROCS reader processes of CONC contexts each on one poll
   loop, and counts the reads of a simulated database (a source that
   answers after SRC_MS on a timer) in shared memory.

     herd      PROCS x CONC requests read one cold key at the same moment;
               source reads for that key per round: plain, then with leases
               (lease_s = 5). Target with leases: 1.
     inval     the readers read one hot key in waves (CONC requests per
               wave, a wave per ms per process) while the parent updates
               its row and invalidates it every INVAL_MS (2 s: memcached
               tells a stale mark's age in whole seconds, and a refresh
               waits until it is surely past the lag window); per invalidation:
               source reads, the writer's cache operations, the readers'
               cache writes (fills, refresh locks, handed-back leases), and
               the age of stale reads (now minus the time of the write that
               made them stale), p99 and max: markers (UNSET), allowtime
               3 s on the old path (GET + CAS + lock), allowtime 3 s with
               leases (MARK_STALE, one op; target 1 read, age <= allowtime).
     gutter    3 memcached servers under a steady load over KEYS keys;
               one is killed (SIGKILL); source reads/s in the 3 s after,
               without and with a gutter pool of one server.

   usage: hotkey_bench MEMCACHED_BINARY [rounds]   (rounds: herd rounds, 20)
   Prints "<part> <variant> <name>=<value> ..." lines; exit status 0, or 1
   when a check failed (a wrong row, a read that failed). */
#define _GNU_SOURCE
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/loop/poll.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROCS 4
#define CONC 16
#define SRC_MS 5
#define INVAL_MS 2000
#define NINVAL 5
#define KEYS 3000

/* One model per variant, so that an invalidation touches one class. */
#define ROW_FIELDS(F) F(I64, id) F(I64, ver) F(I64, born_ms)
FLASH_MODEL(HkRow, ROW_FIELDS)
FLASH_MODEL(HkRowL, ROW_FIELDS)
FLASH_MODEL(HkRowS, ROW_FIELDS)
FLASH_MODEL(HkRowW, ROW_FIELDS)
static void slow_source(flash_ctx *ctx, flash_fetch *f, void *ud);
FLASH_INSTANCE_CACHE_OPT(HkPlain, HkRow, (id), .fallback = slow_source)
FLASH_INSTANCE_CACHE_OPT(HkLease, HkRowL, (id), .fallback = slow_source, .lease_s = 5)
FLASH_INSTANCE_CACHE_OPT(HkSoft, HkRowS, (id), .fallback = slow_source, .allowtime_s = 3)
FLASH_INSTANCE_CACHE_OPT(HkSwr, HkRowW, (id), .fallback = slow_source, .allowtime_s = 3, .lease_s = 5)

typedef struct shared {
    volatile int64_t source_reads;
    volatile int64_t ver;              /* the row's version in the "database" */
    volatile int64_t born_ms[1024];    /* when each version was written */
    volatile int stop;
    volatile int src_ms;
    volatile int64_t stale_reads, reads, failures, wrong;
    volatile int64_t reader_writes;
    volatile int64_t age_hist[64];     /* stale read ages, 100 ms buckets (last: over) */
    volatile int64_t age_max;
    volatile int64_t refreshes, fills, skipped, wins, waits;
} shared;

static shared *shm;
static flash_poll *g_poll;
static const char *mc_bin;
static uint16_t ports[4];
static pid_t mc_pids[4];

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hotkey_bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ---- the simulated database: answers after src_ms, on a timer ---- */

typedef struct pending_fetch {
    flash_fetch *f;
} pending_fetch;

static void answer(void *arg) {
    pending_fetch *p = (pending_fetch *)arg;
    flash_fetch *f = p->f;
    size_t n = flash_fetch_count(f);
    int64_t v = __atomic_load_n(&shm->ver, __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < n; i++) {
        HkRow row;
        row.id = flash_fetch_key(f, i)[0].u.i64;
        row.ver = v;
        row.born_ms = shm->born_ms[v & 1023];
        flash_fetch_set_row(f, i, &row);
    }
    __atomic_add_fetch(&shm->source_reads, (int64_t)n, __ATOMIC_SEQ_CST);
    flash_fetch_done(f, 0, NULL);
    free(p);
}

static void slow_source(flash_ctx *ctx, flash_fetch *f, void *ud) {
    flash_loop lp = flash_poll_loop(g_poll);
    pending_fetch *p = (pending_fetch *)malloc(sizeof *p);
    (void)ctx;
    (void)ud;
    p->f = f;
    if (!lp.vt->timer(lp.native, (uint32_t)shm->src_ms, answer, p)) die("no timer");
}

/* ---- memcached processes ---- */

static uint16_t free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) die("free port");
    close(fd);
    return ntohs(a.sin_port);
}

static bool port_open(uint16_t port) {
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), ok;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

static void mc_start(int i) {
    char port[16];
    if (!ports[i]) ports[i] = free_port();
    snprintf(port, sizeof port, "%u", (unsigned)ports[i]);
    mc_pids[i] = fork();
    if (mc_pids[i] == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* dies with the bench */
        if (geteuid() == 0) /* memcached will not run as root */
            execl(mc_bin, mc_bin, "-p", port, "-U", "0", "-l", "127.0.0.1", "-m", "64", "-t", "1", "-u", "nobody",
                  (char *)NULL);
        else
            execl(mc_bin, mc_bin, "-p", port, "-U", "0", "-l", "127.0.0.1", "-m", "64", "-t", "1", (char *)NULL);
        _exit(127);
    }
    for (int t = 0; t < 500 && !port_open(ports[i]); t++) sleep_ms(10);
    if (!port_open(ports[i])) die("memcached on port %u did not start", (unsigned)ports[i]);
}

static void mc_kill(int i) {
    if (mc_pids[i] > 0) {
        kill(mc_pids[i], SIGKILL);
        waitpid(mc_pids[i], NULL, 0);
        mc_pids[i] = 0;
    }
}

static void mc_kill_all(void) {
    for (int i = 0; i < 4; i++) mc_kill(i);
}

static void on_signal(int sig) {
    mc_kill_all();
    signal(sig, SIG_DFL);
    raise(sig);
}

static flash_cache make_cache(int nservers, bool gutter) {
    flash_memcached_server s[3], g[1];
    flash_memcached_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    for (int i = 0; i < nservers; i++) s[i] = (flash_memcached_server){"127.0.0.1", ports[i], 1};
    g[0] = (flash_memcached_server){"127.0.0.1", ports[3], 1};
    d.loop = flash_poll_loop(g_poll);
    d.servers = s;
    d.server_count = (size_t)nservers;
    if (gutter) {
        d.gutter = g;
        d.gutter_count = 1;
    }
    flash_cache c = flash_memcached_create(&d, &err);
    if (!c.self) die("memcached backend: %s", flash_strerror(err));
    return c;
}

static void flush_all(int n) {
    for (int i = 0; i < n; i++) {
        struct sockaddr_in a;
        char buf[64];
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(ports[i]);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 && write(fd, "flush_all\r\n", 11) == 11)
            (void)!read(fd, buf, sizeof buf);
        close(fd);
    }
}

/* ---- children ---- */

typedef struct child {
    pid_t pid;
    int go[2], done[2];
} child;

static child kids[PROCS];

static void wait_byte(int fd) {
    char c;
    if (read(fd, &c, 1) != 1) _exit(0);
}

static flash_ctx *make_ctx(flash_cache c) {
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = c;
    flash_ctx *ctx = flash_ctx_create(&d);
    if (!ctx || flash_poll_attach(ctx, g_poll)) die("context");
    return ctx;
}

/* One wave: every context asks for its key; run until all settled and,
   as flash_run would, until every batch and write they started is done
   (a refresh of a value served stale, a fill). */
static void wave(flash_ctx **ctx, const flash_class *cls, const int64_t *ids, int n) {
    flash_promise *ps[CONC];
    for (int i = 0; i < n; i++) {
        flash_ctx_reset(ctx[i]);
        flash_value k = flash_v_i64(ids[i]);
        ps[i] = flash_query_async(ctx[i], cls, &k, 1, 0);
    }
    for (;;) {
        int pending = 0;
        for (int i = 0; i < n; i++) pending += flash_promise_state(ps[i]) == FLASH_PENDING;
        if (!pending) break;
        flash_poll_run_once(g_poll, true);
    }
    int64_t now = now_ms(), cur = __atomic_load_n(&shm->ver, __ATOMIC_SEQ_CST);
    for (;;) {
        int busy = 0;
        for (int i = 0; i < n; i++) busy += flash_ctx_busy(ctx[i]);
        if (!busy) break;
        flash_poll_run_once(g_poll, true);
    }
    for (int i = 0; i < n; i++) {
        __atomic_add_fetch(&shm->reads, 1, __ATOMIC_SEQ_CST);
        if (flash_promise_state(ps[i]) != FLASH_FULFILLED) {
            __atomic_add_fetch(&shm->failures, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        const HkRow *r = (const HkRow *)flash_promise_value(ps[i]);
        if (r->id != ids[i]) __atomic_add_fetch(&shm->wrong, 1, __ATOMIC_SEQ_CST);
        if (r->ver < cur) { /* stale: since the write after the version it holds */
            int64_t age = now - shm->born_ms[(r->ver + 1) & 1023];
            int b = age < 0 ? 0 : age / 100 > 63 ? 63 : (int)(age / 100);
            __atomic_add_fetch(&shm->stale_reads, 1, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&shm->age_hist[b], 1, __ATOMIC_SEQ_CST);
            int64_t m = shm->age_max;
            while (age > m && !__atomic_compare_exchange_n(&shm->age_max, &m, age, false, __ATOMIC_SEQ_CST,
                                                            __ATOMIC_SEQ_CST)) {
            }
        }
    }
}

typedef enum part { HERD, INVAL, GUTTER } part;

static void child_main(int me, part pt, const flash_class *cls, int nservers, bool gutter, int rounds) {
    g_poll = flash_poll_create();
    flash_cache c = make_cache(nservers, gutter);
    flash_ctx *ctx[CONC];
    int64_t ids[CONC];
    unsigned seed = (unsigned)(getpid() * 2654435761u);
    for (int i = 0; i < CONC; i++) ctx[i] = make_ctx(c);
    if (pt == HERD) {
        for (int r = 0; r < rounds; r++) {
            wait_byte(kids[me].go[0]);
            for (int i = 0; i < CONC; i++) ids[i] = 100000 + r;
            wave(ctx, cls, ids, CONC);
            for (int t = 0; t < 50; t++) flash_poll_run_once(g_poll, false); /* fills */
            if (write(kids[me].done[1], "d", 1) != 1) _exit(1);
        }
    } else {
        wait_byte(kids[me].go[0]);
        while (!shm->stop) {
            for (int i = 0; i < CONC; i++) ids[i] = pt == INVAL ? 7 : (int64_t)(rand_r(&seed) % KEYS);
            wave(ctx, cls, ids, CONC);
            flash_poll_run_once(g_poll, false);
            sleep_ms(1);
        }
    }
    int64_t w = 0;
    for (int i = 0; i < CONC; i++) {
        flash_stats st = flash_ctx_stats(ctx[i]);
        w += (int64_t)st.writes + (int64_t)st.fills;
        __atomic_add_fetch(&shm->refreshes, (int64_t)st.stale_refreshes, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&shm->fills, (int64_t)st.fills, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&shm->skipped, (int64_t)st.fills_skipped, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&shm->wins, (int64_t)st.lease_wins, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&shm->waits, (int64_t)st.lease_waits, __ATOMIC_SEQ_CST);
    }
    __atomic_add_fetch(&shm->reader_writes, w, __ATOMIC_SEQ_CST);
    for (int t = 0; t < 20; t++) flash_poll_run_once(g_poll, false);
    for (int i = 0; i < CONC; i++) flash_ctx_destroy(ctx[i]);
    flash_cache_destroy(c);
    flash_poll_destroy(g_poll);
    _exit(0);
}

static void spawn(part pt, const flash_class *cls, int nservers, bool gutter, int rounds) {
    for (int i = 0; i < PROCS; i++) {
        if (pipe(kids[i].go) || pipe(kids[i].done)) die("pipe");
        kids[i].pid = fork();
        if (kids[i].pid == 0) child_main(i, pt, cls, nservers, gutter, rounds);
    }
}

static void go_all(void) {
    for (int i = 0; i < PROCS; i++)
        if (write(kids[i].go[1], "g", 1) != 1) die("go");
}

static void reap(void) {
    for (int i = 0; i < PROCS; i++) {
        int st;
        close(kids[i].go[1]);
        waitpid(kids[i].pid, &st, 0);
        close(kids[i].go[0]);
        close(kids[i].done[0]);
        close(kids[i].done[1]);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) die("a reader process failed");
    }
}

static void reset_shared(int src_ms) {
    memset((void *)shm, 0, sizeof *shm);
    shm->src_ms = src_ms;
    shm->ver = 1;
    shm->born_ms[1] = now_ms();
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static bool failed;
static void check_reads(const char *what) {
    if (shm->failures || shm->wrong) {
        fprintf(stderr, "hotkey_bench: %s: %lld failed reads, %lld wrong rows\n", what, (long long)shm->failures,
                (long long)shm->wrong);
        failed = true;
    }
}

/* ---- herd ---- */

static void herd(const char *name, const flash_class *cls, int rounds) {
    int64_t per[256];
    reset_shared(SRC_MS);
    flush_all(1);
    spawn(HERD, cls, 1, false, rounds);
    sleep_ms(200); /* all connected and waiting */
    for (int r = 0; r < rounds; r++) {
        int64_t before = shm->source_reads;
        go_all();
        for (int i = 0; i < PROCS; i++) {
            char ch;
            if (read(kids[i].done[0], &ch, 1) != 1) die("a reader process died");
        }
        per[r] = shm->source_reads - before;
    }
    reap();
    check_reads(name);
    qsort(per, (size_t)rounds, sizeof per[0], cmp_i64);
    printf("herd %s requests=%d source_reads_median=%lld source_reads_max=%lld source_reads_min=%lld\n", name,
           PROCS * CONC, (long long)per[rounds / 2], (long long)per[rounds - 1], (long long)per[0]);
    fflush(stdout);
}

/* ---- invalidation under load ---- */

static void inval(const char *name, const flash_class *cls, const flash_model *model) {
    reset_shared(SRC_MS);
    flush_all(1);
    g_poll = flash_poll_create();
    flash_cache c = make_cache(1, false);
    flash_ctx *w = make_ctx(c);
    spawn(INVAL, cls, 1, false, 0);
    sleep_ms(200);
    go_all();
    sleep_ms(1000); /* warm */
    int64_t reads0 = shm->source_reads, r0 = shm->reads;
    flash_stats s0 = flash_ctx_stats(w);
    memset((void *)shm->age_hist, 0, sizeof shm->age_hist);
    shm->age_max = 0;
    shm->stale_reads = 0;
    for (int k = 0; k < NINVAL; k++) {
        HkRow old_row, new_row;
        int64_t v = shm->ver;
        old_row = (HkRow){7, v, shm->born_ms[v & 1023]};
        shm->born_ms[(v + 1) & 1023] = now_ms();
        __atomic_store_n(&shm->ver, v + 1, __ATOMIC_SEQ_CST); /* the database write */
        new_row = (HkRow){7, v + 1, shm->born_ms[(v + 1) & 1023]};
        flash_ctx_reset(w);
        if (flash_invalidate(w, model, &old_row, &new_row)) die("invalidate");
        int64_t until = now_ms() + INVAL_MS;
        while (now_ms() < until) flash_poll_run_once(g_poll, false), sleep_ms(1);
    }
    flash_stats s1 = flash_ctx_stats(w);
    int64_t src = shm->source_reads - reads0, reads = shm->reads - r0;
    shm->stop = 1;
    reap();
    check_reads(name);
    /* the ages' p99 from the histogram */
    int64_t total = 0, acc = 0, p99 = 0;
    for (int b = 0; b < 64; b++) total += shm->age_hist[b];
    for (int b = 0; b < 64; b++) {
        acc += shm->age_hist[b];
        if (total && acc * 100 >= total * 99) {
            p99 = (b + 1) * 100;
            break;
        }
    }
    printf("inval %s invalidations=%d reads=%lld source_reads_per_inval=%.2f writer_ops_per_inval=%.2f "
           "reader_writes_per_inval=%.2f stale_reads=%lld stale_age_p99_ms<=%lld stale_age_max_ms=%lld\n",
           name, NINVAL, (long long)reads, (double)src / NINVAL,
           (double)(s1.writes - s0.writes) / NINVAL, (double)shm->reader_writes / NINVAL, (long long)shm->stale_reads,
           (long long)p99, (long long)shm->age_max);
    printf("inval-detail %s stale_refreshes=%lld fills=%lld fills_skipped=%lld lease_wins=%lld lease_waits=%lld\n",
           name, (long long)shm->refreshes, (long long)shm->fills, (long long)shm->skipped, (long long)shm->wins,
           (long long)shm->waits);
    fflush(stdout);
    flash_ctx_destroy(w);
    flash_cache_destroy(c);
    flash_poll_destroy(g_poll);
}

/* ---- a server killed under load ---- */

static void gutter_part(const char *name, bool gutter) {
    reset_shared(1);
    flush_all(4);
    spawn(GUTTER, &HkPlain_class, 3, gutter, 0);
    sleep_ms(200);
    go_all();
    sleep_ms(2000); /* warm: every key cached */
    int64_t a = shm->source_reads;
    sleep_ms(1000);
    int64_t before_rate = shm->source_reads - a;
    mc_kill(0);
    int64_t t0 = shm->source_reads, r0 = shm->reads;
    sleep_ms(3000);
    int64_t after = shm->source_reads - t0, reads = shm->reads - r0;
    shm->stop = 1;
    reap();
    /* failed reads are not expected: a dead server's keys fall back to the source */
    check_reads(name);
    printf("gutter %s reads_per_s=%.0f source_reads_per_s_before=%lld source_reads_per_s_after_kill=%.0f\n", name,
           reads / 3.0, (long long)before_rate, after / 3.0);
    fflush(stdout);
    mc_start(0);
}

int main(int argc, char **argv) {
    int rounds = argc > 2 ? atoi(argv[2]) : 20;
    if (argc < 2) die("usage: hotkey_bench MEMCACHED_BINARY [rounds]");
    if (rounds < 1 || rounds > 256) die("rounds: 1..256");
    mc_bin = argv[1];
    shm = (shared *)mmap(NULL, sizeof *shm, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) die("mmap");
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < 4; i++) mc_start(i);
    atexit(mc_kill_all);
    herd("plain", &HkPlain_class, rounds);
    herd("leases", &HkLease_class, rounds);
    inval("markers", &HkPlain_class, &HkRow_model);
    inval("leases", &HkLease_class, &HkRowL_model);
    inval("allowtime", &HkSoft_class, &HkRowS_model);
    inval("allowtime+leases", &HkSwr_class, &HkRowW_model);
    gutter_part("no-gutter", false);
    gutter_part("gutter", true);
    return failed ? 1 : 0;
}
