/* backends/source/postgres.h — PostgreSQL as a flash source, asynchronous.

   Reads misses with ONE statement per class per batch, generated from the
   model's field table (table: opts.table, default the model's name; columns:
   the field names, in field order), over libpq's non-blocking API driven by
   the flash loop: the socket is watched with io_start/io_set, the connect
   (PQconnectStart/PQconnectPoll), the writes (PQflush) and the reads
   (PQconsumeInput/PQisBusy/PQgetResult) never block.

       int err;
       flash_pg *pg = flash_pg_source_create("host=/run/postgresql dbname=app",
                                             flash_poll_loop(loop), &err);
       flash_ctx_set_source(ctx, NULL, flash_pg_source(pg));
       ...
       flash_ctx_destroy(ctx);
       flash_pg_destroy(pg);                // before the loop

   or flash_pg_create(&desc, &err) for the options of flash_pg_desc.

   SQL (identifiers double-quoted; keys are bound as ONE text-format array
   parameter per key field, never spliced into the SQL)
     one key field     SELECT "id","slug","title" FROM "events" WHERE "slug" = ANY($1::text[])
     several fields    SELECT ... FROM "participants"
                         WHERE ("user","event") IN (SELECT * FROM unnest($1::int8[], $2::int8[]))
     NULL key parts    SELECT ... WHERE "slug" = ANY($1::text[]) OR "slug" IS NULL
                       SELECT ... FROM "t" AS flash_r WHERE EXISTS (SELECT 1 FROM
                         unnest($1::int8[], $2::text[]) AS flash_k(k0, k1)
                         WHERE flash_r."a" IS NOT DISTINCT FROM flash_k.k0 AND ...)
   Array element types: I64 int8, I32 int4, F64 float8, BOOL bool, STR text,
   BYTES bytea; the nullable types as their base. A TIME key of one field
   is an untyped array ("t" = ANY($1)): the server gives it the column's
   type (timestamp, timestamptz, date), and the elements are UTC text
   ('2024-05-01 12:00:00+00'), exact whatever the session TimeZone. In a key
   of several fields a TIME part compares microseconds:
   (EXTRACT(EPOCH FROM "t") * 1000000)::int8 against an int8 array (exact,
   but no index on "t" is used). Each distinct statement is prepared once per connection
   (PQsendPrepare, named flash_<n>) and then run with PQsendQueryPrepared.

   CONNECTIONS
     desc.connections (default 1) connections, opened on demand. Each runs one
     query at a time; fetches beyond that wait in a FIFO queue and are sent
     as soon as a connection is free (results are read as they come: a batch
     is one statement, whatever its size). The loop given at create must be
     the loop of every context using the source.

   TYPES (column type -> field; results are text format)
     I64    int2 int4 int8 oid
     I32    int2 int4, and int8 / oid when the value fits (else the row is rejected)
     F64    float4 float8 numeric int2 int4 int8
     BOOL   bool
     STR    anything but bytea (its text form); NULL -> NULL pointer
     BYTES  bytea (hex or escape output, decoded); other types: their text
            bytes; NULL -> {NULL, 0}
     TIME   timestamptz (the UTC instant, whatever the session TimeZone: the
            text carries its offset), timestamp (read as UTC), date
            (midnight UTC); 'infinity', or outside the int64_t microseconds
            range (years past 294246), rejects the row. Needs DateStyle ISO
            (the default); any other DateStyle rejects the rows.
     I64N I32N F64N BOOLN TIMEN   as their base type; NULL -> .null = true
   The column types of every result are checked against the field table: a
   column of another type fails the whole fetch with FLASH_ESOURCE naming
   the table, column and types. A row with NULL in an I64/I32/F64/BOOL field
   or an I32 value out of range is rejected: the key(s) it would have
   answered fail with FLASH_ESOURCE (message: table and column); the other
   keys of the batch are answered.

   FAILURES
     server down / refused / bad login    the fetch fails with FLASH_ESOURCE
                                          and libpq's message; then, for
                                          retry_interval_ms, fetches fail at
                                          once without trying to connect
     connect takes > connect_timeout_ms   FLASH_ETIMEDOUT, same rest
     connection lost mid-query            FLASH_ESOURCE; the next fetch
                                          reconnects. A query sent on a
                                          connection that had been idle and
                                          is found dead (server restarted) is
                                          retried once on a new connection.
     query takes > query_timeout_ms       FLASH_ETIMEDOUT; the connection is
                                          closed (the server notices on its
                                          next write; set statement_timeout
                                          in the conninfo options to bound it
                                          there too) and reopened on demand
     SQL error (no such table, ...)       FLASH_ESOURCE with the server's message
   cancel (context reset or destroyed): a queued fetch is dropped; one in
   flight is forgotten and its results are discarded when they come.

   WRITES (flash_save / flash_delete and the _rows forms): ONE statement per
   batch, its own transaction, on the loop like a fetch (see
   flash__pg_wstmt_for: a CTE reading and locking the old rows, then
   INSERT ... ON CONFLICT (pk) DO UPDATE; DELETE ... RETURNING the old rows).
   The rows are one JSON parameter read by json_populate_recordset(NULL::t,
   $1::json), so each value goes through its column's input function. A
   server error rejects the batch (FLASH_ESOURCE); so does a lost connection
   or a timeout, with the outcome unknown (never retried). Destroying the
   context cancels the write (flash_write_on_cancel): queued, it is
   dropped; in flight, its result is discarded (it may still commit).

   LIMITS
     Single-threaded: use a source from its loop's thread. Rows are matched
     to keys by field values (byte equality): keep key columns' collations
     deterministic. Column names are the field names: rename with a VIEW.
     STR keys must be valid in the client encoding (else the server fails
     the whole fetch). Numbers are parsed with strtoll/strtod: keep the C
     locale's LC_NUMERIC.

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
   Link with -lpq. LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_POSTGRES_H
#define FLASH_POSTGRES_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_pg flash_pg;

/* Zero-initialise; every zero field means its default. */
typedef struct flash_pg_desc {
    const char *conninfo;        /* required: a libpq connection string (copied) */
    flash_loop loop;             /* required: the loop of the contexts using it */
    uint32_t connections;        /* default: 1 */
    uint32_t connect_timeout_ms; /* default: 2000 */
    uint32_t query_timeout_ms;   /* default: 5000, from sending a fetch's query to its result */
    uint32_t retry_interval_ms;  /* default: 1000: after a failed connect, fetches fail
                                    at once for this long; UINT32_MAX: 0 ms */
} flash_pg_desc;

/* Counters (cumulative) and state. */
typedef struct flash_pg_stats {
    uint64_t fetches;          /* fetch calls (one per class per batch) */
    uint64_t queries;          /* statements executed (PQsendQueryPrepared) */
    uint64_t prepares;         /* statements prepared */
    uint64_t rows;             /* rows read */
    uint64_t rejected;         /* rows rejected (NULL in a non-null field, out of range) */
    uint64_t errors;           /* fetches failed by the server or the connection */
    uint64_t timeouts;         /* queries and connects over their timeout */
    uint64_t connects;         /* connections established */
    uint64_t connect_failures; /* connection attempts that failed */
    uint64_t fast_fails;       /* fetches failed without trying, while marked down */
    uint64_t lost;             /* connections lost (by the server or the network) */
    uint64_t retries;          /* queries retried on a new connection */
    uint64_t canceled;         /* fetches cancelled (context reset or destroyed), and writes
                                  cancelled (context destroyed) */
    uint64_t writes;           /* write calls (flash_save / flash_delete, one per batch) */
    uint64_t write_rows;       /* rows written (saved or deleted as asked) */
    uint32_t connected;        /* connections open now */
    uint32_t queued;           /* fetches waiting for a connection now */
} flash_pg_stats;

/* A source, or NULL with *err (when err is not NULL) set to FLASH_EINVAL
   (no conninfo or loop, a conninfo libpq cannot parse) or FLASH_ENOMEM.
   Nothing is connected yet: the first fetch connects. */
FLASH_API flash_pg *flash_pg_create(const flash_pg_desc *desc, int *err);
/* The same with the defaults. */
FLASH_API flash_pg *flash_pg_source_create(const char *conninfo, flash_loop loop, int *err);
FLASH_API flash_source flash_pg_source(flash_pg *pg);
/* Closes the connections. Fetches still attached (contexts alive) finish
   with FLASH_ECANCELED: destroy contexts first, or let them see that. */
FLASH_API void flash_pg_destroy(flash_pg *pg);
FLASH_API flash_pg_stats flash_pg_stats_get(const flash_pg *pg);
/* The last connection error ("" if none). */
FLASH_API const char *flash_pg_last_error(const flash_pg *pg);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_POSTGRES_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_POSTGRES_IMPLEMENTED
#define FLASH_POSTGRES_IMPLEMENTED
#include <errno.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__has_include)
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#else
#include <libpq-fe.h>
#endif

/* Type OIDs (pg_type.h is a server header). */
enum {
    FLASH__PG_BOOL = 16, FLASH__PG_BYTEA = 17, FLASH__PG_NAME = 19, FLASH__PG_INT8 = 20, FLASH__PG_INT2 = 21,
    FLASH__PG_INT4 = 23, FLASH__PG_TEXT = 25, FLASH__PG_OID = 26, FLASH__PG_FLOAT4 = 700, FLASH__PG_FLOAT8 = 701,
    FLASH__PG_NUMERIC = 1700, FLASH__PG_DATE = 1082, FLASH__PG_TIMESTAMP = 1114, FLASH__PG_TIMESTAMPTZ = 1184
};

enum { FLASH__PG_DOWN = 0, FLASH__PG_CONNECTING, FLASH__PG_IDLE, FLASH__PG_BUSY };
enum { FLASH__PG_PREPARE = 1, FLASH__PG_EXEC };

/* A distinct statement: (model, key fields, NULL form). */
typedef struct flash__pg_stmt {
    const flash_model *model;
    const flash_class *shape; /* a class of its own SQL (order, limit, count, exists), or NULL */
    size_t nkeys;
    int keys[8];
    bool nulls;
    int write;                /* 0: a fetch; FLASH_WRITE_SAVE / FLASH_WRITE_DELETE */
    char *sql;
} flash__pg_stmt;

typedef struct flash__pg_job {
    struct flash__pg_job *next;
    flash_fetch *f;       /* NULL once cancelled: results are discarded */
    flash_write *w;       /* a write job: NULL once cancelled (context destroyed) */
    bool is_write;
    size_t stmt;
    int nparams;
    char *params[8];      /* text-format array literals */
    bool retried;
} flash__pg_job;

typedef struct flash__pg_conn {
    struct flash_pg *pg;
    PGconn *conn;
    int state, stage, fd, events;
    void *io, *timer;
    flash__pg_job *job;   /* in flight */
    PGresult *res;        /* the EXEC result, until the NULL that ends it */
    uint32_t *names;      /* per statement: prepared name number, 0 = not yet */
    size_t names_cap;
    uint32_t next_name, pending_name;
    uint64_t served;      /* queries completed on this connection */
    bool tried;           /* a connect was tried in this kick */
} flash__pg_conn;

struct flash_pg {
    char *conninfo;
    flash_loop loop;
    flash_pg_desc desc;
    flash__pg_conn *conns;
    size_t nconns;
    flash__pg_stmt *stmts;
    size_t nstmts, stmts_cap;
    flash__pg_job *head, *tail;
    bool down;            /* resting after a failed connect */
    void *down_timer;
    int down_code;
    bool kicking, rekick;
    flash_pg_stats stats;
    char last_error[256];
};

/* ---- small helpers ---- */

static const char *flash__pg_table(const flash_model *m) { return m->opts.table ? m->opts.table : m->name; }

static const char *flash__pg_array_type(flash_type t) {
    switch (flash_value_type(t)) {
    case FLASH_I64: return "int8[]";
    case FLASH_I32: return "int4[]";
    case FLASH_F64: return "float8[]";
    case FLASH_BOOL: return "bool[]";
    case FLASH_STR: return "text[]";
    case FLASH_BYTES: return "bytea[]";
    default: return "text[]";
    }
}

static const char *flash__pg_oid_name(Oid t) {
    switch (t) {
    case FLASH__PG_BOOL: return "bool";
    case FLASH__PG_BYTEA: return "bytea";
    case FLASH__PG_NAME: return "name";
    case FLASH__PG_INT8: return "int8";
    case FLASH__PG_INT2: return "int2";
    case FLASH__PG_INT4: return "int4";
    case FLASH__PG_TEXT: return "text";
    case FLASH__PG_OID: return "oid";
    case FLASH__PG_FLOAT4: return "float4";
    case FLASH__PG_FLOAT8: return "float8";
    case FLASH__PG_NUMERIC: return "numeric";
    case 1043: return "varchar";
    case 1042: return "bpchar";
    case FLASH__PG_DATE: return "date";
    case FLASH__PG_TIMESTAMP: return "timestamp";
    case FLASH__PG_TIMESTAMPTZ: return "timestamptz";
    default: return NULL;
    }
}

static bool flash__pg_compatible(flash_type t, Oid o) {
    if (t == FLASH_TIME || t == FLASH_TIMEN)
        return o == FLASH__PG_TIMESTAMP || o == FLASH__PG_TIMESTAMPTZ || o == FLASH__PG_DATE;
    switch (flash_value_type(t)) {
    case FLASH_I64:
    case FLASH_I32: return o == FLASH__PG_INT2 || o == FLASH__PG_INT4 || o == FLASH__PG_INT8 || o == FLASH__PG_OID;
    case FLASH_F64:
        return o == FLASH__PG_FLOAT4 || o == FLASH__PG_FLOAT8 || o == FLASH__PG_NUMERIC || o == FLASH__PG_INT2 ||
               o == FLASH__PG_INT4 || o == FLASH__PG_INT8;
    case FLASH_BOOL: return o == FLASH__PG_BOOL;
    case FLASH_STR: return o != FLASH__PG_BYTEA;
    case FLASH_BYTES: return true;
    default: return false;
    }
}

/* libpq's messages span lines ("...\n\tIs the server running ...\n"):
   one line, without the trailing newline. */
static void flash__pg_msg(char *out, size_t cap, const char *prefix, const char *msg) {
    size_t n, i, o = 0;
    snprintf(out, cap, "%s%s", prefix, msg && *msg ? msg : "unknown error");
    n = strlen(out);
    for (i = 0; i < n; i++) {
        char c = out[i] == '\n' || out[i] == '\t' ? ' ' : out[i];
        if (c == ' ' && (o == 0 || out[o - 1] == ' ')) continue;
        out[o++] = c;
    }
    while (o && out[o - 1] == ' ') o--;
    out[o] = 0;
}

/* ---- array parameters ---- */

/* A timestamp as PostgreSQL reads it: UTC, years before 1 AD as BC. */
static void flash__pg_time_text(flash_time t, char *out, size_t cap) {
    char iso[64];
    const char *rest;
    long long y;
    flash_time_format(t, iso, sizeof iso);
    y = strtoll(iso, (char **)&rest, 10);
    if (y >= 1) snprintf(out, cap, "%04lld%s+00", y, rest);
    else snprintf(out, cap, "%04lld%s+00 BC", 1 - y, rest);
}

static void flash__pg_elem(flash_strbuf *b, const flash_value *v, flash_type field) {
    char tmp[64];
    static const char hex[] = "0123456789abcdef";
    size_t i;
    if (v->is_null) {
        flash_strbuf_puts(b, "NULL");
        return;
    }
    if ((field == FLASH_TIME || field == FLASH_TIMEN) && v->type == FLASH_I64) {
        flash__pg_time_text(v->u.i64, tmp + 1, sizeof tmp - 2);
        tmp[0] = '"';
        flash_strbuf_puts(b, tmp);
        flash_strbuf_put(b, "\"", 1);
        return;
    }
    switch (v->type) {
    case FLASH_I64: snprintf(tmp, sizeof tmp, "%lld", (long long)v->u.i64); flash_strbuf_puts(b, tmp); return;
    case FLASH_I32: snprintf(tmp, sizeof tmp, "%ld", (long)v->u.i32); flash_strbuf_puts(b, tmp); return;
    case FLASH_BOOL: flash_strbuf_puts(b, v->u.b ? "t" : "f"); return;
    case FLASH_F64:
        if (v->u.f64 != v->u.f64) flash_strbuf_puts(b, "NaN");
        else if (v->u.f64 > DBL_MAX) flash_strbuf_puts(b, "Infinity");
        else if (v->u.f64 < -DBL_MAX) flash_strbuf_puts(b, "-Infinity");
        else {
            snprintf(tmp, sizeof tmp, "%.17g", v->u.f64);
            flash_strbuf_puts(b, tmp);
        }
        return;
    case FLASH_STR: /* "..." with \ and " escaped: the array literal's quoting */
        flash_strbuf_put(b, "\"", 1);
        for (i = 0; i < v->u.s.len; i++) {
            char c = v->u.s.ptr[i];
            if (c == '"' || c == '\\') flash_strbuf_put(b, "\\", 1);
            flash_strbuf_put(b, &c, 1);
        }
        flash_strbuf_put(b, "\"", 1);
        return;
    case FLASH_BYTES: /* "\\x0102": bytea's hex input, its backslash escaped */
        flash_strbuf_puts(b, "\"\\\\x");
        for (i = 0; i < v->u.s.len; i++) {
            unsigned char c = (unsigned char)v->u.s.ptr[i];
            char h[2];
            h[0] = hex[c >> 4];
            h[1] = hex[c & 15];
            flash_strbuf_put(b, h, 2);
        }
        flash_strbuf_put(b, "\"", 1);
        return;
    default: flash_strbuf_puts(b, "NULL"); return; /* not a value type */
    }
}

/* ---- statements ---- */

/* The class a statement is made for when its SQL is its own (order_by,
   limit, COUNT's GROUP BY, EXISTS' DISTINCT), else NULL. */
static const flash_class *flash__pg_shape(const flash_class *c) {
    if (c->kind == FLASH_CLASS_COUNT || c->kind == FLASH_CLASS_EXISTS || c->norder) return c;
    return NULL;
}

static void flash__pg_keys(flash_strbuf *b, const flash_fetch *f) {
    size_t j;
    for (j = 0; j < flash_fetch_nfields(f); j++) {
        if (j) flash_strbuf_puts(b, ",");
        flash_sql_ident(b, flash_fetch_model(f)->fields[flash_fetch_field(f, j)].name, false);
    }
}

/* The class's order as flash.h sorts: NULLs last ascending, first
   descending; strings by their bytes (COLLATE "C"). */
static void flash__pg_order(flash_strbuf *b, const flash_class *c) {
    size_t k;
    for (k = 0; k < c->norder; k++) {
        const flash_field *fd = &c->model->fields[c->order[k]];
        if (k) flash_strbuf_puts(b, ",");
        flash_sql_ident(b, fd->name, false);
        if (fd->type == FLASH_STR) flash_strbuf_puts(b, " COLLATE \"C\"");
        flash_strbuf_puts(b, c->order_desc[k] ? " DESC NULLS FIRST" : " ASC NULLS LAST");
    }
}

/* Wrap the plain SELECT in b for a shaped class: COUNT(*) ... GROUP BY,
   DISTINCT keys, ORDER BY, or a ROW_NUMBER window per key for a limit. */
static void flash__pg_shape_sql(flash_strbuf *b, const flash_fetch *f, const flash_class *c) {
    flash_strbuf w;
    char lim[48];
    memset(&w, 0, sizeof w);
    if (c->kind == FLASH_CLASS_COUNT || c->kind == FLASH_CLASS_EXISTS) {
        flash_strbuf_puts(&w, c->kind == FLASH_CLASS_COUNT ? "SELECT " : "SELECT DISTINCT ");
        flash__pg_keys(&w, f);
        if (c->kind == FLASH_CLASS_COUNT) flash_strbuf_puts(&w, ",COUNT(*)");
        flash_strbuf_puts(&w, " FROM (");
        flash_strbuf_put(&w, b->data, b->len);
        flash_strbuf_puts(&w, ") AS flash_q");
        if (c->kind == FLASH_CLASS_COUNT) {
            flash_strbuf_puts(&w, " GROUP BY ");
            flash__pg_keys(&w, f);
        }
    } else if (c->opts.limit) {
        size_t i;
        flash_strbuf_puts(&w, "SELECT ");
        for (i = 0; i < c->model->nfields; i++) {
            if (i) flash_strbuf_puts(&w, ",");
            flash_sql_ident(&w, c->model->fields[i].name, false);
        }
        flash_strbuf_puts(&w, " FROM (SELECT *,ROW_NUMBER() OVER (PARTITION BY ");
        flash__pg_keys(&w, f);
        flash_strbuf_puts(&w, " ORDER BY ");
        flash__pg_order(&w, c);
        flash_strbuf_puts(&w, ") AS flash__rn FROM (");
        flash_strbuf_put(&w, b->data, b->len);
        snprintf(lim, sizeof lim, "%lu", (unsigned long)c->opts.limit);
        flash_strbuf_puts(&w, ") AS flash_q) AS flash_w WHERE flash__rn <= ");
        flash_strbuf_puts(&w, lim);
        flash_strbuf_puts(&w, " ORDER BY flash__rn");
    } else {
        flash_strbuf_puts(&w, "SELECT * FROM (");
        flash_strbuf_put(&w, b->data, b->len);
        flash_strbuf_puts(&w, ") AS flash_q ORDER BY ");
        flash__pg_order(&w, c);
    }
    if (b->oom) w.oom = true;
    free(b->data);
    *b = w;
}

static long flash__pg_stmt_for(flash_pg *pg, const flash_fetch *f, bool nulls) {
    const flash_model *m = flash_fetch_model(f);
    const flash_class *shape = flash__pg_shape(flash_fetch_class(f));
    size_t nk = flash_fetch_nfields(f), i, j;
    flash__pg_stmt *st;
    flash_strbuf b;
    for (i = 0; i < pg->nstmts; i++) {
        st = &pg->stmts[i];
        if (st->write || st->model != m || st->shape != shape || st->nkeys != nk || st->nulls != nulls) continue;
        for (j = 0; j < nk && st->keys[j] == flash_fetch_field(f, j); j++) {
        }
        if (j == nk) return (long)i;
    }
    if (pg->nstmts == pg->stmts_cap) {
        size_t cap = pg->stmts_cap ? pg->stmts_cap * 2 : 8;
        flash__pg_stmt *n = (flash__pg_stmt *)realloc(pg->stmts, cap * sizeof *n);
        if (!n) return -1;
        pg->stmts = n;
        pg->stmts_cap = cap;
    }
    memset(&b, 0, sizeof b);
    flash_strbuf_puts(&b, "SELECT ");
    for (i = 0; i < m->nfields; i++) {
        if (i) flash_strbuf_puts(&b, ",");
        flash_sql_ident(&b, m->fields[i].name, false);
    }
    flash_strbuf_puts(&b, " FROM ");
    flash_sql_ident(&b, flash__pg_table(m), true);
    if (nk == 1) {
        const char *k = m->fields[flash_fetch_field(f, 0)].name;
        flash_type kt = m->fields[flash_fetch_field(f, 0)].type;
        flash_strbuf_puts(&b, " WHERE ");
        flash_sql_ident(&b, k, false);
        if (kt == FLASH_TIME || kt == FLASH_TIMEN) {
            flash_strbuf_puts(&b, " = ANY($1)"); /* typed by the server: the column's array type */
        } else {
            flash_strbuf_puts(&b, " = ANY($1::");
            flash_strbuf_puts(&b, flash__pg_array_type(kt));
            flash_strbuf_puts(&b, ")");
        }
        if (nulls) {
            flash_strbuf_puts(&b, " OR ");
            flash_sql_ident(&b, k, false);
            flash_strbuf_puts(&b, " IS NULL");
        }
    } else {
        char tmp[48];
        if (nulls) flash_strbuf_puts(&b, " AS flash_r WHERE EXISTS (SELECT 1 FROM unnest(");
        else {
            flash_strbuf_puts(&b, " WHERE (");
            for (j = 0; j < nk; j++) {
                flash_type kt = m->fields[flash_fetch_field(f, j)].type;
                if (j) flash_strbuf_puts(&b, ",");
                if (kt == FLASH_TIME || kt == FLASH_TIMEN) flash_strbuf_puts(&b, "(EXTRACT(EPOCH FROM ");
                flash_sql_ident(&b, m->fields[flash_fetch_field(f, j)].name, false);
                if (kt == FLASH_TIME || kt == FLASH_TIMEN) flash_strbuf_puts(&b, ") * 1000000)::int8");
            }
            flash_strbuf_puts(&b, ") IN (SELECT * FROM unnest(");
        }
        for (j = 0; j < nk; j++) {
            snprintf(tmp, sizeof tmp, "%s$%d::%s", j ? ", " : "", (int)j + 1,
                     flash__pg_array_type(m->fields[flash_fetch_field(f, j)].type));
            flash_strbuf_puts(&b, tmp);
        }
        if (nulls) {
            flash_strbuf_puts(&b, ") AS flash_k(");
            for (j = 0; j < nk; j++) {
                snprintf(tmp, sizeof tmp, "%sk%d", j ? ", " : "", (int)j);
                flash_strbuf_puts(&b, tmp);
            }
            flash_strbuf_puts(&b, ") WHERE ");
            for (j = 0; j < nk; j++) {
                flash_type kt = m->fields[flash_fetch_field(f, j)].type;
                bool tm = kt == FLASH_TIME || kt == FLASH_TIMEN;
                if (j) flash_strbuf_puts(&b, " AND ");
                flash_strbuf_puts(&b, tm ? "(EXTRACT(EPOCH FROM flash_r." : "flash_r.");
                flash_sql_ident(&b, m->fields[flash_fetch_field(f, j)].name, false);
                if (tm) flash_strbuf_puts(&b, ") * 1000000)::int8");
                snprintf(tmp, sizeof tmp, " IS NOT DISTINCT FROM flash_k.k%d", (int)j);
                flash_strbuf_puts(&b, tmp);
            }
            flash_strbuf_puts(&b, ")");
        } else {
            flash_strbuf_puts(&b, "))");
        }
    }
    if (shape) flash__pg_shape_sql(&b, f, shape);
    if (b.oom) {
        free(b.data);
        return -1;
    }
    st = &pg->stmts[pg->nstmts];
    memset(st, 0, sizeof *st);
    st->model = m;
    st->shape = shape;
    st->nkeys = nk;
    for (j = 0; j < nk; j++) st->keys[j] = flash_fetch_field(f, j);
    st->nulls = nulls;
    st->sql = b.data;
    return (long)pg->nstmts++;
}

/* ---- jobs ---- */

static void flash__pg_job_free(flash__pg_job *job) {
    int i;
    for (i = 0; i < job->nparams; i++) free(job->params[i]);
    free(job);
}

/* Answer and free a job. */
static void flash__pg_finish(flash_pg *pg, flash__pg_job *job, int code, const char *msg) {
    flash_fetch *f = job->f;
    flash_write *w = job->w;
    flash__pg_job_free(job);
    if (code) pg->stats.errors++;
    if (f) flash_fetch_done(f, code, msg);
    if (w) flash_write_done(w, code, msg);
}

static void flash__pg_push(flash_pg *pg, flash__pg_job *job, bool front) {
    pg->stats.queued++;
    if (front) {
        job->next = pg->head;
        pg->head = job;
        if (!pg->tail) pg->tail = job;
        return;
    }
    job->next = NULL;
    if (pg->tail) pg->tail->next = job;
    else pg->head = job;
    pg->tail = job;
}

static flash__pg_job *flash__pg_pop(flash_pg *pg) {
    flash__pg_job *job = pg->head;
    if (!job) return NULL;
    pg->head = job->next;
    if (!pg->head) pg->tail = NULL;
    job->next = NULL;
    pg->stats.queued--;
    return job;
}

static void flash__pg_fail_queue(flash_pg *pg, int code, const char *msg) {
    flash__pg_job *job;
    while ((job = flash__pg_pop(pg)) != NULL) flash__pg_finish(pg, job, code, msg);
}

/* ---- connections ---- */

static void flash__pg_kick(flash_pg *pg);
static void flash__pg_on_io(void *arg, int events);

static void flash__pg_watch(flash__pg_conn *c, int events) {
    flash_loop *l = &c->pg->loop;
    int fd = PQsocket(c->conn);
    /* While connecting, libpq may close its socket and open another (next
       host or address), possibly under the same number: watch afresh. */
    if (c->io && (fd != c->fd || c->state == FLASH__PG_CONNECTING)) {
        l->vt->io_stop(l->native, c->io);
        c->io = NULL;
    }
    c->fd = fd;
    if (!c->io) {
        c->io = fd >= 0 ? l->vt->io_start(l->native, fd, events, flash__pg_on_io, c) : NULL;
        c->events = events;
        return;
    }
    if (events != c->events) {
        l->vt->io_set(l->native, c->io, events);
        c->events = events;
    }
}

static void flash__pg_stop_timer(flash__pg_conn *c) {
    if (c->timer) c->pg->loop.vt->cancel(c->pg->loop.native, c->timer);
    c->timer = NULL;
}

/* Close the connection; its job (if any) is the caller's. */
static void flash__pg_close(flash__pg_conn *c) {
    flash_loop *l = &c->pg->loop;
    if (c->io) l->vt->io_stop(l->native, c->io);
    c->io = NULL;
    flash__pg_stop_timer(c);
    if (c->res) PQclear(c->res);
    c->res = NULL;
    if (c->conn) {
        if (c->state == FLASH__PG_IDLE || c->state == FLASH__PG_BUSY) c->pg->stats.connected--;
        PQfinish(c->conn);
    }
    c->conn = NULL;
    c->state = FLASH__PG_DOWN;
    c->fd = -1;
    c->events = 0;
    c->served = 0;
    if (c->names) memset(c->names, 0, c->names_cap * sizeof *c->names);
}

static void flash__pg_up(void *arg) {
    flash_pg *pg = (flash_pg *)arg;
    pg->down_timer = NULL;
    pg->down = false;
}

static bool flash__pg_any_alive(const flash_pg *pg) {
    size_t i;
    for (i = 0; i < pg->nconns; i++)
        if (pg->conns[i].state != FLASH__PG_DOWN) return true;
    return false;
}

/* A connect failed: rest, and fail the fetches that were waiting for it. */
static void flash__pg_connect_failed(flash__pg_conn *c, int code, const char *msg) {
    flash_pg *pg = c->pg;
    flash__pg_close(c);
    pg->stats.connect_failures++;
    if (code == FLASH_ETIMEDOUT) pg->stats.timeouts++;
    snprintf(pg->last_error, sizeof pg->last_error, "%s", msg);
    pg->down_code = code;
    if (!pg->down && pg->desc.retry_interval_ms != UINT32_MAX) {
        pg->down = true;
        pg->down_timer = pg->loop.vt->timer(pg->loop.native, pg->desc.retry_interval_ms, flash__pg_up, pg);
        if (!pg->down_timer) pg->down = false;
    }
    if (!flash__pg_any_alive(pg)) flash__pg_fail_queue(pg, code, msg);
    flash__pg_kick(pg);
}

static void flash__pg_connect_timeout(void *arg) {
    flash__pg_conn *c = (flash__pg_conn *)arg;
    char msg[128];
    c->timer = NULL;
    snprintf(msg, sizeof msg, "postgres: connect timed out after %u ms", (unsigned)c->pg->desc.connect_timeout_ms);
    flash__pg_connect_failed(c, FLASH_ETIMEDOUT, msg);
}

static void flash__pg_connect(flash__pg_conn *c) {
    flash_pg *pg = c->pg;
    char msg[256];
    c->conn = PQconnectStart(pg->conninfo);
    c->state = FLASH__PG_CONNECTING;
    c->fd = -1;
    if (!c->conn || PQstatus(c->conn) == CONNECTION_BAD || PQsocket(c->conn) < 0) {
        flash__pg_msg(msg, sizeof msg, "postgres: ", c->conn ? PQerrorMessage(c->conn) : "out of memory");
        flash__pg_connect_failed(c, FLASH_ESOURCE, msg);
        return;
    }
    flash__pg_watch(c, FLASH_IO_WRITE); /* PQconnectPoll starts as if it said WRITING */
    c->timer = pg->loop.vt->timer(pg->loop.native, pg->desc.connect_timeout_ms, flash__pg_connect_timeout, c);
    if (!c->io || !c->timer) flash__pg_connect_failed(c, FLASH_ENOMEM, "postgres: out of memory");
}

/* Notices (RAISE NOTICE, ...) are not printed: a library stays quiet. */
static void flash__pg_notice(void *arg, const char *message) {
    (void)arg;
    (void)message;
}

static void flash__pg_connect_step(flash__pg_conn *c) {
    flash_pg *pg = c->pg;
    char msg[256];
    switch (PQconnectPoll(c->conn)) {
    case PGRES_POLLING_READING: flash__pg_watch(c, FLASH_IO_READ); return;
    case PGRES_POLLING_WRITING: flash__pg_watch(c, FLASH_IO_WRITE); return;
    case PGRES_POLLING_OK:
        flash__pg_stop_timer(c);
        if (PQsetnonblocking(c->conn, 1) != 0) {
            flash__pg_msg(msg, sizeof msg, "postgres: ", PQerrorMessage(c->conn));
            flash__pg_connect_failed(c, FLASH_ESOURCE, msg);
            return;
        }
        PQsetNoticeProcessor(c->conn, flash__pg_notice, NULL);
        c->state = FLASH__PG_IDLE;
        pg->stats.connects++;
        pg->stats.connected++;
        pg->last_error[0] = 0;
        flash__pg_watch(c, FLASH_IO_READ); /* idle: notice a server that goes away */
        flash__pg_kick(pg);
        return;
    default:
        flash__pg_msg(msg, sizeof msg, "postgres: ", PQerrorMessage(c->conn));
        flash__pg_connect_failed(c, FLASH_ESOURCE, msg);
        return;
    }
}

/* The connection broke with a job on it. */
static void flash__pg_lost(flash__pg_conn *c, const char *why) {
    flash_pg *pg = c->pg;
    flash__pg_job *job = c->job;
    bool reused = c->served > 0;
    char msg[320];
    flash__pg_msg(msg, sizeof msg, "postgres: connection lost: ", why);
    c->job = NULL;
    flash__pg_close(c);
    pg->stats.lost++;
    if (job) {
        if (job->f && !job->is_write && reused && !job->retried) { /* idle connection found dead: once more */
            job->retried = true;
            pg->stats.retries++;
            flash__pg_push(pg, job, true);
        } else {
            flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
        }
    }
    flash__pg_kick(pg);
}

static void flash__pg_query_timeout(void *arg) {
    flash__pg_conn *c = (flash__pg_conn *)arg;
    flash_pg *pg = c->pg;
    flash__pg_job *job = c->job;
    char msg[256];
    c->timer = NULL;
    c->job = NULL;
    pg->stats.timeouts++;
    snprintf(msg, sizeof msg, "postgres: query on %s took more than %u ms: connection reset",
             job ? flash__pg_table(pg->stmts[job->stmt].model) : "?", (unsigned)pg->desc.query_timeout_ms);
    flash__pg_close(c);
    if (job) flash__pg_finish(pg, job, FLASH_ETIMEDOUT, msg);
    flash__pg_kick(pg);
}

/* Send what libpq has buffered; watch for writability while it has more. */
static bool flash__pg_flush(flash__pg_conn *c) {
    int r = PQflush(c->conn);
    if (r < 0) return false;
    flash__pg_watch(c, r ? (FLASH_IO_READ | FLASH_IO_WRITE) : FLASH_IO_READ);
    return true;
}

static bool flash__pg_send(flash__pg_conn *c) {
    flash_pg *pg = c->pg;
    flash__pg_job *job = c->job;
    char name[32];
    int ok;
    if (c->names_cap < pg->nstmts) {
        size_t cap = pg->stmts_cap;
        uint32_t *n = (uint32_t *)realloc(c->names, cap * sizeof *n);
        if (!n) return false;
        memset(n + c->names_cap, 0, (cap - c->names_cap) * sizeof *n);
        c->names = n;
        c->names_cap = cap;
    }
    if (!c->names[job->stmt]) {
        c->pending_name = ++c->next_name;
        snprintf(name, sizeof name, "flash_%u", (unsigned)c->pending_name);
        c->stage = FLASH__PG_PREPARE;
        ok = PQsendPrepare(c->conn, name, pg->stmts[job->stmt].sql, job->nparams, NULL);
    } else {
        snprintf(name, sizeof name, "flash_%u", (unsigned)c->names[job->stmt]);
        c->stage = FLASH__PG_EXEC;
        pg->stats.queries++;
        ok = PQsendQueryPrepared(c->conn, name, job->nparams, (const char *const *)job->params, NULL, NULL, 0);
    }
    return ok && flash__pg_flush(c);
}

static void flash__pg_start(flash__pg_conn *c, flash__pg_job *job) {
    flash_pg *pg = c->pg;
    c->job = job;
    c->state = FLASH__PG_BUSY;
    c->timer = pg->loop.vt->timer(pg->loop.native, pg->desc.query_timeout_ms, flash__pg_query_timeout, c);
    if (!c->timer) {
        c->job = NULL;
        c->state = FLASH__PG_IDLE;
        flash__pg_finish(pg, job, FLASH_ENOMEM, "postgres: out of memory");
        return;
    }
    if (!flash__pg_send(c)) flash__pg_lost(c, PQerrorMessage(c->conn));
}

/* Dispatch queued fetches to idle connections, opening connections as
   needed. Re-entrant calls fold into the running one. */
static void flash__pg_kick(flash_pg *pg) {
    size_t i;
    if (pg->kicking) {
        pg->rekick = true;
        return;
    }
    pg->kicking = true;
    do {
        pg->rekick = false;
        for (i = 0; i < pg->nconns; i++) pg->conns[i].tried = false;
        while (pg->head) {
            flash__pg_conn *idle = NULL, *down = NULL;
            size_t connecting = 0;
            for (i = 0; i < pg->nconns; i++) {
                flash__pg_conn *c = &pg->conns[i];
                if (c->state == FLASH__PG_IDLE && !idle) idle = c;
                if (c->state == FLASH__PG_DOWN && !c->tried && !down) down = c;
                if (c->state == FLASH__PG_CONNECTING) connecting++;
            }
            if (idle) {
                flash__pg_start(idle, flash__pg_pop(pg));
                continue;
            }
            if (pg->down && !flash__pg_any_alive(pg)) {
                char msg[320];
                size_t n = pg->stats.queued;
                snprintf(msg, sizeof msg, "%s (server marked down, next try within %u ms)", pg->last_error,
                         (unsigned)pg->desc.retry_interval_ms);
                pg->stats.fast_fails += n;
                flash__pg_fail_queue(pg, pg->down_code ? pg->down_code : FLASH_ESOURCE, msg);
                break;
            }
            if (down && !pg->down && connecting < pg->stats.queued) {
                down->tried = true;
                flash__pg_connect(down);
                continue;
            }
            break; /* wait for a connection */
        }
    } while (pg->rekick);
    pg->kicking = false;
}

/* ---- results ---- */

static int flash__pg_parse_i64(const char *s, int64_t *out) {
    char *end;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = (int64_t)v;
    return 0;
}

static int flash__pg_hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* bytea's text output (hex, or the old escape format) into a new buffer. */
static int flash__pg_bytea(const char *s, size_t len, flash_bytes *out) {
    unsigned char *buf = (unsigned char *)malloc(len + 1), *o = buf;
    size_t i;
    if (!buf) return -1;
    if (len >= 2 && s[0] == '\\' && s[1] == 'x') {
        for (i = 2; i + 1 < len; i += 2) {
            int h = flash__pg_hexval(s[i]), l = flash__pg_hexval(s[i + 1]);
            if (h < 0 || l < 0) break;
            *o++ = (unsigned char)(h * 16 + l);
        }
        if (i != len) {
            free(buf);
            return -1;
        }
    } else {
        for (i = 0; i < len; i++) {
            if (s[i] != '\\') *o++ = (unsigned char)s[i];
            else if (i + 1 < len && s[i + 1] == '\\') *o++ = '\\', i++;
            else if (i + 3 < len) {
                *o++ = (unsigned char)(((s[i + 1] - '0') << 6) | ((s[i + 2] - '0') << 3) | (s[i + 3] - '0'));
                i += 3;
            } else {
                free(buf);
                return -1;
            }
        }
    }
    out->data = buf;
    out->len = (size_t)(o - buf);
    return 0;
}

/* Read column col of row r into the field at row: 0; or 1 with *why =
   "NULL" / "range" / "value"; -1 out of memory. *owned: a buffer to free. */
static int flash__pg_read(const PGresult *res, int r, int col, const flash_field *fd, char *row, const char **why,
                          void **owned) {
    Oid t = PQftype(res, col);
    const char *s = PQgetvalue(res, r, col);
    char *p = row + fd->offset;
    *why = NULL;
    *owned = NULL;
    if (flash_type_nullable(fd->type)) {
        flash_field base = *fd;
        if (PQgetisnull(res, r, col)) {
            flash_field_set_null(fd, row);
            return 0;
        }
        /* v comes first in every nullable struct; null stays false (zeroed) */
        base.type = fd->type == FLASH_TIMEN ? FLASH_TIME : flash_value_type(fd->type);
        return flash__pg_read(res, r, col, &base, row, why, owned);
    }
    if (PQgetisnull(res, r, col)) {
        if (fd->type == FLASH_STR) {
            const char *v = NULL;
            memcpy(p, &v, sizeof v);
            return 0;
        }
        if (fd->type == FLASH_BYTES) {
            flash_bytes v = {NULL, 0};
            memcpy(p, &v, sizeof v);
            return 0;
        }
        *why = "NULL";
        return 1;
    }
    switch (fd->type) {
    case FLASH_TIME: {
        flash_time v;
        int rc = flash_time_parse(s, (size_t)PQgetlength(res, r, col), &v);
        if (rc == FLASH_ETOOLARGE) return *why = "range", 1;
        if (rc) return *why = "value", 1;
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_I64:
    case FLASH_I32: {
        int64_t v;
        if (flash__pg_parse_i64(s, &v)) return *why = "value", 1;
        if (fd->type == FLASH_I64) {
            memcpy(p, &v, sizeof v);
        } else {
            int32_t x;
            if (v < INT32_MIN || v > INT32_MAX) return *why = "range", 1;
            x = (int32_t)v;
            memcpy(p, &x, sizeof x);
        }
        return 0;
    }
    case FLASH_F64: {
        char *end;
        double v = strtod(s, &end);
        if (end == s || *end) return *why = "value", 1;
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_BOOL: {
        bool v = s[0] == 't';
        if ((s[0] != 't' && s[0] != 'f') || s[1]) return *why = "value", 1;
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_STR: memcpy(p, &s, sizeof s); return 0;
    case FLASH_BYTES: {
        flash_bytes v;
        size_t len = (size_t)PQgetlength(res, r, col);
        if (t == FLASH__PG_BYTEA) {
            if (flash__pg_bytea(s, len, &v)) return *why = "value", 1;
            *owned = (void *)v.data;
        } else {
            v.data = s;
            v.len = len;
        }
        memcpy(p, &v, sizeof v);
        return 0;
    }
    default: break;
    }
    return *why = "value", 1;
}

/* A row that cannot be read: fail every key tuple it could belong to. */
static void flash__pg_reject(flash_pg *pg, flash_fetch *f, const PGresult *res, int r, int bad, const char *why) {
    const flash_model *m = flash_fetch_model(f);
    const flash_field *fd = &m->fields[bad];
    size_t nk = flash_fetch_nfields(f), j;
    flash_value kv[8];
    bool wild[8];
    void *kept[8] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    char msg[384];
    pg->stats.rejected++;
    if (strcmp(why, "NULL") == 0)
        snprintf(msg, sizeof msg, "postgres: %s.%s is NULL, but %s.%s is a non-null %s field", flash__pg_table(m),
                 fd->name, m->name, fd->name, flash_type_name(fd->type));
    else if (strcmp(why, "range") == 0)
        snprintf(msg, sizeof msg, "postgres: %s.%s = %.40s is out of range for %s.%s (%s)", flash__pg_table(m),
                 fd->name, PQgetvalue(res, r, bad), m->name, fd->name, flash_type_name(fd->type));
    else if (fd->type == FLASH_TIME || fd->type == FLASH_TIMEN)
        snprintf(msg, sizeof msg, "postgres: %s.%s = '%.40s' is not a finite %s for %s.%s (is DateStyle ISO?)",
                 flash__pg_table(m), fd->name, PQgetvalue(res, r, bad), flash_type_name(fd->type), m->name,
                 fd->name);
    else
        snprintf(msg, sizeof msg, "postgres: %s.%s = '%.40s' is not a valid %s for %s.%s", flash__pg_table(m),
                 fd->name, PQgetvalue(res, r, bad), flash_type_name(fd->type), m->name, fd->name);
    for (j = 0; j < nk; j++) {
        int col = flash_fetch_field(f, j);
        flash_field kf = m->fields[col];
        char tmp[sizeof(flash_bytes) + sizeof(double)];
        const char *w;
        void *owned = NULL;
        kf.offset = 0;
        wild[j] = false;
        memset(&kv[j], 0, sizeof kv[j]);
        if (flash__pg_read(res, r, col, &kf, tmp, &w, &owned) != 0) {
            if (w && strcmp(w, "NULL") == 0) kv[j] = flash_v_null(kf.type);
            else wild[j] = true;
            continue;
        }
        kv[j] = flash_field_value(kf.type, tmp);
        kept[j] = owned; /* freed after the matching */
    }
    flash_fetch_fail_where(f, kv, wild, FLASH_ESOURCE, msg);
    for (j = 0; j < nk; j++) free(kept[j]);
}

/* Answer a job's fetch from its result. */
/* COUNT (key columns, count) and EXISTS (DISTINCT key columns) results. */
static void flash__pg_answer_groups(flash_pg *pg, flash__pg_job *job, PGresult *res) {
    flash_fetch *f = job->f;
    const flash_model *m = flash_fetch_model(f);
    bool count = flash_fetch_class(f)->kind == FLASH_CLASS_COUNT;
    int nk = (int)flash_fetch_nfields(f), r, j, status = FLASH_OK;
    char *row;
    if (PQnfields(res) != nk + (count ? 1 : 0)) {
        flash__pg_finish(pg, job, FLASH_ESOURCE, "postgres: unexpected column count");
        return;
    }
    row = (char *)calloc(1, m->size ? m->size : 1);
    if (!row) {
        flash__pg_finish(pg, job, FLASH_ENOMEM, NULL);
        return;
    }
    for (r = 0; r < PQntuples(res) && status == FLASH_OK; r++) {
        void *owned[8];
        int nowned = 0, k, bad = 0;
        int64_t n = 1;
        pg->stats.rows++;
        memset(row, 0, m->size);
        for (j = 0; j < nk; j++) {
            const char *why = NULL;
            void *o = NULL;
            int rc = flash__pg_read(res, r, j, &m->fields[flash_fetch_field(f, j)], row, &why, &o);
            if (o) owned[nowned++] = o;
            if (rc < 0) status = FLASH_ENOMEM;
            else if (rc) bad = 1; /* a NULL in a non-null key column: no tuple asked for it */
        }
        if (count && flash__pg_parse_i64(PQgetvalue(res, r, nk), &n) != 0) bad = 1;
        if (status == FLASH_OK && !bad) flash_fetch_add_count(f, row, n);
        for (k = 0; k < nowned; k++) free(owned[k]);
    }
    free(row);
    flash__pg_finish(pg, job, status, status ? "postgres: out of memory reading rows" : NULL);
}

static void flash__pg_answer(flash_pg *pg, flash__pg_job *job, PGresult *res) {
    flash_fetch *f = job->f;
    const flash_model *m = flash_fetch_model(f);
    int nrows, r, i, status = FLASH_OK;
    char msg[512];
    char *row;
    msg[0] = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        flash__pg_msg(msg, sizeof msg, "postgres: ", PQresultErrorMessage(res));
        flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
        return;
    }
    if (flash_fetch_class(f)->kind == FLASH_CLASS_COUNT || flash_fetch_class(f)->kind == FLASH_CLASS_EXISTS) {
        flash__pg_answer_groups(pg, job, res);
        return;
    }
    if ((size_t)PQnfields(res) != m->nfields) {
        snprintf(msg, sizeof msg, "postgres: %s: %d columns for %zu fields", flash__pg_table(m), PQnfields(res),
                 m->nfields);
        flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
        return;
    }
    for (i = 0; i < PQnfields(res); i++) {
        const flash_field *fd = &m->fields[i];
        Oid t = PQftype(res, i);
        if (!flash__pg_compatible(fd->type, t)) {
            const char *tn = flash__pg_oid_name(t);
            char oid[24];
            snprintf(oid, sizeof oid, "type oid %u", (unsigned)t);
            snprintf(msg, sizeof msg, "postgres: %s.%s is %s, which does not map to %s.%s (%s)", flash__pg_table(m),
                     fd->name, tn ? tn : oid, m->name, fd->name, flash_type_name(fd->type));
            flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
            return;
        }
    }
    row = (char *)calloc(1, m->size ? m->size : 1);
    if (!row) {
        flash__pg_finish(pg, job, FLASH_ENOMEM, NULL);
        return;
    }
    nrows = PQntuples(res);
    for (r = 0; r < nrows && status == FLASH_OK; r++) {
        void *owned[64];
        size_t nowned = 0, k;
        int bad = -1;
        const char *why = NULL;
        pg->stats.rows++;
        memset(row, 0, m->size);
        for (i = 0; i < (int)m->nfields && bad < 0; i++) {
            void *o = NULL;
            int rc = flash__pg_read(res, r, i, &m->fields[i], row, &why, &o);
            if (o && nowned < sizeof owned / sizeof owned[0]) owned[nowned++] = o;
            else if (o) { /* more bytea fields than slots: keep going, leak-free */
                free(o);
                rc = -1;
            }
            if (rc < 0) status = FLASH_ENOMEM;
            else if (rc) bad = i;
        }
        if (status == FLASH_OK) {
            if (bad >= 0) flash__pg_reject(pg, f, res, r, bad, why);
            else flash_fetch_row(f, row);
        }
        for (k = 0; k < nowned; k++) free(owned[k]);
    }
    free(row);
    flash__pg_finish(pg, job, status, status ? "postgres: out of memory reading rows" : NULL);
}

static void flash__pg_write_answer(flash_pg *pg, flash__pg_job *job, PGresult *res);

/* A query (PREPARE or EXEC stage) has delivered all its results. */
static void flash__pg_stage_done(flash__pg_conn *c, PGresult *res) {
    flash_pg *pg = c->pg;
    flash__pg_job *job = c->job;
    char msg[512];
    if (PQstatus(c->conn) == CONNECTION_BAD) { /* the server went away meanwhile */
        const char *why = res ? PQresultErrorMessage(res) : PQerrorMessage(c->conn);
        flash__pg_msg(msg, sizeof msg, "", why);
        if (res) PQclear(res);
        flash__pg_lost(c, msg);
        return;
    }
    if (c->stage == FLASH__PG_PREPARE) {
        if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
            flash__pg_msg(msg, sizeof msg, "postgres: ", res ? PQresultErrorMessage(res) : PQerrorMessage(c->conn));
            if (res) PQclear(res);
            c->job = NULL;
            c->state = FLASH__PG_IDLE;
            flash__pg_stop_timer(c);
            flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
            flash__pg_kick(pg);
            return;
        }
        PQclear(res);
        pg->stats.prepares++;
        c->names[job->stmt] = c->pending_name;
        if (!flash__pg_send(c)) flash__pg_lost(c, PQerrorMessage(c->conn));
        return;
    }
    /* EXEC */
    c->job = NULL;
    c->state = FLASH__PG_IDLE;
    c->served++;
    flash__pg_stop_timer(c);
    if (!res) {
        flash__pg_msg(msg, sizeof msg, "postgres: ", PQerrorMessage(c->conn));
        flash__pg_finish(pg, job, FLASH_ESOURCE, msg);
    } else {
        if (PQresultStatus(res) != PGRES_TUPLES_OK) c->names[job->stmt] = 0; /* re-prepare next time */
        if (job->w) flash__pg_write_answer(pg, job, res);
        else if (job->f) flash__pg_answer(pg, job, res);
        else flash__pg_job_free(job); /* cancelled: discard */
        PQclear(res);
    }
    flash__pg_kick(pg);
}

static void flash__pg_on_io(void *arg, int events) {
    flash__pg_conn *c = (flash__pg_conn *)arg;
    if (c->state == FLASH__PG_CONNECTING) {
        flash__pg_connect_step(c);
        return;
    }
    if (c->state == FLASH__PG_IDLE) { /* nothing asked: the server closing, or a notice */
        if (!PQconsumeInput(c->conn) || PQstatus(c->conn) == CONNECTION_BAD) {
            flash_pg *pg = c->pg;
            flash__pg_close(c);
            pg->stats.lost++;
            flash__pg_kick(pg);
        }
        return;
    }
    if (c->state != FLASH__PG_BUSY) return;
    if ((events & FLASH_IO_WRITE) && (c->events & FLASH_IO_WRITE) && !flash__pg_flush(c)) {
        flash__pg_lost(c, PQerrorMessage(c->conn));
        return;
    }
    if (!(events & FLASH_IO_READ)) return;
    if (!PQconsumeInput(c->conn)) {
        flash__pg_lost(c, PQerrorMessage(c->conn));
        return;
    }
    if ((c->events & FLASH_IO_WRITE) && !flash__pg_flush(c)) {
        flash__pg_lost(c, PQerrorMessage(c->conn));
        return;
    }
    while (!PQisBusy(c->conn)) {
        PGresult *res = PQgetResult(c->conn);
        if (!res) { /* this stage is complete */
            PGresult *kept = c->res;
            c->res = NULL;
            flash__pg_stage_done(c, kept);
            return;
        }
        if (!c->res) c->res = res;
        else if (PQresultStatus(res) == PGRES_FATAL_ERROR) { /* the rows came, then the COMMIT failed */
            PQclear(c->res);
            c->res = res;
        } else PQclear(res); /* one statement, one result: ignore extras */
    }
}

/* ---- the source ---- */

static void flash__pg_fetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    flash_pg *pg = (flash_pg *)self;
    const flash_model *m = flash_fetch_model(f);
    size_t n = flash_fetch_count(f), nk = flash_fetch_nfields(f), i, j;
    bool nulls = false;
    flash__pg_job *job;
    long stmt;
    (void)ctx;
    pg->stats.fetches++;
    for (i = 0; i < n && !nulls; i++)
        for (j = 0; j < nk; j++) nulls = nulls || flash_fetch_key(f, i)[j].is_null;
    stmt = flash__pg_stmt_for(pg, f, nulls);
    job = stmt >= 0 ? (flash__pg_job *)calloc(1, sizeof *job) : NULL;
    if (!job) {
        flash_fetch_done(f, FLASH_ENOMEM, NULL);
        return;
    }
    job->f = f;
    job->stmt = (size_t)stmt;
    job->nparams = (int)nk;
    for (j = 0; j < nk; j++) {
        flash_strbuf b;
        bool first = true;
        memset(&b, 0, sizeof b);
        flash_strbuf_put(&b, "{", 1);
        for (i = 0; i < n; i++) {
            const flash_value *key = flash_fetch_key(f, i);
            if (nk == 1 && key[0].is_null) continue; /* single field: the IS NULL branch */
            if (!first) flash_strbuf_put(&b, ",", 1);
            first = false;
            /* one field: timestamps as text; several: microseconds (int8) */
            flash__pg_elem(&b, &key[j], nk == 1 ? m->fields[flash_fetch_field(f, 0)].type : FLASH_I64);
        }
        flash_strbuf_put(&b, "}", 1);
        job->params[j] = b.data;
        if (b.oom) {
            free(b.data);
            job->params[j] = NULL;
            job->nparams = (int)j;
            flash__pg_job_free(job);
            flash_fetch_done(f, FLASH_ENOMEM, NULL);
            return;
        }
    }
    flash__pg_push(pg, job, false);
    flash__pg_kick(pg);
}

/* Forget the job of fetch f or of write w (the other is NULL): a queued one
   goes, one in flight has its result discarded. */
static void flash__pg_forget(flash_pg *pg, const flash_fetch *f, const flash_write *w) {
    flash__pg_job **pp, *job;
    size_t i;
    for (i = 0; i < pg->nconns; i++) {
        job = pg->conns[i].job;
        if (job && ((f && job->f == f) || (w && job->w == w))) {
            if (f) job->f = NULL;
            else job->w = NULL;
            pg->stats.canceled++;
            return;
        }
    }
    for (pp = &pg->head; (job = *pp) != NULL; pp = &job->next) {
        if (!((f && job->f == f) || (w && job->w == w))) continue;
        *pp = job->next;
        if (pg->tail == job) {
            flash__pg_job *t = pg->head;
            while (t && t->next) t = t->next;
            pg->tail = t;
        }
        pg->stats.queued--;
        pg->stats.canceled++;
        flash__pg_job_free(job);
        return;
    }
}

static void flash__pg_cancel(void *self, flash_fetch *f) { flash__pg_forget((flash_pg *)self, f, NULL); }

/* ---- writes (flash_save / flash_delete) ---- */

/* A value as a JSON member value, read by json_populate_recordset with the
   column's own input function: numbers as JSON numbers (float specials as
   strings), text and bytea ("\\x0102") and timestamps (UTC text, typed
   by the column: timestamp, timestamptz or date) as JSON strings. */
static void flash__pg_json_str(flash_strbuf *b, const char *p, size_t n) {
    size_t i;
    flash_strbuf_put(b, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '"' || c == '\\') {
            char e[2];
            e[0] = '\\';
            e[1] = (char)c;
            flash_strbuf_put(b, e, 2);
        } else if (c < 0x20) {
            char e[8];
            snprintf(e, sizeof e, "\\u%04x", (unsigned)c);
            flash_strbuf_puts(b, e);
        } else {
            flash_strbuf_put(b, (const char *)&p[i], 1);
        }
    }
    flash_strbuf_put(b, "\"", 1);
}

static void flash__pg_json(flash_strbuf *b, const flash_value *v, flash_type field) {
    char tmp[80];
    static const char hex[] = "0123456789abcdef";
    size_t i;
    if (v->is_null || ((v->type == FLASH_STR || v->type == FLASH_BYTES) && !v->u.s.ptr)) {
        flash_strbuf_puts(b, "null");
        return;
    }
    if ((field == FLASH_TIME || field == FLASH_TIMEN) && v->type == FLASH_I64) {
        flash__pg_time_text(v->u.i64, tmp, sizeof tmp);
        flash__pg_json_str(b, tmp, strlen(tmp));
        return;
    }
    switch (v->type) {
    case FLASH_I64: snprintf(tmp, sizeof tmp, "%lld", (long long)v->u.i64); flash_strbuf_puts(b, tmp); return;
    case FLASH_I32: snprintf(tmp, sizeof tmp, "%ld", (long)v->u.i32); flash_strbuf_puts(b, tmp); return;
    case FLASH_BOOL: flash_strbuf_puts(b, v->u.b ? "true" : "false"); return;
    case FLASH_F64:
        if (v->u.f64 != v->u.f64) flash_strbuf_puts(b, "\"NaN\"");
        else if (v->u.f64 > DBL_MAX) flash_strbuf_puts(b, "\"Infinity\"");
        else if (v->u.f64 < -DBL_MAX) flash_strbuf_puts(b, "\"-Infinity\"");
        else {
            snprintf(tmp, sizeof tmp, "%.17g", v->u.f64);
            flash_strbuf_puts(b, tmp);
        }
        return;
    case FLASH_STR: flash__pg_json_str(b, v->u.s.ptr, v->u.s.len); return;
    case FLASH_BYTES:
        flash_strbuf_puts(b, "\"\\\\x");
        for (i = 0; i < v->u.s.len; i++) {
            unsigned char c = (unsigned char)v->u.s.ptr[i];
            char h[2];
            h[0] = hex[c >> 4];
            h[1] = hex[c & 15];
            flash_strbuf_put(b, h, 2);
        }
        flash_strbuf_put(b, "\"", 1);
        return;
    default: flash_strbuf_puts(b, "null"); return;
    }
}

static void flash__pg_cols(flash_strbuf *b, const flash_model *m, const char *qual) {
    size_t i;
    for (i = 0; i < m->nfields; i++) {
        if (i) flash_strbuf_puts(b, ",");
        if (qual) flash_strbuf_puts(b, qual);
        flash_sql_ident(b, m->fields[i].name, false);
    }
}

/* One statement per write batch (its own transaction):
     save    WITH flash_new AS (SELECT * FROM json_populate_recordset(NULL::"t", $1::json)),
                  flash_old AS (SELECT <cols> FROM "t" WHERE "id" IN (SELECT "id" FROM flash_new) FOR UPDATE),
                  flash_up AS (INSERT INTO "t" (<cols>) SELECT <cols> FROM flash_new
                               ON CONFLICT ("id") DO UPDATE SET "c" = EXCLUDED."c", ... RETURNING 1)
             SELECT <cols> FROM flash_old
     delete  DELETE FROM "t" WHERE "id" IN (SELECT "id" FROM json_populate_recordset(NULL::"t", $1::json))
             RETURNING <cols>
   The CTEs share one snapshot: flash_old holds the rows as they were before
   the upsert (and locks them first: the primary query reads it, the upsert
   runs after). */
static long flash__pg_wstmt_for(flash_pg *pg, const flash_model *m, int kind) {
    flash__pg_stmt *st;
    flash_strbuf b;
    const char *pk = m->fields[m->opts.pk].name;
    size_t i;
    bool first = true;
    for (i = 0; i < pg->nstmts; i++)
        if (pg->stmts[i].write == kind && pg->stmts[i].model == m) return (long)i;
    if (pg->nstmts == pg->stmts_cap) {
        size_t cap = pg->stmts_cap ? pg->stmts_cap * 2 : 8;
        flash__pg_stmt *n = (flash__pg_stmt *)realloc(pg->stmts, cap * sizeof *n);
        if (!n) return -1;
        pg->stmts = n;
        pg->stmts_cap = cap;
    }
    memset(&b, 0, sizeof b);
    if (kind == FLASH_WRITE_SAVE) {
        flash_strbuf_puts(&b, "WITH flash_new AS (SELECT * FROM json_populate_recordset(NULL::");
        flash_sql_ident(&b, flash__pg_table(m), true);
        flash_strbuf_puts(&b, ", $1::json)), flash_old AS (SELECT ");
        flash__pg_cols(&b, m, NULL);
        flash_strbuf_puts(&b, " FROM ");
        flash_sql_ident(&b, flash__pg_table(m), true);
        flash_strbuf_puts(&b, " WHERE ");
        flash_sql_ident(&b, pk, false);
        flash_strbuf_puts(&b, " IN (SELECT ");
        flash_sql_ident(&b, pk, false);
        flash_strbuf_puts(&b, " FROM flash_new) FOR UPDATE), flash_up AS (INSERT INTO ");
        flash_sql_ident(&b, flash__pg_table(m), true);
        flash_strbuf_puts(&b, " (");
        flash__pg_cols(&b, m, NULL);
        flash_strbuf_puts(&b, ") SELECT ");
        flash__pg_cols(&b, m, NULL);
        flash_strbuf_puts(&b, " FROM flash_new ON CONFLICT (");
        flash_sql_ident(&b, pk, false);
        flash_strbuf_puts(&b, ") DO ");
        for (i = 0; i < m->nfields; i++) {
            if ((int)i == m->opts.pk) continue;
            flash_strbuf_puts(&b, first ? "UPDATE SET " : ", ");
            first = false;
            flash_sql_ident(&b, m->fields[i].name, false);
            flash_strbuf_puts(&b, " = EXCLUDED.");
            flash_sql_ident(&b, m->fields[i].name, false);
        }
        if (first) flash_strbuf_puts(&b, "NOTHING");
        flash_strbuf_puts(&b, " RETURNING 1) SELECT ");
        flash__pg_cols(&b, m, NULL);
        flash_strbuf_puts(&b, " FROM flash_old");
    } else {
        flash_strbuf_puts(&b, "DELETE FROM ");
        flash_sql_ident(&b, flash__pg_table(m), true);
        flash_strbuf_puts(&b, " WHERE ");
        flash_sql_ident(&b, pk, false);
        flash_strbuf_puts(&b, " IN (SELECT ");
        flash_sql_ident(&b, pk, false);
        flash_strbuf_puts(&b, " FROM json_populate_recordset(NULL::");
        flash_sql_ident(&b, flash__pg_table(m), true);
        flash_strbuf_puts(&b, ", $1::json)) RETURNING ");
        flash__pg_cols(&b, m, NULL);
    }
    if (b.oom) {
        free(b.data);
        return -1;
    }
    st = &pg->stmts[pg->nstmts];
    memset(st, 0, sizeof *st);
    st->model = m;
    st->write = kind;
    st->sql = b.data;
    return (long)pg->nstmts++;
}

static bool flash__pg_same(const flash_value *a, const flash_value *b) {
    if (a->is_null || b->is_null) return a->is_null && b->is_null;
    switch (a->type) {
    case FLASH_I64:
        if (b->type == FLASH_I32) return a->u.i64 == b->u.i32;
        return b->type == FLASH_I64 && a->u.i64 == b->u.i64;
    case FLASH_I32:
        if (b->type == FLASH_I64) return a->u.i32 == b->u.i64;
        return b->type == FLASH_I32 && a->u.i32 == b->u.i32;
    case FLASH_F64: return b->type == FLASH_F64 && a->u.f64 == b->u.f64;
    case FLASH_BOOL: return b->type == FLASH_BOOL && a->u.b == b->u.b;
    case FLASH_STR:
    case FLASH_BYTES:
        return b->type == a->type && a->u.s.len == b->u.s.len &&
               (a->u.s.len == 0 || memcmp(a->u.s.ptr, b->u.s.ptr, a->u.s.len) == 0);
    default: return false;
    }
}

/* The old rows (flash_old, or DELETE's RETURNING): each to the write rows
   of its primary key; then commit is known: flash_write_done. */
static void flash__pg_write_answer(flash_pg *pg, flash__pg_job *job, PGresult *res) {
    flash_write *w = job->w;
    const flash_model *m = flash_write_model(w);
    size_t n = flash_write_count(w), k;
    int nrows, r, i, status = FLASH_OK;
    char msg[512];
    char *row;
    msg[0] = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        flash__pg_msg(msg, sizeof msg, "postgres: ", PQresultErrorMessage(res));
        flash__pg_finish(pg, job, FLASH_ESOURCE, msg); /* the statement's transaction rolled back */
        return;
    }
    /* The statement committed: from here on the write must invalidate, even
       when an old row cannot be read (then: invalidate what is known, and
       say so). */
    if ((size_t)PQnfields(res) != m->nfields) {
        snprintf(msg, sizeof msg, "postgres: %s: %d columns for %zu fields", flash__pg_table(m), PQnfields(res),
                 m->nfields);
        status = FLASH_ESOURCE;
    }
    for (i = 0; status == FLASH_OK && i < PQnfields(res); i++)
        if (!flash__pg_compatible(m->fields[i].type, PQftype(res, i))) {
            snprintf(msg, sizeof msg, "postgres: %s.%s does not map to %s.%s (%s)", flash__pg_table(m),
                     m->fields[i].name, m->name, m->fields[i].name, flash_type_name(m->fields[i].type));
            status = FLASH_ESOURCE;
        }
    row = (char *)calloc(1, m->size ? m->size : 1);
    if (!row) status = FLASH_ENOMEM;
    nrows = status == FLASH_OK ? PQntuples(res) : 0;
    for (r = 0; r < nrows && status == FLASH_OK; r++) {
        void *owned[64];
        size_t nowned = 0, j;
        const char *why = NULL;
        flash_value pk;
        pg->stats.rows++;
        memset(row, 0, m->size);
        for (i = 0; i < (int)m->nfields && status == FLASH_OK; i++) {
            void *o = NULL;
            int rc = flash__pg_read(res, r, i, &m->fields[i], row, &why, &o);
            if (o && nowned < sizeof owned / sizeof owned[0]) owned[nowned++] = o;
            else if (o) {
                free(o);
                rc = -1;
            }
            if (rc < 0) status = FLASH_ENOMEM;
            else if (rc) {
                snprintf(msg, sizeof msg, "postgres: the old row's %s.%s = '%.40s' cannot be read (%s)",
                         flash__pg_table(m), m->fields[i].name, PQgetvalue(res, r, i), why ? why : "value");
                status = FLASH_ESOURCE;
            }
        }
        if (status == FLASH_OK) {
            pk = flash_row_value(m, row, m->opts.pk);
            for (k = 0; k < n && status == FLASH_OK; k++) {
                flash_value x = flash_row_value(m, flash_write_row(w, k), m->opts.pk);
                if (flash__pg_same(&pk, &x)) status = flash_write_set_old(w, k, row);
            }
        }
        for (j = 0; j < nowned; j++) free(owned[j]);
    }
    free(row);
    if (status == FLASH_OK) pg->stats.write_rows += n;
    flash__pg_job_free(job);
    if (status == FLASH_OK) {
        flash_write_done(w, FLASH_OK, NULL);
        return;
    }
    /* Committed, but an old row is unknown: its keys cannot be invalidated.
       Invalidate the rest (done with 0), after logging why. */
    pg->stats.errors++;
    flash_ctx_log(flash_write_ctx(w), FLASH_LOG_ERROR, "%s (the write is committed; keys of that old row may stay stale)",
                  msg[0] ? msg : "postgres: out of memory reading the old rows");
    flash_write_done(w, FLASH_OK, NULL);
}

static void flash__pg_write_cancel(void *self, flash_write *w) { flash__pg_forget((flash_pg *)self, NULL, w); }

static void flash__pg_write(void *self, flash_ctx *ctx, flash_write *w) {
    flash_pg *pg = (flash_pg *)self;
    const flash_model *m = flash_write_model(w);
    bool save = flash_write_kind_of(w) == FLASH_WRITE_SAVE;
    size_t n = flash_write_count(w), i, j;
    flash__pg_job *job;
    flash_strbuf b;
    long stmt;
    (void)ctx;
    pg->stats.writes++;
    stmt = flash__pg_wstmt_for(pg, m, save ? FLASH_WRITE_SAVE : FLASH_WRITE_DELETE);
    job = stmt >= 0 ? (flash__pg_job *)calloc(1, sizeof *job) : NULL;
    if (!job) {
        flash_write_done(w, FLASH_ENOMEM, "postgres: out of memory");
        return;
    }
    /* The rows: one JSON array of objects (column: value), one parameter. */
    memset(&b, 0, sizeof b);
    flash_strbuf_put(&b, "[", 1);
    for (i = 0; i < n; i++) {
        const void *row = flash_write_row(w, i);
        bool first = true;
        flash_strbuf_puts(&b, i ? ",{" : "{");
        for (j = 0; j < m->nfields; j++) {
            flash_value v;
            if (!save && (int)j != m->opts.pk) continue; /* a delete reads only the primary key */
            v = flash_row_value(m, row, (int)j);
            if (!first) flash_strbuf_put(&b, ",", 1);
            first = false;
            flash__pg_json_str(&b, m->fields[j].name, strlen(m->fields[j].name));
            flash_strbuf_put(&b, ":", 1);
            flash__pg_json(&b, &v, m->fields[j].type);
        }
        flash_strbuf_put(&b, "}", 1);
    }
    flash_strbuf_put(&b, "]", 1);
    if (b.oom) {
        free(b.data);
        free(job);
        flash_write_done(w, FLASH_ENOMEM, "postgres: out of memory");
        return;
    }
    job->w = w;
    job->is_write = true;
    job->stmt = (size_t)stmt;
    job->nparams = 1;
    job->params[0] = b.data;
    flash_write_on_cancel(w, flash__pg_write_cancel, pg);
    flash__pg_push(pg, job, false);
    flash__pg_kick(pg);
}

static const flash_source_vtable flash__pg_vt = {"postgres", flash__pg_fetch, flash__pg_cancel, flash__pg_write};

FLASH_API flash_source flash_pg_source(flash_pg *pg) {
    flash_source s;
    s.vt = &flash__pg_vt;
    s.self = pg;
    return s;
}

FLASH_API flash_pg *flash_pg_create(const flash_pg_desc *desc, int *err) {
    flash_pg *pg;
    PQconninfoOption *opts;
    char *perr = NULL;
    size_t i, len;
    if (err) *err = FLASH_EINVAL;
    if (!desc || !desc->conninfo || !desc->loop.vt || !desc->loop.vt->io_start || !desc->loop.vt->timer) return NULL;
    opts = PQconninfoParse(desc->conninfo, &perr);
    if (perr) PQfreemem(perr);
    if (!opts) return NULL;
    PQconninfoFree(opts);
    if (err) *err = FLASH_ENOMEM;
    pg = (flash_pg *)calloc(1, sizeof *pg);
    if (!pg) return NULL;
    pg->desc = *desc;
    if (!pg->desc.connections) pg->desc.connections = 1;
    if (!pg->desc.connect_timeout_ms) pg->desc.connect_timeout_ms = 2000;
    if (!pg->desc.query_timeout_ms) pg->desc.query_timeout_ms = 5000;
    if (!pg->desc.retry_interval_ms) pg->desc.retry_interval_ms = 1000;
    pg->loop = desc->loop;
    len = strlen(desc->conninfo) + 1;
    pg->conninfo = (char *)malloc(len);
    pg->nconns = pg->desc.connections;
    pg->conns = (flash__pg_conn *)calloc(pg->nconns, sizeof *pg->conns);
    if (!pg->conninfo || !pg->conns) {
        free(pg->conninfo);
        free(pg->conns);
        free(pg);
        return NULL;
    }
    memcpy(pg->conninfo, desc->conninfo, len);
    pg->desc.conninfo = pg->conninfo;
    for (i = 0; i < pg->nconns; i++) {
        pg->conns[i].pg = pg;
        pg->conns[i].fd = -1;
    }
    if (err) *err = FLASH_OK;
    return pg;
}

FLASH_API flash_pg *flash_pg_source_create(const char *conninfo, flash_loop loop, int *err) {
    flash_pg_desc d;
    memset(&d, 0, sizeof d);
    d.conninfo = conninfo;
    d.loop = loop;
    return flash_pg_create(&d, err);
}

FLASH_API void flash_pg_destroy(flash_pg *pg) {
    size_t i;
    if (!pg) return;
    pg->kicking = true; /* no dispatch from here on */
    for (i = 0; i < pg->nconns; i++) {
        flash__pg_conn *c = &pg->conns[i];
        flash__pg_job *job = c->job;
        c->job = NULL;
        flash__pg_close(c);
        if (job) flash__pg_finish(pg, job, FLASH_ECANCELED, "postgres: source destroyed");
        free(c->names);
    }
    flash__pg_fail_queue(pg, FLASH_ECANCELED, "postgres: source destroyed");
    if (pg->down_timer) pg->loop.vt->cancel(pg->loop.native, pg->down_timer);
    for (i = 0; i < pg->nstmts; i++) free(pg->stmts[i].sql);
    free(pg->stmts);
    free(pg->conns);
    free(pg->conninfo);
    free(pg);
}

FLASH_API flash_pg_stats flash_pg_stats_get(const flash_pg *pg) {
    flash_pg_stats z;
    if (pg) return pg->stats;
    memset(&z, 0, sizeof z);
    return z;
}

FLASH_API const char *flash_pg_last_error(const flash_pg *pg) { return pg ? pg->last_error : ""; }

#endif /* FLASH_POSTGRES_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
