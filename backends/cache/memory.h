/* backends/cache/memory.h — flash's in-process cache backend.

   The embedded default: a memcached-semantics store inside the process (get
   with CAS tokens, set/add/cas/delete, incr with create, TTLs, a byte budget
   with least-recently-used eviction, 250-byte keys, a value size limit), and
   memcached's meta-protocol leases (FLASH_CACHE_CAP_LEASES): a lease GET of
   an absent key creates an empty stub and wins it (mg N), MARK_STALE keeps a
   value but marks it stale with a new cas (md I T), the first lease reader of
   a stale value wins its refresh and the others lose, and a store replaces
   stub or stale value with a fresh one (a CAS fill by the winner).
   Operations complete on the next tick of the submitter's loop, in the order
   they were submitted, so code sees the same ordering as over a network.
   Safe to share between threads (one mutex); each context brings its loop.

       flash_memory_desc md = {0};             // zero: defaults
       md.max_bytes = 256 << 20;
       flash_cache cache = flash_memory_create(&md);
       flash_desc d = {0};
       d.cache = cache;
       ...
       flash_cache_destroy(cache);             // after the contexts using it

   Include after flash.h; the implementation comes with FLASH_IMPLEMENTATION.
*/
#ifndef FLASH_MEMORY_H
#define FLASH_MEMORY_H
#include "../../flash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_memory_desc {
    size_t max_bytes;  /* default: 64 MiB of items; the least recently used go first */
    size_t max_value;  /* default: 1 MiB */
    int64_t (*clock_ms)(void *user_data); /* default: CLOCK_MONOTONIC; for TTLs */
    void *clock_user_data;
} flash_memory_desc;

typedef struct flash_memory_stats {
    size_t items, bytes;
    uint64_t ops, gets, hits, evictions;
    uint64_t leases;   /* lease reads that won (a stub created, or a stale value's refresh) */
} flash_memory_stats;

/* {NULL, NULL} when out of memory. */
FLASH_API flash_cache flash_memory_create(const flash_memory_desc *desc);
FLASH_API flash_memory_stats flash_memory_stats_get(flash_cache cache);
FLASH_API void flash_memory_flush(flash_cache cache);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_MEMORY_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_MEMORY_IMPLEMENTED
#define FLASH_MEMORY_IMPLEMENTED
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct flash__mitem {
    struct flash__mitem *hnext;        /* hash chain */
    struct flash__mitem *prev, *next;  /* LRU list, most recent first */
    uint64_t hash, cas;
    int64_t expires_ms;                /* 0: never */
    uint32_t flags;
    bool stale;                        /* MARK_STALE: refresh it (lease reads) */
    bool token_sent;                   /* a lease on it was won (stub or stale) */
    size_t klen, vlen;
    char *value;                       /* after the key, in the same block */
    char key[1];
} flash__mitem;

typedef struct flash__mstore {
    pthread_mutex_t lock;
    flash__mitem **buckets;
    size_t nbuckets;
    flash__mitem *lru_first, *lru_last;
    flash_memory_desc desc;
    flash_memory_stats stats;
    uint64_t next_cas;
} flash__mstore;

static int64_t flash__mem_monotonic(void *ud) {
    struct timespec ts;
    (void)ud;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t flash__mem_hash(const char *k, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ (unsigned char)k[i]) * 0x100000001b3ull;
    return h;
}

static size_t flash__mem_size(const flash__mitem *it) { return sizeof *it + it->klen + it->vlen; }

static void flash__mem_lru_unlink(flash__mstore *s, flash__mitem *it) {
    if (it->prev) it->prev->next = it->next;
    else s->lru_first = it->next;
    if (it->next) it->next->prev = it->prev;
    else s->lru_last = it->prev;
    it->prev = it->next = NULL;
}

static void flash__mem_lru_front(flash__mstore *s, flash__mitem *it) {
    it->prev = NULL;
    it->next = s->lru_first;
    if (s->lru_first) s->lru_first->prev = it;
    s->lru_first = it;
    if (!s->lru_last) s->lru_last = it;
}

static flash__mitem **flash__mem_slot(flash__mstore *s, const char *k, size_t n, uint64_t h) {
    flash__mitem **pp = &s->buckets[h & (s->nbuckets - 1)];
    while (*pp && !((*pp)->hash == h && (*pp)->klen == n && memcmp((*pp)->key, k, n) == 0)) pp = &(*pp)->hnext;
    return pp;
}

static void flash__mem_remove(flash__mstore *s, flash__mitem **slot) {
    flash__mitem *it = *slot;
    *slot = it->hnext;
    flash__mem_lru_unlink(s, it);
    s->stats.items--;
    s->stats.bytes -= flash__mem_size(it);
    free(it);
}

/* The live item under key, or NULL; expired items are dropped here. */
static flash__mitem **flash__mem_find(flash__mstore *s, const char *k, size_t n, int64_t now) {
    uint64_t h = flash__mem_hash(k, n);
    flash__mitem **slot = flash__mem_slot(s, k, n, h);
    if (*slot && (*slot)->expires_ms && (*slot)->expires_ms <= now) {
        flash__mem_remove(s, slot);
        /* *slot now holds the next item of the chain, another key: look the
           key up again so that callers see "absent", not a neighbour. */
        slot = flash__mem_slot(s, k, n, h);
    }
    return slot;
}

static void flash__mem_grow(flash__mstore *s) {
    size_t n = s->nbuckets * 2, i;
    flash__mitem **b = (flash__mitem **)calloc(n, sizeof *b);
    if (!b) return; /* keep the old table: longer chains, still correct */
    for (i = 0; i < s->nbuckets; i++) {
        flash__mitem *it = s->buckets[i];
        while (it) {
            flash__mitem *next = it->hnext;
            it->hnext = b[it->hash & (n - 1)];
            b[it->hash & (n - 1)] = it;
            it = next;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = n;
}

/* Store (replacing what slot holds) to expire at expires_ms (0: never).
   FLASH_ENOMEM when out of memory. */
static int flash__mem_store(flash__mstore *s, flash__mitem **slot, const char *k, size_t n, const void *v,
                            size_t vlen, uint32_t flags, int64_t expires_ms) {
    flash__mitem *it = (flash__mitem *)malloc(sizeof *it + n + vlen);
    uint64_t h = flash__mem_hash(k, n);
    if (!it) return FLASH_ENOMEM;
    if (*slot) flash__mem_remove(s, slot);
    memcpy(it->key, k, n);
    it->key[n] = 0;
    it->value = it->key + n + 1;
    if (vlen) memcpy(it->value, v, vlen);
    it->klen = n;
    it->vlen = vlen;
    it->flags = flags;
    it->hash = h;
    it->cas = ++s->next_cas;
    it->expires_ms = expires_ms;
    it->stale = it->token_sent = false;
    it->hnext = *slot;
    *slot = it;
    flash__mem_lru_front(s, it);
    s->stats.items++;
    s->stats.bytes += flash__mem_size(it);
    while (s->stats.bytes > s->desc.max_bytes && s->lru_last && s->lru_last != it) {
        flash__mitem *old = s->lru_last;
        flash__mem_remove(s, flash__mem_slot(s, old->key, old->klen, old->hash));
        s->stats.evictions++;
    }
    if (s->stats.items > s->nbuckets) flash__mem_grow(s);
    return FLASH_OK;
}

static int64_t flash__mem_expiry(uint32_t ttl_s, int64_t now) { return ttl_s ? now + (int64_t)ttl_s * 1000 : 0; }

static int flash__mem_key_ok(const char *k, size_t n) {
    size_t i;
    if (!k || n == 0) return FLASH_EINVAL;
    if (n > 250) return FLASH_ETOOLARGE;
    for (i = 0; i < n; i++)
        if ((unsigned char)k[i] <= ' ' || (unsigned char)k[i] == 0x7f) return FLASH_EINVAL;
    return FLASH_OK;
}

static bool flash__mem_parse_u64(const char *v, size_t n, uint64_t *out) {
    uint64_t x = 0;
    size_t i;
    if (n == 0 || n > 20) return false;
    for (i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return false;
        if (x > (UINT64_MAX - (uint64_t)(v[i] - '0')) / 10) return false;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    *out = x;
    return true;
}

/* Carry out one item of op; GET values are copied into *arena (freed after
   done) so that done may run without the lock. */
static void flash__mem_apply(flash__mstore *s, flash_cache_op *op, flash_cache_item *it, int64_t now,
                             char **cursor) {
    flash__mitem **slot;
    int rc = flash__mem_key_ok(it->key, it->key_len);
    it->status = rc;
    if (rc) return;
    slot = flash__mem_find(s, it->key, it->key_len, now);
    switch (op->code) {
    case FLASH_CACHE_GET:
        s->stats.gets++;
        it->lease = FLASH_LEASE_NONE;
        it->stale = false;
        it->ttl_left_ms = 0;
        if (!*slot) {
            it->status = FLASH_ENOTFOUND;
            /* a lease read of an absent key: an empty stub, won (memcached's mg N) */
            if (it->lease_s && flash__mem_store(s, slot, it->key, it->key_len, NULL, 0, 0,
                                                flash__mem_expiry(it->lease_s, now)) == FLASH_OK) {
                (*slot)->token_sent = true;
                it->lease = FLASH_LEASE_WON;
                it->cas = (*slot)->cas;
                it->ttl_left_ms = (int64_t)it->lease_s * 1000;
                s->stats.leases++;
            }
            return;
        }
        s->stats.hits++;
        flash__mem_lru_unlink(s, *slot);
        flash__mem_lru_front(s, *slot);
        memcpy(*cursor, (*slot)->value, (*slot)->vlen);
        it->value = *cursor;
        it->value_len = (*slot)->vlen;
        it->flags = (*slot)->flags;
        it->cas = (*slot)->cas;
        *cursor += (*slot)->vlen;
        if (it->lease_s) {
            /* memcached's mg: a stale value, or a stub, is won by the first
               reader after it was marked (created), lost by the others */
            it->stale = (*slot)->stale;
            it->ttl_left_ms = (*slot)->expires_ms ? (*slot)->expires_ms - now : -1;
            if ((*slot)->token_sent) {
                it->lease = FLASH_LEASE_LOST;
            } else if ((*slot)->stale) {
                (*slot)->token_sent = true;
                it->lease = FLASH_LEASE_WON;
                s->stats.leases++;
            }
            if (!(*slot)->vlen) it->status = FLASH_ENOTFOUND; /* a stub: nothing to read */
        }
        return;
    case FLASH_CACHE_SET:
    case FLASH_CACHE_ADD:
    case FLASH_CACHE_CAS:
        if ((!it->value && it->value_len) || it->value_len > s->desc.max_value) {
            it->status = it->value_len > s->desc.max_value ? FLASH_ETOOLARGE : FLASH_EINVAL;
            return;
        }
        if (op->code == FLASH_CACHE_ADD && *slot) {
            it->status = FLASH_ENOTSTORED;
            return;
        }
        if (op->code == FLASH_CACHE_CAS) {
            if (!*slot) {
                it->status = FLASH_ENOTFOUND;
                return;
            }
            if ((*slot)->cas != it->cas) {
                it->status = FLASH_ENOTSTORED;
                return;
            }
        }
        it->status = flash__mem_store(s, slot, it->key, it->key_len, it->value, it->value_len, it->flags,
                                      flash__mem_expiry(it->ttl_s, now));
        return;
    case FLASH_CACHE_DELETE:
        if (!*slot) it->status = FLASH_ENOTFOUND;
        else flash__mem_remove(s, slot);
        return;
    case FLASH_CACHE_MARK_STALE: /* memcached's md I T: keep, mark, new cas */
        if (!*slot) {
            it->status = FLASH_ENOTFOUND;
            return;
        }
        (*slot)->stale = true;
        (*slot)->token_sent = false; /* the next lease reader refreshes it */
        (*slot)->cas = ++s->next_cas;
        if (it->ttl_s) (*slot)->expires_ms = flash__mem_expiry(it->ttl_s, now);
        return;
    case FLASH_CACHE_INCR: {
        char num[24];
        uint64_t x;
        if (!*slot) {
            if (!it->create) {
                it->status = FLASH_ENOTFOUND;
                return;
            }
            x = it->initial;
        } else {
            if (!flash__mem_parse_u64((*slot)->value, (*slot)->vlen, &x)) {
                it->status = FLASH_EINVAL; /* not a number, as memcached says */
                return;
            }
            x += it->number; /* wraps at 2^64, as memcached does */
        }
        snprintf(num, sizeof num, "%llu", (unsigned long long)x);
        /* Like memcached: incr changes the number, not the flags or expiry. */
        it->status = flash__mem_store(s, slot, it->key, it->key_len, num, strlen(num),
                                      *slot ? (*slot)->flags : 0,
                                      *slot ? (*slot)->expires_ms : flash__mem_expiry(it->ttl_s, now));
        it->number = x;
        return;
    }
    }
    it->status = FLASH_EINVAL;
}

static void flash__mem_complete(void *arg) {
    flash_cache_op *op = (flash_cache_op *)arg;
    flash__mstore *s = (flash__mstore *)op->priv[1];
    int64_t now = s->desc.clock_ms(s->desc.clock_user_data);
    size_t i, need = 0;
    char *buf = NULL, *cursor;
    pthread_mutex_lock(&s->lock);
    s->stats.ops++;
    if (op->code == FLASH_CACHE_GET) {
        for (i = 0; i < op->count; i++) {
            flash__mitem **slot;
            if (flash__mem_key_ok(op->items[i].key, op->items[i].key_len)) continue;
            slot = flash__mem_find(s, op->items[i].key, op->items[i].key_len, now);
            if (*slot) need += (*slot)->vlen;
        }
        buf = (char *)malloc(need ? need : 1);
        if (!buf) {
            pthread_mutex_unlock(&s->lock);
            op->status = FLASH_ENOMEM;
            for (i = 0; i < op->count; i++) op->items[i].status = FLASH_ENOMEM;
            op->round_trips = 1;
            op->done(op);
            return;
        }
    }
    cursor = buf;
    for (i = 0; i < op->count; i++) flash__mem_apply(s, op, &op->items[i], now, &cursor);
    pthread_mutex_unlock(&s->lock);
    op->status = FLASH_OK;
    op->round_trips = 1;
    op->done(op);
    free(buf);
}

static void flash__mem_submit(void *self, flash_loop loop, flash_cache_op *op) {
    op->priv[1] = self;
    op->priv[2] = (void *)loop.vt;
    op->priv[3] = loop.native;
    memset(&op->tick, 0, sizeof op->tick);
    if (flash_loop_post(loop, &op->tick, flash__mem_complete, op) != FLASH_OK) {
        /* A loop without post could not take it (out of memory): fail now,
           the one case where done runs inside submit. */
        size_t i;
        op->status = FLASH_ENOMEM;
        for (i = 0; i < op->count; i++) op->items[i].status = FLASH_ENOMEM;
        op->done(op);
    }
}

static void flash__mem_cancel(void *self, flash_cache_op *op) {
    flash_loop loop;
    (void)self;
    loop.vt = (const flash_loop_vtable *)op->priv[2];
    loop.native = op->priv[3];
    flash_loop_unpost(loop, &op->tick);
}

static size_t flash__mem_max_value(void *self) { return ((flash__mstore *)self)->desc.max_value; }

static void flash__mem_flush_locked(flash__mstore *s) {
    while (s->lru_first) {
        flash__mitem *it = s->lru_first;
        flash__mem_remove(s, flash__mem_slot(s, it->key, it->klen, it->hash));
    }
}

static void flash__mem_destroy(void *self) {
    flash__mstore *s = (flash__mstore *)self;
    flash__mem_flush_locked(s);
    pthread_mutex_destroy(&s->lock);
    free(s->buckets);
    free(s);
}

static const flash_cache_vtable flash__mem_vt = {
    "memory", flash__mem_submit, flash__mem_cancel, flash__mem_max_value, flash__mem_destroy, FLASH_CACHE_CAP_LEASES,
};

FLASH_API flash_cache flash_memory_create(const flash_memory_desc *desc) {
    flash_cache c = {NULL, NULL};
    flash__mstore *s = (flash__mstore *)calloc(1, sizeof *s);
    if (!s) return c;
    if (desc) s->desc = *desc;
    if (!s->desc.max_bytes) s->desc.max_bytes = (size_t)64 << 20;
    if (!s->desc.max_value) s->desc.max_value = (size_t)1 << 20;
    if (!s->desc.clock_ms) s->desc.clock_ms = flash__mem_monotonic;
    s->nbuckets = 1024;
    s->buckets = (flash__mitem **)calloc(s->nbuckets, sizeof *s->buckets);
    if (!s->buckets || pthread_mutex_init(&s->lock, NULL) != 0) {
        free(s->buckets);
        free(s);
        return c;
    }
    c.vt = &flash__mem_vt;
    c.self = s;
    return c;
}

FLASH_API flash_memory_stats flash_memory_stats_get(flash_cache cache) {
    flash_memory_stats st;
    flash__mstore *s = (flash__mstore *)cache.self;
    memset(&st, 0, sizeof st);
    if (!s || cache.vt != &flash__mem_vt) return st;
    pthread_mutex_lock(&s->lock);
    st = s->stats;
    pthread_mutex_unlock(&s->lock);
    return st;
}

FLASH_API void flash_memory_flush(flash_cache cache) {
    flash__mstore *s = (flash__mstore *)cache.self;
    if (!s || cache.vt != &flash__mem_vt) return;
    pthread_mutex_lock(&s->lock);
    flash__mem_flush_locked(s);
    pthread_mutex_unlock(&s->lock);
}

#endif /* FLASH_MEMORY_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
