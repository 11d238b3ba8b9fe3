/* backends/changes/postgres.h — invalidation from PostgreSQL's change stream.

   Every committed write invalidates, whoever made it (a migration, psql, a
   batch job, a service in another language): a consumer reads the
   database's logical replication stream (the built-in pgoutput plugin; no
   extension) and, for each committed transaction, invalidates the old and
   new rows of every change with flash_invalidate_rows_async, on a context
   of its own configured with your cache. The mcsqueal of flash.

       flash_pg_changes_desc d = {0};
       d.conninfo = "host=db dbname=app user=flash";   // replication=database is added
       d.loop = flash_poll_loop(loop);
       d.cache = cache;                                 // the readers' cache (not owned)
       d.publication = "flash";                         // default "flash"
       d.slot = "flash";                                // default "flash"
       d.create_publication = d.create_slot = true;
       d.ctx = &reader_desc;   // key_prefix, stale_marker_ttl_s: as the readers'
       flash_pg_changes *ch = flash_pg_changes_create(&d, &err);
       ... run the loop ...
       flash_pg_changes_destroy(ch);                    // before the cache and loop

   SERVER SETUP
     wal_level = logical (restart), max_replication_slots and max_wal_senders
     >= 1 each for the consumer; a role with REPLICATION (and, for
     create_publication, ownership of the tables) and a pg_hba.conf line for
     `replication` connections of the database. REPLICA IDENTITY FULL on the
     models' tables is recommended (see LIMITS).

   WHAT IT DOES
     connect   non-blocking libpq (PQconnectStartParams / PQconnectPoll) on
               the flash loop, "replication=database"
     setup     create_publication: when `publication` does not exist, CREATE
               PUBLICATION ... FOR TABLE <the tables of the models that exist>
               (an existing publication is used as it is: add tables
               yourself). create_slot: when `slot` does not exist,
               CREATE_REPLICATION_SLOT <slot> LOGICAL pgoutput (persistent).
               Without create_slot a missing slot is an error (retried).
     stream    START_REPLICATION SLOT <slot> LOGICAL 0/0 (proto_version '1',
               publication_names '<publication>'): the server resumes from
               the slot's confirmed position.
     map       Relation messages map a table (namespace + name) to the models
               whose opts.table (default: the model's name) is "name" (any
               schema) or "schema.name", and their fields to columns by name.
               A Relation message for a known table (ALTER TABLE) re-maps.
     buffer    changes between Begin and Commit are kept; at Commit the
               transaction is complete. Each change yields model rows built
               from the tuple's text values (the types of
               backends/source/postgres.h).
     apply     committed transactions are invalidated in batches (all those
               complete when the previous batch was applied;
               a transaction is never split), one flash_invalidate_rows_async
               per model; while a batch is applied the next accumulates.
     ack       only once the batch's promise fulfilled (the cache applied
               every marker and version bump): a standby status update with
               write = flush = apply = the last applied Commit's end LSN. With
               nothing pending, a keepalive's position is acknowledged too (so
               that an idle or unpublished-only stream does not retain WAL).
               Keepalives asking for a reply are answered; a status update is
               sent every status_interval_ms anyway.
     retry     an invalidation that fails (cache down, ...) is not
               acknowledged: it is retried with exponential backoff
               (retry_min_ms doubling up to retry_max_ms) while the stream
               goes on buffering; reading pauses when max_pending_rows are
               waiting. A lost connection reconnects with the same backoff;
               the transaction being received is dropped, the server sends it
               again from the slot's position. At-least-once: a crash of the
               consumer, of PostgreSQL or of the cache loses nothing, and a
               transaction may be invalidated twice.

   ROWS PER CHANGE
     INSERT                 the new row
     UPDATE                 the old row (REPLICA IDENTITY FULL: every column;
                            default identity: only when the key changed, and
                            then only the key columns) and the new row
     DELETE                 the old row (FULL: every column; default: the key
                            columns only)
     TRUNCATE               flash_bump_version of the model: every class of
                            it, and every class depending on it, is flushed
                            (one version key each).
   A row with every field known goes through flash_invalidate_rows_async:
   every key of every class (markers, allowtime, version bumps). A partial
   row (default identity old rows; unchanged TOASTed values, sent as 'u';
   a NULL in a non-null field; a value that does not parse) invalidates the
   keys of the UNSET classes whose key fields are all known
   (flash_invalidate_queries_async) and bumps the DYNAMIC classes; a class
   keyed on an unknown field cannot be invalidated from that row image, and a
   warning names the table and class once per table.

   LIMITS (the exact guarantee)
     - With REPLICA IDENTITY DEFAULT the old row of an UPDATE that keeps the
       key is not sent: a class keyed on a non-key column (User.username)
       keeps the value under the OLD username until its timeout. DELETE
       invalidates only classes keyed on primary-key columns. FULL removes
       both limits; a warning is logged once per table otherwise.
     - The slot retains WAL until acknowledged: a consumer that is down (or
       a cache that stays down) makes the server keep WAL without bound
       (max_slot_wal_keep_size caps it by invalidating the slot; then
       writes since are lost to the consumer: recreate the slot and flush
       the cache). Drop the slot of a consumer you retire.
     - Lag: a read between a commit and its invalidation can still see (and
       fill) the old value. flash's lag window (lag_window_ms) keeps readers
       from filling a key soon after a marker, not before it: keep the
       stream's lag well under the marker's TTL (stale_marker_ttl_s) and
       read flash_pg_changes_stats().lag_ms.
     - An unqualified opts.table matches that name in every schema (an extra
       invalidation, never a missed one).
     - Single-threaded: use it from its loop's thread. Numbers parse with
       strtoll/strtod (C locale).

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
   Includes backends/source/postgres.h for its text-value parsers. Link
   with -lpq. LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_CHANGES_POSTGRES_H
#define FLASH_CHANGES_POSTGRES_H
#include "../../flash.h"
#include "../source/postgres.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_pg_changes flash_pg_changes;

/* Zero-initialise; every zero field means its default. */
typedef struct flash_pg_changes_desc {
    const char *conninfo;          /* required: libpq conninfo (copied) */
    flash_loop loop;               /* required */
    flash_cache cache;             /* required: the cache to invalidate (not owned) */
    const flash_desc *ctx;         /* the consumer context's desc (key_prefix,
                                      stale_marker_ttl_s, logger, ... must be
                                      the readers'); its cache is ignored.
                                      default: flash's defaults */
    const char *publication;       /* default: "flash" */
    const char *slot;              /* default: "flash" */
    bool create_publication;       /* create a missing publication */
    bool create_slot;              /* create a missing slot */
    const flash_model *const *models; /* the models to map; default: every registered one */
    size_t nmodels;
    uint32_t connect_timeout_ms;   /* default: 5000 (connect and setup) */
    uint32_t retry_min_ms;         /* default: 100: first reconnect / retry delay */
    uint32_t retry_max_ms;         /* default: 5000: its cap */
    uint32_t status_interval_ms;   /* default: 1000 */
    uint32_t max_pending_rows;     /* default: 1000000: stop reading past it */
} flash_pg_changes_desc;

/* Counters (cumulative) and state. */
typedef struct flash_pg_changes_stats {
    uint64_t transactions;     /* Commit messages received */
    uint64_t changes;          /* INSERT/UPDATE/DELETE of mapped tables */
    uint64_t truncates;        /* TRUNCATEd mapped tables */
    uint64_t rows_invalidated; /* row images invalidated (old + new) */
    uint64_t batches;          /* invalidation batches applied */
    uint64_t retries;          /* invalidation batches retried */
    uint64_t connects;         /* streams started */
    uint64_t reconnects;       /* connections lost or failed, then retried */
    uint64_t errors;           /* logged errors (bad input, failed batches, connections) */
    uint64_t keepalives;       /* primary keepalives received */
    uint64_t status_updates;   /* standby status updates sent */
    uint64_t received_lsn;     /* the end of the last Commit received */
    uint64_t acked_lsn;        /* the position acknowledged (flush) */
    uint64_t pending_rows;     /* rows received and not yet applied */
    int64_t lag_ms;            /* last applied batch: its oldest commit -> applied (server clock) */
    bool streaming;            /* the stream is up now */
} flash_pg_changes_stats;

/* A consumer, or NULL with *err (FLASH_EINVAL: a required field missing or
   a conninfo libpq cannot parse; FLASH_ENOMEM). It connects at once. */
FLASH_API flash_pg_changes *flash_pg_changes_create(const flash_pg_changes_desc *desc, int *err);
/* Closes the stream (positions not acknowledged are sent again to the next
   consumer of the slot) and its context: destroy it before the cache. */
FLASH_API void flash_pg_changes_destroy(flash_pg_changes *c);
FLASH_API flash_pg_changes_stats flash_pg_changes_stats_get(const flash_pg_changes *c);
FLASH_API const char *flash_pg_changes_last_error(const flash_pg_changes *c); /* "" if none */
/* "16/B374D848" <-> 64-bit LSN; parse returns 0 for a malformed string. */
FLASH_API uint64_t flash_pg_lsn_parse(const char *s);
FLASH_API void flash_pg_lsn_format(uint64_t lsn, char out[24]);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_CHANGES_POSTGRES_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_CHANGES_POSTGRES_IMPLEMENTED
#define FLASH_CHANGES_POSTGRES_IMPLEMENTED
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FLASH__PGC_CHUNK ((size_t)128) /* row pairs per flash_invalidate_rows_async */
enum { FLASH__PGC_DOWN = 0, FLASH__PGC_CONNECTING, FLASH__PGC_SETUP, FLASH__PGC_STREAMING };
enum { FLASH__PGC_STEP_PUB = 1, FLASH__PGC_STEP_SLOT_CHECK, FLASH__PGC_STEP_SLOT_CREATE, FLASH__PGC_STEP_START };

/* Rows live in blocks of a batch's own arena, freed with the batch: they
   outlive the context's resets (a batch is retried on a fresh request). */
typedef struct flash__pgc_block {
    struct flash__pgc_block *next;
    size_t used, cap;
    /* data follows */
} flash__pgc_block;

typedef struct flash__pgc_entry {
    const flash_model *m;
    void *old_row, *new_row;
    bool *old_known, *new_known; /* NULL: every field known */
    bool truncate;               /* bump the model's versions */
} flash__pgc_entry;

typedef struct flash__pgc_batch {
    flash__pgc_entry *e;
    size_t n, cap;
    flash__pgc_block *blocks;
    uint64_t lsn;      /* acknowledge this once applied */
    int64_t commit_us; /* its oldest commit time (server clock, us since 2000) */
    size_t rows;       /* row images */
} flash__pgc_batch;

typedef struct flash__pgc_map {
    const flash_model *m;
    int *col; /* per field: column index, -1 when the table has none */
} flash__pgc_map;

typedef struct flash__pgc_rel {
    struct flash__pgc_rel *next;
    uint32_t relid;
    char *nsp, *name;
    char ident;
    int ncols;
    char **cols;
    uint32_t *types;
    uint8_t *flags;
    flash__pgc_map *maps;
    size_t nmaps;
    bool warned_identity, warned_partial, warned_unmapped, warned_type;
} flash__pgc_rel;

struct flash_pg_changes {
    flash_pg_changes_desc desc;
    char *conninfo, *publication, *slot;
    const flash_model **models;
    size_t nmodels;
    flash_loop loop;
    flash_ctx *ctx;
    PGconn *conn;
    int state, step, fd, events;
    void *io, *timer, *status_timer, *retry_timer;
    uint32_t backoff_ms, retry_backoff_ms;
    flash__pgc_rel *rels;
    flash__pgc_batch acc;    /* received: committed part [0, committed) + the open transaction */
    size_t committed, committed_rows;
    bool in_txn;
    uint64_t txn_end;
    int64_t txn_commit_us;
    PGresult *res;           /* setup: a statement's result until its end */
    flash__pgc_batch flight; /* being applied */
    bool flying, flight_failed;
    flash_promise *flight_p;
    flash_defer pump;
    uint64_t last_sent_ack;
    bool paused, closing;
    flash_pg_changes_stats stats;
    char last_error[384];
};

/* ---- small helpers ---- */

static int64_t flash__pgc_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    /* PostgreSQL's epoch is 2000-01-01 */
    return ((int64_t)ts.tv_sec - 946684800) * 1000000 + ts.tv_nsec / 1000;
}

static void flash__pgc_log(flash_pg_changes *c, int level, const char *fmt, ...) FLASH__PRINTF(3, 4);
static void flash__pgc_log(flash_pg_changes *c, int level, const char *fmt, ...) {
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (level == FLASH_LOG_ERROR) {
        c->stats.errors++;
        snprintf(c->last_error, sizeof c->last_error, "%s", msg);
    }
    flash_ctx_log(c->ctx, level, "pg_changes: %s", msg);
}

static char *flash__pgc_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

FLASH_API uint64_t flash_pg_lsn_parse(const char *s) {
    unsigned hi, lo;
    if (!s || sscanf(s, "%X/%X", &hi, &lo) != 2) return 0;
    return ((uint64_t)hi << 32) | lo;
}

FLASH_API void flash_pg_lsn_format(uint64_t lsn, char out[24]) {
    snprintf(out, 24, "%X/%X", (unsigned)(lsn >> 32), (unsigned)(lsn & 0xffffffffu));
}

static void *flash__pgc_alloc(flash__pgc_batch *b, size_t size) {
    flash__pgc_block *k = b->blocks;
    size = (size + 15) & ~(size_t)15;
    if (!k || k->cap - k->used < size) {
        size_t cap = size > 65536 ? size : 65536;
        k = (flash__pgc_block *)malloc(sizeof(flash__pgc_block) + 16 + cap);
        if (!k) return NULL;
        k->cap = cap;
        k->used = 0;
        k->next = b->blocks;
        b->blocks = k;
    }
    {
        /* 16-byte aligned data after the header */
        uintptr_t base = ((uintptr_t)(k + 1) + 15) & ~(uintptr_t)15;
        void *p = (void *)(base + k->used);
        k->used += size;
        memset(p, 0, size);
        return p;
    }
}

static void flash__pgc_batch_free(flash__pgc_batch *b) {
    while (b->blocks) {
        flash__pgc_block *k = b->blocks;
        b->blocks = k->next;
        free(k);
    }
    free(b->e);
    memset(b, 0, sizeof *b);
}

static flash__pgc_entry *flash__pgc_push(flash__pgc_batch *b) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        flash__pgc_entry *e = (flash__pgc_entry *)realloc(b->e, cap * sizeof *e);
        if (!e) return NULL;
        b->e = e;
        b->cap = cap;
    }
    memset(&b->e[b->n], 0, sizeof b->e[0]);
    return &b->e[b->n++];
}

/* ---- reading pgoutput (big-endian, bounds-checked) ---- */

typedef struct flash__pgc_rd {
    const unsigned char *p, *end;
    bool bad;
} flash__pgc_rd;

static uint64_t flash__pgc_uint(flash__pgc_rd *r, int bytes) {
    uint64_t v = 0;
    int i;
    if (r->bad || r->end - r->p < bytes) {
        r->bad = true;
        return 0;
    }
    for (i = 0; i < bytes; i++) v = (v << 8) | r->p[i];
    r->p += bytes;
    return v;
}

static const char *flash__pgc_cstr(flash__pgc_rd *r) {
    const unsigned char *z;
    const char *s;
    if (r->bad) return "";
    z = (const unsigned char *)memchr(r->p, 0, (size_t)(r->end - r->p));
    if (!z) {
        r->bad = true;
        return "";
    }
    s = (const char *)r->p;
    r->p = z + 1;
    return s;
}

/* ---- relations ---- */

static void flash__pgc_rel_clear(flash__pgc_rel *rel) {
    int i;
    size_t k;
    for (i = 0; i < rel->ncols; i++) free(rel->cols[i]);
    free(rel->cols);
    free(rel->types);
    free(rel->flags);
    for (k = 0; k < rel->nmaps; k++) free(rel->maps[k].col);
    free(rel->maps);
    free(rel->nsp);
    free(rel->name);
    rel->cols = NULL;
    rel->types = NULL;
    rel->flags = NULL;
    rel->maps = NULL;
    rel->nmaps = 0;
    rel->ncols = 0;
    rel->nsp = rel->name = NULL;
}

static flash__pgc_rel *flash__pgc_rel_find(flash_pg_changes *c, uint32_t relid) {
    flash__pgc_rel *r;
    for (r = c->rels; r; r = r->next)
        if (r->relid == relid) return r;
    return NULL;
}

static bool flash__pgc_table_matches(const flash_model *m, const char *nsp, const char *name) {
    const char *t = flash__pg_table(m), *dot = strchr(t, '.');
    if (!dot) return strcmp(t, name) == 0;
    return strlen(nsp) == (size_t)(dot - t) && strncmp(t, nsp, (size_t)(dot - t)) == 0 && strcmp(dot + 1, name) == 0;
}

/* Warn once per table when old rows will lack columns some class keys on. */
static void flash__pgc_check_identity(flash_pg_changes *c, flash__pgc_rel *rel) {
    size_t k;
    if (rel->ident == 'f' || rel->warned_identity) return;
    for (k = 0; k < rel->nmaps; k++) {
        const flash_model *m = rel->maps[k].m;
        const flash_class *cl;
        for (cl = m->classes; cl; cl = cl->next) {
            size_t j;
            if (cl->opts.invalidation != FLASH_INVALIDATE_UNSET) continue;
            for (j = 0; j < cl->nfields; j++) {
                int col = rel->maps[k].col[cl->fields[j]];
                if (col < 0 || !(rel->flags[col] & 1)) break;
            }
            if (j == cl->nfields) continue;
            rel->warned_identity = true;
            flash__pgc_log(c, FLASH_LOG_WARN,
                           "%s.%s has REPLICA IDENTITY %s: old rows carry only key columns, so keys of %s "
                           "on other columns cannot be invalidated on UPDATE/DELETE (ALTER TABLE %s.%s "
                           "REPLICA IDENTITY FULL)",
                           rel->nsp, rel->name, rel->ident == 'd' ? "DEFAULT" : rel->ident == 'n' ? "NOTHING" : "INDEX",
                           cl->name, rel->nsp, rel->name);
            return;
        }
    }
}

static void flash__pgc_on_relation(flash_pg_changes *c, flash__pgc_rd *r) {
    uint32_t relid = (uint32_t)flash__pgc_uint(r, 4);
    const char *nsp = flash__pgc_cstr(r), *name = flash__pgc_cstr(r);
    char ident = (char)flash__pgc_uint(r, 1);
    int ncols = (int)flash__pgc_uint(r, 2), i;
    flash__pgc_rel *rel;
    size_t k;
    bool oom = false;
    if (r->bad) return;
    rel = flash__pgc_rel_find(c, relid);
    if (!rel) {
        rel = (flash__pgc_rel *)calloc(1, sizeof *rel);
        if (!rel) {
            flash__pgc_log(c, FLASH_LOG_ERROR, "out of memory reading a Relation message");
            return;
        }
        rel->relid = relid;
        rel->next = c->rels;
        c->rels = rel;
    }
    flash__pgc_rel_clear(rel); /* a schema change: map afresh */
    rel->nsp = flash__pgc_strdup(nsp);
    rel->name = flash__pgc_strdup(name);
    rel->ident = ident;
    rel->cols = (char **)calloc((size_t)ncols + 1, sizeof *rel->cols);
    rel->types = (uint32_t *)calloc((size_t)ncols + 1, sizeof *rel->types);
    rel->flags = (uint8_t *)calloc((size_t)ncols + 1, 1);
    oom = !rel->nsp || !rel->name || !rel->cols || !rel->types || !rel->flags;
    for (i = 0; i < ncols && !oom && !r->bad; i++) {
        rel->flags[i] = (uint8_t)flash__pgc_uint(r, 1);
        rel->cols[i] = flash__pgc_strdup(flash__pgc_cstr(r));
        rel->types[i] = (uint32_t)flash__pgc_uint(r, 4);
        (void)flash__pgc_uint(r, 4); /* typmod */
        rel->ncols = i + 1;
        oom = !rel->cols[i];
    }
    if (r->bad || oom) {
        if (oom) flash__pgc_log(c, FLASH_LOG_ERROR, "out of memory reading a Relation message");
        flash__pgc_rel_clear(rel);
        return;
    }
    for (k = 0; k < c->nmodels; k++) {
        const flash_model *m = c->models[k];
        flash__pgc_map *mp;
        size_t f;
        if (!flash__pgc_table_matches(m, rel->nsp, rel->name)) continue;
        mp = (flash__pgc_map *)realloc(rel->maps, (rel->nmaps + 1) * sizeof *mp);
        if (!mp) break;
        rel->maps = mp;
        mp = &rel->maps[rel->nmaps];
        mp->m = m;
        mp->col = (int *)malloc((m->nfields ? m->nfields : 1) * sizeof *mp->col);
        if (!mp->col) break;
        rel->nmaps++;
        for (f = 0; f < m->nfields; f++) {
            mp->col[f] = -1;
            for (i = 0; i < rel->ncols; i++)
                if (strcmp(rel->cols[i], m->fields[f].name) == 0) mp->col[f] = i;
            if (mp->col[f] < 0 && !rel->warned_unmapped) {
                rel->warned_unmapped = true;
                flash__pgc_log(c, FLASH_LOG_WARN, "%s.%s has no column %s for %s.%s: rows are partial", rel->nsp,
                               rel->name, m->fields[f].name, m->name, m->fields[f].name);
            }
        }
    }
    flash__pgc_check_identity(c, rel);
}

/* ---- tuples -> model rows ---- */

/* The tuple's columns: kind ('n', 'u', 't') and text. */
typedef struct flash__pgc_col {
    char kind;
    const char *s;
    size_t len;
} flash__pgc_col;

/* Read TupleData; false when malformed. */
static bool flash__pgc_tuple(flash__pgc_rd *r, flash__pgc_col *cols, int cap, int *n) {
    int i, nc = (int)flash__pgc_uint(r, 2);
    if (r->bad || nc > cap) return false;
    for (i = 0; i < nc; i++) {
        cols[i].kind = (char)flash__pgc_uint(r, 1);
        cols[i].s = NULL;
        cols[i].len = 0;
        if (cols[i].kind == 't' || cols[i].kind == 'b') {
            uint32_t len = (uint32_t)flash__pgc_uint(r, 4);
            if (r->bad || (size_t)(r->end - r->p) < len) return false;
            cols[i].s = (const char *)r->p;
            cols[i].len = len;
            r->p += len;
        } else if (cols[i].kind != 'n' && cols[i].kind != 'u') {
            return false;
        }
        if (r->bad) return false;
    }
    *n = nc;
    return true;
}

/* I64 / I32 / F64 / BOOL from text into p: 0, or -1 when it does not parse
   (or an I32 is out of range). */
static int flash__pgc_scalar(flash_type t, const char *s, char *p) {
    if (t == FLASH_I64 || t == FLASH_I32) {
        int64_t x;
        int32_t y;
        if (flash__pg_parse_i64(s, &x) != 0) return -1;
        if (t == FLASH_I64) {
            memcpy(p, &x, sizeof x);
            return 0;
        }
        if (x < INT32_MIN || x > INT32_MAX) return -1;
        y = (int32_t)x;
        memcpy(p, &y, sizeof y);
        return 0;
    }
    if (t == FLASH_F64) {
        char *end;
        double x = strtod(s, &end);
        if (end == s || *end) return -1;
        memcpy(p, &x, sizeof x);
        return 0;
    }
    if (t == FLASH_BOOL) {
        bool x = s[0] == 't';
        if ((s[0] != 't' && s[0] != 'f') || s[1]) return -1;
        memcpy(p, &x, sizeof x);
        return 0;
    }
    return -1;
}

#ifdef FLASH_TIME_PER_S
/* flash.h with nullable numbers ({v; bool null}): the base type, and where
   null lies; FLASH_BYTES (never nullable) for any other type. */
static flash_type flash__pgc_nullable(flash_type t, size_t *null_at) {
    switch (t) {
    case FLASH_I64N: *null_at = offsetof(flash_i64n, null); return FLASH_I64;
    case FLASH_I32N: *null_at = offsetof(flash_i32n, null); return FLASH_I32;
    case FLASH_F64N: *null_at = offsetof(flash_f64n, null); return FLASH_F64;
    case FLASH_BOOLN: *null_at = offsetof(flash_booln, null); return FLASH_BOOL;
    default: return FLASH_BYTES;
    }
}
#endif

/* One field from a column's text: 0 fine, 1 not known (no column, 'u',
   NULL in a non-null field, a value that does not parse, a type not parsed
   here), -1 out of memory. */
static int flash__pgc_field(flash_pg_changes *c, flash__pgc_batch *b, flash__pgc_rel *rel, const flash_model *m,
                            size_t f, int col, const flash__pgc_col *cols, int ncols, char *row) {
    const flash_field *fd = &m->fields[f];
    const flash__pgc_col *v;
    char *p = row + fd->offset, *s;
    flash_type t = fd->type;
    size_t null_at = 0;
    bool nullable = false;
#ifdef FLASH_TIME_PER_S
    {
        flash_type base = flash__pgc_nullable(fd->type, &null_at);
        if (base != FLASH_BYTES) {
            t = base;
            nullable = true;
        }
    }
#endif
    if (col < 0 || col >= ncols) return 1;
    v = &cols[col];
    if (v->kind == 'u') return 1;
    if (v->kind == 'n') {
        bool yes = true;
        if (t == FLASH_STR || t == FLASH_BYTES) return 0; /* zeroed: NULL */
        if (!nullable) return 1;
        memcpy(p + null_at, &yes, sizeof yes);
        return 0;
    }
    if (v->kind == 'b') {
        flash__pgc_log(c, FLASH_LOG_ERROR, "%s.%s: a binary value (proto binary mode is not used)", rel->nsp,
                       rel->cols[col]);
        return 1;
    }
    s = (char *)flash__pgc_alloc(b, v->len + 1);
    if (!s) return -1;
    memcpy(s, v->s, v->len);
    s[v->len] = 0;
    if (t == FLASH_I64 || t == FLASH_I32 || t == FLASH_F64 || t == FLASH_BOOL) {
        if (flash__pgc_scalar(t, s, p) == 0) return 0; /* a nullable's v is at 0, null stays false */
    } else if (t == FLASH_STR) {
        memcpy(p, &s, sizeof s);
        return 0;
    } else if (t == FLASH_BYTES) {
        flash_bytes x;
        x.data = s;
        x.len = v->len;
        if (rel->types[col] == FLASH__PG_BYTEA) {
            flash_bytes d;
            char *copy;
            if (flash__pg_bytea(s, v->len, &d) != 0) goto bad;
            copy = (char *)flash__pgc_alloc(b, d.len + 1);
            if (copy) memcpy(copy, d.data, d.len);
            free((void *)d.data);
            if (!copy) return -1;
            x.data = copy;
            x.len = d.len;
        }
        memcpy(p, &x, sizeof x);
        return 0;
    } else {
        /* A field type this consumer does not parse (yet): unknown, so the
           classes keyed on it are not invalidated from this row; said once. */
        if (!rel->warned_type) {
            rel->warned_type = true;
            flash__pgc_log(c, FLASH_LOG_ERROR,
                           "%s.%s: field type %s of %s.%s is not parsed from the stream: classes keyed on it are "
                           "not invalidated",
                           rel->nsp, rel->cols[col], flash_type_name(fd->type), m->name, fd->name);
        }
        return 1;
    }
bad:
    flash__pgc_log(c, FLASH_LOG_ERROR, "%s.%s = '%.40s' is not a valid %s for %s.%s: its keys are skipped", rel->nsp,
                   rel->cols[col], s, flash_type_name(fd->type), m->name, fd->name);
    return 1;
}

/* Build the model row of a tuple into b; *known NULL when complete. */
static int flash__pgc_row(flash_pg_changes *c, flash__pgc_batch *b, flash__pgc_rel *rel, const flash__pgc_map *mp,
                          const flash__pgc_col *cols, int ncols, void **row_out, bool **known_out) {
    const flash_model *m = mp->m;
    char *row = (char *)flash__pgc_alloc(b, m->size ? m->size : 1);
    bool *known = NULL;
    size_t f;
    if (!row) return -1;
    for (f = 0; f < m->nfields; f++) {
        int rc = flash__pgc_field(c, b, rel, m, f, mp->col[f], cols, ncols, row);
        if (rc < 0) return -1;
        if (rc == 0) continue;
        if (!known) {
            size_t g;
            known = (bool *)flash__pgc_alloc(b, m->nfields);
            if (!known) return -1;
            for (g = 0; g < m->nfields; g++) known[g] = true;
        }
        known[f] = false;
    }
    *row_out = row;
    *known_out = known;
    return 0;
}

/* I/U/D of one relation: one entry per mapped model. */
static bool flash__pgc_on_change(flash_pg_changes *c, char kind, flash__pgc_rd *r) {
    enum { MAXCOLS = 1664 }; /* PostgreSQL's MaxTupleAttributeNumber */
    static flash__pgc_col oldc[MAXCOLS], newc[MAXCOLS]; /* single-threaded by contract */
    uint32_t relid = (uint32_t)flash__pgc_uint(r, 4);
    int nold = -1, nnew = -1;
    char t;
    flash__pgc_rel *rel;
    size_t k;
    if (r->bad) return false;
    t = (char)flash__pgc_uint(r, 1);
    if (t == 'K' || t == 'O') {
        if (kind == 'I' || !flash__pgc_tuple(r, oldc, MAXCOLS, &nold)) return false;
        if (kind == 'U') t = (char)flash__pgc_uint(r, 1);
    }
    if (kind != 'D') {
        if (t != 'N' || !flash__pgc_tuple(r, newc, MAXCOLS, &nnew)) return false;
    } else if (nold < 0) {
        return false;
    }
    if (r->bad) return false;
    rel = flash__pgc_rel_find(c, relid);
    if (!rel || !rel->name) {
        flash__pgc_log(c, FLASH_LOG_ERROR, "a change of relation oid %u, which no Relation message described: skipped",
                       (unsigned)relid);
        return true;
    }
    if (!rel->nmaps) return true;
    c->stats.changes++;
    for (k = 0; k < rel->nmaps; k++) {
        flash__pgc_entry *e = flash__pgc_push(&c->acc);
        int rc = e ? 0 : -1;
        if (e) e->m = rel->maps[k].m;
        if (!rc && nold >= 0) {
            rc = flash__pgc_row(c, &c->acc, rel, &rel->maps[k], oldc, nold, &e->old_row, &e->old_known);
            c->acc.rows++;
        }
        if (!rc && nnew >= 0) {
            rc = flash__pgc_row(c, &c->acc, rel, &rel->maps[k], newc, nnew, &e->new_row, &e->new_known);
            c->acc.rows++;
        }
        if (rc) {
            /* Not knowing the keys is not an option: drop the stream, the
               server sends the transaction again. */
            flash__pgc_log(c, FLASH_LOG_ERROR, "out of memory buffering a change of %s.%s", rel->nsp, rel->name);
            return false;
        }
        if (!rel->warned_partial && ((e->old_known && e->old_row) || (e->new_known && e->new_row))) {
            rel->warned_partial = true;
            flash__pgc_log(c, FLASH_LOG_WARN,
                           "%s.%s: a change with columns missing (replica identity, unchanged TOAST, NULL or "
                           "unparsable values): classes keyed on them are not invalidated for such rows",
                           rel->nsp, rel->name);
        }
    }
    return true;
}

static bool flash__pgc_on_truncate(flash_pg_changes *c, flash__pgc_rd *r) {
    uint32_t n = (uint32_t)flash__pgc_uint(r, 4), i;
    (void)flash__pgc_uint(r, 1); /* options: CASCADE, RESTART IDENTITY */
    for (i = 0; i < n && !r->bad; i++) {
        uint32_t relid = (uint32_t)flash__pgc_uint(r, 4);
        flash__pgc_rel *rel = flash__pgc_rel_find(c, relid);
        size_t k;
        if (r->bad) break;
        if (!rel || !rel->name) {
            flash__pgc_log(c, FLASH_LOG_ERROR, "TRUNCATE of relation oid %u, which no Relation message described",
                           (unsigned)relid);
            continue;
        }
        if (rel->nmaps) c->stats.truncates++;
        for (k = 0; k < rel->nmaps; k++) {
            flash__pgc_entry *e = flash__pgc_push(&c->acc);
            if (!e) return false;
            e->m = rel->maps[k].m;
            e->truncate = true; /* every class of the model is bumped */
        }
    }
    return !r->bad;
}

/* ---- applying batches ---- */

static void flash__pgc_kick_pump(flash_pg_changes *c);
static void flash__pgc_send_status(flash_pg_changes *c, bool force);
static void flash__pgc_read(flash_pg_changes *c);
static void flash__pgc_resume(flash_pg_changes *c);

static bool flash__pgc_complete(const flash__pgc_entry *e, bool old) {
    return old ? e->old_row && !e->old_known : e->new_row && !e->new_known;
}

/* A partial row: the keys of UNSET classes whose fields are all known. */
static int flash__pgc_partial(flash_ctx *ctx, const flash_model *m, const void *row, const bool *known,
                              flash_query **qs, size_t *nq, bool *bump) {
    const flash_class *cl;
    for (cl = m->classes; cl; cl = cl->next) {
        flash_value v[8];
        size_t j;
        if (cl->opts.invalidation == FLASH_INVALIDATE_OFF) continue;
        if (cl->opts.invalidation == FLASH_INVALIDATE_DYNAMIC) {
            *bump = true;
            continue;
        }
        for (j = 0; j < cl->nfields && known[cl->fields[j]]; j++) v[j] = flash_row_value(m, row, cl->fields[j]);
        if (j < cl->nfields) continue;
        qs[*nq] = flash_query_new(ctx, cl, v, cl->nfields);
        if (!qs[*nq]) return FLASH_ENOMEM;
        (*nq)++;
    }
    return FLASH_OK;
}

static void flash__pgc_flight_done(flash_ctx *ctx, flash_promise *p, void *arg);

/* Start the invalidations of the flight on a fresh request. */
static void flash__pgc_flight_start(flash_pg_changes *c) {
    flash__pgc_batch *b = &c->flight;
    flash_ctx *ctx = c->ctx;
    flash_promise **ps;
    flash_query **qs;
    size_t np = 0, nq = 0, i, nclasses = 0, cap;
    const flash_model **done;
    size_t ndone = 0;
    flash_ctx_reset(ctx);
    c->flight_failed = false;
    /* Group by model: one rows call per model, then the partial rows'
       queries and the bumps. */
    done = (const flash_model **)flash_calloc(ctx, b->n + 1, sizeof *done);
    for (i = 0; i < b->n; i++) {
        const flash_class *cl;
        size_t k = 0;
        for (cl = b->e[i].m->classes; cl; cl = cl->next) k++;
        nclasses = k > nclasses ? k : nclasses;
    }
    /* rows chunks <= n, bumps <= n, query chunks <= n + 1 */
    cap = b->n * 3 + 16;
    ps = (flash_promise **)flash_calloc(ctx, cap + 1, sizeof *ps);
    qs = (flash_query **)flash_calloc(ctx, b->n * 2 * (nclasses + 1) + 1, sizeof *qs);
    if (!done || !ps || !qs) goto oom;
    for (i = 0; i < b->n; i++) {
        const flash_model *m = b->e[i].m;
        const void **olds, **news;
        size_t j, n = 0, d;
        bool bump = false;
        for (d = 0; d < ndone && done[d] != m; d++) {
        }
        if (d < ndone) continue;
        done[ndone++] = m;
        olds = (const void **)flash_calloc(ctx, b->n + 1, sizeof *olds);
        news = (const void **)flash_calloc(ctx, b->n + 1, sizeof *news);
        if (!olds || !news) goto oom;
        for (j = i; j < b->n; j++) {
            const flash__pgc_entry *e = &b->e[j];
            if (e->m != m) continue;
            if (e->truncate) bump = true;
            olds[n] = flash__pgc_complete(e, true) ? e->old_row : NULL;
            news[n] = flash__pgc_complete(e, false) ? e->new_row : NULL;
            if (olds[n] || news[n]) n++;
            if (e->old_row && e->old_known &&
                flash__pgc_partial(ctx, m, e->old_row, e->old_known, qs, &nq, &bump) != FLASH_OK)
                goto oom;
            if (e->new_row && e->new_known &&
                flash__pgc_partial(ctx, m, e->new_row, e->new_known, qs, &nq, &bump) != FLASH_OK)
                goto oom;
        }
        /* Chunks keep each backend operation of a big transaction bounded
           (a key repeated across chunks is merely written twice). */
        for (j = 0; j < n; j += FLASH__PGC_CHUNK)
            ps[np++] = flash_invalidate_rows_async(ctx, m, n - j < FLASH__PGC_CHUNK ? n - j : FLASH__PGC_CHUNK, olds + j,
                                                   news + j);
        if (bump) ps[np++] = flash_bump_version_async(ctx, m);
    }
    for (i = 0; i < nq; i += 4 * FLASH__PGC_CHUNK)
        ps[np++] = flash_invalidate_queries_async(ctx, nq - i < 4 * FLASH__PGC_CHUNK ? nq - i : 4 * FLASH__PGC_CHUNK,
                                                  qs + i);
    for (i = 0; i < np; i++)
        if (!ps[i]) goto oom;
    c->flight_p = flash_gather(ctx, np, ps);
    if (!c->flight_p || flash_on_settle(ctx, c->flight_p, flash__pgc_flight_done, c) != FLASH_OK) goto oom;
    return;
oom:
    c->flight_p = flash_rejected(ctx, FLASH_ENOMEM, "pg_changes: out of memory building the invalidations");
    if (!c->flight_p || flash_on_settle(ctx, c->flight_p, flash__pgc_flight_done, c) != FLASH_OK) {
        /* Not even that: try again later from the retry timer. */
        c->flight_failed = true;
        flash__pgc_kick_pump(c);
    }
}

static void flash__pgc_retry(void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    c->retry_timer = NULL;
    c->stats.retries++;
    flash__pgc_flight_start(c);
}

static void flash__pgc_flight_done(flash_ctx *ctx, flash_promise *p, void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    (void)ctx;
    c->flight_p = NULL;
    if (flash_promise_state(p) != FLASH_FULFILLED) {
        uint32_t ms = c->retry_backoff_ms ? c->retry_backoff_ms : c->desc.retry_min_ms;
        char lsn[24];
        flash_pg_lsn_format(c->flight.lsn, lsn);
        flash__pgc_log(c, FLASH_LOG_ERROR, "invalidating %zu rows up to %s failed (%s): not acknowledged, retry in %u ms",
                       c->flight.rows, lsn, flash_promise_message(p), (unsigned)ms);
        c->retry_backoff_ms = ms * 2 > c->desc.retry_max_ms ? c->desc.retry_max_ms : ms * 2;
        c->retry_timer = c->loop.vt->timer(c->loop.native, ms, flash__pgc_retry, c);
        if (!c->retry_timer) {
            c->flight_failed = true;
            flash__pgc_kick_pump(c);
        }
        return;
    }
    c->retry_backoff_ms = 0;
    c->stats.batches++;
    c->stats.rows_invalidated += c->flight.rows;
    c->stats.pending_rows -= c->flight.rows;
    if (c->flight.lsn > c->stats.acked_lsn) c->stats.acked_lsn = c->flight.lsn;
    if (c->flight.commit_us) c->stats.lag_ms = (flash__pgc_now_us() - c->flight.commit_us) / 1000;
    flash__pgc_batch_free(&c->flight);
    c->flying = false;
    flash__pgc_send_status(c, false);
    flash__pgc_kick_pump(c);
}

/* Move the committed part of acc into a flight (only between transactions:
   the open one stays in acc). */
static void flash__pgc_pump(void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    if (c->closing) return;
    if (c->flying) {
        if (c->flight_failed && !c->retry_timer) { /* a failure that could not schedule its retry */
            c->retry_timer = c->loop.vt->timer(c->loop.native, c->desc.retry_max_ms, flash__pgc_retry, c);
        }
        return;
    }
    if (c->in_txn || c->committed == 0) {
        if (!c->in_txn && c->committed == 0 && c->acc.lsn > c->stats.acked_lsn && c->acc.n == 0) {
            /* only empty transactions: nothing to invalidate */
            c->stats.acked_lsn = c->acc.lsn;
            flash__pgc_send_status(c, false);
        }
        flash__pgc_resume(c);
        return;
    }
    c->flight = c->acc;
    memset(&c->acc, 0, sizeof c->acc);
    c->committed = 0;
    c->committed_rows = 0;
    c->flying = true;
    if (c->flight.n == 0) { /* empty transactions: acknowledge at once */
        c->stats.batches++;
        if (c->flight.lsn > c->stats.acked_lsn) c->stats.acked_lsn = c->flight.lsn;
        flash__pgc_batch_free(&c->flight);
        c->flying = false;
        flash__pgc_send_status(c, false);
        return;
    }
    flash__pgc_flight_start(c);
    flash__pgc_resume(c);
}

static void flash__pgc_watch(flash_pg_changes *c, int events);

/* Reading paused for backpressure: go on once enough was applied. */
static void flash__pgc_resume(flash_pg_changes *c) {
    if (!c->paused || c->stats.pending_rows >= c->desc.max_pending_rows) return;
    c->paused = false;
    if (c->state != FLASH__PGC_STREAMING) return;
    flash__pgc_watch(c, FLASH_IO_READ | (c->events & FLASH_IO_WRITE));
    flash__pgc_read(c);
}

static void flash__pgc_kick_pump(flash_pg_changes *c) {
    if (!c->closing) flash_loop_post(c->loop, &c->pump, flash__pgc_pump, c);
}

/* ---- the replication connection ---- */

static void flash__pgc_on_io(void *arg, int events);
static void flash__pgc_connect(void *arg);

static void flash__pgc_watch(flash_pg_changes *c, int events) {
    int fd = PQsocket(c->conn);
    if (c->io && (fd != c->fd || c->state == FLASH__PGC_CONNECTING)) {
        c->loop.vt->io_stop(c->loop.native, c->io);
        c->io = NULL;
    }
    c->fd = fd;
    if (!c->io) {
        c->io = fd >= 0 ? c->loop.vt->io_start(c->loop.native, fd, events, flash__pgc_on_io, c) : NULL;
        c->events = events;
        return;
    }
    if (events != c->events) {
        c->loop.vt->io_set(c->loop.native, c->io, events);
        c->events = events;
    }
}

static void flash__pgc_close(flash_pg_changes *c) {
    if (c->io) c->loop.vt->io_stop(c->loop.native, c->io);
    c->io = NULL;
    if (c->timer) c->loop.vt->cancel(c->loop.native, c->timer);
    c->timer = NULL;
    if (c->status_timer) c->loop.vt->cancel(c->loop.native, c->status_timer);
    c->status_timer = NULL;
    if (c->res) PQclear(c->res);
    c->res = NULL;
    if (c->conn) PQfinish(c->conn);
    c->conn = NULL;
    c->fd = -1;
    c->events = 0;
    c->state = FLASH__PGC_DOWN;
    c->stats.streaming = false;
    /* The transaction being received is sent again by the server. */
    if (c->in_txn) {
        c->acc.n = c->committed;
        c->acc.rows = c->committed_rows;
        c->in_txn = false;
    }
    c->stats.pending_rows = c->committed_rows + c->flight.rows;
    /* A new session describes its relations again; keep the warnings. */
    {
        flash__pgc_rel *r;
        for (r = c->rels; r; r = r->next) flash__pgc_rel_clear(r);
    }
}

/* Something went wrong with the connection: close, back off, reconnect. */
static void flash__pgc_fail(flash_pg_changes *c, const char *what, const char *why) {
    char msg[320];
    uint32_t ms = c->backoff_ms ? c->backoff_ms : c->desc.retry_min_ms;
    flash__pg_msg(msg, sizeof msg, what, why);
    flash__pgc_log(c, FLASH_LOG_ERROR, "%s; reconnecting in %u ms", msg, (unsigned)ms);
    flash__pgc_close(c);
    c->stats.reconnects++;
    c->backoff_ms = ms * 2 > c->desc.retry_max_ms ? c->desc.retry_max_ms : ms * 2;
    if (!c->closing) c->timer = c->loop.vt->timer(c->loop.native, ms, flash__pgc_connect, c);
}

static void flash__pgc_timeout(void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    c->timer = NULL;
    flash__pgc_fail(c, "connect/setup timed out", "");
}

static bool flash__pgc_flush(flash_pg_changes *c) {
    int r = PQflush(c->conn);
    if (r < 0) return false;
    flash__pgc_watch(c, r ? (FLASH_IO_READ | FLASH_IO_WRITE) : FLASH_IO_READ);
    return true;
}

static void flash__pgc_put_u64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 7; i >= 0; i--, v >>= 8) p[i] = (unsigned char)(v & 0xff);
}

/* A standby status update: write = flush = apply = what the cache applied. */
static void flash__pgc_send_status(flash_pg_changes *c, bool force) {
    unsigned char m[34];
    if (c->state != FLASH__PGC_STREAMING) return;
    if (!force && c->stats.acked_lsn == c->last_sent_ack) return;
    m[0] = 'r';
    flash__pgc_put_u64(m + 1, c->stats.acked_lsn);
    flash__pgc_put_u64(m + 9, c->stats.acked_lsn);
    flash__pgc_put_u64(m + 17, c->stats.acked_lsn);
    flash__pgc_put_u64(m + 25, (uint64_t)flash__pgc_now_us());
    m[33] = 0;
    if (PQputCopyData(c->conn, (const char *)m, (int)sizeof m) != 1 || !flash__pgc_flush(c)) {
        flash__pgc_fail(c, "sending a status update: ", PQerrorMessage(c->conn));
        return;
    }
    c->last_sent_ack = c->stats.acked_lsn;
    c->stats.status_updates++;
}

static void flash__pgc_status_tick(void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    c->status_timer = NULL;
    if (c->state != FLASH__PGC_STREAMING) return;
    c->status_timer = c->loop.vt->timer(c->loop.native, c->desc.status_interval_ms, flash__pgc_status_tick, c);
    flash__pgc_send_status(c, true);
}

/* One CopyData message of the stream; false: drop the connection. */
static bool flash__pgc_message(flash_pg_changes *c, const char *buf, int len) {
    flash__pgc_rd r;
    r.p = (const unsigned char *)buf;
    r.end = r.p + len;
    r.bad = false;
    switch ((char)flash__pgc_uint(&r, 1)) {
    case 'k': {
        uint64_t wal_end = flash__pgc_uint(&r, 8);
        bool reply;
        (void)flash__pgc_uint(&r, 8);
        reply = flash__pgc_uint(&r, 1) != 0;
        if (r.bad) break;
        c->stats.keepalives++;
        /* Nothing pending: every transaction before wal_end was sent and
           applied. wal_end may fall inside a transaction whose commit is not
           decoded yet: it is still sent after a restart (decoding skips only
           commits before the confirmed position). */
        if (!c->in_txn && !c->flying && c->committed == 0 && c->acc.n == 0 && wal_end > c->stats.acked_lsn) {
            c->stats.acked_lsn = wal_end;
            if (wal_end > c->acc.lsn) c->acc.lsn = wal_end;
        }
        flash__pgc_send_status(c, reply);
        return c->state == FLASH__PGC_STREAMING;
    }
    case 'w': {
        char kind;
        (void)flash__pgc_uint(&r, 8); /* dataStart */
        (void)flash__pgc_uint(&r, 8); /* walEnd */
        (void)flash__pgc_uint(&r, 8); /* sendTime */
        kind = (char)flash__pgc_uint(&r, 1);
        if (r.bad) break;
        switch (kind) {
        case 'B':
            (void)flash__pgc_uint(&r, 8); /* final LSN */
            c->txn_commit_us = (int64_t)flash__pgc_uint(&r, 8);
            (void)flash__pgc_uint(&r, 4); /* xid */
            if (r.bad) break;
            c->in_txn = true;
            return true;
        case 'C':
            (void)flash__pgc_uint(&r, 1);        /* flags */
            (void)flash__pgc_uint(&r, 8);        /* commit LSN */
            c->txn_end = flash__pgc_uint(&r, 8); /* end LSN */
            (void)flash__pgc_uint(&r, 8);        /* commit time */
            if (r.bad || !c->in_txn) break;
            c->in_txn = false;
            c->stats.transactions++;
            if (c->txn_end > c->acc.lsn) c->acc.lsn = c->txn_end;
            if (c->txn_end > c->stats.received_lsn) c->stats.received_lsn = c->txn_end;
            if (c->committed < c->acc.n && !c->acc.commit_us) c->acc.commit_us = c->txn_commit_us; /* the oldest */
            c->stats.pending_rows += c->acc.rows - c->committed_rows;
            c->committed = c->acc.n;
            c->committed_rows = c->acc.rows;
            if (!c->flying) flash__pgc_kick_pump(c);
            if (c->stats.pending_rows >= c->desc.max_pending_rows) c->paused = true;
            return true;
        case 'R': flash__pgc_on_relation(c, &r); return !r.bad;
        case 'I':
        case 'U':
        case 'D':
            if (!c->in_txn) break;
            return flash__pgc_on_change(c, kind, &r);
        case 'T':
            if (!c->in_txn) break;
            return flash__pgc_on_truncate(c, &r);
        case 'O': /* origin */
        case 'Y': /* type */
        case 'M': /* logical message */
            return true;
        default: break;
        }
        flash__pgc_log(c, FLASH_LOG_ERROR, "a malformed or unexpected pgoutput message '%c' (%d bytes)",
                       kind >= 32 && kind < 127 ? kind : '?', len);
        return false;
    }
    default: break;
    }
    flash__pgc_log(c, FLASH_LOG_ERROR, "a malformed replication message (%d bytes)", len);
    return false;
}

/* Read every message libpq has; pause past max_pending_rows. */
static void flash__pgc_read(flash_pg_changes *c) {
    if (c->state != FLASH__PGC_STREAMING) return;
    for (;;) {
        char *buf = NULL;
        int n;
        if (c->paused) return;
        n = PQgetCopyData(c->conn, &buf, 1);
        if (n > 0) {
            bool ok = flash__pgc_message(c, buf, n);
            PQfreemem(buf);
            if (c->state != FLASH__PGC_STREAMING) return; /* the status update failed */
            if (!ok) {
                flash__pgc_fail(c, "stream: ", "bad message");
                return;
            }
            continue;
        }
        if (n == 0) return;
        if (n == -1) { /* the server ended the copy */
            PGresult *res = PQgetResult(c->conn);
            char msg[320];
            flash__pg_msg(msg, sizeof msg, "", res ? PQresultErrorMessage(res) : PQerrorMessage(c->conn));
            if (res) PQclear(res);
            flash__pgc_fail(c, "stream ended: ", msg);
            return;
        }
        flash__pgc_fail(c, "stream: ", PQerrorMessage(c->conn));
        return;
    }
}

static void flash__pgc_quote_lit(flash_strbuf *b, const char *s) {
    flash_strbuf_put(b, "'", 1);
    for (; *s; s++) {
        if (*s == '\'') flash_strbuf_put(b, "'", 1);
        flash_strbuf_put(b, s, 1);
    }
    flash_strbuf_put(b, "'", 1);
}

/* Send the next setup statement (simple protocol: a walsender takes only that). */
static bool flash__pgc_setup_send(flash_pg_changes *c) {
    flash_strbuf b;
    size_t k;
    int ok;
    memset(&b, 0, sizeof b);
    switch (c->step) {
    case FLASH__PGC_STEP_PUB: {
        /* Only tables that exist: a model may have no table yet. */
        flash_strbuf names;
        memset(&names, 0, sizeof names);
        for (k = 0; k < c->nmodels; k++) {
            flash_strbuf id;
            memset(&id, 0, sizeof id);
            flash_sql_ident(&id, flash__pg_table(c->models[k]), true);
            if (k) flash_strbuf_puts(&names, ",");
            flash__pgc_quote_lit(&names, id.data ? id.data : "");
            flash_strbuf_free(&id);
        }
        flash_strbuf_puts(&b, "DO $flash$ DECLARE t text; l text[] := '{}'; BEGIN "
                              "IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = ");
        flash__pgc_quote_lit(&b, c->publication);
        flash_strbuf_puts(&b, ") THEN RETURN; END IF; FOREACH t IN ARRAY ARRAY[");
        flash_strbuf_puts(&b, names.data ? names.data : "");
        flash_strbuf_puts(&b, "]::text[] LOOP IF to_regclass(t) IS NOT NULL AND NOT (to_regclass(t)::text = ANY(l)) "
                              "THEN l := l || to_regclass(t)::text; END IF; END LOOP; "
                              "IF cardinality(l) = 0 THEN RAISE EXCEPTION 'no table of the models exists'; END IF; "
                              "EXECUTE 'CREATE PUBLICATION ' || quote_ident(");
        flash__pgc_quote_lit(&b, c->publication);
        flash_strbuf_puts(&b, ") || ' FOR TABLE ' || array_to_string(l, ','); END $flash$");
        flash_strbuf_free(&names);
        break;
    }
    case FLASH__PGC_STEP_SLOT_CHECK:
        flash_strbuf_puts(&b, "SELECT 1 FROM pg_replication_slots WHERE slot_name = ");
        flash__pgc_quote_lit(&b, c->slot);
        break;
    case FLASH__PGC_STEP_SLOT_CREATE:
        flash_strbuf_puts(&b, "CREATE_REPLICATION_SLOT ");
        flash_sql_ident(&b, c->slot, false);
        flash_strbuf_puts(&b, " LOGICAL pgoutput NOEXPORT_SNAPSHOT");
        break;
    default:
        flash_strbuf_puts(&b, "START_REPLICATION SLOT ");
        flash_sql_ident(&b, c->slot, false);
        flash_strbuf_puts(&b, " LOGICAL 0/0 (proto_version '1', publication_names ");
        {
            flash_strbuf id;
            memset(&id, 0, sizeof id);
            flash_sql_ident(&id, c->publication, false);
            flash__pgc_quote_lit(&b, id.data ? id.data : "");
            flash_strbuf_free(&id);
        }
        flash_strbuf_puts(&b, ")");
        break;
    }
    if (b.oom) {
        flash_strbuf_free(&b);
        return false;
    }
    ok = PQsendQuery(c->conn, b.data);
    flash_strbuf_free(&b);
    return ok && flash__pgc_flush(c);
}

/* A setup statement answered (res: its one result). */
static void flash__pgc_setup_result(flash_pg_changes *c, PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    char msg[320];
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        snprintf(msg, sizeof msg, "setup (%s): ",
                 c->step == FLASH__PGC_STEP_PUB ? "publication" : c->step == FLASH__PGC_STEP_START ? "start" : "slot");
        flash__pgc_fail(c, msg, PQresultErrorMessage(res));
        return;
    }
    if (c->step == FLASH__PGC_STEP_SLOT_CHECK && PQntuples(res) == 0) {
        if (!c->desc.create_slot) {
            snprintf(msg, sizeof msg, "replication slot %s does not exist (create_slot is off)", c->slot);
            flash__pgc_fail(c, "setup: ", msg);
            return;
        }
        c->step = FLASH__PGC_STEP_SLOT_CREATE;
    } else if (c->step == FLASH__PGC_STEP_SLOT_CHECK || c->step == FLASH__PGC_STEP_SLOT_CREATE) {
        c->step = FLASH__PGC_STEP_START;
    } else {
        c->step++;
    }
    if (!flash__pgc_setup_send(c)) flash__pgc_fail(c, "setup: ", PQerrorMessage(c->conn));
}

static void flash__pgc_streaming(flash_pg_changes *c) {
    if (c->timer) c->loop.vt->cancel(c->loop.native, c->timer);
    c->timer = NULL;
    c->state = FLASH__PGC_STREAMING;
    c->stats.streaming = true;
    c->stats.connects++;
    c->backoff_ms = 0;
    c->last_sent_ack = 0;
    c->status_timer = c->loop.vt->timer(c->loop.native, c->desc.status_interval_ms, flash__pgc_status_tick, c);
    flash__pgc_send_status(c, true);
    flash__pgc_kick_pump(c);
}

static void flash__pgc_on_io(void *arg, int events) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    if (c->state == FLASH__PGC_CONNECTING) {
        switch (PQconnectPoll(c->conn)) {
        case PGRES_POLLING_READING: flash__pgc_watch(c, FLASH_IO_READ); return;
        case PGRES_POLLING_WRITING: flash__pgc_watch(c, FLASH_IO_WRITE); return;
        case PGRES_POLLING_OK:
            if (PQsetnonblocking(c->conn, 1) != 0) break;
            PQsetNoticeProcessor(c->conn, flash__pg_notice, NULL);
            c->state = FLASH__PGC_SETUP;
            c->step = c->desc.create_publication ? FLASH__PGC_STEP_PUB : FLASH__PGC_STEP_SLOT_CHECK;
            if (!flash__pgc_setup_send(c)) break;
            return;
        default: break;
        }
        flash__pgc_fail(c, "connect: ", PQerrorMessage(c->conn));
        return;
    }
    if ((events & FLASH_IO_WRITE) && (c->events & FLASH_IO_WRITE) && !flash__pgc_flush(c)) {
        flash__pgc_fail(c, "write: ", PQerrorMessage(c->conn));
        return;
    }
    if (!(events & FLASH_IO_READ)) return;
    if (c->paused && c->state == FLASH__PGC_STREAMING) {
        /* Leave the data in the socket: the server waits (backpressure). */
        flash__pgc_watch(c, c->events & FLASH_IO_WRITE);
        return;
    }
    if (!PQconsumeInput(c->conn)) {
        flash__pgc_fail(c, "read: ", PQerrorMessage(c->conn));
        return;
    }
    /* Setup: keep a statement's result until the NULL that ends it (libpq
       takes the next statement only then). */
    while (c->state == FLASH__PGC_SETUP && !PQisBusy(c->conn)) {
        PGresult *res = PQgetResult(c->conn);
        if (!res) {
            res = c->res;
            c->res = NULL;
            if (!res) return;
            flash__pgc_setup_result(c, res); /* sends the next statement */
            PQclear(res);
            continue;
        }
        if (PQresultStatus(res) == PGRES_COPY_BOTH) {
            PQclear(res);
            flash__pgc_streaming(c);
            break;
        }
        if (!c->res) c->res = res;
        else PQclear(res);
    }
    if (c->state == FLASH__PGC_STREAMING) flash__pgc_read(c);
}

static void flash__pgc_connect(void *arg) {
    flash_pg_changes *c = (flash_pg_changes *)arg;
    const char *keys[3] = {"dbname", "replication", NULL};
    const char *vals[3];
    c->timer = NULL;
    vals[0] = c->conninfo;
    vals[1] = "database";
    vals[2] = NULL;
    c->conn = PQconnectStartParams(keys, vals, 1);
    c->state = FLASH__PGC_CONNECTING;
    c->fd = -1;
    if (!c->conn || PQstatus(c->conn) == CONNECTION_BAD || PQsocket(c->conn) < 0) {
        flash__pgc_fail(c, "connect: ", c->conn ? PQerrorMessage(c->conn) : "out of memory");
        return;
    }
    flash__pgc_watch(c, FLASH_IO_WRITE);
    c->timer = c->loop.vt->timer(c->loop.native, c->desc.connect_timeout_ms, flash__pgc_timeout, c);
    if (!c->io || !c->timer) flash__pgc_fail(c, "connect: ", "out of memory");
}

/* ---- public ---- */

FLASH_API flash_pg_changes *flash_pg_changes_create(const flash_pg_changes_desc *desc, int *err) {
    flash_pg_changes *c;
    flash_desc cd;
    PQconninfoOption *opts;
    char *perr = NULL;
    size_t k, n = 0;
    flash_model *m;
    if (err) *err = FLASH_EINVAL;
    if (!desc || !desc->conninfo || !desc->loop.vt || !desc->loop.vt->io_start || !desc->loop.vt->timer ||
        !desc->cache.vt)
        return NULL;
    opts = PQconninfoParse(desc->conninfo, &perr);
    if (perr) PQfreemem(perr);
    if (!opts) return NULL;
    PQconninfoFree(opts);
    if (err) *err = FLASH_ENOMEM;
    c = (flash_pg_changes *)calloc(1, sizeof *c);
    if (!c) return NULL;
    c->desc = *desc;
    c->fd = -1;
    c->loop = desc->loop;
    if (!c->desc.connect_timeout_ms) c->desc.connect_timeout_ms = 5000;
    if (!c->desc.retry_min_ms) c->desc.retry_min_ms = 100;
    if (!c->desc.retry_max_ms) c->desc.retry_max_ms = 5000;
    if (c->desc.retry_max_ms < c->desc.retry_min_ms) c->desc.retry_max_ms = c->desc.retry_min_ms;
    if (!c->desc.status_interval_ms) c->desc.status_interval_ms = 1000;
    if (!c->desc.max_pending_rows) c->desc.max_pending_rows = 1000000;
    c->conninfo = flash__pgc_strdup(desc->conninfo);
    c->publication = flash__pgc_strdup(desc->publication ? desc->publication : "flash");
    c->slot = flash__pgc_strdup(desc->slot ? desc->slot : "flash");
    if (desc->models) {
        n = desc->nmodels;
    } else {
        for (m = flash_models(); m; m = m->next) n++;
    }
    c->models = (const flash_model **)calloc(n + 1, sizeof *c->models);
    if (c->models) {
        if (desc->models) {
            for (k = 0; k < n; k++) {
                const flash_model *dm = desc->models[k];
                if (dm && !dm->canonical) flash_register_model((flash_model *)dm);
                if (dm && dm->canonical) c->models[c->nmodels++] = dm->canonical;
            }
        } else {
            for (m = flash_models(); m; m = m->next) c->models[c->nmodels++] = m;
        }
    }
    if (desc->ctx) cd = *desc->ctx;
    else memset(&cd, 0, sizeof cd);
    cd.cache = desc->cache;
    c->ctx = flash_ctx_create(&cd);
    if (!c->conninfo || !c->publication || !c->slot || !c->models || !c->ctx ||
        flash_ctx_attach_loop(c->ctx, c->loop) != FLASH_OK) {
        if (c->ctx) flash_ctx_destroy(c->ctx);
        free(c->conninfo);
        free(c->publication);
        free(c->slot);
        free((void *)c->models);
        free(c);
        return NULL;
    }
    c->desc.conninfo = c->conninfo;
    c->desc.publication = c->publication;
    c->desc.slot = c->slot;
    flash__pgc_connect(c);
    if (err) *err = FLASH_OK;
    return c;
}

FLASH_API void flash_pg_changes_destroy(flash_pg_changes *c) {
    if (!c) return;
    c->closing = true;
    flash__pgc_close(c);
    if (c->timer) c->loop.vt->cancel(c->loop.native, c->timer);
    if (c->retry_timer) c->loop.vt->cancel(c->loop.native, c->retry_timer);
    flash_loop_unpost(c->loop, &c->pump);
    flash_ctx_destroy(c->ctx); /* cancels the flight's operations: no callback after */
    while (c->rels) {
        flash__pgc_rel *r = c->rels;
        c->rels = r->next;
        flash__pgc_rel_clear(r);
        free(r);
    }
    flash__pgc_batch_free(&c->acc);
    flash__pgc_batch_free(&c->flight);
    free(c->conninfo);
    free(c->publication);
    free(c->slot);
    free((void *)c->models);
    free(c);
}

FLASH_API flash_pg_changes_stats flash_pg_changes_stats_get(const flash_pg_changes *c) {
    flash_pg_changes_stats z;
    if (c) return c->stats;
    memset(&z, 0, sizeof z);
    return z;
}

FLASH_API const char *flash_pg_changes_last_error(const flash_pg_changes *c) { return c ? c->last_error : ""; }

#endif /* FLASH_CHANGES_POSTGRES_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
