/* backends/cache/redis_cluster.h — Redis Cluster and Redis Sentinel.

   Two more cache backends over redis.h's transport (same wire format, same
   values, same statuses, same contract: see redis.h):

     flash_redis_cluster_create   a Redis Cluster, spoken natively
     flash_redis_sentinel_create  a primary found through Sentinel

   CLUSTER
     Slots: flash_redis_key_slot (redis.h): CRC16 of the key or of its hash
     tag. The slot map comes from CLUSTER SHARDS (CLUSTER SLOTS when the
     server does not know it) of any known node: at first use (ops wait for
     it), after a MOVED, and after a node failed (a failover may have
     happened); at most one load at a time. One connection per master (a
     plain redis.h connection: its own timeouts, down-marking and retry).
     An op is split by node: ONE pipelined request per node it touches; a
     get-many becomes, in that request, one MGET per slot (a cross-slot MGET
     is refused even on one node), keys sorted by slot. Replies:
       MOVED s h:p   the map says s is on h:p from now on; the key is sent
                     there and the map reloaded
       ASK s h:p     the key alone goes to h:p, preceded by ASKING; no map change
       TRYAGAIN, CLUSTERDOWN  retried with backoff (5 ms doubling to 100 ms)
                     while the op's deadline (timeout_ms from submit) allows,
                     then FLASH_ETIMEDOUT
       NOSCRIPT      the node's connection reloads the scripts; retried
       READONLY      (a demoted master on a still-open connection) the map
                     is reloaded and the key sent again after a backoff
     Each key follows at most max_redirects redirects and retries (a loop:
     FLASH_EBACKEND); a malformed redirect fails its key with FLASH_EPROTO; a
     slot no node serves, FLASH_EBACKEND. Retries of one op go out together,
     per node, once all its requests are in. op->round_trips counts the
     waves of requests (sent to every node concurrently: 1 with a fresh
     map); the requests per node are in the stats. Limits: db 0 only
     (Cluster has no SELECT), masters only (no reads from replicas), node
     addresses as the cluster announces them, IP literals only (a host name
     in a MOVED / ASK is not looked up: its key fails with FLASH_EBACKEND;
     in a map reply, that load fails), at most 1024 nodes.

   SENTINEL
     The primary named master_name is asked of the sentinels in turn
     (SENTINEL get-master-addr-by-name), then its ROLE is checked on the new
     connection, before any op is sent on it: it must say master (during a
     failover it may not yet: asked again every 100 ms within timeout_ms).
     This happens at first use and whenever the connection must be opened
     again (lost, closed by the server, refused): a failover is followed by
     the next op after it. While no sentinel answers, ops fail fast with
     FLASH_EBACKEND for retry_interval_ms.

   LICENSE: MIT, see the end of flash.h.
*/
#ifndef FLASH_REDIS_CLUSTER_H
#define FLASH_REDIS_CLUSTER_H
#include "redis.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_redis_node {
    const char *host; /* IP literal or host name (resolved at create) */
    uint16_t port;    /* default: 6379 (26379 for a sentinel) */
} flash_redis_node;

/* Zero-initialise; every zero field means its default. */
typedef struct flash_redis_cluster_desc {
    flash_loop loop;                /* required */
    const flash_redis_node *seeds;  /* required: nodes to load the slot map from */
    size_t seed_count;
    const char *username, *password; /* AUTH on every node; default none */
    uint32_t connect_timeout_ms;    /* default: 1000, per node */
    uint32_t timeout_ms;            /* default: 1000, per request and per op's retries */
    uint32_t retry_interval_ms;     /* default: 1000, a down node's rest */
    uint32_t max_redirects;         /* default: 5, per key and op */
    size_t max_value;               /* default: 1 MiB */
    flash_allocator allocator;      /* default: malloc / free */
} flash_redis_cluster_desc;

typedef struct flash_redis_cluster_stats {
    uint64_t requests, commands;    /* over every node (the round trips, the commands) */
    uint64_t moved, ask;            /* redirects followed */
    uint64_t tryagain, clusterdown, noscript; /* replies retried */
    uint64_t refreshes;             /* slot maps loaded */
    uint64_t refresh_failures;      /* loads that failed (garbage, error, no answer) */
    uint64_t failures, timeouts, fast_fails, proto_errors; /* over every node */
    uint32_t nodes;                 /* nodes known */
    uint32_t slots_served;          /* slots the map gives a node */
} flash_redis_cluster_stats;

/* One known node: its address, the slots the map gives it, its counters. */
typedef struct flash_redis_cluster_node {
    char host[64];
    uint16_t port;
    uint32_t slots;
    flash_redis_stats stats;
} flash_redis_cluster_node;

/* A cluster backend, or {NULL, NULL} with *error FLASH_EINVAL (bad desc, a
   seed that does not resolve) or FLASH_ENOMEM. Connects on first use. */
FLASH_API flash_cache flash_redis_cluster_create(const flash_redis_cluster_desc *desc, int *error);
FLASH_API int flash_redis_cluster_stats_get(flash_cache cache, flash_redis_cluster_stats *out);
/* Node i (0 .. stats.nodes - 1); FLASH_EINVAL past the end. */
FLASH_API int flash_redis_cluster_node_get(flash_cache cache, size_t i, flash_redis_cluster_node *out);

typedef struct flash_redis_sentinel_desc {
    flash_loop loop;                   /* required */
    const flash_redis_node *sentinels; /* required */
    size_t sentinel_count;
    const char *master_name;           /* required: the name the sentinels monitor */
    const char *username, *password;   /* the primary's AUTH; default none */
    uint32_t db;                       /* the primary's SELECT; default 0 */
    uint32_t connect_timeout_ms, timeout_ms, retry_interval_ms; /* as flash_redis_desc */
    size_t max_value;
    flash_allocator allocator;
} flash_redis_sentinel_desc;

typedef struct flash_redis_sentinel_stats {
    uint64_t resolutions;     /* primaries found and checked */
    uint64_t failovers;       /* of them, a new address */
    uint64_t not_master;      /* ROLE said replica: asked again */
    uint64_t sentinel_errors; /* sentinels that did not answer well */
    char master_host[64];     /* the current primary ("" before the first) */
    uint16_t master_port;
    flash_redis_stats master; /* the primary connection's counters */
} flash_redis_sentinel_stats;

FLASH_API flash_cache flash_redis_sentinel_create(const flash_redis_sentinel_desc *desc, int *error);
FLASH_API int flash_redis_sentinel_stats_get(flash_cache cache, flash_redis_sentinel_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* FLASH_REDIS_CLUSTER_H */

#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_REDIS_CLUSTER_IMPLEMENTED
#define FLASH_REDIS_CLUSTER_IMPLEMENTED

#include <arpa/inet.h> /* inet_pton: announced node addresses are IP literals */

#define FLASH__RC_SLOTS 16384
#define FLASH__RC_NONE 0xFFFFu
#define FLASH__RC_MAX_NODES 1024

/* ---- a raw reply, walked ------------------------------------------------------ */

typedef struct flash__rr {
    const char *p, *end;
} flash__rr;
typedef struct flash__rr_el {
    int kind;
    int64_t integer;
    const char *str;
    size_t len;
} flash__rr_el;

static bool flash__rr_next(flash__rr *r, flash__rr_el *e) {
    uint32_t len = 0;
    uint64_t v = 0;
    int i;
    if (r->end - r->p < FLASH__REDIS_RAW_REC) return false;
    e->kind = (unsigned char)r->p[0];
    for (i = 7; i >= 0; i--) v = v << 8 | (unsigned char)r->p[1 + i];
    for (i = 3; i >= 0; i--) len = len << 8 | (unsigned char)r->p[9 + i];
    if ((size_t)(r->end - r->p) - FLASH__REDIS_RAW_REC < len) return false;
    e->integer = (int64_t)v;
    e->str = r->p + FLASH__REDIS_RAW_REC;
    e->len = len;
    r->p += FLASH__REDIS_RAW_REC + len;
    return true;
}

/* Skip the rest of an element whose header e was read. */
static bool flash__rr_skip(flash__rr *r, const flash__rr_el *e) {
    int64_t left = e->kind == FLASH_REDIS_ARRAY ? e->integer : 0;
    while (left > 0) {
        flash__rr_el c;
        if (!flash__rr_next(r, &c)) return false;
        left += (c.kind == FLASH_REDIS_ARRAY ? c.integer : 0) - 1;
    }
    return true;
}

static bool flash__rr_is(const flash__rr_el *e, const char *s) {
    size_t n = strlen(s);
    return (e->kind == FLASH_REDIS_BULK || e->kind == FLASH_REDIS_SIMPLE) && e->len == n && memcmp(e->str, s, n) == 0;
}

/* RESP for a command of argc strings. */
static char *flash__rc_command(flash_allocator al, size_t *out_len, int argc, const char *const *argv) {
    size_t need = 16, n = 0;
    char *m;
    int i;
    for (i = 0; i < argc; i++) need += strlen(argv[i]) + 32;
    m = (char *)al.alloc(need, al.user_data);
    if (!m) return NULL;
    n += (size_t)snprintf(m + n, need - n, "*%d\r\n", argc);
    for (i = 0; i < argc; i++) n += (size_t)snprintf(m + n, need - n, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    *out_len = n;
    return m;
}

/* ---- cluster state --------------------------------------------------------------- */

typedef struct flash__rc flash__rc;
typedef struct flash__rc_op flash__rc_op;

typedef struct flash__rc_node {
    flash__redis *rd;
    char host[64];
    uint16_t port;
} flash__rc_node;

/* A request to one node: the keys of one op that node holds (owner), or a
   slot map load (owner NULL). Its items follow it. */
typedef struct flash__rc_sub {
    flash_cache_op op;
    flash__rc *rc;
    flash__rc_op *owner;
    struct flash__rc_sub *next_sub, *prev_sub; /* the owner's in flight */
    uint32_t node;
    uint32_t *map; /* item -> the owner's item */
    flash_cache_item *items;
} flash__rc_sub;

enum { FLASH__RC_SETTLED = 0, FLASH__RC_SEND, FLASH__RC_FLIGHT, FLASH__RC_BACKOFF };

struct flash__rc_op {
    flash__rc *rc;
    flash_cache_op *op;                /* NULL once cancelled */
    flash__rc_op *prev, *next;         /* live */
    flash__rc_op *wnext;               /* waiting for the first map */
    flash__rc_sub *subs;               /* in flight */
    uint32_t pending, round_trips, backoff_ms;
    int64_t deadline;
    void *timer;                       /* backoff */
    flash_defer tick;                  /* completion outside submit */
    bool waiting;
    uint16_t *slot;                    /* per item */
    int32_t *ask;                      /* per item: ASK's node, or -1 */
    uint8_t *tries, *st;               /* per item: redirects and retries; FLASH__RC_* */
    uint8_t *single;                   /* per item: GET alone (TRYAGAIN during a migration) */
    void **vals;                       /* GET value blocks, freed after done */
    size_t nvals, capvals;
};

struct flash__rc {
    flash_allocator alloc;
    flash_loop loop;
    flash_redis_desc node_desc;        /* host/port set per node */
    char *username, *password;
    uint32_t max_redirects;
    size_t max_value;
    flash__rc_node *nodes;
    size_t nnodes, capnodes;
    uint16_t *slots;                   /* FLASH__RC_SLOTS node indices */
    bool have_map, refreshing, refresh_again, use_slots_cmd, destroying;
    uint32_t refresh_next, refresh_tries;
    int64_t last_refresh;
    void *refresh_timer;
    flash__rc_sub *refresh;            /* the map load in flight */
    flash__rc_op *live, *wait_first, *wait_last;
    flash_redis_cluster_stats stats;   /* moved .. refresh_failures */
};

static void *flash__rc_alloc(flash__rc *rc, size_t n) { return rc->alloc.alloc(n, rc->alloc.user_data); }
static void flash__rc_free(flash__rc *rc, void *p) {
    if (p) rc->alloc.free(p, rc->alloc.user_data);
}

static void flash__rc_continue(flash__rc_op *rop, bool in_submit);
static void flash__rc_refresh(flash__rc *rc);

/* The node at host:port, added (with its connection, not yet open) when
   new; -1 when out of memory or unusable. A host a node announced (ip_only:
   a MOVED / ASK, the slot map) must be an IP literal: a name would be looked
   up (getaddrinfo, blocking the loop) for whatever text a reply carries. */
static int32_t flash__rc_node_find(flash__rc *rc, const char *host, size_t hlen, uint16_t port, bool ip_only) {
    size_t i;
    flash_redis_desc d;
    flash__rc_node *n;
    int err;
    if (!hlen || hlen >= sizeof n->host || !port) return -1;
    for (i = 0; i < rc->nnodes; i++)
        if (rc->nodes[i].port == port && strlen(rc->nodes[i].host) == hlen && memcmp(rc->nodes[i].host, host, hlen) == 0)
            return (int32_t)i;
    if (rc->nnodes >= FLASH__RC_MAX_NODES) return -1;
    if (ip_only) {
        char lit[sizeof n->host];
        unsigned char addr[16];
        memcpy(lit, host, hlen);
        lit[hlen] = 0;
        if (memchr(lit, 0, hlen) || (inet_pton(AF_INET, lit, addr) != 1 && inet_pton(AF_INET6, lit, addr) != 1))
            return -1;
    }
    if (rc->nnodes == rc->capnodes) {
        size_t cap = rc->capnodes ? rc->capnodes * 2 : 8;
        flash__rc_node *m = (flash__rc_node *)flash__rc_alloc(rc, cap * sizeof *m);
        if (!m) return -1;
        if (rc->nnodes) memcpy(m, rc->nodes, rc->nnodes * sizeof *m);
        flash__rc_free(rc, rc->nodes);
        rc->nodes = m;
        rc->capnodes = cap;
    }
    n = &rc->nodes[rc->nnodes];
    memset(n, 0, sizeof *n);
    memcpy(n->host, host, hlen);
    n->port = port;
    d = rc->node_desc;
    d.host = n->host;
    d.port = port;
    n->rd = flash__redis_make(&d, true, false, &err);
    if (!n->rd) return -1;
    return (int32_t)rc->nnodes++;
}

/* ---- ops ------------------------------------------------------------------------------ */

static void flash__rc_op_free(flash__rc *rc, flash__rc_op *rop) {
    size_t i;
    if (rop->timer) rc->loop.vt->cancel(rc->loop.native, rop->timer);
    flash_loop_unpost(rc->loop, &rop->tick);
    if (rop->prev) rop->prev->next = rop->next;
    else if (rc->live == rop) rc->live = rop->next;
    if (rop->next) rop->next->prev = rop->prev;
    for (i = 0; i < rop->nvals; i++) flash__rc_free(rc, rop->vals[i]);
    flash__rc_free(rc, rop->vals);
    flash__rc_free(rc, rop);
}

/* done() and free. */
static void flash__rc_finish(flash__rc_op *rop) {
    flash__rc *rc = rop->rc;
    flash_cache_op *op = rop->op;
    if (op) {
        op->priv[0] = NULL;
        op->round_trips = rop->round_trips;
        op->done(op);
    }
    flash__rc_op_free(rc, rop);
}

static void flash__rc_tick(void *arg) { flash__rc_continue((flash__rc_op *)arg, false); }

static void flash__rc_sub_done(flash_cache_op *sop);

static int flash__rc_u64cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Send every item marked SEND: one request per (node, ASK or not), keys
   sorted by slot. */
static void flash__rc_dispatch(flash__rc_op *rop) {
    flash__rc *rc = rop->rc;
    flash_cache_op *op = rop->op;
    size_t i, m = 0, start;
    uint64_t *keys;
    for (i = 0; i < op->count; i++) {
        if (rop->st[i] != FLASH__RC_SEND) continue;
        if (rop->ask[i] < 0 && rc->slots[rop->slot[i]] == FLASH__RC_NONE) {
            op->items[i].status = FLASH_EBACKEND; /* a slot no node serves */
            rop->st[i] = FLASH__RC_SETTLED;
            continue;
        }
        m++;
    }
    if (!m) return;
    keys = (uint64_t *)flash__rc_alloc(rc, m * sizeof *keys);
    if (!keys) {
        for (i = 0; i < op->count; i++)
            if (rop->st[i] == FLASH__RC_SEND) {
                op->items[i].status = FLASH_ENOMEM;
                rop->st[i] = FLASH__RC_SETTLED;
            }
        return;
    }
    /* node (16 bits) | ASK (1) | alone (1) | slot (14) | item index (32) */
    for (i = 0, m = 0; i < op->count; i++) {
        uint64_t node, ask = rop->ask[i] >= 0;
        if (rop->st[i] != FLASH__RC_SEND) continue;
        node = ask ? (uint64_t)rop->ask[i] : rc->slots[rop->slot[i]];
        keys[m++] = node << 48 | ask << 47 | (uint64_t)rop->single[i] << 46 | (uint64_t)rop->slot[i] << 32 | (uint64_t)i;
    }
    qsort(keys, m, sizeof *keys, flash__rc_u64cmp);
    rop->round_trips++; /* the nodes' requests go out together: one wave of latency */
    for (start = 0; start < m;) {
        size_t end = start, k;
        uint32_t node = (uint32_t)(keys[start] >> 48);
        bool ask = (keys[start] >> 47) & 1, single = (keys[start] >> 46) & 1;
        flash__rc_sub *sub;
        while (end < m && keys[end] >> 46 == keys[start] >> 46) end++;
        sub = (flash__rc_sub *)flash__rc_alloc(rc, sizeof *sub + (end - start) * (sizeof(flash_cache_item) + sizeof(uint32_t)));
        if (!sub) {
            for (k = start; k < end; k++) {
                uint32_t it = (uint32_t)keys[k];
                op->items[it].status = FLASH_ENOMEM;
                rop->st[it] = FLASH__RC_SETTLED;
            }
            start = end;
            continue;
        }
        memset(sub, 0, sizeof *sub);
        sub->rc = rc;
        sub->owner = rop;
        sub->node = node;
        sub->items = (flash_cache_item *)(sub + 1);
        sub->map = (uint32_t *)(sub->items + (end - start));
        for (k = start; k < end; k++) {
            uint32_t it = (uint32_t)keys[k];
            sub->items[k - start] = op->items[it];
            sub->map[k - start] = it;
            rop->st[it] = FLASH__RC_FLIGHT;
        }
        sub->op.code = op->code;
        sub->op.items = sub->items;
        sub->op.count = end - start;
        sub->op.quiet = op->quiet;
        sub->op.done = flash__rc_sub_done;
        sub->next_sub = rop->subs;
        if (rop->subs) rop->subs->prev_sub = sub;
        rop->subs = sub;
        rop->pending++;
        rc->nodes[node].rd->asking_next = ask;
        rc->nodes[node].rd->single_next = single;
        flash__redis_submit(rc->nodes[node].rd, rc->loop, &sub->op);
        start = end;
    }
    flash__rc_free(rc, keys);
}

static void flash__rc_backoff_fired(void *arg) {
    flash__rc_op *rop = (flash__rc_op *)arg;
    size_t i;
    rop->timer = NULL;
    for (i = 0; i < rop->op->count; i++)
        if (rop->st[i] == FLASH__RC_BACKOFF) rop->st[i] = FLASH__RC_SEND;
    flash__rc_continue(rop, false);
}

/* All of rop's requests are in: send what must go again, wait for a
   backoff, or finish. */
static void flash__rc_continue(flash__rc_op *rop, bool in_submit) {
    flash__rc *rc = rop->rc;
    flash_cache_op *op = rop->op;
    size_t i, send = 0, backoff = 0;
    int64_t now = flash__pipe_now();
    if (!op) {
        flash__rc_op_free(rc, rop);
        return;
    }
    for (i = 0; i < op->count; i++) {
        if (rop->st[i] != FLASH__RC_SEND && rop->st[i] != FLASH__RC_BACKOFF) continue;
        if (now >= rop->deadline) { /* retries ran out of time */
            op->items[i].status = FLASH_ETIMEDOUT;
            rop->st[i] = FLASH__RC_SETTLED;
        } else if (rop->st[i] == FLASH__RC_SEND) {
            send++;
        } else {
            backoff++;
        }
    }
    if (send && !rop->waiting) flash__rc_dispatch(rop);
    if (rop->pending || rop->waiting) return;
    if (backoff) {
        uint32_t ms = rop->backoff_ms ? rop->backoff_ms : 5;
        if (now + ms > rop->deadline) ms = (uint32_t)(rop->deadline - now);
        rop->backoff_ms = ms * 2 > 100 ? 100 : ms * 2;
        rop->timer = rc->loop.vt->timer(rc->loop.native, ms, flash__rc_backoff_fired, rop);
        if (rop->timer) return;
        for (i = 0; i < op->count; i++) /* no timer: fail now rather than hang */
            if (rop->st[i] == FLASH__RC_BACKOFF) {
                op->items[i].status = FLASH_ENOMEM;
                rop->st[i] = FLASH__RC_SETTLED;
            }
    }
    if (in_submit) flash_loop_post(rc->loop, &rop->tick, flash__rc_tick, rop);
    else flash__rc_finish(rop);
}

/* "MOVED 3999 127.0.0.1:6381": the slot and the node; false when malformed. */
static bool flash__rc_parse_redirect(const char *s, size_t n, size_t skip, uint32_t *slot, const char **host,
                                     size_t *hlen, uint16_t *port) {
    const char *p = s + skip, *end = s + n, *colon = NULL, *q;
    uint32_t v = 0;
    if (p >= end || *p != ' ') return false;
    p++;
    if (p >= end || *p < '0' || *p > '9') return false;
    while (p < end && *p >= '0' && *p <= '9' && v < FLASH__RC_SLOTS) v = v * 10 + (uint32_t)(*p++ - '0');
    if (v >= FLASH__RC_SLOTS || p >= end || *p != ' ') return false;
    *slot = v;
    *host = ++p;
    for (q = p; q < end; q++)
        if (*q == ':') colon = q; /* the last one: IPv6 hosts have several */
    if (!colon || colon + 1 >= end) return false;
    *hlen = (size_t)(colon - p);
    for (v = 0, q = colon + 1; q < end; q++) {
        if (*q < '0' || *q > '9' || v > 65535) return false;
        v = v * 10 + (uint32_t)(*q - '0');
    }
    if (!v || v > 65535) return false;
    *port = (uint16_t)v;
    return true;
}

/* A key's error reply from node: route, retry or fail it. */
static void flash__rc_on_error(flash__rc_op *rop, uint32_t node, size_t i, const char *text, size_t n) {
    flash__rc *rc = rop->rc;
    flash_cache_item *it = &rop->op->items[i];
    bool moved = n >= 5 && memcmp(text, "MOVED", 5) == 0, ask = n >= 3 && memcmp(text, "ASK", 3) == 0 && !moved;
    bool wait = (n >= 8 && memcmp(text, "TRYAGAIN", 8) == 0) || (n >= 11 && memcmp(text, "CLUSTERDOWN", 11) == 0);
    rop->st[i] = FLASH__RC_SETTLED;
    if (!wait && ++rop->tries[i] > rc->max_redirects) {
        it->status = FLASH_EBACKEND; /* a redirect loop, or a cluster that stays down */
        return;
    }
    if (moved || ask) {
        uint32_t slot;
        const char *host;
        size_t hlen;
        uint16_t port;
        int32_t to;
        if (!flash__rc_parse_redirect(text, n, moved ? 5 : 3, &slot, &host, &hlen, &port)) {
            it->status = FLASH_EPROTO;
            return;
        }
        if (!hlen) { /* "MOVED s :port": the host is the replying node's */
            host = rc->nodes[node].host;
            hlen = strlen(host);
        }
        to = flash__rc_node_find(rc, host, hlen, port, true);
        if (to < 0) {
            it->status = FLASH_EBACKEND;
            return;
        }
        if (moved) {
            rc->stats.moved++;
            rc->slots[slot] = (uint16_t)to;
            rop->ask[i] = -1;
            flash__rc_refresh(rc);
        } else {
            rc->stats.ask++;
            rop->ask[i] = to;
        }
        rop->st[i] = FLASH__RC_SEND;
    } else if (wait) {
        if (text[0] == 'T') rc->stats.tryagain++;
        else rc->stats.clusterdown++;
        if (text[0] == 'T' && rop->op->code == FLASH_CACHE_GET && !rop->single[i]) {
            /* A multi-key MGET in a slot being migrated, some keys gone:
               each key alone gets its value or an ASK, at once. */
            rop->single[i] = 1;
            rop->st[i] = FLASH__RC_SEND;
        } else {
            rop->st[i] = FLASH__RC_BACKOFF;
        }
    } else if (n >= 8 && memcmp(text, "NOSCRIPT", 8) == 0) {
        rc->stats.noscript++; /* the node reconnects when idle, loading them */
        rop->st[i] = FLASH__RC_SEND;
    } else if (n >= 8 && memcmp(text, "READONLY", 8) == 0) {
        /* A master demoted to a replica (a failover) still answering on the
           open connection: the map is stale. Reload it and send the key
           again after a backoff (counted as a redirect). */
        flash__rc_refresh(rc);
        rop->st[i] = FLASH__RC_BACKOFF;
    } else {
        it->status = FLASH_EBACKEND; /* OOM, a script error, ... */
    }
}

static void flash__rc_sub_unlink(flash__rc_op *rop, flash__rc_sub *sub) {
    if (sub->prev_sub) sub->prev_sub->next_sub = sub->next_sub;
    else rop->subs = sub->next_sub;
    if (sub->next_sub) sub->next_sub->prev_sub = sub->prev_sub;
}

static void flash__rc_refresh_done(flash__rc *rc, flash__rc_sub *sub);

static void flash__rc_sub_done(flash_cache_op *sop) {
    flash__rc_sub *sub = (flash__rc_sub *)sop;
    flash__rc *rc = sub->rc;
    flash__rc_op *rop = sub->owner;
    flash_cache_op *op;
    size_t i, total = 0;
    char *block = NULL;
    bool node_failed = false;
    if (!rop) {
        flash__rc_refresh_done(rc, sub);
        return;
    }
    op = rop->op;
    flash__rc_sub_unlink(rop, sub);
    rop->pending--;
    if (sop->code == FLASH_CACHE_GET) /* the values die with the node's request: one copy block */
        for (i = 0; i < sop->count; i++)
            if (sub->items[i].status == FLASH_OK) total += sub->items[i].value_len + 1;
    if (total && rop->nvals == rop->capvals) {
        size_t cap = rop->capvals ? rop->capvals * 2 : 4;
        void **m = (void **)flash__rc_alloc(rc, cap * sizeof *m);
        if (m) {
            if (rop->nvals) memcpy(m, rop->vals, rop->nvals * sizeof *m);
            flash__rc_free(rc, rop->vals);
            rop->vals = m;
            rop->capvals = cap;
        }
    }
    if (total && rop->nvals < rop->capvals) block = (char *)flash__rc_alloc(rc, total);
    if (block) rop->vals[rop->nvals++] = block;
    for (i = 0; i < sop->count; i++) {
        flash_cache_item *s = &sub->items[i], *d;
        uint32_t k = sub->map[i];
        if (!op) continue;
        d = &op->items[k];
        rop->st[k] = FLASH__RC_SETTLED;
        if (s->status == FLASH__REDIS_ERRTEXT) {
            if (rc->destroying) d->status = FLASH_ECANCELED;
            else flash__rc_on_error(rop, sub->node, k, (const char *)s->value, s->value_len);
            continue;
        }
        d->status = s->status;
        if (s->status == FLASH_EBACKEND || s->status == FLASH_ETIMEDOUT) node_failed = true;
        if (sop->code == FLASH_CACHE_GET && s->status == FLASH_OK) {
            if (!block) {
                d->status = FLASH_ENOMEM;
                continue;
            }
            if (s->value_len) memcpy(block, s->value, s->value_len);
            block[s->value_len] = 0;
            d->value = block;
            d->value_len = s->value_len;
            d->flags = s->flags;
            d->cas = s->cas;
            block += s->value_len + 1;
        } else if (sop->code == FLASH_CACHE_INCR) {
            d->number = s->number;
        }
    }
    flash__rc_free(rc, sub);
    if (rc->destroying) return;
    if (node_failed) flash__rc_refresh(rc); /* a failover may be under way */
    if (!rop->pending) flash__rc_continue(rop, false);
}

/* ---- the slot map ------------------------------------------------------------------------ */

/* Record one master's slot range in map. */
static bool flash__rc_assign(flash__rc *rc, uint16_t *map, int64_t lo, int64_t hi, const char *host, size_t hlen,
                             int64_t port) {
    int32_t n;
    if (lo < 0 || hi >= FLASH__RC_SLOTS || lo > hi || port <= 0 || port > 65535) return false;
    n = flash__rc_node_find(rc, host, hlen, (uint16_t)port, true);
    if (n < 0) return false;
    while (lo <= hi) map[lo++] = (uint16_t)n;
    return true;
}

/* CLUSTER SHARDS: [ {slots: [lo hi ...], nodes: [ {ip, port, role, ...} ]} ... ] */
static bool flash__rc_parse_shards(flash__rc *rc, flash__rr *r, uint16_t *map) {
    flash__rr_el top, e;
    int64_t s, f;
    if (!flash__rr_next(r, &top) || top.kind != FLASH_REDIS_ARRAY) return false;
    for (s = 0; s < top.integer; s++) {
        int64_t ranges[64];
        int nr = 0, i;
        const char *host = NULL;
        size_t hlen = 0;
        int64_t port = 0;
        bool host_online = false;
        if (!flash__rr_next(r, &e) || e.kind != FLASH_REDIS_ARRAY || e.integer % 2) return false;
        for (f = 0; f < e.integer / 2; f++) {
            flash__rr_el k, v;
            if (!flash__rr_next(r, &k) || !flash__rr_next(r, &v)) return false;
            if (flash__rr_is(&k, "slots") && v.kind == FLASH_REDIS_ARRAY) {
                int64_t j;
                for (j = 0; j < v.integer; j++) {
                    flash__rr_el x;
                    if (!flash__rr_next(r, &x) || x.kind != FLASH_REDIS_INTEGER) return false;
                    if (nr < 64) ranges[nr++] = x.integer;
                    else return false;
                }
            } else if (flash__rr_is(&k, "nodes") && v.kind == FLASH_REDIS_ARRAY) {
                int64_t j;
                for (j = 0; j < v.integer; j++) {
                    flash__rr_el nd;
                    const char *ip = NULL;
                    size_t iplen = 0;
                    int64_t p = 0, g;
                    bool master = false, online = false;
                    if (!flash__rr_next(r, &nd) || nd.kind != FLASH_REDIS_ARRAY || nd.integer % 2) return false;
                    for (g = 0; g < nd.integer / 2; g++) {
                        flash__rr_el a, b;
                        if (!flash__rr_next(r, &a) || !flash__rr_next(r, &b)) return false;
                        if (flash__rr_is(&a, "ip") && b.kind == FLASH_REDIS_BULK) {
                            ip = b.str;
                            iplen = b.len;
                        } else if (flash__rr_is(&a, "port") && b.kind == FLASH_REDIS_INTEGER) {
                            p = b.integer;
                        } else if (flash__rr_is(&a, "role")) {
                            master = flash__rr_is(&b, "master");
                        } else if (flash__rr_is(&a, "health")) {
                            online = flash__rr_is(&b, "online");
                        }
                        if (!flash__rr_skip(r, &b)) return false;
                    }
                    /* a failed master stays listed as one until its
                       replica is promoted: the online one wins */
                    if (master && ip && (online || !host_online)) {
                        host_online = online;
                        host = ip;
                        hlen = iplen;
                        port = p;
                    }
                }
            } else if (!flash__rr_skip(r, &v)) {
                return false;
            }
        }
        if (nr % 2) return false;
        for (i = 0; i < nr; i += 2)
            if (ranges[i] < 0 || ranges[i + 1] >= FLASH__RC_SLOTS || ranges[i] > ranges[i + 1]) return false;
        for (i = 0; i < nr && host; i += 2)
            if (!flash__rc_assign(rc, map, ranges[i], ranges[i + 1], host, hlen, port)) return false;
    }
    return true;
}

/* CLUSTER SLOTS: [ [lo, hi, [ip, port, id, ...], replicas ...] ... ] */
static bool flash__rc_parse_slots(flash__rc *rc, flash__rr *r, uint16_t *map) {
    flash__rr_el top, e, lo, hi, nd, ip, port;
    int64_t s, j;
    if (!flash__rr_next(r, &top) || top.kind != FLASH_REDIS_ARRAY) return false;
    for (s = 0; s < top.integer; s++) {
        if (!flash__rr_next(r, &e) || e.kind != FLASH_REDIS_ARRAY || e.integer < 3) return false;
        if (!flash__rr_next(r, &lo) || !flash__rr_next(r, &hi) || !flash__rr_next(r, &nd)) return false;
        if (lo.kind != FLASH_REDIS_INTEGER || hi.kind != FLASH_REDIS_INTEGER || nd.kind != FLASH_REDIS_ARRAY || nd.integer < 2)
            return false;
        if (!flash__rr_next(r, &ip) || !flash__rr_next(r, &port) || ip.kind != FLASH_REDIS_BULK ||
            port.kind != FLASH_REDIS_INTEGER)
            return false;
        for (j = 2; j < nd.integer; j++) {
            flash__rr_el x;
            if (!flash__rr_next(r, &x) || !flash__rr_skip(r, &x)) return false;
        }
        for (j = 3; j < e.integer; j++) { /* replicas */
            flash__rr_el x;
            if (!flash__rr_next(r, &x) || !flash__rr_skip(r, &x)) return false;
        }
        if (!flash__rc_assign(rc, map, lo.integer, hi.integer, ip.str, ip.len, port.integer)) return false;
    }
    return true;
}

static void flash__rc_refresh_fired(void *arg) {
    flash__rc *rc = (flash__rc *)arg;
    rc->refresh_timer = NULL;
    flash__rc_refresh(rc);
}

/* Fail what waits for the first map (every load failed). */
static void flash__rc_fail_waiting(flash__rc *rc, int code) {
    while (rc->wait_first) {
        flash__rc_op *rop = rc->wait_first;
        size_t i;
        rc->wait_first = rop->wnext;
        rop->waiting = false;
        if (rop->op)
            for (i = 0; i < rop->op->count; i++)
                if (rop->st[i] == FLASH__RC_SEND) {
                    rop->op->items[i].status = code;
                    rop->st[i] = FLASH__RC_SETTLED;
                }
        flash__rc_continue(rop, false);
    }
    rc->wait_last = NULL;
}

/* Load the map from the next node that is not down (at most one load at a
   time, at most one every 100 ms). */
static void flash__rc_refresh(flash__rc *rc) {
    static const char shards[] = "*2\r\n$7\r\nCLUSTER\r\n$6\r\nSHARDS\r\n";
    static const char slots[] = "*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n";
    int64_t now = flash__pipe_now();
    flash__rc_sub *sub;
    size_t i, node = 0;
    if (rc->destroying) return;
    if (rc->refreshing || rc->refresh_timer) {
        rc->refresh_again = true;
        return;
    }
    if (rc->have_map && now < rc->last_refresh + 100) {
        rc->refresh_timer = rc->loop.vt->timer(rc->loop.native, (uint32_t)(rc->last_refresh + 100 - now),
                                               flash__rc_refresh_fired, rc);
        return;
    }
    rc->refresh_again = false;
    for (i = 0; i < rc->nnodes; i++) { /* round robin, skipping nodes marked down */
        node = (rc->refresh_next + i) % rc->nnodes;
        if (!flash__pipe_down(&rc->nodes[node].rd->pipe, now)) break;
    }
    rc->refresh_next = (uint32_t)(node + 1);
    sub = (flash__rc_sub *)flash__rc_alloc(rc, sizeof *sub + sizeof(flash_cache_item) + sizeof(uint32_t));
    if (!sub) {
        if (!rc->have_map) flash__rc_fail_waiting(rc, FLASH_ENOMEM);
        return;
    }
    memset(sub, 0, sizeof *sub);
    sub->rc = rc;
    sub->node = (uint32_t)node;
    sub->items = (flash_cache_item *)(sub + 1);
    memset(sub->items, 0, sizeof *sub->items);
    sub->items[0].key = rc->use_slots_cmd ? slots : shards;
    sub->items[0].key_len = rc->use_slots_cmd ? sizeof slots - 1 : sizeof shards - 1;
    sub->op.code = FLASH_CACHE_GET;
    sub->op.items = sub->items;
    sub->op.count = 1;
    sub->op.done = flash__rc_sub_done;
    rc->refresh = sub;
    rc->refreshing = true;
    rc->last_refresh = now;
    rc->nodes[node].rd->raw_next = true;
    flash__redis_submit(rc->nodes[node].rd, rc->loop, &sub->op);
}

static void flash__rc_refresh_done(flash__rc *rc, flash__rc_sub *sub) {
    flash_cache_item *it = &sub->items[0];
    uint16_t *map = NULL;
    bool ok = false, unknown_cmd = false;
    rc->refreshing = false;
    rc->refresh = NULL;
    if (rc->destroying) {
        flash__rc_free(rc, sub);
        return;
    }
    if (it->status == FLASH_OK) {
        flash__rr r;
        flash__rr_el first;
        r.p = (const char *)it->value;
        r.end = r.p + it->value_len;
        if (flash__rr_next(&r, &first) && first.kind == FLASH_REDIS_ERROR) {
            unknown_cmd = !rc->use_slots_cmd; /* before Redis 7: no CLUSTER SHARDS */
        } else {
            map = (uint16_t *)flash__rc_alloc(rc, FLASH__RC_SLOTS * sizeof *map);
            if (map) {
                size_t i;
                for (i = 0; i < FLASH__RC_SLOTS; i++) map[i] = FLASH__RC_NONE;
                r.p = (const char *)it->value;
                ok = rc->use_slots_cmd ? flash__rc_parse_slots(rc, &r, map) : flash__rc_parse_shards(rc, &r, map);
                ok = ok && r.p == r.end;
            }
        }
    }
    flash__rc_free(rc, sub);
    if (ok) {
        size_t i;
        memcpy(rc->slots, map, FLASH__RC_SLOTS * sizeof *map);
        rc->stats.refreshes++;
        rc->refresh_tries = 0;
        if (!rc->have_map) {
            flash__rc_op *rop = rc->wait_first;
            rc->have_map = true;
            rc->wait_first = rc->wait_last = NULL;
            while (rop) {
                flash__rc_op *next = rop->wnext;
                rop->waiting = false;
                flash__rc_continue(rop, false);
                rop = next;
            }
        }
        (void)i;
    } else if (unknown_cmd) {
        rc->use_slots_cmd = true;
        rc->last_refresh = 0;
        rc->refresh_again = true;
    } else {
        rc->stats.refresh_failures++;
        /* another node, at once, while there are nodes not yet asked */
        if (++rc->refresh_tries < rc->nnodes) {
            rc->last_refresh = 0;
            rc->refresh_again = true;
        } else {
            rc->refresh_tries = 0;
            if (!rc->have_map) flash__rc_fail_waiting(rc, FLASH_EBACKEND);
        }
    }
    flash__rc_free(rc, map);
    if (rc->refresh_again && !rc->destroying) {
        rc->refresh_again = false;
        flash__rc_refresh(rc);
    }
}

/* ---- vtable ------------------------------------------------------------------------------------ */

static void flash__rc_oom_tick(void *arg) {
    flash_cache_op *op = (flash_cache_op *)arg;
    op->priv[1] = NULL;
    op->done(op);
}

static void flash__rc_submit(void *self, flash_loop loop, flash_cache_op *op) {
    flash__rc *rc = (flash__rc *)self;
    flash__rc_op *rop = NULL;
    size_t i, n, each = sizeof(uint16_t) + sizeof(int32_t) + 3;
    bool store, valid_code;
    (void)loop;
    if (!rc || !op) return;
    n = op->count;
    op->status = FLASH_OK;
    op->round_trips = 0;
    op->priv[0] = op->priv[1] = NULL;
    valid_code = op->code >= FLASH_CACHE_GET && op->code <= FLASH_CACHE_INCR;
    store = op->code == FLASH_CACHE_SET || op->code == FLASH_CACHE_ADD || op->code == FLASH_CACHE_CAS;
    if (!rc->destroying && (!n || op->items) && n < (SIZE_MAX - sizeof *rop - 16) / each)
        rop = (flash__rc_op *)flash__rc_alloc(rc, sizeof *rop + n * each + 16);
    if (!rop) {
        int code = rc->destroying ? FLASH_ECANCELED : (n && !op->items) ? FLASH_EINVAL : FLASH_ENOMEM;
        op->status = code;
        for (i = 0; op->items && i < n; i++) op->items[i].status = code;
        if (rc->destroying) return;
        op->priv[1] = rc; /* marks "posted" for cancel */
        flash_loop_post(rc->loop, &op->tick, flash__rc_oom_tick, op);
        return;
    }
    memset(rop, 0, sizeof *rop);
    rop->rc = rc;
    rop->op = op;
    rop->ask = (int32_t *)(rop + 1);
    rop->slot = (uint16_t *)(rop->ask + n);
    rop->tries = (uint8_t *)(rop->slot + n);
    rop->st = rop->tries + n;
    rop->single = rop->st + n;
    rop->deadline = flash__pipe_now() + rc->node_desc.timeout_ms;
    rop->next = rc->live;
    if (rc->live) rc->live->prev = rop;
    rc->live = rop;
    op->priv[0] = rop;
    if (!valid_code) op->status = FLASH_EINVAL;
    for (i = 0; i < n; i++) {
        flash_cache_item *it = &op->items[i];
        int st = valid_code ? flash__pipe_key_status(it->key, it->key_len) : FLASH_EINVAL;
        if (op->code == FLASH_CACHE_GET) {
            it->value = NULL;
            it->value_len = 0;
            it->flags = 0;
            it->cas = 0;
        }
        if (!st && store && it->value_len > rc->max_value) st = FLASH_ETOOLARGE;
        if (!st && store && it->value_len && !it->value) st = FLASH_EINVAL;
        it->status = st;
        rop->ask[i] = -1;
        rop->tries[i] = 0;
        rop->single[i] = 0;
        rop->st[i] = st ? FLASH__RC_SETTLED : FLASH__RC_SEND;
        rop->slot[i] = st ? 0 : (uint16_t)flash_redis_key_slot(it->key, it->key_len);
    }
    if (!rc->have_map) { /* the first map first */
        rop->waiting = true;
        if (rc->wait_last) rc->wait_last->wnext = rop;
        else rc->wait_first = rop;
        rc->wait_last = rop;
        flash__rc_refresh(rc);
        return;
    }
    flash__rc_continue(rop, true);
}

static void flash__rc_cancel(void *self, flash_cache_op *op) {
    flash__rc *rc = (flash__rc *)self;
    flash__rc_op *rop;
    if (!rc || !op) return;
    if (!op->priv[0]) {
        if (op->priv[1] == rc) flash_loop_unpost(rc->loop, &op->tick);
        op->priv[1] = NULL;
        return;
    }
    rop = (flash__rc_op *)op->priv[0];
    op->priv[0] = NULL;
    rop->op = NULL;
    while (rop->subs) { /* their replies are read and dropped by the nodes */
        flash__rc_sub *sub = rop->subs;
        flash__rc_sub_unlink(rop, sub);
        flash__redis_cancel(rc->nodes[sub->node].rd, &sub->op);
        flash__rc_free(rc, sub);
    }
    rop->pending = 0;
    if (rop->waiting) {
        flash__rc_op *p = rc->wait_first, *prev = NULL;
        while (p && p != rop) {
            prev = p;
            p = p->wnext;
        }
        if (p) {
            if (prev) prev->wnext = p->wnext;
            else rc->wait_first = p->wnext;
            if (rc->wait_last == p) rc->wait_last = prev;
        }
    }
    flash__rc_op_free(rc, rop);
}

static size_t flash__rc_max_value(void *self) { return self ? ((flash__rc *)self)->max_value : 0; }

static void flash__rc_destroy(void *self) {
    flash__rc *rc = (flash__rc *)self;
    size_t i;
    if (!rc) return;
    rc->destroying = true;
    if (rc->refresh_timer) rc->loop.vt->cancel(rc->loop.native, rc->refresh_timer);
    rc->refresh_timer = NULL;
    /* Each node calls done() for our requests on it: statuses are copied,
       nothing is sent again. */
    for (i = 0; i < rc->nnodes; i++) flash__redis_destroy(rc->nodes[i].rd);
    rc->wait_first = rc->wait_last = NULL;
    while (rc->live) {
        flash__rc_op *rop = rc->live;
        if (rop->op) {
            bool any = false;
            for (i = 0; i < rop->op->count; i++)
                if (rop->st[i] != FLASH__RC_SETTLED) {
                    rop->op->items[i].status = FLASH_ECANCELED;
                    any = true;
                }
            if (any) rop->op->status = FLASH_ECANCELED;
        }
        flash__rc_finish(rop);
    }
    flash__rc_free(rc, rc->nodes);
    flash__rc_free(rc, rc->slots);
    flash__rc_free(rc, rc->username);
    flash__rc_free(rc, rc->password);
    rc->alloc.free(rc, rc->alloc.user_data);
}

static const flash_cache_vtable flash__rc_vt = {
    "redis-cluster", flash__rc_submit, flash__rc_cancel, flash__rc_max_value, flash__rc_destroy, 0,
};

static char *flash__rc_strdup(flash__rc *rc, const char *s) {
    char *m;
    if (!s) return NULL;
    m = (char *)flash__rc_alloc(rc, strlen(s) + 1);
    if (m) memcpy(m, s, strlen(s) + 1);
    return m;
}

FLASH_API flash_cache flash_redis_cluster_create(const flash_redis_cluster_desc *desc, int *error) {
    flash_cache none = {NULL, NULL}, out;
    flash_allocator al;
    flash__rc *rc;
    size_t i;
    int rc_err = FLASH_EINVAL;
    if (error) *error = FLASH_OK;
    if (!desc || !flash__pipe_loop_ok(&desc->loop) || !desc->seeds || !desc->seed_count ||
        desc->seed_count > FLASH__RC_MAX_NODES || (desc->username && !desc->password)) {
        if (error) *error = FLASH_EINVAL;
        return none;
    }
    al = flash__pipe_allocator(desc->allocator);
    rc = (flash__rc *)al.alloc(sizeof *rc, al.user_data);
    if (!rc) {
        if (error) *error = FLASH_ENOMEM;
        return none;
    }
    memset(rc, 0, sizeof *rc);
    rc->alloc = al;
    rc->loop = desc->loop;
    rc->max_redirects = desc->max_redirects ? desc->max_redirects : 5;
    if (rc->max_redirects > 200) rc->max_redirects = 200; /* a uint8_t per key */
    rc->max_value = desc->max_value ? desc->max_value : (size_t)1 << 20;
    if (rc->max_value > ((size_t)1 << 40)) rc->max_value = (size_t)1 << 40;
    rc->username = flash__rc_strdup(rc, desc->username);
    rc->password = flash__rc_strdup(rc, desc->password);
    rc->slots = (uint16_t *)flash__rc_alloc(rc, FLASH__RC_SLOTS * sizeof *rc->slots);
    if (!rc->slots || (desc->username && !rc->username) || (desc->password && !rc->password)) {
        rc_err = FLASH_ENOMEM;
        goto fail;
    }
    for (i = 0; i < FLASH__RC_SLOTS; i++) rc->slots[i] = FLASH__RC_NONE;
    rc->node_desc.loop = desc->loop;
    rc->node_desc.username = rc->username;
    rc->node_desc.password = rc->password;
    rc->node_desc.connect_timeout_ms = desc->connect_timeout_ms ? desc->connect_timeout_ms : 1000;
    rc->node_desc.timeout_ms = desc->timeout_ms ? desc->timeout_ms : 1000;
    rc->node_desc.retry_interval_ms = desc->retry_interval_ms ? desc->retry_interval_ms : 1000;
    rc->node_desc.max_value = rc->max_value;
    rc->node_desc.allocator = al;
    for (i = 0; i < desc->seed_count; i++) {
        const flash_redis_node *s = &desc->seeds[i];
        if (!s->host || !s->host[0] || strlen(s->host) >= 64 ||
            flash__rc_node_find(rc, s->host, strlen(s->host), s->port ? s->port : 6379, false) < 0) {
            rc_err = FLASH_EINVAL;
            goto fail;
        }
    }
    out.vt = &flash__rc_vt;
    out.self = rc;
    return out;
fail:
    if (error) *error = rc_err;
    flash__rc_destroy(rc);
    return none;
}

static void flash__rc_add_stats(flash_redis_stats *s, const flash__redis *rd) {
    s->requests = rd->stats.requests;
    s->commands = rd->stats.commands;
    s->fast_fails = rd->stats.fast_fails;
    s->connects = rd->pipe.counts.connects;
    s->reconnects = rd->pipe.counts.reconnects;
    s->failures = rd->pipe.counts.failures;
    s->timeouts = rd->pipe.counts.timeouts;
    s->proto_errors = rd->pipe.counts.proto_errors;
    s->connected = rd->pipe.counts.connected;
    s->down = flash__pipe_down(&rd->pipe, flash__pipe_now());
}

FLASH_API int flash_redis_cluster_stats_get(flash_cache cache, flash_redis_cluster_stats *out) {
    const flash__rc *rc = (const flash__rc *)cache.self;
    size_t i;
    if (cache.vt != &flash__rc_vt || !rc || !out) return FLASH_EINVAL;
    *out = rc->stats;
    out->nodes = (uint32_t)rc->nnodes;
    for (i = 0; i < rc->nnodes; i++) {
        flash_redis_stats s;
        flash__rc_add_stats(&s, rc->nodes[i].rd);
        out->requests += s.requests;
        out->commands += s.commands;
        out->failures += s.failures;
        out->timeouts += s.timeouts;
        out->fast_fails += s.fast_fails;
        out->proto_errors += s.proto_errors;
    }
    out->slots_served = 0;
    for (i = 0; i < FLASH__RC_SLOTS; i++) out->slots_served += rc->slots[i] != FLASH__RC_NONE;
    return FLASH_OK;
}

FLASH_API int flash_redis_cluster_node_get(flash_cache cache, size_t idx, flash_redis_cluster_node *out) {
    const flash__rc *rc = (const flash__rc *)cache.self;
    size_t i;
    if (cache.vt != &flash__rc_vt || !rc || !out || idx >= rc->nnodes) return FLASH_EINVAL;
    memset(out, 0, sizeof *out);
    memcpy(out->host, rc->nodes[idx].host, sizeof out->host);
    out->port = rc->nodes[idx].port;
    for (i = 0; i < FLASH__RC_SLOTS; i++) out->slots += rc->slots[i] == idx;
    flash__rc_add_stats(&out->stats, rc->nodes[idx].rd);
    return FLASH_OK;
}

/* ---- Sentinel ---------------------------------------------------------------------------------- */

typedef struct flash__rs flash__rs;

/* One internal command (to a sentinel, or ROLE to the primary). */
typedef struct flash__rs_cmd {
    flash_cache_op op;
    flash_cache_item item;
    flash__rs *rs;
    flash__redis *to;
    char *text;
} flash__rs_cmd;

struct flash__rs {
    flash_allocator alloc;
    flash_loop loop;
    flash__redis *master;
    flash__redis **sentinels;
    size_t nsent, cur, tries;
    char *name;
    uint32_t timeout_ms, retry_interval_ms;
    bool resolved, resolving, destroying;
    int64_t deadline, down_until;
    void *timer;                          /* asking again during a failover */
    flash__rs_cmd *cmd;                   /* in flight */
    flash_cache_op *wait_first, *wait_last; /* chained by priv[2]; priv[3] = &wait_first */
    flash_redis_sentinel_stats stats;
    char host[64];
    uint16_t port;
};

static void flash__rs_ask(flash__rs *rs);

static void flash__rs_fail_waiting(flash__rs *rs, int code) {
    flash_cache_op *op = rs->wait_first;
    rs->wait_first = rs->wait_last = NULL;
    while (op) {
        flash_cache_op *next = (flash_cache_op *)op->priv[2];
        size_t i;
        op->priv[2] = op->priv[3] = NULL;
        for (i = 0; op->items && i < op->count; i++) {
            int st = flash__pipe_key_status(op->items[i].key, op->items[i].key_len);
            op->items[i].status = st ? st : code;
            if (op->code == FLASH_CACHE_GET) op->items[i].value = NULL;
        }
        if (code == FLASH_ECANCELED) op->status = code;
        op->done(op);
        op = next;
    }
}

static void flash__rs_release(flash__rs *rs) {
    flash_cache_op *op = rs->wait_first;
    rs->wait_first = rs->wait_last = NULL;
    while (op) {
        flash_cache_op *next = (flash_cache_op *)op->priv[2];
        op->priv[2] = op->priv[3] = NULL;
        flash__redis_submit(rs->master, rs->loop, op);
        op = next;
    }
}

static void flash__rs_cmd_done(flash_cache_op *op);

/* Send a raw command (argv) to `to`; false when out of memory. */
static bool flash__rs_send(flash__rs *rs, flash__redis *to, int argc, const char *const *argv) {
    flash__rs_cmd *c = (flash__rs_cmd *)rs->alloc.alloc(sizeof *c, rs->alloc.user_data);
    size_t len = 0;
    if (!c) return false;
    memset(c, 0, sizeof *c);
    c->text = flash__rc_command(rs->alloc, &len, argc, argv);
    if (!c->text) {
        rs->alloc.free(c, rs->alloc.user_data);
        return false;
    }
    c->rs = rs;
    c->to = to;
    c->item.key = c->text;
    c->item.key_len = len;
    c->op.code = FLASH_CACHE_GET;
    c->op.items = &c->item;
    c->op.count = 1;
    c->op.done = flash__rs_cmd_done;
    rs->cmd = c;
    to->raw_next = true;
    flash__redis_submit(to, rs->loop, &c->op);
    return true;
}

static void flash__rs_cmd_free(flash__rs *rs, flash__rs_cmd *c) {
    rs->alloc.free(c->text, rs->alloc.user_data);
    rs->alloc.free(c, rs->alloc.user_data);
}

static void flash__rs_retry_fired(void *arg) {
    flash__rs *rs = (flash__rs *)arg;
    rs->timer = NULL;
    flash__rs_ask(rs);
}

/* This round found no usable primary: again in 100 ms within the
   deadline, else the waiting ops fail. */
static void flash__rs_not_yet(flash__rs *rs, bool sentinels_failed) {
    int64_t now = flash__pipe_now();
    if (now + 100 < rs->deadline) {
        rs->timer = rs->loop.vt->timer(rs->loop.native, 100, flash__rs_retry_fired, rs);
        if (rs->timer) return;
    }
    rs->resolving = false;
    if (sentinels_failed) rs->down_until = now + rs->retry_interval_ms;
    flash__rs_fail_waiting(rs, FLASH_EBACKEND);
}

static void flash__rs_cmd_done(flash_cache_op *op) {
    flash__rs_cmd *c = (flash__rs_cmd *)op;
    flash__rs *rs = c->rs;
    flash__rr r;
    flash__rr_el top, a, b;
    bool to_master = c->to == rs->master;
    rs->cmd = NULL;
    r.p = (const char *)c->item.value;
    r.end = r.p + (c->item.status == FLASH_OK ? c->item.value_len : 0);
    if (rs->destroying) {
        flash__rs_cmd_free(rs, c);
        return;
    }
    if (!to_master) { /* SENTINEL get-master-addr-by-name: [ip, port] */
        if (flash__rr_next(&r, &top) && top.kind == FLASH_REDIS_ARRAY && top.integer == 2 && flash__rr_next(&r, &a) &&
            flash__rr_next(&r, &b) && a.kind == FLASH_REDIS_BULK && b.kind == FLASH_REDIS_BULK && a.len &&
            a.len < sizeof rs->host && b.len && b.len < 6) {
            char host[64], port[8];
            unsigned long p;
            memcpy(host, a.str, a.len);
            host[a.len] = 0;
            memcpy(port, b.str, b.len);
            port[b.len] = 0;
            p = strtoul(port, NULL, 10);
            flash__rs_cmd_free(rs, c);
            if (p && p < 65536 && flash__pipe_resolve(&rs->master->pipe, host, (uint16_t)p) == FLASH_OK) {
                static const char *const role[] = {"ROLE"};
                if (rs->host[0] && (strcmp(rs->host, host) != 0 || rs->port != p)) rs->stats.failovers++;
                memcpy(rs->host, host, sizeof host);
                rs->port = (uint16_t)p;
                flash__pipe_close(&rs->master->pipe); /* the new address, a new connection */
                rs->master->pipe.down_until = 0;
                if (!flash__rs_send(rs, rs->master, 1, role)) {
                    rs->resolving = false;
                    flash__rs_fail_waiting(rs, FLASH_ENOMEM);
                }
                return;
            }
        } else {
            flash__rs_cmd_free(rs, c);
        }
        rs->stats.sentinel_errors++; /* down, an unknown name, garbage: the next sentinel */
        rs->cur = (rs->cur + 1) % rs->nsent;
        if (++rs->tries < rs->nsent) flash__rs_ask(rs);
        else flash__rs_not_yet(rs, true);
        return;
    }
    /* ROLE: ["master", offset, replicas] */
    if (flash__rr_next(&r, &top) && top.kind == FLASH_REDIS_ARRAY && top.integer >= 1 && flash__rr_next(&r, &a) &&
        flash__rr_is(&a, "master")) {
        flash__rs_cmd_free(rs, c);
        rs->resolved = true;
        rs->resolving = false;
        rs->stats.resolutions++;
        flash__rs_release(rs);
        return;
    }
    flash__rs_cmd_free(rs, c);
    rs->stats.not_master++; /* a failover under way, or the sentinels lag */
    flash__pipe_close(&rs->master->pipe);
    flash__rs_not_yet(rs, false);
}

/* Ask the current sentinel for the primary. */
static void flash__rs_ask(flash__rs *rs) {
    const char *argv[3];
    argv[0] = "SENTINEL";
    argv[1] = "get-master-addr-by-name";
    argv[2] = rs->name;
    if (!flash__rs_send(rs, rs->sentinels[rs->cur], 3, argv)) {
        rs->resolving = false;
        flash__rs_fail_waiting(rs, FLASH_ENOMEM);
    }
}

static void flash__rs_post_done(void *arg) {
    flash_cache_op *op = (flash_cache_op *)arg;
    op->priv[3] = NULL;
    op->done(op);
}

static void flash__rs_submit(void *self, flash_loop loop, flash_cache_op *op) {
    flash__rs *rs = (flash__rs *)self;
    int64_t now;
    if (!rs || !op) return;
    op->priv[2] = op->priv[3] = NULL;
    /* An idle connection the server closed counts as closed: re-resolve. */
    flash__pipe_check_idle(&rs->master->pipe);
    if (rs->resolved && rs->master->pipe.state != FLASH__PIPE_CLOSED) {
        flash__redis_submit(rs->master, loop, op);
        return;
    }
    rs->resolved = false;
    now = flash__pipe_now();
    if (rs->destroying || (!rs->resolving && now < rs->down_until)) { /* no sentinel answered lately */
        size_t i;
        int code = rs->destroying ? FLASH_ECANCELED : FLASH_EBACKEND;
        op->status = rs->destroying ? code : FLASH_OK;
        op->round_trips = 0;
        for (i = 0; op->items && i < op->count; i++) {
            int st = flash__pipe_key_status(op->items[i].key, op->items[i].key_len);
            op->items[i].status = st ? st : code;
        }
        if (rs->destroying) return;
        op->priv[0] = op->priv[1] = NULL;
        op->priv[3] = &rs->down_until; /* marks "posted" */
        flash_loop_post(rs->loop, &op->tick, flash__rs_post_done, op);
        return;
    }
    op->status = FLASH_OK;
    op->round_trips = 0;
    op->priv[0] = op->priv[1] = NULL;
    op->priv[3] = &rs->wait_first; /* marks "waiting" */
    if (rs->wait_last) rs->wait_last->priv[2] = op;
    else rs->wait_first = op;
    rs->wait_last = op;
    if (rs->resolving) return;
    rs->resolving = true;
    rs->tries = 0;
    rs->deadline = now + rs->timeout_ms;
    flash__rs_ask(rs);
}

static void flash__rs_cancel(void *self, flash_cache_op *op) {
    flash__rs *rs = (flash__rs *)self;
    if (!rs || !op) return;
    if (op->priv[3] == &rs->down_until) {
        flash_loop_unpost(rs->loop, &op->tick);
    } else if (op->priv[3] == &rs->wait_first) {
        flash_cache_op *p = rs->wait_first, *prev = NULL;
        while (p && p != op) {
            prev = p;
            p = (flash_cache_op *)p->priv[2];
        }
        if (p) {
            if (prev) prev->priv[2] = p->priv[2];
            else rs->wait_first = (flash_cache_op *)p->priv[2];
            if (rs->wait_last == p) rs->wait_last = prev;
        }
    } else {
        flash__redis_cancel(rs->master, op);
    }
    op->priv[2] = op->priv[3] = NULL;
}

static size_t flash__rs_max_value(void *self) { return self ? ((flash__rs *)self)->master->max_value : 0; }

static void flash__rs_destroy(void *self) {
    flash__rs *rs = (flash__rs *)self;
    size_t i;
    if (!rs) return;
    rs->destroying = true;
    if (rs->timer) rs->loop.vt->cancel(rs->loop.native, rs->timer);
    rs->timer = NULL;
    if (rs->cmd) { /* forget it: its node drops the reply */
        flash__redis_cancel(rs->cmd->to, &rs->cmd->op);
        flash__rs_cmd_free(rs, rs->cmd);
        rs->cmd = NULL;
    }
    flash__rs_fail_waiting(rs, FLASH_ECANCELED);
    if (rs->master) flash__redis_destroy(rs->master);
    for (i = 0; i < rs->nsent; i++)
        if (rs->sentinels[i]) flash__redis_destroy(rs->sentinels[i]);
    if (rs->sentinels) rs->alloc.free(rs->sentinels, rs->alloc.user_data);
    if (rs->name) rs->alloc.free(rs->name, rs->alloc.user_data);
    rs->alloc.free(rs, rs->alloc.user_data);
}

static const flash_cache_vtable flash__rs_vt = {
    "redis-sentinel", flash__rs_submit, flash__rs_cancel, flash__rs_max_value, flash__rs_destroy, 0,
};

FLASH_API flash_cache flash_redis_sentinel_create(const flash_redis_sentinel_desc *desc, int *error) {
    flash_cache none = {NULL, NULL}, out;
    flash_allocator al;
    flash_redis_desc d;
    flash__rs *rs;
    size_t i;
    int err = FLASH_EINVAL;
    if (error) *error = FLASH_OK;
    if (!desc || !flash__pipe_loop_ok(&desc->loop) || !desc->sentinels || !desc->sentinel_count ||
        desc->sentinel_count > 64 || !desc->master_name || !desc->master_name[0] || strlen(desc->master_name) > 255) {
        if (error) *error = FLASH_EINVAL;
        return none;
    }
    al = flash__pipe_allocator(desc->allocator);
    rs = (flash__rs *)al.alloc(sizeof *rs, al.user_data);
    if (!rs) {
        if (error) *error = FLASH_ENOMEM;
        return none;
    }
    memset(rs, 0, sizeof *rs);
    rs->alloc = al;
    rs->loop = desc->loop;
    rs->timeout_ms = desc->timeout_ms ? desc->timeout_ms : 1000;
    rs->retry_interval_ms = desc->retry_interval_ms ? desc->retry_interval_ms : 1000;
    rs->name = (char *)al.alloc(strlen(desc->master_name) + 1, al.user_data);
    rs->sentinels = (flash__redis **)al.alloc(desc->sentinel_count * sizeof *rs->sentinels, al.user_data);
    if (!rs->name || !rs->sentinels) {
        err = FLASH_ENOMEM;
        goto fail;
    }
    memcpy(rs->name, desc->master_name, strlen(desc->master_name) + 1);
    memset(rs->sentinels, 0, desc->sentinel_count * sizeof *rs->sentinels);
    memset(&d, 0, sizeof d);
    d.loop = desc->loop;
    d.connect_timeout_ms = desc->connect_timeout_ms;
    d.timeout_ms = desc->timeout_ms;
    d.retry_interval_ms = desc->retry_interval_ms;
    d.max_value = desc->max_value;
    d.allocator = al;
    rs->nsent = desc->sentinel_count;
    for (i = 0; i < desc->sentinel_count; i++) {
        d.host = desc->sentinels[i].host;
        d.port = desc->sentinels[i].port ? desc->sentinels[i].port : 26379;
        rs->sentinels[i] = flash__redis_make(&d, false, true, &err);
        if (!rs->sentinels[i]) goto fail;
    }
    /* The primary's connection: its address comes from the sentinels
       (127.0.0.1 until then, never used before). */
    d.host = "127.0.0.1";
    d.port = 6379;
    d.username = desc->username;
    d.password = desc->password;
    d.db = desc->db;
    rs->master = flash__redis_make(&d, false, false, &err);
    if (!rs->master) goto fail;
    out.vt = &flash__rs_vt;
    out.self = rs;
    return out;
fail:
    if (error) *error = err;
    flash__rs_destroy(rs);
    return none;
}

FLASH_API int flash_redis_sentinel_stats_get(flash_cache cache, flash_redis_sentinel_stats *out) {
    const flash__rs *rs = (const flash__rs *)cache.self;
    if (cache.vt != &flash__rs_vt || !rs || !out) return FLASH_EINVAL;
    *out = rs->stats;
    memcpy(out->master_host, rs->host, sizeof out->master_host);
    out->master_port = rs->port;
    flash__rc_add_stats(&out->master, rs->master);
    return FLASH_OK;
}

#endif /* FLASH_REDIS_CLUSTER_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */
