/* tests/consistency.c — see consistency.h. */
#include "consistency.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

void run_until_idle(flash_loop loop) {
    for (int i = 0; i < 1000; i++)
        if (loop.vt->run_once(loop.native, false) <= 0) return;
}

/* ---- gate ---- */

typedef struct gate_entry {
    flash_cache_op *op;
    flash_loop loop;
} gate_entry;

struct gate {
    flash_cache inner;
    flash_loop loop;
    bool shut;
    bool blind_cas;     /* broken on purpose: CAS stores as SET */
    gate_entry q[256];
    size_t n;
    /* The operation being released: its completion is observed through a
       wrapped done. */
    flash_cache_done_fn orig_done;
    void *orig_data;
    flash_cache_op *releasing;
    bool released_done;
};

static void gate_done(flash_cache_op *op);

static void gate_submit(void *self, flash_loop loop, flash_cache_op *op) {
    gate *g = self;
    if (g->blind_cas && op->code == FLASH_CACHE_CAS) op->code = FLASH_CACHE_SET;
    if (!g->shut) {
        g->inner.vt->submit(g->inner.self, loop, op);
        return;
    }
    cr_assert_lt(g->n, 256, "gate queue full");
    g->q[g->n].op = op;
    g->q[g->n].loop = loop;
    g->n++;
}

static void gate_cancel(void *self, flash_cache_op *op) {
    gate *g = self;
    for (size_t i = 0; i < g->n; i++) {
        if (g->q[i].op == op) {
            memmove(&g->q[i], &g->q[i + 1], (g->n - i - 1) * sizeof g->q[0]);
            g->n--;
            return;
        }
    }
    if (g->releasing == op) { /* in flight on the inner backend */
        g->releasing = NULL;
        g->released_done = true;
    }
    g->inner.vt->cancel(g->inner.self, op);
}

static size_t gate_max_value(void *self) {
    gate *g = self;
    return g->inner.vt->max_value(g->inner.self);
}

static void gate_destroy_v(void *self) { (void)self; }

static const flash_cache_vtable gate_vt = {"gate", gate_submit, gate_cancel, gate_max_value, gate_destroy_v, 0};
/* The same, offering what the inner backend offers: leases. */
static const flash_cache_vtable gate_leases_vt = {"gate", gate_submit, gate_cancel, gate_max_value, gate_destroy_v,
                                                  FLASH_CACHE_CAP_LEASES};

gate *gate_create(flash_cache inner, flash_loop loop) {
    gate *g = calloc(1, sizeof *g);
    g->inner = inner;
    g->loop = loop;
    return g;
}
void gate_destroy(gate *g) { free(g); }
flash_cache gate_cache(gate *g) {
    flash_cache c = {(g->inner.vt->caps & FLASH_CACHE_CAP_LEASES) ? &gate_leases_vt : &gate_vt, g};
    return c;
}
flash_cache gate_cache_plain(gate *g) {
    flash_cache c = {&gate_vt, g};
    return c;
}
void gate_shut(gate *g, bool shut) { g->shut = shut; }
void gate_blind_cas(gate *g, bool on) { g->blind_cas = on; }
size_t gate_waiting(const gate *g) { return g->n; }

static gate *releasing_gate;

static void gate_done(flash_cache_op *op) {
    gate *g = releasing_gate;
    op->done = g->orig_done;
    op->data = g->orig_data;
    g->releasing = NULL;
    g->released_done = true;
    op->done(op);
}

static bool gate_release_at(gate *g, size_t at) {
    if (at >= g->n) return false;
    gate_entry e = g->q[at];
    memmove(&g->q[at], &g->q[at + 1], (g->n - at - 1) * sizeof g->q[0]);
    g->n--;
    g->orig_done = e.op->done;
    g->orig_data = e.op->data;
    g->releasing = e.op;
    g->released_done = false;
    releasing_gate = g;
    e.op->done = gate_done;
    g->inner.vt->submit(g->inner.self, e.loop, e.op);
    for (int i = 0; i < 100000 && !g->released_done; i++) g->loop.vt->run_once(g->loop.native, true);
    cr_assert(g->released_done, "a released operation did not complete");
    run_until_idle(g->loop);
    return true;
}

bool gate_release(gate *g) { return gate_release_at(g, 0); }
bool gate_release_newest(gate *g) { return g->n && gate_release_at(g, g->n - 1); }

/* ---- gated source ---- */

struct gated_source {
    flash_table *table;
    flash_loop loop;
    flash_fetch *q[64];
    size_t n;
};

static void gs_fetch(void *self, flash_ctx *ctx, flash_fetch *f) {
    gated_source *s = self;
    (void)ctx;
    cr_assert_lt(s->n, 64);
    s->q[s->n++] = f;
}

static void gs_cancel(void *self, flash_fetch *f) {
    gated_source *s = self;
    for (size_t i = 0; i < s->n; i++) {
        if (s->q[i] == f) {
            memmove(&s->q[i], &s->q[i + 1], (s->n - i - 1) * sizeof s->q[0]);
            s->n--;
            return;
        }
    }
}

static const flash_source_vtable gs_vt = {"gated", gs_fetch, gs_cancel, NULL};

gated_source *gated_source_create(flash_table *table, flash_loop loop) {
    gated_source *s = calloc(1, sizeof *s);
    s->table = table;
    s->loop = loop;
    flash_table_set_async(table, false);
    return s;
}
void gated_source_destroy(gated_source *s) { free(s); }
flash_source gated_source_get(gated_source *s) {
    flash_source src = {&gs_vt, s};
    return src;
}
size_t gated_source_waiting(const gated_source *s) { return s->n; }

bool gated_source_release(gated_source *s) {
    if (!s->n) return false;
    flash_fetch *f = s->q[0];
    memmove(&s->q[0], &s->q[1], (s->n - 1) * sizeof s->q[0]);
    s->n--;
    /* The table answers synchronously: this is the moment of the read. */
    flash_source inner = flash_table_source(s->table);
    inner.vt->fetch(inner.self, flash_fetch_ctx(f), f);
    run_until_idle(s->loop);
    return true;
}
