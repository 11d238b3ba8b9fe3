/* flash.h — a consistent, batched model cache for C services.

   A C port of django-flash's asyncio + DataLoader support: model queries
   (get, filter, named cache classes' resolve; each with _or_none / _or_404;
   sync and async) are memoised per request and batched, so everything asked
   in one tick of the event loop leaves as one network call.

   USAGE
     Copy flash.h (and the adapter headers you need from backends/) into your
     tree. In exactly one .c file:

         #define FLASH_IMPLEMENTATION
         #include "flash.h"

     Every other file includes flash.h without the define.

   COMPILE-TIME OPTIONS (define before including the implementation)
     FLASH_API            storage class of public functions (default: extern)
     FLASH_ASSERT(c)      internal invariant checks (default: assert(c))
     FLASH_NO_THREADS     leave out flash_thread_ctx() and its pthread use

   LAYERS (sections of this file, bottom to top; each calls only those below)
     1. config, errors, allocator, logger
     2. context and arena            flash_ctx_create / flash_ctx_reset
     3. promises                     flash_then, flash_gather, flash_gather_settled
     4. event-loop vtable            flash_wait, flash_run
     5. loader                       DataLoader semantics over byte keys
     6. cache backend vtable         multi-key get/set/add/cas/delete/incr

   Everything a request allocates lives in its context's arena and is released
   by flash_ctx_reset(): users never free a result. Errors are negative ints
   (FLASH_E*) with flash_strerror() and an optional message per promise.

   LICENSE: MIT, see the end of this file.
*/
#ifndef FLASH_H
#define FLASH_H

/* The implementation uses POSIX (clock_gettime, pthread, poll): ask for it
   when this header is the first include of the implementing file. */
#if defined(FLASH_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#define FLASH_VERSION_MAJOR 0
#define FLASH_VERSION_MINOR 1
#define FLASH_VERSION_PATCH 0

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef FLASH_API
#define FLASH_API extern
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FLASH__PRINTF(f, a) __attribute__((format(printf, f, a)))
#define FLASH__UNUSED __attribute__((unused))
#else
#define FLASH__PRINTF(f, a)
#define FLASH__UNUSED
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ==== 1. config, errors, allocator, logger =============================== */

/* Error codes: every failure is one of these negative numbers. */
enum {
    FLASH_OK = 0,
    FLASH_ENOTFOUND = -1,  /* no such row: Django's DoesNotExist */
    FLASH_E404 = -2,       /* no such row, asked through an _or_404 form */
    FLASH_EINVAL = -3,     /* invalid argument (NULL, empty key, bad arity) */
    FLASH_ENOMEM = -4,     /* out of memory */
    FLASH_EBACKEND = -5,   /* cache backend failed (down, refused, I/O error) */
    FLASH_ETIMEDOUT = -6,  /* an operation took longer than its timeout */
    FLASH_ESOURCE = -7,    /* the database source failed */
    FLASH_ETOOLARGE = -8,  /* key or value over a limit */
    FLASH_ECANCELED = -9,  /* the context was reset or destroyed first */
    FLASH_EBATCH = -10,    /* a batch function broke its contract */
    FLASH_EPROTO = -11,    /* malformed reply or corrupt cached value */
    FLASH_EMULTIPLE = -12, /* a get matched several rows: MultipleObjectsReturned */
    FLASH_ESTATE = -13,    /* not valid now (settled twice, attached twice) */
    FLASH_ENOTSTORED = -14,/* add/cas lost a race: the key was there/changed */
    FLASH_EIDLE = -15,     /* flash_wait: nothing left that could settle it */
    FLASH_EUNSUPPORTED = -16 /* the loop or backend cannot do this */
};
FLASH_API const char *flash_strerror(int code);

typedef struct flash_allocator {
    void *(*alloc)(size_t size, void *user_data); /* default: malloc */
    void (*free)(void *ptr, void *user_data);     /* default: free */
    void *user_data;
} flash_allocator;

enum { FLASH_LOG_ERROR = 0, FLASH_LOG_WARN = 1, FLASH_LOG_INFO = 2, FLASH_LOG_DEBUG = 3 };
typedef struct flash_logger {
    /* default: silent. flash_log_stderr prints to stderr. */
    void (*func)(int level, const char *message, void *user_data);
    void *user_data;
} flash_logger;
FLASH_API void flash_log_stderr(int level, const char *message, void *user_data);

typedef struct flash_ctx flash_ctx;
typedef struct flash_loop_vtable flash_loop_vtable;
typedef struct flash_cache_vtable flash_cache_vtable;

/* A loop is a vtable over a native loop pointer; copy it freely. */
typedef struct flash_loop {
    const flash_loop_vtable *vt;
    void *native; /* flash_poll *, uv_loop_t *, struct ev_loop *, struct event_base * */
} flash_loop;

/* A cache backend instance: a vtable and its state (see layer 6). */
typedef struct flash_cache {
    const flash_cache_vtable *vt;
    void *self;
} flash_cache;

/* Context description. Zero-initialise; every zero field means its default. */
typedef struct flash_desc {
    size_t arena_block;   /* default: 64 KiB, first arena block */
    size_t arena_retain;  /* default: 1 MiB, arena bytes kept across resets */
    uint32_t max_batch;   /* default: 1000, keys per model-cache batch */
    flash_cache cache;    /* default: none (model queries go to sources) */
    const char *key_prefix;       /* default: "flash" */
    uint32_t lag_window_ms;       /* default: 300, no fills this soon after an invalidation */
    uint32_t stale_marker_ttl_s;  /* default: 5, lifetime of an invalidation marker */
    bool fail_on_cache_error;     /* default: false, fall back to the source */
    bool log_fill_errors;         /* default: false */
    int64_t (*clock_ms)(void *user_data); /* default: CLOCK_REALTIME in ms; tests inject */
    void *clock_user_data;
    void *user_data;              /* flash_ctx_user_data() */
    flash_allocator allocator;
    flash_logger logger;
} flash_desc;

/* Counters kept per context (cumulative; flash_ctx_stats_clear zeroes). */
typedef struct flash_stats {
    uint64_t loads;            /* flash_load calls (all loaders) */
    uint64_t memo_hits;        /* loads answered by the request memo */
    uint64_t batches;          /* batch function calls */
    uint64_t batch_keys;       /* keys handed to batch functions */
    uint64_t cache_round_trips;/* backend get-many operations issued */
    uint64_t cache_keys;       /* keys asked of the backend */
    uint64_t cache_hits;       /* valid values found in the backend */
    uint64_t cache_misses;     /* absent, stale or old-version values */
    uint64_t cache_errors;     /* keys the backend failed on */
    uint64_t source_calls;     /* batched source fetches */
    uint64_t source_keys;      /* keys asked of sources */
    uint64_t source_rows;      /* rows sources returned */
    uint64_t fills;            /* values written back after a miss */
    uint64_t fills_skipped;    /* fills not written (too large, lag window) */
    uint64_t writes;           /* other backend write operations issued */
    uint64_t invalidations;    /* keys invalidated */
} flash_stats;

/* ==== 2. context and arena ================================================ */

FLASH_API flash_ctx *flash_ctx_create(const flash_desc *desc); /* NULL desc: defaults */
FLASH_API void flash_ctx_destroy(flash_ctx *ctx);
/* Release everything the current request allocated and clear every memo:
   the C form of DataLoadersFactory.reset(). Promises, loaders and results of
   the request become invalid. Safe inside a callback: work still running for
   the old request is cancelled and its memory kept until it unwinds. */
FLASH_API void flash_ctx_reset(flash_ctx *ctx);
FLASH_API void *flash_ctx_user_data(const flash_ctx *ctx);
FLASH_API const flash_desc *flash_ctx_desc(const flash_ctx *ctx); /* defaults filled in */
FLASH_API flash_stats flash_ctx_stats(const flash_ctx *ctx);
FLASH_API void flash_ctx_stats_clear(flash_ctx *ctx);
FLASH_API int64_t flash_ctx_now_ms(const flash_ctx *ctx);
FLASH_API void flash_ctx_log(flash_ctx *ctx, int level, const char *fmt, ...) FLASH__PRINTF(3, 4);

/* Arena: valid until the next flash_ctx_reset. NULL only when out of memory. */
FLASH_API void *flash_alloc(flash_ctx *ctx, size_t size);   /* 16-byte aligned */
FLASH_API void *flash_calloc(flash_ctx *ctx, size_t count, size_t size);
FLASH_API char *flash_strdup(flash_ctx *ctx, const char *s);
FLASH_API void *flash_memdup(flash_ctx *ctx, const void *p, size_t n);
FLASH_API char *flash_sprintf(flash_ctx *ctx, const char *fmt, ...) FLASH__PRINTF(2, 3);

#ifndef FLASH_NO_THREADS
/* This thread's own context, created with desc on first use and destroyed at
   thread exit (the per-thread DataLoadersFactory of the seed). */
FLASH_API flash_ctx *flash_thread_ctx(const flash_desc *desc);
FLASH_API void flash_thread_ctx_destroy(void);
#endif

/* ==== 3. promises ========================================================== */

typedef struct flash_promise flash_promise;
typedef enum flash_state { FLASH_PENDING = 0, FLASH_FULFILLED = 1, FLASH_REJECTED = 2 } flash_state;

/* Promises live in the context's arena. Functions that make one return NULL
   only when out of memory; every function taking a promise accepts NULL and
   answers FLASH_EINVAL for it. */
FLASH_API flash_promise *flash_promise_new(flash_ctx *ctx);
FLASH_API flash_promise *flash_fulfilled(flash_ctx *ctx, void *value);
FLASH_API flash_promise *flash_rejected(flash_ctx *ctx, int code, const char *message);
/* Settle a pending promise. FLASH_ESTATE if it was already settled.
   The message (NULL: flash_strerror(code)) is copied. */
FLASH_API int flash_resolve(flash_ctx *ctx, flash_promise *p, void *value);
FLASH_API int flash_reject(flash_ctx *ctx, flash_promise *p, int code, const char *message);
FLASH_API int flash_rejectf(flash_ctx *ctx, flash_promise *p, int code, const char *fmt, ...)
    FLASH__PRINTF(4, 5);

FLASH_API flash_state flash_promise_state(const flash_promise *p);
FLASH_API void *flash_promise_value(const flash_promise *p);        /* NULL unless fulfilled */
FLASH_API int flash_promise_error(const flash_promise *p);          /* 0 unless rejected */
FLASH_API const char *flash_promise_message(const flash_promise *p);/* "" unless rejected */

/* Callbacks run from the context's queue, never inside flash_resolve, in the
   order they were added; one added to a settled promise runs on the next
   drain. A callback may create, chain, gather or reset freely. */
typedef void (*flash_settle_fn)(flash_ctx *ctx, flash_promise *p, void *arg);
FLASH_API int flash_on_settle(flash_ctx *ctx, flash_promise *p, flash_settle_fn fn, void *arg);

/* Chaining. fn returns the promise the result follows (flash_fulfilled(),
   flash_rejected(), or any other); NULL counts as FLASH_ENOMEM. A rejection
   passes flash_then untouched; a fulfilment passes flash_catch untouched. */
typedef flash_promise *(*flash_then_fn)(flash_ctx *ctx, void *value, void *arg);
typedef flash_promise *(*flash_catch_fn)(flash_ctx *ctx, int code, const char *message, void *arg);
FLASH_API flash_promise *flash_then(flash_ctx *ctx, flash_promise *p, flash_then_fn fn, void *arg);
FLASH_API flash_promise *flash_catch(flash_ctx *ctx, flash_promise *p, flash_catch_fn fn, void *arg);

/* asyncio.gather: fulfils with a void *[n] of the values in order, or rejects
   with the first rejection (in time); the others keep running. */
FLASH_API flash_promise *flash_gather(flash_ctx *ctx, size_t n, flash_promise *const *promises);
/* asyncio.gather(return_exceptions=True): fulfils with a flash_settled[n]. */
typedef struct flash_settled {
    flash_state state;   /* FLASH_FULFILLED or FLASH_REJECTED */
    int error;           /* 0 or a FLASH_E* code */
    void *value;         /* the value when fulfilled */
    const char *message; /* "" or the rejection message */
} flash_settled;
FLASH_API flash_promise *flash_gather_settled(flash_ctx *ctx, size_t n, flash_promise *const *promises);

/* ==== 4. event loop ========================================================= */

enum { FLASH_IO_READ = 1, FLASH_IO_WRITE = 2 };
typedef void (*flash_loop_fn)(void *arg);
typedef void (*flash_io_fn)(void *arg, int events);

/* What flash needs from an event loop. Handles are made and freed by the
   adapter: a handle is valid until cancel/io_stop, or until a timer or defer
   has fired. Callbacks may start and stop any handle, their own included. */
struct flash_loop_vtable {
    const char *name;
    /* Run fn(arg) once at the end of this loop iteration, after its I/O. */
    void *(*defer)(void *native, flash_loop_fn fn, void *arg);
    /* Run fn(arg) once after ms milliseconds. */
    void *(*timer)(void *native, uint32_t ms, flash_loop_fn fn, void *arg);
    /* Cancel a defer or timer that has not fired. */
    void (*cancel)(void *native, void *handle);
    /* Watch fd for FLASH_IO_* events; io_set changes them (0 pauses) and is
       idempotent. Errors and hang-ups are reported as READ|WRITE. */
    void *(*io_start)(void *native, int fd, int events, flash_io_fn fn, void *arg);
    int (*io_set)(void *native, void *handle, int events);
    void (*io_stop)(void *native, void *handle);
    /* One iteration; may_block: wait for an event. Returns > 0 while handles
       remain, 0 when the loop has nothing left to wait for, < 0 on error. */
    int (*run_once)(void *native, bool may_block);
};

/* Attach a loop (adapters wrap this as flash_<loop>_attach(ctx, native)).
   FLASH_ESTATE if the context already has one. Without an attached loop a
   context uses an internal queue that runs deferred work only: enough for
   loaders, the memory backend and synchronous sources, not for sockets. */
FLASH_API int flash_ctx_attach_loop(flash_ctx *ctx, flash_loop loop);
FLASH_API flash_loop flash_ctx_loop(const flash_ctx *ctx);

/* Drive the loop until p settles: the sync API over the async one. Returns
   0 and stores the value, or the rejection code. FLASH_EIDLE when nothing
   could ever settle p; FLASH_ECANCELED when the context was reset meanwhile. */
FLASH_API int flash_wait(flash_ctx *ctx, flash_promise *p, void **value);
/* run_in_async_loop: reset the context, p = fn(ctx, arg), drive the loop until
   p and every batch and write it started are done. The value stays valid
   until the next reset. FLASH_ESTATE when called from inside a callback. */
typedef flash_promise *(*flash_run_fn)(flash_ctx *ctx, void *arg);
FLASH_API int flash_run(flash_ctx *ctx, flash_run_fn fn, void *arg, void **value);
/* Run every ready callback and dispatch open batches now. */
FLASH_API void flash_drain(flash_ctx *ctx);
/* True while the context has callbacks, open batches or work in flight. */
FLASH_API bool flash_ctx_busy(const flash_ctx *ctx);

/* ==== 5. loader ============================================================= */

typedef struct flash_loader flash_loader;
typedef struct flash_batch flash_batch;

/* Called once per batch with the unique keys in first-asked order. Settle
   each key (now or later) with flash_batch_resolve/_reject, all at once with
   flash_batch_complete, or fail the whole batch with flash_batch_fail. */
typedef void (*flash_batch_fn)(flash_ctx *ctx, flash_batch *batch, void *user_data);
/* Custom memo key: write the memo key for key into out (cap bytes) and return
   its length; when that exceeds cap you are called again with room. */
typedef size_t (*flash_key_fn)(const void *key, size_t len, void *out, size_t cap, void *user_data);
/* Custom schedule: called when a batch opens; dispatch it later with
   flash_loader_dispatch (e.g. from a timer). */
typedef void (*flash_schedule_fn)(flash_ctx *ctx, flash_loader *loader, void *user_data);
/* Called for each batch still in flight when the context is destroyed; after
   it returns the batch must not be touched. */
typedef void (*flash_cancel_fn)(flash_ctx *ctx, flash_batch *batch, void *user_data);

typedef struct flash_loader_desc {
    const char *name;          /* default: "loader", used in messages */
    flash_batch_fn batch;      /* required */
    void *user_data;           /* handed to every callback below */
    uint32_t max_batch;        /* default: 0, unlimited; larger batches split */
    bool no_batch;             /* default: false; true: one key per batch */
    bool no_memo;              /* default: false; true: no memo across batches
                                  (keys are still unique within one batch) */
    bool memo_errors;          /* default: false; failed keys are forgotten */
    uint32_t max_memo;         /* default: 0, unbounded; else oldest evicted */
    flash_key_fn key_fn;       /* default: the key bytes themselves */
    flash_schedule_fn schedule;/* default: dispatch at the end of the tick */
    flash_cancel_fn cancel;    /* default: none */
} flash_loader_desc;

/* A loader lives in the context until the next reset. flash_loader_for gives
   the same loader for the same desc pointer (DataLoadersFactory.get_loader_for). */
FLASH_API flash_loader *flash_loader_create(flash_ctx *ctx, const flash_loader_desc *desc);
FLASH_API flash_loader *flash_loader_for(flash_ctx *ctx, const flash_loader_desc *desc);
FLASH_API flash_ctx *flash_loader_ctx(const flash_loader *loader);

/* Load by key bytes; the same key gives the same promise while memoised.
   payload is handed to the batch function with the key (first load wins). */
FLASH_API flash_promise *flash_load(flash_loader *l, const void *key, size_t len);
FLASH_API flash_promise *flash_load_str(flash_loader *l, const char *key);
FLASH_API flash_promise *flash_load_with(flash_loader *l, const void *key, size_t len, void *payload);
/* gather over n loads. */
FLASH_API flash_promise *flash_load_many(flash_loader *l, size_t n, const void *const *keys,
                                         const size_t *lens);
FLASH_API int flash_prime(flash_loader *l, const void *key, size_t len, void *value);
FLASH_API int flash_clear(flash_loader *l, const void *key, size_t len);
FLASH_API void flash_clear_all(flash_loader *l);
/* Dispatch the open batch now (for custom schedules). */
FLASH_API int flash_loader_dispatch(flash_loader *l);

FLASH_API flash_ctx *flash_batch_ctx(const flash_batch *b);
FLASH_API size_t flash_batch_size(const flash_batch *b);
FLASH_API const void *flash_batch_key(const flash_batch *b, size_t i, size_t *len);
FLASH_API void *flash_batch_payload(const flash_batch *b, size_t i);
FLASH_API flash_promise *flash_batch_promise(const flash_batch *b, size_t i);
/* FLASH_EBATCH when i is out of range or the key was already settled;
   FLASH_ECANCELED when the batch's context was reset meanwhile. */
FLASH_API int flash_batch_resolve(flash_batch *b, size_t i, void *value);
FLASH_API int flash_batch_reject(flash_batch *b, size_t i, int code, const char *message);
typedef struct flash_result {
    int error;           /* 0: fulfilled with value; else rejected */
    void *value;
    const char *message; /* optional */
} flash_result;
/* One result per key; a count that does not match rejects every key with
   FLASH_EBATCH (and returns FLASH_EBATCH). */
FLASH_API int flash_batch_complete(flash_batch *b, size_t n, const flash_result *results);
/* Reject every unsettled key with code (a batch-level failure). */
FLASH_API int flash_batch_fail(flash_batch *b, int code, const char *message);
/* Done: keys left unsettled reject with FLASH_EBATCH. A batch whose keys are
   all settled ends by itself. */
FLASH_API int flash_batch_end(flash_batch *b);

/* ==== 6. cache backend ====================================================== */

/* A cache backend carries out multi-key operations asynchronously: one
   operation per batch, never one per key. Keys are at most 250 bytes with no
   space or control byte (memcached's rule); flash hashes longer ones. */
typedef enum flash_cache_opcode {
    FLASH_CACHE_GET = 1, /* out: value, flags, cas; status FLASH_ENOTFOUND on a miss */
    FLASH_CACHE_SET,     /* store unconditionally */
    FLASH_CACHE_ADD,     /* store only when absent, else FLASH_ENOTSTORED */
    FLASH_CACHE_CAS,     /* store only when cas still matches: FLASH_ENOTSTORED
                            when it changed, FLASH_ENOTFOUND when absent */
    FLASH_CACHE_DELETE,  /* FLASH_ENOTFOUND when absent */
    FLASH_CACHE_INCR     /* number += delta; absent: create with `initial`
                            when `create`, else FLASH_ENOTFOUND */
} flash_cache_opcode;

typedef struct flash_cache_item {
    const char *key;
    size_t key_len;
    const void *value;  /* stores: in. GET: out, valid until done() returns */
    size_t value_len;
    uint32_t flags;     /* client flags: stores in, GET out */
    uint32_t ttl_s;     /* stores and INCR-create: seconds, 0 = no expiry */
    uint64_t cas;       /* GET: out (token). CAS: in */
    uint64_t number;    /* INCR: in = delta, out = the new value */
    uint64_t initial;   /* INCR: the value an absent key is created with */
    bool create;        /* INCR: create an absent key */
    int status;         /* out: FLASH_OK, FLASH_ENOTFOUND, FLASH_ENOTSTORED,
                           FLASH_EINVAL (bad key), FLASH_ETOOLARGE, or the
                           error of the server that holds the key */
} flash_cache_item;

typedef struct flash_cache_op flash_cache_op;
typedef void (*flash_cache_done_fn)(flash_cache_op *op);
struct flash_cache_op {
    flash_cache_opcode code;
    flash_cache_item *items; /* owned by the caller until done or cancel */
    size_t count;
    bool quiet;              /* statuses not needed: the backend may use
                                noreply / quiet mode; done still called */
    flash_cache_done_fn done;
    void *data;              /* the caller's */
    int status;              /* out: 0, or the error of the whole operation */
    uint32_t round_trips;    /* out: server requests the operation took */
    void *priv[4];           /* the backend's */
};

struct flash_cache_vtable {
    const char *name;
    /* Start op. done(op) is called exactly once, later, never from inside
       submit (unless cancelled first). loop is the submitter's: a backend
       without I/O of its own completes through it on the next tick. */
    void (*submit)(void *self, flash_loop loop, flash_cache_op *op);
    /* Forget op: done is not called and op may be freed once this returns.
       Writes already sent may still take effect. */
    void (*cancel)(void *self, flash_cache_op *op);
    /* Largest value the backend stores, in bytes. */
    size_t (*max_value)(void *self);
    void (*destroy)(void *self);
};

FLASH_API void flash_cache_destroy(flash_cache cache);

#ifdef __cplusplus
} /* extern "C" */
#endif
#endif /* FLASH_H */

/* ========================================================================== */
/* IMPLEMENTATION                                                             */
/* ========================================================================== */
#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_IMPLEMENTED
#define FLASH_IMPLEMENTED

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef FLASH_NO_THREADS
#include <pthread.h>
#endif
#ifndef FLASH_ASSERT
#include <assert.h>
#define FLASH_ASSERT(c) assert(c)
#endif

#define FLASH__ALIGN 16u
#define FLASH__ROUND(n) (((n) + (FLASH__ALIGN - 1)) & ~(size_t)(FLASH__ALIGN - 1))

/* ---- 1. config, errors, allocator, logger -------------------------------- */

FLASH_API const char *flash_strerror(int code) {
    switch (code) {
    case FLASH_OK: return "success";
    case FLASH_ENOTFOUND: return "not found (DoesNotExist)";
    case FLASH_E404: return "not found (404)";
    case FLASH_EINVAL: return "invalid argument";
    case FLASH_ENOMEM: return "out of memory";
    case FLASH_EBACKEND: return "cache backend failure";
    case FLASH_ETIMEDOUT: return "timed out";
    case FLASH_ESOURCE: return "source failure";
    case FLASH_ETOOLARGE: return "too large";
    case FLASH_ECANCELED: return "cancelled";
    case FLASH_EBATCH: return "batch function broke its contract";
    case FLASH_EPROTO: return "protocol error or corrupt value";
    case FLASH_EMULTIPLE: return "multiple rows returned for a get";
    case FLASH_ESTATE: return "invalid state for this operation";
    case FLASH_ENOTSTORED: return "not stored";
    case FLASH_EIDLE: return "nothing left to run could settle this";
    case FLASH_EUNSUPPORTED: return "not supported";
    default: return "unknown error";
    }
}

static void *flash__default_alloc(size_t size, void *ud) { (void)ud; return malloc(size); }
static void flash__default_free(void *p, void *ud) { (void)ud; free(p); }

FLASH_API void flash_log_stderr(int level, const char *message, void *user_data) {
    static const char *const names[] = {"error", "warn", "info", "debug"};
    (void)user_data;
    fprintf(stderr, "flash %s: %s\n", (level >= 0 && level <= 3) ? names[level] : "log", message);
}

static int64_t flash__realtime_ms(void *ud) {
    struct timespec ts;
    (void)ud;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- 2. context and arena ------------------------------------------------ */

typedef struct flash__block {
    struct flash__block *next;
    size_t cap, used;
} flash__block;
#define FLASH__BLOCK_HDR FLASH__ROUND(sizeof(flash__block))

/* Memory of an old request kept alive by work still running for it. */
typedef struct flash__zombie {
    struct flash__zombie *next;
    uint64_t gen;
    size_t holds;
    flash__block *blocks;
} flash__zombie;

typedef struct flash__cb flash__cb;
/* One entry of the ready queue: run p's callbacks, or the single cb. */
typedef struct flash__task {
    flash_promise *p;
    flash__cb *cb;
} flash__task;

typedef struct flash__batch_node flash__batch_node;

struct flash_ctx {
    flash_desc desc;
    flash_stats stats;
    uint64_t gen;            /* bumped by every reset */
    size_t holds;            /* holds on the current generation */
    size_t inflight;         /* dispatched batches and backend ops not done */
    flash__block *blocks;    /* current block first */
    flash__block *spare;     /* retained across resets */
    flash__zombie *zombies;
    flash__task *tasks;      /* ready queue (allocator memory) */
    size_t task_head, task_tail, task_cap;
    flash_batch *open_first, *open_last; /* batches waiting for dispatch */
    flash_loader *loaders;   /* this generation's loaders */
    flash_loop loop;
    bool own_queue_loop;     /* loop is the internal defer-only queue */
    void *drain_handle;      /* deferred drain scheduled on the loop */
    int depth;               /* drains on the stack: new tasks get run */
    int running;             /* flash_wait / flash_run on the stack */
    void *engine;            /* layer 8 state, per generation */
    void *spare_tables[48];  /* recycled memo tables, one per log2 size */
    size_t spare_table_bytes;
    struct flash__qloop *qloop;
};

static void *flash__sys_alloc(const flash_ctx *ctx, size_t n) {
    return ctx->desc.allocator.alloc(n, ctx->desc.allocator.user_data);
}
static void flash__sys_free(const flash_ctx *ctx, void *p) {
    if (p) ctx->desc.allocator.free(p, ctx->desc.allocator.user_data);
}

static void flash__free_blocks(flash_ctx *ctx, flash__block *b) {
    while (b) {
        flash__block *n = b->next;
        flash__sys_free(ctx, b);
        b = n;
    }
}

static void *flash__arena_slow(flash_ctx *ctx, size_t size) {
    flash__block *b, **pp;
    size_t cap;
    /* Large requests get a block of their own behind the current one so the
       current block keeps serving small ones. */
    if (size > ctx->desc.arena_block / 4 && ctx->blocks) {
        b = (flash__block *)flash__sys_alloc(ctx, FLASH__BLOCK_HDR + size);
        if (!b) return NULL;
        b->cap = size;
        b->used = size;
        b->next = ctx->blocks->next;
        ctx->blocks->next = b;
        return (char *)b + FLASH__BLOCK_HDR;
    }
    for (pp = &ctx->spare; *pp; pp = &(*pp)->next) {
        if ((*pp)->cap >= size) {
            b = *pp;
            *pp = b->next;
            goto have_block;
        }
    }
    cap = ctx->desc.arena_block;
    if (ctx->blocks && ctx->blocks->cap * 2 > cap) cap = ctx->blocks->cap * 2;
    if (cap > ((size_t)4 << 20)) cap = (size_t)4 << 20;
    if (cap < size) cap = size;
    b = (flash__block *)flash__sys_alloc(ctx, FLASH__BLOCK_HDR + cap);
    if (!b) return NULL;
    b->cap = cap;
have_block:
    b->used = size;
    b->next = ctx->blocks;
    ctx->blocks = b;
    return (char *)b + FLASH__BLOCK_HDR;
}

static inline void *flash__alloc(flash_ctx *ctx, size_t size) {
    flash__block *b = ctx->blocks;
    size = FLASH__ROUND(size ? size : 1);
    if (b && b->cap - b->used >= size) {
        void *p = (char *)b + FLASH__BLOCK_HDR + b->used;
        b->used += size;
        return p;
    }
    return flash__arena_slow(ctx, size);
}

FLASH_API void *flash_alloc(flash_ctx *ctx, size_t size) { return ctx ? flash__alloc(ctx, size) : NULL; }

FLASH_API void *flash_calloc(flash_ctx *ctx, size_t count, size_t size) {
    void *p;
    if (size && count > SIZE_MAX / size) return NULL;
    p = flash_alloc(ctx, count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

FLASH_API void *flash_memdup(flash_ctx *ctx, const void *src, size_t n) {
    void *p = flash_alloc(ctx, n + 1);
    if (!p) return NULL;
    if (n) memcpy(p, src, n);
    ((char *)p)[n] = 0; /* so byte strings can also be used as C strings */
    return p;
}

FLASH_API char *flash_strdup(flash_ctx *ctx, const char *s) {
    return s ? (char *)flash_memdup(ctx, s, strlen(s)) : NULL;
}

static char *flash__vsprintf(flash_ctx *ctx, const char *fmt, va_list ap) {
    char small[256];
    va_list ap2;
    int n;
    char *out;
    va_copy(ap2, ap);
    n = vsnprintf(small, sizeof small, fmt, ap);
    if (n < 0) {
        va_end(ap2);
        return NULL;
    }
    out = (char *)flash_alloc(ctx, (size_t)n + 1);
    if (out) {
        if ((size_t)n < sizeof small) memcpy(out, small, (size_t)n + 1);
        else vsnprintf(out, (size_t)n + 1, fmt, ap2);
    }
    va_end(ap2);
    return out;
}

FLASH_API char *flash_sprintf(flash_ctx *ctx, const char *fmt, ...) {
    va_list ap;
    char *s;
    va_start(ap, fmt);
    s = flash__vsprintf(ctx, fmt, ap);
    va_end(ap);
    return s;
}

FLASH_API void flash_ctx_log(flash_ctx *ctx, int level, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    if (!ctx || !ctx->desc.logger.func) return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    ctx->desc.logger.func(level, buf, ctx->desc.logger.user_data);
}

/* Holds keep a generation's memory alive while work for it is running. */
static uint64_t flash__hold(flash_ctx *ctx) {
    ctx->holds++;
    return ctx->gen;
}

static void flash__unhold(flash_ctx *ctx, uint64_t gen) {
    flash__zombie **pp;
    if (gen == ctx->gen) {
        FLASH_ASSERT(ctx->holds > 0);
        ctx->holds--;
        return;
    }
    for (pp = &ctx->zombies; *pp; pp = &(*pp)->next) {
        if ((*pp)->gen == gen) {
            flash__zombie *z = *pp;
            if (--z->holds == 0) {
                *pp = z->next;
                flash__free_blocks(ctx, z->blocks);
                flash__sys_free(ctx, z);
            }
            return;
        }
    }
}

static void flash__engine_reset(flash_ctx *ctx); /* layer 8 */
static void flash__loaders_release(flash_ctx *ctx);
static void flash__cancel_drain(flash_ctx *ctx);

/* Hand the current blocks to the spare list (within the retain budget) or,
   when work of this generation still runs, to a zombie record. */
static void flash__arena_release(flash_ctx *ctx) {
    flash__block *b = ctx->blocks, *next;
    size_t kept = 0;
    for (next = ctx->spare; next; next = next->next) kept += next->cap;
    if (ctx->holds) {
        flash__zombie *z = (flash__zombie *)flash__sys_alloc(ctx, sizeof *z);
        if (z) {
            z->gen = ctx->gen;
            z->holds = ctx->holds;
            z->blocks = b;
            z->next = ctx->zombies;
            ctx->zombies = z;
            ctx->blocks = NULL;
            ctx->holds = 0;
            return;
        }
        /* Out of memory for the record: keep the blocks in use (leak-free,
           they are freed at destroy) rather than free memory still in use. */
        while (b && b->next) b = b->next;
        if (b) {
            b->next = ctx->spare;
            ctx->spare = ctx->blocks;
        }
        ctx->blocks = NULL;
        ctx->holds = 0;
        return;
    }
    while (b) {
        next = b->next;
        if (kept + b->cap <= ctx->desc.arena_retain) {
            kept += b->cap;
            b->used = 0;
            b->next = ctx->spare;
            ctx->spare = b;
        } else {
            flash__sys_free(ctx, b);
        }
        b = next;
    }
    ctx->blocks = NULL;
}

/* The internal defer-only loop used until an adapter is attached. */
typedef struct flash__qitem {
    struct flash__qitem *next;
    flash_loop_fn fn;
    void *arg;
    bool canceled;
} flash__qitem;
typedef struct flash__qloop {
    const flash_allocator *alloc;
    flash__qitem *first, *last;
} flash__qloop;

static void *flash__q_defer(void *native, flash_loop_fn fn, void *arg) {
    flash__qloop *q = (flash__qloop *)native;
    flash__qitem *it = (flash__qitem *)q->alloc->alloc(sizeof *it, q->alloc->user_data);
    if (!it) return NULL;
    it->next = NULL;
    it->fn = fn;
    it->arg = arg;
    it->canceled = false;
    if (q->last) q->last->next = it;
    else q->first = it;
    q->last = it;
    return it;
}
static void *flash__q_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    (void)native; (void)ms; (void)fn; (void)arg;
    return NULL;
}
static void flash__q_cancel(void *native, void *handle) {
    (void)native;
    if (handle) ((flash__qitem *)handle)->canceled = true;
}
static void *flash__q_io_start(void *native, int fd, int ev, flash_io_fn fn, void *arg) {
    (void)native; (void)fd; (void)ev; (void)fn; (void)arg;
    return NULL;
}
static int flash__q_io_set(void *native, void *h, int ev) {
    (void)native; (void)h; (void)ev;
    return FLASH_EUNSUPPORTED;
}
static void flash__q_io_stop(void *native, void *h) { (void)native; (void)h; }
static int flash__q_run_once(void *native, bool may_block) {
    flash__qloop *q = (flash__qloop *)native;
    flash__qitem *it = q->first, *stop = q->last;
    (void)may_block;
    if (!it) return 0;
    q->first = q->last = NULL; /* work deferred from here runs next round */
    for (;;) {
        flash__qitem *next = it->next;
        bool last = it == stop;
        if (!it->canceled) it->fn(it->arg);
        q->alloc->free(it, q->alloc->user_data);
        if (last) break;
        it = next;
    }
    return q->first != NULL;
}
static const flash_loop_vtable flash__qloop_vt = {
    "queue", flash__q_defer, flash__q_timer, flash__q_cancel,
    flash__q_io_start, flash__q_io_set, flash__q_io_stop, flash__q_run_once,
};

FLASH_API flash_ctx *flash_ctx_create(const flash_desc *desc) {
    flash_desc d;
    flash_ctx *ctx;
    if (desc) d = *desc;
    else memset(&d, 0, sizeof d);
    if (!d.allocator.alloc || !d.allocator.free) {
        d.allocator.alloc = flash__default_alloc;
        d.allocator.free = flash__default_free;
        d.allocator.user_data = NULL;
    }
    if (!d.arena_block) d.arena_block = (size_t)64 << 10;
    if (d.arena_block < 1024) d.arena_block = 1024;
    if (!d.arena_retain) d.arena_retain = (size_t)1 << 20;
    if (!d.max_batch) d.max_batch = 1000;
    if (!d.key_prefix) d.key_prefix = "flash";
    if (!d.lag_window_ms) d.lag_window_ms = 300;
    if (!d.stale_marker_ttl_s) d.stale_marker_ttl_s = 5;
    if (!d.clock_ms) d.clock_ms = flash__realtime_ms;
    ctx = (flash_ctx *)d.allocator.alloc(sizeof *ctx, d.allocator.user_data);
    if (!ctx) return NULL;
    memset(ctx, 0, sizeof *ctx);
    ctx->desc = d;
    ctx->qloop = (flash__qloop *)flash__sys_alloc(ctx, sizeof *ctx->qloop);
    if (!ctx->qloop) {
        d.allocator.free(ctx, d.allocator.user_data);
        return NULL;
    }
    ctx->qloop->alloc = &ctx->desc.allocator;
    ctx->qloop->first = ctx->qloop->last = NULL;
    ctx->loop.vt = &flash__qloop_vt;
    ctx->loop.native = ctx->qloop;
    ctx->own_queue_loop = true;
    return ctx;
}

static void flash__loaders_cancel(flash_ctx *ctx);

FLASH_API void flash_ctx_destroy(flash_ctx *ctx) {
    flash__zombie *z;
    if (!ctx) return;
    flash__loaders_cancel(ctx);
    flash__engine_reset(ctx);
    flash__loaders_release(ctx);
    flash__cancel_drain(ctx);
    if (ctx->own_queue_loop) {
        /* Nothing of ours may run after this; free queued items unrun. */
        flash__qitem *it = ctx->qloop->first;
        while (it) {
            flash__qitem *n = it->next;
            flash__sys_free(ctx, it);
            it = n;
        }
    }
    flash__free_blocks(ctx, ctx->blocks);
    flash__free_blocks(ctx, ctx->spare);
    while ((z = ctx->zombies) != NULL) {
        ctx->zombies = z->next;
        flash__free_blocks(ctx, z->blocks);
        flash__sys_free(ctx, z);
    }
    flash__sys_free(ctx, ctx->tasks);
    {
        size_t i;
        for (i = 0; i < sizeof ctx->spare_tables / sizeof ctx->spare_tables[0]; i++)
            flash__sys_free(ctx, ctx->spare_tables[i]);
    }
    flash__sys_free(ctx, ctx->qloop);
    ctx->desc.allocator.free(ctx, ctx->desc.allocator.user_data);
}

FLASH_API void flash_ctx_reset(flash_ctx *ctx) {
    if (!ctx) return;
    flash__engine_reset(ctx);
    flash__loaders_cancel(ctx);
    flash__loaders_release(ctx);
    ctx->task_head = ctx->task_tail = 0;
    ctx->open_first = ctx->open_last = NULL;
    ctx->inflight = 0;
    flash__arena_release(ctx);
    ctx->gen++;
}

FLASH_API void *flash_ctx_user_data(const flash_ctx *ctx) { return ctx ? ctx->desc.user_data : NULL; }
FLASH_API const flash_desc *flash_ctx_desc(const flash_ctx *ctx) { return ctx ? &ctx->desc : NULL; }
FLASH_API flash_stats flash_ctx_stats(const flash_ctx *ctx) {
    flash_stats s;
    if (ctx) return ctx->stats;
    memset(&s, 0, sizeof s);
    return s;
}
FLASH_API void flash_ctx_stats_clear(flash_ctx *ctx) {
    if (ctx) memset(&ctx->stats, 0, sizeof ctx->stats);
}
FLASH_API int64_t flash_ctx_now_ms(const flash_ctx *ctx) {
    return ctx ? ctx->desc.clock_ms(ctx->desc.clock_user_data) : flash__realtime_ms(NULL);
}

#ifndef FLASH_NO_THREADS
static pthread_key_t flash__thread_key;
static pthread_once_t flash__thread_once = PTHREAD_ONCE_INIT;
static void flash__thread_dtor(void *p) { flash_ctx_destroy((flash_ctx *)p); }
static void flash__thread_init(void) { pthread_key_create(&flash__thread_key, flash__thread_dtor); }
FLASH_API flash_ctx *flash_thread_ctx(const flash_desc *desc) {
    flash_ctx *ctx;
    pthread_once(&flash__thread_once, flash__thread_init);
    ctx = (flash_ctx *)pthread_getspecific(flash__thread_key);
    if (!ctx) {
        ctx = flash_ctx_create(desc);
        if (ctx && pthread_setspecific(flash__thread_key, ctx) != 0) {
            flash_ctx_destroy(ctx);
            ctx = NULL;
        }
    }
    return ctx;
}
FLASH_API void flash_thread_ctx_destroy(void) {
    flash_ctx *ctx;
    pthread_once(&flash__thread_once, flash__thread_init);
    ctx = (flash_ctx *)pthread_getspecific(flash__thread_key);
    if (ctx) {
        pthread_setspecific(flash__thread_key, NULL);
        flash_ctx_destroy(ctx);
    }
}
#endif

/* ---- 3. promises --------------------------------------------------------- */

typedef void (*flash__cbfn)(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t idx);
struct flash__cb {
    union {
        flash_settle_fn pub;
        flash__cbfn priv;
    } fn;
    void *arg;
    uint32_t idx;
    uint16_t is_priv;
    uint16_t is_inline; /* internal bookkeeping (gather, follow): may run at
                           settle time, it only touches its own state */
    flash__cb *next;
};

struct flash_promise {
    uint8_t state;
    uint8_t has_more;   /* more callbacks beyond the inline one */
    uint8_t is_entry;   /* a loader memo entry (layer 5) */
    uint8_t pad;
    int32_t error;
    union {
        void *value;
        const char *message;
    } u;
    flash__cb first;    /* inline slot: most promises have one waiter */
};

static const char flash__empty[] = "";

static void flash__task_push(flash_ctx *ctx, flash_promise *p, flash__cb *cb) {
    if (ctx->task_tail == ctx->task_cap) {
        size_t cap = ctx->task_cap ? ctx->task_cap * 2 : 256;
        flash__task *t = (flash__task *)flash__sys_alloc(ctx, cap * sizeof *t);
        if (!t) {
            /* Cannot queue: run now rather than lose the callback. */
            if (cb) {
                if (cb->is_priv) cb->fn.priv(ctx, p, cb->arg, cb->idx);
                else cb->fn.pub(ctx, p, cb->arg);
            }
            return;
        }
        if (ctx->task_tail - ctx->task_head)
            memcpy(t, ctx->tasks + ctx->task_head, (ctx->task_tail - ctx->task_head) * sizeof *t);
        ctx->task_tail -= ctx->task_head;
        ctx->task_head = 0;
        flash__sys_free(ctx, ctx->tasks);
        ctx->tasks = t;
        ctx->task_cap = cap;
    }
    ctx->tasks[ctx->task_tail].p = p;
    ctx->tasks[ctx->task_tail].cb = cb;
    ctx->task_tail++;
}

static void flash__schedule_drain(flash_ctx *ctx);

static void flash__settle(flash_ctx *ctx, flash_promise *p) {
    if (!p->first.fn.pub && !p->has_more) return;
    if (p->first.is_inline && !p->has_more) {
        /* The common case of one waiter that is a gather or a follower:
           no trip through the queue. */
        flash__cb cb = p->first;
        p->first.fn.pub = NULL;
        cb.fn.priv(ctx, p, cb.arg, cb.idx);
        return;
    }
    flash__task_push(ctx, p, NULL);
    if (!ctx->depth) flash__schedule_drain(ctx);
}

static void flash__call_cb(flash_ctx *ctx, flash_promise *p, flash__cb *cb) {
    if (cb->is_priv) cb->fn.priv(ctx, p, cb->arg, cb->idx);
    else cb->fn.pub(ctx, p, cb->arg);
}

/* Run p's callbacks in the order they were added. The extra ones are kept
   newest-first, so reverse that list once here. */
static void flash__run_callbacks(flash_ctx *ctx, flash_promise *p) {
    flash__cb first = p->first, *more = NULL, *rev = NULL;
    uint64_t gen = ctx->gen;
    if (p->has_more) more = p->first.next;
    while (more) {
        flash__cb *n = more->next;
        more->next = rev;
        rev = more;
        more = n;
    }
    p->first.fn.pub = NULL;
    p->has_more = 0;
    if (first.fn.pub) flash__call_cb(ctx, p, &first);
    while (rev && gen == ctx->gen) {
        flash__cb *n = rev->next;
        flash__call_cb(ctx, p, rev);
        rev = n;
    }
}

static int flash__add_cb(flash_ctx *ctx, flash_promise *p, flash_settle_fn pub, flash__cbfn priv,
                         void *arg, uint32_t idx, bool is_inline) {
    flash__cb *cb;
    if (p->state != FLASH_PENDING) {
        cb = (flash__cb *)flash__alloc(ctx, sizeof *cb);
        if (!cb) return FLASH_ENOMEM;
    } else if (!p->first.fn.pub && !p->has_more) {
        cb = &p->first;
    } else {
        cb = (flash__cb *)flash__alloc(ctx, sizeof *cb);
        if (!cb) return FLASH_ENOMEM;
        cb->next = p->has_more ? p->first.next : NULL;
    }
    if (priv) cb->fn.priv = priv;
    else cb->fn.pub = pub;
    cb->is_priv = priv != NULL;
    cb->is_inline = is_inline;
    cb->arg = arg;
    cb->idx = idx;
    if (p->state != FLASH_PENDING) {
        flash__task_push(ctx, p, cb);
        if (!ctx->depth) flash__schedule_drain(ctx);
    } else if (cb != &p->first) {
        p->first.next = cb;
        p->has_more = 1;
    }
    return FLASH_OK;
}

static inline void flash__promise_init(flash_promise *p) {
    p->state = FLASH_PENDING;
    p->has_more = 0;
    p->is_entry = 0;
    p->pad = 0;
    p->error = 0;
    p->u.value = NULL;
    p->first.fn.pub = NULL;
    p->first.is_inline = 0;
    p->first.next = NULL;
}

FLASH_API flash_promise *flash_promise_new(flash_ctx *ctx) {
    flash_promise *p = ctx ? (flash_promise *)flash__alloc(ctx, sizeof *p) : NULL;
    if (p) flash__promise_init(p);
    return p;
}

static void flash__fulfil(flash_ctx *ctx, flash_promise *p, void *value) {
    p->state = FLASH_FULFILLED;
    p->u.value = value;
    flash__settle(ctx, p);
}

/* message must already live as long as the promise (arena or static). */
static void flash__fail(flash_ctx *ctx, flash_promise *p, int code, const char *message) {
    p->state = FLASH_REJECTED;
    p->error = code ? code : FLASH_EINVAL;
    p->u.message = message ? message : flash_strerror(p->error);
    flash__settle(ctx, p);
}

static const char *flash__msgdup(flash_ctx *ctx, int code, const char *message) {
    const char *m = message ? flash_strdup(ctx, message) : NULL;
    return m ? m : flash_strerror(code);
}

FLASH_API flash_promise *flash_fulfilled(flash_ctx *ctx, void *value) {
    flash_promise *p = flash_promise_new(ctx);
    if (p) {
        p->state = FLASH_FULFILLED;
        p->u.value = value;
    }
    return p;
}

FLASH_API flash_promise *flash_rejected(flash_ctx *ctx, int code, const char *message) {
    flash_promise *p = flash_promise_new(ctx);
    if (p) {
        p->state = FLASH_REJECTED;
        p->error = code ? code : FLASH_EINVAL;
        p->u.message = flash__msgdup(ctx, p->error, message);
    }
    return p;
}

FLASH_API int flash_resolve(flash_ctx *ctx, flash_promise *p, void *value) {
    if (!ctx || !p) return FLASH_EINVAL;
    if (p->state != FLASH_PENDING) return FLASH_ESTATE;
    flash__fulfil(ctx, p, value);
    return FLASH_OK;
}

FLASH_API int flash_reject(flash_ctx *ctx, flash_promise *p, int code, const char *message) {
    if (!ctx || !p) return FLASH_EINVAL;
    if (p->state != FLASH_PENDING) return FLASH_ESTATE;
    flash__fail(ctx, p, code, flash__msgdup(ctx, code ? code : FLASH_EINVAL, message));
    return FLASH_OK;
}

FLASH_API int flash_rejectf(flash_ctx *ctx, flash_promise *p, int code, const char *fmt, ...) {
    va_list ap;
    char *m;
    if (!ctx || !p || !fmt) return FLASH_EINVAL;
    if (p->state != FLASH_PENDING) return FLASH_ESTATE;
    va_start(ap, fmt);
    m = flash__vsprintf(ctx, fmt, ap);
    va_end(ap);
    flash__fail(ctx, p, code, m);
    return FLASH_OK;
}

FLASH_API flash_state flash_promise_state(const flash_promise *p) {
    return p ? (flash_state)p->state : FLASH_REJECTED;
}
FLASH_API void *flash_promise_value(const flash_promise *p) {
    return (p && p->state == FLASH_FULFILLED) ? p->u.value : NULL;
}
FLASH_API int flash_promise_error(const flash_promise *p) {
    if (!p) return FLASH_EINVAL;
    return p->state == FLASH_REJECTED ? p->error : 0;
}
FLASH_API const char *flash_promise_message(const flash_promise *p) {
    if (!p) return "NULL promise (out of memory when it was made?)";
    return p->state == FLASH_REJECTED ? p->u.message : flash__empty;
}

FLASH_API int flash_on_settle(flash_ctx *ctx, flash_promise *p, flash_settle_fn fn, void *arg) {
    if (!ctx || !p || !fn) return FLASH_EINVAL;
    return flash__add_cb(ctx, p, fn, NULL, arg, 0, false);
}

/* Make `to` settle as `from` did. */
static void flash__copy_outcome(flash_ctx *ctx, flash_promise *from, flash_promise *to) {
    if (to->state != FLASH_PENDING) return;
    if (from->state == FLASH_FULFILLED) flash__fulfil(ctx, to, from->u.value);
    else flash__fail(ctx, to, from->error, from->u.message);
}

static void flash__follow_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t idx) {
    (void)idx;
    flash__copy_outcome(ctx, p, (flash_promise *)arg);
}

/* `to` adopts the outcome of `from` (what a then/catch handler returned). */
static void flash__follow(flash_ctx *ctx, flash_promise *from, flash_promise *to) {
    if (!from) {
        flash__fail(ctx, to, FLASH_ENOMEM, "callback returned no promise (out of memory?)");
    } else if (from == to) {
        flash__fail(ctx, to, FLASH_EINVAL, "a promise cannot follow itself");
    } else if (from->state != FLASH_PENDING) {
        flash__copy_outcome(ctx, from, to);
    } else if (flash__add_cb(ctx, from, NULL, flash__follow_cb, to, 0, true) != FLASH_OK) {
        flash__fail(ctx, to, FLASH_ENOMEM, NULL);
    }
}

typedef struct flash__chain {
    flash_promise out;
    union {
        flash_then_fn then;
        flash_catch_fn katch;
    } fn;
    void *arg;
} flash__chain;

static void flash__then_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t is_catch) {
    flash__chain *c = (flash__chain *)arg;
    if (p->state == FLASH_FULFILLED && !is_catch)
        flash__follow(ctx, c->fn.then(ctx, p->u.value, c->arg), &c->out);
    else if (p->state == FLASH_REJECTED && is_catch)
        flash__follow(ctx, c->fn.katch(ctx, p->error, p->u.message, c->arg), &c->out);
    else
        flash__copy_outcome(ctx, p, &c->out);
}

static flash_promise *flash__chain_new(flash_ctx *ctx, flash_promise *p, flash_then_fn then,
                                       flash_catch_fn katch, void *arg) {
    flash__chain *c;
    if (!ctx) return NULL;
    if (!p || (!then && !katch)) return flash_rejected(ctx, FLASH_EINVAL, "then/catch: NULL promise or function");
    c = (flash__chain *)flash_alloc(ctx, sizeof *c);
    if (!c) return NULL;
    flash__promise_init(&c->out);
    if (then) c->fn.then = then;
    else c->fn.katch = katch;
    c->arg = arg;
    if (flash__add_cb(ctx, p, NULL, flash__then_cb, c, katch != NULL, false) != FLASH_OK) return NULL;
    return &c->out;
}

FLASH_API flash_promise *flash_then(flash_ctx *ctx, flash_promise *p, flash_then_fn fn, void *arg) {
    return flash__chain_new(ctx, p, fn, NULL, arg);
}
FLASH_API flash_promise *flash_catch(flash_ctx *ctx, flash_promise *p, flash_catch_fn fn, void *arg) {
    return flash__chain_new(ctx, p, NULL, fn, arg);
}

typedef struct flash__gather {
    flash_promise out;
    size_t remaining;
    bool settled_form;
    void **values;           /* gather */
    flash_settled *settled;  /* gather_settled */
} flash__gather;

static void flash__gather_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t i) {
    flash__gather *g = (flash__gather *)arg;
    if (g->settled_form) {
        flash_settled *s = &g->settled[i];
        s->state = (flash_state)p->state;
        s->error = p->state == FLASH_REJECTED ? p->error : 0;
        s->value = p->state == FLASH_FULFILLED ? p->u.value : NULL;
        s->message = p->state == FLASH_REJECTED ? p->u.message : flash__empty;
    } else if (p->state == FLASH_FULFILLED) {
        g->values[i] = p->u.value;
    } else if (g->out.state == FLASH_PENDING) {
        flash__fail(ctx, &g->out, p->error, p->u.message);
    }
    if (--g->remaining == 0 && g->out.state == FLASH_PENDING)
        flash__fulfil(ctx, &g->out, g->settled_form ? (void *)g->settled : (void *)g->values);
}

static flash_promise *flash__gather_new(flash_ctx *ctx, size_t n, flash_promise *const *ps, bool settled_form) {
    flash__gather *g;
    size_t i;
    if (!ctx) return NULL;
    if (n && !ps) return flash_rejected(ctx, FLASH_EINVAL, "gather: NULL promise array");
    if (n > UINT32_MAX) return flash_rejected(ctx, FLASH_EINVAL, "gather: too many promises");
    g = (flash__gather *)flash__alloc(ctx, sizeof *g);
    if (!g) return NULL;
    flash__promise_init(&g->out);
    g->settled_form = settled_form;
    g->remaining = n + 1; /* +1 so nothing completes before every callback is in */
    g->values = NULL;
    g->settled = NULL;
    /* Not zeroed: every slot is written before the array is handed out. */
    if (settled_form) g->settled = (flash_settled *)flash__alloc(ctx, (n ? n : 1) * sizeof *g->settled);
    else g->values = (void **)flash__alloc(ctx, (n ? n : 1) * sizeof *g->values);
    if (!g->values && !g->settled) return NULL;
    for (i = 0; i < n; i++) {
        flash_promise *p = ps[i];
        if (!p) {
            flash_promise stand_in;
            flash__promise_init(&stand_in);
            stand_in.state = FLASH_REJECTED;
            stand_in.error = FLASH_EINVAL;
            stand_in.u.message = flash_promise_message(NULL);
            flash__gather_cb(ctx, &stand_in, g, i);
        } else if (flash__add_cb(ctx, p, NULL, flash__gather_cb, g, (uint32_t)i, true) != FLASH_OK) {
            flash_promise oom;
            flash__promise_init(&oom);
            oom.state = FLASH_REJECTED;
            oom.error = FLASH_ENOMEM;
            oom.u.message = flash_strerror(FLASH_ENOMEM);
            flash__gather_cb(ctx, &oom, g, i);
        }
    }
    if (--g->remaining == 0 && g->out.state == FLASH_PENDING)
        flash__fulfil(ctx, &g->out, settled_form ? (void *)g->settled : (void *)g->values);
    return &g->out;
}

FLASH_API flash_promise *flash_gather(flash_ctx *ctx, size_t n, flash_promise *const *ps) {
    return flash__gather_new(ctx, n, ps, false);
}
FLASH_API flash_promise *flash_gather_settled(flash_ctx *ctx, size_t n, flash_promise *const *ps) {
    return flash__gather_new(ctx, n, ps, true);
}

/* ---- 4. event loop ------------------------------------------------------- */

static void flash__dispatch_open(flash_ctx *ctx);

/* The tick: run ready callbacks until none is left; then dispatch the open
   batches in the order they were opened; repeat while either has work. */
static void flash__drain_impl(flash_ctx *ctx, bool dispatch) {
    uint64_t gen = flash__hold(ctx);
    ctx->depth++;
    for (;;) {
        while (ctx->task_head < ctx->task_tail) {
            flash__task t = ctx->tasks[ctx->task_head++];
            if (t.cb) flash__call_cb(ctx, t.p, t.cb);
            else flash__run_callbacks(ctx, t.p);
        }
        ctx->task_head = ctx->task_tail = 0;
        if (!dispatch || !ctx->open_first) break;
        flash__dispatch_open(ctx);
    }
    ctx->depth--;
    flash__unhold(ctx, gen);
    if (!ctx->depth && ctx->open_first) flash__schedule_drain(ctx);
}

static void flash__deferred_drain(void *arg) {
    flash_ctx *ctx = (flash_ctx *)arg;
    ctx->drain_handle = NULL;
    flash__drain_impl(ctx, true);
}

static void flash__schedule_drain(flash_ctx *ctx) {
    if (ctx->drain_handle) return;
    ctx->drain_handle = ctx->loop.vt->defer(ctx->loop.native, flash__deferred_drain, ctx);
}

static void flash__cancel_drain(flash_ctx *ctx) {
    if (ctx->drain_handle) {
        ctx->loop.vt->cancel(ctx->loop.native, ctx->drain_handle);
        ctx->drain_handle = NULL;
    }
}

FLASH_API void flash_drain(flash_ctx *ctx) {
    if (ctx) flash__drain_impl(ctx, true);
}

/* For code called back from the loop (backend replies, timers): run the
   continuations now, leave batch dispatch to the end of the loop iteration so
   that replies arriving together still form one batch. */
static FLASH__UNUSED void flash__after_callback(flash_ctx *ctx) {
    if (ctx->depth) return;
    flash__drain_impl(ctx, false);
}

FLASH_API int flash_ctx_attach_loop(flash_ctx *ctx, flash_loop loop) {
    if (!ctx || !loop.vt || !loop.vt->defer || !loop.vt->cancel || !loop.vt->run_once) return FLASH_EINVAL;
    if (!ctx->own_queue_loop) return FLASH_ESTATE;
    if (ctx->drain_handle || ctx->qloop->first) return FLASH_ESTATE; /* attach before use */
    ctx->loop = loop;
    ctx->own_queue_loop = false;
    return FLASH_OK;
}

FLASH_API flash_loop flash_ctx_loop(const flash_ctx *ctx) {
    flash_loop none = {NULL, NULL};
    return ctx ? ctx->loop : none;
}

FLASH_API bool flash_ctx_busy(const flash_ctx *ctx) {
    return ctx && (ctx->task_head < ctx->task_tail || ctx->open_first || ctx->inflight);
}

FLASH_API int flash_wait(flash_ctx *ctx, flash_promise *p, void **value) {
    uint64_t gen;
    int rc = FLASH_OK;
    if (value) *value = NULL;
    if (!ctx || !p) return FLASH_EINVAL;
    gen = ctx->gen;
    for (;;) {
        int alive;
        flash__drain_impl(ctx, true);
        if (ctx->gen != gen) return FLASH_ECANCELED;
        if (p->state != FLASH_PENDING) break;
        ctx->running++;
        alive = ctx->loop.vt->run_once(ctx->loop.native, true);
        ctx->running--;
        if (ctx->gen != gen) return FLASH_ECANCELED;
        if (alive < 0) return alive;
        if (alive == 0 && p->state == FLASH_PENDING && !flash_ctx_busy(ctx) && !ctx->drain_handle)
            return FLASH_EIDLE;
    }
    if (p->state == FLASH_FULFILLED) {
        if (value) *value = p->u.value;
    } else {
        rc = p->error;
    }
    return rc;
}

FLASH_API int flash_run(flash_ctx *ctx, flash_run_fn fn, void *arg, void **value) {
    flash_promise *p;
    uint64_t gen;
    int rc;
    if (value) *value = NULL;
    if (!ctx || !fn) return FLASH_EINVAL;
    if (ctx->depth || ctx->running) return FLASH_ESTATE;
    flash_ctx_reset(ctx);
    gen = ctx->gen;
    p = fn(ctx, arg);
    if (!p) return FLASH_ENOMEM;
    rc = flash_wait(ctx, p, value);
    if (rc == FLASH_EIDLE || rc == FLASH_ECANCELED) return rc;
    /* Drive what the request started (fills, writes) to completion. */
    while (ctx->gen == gen && flash_ctx_busy(ctx)) {
        int alive;
        flash__drain_impl(ctx, true);
        if (!flash_ctx_busy(ctx)) break;
        ctx->running++;
        alive = ctx->loop.vt->run_once(ctx->loop.native, true);
        ctx->running--;
        if (alive <= 0 && !ctx->drain_handle && !ctx->task_tail && !ctx->open_first) break;
    }
    return rc;
}

/* ---- 5. loader ----------------------------------------------------------- */

/* A memo entry is the promise handed out for a key, plus the key. */
typedef struct flash__entry {
    flash_promise p;            /* first: entries are promises */
    struct flash__entry *next;  /* next key of the same batch */
    void *payload;
    const char *key;            /* key as first asked */
    const char *mkey;           /* memo key (== key without key_fn) */
    uint64_t hash;
    uint32_t klen, mlen;
    uint8_t in_memo;
} flash__entry;

struct flash_batch {
    flash_batch *next_open;
    flash_loader *loader;
    flash__entry *first, *last; /* while open */
    flash__entry **keys;        /* after dispatch */
    size_t count, unsettled;
    uint64_t gen;
    bool dispatched, ended;
    flash_batch *next_inflight, *prev_inflight;
};

/* A memo slot keeps the hash beside the entry so that probing and growing
   compare integers instead of chasing pointers (cache misses). */
typedef struct flash__slot {
    uint64_t hash; /* 0: empty */
    flash__entry *e;
} flash__slot;

struct flash_loader {
    flash_ctx *ctx;
    const flash_loader_desc *desc_ptr;
    flash_loader_desc desc;
    flash_loader *next;
    flash__slot *slots;        /* open addressing, linear probing */
    size_t cap, count;
    flash__entry **ring;       /* FIFO of memo entries when max_memo is set */
    size_t ring_head, ring_len;
    flash_batch *open;         /* batch accepting keys */
    flash_batch *inflight;     /* dispatched, not ended (for cancel) */
};

/* 64-bit hash of a byte string: 8 bytes a round, one multiply-xorshift
   each; short keys (most keys) take one or two rounds. Never returns 0,
   which marks an empty memo slot. */
static uint64_t flash__hash(const void *data, size_t n) {
    const unsigned char *s = (const unsigned char *)data;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n, k;
    while (n >= 8) {
        memcpy(&k, s, 8);
        h = (h ^ k) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    /* The last 0..7 bytes, without a variable-length copy. */
    if (n >= 4) {
        uint32_t lo, hi;
        memcpy(&lo, s, 4);
        memcpy(&hi, s + n - 4, 4);
        k = (uint64_t)lo | ((uint64_t)hi << 32);
    } else if (n) {
        k = (uint64_t)s[0] | ((uint64_t)s[n / 2] << 8) | ((uint64_t)s[n - 1] << 16);
    } else {
        k = 0;
    }
    h = (h ^ k) * 0x94d049bb133111ebull;
    h ^= h >> 32;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    return h ? h : 1;
}

static flash__slot *flash__memo_find(flash_loader *l, const void *mkey, size_t mlen, uint64_t h) {
    size_t mask = l->cap - 1, i = (size_t)h & mask;
    for (;;) {
        flash__slot *s = &l->slots[i];
        if (!s->hash || (s->hash == h && s->e->mlen == mlen && memcmp(s->e->mkey, mkey, mlen) == 0)) return s;
        i = (i + 1) & mask;
    }
}

/* Memo tables are recycled across resets (the biggest one kept per
   context) so a steady stream of requests stops paying for page faults. */
static flash__slot *flash__table_get(flash_ctx *ctx, size_t cap);
static void flash__table_put(flash_ctx *ctx, flash__slot *t, size_t cap);

static int flash__memo_grow(flash_loader *l) {
    size_t cap = l->cap ? l->cap * 2 : 64, i, mask = cap - 1;
    flash__slot *slots = flash__table_get(l->ctx, cap);
    if (!slots) return FLASH_ENOMEM;
    for (i = 0; i < l->cap; i++) {
        flash__slot *s = &l->slots[i];
        size_t j;
        if (!s->hash) continue;
        for (j = (size_t)s->hash & mask; slots[j].hash; j = (j + 1) & mask) {
        }
        slots[j] = *s;
    }
    flash__table_put(l->ctx, l->slots, l->cap);
    l->slots = slots;
    l->cap = cap;
    return FLASH_OK;
}

/* Backward-shift deletion keeps linear probing tombstone-free. */
static void flash__memo_remove_slot(flash_loader *l, flash__slot *slot) {
    size_t mask = l->cap - 1, i = (size_t)(slot - l->slots), j = i;
    l->slots[i].e->in_memo = 0;
    l->slots[i].hash = 0;
    l->slots[i].e = NULL;
    l->count--;
    for (;;) {
        size_t home;
        j = (j + 1) & mask;
        if (!l->slots[j].hash) return;
        home = (size_t)l->slots[j].hash & mask;
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            l->slots[i] = l->slots[j];
            l->slots[j].hash = 0;
            l->slots[j].e = NULL;
            i = j;
        }
    }
}

static void flash__memo_forget(flash_loader *l, flash__entry *e) {
    flash__slot *slot;
    if (!e->in_memo || !l->cap) return;
    slot = flash__memo_find(l, e->mkey, e->mlen, e->hash);
    if (slot->e == e) flash__memo_remove_slot(l, slot);
}

static int flash__memo_insert(flash_loader *l, flash__slot *slot, flash__entry *e) {
    slot->hash = e->hash;
    slot->e = e;
    e->in_memo = 1;
    l->count++;
    if (l->desc.max_memo) {
        if (l->ring_len == l->desc.max_memo) {
            flash__entry *old = l->ring[l->ring_head];
            l->ring[l->ring_head] = e;
            l->ring_head = (l->ring_head + 1) % l->desc.max_memo;
            flash__memo_forget(l, old);
        } else {
            l->ring[(l->ring_head + l->ring_len++) % l->desc.max_memo] = e;
        }
    }
    return FLASH_OK;
}

static size_t flash__log2(size_t cap) {
    size_t n = 0;
    while (cap > 1) {
        cap >>= 1;
        n++;
    }
    return n;
}

static flash__slot *flash__table_get(flash_ctx *ctx, size_t cap) {
    size_t c = flash__log2(cap);
    flash__slot *t = NULL;
    if (c < sizeof ctx->spare_tables / sizeof ctx->spare_tables[0] && ctx->spare_tables[c]) {
        t = (flash__slot *)ctx->spare_tables[c];
        ctx->spare_tables[c] = NULL;
        ctx->spare_table_bytes -= cap * sizeof *t;
    } else {
        t = (flash__slot *)flash__sys_alloc(ctx, cap * sizeof *t);
        if (!t) return NULL;
    }
    memset(t, 0, cap * sizeof *t);
    return t;
}

/* Keep a table for reuse while the tables kept fit in arena_retain. */
static void flash__table_put(flash_ctx *ctx, flash__slot *t, size_t cap) {
    size_t c = flash__log2(cap);
    if (!t) return;
    if (c < sizeof ctx->spare_tables / sizeof ctx->spare_tables[0] && !ctx->spare_tables[c] &&
        ctx->spare_table_bytes + cap * sizeof *t <= ctx->desc.arena_retain) {
        ctx->spare_tables[c] = t;
        ctx->spare_table_bytes += cap * sizeof *t;
    } else {
        flash__sys_free(ctx, t);
    }
}

static void flash__loaders_release(flash_ctx *ctx) {
    flash_loader *l;
    for (l = ctx->loaders; l; l = l->next) {
        flash__table_put(ctx, l->slots, l->cap);
        flash__sys_free(ctx, l->ring);
        l->slots = NULL;
        l->ring = NULL;
        l->cap = l->count = 0;
    }
    ctx->loaders = NULL;
}

/* Batches in flight when their request ends: a loader with a cancel function
   is told to drop them; the others keep their request's memory alive until
   they end (flash__batch_orphan). */
static void flash__loaders_cancel(flash_ctx *ctx) {
    flash_loader *l;
    for (l = ctx->loaders; l; l = l->next) {
        flash_batch *b = l->inflight;
        if (!l->desc.cancel) continue;
        l->inflight = NULL;
        while (b) {
            flash_batch *next = b->next_inflight;
            b->ended = true;
            ctx->inflight--;
            flash__unhold(ctx, b->gen);
            l->desc.cancel(ctx, b, l->desc.user_data);
            b = next;
        }
    }
}

FLASH_API flash_loader *flash_loader_create(flash_ctx *ctx, const flash_loader_desc *desc) {
    flash_loader *l;
    if (!ctx || !desc || !desc->batch) return NULL;
    l = (flash_loader *)flash_calloc(ctx, 1, sizeof *l);
    if (!l) return NULL;
    l->ctx = ctx;
    l->desc_ptr = desc;
    l->desc = *desc;
    if (!l->desc.name) l->desc.name = "loader";
    if (l->desc.no_batch) l->desc.max_batch = 1;
    if (l->desc.max_memo) {
        l->ring = (flash__entry **)flash__sys_alloc(ctx, l->desc.max_memo * sizeof *l->ring);
        if (!l->ring) return NULL;
    }
    l->next = ctx->loaders;
    ctx->loaders = l;
    return l;
}

FLASH_API flash_loader *flash_loader_for(flash_ctx *ctx, const flash_loader_desc *desc) {
    flash_loader *l;
    if (!ctx || !desc) return NULL;
    for (l = ctx->loaders; l; l = l->next)
        if (l->desc_ptr == desc) return l;
    return flash_loader_create(ctx, desc);
}

FLASH_API flash_ctx *flash_loader_ctx(const flash_loader *l) { return l ? l->ctx : NULL; }

static flash_batch *flash__batch_open(flash_loader *l) {
    flash_ctx *ctx = l->ctx;
    flash_batch *b = (flash_batch *)flash_calloc(ctx, 1, sizeof *b);
    if (!b) return NULL;
    b->loader = l;
    b->gen = ctx->gen;
    l->open = b;
    if (l->desc.schedule) {
        l->desc.schedule(ctx, l, l->desc.user_data);
    } else {
        if (ctx->open_last) ctx->open_last->next_open = b;
        else ctx->open_first = b;
        ctx->open_last = b;
        if (!ctx->depth) flash__schedule_drain(ctx);
    }
    return b;
}

static void flash__batch_finish(flash_batch *b);

static void flash__batch_dispatch(flash_batch *b) {
    flash_loader *l = b->loader;
    flash_ctx *ctx = l->ctx;
    flash__entry *e;
    size_t i = 0;
    if (l->open == b) l->open = NULL;
    b->dispatched = true;
    b->keys = (flash__entry **)flash__alloc(ctx, (b->count ? b->count : 1) * sizeof *b->keys);
    if (!b->keys) {
        for (e = b->first; e; e = e->next) {
            if (l->desc.no_memo || !l->desc.memo_errors) flash__memo_forget(l, e);
            flash__fail(ctx, &e->p, FLASH_ENOMEM, NULL);
        }
        b->ended = true;
        return;
    }
    for (e = b->first; e; e = e->next) {
        b->keys[i++] = e;
        /* Without memo the table only made keys unique within the batch. */
        if (l->desc.no_memo) flash__memo_forget(l, e);
    }
    b->unsettled = b->count;
    b->next_inflight = l->inflight;
    if (l->inflight) l->inflight->prev_inflight = b;
    l->inflight = b;
    ctx->inflight++;
    flash__hold(ctx);
    ctx->stats.batches++;
    ctx->stats.batch_keys += b->count;
    l->desc.batch(ctx, b, l->desc.user_data);
}

static void flash__dispatch_open(flash_ctx *ctx) {
    flash_batch *b = ctx->open_first;
    ctx->open_first = ctx->open_last = NULL;
    while (b) {
        flash_batch *n = b->next_open;
        uint64_t gen = ctx->gen;
        flash__batch_dispatch(b);
        if (ctx->gen != gen) return; /* reset by the batch function */
        b = n;
    }
}

FLASH_API int flash_loader_dispatch(flash_loader *l) {
    flash_batch *b;
    if (!l) return FLASH_EINVAL;
    b = l->open;
    if (!b) return FLASH_OK;
    if (!l->desc.schedule) {
        /* Unlink from the context's open list; it goes now. */
        flash_batch **pp = &l->ctx->open_first, *prev = NULL;
        while (*pp && *pp != b) {
            prev = *pp;
            pp = &(*pp)->next_open;
        }
        if (*pp) {
            *pp = b->next_open;
            if (l->ctx->open_last == b) l->ctx->open_last = prev;
        }
    }
    flash__batch_dispatch(b);
    return FLASH_OK;
}

FLASH_API flash_promise *flash_load_with(flash_loader *l, const void *key, size_t len, void *payload) {
    flash_ctx *ctx;
    flash__entry *e;
    flash__slot *slot = NULL;
    char mbuf[256];
    const void *mkey = key;
    size_t mlen = len;
    uint64_t h;
    if (!l) return NULL;
    ctx = l->ctx;
    ctx->stats.loads++;
    if (!key || !len) return flash_rejected(ctx, FLASH_EINVAL, "load: empty key");
    if (len > UINT32_MAX) return flash_rejected(ctx, FLASH_ETOOLARGE, "load: key too long");
    if (l->desc.key_fn) {
        mlen = l->desc.key_fn(key, len, mbuf, sizeof mbuf, l->desc.user_data);
        if (mlen > sizeof mbuf) {
            char *big = (char *)flash_alloc(ctx, mlen);
            if (!big) return NULL;
            mlen = l->desc.key_fn(key, len, big, mlen, l->desc.user_data);
            mkey = big;
        } else {
            mkey = mbuf;
        }
        if (!mlen) return flash_rejected(ctx, FLASH_EINVAL, "load: key function gave an empty key");
    }
    h = flash__hash(mkey, mlen);
    if (l->cap) {
        slot = flash__memo_find(l, mkey, mlen, h);
        if (slot->hash) {
            ctx->stats.memo_hits++;
            return &slot->e->p;
        }
    }
    if ((l->count + 1) * 2 > l->cap) {
        if (flash__memo_grow(l) != FLASH_OK) return NULL;
        slot = flash__memo_find(l, mkey, mlen, h);
    }
    e = (flash__entry *)flash__alloc(ctx, sizeof *e + len + 1 + (l->desc.key_fn ? mlen : 0));
    if (!e) return NULL;
    flash__promise_init(&e->p);
    e->p.is_entry = 1;
    e->next = NULL;
    e->payload = payload;
    e->key = (char *)(e + 1);
    memcpy((char *)e->key, key, len);
    ((char *)e->key)[len] = 0;
    e->klen = (uint32_t)len;
    if (l->desc.key_fn) {
        e->mkey = e->key + len + 1;
        memcpy((char *)e->mkey, mkey, mlen);
    } else {
        e->mkey = e->key;
    }
    e->mlen = (uint32_t)mlen;
    e->hash = h;
    e->in_memo = 0;
    if (!l->open || (l->desc.max_batch && l->open->count >= l->desc.max_batch)) {
        if (!flash__batch_open(l)) return NULL;
    }
    if (l->open->last) l->open->last->next = e;
    else l->open->first = e;
    l->open->last = e;
    l->open->count++;
    flash__memo_insert(l, slot, e);
    return &e->p;
}

FLASH_API flash_promise *flash_load(flash_loader *l, const void *key, size_t len) {
    return flash_load_with(l, key, len, NULL);
}
FLASH_API flash_promise *flash_load_str(flash_loader *l, const char *key) {
    return flash_load_with(l, key, key ? strlen(key) : 0, NULL);
}

FLASH_API flash_promise *flash_load_many(flash_loader *l, size_t n, const void *const *keys, const size_t *lens) {
    flash_promise **ps;
    size_t i;
    if (!l) return NULL;
    if (n && (!keys || !lens)) return flash_rejected(l->ctx, FLASH_EINVAL, "load_many: NULL keys");
    ps = (flash_promise **)flash_alloc(l->ctx, (n ? n : 1) * sizeof *ps);
    if (!ps) return NULL;
    for (i = 0; i < n; i++) ps[i] = flash_load(l, keys[i], lens[i]);
    return flash_gather(l->ctx, n, ps);
}

FLASH_API int flash_prime(flash_loader *l, const void *key, size_t len, void *value) {
    flash__entry *e;
    flash__slot *slot;
    flash_ctx *ctx;
    char mbuf[256];
    const void *mkey = key;
    size_t mlen = len;
    uint64_t h;
    if (!l || !key || !len) return FLASH_EINVAL;
    ctx = l->ctx;
    if (l->desc.key_fn) {
        mlen = l->desc.key_fn(key, len, mbuf, sizeof mbuf, l->desc.user_data);
        if (mlen > sizeof mbuf) return FLASH_ETOOLARGE;
        mkey = mbuf;
    }
    h = flash__hash(mkey, mlen);
    if (l->cap && flash__memo_find(l, mkey, mlen, h)->hash) return FLASH_OK; /* prime never overwrites */
    if ((l->count + 1) * 2 > l->cap && flash__memo_grow(l) != FLASH_OK) return FLASH_ENOMEM;
    slot = flash__memo_find(l, mkey, mlen, h);
    e = (flash__entry *)flash_calloc(ctx, 1, sizeof *e + mlen + 1);
    if (!e) return FLASH_ENOMEM;
    e->p.is_entry = 1;
    e->p.state = FLASH_FULFILLED;
    e->p.u.value = value;
    e->key = e->mkey = (char *)(e + 1);
    memcpy((char *)e->mkey, mkey, mlen);
    e->klen = e->mlen = (uint32_t)mlen;
    e->hash = h;
    return flash__memo_insert(l, slot, e);
}

FLASH_API int flash_clear(flash_loader *l, const void *key, size_t len) {
    char mbuf[256];
    const void *mkey = key;
    size_t mlen = len;
    flash__slot *slot;
    if (!l || !key || !len) return FLASH_EINVAL;
    if (l->desc.key_fn) {
        mlen = l->desc.key_fn(key, len, mbuf, sizeof mbuf, l->desc.user_data);
        if (mlen > sizeof mbuf) return FLASH_ETOOLARGE;
        mkey = mbuf;
    }
    if (!l->cap) return FLASH_OK;
    slot = flash__memo_find(l, mkey, mlen, flash__hash(mkey, mlen));
    if (slot->hash) flash__memo_remove_slot(l, slot);
    return FLASH_OK;
}

FLASH_API void flash_clear_all(flash_loader *l) {
    size_t i;
    if (!l || !l->cap) return;
    for (i = 0; i < l->cap; i++)
        if (l->slots[i].hash) l->slots[i].e->in_memo = 0;
    memset(l->slots, 0, l->cap * sizeof *l->slots);
    l->count = 0;
    l->ring_len = l->ring_head = 0;
}

FLASH_API flash_ctx *flash_batch_ctx(const flash_batch *b) { return b ? b->loader->ctx : NULL; }
FLASH_API size_t flash_batch_size(const flash_batch *b) { return b ? b->count : 0; }
FLASH_API const void *flash_batch_key(const flash_batch *b, size_t i, size_t *len) {
    if (!b || !b->keys || i >= b->count) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = b->keys[i]->klen;
    return b->keys[i]->key;
}
FLASH_API void *flash_batch_payload(const flash_batch *b, size_t i) {
    return (b && b->keys && i < b->count) ? b->keys[i]->payload : NULL;
}
FLASH_API flash_promise *flash_batch_promise(const flash_batch *b, size_t i) {
    return (b && b->keys && i < b->count) ? &b->keys[i]->p : NULL;
}

static void flash__batch_finish(flash_batch *b) {
    flash_loader *l = b->loader;
    flash_ctx *ctx = l->ctx;
    b->ended = true;
    if (b->gen != ctx->gen) {
        flash__unhold(ctx, b->gen);
        return;
    }
    if (b->prev_inflight) b->prev_inflight->next_inflight = b->next_inflight;
    else l->inflight = b->next_inflight;
    if (b->next_inflight) b->next_inflight->prev_inflight = b->prev_inflight;
    ctx->inflight--;
    flash__unhold(ctx, b->gen);
}

/* A batch of a request that was reset while it ran (its loader had no cancel
   function): its memory is kept until it ends; settling only counts down. */
static int flash__batch_orphan(flash_batch *b, size_t i, bool terminal) {
    if (b->ended) return FLASH_ECANCELED;
    if (terminal) {
        flash__batch_finish(b);
    } else if (i < b->count && b->keys[i]->p.state == FLASH_PENDING) {
        b->keys[i]->p.state = FLASH_REJECTED;
        b->keys[i]->p.error = FLASH_ECANCELED;
        b->keys[i]->p.u.message = flash_strerror(FLASH_ECANCELED);
        if (--b->unsettled == 0) flash__batch_finish(b);
    }
    return FLASH_ECANCELED;
}

/* Common checks of the batch-function side. */
static int flash__batch_check(flash_batch *b, size_t i) {
    if (!b) return FLASH_EINVAL;
    if (b->gen != b->loader->ctx->gen) return flash__batch_orphan(b, i, false);
    if (!b->dispatched || b->ended || i >= b->count || b->keys[i]->p.state != FLASH_PENDING)
        return FLASH_EBATCH;
    return FLASH_OK;
}

static void flash__batch_settled_one(flash_batch *b, flash__entry *e) {
    flash_ctx *ctx = b->loader->ctx;
    (void)ctx;
    if (e->p.state == FLASH_REJECTED && !b->loader->desc.memo_errors) flash__memo_forget(b->loader, e);
    if (--b->unsettled == 0) flash__batch_finish(b);
}

FLASH_API int flash_batch_resolve(flash_batch *b, size_t i, void *value) {
    int rc = flash__batch_check(b, i);
    flash__entry *e;
    if (rc) return rc;
    e = b->keys[i];
    e->p.state = FLASH_FULFILLED;
    e->p.u.value = value;
    flash__settle(b->loader->ctx, &e->p);
    flash__batch_settled_one(b, e);
    return FLASH_OK;
}

FLASH_API int flash_batch_reject(flash_batch *b, size_t i, int code, const char *message) {
    int rc = flash__batch_check(b, i);
    flash__entry *e;
    flash_ctx *ctx;
    if (rc) return rc;
    ctx = b->loader->ctx;
    e = b->keys[i];
    flash__fail(ctx, &e->p, code ? code : FLASH_EINVAL, flash__msgdup(ctx, code ? code : FLASH_EINVAL, message));
    flash__batch_settled_one(b, e);
    return FLASH_OK;
}

/* Reject every unsettled key of b with one message, then finish it. */
static void flash__batch_reject_rest(flash_batch *b, int code, const char *message) {
    flash_ctx *ctx = b->loader->ctx;
    size_t i;
    for (i = 0; i < b->count && !b->ended; i++) {
        flash__entry *e = b->keys[i];
        if (e->p.state != FLASH_PENDING) continue;
        flash__fail(ctx, &e->p, code, message);
        flash__batch_settled_one(b, e);
    }
    if (!b->ended) flash__batch_finish(b);
}

FLASH_API int flash_batch_fail(flash_batch *b, int code, const char *message) {
    flash_ctx *ctx;
    if (!b) return FLASH_EINVAL;
    ctx = b->loader->ctx;
    if (b->gen != ctx->gen) return flash__batch_orphan(b, 0, true);
    if (!b->dispatched || b->ended) return FLASH_EBATCH;
    if (!code) code = FLASH_EINVAL;
    flash__batch_reject_rest(b, code, flash__msgdup(ctx, code, message));
    return FLASH_OK;
}

FLASH_API int flash_batch_end(flash_batch *b) {
    flash_ctx *ctx;
    if (!b) return FLASH_EINVAL;
    ctx = b->loader->ctx;
    if (b->gen != ctx->gen) return flash__batch_orphan(b, 0, true);
    if (!b->dispatched) return FLASH_EBATCH;
    if (b->ended) return FLASH_OK;
    flash__batch_reject_rest(b, FLASH_EBATCH,
                             flash_sprintf(ctx, "%s: batch function ended without settling this key", b->loader->desc.name));
    return FLASH_OK;
}

FLASH_API int flash_batch_complete(flash_batch *b, size_t n, const flash_result *results) {
    flash_ctx *ctx;
    size_t i;
    if (!b) return FLASH_EINVAL;
    ctx = b->loader->ctx;
    if (b->gen != ctx->gen) return flash__batch_orphan(b, 0, true);
    if (!b->dispatched || b->ended) return FLASH_EBATCH;
    if (n != b->count || (n && !results)) {
        flash__batch_reject_rest(b, FLASH_EBATCH,
                                 flash_sprintf(ctx, "%s: batch function returned %zu results for %zu keys",
                                               b->loader->desc.name, results ? n : (size_t)0, b->count));
        return FLASH_EBATCH;
    }
    for (i = 0; i < n && !b->ended; i++) {
        if (b->keys[i]->p.state != FLASH_PENDING) continue;
        if (results[i].error) flash_batch_reject(b, i, results[i].error, results[i].message);
        else flash_batch_resolve(b, i, results[i].value);
    }
    return FLASH_OK;
}

/* ---- 6. cache backend ----------------------------------------------------- */

FLASH_API void flash_cache_destroy(flash_cache cache) {
    if (cache.vt && cache.vt->destroy) cache.vt->destroy(cache.self);
}

/* ---- layer 8 hook (filled in by the model cache) ------------------------- */
static void flash__engine_reset(flash_ctx *ctx) { (void)ctx; }

#endif /* FLASH_IMPLEMENTED */
#endif /* FLASH_IMPLEMENTATION */

/*
MIT License

Copyright (c) 2026 the flash authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
*/
