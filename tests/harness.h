/* tests/harness.h — shared test helpers.

   FLASH_TEST(suite, name)  a Criterion test that fails when LeakSanitizer
                            finds a leak after its body (ASan build).
   flash_test_server_*      start real servers (memcached, redis) on free
                            loopback ports in temp dirs; stopped and removed by
                            flash_test_server_stop or at process exit.
*/
#ifndef FLASH_TEST_HARNESS_H
#define FLASH_TEST_HARNESS_H
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#if defined(__SANITIZE_ADDRESS__)
#define FLASH_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FLASH_TEST_ASAN 1
#endif
#endif

/* Fails the current test when LeakSanitizer reports a leak (ASan builds). */
void flash_test_check_leaks(void);

/* Suite init: a test still running after 20 s (a bug: something spins)
   aborts, reported as a crash, instead of hanging the run. (Criterion's own
   .timeout can hang its runner, Snaipe/Criterion#345, and leaks in it.) */
void flash_test_watchdog(void);

/* A Criterion test whose body is followed by a leak check, so that a leak
   counts as a failure of the test that leaked. Use instead of Test().
   FLASH_TEST_IN takes a suite name that is itself a macro (files compiled
   again under another suite name: tests/test_engine_*.c). */
#define FLASH__TEST_BODY(suite, name)                                        \
    static void flash_test_body_##suite##_##name(void);                      \
    Test(suite, name) {                                                      \
        flash_test_body_##suite##_##name();                                  \
        flash_test_check_leaks();                                            \
    }                                                                        \
    static void flash_test_body_##suite##_##name(void)
#define FLASH_TEST(suite, name) FLASH__TEST_BODY(suite, name)
#define FLASH_TEST_IN(suite, name) FLASH__TEST_EXPAND(suite, name)
#define FLASH__TEST_EXPAND(suite, name) FLASH__TEST_BODY(suite, name)
/* The same with Criterion options (.disabled = true, ...). */
#define FLASH_TEST_OPT(suite, name, ...)                                     \
    static void flash_test_body_##suite##_##name(void);                      \
    Test(suite, name, __VA_ARGS__) {                                         \
        flash_test_body_##suite##_##name();                                  \
        flash_test_check_leaks();                                            \
    }                                                                        \
    static void flash_test_body_##suite##_##name(void)

typedef struct flash_test_server {
    pid_t pid;
    uint16_t port;
    char dir[64];     /* temp dir, removed on stop */
    char kind[16];    /* "memcached", "redis" */
    char extra[128];  /* extra arguments the server was started with */
} flash_test_server;

/* A fake server on a thread, for replies no real server sends: it listens
   on a free loopback port and hands each connection to serve(fd, mode),
   mode being the next of modes[] (then default_mode), and closes it after. */
typedef struct flash_test_fake {
    int lfd;
    uint16_t port;
    pthread_t thread;
    void (*serve)(int fd, int mode);
    int modes[8];
    int nmodes, conns, default_mode;
    volatile int stop;
} flash_test_fake;
void flash_test_fake_start(flash_test_fake *f, void (*serve)(int fd, int mode), const int *modes, int n,
                           int default_mode);
void flash_test_fake_stop(flash_test_fake *f);
/* For serve functions: write everything (or give up on an error), and read
   until the peer closes. */
void flash_test_write_all(int fd, const char *p, size_t n);
void flash_test_drain_until_eof(int fd);

/* A free TCP port on 127.0.0.1 (bound and released; races are retried by
   the start functions). */
uint16_t flash_test_free_port(void);
/* A blocking TCP connection to 127.0.0.1:port (TCP_NODELAY), or -1. */
int flash_test_connect(uint16_t port);
/* CLOCK_MONOTONIC in ms, and a sleep that survives signals. */
int64_t flash_test_now_ms(void);
void flash_test_sleep_ms(int ms);
/* Start memcached; extra: more arguments ("-m 64 -I 2m") or NULL. Waits until
   it accepts connections. Returns false (with a Criterion log) on failure. */
bool flash_test_memcached_start(flash_test_server *s, const char *extra);
bool flash_test_redis_start(flash_test_server *s);
/* Restart on the same port (after stop), e.g. for outage tests. */
bool flash_test_server_restart(flash_test_server *s);
void flash_test_server_stop(flash_test_server *s);
/* Pause / resume the process (SIGSTOP / SIGCONT): a server that accepts but
   never answers. A pause returns once the stop has taken effect (false when
   it did not). */
bool flash_test_server_pause(flash_test_server *s, bool paused);
/* Send a text command and read one reply into buf (for `stats`). Returns the
   reply length or -1. Stops at "END\r\n" for memcached stats. */
int flash_test_memcached_command(const flash_test_server *s, const char *cmd, char *buf, size_t cap);
/* The value of one memcached `stats` counter, or -1. */
long long flash_test_memcached_stat(const flash_test_server *s, const char *name);

/* PostgreSQL ($FLASH_PG_BIN, else the newest /usr/lib/postgresql/N/bin): initdb into
   a temp dir (as user postgres, or nobody, when run as root), then postgres
   on a free 127.0.0.1 port, its unix socket in the temp dir, fsync off and
   log_statement=all logged to <dir>/postgres.log, wal_level=logical (with
   max_replication_slots and max_wal_senders 10). Waits until it answers.
   s->extra holds the libpq conninfo ("host=127.0.0.1 port=N user=postgres
   dbname=postgres"). Use the postgres functions below on it, not
   flash_test_server_restart / _stop. */
bool flash_test_postgres_start(flash_test_server *s);
/* Stop the server (fast shutdown), keeping its data: a database that is down. */
void flash_test_postgres_halt(flash_test_server *s);
/* Start it again on the same port and data (after halt). */
bool flash_test_postgres_restart(flash_test_server *s);
/* Stop and remove the temp dir. */
void flash_test_postgres_stop(flash_test_server *s);
/* How many lines of <dir>/postgres.log contain needle, or -1. */
long flash_test_postgres_log_count(const flash_test_server *s, const char *needle);

#endif
