/* backends/source/table.h — an in-memory table as a flash source.

   Rows of any registered model, kept in the process: the source of the demo,
   the examples and the tests, and a handy fake database for your own tests.
   A fetch answers on the next tick of the context's loop (like a database
   would; flash_table_set_async(t, false) answers inside the call).

       flash_table *db = flash_table_create();
       User u = {42, "Ada", "ada"};
       flash_table_put(db, &User_model, &u);       // insert or replace by pk
       flash_ctx_set_source(ctx, NULL, flash_table_source(db));

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_TABLE_H
#define FLASH_TABLE_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_table flash_table;
FLASH_API flash_table *flash_table_create(void);
/* Frees the rows. Destroy contexts using it first (or let them go idle). */
FLASH_API void flash_table_destroy(flash_table *t);
FLASH_API flash_source flash_table_source(flash_table *t);
/* Insert or replace by primary key (the model's pk field); the row is copied. */
FLASH_API int flash_table_put(flash_table *t, const flash_model *m, const void *row);
/* FLASH_ENOTFOUND when no row has that primary key. */
FLASH_API int flash_table_delete(flash_table *t, const flash_model *m, flash_value pk);
FLASH_API const void *flash_table_find(const flash_table *t, const flash_model *m, flash_value pk);
FLASH_API size_t flash_table_count(const flash_table *t, const flash_model *m);
/* Test knobs. */
FLASH_API void flash_table_set_async(flash_table *t, bool async); /* default: true */
FLASH_API void flash_table_fail_next(flash_table *t, int code, const char *message);
FLASH_API uint64_t flash_table_fetches(const flash_table *t);    /* fetch calls so far */
FLASH_API uint64_t flash_table_keys_fetched(const flash_table *t);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_TABLE_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_TABLE_IMPLEMENTED
#define FLASH_TABLE_IMPLEMENTED
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct flash__trows {
    const flash_model *model;
    void **rows;
    size_t count, cap;
} flash__trows;

typedef struct flash__tpending {
    struct flash__tpending *next, *prev;
    flash_table *table;
    flash_fetch *fetch;
    flash_loop loop;
    flash_defer tick;
} flash__tpending;

struct flash_table {
    flash__trows *models;
    size_t nmodels;
    bool sync;
    int fail_code;
    char fail_message[128];
    uint64_t fetches, keys;
    flash__tpending *pending;
};

FLASH_API flash_table *flash_table_create(void) { return (flash_table *)calloc(1, sizeof(flash_table)); }

static void flash__table_free_row(const flash_model *m, void *row) {
    size_t i;
    for (i = 0; i < m->nfields; i++) {
        const flash_field *f = &m->fields[i];
        void *p = NULL;
        if (f->type == FLASH_STR) memcpy(&p, (char *)row + f->offset, sizeof p);
        if (f->type == FLASH_BYTES) {
            flash_bytes b;
            memcpy(&b, (char *)row + f->offset, sizeof b);
            p = (void *)b.data;
        }
        free(p);
    }
    free(row);
}

static void *flash__table_copy_row(const flash_model *m, const void *row) {
    char *out = (char *)malloc(m->size);
    size_t i;
    if (!out) return NULL;
    memcpy(out, row, m->size);
    for (i = 0; i < m->nfields; i++) { /* NULL the pointers first: free is safe on failure */
        static const flash_bytes no_bytes = {NULL, 0};
        static const char *const no_str = NULL;
        if (m->fields[i].type == FLASH_STR) memcpy(out + m->fields[i].offset, &no_str, sizeof no_str);
        if (m->fields[i].type == FLASH_BYTES) memcpy(out + m->fields[i].offset, &no_bytes, sizeof no_bytes);
    }
    for (i = 0; i < m->nfields; i++) {
        const flash_field *f = &m->fields[i];
        if (f->type == FLASH_STR) {
            const char *s;
            memcpy(&s, (const char *)row + f->offset, sizeof s);
            if (s) {
                size_t n = strlen(s) + 1;
                char *c = (char *)malloc(n);
                if (!c) goto fail;
                memcpy(c, s, n);
                memcpy(out + f->offset, &c, sizeof c);
            }
        } else if (f->type == FLASH_BYTES) {
            flash_bytes b;
            memcpy(&b, (const char *)row + f->offset, sizeof b);
            if (b.data) {
                void *c = malloc(b.len ? b.len : 1);
                if (!c) goto fail;
                if (b.len) memcpy(c, b.data, b.len);
                b.data = c;
                memcpy(out + f->offset, &b, sizeof b);
            }
        }
    }
    return out;
fail:
    flash__table_free_row(m, out);
    return NULL;
}

static flash__trows *flash__table_model(const flash_table *t, const flash_model *m, bool create) {
    size_t i;
    flash__trows *nm;
    flash_table *mt = (flash_table *)t;
    if (m && !m->canonical) flash_register_model((flash_model *)m);
    if (m) m = m->canonical;
    for (i = 0; i < t->nmodels; i++)
        if (t->models[i].model == m) return &t->models[i];
    if (!create) return NULL;
    nm = (flash__trows *)realloc(mt->models, (t->nmodels + 1) * sizeof *nm);
    if (!nm) return NULL;
    mt->models = nm;
    memset(&nm[t->nmodels], 0, sizeof *nm);
    nm[t->nmodels].model = m;
    return &nm[mt->nmodels++];
}

static long flash__table_index(const flash__trows *r, flash_value pk) {
    size_t i;
    for (i = 0; i < r->count; i++) {
        flash_value v = flash_row_value(r->model, r->rows[i], r->model->opts.pk);
        if (flash_value_eq(&v, &pk)) return (long)i;
    }
    return -1;
}

FLASH_API int flash_table_put(flash_table *t, const flash_model *m, const void *row) {
    flash__trows *r;
    void *copy;
    long at;
    if (!t || !m || !row) return FLASH_EINVAL;
    r = flash__table_model(t, m, true);
    if (!r) return FLASH_ENOMEM;
    copy = flash__table_copy_row(r->model, row);
    if (!copy) return FLASH_ENOMEM;
    at = flash__table_index(r, flash_row_value(r->model, row, r->model->opts.pk));
    if (at >= 0) {
        flash__table_free_row(r->model, r->rows[at]);
        r->rows[at] = copy;
        return FLASH_OK;
    }
    if (r->count == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        void **rows = (void **)realloc(r->rows, cap * sizeof *rows);
        if (!rows) {
            flash__table_free_row(r->model, copy);
            return FLASH_ENOMEM;
        }
        r->rows = rows;
        r->cap = cap;
    }
    r->rows[r->count++] = copy;
    return FLASH_OK;
}

FLASH_API int flash_table_delete(flash_table *t, const flash_model *m, flash_value pk) {
    flash__trows *r;
    long at;
    if (!t || !m) return FLASH_EINVAL;
    r = flash__table_model(t, m, false);
    if (!r || (at = flash__table_index(r, pk)) < 0) return FLASH_ENOTFOUND;
    flash__table_free_row(r->model, r->rows[at]);
    memmove(&r->rows[at], &r->rows[at + 1], (r->count - (size_t)at - 1) * sizeof *r->rows);
    r->count--;
    return FLASH_OK;
}

FLASH_API const void *flash_table_find(const flash_table *t, const flash_model *m, flash_value pk) {
    const flash__trows *r;
    long at;
    if (!t || !m) return NULL;
    r = flash__table_model(t, m, false);
    if (!r || (at = flash__table_index(r, pk)) < 0) return NULL;
    return r->rows[at];
}

FLASH_API size_t flash_table_count(const flash_table *t, const flash_model *m) {
    const flash__trows *r = (t && m) ? flash__table_model(t, m, false) : NULL;
    return r ? r->count : 0;
}

FLASH_API void flash_table_set_async(flash_table *t, bool async) {
    if (t) t->sync = !async;
}
FLASH_API void flash_table_fail_next(flash_table *t, int code, const char *message) {
    if (!t) return;
    t->fail_code = code;
    snprintf(t->fail_message, sizeof t->fail_message, "%s", message ? message : "");
}
FLASH_API uint64_t flash_table_fetches(const flash_table *t) { return t ? t->fetches : 0; }
FLASH_API uint64_t flash_table_keys_fetched(const flash_table *t) { return t ? t->keys : 0; }

/* Answer f from the rows: flash_fetch_row matches each row to its key
   tuple by hash and ignores the others, so one pass over the table. */
static void flash__table_answer(flash_table *t, flash_fetch *f) {
    const flash__trows *r = flash__table_model(t, flash_fetch_model(f), false);
    size_t i;
    if (t->fail_code) {
        int code = t->fail_code;
        t->fail_code = 0;
        flash_fetch_done(f, code, t->fail_message[0] ? t->fail_message : NULL);
        return;
    }
    for (i = 0; r && i < r->count; i++) flash_fetch_row(f, r->rows[i]);
    flash_fetch_done(f, FLASH_OK, NULL);
}

static void flash__table_unlink(flash__tpending *p) {
    if (p->prev) p->prev->next = p->next;
    else p->table->pending = p->next;
    if (p->next) p->next->prev = p->prev;
}

static void flash__table_deferred(void *arg) {
    flash__tpending *p = (flash__tpending *)arg;
    flash_table *t = p->table;
    flash_fetch *f = p->fetch;
    flash__table_unlink(p);
    free(p);
    flash__table_answer(t, f);
}

static void flash__table_fetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    flash_table *t = (flash_table *)self;
    flash__tpending *p;
    t->fetches++;
    t->keys += flash_fetch_count(f);
    if (t->sync) {
        flash__table_answer(t, f);
        return;
    }
    p = (flash__tpending *)calloc(1, sizeof *p);
    if (!p) {
        flash_fetch_done(f, FLASH_ENOMEM, NULL);
        return;
    }
    p->table = t;
    p->fetch = f;
    p->loop = flash_ctx_loop(ctx);
    if (flash_loop_post(p->loop, &p->tick, flash__table_deferred, p) != FLASH_OK) {
        free(p);
        flash_fetch_done(f, FLASH_ENOMEM, NULL);
        return;
    }
    p->next = t->pending;
    if (t->pending) t->pending->prev = p;
    t->pending = p;
}

static void flash__table_cancel(void *self, flash_fetch *f) {
    flash_table *t = (flash_table *)self;
    flash__tpending *p;
    for (p = t->pending; p; p = p->next) {
        if (p->fetch == f) {
            flash_loop_unpost(p->loop, &p->tick);
            flash__table_unlink(p);
            free(p);
            return;
        }
    }
}

/* flash_save / flash_delete: inside the call; the old rows first, then the
   writes (flash_table_fail_next fails the write, nothing written). */
static void flash__table_write(void *self, flash_ctx *ctx, flash_write *w) {
    flash_table *t = (flash_table *)self;
    const flash_model *m = flash_write_model(w);
    size_t i, n = flash_write_count(w);
    (void)ctx;
    if (t->fail_code) {
        int code = t->fail_code;
        t->fail_code = 0;
        flash_write_done(w, code, t->fail_message[0] ? t->fail_message : NULL);
        return;
    }
    for (i = 0; i < n; i++) {
        const void *old = flash_table_find(t, m, flash_row_value(m, flash_write_row(w, i), m->opts.pk));
        if (old && flash_write_set_old(w, i, old) != FLASH_OK) {
            flash_write_done(w, FLASH_ENOMEM, NULL);
            return;
        }
    }
    for (i = 0; i < n; i++) {
        const void *row = flash_write_row(w, i);
        if (flash_write_kind_of(w) == FLASH_WRITE_SAVE) flash_table_put(t, m, row);
        else flash_table_delete(t, m, flash_row_value(m, row, m->opts.pk));
    }
    flash_write_done(w, FLASH_OK, NULL);
}

static const flash_source_vtable flash__table_vt = {"table", flash__table_fetch, flash__table_cancel, flash__table_write};

FLASH_API flash_source flash_table_source(flash_table *t) {
    flash_source s;
    s.vt = &flash__table_vt;
    s.self = t;
    return s;
}

FLASH_API void flash_table_destroy(flash_table *t) {
    size_t i, j;
    if (!t) return;
    while (t->pending) {
        flash__tpending *p = t->pending;
        flash_loop_unpost(p->loop, &p->tick);
        flash__table_unlink(p);
        free(p);
    }
    for (i = 0; i < t->nmodels; i++) {
        for (j = 0; j < t->models[i].count; j++) flash__table_free_row(t->models[i].model, t->models[i].rows[j]);
        free(t->models[i].rows);
    }
    free(t->models);
    free(t);
}

#endif /* FLASH_TABLE_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
