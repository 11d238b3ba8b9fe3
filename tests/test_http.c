/* examples/http_server end to end: the built binary (build/examples/
   http_server, or $FLASH_HTTP_SERVER; `make examples` first) on a seeded
   SQLite file in a temp dir and a real memcached, driven with curl: JSON
   content, cold and warm cache, cache round trips per request from /stats,
   404 / 400 / 405 / 503, keep-alive, a clean shutdown. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>
#include <sqlite3.h>

#include "harness.h"

static flash_test_server mc;
static char dir[64], db[128];
static uint16_t port;
static pid_t server_pid;

static const char *server_binary(void) {
    const char *b = getenv("FLASH_HTTP_SERVER");
    return b && *b ? b : "build/examples/http_server";
}

static bool port_open(uint16_t p) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "curl -s -o /dev/null --max-time 1 http://127.0.0.1:%u/stats", p);
    return system(cmd) == 0;
}

static void setup(void) {
    alarm(60);
    const char *bin = server_binary();
    cr_assert(access(bin, X_OK) == 0, "%s is missing: build the examples first (make examples)", bin);
    cr_assert(flash_test_memcached_start(&mc, "-m 16"));
    snprintf(dir, sizeof dir, "/tmp/flash-http-XXXXXX");
    cr_assert(mkdtemp(dir));
    snprintf(db, sizeof db, "%s/events.db", dir);
    char mcarg[64], portarg[16], log[128];
    snprintf(mcarg, sizeof mcarg, "127.0.0.1:%u", mc.port);
    snprintf(log, sizeof log, "%s/server.log", dir);
    for (int attempt = 0; attempt < 5; attempt++) {
        port = flash_test_free_port();
        snprintf(portarg, sizeof portarg, "%u", port);
        server_pid = fork();
        cr_assert(server_pid >= 0);
        if (server_pid == 0) {
            int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            execl(bin, "http_server", "--sqlite", db, "--seed", "--memcached", mcarg, "--port", portarg, (char *)NULL);
            _exit(127);
        }
        for (int i = 0; i < 300; i++) { /* up to 3 s */
            if (port_open(port)) return;
            if (waitpid(server_pid, NULL, WNOHANG) == server_pid) break;
            usleep(10000);
        }
        kill(server_pid, SIGKILL);
        waitpid(server_pid, NULL, 0);
        server_pid = 0;
    }
    cr_assert_fail("http_server did not start (see %s)", log);
}

static void teardown(void) {
    if (server_pid > 0) {
        kill(server_pid, SIGKILL);
        waitpid(server_pid, NULL, 0);
        server_pid = 0;
    }
    if (mc.pid > 0) flash_test_server_stop(&mc);
    if (dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) {
        }
        dir[0] = 0;
    }
    alarm(0);
}
TestSuite(http, .init = setup, .fini = teardown);

/* curl: the status code, and the body into out. extra: more curl options. */
static int get(const char *path, const char *extra, char *out, size_t cap) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "curl -s --max-time 5 %s -w '\\n%%{http_code}' 'http://127.0.0.1:%u%s'",
             extra ? extra : "", port, path);
    FILE *p = popen(cmd, "r");
    cr_assert(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    pclose(p);
    char *nl = strrchr(out, '\n');
    cr_assert(nl, "no status from curl for %s: %s", path, out);
    *nl = 0;
    return atoi(nl + 1);
}

static long long stat_of(const char *json, const char *name) {
    char needle[64];
    snprintf(needle, sizeof needle, "\"%s\":", name);
    const char *p = strstr(json, needle);
    cr_assert(p, "no %s in %s", name, json);
    return atoll(p + strlen(needle));
}

typedef struct stats {
    long long rt, source_calls, hits, requests;
} stats;

static stats stats_now(void) {
    char body[4096];
    cr_assert_eq(get("/stats", NULL, body, sizeof body), 200);
    stats s = {stat_of(body, "cache_round_trips"), stat_of(body, "source_calls"), stat_of(body, "cache_hits"),
               stat_of(body, "event_requests")};
    return s;
}

static int count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) n++;
    return n;
}

/* The seed: event e has (e % 10) * 3 participants, users (e*7 + k*13) % 1000 + 1. */
FLASH_TEST(http, an_event_with_its_participants_cold_then_warm) {
    char body[16384], again[16384];
    stats s0 = stats_now();
    cr_assert_eq(get("/events/event3", NULL, body, sizeof body), 200, "%s", body);
    cr_assert(strstr(body, "{\"event\":{\"id\":3,\"slug\":\"event3\",\"title\":\"Event 3\"},\"participants\":["), "%s",
              body);
    cr_assert_eq(count(body, "\"username\""), 9, "%s", body);
    cr_assert(strstr(body, "{\"id\":22,\"username\":\"user22\",\"first_name\":\"Frances\"}"), "%s", body);
    stats s1 = stats_now();
    /* Cold: round trip 1 = the event + its participant list (both miss, two
       source calls: events and event_participants); round trip 2 = the 9
       users (miss, one source call). */
    cr_assert_eq(s1.rt - s0.rt, 2, "cold: %lld round trips", s1.rt - s0.rt);
    cr_assert_eq(s1.source_calls - s0.source_calls, 3);
    cr_assert_eq(s1.requests - s0.requests, 1);

    cr_assert_eq(get("/events/event3", NULL, again, sizeof again), 200);
    cr_assert_str_eq(again, body, "the warm answer is the same");
    stats s2 = stats_now();
    cr_assert_eq(s2.rt - s1.rt, 2, "warm: %lld round trips", s2.rt - s1.rt);
    cr_assert_eq(s2.source_calls - s1.source_calls, 0, "warm: no database");
    cr_assert_eq(s2.hits - s1.hits, 11, "event + list + 9 users");
    /* The keys are in the real memcached. */
    cr_assert_geq(flash_test_memcached_stat(&mc, "curr_items"), 11);
    cr_assert_geq(flash_test_memcached_stat(&mc, "get_hits"), 11);
}

FLASH_TEST(http, dependency_depth_sets_the_round_trips) {
    char body[16384];
    /* No participants: the users step never runs, 1 round trip. */
    stats s0 = stats_now();
    cr_assert_eq(get("/events/event10", NULL, body, sizeof body), 200);
    cr_assert_str_eq(body, "{\"event\":{\"id\":10,\"slug\":\"event10\",\"title\":\"Event 10\"},\"participants\":[]}");
    stats s1 = stats_now();
    cr_assert_eq(s1.rt - s0.rt, 1);
    /* An unknown slug: 404 after the first round trip. */
    cr_assert_eq(get("/events/no-such-event", NULL, body, sizeof body), 404, "%s", body);
    cr_assert(strstr(body, "\"error\":\"no such event\""), "%s", body);
    stats s2 = stats_now();
    cr_assert_eq(s2.rt - s1.rt, 1);
    /* ... and the not-found is cached: the second one has no source call. */
    cr_assert_eq(get("/events/no-such-event", NULL, body, sizeof body), 404);
    stats s3 = stats_now();
    cr_assert_eq(s3.source_calls - s2.source_calls, 0);
    /* Many events over one keep-alive connection (one curl, several URLs):
       2 round trips each (1 for event20). */
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "curl -s --max-time 5 -w '%%{http_code}\\n' -o /dev/null -o /dev/null -o /dev/null -o /dev/null "
             "http://127.0.0.1:%u/events/event1 http://127.0.0.1:%u/events/event2 "
             "http://127.0.0.1:%u/events/event20 http://127.0.0.1:%u/events/event9",
             port, port, port, port);
    FILE *p = popen(cmd, "r");
    cr_assert(p);
    size_t n = fread(body, 1, sizeof body - 1, p);
    body[n] = 0;
    pclose(p);
    cr_assert_str_eq(body, "200\n200\n200\n200\n");
    stats s4 = stats_now();
    cr_assert_eq(s4.rt - s3.rt, 7);
    cr_assert_eq(s4.requests - s3.requests, 4);
}

FLASH_TEST(http, bad_requests_get_clear_codes) {
    char body[4096];
    stats s0 = stats_now();
    cr_assert_eq(get("/events/bad%20slug", NULL, body, sizeof body), 400, "%s", body);
    cr_assert(strstr(body, "bad slug"), "%s", body);
    cr_assert_eq(get("/events/%27%3B%20DROP%20TABLE%20events%3B--", NULL, body, sizeof body), 400);
    cr_assert_eq(get("/events/", NULL, body, sizeof body), 400);
    cr_assert_eq(get("/events", NULL, body, sizeof body), 400);
    cr_assert_eq(get("/nowhere", NULL, body, sizeof body), 404);
    cr_assert(strstr(body, "no such route"), "%s", body);
    cr_assert_eq(get("/events/event1", "-X POST", body, sizeof body), 405);
    cr_assert_eq(get("/events/event1", "-H 'Content-Length: 5' --data-binary hello -X GET", body, sizeof body), 400);
    stats s1 = stats_now();
    cr_assert_eq(s1.rt - s0.rt, 0, "nothing reached the cache");
    /* Still serving. */
    cr_assert_eq(get("/events/event4", NULL, body, sizeof body), 200);
}

FLASH_TEST(http, a_failing_database_is_503_and_cached_events_still_serve) {
    char body[16384];
    cr_assert_eq(get("/events/event5", NULL, body, sizeof body), 200); /* now cached */
    sqlite3 *h;
    cr_assert_eq(sqlite3_open(db, &h), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(h, "DROP VIEW event_participants; DROP TABLE events", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(h);
    cr_assert_eq(get("/events/event6", NULL, body, sizeof body), 503, "%s", body);
    cr_assert(strstr(body, "no such table"), "%s", body);
    cr_assert_eq(get("/events/event5", NULL, body, sizeof body), 200, "from the cache: %s", body);
    char st[4096];
    cr_assert_eq(get("/stats", NULL, st, sizeof st), 200);
    cr_assert(strstr(st, "\"503\":1"), "%s", st);
}

FLASH_TEST(http, sigterm_shuts_down_cleanly) {
    char body[4096];
    cr_assert_eq(get("/events/event1", NULL, body, sizeof body), 200);
    kill(server_pid, SIGTERM);
    int status = 0;
    cr_assert_eq(waitpid(server_pid, &status, 0), server_pid);
    server_pid = 0;
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d", status);
}
