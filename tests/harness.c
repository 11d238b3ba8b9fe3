/* tests/harness.c — see harness.h. */
#define _GNU_SOURCE
#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <pwd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef FLASH_TEST_ASAN
#include <sanitizer/lsan_interface.h>
void flash_test_check_leaks(void) {
    if (__lsan_do_recoverable_leak_check()) cr_assert_fail("LeakSanitizer found leaks (report above)");
}
/* Backstop for tests written with plain Test(): a leak makes the worker
   crash, which fails the run. Workers only: Criterion's runner keeps
   bookkeeping of its own (test timeouts) that LeakSanitizer would report.
   A worker is a process Criterion started with its BXFI_* environment. */
__attribute__((destructor)) static void flash_test_leaks_at_exit(void) {
    extern char **environ;
    bool worker = false;
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, "BXFI_", 5) == 0) worker = true;
    if (worker && __lsan_do_recoverable_leak_check()) abort();
}
#else
void flash_test_check_leaks(void) {}
#endif

/* Servers this process started, by value (the test's structs may be on its
   stack): killed and their directories removed at exit, even when a test
   fails. */
typedef struct started_server {
    pid_t pid;
    char dir[64];
} started_server;
static started_server started[64];

static void kill_and_remove(pid_t pid, const char *dir) {
    if (pid > 0) {
        kill(pid, SIGCONT);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    if (dir && dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) { /* best effort */
        }
    }
}

static void stop_all(void) {
    for (int i = 0; i < 64; i++) {
        if (started[i].pid > 0) kill_and_remove(started[i].pid, started[i].dir);
        started[i].pid = 0;
    }
}

static void remember(const flash_test_server *s) {
    static bool hooked;
    if (!hooked) {
        atexit(stop_all);
        hooked = true;
    }
    for (int i = 0; i < 64; i++) {
        if (started[i].pid <= 0) {
            started[i].pid = s->pid;
            snprintf(started[i].dir, sizeof started[i].dir, "%s", s->dir);
            return;
        }
    }
}

static void forget(pid_t pid) {
    for (int i = 0; i < 64; i++)
        if (started[i].pid == pid) started[i].pid = 0;
}

static void flash_test_watchdog_fired(int sig) {
    static const char m[] = "watchdog: test still running after 20 s, aborting\n";
    (void)sig;
    (void)!write(2, m, sizeof m - 1);
    abort();
}

void flash_test_watchdog(void) {
    signal(SIGALRM, flash_test_watchdog_fired);
    alarm(20);
}

uint16_t flash_test_free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    uint16_t port = 0;
    if (fd < 0) return 0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

int flash_test_connect(uint16_t port) {
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0) return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

void flash_test_write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return;
        p += w;
        n -= (size_t)w;
    }
}

void flash_test_drain_until_eof(int fd) {
    char buf[4096];
    while (read(fd, buf, sizeof buf) > 0) {
    }
}

static void *fake_main(void *arg) {
    flash_test_fake *f = (flash_test_fake *)arg;
    for (;;) {
        int c = accept(f->lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR && !f->stop) continue;
            return NULL;
        }
        if (f->stop) {
            close(c);
            return NULL;
        }
        int mode = f->conns < f->nmodes ? f->modes[f->conns] : f->default_mode;
        f->conns++;
        f->serve(c, mode);
        close(c);
    }
}

void flash_test_fake_start(flash_test_fake *f, void (*serve)(int fd, int mode), const int *modes, int n,
                           int default_mode) {
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    int one = 1;
    memset(f, 0, sizeof *f);
    cr_assert_leq(n, 8);
    memcpy(f->modes, modes, (size_t)n * sizeof *modes);
    f->nmodes = n;
    f->default_mode = default_mode;
    f->serve = serve;
    f->lfd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(f->lfd, 0);
    setsockopt(f->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(f->lfd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(f->lfd, 16), 0);
    cr_assert_eq(getsockname(f->lfd, (struct sockaddr *)&a, &alen), 0);
    f->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

void flash_test_fake_stop(flash_test_fake *f) {
    f->stop = 1;
    shutdown(f->lfd, SHUT_RDWR);
    pthread_join(f->thread, NULL);
    close(f->lfd);
}

int64_t flash_test_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void flash_test_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) continue;
}

static bool spawn(flash_test_server *s) {
    char portbuf[16];
    char *argv[48];
    int argc = 0;
    char extra[sizeof s->extra];
    snprintf(portbuf, sizeof portbuf, "%u", s->port);
    if (strcmp(s->kind, "memcached") == 0) {
        argv[argc++] = (char *)"memcached";
        argv[argc++] = (char *)"-l";
        argv[argc++] = (char *)"127.0.0.1";
        argv[argc++] = (char *)"-p";
        argv[argc++] = portbuf;
        argv[argc++] = (char *)"-U";
        argv[argc++] = (char *)"0";
        argv[argc++] = (char *)"-t";
        argv[argc++] = (char *)"1";
        snprintf(extra, sizeof extra, "%s", s->extra);
        for (char *tok = strtok(extra, " "); tok && argc < 46; tok = strtok(NULL, " ")) argv[argc++] = tok;
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
        argv[argc++] = s->dir;
    }
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        /* memcached will not run as root: drop to nobody here, then ask to
           die with the test process (a uid change clears that request). */
        if (geteuid() == 0) {
            struct passwd *pw = getpwnam("nobody");
            if (!pw || setgroups(0, NULL) != 0 || setgid(pw->pw_gid) != 0 || setuid(pw->pw_uid) != 0) _exit(126);
        }
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1) _exit(125); /* the parent is already gone */
        execvp(argv[0], argv);
        _exit(127);
    }
    s->pid = pid;
    for (int i = 0; i < 400; i++) { /* up to 4 s */
        int fd = flash_test_connect(s->port);
        if (fd >= 0) {
            close(fd);
            return true;
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            s->pid = 0;
            return false;
        }
        flash_test_sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    s->pid = 0;
    return false;
}

static bool start(flash_test_server *s, const char *kind, const char *extra) {
    memset(s, 0, sizeof *s);
    snprintf(s->kind, sizeof s->kind, "%s", kind);
    snprintf(s->extra, sizeof s->extra, "%s", extra ? extra : "");
    snprintf(s->dir, sizeof s->dir, "/tmp/flash-test-XXXXXX");
    if (!mkdtemp(s->dir)) return false;
    chmod(s->dir, 0777);
    for (int attempt = 0; attempt < 5; attempt++) {
        s->port = flash_test_free_port();
        if (s->port && spawn(s)) {
            remember(s);
            return true;
        }
    }
    rmdir(s->dir);
    cr_log_error("could not start %s", kind);
    return false;
}

bool flash_test_memcached_start(flash_test_server *s, const char *extra) { return start(s, "memcached", extra); }
bool flash_test_redis_start(flash_test_server *s) { return start(s, "redis", NULL); }

bool flash_test_server_restart(flash_test_server *s) {
    if (s->pid > 0) {
        forget(s->pid);
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
    for (int attempt = 0; attempt < 50; attempt++) { /* the port may linger briefly */
        if (spawn(s)) {
            remember(s);
            return true;
        }
        flash_test_sleep_ms(20);
    }
    return false;
}

void flash_test_server_stop(flash_test_server *s) {
    forget(s->pid);
    kill_and_remove(s->pid, s->dir);
    s->pid = 0;
    s->dir[0] = 0;
}

/* Returns once the server has really stopped (or resumed): a stop signal
   is delivered asynchronously, and a "paused" server that still answers
   makes a timeout test flaky. */
bool flash_test_server_pause(flash_test_server *s, bool paused) {
    int st = 0;
    if (s->pid <= 0) return false;
    if (kill(s->pid, paused ? SIGSTOP : SIGCONT) != 0) return false;
    if (!paused) {
        (void)waitpid(s->pid, &st, WCONTINUED | WNOHANG);
        return true;
    }
    return waitpid(s->pid, &st, WUNTRACED) == s->pid && WIFSTOPPED(st);
}

int flash_test_memcached_command(const flash_test_server *s, const char *cmd, char *buf, size_t cap) {
    int fd = flash_test_connect(s->port);
    size_t used = 0;
    struct timeval tv = {2, 0}; /* a stopped server must not hang the test */
    if (fd < 0 || cap == 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (write(fd, cmd, strlen(cmd)) < 0) {
        close(fd);
        return -1;
    }
    for (;;) {
        ssize_t n = read(fd, buf + used, cap - 1 - used);
        if (n <= 0) break;
        used += (size_t)n;
        buf[used] = 0;
        if (strstr(buf, "END\r\n") || strstr(buf, "ERROR") || used + 1 >= cap) break;
        if (used >= 2 && strcmp(buf + used - 2, "\r\n") == 0 && strncmp(cmd, "stats", 5) != 0) break;
    }
    buf[used] = 0;
    close(fd);
    return (int)used;
}

long long flash_test_memcached_stat(const flash_test_server *s, const char *name) {
    char buf[16384], needle[96];
    if (flash_test_memcached_command(s, "stats\r\n", buf, sizeof buf) <= 0) return -1;
    snprintf(needle, sizeof needle, "STAT %s ", name);
    char *p = strstr(buf, needle);
    return p ? atoll(p + strlen(needle)) : -1;
}

/* ---- PostgreSQL --------------------------------------------------------- */

#include <dirent.h>
#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

/* $FLASH_PG_BIN, else the newest /usr/lib/postgresql/<version>/bin. */
static const char *pg_bin(void) {
    static char found[96];
    const char *b = getenv("FLASH_PG_BIN");
    if (b && *b) return b;
    if (!found[0]) {
        int best = 0;
        DIR *d = opendir("/usr/lib/postgresql");
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            char path[320];
            int v = atoi(e->d_name);
            snprintf(path, sizeof path, "/usr/lib/postgresql/%s/bin/initdb", e->d_name);
            if (v > best && access(path, X_OK) == 0) {
                best = v;
                snprintf(found, sizeof found, "/usr/lib/postgresql/%d/bin", v);
            }
        }
        if (d) closedir(d);
        if (!found[0]) snprintf(found, sizeof found, "/usr/lib/postgresql/15/bin");
    }
    return found;
}

/* In a child: give up root for postgres (or nobody). */
static bool pg_drop_root(void) {
    if (geteuid() != 0) return true;
    struct passwd *pw = getpwnam("postgres");
    if (!pw) pw = getpwnam("nobody");
    return pw && setgroups(0, NULL) == 0 && setgid(pw->pw_gid) == 0 && setuid(pw->pw_uid) == 0;
}

static void pg_chown_dir(const char *dir) {
    if (geteuid() != 0) return;
    struct passwd *pw = getpwnam("postgres");
    if (!pw) pw = getpwnam("nobody");
    if (pw && chown(dir, pw->pw_uid, pw->pw_gid) != 0) { /* initdb will say */
    }
}

static bool pg_initdb(const flash_test_server *s) {
    char data[96], log[96], exe[160];
    snprintf(data, sizeof data, "%s/data", s->dir);
    snprintf(log, sizeof log, "%s/initdb.log", s->dir);
    snprintf(exe, sizeof exe, "%s/initdb", pg_bin());
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        if (!pg_drop_root()) _exit(126);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        execl(exe, "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C",
              (char *)NULL);
        _exit(127);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return false;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static bool pg_spawn(flash_test_server *s) {
    char data[96], log[96], exe[160], port[16];
    snprintf(data, sizeof data, "%s/data", s->dir);
    snprintf(log, sizeof log, "%s/postgres.log", s->dir);
    snprintf(exe, sizeof exe, "%s/postgres", pg_bin());
    snprintf(port, sizeof port, "%u", s->port);
    snprintf(s->extra, sizeof s->extra, "host=127.0.0.1 port=%u user=postgres dbname=postgres", s->port);
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) dup2(devnull, 0);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        setsid(); /* its own group: a stop can reach the backends too */
        if (!pg_drop_root()) _exit(126);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1) _exit(125);
        execl(exe, "postgres", "-D", data, "-p", port, "-k", s->dir, "-c", "listen_addresses=127.0.0.1", "-c",
              "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "log_statement=all",
              "-c", "max_connections=30", "-c", "shared_buffers=16MB", "-c", "logging_collector=off",
              /* logical decoding for the change stream (tests/test_changes.c) */
              "-c", "wal_level=logical", "-c", "max_replication_slots=10", "-c", "max_wal_senders=10",
              (char *)NULL);
        _exit(127);
    }
    s->pid = pid;
    for (int i = 0; i < 1000; i++) { /* up to 10 s */
        if (PQping(s->extra) == PQPING_OK) return true;
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            s->pid = 0;
            return false;
        }
        flash_test_sleep_ms(10);
    }
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    s->pid = 0;
    return false;
}

bool flash_test_postgres_start(flash_test_server *s) {
    memset(s, 0, sizeof *s);
    snprintf(s->kind, sizeof s->kind, "postgres");
    snprintf(s->dir, sizeof s->dir, "/tmp/flash-test-XXXXXX");
    if (!mkdtemp(s->dir)) return false;
    pg_chown_dir(s->dir);
    if (!pg_initdb(s)) {
        cr_log_error("initdb failed (see %s/initdb.log)", s->dir);
        kill_and_remove(0, s->dir);
        s->dir[0] = 0;
        return false;
    }
    for (int attempt = 0; attempt < 5; attempt++) {
        s->port = flash_test_free_port();
        if (s->port && pg_spawn(s)) {
            remember(s);
            return true;
        }
    }
    cr_log_error("could not start postgres (see %s/postgres.log)", s->dir);
    kill_and_remove(0, s->dir);
    s->dir[0] = 0;
    return false;
}

void flash_test_postgres_halt(flash_test_server *s) {
    if (s->pid <= 0) return;
    forget(s->pid);
    kill(s->pid, SIGCONT);
    kill(s->pid, SIGINT); /* fast shutdown: backends end, clients see it */
    for (int i = 0; i < 1000; i++) { /* up to 10 s */
        if (waitpid(s->pid, NULL, WNOHANG) == s->pid) {
            s->pid = 0;
            return;
        }
        flash_test_sleep_ms(10);
    }
    kill(-s->pid, SIGKILL);
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    s->pid = 0;
}

bool flash_test_postgres_restart(flash_test_server *s) {
    if (s->pid > 0) flash_test_postgres_halt(s);
    for (int attempt = 0; attempt < 50; attempt++) { /* the port may linger briefly */
        if (pg_spawn(s)) {
            remember(s);
            return true;
        }
        flash_test_sleep_ms(20);
    }
    return false;
}

void flash_test_postgres_stop(flash_test_server *s) {
    flash_test_postgres_halt(s);
    kill_and_remove(0, s->dir);
    s->dir[0] = 0;
}

long flash_test_postgres_log_count(const flash_test_server *s, const char *needle) {
    char path[96], line[4096];
    long n = 0;
    snprintf(path, sizeof path, "%s/postgres.log", s->dir);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle)) n++;
    fclose(f);
    return n;
}
