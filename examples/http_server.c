/* examples/http_server.c — the seed's Django view as a small C HTTP service.

   GET /events/<slug>   {"event": {...}, "participants": [{user}, ...]}
   GET /stats           cache round trips, hits, source calls ... as JSON

   One flash context per request in flight (from a pool, reset when the
   request ends: DataLoadersFactory.reset()), on a libuv loop, and one task
   per request (flash_spawn in the request callback): the task awaits, in
   straight-line code,

     gather(EventCacheOnSlug(slug).resolve_or_404(),     one cache round trip
            EventParticipants(slug).resolve())
     -> gather(User.get(id) for each participant)          one more

   and writes the response.

   so 2 cache round trips per request (1 when the event has no participants
   or does not exist), whether the cache is warm or cold: on a miss, each
   class goes to the database in one statement and is written back.

   Backends, by flag or environment variable:
     --port N          FLASH_HTTP_PORT   default 8080 (on 127.0.0.1; --host to change)
     --memcached H:P[,H:P...]  FLASH_MEMCACHED   default: the in-process memory cache
     --sqlite FILE     FLASH_SQLITE      default flash_example.db
     --pg CONNINFO     FLASH_PG          PostgreSQL instead of SQLite
     --pg-connections N                  default 4
     --seed            create and fill the tables first (users, events,
                       participants, and the view event_participants)

       make && ./build/examples/http_server --seed &
       curl -s localhost:8080/events/event7
       curl -s localhost:8080/stats

   Status codes: 200; 404 unknown slug or route; 400 bad slug or request;
   405 not GET; 503 the database or the cache failed; 500 anything else.
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/loop/libuv.h"
#include "backends/cache/memory.h"
#include "backends/cache/memcached.h"
#include "backends/source/sqlite.h"
#include "backends/source/postgres.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- models ---- */

#define USER_FIELDS(F) F(I64, id) F(STR, username) F(STR, first_name)
FLASH_MODEL_OPT(User, USER_FIELDS, .table = "users")
FLASH_GET_KEYS(User, (id))

#define EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL_OPT(Event, EVENT_FIELDS, .table = "events")
FLASH_INSTANCE_CACHE(EventCacheOnSlug, Event, (slug))

/* Participants with their event's slug (a view joining participants and
   events), so that the participants of /events/<slug> are asked in the same
   round trip as the event itself. */
#define PARTICIPANT_FIELDS(F) F(I64, id) F(I64, user) F(I64, event) F(STR, event_slug)
FLASH_MODEL_OPT(Participant, PARTICIPANT_FIELDS, .table = "event_participants")
/* Ordered by user id (the SQL sources push the ORDER BY down; the cached
   list keeps the order). */
FLASH_LIST_CACHE_OPT(EventParticipants, Participant, (event_slug), .order_by = "user")
/* participant.user through User's get cache (cached_foreignkeys). */
FLASH_FOREIGN_KEY(Participant, user, User, id)

/* ---- replies are built in a flash_strbuf ---- */

static void put_json_str(flash_strbuf *b, const char *s) {
    if (!s) {
        flash_strbuf_puts(b, "null");
        return;
    }
    flash_strbuf_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            flash_strbuf_put(b, e, 2);
        } else if (c < 0x20) {
            flash_strbuf_printf(b, "\\u%04x", c);
        } else {
            flash_strbuf_put(b, s, 1);
        }
    }
    flash_strbuf_put(b, "\"", 1);
}

/* ---- server state ---- */

static uv_loop_t *loop;
static flash_libuv uv; /* flash's adapter on loop */
static uv_tcp_t server;
static uv_signal_t sigint, sigterm;
static flash_cache cache;
static flash_source source;
static flash_sqlite *sqlite_src;
static sqlite3 *sqlite_db;
static flash_pg *pg_src;

enum { POOL_MAX = 1024 };
static flash_ctx *pool[POOL_MAX];   /* every context made */
static flash_ctx *idle[POOL_MAX];   /* the free ones */
static size_t npool, nidle;

static struct {
    uint64_t requests, ok, not_found, bad, unavailable, failed;
} counters;

static flash_ctx *ctx_get(void) {
    if (nidle) return idle[--nidle];
    if (npool == POOL_MAX) return NULL;
    flash_desc d;
    memset(&d, 0, sizeof d);
    d.cache = cache;
    flash_ctx *ctx = flash_ctx_create(&d);
    if (!ctx) return NULL;
    if (flash_libuv_attach(ctx, &uv) || flash_ctx_set_source(ctx, NULL, source)) {
        flash_ctx_destroy(ctx);
        return NULL;
    }
    pool[npool++] = ctx;
    return ctx;
}

/* The request is over: its memory goes, the context serves the next one. */
static void ctx_put(flash_ctx *ctx) {
    flash_ctx_reset(ctx);
    idle[nidle++] = ctx;
}

/* ---- connections ---- */

typedef struct client {
    uv_tcp_t tcp;
    struct client *prev, *next; /* every client, for the shutdown */
    char in[8192];
    size_t len;
    bool busy;       /* a request is being answered */
    bool keepalive;  /* of the request being answered */
    bool reading;
    bool closing;
    int refs;        /* the handle, and a request in flight */
} client;

static client *clients;

/* A request in flight: lives in its context's arena. */
typedef struct request {
    client *c;
    const char *slug;
} request;

static void client_unref(client *c) {
    if (--c->refs) return;
    if (c->prev) c->prev->next = c->next;
    else clients = c->next;
    if (c->next) c->next->prev = c->prev;
    free(c);
}
static void on_closed(uv_handle_t *h) { client_unref((client *)h->data); }
static void client_close(client *c) {
    if (c->closing) return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void process(client *c);
static void start_reading(client *c);
static void stop_reading(client *c);

typedef struct wreq {
    uv_write_t w;
    client *c;
    char *data;
} wreq;

static void on_written(uv_write_t *w, int status) {
    wreq *r = (wreq *)w->data;
    client *c = r->c;
    free(r->data);
    free(r);
    c->busy = false;
    if (status < 0 || !c->keepalive) client_close(c);
    else if (!c->closing) process(c); /* a pipelined request, or read more */
    client_unref(c);
}

static const char *reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Internal Server Error";
    }
}

/* Send a response (body: a JSON document) and, after it, go on. */
static void respond(client *c, int status, const char *body, size_t len) {
    if (c->closing) {
        c->busy = false;
        return;
    }
    flash_strbuf b = {0};
    flash_strbuf_printf(&b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: %s\r\n\r\n",
         status, reason(status), len, c->keepalive ? "keep-alive" : "close");
    flash_strbuf_put(&b, body, len);
    wreq *r = calloc(1, sizeof *r);
    if (b.oom || !r) {
        free(b.data);
        free(r);
        c->busy = false;
        client_close(c);
        return;
    }
    r->c = c;
    r->data = b.data;
    r->w.data = r;
    c->refs++;
    uv_buf_t ub = uv_buf_init(b.data, (unsigned)b.len);
    if (uv_write(&r->w, (uv_stream_t *)&c->tcp, &ub, 1, on_written) != 0) {
        free(b.data);
        free(r);
        c->refs--;
        c->busy = false;
        client_close(c);
    }
}

static void respond_error(client *c, int status, const char *error, const char *detail) {
    flash_strbuf b = {0};
    flash_strbuf_puts(&b, "{\"error\":");
    put_json_str(&b, error);
    if (detail && *detail) {
        flash_strbuf_puts(&b, ",\"detail\":");
        put_json_str(&b, detail);
    }
    flash_strbuf_puts(&b, "}");
    if (status == 400 || status == 405 || status == 431) counters.bad++;
    respond(c, status, b.oom ? "{}" : b.data, b.oom ? 2 : b.len);
    free(b.data);
}

/* ---- GET /events/<slug> ---- */

static int by_id(const void *a, const void *b) {
    const User *x = *(const User *const *)a, *y = *(const User *const *)b;
    if (!x || !y) return (x == NULL) - (y == NULL); /* missing users last */
    return (x->id > y->id) - (x->id < y->id);
}

/* The event, its participants' users: the JSON document, in the arena. */
static int render(flash_ctx *ctx, const Event *e, User **users, size_t n, const char **json) {
    flash_strbuf b = {0};
    size_t i, shown = 0;
    if (n) qsort(users, n, sizeof *users, by_id);
    flash_strbuf_printf(&b, "{\"event\":{\"id\":%lld,\"slug\":", (long long)e->id);
    put_json_str(&b, e->slug);
    flash_strbuf_puts(&b, ",\"title\":");
    put_json_str(&b, e->title);
    flash_strbuf_puts(&b, "},\"participants\":[");
    for (i = 0; i < n; i++) {
        if (!users[i]) continue; /* a participant whose user is gone */
        flash_strbuf_printf(&b, "%s{\"id\":%lld,\"username\":", shown++ ? "," : "", (long long)users[i]->id);
        put_json_str(&b, users[i]->username);
        flash_strbuf_puts(&b, ",\"first_name\":");
        put_json_str(&b, users[i]->first_name);
        flash_strbuf_puts(&b, "}");
    }
    flash_strbuf_puts(&b, "]}");
    *json = b.oom ? NULL : flash_strdup(ctx, b.data);
    free(b.data);
    return *json ? 0 : FLASH_ENOMEM;
}

/* get_data, straight-line: the awaits suspend this request's task only, and
   every request's task asking in the same tick joins the same batch.

       event, parts = await gather(EventCacheOnSlug(slug).resolve_async_or_404(),
                                   EventParticipants(slug).resolve_async())   round trip 1
       users = await gather(*[p.user for p in parts])  (cached foreign keys)    round trip 2 */
static int get_data(flash_ctx *ctx, const char *slug, const char **json, const char **message) {
    flash_promise *both[2] = {EventCacheOnSlug_resolve_async_or_404(ctx, slug),
                              EventParticipants_resolve_async(ctx, slug)};
    flash_promise *g = flash_gather(ctx, 2, both);
    void *v;
    int rc = flash_await(ctx, g, &v);
    if (rc) {
        *message = flash_promise_message(g);
        return rc;
    }
    const Event *e = ((Event **)v)[0];
    const flash_list *parts = ((flash_list **)v)[1];
    User **users = NULL;
    if (parts->count) {
        flash_promise **ps = (flash_promise **)flash_alloc(ctx, parts->count * sizeof *ps);
        if (!ps) return FLASH_ENOMEM;
        for (size_t i = 0; i < parts->count; i++)
            ps[i] = Participant_user_async_or_none(ctx, (const Participant *)parts->items[i]);
        g = flash_gather(ctx, parts->count, ps);
        if ((rc = flash_await(ctx, g, &v)) != 0) {
            *message = flash_promise_message(g);
            return rc;
        }
        users = (User **)v;
    }
    return render(ctx, e, users, parts->count, json);
}

/* One task per request: the queries, then the response. */
static int handle_request(flash_ctx *ctx, void *arg, void **result) {
    request *r = (request *)arg; /* in the arena */
    client *c = r->c;
    const char *json = NULL, *msg = NULL;
    int code = get_data(ctx, r->slug, &json, &msg);
    (void)result;
    if (code == FLASH_ECANCELED) return code; /* shutting down: the context is going */
    if (code == 0) {
        counters.ok++;
        respond(c, 200, json, strlen(json));
    } else if (code == FLASH_E404 || code == FLASH_ENOTFOUND) {
        counters.not_found++;
        respond_error(c, 404, "no such event", r->slug);
    } else if (code == FLASH_ESOURCE || code == FLASH_ETIMEDOUT || code == FLASH_EBACKEND) {
        counters.unavailable++;
        respond_error(c, 503, flash_strerror(code), msg);
    } else {
        counters.failed++;
        respond_error(c, 500, flash_strerror(code), msg);
    }
    return 0;
}

/* The task returned (its response is on its way): the context serves the
   next request. Runs from the context's queue, after the task's stack is
   free. */
static void finished(flash_ctx *ctx, flash_promise *p, void *arg) {
    (void)p;
    client_unref((client *)arg);
    ctx_put(ctx);
}

static bool good_slug(const char *s, size_t n) {
    if (n == 0 || n > 100) return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
              ch == '_'))
            return false;
    }
    return true;
}

static void serve_event(client *c, const char *slug, size_t n) {
    flash_ctx *ctx;
    request *r;
    if (!good_slug(slug, n)) {
        respond_error(c, 400, "bad slug", "letters, digits, '-' and '_', 1 to 100 of them");
        return;
    }
    ctx = ctx_get();
    r = ctx ? (request *)flash_alloc(ctx, sizeof *r) : NULL;
    if (!r) {
        if (ctx) ctx_put(ctx);
        counters.unavailable++;
        respond_error(c, 503, "busy", "no context free");
        return;
    }
    r->c = c;
    r->slug = flash_sprintf(ctx, "%.*s", (int)n, slug);
    c->refs++;
    flash_promise *p = r->slug ? flash_spawn(ctx, handle_request, r) : NULL; /* runs to its first await */
    if (!p || flash_promise_state(p) == FLASH_REJECTED || flash_on_settle(ctx, p, finished, c) != 0) {
        int code = p ? flash_promise_error(p) : FLASH_ENOMEM;
        counters.failed++;
        respond_error(c, 500, flash_strerror(code ? code : FLASH_ENOMEM), "cannot start the request's task");
        client_unref(c); /* last: the response needs c */
        ctx_put(ctx);
    }
}

static void serve_stats(client *c) {
    flash_stats t;
    memset(&t, 0, sizeof t);
    for (size_t i = 0; i < npool; i++) {
        flash_stats s = flash_ctx_stats(pool[i]);
        t.loads += s.loads, t.memo_hits += s.memo_hits, t.cache_round_trips += s.cache_round_trips;
        t.cache_keys += s.cache_keys, t.cache_hits += s.cache_hits, t.cache_misses += s.cache_misses;
        t.cache_errors += s.cache_errors, t.source_calls += s.source_calls, t.source_keys += s.source_keys;
        t.source_rows += s.source_rows, t.fills += s.fills, t.fills_skipped += s.fills_skipped;
    }
    uint64_t events = counters.ok + counters.not_found + counters.unavailable + counters.failed;
    flash_strbuf b = {0};
    flash_strbuf_printf(&b, "{\"requests\":%llu,\"event_requests\":%llu,", (unsigned long long)counters.requests,
         (unsigned long long)events);
    flash_strbuf_printf(&b, "\"status\":{\"200\":%llu,\"404\":%llu,\"4xx\":%llu,\"503\":%llu,\"500\":%llu},",
         (unsigned long long)counters.ok, (unsigned long long)counters.not_found, (unsigned long long)counters.bad,
         (unsigned long long)counters.unavailable, (unsigned long long)counters.failed);
    flash_strbuf_printf(&b, "\"cache_round_trips\":%llu,\"cache_round_trips_per_request\":%.3f,",
         (unsigned long long)t.cache_round_trips, events ? (double)t.cache_round_trips / (double)events : 0.0);
    flash_strbuf_printf(&b, "\"cache_keys\":%llu,\"cache_hits\":%llu,\"cache_misses\":%llu,\"cache_errors\":%llu,",
         (unsigned long long)t.cache_keys, (unsigned long long)t.cache_hits, (unsigned long long)t.cache_misses,
         (unsigned long long)t.cache_errors);
    flash_strbuf_printf(&b, "\"source_calls\":%llu,\"source_keys\":%llu,\"source_rows\":%llu,\"fills\":%llu,",
         (unsigned long long)t.source_calls, (unsigned long long)t.source_keys, (unsigned long long)t.source_rows,
         (unsigned long long)t.fills);
    flash_strbuf_printf(&b, "\"loads\":%llu,\"memo_hits\":%llu,\"contexts\":%zu,\"cache\":\"%s\",\"source\":\"%s\"}",
         (unsigned long long)t.loads, (unsigned long long)t.memo_hits, npool, cache.vt->name, source.vt->name);
    respond(c, 200, b.oom ? "{}" : b.data, b.oom ? 2 : b.len);
    free(b.data);
}

/* ---- HTTP/1.1 parsing ---- */

/* The value of header name (case-insensitive), or NULL; it ends at "\r\n". */
static const char *header(const char *head, const char *name) {
    size_t nl = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p && p[2]; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            line += nl + 1;
            while (*line == ' ' || *line == '\t') line++;
            return line;
        }
    }
    return NULL;
}

/* Does header name's value contain token (case-insensitive)? */
static bool header_has(const char *head, const char *name, const char *token) {
    const char *v = header(head, name);
    size_t tl = strlen(token);
    for (; v && *v && *v != '\r'; v++)
        if (strncasecmp(v, token, tl) == 0) return true;
    return false;
}

/* Take one complete request from c->in, if there is one, and answer it. */
static void process(client *c) {
    char *end;
    size_t hlen;
    if (c->busy || c->closing) return;
    c->in[c->len < sizeof c->in ? c->len : sizeof c->in - 1] = 0;
    end = c->len ? strstr(c->in, "\r\n\r\n") : NULL;
    if (!end) {
        if (c->len >= sizeof c->in - 1) {
            c->busy = true;
            c->keepalive = false;
            respond_error(c, 431, "request too large", NULL);
            return;
        }
        start_reading(c);
        return;
    }
    hlen = (size_t)(end - c->in) + 4;
    stop_reading(c); /* one request at a time */
    c->busy = true;
    counters.requests++;
    {
        char head[sizeof c->in];
        memcpy(head, c->in, hlen);
        head[hlen] = 0;
        memmove(c->in, c->in + hlen, c->len - hlen);
        c->len -= hlen;
        char *sp1 = strchr(head, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
        char *eol = strstr(head, "\r\n");
        if (!sp1 || !sp2 || sp2 > eol || strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
            c->keepalive = false;
            respond_error(c, 400, "bad request line", NULL);
            return;
        }
        bool http10 = strncmp(sp2 + 1, "HTTP/1.0", 8) == 0;
        const char *cl = header(head, "Content-Length");
        c->keepalive = http10 ? header_has(head, "Connection", "keep-alive") : !header_has(head, "Connection", "close");
        if (header(head, "Transfer-Encoding") || (cl && atol(cl) != 0)) {
            c->keepalive = false; /* no bodies here: do not try to find the next request */
            respond_error(c, 400, "unexpected request body", NULL);
            return;
        }
        const char *path = sp1 + 1;
        size_t plen = (size_t)(sp2 - path);
        const char *q = memchr(path, '?', plen);
        if (q) plen = (size_t)(q - path);
        if ((size_t)(sp1 - head) != 3 || strncmp(head, "GET", 3) != 0) {
            respond_error(c, 405, "only GET", NULL);
        } else if (plen >= 8 && strncmp(path, "/events/", 8) == 0) {
            serve_event(c, path + 8, plen - 8);
        } else if (plen == 6 && strncmp(path, "/stats", 6) == 0) {
            serve_stats(c);
        } else if (plen == 7 && strncmp(path, "/events", 7) == 0) {
            respond_error(c, 400, "missing slug", "GET /events/<slug>");
        } else {
            respond_error(c, 404, "no such route", "GET /events/<slug> or /stats");
        }
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
    client *c = (client *)h->data;
    (void)suggested;
    *b = uv_buf_init(c->in + c->len, (unsigned)(sizeof c->in - 1 - c->len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    client *c = (client *)s->data;
    (void)b;
    if (n < 0) {
        stop_reading(c);
        client_close(c);
        return;
    }
    c->len += (size_t)n;
    process(c);
}

static void start_reading(client *c) {
    if (c->closing || c->reading) return;
    c->reading = true;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) client_close(c);
}

static void stop_reading(client *c) {
    if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void on_connection(uv_stream_t *srv, int status) {
    client *c;
    if (status < 0) return;
    c = calloc(1, sizeof *c);
    if (!c) return;
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    c->refs = 1;
    c->next = clients;
    if (clients) clients->prev = c;
    clients = c;
    if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0) {
        client_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    start_reading(c);
}

/* ---- seeding ---- */

static const char *const first_names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John"};

/* Users 1..1000, events 1..100 (slug event<i>), event e has (e % 10) * 3
   participants (none for event10, event20, ...), and the view. */
static char *seed_sql(bool postgres) {
    flash_strbuf b = {0};
    if (postgres) flash_strbuf_puts(&b, "SET client_min_messages = warning;");
    flash_strbuf_puts(&b, "DROP VIEW IF EXISTS event_participants; DROP TABLE IF EXISTS participants;"
              "DROP TABLE IF EXISTS events; DROP TABLE IF EXISTS users;"
              "CREATE TABLE users (id BIGINT PRIMARY KEY, username TEXT NOT NULL UNIQUE, first_name TEXT);"
              "CREATE TABLE events (id BIGINT PRIMARY KEY, slug TEXT NOT NULL UNIQUE, title TEXT NOT NULL);"
              "CREATE TABLE participants (id BIGINT PRIMARY KEY, \"user\" BIGINT NOT NULL, event BIGINT NOT NULL);"
              "CREATE INDEX participants_event ON participants (event);"
              "CREATE VIEW event_participants AS SELECT p.id, p.\"user\", p.event, e.slug AS event_slug"
              " FROM participants p JOIN events e ON e.id = p.event;");
    flash_strbuf_puts(&b, "BEGIN;");
    flash_strbuf_puts(&b, "INSERT INTO users VALUES ");
    for (int i = 1; i <= 1000; i++)
        flash_strbuf_printf(&b, "%s(%d,'user%d','%s')", i > 1 ? "," : "", i, i, first_names[i % 8]);
    flash_strbuf_puts(&b, "; INSERT INTO events VALUES ");
    for (int i = 1; i <= 100; i++) flash_strbuf_printf(&b, "%s(%d,'event%d','Event %d')", i > 1 ? "," : "", i, i, i);
    flash_strbuf_puts(&b, "; INSERT INTO participants VALUES ");
    int id = 0;
    for (int e = 1; e <= 100; e++)
        for (int k = 0; k < (e % 10) * 3; k++) {
            id++;
            flash_strbuf_printf(&b, "%s(%d,%d,%d)", id > 1 ? "," : "", id, (e * 7 + k * 13) % 1000 + 1, e);
        }
    flash_strbuf_puts(&b, "; COMMIT;");
    if (b.oom) {
        free(b.data);
        return NULL;
    }
    return b.data;
}

static int seed_sqlite(void) {
    char *sql = seed_sql(false), *err = NULL;
    if (!sql || sqlite3_exec(sqlite_db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "seed: %s\n", err ? err : "out of memory");
        sqlite3_free(err);
        free(sql);
        return -1;
    }
    free(sql);
    return 0;
}

static int seed_pg(const char *conninfo) {
    PGconn *conn = PQconnectdb(conninfo);
    char *sql = seed_sql(true);
    int rc = 0;
    if (PQstatus(conn) != CONNECTION_OK || !sql) {
        fprintf(stderr, "seed: %s", PQerrorMessage(conn));
        rc = -1;
    } else {
        PGresult *r = PQexec(conn, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            fprintf(stderr, "seed: %s", PQresultErrorMessage(r));
            rc = -1;
        }
        PQclear(r);
    }
    free(sql);
    PQfinish(conn);
    return rc;
}

/* ---- main ---- */

static void on_signal(uv_signal_t *s, int signum) {
    (void)signum;
    (void)s;
    uv_stop(loop);
}


static const char *opt(int argc, char **argv, const char *name, const char *env, const char *def) {
    for (int i = 1; i < argc - 1; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    const char *e = env ? getenv(env) : NULL;
    return e && *e ? e : def;
}
static bool flag(int argc, char **argv, const char *name) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], name) == 0) return true;
    return false;
}

int main(int argc, char **argv) {
    const char *host = opt(argc, argv, "--host", NULL, "127.0.0.1");
    int port = atoi(opt(argc, argv, "--port", "FLASH_HTTP_PORT", "8080"));
    const char *mc = opt(argc, argv, "--memcached", "FLASH_MEMCACHED", NULL);
    const char *path = opt(argc, argv, "--sqlite", "FLASH_SQLITE", "flash_example.db");
    const char *pgconn = opt(argc, argv, "--pg", "FLASH_PG", NULL);
    int pgconns = atoi(opt(argc, argv, "--pg-connections", NULL, "4"));
    int err = 0;
    struct sockaddr_in addr;

    if (flag(argc, argv, "--help") || flag(argc, argv, "-h")) {
        printf("usage: %s [--port N] [--host IP] [--memcached H:P[,H:P]] [--sqlite FILE | --pg CONNINFO]"
               " [--pg-connections N] [--seed]\n",
               argv[0]);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    loop = uv_default_loop();
    flash_libuv_init(&uv, loop, NULL);

    /* The cache: memcached servers, or the in-process memory cache. */
    if (mc) {
        flash_memcached_server servers[16];
        char hosts[16][64];
        size_t n = 0;
        const char *p = mc;
        while (*p && n < 16) {
            size_t len = strcspn(p, ",");
            const char *colon = memchr(p, ':', len);
            size_t hl = colon ? (size_t)(colon - p) : len;
            snprintf(hosts[n], sizeof hosts[n], "%.*s", (int)(hl < 63 ? hl : 63), p);
            servers[n].host = hosts[n];
            servers[n].port = (uint16_t)(colon ? atoi(colon + 1) : 11211);
            servers[n].weight = 1;
            n++;
            p += len;
            if (*p == ',') p++;
        }
        flash_memcached_desc md;
        memset(&md, 0, sizeof md);
        md.loop = flash_libuv_loop(&uv);
        md.servers = servers;
        md.server_count = n;
        cache = flash_memcached_create(&md, &err);
        if (!cache.vt) {
            fprintf(stderr, "memcached %s: %s\n", mc, flash_strerror(err));
            return 1;
        }
    } else {
        cache = flash_memory_create(NULL);
    }

    /* The database: PostgreSQL, or an SQLite file. */
    if (pgconn) {
        if (flag(argc, argv, "--seed") && seed_pg(pgconn) != 0) return 1;
        flash_pg_desc pd;
        memset(&pd, 0, sizeof pd);
        pd.conninfo = pgconn;
        pd.loop = flash_libuv_loop(&uv);
        pd.connections = pgconns > 0 ? (uint32_t)pgconns : 4;
        pg_src = flash_pg_create(&pd, &err);
        if (!pg_src) {
            fprintf(stderr, "postgres: %s\n", flash_strerror(err));
            return 1;
        }
        source = flash_pg_source(pg_src);
    } else {
        if (sqlite3_open_v2(path, &sqlite_db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) {
            fprintf(stderr, "sqlite %s: %s\n", path, sqlite3_errmsg(sqlite_db));
            return 1;
        }
        sqlite3_busy_timeout(sqlite_db, 1000);
        if (flag(argc, argv, "--seed") && seed_sqlite() != 0) return 1;
        sqlite_src = flash_sqlite_create(sqlite_db);
        source = flash_sqlite_source(sqlite_src);
    }

    uv_tcp_init(loop, &server);
    if (uv_ip4_addr(host, port, &addr) != 0 || uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&server, 1024, on_connection) != 0) {
        fprintf(stderr, "cannot listen on %s:%d\n", host, port);
        return 1;
    }
    uv_signal_init(loop, &sigint);
    uv_signal_init(loop, &sigterm);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    printf("flash http_server on http://%s:%d  cache: %s%s%s  source: %s%s\n", host, port, cache.vt->name,
           mc ? " " : "", mc ? mc : "", source.vt->name, pgconn ? "" : " (sqlite file)");
    fflush(stdout);

    uv_run(loop, UV_RUN_DEFAULT);

    /* Shut down: contexts (cancelling their work), then the backends, then
       every handle, then the loop. */
    for (size_t i = 0; i < npool; i++) flash_ctx_destroy(pool[i]);
    flash_cache_destroy(cache);
    flash_pg_destroy(pg_src);
    flash_sqlite_destroy(sqlite_src);
    if (sqlite_db) sqlite3_close(sqlite_db);
    flash_libuv_close(&uv);
    for (client *c = clients; c; c = c->next) client_close(c);
    uv_close((uv_handle_t *)&server, NULL);
    uv_close((uv_handle_t *)&sigint, NULL);
    uv_close((uv_handle_t *)&sigterm, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    while (clients) { /* those whose request never ended */
        client *c = clients;
        clients = c->next;
        free(c);
    }
    uv_loop_close(loop);
    printf("served %llu requests\n", (unsigned long long)counters.requests);
    return 0;
}
