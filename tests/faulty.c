/* tests/faulty.c — see faulty.h. */
#define _POSIX_C_SOURCE 200809L
#include "faulty.h"
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { PLAN_PASS = 0, PLAN_DROP, PLAN_FAIL, PLAN_DELAY, PLAN_REORDER };
enum { ITEM_OK = 0, ITEM_FAIL_BACKEND, ITEM_FAIL_TIMEOUT, ITEM_CORRUPT };

typedef struct fop {
    struct fop *prev, *next; /* the wrapper's live operations */
    faulty *f;
    flash_cache_op *outer;   /* the caller's */
    flash_cache_op inner;    /* ours, on the inner backend */
    flash_cache_item *items; /* the inner operation's items */
    unsigned char **vals;    /* GET values, copied when the inner reply came */
    uint8_t *item_fault;     /* ITEM_* */
    uint64_t *item_seed;     /* how a corruption goes */
    flash_loop loop;
    int64_t t0;
    int plan;
    bool op_level;           /* a failure goes on op->status (else on the items) */
    bool inner_live;         /* submitted to the inner backend, not answered */
    bool in_submit;          /* inside our submit(): never complete from here */
    void *handle;            /* a timer or defer of ours */
    uint32_t ticks, delay_ms;
    size_t count;
} fop;

struct faulty {
    flash_cache inner;
    faulty_desc d;
    uint64_t rng;
    fop *live;
    size_t pending;
    faulty_stats st;
};

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t roll(faulty *f) { return (uint32_t)(splitmix(&f->rng) % 1000); }

static void *must(void *p) {
    if (!p) {
        fprintf(stderr, "faulty: out of memory\n");
        abort();
    }
    return p;
}

static void free_fop(fop *o) {
    for (size_t i = 0; i < o->count; i++) free(o->vals[i]);
    free(o->vals);
    free(o->items);
    free(o->item_fault);
    free(o->item_seed);
    free(o);
}

static void unlink_fop(fop *o) {
    faulty *f = o->f;
    if (o->prev) o->prev->next = o->next;
    else f->live = o->next;
    if (o->next) o->next->prev = o->prev;
    o->prev = o->next = NULL;
    f->pending--;
}

/* Hand the outcome to the caller: exactly once, then forget the op. */
static void finish(fop *o) {
    faulty *f = o->f;
    flash_cache_op *op = o->outer;
    int64_t lat = flash_test_now_ms() - o->t0;
    unlink_fop(o);
    f->st.completed++;
    if (lat > 0 && (uint64_t)lat > f->st.max_latency_ms) f->st.max_latency_ms = (uint64_t)lat;
    op->priv[0] = NULL;
    op->done(op); /* may submit or cancel other operations */
    free_fop(o);  /* GET values were valid until done returned */
}

/* The whole operation failed with code. */
static void deliver_failure(fop *o, int code) {
    flash_cache_op *op = o->outer;
    op->status = o->op_level ? code : FLASH_OK;
    op->round_trips = 1;
    for (size_t i = 0; i < o->count; i++) {
        flash_cache_item *it = &op->items[i];
        it->status = code;
        if (op->code == FLASH_CACHE_GET) {
            it->value = NULL;
            it->value_len = 0;
            it->flags = 0;
            it->cas = 0;
        }
    }
    finish(o);
}

/* Alter GET value i of o (its copy) as the mode allows; true if it did. */
static bool corrupt(fop *o, size_t i) {
    faulty *f = o->f;
    flash_cache_item *in = &o->items[i];
    uint64_t s = o->item_seed[i];
    uint32_t allowed = f->d.corrupt_mode, modes[4];
    size_t nm = 0, len = in->value_len;
    for (int b = 0; b < 4; b++)
        if (allowed & (1u << b)) modes[nm++] = 1u << b;
    if (!nm) return false;
    uint32_t mode = modes[splitmix(&s) % nm];
    unsigned char *v = o->vals[i];
    switch (mode) {
    case FAULTY_CORRUPT_TRUNCATE:
        if (!len) return false;
        in->value_len = (size_t)(splitmix(&s) % len);
        return true;
    case FAULTY_CORRUPT_EXTEND: {
        size_t extra = 1 + (size_t)(splitmix(&s) % 8);
        unsigned char *nv = must(malloc(len + extra));
        if (len) memcpy(nv, v, len);
        for (size_t k = 0; k < extra; k++) nv[len + k] = (unsigned char)splitmix(&s);
        free(v);
        o->vals[i] = nv;
        in->value = nv;
        in->value_len = len + extra;
        return true;
    }
    case FAULTY_CORRUPT_HEADER:
    case FAULTY_CORRUPT_PAYLOAD: {
        size_t lo = mode == FAULTY_CORRUPT_HEADER ? 0 : 6;
        size_t hi = mode == FAULTY_CORRUPT_HEADER ? (len < 6 ? len : 6) : len;
        if (hi <= lo) return false;
        size_t at = lo + (size_t)(splitmix(&s) % (hi - lo));
        unsigned char x = (unsigned char)(1u << (splitmix(&s) % 8));
        v[at] ^= x;
        return true;
    }
    }
    return false;
}

/* The inner reply, with the per-item faults, to the caller. */
static void deliver_answer(fop *o) {
    faulty *f = o->f;
    flash_cache_op *op = o->outer;
    op->status = o->inner.status;
    op->round_trips = o->inner.round_trips ? o->inner.round_trips : 1;
    for (size_t i = 0; i < o->count; i++) {
        flash_cache_item *it = &op->items[i], *in = &o->items[i];
        it->status = in->status;
        if (op->code == FLASH_CACHE_GET) {
            if (o->item_fault[i] == ITEM_CORRUPT && in->status == FLASH_OK && corrupt(o, i)) f->st.corrupted++;
            it->value = in->status == FLASH_OK ? in->value : NULL;
            it->value_len = in->status == FLASH_OK ? in->value_len : 0;
            it->flags = in->flags;
            it->cas = in->cas;
        }
        if (op->code == FLASH_CACHE_INCR) it->number = in->number;
        if (o->item_fault[i] == ITEM_FAIL_BACKEND || o->item_fault[i] == ITEM_FAIL_TIMEOUT) {
            it->status = o->item_fault[i] == ITEM_FAIL_BACKEND ? FLASH_EBACKEND : FLASH_ETIMEDOUT;
            if (op->code == FLASH_CACHE_GET) {
                it->value = NULL;
                it->value_len = 0;
            }
            f->st.item_failures++;
            if (it->key_len >= 8 && memcmp(it->key + it->key_len - 8, "@version", 8) == 0) f->st.version_item_failures++;
        }
    }
    finish(o);
}

static void on_deadline(void *arg) { /* a dropped operation times out */
    fop *o = (fop *)arg;
    o->handle = NULL;
    if (o->inner_live) {
        o->f->inner.vt->cancel(o->f->inner.self, &o->inner);
        o->inner_live = false;
    }
    deliver_failure(o, FLASH_ETIMEDOUT);
}

static void on_fail_now(void *arg) {
    fop *o = (fop *)arg;
    o->handle = NULL;
    deliver_failure(o, FLASH_EBACKEND);
}

static void on_deliver(void *arg) {
    fop *o = (fop *)arg;
    o->handle = NULL;
    deliver_answer(o);
}

static void on_tick(void *arg) {
    fop *o = (fop *)arg;
    o->handle = NULL;
    if (--o->ticks) o->handle = must(o->loop.vt->defer(o->loop.native, on_tick, o));
    else deliver_answer(o);
}

static void inner_done(flash_cache_op *iop) {
    fop *o = (fop *)iop->data;
    o->inner_live = false;
    /* keep the values past the inner done() */
    if (iop->code == FLASH_CACHE_GET) {
        for (size_t i = 0; i < o->count; i++) {
            flash_cache_item *in = &o->items[i];
            if (in->status != FLASH_OK) continue;
            o->vals[i] = must(malloc(in->value_len ? in->value_len : 1));
            if (in->value_len) memcpy(o->vals[i], in->value, in->value_len);
            in->value = o->vals[i];
        }
    }
    switch (o->plan) {
    case PLAN_DROP: return; /* the deadline answers */
    case PLAN_FAIL:
        if (o->in_submit) o->handle = must(o->loop.vt->defer(o->loop.native, on_fail_now, o));
        else deliver_failure(o, FLASH_EBACKEND);
        return;
    case PLAN_DELAY: o->handle = must(o->loop.vt->timer(o->loop.native, o->delay_ms, on_deliver, o)); return;
    case PLAN_REORDER: o->handle = must(o->loop.vt->defer(o->loop.native, on_tick, o)); return;
    default:
        if (o->in_submit) o->handle = must(o->loop.vt->defer(o->loop.native, on_deliver, o));
        else deliver_answer(o);
        return;
    }
}

static void submit_inner(fop *o) {
    faulty *f = o->f;
    o->inner.code = o->outer->code;
    o->inner.items = o->items;
    o->inner.count = o->count;
    o->inner.quiet = o->outer->quiet;
    o->inner.done = inner_done;
    o->inner.data = o;
    o->inner_live = true;
    f->inner.vt->submit(f->inner.self, o->loop, &o->inner);
}

static void f_submit(void *self, flash_loop loop, flash_cache_op *op) {
    faulty *f = (faulty *)self;
    fop *o = must(calloc(1, sizeof *o));
    size_t n = op->count, i;
    bool faulted;
    o->f = f;
    o->outer = op;
    o->loop = loop;
    o->count = n;
    o->t0 = flash_test_now_ms();
    o->items = must(calloc(n ? n : 1, sizeof *o->items));
    o->vals = must(calloc(n ? n : 1, sizeof *o->vals));
    o->item_fault = must(calloc(n ? n : 1, 1));
    o->item_seed = must(calloc(n ? n : 1, sizeof *o->item_seed));
    for (i = 0; i < n; i++) { /* the request as the caller made it */
        const flash_cache_item *it = &op->items[i];
        flash_cache_item *in = &o->items[i];
        in->key = it->key;
        in->key_len = it->key_len;
        if (op->code != FLASH_CACHE_GET) {
            in->value = it->value;
            in->value_len = it->value_len;
            in->flags = it->flags;
        }
        in->ttl_s = it->ttl_s;
        in->cas = it->cas;
        in->number = it->number;
        in->initial = it->initial;
        in->create = it->create;
    }
    op->priv[0] = o;
    o->next = f->live;
    if (f->live) f->live->prev = o;
    f->live = o;
    f->pending++;
    f->st.ops++;
    f->st.items += n;

    /* The operation's fate, then each item's: drawn now, in submit order. */
    {
        uint32_t r = roll(f), c = 0;
        if (r < (c += f->d.p_drop)) o->plan = PLAN_DROP;
        else if (r < (c += f->d.p_fail)) o->plan = PLAN_FAIL;
        else if (r < (c += f->d.p_delay)) o->plan = PLAN_DELAY;
        else if (r < (c += f->d.p_reorder)) o->plan = PLAN_REORDER;
        else o->plan = PLAN_PASS;
    }
    o->op_level = splitmix(&f->rng) & 1;
    bool send = splitmix(&f->rng) & 1;
    o->delay_ms = 1 + (uint32_t)(splitmix(&f->rng) % f->d.max_delay_ms);
    o->ticks = 1 + (uint32_t)(splitmix(&f->rng) % 4);
    faulted = o->plan != PLAN_PASS;
    for (i = 0; i < n; i++) {
        uint32_t a = roll(f), b = roll(f);
        o->item_seed[i] = splitmix(&f->rng);
        if (o->plan == PLAN_DROP || o->plan == PLAN_FAIL) continue;
        if (a < f->d.p_item_fail) o->item_fault[i] = (b & 1) ? ITEM_FAIL_BACKEND : ITEM_FAIL_TIMEOUT;
        else if (op->code == FLASH_CACHE_GET && b < f->d.p_corrupt) o->item_fault[i] = ITEM_CORRUPT;
        if (o->item_fault[i]) faulted = true;
    }
    if (faulted) f->st.faulted_ops++;

    o->in_submit = true;
    switch (o->plan) {
    case PLAN_DROP:
        f->st.dropped++;
        o->handle = must(loop.vt->timer(loop.native, f->d.timeout_ms, on_deadline, o));
        if (send) submit_inner(o); /* the request arrived; only the reply is lost */
        break;
    case PLAN_FAIL:
        f->st.failed++;
        if (send) submit_inner(o); /* applied, then the connection broke */
        else o->handle = must(loop.vt->defer(loop.native, on_fail_now, o));
        break;
    case PLAN_DELAY: f->st.delayed++; submit_inner(o); break;
    case PLAN_REORDER: f->st.reordered++; submit_inner(o); break;
    default: submit_inner(o); break;
    }
    o->in_submit = false;
}

static void f_cancel(void *self, flash_cache_op *op) {
    faulty *f = (faulty *)self;
    fop *o = (fop *)op->priv[0];
    if (!o) return;
    if (o->handle) o->loop.vt->cancel(o->loop.native, o->handle);
    if (o->inner_live) f->inner.vt->cancel(f->inner.self, &o->inner);
    unlink_fop(o);
    f->st.canceled++;
    op->priv[0] = NULL;
    free_fop(o);
}

static size_t f_max_value(void *self) {
    faulty *f = (faulty *)self;
    return f->inner.vt->max_value ? f->inner.vt->max_value(f->inner.self) : (size_t)1 << 20;
}

static void f_destroy(void *self) { faulty_destroy((faulty *)self); }

static const flash_cache_vtable faulty_vt = {"faulty", f_submit, f_cancel, f_max_value, f_destroy, 0};

void faulty_configure(faulty *f, const faulty_desc *desc) {
    if (desc) f->d = *desc;
    else memset(&f->d, 0, sizeof f->d);
    if (!f->d.corrupt_mode) f->d.corrupt_mode = FAULTY_CORRUPT_DETECTABLE;
    if (!f->d.timeout_ms) f->d.timeout_ms = 20;
    if (!f->d.max_delay_ms) f->d.max_delay_ms = f->d.timeout_ms / 2 ? f->d.timeout_ms / 2 : 1;
    f->rng = f->d.seed ^ 0x5DEECE66Dull;
}

faulty *faulty_create(flash_cache inner, const faulty_desc *desc) {
    faulty *f = must(calloc(1, sizeof *f));
    f->inner = inner;
    faulty_configure(f, desc);
    return f;
}

flash_cache faulty_cache(faulty *f) {
    flash_cache c;
    c.vt = &faulty_vt;
    c.self = f;
    return c;
}

faulty_stats faulty_get_stats(const faulty *f) { return f->st; }
void faulty_stats_clear(faulty *f) { memset(&f->st, 0, sizeof f->st); }
size_t faulty_pending(const faulty *f) { return f->pending; }

void faulty_destroy(faulty *f) {
    if (!f) return;
    while (f->live) {
        fop *o = f->live;
        if (o->handle) o->loop.vt->cancel(o->loop.native, o->handle);
        if (o->inner_live) f->inner.vt->cancel(f->inner.self, &o->inner);
        unlink_fop(o);
        o->outer->priv[0] = NULL;
        free_fop(o);
    }
    free(f);
}
