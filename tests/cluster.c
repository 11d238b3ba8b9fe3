/* tests/cluster.c — see cluster.h. */
#define _GNU_SOURCE
#include "cluster.h"
#include "harness.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int flash_test_redis_cli(uint16_t port, char *out, size_t cap, const char *fmt, ...) {
    char args[8192], cmd[8400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "redis-cli -p %u %s 2>&1", (unsigned)port, args);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    size_t n = out && cap ? fread(out, 1, cap - 1, f) : 0;
    if (out && cap) out[n] = 0;
    else {
        char sink[4096];
        while (fread(sink, 1, sizeof sink, f) > 0) {
        }
    }
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* fork + exec redis-server; detached: it outlives this process (the shared
   cluster), else it dies with it. */
static pid_t spawn_redis(uint16_t port, const char *dir, const char *extra, bool detached) {
    char portbuf[16], buf[512];
    char *argv[40];
    int argc = 0;
    snprintf(portbuf, sizeof portbuf, "%u", (unsigned)port);
    snprintf(buf, sizeof buf, "%s", extra ? extra : "");
    if (extra && strncmp(extra, "SENTINEL ", 9) == 0) { /* a config file path */
        argv[argc++] = (char *)"redis-server";
        argv[argc++] = buf + 9;
        argv[argc++] = (char *)"--sentinel";
    } else {
        argv[argc++] = (char *)"redis-server";
        argv[argc++] = (char *)"--port";
        argv[argc++] = portbuf;
        argv[argc++] = (char *)"--bind";
        argv[argc++] = (char *)"127.0.0.1";
        argv[argc++] = (char *)"--save";
        argv[argc++] = (char *)"";
        argv[argc++] = (char *)"--appendonly";
        argv[argc++] = (char *)"no";
        argv[argc++] = (char *)"--dir";
        argv[argc++] = (char *)dir;
        for (char *tok = strtok(buf, " "); tok && argc < 38; tok = strtok(NULL, " ")) argv[argc++] = tok;
    }
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        if (detached) setsid();
        else prctl(PR_SET_PDEATHSIG, SIGKILL);
        execvp(argv[0], argv);
        _exit(127);
    }
    for (int i = 0; i < 400; i++) {
        int fd = flash_test_connect(port);
        if (fd >= 0) {
            close(fd);
            return pid;
        }
        if (waitpid(pid, NULL, WNOHANG) == pid) return -1;
        flash_test_sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

bool flash_test_redis_spawn(uint16_t *port, pid_t *pid, const char *dir, const char *extra) {
    for (int attempt = 0; attempt < 5; attempt++) {
        *port = flash_test_free_port();
        *pid = spawn_redis(*port, dir, extra, false);
        if (*pid > 0) return true;
    }
    return false;
}

bool flash_test_sentinel_start(uint16_t *port, pid_t *pid, const char *dir, const char *name, uint16_t master_port) {
    for (int attempt = 0; attempt < 5; attempt++) {
        char path[128], extra[160];
        *port = flash_test_free_port();
        snprintf(path, sizeof path, "%s/sentinel-%u.conf", dir, (unsigned)*port);
        FILE *f = fopen(path, "w");
        if (!f) return false;
        fprintf(f, "port %u\nbind 127.0.0.1\ndir %s\n"
                   "sentinel monitor %s 127.0.0.1 %u 1\n"
                   "sentinel down-after-milliseconds %s 1000\n"
                   "sentinel failover-timeout %s 5000\n",
                (unsigned)*port, dir, name, (unsigned)master_port, name, name);
        fclose(f);
        snprintf(extra, sizeof extra, "SENTINEL %s", path);
        *pid = spawn_redis(*port, dir, extra, false);
        if (*pid > 0) return true;
    }
    return false;
}

bool flash_test_cluster_wait_ok(const flash_test_cluster *c, int ms) {
    int64_t end = flash_test_now_ms() + ms;
    char out[4096];
    do {
        bool ok = true;
        for (int i = 0; i < c->n && ok; i++) {
            if (c->pids[i] <= 0) continue;
            flash_test_redis_cli(c->ports[i], out, sizeof out, "cluster info");
            ok = strstr(out, "cluster_state:ok") != NULL;
            /* a replica that never synced cannot take over: wait for its link */
            flash_test_redis_cli(c->ports[i], out, sizeof out, "info replication");
            if (ok && strstr(out, "role:slave")) ok = strstr(out, "master_link_status:up") != NULL;
        }
        if (ok) return true;
        flash_test_sleep_ms(50);
    } while (flash_test_now_ms() < end);
    return false;
}

static bool cluster_up(flash_test_cluster *c, int masters, int replicas, int node_timeout_ms, bool detached) {
    char args[1024], extra[256], out[8192];
    int n = masters * (1 + replicas), len;
    if (n > FLASH_TEST_CLUSTER_MAX) return false;
    c->n = 0;
    for (int i = 0; i < n; i++) {
        char sub[96];
        snprintf(sub, sizeof sub, "%s/n%d", c->dir, i);
        mkdir(sub, 0777);
        pid_t pid = -1;
        for (int attempt = 0; attempt < 5 && pid <= 0; attempt++) {
            /* the bus port too: by default port + 10000, past 65535 for
               an ephemeral port */
            snprintf(extra, sizeof extra,
                     "--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout %d --cluster-port %u",
                     node_timeout_ms, (unsigned)flash_test_free_port());
            c->ports[i] = flash_test_free_port();
            pid = spawn_redis(c->ports[i], sub, extra, detached);
        }
        if (pid <= 0) return false;
        c->pids[i] = pid;
        c->n++;
    }
    len = snprintf(args, sizeof args, "--cluster create");
    for (int i = 0; i < n; i++) len += snprintf(args + len, sizeof args - (size_t)len, " 127.0.0.1:%u", (unsigned)c->ports[i]);
    snprintf(args + len, sizeof args - (size_t)len, " --cluster-replicas %d --cluster-yes", replicas);
    if (flash_test_redis_cli(c->ports[0], out, sizeof out, "%s", args) != 0) {
        fprintf(stderr, "cluster create failed: %s\n", out);
        return false;
    }
    return flash_test_cluster_wait_ok(c, 10000);
}

bool flash_test_cluster_start(flash_test_cluster *c, int masters, int replicas_each, int node_timeout_ms) {
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "/tmp/flash-cluster-XXXXXX");
    if (!mkdtemp(c->dir)) return false;
    if (cluster_up(c, masters, replicas_each, node_timeout_ms, false)) return true;
    flash_test_cluster_stop(c);
    return false;
}

void flash_test_cluster_kill(flash_test_cluster *c, int i) {
    if (c->pids[i] > 0) {
        kill(c->pids[i], SIGKILL);
        waitpid(c->pids[i], NULL, 0);
        c->pids[i] = 0;
    }
}

void flash_test_cluster_stop(flash_test_cluster *c) {
    char cmd[128];
    for (int i = 0; i < c->n; i++) flash_test_cluster_kill(c, i);
    if (c->dir[0]) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", c->dir);
        if (system(cmd) != 0) {
        }
    }
    memset(c, 0, sizeof *c);
}

/* The shared cluster: state in /tmp/flash-shared-cluster-<runner>.{lock,state};
   a reaper process stops it when the runner is gone. */
static flash_test_cluster shared;
static bool shared_loaded;

static void reap_when_gone(pid_t runner, const flash_test_cluster *c, const char *state) {
    pid_t pid = fork();
    if (pid != 0) {
        if (pid > 0) waitpid(pid, NULL, 0);
        return;
    }
    setsid();
    if (fork() != 0) _exit(0); /* the reaper: orphaned, watched by nobody */
    for (int fd = 0; fd < 256; fd++) close(fd);
    while (kill(runner, 0) == 0 || errno == EPERM) sleep(1);
    for (int i = 0; i < c->n; i++)
        if (c->pids[i] > 0) kill(c->pids[i], SIGKILL);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", c->dir, state);
    if (system(cmd) != 0) {
    }
    _exit(0);
}

const flash_test_cluster *flash_test_cluster_shared(void) {
    char lock[96], state[96];
    pid_t runner = getppid();
    if (shared_loaded) return &shared;
    snprintf(lock, sizeof lock, "/tmp/flash-shared-cluster-%d.lock", (int)runner);
    snprintf(state, sizeof state, "/tmp/flash-shared-cluster-%d.state", (int)runner);
    int fd = open(lock, O_RDWR | O_CREAT, 0666);
    if (fd < 0) return NULL;
    flock(fd, LOCK_EX);
    FILE *f = fopen(state, "rb");
    if (f) {
        shared_loaded = fread(&shared, sizeof shared, 1, f) == 1;
        fclose(f);
    }
    if (!shared_loaded) {
        memset(&shared, 0, sizeof shared);
        snprintf(shared.dir, sizeof shared.dir, "/tmp/flash-cluster-XXXXXX");
        if (mkdtemp(shared.dir)) {
            bool up = cluster_up(&shared, 3, 0, 5000, true);
            reap_when_gone(runner, &shared, state); /* even when it failed: stops what started */
            if (up) {
                f = fopen(state, "wb");
                if (f) {
                    fwrite(&shared, sizeof shared, 1, f);
                    fclose(f);
                }
                shared_loaded = true;
            }
        }
    }
    flock(fd, LOCK_UN);
    close(fd);
    unlink(lock);
    return shared_loaded ? &shared : NULL;
}

/* ---- the key-renaming wrapper ---- */

typedef struct pfx {
    flash_cache inner;
    char tag[6];
} pfx;

typedef struct pfx_op {
    flash_cache_op op; /* to inner */
    flash_cache_op *outer;
    pfx *p;
    char *keys;
    flash_cache_item *items;
} pfx_op;

static void pfx_done(flash_cache_op *iop) {
    pfx_op *po = (pfx_op *)iop;
    flash_cache_op *outer = po->outer;
    for (size_t i = 0; i < outer->count; i++) {
        flash_cache_item *o = &outer->items[i], *n = &po->items[i];
        o->status = n->status;
        if (outer->code == FLASH_CACHE_GET) {
            o->value = n->value;
            o->value_len = n->value_len;
            o->flags = n->flags;
            o->cas = n->cas;
        }
        if (outer->code == FLASH_CACHE_INCR) o->number = n->number;
    }
    outer->status = iop->status;
    outer->round_trips = iop->round_trips;
    outer->priv[0] = NULL;
    outer->done(outer); /* values valid until the inner done returns: now */
    free(po->keys);
    free(po->items);
    free(po);
}

static void pfx_submit(void *self, flash_loop loop, flash_cache_op *op) {
    pfx *p = self;
    pfx_op *po = calloc(1, sizeof *po);
    size_t total = 0;
    cr_assert(po);
    for (size_t i = 0; i < op->count; i++) total += op->items[i].key ? op->items[i].key_len : 0;
    po->keys = malloc(total + 1);
    po->items = calloc(op->count + 1, sizeof *po->items);
    cr_assert(po->keys && po->items);
    char *k = po->keys;
    for (size_t i = 0; i < op->count; i++) {
        po->items[i] = op->items[i];
        if (op->items[i].key) {
            memcpy(k, op->items[i].key, op->items[i].key_len);
            if (op->items[i].key_len > 6 && memcmp(k, "flash:", 6) == 0) memcpy(k, p->tag, 5);
            po->items[i].key = k;
            k += op->items[i].key_len;
        }
    }
    po->outer = op;
    po->p = p;
    po->op.code = op->code;
    po->op.items = po->items;
    po->op.count = op->count;
    po->op.quiet = op->quiet;
    po->op.done = pfx_done;
    op->priv[0] = po;
    p->inner.vt->submit(p->inner.self, loop, &po->op);
}

static void pfx_cancel(void *self, flash_cache_op *op) {
    pfx *p = self;
    pfx_op *po = op->priv[0];
    if (!po) return;
    p->inner.vt->cancel(p->inner.self, &po->op);
    op->priv[0] = NULL;
    free(po->keys);
    free(po->items);
    free(po);
}

static size_t pfx_max_value(void *self) {
    pfx *p = self;
    return p->inner.vt->max_value(p->inner.self);
}

static void pfx_destroy(void *self) {
    pfx *p = self;
    flash_cache_destroy(p->inner);
    free(p);
}

static const flash_cache_vtable pfx_vt = {"prefixed", pfx_submit, pfx_cancel, pfx_max_value, pfx_destroy, 0};

flash_cache flash_test_prefixed(flash_cache inner) {
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    pfx *p = calloc(1, sizeof *p);
    unsigned v = (unsigned)getpid();
    cr_assert(p);
    p->inner = inner;
    for (int i = 4; i >= 0; i--, v /= 36) p->tag[i] = digits[v % 36];
    flash_cache c = {&pfx_vt, p};
    return c;
}
