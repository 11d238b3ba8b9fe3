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
/* Change tracking's preupdate path (see flash_sqlite_track_changes): on
   when sqlite3.h declares it, i.e. SQLITE_ENABLE_PREUPDATE_HOOK is defined
   before its first include; FLASH_SQLITE_PREUPDATE 1 defines it for you
   (the library must be built with it: Debian's is), 0 forces it off. */
#if defined(FLASH_SQLITE_PREUPDATE) && FLASH_SQLITE_PREUPDATE && !defined(SQLITE_ENABLE_PREUPDATE_HOOK)
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#endif
#include <sqlite3.h>
#ifndef FLASH_SQLITE_PREUPDATE
#ifdef SQLITE_ENABLE_PREUPDATE_HOOK
#define FLASH_SQLITE_PREUPDATE 1
#else
#define FLASH_SQLITE_PREUPDATE 0
#endif
#endif

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

/* ---- change tracking: in-process writes invalidate after commit ----------

   Writes made through THIS sqlite3 connection (your own sqlite3_exec,
   another library's statements on it, flash_save) invalidate the cache
   after they commit, without the caller passing rows:

       flash_sqlite_changes *tr = flash_sqlite_track_changes(sq, ctx, 0, &err);
       sqlite3_exec(db, "UPDATE users SET username = 'alice' WHERE id = 1", ...);
       ... the next loop tick invalidates users.id=1, the old and the new
       username's keys, the filter lists of the old and new first_name ...
       flash_sqlite_untrack_changes(tr);   // before flash_sqlite_destroy,
                                           // sqlite3_close and ctx's cache

   ctx: a context of the readers (its desc: cache, key_prefix,
   stale_marker_ttl_s, lag_window_ms, logger, clock; its loop, which is
   required). The tracker makes a context of its own from that desc and
   posts its work on that loop: ctx may be reset or destroyed afterwards.
   Tracked: the tables of the registered models (opts.table, default the
   model's name; "db.table" names match that attached database only,
   case-insensitive as SQLite is). The connection's preupdate (or update),
   commit and rollback hooks are taken: one tracker per connection, and do
   not set those hooks yourself while it runs.

   WHEN: a change is buffered in its transaction. The commit hook only moves
   the transaction's buffer to "committing" (it cannot run SQL, and the
   commit may still fail); the rollback hook drops the open buffer. On the
   next tick of the loop (a flash_defer) a committing buffer is applied if
   its commit went through: SQLite's data version of the database moved
   (SQLITE_FCNTL_DATA_VERSION; a COMMIT that failed with SQLITE_BUSY leaves
   it, and its transaction open: the buffer waits for the retried COMMIT or
   the ROLLBACK). Applied means: the rows' keys go to
   flash_invalidate_rows_async (stale markers, allowtime, the lag window,
   DYNAMIC version bumps: exactly as a flash_invalidate after the commit).
   Between the commit and that tick a read can still see the old value:
   call flash_sqlite_changes_flush() right after a write to apply at once.

   WHAT EACH PATH KNOWS
     preupdate  (SQLite built with SQLITE_ENABLE_PREUPDATE_HOOK, and this
                header compiled with it: define FLASH_SQLITE_PREUPDATE 1 or
                SQLITE_ENABLE_PREUPDATE_HOOK before the first include of
                sqlite3.h; checked at run time with
                sqlite3_compileoption_used). Every column's old value
                (UPDATE, DELETE) and new value (INSERT, UPDATE), captured as
                the statement runs (sqlite3_value_dup): both rows' keys are
                invalidated: the old username's key as well as the new one.
                WITHOUT ROWID tables too.
     update     (otherwise, or with FLASH_SQLITE_TRACK_UPDATE_HOOK). Only
                the table, the operation and the rowid. After the commit the
                row is read again by rowid and its keys (the NEW values) are
                invalidated; classes keyed only on the INTEGER PRIMARY KEY
                column (the rowid) are invalidated for DELETE and rowid
                changes too; DYNAMIC classes are bumped for every change.
                Keys on OLD values of other columns (the old username, the
                old first_name's list) cannot be invalidated: they stay until
                their timeout. WITHOUT ROWID tables are not seen at all
                (SQLite does not call the update hook for them). While the
                connection has a transaction open the re-read waits for its
                end (it would read that transaction's uncommitted rows).
   Both: values that do not convert to their field (NULL in a non-null
   field, a type mismatch) leave that field unknown: the classes keyed on
   it are skipped for that row (DYNAMIC classes are bumped). Column
   positions are read with PRAGMA table_info outside the hooks, again after
   a schema change.
   SAVEPOINTS: ROLLBACK TO does not call the rollback hook; the changes it
   undid stay buffered and are invalidated when the outer transaction
   commits: an extra invalidation, never a missed one (the update path
   re-reads the row as it is). A ROLLBACK of the whole transaction drops
   everything. Writes of other connections and processes are not seen.
   An invalidation that fails (cache down) is logged and counted; its keys
   may stay stale until their timeout. */

typedef struct flash_sqlite_changes flash_sqlite_changes;

#define FLASH_SQLITE_TRACK_UPDATE_HOOK 1u /* use the update hook even where preupdate is available */

typedef struct flash_sqlite_changes_stats {
    uint64_t changes;       /* INSERT/UPDATE/DELETE of tracked tables seen by the hook */
    uint64_t commits;       /* transactions with tracked changes applied after their commit */
    uint64_t rollbacks;     /* transactions with tracked changes dropped */
    uint64_t rows;          /* row images invalidated (old + new) */
    uint64_t rereads;       /* update path: rows read again by rowid */
    uint64_t flushes;       /* invalidation batches started */
    uint64_t errors;        /* failed invalidations, SQL errors, out of memory */
    bool preupdate;         /* which path runs */
} flash_sqlite_changes_stats;

/* NULL with *err (FLASH_EINVAL: no db, no ctx or ctx without a loop;
   FLASH_ENOMEM). flags: FLASH_SQLITE_TRACK_*. */
FLASH_API flash_sqlite_changes *flash_sqlite_track_changes(flash_sqlite *s, flash_ctx *ctx, unsigned flags, int *err);
/* Removes the hooks; committed changes not applied yet are applied first
   (waiting on the loop); an open transaction's are dropped. */
FLASH_API void flash_sqlite_untrack_changes(flash_sqlite_changes *t);
/* Apply what is committed now and wait until the cache applied it (runs
   the loop; not from a callback of it). 0, or the first error. */
FLASH_API int flash_sqlite_changes_flush(flash_sqlite_changes *t);
FLASH_API flash_sqlite_changes_stats flash_sqlite_changes_stats_get(const flash_sqlite_changes *t);

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
            flash_field_set_null(fd, row);
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

/* ---- change tracking (see flash_sqlite_track_changes) ---- */

typedef struct flash__sqc_table {
    char *db, *name;     /* db NULL: any database */
    int dbi;             /* the database of the last change seen (index in dbs) */
    int ncols, rowid_col;
    char **cols;         /* column names, by position */
} flash__sqc_table;

typedef struct flash__sqc_change {
    int table, dbi, op;
    sqlite3_int64 rowid_old, rowid_new;
    int ncols;
    sqlite3_value **oldv, **newv; /* preupdate: every column; NULL otherwise */
} flash__sqc_change;

typedef struct flash__sqc_seg {
    flash__sqc_change *c;
    size_t n, cap;
    unsigned dv; /* the data version when its commit began */
    bool oom;    /* a change could not be buffered */
} flash__sqc_seg;

typedef struct flash__sqc_mem { /* strings of converted rows */
    struct flash__sqc_mem *next;
} flash__sqc_mem;

struct flash_sqlite_changes {
    flash_sqlite *sq;
    sqlite3 *db;
    flash_ctx *ctx;
    flash_loop loop;
    bool preupdate;
    flash__sqc_table *tables;
    size_t ntables;
    char *dbs[8];
    int ndbs;
    flash__sqc_seg open;
    flash__sqc_seg *committing;
    size_t ncommitting, capcommitting;
    flash_defer tick;
    size_t inflight;
    int first_error;
    flash_sqlite_changes_stats stats;
};

static void flash__sqc_seg_free(flash__sqc_seg *g) {
    size_t i;
    int k;
    for (i = 0; i < g->n; i++) {
        flash__sqc_change *c = &g->c[i];
        for (k = 0; k < c->ncols; k++) {
            if (c->oldv) sqlite3_value_free(c->oldv[k]);
            if (c->newv) sqlite3_value_free(c->newv[k]);
        }
        free(c->oldv);
        free(c->newv);
    }
    free(g->c);
    memset(g, 0, sizeof *g);
}

static unsigned flash__sqc_dv(flash_sqlite_changes *t) {
    unsigned sum = 0;
    int i;
    for (i = 0; i < t->ndbs; i++) {
        unsigned v = 0;
        if (sqlite3_file_control(t->db, t->dbs[i], SQLITE_FCNTL_DATA_VERSION, &v) == SQLITE_OK) sum += v;
    }
    return sum;
}

static int flash__sqc_find(flash_sqlite_changes *t, const char *zdb, const char *zname) {
    size_t i;
    int d;
    if (!zname) return -1;
    for (i = 0; i < t->ntables; i++) {
        const flash__sqc_table *tb = &t->tables[i];
        if (sqlite3_stricmp(tb->name, zname) != 0) continue;
        if (tb->db && (!zdb || sqlite3_stricmp(tb->db, zdb) != 0)) continue;
        break;
    }
    if (i == t->ntables) return -1;
    /* the database, for its data version */
    for (d = 0; d < t->ndbs && sqlite3_stricmp(t->dbs[d], zdb ? zdb : "main") != 0; d++) {
    }
    if (d == t->ndbs && d < 8) {
        size_t len = strlen(zdb ? zdb : "main");
        char *copy = (char *)malloc(len + 1);
        if (copy) {
            memcpy(copy, zdb ? zdb : "main", len + 1);
            t->dbs[t->ndbs++] = copy;
        } else {
            d = 0;
        }
    } else if (d == t->ndbs) {
        d = 0;
    }
    t->tables[i].dbi = d;
    return (int)i;
}

static flash__sqc_change *flash__sqc_push(flash_sqlite_changes *t, int table, int op) {
    flash__sqc_seg *g = &t->open;
    flash__sqc_change *c;
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        flash__sqc_change *nc = (flash__sqc_change *)realloc(g->c, cap * sizeof *nc);
        if (!nc) {
            g->oom = true;
            return NULL;
        }
        g->c = nc;
        g->cap = cap;
    }
    c = &g->c[g->n++];
    memset(c, 0, sizeof *c);
    c->table = table;
    c->dbi = t->tables[table].dbi;
    c->op = op;
    t->stats.changes++;
    return c;
}

#if FLASH_SQLITE_PREUPDATE
static void flash__sqc_preupdate(void *arg, sqlite3 *db, int op, const char *zdb, const char *zname,
                                 sqlite3_int64 k1, sqlite3_int64 k2) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    int ti = flash__sqc_find(t, zdb, zname), n, k;
    flash__sqc_change *c;
    if (ti < 0) return;
    c = flash__sqc_push(t, ti, op);
    if (!c) return;
    c->rowid_old = k1;
    c->rowid_new = k2;
    n = sqlite3_preupdate_count(db);
    if (n <= 0) return;
    c->ncols = n;
    if (op != SQLITE_INSERT) c->oldv = (sqlite3_value **)calloc((size_t)n, sizeof *c->oldv);
    if (op != SQLITE_DELETE) c->newv = (sqlite3_value **)calloc((size_t)n, sizeof *c->newv);
    if ((op != SQLITE_INSERT && !c->oldv) || (op != SQLITE_DELETE && !c->newv)) {
        t->open.oom = true;
        return;
    }
    for (k = 0; k < n; k++) {
        sqlite3_value *v = NULL;
        if (c->oldv && sqlite3_preupdate_old(db, k, &v) == SQLITE_OK && v) c->oldv[k] = sqlite3_value_dup(v);
        v = NULL;
        if (c->newv && sqlite3_preupdate_new(db, k, &v) == SQLITE_OK && v) c->newv[k] = sqlite3_value_dup(v);
    }
}
#endif

static void flash__sqc_update(void *arg, int op, const char *zdb, const char *zname, sqlite3_int64 rowid) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    int ti = flash__sqc_find(t, zdb, zname);
    flash__sqc_change *c;
    if (ti < 0) return;
    c = flash__sqc_push(t, ti, op);
    if (c) c->rowid_old = c->rowid_new = rowid;
}

static void flash__sqc_tick(void *arg);

static void flash__sqc_post(flash_sqlite_changes *t) {
    if (!flash_defer_queued(&t->tick)) flash_loop_post(t->loop, &t->tick, flash__sqc_tick, t);
}

/* The commit may still fail: only mark the buffer committing. No SQL here. */
static int flash__sqc_commit(void *arg) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    flash__sqc_seg *g;
    if (!t->open.n && !t->open.oom) return 0;
    if (t->ncommitting == t->capcommitting) {
        size_t cap = t->capcommitting ? t->capcommitting * 2 : 4;
        flash__sqc_seg *ns = (flash__sqc_seg *)realloc(t->committing, cap * sizeof *ns);
        if (!ns) { /* keep it open: it joins the next commit's buffer */
            t->open.oom = true;
            return 0;
        }
        t->committing = ns;
        t->capcommitting = cap;
    }
    g = &t->committing[t->ncommitting++];
    *g = t->open;
    g->dv = flash__sqc_dv(t);
    memset(&t->open, 0, sizeof t->open);
    flash__sqc_post(t);
    return 0;
}

static void flash__sqc_drop(flash_sqlite_changes *t, size_t i) {
    flash__sqc_seg_free(&t->committing[i]);
    memmove(&t->committing[i], &t->committing[i + 1], (t->ncommitting - i - 1) * sizeof *t->committing);
    t->ncommitting--;
}

static void flash__sqc_rollback(void *arg) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    unsigned dv = flash__sqc_dv(t);
    size_t i;
    if (t->open.n || t->open.oom) t->stats.rollbacks++;
    flash__sqc_seg_free(&t->open);
    /* A buffer whose COMMIT failed (the data version did not move) belonged
       to the transaction rolled back now. */
    for (i = t->ncommitting; i-- > 0;) {
        if (t->committing[i].dv != dv) continue;
        flash__sqc_drop(t, i);
        t->stats.rollbacks++;
    }
    if (t->ncommitting) flash__sqc_post(t); /* one kept for a transaction open then */
}

/* Column names and the rowid alias of a table, outside the hooks. */
static int flash__sqc_map_table(flash_sqlite_changes *t, flash__sqc_table *tb, const char *dbname) {
    sqlite3_stmt *st = NULL;
    int rc, n = 0, npk = 0, ipk = -1, cap = 0;
    char **cols = NULL;
    rc = sqlite3_prepare_v2(t->db, "SELECT name, upper(type), pk FROM pragma_table_info(?1, ?2) ORDER BY cid", -1,
                            &st, NULL);
    if (rc != SQLITE_OK) return rc;
    sqlite3_bind_text(st, 1, tb->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, dbname, -1, SQLITE_STATIC);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        const char *type = (const char *)sqlite3_column_text(st, 1);
        size_t len = name ? strlen(name) : 0;
        if (n == cap) {
            char **nc = (char **)realloc(cols, (size_t)(cap = cap ? cap * 2 : 16) * sizeof *nc);
            if (!nc) {
                rc = SQLITE_NOMEM;
                break;
            }
            cols = nc;
        }
        cols[n] = (char *)malloc(len + 1);
        if (!cols[n]) {
            rc = SQLITE_NOMEM;
            break;
        }
        memcpy(cols[n], name ? name : "", len + 1);
        if (sqlite3_column_int(st, 2) > 0) {
            npk++;
            if (type && strcmp(type, "INTEGER") == 0) ipk = n;
        }
        n++;
    }
    sqlite3_finalize(st);
    if (tb->cols) {
        int k;
        for (k = 0; k < tb->ncols; k++) free(tb->cols[k]);
        free(tb->cols);
    }
    tb->cols = cols;
    tb->ncols = n;
    tb->rowid_col = npk == 1 ? ipk : -1;
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static char *flash__sqc_keep(flash__sqc_mem **mem, const void *p, size_t len) {
    flash__sqc_mem *b = (flash__sqc_mem *)malloc(sizeof *b + len + 1);
    char *d;
    if (!b) return NULL;
    b->next = *mem;
    *mem = b;
    d = (char *)(b + 1);
    if (p) memcpy(d, p, len);
    else memset(d, 0, len);
    d[len] = 0;
    return d;
}

/* One value into its field; 0, or 1 when it does not convert (unknown). */
static int flash__sqc_conv(sqlite3_value *v, const flash_field *fd, char *row, flash__sqc_mem **mem) {
    int c = v ? sqlite3_value_type(v) : SQLITE_NULL;
    char *p = row + fd->offset;
    if (!v) return 1;
    if (flash_type_nullable(fd->type)) {
        flash_field base = *fd;
        if (c == SQLITE_NULL) {
            flash_field_set_null(fd, row);
            return 0;
        }
        base.type = fd->type == FLASH_TIMEN ? FLASH_TIME : flash_value_type(fd->type);
        return flash__sqc_conv(v, &base, row, mem);
    }
    switch (fd->type) {
    case FLASH_TIME: {
        flash_time tv;
        if (c == SQLITE_INTEGER) {
            sqlite3_int64 x = sqlite3_value_int64(v);
            if (x > INT64_MAX / FLASH_TIME_PER_S || x < INT64_MIN / FLASH_TIME_PER_S) return 1;
            tv = (flash_time)x * FLASH_TIME_PER_S;
        } else if (c == SQLITE_TEXT) {
            const char *s = (const char *)sqlite3_value_text(v);
            if (!s || flash_time_parse(s, (size_t)sqlite3_value_bytes(v), &tv) != FLASH_OK) return 1;
        } else {
            return 1;
        }
        memcpy(p, &tv, sizeof tv);
        return 0;
    }
    case FLASH_I64:
    case FLASH_I32:
    case FLASH_BOOL: {
        sqlite3_int64 x;
        if (c != SQLITE_INTEGER) return 1;
        x = sqlite3_value_int64(v);
        if (fd->type == FLASH_I64) {
            int64_t y = (int64_t)x;
            memcpy(p, &y, sizeof y);
        } else if (fd->type == FLASH_I32) {
            int32_t y;
            if (x < INT32_MIN || x > INT32_MAX) return 1;
            y = (int32_t)x;
            memcpy(p, &y, sizeof y);
        } else {
            bool y = x != 0;
            memcpy(p, &y, sizeof y);
        }
        return 0;
    }
    case FLASH_F64: {
        double y;
        if (c != SQLITE_FLOAT && c != SQLITE_INTEGER) return 1;
        y = sqlite3_value_double(v);
        memcpy(p, &y, sizeof y);
        return 0;
    }
    case FLASH_STR: {
        const char *s = NULL;
        if (c != SQLITE_NULL) {
            const char *src;
            if (c != SQLITE_TEXT) return 1;
            src = (const char *)sqlite3_value_text(v);
            if (!src) return 1;
            s = flash__sqc_keep(mem, src, (size_t)sqlite3_value_bytes(v));
            if (!s) return 1;
        }
        memcpy(p, &s, sizeof s);
        return 0;
    }
    case FLASH_BYTES: {
        flash_bytes b = {NULL, 0};
        if (c != SQLITE_NULL) {
            const void *src;
            if (c != SQLITE_BLOB && c != SQLITE_TEXT) return 1;
            src = c == SQLITE_BLOB ? sqlite3_value_blob(v) : (const void *)sqlite3_value_text(v);
            b.len = (size_t)sqlite3_value_bytes(v);
            b.data = flash__sqc_keep(mem, src, b.len); /* NULL src: zeroes */
            if (!b.data) return 1;
        }
        memcpy(p, &b, sizeof b);
        return 0;
    }
    default: break;
    }
    return 1;
}

/* Per model while applying: full rows, partial rows' queries, a bump. */
typedef struct flash__sqc_acc {
    const flash_model *m;
    const void **olds, **news;
    size_t n, cap;
    flash_query **qs;
    size_t nq, capq;
    bool bump;
} flash__sqc_acc;

static flash__sqc_acc *flash__sqc_acc_of(flash__sqc_acc **accs, size_t *nacc, const flash_model *m) {
    size_t i;
    flash__sqc_acc *a;
    for (i = 0; i < *nacc; i++)
        if ((*accs)[i].m == m) return &(*accs)[i];
    a = (flash__sqc_acc *)realloc(*accs, (*nacc + 1) * sizeof *a);
    if (!a) return NULL;
    *accs = a;
    a = &a[(*nacc)++];
    memset(a, 0, sizeof *a);
    a->m = m;
    return a;
}

/* A row image: every field known -> a full row; else the keys of the UNSET
   classes whose fields are known, and a bump of the DYNAMIC ones. */
static int flash__sqc_image(flash_sqlite_changes *t, flash__sqc_acc *a, void *row, const bool *known, bool old) {
    const flash_model *m = a->m;
    const flash_class *cl;
    size_t f;
    bool all = true;
    for (f = 0; f < m->nfields; f++) all = all && known[f];
    if (all) {
        if (a->n == a->cap) {
            size_t cap = a->cap ? a->cap * 2 : 16;
            const void **no = (const void **)realloc(a->olds, cap * sizeof *no), **nn;
            if (!no) return FLASH_ENOMEM;
            a->olds = no;
            nn = (const void **)realloc(a->news, cap * sizeof *nn);
            if (!nn) return FLASH_ENOMEM;
            a->news = nn;
            a->cap = cap;
        }
        a->olds[a->n] = old ? row : NULL;
        a->news[a->n] = old ? NULL : row;
        a->n++;
        t->stats.rows++;
        return FLASH_OK;
    }
    for (cl = m->classes; cl; cl = cl->next) {
        flash_value v[8];
        size_t j;
        if (cl->opts.invalidation == FLASH_INVALIDATE_OFF) continue;
        if (cl->opts.invalidation == FLASH_INVALIDATE_DYNAMIC) {
            a->bump = true;
            continue;
        }
        for (j = 0; j < cl->nfields && known[cl->fields[j]]; j++) v[j] = flash_row_value(m, row, cl->fields[j]);
        if (j < cl->nfields) continue;
        if (a->nq == a->capq) {
            size_t cap = a->capq ? a->capq * 2 : 16;
            flash_query **nq = (flash_query **)realloc(a->qs, cap * sizeof *nq);
            if (!nq) return FLASH_ENOMEM;
            a->qs = nq;
            a->capq = cap;
        }
        a->qs[a->nq] = flash_query_new(t->ctx, cl, v, cl->nfields);
        if (!a->qs[a->nq]) return FLASH_ENOMEM;
        a->nq++;
    }
    return FLASH_OK;
}

/* A row from values by column position (vals) or from a statement's
   columns in field order (st). */
static int flash__sqc_row(flash_sqlite_changes *t, flash__sqc_acc *a, const flash__sqc_table *tb,
                          sqlite3_value **vals, int nvals, sqlite3_stmt *st, sqlite3_int64 rowid, bool old,
                          flash__sqc_mem **mem) {
    const flash_model *m = a->m;
    char *row = flash__sqc_keep(mem, NULL, m->size); /* zeroed; 8-aligned after the header */
    bool *known = (bool *)flash_calloc(t->ctx, m->nfields + 1, sizeof *known);
    size_t f;
    if (!row || !known) return FLASH_ENOMEM;
    for (f = 0; f < m->nfields; f++) {
        const flash_field *fd = &m->fields[f];
        sqlite3_value *v = NULL;
        int col = -1, k;
        for (k = 0; k < tb->ncols; k++)
            if (sqlite3_stricmp(tb->cols[k], fd->name) == 0) col = k;
        if (st) v = sqlite3_column_value(st, (int)f);
        else if (vals && col >= 0 && col < nvals) v = vals[col];
        if (v) {
            known[f] = flash__sqc_conv(v, fd, row, mem) == 0;
        } else if (col >= 0 && col == tb->rowid_col && (fd->type == FLASH_I64 || fd->type == FLASH_I32)) {
            /* only the rowid is known (the update path) */
            if (fd->type == FLASH_I64) {
                int64_t y = (int64_t)rowid;
                memcpy(row + fd->offset, &y, sizeof y);
            } else {
                int32_t y = (int32_t)rowid;
                memcpy(row + fd->offset, &y, sizeof y);
            }
            known[f] = true;
        }
    }
    return flash__sqc_image(t, a, row, known, old);
}

static void flash__sqc_settled(flash_ctx *ctx, flash_promise *p, void *arg) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    (void)ctx;
    t->inflight--;
    if (flash_promise_state(p) != FLASH_FULFILLED) {
        t->stats.errors++;
        if (!t->first_error) t->first_error = flash_promise_error(p);
        flash_ctx_log(t->ctx, FLASH_LOG_ERROR, "sqlite changes: invalidation failed (%s): keys may stay stale until their timeout",
                      flash_promise_message(p));
    }
}

/* Invalidate one committed buffer. */
static void flash__sqc_apply(flash_sqlite_changes *t, flash__sqc_seg *g) {
    flash__sqc_acc *accs = NULL;
    size_t nacc = 0, i, np = 0;
    flash__sqc_mem *mem = NULL;
    flash_promise **ps;
    bool *mapped = (bool *)calloc(t->ntables + 1, sizeof *mapped);
    int err = mapped ? FLASH_OK : FLASH_ENOMEM;
    if (!t->inflight) flash_ctx_reset(t->ctx);
    t->stats.commits++;
    if (g->oom) {
        t->stats.errors++;
        flash_ctx_log(t->ctx, FLASH_LOG_ERROR, "sqlite changes: out of memory buffering a transaction's changes: "
                                               "some keys may stay stale until their timeout");
    }
    for (i = 0; i < g->n && err == FLASH_OK; i++) {
        flash__sqc_change *c = &g->c[i];
        flash__sqc_table *tb = &t->tables[c->table];
        const flash_model *m;
        if (!mapped[c->table]) {
            if (flash__sqc_map_table(t, tb, t->dbs[c->dbi]) != SQLITE_OK) {
                t->stats.errors++;
                flash_ctx_log(t->ctx, FLASH_LOG_ERROR, "sqlite changes: %s: %s", tb->name, sqlite3_errmsg(t->db));
            }
            mapped[c->table] = true;
        }
        for (m = flash_models(); m && err == FLASH_OK; m = m->next) {
            const char *name = m->opts.table ? m->opts.table : m->name, *dot = strchr(name, '.');
            flash__sqc_acc *a;
            if (sqlite3_stricmp(dot ? dot + 1 : name, tb->name) != 0) continue;
            if (dot && (!tb->db || sqlite3_strnicmp(name, tb->db, (int)(dot - name)) != 0 ||
                        tb->db[dot - name] != 0))
                continue;
            a = flash__sqc_acc_of(&accs, &nacc, m);
            if (!a) {
                err = FLASH_ENOMEM;
                break;
            }
            if (c->oldv) err = flash__sqc_row(t, a, tb, c->oldv, c->ncols, NULL, c->rowid_old, true, &mem);
            if (!err && c->newv) err = flash__sqc_row(t, a, tb, c->newv, c->ncols, NULL, c->rowid_new, false, &mem);
            if (!err && !c->oldv && !c->newv) {
                /* the update path: the row as it is now, by rowid */
                bool found = false;
                if (c->op != SQLITE_DELETE) {
                    flash_strbuf b;
                    sqlite3_stmt *st = NULL;
                    size_t f;
                    memset(&b, 0, sizeof b);
                    flash_strbuf_puts(&b, "SELECT ");
                    for (f = 0; f < m->nfields; f++) {
                        if (f) flash_strbuf_puts(&b, ",");
                        flash_sql_ident(&b, m->fields[f].name, false);
                    }
                    flash_strbuf_puts(&b, " FROM ");
                    flash_sql_ident(&b, t->dbs[c->dbi], false);
                    flash_strbuf_puts(&b, ".");
                    flash_sql_ident(&b, tb->name, false);
                    flash_strbuf_puts(&b, " WHERE rowid = ?");
                    if (b.oom || sqlite3_prepare_v2(t->db, b.data, (int)b.len, &st, NULL) != SQLITE_OK) {
                        t->stats.errors++;
                        flash_ctx_log(t->ctx, FLASH_LOG_ERROR, "sqlite changes: re-reading %s: %s", tb->name,
                                      b.oom ? "out of memory" : sqlite3_errmsg(t->db));
                    } else {
                        sqlite3_bind_int64(st, 1, c->rowid_new);
                        t->stats.rereads++;
                        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_count(st) == (int)m->nfields) {
                            found = true;
                            err = flash__sqc_row(t, a, tb, NULL, 0, st, c->rowid_new, false, &mem);
                        }
                    }
                    sqlite3_finalize(st);
                    free(b.data);
                }
                /* What is known without the row: its rowid (DELETE, a row
                   gone since) and that the table changed (DYNAMIC). */
                if (!err && !found) err = flash__sqc_row(t, a, tb, NULL, 0, NULL, c->rowid_old, true, &mem);
            }
        }
    }
    ps = (flash_promise **)flash_calloc(t->ctx, nacc * 3 + 1, sizeof *ps);
    if (!ps) err = FLASH_ENOMEM;
    for (i = 0; i < nacc && err == FLASH_OK; i++) {
        flash__sqc_acc *a = &accs[i];
        if (a->n) ps[np++] = flash_invalidate_rows_async(t->ctx, a->m, a->n, a->olds, a->news);
        if (a->nq) ps[np++] = flash_invalidate_queries_async(t->ctx, a->nq, a->qs);
        if (a->bump) ps[np++] = flash_bump_version_async(t->ctx, a->m);
    }
    for (i = 0; i < np && err == FLASH_OK; i++)
        if (!ps[i]) err = FLASH_ENOMEM;
    if (err == FLASH_OK && np) {
        flash_promise *all = flash_gather(t->ctx, np, ps);
        if (!all || flash_on_settle(t->ctx, all, flash__sqc_settled, t) != FLASH_OK) err = FLASH_ENOMEM;
        else t->inflight++;
        t->stats.flushes++;
    }
    if (err) {
        t->stats.errors++;
        if (!t->first_error) t->first_error = err;
        flash_ctx_log(t->ctx, FLASH_LOG_ERROR, "sqlite changes: cannot invalidate a committed transaction (%s): "
                                               "keys may stay stale until their timeout", flash_strerror(err));
    }
    for (i = 0; i < nacc; i++) {
        free(accs[i].olds);
        free(accs[i].news);
        free(accs[i].qs);
    }
    free(accs);
    free(mapped);
    while (mem) { /* the keys were built by the calls */
        flash__sqc_mem *next = mem->next;
        free(mem);
        mem = next;
    }
}

/* The next tick after a commit: apply what committed, drop what was rolled
   back, keep a transaction whose COMMIT failed and is still open. */
static void flash__sqc_tick(void *arg) {
    flash_sqlite_changes *t = (flash_sqlite_changes *)arg;
    unsigned dv = flash__sqc_dv(t);
    while (t->ncommitting) {
        flash__sqc_seg *g = &t->committing[0];
        if (g->dv == dv) {
            if (!sqlite3_get_autocommit(t->db)) break; /* COMMIT failed: still open */
            t->stats.rollbacks++;                      /* gone without its rollback hook */
        } else if (!t->preupdate && !sqlite3_get_autocommit(t->db)) {
            /* The update path re-reads rows: not inside a transaction opened
               since, whose uncommitted rows it would read instead. Its
               COMMIT or ROLLBACK posts this tick again. */
            break;
        } else {
            flash__sqc_apply(t, g);
        }
        flash__sqc_drop(t, 0);
    }
}

FLASH_API flash_sqlite_changes *flash_sqlite_track_changes(flash_sqlite *s, flash_ctx *ctx, unsigned flags, int *err) {
    flash_sqlite_changes *t;
    flash_desc d;
    const flash_model *m;
    int e = FLASH_OK;
    if (err) *err = FLASH_EINVAL;
    if (!s || !s->db || !ctx || !flash_ctx_loop(ctx).vt) return NULL;
    t = (flash_sqlite_changes *)calloc(1, sizeof *t);
    if (!t) goto oom;
    t->sq = s;
    t->db = s->db;
    t->loop = flash_ctx_loop(ctx);
    d = *flash_ctx_desc(ctx);
    t->ctx = flash_ctx_create(&d);
    if (!t->ctx || flash_ctx_attach_loop(t->ctx, t->loop) != FLASH_OK) goto oom;
    t->dbs[0] = (char *)malloc(5);
    if (!t->dbs[0]) goto oom;
    memcpy(t->dbs[0], "main", 5);
    t->ndbs = 1;
    for (m = flash_models(); m; m = m->next) {
        const char *name = m->opts.table ? m->opts.table : m->name, *dot = strchr(name, '.');
        const char *tname = dot ? dot + 1 : name;
        size_t i, dl = dot ? (size_t)(dot - name) : 0;
        flash__sqc_table *nt;
        for (i = 0; i < t->ntables; i++) {
            const flash__sqc_table *tb = &t->tables[i];
            if (sqlite3_stricmp(tb->name, tname) == 0 && (dot ? tb->db && strlen(tb->db) == dl &&
                                                                    sqlite3_strnicmp(tb->db, name, (int)dl) == 0
                                                              : !tb->db))
                break;
        }
        if (i < t->ntables) continue;
        nt = (flash__sqc_table *)realloc(t->tables, (t->ntables + 1) * sizeof *nt);
        if (!nt) goto oom;
        t->tables = nt;
        nt = &nt[t->ntables++];
        memset(nt, 0, sizeof *nt);
        nt->rowid_col = -1;
        nt->name = (char *)malloc(strlen(tname) + 1);
        if (!nt->name) goto oom;
        memcpy(nt->name, tname, strlen(tname) + 1);
        if (dot) {
            nt->db = (char *)malloc(dl + 1);
            if (!nt->db) goto oom;
            memcpy(nt->db, name, dl);
            nt->db[dl] = 0;
        }
    }
#if FLASH_SQLITE_PREUPDATE
    t->preupdate = !(flags & FLASH_SQLITE_TRACK_UPDATE_HOOK) && sqlite3_compileoption_used("ENABLE_PREUPDATE_HOOK");
#else
    (void)flags;
#endif
    t->stats.preupdate = t->preupdate;
#if FLASH_SQLITE_PREUPDATE
    if (t->preupdate) sqlite3_preupdate_hook(t->db, flash__sqc_preupdate, t);
    else
#endif
        sqlite3_update_hook(t->db, flash__sqc_update, t);
    sqlite3_commit_hook(t->db, flash__sqc_commit, t);
    sqlite3_rollback_hook(t->db, flash__sqc_rollback, t);
    if (err) *err = FLASH_OK;
    return t;
oom:
    e = FLASH_ENOMEM;
    flash_sqlite_untrack_changes(t);
    if (err) *err = e;
    return NULL;
}

FLASH_API int flash_sqlite_changes_flush(flash_sqlite_changes *t) {
    int i, e;
    if (!t) return FLASH_EINVAL;
    if (flash_defer_queued(&t->tick)) flash_loop_unpost(t->loop, &t->tick);
    flash__sqc_tick(t);
    for (i = 0; i < 1000000 && t->inflight; i++) t->loop.vt->run_once(t->loop.native, true);
    e = t->first_error;
    t->first_error = 0;
    return e;
}

FLASH_API void flash_sqlite_untrack_changes(flash_sqlite_changes *t) {
    size_t i;
    int k;
    if (!t) return;
    if (t->ctx && t->db && t->loop.vt) {
#if FLASH_SQLITE_PREUPDATE
        if (t->preupdate) sqlite3_preupdate_hook(t->db, NULL, NULL);
#endif
        sqlite3_update_hook(t->db, NULL, NULL);
        sqlite3_commit_hook(t->db, NULL, NULL);
        sqlite3_rollback_hook(t->db, NULL, NULL);
        flash_sqlite_changes_flush(t);
    }
    if (t->loop.vt && flash_defer_queued(&t->tick)) flash_loop_unpost(t->loop, &t->tick);
    flash__sqc_seg_free(&t->open);
    while (t->ncommitting) flash__sqc_drop(t, 0);
    free(t->committing);
    for (i = 0; i < t->ntables; i++) {
        for (k = 0; k < t->tables[i].ncols; k++) free(t->tables[i].cols[k]);
        free(t->tables[i].cols);
        free(t->tables[i].name);
        free(t->tables[i].db);
    }
    free(t->tables);
    for (k = 0; k < t->ndbs; k++) free(t->dbs[k]);
    if (t->ctx) flash_ctx_destroy(t->ctx);
    free(t);
}

FLASH_API flash_sqlite_changes_stats flash_sqlite_changes_stats_get(const flash_sqlite_changes *t) {
    flash_sqlite_changes_stats z;
    if (t) return t->stats;
    memset(&z, 0, sizeof z);
    return z;
}

#endif /* FLASH_SQLITE_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
