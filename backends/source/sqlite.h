/* backends/source/sqlite.h — an SQLite database as a flash source.

   Reads misses from SQLite with ONE statement per class per batch, generated
   from the model's field table: the table is the model's opts.table (default:
   its name), the columns are its field names, in field order.

       sqlite3 *db;
       sqlite3_open("app.db", &db);
       flash_sqlite *sq = flash_sqlite_create(db);        // does not own db
       flash_ctx_set_source(ctx, NULL, flash_sqlite_source(sq));
       ...
       flash_ctx_destroy(ctx);
       flash_sqlite_destroy(sq);                          // finalizes its statements
       sqlite3_close(db);

   SQL (identifiers double-quoted; every key value is bound, never spliced)
     one key field      SELECT "id","slug","title" FROM "events" WHERE "slug" IN (?,?,?,?)
     several fields     SELECT ... FROM "participants" WHERE ("user","event") IN (VALUES (?,?),(?,?))
     a key with a NULL  SELECT ... FROM "users" WHERE "first_name" IS ?          (one per such key)
   The number of tuples is rounded up to a power of two (the last tuple is
   repeated as padding), so a handful of statements per key set are prepared
   once and cached; batches over max_keys tuples (default 1024, capped by
   SQLite's variable limit) are split into several statements.

   TYPES (column value -> field)
     I64, I32   INTEGER (I32: within range)          NULL: the row is rejected
     F64        REAL or INTEGER                      NULL: rejected
     BOOL       INTEGER (non-zero is true)           NULL: rejected
     STR        TEXT                                 NULL: a NULL pointer
     BYTES      BLOB or TEXT                         NULL: {NULL, 0}
     TIME       TEXT: ISO-8601 as flash_time_parse reads it ('YYYY-MM-DD',
                'YYYY-MM-DD HH:MM:SS[.ffffff]', 'T' separator, 'Z' or +HH:MM
                offsets; no offset: UTC); INTEGER: unix seconds. REAL (a
                Julian day? fractional seconds?) is a mismatch. NULL: rejected
     I64N, I32N, F64N, BOOLN, TIMEN   as their base type; NULL: .null = true
   Any other storage class is a type mismatch. Key values are bound as their
   type; a TIME key as the text 'YYYY-MM-DD HH:MM:SS[.ffffff]' (UTC), so it
   matches rows storing that text (SQLite's datetime() form), not other forms. A rejected row fails the key(s)
   it would have answered with FLASH_ESOURCE and a message naming the table and
   column; the other keys of the batch are answered. An SQLite error (no such
   table, I/O, SQLITE_BUSY after the connection's busy timeout) fails the
   keys not yet answered with FLASH_ESOURCE and sqlite3_errmsg.

   LIMITS
     SQLite is synchronous: a fetch runs (and answers) inside the call and
     blocks the loop while it reads. Set sqlite3_busy_timeout() yourself.
     Rows are matched to keys by their field values (byte equality): use the
     default BINARY collation on key columns. Column names are the field
     names: rename with a VIEW. One thread at a time per flash_sqlite.

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
   LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_SQLITE_H
#define FLASH_SQLITE_H
#include "../../flash.h"
#include <sqlite3.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_sqlite flash_sqlite;

/* Counters (cumulative). */
typedef struct flash_sqlite_stats {
    uint64_t fetches;    /* fetch calls (one per class per batch) */
    uint64_t statements; /* statement executions */
    uint64_t prepares;   /* statements prepared (statement-cache misses) */
    uint64_t rows;       /* rows read */
    uint64_t rejected;   /* rows rejected: NULL in a non-null field, type mismatch */
    uint64_t errors;     /* fetches failed by an SQLite error */
} flash_sqlite_stats;

/* NULL when db is NULL or out of memory. The database is not owned. */
FLASH_API flash_sqlite *flash_sqlite_create(sqlite3 *db);
/* Finalizes the cached statements: call before sqlite3_close. */
FLASH_API void flash_sqlite_destroy(flash_sqlite *s);
FLASH_API flash_source flash_sqlite_source(flash_sqlite *s);
FLASH_API sqlite3 *flash_sqlite_db(const flash_sqlite *s);
FLASH_API flash_sqlite_stats flash_sqlite_stats_get(const flash_sqlite *s);
/* Key tuples per statement (rounded down to a power of two, at least 1);
   default 1024. Larger batches are split. */
FLASH_API void flash_sqlite_set_max_keys(flash_sqlite *s, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_SQLITE_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_SQLITE_IMPLEMENTED
#define FLASH_SQLITE_IMPLEMENTED
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A cached statement: one per (model, key fields, tuples); tuples 0 is the
   NULL-key form (k1 IS ? AND ...). */
typedef struct flash__sq_stmt {
    struct flash__sq_stmt *next;
    const flash_model *model;
    const flash_class *shape; /* a class of its own SQL (order, limit, count, exists), or NULL */
    size_t nkeys;
    int keys[8];
    size_t tuples;
    sqlite3_stmt *stmt;
} flash__sq_stmt;

struct flash_sqlite {
    sqlite3 *db;
    flash__sq_stmt *stmts;
    size_t max_keys;
    flash_sqlite_stats stats;
};

FLASH_API flash_sqlite *flash_sqlite_create(sqlite3 *db) {
    flash_sqlite *s;
    if (!db) return NULL;
    s = (flash_sqlite *)calloc(1, sizeof *s);
    if (!s) return NULL;
    s->db = db;
    s->max_keys = 1024;
    return s;
}

FLASH_API void flash_sqlite_destroy(flash_sqlite *s) {
    if (!s) return;
    while (s->stmts) {
        flash__sq_stmt *st = s->stmts;
        s->stmts = st->next;
        sqlite3_finalize(st->stmt);
        free(st);
    }
    free(s);
}

FLASH_API sqlite3 *flash_sqlite_db(const flash_sqlite *s) { return s ? s->db : NULL; }

FLASH_API flash_sqlite_stats flash_sqlite_stats_get(const flash_sqlite *s) {
    flash_sqlite_stats z;
    if (s) return s->stats;
    memset(&z, 0, sizeof z);
    return z;
}

FLASH_API void flash_sqlite_set_max_keys(flash_sqlite *s, size_t n) {
    size_t p = 1;
    if (!s) return;
    while (p * 2 <= n) p *= 2;
    s->max_keys = p;
}

/* The class a statement is made for when its SQL is its own (order_by,
   limit, COUNT's GROUP BY, EXISTS' DISTINCT), else NULL: the plain SELECT
   shared by every class of those key fields. */
static const flash_class *flash__sq_shape(const flash_class *c) {
    if (c->kind == FLASH_CLASS_COUNT || c->kind == FLASH_CLASS_EXISTS || c->norder) return c;
    return NULL;
}

static void flash__sq_columns(flash_strbuf *b, const flash_model *m) {
    size_t i;
    for (i = 0; i < m->nfields; i++) {
        if (i) flash_strbuf_puts(b, ",");
        flash_sql_ident(b, m->fields[i].name, false);
    }
}

static void flash__sq_keys(flash_strbuf *b, const flash_fetch *f) {
    size_t j;
    for (j = 0; j < flash_fetch_nfields(f); j++) {
        if (j) flash_strbuf_puts(b, ",");
        flash_sql_ident(b, flash_fetch_model(f)->fields[flash_fetch_field(f, j)].name, false);
    }
}

/* The class's order (NULLs last ascending, first descending: flash.h's). */
static void flash__sq_order(flash_strbuf *b, const flash_class *c) {
    size_t k;
    for (k = 0; k < c->norder; k++) {
        if (k) flash_strbuf_puts(b, ",");
        flash_sql_ident(b, c->model->fields[c->order[k]].name, false);
        flash_strbuf_puts(b, c->order_desc[k] ? " DESC NULLS FIRST" : " ASC NULLS LAST");
    }
}

/* The statement for (model, key fields, tuples), prepared on first use. */
static int flash__sq_get(flash_sqlite *s, const flash_fetch *f, size_t tuples, sqlite3_stmt **out, bool *owned,
                         char *err, size_t errcap) {
    const flash_model *m = flash_fetch_model(f);
    const flash_class *c = flash_fetch_class(f), *shape = flash__sq_shape(c);
    size_t nk = flash_fetch_nfields(f), i, j;
    flash__sq_stmt *st, **pp;
    flash_strbuf b;
    int rc;
    *owned = false;
    for (pp = &s->stmts; (st = *pp) != NULL; pp = &st->next) {
        if (st->model != m || st->shape != shape || st->nkeys != nk || st->tuples != tuples) continue;
        for (j = 0; j < nk && st->keys[j] == flash_fetch_field(f, j); j++) {
        }
        if (j < nk) continue;
        if (pp != &s->stmts) { /* move to the front: the hot ones stay first */
            *pp = st->next;
            st->next = s->stmts;
            s->stmts = st;
        }
        if (!sqlite3_stmt_busy(st->stmt)) {
            *out = st->stmt;
            return FLASH_OK;
        }
        break; /* in use further up the stack (re-entered): prepare a private one */
    }
    memset(&b, 0, sizeof b);
    if (shape && shape->opts.limit) { /* the first rows of each key: a window */
        flash_strbuf_puts(&b, "SELECT ");
        flash__sq_columns(&b, m);
        flash_strbuf_puts(&b, " FROM (");
    }
    flash_strbuf_puts(&b, "SELECT ");
    if (shape && shape->kind == FLASH_CLASS_EXISTS) flash_strbuf_puts(&b, "DISTINCT ");
    if (shape && (shape->kind == FLASH_CLASS_COUNT || shape->kind == FLASH_CLASS_EXISTS)) {
        flash__sq_keys(&b, f);
        if (shape->kind == FLASH_CLASS_COUNT) flash_strbuf_puts(&b, ",COUNT(*)");
    } else {
        flash__sq_columns(&b, m);
    }
    if (shape && shape->opts.limit) {
        flash_strbuf_puts(&b, ",ROW_NUMBER() OVER (PARTITION BY ");
        flash__sq_keys(&b, f);
        flash_strbuf_puts(&b, " ORDER BY ");
        flash__sq_order(&b, shape);
        flash_strbuf_puts(&b, ") AS \"flash__rn\"");
    }
    flash_strbuf_puts(&b, " FROM ");
    flash_sql_ident(&b, m->opts.table ? m->opts.table : m->name, true);
    flash_strbuf_puts(&b, " WHERE ");
    if (tuples == 0) {
        for (j = 0; j < nk; j++) {
            if (j) flash_strbuf_puts(&b, " AND ");
            flash_sql_ident(&b, m->fields[flash_fetch_field(f, j)].name, false);
            flash_strbuf_puts(&b, " IS ?");
        }
    } else {
        if (nk > 1) flash_strbuf_puts(&b, "(");
        for (j = 0; j < nk; j++) {
            if (j) flash_strbuf_puts(&b, ",");
            flash_sql_ident(&b, m->fields[flash_fetch_field(f, j)].name, false);
        }
        flash_strbuf_puts(&b, nk > 1 ? ") IN (VALUES " : " IN (");
        for (i = 0; i < tuples; i++) {
            if (i) flash_strbuf_puts(&b, ",");
            if (nk > 1) flash_strbuf_puts(&b, "(");
            for (j = 0; j < nk; j++) flash_strbuf_puts(&b, j ? ",?" : "?");
            if (nk > 1) flash_strbuf_puts(&b, ")");
        }
        flash_strbuf_puts(&b, ")");
    }
    if (shape && (shape->kind == FLASH_CLASS_COUNT || shape->kind == FLASH_CLASS_EXISTS)) {
        if (shape->kind == FLASH_CLASS_COUNT) {
            flash_strbuf_puts(&b, " GROUP BY ");
            flash__sq_keys(&b, f);
        }
    } else if (shape && shape->opts.limit) {
        char lim[32];
        snprintf(lim, sizeof lim, "%lu", (unsigned long)shape->opts.limit);
        flash_strbuf_puts(&b, ") WHERE \"flash__rn\" <= ");
        flash_strbuf_puts(&b, lim);
        flash_strbuf_puts(&b, " ORDER BY \"flash__rn\"");
    } else if (shape) {
        flash_strbuf_puts(&b, " ORDER BY ");
        flash__sq_order(&b, shape);
    }
    if (b.oom) {
        free(b.data);
        return FLASH_ENOMEM;
    }
    *out = NULL;
    rc = sqlite3_prepare_v3(s->db, b.data, (int)b.len + 1, SQLITE_PREPARE_PERSISTENT, out, NULL);
    free(b.data);
    if (rc != SQLITE_OK) {
        snprintf(err, errcap, "sqlite: %s: %s", m->opts.table ? m->opts.table : m->name, sqlite3_errmsg(s->db));
        sqlite3_finalize(*out);
        *out = NULL;
        return FLASH_ESOURCE;
    }
    s->stats.prepares++;
    if (st) { /* the cached one is busy: use this one once */
        *owned = true;
        return FLASH_OK;
    }
    st = (flash__sq_stmt *)calloc(1, sizeof *st);
    if (!st) {
        *owned = true; /* still usable, just not cached */
        return FLASH_OK;
    }
    st->model = m;
    st->shape = shape;
    st->nkeys = nk;
    for (j = 0; j < nk; j++) st->keys[j] = flash_fetch_field(f, j);
    st->tuples = tuples;
    st->stmt = *out;
    st->next = s->stmts;
    s->stmts = st;
    return FLASH_OK;
}

static int flash__sq_bind(sqlite3_stmt *st, int at, const flash_value *v, flash_type field) {
    if (v->is_null) return sqlite3_bind_null(st, at);
    if ((field == FLASH_TIME || field == FLASH_TIMEN) && v->type == FLASH_I64) {
        char text[48];
        size_t n = flash_time_format(v->u.i64, text, sizeof text);
        return sqlite3_bind_text(st, at, text, (int)n, SQLITE_TRANSIENT);
    }
    switch (v->type) {
    case FLASH_I64: return sqlite3_bind_int64(st, at, (sqlite3_int64)v->u.i64);
    case FLASH_I32: return sqlite3_bind_int(st, at, v->u.i32);
    case FLASH_F64: return sqlite3_bind_double(st, at, v->u.f64);
    case FLASH_BOOL: return sqlite3_bind_int(st, at, v->u.b ? 1 : 0);
    case FLASH_STR: return sqlite3_bind_text(st, at, v->u.s.ptr ? v->u.s.ptr : "", (int)v->u.s.len, SQLITE_STATIC);
    case FLASH_BYTES:
        if (!v->u.s.len) return sqlite3_bind_zeroblob(st, at, 0);
        return sqlite3_bind_blob(st, at, v->u.s.ptr, (int)v->u.s.len, SQLITE_STATIC);
    default: return SQLITE_MISUSE; /* not a value type */
    }
}

static const char *flash__sq_class_name(int c) {
    switch (c) {
    case SQLITE_INTEGER: return "INTEGER";
    case SQLITE_FLOAT: return "REAL";
    case SQLITE_TEXT: return "TEXT";
    case SQLITE_BLOB: return "BLOB";
    default: return "NULL";
    }
}

/* A TIME column: ISO text or unix seconds. */
static int flash__sq_time(sqlite3_stmt *st, int col, int c, flash_time *out, const char **why) {
    if (c == SQLITE_INTEGER) {
        sqlite3_int64 x = sqlite3_column_int64(st, col);
        if (x > INT64_MAX / FLASH_TIME_PER_S || x < INT64_MIN / FLASH_TIME_PER_S) return *why = "range", 1;
        *out = (flash_time)x * FLASH_TIME_PER_S;
        return 0;
    }
    if (c == SQLITE_TEXT) {
        const char *s = (const char *)sqlite3_column_text(st, col);
        int rc;
        if (!s) return *why = "nomem", 1;
        rc = flash_time_parse(s, (size_t)sqlite3_column_bytes(st, col), out);
        if (rc == FLASH_ETOOLARGE) return *why = "range", 1;
        if (rc) return *why = "time", 1;
        return 0;
    }
    return *why = "mismatch", 1;
}

/* Read column col into the field at row; 0, or non-zero with *why set. */
static int flash__sq_read(sqlite3_stmt *st, int col, const flash_field *fd, char *row, const char **why) {
    int c = sqlite3_column_type(st, col);
    char *p = row + fd->offset;
    *why = NULL;
    if (flash_type_nullable(fd->type)) {
        flash_field base = *fd;
        if (c == SQLITE_NULL) {
            flash_i64n n64 = flash_i64n_null();
            flash_i32n n32 = flash_i32n_null();
            flash_f64n nf = flash_f64n_null();
            flash_booln nb = flash_booln_null();
            switch (fd->type) {
            case FLASH_I32N: memcpy(p, &n32, sizeof n32); break;
            case FLASH_F64N: memcpy(p, &nf, sizeof nf); break;
            case FLASH_BOOLN: memcpy(p, &nb, sizeof nb); break;
            default: memcpy(p, &n64, sizeof n64); break;
            }
            return 0;
        }
        /* v comes first in every nullable struct; null stays false (zeroed) */
        base.type = fd->type == FLASH_TIMEN ? FLASH_TIME : flash_value_type(fd->type);
        return flash__sq_read(st, col, &base, row, why);
    }
    switch (fd->type) {
    case FLASH_TIME: {
        flash_time v;
        if (c == SQLITE_NULL) return *why = "NULL", 1;
        if (flash__sq_time(st, col, c, &v, why)) return 1;
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_I64:
    case FLASH_I32:
    case FLASH_BOOL: {
        sqlite3_int64 x;
        if (c == SQLITE_NULL) return *why = "NULL", 1;
        if (c != SQLITE_INTEGER) return *why = "mismatch", 1;
        x = sqlite3_column_int64(st, col);
        if (fd->type == FLASH_I64) {
            int64_t v = (int64_t)x;
            memcpy(p, &v, sizeof v);
        } else if (fd->type == FLASH_I32) {
            int32_t v;
            if (x < INT32_MIN || x > INT32_MAX) return *why = "range", 1;
            v = (int32_t)x;
            memcpy(p, &v, sizeof v);
        } else {
            bool v = x != 0;
            memcpy(p, &v, sizeof v);
        }
        return 0;
    }
    case FLASH_F64: {
        double v;
        if (c == SQLITE_NULL) return *why = "NULL", 1;
        if (c != SQLITE_FLOAT && c != SQLITE_INTEGER) return *why = "mismatch", 1;
        v = sqlite3_column_double(st, col);
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_STR: {
        const char *v = NULL;
        if (c != SQLITE_NULL) {
            if (c != SQLITE_TEXT) return *why = "mismatch", 1;
            v = (const char *)sqlite3_column_text(st, col);
            if (!v) return *why = "nomem", 1;
        }
        memcpy(p, &v, sizeof v);
        return 0;
    }
    case FLASH_BYTES: {
        flash_bytes v = {NULL, 0};
        if (c != SQLITE_NULL) {
            if (c != SQLITE_BLOB && c != SQLITE_TEXT) return *why = "mismatch", 1;
            v.data = c == SQLITE_BLOB ? sqlite3_column_blob(st, col) : (const void *)sqlite3_column_text(st, col);
            v.len = (size_t)sqlite3_column_bytes(st, col);
            if (!v.data) v.data = ""; /* an empty blob is not NULL */
        }
        memcpy(p, &v, sizeof v);
        return 0;
    }
    default: break;
    }
    return *why = "mismatch", 1;
}

/* A row that cannot be read: fail every key tuple it could belong to. Key
   parts read from their columns leniently; a part that cannot be read
   matches any key (the row matched the WHERE, so it belongs to one). */
static void flash__sq_reject(flash_sqlite *s, flash_fetch *f, sqlite3_stmt *st, int bad, const char *why) {
    const flash_model *m = flash_fetch_model(f);
    const flash_field *fd = &m->fields[bad];
    size_t nk = flash_fetch_nfields(f), j;
    flash_value kv[8];
    bool wild[8];
    char msg[384];
    const char *table = m->opts.table ? m->opts.table : m->name;
    int c = sqlite3_column_type(st, bad);
    s->stats.rejected++;
    if (strcmp(why, "NULL") == 0)
        snprintf(msg, sizeof msg, "sqlite: %s.%s is NULL, but %s.%s is a non-null %s field", table, fd->name,
                 m->name, fd->name, flash_type_name(fd->type));
    else if (strcmp(why, "range") == 0 && c == SQLITE_TEXT)
        snprintf(msg, sizeof msg, "sqlite: %s.%s = '%.40s' is out of range for %s.%s (%s)", table, fd->name,
                 (const char *)sqlite3_column_text(st, bad), m->name, fd->name, flash_type_name(fd->type));
    else if (strcmp(why, "range") == 0)
        snprintf(msg, sizeof msg, "sqlite: %s.%s = %lld is out of range for %s.%s (%s)", table, fd->name,
                 (long long)sqlite3_column_int64(st, bad), m->name, fd->name, flash_type_name(fd->type));
    else if (strcmp(why, "time") == 0)
        snprintf(msg, sizeof msg, "sqlite: %s.%s = '%.40s' is not a timestamp (ISO-8601 text or unix seconds) for %s.%s",
                 table, fd->name, (const char *)sqlite3_column_text(st, bad), m->name, fd->name);
    else
        snprintf(msg, sizeof msg, "sqlite: %s.%s holds a %s value, but %s.%s is a %s field", table, fd->name,
                 flash__sq_class_name(c), m->name, fd->name, flash_type_name(fd->type));
    for (j = 0; j < nk; j++) {
        int col = flash_fetch_field(f, j);
        const flash_field *kf = &m->fields[col];
        char tmp[sizeof(flash_bytes) + sizeof(int64_t) + sizeof(double)];
        const char *w;
        flash_field shifted = *kf;
        shifted.offset = 0;
        wild[j] = false;
        memset(&kv[j], 0, sizeof kv[j]);
        if (flash__sq_read(st, col, &shifted, tmp, &w) != 0) {
            if (strcmp(w, "NULL") == 0) kv[j] = flash_v_null(kf->type);
            else wild[j] = true;
            continue;
        }
        kv[j] = flash_field_value(kf->type, tmp);
    }
    flash_fetch_fail_where(f, kv, wild, FLASH_ESOURCE, msg);
}

/* Step through st, handing rows to f. 0, or FLASH_ESOURCE with err set. */
static int flash__sq_rows(flash_sqlite *s, flash_fetch *f, sqlite3_stmt *st, char *row, char *err, size_t errcap) {
    const flash_model *m = flash_fetch_model(f);
    int rc;
    bool shape = true;
    s->stats.statements++;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        size_t i;
        int bad = -1;
        const char *why = NULL;
        s->stats.rows++;
        if ((size_t)sqlite3_column_count(st) != m->nfields) {
            shape = false;
            break;
        }
        memset(row, 0, m->size);
        for (i = 0; i < m->nfields && bad < 0; i++)
            if (flash__sq_read(st, (int)i, &m->fields[i], row, &why) != 0) bad = (int)i;
        if (bad >= 0 && strcmp(why, "nomem") == 0) {
            snprintf(err, errcap, "sqlite: out of memory reading %s", m->opts.table ? m->opts.table : m->name);
            sqlite3_reset(st);
            return FLASH_ENOMEM;
        }
        if (bad >= 0) flash__sq_reject(s, f, st, bad, why);
        else flash_fetch_row(f, row);
    }
    if (rc != SQLITE_DONE) {
        snprintf(err, errcap, "sqlite: %s: %s", m->opts.table ? m->opts.table : m->name,
                 shape ? sqlite3_errmsg(s->db) : "unexpected column count");
        sqlite3_reset(st);
        return FLASH_ESOURCE;
    }
    sqlite3_reset(st);
    return FLASH_OK;
}

/* COUNT (key columns, COUNT(*)) and EXISTS (DISTINCT key columns) results.
   tuple >= 0: the statement was for that key tuple alone (a NULL key). */
static int flash__sq_groups(flash_sqlite *s, flash_fetch *f, sqlite3_stmt *st, char *row, long tuple, char *err,
                            size_t errcap) {
    const flash_model *m = flash_fetch_model(f);
    bool count = flash_fetch_class(f)->kind == FLASH_CLASS_COUNT;
    size_t nk = flash_fetch_nfields(f), j;
    int rc;
    s->stats.statements++;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t n = count ? (int64_t)sqlite3_column_int64(st, (int)nk) : 1;
        s->stats.rows++;
        if (tuple >= 0) {
            flash_fetch_set_count(f, (size_t)tuple, n);
            continue;
        }
        memset(row, 0, m->size);
        for (j = 0; j < nk; j++) {
            const char *why = NULL;
            if (flash__sq_read(st, (int)j, &m->fields[flash_fetch_field(f, j)], row, &why) != 0) {
                snprintf(err, errcap, "sqlite: %s.%s: %s value in a key column", m->opts.table ? m->opts.table : m->name,
                         m->fields[flash_fetch_field(f, j)].name, why);
                sqlite3_reset(st);
                return FLASH_ESOURCE;
            }
        }
        flash_fetch_add_count(f, row, n);
    }
    if (rc != SQLITE_DONE) {
        snprintf(err, errcap, "sqlite: %s: %s", m->opts.table ? m->opts.table : m->name, sqlite3_errmsg(s->db));
        sqlite3_reset(st);
        return FLASH_ESOURCE;
    }
    sqlite3_reset(st);
    return FLASH_OK;
}

static int flash__sq_run(flash_sqlite *s, flash_fetch *f, sqlite3_stmt *st, char *row, long tuple, char *err,
                         size_t errcap) {
    flash_class_kind k = flash_fetch_class(f)->kind;
    if (k == FLASH_CLASS_COUNT || k == FLASH_CLASS_EXISTS) return flash__sq_groups(s, f, st, row, tuple, err, errcap);
    return flash__sq_rows(s, f, st, row, err, errcap);
}

static void flash__sq_release(sqlite3_stmt *st, bool owned) {
    if (owned) sqlite3_finalize(st);
    else sqlite3_clear_bindings(st);
}

static void flash__sq_fetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    flash_sqlite *s = (flash_sqlite *)self;
    const flash_model *m = flash_fetch_model(f);
    size_t n = flash_fetch_count(f), nk = flash_fetch_nfields(f), i, j, max;
    size_t *plain = NULL, nplain = 0;
    char err[512];
    char *row;
    int rc = FLASH_OK, lim;
    (void)ctx;
    s->stats.fetches++;
    err[0] = 0;
    lim = sqlite3_limit(s->db, SQLITE_LIMIT_VARIABLE_NUMBER, -1);
    max = s->max_keys;
    while (max > 1 && max * nk > (size_t)(lim > 0 ? lim : 999)) max /= 2;
    row = (char *)calloc(1, m->size ? m->size : 1);
    plain = (size_t *)malloc((n ? n : 1) * sizeof *plain);
    if (!row || !plain) {
        free(row);
        free(plain);
        flash_fetch_done(f, FLASH_ENOMEM, NULL);
        return;
    }
    /* Tuples without NULLs go through IN; the others one by one with IS. */
    for (i = 0; i < n && rc == FLASH_OK; i++) {
        const flash_value *key = flash_fetch_key(f, i);
        bool has_null = false;
        for (j = 0; j < nk; j++) has_null = has_null || key[j].is_null;
        if (!has_null) {
            plain[nplain++] = i;
            continue;
        }
        {
            sqlite3_stmt *st;
            bool owned;
            rc = flash__sq_get(s, f, 0, &st, &owned, err, sizeof err);
            if (rc) break;
            for (j = 0; j < nk; j++) flash__sq_bind(st, (int)j + 1, &key[j], m->fields[flash_fetch_field(f, j)].type);
            rc = flash__sq_run(s, f, st, row, (long)i, err, sizeof err);
            flash__sq_release(st, owned);
        }
    }
    for (i = 0; i < nplain && rc == FLASH_OK; i += max) {
        size_t chunk = nplain - i < max ? nplain - i : max, tuples = 1, t;
        sqlite3_stmt *st;
        bool owned;
        while (tuples < chunk) tuples *= 2;
        rc = flash__sq_get(s, f, tuples, &st, &owned, err, sizeof err);
        if (rc) break;
        for (t = 0; t < tuples; t++) { /* pad with the last tuple */
            const flash_value *key = flash_fetch_key(f, plain[i + (t < chunk ? t : chunk - 1)]);
            for (j = 0; j < nk; j++)
                flash__sq_bind(st, (int)(t * nk + j) + 1, &key[j], m->fields[flash_fetch_field(f, j)].type);
        }
        rc = flash__sq_run(s, f, st, row, -1, err, sizeof err);
        flash__sq_release(st, owned);
    }
    free(row);
    free(plain);
    if (rc) s->stats.errors++;
    flash_fetch_done(f, rc, rc ? err : NULL);
}

/* ---- writes (flash_save / flash_delete) ---- */

static int flash__sq_exec(flash_sqlite *s, const char *sql) {
    return sqlite3_exec(s->db, sql, NULL, NULL, NULL);
}

static int flash__sq_prepare(flash_sqlite *s, flash_strbuf *b, sqlite3_stmt **st) {
    int rc;
    *st = NULL;
    if (b->oom) {
        free(b->data);
        return SQLITE_NOMEM;
    }
    rc = sqlite3_prepare_v2(s->db, b->data, (int)b->len + 1, st, NULL);
    free(b->data);
    memset(b, 0, sizeof *b);
    return rc;
}

/* Bind the fields of row (all, or just field `only` when >= 0) from at. */
static int flash__sq_bind_row(sqlite3_stmt *st, const flash_model *m, const void *row, int only) {
    size_t i;
    int at = 1, rc = SQLITE_OK;
    for (i = 0; i < m->nfields && rc == SQLITE_OK; i++) {
        flash_value v;
        if (only >= 0 && (int)i != only) continue;
        v = flash_row_value(m, row, (int)i);
        rc = flash__sq_bind(st, at++, &v, m->fields[i].type);
    }
    return rc;
}

/* One transaction (BEGIN IMMEDIATE: the old rows read cannot change before
   the write): per row, SELECT the old row by primary key, then UPSERT or
   DELETE; COMMIT, or ROLLBACK on the first error. */
static void flash__sq_write(void *self, flash_ctx *ctx, flash_write *w) {
    flash_sqlite *s = (flash_sqlite *)self;
    const flash_model *m = flash_write_model(w);
    const char *table = m->opts.table ? m->opts.table : m->name;
    const char *pkname = m->fields[m->opts.pk].name;
    bool save = flash_write_kind_of(w) == FLASH_WRITE_SAVE;
    sqlite3_stmt *sel = NULL, *wr = NULL;
    flash_strbuf b;
    char err[512];
    char *row = NULL;
    size_t i, n = flash_write_count(w);
    int rc, code = FLASH_ESOURCE;
    (void)ctx;
    err[0] = 0;
    if (!sqlite3_get_autocommit(s->db)) {
        flash_write_done(w, FLASH_ESTATE, "sqlite: a transaction is open on the connection: flash_save runs its own");
        return;
    }
    memset(&b, 0, sizeof b);
    flash_strbuf_puts(&b, "SELECT ");
    flash__sq_columns(&b, m);
    flash_strbuf_puts(&b, " FROM ");
    flash_sql_ident(&b, table, true);
    flash_strbuf_puts(&b, " WHERE ");
    flash_sql_ident(&b, pkname, false);
    flash_strbuf_puts(&b, " = ?");
    rc = flash__sq_prepare(s, &b, &sel);
    if (rc == SQLITE_OK) {
        if (save) {
            flash_strbuf_puts(&b, "INSERT INTO ");
            flash_sql_ident(&b, table, true);
            flash_strbuf_puts(&b, " (");
            flash__sq_columns(&b, m);
            flash_strbuf_puts(&b, ") VALUES (");
            for (i = 0; i < m->nfields; i++) flash_strbuf_puts(&b, i ? ",?" : "?");
            flash_strbuf_puts(&b, ") ON CONFLICT (");
            flash_sql_ident(&b, pkname, false);
            flash_strbuf_puts(&b, ") DO ");
            if (m->nfields == 1) flash_strbuf_puts(&b, "NOTHING");
            else {
                bool first = true;
                flash_strbuf_puts(&b, "UPDATE SET ");
                for (i = 0; i < m->nfields; i++) {
                    if ((int)i == m->opts.pk) continue;
                    if (!first) flash_strbuf_puts(&b, ",");
                    first = false;
                    flash_sql_ident(&b, m->fields[i].name, false);
                    flash_strbuf_puts(&b, "=excluded.");
                    flash_sql_ident(&b, m->fields[i].name, false);
                }
            }
        } else {
            flash_strbuf_puts(&b, "DELETE FROM ");
            flash_sql_ident(&b, table, true);
            flash_strbuf_puts(&b, " WHERE ");
            flash_sql_ident(&b, pkname, false);
            flash_strbuf_puts(&b, " = ?");
        }
        rc = flash__sq_prepare(s, &b, &wr);
    }
    row = (char *)calloc(1, m->size ? m->size : 1);
    if (rc == SQLITE_OK && !row) rc = SQLITE_NOMEM;
    if (rc == SQLITE_OK) rc = flash__sq_exec(s, "BEGIN IMMEDIATE");
    if (rc != SQLITE_OK) snprintf(err, sizeof err, "sqlite: %s: %s", table, sqlite3_errmsg(s->db));
    for (i = 0; i < n && rc == SQLITE_OK; i++) {
        const void *nr = flash_write_row(w, i);
        int step;
        flash__sq_bind_row(sel, m, nr, m->opts.pk);
        step = sqlite3_step(sel);
        s->stats.statements++;
        if (step == SQLITE_ROW) {
            size_t k;
            const char *why = NULL;
            memset(row, 0, m->size);
            for (k = 0; k < m->nfields; k++)
                if (flash__sq_read(sel, (int)k, &m->fields[k], row, &why) != 0) break;
            if (k < m->nfields) {
                /* cannot read the old row: its keys are unknown, so refuse */
                snprintf(err, sizeof err, "sqlite: %s.%s: the old row cannot be read (%s): not written", table,
                         m->fields[k].name, why ? why : "?");
                rc = SQLITE_MISMATCH;
            } else if (flash_write_set_old(w, i, row) != FLASH_OK) {
                code = FLASH_ENOMEM;
                rc = SQLITE_NOMEM;
            }
        } else if (step != SQLITE_DONE) {
            rc = step;
        }
        sqlite3_reset(sel);
        sqlite3_clear_bindings(sel);
        if (rc != SQLITE_OK) break;
        flash__sq_bind_row(wr, m, nr, save ? -1 : m->opts.pk);
        step = sqlite3_step(wr);
        s->stats.statements++;
        if (step != SQLITE_DONE) rc = step;
        sqlite3_reset(wr);
        sqlite3_clear_bindings(wr);
    }
    if (rc != SQLITE_OK && !err[0]) snprintf(err, sizeof err, "sqlite: %s: %s", table, sqlite3_errmsg(s->db));
    sqlite3_finalize(sel);
    sqlite3_finalize(wr);
    free(row);
    if (rc == SQLITE_OK && (rc = flash__sq_exec(s, "COMMIT")) != SQLITE_OK)
        snprintf(err, sizeof err, "sqlite: %s: COMMIT: %s", table, sqlite3_errmsg(s->db));
    if (rc != SQLITE_OK) {
        if (!sqlite3_get_autocommit(s->db)) flash__sq_exec(s, "ROLLBACK");
        s->stats.errors++;
        flash_write_done(w, code, err);
        return;
    }
    flash_write_done(w, FLASH_OK, NULL);
}

static const flash_source_vtable flash__sq_vt = {"sqlite", flash__sq_fetch, NULL, flash__sq_write};

FLASH_API flash_source flash_sqlite_source(flash_sqlite *s) {
    flash_source src;
    src.vt = &flash__sq_vt;
    src.self = s;
    return src;
}

#endif /* FLASH_SQLITE_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
