/* examples/invalidator.c — the change-stream consumer as a daemon: every
   write committed to PostgreSQL invalidates its keys in a memcached pool,
   whoever made it (backends/changes/postgres.h).

     invalidator --conninfo "host=db dbname=app user=flash" \
                 --servers 10.0.0.1:11211,10.0.0.2:11211 \
                 [--publication flash] [--slot flash] [--create] \
                 [--key-prefix flash] [--status-interval 10]

   The models are compiled in (here: the User model of the README's
   examples, table "users"); a real deployment includes its own models'
   header, so that the keys are the readers' keys. Status lines go to stderr
   every --status-interval seconds; SIGTERM or SIGINT stops it cleanly
   (a self-pipe watched by the loop): what was not acknowledged is sent
   again to the next run. Without arguments, or with --help: the usage, exit 0.

   Build: make build/examples/invalidator (links -lpq). */
#define _GNU_SOURCE
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/changes/postgres.h"
#include "backends/loop/poll.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, first_name)
FLASH_MODEL_OPT(User, USER_FIELDS, .table = "users")
FLASH_GET_KEYS(User, (id), (username))
FLASH_FILTER_KEYS(User, (first_name))

static int sigpipe[2] = {-1, -1};
static volatile sig_atomic_t stopping;

static void on_signal(int sig) {
    int saved = errno;
    char c = (char)sig;
    stopping = 1;
    if (write(sigpipe[1], &c, 1) < 0) { /* the pipe is full: a stop is already pending */
    }
    errno = saved;
}

typedef struct app {
    flash_poll *loop;
    flash_pg_changes *ch;
    void *sig_io, *status_timer;
    uint32_t status_s;
    bool done;
} app;

static void on_sigpipe(void *arg, int events) {
    app *a = (app *)arg;
    char buf[16];
    (void)events;
    while (read(sigpipe[0], buf, sizeof buf) > 0) {
    }
    a->done = true;
}

static void status(app *a) {
    flash_pg_changes_stats s = flash_pg_changes_stats_get(a->ch);
    char acked[24];
    flash_pg_lsn_format(s.acked_lsn, acked);
    fprintf(stderr,
            "invalidator: %s, %llu transactions, %llu changes, %llu rows invalidated, acked %s, lag %lld ms, "
            "%llu reconnects, %llu errors%s%s\n",
            s.streaming ? "streaming" : "not streaming", (unsigned long long)s.transactions,
            (unsigned long long)s.changes, (unsigned long long)s.rows_invalidated, acked, (long long)s.lag_ms,
            (unsigned long long)s.reconnects, (unsigned long long)s.errors, s.errors ? ", last: " : "",
            s.errors ? flash_pg_changes_last_error(a->ch) : "");
}

static void on_status(void *arg) {
    app *a = (app *)arg;
    flash_loop l = flash_poll_loop(a->loop);
    status(a);
    a->status_timer = l.vt->timer(l.native, a->status_s * 1000, on_status, a);
}

static void usage(FILE *f) {
    fprintf(f, "usage: invalidator --conninfo CONNINFO --servers HOST:PORT[,HOST:PORT...]\n"
               "                   [--publication NAME] [--slot NAME] [--create]\n"
               "                   [--key-prefix PREFIX] [--status-interval SECONDS]\n"
               "Reads PostgreSQL's logical replication stream (pgoutput) and invalidates the\n"
               "keys of every committed change in memcached. --create makes the publication\n"
               "(for the models' tables) and the replication slot when missing.\n");
}

/* "h1:p1,h2:p2" -> servers (strings point into the copy s). */
static size_t parse_servers(char *s, flash_memcached_server *out, size_t cap) {
    size_t n = 0;
    char *save = NULL, *tok;
    for (tok = strtok_r(s, ",", &save); tok && n < cap; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');
        memset(&out[n], 0, sizeof out[n]);
        if (colon) {
            *colon = 0;
            out[n].port = (uint16_t)atoi(colon + 1);
        }
        out[n].host = tok;
        n++;
    }
    return n;
}

int main(int argc, char **argv) {
    const char *conninfo = NULL, *servers_arg = NULL, *publication = "flash", *slot = "flash", *prefix = NULL;
    bool create = false;
    uint32_t status_s = 10;
    int i, err = 0, rc = 0;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--create")) {
            create = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "invalidator: %s needs a value\n", a);
            usage(stderr);
            return 2;
        }
        if (!strcmp(a, "--conninfo")) conninfo = v;
        else if (!strcmp(a, "--servers")) servers_arg = v;
        else if (!strcmp(a, "--publication")) publication = v;
        else if (!strcmp(a, "--slot")) slot = v;
        else if (!strcmp(a, "--key-prefix")) prefix = v;
        else if (!strcmp(a, "--status-interval")) status_s = (uint32_t)atoi(v);
        else {
            fprintf(stderr, "invalidator: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        i++;
    }
    if (argc == 1) { /* nothing asked: say how to use it */
        usage(stdout);
        return 0;
    }
    if (!conninfo || !servers_arg) {
        usage(stderr);
        return 2;
    }

    char *servers_copy = strdup(servers_arg);
    flash_memcached_server servers[64];
    size_t nservers = servers_copy ? parse_servers(servers_copy, servers, 64) : 0;
    if (!nservers) {
        fprintf(stderr, "invalidator: no memcached server in --servers\n");
        free(servers_copy);
        return 2;
    }
    if (pipe(sigpipe) != 0) {
        perror("invalidator: pipe");
        free(servers_copy);
        return 1;
    }
    fcntl(sigpipe[0], F_SETFL, O_NONBLOCK);
    fcntl(sigpipe[1], F_SETFL, O_NONBLOCK);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    app a;
    memset(&a, 0, sizeof a);
    a.status_s = status_s ? status_s : 10;
    a.loop = flash_poll_create();
    flash_loop l = flash_poll_loop(a.loop);

    flash_memcached_desc md;
    memset(&md, 0, sizeof md);
    md.loop = l;
    md.servers = servers;
    md.server_count = nservers;
    flash_cache cache = flash_memcached_create(&md, &err);
    if (!cache.vt) {
        fprintf(stderr, "invalidator: memcached: %s\n", flash_strerror(err));
        flash_poll_destroy(a.loop);
        free(servers_copy);
        return 1;
    }

    flash_desc cd;
    memset(&cd, 0, sizeof cd);
    cd.key_prefix = prefix;
    cd.logger.func = flash_log_stderr;
    flash_pg_changes_desc d;
    memset(&d, 0, sizeof d);
    d.conninfo = conninfo;
    d.loop = l;
    d.cache = cache;
    d.ctx = &cd;
    d.publication = publication;
    d.slot = slot;
    d.create_publication = d.create_slot = create;
    a.ch = flash_pg_changes_create(&d, &err);
    if (!a.ch) {
        fprintf(stderr, "invalidator: %s (conninfo: %s)\n", flash_strerror(err), conninfo);
        flash_cache_destroy(cache);
        flash_poll_destroy(a.loop);
        free(servers_copy);
        return 1;
    }
    a.sig_io = l.vt->io_start(l.native, sigpipe[0], FLASH_IO_READ, on_sigpipe, &a);
    a.status_timer = l.vt->timer(l.native, a.status_s * 1000, on_status, &a);
    fprintf(stderr, "invalidator: publication %s, slot %s, %zu memcached server(s)\n", publication, slot, nservers);

    while (!a.done && !stopping) {
        if (flash_poll_run_once(a.loop, true) < 0 && errno != EINTR) {
            perror("invalidator: poll");
            rc = 1;
            break;
        }
    }
    status(&a);
    fprintf(stderr, "invalidator: stopping\n");
    if (a.sig_io) l.vt->io_stop(l.native, a.sig_io);
    if (a.status_timer) l.vt->cancel(l.native, a.status_timer);
    flash_pg_changes_destroy(a.ch); /* before the cache */
    flash_cache_destroy(cache);
    flash_poll_destroy(a.loop);
    close(sigpipe[0]);
    close(sigpipe[1]);
    free(servers_copy);
    return rc;
}
