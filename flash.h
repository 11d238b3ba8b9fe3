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
     FLASH_NO_TASKS       leave out tasks (see layer 3b, also for
                          FLASH_TASK_UCONTEXT and bringing your own switch)
     FLASH_DEFAULT_TIMEOUT_S  lifetime of cached values of every class and
                          model that sets no timeout_s (default: one week;
                          django-flash's FLASH_DEFAULT_TIMEOUT)

   LAYERS (sections of this file, bottom to top; each calls only those below)
     1. config, errors, allocator, logger
     2. context and arena            flash_ctx_create / flash_ctx_reset
     3. promises                     flash_then, flash_gather, flash_gather_settled
    3b. tasks                        flash_spawn, flash_await
     4. event-loop vtable            flash_wait, flash_run, the adapter kit
     5. loader                       DataLoader semantics over byte keys
     6. cache backend vtable         multi-key get/set/add/cas/delete/incr
     7. model registry               FLASH_MODEL, key sets, codec, cache keys
     8. query engine                 memo -> one get-many -> one fetch per class
     9. invalidation                 stale markers, versions, allowtime

   Everything a request allocates lives in its context's arena and is released
   by flash_ctx_reset(): users never free a result. Errors are negative ints
   (FLASH_E*) with flash_strerror() and an optional message per promise.

   LICENSE: MIT, see the end of this file.
*/
#ifndef FLASH_H
#define FLASH_H

/* Feature-test macros. The implementation needs POSIX.1-2008 (clock_gettime,
   pthread) and, for task stacks, MAP_ANONYMOUS / MAP_STACK / madvise. When
   this header is the first include of the implementing file and the file
   chose no macro,
   ask for _DEFAULT_SOURCE: on glibc and musl that is POSIX.1-2008 plus the
   BSD and System V names a -std=c11 build otherwise hides, i.e. exactly what
   a gnu11 build sees (so it never narrows what the rest of the file sees, as
   _POSIX_C_SOURCE alone would); elsewhere it is ignored and the defaults
   expose everything. A file that includes a system header before flash.h
   must choose itself (e.g. -D_DEFAULT_SOURCE or #define _GNU_SOURCE).
   Adapter headers whose library needs POSIX types define FLASH__WANT_POSIX. */
#if (defined(FLASH_IMPLEMENTATION) || defined(FLASH__WANT_POSIX)) && !defined(_POSIX_C_SOURCE) && \
    !defined(_XOPEN_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE) && !defined(_BSD_SOURCE) && \
    !defined(_ALL_SOURCE)
#define _DEFAULT_SOURCE 1
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

/* A growing NUL-terminated string in malloc'd memory, for adapters that
   build text outliving a request (SQL statements, protocol lines, replies).
   Zero-initialise; oom sticks once an allocation failed. */
typedef struct flash_strbuf {
    char *data; /* NULL until something was put */
    size_t len, cap;
    bool oom;
} flash_strbuf;
FLASH_API void flash_strbuf_put(flash_strbuf *b, const void *s, size_t n);
FLASH_API void flash_strbuf_puts(flash_strbuf *b, const char *s);
FLASH_API void flash_strbuf_printf(flash_strbuf *b, const char *fmt, ...) FLASH__PRINTF(2, 3);
FLASH_API void flash_strbuf_free(flash_strbuf *b);

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
    uint32_t refresh_lock_s;      /* default: 30, longest a refresh lock is held
                                     (FLASH_WRITE_LOCK_TIMEOUT): bounds a reader
                                     that took it and died */
    uint32_t task_stack;          /* default: 64 KiB (256 KiB under ASan/TSan), usable
                                     bytes of each task's stack, rounded up to pages */
    uint32_t max_tasks;           /* default: 10000, tasks alive at once; past it
                                     flash_spawn rejects with FLASH_ENOMEM */
    uint32_t task_retain;         /* default: 1024, task stacks kept mapped across
                                     resets; a reset unmaps whole free slabs beyond */
    bool fail_on_cache_error;     /* default: false, fall back to the source */
    bool log_fill_errors;         /* default: false */
    int64_t (*clock_ms)(void *user_data); /* default: CLOCK_REALTIME in ms; tests inject */
    void *clock_user_data;
    void *user_data;              /* flash_ctx_user_data() */
    flash_allocator allocator;
    flash_logger logger;
    /* Leases (a backend with FLASH_CACHE_CAP_LEASES; see "Hot keys" in the
       README): */
    uint32_t lease_s;             /* default: 0, no leases; the stub lifetime
                                     of classes whose opts.lease_s is 0 */
    uint32_t lease_wait_ms;       /* default: 500, how long a reader that lost
                                     a lease waits for the winner's fill
                                     (re-reading with backoff) before it reads
                                     the source itself */
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
    uint64_t tasks;            /* tasks spawned */
    uint64_t task_switches;    /* switches into a task (spawn, resume) */
    uint64_t task_stacks;      /* task stacks mapped (pooled: flat in steady state) */
    uint64_t lease_wins;       /* misses whose lease this context won: it read the source */
    uint64_t lease_waits;      /* re-reads of keys whose lease another reader held */
    uint64_t lease_timeouts;   /* keys that waited lease_wait_ms, then read the source */
    uint64_t stale_hits;       /* values served stale from the server's mark (allowtime with leases) */
    uint64_t stale_refreshes;  /* stale keys this context won and refreshed from the source */
} flash_stats;

/* ==== 2. context and arena ================================================ */

FLASH_API flash_ctx *flash_ctx_create(const flash_desc *desc); /* NULL desc: defaults */
/* Cancels suspended tasks first (layer 3b). Refused (logged, nothing done)
   from inside one of the context's own tasks: that task runs on a stack the
   context owns. */
FLASH_API void flash_ctx_destroy(flash_ctx *ctx);
/* Release everything the current request allocated and clear every memo:
   the C form of DataLoadersFactory.reset(). Promises, loaders and results of
   the request become invalid. Safe inside a callback or a task: work still
   running for the old request is cancelled (suspended tasks see
   FLASH_ECANCELED) and its memory kept until it unwinds. */
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

/* ==== 3b. tasks ============================================================= */

/* A task is a function with a stack of its own: it can wait for a promise in
   straight-line code while the rest of the request goes on, the C form of
   the seed's `async def` / `await`:

       static int get_data(flash_ctx *ctx, void *arg, void **result) {
           User *user;
           int rc = User_get_by_id(ctx, *(int64_t *)arg, &user); // suspends this task only
           if (rc) return rc;
           *result = user;
           return 0;
       }
       flash_promise *p = flash_spawn(ctx, get_data, &id);

   flash_spawn runs fn at once, until its first await (a JavaScript async
   function's semantics), and returns its promise: fulfilled with *result
   when fn returns 0, rejected with fn's code otherwise (with the message of
   the task's last failed await when it is that await's code). Inside a
   task, flash_await, flash_wait and every sync form (User_get_by_id,
   _or_none, _or_404, Name_resolve, flash_queries, flash_invalidate, ...)
   suspend the task instead of running the loop, so the loads of every task
   of a tick join one batch: N tasks awaiting k loads each cost k round
   trips, not N * k. Outside a task, flash_await is flash_wait.

   Reset and destroy cancel suspended tasks: their pending await returns
   FLASH_ECANCELED, and so does every later await (and flash_spawn) of those
   tasks at once. A task must return when an await gives FLASH_ECANCELED;
   its stack is reclaimed when it does. A reset from inside a task cancels
   the others now and the calling task from its next await; its request's
   memory stays valid until it returns. Awaiting the task's own promise
   gives FLASH_ESTATE (never a hang). A task runs only on its context's
   thread.

   Stacks are mmap'd with a guard page below (an overflow faults, it never
   corrupts), desc.task_stack bytes each, pooled per context and reused
   across resets (mapped in slabs; unmapped by flash_ctx_destroy). The
   switch is a few instructions of assembly on x86-64 and AArch64 (callee-
   saved registers and the FP control words), ucontext elsewhere; ASan, TSan
   and valgrind are told about every switch and stack.
     FLASH_NO_TASKS          leave tasks out: flash_spawn rejects with
                             FLASH_EUNSUPPORTED, flash_await is flash_wait
     FLASH_TASK_UCONTEXT     use ucontext even where assembly exists
     FLASH_TASK_CONTEXT, FLASH_TASK_MAKE(c, stack, size, fn, arg),
     FLASH_TASK_SWITCH(from, to)
                             bring your own switch: a type holding a saved
                             context; prepare *c to call fn(arg) (never
                             returns) on [stack, stack + size); save the
                             current context into *from and resume *to. */
typedef int (*flash_task_fn)(flash_ctx *ctx, void *arg, void **result);
FLASH_API flash_promise *flash_spawn(flash_ctx *ctx, flash_task_fn fn, void *arg);
FLASH_API int flash_await(flash_ctx *ctx, flash_promise *p, void **value);
FLASH_API bool flash_in_task(const flash_ctx *ctx);

/* ==== 4. event loop ========================================================= */

enum { FLASH_IO_READ = 1, FLASH_IO_WRITE = 2 };
typedef void (*flash_loop_fn)(void *arg);
typedef void (*flash_io_fn)(void *arg, int events);

/* A deferred call whose memory belongs to its caller (embed it in your own
   struct): queueing it cannot fail. Zero-initialise; fields are private. */
typedef struct flash_defer {
    struct flash_defer *next, *prev;
    flash_loop_fn fn;
    void *arg;
    uint64_t pass;
    void *handle;  /* loops without post: the defer/timer handle used */
    bool queued;
    /* Public, set before posting. Posted from inside a queue run, a late
       node runs in that run, after the nodes queued before the run, rather
       than in the next one (after a poll that does not block): a transport's
       flush posted by the dispatches of this iteration (flash's pipeline)
       sends their bytes before the loop waits. Posted from a late node's own
       fn, it waits for the next run as any node. Loops not built on the
       kit may ignore it. */
    bool late;
} flash_defer;

/* What flash needs from an event loop. Handles are made and freed by the
   adapter: a handle is valid until cancel/io_stop, or until a timer or defer
   has fired. Callbacks may start and stop any handle, their own included.
   defer, timer and io_start return NULL when they cannot (out of memory). */
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
    /* Optional, and what lets flash never lose a tick: defer with a node of
       the caller's (d->fn, d->arg set), without allocating; unpost forgets
       a node not yet run. Loops built on flash_defer_queue get both free. */
    void (*post)(void *native, flash_defer *d);
    void (*unpost)(void *native, flash_defer *d);
};

/* Run fn(arg) at the end of this iteration through d (which must stay
   valid until fn runs or flash_loop_unpost). With the loop's post it cannot
   fail; otherwise defer, then a 0 ms timer is tried: FLASH_ENOMEM when both
   fail. Posting a queued node again is a no-op (FLASH_OK). Every component
   of flash schedules its own ticks this way; adapters and backends may too. */
FLASH_API int flash_loop_post(flash_loop loop, flash_defer *d, flash_loop_fn fn, void *arg);
FLASH_API void flash_loop_unpost(flash_loop loop, flash_defer *d);
FLASH_API bool flash_defer_queued(const flash_defer *d);

/* ---- the adapter kit: what every loop adapter needs besides its loop ----

   flash_handle_pool: fixed-size handles recycled through a free list, from
   the adapter's allocator (NULL: malloc): no allocation per timer or watch
   once warm. flash_defer_queue: a FIFO of flash_defer nodes with the "end of
   this iteration" rule (a run takes the nodes queued before it; those queued
   while it runs wait for the next run), plus pooled nodes for defer(). An
   adapter's post/unpost/defer/cancel are push/remove/defer/cancel; it runs
   the queue once per iteration after I/O and keeps its loop from blocking
   while the queue is not empty (flash_loop_kit below does all of that but
   the loop's own part). Neither is thread-safe: one per loop. */
typedef struct flash_handle_pool {
    flash_allocator alloc;
    size_t size;       /* a handle's, plus the pool's link in front of it */
    void *spare;       /* free list */
    void *first;       /* the live handles, newest first */
    size_t nspare, live;
    bool untracked;    /* private: no live list (the queue's own nodes) */
} flash_handle_pool;
FLASH_API void flash_handle_pool_init(flash_handle_pool *p, size_t size, const flash_allocator *alloc);
FLASH_API void *flash_handle_pool_get(flash_handle_pool *p);  /* zeroed; NULL: out of memory */
FLASH_API void flash_handle_pool_put(flash_handle_pool *p, void *h);
FLASH_API void flash_handle_pool_clear(flash_handle_pool *p); /* free the spare ones */
/* The live handles (got and not put), for teardown: h = NULL gives the
   newest; NULL after the last. Save the next one before putting h back. */
FLASH_API void *flash_handle_pool_next_live(const flash_handle_pool *p, const void *h);

typedef struct flash_defer_queue {
    flash_defer *first, *last;
    flash_defer *newer;      /* running: the first node queued for the next run */
    uint64_t pass;
    flash_handle_pool nodes; /* defer()'s nodes */
    bool running, in_late;
} flash_defer_queue;
FLASH_API void flash_defer_queue_init(flash_defer_queue *q, const flash_allocator *alloc);
/* post: returns true when the queue was empty (wake the loop). */
FLASH_API bool flash_defer_queue_push(flash_defer_queue *q, flash_defer *d);
FLASH_API void flash_defer_queue_remove(flash_defer_queue *q, flash_defer *d); /* unpost */
/* defer / cancel with a pooled node: NULL only when the pool is empty and
   the allocator fails. The handle is the node until it has run. cancel
   returns false when handle is not one of q's nodes (an adapter's own
   handle: a timer or a watch), so a vtable's cancel can try it first. An
   adapter's handles must then start with a zeroed flash_defer. */
FLASH_API void *flash_defer_queue_defer(flash_defer_queue *q, flash_loop_fn fn, void *arg);
FLASH_API bool flash_defer_queue_cancel(flash_defer_queue *q, void *handle);
/* Run the nodes queued before this call; returns how many ran. */
FLASH_API size_t flash_defer_queue_run(flash_defer_queue *q);
FLASH_API bool flash_defer_queue_empty(const flash_defer_queue *q);
/* Drop every queued node unrun and free the pool (adapter teardown). */
FLASH_API void flash_defer_queue_clear(flash_defer_queue *q);

/* flash_loop_kit: the queue and a pool for the adapter's timers and watches,
   with the vtable's post, unpost and defer made: put the kit first in the
   adapter's struct (its native pointer is then the kit's) and use
   flash_loop_kit_post/_unpost/_defer as those slots. The adapter supplies
   the loop's part: pending(kit, any) is called when the queue turns
   non-empty (any: keep the loop from blocking and call flash_loop_kit_run
   after this iteration's I/O) and when it turns empty (any false); inside
   flash_loop_kit_run it is called once, at the end. NULL: the adapter
   looks at the queue itself before it blocks (flash_poll does). */
typedef struct flash_loop_kit {
    flash_defer_queue defers;
    flash_handle_pool handles;
    void (*pending)(struct flash_loop_kit *kit, bool any);
    bool any, running;
} flash_loop_kit;
FLASH_API void flash_loop_kit_init(flash_loop_kit *k, size_t handle_size, const flash_allocator *alloc,
                                   void (*pending)(flash_loop_kit *kit, bool any));
FLASH_API void flash_loop_kit_post(void *kit, flash_defer *d);
FLASH_API void flash_loop_kit_unpost(void *kit, flash_defer *d);
FLASH_API void *flash_loop_kit_defer(void *kit, flash_loop_fn fn, void *arg);
/* The defer half of a vtable's cancel: true when handle was a defer's
   (cancelled now, if it had not run); false: one of the adapter's handles. */
FLASH_API bool flash_loop_kit_cancel(flash_loop_kit *k, void *handle);
/* Run the defers queued before this call (those they queue wait for the
   next run); returns how many ran. */
FLASH_API size_t flash_loop_kit_run(flash_loop_kit *k);
/* Teardown: drop queued defers unrun, call drop on each live handle (which
   may put it back; NULL: put back at once), free the pools' spare memory. */
FLASH_API void flash_loop_kit_close(flash_loop_kit *k, void (*drop)(void *handle));

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
/* Called for each batch still in flight when the context is reset or
   destroyed; after it returns the batch must not be touched. Without one, a
   batch of a reset request stays valid until it is finished (all keys
   settled, or end/complete/fail) and the callback that finished it returns;
   its calls then return FLASH_ECANCELED. */
typedef void (*flash_cancel_fn)(flash_ctx *ctx, flash_batch *batch, void *user_data);

typedef struct flash_loader_desc {
    const char *name;          /* default: "loader", used in messages */
    flash_batch_fn batch;      /* required */
    void *user_data;           /* handed to every callback below */
    uint32_t max_batch;        /* default: 0, unlimited; larger batches split */
    bool no_batch;             /* default: false; true: one key per batch */
    bool no_memo;              /* default: false; true: no memo across batches
                                  (keys are still unique within one batch) */
    bool memo_errors;          /* default: false; failed keys are forgotten. true:
                                  a key's own rejection stays memoised
                                  (batch-level failures are still forgotten) */
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
/* flash_gather over n loads (fulfils with a void *[n] of the values, or
   rejects with the first rejection), with less work than n flash_loads and
   a flash_gather: each load joins the gather as it is made, and the memo
   slots of the next keys are fetched ahead. A custom schedule hook that
   resets the context inside a load ends it with FLASH_ECANCELED. */
FLASH_API flash_promise *flash_load_many(flash_loader *l, size_t n, const void *const *keys,
                                         const size_t *lens);
FLASH_API int flash_prime(flash_loader *l, const void *key, size_t len, void *value);
/* Prime a failure: loads of key reject with code (and message) while it is
   memoised. Like flash_prime, never overwrites a memoised key. */
FLASH_API int flash_prime_error(flash_loader *l, const void *key, size_t len, int code, const char *message);
FLASH_API int flash_clear(flash_loader *l, const void *key, size_t len);
FLASH_API void flash_clear_all(flash_loader *l);
/* Dispatch the open batch now (for custom schedules). */
FLASH_API int flash_loader_dispatch(flash_loader *l);

FLASH_API flash_ctx *flash_batch_ctx(const flash_batch *b);
FLASH_API flash_loader *flash_batch_loader(const flash_batch *b);
FLASH_API size_t flash_batch_size(const flash_batch *b);
FLASH_API const void *flash_batch_key(const flash_batch *b, size_t i, size_t *len);
FLASH_API void *flash_batch_payload(const flash_batch *b, size_t i);
FLASH_API flash_promise *flash_batch_promise(const flash_batch *b, size_t i);
/* A pointer of the batch function's own, e.g. for its cancel function. */
FLASH_API void flash_batch_set_data(flash_batch *b, void *data);
FLASH_API void *flash_batch_data(const flash_batch *b);
/* FLASH_EBATCH when i is out of range or the key was already settled;
   FLASH_ECANCELED when the batch's context was reset meanwhile. */
FLASH_API int flash_batch_resolve(flash_batch *b, size_t i, void *value);
FLASH_API int flash_batch_reject(flash_batch *b, size_t i, int code, const char *message);
typedef struct flash_result {
    int error;           /* 0: fulfilled with value; else rejected */
    void *value;
    const char *message; /* optional */
} flash_result;
/* Settle key i as p (a promise of the same context) settles, value or
   rejection with its message: a loader built on another loader answers with
   the other's promise, at no extra tick. A NULL p, or key i's own promise,
   rejects the key with FLASH_EINVAL. */
FLASH_API int flash_batch_follow(flash_batch *b, size_t i, flash_promise *p);
/* One result per key; a count that does not match rejects every key with
   FLASH_EBATCH (and returns FLASH_EBATCH). */
FLASH_API int flash_batch_complete(flash_batch *b, size_t n, const flash_result *results);
/* Reject every unsettled key with code (a batch-level failure). Like every
   batch-level failure (a wrong result count, flash_batch_end with keys
   unsettled, out of memory at dispatch) its keys are forgotten by the memo
   even with memo_errors: one outage must not stick for the whole request. */
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
    FLASH_CACHE_INCR,    /* number += delta; absent: create with `initial`
                            when `create`, else FLASH_ENOTFOUND */
    FLASH_CACHE_MARK_STALE /* FLASH_CACHE_CAP_LEASES only: keep the value but
                            mark it stale for ttl_s more seconds (0: keep its
                            expiry) and change its cas; the next lease GET wins
                            its refresh. FLASH_ENOTFOUND when absent */
} flash_cache_opcode;

/* Leases (FLASH_CACHE_CAP_LEASES, memcached's meta-protocol semantics): a GET
   item with lease_s > 0 that finds its key absent creates an empty stub that
   lives lease_s seconds and wins the lease (the caller reads the source and
   fills by CAS against the stub's cas: a write that invalidated the key in
   between changes the cas and the late fill fails). A lease GET that finds
   a stub someone else won, or a stale value someone else is refreshing,
   loses. A stale value (MARK_STALE) is handed to its first lease reader as
   won, to the others as lost, with its value either way. A plain GET
   (lease_s 0) reads a stub as a 0-byte value and a stale value as a value,
   without marking anything: values meant for lease reads are never empty. */
typedef enum flash_cache_lease {
    FLASH_LEASE_NONE = 0, /* a plain hit or miss: no lease involved */
    FLASH_LEASE_WON,      /* you refresh it: fill by CAS with the item's cas */
    FLASH_LEASE_LOST      /* someone else is filling it: wait, or serve stale */
} flash_cache_lease;

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
    /* Leases (backends with FLASH_CACHE_CAP_LEASES; see flash_cache_lease): */
    uint32_t lease_s;   /* GET in: 0 a plain read; else a lease read whose
                           stub (on a miss) lives this many seconds, which
                           bounds how long a crashed winner holds the key */
    uint8_t lease;      /* GET out: a flash_cache_lease. A lease read of an
                           absent key or of a stub is FLASH_ENOTFOUND with
                           WON (cas: the stub's) or LOST */
    bool stale;         /* GET out: the value was marked stale (lease reads) */
    int64_t ttl_left_ms; /* GET out (lease reads that found the key): its
                           remaining lifetime in ms, -1 none, 0 unknown;
                           never less than the true one (memcached: whole
                           seconds, rounded up by one) */
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
    uint32_t round_trips;    /* out: server requests the operation took (a
                                backend that sends to several servers at once
                                may count the wave once: say which) */
    void *priv[4];           /* the backend's */
    flash_defer tick;        /* the backend's: completing on a later tick
                                with flash_loop_post, without allocating */
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
    unsigned caps;      /* FLASH_CACHE_CAP_*: what the backend offers beyond
                           the six basic opcodes; 0 for a minimal backend */
};

/* caps: lease reads (item.lease_s, lease, stale) and FLASH_CACHE_MARK_STALE.
   Without it, MARK_STALE fails with FLASH_EINVAL and lease_s is ignored. */
#define FLASH_CACHE_CAP_LEASES 1u

FLASH_API void flash_cache_destroy(flash_cache cache);

/* ==== 7. model registry ===================================================== */

/* Field types. The first six are also the types of flash_values; a field of
   one of the others gives values of flash_value_type(type): TIME and TIMEN
   give I64 (microseconds), I64N..BOOLN their base type, with is_null. */
typedef enum flash_type {
    FLASH_I64 = 1, /* int64_t */
    FLASH_I32,     /* int32_t */
    FLASH_F64,     /* double */
    FLASH_BOOL,    /* bool */
    FLASH_STR,     /* const char *, UTF-8, NULL = SQL NULL */
    FLASH_BYTES,   /* flash_bytes, data NULL = SQL NULL */
    FLASH_TIME,    /* flash_time: microseconds since 1970-01-01 00:00 UTC */
    FLASH_I64N,    /* flash_i64n: a nullable int64_t */
    FLASH_I32N,    /* flash_i32n */
    FLASH_F64N,    /* flash_f64n */
    FLASH_BOOLN,   /* flash_booln */
    FLASH_TIMEN    /* flash_timen (a flash_i64n): a nullable timestamp */
} flash_type;

typedef struct flash_bytes {
    const void *data;
    size_t len;
} flash_bytes;

/* Nullable numbers: null true is SQL NULL (then v is 0). Zero-initialised:
   0, not NULL. */
typedef struct flash_i64n { int64_t v; bool null; } flash_i64n;
typedef struct flash_i32n { int32_t v; bool null; } flash_i32n;
typedef struct flash_f64n { double v; bool null; } flash_f64n;
typedef struct flash_booln { bool v; bool null; } flash_booln;
/* Timestamps: microseconds since the epoch, UTC (negative: before 1970). */
typedef int64_t flash_time;
typedef flash_i64n flash_timen;
#define FLASH_TIME_PER_S INT64_C(1000000)

static inline flash_i64n flash_i64n_of(int64_t v) { flash_i64n x; x.v = v; x.null = false; return x; }
static inline flash_i64n flash_i64n_null(void) { flash_i64n x; x.v = 0; x.null = true; return x; }
static inline flash_i32n flash_i32n_of(int32_t v) { flash_i32n x; x.v = v; x.null = false; return x; }
static inline flash_i32n flash_i32n_null(void) { flash_i32n x; x.v = 0; x.null = true; return x; }
static inline flash_f64n flash_f64n_of(double v) { flash_f64n x; x.v = v; x.null = false; return x; }
static inline flash_f64n flash_f64n_null(void) { flash_f64n x; x.v = 0; x.null = true; return x; }
static inline flash_booln flash_booln_of(bool v) { flash_booln x; x.v = v; x.null = false; return x; }
static inline flash_booln flash_booln_null(void) { flash_booln x; x.v = false; x.null = true; return x; }
static inline flash_timen flash_timen_of(flash_time v) { return flash_i64n_of(v); }
static inline flash_timen flash_timen_null(void) { return flash_i64n_null(); }

/* One typed value: a key part handed to queries and sources. */
typedef struct flash_value {
    flash_type type;
    bool is_null;
    union {
        int64_t i64;
        int32_t i32;
        double f64;
        bool b;
        struct {
            const char *ptr;
            size_t len;
        } s; /* STR and BYTES */
    } u;
} flash_value;

typedef struct flash_field {
    const char *name;
    flash_type type;
    size_t offset;
} flash_field;

/* A list result (filter, list caches): items point at model structs. */
typedef struct flash_list {
    size_t count;
    void **items;
} flash_list;
/* An id list result (ids caches). */
typedef struct flash_ids {
    size_t count;
    int64_t *ids;
} flash_ids;

typedef enum flash_class_kind {
    FLASH_CLASS_GET = 1,  /* CacheMeta.get_key_fields_list: one row */
    FLASH_CLASS_FILTER,   /* CacheMeta.filter_key_fields_list: a list of rows */
    FLASH_CLASS_INSTANCE, /* a named instance cache (InstanceCache) */
    FLASH_CLASS_LIST,     /* a named queryset cache giving rows */
    FLASH_CLASS_COUNT,    /* a named queryset cache giving a count */
    FLASH_CLASS_IDS,      /* a named queryset cache giving ids */
    FLASH_CLASS_EXISTS    /* a named queryset cache giving a bool (.exists()) */
} flash_class_kind;

/* How writes reach a class's cached values (django-flash InvalidationType). */
typedef enum flash_invalidation {
    FLASH_INVALIDATE_UNSET = 0, /* default: a write marks the keys stale */
    FLASH_INVALIDATE_OFF,       /* writes do nothing: values live until timeout */
    FLASH_INVALIDATE_DYNAMIC,   /* a write bumps the class's version */
    FLASH_INVALIDATE_STALE,     /* per key (upstream's DYNAMIC): a write marks
                                   each key's value stale; readers are served
                                   it while one of them refreshes it */
    FLASH_INVALIDATE_RESET      /* write-through (upstream's RESET): a write
                                   marks the keys, then refreshes them from
                                   the source at once (CAS against its marks) */
} flash_invalidation;

typedef struct flash_fetch flash_fetch;
/* A batched fallback: answer the fetch's keys (see layer 8), now or later. */
typedef void (*flash_fetch_fn)(flash_ctx *ctx, flash_fetch *f, void *user_data);

/* Per class (and, as defaults for its get/filter classes, per model).
   Zero fields take the defaults. */
typedef struct flash_cache_opts {
    uint32_t version;        /* static version, part of every key; default: 1 */
    uint32_t timeout_s;      /* cached value lifetime; default: the model's, else
                                FLASH_DEFAULT_TIMEOUT_S (one week) */
    flash_invalidation invalidation; /* default: FLASH_INVALIDATE_UNSET */
    uint32_t allowtime_s;    /* serve a stale value up to this long while one
                                reader refreshes it; default: 0, never (STALE
                                classes: no bound). Per mode, see layer 9 */
    flash_fetch_fn fallback; /* custom fallback (get_instance / get_result);
                                default: the model's source */
    void *user_data;         /* handed to fallback */
    bool no_cache_none;      /* default: false, a not-found is cached too */
    const char *table;       /* models: the table sources read; default: name */
    const char *db;          /* database alias, part of every key of the class
                                ("prefix:Class@db:vN:...", django-flash's
                                `using`); every class of a model takes the
                                model's; default: none (no @ part) */
    int pk;                  /* models: primary-key field index; default: 0 */
    /* List and ids classes (not inherited from the model): the order of
       the rows, fields separated by commas, '-' for descending, e.g.
       "-created_at,id"; the primary key is appended as the last tie-break.
       NULLs sort after every value ascending, before descending (as
       PostgreSQL's default); strings and bytes by their bytes. A field the
       model does not have: the class fails with FLASH_EINVAL. */
    const char *order_by;
    uint32_t limit;          /* list and ids classes: at most this many rows
                                per key (the first in order_by's order, by
                                default the primary key's); 0: all */
    uint32_t lease_s;        /* leases on misses (a backend with
                                FLASH_CACHE_CAP_LEASES): one reader of a
                                missing key fills it, the others wait for its
                                fill; the lease outlives a crashed winner by
                                at most this many seconds. default: the
                                model's, else flash_desc.lease_s (0: none) */
} flash_cache_opts;

typedef struct flash_model flash_model;
typedef struct flash_class flash_class;

struct flash_model {
    const char *name;
    size_t size;                           /* sizeof the struct */
    const flash_field *(*field_table)(size_t *count);
    flash_cache_opts opts;
    bool result;                           /* FLASH_RESULT: a struct no table holds */
    /* Filled in at registration: */
    const flash_field *fields;
    size_t nfields;
    uint32_t schema;                       /* hash of names and types */
    flash_model *canonical;                /* the registered copy */
    flash_class *classes;
    flash_model *next;
    struct flash_dependency *dependents;   /* classes of other models that depend on it */
};

struct flash_class {
    const char *name;                      /* "User.id", "EventCacheOnSlug" */
    flash_class_kind kind;
    flash_model *model;
    const size_t *offsets;                 /* key fields, by offset */
    size_t nfields;
    flash_cache_opts opts;
    /* Filled in at registration: */
    int fields[8];                         /* key field indices */
    flash_class *canonical;
    flash_class *next;                     /* in its model's list */
    int error;                             /* registration error, 0 if fine */
    size_t norder;                         /* order_by (and limit): sort fields, */
    int order[8];                          /* by index, the primary key last; */
    bool order_desc[8];                    /* 0 fields: the source's order */
    const char *error_message;             /* why error is set, or NULL */
};

/* Dependencies (django-flash's related caches): a class whose values are
   made from rows of other models (a join in its fallback) declares, for
   each of them, how a changed row of that model maps to the class's keys.
   flash_invalidate of that model (rows, the change stream, flash_save)
   then invalidates those keys too, from the old and the new row, in the
   class's mode (UNSET: markers; DYNAMIC: a version bump, no mapping run;
   OFF: nothing). Declared with FLASH_DEPENDS_ON / FLASH_DEPENDS_ON_FIELDS.
   A mapping adds zero or more key tuples to the sink; one whose parts do
   not fit the class (arity, types) fails the invalidation with
   FLASH_EINVAL. A bad declaration (a model that is not registered, field
   lists of another arity) fails the class's queries with FLASH_EINVAL. */
typedef struct flash_key_sink flash_key_sink;
typedef void (*flash_depends_fn)(flash_ctx *ctx, const void *row, flash_key_sink *sink, void *user_data);
typedef struct flash_dependency {
    flash_class *cls;          /* the dependent class */
    flash_model *model;        /* the model it reads */
    flash_depends_fn map;      /* custom mapping, or NULL and: */
    const size_t *offsets;     /* fields of model giving the key parts, in order */
    size_t nfields;
    void *user_data;           /* handed to map */
    /* Filled in at registration: */
    int fields[8];
    struct flash_dependency *canonical;
    struct flash_dependency *next; /* in the model's dependents */
    int error;
    const char *error_message;
} flash_dependency;
FLASH_API void flash_register_dependency(flash_dependency *d);
/* From a mapping: the class's key tuple parts[0..n) is affected. Returns
   0, or FLASH_EINVAL (n or a type does not fit the class: the invalidation
   fails with that, saying which). */
FLASH_API int flash_key_sink_add(flash_key_sink *sink, const flash_value *parts, size_t n);
FLASH_API const flash_class *flash_key_sink_class(const flash_key_sink *sink);

/* Registration happens before main (the macros below emit constructors);
   a header defining models may be included by many files: every copy
   resolves to one canonical object, matched by name. */
FLASH_API void flash_register_model(flash_model *m);
FLASH_API void flash_register_class(flash_class *c);
FLASH_API flash_model *flash_models(void);       /* first; follow ->next */
FLASH_API flash_model *flash_model_find(const char *name);
FLASH_API int flash_model_field(const flash_model *m, const char *name); /* -1 if none */

/* Values. */
FLASH_API flash_value flash_v_i64(int64_t v);
FLASH_API flash_value flash_v_i32(int32_t v);
FLASH_API flash_value flash_v_f64(double v);
FLASH_API flash_value flash_v_bool(bool v);
FLASH_API flash_value flash_v_str(const char *s);          /* NULL: SQL NULL */
FLASH_API flash_value flash_v_strn(const char *s, size_t n);
FLASH_API flash_value flash_v_bytes(flash_bytes b);
FLASH_API flash_value flash_v_null(flash_type type);  /* any field type: its value type */
FLASH_API flash_value flash_v_i64n(flash_i64n v);    /* FLASH_I64, is_null when v.null */
FLASH_API flash_value flash_v_i32n(flash_i32n v);
FLASH_API flash_value flash_v_f64n(flash_f64n v);
FLASH_API flash_value flash_v_booln(flash_booln v);
FLASH_API const char *flash_type_name(flash_type type); /* "I64", "STR", "TIMEN", ... */
/* The type of the values of a field of type t (TIME, TIMEN, I64N: I64;
   I32N: I32; F64N: F64; BOOLN: BOOL; the others: themselves). */
FLASH_API flash_type flash_value_type(flash_type t);
FLASH_API bool flash_type_nullable(flash_type t); /* I64N ... TIMEN (STR, BYTES: NULL pointers) */

/* Timestamps as text. flash_time_parse accepts (whole string, n bytes):
     YYYY-MM-DD                               midnight UTC
     YYYY-MM-DD[ T]HH:MM[:SS[.f...]]          1 to 9 fraction digits: to
                                              the microsecond, rounded down
     ... followed by Z, z, or an offset +HH, +HHMM, +HH:MM, +HH:MM:SS (or -)
     ... followed by " BC" (PostgreSQL's years before 1 AD)
   Years have 4 or more digits (a leading '-' or '+' is allowed); no offset
   means UTC. Returns 0, or FLASH_EINVAL (not a timestamp), FLASH_ETOOLARGE
   (outside the int64_t microseconds range). */
FLASH_API int flash_time_parse(const char *s, size_t n, flash_time *out);
/* "YYYY-MM-DD HH:MM:SS" plus ".ffffff" when there are microseconds, UTC
   (years outside 0..9999 are signed and wider). Returns the length it needs
   (at most 40); writes up to cap bytes with a NUL, like snprintf. */
FLASH_API size_t flash_time_format(flash_time t, char *buf, size_t cap);
FLASH_API flash_value flash_row_value(const flash_model *m, const void *row, int field);
/* The value of a field of type `type` stored at p (p: a struct member). */
FLASH_API flash_value flash_field_value(flash_type type, const void *p);
/* Store SQL NULL in a nullable field (I64N, I32N, F64N, BOOLN, TIMEN) of
   row: for sources reading a NULL column. false for another type. */
FLASH_API bool flash_field_set_null(const flash_field *f, void *row);
FLASH_API bool flash_value_eq(const flash_value *a, const flash_value *b);

/* Rows: deep copy into the arena, and the compact binary codec. */
FLASH_API void *flash_row_copy(flash_ctx *ctx, const flash_model *m, const void *row);
FLASH_API int flash_row_encode(flash_ctx *ctx, const flash_model *m, const void *row, void **out, size_t *len);
FLASH_API int flash_row_decode(flash_ctx *ctx, const flash_model *m, const void *data, size_t len, void *row);

/* The cache key of a query: prefix, class, static version and the escaped
   values. Keys over 250 bytes are hashed (*hashed = true) and the full key
   goes into the value. */
FLASH_API int flash_cache_key(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n,
                              char **key, size_t *len, bool *hashed);
/* The key of a class's version ("prefix:Class:vN:@version"): a number
   (absent: 0) that every get-many reads beside the class's keys and that
   DYNAMIC writes and flash_bump_version increment. */
FLASH_API int flash_cache_version_key(flash_ctx *ctx, const flash_class *c, char **key, size_t *len);

/* ---- registration macros -------------------------------------------------

   #define USER_FIELDS(F) F(I64, id) F(STR, first_name) F(STR, username)
   FLASH_MODEL(User, USER_FIELDS)                  struct User + User_model
   FLASH_MODEL_OPT(User, USER_FIELDS, .table = "users", .timeout_s = 3600)
   FLASH_GET_KEYS(User, (id), (username))         User_get_by_id_async ...
   FLASH_FILTER_KEYS(User, (first_name))          User_filter_by_first_name_async
   FLASH_INSTANCE_CACHE(EventCacheOnSlug, Event, (slug))   EventCacheOnSlug_resolve_async
   FLASH_INSTANCE_CACHE_OPT(Name, Model, (fields), .fallback = fn, .version = 2)
   FLASH_LIST_CACHE / FLASH_COUNT_CACHE / FLASH_IDS_CACHE (and _OPT)

   Each key set generates, e.g. for (id):
     flash_promise *User_get_by_id_async(ctx, id)          value: User *
     flash_promise *User_get_by_id_async_or_none(ctx, id)  NULL when absent
     flash_promise *User_get_by_id_async_or_404(ctx, id)   FLASH_E404 when absent
     int User_get_by_id(ctx, id, User **out)               sync forms, also
     int User_get_by_id_or_none(...), User_get_by_id_or_404(...)
     flash_query *User_get_by_id_query(ctx, id)           lazy (BatchCacheQuery)
   Key sets have 1 to 4 fields; up to 8 key sets per macro. The macros need
   GCC or Clang (C11) or C++20 (designated initialisers). */

#ifdef __cplusplus
#define FLASH__TYPEOF(x) decltype(x)
#else
#define FLASH__TYPEOF(x) __typeof__(x)
#endif
#define FLASH__CT_I64 int64_t
#define FLASH__CT_I32 int32_t
#define FLASH__CT_F64 double
#define FLASH__CT_BOOL bool
#define FLASH__CT_STR const char *
#define FLASH__CT_BYTES flash_bytes
#define FLASH__CT_TIME flash_time
#define FLASH__CT_I64N flash_i64n
#define FLASH__CT_I32N flash_i32n
#define FLASH__CT_F64N flash_f64n
#define FLASH__CT_BOOLN flash_booln
#define FLASH__CT_TIMEN flash_timen
#define FLASH__STRUCT_FIELD(T, n) FLASH__CT_##T n;
#define FLASH__TABLE_FIELD(T, n) {#n, FLASH_##T, offsetof(flash__M, n)},
#define FLASH__CAT(a, b) FLASH__CAT_(a, b)
#define FLASH__CAT_(a, b) a##b
#define FLASH__UNPAREN(...) __VA_ARGS__
#define FLASH__NARG(...) FLASH__NARG_(__VA_ARGS__, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define FLASH__NARG_(a1, a2, a3, a4, a5, a6, a7, a8, n, ...) n
#define FLASH__CTOR(fn) static void fn(void) __attribute__((constructor, used)); static void fn(void)

#define FLASH_MODEL(M, FIELDS) FLASH_MODEL_OPT(M, FIELDS, .version = 0)
#define FLASH_MODEL_OPT(M, FIELDS, ...) FLASH__MODEL(M, FIELDS, false, __VA_ARGS__)
/* A result struct (get_result of any value): declared like a model, coded
   like one, but no table holds it: its classes (FLASH_RESULT_CACHE, ...)
   need a .fallback, and it cannot be saved. */
#define FLASH_RESULT(M, FIELDS) FLASH__MODEL(M, FIELDS, true, .version = 0)
#define FLASH__MODEL(M, FIELDS, RESULT, ...)                                                 \
    typedef struct M { FIELDS(FLASH__STRUCT_FIELD) } M;                                      \
    static FLASH__UNUSED const flash_field *M##__field_table(size_t *flash__count) {         \
        typedef M flash__M;                                                                  \
        static const flash_field flash__table[] = {FIELDS(FLASH__TABLE_FIELD)};              \
        *flash__count = sizeof flash__table / sizeof flash__table[0];                        \
        return flash__table;                                                                 \
    }                                                                                        \
    static flash_model M##_model = {.name = #M, .size = sizeof(M), .field_table = M##__field_table, \
                                    .opts = {__VA_ARGS__}, .result = RESULT};                \
    FLASH__CTOR(M##__register_model) { flash_register_model(&M##_model); }

/* Key-set plumbing: each arity spreads the fields into a parameter list,
   an argument list, a value array and an offset array, then calls G with
   X (the caller's context), the model and those pieces. */
#define FLASH__P(M, a) FLASH__TYPEOF(((M *)0)->a) a
#define FLASH__KS_1(G, X, M, a) G(X, M, a, (FLASH__P(M, a)), (a), (flash_v(a)), (offsetof(M, a)), #a)
#define FLASH__KS_2(G, X, M, a, b)                                                           \
    G(X, M, a##_##b, (FLASH__P(M, a), FLASH__P(M, b)), (a, b), (flash_v(a), flash_v(b)),      \
      (offsetof(M, a), offsetof(M, b)), #a "." #b)
#define FLASH__KS_3(G, X, M, a, b, c)                                                        \
    G(X, M, a##_##b##_##c, (FLASH__P(M, a), FLASH__P(M, b), FLASH__P(M, c)), (a, b, c),       \
      (flash_v(a), flash_v(b), flash_v(c)), (offsetof(M, a), offsetof(M, b), offsetof(M, c)), \
      #a "." #b "." #c)
#define FLASH__KS_4(G, X, M, a, b, c, d)                                                     \
    G(X, M, a##_##b##_##c##_##d, (FLASH__P(M, a), FLASH__P(M, b), FLASH__P(M, c), FLASH__P(M, d)), \
      (a, b, c, d), (flash_v(a), flash_v(b), flash_v(c), flash_v(d)),                       \
      (offsetof(M, a), offsetof(M, b), offsetof(M, c), offsetof(M, d)), #a "." #b "." #c "." #d)
#define FLASH__KS(G, X, M, ...) FLASH__CAT(FLASH__KS_, FLASH__NARG(__VA_ARGS__))(G, X, M, __VA_ARGS__)
#define FLASH__KS_SPREAD(G, X, M, ...) FLASH__KS(G, X, M, __VA_ARGS__)
#define FLASH__KS_T(G, M, t) FLASH__KS_SPREAD(G, ~, M, FLASH__UNPAREN t)
#define FLASH__EACH_1(G, M, t) FLASH__KS_T(G, M, t)
#define FLASH__EACH_2(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_1(G, M, __VA_ARGS__)
#define FLASH__EACH_3(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_2(G, M, __VA_ARGS__)
#define FLASH__EACH_4(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_3(G, M, __VA_ARGS__)
#define FLASH__EACH_5(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_4(G, M, __VA_ARGS__)
#define FLASH__EACH_6(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_5(G, M, __VA_ARGS__)
#define FLASH__EACH_7(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_6(G, M, __VA_ARGS__)
#define FLASH__EACH_8(G, M, t, ...) FLASH__KS_T(G, M, t) FLASH__EACH_7(G, M, __VA_ARGS__)
#define FLASH__EACH(G, M, ...) FLASH__CAT(FLASH__EACH_, FLASH__NARG(__VA_ARGS__))(G, M, __VA_ARGS__)

/* The class object and its registration. Options are static initialisers
   (constructors may run in any order). */
#define FLASH__CLASS(OBJ, KIND, M, CLSNAME, OFFS, ...)                                      \
    static const size_t OBJ##__offsets[] = {FLASH__UNPAREN OFFS};                            \
    static flash_class OBJ = {.name = CLSNAME, .kind = KIND, .model = &M##_model,              \
                              .offsets = OBJ##__offsets,                                     \
                              .nfields = sizeof OBJ##__offsets / sizeof OBJ##__offsets[0],   \
                              .opts = {__VA_ARGS__}};                                        \
    FLASH__CTOR(OBJ##__register) { flash_register_class(&OBJ); }

/* The typed functions of one class: async, or_none, or_404, query, sync.
   Locals are prefixed so that no field name can shadow them. */
#define FLASH__FUNCS(FN, OBJ, OUT, PARAMS, ARGS, VALS)                                       \
    static FLASH__UNUSED inline flash_promise *FN##_async(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS) {  \
        flash_value flash__k[] = {FLASH__UNPAREN VALS};                                      \
        return flash_query_async(flash__ctx, &OBJ, flash__k, sizeof flash__k / sizeof flash__k[0], 0); \
    }                                                                                        \
    static FLASH__UNUSED inline flash_promise *FN##_async_or_none(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS) { \
        flash_value flash__k[] = {FLASH__UNPAREN VALS};                                      \
        return flash_query_async(flash__ctx, &OBJ, flash__k, sizeof flash__k / sizeof flash__k[0], \
                                 FLASH_Q_OR_NONE);                                           \
    }                                                                                        \
    static FLASH__UNUSED inline flash_promise *FN##_async_or_404(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS) { \
        flash_value flash__k[] = {FLASH__UNPAREN VALS};                                      \
        return flash_query_async(flash__ctx, &OBJ, flash__k, sizeof flash__k / sizeof flash__k[0], \
                                 FLASH_Q_OR_404);                                            \
    }                                                                                        \
    static FLASH__UNUSED inline flash_query *FN##_query(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS) {    \
        flash_value flash__k[] = {FLASH__UNPAREN VALS};                                      \
        return flash_query_new(flash__ctx, &OBJ, flash__k, sizeof flash__k / sizeof flash__k[0]); \
    }                                                                                        \
    static FLASH__UNUSED inline int FN(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS, OUT flash__out) {     \
        return flash_wait_result(flash__ctx, FN##_async(flash__ctx, FLASH__UNPAREN ARGS), &OBJ, \
                                 (void *)flash__out);                                       \
    }                                                                                        \
    static FLASH__UNUSED inline int FN##_or_none(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS, OUT flash__out) { \
        return flash_wait_result(flash__ctx, FN##_async_or_none(flash__ctx, FLASH__UNPAREN ARGS), \
                                 &OBJ, (void *)flash__out);                                  \
    }                                                                                        \
    static FLASH__UNUSED inline int FN##_or_404(flash_ctx *flash__ctx, FLASH__UNPAREN PARAMS, OUT flash__out) { \
        return flash_wait_result(flash__ctx, FN##_async_or_404(flash__ctx, FLASH__UNPAREN ARGS), \
                                 &OBJ, (void *)flash__out);                                  \
    }

#define FLASH__GEN_GET(X, M, SUF, PARAMS, ARGS, VALS, OFFS, FNAMES)                           \
    FLASH__CLASS(M##__get_by_##SUF, FLASH_CLASS_GET, M, #M "." FNAMES, OFFS, .version = 0)    \
    FLASH__FUNCS(M##_get_by_##SUF, M##__get_by_##SUF, M **, PARAMS, ARGS, VALS)
#define FLASH__GEN_FILTER(X, M, SUF, PARAMS, ARGS, VALS, OFFS, FNAMES)                        \
    FLASH__CLASS(M##__filter_by_##SUF, FLASH_CLASS_FILTER, M, #M ".filter." FNAMES, OFFS,     \
                 .version = 0)                                                               \
    FLASH__FUNCS(M##_filter_by_##SUF, M##__filter_by_##SUF, flash_list **, PARAMS, ARGS, VALS)

#define FLASH_GET_KEYS(M, ...) FLASH__EACH(FLASH__GEN_GET, M, __VA_ARGS__)
#define FLASH_FILTER_KEYS(M, ...) FLASH__EACH(FLASH__GEN_FILTER, M, __VA_ARGS__)

/* Named caches: one key set, a name of their own, options. */
#define FLASH__NAMED(KIND, OUT, NAME, M, t, ...)                                             \
    FLASH__KS_SPREAD(FLASH__NAMED_G, (KIND, OUT, NAME, (__VA_ARGS__)), M, FLASH__UNPAREN t)
#define FLASH__NAMED_G(X, M, SUF, PARAMS, ARGS, VALS, OFFS, FNAMES)                          \
    FLASH__NAMED_G2(FLASH__UNPAREN X, M, PARAMS, ARGS, VALS, OFFS)
#define FLASH__NAMED_G2(...) FLASH__NAMED_G3(__VA_ARGS__)
#define FLASH__NAMED_G3(KIND, OUT, NAME, OPTS, M, PARAMS, ARGS, VALS, OFFS)                   \
    FLASH__CLASS(NAME##_class, KIND, M, #NAME, OFFS, FLASH__UNPAREN OPTS)                     \
    FLASH__FUNCS(NAME##_resolve, NAME##_class, OUT, PARAMS, ARGS, VALS)

#define FLASH_INSTANCE_CACHE(NAME, M, t) FLASH_INSTANCE_CACHE_OPT(NAME, M, t, .version = 0)
#define FLASH_INSTANCE_CACHE_OPT(NAME, M, t, ...)                                           \
    FLASH__NAMED(FLASH_CLASS_INSTANCE, M **, NAME, M, t, __VA_ARGS__)
#define FLASH_LIST_CACHE(NAME, M, t) FLASH_LIST_CACHE_OPT(NAME, M, t, .version = 0)
#define FLASH_LIST_CACHE_OPT(NAME, M, t, ...)                                               \
    FLASH__NAMED(FLASH_CLASS_LIST, flash_list **, NAME, M, t, __VA_ARGS__)
#define FLASH_COUNT_CACHE(NAME, M, t) FLASH_COUNT_CACHE_OPT(NAME, M, t, .version = 0)
#define FLASH_COUNT_CACHE_OPT(NAME, M, t, ...)                                              \
    FLASH__NAMED(FLASH_CLASS_COUNT, int64_t *, NAME, M, t, __VA_ARGS__)
#define FLASH_IDS_CACHE(NAME, M, t) FLASH_IDS_CACHE_OPT(NAME, M, t, .version = 0)
#define FLASH_IDS_CACHE_OPT(NAME, M, t, ...)                                                \
    FLASH__NAMED(FLASH_CLASS_IDS, flash_ids **, NAME, M, t, __VA_ARGS__)
#define FLASH_EXISTS_CACHE(NAME, M, t) FLASH_EXISTS_CACHE_OPT(NAME, M, t, .version = 0)
#define FLASH_EXISTS_CACHE_OPT(NAME, M, t, ...)                                             \
    FLASH__NAMED(FLASH_CLASS_EXISTS, bool *, NAME, M, t, __VA_ARGS__)

/* Result caches: one result struct (or a list of them) per key, the key
   fields being fields of the struct, filled by the fallback
   (flash_fetch_set_row). NAME_resolve(ctx, key..., R **out) /
   (..., flash_list **out), as the instance and list caches. */
#define FLASH_RESULT_CACHE(NAME, R, t, ...)                                                 \
    FLASH__NAMED(FLASH_CLASS_INSTANCE, R **, NAME, R, t, __VA_ARGS__)
#define FLASH_RESULT_LIST_CACHE(NAME, R, t, ...)                                            \
    FLASH__NAMED(FLASH_CLASS_LIST, flash_list **, NAME, R, t, __VA_ARGS__)

/* Dependencies of class NAME (a named cache: NAME_class) on model DEP:
     FLASH_DEPENDS_ON(NAME, DEP, fn)   fn(ctx, const DEP *row, sink, NULL)
                                       adds the affected key tuples
     FLASH_DEPENDS_ON_FIELDS(NAME, DEP, (f1, ...))  the key is the row's
                                       fields f1, ... (one per key part)
   One dependency per class and model. */
#define FLASH_DEPENDS_ON(NAME, DEP, FN)                                                       \
    static flash_dependency NAME##__dep_##DEP = {.cls = &NAME##_class, .model = &DEP##_model,  \
                                                 .map = FN};                                  \
    FLASH__CTOR(NAME##__dep_##DEP##__register) { flash_register_dependency(&NAME##__dep_##DEP); }
#define FLASH__DEP_OFF(M, ...) FLASH__CAT(FLASH__DEP_OFF_, FLASH__NARG(__VA_ARGS__))(M, __VA_ARGS__)
#define FLASH__DEP_OFF_1(M, a) offsetof(M, a)
#define FLASH__DEP_OFF_2(M, a, b) offsetof(M, a), offsetof(M, b)
#define FLASH__DEP_OFF_3(M, a, b, c) offsetof(M, a), offsetof(M, b), offsetof(M, c)
#define FLASH__DEP_OFF_4(M, a, b, c, d) offsetof(M, a), offsetof(M, b), offsetof(M, c), offsetof(M, d)
#define FLASH__DEP_OFFS(M, ...) FLASH__DEP_OFF(M, __VA_ARGS__)
#define FLASH_DEPENDS_ON_FIELDS(NAME, DEP, t)                                                 \
    static const size_t NAME##__dep_##DEP##__offsets[] = {FLASH__DEP_OFFS(DEP, FLASH__UNPAREN t)}; \
    static flash_dependency NAME##__dep_##DEP = {                                             \
        .cls = &NAME##_class, .model = &DEP##_model, .map = NULL,                             \
        .offsets = NAME##__dep_##DEP##__offsets,                                              \
        .nfields = sizeof NAME##__dep_##DEP##__offsets / sizeof NAME##__dep_##DEP##__offsets[0]}; \
    FLASH__CTOR(NAME##__dep_##DEP##__register) { flash_register_dependency(&NAME##__dep_##DEP); }

/* Foreign keys (django-flash's cached_foreignkeys): the row a field points
   at, read through the target's get cache, so N rows' targets asked in one
   tick cost one round trip (one source call for the misses).

   FLASH_FOREIGN_KEY(Participant, user, User, id) needs FLASH_GET_KEYS(User,
   (id)) before it (else: a compile error, no User__get_by_id) and generates
     flash_promise *Participant_user_async(flash_ctx *, const Participant *p)
     flash_promise *Participant_user_async_or_none(flash_ctx *, const Participant *p)
     flash_promise *Participant_user_async_or_404(flash_ctx *, const Participant *p)
     int Participant_user(flash_ctx *, const Participant *p, User **out)
     int Participant_user_or_none(flash_ctx *, const Participant *p, User **out)
     int Participant_user_or_404(flash_ctx *, const Participant *p, User **out)
   They fulfil with a User *, or NULL when p->user is NULL (a nullable
   field: I64N, ...); a missing target rejects with FLASH_ENOTFOUND, gives
   NULL in the _or_none forms (a dangling reference), FLASH_E404 in the
   _or_404 forms. The field's values must have the target
   field's value type (I64N -> I64 is fine; I32 -> I64 rejects with
   FLASH_EINVAL, naming both). The sync forms suspend the calling task, or
   run the loop outside one, like every sync form. */
#define FLASH_FOREIGN_KEY(M, FIELD, T, TFIELD)                                                \
    static FLASH__UNUSED inline flash_promise *M##_##FIELD##__fk(flash_ctx *flash__ctx, const M *flash__row, \
                                                                 int flash__flags) {          \
        flash_value flash__k;                                                                \
        if (!flash__row) return flash_rejected(flash__ctx, FLASH_EINVAL, #M "." #FIELD ": no row");     \
        flash__k = flash_v(flash__row->FIELD);                                               \
        if (flash__k.is_null) return flash_fulfilled(flash__ctx, NULL);                      \
        return flash_query_async(flash__ctx, &T##__get_by_##TFIELD, &flash__k, 1, flash__flags); \
    }                                                                                        \
    static FLASH__UNUSED inline flash_promise *M##_##FIELD##_async(flash_ctx *flash__ctx, const M *flash__row) { \
        return M##_##FIELD##__fk(flash__ctx, flash__row, 0);                                 \
    }                                                                                        \
    static FLASH__UNUSED inline flash_promise *M##_##FIELD##_async_or_none(flash_ctx *flash__ctx,           \
                                                                           const M *flash__row) {           \
        return M##_##FIELD##__fk(flash__ctx, flash__row, FLASH_Q_OR_NONE);                   \
    }                                                                                        \
    static FLASH__UNUSED inline flash_promise *M##_##FIELD##_async_or_404(flash_ctx *flash__ctx,            \
                                                                          const M *flash__row) {            \
        return M##_##FIELD##__fk(flash__ctx, flash__row, FLASH_Q_OR_404);                    \
    }                                                                                        \
    static FLASH__UNUSED inline int M##_##FIELD##_or_none(flash_ctx *flash__ctx, const M *flash__row,        \
                                                          T **flash__out) {                  \
        return flash_wait_result(flash__ctx, M##_##FIELD##_async_or_none(flash__ctx, flash__row),            \
                                 &T##__get_by_##TFIELD, (void *)flash__out);                 \
    }                                                                                        \
    static FLASH__UNUSED inline int M##_##FIELD(flash_ctx *flash__ctx, const M *flash__row, T **flash__out) { \
        return flash_wait_result(flash__ctx, M##_##FIELD##_async(flash__ctx, flash__row), &T##__get_by_##TFIELD, \
                                 (void *)flash__out);                                        \
    }                                                                                        \
    static FLASH__UNUSED inline int M##_##FIELD##_or_404(flash_ctx *flash__ctx, const M *flash__row,         \
                                                         T **flash__out) {                   \
        return flash_wait_result(flash__ctx, M##_##FIELD##_async_or_404(flash__ctx, flash__row),             \
                                 &T##__get_by_##TFIELD, (void *)flash__out);                 \
    }

/* ==== 8. query engine ======================================================= */

/* Query flags. */
enum {
    FLASH_Q_OR_NONE = 1,           /* not found fulfils with NULL */
    FLASH_Q_OR_404 = 2,            /* not found rejects with FLASH_E404 */
    FLASH_Q_ONLY_CACHE = 4,        /* never ask the source: a miss is not found */
    FLASH_Q_NONE_ON_EXCEPTION = 8  /* any error fulfils with NULL */
};

/* Ask a class for the row(s) under key values (one per key field, in the
   class's order). The typed functions the macros generate call this.
   Fulfils with: GET/INSTANCE a model struct, FILTER/LIST a flash_list,
   COUNT an int64_t, IDS a flash_ids, EXISTS a bool (pointers into the
   arena). Lists and ids of a class with order_by / limit come sorted and
   cut (the engine sorts what the source gave, so any source, fallback
   or cached value gives the same order). */
FLASH_API flash_promise *flash_query_async(flash_ctx *ctx, const flash_class *c, const flash_value *values,
                                           size_t n, int flags);

/* Lazy queries (BatchCacheQuery's get_query): build now, run together. */
typedef struct flash_query {
    const flash_class *cls;
    flash_value *values;
    size_t count;
} flash_query;
FLASH_API flash_query *flash_query_new(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n);
FLASH_API flash_promise *flash_query_run_async(flash_ctx *ctx, const flash_query *q, int flags);
/* All in one batch; fulfils with void *[n]. With FLASH_Q_NONE_ON_EXCEPTION a
   failed query gives NULL in its slot instead of rejecting the whole. */
FLASH_API flash_promise *flash_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs, int flags);
FLASH_API int flash_queries(flash_ctx *ctx, size_t n, flash_query *const *qs, int flags, void ***out);
/* Sync form: wait for p (a query of class c) and store its result through
   out (c's result type: Model **, flash_list **, int64_t *, flash_ids **,
   bool *). */
FLASH_API int flash_wait_result(flash_ctx *ctx, flash_promise *p, const flash_class *c, void *out);

/* ---- sources: where misses are read from ----------------------------------

   A source gets one fetch per class per batch: "rows of model whose key
   fields equal any of these key tuples" (WHERE slug IN (...)). It answers
   with rows (matched to the keys by their field values, so order does not
   matter) and then flash_fetch_done, now or from a loop callback later. */
typedef struct flash_write flash_write; /* a write (layer 9) */
typedef struct flash_source_vtable {
    const char *name;
    void (*fetch)(void *self, flash_ctx *ctx, flash_fetch *f);
    /* Optional: forget f (context reset); no flash_fetch_* calls after. */
    void (*cancel)(void *self, flash_fetch *f);
    /* Optional: write rows (flash_save / flash_delete, layer 9), in one
       transaction, telling each row's old value (flash_write_set_old);
       then flash_write_done, now or later. NULL: FLASH_EUNSUPPORTED. */
    void (*write)(void *self, flash_ctx *ctx, flash_write *w);
} flash_source_vtable;
typedef struct flash_source {
    const flash_source_vtable *vt;
    void *self;
} flash_source;

/* The source for a model in this context (NULL model: the default for all). */
FLASH_API int flash_ctx_set_source(flash_ctx *ctx, const flash_model *m, flash_source source);

FLASH_API flash_ctx *flash_fetch_ctx(const flash_fetch *f);
FLASH_API const flash_model *flash_fetch_model(const flash_fetch *f);
FLASH_API const flash_class *flash_fetch_class(const flash_fetch *f);
FLASH_API size_t flash_fetch_nfields(const flash_fetch *f);      /* key fields */
FLASH_API int flash_fetch_field(const flash_fetch *f, size_t j);  /* field index of key part j */
FLASH_API size_t flash_fetch_count(const flash_fetch *f);         /* key tuples */
FLASH_API const flash_value *flash_fetch_key(const flash_fetch *f, size_t i); /* nfields values */
/* A row matching one of the key tuples (matched by hash): copied, counted
   in source_rows. A row nobody asked for returns FLASH_ENOTFOUND and is
   ignored (so a source may hand over rows unfiltered); a second row for a
   one-row class fails that key with FLASH_EMULTIPLE. */
FLASH_API int flash_fetch_row(flash_fetch *f, const void *row);
/* Custom fallbacks may answer key i directly: */
FLASH_API int flash_fetch_set_row(flash_fetch *f, size_t i, const void *row); /* NULL: none */
FLASH_API int flash_fetch_set_count(flash_fetch *f, size_t i, int64_t count); /* COUNT, EXISTS */
/* COUNT and EXISTS classes, for SQL's GROUP BY: row's key fields (the
   others are not read) name the key tuple, whose count grows by n.
   FLASH_ENOTFOUND (ignored) when no tuple has those values. */
FLASH_API int flash_fetch_add_count(flash_fetch *f, const void *row, int64_t n);
FLASH_API int flash_fetch_add_id(flash_fetch *f, size_t i, int64_t id);
FLASH_API int flash_fetch_fail(flash_fetch *f, size_t i, int code, const char *message);
/* Answer key i as given but write nothing back to the cache for it
   (django-flash's DontCache(value)): e.g. a partial or transient answer.
   The next request asks the source again. */
FLASH_API int flash_fetch_dont_cache(flash_fetch *f, size_t i);
/* Fail every key tuple whose parts equal parts[] (parts[j] ignored where
   any[j]; any may be NULL): for a row that matched but cannot be read.
   Returns how many keys failed. */
FLASH_API int flash_fetch_fail_where(flash_fetch *f, const flash_value *parts, const bool *any, int code,
                                     const char *message);
/* For SQL sources: append name to b as a quoted identifier ("a""b"); with
   dotted, "schema.table" becomes "schema"."table". */
FLASH_API void flash_sql_ident(flash_strbuf *b, const char *name, bool dotted);
/* Finish: status 0 settles every key from what was given (no row: not
   found / empty); non-zero fails the keys not yet answered with it.
   Key values (flash_fetch_key) live until then: a source answering later
   reads them before, or copies them. The class (flash_fetch_class(f)->kind)
   tells whether one row, a list, a count or ids is wanted. */
FLASH_API int flash_fetch_done(flash_fetch *f, int status, const char *message);

/* ==== 9. invalidation ======================================================= */

/* Keep the cache consistent with a write. For every cache class of model m,
   the keys made from old_row's and from new_row's field values (either may
   be NULL: a created or a deleted row) are invalidated:
     FLASH_INVALIDATE_UNSET    a short-lived stale marker replaces the value;
                               with allowtime_s the value is marked stale
                               instead (served for allowtime_s while one
                               reader refreshes it);
     FLASH_INVALIDATE_STALE    the value is marked stale (a marker where there
                               is none): readers are served it while one of
                               them, the one whose refresh lock lands, reads
                               the source and replaces it by CAS; with
                               allowtime_s, for at most that long;
     FLASH_INVALIDATE_RESET    markers, then this context re-reads the keys
                               from the model's source (which must see the
                               write: the primary) and fills them by CAS
                               against the markers, so the next reader hits;
                               the promise settles after the refresh (a failed
                               refresh leaves the markers: readers refill);
     FLASH_INVALIDATE_DYNAMIC  the class's version is bumped (one incr);
     FLASH_INVALIDATE_OFF      nothing.
   allowtime_s with the other cases: a value written under an older class
   version (DYNAMIC's bumps, flash_bump_version) is served while one reader
   refreshes it if it was written at most allowtime_s ago; an OFF class's
   value older than allowtime_s is served while one reader refreshes it.
   Either way no value older than allowtime_s is served from a superseded
   state. A refresh lock is deleted after its refresh and lives at most
   min(allowtime_s, desc.refresh_lock_s).
   A few multi-key backend operations in all, and the request memo forgets
   those keys. Call it after the database write committed. Fulfils with NULL
   once the backend has applied everything; rejects (FLASH_EBACKEND, ...)
   when it could not: then values may stay stale until their timeout. */
FLASH_API flash_promise *flash_invalidate_async(flash_ctx *ctx, const flash_model *m, const void *old_row,
                                                const void *new_row);
FLASH_API int flash_invalidate(flash_ctx *ctx, const flash_model *m, const void *old_row, const void *new_row);
/* Many rows of one model at once (old_rows / new_rows may be NULL, or hold
   NULLs). */
FLASH_API flash_promise *flash_invalidate_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                                     const void *const *old_rows, const void *const *new_rows);
/* The keys of these queries, in their class's mode (DYNAMIC and OFF
   classes: markers). */
FLASH_API flash_promise *flash_invalidate_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs);
FLASH_API int flash_invalidate_queries(flash_ctx *ctx, size_t n, flash_query *const *qs);
/* Cache.reset(): the keys of these queries are marked, re-read from their
   sources and filled by CAS against the marks (as a RESET class's write),
   whatever their class's mode. Fulfils once the refills were tried. */
FLASH_API flash_promise *flash_reset_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs);
FLASH_API int flash_reset_queries(flash_ctx *ctx, size_t n, flash_query *const *qs);
/* Flush by hand (CacheDynamicVersion.bump_version_for_model): bump the
   version of every class of m and of every class depending on m
   (FLASH_DEPENDS_ON). Every class's version key travels in each get-many
   (one key per class per batch), so every value cached under an older
   version becomes a miss (or, with allowtime_s, is served while one reader
   refreshes it, as above). */
FLASH_API flash_promise *flash_bump_version_async(flash_ctx *ctx, const flash_model *m);
FLASH_API int flash_bump_version(flash_ctx *ctx, const flash_model *m);

/* ---- writes: Django's save() / delete() and their signals ------------------

   flash_save writes a row through the model's source (insert, or update by
   primary key), reading the row's old value in the same transaction, and
   after the commit invalidates the keys of the old and the new row (as
   flash_invalidate_rows_async), so a username change invalidates both
   usernames. flash_delete deletes by primary key (only the pk field of the
   row is read) and invalidates the old row's keys. The bulk forms write n
   rows in ONE transaction (all or none) and invalidate once.
   Fulfils with NULL once the write committed AND the invalidation was
   applied. Rejects with the source's code (FLASH_ESOURCE: a constraint
   violation, ...; FLASH_EUNSUPPORTED: a source without writes) when the
   write failed: nothing was written, nothing invalidated; or with the
   backend's code and a message saying the write is committed when only the
   invalidation failed (values may then stay stale until their timeout).
   Deleting a row that does not exist fulfils (nothing to invalidate).
   The sync forms run the loop, or suspend the calling task, like every
   sync form. Rows are copied: they may go once the call returns. */
FLASH_API flash_promise *flash_save_async(flash_ctx *ctx, const flash_model *m, const void *row);
FLASH_API flash_promise *flash_save_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                               const void *const *rows);
FLASH_API flash_promise *flash_delete_async(flash_ctx *ctx, const flash_model *m, const void *row);
FLASH_API flash_promise *flash_delete_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                                 const void *const *rows);
FLASH_API int flash_save(flash_ctx *ctx, const flash_model *m, const void *row);
FLASH_API int flash_save_rows(flash_ctx *ctx, const flash_model *m, size_t n, const void *const *rows);
FLASH_API int flash_delete(flash_ctx *ctx, const flash_model *m, const void *row);
FLASH_API int flash_delete_rows(flash_ctx *ctx, const flash_model *m, size_t n, const void *const *rows);

/* For sources implementing write: */
typedef enum flash_write_kind { FLASH_WRITE_SAVE = 1, FLASH_WRITE_DELETE } flash_write_kind;
FLASH_API flash_ctx *flash_write_ctx(const flash_write *w);
FLASH_API const flash_model *flash_write_model(const flash_write *w);
FLASH_API flash_write_kind flash_write_kind_of(const flash_write *w);
FLASH_API size_t flash_write_count(const flash_write *w);
FLASH_API const void *flash_write_row(const flash_write *w, size_t i); /* lives until flash_write_done */
/* The old value of row i, read in the write's transaction (copied); none
   given: the row did not exist. */
FLASH_API int flash_write_set_old(flash_write *w, size_t i, const void *old_row);
/* status 0: committed (then the engine invalidates); else nothing was
   written. Call once; the write and its rows are gone after. */
FLASH_API int flash_write_done(flash_write *w, int status, const char *message);
/* For a source answering later (from a loop callback): cancel(self, w)
   runs if the context is destroyed before flash_write_done; the source then
   forgets w (no flash_write_* calls on it after; its rows are gone). The
   database may still commit the write: nothing is invalidated for it then.
   A context reset does not cancel: the write finishes, and invalidates. */
FLASH_API void flash_write_on_cancel(flash_write *w, void (*cancel)(void *self, flash_write *w), void *self);

#ifdef __cplusplus
} /* extern "C" */

/* flash_v(x): the flash_value of a C value, by its type. */
static inline flash_value flash_v(int64_t v) { return flash_v_i64(v); }
static inline flash_value flash_v(int32_t v) { return flash_v_i32(v); }
static inline flash_value flash_v(double v) { return flash_v_f64(v); }
static inline flash_value flash_v(bool v) { return flash_v_bool(v); }
static inline flash_value flash_v(const char *v) { return flash_v_str(v); }
static inline flash_value flash_v(flash_bytes v) { return flash_v_bytes(v); }
static inline flash_value flash_v(flash_i64n v) { return flash_v_i64n(v); }
static inline flash_value flash_v(flash_i32n v) { return flash_v_i32n(v); }
static inline flash_value flash_v(flash_f64n v) { return flash_v_f64n(v); }
static inline flash_value flash_v(flash_booln v) { return flash_v_booln(v); }
#else
#define flash_v(x)                                                                          \
    _Generic((x), int64_t: flash_v_i64, int32_t: flash_v_i32, double: flash_v_f64,          \
             bool: flash_v_bool, const char *: flash_v_str, char *: flash_v_str,             \
             flash_bytes: flash_v_bytes, flash_i64n: flash_v_i64n, flash_i32n: flash_v_i32n, \
             flash_f64n: flash_v_f64n, flash_booln: flash_v_booln)(x)
#endif
#endif /* FLASH_H */

/* ========================================================================== */
/* IMPLEMENTATION                                                             */
/* ========================================================================== */
#ifdef FLASH_IMPLEMENTATION
#ifndef FLASH_IMPLEMENTED
#define FLASH_IMPLEMENTED

#include <math.h>
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

/* Sanitizers and valgrind are told about every task stack and switch (layer
   3b), so that they follow a task's stack instead of reporting it. */
#ifdef __has_feature
#define FLASH__HAS_FEATURE(x) __has_feature(x)
#else
#define FLASH__HAS_FEATURE(x) 0
#endif
#if defined(__SANITIZE_ADDRESS__) || FLASH__HAS_FEATURE(address_sanitizer)
#define FLASH__ASAN 1
#endif
#if defined(__SANITIZE_THREAD__) || FLASH__HAS_FEATURE(thread_sanitizer)
#define FLASH__TSAN 1
#endif
#if defined(FLASH__ASAN) || defined(FLASH__TSAN)
#ifdef __cplusplus
extern "C" {
#endif
#ifdef FLASH__ASAN
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old);
#endif
#ifdef FLASH__TSAN
void *__tsan_get_current_fiber(void);
void *__tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void *fiber);
void __tsan_switch_to_fiber(void *fiber, unsigned flags);
#endif
#ifdef __cplusplus
}
#endif
#endif
#if !defined(FLASH_NO_VALGRIND) && defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define FLASH__VALGRIND 1
#endif
#endif

#define FLASH__ALIGN 16u
#define FLASH__ROUND(n) (((n) + (FLASH__ALIGN - 1)) & ~(size_t)(FLASH__ALIGN - 1))
#define FLASH__ROUND8(n) (((n) + 7u) & ~(size_t)7u)
#if defined(__GNUC__) || defined(__clang__)
#define FLASH__LIKELY(x) __builtin_expect(!!(x), 1)
#define FLASH__UNLIKELY(x) __builtin_expect(!!(x), 0)
#define FLASH__NOINLINE __attribute__((noinline))
#define FLASH__ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FLASH__ALWAYS_INLINE inline
#define FLASH__LIKELY(x) (x)
#define FLASH__UNLIKELY(x) (x)
#define FLASH__NOINLINE
#endif

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

/* Room for n more bytes and the NUL. */
static bool flash__strbuf_reserve(flash_strbuf *b, size_t n) {
    size_t cap;
    char *p;
    if (b->oom) return false;
    if (b->cap - b->len > n) return true;
    cap = b->cap ? b->cap : 128;
    while (cap - b->len <= n) {
        if (cap > SIZE_MAX / 2) {
            b->oom = true;
            return false;
        }
        cap *= 2;
    }
    p = (char *)realloc(b->data, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->data = p;
    b->cap = cap;
    return true;
}

FLASH_API void flash_strbuf_put(flash_strbuf *b, const void *s, size_t n) {
    if (!b || !flash__strbuf_reserve(b, n)) return;
    if (n) memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

FLASH_API void flash_strbuf_puts(flash_strbuf *b, const char *s) {
    if (s) flash_strbuf_put(b, s, strlen(s));
}

FLASH_API void flash_strbuf_printf(flash_strbuf *b, const char *fmt, ...) {
    va_list ap;
    int n;
    if (!b || !fmt) return;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) b->oom = true;
    if (n < 0 || !flash__strbuf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

FLASH_API void flash_strbuf_free(flash_strbuf *b) {
    if (!b) return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = false;
}

/* A 64-bit finaliser (murmur3's fmix64): spreads every input bit. */
static uint64_t flash__mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
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
typedef struct flash__ready {
    flash_promise *p;
    flash__cb *cb;
} flash__ready;

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
    flash__ready *ready;      /* ready queue (allocator memory) */
    size_t ready_head, ready_tail, ready_cap;
    struct flash__work *work; /* internal callbacks to run now (see flash__settle) */
    size_t work_head, work_tail, work_cap;
    bool working;
    struct flash__later *later; /* holds released at the next drain */
    flash_batch *open_first, *open_last; /* batches waiting for dispatch */
    flash_loader *loaders;   /* this generation's loaders */
    flash_loop loop;
    bool own_queue_loop;     /* loop is the internal defer-only queue */
    flash_defer drain;       /* the deferred drain, posted on the loop */
    uint64_t memo_seed;      /* seeds memo hashes (see flash__memo_hash) */
    uint64_t memo_seed2;     /* the second word of that seed */
    int depth;               /* drains on the stack: new tasks get run */
    int running;             /* flash_wait / flash_run on the stack */
    void *engine;            /* layer 8 state, per generation */
    struct flash__binding *sources; /* layer 8: model -> source, kept across resets */
    struct flash__eop *writes;      /* layer 8: cache writes in flight, any generation */
    struct flash_fetch *fetches;    /* layer 8: source fetches not done, any generation */
    struct flash_write *live_writes; /* layer 9: source writes not done, any generation */
    size_t nsources;
    char *prefix;            /* layer 7: escaped key prefix */
    size_t prefix_len;
    struct flash__khead *kheads; /* layer 7: escaped "prefix:Class:vN:" per class */
    size_t nkheads;
    void *spare_tables[48];  /* recycled memo tables, one per log2 size */
    struct {                 /* layer 5: a loader desc's last batch size, */
        const void *desc;    /* so that its next batch's key array is */
        size_t keys;         /* allocated once instead of doubling */
    } batch_hints[8];
    size_t spare_table_bytes;
    struct flash__qloop *qloop;
    /* layer 3b: tasks */
    struct flash__coro *task_current;          /* running now (innermost) */
    struct flash__coro *task_live, *task_live_last; /* spawn order */
    struct flash__coro *task_free;             /* pooled stacks */
    struct flash__tslab *task_slabs;
    size_t task_nlive, task_stack_count;
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
    if (size > SIZE_MAX / 2) return NULL; /* would wrap when rounded or given a header */
    size = FLASH__ROUND(size ? size : 1);
    if (b) {
        /* Memo entries are packed at 8 bytes (layer 5): align up again. */
        size_t used = FLASH__ROUND(b->used);
        if (used + size <= b->cap) {
            void *p = (char *)b + FLASH__BLOCK_HDR + used;
            b->used = used + size;
            return p;
        }
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
    void *p = n < SIZE_MAX ? flash_alloc(ctx, n + 1) : NULL;
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

static void flash__engine_reset(flash_ctx *ctx, bool destroying); /* layer 8 */
static void flash__tasks_cancel(flash_ctx *ctx);                  /* layer 3b */
static void flash__tasks_free(flash_ctx *ctx);
static void flash__tasks_trim(flash_ctx *ctx);
static void flash__kheads_free(flash_ctx *ctx);                   /* layer 7 */
static void flash__writes_cancel(flash_ctx *ctx);                 /* layer 9 */

/* Holds to release at the next drain (see flash__batch_finish). */
typedef struct flash__later {
    struct flash__later *next;
    uint64_t gen;
} flash__later;

static bool flash__schedule_drain(flash_ctx *ctx);

static void flash__unhold_later(flash_ctx *ctx, uint64_t gen) {
    flash__later *l = (flash__later *)flash__sys_alloc(ctx, sizeof *l);
    if (!l) {
        flash__unhold(ctx, gen); /* out of memory: release now */
        return;
    }
    l->gen = gen;
    l->next = ctx->later;
    ctx->later = l;
    flash__schedule_drain(ctx);
}

static void flash__release_later(flash_ctx *ctx) {
    while (ctx->later) {
        flash__later *l = ctx->later;
        ctx->later = l->next;
        flash__unhold(ctx, l->gen);
        flash__sys_free(ctx, l);
    }
}
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

/* The internal defer-only loop used until an adapter is attached: the
   adapter kit, nothing else (the smallest adapter there is). */
typedef struct flash__qloop {
    flash_loop_kit kit; /* first: the vtable's native pointer */
} flash__qloop;

static void *flash__q_timer(void *native, uint32_t ms, flash_loop_fn fn, void *arg) {
    (void)native; (void)ms; (void)fn; (void)arg;
    return NULL;
}
static void flash__q_cancel(void *native, void *handle) {
    (void)flash_loop_kit_cancel(&((flash__qloop *)native)->kit, handle);
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
    (void)may_block;
    if (flash_defer_queue_empty(&q->kit.defers)) return 0;
    flash_loop_kit_run(&q->kit); /* work deferred from here runs next round */
    return !flash_defer_queue_empty(&q->kit.defers);
}
static const flash_loop_vtable flash__qloop_vt = {
    "queue", flash_loop_kit_defer, flash__q_timer, flash__q_cancel, flash__q_io_start,
    flash__q_io_set, flash__q_io_stop, flash__q_run_once, flash_loop_kit_post, flash_loop_kit_unpost,
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
    if (!d.refresh_lock_s) d.refresh_lock_s = 30;
    if (!d.lease_wait_ms) d.lease_wait_ms = 500;
    if (!d.clock_ms) d.clock_ms = flash__realtime_ms;
#if defined(FLASH__ASAN) || defined(FLASH__TSAN)
    if (!d.task_stack) d.task_stack = (uint32_t)256 << 10; /* instrumented frames are larger */
#else
    if (!d.task_stack) d.task_stack = (uint32_t)64 << 10;
#endif
    if (!d.max_tasks) d.max_tasks = 10000;
    if (!d.task_retain) d.task_retain = 1024;
    ctx = (flash_ctx *)d.allocator.alloc(sizeof *ctx, d.allocator.user_data);
    if (!ctx) return NULL;
    memset(ctx, 0, sizeof *ctx);
    ctx->desc = d;
    {
        /* Unpredictable enough against flooding: the time and the address
           (no shared state: contexts are made in any thread). */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ctx->memo_seed =
            flash__mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)(uintptr_t)ctx);
        ctx->memo_seed2 = flash__mix64(ctx->memo_seed ^ 0xe7037ed1a0b428dbull) | 1;
    }
    ctx->qloop = (flash__qloop *)flash__sys_alloc(ctx, sizeof *ctx->qloop);
    if (!ctx->qloop) {
        d.allocator.free(ctx, d.allocator.user_data);
        return NULL;
    }
    flash_loop_kit_init(&ctx->qloop->kit, 0, &ctx->desc.allocator, NULL);
    ctx->loop.vt = &flash__qloop_vt;
    ctx->loop.native = ctx->qloop;
    ctx->own_queue_loop = true;
    return ctx;
}

static void flash__loaders_cancel(flash_ctx *ctx);

FLASH_API void flash_ctx_destroy(flash_ctx *ctx) {
    flash__zombie *z;
    if (!ctx) return;
    if (ctx->task_current) { /* its own stack is one of ours */
        flash_ctx_log(ctx, FLASH_LOG_ERROR, "flash_ctx_destroy from inside one of the context's tasks: refused");
        return;
    }
    flash__tasks_cancel(ctx);
    flash__loaders_cancel(ctx);
    flash__engine_reset(ctx, true);
    flash__writes_cancel(ctx);
    flash__loaders_release(ctx);
    flash__cancel_drain(ctx);
    flash__release_later(ctx);
    /* Nothing of ours may run after this: drop what is queued unrun. */
    flash_loop_kit_close(&ctx->qloop->kit, NULL);
    flash__free_blocks(ctx, ctx->blocks);
    flash__free_blocks(ctx, ctx->spare);
    while ((z = ctx->zombies) != NULL) {
        ctx->zombies = z->next;
        flash__free_blocks(ctx, z->blocks);
        flash__sys_free(ctx, z);
    }
    flash__sys_free(ctx, ctx->ready);
    flash__sys_free(ctx, ctx->work);
    flash__sys_free(ctx, ctx->sources);
    flash__sys_free(ctx, ctx->prefix);
    flash__kheads_free(ctx);
    {
        size_t i;
        for (i = 0; i < sizeof ctx->spare_tables / sizeof ctx->spare_tables[0]; i++)
            flash__sys_free(ctx, ctx->spare_tables[i]);
    }
    flash__sys_free(ctx, ctx->qloop);
    flash__tasks_free(ctx);
    ctx->desc.allocator.free(ctx, ctx->desc.allocator.user_data);
}

FLASH_API void flash_ctx_reset(flash_ctx *ctx) {
    if (!ctx) return;
    flash__tasks_cancel(ctx);
    flash__engine_reset(ctx, false);
    flash__loaders_cancel(ctx);
    flash__loaders_release(ctx);
    ctx->ready_head = ctx->ready_tail = 0;
    ctx->open_first = ctx->open_last = NULL;
    ctx->inflight = 0;
    flash__arena_release(ctx);
    flash__tasks_trim(ctx);
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
    uint8_t eflags;     /* memo entries: FLASH__E_* */
    int32_t error;
    union {
        void *value;
        const char *message;
    } u;
    flash__cb first;    /* inline slot: most promises have one waiter */
};

static const char flash__empty[] = "";

static void flash__ready_push(flash_ctx *ctx, flash_promise *p, flash__cb *cb) {
    if (ctx->ready_tail == ctx->ready_cap) {
        size_t cap = ctx->ready_cap ? ctx->ready_cap * 2 : 256;
        flash__ready *t = (flash__ready *)flash__sys_alloc(ctx, cap * sizeof *t);
        if (!t) {
            /* Cannot queue: run now rather than lose the callback. */
            if (cb) {
                if (cb->is_priv) cb->fn.priv(ctx, p, cb->arg, cb->idx);
                else cb->fn.pub(ctx, p, cb->arg);
            }
            return;
        }
        if (ctx->ready_tail - ctx->ready_head)
            memcpy(t, ctx->ready + ctx->ready_head, (ctx->ready_tail - ctx->ready_head) * sizeof *t);
        ctx->ready_tail -= ctx->ready_head;
        ctx->ready_head = 0;
        flash__sys_free(ctx, ctx->ready);
        ctx->ready = t;
        ctx->ready_cap = cap;
    }
    ctx->ready[ctx->ready_tail].p = p;
    ctx->ready[ctx->ready_tail].cb = cb;
    ctx->ready_tail++;
}

static bool flash__schedule_drain(flash_ctx *ctx);

static void flash__call_cb(flash_ctx *ctx, flash_promise *p, flash__cb *cb);

/* An internal callback (gather, follow) waiting to run. */
typedef struct flash__work {
    flash_promise *p;
    flash__cb cb;
} flash__work;

/* Run the internal callbacks of settled promises. They only record an
   outcome (and may settle further promises): the outermost settle runs
   them all from this list, so that long chains never recurse. */
static void flash__work_run(flash_ctx *ctx) {
    if (ctx->working) return;
    ctx->working = true;
    while (ctx->work_head < ctx->work_tail) {
        flash__work w = ctx->work[ctx->work_head++];
        w.cb.fn.priv(ctx, w.p, w.cb.arg, w.cb.idx);
    }
    ctx->work_head = ctx->work_tail = 0;
    ctx->working = false;
}

static void flash__work_add(flash_ctx *ctx, flash_promise *p, const flash__cb *cb) {
    if (ctx->work_tail == ctx->work_cap) {
        size_t cap = ctx->work_cap ? ctx->work_cap * 2 : 64, live = ctx->work_tail - ctx->work_head;
        flash__work *w = (flash__work *)flash__sys_alloc(ctx, cap * sizeof *w);
        if (!w) { /* out of memory: run it now rather than lose it */
            cb->fn.priv(ctx, p, cb->arg, cb->idx);
            return;
        }
        if (live) memcpy(w, ctx->work + ctx->work_head, live * sizeof *w);
        flash__sys_free(ctx, ctx->work);
        ctx->work = w;
        ctx->work_cap = cap;
        ctx->work_head = 0;
        ctx->work_tail = live;
    }
    ctx->work[ctx->work_tail].p = p;
    ctx->work[ctx->work_tail].cb = *cb;
    ctx->work_tail++;
}

/* p was just settled. Its user callbacks go to the queue, in the order they
   were added (never run inside flash_resolve); its internal callbacks run
   now, after those are queued, so that a gather sees rejections in the
   order they happened and settles after the callbacks added before it. */
/* A promise a gather holds more than once: position i takes p's value
   when the gather completes (one callback per promise, not per position). */
typedef struct flash__gdup {
    struct flash__gdup *next;
    flash_promise *p;
    size_t i;
} flash__gdup;

typedef struct flash__gather {
    flash_promise out;
    size_t remaining;
    bool settled_form;
    void **values;           /* gather */
    flash_settled *settled;  /* gather_settled */
    flash__gdup *dups;       /* gather: repeated pending promises */
} flash__gather;

/* A values gather's last promise fulfilled: fill the repeated positions,
   then fulfil. */
static void flash__gather_done(flash_ctx *ctx, flash__gather *g);

static void flash__gather_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t i);
static void flash__gather_settled_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t i);

/* The settle of fulfilled p when it needs nothing run: nobody waits, or
   its only waiter is a gather it is not the last promise of (the value is
   recorded in place, what flash__gather_cb does, without the indirect
   call; it settles nothing, so needs no work list). False: not done. */
static inline bool flash__settle_quick(flash_promise *p, void *value) {
    flash__cb *c = &p->first;
    flash__gather *g;
    if (p->has_more) return false;
    if (!c->fn.pub) return true; /* nobody waits */
    if (c->fn.priv != flash__gather_cb) return false;
    g = (flash__gather *)c->arg;
    if (g->remaining < 2) return false;
    g->values[c->idx] = value;
    g->remaining--;
    c->fn.pub = NULL;
    return true;
}

static FLASH__NOINLINE void flash__settle_more(flash_ctx *ctx, flash_promise *p);
static inline void flash__settle(flash_ctx *ctx, flash_promise *p) {
    if (FLASH__LIKELY(!p->has_more)) {
        flash__cb *c = &p->first;
        if (p->state == FLASH_FULFILLED && flash__settle_quick(p, p->u.value)) return;
        if (!c->fn.pub) return; /* nobody waits */
        if (!c->is_inline) { /* the common user case */
            flash__ready_push(ctx, p, NULL);
            if (!ctx->depth) flash__schedule_drain(ctx);
            return;
        }
        if (!ctx->working) { /* one internal callback (a gather's): run it at once */
            flash__cbfn fn = c->fn.priv;
            c->fn.pub = NULL;
            ctx->working = true; /* settles it causes go to the work list */
            fn(ctx, p, c->arg, c->idx);
            ctx->working = false;
            if (ctx->work_tail) flash__work_run(ctx);
            return;
        }
    }
    flash__settle_more(ctx, p);
}

/* flash__settle with more than one callback, or from inside an internal one. */
static FLASH__NOINLINE void flash__settle_more(flash_ctx *ctx, flash_promise *p) {
    flash__cb first, *more, *rev = NULL;
    first = p->first;
    more = p->has_more ? p->first.next : NULL;
    p->first.fn.pub = NULL;
    p->has_more = 0;
    while (more) { /* the extra ones are kept newest-first */
        flash__cb *n = more->next;
        more->next = rev;
        rev = more;
        more = n;
    }
    if (!first.is_inline) {
        flash__cb *copy = (flash__cb *)flash__alloc(ctx, sizeof *copy);
        if (copy) {
            *copy = first;
            flash__ready_push(ctx, p, copy);
        } else {
            flash__call_cb(ctx, p, &first); /* out of memory: now rather than never */
        }
    }
    for (more = rev; more; more = more->next)
        if (!more->is_inline) flash__ready_push(ctx, p, more);
    if (!ctx->depth && ctx->ready_head < ctx->ready_tail) flash__schedule_drain(ctx);
    if (ctx->working) { /* inside another settle's internal callbacks: later */
        if (first.is_inline) flash__work_add(ctx, p, &first);
        for (more = rev; more; more = more->next)
            if (more->is_inline) flash__work_add(ctx, p, more);
        return;
    }
    ctx->working = true;
    if (first.is_inline) first.fn.priv(ctx, p, first.arg, first.idx);
    for (more = rev; more; more = more->next)
        if (more->is_inline) more->fn.priv(ctx, p, more->arg, more->idx);
    ctx->working = false;
    flash__work_run(ctx);
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
        flash__ready_push(ctx, p, cb);
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
    p->eflags = 0;
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

/* A gather's callback: flash__gather_cb for flash_gather (the form that
   flash__settle records in place), flash__gather_settled_cb for
   flash_gather_settled. */
static void flash__gather_settled_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t i) {
    flash__gather *g = (flash__gather *)arg;
    flash_settled *s = &g->settled[i];
    s->state = (flash_state)p->state;
    s->error = p->state == FLASH_REJECTED ? p->error : 0;
    s->value = p->state == FLASH_FULFILLED ? p->u.value : NULL;
    s->message = p->state == FLASH_REJECTED ? p->u.message : flash__empty;
    if (--g->remaining == 0 && g->out.state == FLASH_PENDING) flash__fulfil(ctx, &g->out, g->settled);
}

static void flash__gather_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t i) {
    flash__gather *g = (flash__gather *)arg;
    if (g->settled_form) {
        flash__gather_settled_cb(ctx, p, arg, i);
        return;
    }
    if (FLASH__LIKELY(p->state == FLASH_FULFILLED)) {
        g->values[i] = p->u.value;
        if (FLASH__UNLIKELY(--g->remaining == 0) && g->out.state == FLASH_PENDING) flash__gather_done(ctx, g);
        return;
    }
    if (g->out.state == FLASH_PENDING) flash__fail(ctx, &g->out, p->error, p->u.message);
    if (--g->remaining == 0 && g->out.state == FLASH_PENDING) flash__gather_done(ctx, g);
}

static void flash__gather_done(flash_ctx *ctx, flash__gather *g) {
    flash__gdup *d;
    for (d = g->dups; d; d = d->next) g->values[d->i] = d->p->u.value;
    flash__fulfil(ctx, &g->out, g->values);
}

/* Position i of g waits for pending p too: g is p's only waiter already
   (at an earlier position), so i is filled when g completes. False: out
   of memory. */
static FLASH__NOINLINE bool flash__gather_dup(flash_ctx *ctx, flash__gather *g, flash_promise *p, size_t i) {
    flash__gdup *d = (flash__gdup *)flash__alloc(ctx, sizeof *d);
    if (!d) return false;
    d->p = p;
    d->i = i;
    d->next = g->dups;
    g->dups = d;
    g->remaining--; /* never 0 here: the +1 of flash__gather_alloc */
    return true;
}

/* Position i of g rejected with code, through a stand-in promise (a NULL
   promise in the array, or no memory for the callback). */
static void flash__gather_reject_at(flash_ctx *ctx, flash__gather *g, size_t i, flash__cbfn cb, int code,
                                    const char *message) {
    flash_promise stand_in;
    flash__promise_init(&stand_in);
    stand_in.state = FLASH_REJECTED;
    stand_in.error = code;
    stand_in.u.message = message;
    cb(ctx, &stand_in, g, i);
}

/* Position i of g waits for p: every case (flash__gather_new's loop takes
   the usual ones itself). */
static void flash__gather_join(flash_ctx *ctx, flash__gather *g, flash_promise *p, size_t i, flash__cbfn cb) {
    if (!p) {
        flash__gather_reject_at(ctx, g, i, cb, FLASH_EINVAL, flash_promise_message(NULL));
    } else if (p->state != FLASH_PENDING) {
        cb(ctx, p, g, i); /* settled already: record it now */
    } else if (!p->first.fn.pub && !p->has_more) {
        /* The gather is the promise's only waiter. */
        p->first.fn.priv = cb;
        p->first.is_priv = 1;
        p->first.is_inline = 1;
        p->first.arg = g;
        p->first.idx = (uint32_t)i;
    } else if (flash__add_cb(ctx, p, NULL, cb, g, (uint32_t)i, true) != FLASH_OK) {
        flash__gather_reject_at(ctx, g, i, cb, FLASH_ENOMEM, flash_strerror(FLASH_ENOMEM));
    }
}

/* A gather of n promises, none joined yet (remaining n + 1). */
static flash__gather *flash__gather_alloc(flash_ctx *ctx, size_t n, bool settled_form) {
    flash__gather *g = (flash__gather *)flash__alloc(ctx, sizeof *g);
    if (!g) return NULL;
    flash__promise_init(&g->out);
    g->settled_form = settled_form;
    g->remaining = n + 1; /* +1 so nothing completes before every callback is in */
    g->values = NULL;
    g->settled = NULL;
    g->dups = NULL;
    /* Not zeroed: every slot is written before the array is handed out. */
    if (settled_form) g->settled = (flash_settled *)flash__alloc(ctx, (n ? n : 1) * sizeof *g->settled);
    else g->values = (void **)flash__alloc(ctx, (n ? n : 1) * sizeof *g->values);
    return g->values || g->settled ? g : NULL;
}

/* The values form's join of position i, the usual cases inline: a
   pending promise nobody waits for, one this gather already waits for at
   an earlier position, a fulfilled one (counted in *done, taken off
   remaining by the caller). */
static FLASH__ALWAYS_INLINE void flash__gather_join_values(flash_ctx *ctx, flash__gather *g, flash_promise *p,
                                                           size_t i, uint16_t fulfilled, size_t *done) {
    uint16_t busy; /* state and has_more as one word */
    if (FLASH__LIKELY(p != NULL)) {
        memcpy(&busy, &p->state, sizeof busy);
        if (FLASH__LIKELY(busy == 0)) {
            if (FLASH__LIKELY(!p->first.fn.pub)) {
                /* The usual case: the gather is the promise's only waiter. */
                p->first.fn.priv = flash__gather_cb;
                p->first.is_priv = 1;
                p->first.is_inline = 1;
                p->first.arg = g;
                p->first.idx = (uint32_t)i;
                return;
            }
            /* The same promise again (a key loaded twice): no second callback. */
            if (p->first.fn.priv == flash__gather_cb && p->first.arg == g && flash__gather_dup(ctx, g, p, i)) return;
        } else if (busy == fulfilled) {
            g->values[i] = p->u.value; /* settled already (a memo hit): record it now */
            ++*done;
            return;
        }
    }
    flash__gather_join(ctx, g, p, i, flash__gather_cb);
}

/* The last step of a gather: every position joined. */
static void flash__gather_close(flash_ctx *ctx, flash__gather *g, size_t done) {
    g->remaining -= done + 1; /* done < remaining: the +1 of flash__gather_alloc */
    if (g->remaining == 0 && g->out.state == FLASH_PENDING) {
        if (g->settled_form) flash__fulfil(ctx, &g->out, g->settled);
        else flash__gather_done(ctx, g);
    }
}

/* state and has_more of a fulfilled promise with no callback queued, as
   flash__gather_join_values reads them. */
static inline uint16_t flash__fulfilled_word(void) {
    static const uint8_t bytes[2] = {FLASH_FULFILLED, 0};
    uint16_t w;
    memcpy(&w, bytes, sizeof w);
    return w;
}

static flash_promise *flash__gather_new(flash_ctx *ctx, size_t n, flash_promise *const *ps, bool settled_form) {
    flash__gather *g;
    size_t i, done = 0; /* memo hits recorded: taken off remaining at the end */
    if (!ctx) return NULL;
    if (n && !ps) return flash_rejected(ctx, FLASH_EINVAL, "gather: NULL promise array");
    if (n > UINT32_MAX) return flash_rejected(ctx, FLASH_EINVAL, "gather: too many promises");
    if (!(g = flash__gather_alloc(ctx, n, settled_form))) return NULL;
    if (settled_form) {
        for (i = 0; i < n; i++) flash__gather_join(ctx, g, ps[i], i, flash__gather_settled_cb);
    } else {
        uint16_t fulfilled = flash__fulfilled_word();
        for (i = 0; i < n; i++) flash__gather_join_values(ctx, g, ps[i], i, fulfilled, &done);
    }
    flash__gather_close(ctx, g, done);
    return &g->out;
}

FLASH_API flash_promise *flash_gather(flash_ctx *ctx, size_t n, flash_promise *const *ps) {
    return flash__gather_new(ctx, n, ps, false);
}
FLASH_API flash_promise *flash_gather_settled(flash_ctx *ctx, size_t n, flash_promise *const *ps) {
    return flash__gather_new(ctx, n, ps, true);
}

/* ---- 3b. tasks ------------------------------------------------------------ */

#ifndef FLASH_NO_TASKS

#include <sys/mman.h>
#include <unistd.h>

/* -- the switch: a saved context, how to make one, how to switch -- */
#if defined(FLASH_TASK_CONTEXT) && defined(FLASH_TASK_MAKE) && defined(FLASH_TASK_SWITCH)
typedef FLASH_TASK_CONTEXT flash__tctx;
#define FLASH__TMAKE(c, lo, size, fn, arg) FLASH_TASK_MAKE(c, lo, size, fn, arg)
#define FLASH__TSWITCH(from, to) FLASH_TASK_SWITCH(from, to)
#define FLASH__TASK_SWITCH_NAME "user"

#elif !defined(FLASH_TASK_UCONTEXT) && defined(__ELF__) && (defined(__x86_64__) || defined(__aarch64__)) && \
    !(defined(__CET__) && (__CET__ & 2))
/* (With CET shadow stacks, -fcf-protection=return or full, a switch must
   switch shadow stacks too: those builds use ucontext, which glibc makes
   do so.) */
/* A suspended context is its stack pointer: the switch pushes the callee-
   saved state on the stack it leaves and pops it from the one it enters. */
typedef struct flash__tctx {
    void *sp;
} flash__tctx;
#ifdef __cplusplus
extern "C" {
#endif
__attribute__((visibility("hidden"))) void flash__tswitch(void **save_sp, void *to_sp);
__attribute__((visibility("hidden"))) void flash__tboot(void);
#ifdef __cplusplus
}
#endif
#if defined(__x86_64__)
/* System V: rbx, rbp, r12-r15, MXCSR and the x87 control word; the two
   control words are loaded only when they differ from the current ones
   (ldmxcsr and fldcw stall; they almost never differ). A new stack enters
   flash__tboot with the task in r12 and its entry in r13. The switch leaves
   by pop + jmp rather than ret: ret would always be mispredicted (it returns
   to another stack's call site), the indirect jump is predicted (spawn 48 ->
   30 ns, await/resume 60 -> 52 ns here). Under CET's indirect-branch
   tracking the jump's targets would need endbr64, so such builds use ret;
   endbr64 marks both entries. */
#if defined(__CET__)
#define FLASH__TRET "  ret\n"
#else
#define FLASH__TRET "  popq %rdx\n  jmp *%rdx\n"
#endif
__asm__(".text\n"
        ".globl flash__tswitch\n.hidden flash__tswitch\n.type flash__tswitch,@function\n.p2align 4\n"
        "flash__tswitch:\n"
        "  endbr64\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movl (%rsp), %eax\n  movzwl 4(%rsp), %ecx\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  cmpl (%rsp), %eax\n  je 1f\n  ldmxcsr (%rsp)\n1:\n"
        "  cmpw 4(%rsp), %cx\n  je 2f\n  fldcw 4(%rsp)\n2:\n"
        "  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        FLASH__TRET
        ".size flash__tswitch,.-flash__tswitch\n"
        ".globl flash__tboot\n.hidden flash__tboot\n.type flash__tboot,@function\n.p2align 4\n"
        "flash__tboot:\n"
        "  endbr64\n"
        "  movq %r12, %rdi\n"
        "  callq *%r13\n"
        "  ud2\n"
        ".size flash__tboot,.-flash__tboot\n");
static void flash__tmake(flash__tctx *c, char *lo, size_t size, void (*fn)(void *), void *arg) {
    /* Top: a 128-byte red zone, 16-aligned; then the frame the switch pops
       (control words, r15..r12, rbx, rbp, the return into flash__tboot) and a
       null return address for unwinders, so that flash__tboot's call enters
       fn with the ABI's alignment. */
    uintptr_t top = ((uintptr_t)(lo + size) - 128) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 80);
    uint32_t mxcsr;
    uint16_t fpucw;
    __asm__ __volatile__("stmxcsr %0" : "=m"(mxcsr));
    __asm__ __volatile__("fnstcw %0" : "=m"(fpucw));
    memset(sp, 0, 80);
    memcpy(sp, &mxcsr, 4);
    memcpy((char *)sp + 4, &fpucw, 2);
    sp[3] = (uint64_t)(uintptr_t)fn;  /* r13 */
    sp[4] = (uint64_t)(uintptr_t)arg; /* r12 */
    sp[7] = (uint64_t)(uintptr_t)flash__tboot;
    c->sp = sp;
}
#define FLASH__TASK_SWITCH_NAME "x86-64 assembly"
#else
/* AAPCS64: x19-x30 (x29 frame, x30 return), sp, d8-d15 and FPCR. A new
   stack enters flash__tboot with the task in x19 and its entry in x20. */
__asm__(".text\n"
        ".globl flash__tswitch\n.hidden flash__tswitch\n.type flash__tswitch,%function\n.p2align 4\n"
        "flash__tswitch:\n"
        "  sub sp, sp, #176\n"
        "  stp x19, x20, [sp, #0]\n  stp x21, x22, [sp, #16]\n  stp x23, x24, [sp, #32]\n"
        "  stp x25, x26, [sp, #48]\n  stp x27, x28, [sp, #64]\n  stp x29, x30, [sp, #80]\n"
        "  stp d8, d9, [sp, #96]\n  stp d10, d11, [sp, #112]\n  stp d12, d13, [sp, #128]\n"
        "  stp d14, d15, [sp, #144]\n"
        "  mrs x9, fpcr\n  str x9, [sp, #160]\n"
        "  mov x9, sp\n  str x9, [x0]\n"
        "  mov sp, x1\n"
        "  ldp x19, x20, [sp, #0]\n  ldp x21, x22, [sp, #16]\n  ldp x23, x24, [sp, #32]\n"
        "  ldp x25, x26, [sp, #48]\n  ldp x27, x28, [sp, #64]\n  ldp x29, x30, [sp, #80]\n"
        "  ldp d8, d9, [sp, #96]\n  ldp d10, d11, [sp, #112]\n  ldp d12, d13, [sp, #128]\n"
        "  ldp d14, d15, [sp, #144]\n"
        "  ldr x9, [sp, #160]\n  msr fpcr, x9\n"
        "  add sp, sp, #176\n"
        "  ret\n"
        ".size flash__tswitch,.-flash__tswitch\n"
        ".globl flash__tboot\n.hidden flash__tboot\n.type flash__tboot,%function\n.p2align 4\n"
        "flash__tboot:\n"
        "  mov x0, x19\n"
        "  blr x20\n"
        "  brk #0\n"
        ".size flash__tboot,.-flash__tboot\n");
static void flash__tmake(flash__tctx *c, char *lo, size_t size, void (*fn)(void *), void *arg) {
    uintptr_t top = ((uintptr_t)(lo + size) - 16) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 176), fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    memset(sp, 0, 176);
    sp[0] = (uint64_t)(uintptr_t)arg;          /* x19 */
    sp[1] = (uint64_t)(uintptr_t)fn;           /* x20 */
    sp[11] = (uint64_t)(uintptr_t)flash__tboot; /* x30 */
    sp[20] = fpcr;
    c->sp = sp;
}
#define FLASH__TASK_SWITCH_NAME "AArch64 assembly"
#endif
#define FLASH__TMAKE(c, lo, size, fn, arg) flash__tmake(c, lo, size, fn, arg)
#define FLASH__TSWITCH(from, to) flash__tswitch(&(from)->sp, (to)->sp)

#else
/* Portable: ucontext (glibc's swapcontext also saves the signal mask, a
   system call per switch: the fallback only). */
#include <ucontext.h>
typedef ucontext_t flash__tctx;
static void flash__coro_entry(void *arg);
/* makecontext passes ints: the task pointer goes in two halves. */
static void flash__uc_boot(unsigned hi, unsigned lo) {
    flash__coro_entry((void *)(((uintptr_t)hi << 16 << 16) | (uintptr_t)lo));
}
static void flash__uc_make(ucontext_t *c, char *lo, size_t size, void *arg) {
    uintptr_t p = (uintptr_t)arg;
    getcontext(c);
    c->uc_stack.ss_sp = lo;
    c->uc_stack.ss_size = size;
    c->uc_link = NULL;
    makecontext(c, (void (*)(void))flash__uc_boot, 2, (unsigned)(p >> 16 >> 16), (unsigned)(p & 0xffffffffu));
}
#define FLASH__TMAKE(c, lo, size, fn, arg) flash__uc_make(c, lo, size, arg) /* fn: always flash__coro_entry */
#define FLASH__TSWITCH(from, to) swapcontext(from, to)
#define FLASH__TASK_SWITCH_NAME "ucontext"
#endif

enum { FLASH__T_FREE = 0, FLASH__T_RUNNING, FLASH__T_SUSPENDED, FLASH__T_DONE };

typedef struct flash__coro flash__coro;
struct flash__coro {
    flash__coro *next, *prev;   /* the live list (spawn order), or the free list */
    flash_ctx *ctx;
    char *stack;                /* usable area: [stack, stack + stack_size) */
    size_t stack_size;
    flash__tctx self, back;     /* the task's saved context; its resumer's */
    flash_task_fn fn;
    void *arg, *result;
    flash_promise *promise;
    flash_promise *waiting;     /* the promise of the pending await */
    uint32_t serial;            /* of the pending await: stale wakes are ignored */
    int rc, last_error;
    const char *last_message;   /* of the last failed await */
    uint64_t gen;
    uint8_t state;
    bool canceled;
#ifdef FLASH__VALGRIND
    unsigned vg_stack;
#endif
#ifdef FLASH__ASAN
    void *fake;                 /* the task's fake stack while suspended */
    const void *back_bottom;    /* the resumer's stack */
    size_t back_size;
#endif
#ifdef FLASH__TSAN
    void *fiber, *back_fiber;
#endif
};


/* Stacks come in slabs of one mapping: [guard | stack] [guard | stack] ... */
typedef struct flash__tslab {
    struct flash__tslab *next;
    char *base;
    size_t len, count;
    flash__coro coros[1];
} flash__tslab;

static size_t flash__page_size(void) {
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* A guard page that faults: MADV_GUARD_INSTALL (Linux 6.13) marks it in the
   page tables without splitting the mapping, so 100,000 stacks stay far
   below vm.max_map_count; older kernels get mprotect (two mappings per
   stack). */
static bool flash__guard_page(char *p, size_t page) {
#if defined(__linux__)
    if (madvise(p, page, 102 /* MADV_GUARD_INSTALL */) == 0) return true;
#endif
    return mprotect(p, page, PROT_NONE) == 0;
}

static void flash__tslab_unmap(flash_ctx *ctx, flash__tslab *sl) {
    size_t i;
    for (i = 0; i < sl->count; i++) {
#ifdef FLASH__VALGRIND
        VALGRIND_STACK_DEREGISTER(sl->coros[i].vg_stack);
#endif
#ifdef FLASH__TSAN
        if (sl->coros[i].fiber) __tsan_destroy_fiber(sl->coros[i].fiber);
#endif
    }
    munmap(sl->base, sl->len);
    flash__sys_free(ctx, sl);
}

/* Map a slab: 8 stacks, then twice as many as the context has, up to 256. */
static bool flash__tslab_new(flash_ctx *ctx) {
    size_t page = flash__page_size(), usable = (ctx->desc.task_stack + page - 1) / page * page, per = usable + page;
    size_t n = ctx->task_stack_count < 8 ? 8 : ctx->task_stack_count, i;
    flash__tslab *sl;
    char *base;
    if (n > 256) n = 256;
    sl = (flash__tslab *)flash__sys_alloc(ctx, sizeof *sl + (n - 1) * sizeof(flash__coro));
    if (!sl) return false;
    base = (char *)mmap(NULL, n * per, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                        -1, 0);
    if (base == (char *)MAP_FAILED) {
        flash__sys_free(ctx, sl);
        return false;
    }
    memset(sl->coros, 0, n * sizeof(flash__coro));
    sl->base = base;
    sl->len = n * per;
    sl->count = 0;
    for (i = 0; i < n; i++) {
        flash__coro *t = &sl->coros[i];
        if (!flash__guard_page(base + i * per, page)) break;
        t->ctx = ctx;
        t->stack = base + i * per + page;
        t->stack_size = usable;
#ifdef FLASH__VALGRIND
        t->vg_stack = VALGRIND_STACK_REGISTER(t->stack, t->stack + usable);
#endif
        sl->count++;
    }
    if (!sl->count) {
        flash__tslab_unmap(ctx, sl);
        return false;
    }
    for (i = sl->count; i-- > 0;) {
        sl->coros[i].next = ctx->task_free;
        ctx->task_free = &sl->coros[i];
    }
    sl->next = ctx->task_slabs;
    ctx->task_slabs = sl;
    ctx->task_stack_count += sl->count;
    ctx->stats.task_stacks += sl->count;
    return true;
}

static void flash__tasks_free(flash_ctx *ctx) {
    while (ctx->task_slabs) {
        flash__tslab *sl = ctx->task_slabs;
        ctx->task_slabs = sl->next;
        flash__tslab_unmap(ctx, sl);
    }
    ctx->task_free = NULL;
}

/* After a burst: unmap whole free slabs, newest first, while more than
   task_retain stacks are mapped, so that one request with 100,000 tasks
   does not keep their memory for the context's life. Steady traffic below
   task_retain never maps again. */
static void flash__tasks_trim(flash_ctx *ctx) {
    flash__tslab **pp = &ctx->task_slabs, *sl;
    bool trimmed = false;
    size_t i;
    while (ctx->task_stack_count > ctx->desc.task_retain && (sl = *pp) != NULL) {
        bool all_free = true;
        for (i = 0; i < sl->count && all_free; i++) all_free = sl->coros[i].state == FLASH__T_FREE;
        if (!all_free || ctx->task_stack_count - sl->count < ctx->desc.task_retain / 2) {
            pp = &sl->next; /* in use, or trimming it would leave too few */
            continue;
        }
        *pp = sl->next;
        ctx->task_stack_count -= sl->count;
        flash__tslab_unmap(ctx, sl);
        trimmed = true;
    }
    if (!trimmed) return;
    ctx->task_free = NULL; /* rebuilt from the slabs left, oldest slab's stacks on top */
    for (sl = ctx->task_slabs; sl; sl = sl->next)
        for (i = sl->count; i-- > 0;)
            if (sl->coros[i].state == FLASH__T_FREE) {
                sl->coros[i].next = ctx->task_free;
                ctx->task_free = &sl->coros[i];
            }
}

static void flash__coro_entry(void *arg);

/* Switch into t until it awaits or returns. The caller's stack is what t
   switches back to, whoever the caller is (the loop's drain, another task,
   flash_spawn's caller). */
static void flash__coro_resume(flash_ctx *ctx, flash__coro *t) {
    flash__coro *outer = ctx->task_current;
#ifdef FLASH__ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, t->stack, t->stack_size);
#endif
#ifdef FLASH__TSAN
    t->back_fiber = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(t->fiber, 0);
#endif
    t->state = FLASH__T_RUNNING;
    ctx->task_current = t;
    ctx->stats.task_switches++;
    FLASH__TSWITCH(&t->back, &t->self);
#ifdef FLASH__ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
    ctx->task_current = outer;
}

/* Back to whoever resumed t; returns when t is resumed again. */
static void flash__coro_suspend(flash__coro *t) {
    t->state = FLASH__T_SUSPENDED;
#ifdef FLASH__ASAN
    __sanitizer_start_switch_fiber(&t->fake, t->back_bottom, t->back_size);
#endif
#ifdef FLASH__TSAN
    __tsan_switch_to_fiber(t->back_fiber, 0);
#endif
    FLASH__TSWITCH(&t->self, &t->back);
#ifdef FLASH__ASAN
    __sanitizer_finish_switch_fiber(t->fake, &t->back_bottom, &t->back_size);
#endif
}

static void flash__coro_entry(void *arg) {
    flash__coro *t = (flash__coro *)arg;
#ifdef FLASH__ASAN
    __sanitizer_finish_switch_fiber(NULL, &t->back_bottom, &t->back_size);
#endif
    t->rc = t->fn(t->ctx, t->arg, &t->result);
    t->state = FLASH__T_DONE;
#ifdef FLASH__ASAN
    __sanitizer_start_switch_fiber(NULL, t->back_bottom, t->back_size); /* NULL: this stack is done */
#endif
#ifdef FLASH__TSAN
    __tsan_switch_to_fiber(t->back_fiber, 0);
#endif
    FLASH__TSWITCH(&t->self, &t->back);
    abort(); /* a finished task is never resumed */
}

/* t returned: settle its promise (unless its request is gone), give the
   stack back. Runs on the resumer's stack. */
static void flash__coro_finish(flash_ctx *ctx, flash__coro *t) {
    flash_promise *p = t->promise;
    *(t->prev ? &t->prev->next : &ctx->task_live) = t->next;
    *(t->next ? &t->next->prev : &ctx->task_live_last) = t->prev;
    ctx->task_nlive--;
    if (t->gen == ctx->gen) {
        if (!t->rc) flash__fulfil(ctx, p, t->result);
        else flash__fail(ctx, p, t->rc, t->rc == t->last_error ? t->last_message : flash_strerror(t->rc));
    } else { /* outlived its request (it reset the context): no callbacks */
        p->state = FLASH_REJECTED;
        p->error = FLASH_ECANCELED;
        p->u.message = flash_strerror(FLASH_ECANCELED);
    }
    flash__unhold(ctx, t->gen);
    t->state = FLASH__T_FREE;
    t->promise = t->waiting = NULL;
    t->next = ctx->task_free;
    t->prev = NULL;
    ctx->task_free = t;
}

static void flash__coro_run(flash_ctx *ctx, flash__coro *t) {
    flash__coro_resume(ctx, t);
    if (t->state == FLASH__T_DONE) flash__coro_finish(ctx, t);
}

FLASH_API flash_promise *flash_spawn(flash_ctx *ctx, flash_task_fn fn, void *arg) {
    flash__coro *t;
    flash_promise *p, *out;
    uint64_t gen;
    if (!ctx) return NULL;
    if (!fn) return flash_rejected(ctx, FLASH_EINVAL, "spawn: NULL function");
    if (ctx->task_current && ctx->task_current->canceled)
        return flash_rejected(ctx, FLASH_ECANCELED, "spawn: the spawning task was cancelled");
    if (ctx->task_nlive >= ctx->desc.max_tasks) {
        out = flash_rejected(ctx, FLASH_ENOMEM, NULL);
        if (out) out->u.message = flash_sprintf(ctx, "spawn: %u tasks alive, the context's max_tasks", ctx->desc.max_tasks);
        if (out && !out->u.message) out->u.message = flash_strerror(FLASH_ENOMEM);
        return out;
    }
    if (!ctx->task_free && !flash__tslab_new(ctx))
        return flash_rejected(ctx, FLASH_ENOMEM, "spawn: no memory for a task stack (mmap failed)");
    if ((p = flash_promise_new(ctx)) == NULL) return NULL;
    t = ctx->task_free;
    ctx->task_free = t->next;
    t->fn = fn;
    t->arg = arg;
    t->result = NULL;
    t->promise = p;
    t->waiting = NULL;
    t->rc = t->last_error = 0;
    t->last_message = NULL;
    t->canceled = false;
    t->gen = flash__hold(ctx);
#ifdef FLASH__TSAN
    if (!t->fiber) t->fiber = __tsan_create_fiber(0);
#endif
    FLASH__TMAKE(&t->self, t->stack, t->stack_size, flash__coro_entry, t);
    t->next = NULL;
    t->prev = ctx->task_live_last;
    *(t->prev ? &t->prev->next : &ctx->task_live) = t;
    ctx->task_live_last = t;
    ctx->task_nlive++;
    ctx->stats.tasks++;
    gen = flash__hold(ctx); /* p must outlive a reset made by the task itself */
    flash__coro_run(ctx, t);
    out = p;
    if (ctx->gen != gen) out = flash_rejected(ctx, FLASH_ECANCELED, "spawn: the task reset its context");
    flash__unhold(ctx, gen);
    return out;
}

/* p settled: resume the task awaiting it (from the ready queue, never
   inside the settle). */
static void flash__coro_wake(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t serial) {
    flash__coro *t = (flash__coro *)arg;
    if (t->state != FLASH__T_SUSPENDED || t->waiting != p || t->serial != (uint32_t)serial) return;
    flash__coro_run(ctx, t);
}

FLASH_API int flash_await(flash_ctx *ctx, flash_promise *p, void **value) {
    flash__coro *t;
    if (value) *value = NULL;
    if (!ctx || !p) return FLASH_EINVAL;
    if ((t = ctx->task_current) == NULL) return flash_wait(ctx, p, value);
    if (t->canceled) return FLASH_ECANCELED;
    if (p == t->promise) return FLASH_ESTATE; /* it settles when this task returns */
    if (p->state == FLASH_PENDING) {
        t->waiting = p;
        t->serial++;
        if (!p->first.fn.pub && !p->has_more) { /* the usual case: the only waiter */
            p->first.fn.priv = flash__coro_wake;
            p->first.is_priv = 1;
            p->first.is_inline = 0;
            p->first.arg = t;
            p->first.idx = t->serial;
        } else {
            int rc = flash__add_cb(ctx, p, NULL, flash__coro_wake, t, t->serial, false);
            if (rc != FLASH_OK) {
                t->waiting = NULL;
                return rc;
            }
        }
        flash__coro_suspend(t);
        t->waiting = NULL;
        if (t->canceled) return FLASH_ECANCELED;
    }
    if (p->state == FLASH_FULFILLED) {
        if (value) *value = p->u.value;
        return FLASH_OK;
    }
    t->last_error = p->error;
    t->last_message = p->u.message;
    return p->error;
}

FLASH_API bool flash_in_task(const flash_ctx *ctx) { return ctx && ctx->task_current; }

/* Reset and destroy: every live task is cancelled; the suspended ones run
   now until they return (their awaits give FLASH_ECANCELED), the running
   ones (a reset from inside a task) see it at their next await. */
static void flash__tasks_cancel(flash_ctx *ctx) {
    flash__coro *t;
    for (t = ctx->task_live; t; t = t->next) t->canceled = true;
    for (;;) {
        for (t = ctx->task_live; t && t->state != FLASH__T_SUSPENDED; t = t->next) continue;
        if (!t) break;
        flash__coro_run(ctx, t);
    }
}

#else /* FLASH_NO_TASKS */

FLASH_API flash_promise *flash_spawn(flash_ctx *ctx, flash_task_fn fn, void *arg) {
    (void)fn;
    (void)arg;
    return ctx ? flash_rejected(ctx, FLASH_EUNSUPPORTED, "spawn: built with FLASH_NO_TASKS") : NULL;
}
FLASH_API int flash_await(flash_ctx *ctx, flash_promise *p, void **value) { return flash_wait(ctx, p, value); }
FLASH_API bool flash_in_task(const flash_ctx *ctx) {
    (void)ctx;
    return false;
}
static void flash__tasks_cancel(flash_ctx *ctx) { (void)ctx; }
static void flash__tasks_free(flash_ctx *ctx) { (void)ctx; }
static void flash__tasks_trim(flash_ctx *ctx) { (void)ctx; }
#endif /* FLASH_NO_TASKS */

/* ---- 4. event loop ------------------------------------------------------- */

/* -- the adapter kit -- */

/* Each handle has the pool's link in front of it: the live list (for
   teardown) and, once put back, the free list. The union keeps the handle
   after it aligned as malloc's memory is. */
typedef union flash__pool_link {
    struct {
        union flash__pool_link *prev, *next;
    } l;
    long double ld;
    long long ll;
    void *p;
} flash__pool_link;

#define FLASH__POOL_HANDLE(k) ((void *)((k) + 1))
#define FLASH__POOL_LINK(h) ((flash__pool_link *)(h) - 1)

FLASH_API void flash_handle_pool_init(flash_handle_pool *p, size_t size, const flash_allocator *alloc) {
    if (!p) return;
    memset(p, 0, sizeof *p);
    p->size = sizeof(flash__pool_link) + (size ? size : 1);
    if (alloc && alloc->alloc && alloc->free) {
        p->alloc = *alloc;
    } else {
        p->alloc.alloc = flash__default_alloc;
        p->alloc.free = flash__default_free;
    }
}

FLASH_API void *flash_handle_pool_get(flash_handle_pool *p) {
    flash__pool_link *k;
    if (!p || !p->size) return NULL;
    if (p->spare) {
        k = (flash__pool_link *)p->spare;
        p->spare = k->l.next;
        p->nspare--;
    } else if ((k = (flash__pool_link *)p->alloc.alloc(p->size, p->alloc.user_data)) == NULL) {
        return NULL;
    }
    memset(k, 0, p->size);
    if (!p->untracked) {
        if ((k->l.next = (flash__pool_link *)p->first) != NULL) k->l.next->l.prev = k;
        p->first = k;
    }
    p->live++;
    return FLASH__POOL_HANDLE(k);
}

FLASH_API void flash_handle_pool_put(flash_handle_pool *p, void *h) {
    flash__pool_link *k;
    if (!p || !h) return;
    k = FLASH__POOL_LINK(h);
    if (!p->untracked) {
        *(k->l.prev ? &k->l.prev->l.next : (flash__pool_link **)&p->first) = k->l.next;
        if (k->l.next) k->l.next->l.prev = k->l.prev;
    }
    k->l.next = (flash__pool_link *)p->spare;
    p->spare = k;
    p->nspare++;
    p->live--;
}

FLASH_API void *flash_handle_pool_next_live(const flash_handle_pool *p, const void *h) {
    const flash__pool_link *k;
    if (!p) return NULL;
    k = h ? FLASH__POOL_LINK(h)->l.next : (const flash__pool_link *)p->first;
    return k ? FLASH__POOL_HANDLE(k) : NULL;
}

FLASH_API void flash_handle_pool_clear(flash_handle_pool *p) {
    if (!p) return;
    while (p->spare) {
        flash__pool_link *k = (flash__pool_link *)p->spare;
        p->spare = k->l.next;
        p->alloc.free(k, p->alloc.user_data);
    }
    p->nspare = 0;
}

/* defer()'s nodes come from the queue's pool and are marked by handle ==
   &q->nodes; the pool gets a node back before its call runs (the handle is
   dead once it ran). */
typedef struct flash__dnode {
    flash_defer d;
} flash__dnode;

FLASH_API void flash_defer_queue_init(flash_defer_queue *q, const flash_allocator *alloc) {
    if (!q) return;
    memset(q, 0, sizeof *q);
    flash_handle_pool_init(&q->nodes, sizeof(flash__dnode), alloc);
    q->nodes.untracked = true; /* the queue knows its nodes */
}

/* Nodes of this run come first, then (q->newer on) those of the next; a
   late node posted from inside a run joins the end of this run's. */
FLASH_API bool flash_defer_queue_push(flash_defer_queue *q, flash_defer *d) {
    bool was_empty;
    flash_defer *at = NULL; /* insert before; NULL: append */
    if (!q || !d || d->queued) return false;
    was_empty = q->first == NULL;
    d->pass = q->pass;
    if (q->running) {
        if (d->late && !q->in_late) {
            d->pass = q->pass - 1; /* the run's own pass */
            at = q->newer;
        } else if (!q->newer) {
            q->newer = d;
        }
    }
    d->next = at;
    d->prev = at ? at->prev : q->last;
    *(d->prev ? &d->prev->next : &q->first) = d;
    *(at ? &at->prev : &q->last) = d;
    d->queued = true;
    return was_empty;
}

FLASH_API void flash_defer_queue_remove(flash_defer_queue *q, flash_defer *d) {
    if (!q || !d || !d->queued) return;
    if (q->newer == d) q->newer = d->next;
    *(d->prev ? &d->prev->next : &q->first) = d->next;
    *(d->next ? &d->next->prev : &q->last) = d->prev;
    d->next = d->prev = NULL;
    d->queued = false;
}

FLASH_API void *flash_defer_queue_defer(flash_defer_queue *q, flash_loop_fn fn, void *arg) {
    flash__dnode *n;
    if (!q || !fn || (n = (flash__dnode *)flash_handle_pool_get(&q->nodes)) == NULL) return NULL;
    n->d.fn = fn;
    n->d.arg = arg;
    n->d.handle = &q->nodes;
    flash_defer_queue_push(q, &n->d);
    return n;
}

FLASH_API bool flash_defer_queue_cancel(flash_defer_queue *q, void *handle) {
    flash__dnode *n = (flash__dnode *)handle;
    if (!q || !n || n->d.handle != (void *)&q->nodes) return false;
    if (n->d.queued) {
        flash_defer_queue_remove(q, &n->d);
        flash_handle_pool_put(&q->nodes, n);
    }
    return true;
}

FLASH_API size_t flash_defer_queue_run(flash_defer_queue *q) {
    uint64_t pass;
    size_t ran = 0;
    flash_defer *d;
    bool running, in_late;
    if (!q) return 0;
    /* A run inside a run (a nested flash_wait from a node's fn) takes what
       is queued; what is left after it is all for the outer run's next. */
    running = q->running, in_late = q->in_late;
    pass = q->pass++;
    q->running = true;
    q->newer = NULL;
    while ((d = q->first) != NULL && d->pass <= pass) {
        flash_loop_fn fn = d->fn;
        void *arg = d->arg;
        bool late = d->late;
        flash_defer_queue_remove(q, d);
        /* Pooled nodes go back first: fn may defer again and reuse it. */
        if (d->handle == (void *)&q->nodes) flash_handle_pool_put(&q->nodes, d);
        q->in_late = late;
        fn(arg);
        ran++;
    }
    q->running = running, q->in_late = in_late;
    q->newer = running ? q->first : NULL;
    return ran;
}

FLASH_API bool flash_defer_queue_empty(const flash_defer_queue *q) { return !q || !q->first; }

FLASH_API void flash_defer_queue_clear(flash_defer_queue *q) {
    if (!q) return;
    while (q->first) {
        flash_defer *d = q->first;
        flash_defer_queue_remove(q, d);
        if (d->handle == (void *)&q->nodes) flash_handle_pool_put(&q->nodes, d);
    }
    flash_handle_pool_clear(&q->nodes);
}

/* -- the kit: queue + pool + the vtable's defer half -- */

/* Tell the adapter when the queue turned empty or non-empty; once at the
   end of a run rather than for each node it takes. */
static void flash__kit_sync(flash_loop_kit *k) {
    bool any = k->defers.first != NULL;
    if (any != k->any && !k->running) {
        k->any = any;
        if (k->pending) k->pending(k, any);
    }
}

FLASH_API void flash_loop_kit_init(flash_loop_kit *k, size_t handle_size, const flash_allocator *alloc,
                                   void (*pending)(flash_loop_kit *kit, bool any)) {
    if (!k) return;
    memset(k, 0, sizeof *k);
    flash_defer_queue_init(&k->defers, alloc);
    flash_handle_pool_init(&k->handles, handle_size, alloc);
    k->pending = pending;
}

FLASH_API void flash_loop_kit_post(void *kit, flash_defer *d) {
    flash_loop_kit *k = (flash_loop_kit *)kit;
    flash_defer_queue_push(&k->defers, d);
    flash__kit_sync(k);
}

FLASH_API void flash_loop_kit_unpost(void *kit, flash_defer *d) {
    flash_loop_kit *k = (flash_loop_kit *)kit;
    flash_defer_queue_remove(&k->defers, d);
    flash__kit_sync(k);
}

FLASH_API void *flash_loop_kit_defer(void *kit, flash_loop_fn fn, void *arg) {
    flash_loop_kit *k = (flash_loop_kit *)kit;
    void *h = flash_defer_queue_defer(&k->defers, fn, arg);
    flash__kit_sync(k);
    return h;
}

FLASH_API bool flash_loop_kit_cancel(flash_loop_kit *k, void *handle) {
    if (!flash_defer_queue_cancel(&k->defers, handle)) return false;
    flash__kit_sync(k);
    return true;
}

FLASH_API size_t flash_loop_kit_run(flash_loop_kit *k) {
    size_t ran;
    bool was_running = k->running;
    k->running = true; /* a run inside a run (a nested flash_wait) reports at the outer end */
    ran = flash_defer_queue_run(&k->defers);
    k->running = was_running;
    flash__kit_sync(k);
    return ran;
}

FLASH_API void flash_loop_kit_close(flash_loop_kit *k, void (*drop)(void *handle)) {
    void *h, *next;
    if (!k) return;
    flash_defer_queue_clear(&k->defers);
    k->any = false;
    for (h = flash_handle_pool_next_live(&k->handles, NULL); h; h = next) {
        next = flash_handle_pool_next_live(&k->handles, h);
        if (drop) drop(h);
        else flash_handle_pool_put(&k->handles, h);
    }
    flash_handle_pool_clear(&k->handles);
}

/* -- posting through any loop -- */

/* A loop without post ran our defer or timer. */
static void flash__defer_fire(void *arg) {
    flash_defer *d = (flash_defer *)arg;
    d->queued = false;
    d->handle = NULL;
    d->fn(d->arg);
}

FLASH_API int flash_loop_post(flash_loop loop, flash_defer *d, flash_loop_fn fn, void *arg) {
    void *h;
    if (!loop.vt || !d || !fn) return FLASH_EINVAL;
    if (d->queued) return FLASH_OK;
    d->fn = fn;
    d->arg = arg;
    d->handle = NULL;
    if (loop.vt->post) {
        loop.vt->post(loop.native, d);
        return FLASH_OK;
    }
    h = loop.vt->defer ? loop.vt->defer(loop.native, flash__defer_fire, d) : NULL;
    if (!h && loop.vt->timer) h = loop.vt->timer(loop.native, 0, flash__defer_fire, d);
    if (!h) return FLASH_ENOMEM;
    d->handle = h;
    d->queued = true;
    return FLASH_OK;
}

FLASH_API void flash_loop_unpost(flash_loop loop, flash_defer *d) {
    if (!loop.vt || !d || !d->queued) return;
    if (d->handle) loop.vt->cancel(loop.native, d->handle);
    else if (loop.vt->unpost) loop.vt->unpost(loop.native, d);
    d->queued = false;
    d->handle = NULL;
}

FLASH_API bool flash_defer_queued(const flash_defer *d) { return d && d->queued; }


static void flash__dispatch_open(flash_ctx *ctx);

/* The tick: run ready callbacks until none is left; then dispatch the open
   batches in the order they were opened; repeat while either has work. */
static void flash__drain_impl(flash_ctx *ctx, bool dispatch) {
    uint64_t gen;
    if (!ctx->depth) flash__release_later(ctx);
    gen = flash__hold(ctx);
    ctx->depth++;
    for (;;) {
        while (ctx->ready_head < ctx->ready_tail) {
            flash__ready t = ctx->ready[ctx->ready_head++];
            if (t.cb) flash__call_cb(ctx, t.p, t.cb);
            else flash__run_callbacks(ctx, t.p);
        }
        ctx->ready_head = ctx->ready_tail = 0;
        if (!dispatch || !ctx->open_first) break;
        flash__dispatch_open(ctx);
    }
    ctx->depth--;
    flash__unhold(ctx, gen);
    if (!ctx->depth && ctx->open_first) flash__schedule_drain(ctx);
}

static void flash__deferred_drain(void *arg) { flash__drain_impl((flash_ctx *)arg, true); }

/* Post the context's drain. It cannot fail on a loop with post (every loop
   of flash's); on another loop whose defer and timer both failed (out of
   memory) it returns false: callbacks already queued wait for the next
   drain flash can schedule, and the caller opening a batch rejects it. */
static bool flash__schedule_drain(flash_ctx *ctx) {
    if (flash_defer_queued(&ctx->drain)) return true;
    if (flash_loop_post(ctx->loop, &ctx->drain, flash__deferred_drain, ctx) == FLASH_OK) return true;
    flash_ctx_log(ctx, FLASH_LOG_ERROR, "the %s loop could not defer a drain (out of memory)",
                  ctx->loop.vt->name ? ctx->loop.vt->name : "attached");
    return false;
}

static void flash__cancel_drain(flash_ctx *ctx) { flash_loop_unpost(ctx->loop, &ctx->drain); }

FLASH_API void flash_drain(flash_ctx *ctx) {
    if (ctx) flash__drain_impl(ctx, true);
}

FLASH_API int flash_ctx_attach_loop(flash_ctx *ctx, flash_loop loop) {
    if (!ctx || !loop.vt || !loop.vt->defer || !loop.vt->cancel || !loop.vt->run_once) return FLASH_EINVAL;
    if (!ctx->own_queue_loop) return FLASH_ESTATE;
    if (flash_defer_queued(&ctx->drain) || !flash_defer_queue_empty(&ctx->qloop->kit.defers))
        return FLASH_ESTATE; /* attach before use */
    ctx->loop = loop;
    ctx->own_queue_loop = false;
    return FLASH_OK;
}

FLASH_API flash_loop flash_ctx_loop(const flash_ctx *ctx) {
    flash_loop none = {NULL, NULL};
    return ctx ? ctx->loop : none;
}

FLASH_API bool flash_ctx_busy(const flash_ctx *ctx) {
    return ctx && (ctx->ready_head < ctx->ready_tail || ctx->open_first || ctx->inflight);
}

FLASH_API int flash_wait(flash_ctx *ctx, flash_promise *p, void **value) {
    uint64_t gen;
    int rc = FLASH_OK;
    if (value) *value = NULL;
    if (!ctx || !p) return FLASH_EINVAL;
    if (ctx->task_current) return flash_await(ctx, p, value); /* suspend the task, never nest the loop */
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
        /* Nothing left to run and nothing queued: work still "in flight"
           (a batch function that never answers) cannot settle p either. */
        if (alive == 0 && p->state == FLASH_PENDING && ctx->ready_head == ctx->ready_tail && !ctx->open_first &&
            !flash_defer_queued(&ctx->drain))
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
    if (ctx->depth || ctx->running || ctx->task_current) return FLASH_ESTATE;
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
        if (alive <= 0 && !flash_defer_queued(&ctx->drain) && !ctx->ready_tail && !ctx->open_first) break;
    }
    return rc;
}

/* ---- 5. loader ----------------------------------------------------------- */

/* A memo entry is the promise handed out for a key; the key (as first
   asked, NUL-terminated) follows the struct, then the memo key when a
   key_fn made one. */
typedef struct flash__entry {
    flash_promise p;            /* first: entries are promises */
    uint32_t klen, mlen;        /* the memo key's hash is not kept: the rare
                                   paths that need it (forget) hash again */
} flash__entry;
enum { FLASH__E_IN_MEMO = 1, FLASH__E_OWN_MKEY = 2, FLASH__E_PAYLOAD = 4 };

static inline const char *flash__ekey(const flash__entry *e) { return (const char *)(e + 1); }
static inline const char *flash__emkey(const flash__entry *e) {
    return (e->p.eflags & FLASH__E_OWN_MKEY) ? (const char *)(e + 1) + e->klen + 1 : (const char *)(e + 1);
}
/* A payload (flash_load_with) is kept after the keys, 8-aligned, only when
   there is one: a plain entry with a key of up to 7 bytes is 64 bytes. */
static inline size_t flash__ekeys_size(size_t klen, size_t mlen, bool own_mkey) {
    return FLASH__ROUND8(klen + 1 + (own_mkey ? mlen : 0));
}
static inline void *flash__epayload(const flash__entry *e) {
    void *v;
    if (!(e->p.eflags & FLASH__E_PAYLOAD)) return NULL;
    memcpy(&v, (const char *)(e + 1) + flash__ekeys_size(e->klen, e->mlen, (e->p.eflags & FLASH__E_OWN_MKEY) != 0),
           sizeof v);
    return v;
}

struct flash_batch {
    flash_batch *next_open;
    flash_loader *loader;
    flash_ctx *ctx;
    flash__entry **keys;        /* count of kcap used, in first-asked order */
    size_t count, kcap, unsettled;
    size_t room;                /* flash_load's fast path appends while
                                   count < room: kcap, or max_batch if less */
    uint64_t gen;
    void *data;
    bool dispatched, ended;
    bool live;                  /* dispatched, not ended, of the current
                                   request: flash_batch_resolve's one check */
    flash_batch *next_inflight, *prev_inflight;
};

/* A memo slot keeps 32 bits of the hash beside the entry so that probing and
   growing compare integers instead of chasing pointers (cache misses). A
   slot is in use only when its gen is the table's: a recycled or cleared
   table needs no memset, just a new gen. */
typedef struct flash__slot {
    uint32_t hash;
    uint32_t gen;
    flash__entry *e;
} flash__slot;

/* A memo table: this header, then cap slots. */
typedef struct flash__table {
    size_t cap;
    uint32_t gen;
} flash__table;
#define FLASH__SLOTS(t) ((flash__slot *)((char *)(t) + FLASH__ROUND(sizeof(flash__table))))

struct flash_loader {
    flash_ctx *ctx;
    flash__slot *slots;        /* open addressing, linear probing */
    size_t fmask;              /* cap - 1 when flash_load may probe on its
                                  own (a table, no key_fn), else 0 */
    size_t grow_at;            /* count at which the table grows (cap / 2),
                                  0 with max_memo: such loads go the slow way */
    uint32_t gen;              /* == table->gen */
    uint64_t seed, seed2;      /* the context's memo seeds, copied */
    size_t cap, count;
    const flash_loader_desc *desc_ptr;
    flash_loader_desc desc;
    flash_loader *next;
    flash__table *table;
    flash__entry **ring;       /* FIFO of memo entries when max_memo is set */
    size_t ring_head, ring_len;
    flash_batch *open;         /* batch accepting keys */
    flash_batch *sched_first, *sched_last; /* custom schedule: batches to dispatch */
    flash_batch *inflight;     /* dispatched, not ended (for cancel) */
};

/* 64-bit hash of a byte string: 8 bytes a round, one multiply-xorshift
   each; short keys (most keys) take one or two rounds. */
static inline uint64_t flash__hash_seeded(const void *data, size_t n, uint64_t seed) {
    const unsigned char *s = (const unsigned char *)data;
    uint64_t h = (0x9E3779B97F4A7C15ull ^ (uint64_t)n) + seed, k;
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
    return h;
}

/* Unseeded: what must agree across processes (hashed cache keys, checks). */
static inline uint64_t flash__hash(const void *data, size_t n) { return flash__hash_seeded(data, n, 0); }

/* 64 x 64 -> 128-bit multiply, the halves folded (wyhash's "mum"): one
   instruction on 64-bit targets that have it. */
#if defined(__SIZEOF_INT128__)
static inline uint64_t flash__mum(uint64_t a, uint64_t b) {
    __extension__ typedef unsigned __int128 flash__u128;
    flash__u128 r = (flash__u128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}
#else
static inline uint64_t flash__mum(uint64_t a, uint64_t b) {
    uint64_t ha = a >> 32, hb = b >> 32, la = (uint32_t)a, lb = (uint32_t)b;
    uint64_t rh = ha * hb, rm0 = ha * lb, rm1 = hb * la, rl = la * lb, t = rl + (rm0 << 32), c = t < rl, lo, hi;
    lo = t + (rm1 << 32);
    c += lo < t;
    hi = rh + (rm0 >> 32) + (rm1 >> 32) + c;
    return lo ^ hi;
}
#endif

/* Memo keys may be chosen by clients (slugs): the memo hashes them with a
   seed of the context's, so colliding keys cannot be precomputed. Keys of
   up to 16 bytes (most keys) take one folded multiply of the seeded key
   bytes (wyhash's last step); longer ones the multiply-xorshift rounds. */
static inline uint64_t flash__memo_hash_seeded(const void *data, size_t n, uint64_t seed, uint64_t seed2) {
    const unsigned char *s = (const unsigned char *)data;
    uint64_t a, b;
    if (n > 16) return flash__hash_seeded(data, n, seed);
    if (n >= 8) {
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
    } else if (n >= 4) {
        uint32_t lo, hi;
        memcpy(&lo, s, 4);
        memcpy(&hi, s + n - 4, 4);
        a = lo;
        b = hi;
    } else if (n) {
        a = ((uint64_t)s[0] << 16) | ((uint64_t)s[n / 2] << 8) | s[n - 1];
        b = 0;
    } else {
        a = b = 0;
    }
    return flash__mum(a ^ seed, b ^ (seed2 + n));
}
#define flash__memo_hash(l, k, n) flash__memo_hash_seeded((k), (n), (l)->seed, (l)->seed2)

/* Equal keys of equal length 1 <= n <= 16, without a libc call
   (overlapping loads). */
static inline bool flash__keyeq_short(const char *a, const char *b, size_t n) {
    if (n >= 8) {
        uint64_t a0, a1, b0, b1;
        memcpy(&a0, a, 8);
        memcpy(&a1, a + n - 8, 8);
        memcpy(&b0, b, 8);
        memcpy(&b1, b + n - 8, 8);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    if (n >= 4) {
        uint32_t a0, a1, b0, b1;
        memcpy(&a0, a, 4);
        memcpy(&a1, a + n - 4, 4);
        memcpy(&b0, b, 4);
        memcpy(&b1, b + n - 4, 4);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    return a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1];
}

/* Equal keys of equal length n >= 1; short ones without a libc call. */
static inline bool flash__keyeq(const char *a, const char *b, size_t n) {
    return n <= 16 ? flash__keyeq_short(a, b, n) : memcmp(a, b, n) == 0;
}

static inline flash__slot *flash__memo_find(const flash_loader *l, const void *mkey, size_t mlen, uint64_t h) {
    size_t mask = l->cap - 1, i = (size_t)h & mask;
    uint32_t h32 = (uint32_t)h, gen = l->gen;
    for (;;) {
        flash__slot *s = &l->slots[i];
        if (s->gen != gen) return s;
        if (s->hash == h32 && s->e->mlen == mlen && flash__keyeq(flash__emkey(s->e), (const char *)mkey, mlen))
            return s;
        i = (i + 1) & mask;
    }
}

/* Memo tables are recycled across resets, one per size, within the retain
   budget; a loader starts on the largest one kept, so a steady stream of
   requests neither regrows tables nor pays for page faults. */
static flash__table *flash__table_get(flash_ctx *ctx, size_t min_cap, bool largest);
static void flash__table_put(flash_ctx *ctx, flash__table *t);

/* The fields flash_load's fast path checks instead of the desc and cap. */
static void flash__loader_limits(flash_loader *l) {
    l->fmask = (l->cap && !l->desc.key_fn) ? l->cap - 1 : 0;
    l->grow_at = l->desc.max_memo ? 0 : l->cap / 2;
}

static int flash__memo_grow(flash_loader *l) {
    flash__table *t = flash__table_get(l->ctx, l->cap ? l->cap * 2 : 64, l->cap == 0);
    flash__slot *slots;
    size_t i, mask;
    if (!t) return FLASH_ENOMEM;
    slots = FLASH__SLOTS(t);
    mask = t->cap - 1;
    for (i = 0; i < l->cap; i++) {
        flash__slot *s = &l->slots[i];
        size_t j;
        if (s->gen != l->gen) continue;
        for (j = (size_t)s->hash & mask; slots[j].gen == t->gen; j = (j + 1) & mask) {
        }
        slots[j] = *s;
        slots[j].gen = t->gen;
    }
    flash__table_put(l->ctx, l->table);
    l->table = t;
    l->slots = slots;
    l->cap = t->cap;
    l->gen = t->gen;
    flash__loader_limits(l);
    return FLASH_OK;
}

/* Backward-shift deletion keeps linear probing tombstone-free. */
static void flash__memo_remove_slot(flash_loader *l, flash__slot *slot) {
    size_t mask = l->cap - 1, i = (size_t)(slot - l->slots), j = i;
    l->slots[i].e->p.eflags &= (uint8_t)~FLASH__E_IN_MEMO;
    l->slots[i].gen = 0; /* never a table's gen */
    l->count--;
    for (;;) {
        size_t home;
        j = (j + 1) & mask;
        if (l->slots[j].gen != l->gen) return;
        home = (size_t)l->slots[j].hash & mask;
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            l->slots[i] = l->slots[j];
            l->slots[j].gen = 0;
            i = j;
        }
    }
}

static void flash__memo_forget(flash_loader *l, flash__entry *e) {
    flash__slot *slot;
    if (!(e->p.eflags & FLASH__E_IN_MEMO) || !l->cap) return;
    slot = flash__memo_find(l, flash__emkey(e), e->mlen, flash__memo_hash(l, flash__emkey(e), e->mlen));
    if (slot->gen == l->gen && slot->e == e) flash__memo_remove_slot(l, slot);
}

/* max_memo: the FIFO of memo entries, the oldest forgotten when full. */
static FLASH__NOINLINE void flash__memo_ring_add(flash_loader *l, flash__entry *e) {
    if (l->ring_len == l->desc.max_memo) {
        flash__entry *old = l->ring[l->ring_head];
        l->ring[l->ring_head] = e;
        l->ring_head = (l->ring_head + 1) % l->desc.max_memo;
        flash__memo_forget(l, old);
    } else {
        l->ring[(l->ring_head + l->ring_len++) % l->desc.max_memo] = e;
    }
}

static inline int flash__memo_insert(flash_loader *l, flash__slot *slot, flash__entry *e, uint64_t h) {
    slot->hash = (uint32_t)h;
    slot->gen = l->gen;
    slot->e = e;
    e->p.eflags |= FLASH__E_IN_MEMO;
    l->count++;
    if (FLASH__UNLIKELY(l->desc.max_memo != 0)) flash__memo_ring_add(l, e);
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

static size_t flash__table_bytes(size_t cap) { return FLASH__ROUND(sizeof(flash__table)) + cap * sizeof(flash__slot); }

/* A table of at least min_cap slots (the largest kept one when asked),
   empty by a fresh gen. */
static flash__table *flash__table_get(flash_ctx *ctx, size_t min_cap, bool largest) {
    size_t n = sizeof ctx->spare_tables / sizeof ctx->spare_tables[0], c = flash__log2(min_cap);
    flash__table *t = NULL;
    if (largest) {
        size_t k = n;
        while (k-- > c)
            if (ctx->spare_tables[k]) {
                c = k;
                break;
            }
    }
    if (c < n && ctx->spare_tables[c]) {
        t = (flash__table *)ctx->spare_tables[c];
        ctx->spare_tables[c] = NULL;
        ctx->spare_table_bytes -= flash__table_bytes(t->cap);
        if (++t->gen == 0) { /* wrapped: clear for real once every 2^32 uses */
            memset(FLASH__SLOTS(t), 0, t->cap * sizeof(flash__slot));
            t->gen = 1;
        }
        return t;
    }
    t = (flash__table *)flash__sys_alloc(ctx, flash__table_bytes(min_cap));
    if (!t) return NULL;
    memset(FLASH__SLOTS(t), 0, min_cap * sizeof(flash__slot));
    t->cap = min_cap;
    t->gen = 1;
    return t;
}

/* Keep a table for reuse while the tables kept fit in arena_retain. */
static void flash__table_put(flash_ctx *ctx, flash__table *t) {
    size_t c;
    if (!t) return;
    c = flash__log2(t->cap);
    if (c < sizeof ctx->spare_tables / sizeof ctx->spare_tables[0] && !ctx->spare_tables[c] &&
        ctx->spare_table_bytes + flash__table_bytes(t->cap) <= ctx->desc.arena_retain) {
        ctx->spare_tables[c] = t;
        ctx->spare_table_bytes += flash__table_bytes(t->cap);
    } else {
        flash__sys_free(ctx, t);
    }
}

static void flash__loaders_release(flash_ctx *ctx) {
    flash_loader *l;
    for (l = ctx->loaders; l; l = l->next) {
        flash__table_put(ctx, l->table);
        flash__sys_free(ctx, l->ring);
        l->table = NULL;
        l->slots = NULL;
        l->ring = NULL;
        l->cap = l->count = 0;
        flash__loader_limits(l);
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
        if (!l->desc.cancel) {
            /* Orphans from now on: their calls take the checked path. */
            for (; b; b = b->next_inflight) b->live = false;
            continue;
        }
        l->inflight = NULL;
        while (b) {
            flash_batch *next = b->next_inflight;
            b->ended = true;
            b->live = false;
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
    l->seed = ctx->memo_seed;
    l->seed2 = ctx->memo_seed2;
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

/* A batch's key array starts with this many slots and doubles (in the
   arena) as loads join: dispatch needs no pass over the keys. */
enum { FLASH__BATCH_KEYS0 = 16 };

static void flash__batch_room(flash_batch *b) {
    uint32_t max = b->loader->desc.max_batch;
    b->room = (max && max < b->kcap) ? max : b->kcap;
}

static size_t flash__hint_slot(const void *desc) { return ((uintptr_t)desc >> 4) & 7; }

/* Room for one more key in b. */
static FLASH__NOINLINE bool flash__batch_grow(flash_ctx *ctx, flash_batch *b) {
    flash__entry **keys;
    if (b->kcap > SIZE_MAX / 2 / sizeof *keys) return false;
    keys = (flash__entry **)flash__alloc(ctx, b->kcap * 2 * sizeof *keys);
    if (!keys) return false;
    memcpy(keys, b->keys, b->count * sizeof *keys);
    b->keys = keys;
    b->kcap *= 2;
    flash__batch_room(b);
    return true;
}

static flash_batch *flash__batch_open(flash_loader *l) {
    flash_ctx *ctx = l->ctx;
    flash_batch *b;
    /* No tick to dispatch a batch in (a loop without post that could not
       defer): refuse it rather than leave its keys pending forever. */
    if (!l->desc.schedule && !ctx->depth && !flash__schedule_drain(ctx)) return NULL;
    b = (flash_batch *)flash_calloc(ctx, 1, sizeof *b);
    if (!b) return NULL;
    b->kcap = FLASH__BATCH_KEYS0;
    {
        /* As many slots as the last batch of this desc had (a request like
           the last one appends without copying), up to max_batch. */
        size_t hint = ctx->batch_hints[flash__hint_slot(l->desc_ptr)].desc == l->desc_ptr
                          ? ctx->batch_hints[flash__hint_slot(l->desc_ptr)].keys
                          : 0;
        if (l->desc.max_batch && hint > l->desc.max_batch) hint = l->desc.max_batch;
        while (b->kcap < hint && b->kcap < ((size_t)1 << 26)) b->kcap *= 2;
    }
    b->keys = (flash__entry **)flash__alloc(ctx, b->kcap * sizeof *b->keys);
    if (!b->keys) return NULL;
    b->loader = l;
    b->ctx = ctx;
    flash__batch_room(b);
    b->gen = ctx->gen;
    l->open = b;
    if (l->desc.schedule) {
        /* Kept in order until flash_loader_dispatch sends them. */
        if (l->sched_last) l->sched_last->next_open = b;
        else l->sched_first = b;
        l->sched_last = b;
        l->desc.schedule(ctx, l, l->desc.user_data);
    } else {
        if (ctx->open_last) ctx->open_last->next_open = b;
        else ctx->open_first = b;
        ctx->open_last = b;
    }
    return b;
}

static void flash__batch_finish(flash_batch *b);

static void flash__batch_dispatch(flash_batch *b) {
    flash_loader *l = b->loader;
    flash_ctx *ctx = l->ctx;
    size_t i;
    if (l->open == b) l->open = NULL;
    b->dispatched = true;
    b->live = true;
    /* Without memo the table only made keys unique within the batch. */
    if (l->desc.no_memo)
        for (i = 0; i < b->count; i++) flash__memo_forget(l, b->keys[i]);
    b->unsettled = b->count;
    b->next_inflight = l->inflight;
    if (l->inflight) l->inflight->prev_inflight = b;
    l->inflight = b;
    ctx->inflight++;
    flash__hold(ctx);
    ctx->stats.batches++;
    ctx->stats.batch_keys += b->count;
    ctx->batch_hints[flash__hint_slot(l->desc_ptr)].desc = l->desc_ptr;
    ctx->batch_hints[flash__hint_slot(l->desc_ptr)].keys = b->count;
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
    if (l->desc.schedule) {
        uint64_t gen = l->ctx->gen;
        while ((b = l->sched_first) != NULL) {
            l->sched_first = b->next_open;
            if (!l->sched_first) l->sched_last = NULL;
            flash__batch_dispatch(b);
            if (l->ctx->gen != gen) break; /* reset by the batch function */
        }
        return FLASH_OK;
    }
    b = l->open;
    if (!b) return FLASH_OK;
    {
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

/* Copy a key of 1 <= n <= 16 bytes without a libc call. */
static inline void flash__copy_key_short(char *dst, const char *src, size_t n) {
    if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, src, 8);
        memcpy(&b, src + n - 8, 8);
        memcpy(dst, &a, 8);
        memcpy(dst + n - 8, &b, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, src, 4);
        memcpy(&b, src + n - 4, 4);
        memcpy(dst, &a, 4);
        memcpy(dst + n - 4, &b, 4);
    } else {
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    }
}

/* Copy a key of n >= 1 bytes; up to 16 without a libc call. */
static inline void flash__copy_key(char *dst, const char *src, size_t n) {
    if (n > 16) memcpy(dst, src, n);
    else flash__copy_key_short(dst, src, n);
}

/* A new memo entry for a key not in the memo: appended to the open batch
   and memoised in slot (the empty slot where the lookup for hash h ended).
   mkey is the memo key (key itself unless a key_fn made another). */
static FLASH__ALWAYS_INLINE flash_promise *flash__load_new(flash_loader *l, flash__slot *slot, uint64_t h,
                                                           const void *key, size_t len, const void *mkey,
                                                           size_t mlen, void *payload) {
    flash_ctx *ctx = l->ctx;
    bool own_mkey = mkey != key;
    flash_batch *b;
    flash__entry *e;
    /* len and mlen are below 2^32 (checked by the callers): no overflow,
       so flash__alloc's bump without its size check. Entries are packed at
       8 bytes (flash__alloc aligns the next allocation up to 16 again). */
    size_t size = sizeof *e + flash__ekeys_size(len, mlen, own_mkey) + (payload ? sizeof payload : 0);
    flash__block *blk = ctx->blocks;
    if (FLASH__LIKELY(blk && blk->cap - blk->used >= size)) {
        e = (flash__entry *)((char *)blk + FLASH__BLOCK_HDR + blk->used);
        blk->used += size;
    } else {
        e = (flash__entry *)flash__arena_slow(ctx, size);
        if (FLASH__UNLIKELY(!e)) return NULL;
    }
    /* flash__promise_init, less first.is_inline and first.next: both are
       read only once first.fn or has_more is set, and whoever sets those
       sets them. */
    e->p.state = FLASH_PENDING;
    e->p.has_more = 0;
    e->p.is_entry = 1;
    e->p.eflags = (uint8_t)((own_mkey ? FLASH__E_OWN_MKEY : 0) | (payload ? FLASH__E_PAYLOAD : 0));
    e->p.error = 0;
    e->p.u.value = NULL;
    e->p.first.fn.pub = NULL;
    e->klen = (uint32_t)len;
    e->mlen = (uint32_t)mlen;
    flash__copy_key((char *)(e + 1), (const char *)key, len);
    ((char *)(e + 1))[len] = 0;
    if (own_mkey) memcpy((char *)(e + 1) + len + 1, mkey, mlen);
    if (payload) memcpy((char *)(e + 1) + flash__ekeys_size(len, mlen, own_mkey), &payload, sizeof payload);
    b = l->open;
    if (FLASH__UNLIKELY(!b || (l->desc.max_batch && b->count >= l->desc.max_batch))) {
        if (!(b = flash__batch_open(l)))
            return flash_rejected(ctx, FLASH_ENOMEM, "load: no batch could be opened (out of memory, or the loop "
                                                     "could not defer its dispatch)");
    }
    if (b->count == b->kcap && !flash__batch_grow(ctx, b)) return NULL;
    b->keys[b->count++] = e;
    flash__memo_insert(l, slot, e, h);
    return &e->p;
}

/* The load by memo key: memo lookup, else a new entry (the general path:
   key functions, and the first load or a growing table of the plain one). */
static flash_promise *flash__load(flash_loader *l, const void *key, size_t len, const void *mkey, size_t mlen,
                                  void *payload) {
    flash__slot *slot = NULL;
    uint64_t h = flash__memo_hash(l, mkey, mlen);
    if (l->cap) {
        slot = flash__memo_find(l, mkey, mlen, h);
        if (slot->gen == l->gen) {
            l->ctx->stats.memo_hits++;
            return &slot->e->p;
        }
    }
    if ((l->count + 1) * 2 > l->cap) {
        if (flash__memo_grow(l) != FLASH_OK) return NULL;
        slot = flash__memo_find(l, mkey, mlen, h);
    }
    return flash__load_new(l, slot, h, key, len, mkey, mlen, payload);
}

/* The memo key a key_fn makes, in buf or (when longer) in the arena. */
static const void *flash__mkey(flash_loader *l, const void *key, size_t len, char *buf, size_t cap, size_t *mlen) {
    size_t n = l->desc.key_fn(key, len, buf, cap, l->desc.user_data);
    if (n > cap) {
        char *big = (char *)flash__alloc(l->ctx, n);
        if (!big) return NULL;
        n = l->desc.key_fn(key, len, big, n, l->desc.user_data);
        *mlen = n;
        return big;
    }
    *mlen = n;
    return buf;
}

/* Everything but a plain load of a non-empty key into a loader whose memo
   table has room: kept out of line so the fast path carries no key buffer. */
static FLASH__NOINLINE flash_promise *flash__load_slow(flash_loader *l, const void *key, size_t len, void *payload) {
    char buf[256];
    size_t mlen = 0;
    const void *mkey;
    l->ctx->stats.loads++;
    if (!key || !len) return flash_rejected(l->ctx, FLASH_EINVAL, "load: empty key");
    if (len > UINT32_MAX) return flash_rejected(l->ctx, FLASH_ETOOLARGE, "load: key too long");
    if (!l->desc.key_fn) return flash__load(l, key, len, key, len, payload);
    mkey = flash__mkey(l, key, len, buf, sizeof buf, &mlen);
    if (!mkey) return NULL;
    if (!mlen) return flash_rejected(l->ctx, FLASH_EINVAL, "load: key function gave an empty key");
    return flash__load(l, key, len, mkey, mlen, payload);
}

/* A miss of the plain load (flash__load_fast), slot the empty slot where
   the probe ended: the entry is written here when nothing else is needed
   (room in the memo table, the arena block and the open batch, no
   max_memo), else the general path looks the key up again. Out of line,
   like the probe's later steps, so that a memo hit saves no registers. */
static FLASH__NOINLINE flash_promise *flash__load_miss(flash_loader *l, const void *key, size_t len,
                                                       flash__slot *slot, uint32_t h32) {
    flash_ctx *ctx = l->ctx;
    flash__block *blk = ctx->blocks;
    flash_batch *b = l->open;
    flash__entry *e;
    size_t size = FLASH__ROUND8(sizeof *e + len + 1);
    if (FLASH__UNLIKELY(l->count >= l->grow_at || !blk || blk->cap - blk->used < size || !b ||
                        b->count >= b->room))
        return flash__load_slow(l, key, len, NULL);
    ctx->stats.loads++;
    e = (flash__entry *)((char *)blk + FLASH__BLOCK_HDR + blk->used);
    blk->used += size;
    /* As flash__load_new. */
    e->p.state = FLASH_PENDING;
    e->p.has_more = 0;
    e->p.is_entry = 1;
    e->p.eflags = FLASH__E_IN_MEMO;
    e->p.error = 0;
    e->p.u.value = NULL;
    e->p.first.fn.pub = NULL;
    {
        /* klen and mlen (equal here) in one store. */
        uint64_t lens = (uint64_t)len * (((uint64_t)1 << 32) | 1);
        memcpy((char *)e + offsetof(flash__entry, klen), &lens, sizeof lens);
    }
    flash__copy_key_short((char *)(e + 1), (const char *)key, len);
    ((char *)(e + 1))[len] = 0;
    b->keys[b->count++] = e;
    {
        flash__slot full;
        full.hash = h32;
        full.gen = l->gen;
        full.e = e;
        *slot = full;
    }
    l->count++;
    return &e->p;
}

/* Slot s holds key (of 1..16 bytes, no key_fn: the memo key is the key). */
static inline bool flash__slot_holds(const flash__slot *s, uint32_t h32, const void *key, size_t len) {
    return s->hash == h32 && s->e->klen == len && flash__keyeq_short(flash__ekey(s->e), (const char *)key, len);
}

/* The plain load's probe after its first slot (a collision). */
static FLASH__NOINLINE flash_promise *flash__load_probe(flash_loader *l, const void *key, size_t len, size_t i,
                                                        uint32_t h32) {
    flash__slot *slots = l->slots;
    size_t mask = l->fmask;
    uint32_t gen = l->gen;
    for (;;) {
        flash__slot *slot;
        i = (i + 1) & mask;
        slot = &slots[i];
        if (slot->gen != gen) return flash__load_miss(l, key, len, slot, h32);
        if (flash__slot_holds(slot, h32, key, len)) {
            flash_ctx *ctx = l->ctx;
            ctx->stats.loads++;
            ctx->stats.memo_hits++;
            return &slot->e->p;
        }
    }
}

/* The plain load of a key of 1..16 bytes whose memo hash h is known
   (flash_load_many hashes a few keys ahead). A memo hit in the first slot
   probed is one compare and calls nothing, so it saves no registers; a
   collision goes on in flash__load_probe, a miss in flash__load_miss. */
static FLASH__ALWAYS_INLINE flash_promise *flash__load_hashed(flash_loader *l, const void *key, size_t len,
                                                              uint64_t h) {
    flash__slot *slot;
    size_t mask = l->fmask, i;
    if (FLASH__UNLIKELY(!mask)) return flash__load_slow(l, key, len, NULL);
    i = (size_t)h & mask;
    slot = &l->slots[i];
    if (slot->gen != l->gen) return flash__load_miss(l, key, len, slot, (uint32_t)h);
    if (FLASH__LIKELY(flash__slot_holds(slot, (uint32_t)h, key, len))) {
        flash_ctx *ctx = l->ctx;
        ctx->stats.loads++;
        ctx->stats.memo_hits++;
        return &slot->e->p;
    }
    return flash__load_probe(l, key, len, i, (uint32_t)h);
}

/* The plain load (no key_fn: the memo key is the key), inlined into
   flash_load and flash_load_with: a key of 1..16 bytes, no payload, a
   memo table. Anything else (a key function, the first load, keys over 16
   bytes, a payload) takes the general path. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
static inline flash_promise *flash__load_fast(flash_loader *l, const void *key, size_t len, void *payload) {
    if (FLASH__UNLIKELY(!l)) return NULL;
    /* len - 1 >= 16: empty keys and keys over 16 bytes; fmask 0: no table
       yet, or a key function. */
    if (FLASH__UNLIKELY(!key || len - 1 >= 16 || !l->fmask || payload)) return flash__load_slow(l, key, len, payload);
    return flash__load_hashed(l, key, len, flash__memo_hash(l, key, len));
}

FLASH_API flash_promise *flash_load_with(flash_loader *l, const void *key, size_t len, void *payload) {
    return flash__load_fast(l, key, len, payload);
}

FLASH_API flash_promise *flash_load(flash_loader *l, const void *key, size_t len) {
    return flash__load_fast(l, key, len, NULL);
}
FLASH_API flash_promise *flash_load_str(flash_loader *l, const char *key) {
    return flash__load_fast(l, key, key ? strlen(key) : 0, NULL);
}

/* flash_gather over n flash_loads, each load joining the gather as it is
   made (no array of promises, no second pass over the entries). Keys are
   hashed FLASH__LOAD_AHEAD loads ahead and their memo slots prefetched:
   past the caches (100k keys) each load would wait for its slot. */
enum { FLASH__LOAD_AHEAD = 8 };

/* The memo hash of a key of a flash_load_many, or 0 when it is not a key
   of 1..16 bytes (0 only means "hash it when loaded"); its slot asked for
   the cache. */
static FLASH__ALWAYS_INLINE uint64_t flash__load_ahead(const flash_loader *l, const void *key, size_t len) {
    uint64_t h;
    size_t mask = l->fmask;
    if (!key || len - 1 >= 16) return 0;
    h = flash__memo_hash(l, key, len);
#if defined(__GNUC__) || defined(__clang__)
    if (mask) __builtin_prefetch(&l->slots[(size_t)h & mask]);
#else
    (void)mask;
#endif
    return h;
}

FLASH_API flash_promise *flash_load_many(flash_loader *l, size_t n, const void *const *keys, const size_t *lens) {
    flash_ctx *ctx;
    flash__gather *g;
    size_t i, done = 0;
    uint64_t gen, ahead[FLASH__LOAD_AHEAD];
    uint16_t fulfilled = flash__fulfilled_word();
    bool plain, may_reset;
    if (!l) return NULL;
    ctx = l->ctx;
    if (n && (!keys || !lens)) return flash_rejected(ctx, FLASH_EINVAL, "load_many: NULL keys");
    if (n > UINT32_MAX) return flash_rejected(ctx, FLASH_EINVAL, "load_many: too many keys");
    if (!(g = flash__gather_alloc(ctx, n, false))) return NULL;
    gen = ctx->gen;
    plain = !l->desc.key_fn;
    may_reset = l->desc.schedule != NULL;
    for (i = 0; i < n && i < FLASH__LOAD_AHEAD; i++) ahead[i] = flash__load_ahead(l, keys[i], lens[i]);
    for (i = 0; i < n; i++) {
        flash_promise *p;
        uint64_t h = ahead[i % FLASH__LOAD_AHEAD];
        if (i + FLASH__LOAD_AHEAD < n)
            ahead[i % FLASH__LOAD_AHEAD] = flash__load_ahead(l, keys[i + FLASH__LOAD_AHEAD], lens[i + FLASH__LOAD_AHEAD]);
        /* h != 0: a key of 1..16 bytes, hashed already. */
        if (FLASH__LIKELY(h && plain)) p = flash__load_hashed(l, keys[i], lens[i], h);
        else p = flash__load_fast(l, keys[i], lens[i], NULL);
        /* A custom schedule may dispatch, and so reset, inside a load (its
           hook is the only code of the user's a load runs): the gather and
           the loader belonged to the request that ended. */
        if (FLASH__UNLIKELY(may_reset) && ctx->gen != gen)
            return flash_rejected(ctx, FLASH_ECANCELED, "load_many: the context was reset during the loads");
        flash__gather_join_values(ctx, g, p, i, fulfilled, &done);
    }
    flash__gather_close(ctx, g, done);
    return &g->out;
}

/* A memo entry settled from the start: fulfilled with value, or rejected
   with code when it is not 0. Never overwrites a memoised key. */
static int flash__prime(flash_loader *l, const void *key, size_t len, void *value, int code, const char *message) {
    flash__entry *e;
    flash__slot *slot;
    char buf[256];
    const void *mkey = key;
    size_t mlen = len;
    uint64_t h;
    if (!l || !key || !len) return FLASH_EINVAL;
    if (l->desc.key_fn && !(mkey = flash__mkey(l, key, len, buf, sizeof buf, &mlen))) return FLASH_ENOMEM;
    h = flash__memo_hash(l, mkey, mlen);
    if (l->cap && flash__memo_find(l, mkey, mlen, h)->gen == l->gen) return FLASH_OK; /* never overwrites */
    if ((l->count + 1) * 2 > l->cap && flash__memo_grow(l) != FLASH_OK) return FLASH_ENOMEM;
    slot = flash__memo_find(l, mkey, mlen, h);
    e = (flash__entry *)flash_calloc(l->ctx, 1, sizeof *e + len + 1 + mlen);
    if (!e) return FLASH_ENOMEM;
    e->p.is_entry = 1;
    if (code) {
        e->p.state = FLASH_REJECTED;
        e->p.error = code;
        e->p.u.message = flash__msgdup(l->ctx, code, message);
    } else {
        e->p.state = FLASH_FULFILLED;
        e->p.u.value = value;
    }
    e->p.eflags = mkey != key ? FLASH__E_OWN_MKEY : 0;
    e->klen = (uint32_t)len;
    e->mlen = (uint32_t)mlen;
    memcpy(e + 1, key, len);
    if (mkey != key) memcpy((char *)(e + 1) + len + 1, mkey, mlen);
    return flash__memo_insert(l, slot, e, h);
}

FLASH_API int flash_prime(flash_loader *l, const void *key, size_t len, void *value) {
    return flash__prime(l, key, len, value, 0, NULL);
}

FLASH_API int flash_prime_error(flash_loader *l, const void *key, size_t len, int code, const char *message) {
    return code ? flash__prime(l, key, len, NULL, code, message) : FLASH_EINVAL;
}

FLASH_API int flash_clear(flash_loader *l, const void *key, size_t len) {
    char buf[256];
    const void *mkey = key;
    size_t mlen = len;
    flash__slot *slot;
    if (!l || !key || !len) return FLASH_EINVAL;
    if (l->desc.key_fn && !(mkey = flash__mkey(l, key, len, buf, sizeof buf, &mlen))) return FLASH_ENOMEM;
    if (!l->cap) return FLASH_OK;
    slot = flash__memo_find(l, mkey, mlen, flash__memo_hash(l, mkey, mlen));
    if (slot->gen == l->gen) flash__memo_remove_slot(l, slot);
    return FLASH_OK;
}

/* A new gen empties the table at once; entries keep a stale IN_MEMO flag,
   which only costs flash__memo_forget a lookup that finds nothing. */
FLASH_API void flash_clear_all(flash_loader *l) {
    if (!l || !l->cap) return;
    if (++l->table->gen == 0) {
        memset(l->slots, 0, l->cap * sizeof *l->slots);
        l->table->gen = 1;
    }
    l->gen = l->table->gen;
    l->count = 0;
    l->ring_len = l->ring_head = 0;
}

FLASH_API flash_ctx *flash_batch_ctx(const flash_batch *b) { return b ? b->loader->ctx : NULL; }
FLASH_API flash_loader *flash_batch_loader(const flash_batch *b) { return b ? b->loader : NULL; }
FLASH_API size_t flash_batch_size(const flash_batch *b) { return b ? b->count : 0; }
FLASH_API const void *flash_batch_key(const flash_batch *b, size_t i, size_t *len) {
    if (!b || !b->dispatched || i >= b->count) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = b->keys[i]->klen;
    return flash__ekey(b->keys[i]);
}
FLASH_API void *flash_batch_payload(const flash_batch *b, size_t i) {
    return (b && b->dispatched && i < b->count) ? flash__epayload(b->keys[i]) : NULL;
}
FLASH_API flash_promise *flash_batch_promise(const flash_batch *b, size_t i) {
    return (b && b->dispatched && i < b->count) ? &b->keys[i]->p : NULL;
}

FLASH_API void flash_batch_set_data(flash_batch *b, void *data) {
    if (b) b->data = data;
}
FLASH_API void *flash_batch_data(const flash_batch *b) { return b ? b->data : NULL; }

static void flash__batch_finish(flash_batch *b) {
    flash_loader *l = b->loader;
    flash_ctx *ctx = l->ctx;
    b->ended = true;
    b->live = false;
    if (b->gen != ctx->gen) {
        /* A reset request's batch: its memory (the batch included) goes at
           the next drain, so the batch function may still call
           flash_batch_end(b) before returning. */
        flash__unhold_later(ctx, b->gen);
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

static FLASH__NOINLINE int flash__batch_resolve_slow(flash_batch *b, size_t i, void *value) {
    int rc = flash__batch_check(b, i);
    flash__entry *e;
    if (rc) return rc;
    e = b->keys[i];
    e->p.state = FLASH_FULFILLED;
    e->p.u.value = value;
    flash__settle(b->ctx, &e->p);
    if (--b->unsettled == 0) flash__batch_finish(b);
    return FLASH_OK;
}

/* The usual resolve calls nothing (so saves no registers): a live batch
   (dispatched, not ended, not of a reset request) with more keys to
   settle, a pending key that nobody waits for or whose only waiter is a
   gather with more promises to wait for. The rest: out of line. */
FLASH_API int flash_batch_resolve(flash_batch *b, size_t i, void *value) {
    flash__entry *e;
    if (FLASH__UNLIKELY(!b || !b->live || i >= b->count || b->unsettled < 2))
        return flash__batch_resolve_slow(b, i, value);
    e = b->keys[i];
    if (FLASH__UNLIKELY(e->p.state != FLASH_PENDING || !flash__settle_quick(&e->p, value)))
        return flash__batch_resolve_slow(b, i, value);
    e->p.state = FLASH_FULFILLED;
    e->p.u.value = value;
    b->unsettled--;
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

/* Reject every unsettled key of b with one message, then finish it. A
   batch-level failure: the memo forgets those keys even with memo_errors. */
static void flash__batch_reject_rest(flash_batch *b, int code, const char *message) {
    flash_ctx *ctx = b->loader->ctx;
    size_t i;
    for (i = 0; i < b->count && !b->ended; i++) {
        flash__entry *e = b->keys[i];
        if (e->p.state != FLASH_PENDING) continue;
        flash__memo_forget(b->loader, e);
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

/* Key `idx` of the batch in arg follows the settled promise p. */
static void flash__batch_follow_cb(flash_ctx *ctx, flash_promise *p, void *arg, uintptr_t idx) {
    flash_batch *b = (flash_batch *)arg;
    (void)ctx;
    if (p->state == FLASH_FULFILLED) flash_batch_resolve(b, idx, p->u.value);
    else flash_batch_reject(b, idx, p->error, p->u.message);
}

FLASH_API int flash_batch_follow(flash_batch *b, size_t i, flash_promise *p) {
    int rc = flash__batch_check(b, i);
    if (rc) return rc;
    if (!p || p == &b->keys[i]->p) {
        flash_batch_reject(b, i, FLASH_EINVAL, p ? "batch: a key cannot follow itself" : "batch: NULL promise");
        return FLASH_EINVAL;
    }
    if (p->state != FLASH_PENDING) {
        flash__batch_follow_cb(b->loader->ctx, p, b, i);
        return FLASH_OK;
    }
    /* Internal and inline: it only settles the key, at p's settle time, so a
       loader over a loader costs no extra tick. */
    rc = flash__add_cb(b->loader->ctx, p, NULL, flash__batch_follow_cb, b, (uint32_t)i, true);
    if (rc) flash_batch_reject(b, i, rc, NULL);
    return rc;
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

/* ---- 7. model registry --------------------------------------------------- */

#define FLASH__WEEK_S (7u * 24u * 3600u)
#ifndef FLASH_DEFAULT_TIMEOUT_S /* the global default of every class's timeout_s */
#define FLASH_DEFAULT_TIMEOUT_S FLASH__WEEK_S
#endif
#define FLASH__MAX_KEY 250u

static flash_model *flash__registry;

static uint32_t flash__schema_of(const flash_model *m) {
    uint64_t h = flash__hash(m->name, strlen(m->name));
    size_t i;
    for (i = 0; i < m->nfields; i++) {
        h ^= flash__hash(m->fields[i].name, strlen(m->fields[i].name)) + (uint64_t)m->fields[i].type;
        h *= 0x9E3779B97F4A7C15ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static void flash__opts_defaults(flash_cache_opts *o, const flash_cache_opts *inherit) {
    if (inherit) {
        if (!o->version) o->version = inherit->version;
        if (!o->timeout_s) o->timeout_s = inherit->timeout_s;
        if (!o->invalidation) o->invalidation = inherit->invalidation;
        if (!o->allowtime_s) o->allowtime_s = inherit->allowtime_s;
        if (!o->lease_s) o->lease_s = inherit->lease_s;
    }
    if (!o->version) o->version = 1;
    if (!o->timeout_s) o->timeout_s = FLASH_DEFAULT_TIMEOUT_S;
}

FLASH_API void flash_register_model(flash_model *m) {
    flash_model *it, **tail;
    if (!m || m->canonical) return;
    m->fields = m->field_table(&m->nfields);
    m->schema = flash__schema_of(m);
    flash__opts_defaults(&m->opts, NULL);
    if (!m->opts.table) m->opts.table = m->name;
    if (m->opts.pk < 0 || (size_t)m->opts.pk >= m->nfields) m->opts.pk = 0;
    for (tail = &flash__registry; (it = *tail) != NULL; tail = &it->next) {
        if (strcmp(it->name, m->name) == 0) {
            /* Another file's copy of the same model: share the first one. A
               different model under the same name stays apart, and its
               classes fail with FLASH_EINVAL (flash_register_class). */
            m->canonical = it->schema == m->schema ? it : m;
            return;
        }
    }
    m->canonical = m;
    *tail = m;
}

/* order_by / limit of c into c->order: 0, or FLASH_EINVAL (a field the
   model does not have, more than 8, a class that gives no rows). */
static int flash__parse_order(flash_class *c, const flash_model *m) {
    const char *p = c->opts.order_by;
    bool has_pk = false;
    size_t j;
    c->norder = 0;
    if (!p && !c->opts.limit) return FLASH_OK;
    if (c->kind != FLASH_CLASS_FILTER && c->kind != FLASH_CLASS_LIST && c->kind != FLASH_CLASS_IDS)
        return FLASH_EINVAL;
    while (p && *p) {
        const char *s, *e;
        bool desc = false;
        int field = -1;
        while (*p == ' ' || *p == ',') p++;
        if (!*p) break;
        if (*p == '-' || *p == '+') desc = *p++ == '-';
        for (s = p; *p && *p != ',' && *p != ' '; p++) {
        }
        e = p;
        for (j = 0; j < m->nfields; j++)
            if (strlen(m->fields[j].name) == (size_t)(e - s) && memcmp(m->fields[j].name, s, (size_t)(e - s)) == 0)
                field = (int)j;
        if (field < 0 || s == e || c->norder >= sizeof c->order / sizeof c->order[0]) return FLASH_EINVAL;
        while (*p == ' ') p++;
        if (*p && *p != ',') return FLASH_EINVAL;
        for (j = 0; j < c->norder; j++)
            if (c->order[j] == field) return FLASH_EINVAL; /* twice */
        has_pk = has_pk || field == m->opts.pk;
        c->order_desc[c->norder] = desc;
        c->order[c->norder++] = field;
    }
    if (!has_pk) { /* ties: deterministic */
        if (c->norder >= sizeof c->order / sizeof c->order[0]) return FLASH_EINVAL;
        c->order_desc[c->norder] = false;
        c->order[c->norder++] = m->opts.pk;
    }
    return FLASH_OK;
}

FLASH_API void flash_register_class(flash_class *c) {
    flash_model *m;
    flash_class *it, **tail;
    size_t i;
    if (!c || c->canonical) return;
    flash_register_model(c->model);
    m = c->model->canonical;
    c->canonical = c;
    if (m != c->model || m->schema != c->model->schema) {
        if (m == c->model) { /* a model named like a registered one, other fields */
            c->error = FLASH_EINVAL;
            return;
        }
    }
    c->model = m;
    if (c->nfields == 0 || c->nfields > sizeof c->fields / sizeof c->fields[0]) {
        c->error = FLASH_EINVAL;
        return;
    }
    for (i = 0; i < c->nfields; i++) {
        size_t j;
        c->fields[i] = -1;
        for (j = 0; j < m->nfields; j++)
            if (m->fields[j].offset == c->offsets[i]) c->fields[i] = (int)j;
        if (c->fields[i] < 0) {
            c->error = FLASH_EINVAL;
            return;
        }
    }
    flash__opts_defaults(&c->opts, (c->kind == FLASH_CLASS_GET || c->kind == FLASH_CLASS_FILTER) ? &m->opts : NULL);
    if (!c->opts.db) c->opts.db = m->opts.db; /* the rows of every class come from the model's database */
    if (m->result && !c->opts.fallback) { /* no table to read it from */
        c->error = FLASH_EINVAL;
        c->error_message = "a class of a result struct (FLASH_RESULT) needs a .fallback";
        return;
    }
    if (flash__parse_order(c, m) != FLASH_OK) {
        c->error = FLASH_EINVAL;
        return;
    }
    for (tail = &m->classes; (it = *tail) != NULL; tail = &it->next) {
        if (strcmp(it->name, c->name) == 0) {
            c->canonical = it;
            if (it->kind != c->kind || it->nfields != c->nfields) c->error = FLASH_EINVAL;
            return;
        }
    }
    *tail = c;
}

FLASH_API flash_model *flash_models(void) { return flash__registry; }

FLASH_API flash_model *flash_model_find(const char *name) {
    flash_model *m;
    if (!name) return NULL;
    for (m = flash__registry; m; m = m->next)
        if (strcmp(m->name, name) == 0) return m;
    return NULL;
}

FLASH_API int flash_model_field(const flash_model *m, const char *name) {
    size_t i;
    if (!m || !name) return -1;
    if (!m->fields) flash_register_model((flash_model *)m);
    for (i = 0; i < m->nfields; i++)
        if (strcmp(m->fields[i].name, name) == 0) return (int)i;
    return -1;
}

/* The registered class behind any copy, or NULL with *err set. */
static flash_class *flash__class_of(const flash_class *c, int *err) {
    flash_class *cc = (flash_class *)c;
    if (!cc) {
        *err = FLASH_EINVAL;
        return NULL;
    }
    if (!cc->canonical) flash_register_class(cc);
    if (cc->error) {
        *err = cc->error;
        return NULL;
    }
    if (cc->canonical->error) { /* a bad dependency declared on it */
        *err = cc->canonical->error;
        return NULL;
    }
    return cc->canonical;
}

/* A dependency's mistake makes its class fail (queries say why). */
static void flash__dep_fail(flash_dependency *d, flash_class *c, const char *why) {
    d->error = FLASH_EINVAL;
    d->error_message = why;
    if (c && !c->error) {
        c->error = FLASH_EINVAL;
        c->error_message = why;
    }
}

FLASH_API void flash_register_dependency(flash_dependency *d) {
    flash_class *c;
    flash_model *m;
    flash_dependency *it, **tail;
    size_t i;
    if (!d || d->canonical) return;
    d->canonical = d;
    if (!d->cls) {
        d->error = FLASH_EINVAL;
        return;
    }
    if (!d->cls->canonical) flash_register_class(d->cls);
    c = d->cls->canonical;
    if (c->error) {
        d->error = c->error;
        return;
    }
    if (!d->model || !d->model->field_table) {
        flash__dep_fail(d, c, "a dependency on a model that is not registered (no FLASH_MODEL)");
        return;
    }
    flash_register_model(d->model);
    m = d->model->canonical;
    if (m != d->model && m->schema != d->model->schema) {
        flash__dep_fail(d, c, "a dependency on a model registered twice with different fields");
        return;
    }
    if (m == c->model) {
        flash__dep_fail(d, c, "a dependency on the class's own model (its keys are invalidated already)");
        return;
    }
    if (!d->map) {
        if (d->nfields != c->nfields || !d->offsets) {
            flash__dep_fail(d, c, "a dependency's fields are not one per key field of the class");
            return;
        }
        for (i = 0; i < d->nfields; i++) {
            size_t j;
            d->fields[i] = -1;
            for (j = 0; j < m->nfields; j++)
                if (m->fields[j].offset == d->offsets[i]) d->fields[i] = (int)j;
            if (d->fields[i] < 0 || c->fields[i] < 0 ||
                flash_value_type(m->fields[d->fields[i]].type) !=
                    flash_value_type(c->model->fields[c->fields[i]].type)) {
                flash__dep_fail(d, c, "a dependency's field is not of the type of the class's key field");
                return;
            }
        }
    }
    d->model = m;
    d->cls = c;
    for (tail = &m->dependents; (it = *tail) != NULL; tail = &it->next) {
        if (it->cls == c) { /* another file's copy */
            d->canonical = it;
            return;
        }
    }
    *tail = d;
}

FLASH_API flash_value flash_v_i64(int64_t v) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = FLASH_I64;
    x.u.i64 = v;
    return x;
}
FLASH_API flash_value flash_v_i32(int32_t v) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = FLASH_I32;
    x.u.i32 = v;
    return x;
}
FLASH_API flash_value flash_v_f64(double v) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = FLASH_F64;
    x.u.f64 = v;
    return x;
}
FLASH_API flash_value flash_v_bool(bool v) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = FLASH_BOOL;
    x.u.b = v;
    return x;
}
FLASH_API flash_value flash_v_strn(const char *s, size_t n) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = FLASH_STR;
    x.is_null = s == NULL;
    x.u.s.ptr = s;
    x.u.s.len = s ? n : 0;
    return x;
}
FLASH_API flash_value flash_v_str(const char *s) { return flash_v_strn(s, s ? strlen(s) : 0); }
FLASH_API flash_value flash_v_bytes(flash_bytes b) {
    flash_value x = flash_v_strn((const char *)b.data, b.len);
    x.type = FLASH_BYTES;
    return x;
}
FLASH_API flash_value flash_v_null(flash_type type) {
    flash_value x;
    memset(&x, 0, sizeof x);
    x.type = flash_value_type(type);
    x.is_null = true;
    return x;
}
FLASH_API flash_value flash_v_i64n(flash_i64n v) { return v.null ? flash_v_null(FLASH_I64) : flash_v_i64(v.v); }
FLASH_API flash_value flash_v_i32n(flash_i32n v) { return v.null ? flash_v_null(FLASH_I32) : flash_v_i32(v.v); }
FLASH_API flash_value flash_v_f64n(flash_f64n v) { return v.null ? flash_v_null(FLASH_F64) : flash_v_f64(v.v); }
FLASH_API flash_value flash_v_booln(flash_booln v) { return v.null ? flash_v_null(FLASH_BOOL) : flash_v_bool(v.v); }

FLASH_API flash_type flash_value_type(flash_type t) {
    switch (t) {
    case FLASH_TIME:
    case FLASH_TIMEN:
    case FLASH_I64N: return FLASH_I64;
    case FLASH_I32N: return FLASH_I32;
    case FLASH_F64N: return FLASH_F64;
    case FLASH_BOOLN: return FLASH_BOOL;
    default: return t;
    }
}

FLASH_API bool flash_type_nullable(flash_type t) {
    return t == FLASH_I64N || t == FLASH_I32N || t == FLASH_F64N || t == FLASH_BOOLN || t == FLASH_TIMEN;
}

/* ---- timestamps ---- */

/* Days since 1970-01-01 of a proleptic Gregorian date (y: astronomical
   year, 0 = 1 BC), and back (H. Hinnant's algorithms). */
static int64_t flash__days_from_civil(int64_t y, int m, int d) {
    int64_t era, yoe, doy, doe;
    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void flash__civil_from_days(int64_t z, int64_t *y, int *m, int *d) {
    int64_t era, doe, yoe, doy, mp;
    z += 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = z - era * 146097;
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

/* n digits at s[*i] (exactly n; max: up to that many more) as a number. */
static bool flash__time_num(const char *s, size_t len, size_t *i, size_t n, size_t max, int64_t *out) {
    size_t k = 0;
    int64_t v = 0;
    while (*i + k < len && k < n + max && s[*i + k] >= '0' && s[*i + k] <= '9') {
        v = v * 10 + (s[*i + k] - '0');
        k++;
    }
    if (k < n) return false;
    *i += k;
    *out = v;
    return true;
}

FLASH_API int flash_time_parse(const char *s, size_t n, flash_time *out) {
    size_t i = 0;
    int64_t year, mon, day, hh = 0, mm = 0, ss = 0, frac = 0, off = 0, days, secs, base, add;
    bool neg_year = false, bc = false;
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (!s || !out) return FLASH_EINVAL;
    if (i < n && (s[i] == '-' || s[i] == '+')) neg_year = s[i++] == '-';
    if (!flash__time_num(s, n, &i, 4, 5, &year)) return FLASH_EINVAL;
    if (i >= n || s[i++] != '-' || !flash__time_num(s, n, &i, 2, 0, &mon)) return FLASH_EINVAL;
    if (i >= n || s[i++] != '-' || !flash__time_num(s, n, &i, 2, 0, &day)) return FLASH_EINVAL;
    if (i + 1 < n && (s[i] == ' ' || s[i] == 'T' || s[i] == 't') && s[i + 1] >= '0' && s[i + 1] <= '9') {
        i++;
        if (!flash__time_num(s, n, &i, 2, 0, &hh)) return FLASH_EINVAL;
        if (i >= n || s[i++] != ':' || !flash__time_num(s, n, &i, 2, 0, &mm)) return FLASH_EINVAL;
        if (i < n && s[i] == ':') {
            i++;
            if (!flash__time_num(s, n, &i, 2, 0, &ss)) return FLASH_EINVAL;
            if (i < n && (s[i] == '.' || s[i] == ',')) {
                size_t k = 0;
                i++;
                while (i < n && s[i] >= '0' && s[i] <= '9' && k < 9) {
                    if (k < 6) frac = frac * 10 + (s[i] - '0');
                    i++;
                    k++;
                }
                if (k == 0) return FLASH_EINVAL;
                for (; k < 6; k++) frac *= 10;
            }
        }
        if (hh > 23 || mm > 59 || ss > 59) return FLASH_EINVAL;
        if (i < n && (s[i] == 'Z' || s[i] == 'z')) {
            i++;
        } else if (i < n && (s[i] == '+' || s[i] == '-')) {
            bool minus = s[i++] == '-';
            int64_t oh, om = 0, os = 0;
            if (!flash__time_num(s, n, &i, 2, 0, &oh)) return FLASH_EINVAL;
            if (i < n && s[i] == ':') {
                i++;
                if (!flash__time_num(s, n, &i, 2, 0, &om)) return FLASH_EINVAL;
                if (i < n && s[i] == ':') {
                    i++;
                    if (!flash__time_num(s, n, &i, 2, 0, &os)) return FLASH_EINVAL;
                }
            } else if (i < n && s[i] >= '0' && s[i] <= '9') {
                if (!flash__time_num(s, n, &i, 2, 0, &om)) return FLASH_EINVAL;
            }
            if (oh > 23 || om > 59 || os > 59) return FLASH_EINVAL;
            off = oh * 3600 + om * 60 + os;
            if (minus) off = -off;
        }
    }
    if (i + 3 == n && memcmp(s + i, " BC", 3) == 0) {
        if (neg_year || year == 0) return FLASH_EINVAL;
        bc = true;
        i += 3;
    }
    if (i != n) return FLASH_EINVAL;
    if (neg_year) year = -year;
    if (bc) year = 1 - year;
    if (mon < 1 || mon > 12 || day < 1) return FLASH_EINVAL;
    if (day > mdays[mon - 1] + (mon == 2 && year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)))
        return FLASH_EINVAL;
    days = flash__days_from_civil(year, (int)mon, (int)day);
    secs = days * 86400 + hh * 3600 + mm * 60 + ss - off;
    /* secs * 10^6 + frac without overflow */
    if (secs >= 0) {
        if (secs > INT64_MAX / 1000000) return FLASH_ETOOLARGE;
        base = secs * 1000000;
        if (base > INT64_MAX - frac) return FLASH_ETOOLARGE;
        *out = base + frac;
    } else {
        if (secs < INT64_MIN / 1000000 - 1) return FLASH_ETOOLARGE;
        base = (secs + 1) * 1000000;
        add = frac - 1000000;
        if (base < INT64_MIN - add) return FLASH_ETOOLARGE;
        *out = base + add;
    }
    return FLASH_OK;
}

FLASH_API size_t flash_time_format(flash_time t, char *buf, size_t cap) {
    int64_t secs = t / 1000000, frac = t % 1000000, days, sod, y;
    int m, d, len;
    char tmp[64];
    if (frac < 0) {
        frac += 1000000;
        secs--;
    }
    days = secs / 86400;
    sod = secs % 86400;
    if (sod < 0) {
        sod += 86400;
        days--;
    }
    flash__civil_from_days(days, &y, &m, &d);
    len = snprintf(tmp, sizeof tmp, y >= 0 && y <= 9999 ? "%04lld-%02d-%02d %02d:%02d:%02d" : "%+05lld-%02d-%02d %02d:%02d:%02d",
                   (long long)y, m, d, (int)(sod / 3600), (int)(sod / 60 % 60), (int)(sod % 60));
    if (frac) len += snprintf(tmp + len, sizeof tmp - (size_t)len, ".%06d", (int)frac);
    if (buf && cap) {
        size_t k = (size_t)len < cap ? (size_t)len : cap - 1;
        memcpy(buf, tmp, k);
        buf[k] = 0;
    }
    return (size_t)len;
}

FLASH_API flash_value flash_row_value(const flash_model *m, const void *row, int field) {
    flash_value v;
    memset(&v, 0, sizeof v);
    if (!m || !row || field < 0 || (size_t)field >= m->nfields) return v;
    return flash_field_value(m->fields[field].type, (const char *)row + m->fields[field].offset);
}

FLASH_API bool flash_field_set_null(const flash_field *f, void *row) {
    char *p = (char *)row + f->offset;
    flash_i64n n64 = flash_i64n_null();
    flash_i32n n32 = flash_i32n_null();
    flash_f64n nf = flash_f64n_null();
    flash_booln nb = flash_booln_null();
    switch (f->type) {
    case FLASH_I64N:
    case FLASH_TIMEN: memcpy(p, &n64, sizeof n64); return true;
    case FLASH_I32N: memcpy(p, &n32, sizeof n32); return true;
    case FLASH_F64N: memcpy(p, &nf, sizeof nf); return true;
    case FLASH_BOOLN: memcpy(p, &nb, sizeof nb); return true;
    default: return false;
    }
}

FLASH_API flash_value flash_field_value(flash_type type, const void *p) {
    flash_value v;
    memset(&v, 0, sizeof v);
    if (!p) return v;
    switch (type) {
    case FLASH_I64: {
        int64_t x;
        memcpy(&x, p, sizeof x);
        return flash_v_i64(x);
    }
    case FLASH_I32: {
        int32_t x;
        memcpy(&x, p, sizeof x);
        return flash_v_i32(x);
    }
    case FLASH_F64: {
        double x;
        memcpy(&x, p, sizeof x);
        return flash_v_f64(x);
    }
    case FLASH_BOOL: {
        bool x;
        memcpy(&x, p, sizeof x);
        return flash_v_bool(x);
    }
    case FLASH_STR: {
        const char *x;
        memcpy(&x, p, sizeof x);
        return flash_v_str(x);
    }
    case FLASH_BYTES: {
        flash_bytes x;
        memcpy(&x, p, sizeof x);
        return flash_v_bytes(x);
    }
    case FLASH_TIME: {
        flash_time x;
        memcpy(&x, p, sizeof x);
        return flash_v_i64(x);
    }
    case FLASH_I64N:
    case FLASH_TIMEN: {
        flash_i64n x;
        memcpy(&x, p, sizeof x);
        return flash_v_i64n(x);
    }
    case FLASH_I32N: {
        flash_i32n x;
        memcpy(&x, p, sizeof x);
        return flash_v_i32n(x);
    }
    case FLASH_F64N: {
        flash_f64n x;
        memcpy(&x, p, sizeof x);
        return flash_v_f64n(x);
    }
    case FLASH_BOOLN: {
        flash_booln x;
        memcpy(&x, p, sizeof x);
        return flash_v_booln(x);
    }
    }
    return v;
}

FLASH_API bool flash_value_eq(const flash_value *a, const flash_value *b) {
    if (!a || !b || a->type != b->type || a->is_null != b->is_null) return false;
    if (a->is_null) return true;
    switch (a->type) {
    case FLASH_I64: return a->u.i64 == b->u.i64;
    case FLASH_I32: return a->u.i32 == b->u.i32;
    case FLASH_F64: /* as SQL compares: 0.0 = -0.0, NaN = NaN (their keys agree) */
        return a->u.f64 == b->u.f64 || (a->u.f64 != a->u.f64 && b->u.f64 != b->u.f64);
    case FLASH_BOOL: return a->u.b == b->u.b;
    case FLASH_STR:
    case FLASH_BYTES:
        return a->u.s.len == b->u.s.len && (a->u.s.len == 0 || memcmp(a->u.s.ptr, b->u.s.ptr, a->u.s.len) == 0);
    default: return false; /* not a value type */
    }
}

FLASH_API void *flash_row_copy(flash_ctx *ctx, const flash_model *m, const void *row) {
    char *out;
    size_t i;
    if (!ctx || !m || !row) return NULL;
    out = (char *)flash__alloc(ctx, m->size);
    if (!out) return NULL;
    memcpy(out, row, m->size);
    for (i = 0; i < m->nfields; i++) {
        const flash_field *f = &m->fields[i];
        if (flash_type_nullable(f->type)) { /* a NULL's v is 0, as the codec gives it back */
            flash_value v = flash_field_value(f->type, out + f->offset);
            if (v.is_null) {
                switch (f->type) {
                case FLASH_I32N: memset(out + f->offset, 0, sizeof(int32_t)); break;
                case FLASH_F64N: memset(out + f->offset, 0, sizeof(double)); break;
                case FLASH_BOOLN: memset(out + f->offset, 0, sizeof(bool)); break;
                default: memset(out + f->offset, 0, sizeof(int64_t)); break;
                }
            }
        } else if (f->type == FLASH_STR) {
            const char *s;
            memcpy(&s, out + f->offset, sizeof s);
            if (s) {
                s = flash_strdup(ctx, s);
                if (!s) return NULL;
                memcpy(out + f->offset, &s, sizeof s);
            }
        } else if (f->type == FLASH_BYTES) {
            flash_bytes b;
            memcpy(&b, out + f->offset, sizeof b);
            if (b.data) {
                b.data = flash_memdup(ctx, b.data, b.len);
                if (!b.data) return NULL;
                memcpy(out + f->offset, &b, sizeof b);
            }
        }
    }
    return out;
}

/* A growing byte buffer in the arena (abandoned space is reclaimed at reset). */
typedef struct flash__buf {
    flash_ctx *ctx;
    unsigned char *p;
    size_t len, cap;
    int err;
} flash__buf;

static void flash__buf_init(flash__buf *b, flash_ctx *ctx, size_t cap) {
    b->ctx = ctx;
    b->len = 0;
    b->err = 0;
    b->cap = cap ? cap : 64;
    b->p = (unsigned char *)flash__alloc(ctx, b->cap);
    if (!b->p) b->err = FLASH_ENOMEM;
}

static unsigned char *flash__buf_grow(flash__buf *b, size_t n) {
    size_t cap = b->cap * 2;
    unsigned char *p;
    while (cap - b->len < n) cap *= 2;
    p = (unsigned char *)flash__alloc(b->ctx, cap);
    if (!p) {
        b->err = FLASH_ENOMEM;
        return NULL;
    }
    memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    return b->p + b->len;
}

/* Room for n more bytes (keys and values are built a few bytes at a time). */
static inline unsigned char *flash__buf_room(flash__buf *b, size_t n) {
    if (b->err) return NULL;
    if (b->cap - b->len >= n) return b->p + b->len;
    return flash__buf_grow(b, n);
}

static void flash__buf_put(flash__buf *b, const void *data, size_t n) {
    unsigned char *p = flash__buf_room(b, n);
    if (!p) return;
    if (n) memcpy(p, data, n);
    b->len += n;
}

static void flash__buf_varint(flash__buf *b, uint64_t v) {
    unsigned char *p = flash__buf_room(b, 10);
    size_t n = 0;
    if (!p) return;
    while (v >= 0x80) {
        p[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    b->len += n;
}

static uint64_t flash__zigzag(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }
static int64_t flash__unzigzag(uint64_t v) { return (int64_t)(v >> 1) ^ -(int64_t)(v & 1); }

/* A bounds-checked reader: any overrun sets err and returns zeros. */
typedef struct flash__rd {
    const unsigned char *p, *end;
    int err;
} flash__rd;

/* Only the shortest encoding is accepted (so one value has one byte string):
   no trailing zero group, nothing past bit 63. */
static uint64_t flash__rd_varint_slow(flash__rd *r) {
    uint64_t v = 0;
    unsigned shift = 0;
    if (r->end - r->p >= 10) {
        /* Room for the longest varint: no bounds check per byte, and the
           bytes unrolled (constant shifts; a time in ms takes six). */
        const unsigned char *p = r->p;
        unsigned c = p[0];
        size_t n = 1;
        v = c & 0x7f;
#define FLASH__VARINT_BYTE(i)                                                                                  \
    if (c & 0x80) {                                                                                            \
        c = p[i];                                                                                              \
        v |= (uint64_t)(c & 0x7f) << (7 * (i));                                                                \
        n = (i) + 1;                                                                                           \
    }
        FLASH__VARINT_BYTE(1)
        FLASH__VARINT_BYTE(2)
        FLASH__VARINT_BYTE(3)
        FLASH__VARINT_BYTE(4)
        FLASH__VARINT_BYTE(5)
        FLASH__VARINT_BYTE(6)
        FLASH__VARINT_BYTE(7)
        FLASH__VARINT_BYTE(8)
#undef FLASH__VARINT_BYTE
        if (c & 0x80) { /* the tenth byte: bit 63 only */
            c = p[9];
            if (c > 1) goto bad;
            v |= (uint64_t)c << 63;
            n = 10;
        }
        if (n > 1 && !c) goto bad; /* overlong */
        r->p = p + n;
        return v;
    }
    while (r->p < r->end && shift < 64) {
        unsigned char c = *r->p++;
        if (shift == 63 && c > 1) break;
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            if (shift && !c) break; /* overlong */
            return v;
        }
        shift += 7;
    }
bad:
    r->err = FLASH_EPROTO;
    return 0;
}

/* Most varints of a value (small numbers, lengths, flags) are one byte,
   many of the rest two (ids, counts below 8,192): both inline. */
static inline uint64_t flash__rd_varint(flash__rd *r) {
    const unsigned char *p = r->p;
    if (p < r->end && *p < 0x80) {
        r->p = p + 1;
        return *p;
    }
    if (r->end - p >= 2 && p[1] - 1u < 0x7fu) { /* a last byte of 1..0x7f: not overlong */
        r->p = p + 2;
        return (uint64_t)(p[0] & 0x7f) | (uint64_t)p[1] << 7;
    }
    return flash__rd_varint_slow(r);
}

static const unsigned char *flash__rd_bytes(flash__rd *r, size_t n) {
    const unsigned char *p = r->p;
    if ((size_t)(r->end - r->p) < n) {
        r->err = FLASH_EPROTO;
        return NULL;
    }
    r->p += n;
    return p;
}

/* Each field in order: I64, I32, TIME a zigzag varint; F64 8 bytes little
   endian; BOOL a byte 0/1; STR, BYTES a varint length + 1 (0: NULL) and the
   bytes; the nullable types a byte 0 (NULL, nothing follows) or 1 and their
   base type's encoding. */
static void flash__encode_row(flash__buf *b, const flash_model *m, const void *row) {
    size_t i;
    for (i = 0; i < m->nfields; i++) {
        flash_value v = flash_row_value(m, row, (int)i);
        if (flash_type_nullable(m->fields[i].type)) {
            unsigned char mark = v.is_null ? 0 : 1;
            flash__buf_put(b, &mark, 1);
            if (v.is_null) continue;
        }
        switch (v.type) {
        case FLASH_I64: flash__buf_varint(b, flash__zigzag(v.u.i64)); break;
        case FLASH_I32: flash__buf_varint(b, flash__zigzag(v.u.i32)); break;
        case FLASH_F64: {
            uint64_t bits;
            unsigned char le[8];
            int k;
            memcpy(&bits, &v.u.f64, 8);
            for (k = 0; k < 8; k++) le[k] = (unsigned char)(bits >> (8 * k));
            flash__buf_put(b, le, 8);
            break;
        }
        case FLASH_BOOL: {
            unsigned char c = v.u.b ? 1 : 0;
            flash__buf_put(b, &c, 1);
            break;
        }
        case FLASH_STR:
        case FLASH_BYTES:
            /* length + 1, so that 0 can mean NULL */
            flash__buf_varint(b, v.is_null ? 0 : (uint64_t)v.u.s.len + 1);
            if (!v.is_null) flash__buf_put(b, v.u.s.ptr, v.u.s.len);
            break;
        default: break; /* values have value types */
        }
    }
}

/* n bytes of s to d and a NUL after them; false when s holds a NUL (a
   C string cannot): eight bytes a step, overlapping at the end. */
static inline bool flash__copy_str(char *d, const unsigned char *s, size_t n) {
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    uint64_t zero = 0, x;
    size_t i;
    if (n >= 8) {
        for (i = 0; i + 8 < n; i += 8) {
            memcpy(&x, s + i, 8);
            memcpy(d + i, &x, 8);
            zero |= (x - ones) & ~x & highs;
        }
        memcpy(&x, s + n - 8, 8);
        memcpy(d + n - 8, &x, 8);
        zero |= (x - ones) & ~x & highs;
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
        zero = ((a - 0x01010101u) & ~a & 0x80808080u) | ((b - 0x01010101u) & ~b & 0x80808080u);
    } else {
        for (i = 0; i < n; i++) {
            d[i] = (char)s[i];
            zero |= s[i] == 0;
        }
    }
    d[n] = 0;
    return zero == 0;
}

/* Decode one row into row. Its strings go to *pool when pool is not NULL
   (the caller made room for them: the bytes left in r are enough, as
   every string there has a length byte at least), else to the arena. */
static void flash__decode_row_in(flash__rd *r, flash_ctx *ctx, const flash_model *m, void *row, char **pool) {
    size_t i;
    char *out = (char *)row;
    memset(row, 0, m->size);
    for (i = 0; i < m->nfields && !r->err; i++) {
        const flash_field *f = &m->fields[i];
        char *dst = out + f->offset;
        flash_type t = f->type;
        if (flash_type_nullable(t)) {
            /* a marker byte; the value is stored in the struct's v, at
               offset 0, and null after it */
            const unsigned char *mark = flash__rd_bytes(r, 1);
            if (!mark) break;
            if (*mark > 1) {
                r->err = FLASH_EPROTO;
                break;
            }
            if (*mark == 0) {
                bool yes = true;
                switch (t) {
                case FLASH_I32N: memcpy(dst + offsetof(flash_i32n, null), &yes, sizeof yes); break;
                case FLASH_F64N: memcpy(dst + offsetof(flash_f64n, null), &yes, sizeof yes); break;
                case FLASH_BOOLN: memcpy(dst + offsetof(flash_booln, null), &yes, sizeof yes); break;
                default: memcpy(dst + offsetof(flash_i64n, null), &yes, sizeof yes); break;
                }
                continue;
            }
            t = flash_value_type(t);
        }
        switch (t) {
        case FLASH_TIME:
        case FLASH_I64: {
            int64_t x = flash__unzigzag(flash__rd_varint(r));
            memcpy(dst, &x, sizeof x);
            break;
        }
        case FLASH_I32: {
            int64_t w = flash__unzigzag(flash__rd_varint(r));
            int32_t x = (int32_t)w;
            if (w != x) r->err = FLASH_EPROTO;
            memcpy(dst, &x, sizeof x);
            break;
        }
        case FLASH_F64: {
            const unsigned char *le = flash__rd_bytes(r, 8);
            uint64_t bits = 0;
            double x;
            int k;
            if (!le) break;
            for (k = 0; k < 8; k++) bits |= (uint64_t)le[k] << (8 * k);
            memcpy(&x, &bits, 8);
            memcpy(dst, &x, sizeof x);
            break;
        }
        case FLASH_BOOL: {
            const unsigned char *c = flash__rd_bytes(r, 1);
            bool x;
            if (!c) break;
            if (*c > 1) r->err = FLASH_EPROTO;
            x = *c == 1;
            memcpy(dst, &x, sizeof x);
            break;
        }
        case FLASH_STR:
        case FLASH_BYTES: {
            uint64_t n1 = flash__rd_varint(r);
            const unsigned char *data;
            char *copy;
            if (r->err || n1 == 0) break; /* NULL: already zero */
            if (n1 - 1 > (uint64_t)(r->end - r->p)) {
                r->err = FLASH_EPROTO;
                break;
            }
            data = flash__rd_bytes(r, (size_t)(n1 - 1));
            if (pool) { /* the bytes and a NUL */
                copy = *pool;
                *pool += n1;
            } else {
                copy = (char *)flash__alloc(ctx, (size_t)n1);
                if (!copy) {
                    r->err = FLASH_ENOMEM;
                    break;
                }
            }
            if (!flash__copy_str(copy, data, (size_t)(n1 - 1)) && f->type == FLASH_STR) r->err = FLASH_EPROTO;
            if (f->type == FLASH_STR) {
                memcpy(dst, &copy, sizeof copy);
            } else {
                flash_bytes b;
                b.data = copy;
                b.len = (size_t)(n1 - 1);
                memcpy(dst, &b, sizeof b);
            }
            break;
        }
        default: r->err = FLASH_EPROTO; break; /* a field type this build does not know */
        }
    }
}

static void flash__decode_row(flash__rd *r, flash_ctx *ctx, const flash_model *m, void *row) {
    flash__decode_row_in(r, ctx, m, row, NULL);
}

FLASH_API int flash_row_encode(flash_ctx *ctx, const flash_model *m, const void *row, void **out, size_t *len) {
    flash__buf b;
    if (!ctx || !m || !row || !out || !len) return FLASH_EINVAL;
    if (!m->fields) flash_register_model((flash_model *)m);
    flash__buf_init(&b, ctx, 64);
    flash__encode_row(&b, m, row);
    if (b.err) return b.err;
    *out = b.p;
    *len = b.len;
    return FLASH_OK;
}

FLASH_API int flash_row_decode(flash_ctx *ctx, const flash_model *m, const void *data, size_t len, void *row) {
    flash__rd r;
    if (!ctx || !m || (!data && len) || !row) return FLASH_EINVAL;
    if (!m->fields) flash_register_model((flash_model *)m);
    r.p = (const unsigned char *)data;
    r.end = r.p + len;
    r.err = 0;
    flash__decode_row(&r, ctx, m, row);
    if (!r.err && r.p != r.end) r.err = FLASH_EPROTO; /* trailing bytes */
    return r.err;
}

/* ---- keys ---- */

static bool flash__utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len, k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n) return false;
        for (k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* Escaped form: [A-Za-z0-9._-] stay, every other byte is %XX; so the result
   is memcached-safe (no space or control byte) and ':' separates parts. */
static void flash__buf_escape(flash__buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789ABCDEF";
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
            c == '_' || c == '-') {
            flash__buf_put(b, &s[i], 1);
        } else {
            char e[3];
            e[0] = '%';
            e[1] = hex[c >> 4];
            e[2] = hex[c & 15];
            flash__buf_put(b, e, 3);
        }
    }
}

FLASH_API const char *flash_type_name(flash_type t) {
    switch (t) {
    case FLASH_I64: return "I64";
    case FLASH_I32: return "I32";
    case FLASH_F64: return "F64";
    case FLASH_BOOL: return "BOOL";
    case FLASH_STR: return "STR";
    case FLASH_BYTES: return "BYTES";
    case FLASH_TIME: return "TIME";
    case FLASH_I64N: return "I64N";
    case FLASH_I32N: return "I32N";
    case FLASH_F64N: return "F64N";
    case FLASH_BOOLN: return "BOOLN";
    case FLASH_TIMEN: return "TIMEN";
    }
    return "?";
}

/* Check the key values of a query against its class; message on error. */
static int flash__check_values(flash_ctx *ctx, const flash_class *c, const flash_value *v, size_t n,
                               const char **message);

/* The same, inline for the usual keys: numbers and booleans of their
   fields' own types (nothing else to check in them). */
static inline int flash__check_values_fast(flash_ctx *ctx, const flash_class *c, const flash_value *v, size_t n,
                                           const char **message) {
    size_t i;
    if (n == c->nfields && v) {
        for (i = 0; i < n; i++) {
            flash_type t = c->model->fields[c->fields[i]].type;
            if (v[i].type != t || (t != FLASH_I64 && t != FLASH_I32 && t != FLASH_F64 && t != FLASH_BOOL)) break;
        }
        if (i == n) return FLASH_OK;
    }
    return flash__check_values(ctx, c, v, n, message);
}

static int flash__check_values(flash_ctx *ctx, const flash_class *c, const flash_value *v, size_t n,
                               const char **message) {
    size_t i;
    if (n != c->nfields || (n && !v)) {
        *message = flash_sprintf(ctx, "%s takes %zu key value%s, got %zu", c->name, c->nfields,
                                 c->nfields == 1 ? "" : "s", n);
        return FLASH_EINVAL;
    }
    for (i = 0; i < n; i++) {
        const flash_field *f = &c->model->fields[c->fields[i]];
        if (v[i].type != flash_value_type(f->type)) {
            if (flash_value_type(f->type) == f->type)
                *message = flash_sprintf(ctx, "%s: key field '%s' is %s, got %s", c->name, f->name,
                                         flash_type_name(f->type), flash_type_name(v[i].type));
            else
                *message = flash_sprintf(ctx, "%s: key field '%s' is %s (%s values), got %s", c->name, f->name,
                                         flash_type_name(f->type), flash_type_name(flash_value_type(f->type)),
                                         flash_type_name(v[i].type));
            return FLASH_EINVAL;
        }
        if (v[i].type == FLASH_STR && !v[i].is_null) {
            if (!v[i].u.s.ptr || memchr(v[i].u.s.ptr, 0, v[i].u.s.len)) {
                *message = flash_sprintf(ctx, "%s: key field '%s' holds a NUL byte", c->name, f->name);
                return FLASH_EINVAL;
            }
            if (!flash__utf8_valid((const unsigned char *)v[i].u.s.ptr, v[i].u.s.len)) {
                *message = flash_sprintf(ctx, "%s: key field '%s' is not valid UTF-8", c->name, f->name);
                return FLASH_EINVAL;
            }
        } else if (v[i].type == FLASH_BYTES && !v[i].is_null && v[i].u.s.len && !v[i].u.s.ptr) {
            *message = flash_sprintf(ctx, "%s: key field '%s' has bytes without data", c->name, f->name);
            return FLASH_EINVAL;
        }
    }
    return FLASH_OK;
}

static const char *flash__prefix(flash_ctx *ctx, size_t *len) {
    if (!ctx->prefix) {
        flash__buf b;
        /* Built once per context, in allocator memory (kept across resets). */
        flash__buf_init(&b, ctx, 64);
        flash__buf_escape(&b, ctx->desc.key_prefix, strlen(ctx->desc.key_prefix));
        if (b.err) return NULL;
        ctx->prefix = (char *)flash__sys_alloc(ctx, b.len + 1);
        if (!ctx->prefix) return NULL;
        memcpy(ctx->prefix, b.p, b.len);
        ctx->prefix[b.len] = 0;
        ctx->prefix_len = b.len;
    }
    *len = ctx->prefix_len;
    return ctx->prefix;
}

/* prefix:Class[@db]:vN: — the part every key of a class starts with. */
/* The escaped "prefix:Class:vN:" of each class is made once per context
   (it was half of the cost of a query's key) and kept across resets. */
typedef struct flash__khead {
    const flash_class *cls;
    char *head;
    size_t len;
} flash__khead;
#define FLASH__KHEADS 32

static void flash__key_head(flash__buf *b, flash_ctx *ctx, const flash_class *c) {
    size_t plen, i;
    const char *p;
    char v[24];
    flash__buf h;
    flash__khead *k;
    for (i = 0; i < ctx->nkheads; i++) {
        if (ctx->kheads[i].cls == c) {
            flash__buf_put(b, ctx->kheads[i].head, ctx->kheads[i].len);
            return;
        }
    }
    p = flash__prefix(ctx, &plen);
    if (!p) {
        b->err = FLASH_ENOMEM;
        return;
    }
    flash__buf_init(&h, ctx, 64);
    flash__buf_put(&h, p, plen);
    flash__buf_put(&h, ":", 1);
    flash__buf_escape(&h, c->name, strlen(c->name));
    if (c->opts.db && *c->opts.db) { /* '@' is escaped inside names: unambiguous */
        flash__buf_put(&h, "@", 1);
        flash__buf_escape(&h, c->opts.db, strlen(c->opts.db));
    }
    if (c->norder || c->opts.limit) {
        /* What a list key means depends on its order and limit: a class
           whose order_by or limit changes gets new keys by itself. */
        unsigned char fp[8 * 2 + 8];
        size_t k, n = 0;
        for (k = 0; k < c->norder; k++) {
            fp[n++] = (unsigned char)c->order[k];
            fp[n++] = (unsigned char)c->order_desc[k];
        }
        fp[n++] = (unsigned char)c->opts.limit;
        fp[n++] = (unsigned char)(c->opts.limit >> 8);
        fp[n++] = (unsigned char)(c->opts.limit >> 16);
        fp[n++] = (unsigned char)(c->opts.limit >> 24);
        snprintf(v, sizeof v, ":v%u.%08x:", (unsigned)c->opts.version, (unsigned)(flash__hash(fp, n) & 0xffffffffu));
    } else {
        snprintf(v, sizeof v, ":v%u:", (unsigned)c->opts.version);
    }
    flash__buf_put(&h, v, strlen(v));
    if (h.err) {
        b->err = h.err;
        return;
    }
    flash__buf_put(b, h.p, h.len);
    /* Remember it (the oldest goes when the table is full). */
    if (!ctx->kheads) {
        ctx->kheads = (flash__khead *)flash__sys_alloc(ctx, FLASH__KHEADS * sizeof *ctx->kheads);
        if (!ctx->kheads) return;
    }
    if (ctx->nkheads == FLASH__KHEADS) {
        flash__sys_free(ctx, ctx->kheads[0].head);
        memmove(&ctx->kheads[0], &ctx->kheads[1], (FLASH__KHEADS - 1) * sizeof *ctx->kheads);
        ctx->nkheads--;
    }
    k = &ctx->kheads[ctx->nkheads];
    k->head = (char *)flash__sys_alloc(ctx, h.len);
    if (!k->head) return;
    memcpy(k->head, h.p, h.len);
    k->len = h.len;
    k->cls = c;
    ctx->nkheads++;
}

static void flash__kheads_free(flash_ctx *ctx) {
    size_t i;
    for (i = 0; i < ctx->nkheads; i++) flash__sys_free(ctx, ctx->kheads[i].head);
    flash__sys_free(ctx, ctx->kheads);
    ctx->kheads = NULL;
    ctx->nkheads = 0;
}

/* v in decimal at p, which has room for 20 bytes; the bytes written. The
   digits are counted first and written in place, two per division: key
   values are built for every query. */
static inline size_t flash__put_int(char *p, int64_t v) {
    static const char pairs[] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                "8081828384858687888990919293949596979899";
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, t;
    size_t n = 1, len;
    for (t = u; t >= 10; t /= 10) n++;
    if (v < 0) *p++ = '-';
    len = n + (v < 0);
    while (u >= 100) {
        unsigned d = (unsigned)(u % 100) * 2;
        u /= 100;
        p[--n] = pairs[d + 1];
        p[--n] = pairs[d];
    }
    if (u >= 10) {
        p[1] = pairs[u * 2 + 1];
        p[0] = pairs[u * 2];
    } else {
        p[0] = (char)('0' + (int)u);
    }
    return len;
}

/* Decimal digits of v: no escaping needed ('-' and digits are kept). */
static void flash__buf_int(flash__buf *b, int64_t v) {
    unsigned char *p = flash__buf_room(b, 20);
    if (p) b->len += flash__put_int((char *)p, v);
}

static void flash__key_value(flash__buf *b, const flash_value *v) {
    char num[40];
    if (v->is_null) {
        flash__buf_put(b, "%N", 2); /* data never yields "%N": '%' is escaped */
        return;
    }
    switch (v->type) {
    case FLASH_I64: flash__buf_int(b, v->u.i64); return;
    case FLASH_I32: flash__buf_int(b, v->u.i32); return;
    case FLASH_F64: {
        char *comma;
        double d = v->u.f64 == 0.0 ? 0.0 : v->u.f64; /* -0.0 keys as 0 */
        if (d != d) d = NAN; /* one key for every NaN */
        snprintf(num, sizeof num, "%.17g", d);
        comma = strchr(num, ','); /* a locale's decimal comma */
        if (comma) *comma = '.';
        break;
    }
    case FLASH_BOOL: snprintf(num, sizeof num, "%d", v->u.b ? 1 : 0); break;
    case FLASH_STR:
    case FLASH_BYTES: flash__buf_escape(b, v->u.s.ptr, v->u.s.len); return;
    default: flash__buf_put(b, "%X", 2); return; /* not a value type: refused by the checks */
    }
    flash__buf_escape(b, num, strlen(num));
}

static void flash__hex128(char out[33], const void *data, size_t n) {
    static const char hex[] = "0123456789abcdef";
    uint64_t h[2];
    int i;
    h[0] = flash__hash(data, n);
    h[1] = flash__hash(data, n) ^ flash__hash(&h[0], 8) * 0xff51afd7ed558ccdull;
    {
        /* A second, independent pass so the two halves differ. */
        const unsigned char *s = (const unsigned char *)data;
        uint64_t x = 0xcbf29ce484222325ull;
        size_t k;
        for (k = 0; k < n; k++) x = (x ^ s[k]) * 0x100000001b3ull;
        h[1] ^= x;
    }
    for (i = 0; i < 16; i++) {
        unsigned char c = (unsigned char)(h[i / 8] >> (8 * (i % 8)));
        out[2 * i] = hex[c >> 4];
        out[2 * i + 1] = hex[c & 15];
    }
    out[32] = 0;
}

/* Builds the cache key; full and full_len get the unhashed key when hashed.
   lead (0 or 1) bytes are left free before the unhashed key, in the same
   buffer: the query engine puts its memo key's mode byte there. */
static int flash__build_key(flash_ctx *ctx, const flash_class *c, const flash_value *v, size_t n, size_t lead,
                            char **key, size_t *len, char **full, size_t *full_len) {
    flash__buf b;
    size_t i, head;
    /* The common key, integers after the class's cached head: one
       allocation of its largest size, written in place. */
    for (i = 0; i < ctx->nkheads && ctx->kheads[i].cls != c; i++) {
    }
    if (i < ctx->nkheads && n <= 8) {
        const flash__khead *kh = &ctx->kheads[i];
        for (i = 0; i < n && (v[i].type == FLASH_I64 || v[i].type == FLASH_I32) && !v[i].is_null; i++) {
        }
        if (i == n) {
            char *p = (char *)flash__alloc(ctx, lead + kh->len + n * 21 + 1); /* ':' and 20 bytes a value */
            size_t at = lead + kh->len;
            if (!p) return FLASH_ENOMEM;
            memcpy(p + lead, kh->head, kh->len);
            for (i = 0; i < n; i++) {
                if (i) p[at++] = ':';
                at += flash__put_int(p + at, v[i].type == FLASH_I64 ? v[i].u.i64 : v[i].u.i32);
            }
            p[at] = 0;
            if (at - lead <= FLASH__MAX_KEY) {
                *key = p + lead;
                *len = at - lead;
                if (full) *full = NULL;
                if (full_len) *full_len = 0;
                return FLASH_OK;
            }
            /* too long: hashed, below */
        }
    }
    flash__buf_init(&b, ctx, 64);
    b.len = lead; /* 64 >= lead: room, or b.err */
    flash__key_head(&b, ctx, c);
    head = b.len - lead;
    for (i = 0; i < n; i++) {
        if (i) flash__buf_put(&b, ":", 1);
        flash__key_value(&b, &v[i]);
    }
    flash__buf_put(&b, "", 1); /* NUL, not counted */
    if (b.err) return b.err;
    b.len -= 1 + lead;
    if (b.len <= FLASH__MAX_KEY) {
        *key = (char *)b.p + lead;
        *len = b.len;
        if (full) *full = NULL;
        if (full_len) *full_len = 0;
        return FLASH_OK;
    }
    {
        char hex[33];
        char *k;
        if (head + 1 + 32 > FLASH__MAX_KEY) return FLASH_ETOOLARGE; /* prefix and class name too long */
        flash__hex128(hex, b.p + lead, b.len);
        k = (char *)flash__alloc(ctx, head + 1 + 32 + 1);
        if (!k) return FLASH_ENOMEM;
        memcpy(k, b.p + lead, head);
        k[head] = '#';
        memcpy(k + head + 1, hex, 33);
        *key = k;
        *len = head + 1 + 32;
        if (full) *full = (char *)b.p + lead;
        if (full_len) *full_len = b.len;
    }
    return FLASH_OK;
}

FLASH_API int flash_cache_key(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n,
                              char **key, size_t *len, bool *hashed) {
    const char *msg;
    char *full = NULL;
    int err = 0, rc;
    flash_class *cc;
    if (!ctx || !key || !len) return FLASH_EINVAL;
    cc = flash__class_of(c, &err);
    if (!cc) return err;
    rc = flash__check_values(ctx, cc, values, n, &msg);
    if (rc) return rc;
    rc = flash__build_key(ctx, cc, values, n, 0, key, len, &full, NULL);
    if (hashed) *hashed = full != NULL;
    return rc;
}

static int flash__version_key(flash_ctx *ctx, const flash_class *c, char **key, size_t *len);

FLASH_API int flash_cache_version_key(flash_ctx *ctx, const flash_class *c, char **key, size_t *len) {
    int err = 0;
    flash_class *cc;
    if (!ctx || !key || !len) return FLASH_EINVAL;
    cc = flash__class_of(c, &err);
    if (!cc) return err;
    return flash__version_key(ctx, cc, key, len);
}

/* ---- 8. query engine ----------------------------------------------------- */

/* Value header: magic, flags, schema, dynamic version, time, [full key]. */
/* Format 2: magic, flags, schema (4), check (4), then varints. The check
   covers every other byte, so corruption is a miss, never another row. */
#define FLASH__MAGIC 0xF2
#define FLASH__HDR_FIXED 10
enum {
    FLASH__VF_NONE = 1,   /* a cached not-found */
    FLASH__VF_MARKER = 2, /* an invalidation marker: no payload */
    FLASH__VF_HASHED = 4, /* the full key follows the header */
    FLASH__VF_STALE = 8   /* invalidated, served within allowtime */
};

typedef struct flash__binding {
    const flash_model *model; /* NULL: the default */
    flash_source source;
} flash__binding;

FLASH_API int flash_ctx_set_source(flash_ctx *ctx, const flash_model *m, flash_source source) {
    size_t i;
    flash__binding *nb;
    if (!ctx) return FLASH_EINVAL;
    if (m) {
        if (!m->canonical) flash_register_model((flash_model *)m);
        m = m->canonical;
    }
    for (i = 0; i < ctx->nsources; i++) {
        if (ctx->sources[i].model == m) {
            ctx->sources[i].source = source;
            return FLASH_OK;
        }
    }
    nb = (flash__binding *)flash__sys_alloc(ctx, (ctx->nsources + 1) * sizeof *nb);
    if (!nb) return FLASH_ENOMEM;
    if (ctx->nsources) memcpy(nb, ctx->sources, ctx->nsources * sizeof *nb);
    nb[ctx->nsources].model = m;
    nb[ctx->nsources].source = source;
    flash__sys_free(ctx, ctx->sources);
    ctx->sources = nb;
    ctx->nsources++;
    return FLASH_OK;
}

static flash_source flash__source_for(flash_ctx *ctx, const flash_model *m) {
    flash_source none = {NULL, NULL};
    size_t i;
    for (i = 0; i < ctx->nsources; i++)
        if (ctx->sources[i].model == m) return ctx->sources[i].source;
    for (i = 0; i < ctx->nsources; i++)
        if (ctx->sources[i].model == NULL) return ctx->sources[i].source;
    return none;
}

/* One query: the payload of an engine loader key. */
typedef struct flash__query {
    flash_class *cls;
    flash_value *values;
    char *key, *full;
    size_t key_len, full_len;
    int flags;
} flash__query;

/* Internal query flag: a write's refresh (RESET, flash_reset_queries). It
   bypasses the memo and fills inside the lag window: its source read comes
   after the write it refreshes, by the writer's own context. */
#define FLASH__Q_REFRESH 16

typedef struct flash__engine flash__engine;
typedef struct flash__eb flash__eb;

/* A backend operation the engine has in flight (fills, writes). */
typedef struct flash__eop {
    flash_cache_op op;
    flash_ctx *ctx;
    uint64_t gen;
    struct flash__eop *prev, *next;
    flash__eb *eb;           /* the batch's GET or lock, or NULL for writes */
    void (*then)(struct flash__eop *o); /* writes: after completion */
    void *arg;
} flash__eop;

struct flash__engine {
    flash_loader *loader;
    uint64_t refreshes; /* numbers the memo keys of write refreshes */
};

/* What the engine decided for one key after the cache answered. */
enum { FLASH__FILL_NONE = 0, FLASH__FILL_ADD, FLASH__FILL_CAS, FLASH__FILL_KINDS };

/* Rows (or ids) collected for one key tuple of a list-like class. */
typedef struct flash__rows {
    void *row;
    void *full;              /* ordered IDS classes: the row, to sort by */
    struct flash__rows *next;
} flash__rows;

struct flash_fetch {
    flash_fetch *next_in_eb;
    flash_fetch *prev_live, *next_live; /* ctx->fetches: every fetch not done */
    flash__eb *eb;
    flash_class *cls;
    flash_ctx *ctx;
    size_t count;
    size_t *index;           /* batch index of each key tuple */
    uint32_t *map;           /* open addressing: key hash -> tuple + 1 */
    size_t map_cap;
    void **row;              /* GET/INSTANCE: the row */
    flash__rows **rows, **rows_tail;
    size_t *nrows;           /* FILTER/LIST/COUNT/IDS: rows (or ids) seen */
    int64_t *counts;         /* COUNT set by flash_fetch_set_count */
    bool *count_set;
    bool *dont_cache;        /* flash_fetch_dont_cache: made on first use */
    int *error;
    const char **message;
    uint64_t gen;
    bool done, canceled;
    flash_source src;
};

struct flash__eb {
    flash_ctx *ctx;
    flash_batch *batch;
    uint64_t gen;
    size_t n;
    flash__query **qs;
    flash__eop *get;         /* the GET in flight */
    flash__eop *lock;        /* the refresh-lock ADD in flight */
    uint8_t *fill;           /* per key: FLASH__FILL_* */
    uint64_t *cas;           /* per key: CAS of the marker / stale value seen */
    uint64_t *ver;           /* per key: the version to write under */
    bool *served;            /* per key: answered (stale); the fetch only refreshes */
    flash_class **vcls;      /* the classes of the batch (their version keys) */
    uint64_t *vval;          /* their current versions */
    int *verr;               /* their version key's error, or 0 */
    size_t nver;
    flash_fetch *fetches;    /* list */
    size_t fetches_pending;
    bool canceled;
    /* Leases: keys whose lease another reader holds wait for its fill. */
    uint8_t *wait;           /* per key: waiting (re-read after the backoff) */
    uint8_t *lockreq;        /* per key: in the refresh-lock op (served stale) */
    size_t nwait;
    void *timer;             /* the backoff timer, or NULL */
    uint32_t backoff_ms, waited_ms;
    bool rereading;          /* after_cache: only the waiting keys */
};

static int64_t flash__now(flash_ctx *ctx) { return ctx->desc.clock_ms(ctx->desc.clock_user_data); }

static void flash__engine_batch(flash_ctx *ctx, flash_batch *b, void *ud);
static void flash__engine_cancel(flash_ctx *ctx, flash_batch *b, void *ud);

static flash__engine *flash__engine_get(flash_ctx *ctx) {
    flash__engine *e = (flash__engine *)ctx->engine;
    if (!e) {
        flash_loader_desc d;
        e = (flash__engine *)flash_calloc(ctx, 1, sizeof *e);
        if (!e) return NULL;
        memset(&d, 0, sizeof d);
        d.name = "flash";
        d.batch = flash__engine_batch;
        d.cancel = flash__engine_cancel;
        d.user_data = e;
        d.max_batch = ctx->desc.max_batch;
        d.memo_errors = true; /* a request sees one answer per query, found or not */
        e->loader = flash_loader_create(ctx, &d);
        if (!e->loader) return NULL;
        ctx->engine = e;
    }
    return e;
}

/* Writes (fills, markers, deletes) outlive their request: a reset detaches
   them and their request's memory stays until they complete; only
   flash_ctx_destroy cancels them. */
/* Hold generation gen (the current one, or a zombie still held). */
static void flash__hold_gen(flash_ctx *ctx, uint64_t gen) {
    flash__zombie *z;
    if (gen == ctx->gen) {
        ctx->holds++;
        return;
    }
    for (z = ctx->zombies; z; z = z->next)
        if (z->gen == gen) z->holds++;
}

static void flash__eop_link(flash_ctx *ctx, flash__eop *o, uint64_t gen) {
    o->ctx = ctx;
    o->gen = gen;
    flash__hold_gen(ctx, gen);
    if (gen == ctx->gen) ctx->inflight++;
    o->prev = NULL;
    o->next = ctx->writes;
    if (ctx->writes) ctx->writes->prev = o;
    ctx->writes = o;
}

static void flash__eop_unlink(flash__eop *o) {
    flash_ctx *ctx = o->ctx;
    if (o->prev) o->prev->next = o->next;
    else ctx->writes = o->next;
    if (o->next) o->next->prev = o->prev;
    if (o->gen == ctx->gen) ctx->inflight--;
    flash__unhold(ctx, o->gen);
}

static void flash__fetch_cancel(flash_ctx *ctx, flash_fetch *f);

static void flash__engine_reset(flash_ctx *ctx, bool destroying) {
    flash__eop *o;
    flash_fetch *f, *next;
    /* Fetches of this request (refreshes may outlive their batch). */
    for (f = ctx->fetches; f; f = next) {
        next = f->next_live;
        if (destroying || f->gen == ctx->gen) flash__fetch_cancel(ctx, f);
    }
    if (destroying) {
        while ((o = ctx->writes) != NULL) {
            if (ctx->desc.cache.vt) ctx->desc.cache.vt->cancel(ctx->desc.cache.self, &o->op);
            flash__eop_unlink(o);
        }
    } else {
        for (o = ctx->writes; o; o = o->next)
            if (o->gen == ctx->gen) ctx->inflight--; /* no longer this request's work */
    }
    ctx->engine = NULL;
}

static void flash__write_done(flash_cache_op *op) {
    flash__eop *o = (flash__eop *)op->data;
    flash_ctx *ctx = o->ctx;
    size_t i;
    if (op->code == FLASH_CACHE_ADD || op->code == FLASH_CACHE_CAS || op->code == FLASH_CACHE_SET) {
        for (i = 0; i < op->count; i++)
            if (!op->quiet && op->items[i].status != FLASH_OK) ctx->stats.fills_skipped++;
    }
    if (ctx->desc.log_fill_errors && op->status)
        flash_ctx_log(ctx, FLASH_LOG_WARN, "cache write failed: %s", flash_strerror(op->status));
    if (o->then) o->then(o); /* may issue more writes of the same generation */
    flash__eop_unlink(o);
}

/* Issue a write (fills, markers, deletes) that outlives the request; then
   (optional) runs when it completed. Its memory belongs to generation gen.
   Returns NULL (nothing issued) without a backend or memory. */
static flash__eop *flash__write_then(flash_ctx *ctx, uint64_t gen, flash_cache_opcode code, flash_cache_item *items,
                                     size_t n, void (*then)(flash__eop *o), void *arg) {
    flash__eop *o;
    if (!n || !ctx->desc.cache.vt) return NULL;
    o = (flash__eop *)flash_calloc(ctx, 1, sizeof *o);
    if (!o) return NULL;
    o->op.code = code;
    o->op.items = items;
    o->op.count = n;
    o->op.quiet = false;
    o->op.done = flash__write_done;
    o->op.data = o;
    o->then = then;
    o->arg = arg;
    flash__eop_link(ctx, o, gen);
    ctx->stats.writes++;
    ctx->desc.cache.vt->submit(ctx->desc.cache.self, ctx->loop, &o->op);
    return o;
}

static void flash__write(flash_ctx *ctx, flash_cache_opcode code, flash_cache_item *items, size_t n) {
    flash__write_then(ctx, ctx->gen, code, items, n, NULL, NULL);
}

static bool flash__one_row(flash_class_kind k) { return k == FLASH_CLASS_GET || k == FLASH_CLASS_INSTANCE; }

/* A value's header. */
typedef struct flash__hdr {
    unsigned flags;
    uint32_t schema;
    uint64_t version;
    int64_t time_ms;
    size_t size; /* bytes of header (without the full key) */
} flash__hdr;

static uint32_t flash__le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static void flash__put_le32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* The check of a value: a hash of its bytes around the check field. */
static uint32_t flash__check_of(const unsigned char *v, size_t len) {
    uint64_t a = flash__hash(v, 6), b = flash__hash(v + FLASH__HDR_FIXED, len - FLASH__HDR_FIXED);
    return (uint32_t)((a * 0x9E3779B97F4A7C15ull) ^ b ^ (b >> 32));
}

/* A value's header; FLASH_EPROTO when it is malformed or its check fails. */
static int flash__read_hdr(flash__rd *r, flash__hdr *h) {
    const unsigned char *start = r->p;
    const unsigned char *hdr = flash__rd_bytes(r, FLASH__HDR_FIXED);
    if (!hdr || hdr[0] != FLASH__MAGIC || (hdr[1] & ~0x0Fu)) return FLASH_EPROTO;
    if (flash__le32(hdr + 6) != flash__check_of(start, (size_t)(r->end - start))) return FLASH_EPROTO;
    h->flags = hdr[1];
    h->schema = flash__le32(hdr + 2);
    h->version = flash__rd_varint(r);
    h->time_ms = (int64_t)flash__rd_varint(r);
    h->size = (size_t)(r->p - start);
    return r->err ? FLASH_EPROTO : FLASH_OK;
}

/* Starts a value in b (which must be empty); flash__seal finishes it. */
static void flash__put_hdr(flash__buf *b, unsigned flags, uint32_t schema, uint64_t version, int64_t time_ms) {
    unsigned char hdr[FLASH__HDR_FIXED];
    hdr[0] = FLASH__MAGIC;
    hdr[1] = (unsigned char)flags;
    flash__put_le32(hdr + 2, schema);
    flash__put_le32(hdr + 6, 0); /* the check, written by flash__seal */
    flash__buf_put(b, hdr, FLASH__HDR_FIXED);
    flash__buf_varint(b, version);
    flash__buf_varint(b, (uint64_t)(time_ms < 0 ? 0 : time_ms));
}

static void flash__seal(flash__buf *b) {
    if (!b->err) flash__put_le32(b->p + 6, flash__check_of(b->p, b->len));
}

/* Encode a result as a cached value: header then payload. */
static int flash__encode_value(flash_ctx *ctx, const flash__query *q, void *result, bool none, uint64_t version,
                               void **out, size_t *len) {
    flash__buf b;
    const flash_class *c = q->cls;
    flash__buf_init(&b, ctx, 64);
    /* version: the dynamic version (0 unless DYNAMIC) */
    flash__put_hdr(&b, (none ? FLASH__VF_NONE : 0) | (q->full ? FLASH__VF_HASHED : 0), c->model->schema, version,
                   flash__now(ctx));
    if (q->full) {
        flash__buf_varint(&b, q->full_len);
        flash__buf_put(&b, q->full, q->full_len);
    }
    if (!none) {
        if (flash__one_row(c->kind)) {
            flash__encode_row(&b, c->model, result);
        } else if (c->kind == FLASH_CLASS_COUNT) {
            flash__buf_varint(&b, flash__zigzag(*(int64_t *)result));
        } else if (c->kind == FLASH_CLASS_EXISTS) {
            flash__buf_varint(&b, *(bool *)result ? 1 : 0);
        } else if (c->kind == FLASH_CLASS_IDS) {
            flash_ids *ids = (flash_ids *)result;
            size_t i;
            flash__buf_varint(&b, ids->count);
            for (i = 0; i < ids->count; i++) flash__buf_varint(&b, flash__zigzag(ids->ids[i]));
        } else {
            flash_list *l = (flash_list *)result;
            size_t i;
            flash__buf_varint(&b, l->count);
            for (i = 0; i < l->count; i++) flash__encode_row(&b, c->model, l->items[i]);
        }
    }
    flash__seal(&b);
    if (b.err) return b.err;
    *out = b.p;
    *len = b.len;
    return FLASH_OK;
}

/* Rows a source gave for q carry q's key values: a decoded value whose rows
   do not is corrupt, whatever its check says. (Custom fallbacks may answer
   with any rows: not checked.) */
static bool flash__row_has_key(const flash__query *q, const void *row) {
    size_t k;
    for (k = 0; k < q->cls->nfields; k++) {
        const flash_field *f = &q->cls->model->fields[q->cls->fields[k]];
        const flash_value *w = &q->values[k];
        const char *p = (const char *)row + f->offset;
        flash_value v;
        if (!w->is_null && f->type == w->type) { /* the usual key fields, in place */
            if (f->type == FLASH_I64) {
                int64_t x;
                memcpy(&x, p, sizeof x);
                if (x != w->u.i64) return false;
                continue;
            }
            if (f->type == FLASH_I32) {
                int32_t x;
                memcpy(&x, p, sizeof x);
                if (x != w->u.i32) return false;
                continue;
            }
            if (f->type == FLASH_STR) {
                const char *x;
                memcpy(&x, p, sizeof x);
                if (!x || strlen(x) != w->u.s.len || (w->u.s.len && memcmp(x, w->u.s.ptr, w->u.s.len) != 0))
                    return false;
                continue;
            }
        }
        v = flash_field_value(f->type, p);
        if (!flash_value_eq(&v, w)) return false;
    }
    return true;
}

static bool flash__rows_match(const flash__query *q, void *result) {
    const flash_class *c = q->cls;
    size_t i;
    if (flash__one_row(c->kind)) return flash__row_has_key(q, result);
    if (c->kind == FLASH_CLASS_FILTER || c->kind == FLASH_CLASS_LIST) {
        const flash_list *l = (const flash_list *)result;
        for (i = 0; i < l->count; i++)
            if (!flash__row_has_key(q, l->items[i])) return false;
    }
    return true;
}

/* Decode a cached value for q. Returns 1 with *result (NULL + *none for a
   cached not-found) when usable — h tells whether it is stale or of another
   version —, 0 when it is a miss (a marker: see h, another key, another
   schema), or a negative error for a corrupt value. */
static int flash__decode_value(flash_ctx *ctx, const flash__query *q, const void *data, size_t len, void **result,
                               bool *none, flash__hdr *h) {
    flash__rd r;
    const flash_class *c = q->cls;
    uint32_t schema;
    unsigned flags;
    r.p = (const unsigned char *)data;
    r.end = r.p + len;
    r.err = 0;
    *result = NULL;
    *none = false;
    if (flash__read_hdr(&r, h) != FLASH_OK) return FLASH_EPROTO;
    flags = h->flags;
    schema = h->schema;
    if (flags & FLASH__VF_MARKER) return r.p == r.end ? 0 : FLASH_EPROTO;
    if (schema != c->model->schema) return 0; /* written by another version of the model */
    if (flags & FLASH__VF_HASHED) {
        uint64_t n = flash__rd_varint(&r);
        const unsigned char *k;
        if (r.err || n > (uint64_t)(r.end - r.p)) return FLASH_EPROTO;
        k = flash__rd_bytes(&r, (size_t)n);
        if (!q->full || n != q->full_len || memcmp(k, q->full, (size_t)n) != 0) return 0; /* hash collision */
    } else if (q->full) {
        return 0;
    }
    if (flags & FLASH__VF_NONE) {
        if (r.p != r.end) return FLASH_EPROTO;
        *none = true;
        return 1;
    }
    if (flash__one_row(c->kind)) {
        /* One allocation: the row, then its strings. */
        size_t rsize = FLASH__ROUND8(c->model->size);
        char *row = (char *)flash__alloc(ctx, rsize + (size_t)(r.end - r.p)), *pool = row + rsize;
        if (!row) return FLASH_ENOMEM;
        flash__decode_row_in(&r, ctx, c->model, row, &pool);
        *result = row;
    } else if (c->kind == FLASH_CLASS_COUNT) {
        int64_t *n = (int64_t *)flash__alloc(ctx, sizeof *n);
        if (!n) return FLASH_ENOMEM;
        *n = flash__unzigzag(flash__rd_varint(&r));
        *result = n;
    } else if (c->kind == FLASH_CLASS_EXISTS) {
        bool *e = (bool *)flash__alloc(ctx, sizeof *e);
        uint64_t x;
        if (!e) return FLASH_ENOMEM;
        x = flash__rd_varint(&r);
        if (x > 1) return FLASH_EPROTO;
        *e = x == 1;
        *result = e;
    } else if (c->kind == FLASH_CLASS_IDS) {
        uint64_t count = flash__rd_varint(&r), i;
        flash_ids *ids = (flash_ids *)flash__alloc(ctx, sizeof *ids);
        if (!ids || r.err || count > (uint64_t)(r.end - r.p)) return ids ? FLASH_EPROTO : FLASH_ENOMEM;
        ids->count = (size_t)count;
        ids->ids = (int64_t *)flash__alloc(ctx, (count ? (size_t)count : 1) * sizeof *ids->ids);
        if (!ids->ids) return FLASH_ENOMEM;
        for (i = 0; i < count && !r.err; i++) ids->ids[i] = flash__unzigzag(flash__rd_varint(&r));
        *result = ids;
    } else {
        uint64_t count = flash__rd_varint(&r), i;
        flash_list *l = (flash_list *)flash__alloc(ctx, sizeof *l);
        if (!l || r.err || count > (uint64_t)(r.end - r.p)) return l ? FLASH_EPROTO : FLASH_ENOMEM;
        l->count = (size_t)count;
        l->items = (void **)flash__alloc(ctx, (count ? (size_t)count : 1) * sizeof *l->items);
        if (!l->items) return FLASH_ENOMEM;
        for (i = 0; i < count && !r.err; i++) {
            l->items[i] = flash__alloc(ctx, c->model->size);
            if (!l->items[i]) return FLASH_ENOMEM;
            flash__decode_row(&r, ctx, c->model, l->items[i]);
        }
        *result = l;
    }
    if (r.err) return r.err;
    if (r.p != r.end) return FLASH_EPROTO;
    if (!c->opts.fallback && !flash__rows_match(q, *result)) return FLASH_EPROTO;
    return 1;
}

static const char *flash__notfound_message(flash_ctx *ctx, const flash__query *q) {
    const char *m = flash_sprintf(ctx, "%s matching query does not exist (%s)", q->cls->model->name, q->key);
    return m ? m : flash_strerror(FLASH_ENOTFOUND);
}

static void flash__eb_settle_none(flash__eb *eb, size_t i) {
    flash_batch_reject(eb->batch, i, FLASH_ENOTFOUND, flash__notfound_message(eb->ctx, eb->qs[i]));
}

static void flash__eb_maybe_end(flash__eb *eb) {
    if (eb->fetches_pending == 0 && !eb->get && !eb->lock && !eb->timer && !eb->nwait && !eb->canceled)
        flash_batch_end(eb->batch);
}

/* ---- fetches ---- */

static uint64_t flash__tuple_hash(const flash_value *v, size_t n) {
    uint64_t h = 0x12345;
    size_t i;
    for (i = 0; i < n; i++) {
        switch (v[i].type) {
        case FLASH_I64: h ^= flash__hash(&v[i].u.i64, 8); break;
        case FLASH_I32: {
            int64_t w = v[i].u.i32;
            h ^= flash__hash(&w, 8);
            break;
        }
        case FLASH_F64: { /* equal values hash alike: 0.0 and -0.0, any NaN */
            double d = v[i].u.f64 == 0.0 ? 0.0 : (v[i].u.f64 != v[i].u.f64 ? NAN : v[i].u.f64);
            h ^= flash__hash(&d, 8);
            break;
        }
        case FLASH_BOOL: h ^= v[i].u.b ? 0x55 : 0xAA; break;
        case FLASH_STR:
        case FLASH_BYTES: h ^= v[i].is_null ? 0x77 : flash__hash(v[i].u.s.ptr ? v[i].u.s.ptr : "", v[i].u.s.len); break;
        default: break;
        }
        if (v[i].is_null) h ^= 0x3C3C; /* NULL and 0 apart */
        h = (h ^ (h >> 31)) * 0x9E3779B97F4A7C15ull + i;
    }
    return h;
}

static int flash__fetch_map_build(flash_fetch *f) {
    size_t i, cap = 8;
    while (cap < f->count * 2) cap *= 2;
    f->map = (uint32_t *)flash_calloc(f->ctx, cap, sizeof *f->map);
    if (!f->map) return FLASH_ENOMEM;
    f->map_cap = cap;
    for (i = 0; i < f->count; i++) {
        const flash__query *q = f->eb->qs[f->index[i]];
        size_t j = (size_t)flash__tuple_hash(q->values, f->cls->nfields) & (cap - 1);
        while (f->map[j]) j = (j + 1) & (cap - 1);
        f->map[j] = (uint32_t)(i + 1);
    }
    return FLASH_OK;
}

/* The key tuple a row belongs to, or -1. */
static long flash__fetch_match(flash_fetch *f, const void *row) {
    flash_value v[8];
    size_t k, j;
    const flash_class *c = f->cls;
    for (k = 0; k < c->nfields; k++) v[k] = flash_row_value(c->model, row, c->fields[k]);
    j = (size_t)flash__tuple_hash(v, c->nfields) & (f->map_cap - 1);
    while (f->map[j]) {
        size_t t = f->map[j] - 1;
        const flash_value *kv = f->eb->qs[f->index[t]]->values;
        for (k = 0; k < c->nfields; k++)
            if (!flash_value_eq(&kv[k], &v[k])) break;
        if (k == c->nfields) return (long)t;
        j = (j + 1) & (f->map_cap - 1);
    }
    return -1;
}

/* f is done (answered or cancelled): off the context's list, and its
   request's memory released. */
static void flash__fetch_finish(flash_fetch *f) {
    flash_ctx *ctx = f->ctx;
    f->done = true;
    if (f->prev_live) f->prev_live->next_live = f->next_live;
    else if (ctx->fetches == f) ctx->fetches = f->next_live;
    if (f->next_live) f->next_live->prev_live = f->prev_live;
    f->prev_live = f->next_live = NULL;
    if (f->gen == ctx->gen) ctx->inflight--;
    flash__unhold(ctx, f->gen);
}

/* Its request ended: a source with a cancel function drops it now; any
   other answers later into flash_fetch_done, which then only releases it. */
static void flash__fetch_cancel(flash_ctx *ctx, flash_fetch *f) {
    (void)ctx;
    if (f->done) return;
    f->canceled = true;
    if (f->src.vt && f->src.vt->cancel) {
        f->src.vt->cancel(f->src.self, f);
        flash__fetch_finish(f);
    }
}

static int flash__fetch_check(flash_fetch *f) {
    if (!f) return FLASH_EINVAL;
    if (f->gen != f->ctx->gen || f->canceled) return FLASH_ECANCELED;
    if (f->done) return FLASH_ESTATE;
    return FLASH_OK;
}

FLASH_API flash_ctx *flash_fetch_ctx(const flash_fetch *f) { return f ? f->ctx : NULL; }
FLASH_API const flash_model *flash_fetch_model(const flash_fetch *f) { return f ? f->cls->model : NULL; }
FLASH_API const flash_class *flash_fetch_class(const flash_fetch *f) { return f ? f->cls : NULL; }
FLASH_API size_t flash_fetch_nfields(const flash_fetch *f) { return f ? f->cls->nfields : 0; }
FLASH_API int flash_fetch_field(const flash_fetch *f, size_t j) {
    return (f && j < f->cls->nfields) ? f->cls->fields[j] : -1;
}
FLASH_API size_t flash_fetch_count(const flash_fetch *f) { return f ? f->count : 0; }
FLASH_API const flash_value *flash_fetch_key(const flash_fetch *f, size_t i) {
    return (f && i < f->count) ? f->eb->qs[f->index[i]]->values : NULL;
}

static int flash__fetch_add(flash_fetch *f, size_t t, const void *row) {
    flash_ctx *ctx = f->ctx;
    const flash_class *c = f->cls;
    if (f->error[t]) return FLASH_OK;
    if (flash__one_row(c->kind)) {
        if (f->row[t]) {
            f->error[t] = FLASH_EMULTIPLE;
            f->message[t] = flash_sprintf(ctx, "%s: more than one %s for %s", c->name, c->model->name,
                                          f->eb->qs[f->index[t]]->key);
            return FLASH_EMULTIPLE;
        }
        f->row[t] = flash_row_copy(ctx, c->model, row);
        return f->row[t] ? FLASH_OK : FLASH_ENOMEM;
    }
    if (c->kind == FLASH_CLASS_COUNT || c->kind == FLASH_CLASS_EXISTS) {
        f->nrows[t]++;
        return FLASH_OK;
    }
    {
        flash__rows *r = (flash__rows *)flash__alloc(ctx, sizeof *r);
        if (!r) return FLASH_ENOMEM;
        r->next = NULL;
        if (c->kind == FLASH_CLASS_IDS) {
            flash_value pk = flash_row_value(c->model, row, c->model->opts.pk);
            int64_t *id = (int64_t *)flash__alloc(ctx, sizeof *id);
            if (!id) return FLASH_ENOMEM;
            if (pk.type == FLASH_I64 && !pk.is_null) *id = pk.u.i64;
            else if (pk.type == FLASH_I32 && !pk.is_null) *id = pk.u.i32;
            else {
                f->error[t] = FLASH_EINVAL;
                f->message[t] = flash_sprintf(ctx, "%s: ids need an integer primary key", c->name);
                return FLASH_EINVAL;
            }
            r->row = id;
            r->full = NULL;
            if (c->norder && !(r->full = flash_row_copy(ctx, c->model, row))) return FLASH_ENOMEM;
        } else {
            r->row = flash_row_copy(ctx, c->model, row);
            if (!r->row) return FLASH_ENOMEM;
        }
        if (f->rows_tail[t]) f->rows_tail[t]->next = r;
        else f->rows[t] = r;
        f->rows_tail[t] = r;
        f->nrows[t]++;
    }
    return FLASH_OK;
}

FLASH_API int flash_fetch_row(flash_fetch *f, const void *row) {
    int rc = flash__fetch_check(f);
    long t;
    if (rc) return rc;
    if (!row) return FLASH_EINVAL;
    if (!f->map && (rc = flash__fetch_map_build(f)) != FLASH_OK) return rc;
    t = flash__fetch_match(f, row);
    if (t < 0) return FLASH_ENOTFOUND; /* a row nobody asked for: ignored */
    f->ctx->stats.source_rows++;
    return flash__fetch_add(f, (size_t)t, row);
}

FLASH_API int flash_fetch_set_row(flash_fetch *f, size_t i, const void *row) {
    int rc = flash__fetch_check(f);
    if (rc) return rc;
    if (i >= f->count) return FLASH_EINVAL;
    if (!row) return FLASH_OK; /* none: the default */
    if (!flash__one_row(f->cls->kind)) return flash__fetch_add(f, i, row);
    f->row[i] = NULL; /* set, not add: replaces */
    return flash__fetch_add(f, i, row);
}

FLASH_API int flash_fetch_set_count(flash_fetch *f, size_t i, int64_t count) {
    int rc = flash__fetch_check(f);
    if (rc) return rc;
    if (i >= f->count || (f->cls->kind != FLASH_CLASS_COUNT && f->cls->kind != FLASH_CLASS_EXISTS)) return FLASH_EINVAL;
    f->counts[i] = count;
    f->count_set[i] = true;
    return FLASH_OK;
}

FLASH_API int flash_fetch_add_count(flash_fetch *f, const void *row, int64_t n) {
    int rc = flash__fetch_check(f);
    long t;
    if (rc) return rc;
    if (!row || n < 0 || (f->cls->kind != FLASH_CLASS_COUNT && f->cls->kind != FLASH_CLASS_EXISTS)) return FLASH_EINVAL;
    if (!f->map && (rc = flash__fetch_map_build(f)) != FLASH_OK) return rc;
    t = flash__fetch_match(f, row);
    if (t < 0) return FLASH_ENOTFOUND;
    f->ctx->stats.source_rows++;
    if (f->count_set[t]) f->counts[t] += n;
    else f->nrows[t] += (size_t)n;
    return FLASH_OK;
}

FLASH_API int flash_fetch_add_id(flash_fetch *f, size_t i, int64_t id) {
    int rc = flash__fetch_check(f);
    flash__rows *r;
    int64_t *p;
    if (rc) return rc;
    if (i >= f->count || f->cls->kind != FLASH_CLASS_IDS) return FLASH_EINVAL;
    r = (flash__rows *)flash__alloc(f->ctx, sizeof *r);
    p = (int64_t *)flash__alloc(f->ctx, sizeof *p);
    if (!r || !p) return FLASH_ENOMEM;
    *p = id;
    r->row = p;
    r->full = NULL;
    r->next = NULL;
    if (f->rows_tail[i]) f->rows_tail[i]->next = r;
    else f->rows[i] = r;
    f->rows_tail[i] = r;
    f->nrows[i]++;
    return FLASH_OK;
}

FLASH_API int flash_fetch_fail_where(flash_fetch *f, const flash_value *parts, const bool *any, int code,
                                     const char *message) {
    size_t i, j, n = 0;
    int rc = flash__fetch_check(f);
    if (rc) return rc;
    if (!parts) return FLASH_EINVAL;
    for (i = 0; i < f->count; i++) {
        const flash_value *key = f->eb->qs[f->index[i]]->values;
        for (j = 0; j < f->cls->nfields; j++)
            if (!(any && any[j]) && !flash_value_eq(&parts[j], &key[j])) break;
        if (j == f->cls->nfields && flash_fetch_fail(f, i, code, message) == FLASH_OK) n++;
    }
    return (int)n;
}

FLASH_API void flash_sql_ident(flash_strbuf *b, const char *name, bool dotted) {
    const char *p;
    if (!b || !name) return;
    flash_strbuf_put(b, "\"", 1);
    for (p = name; *p; p++) {
        if (*p == '"') flash_strbuf_put(b, "\"\"", 2);
        else if (*p == '.' && dotted) flash_strbuf_put(b, "\".\"", 3);
        else flash_strbuf_put(b, p, 1);
    }
    flash_strbuf_put(b, "\"", 1);
}

FLASH_API int flash_fetch_dont_cache(flash_fetch *f, size_t i) {
    int rc = flash__fetch_check(f);
    if (rc) return rc;
    if (i >= f->count) return FLASH_EINVAL;
    if (!f->dont_cache && (f->dont_cache = (bool *)flash_calloc(f->ctx, f->count, sizeof *f->dont_cache)) == NULL)
        return FLASH_ENOMEM;
    f->dont_cache[i] = true;
    return FLASH_OK;
}

FLASH_API int flash_fetch_fail(flash_fetch *f, size_t i, int code, const char *message) {
    int rc = flash__fetch_check(f);
    if (rc) return rc;
    if (i >= f->count) return FLASH_EINVAL;
    f->error[i] = code ? code : FLASH_ESOURCE;
    f->message[i] = flash__msgdup(f->ctx, f->error[i], message);
    return FLASH_OK;
}

/* Two rows in the order of c (order_by, then the primary key): <0, 0, >0.
   NULLs after every value ascending (PostgreSQL's default), strings and
   bytes by their bytes then length. */
static int flash__order_cmp(const flash_class *c, const void *a, const void *b) {
    size_t k;
    for (k = 0; k < c->norder; k++) {
        flash_value x = flash_row_value(c->model, a, c->order[k]);
        flash_value y = flash_row_value(c->model, b, c->order[k]);
        int r = 0;
        if (x.is_null || y.is_null) {
            r = x.is_null == y.is_null ? 0 : (x.is_null ? 1 : -1);
        } else {
            switch (x.type) {
            case FLASH_I64: r = x.u.i64 < y.u.i64 ? -1 : x.u.i64 > y.u.i64; break;
            case FLASH_I32: r = x.u.i32 < y.u.i32 ? -1 : x.u.i32 > y.u.i32; break;
            case FLASH_F64: r = x.u.f64 < y.u.f64 ? -1 : x.u.f64 > y.u.f64; break;
            case FLASH_BOOL: r = (int)x.u.b - (int)y.u.b; break;
            case FLASH_STR:
            case FLASH_BYTES: {
                size_t n = x.u.s.len < y.u.s.len ? x.u.s.len : y.u.s.len;
                r = n ? memcmp(x.u.s.ptr, y.u.s.ptr, n) : 0;
                if (!r) r = x.u.s.len < y.u.s.len ? -1 : x.u.s.len > y.u.s.len;
                break;
            }
            default: break;
            }
        }
        if (r) return c->order_desc[k] ? -r : (r < 0 ? -1 : 1);
    }
    return 0;
}

/* Sort n rows of c (stable: a merge sort, tmp of n), keys[i] the row of
   items[i] (they move together). */
static void flash__order_sort(const flash_class *c, void **items, void **keys, void **tmp, void **ktmp, size_t n) {
    size_t w, i;
    for (w = 1; w < n; w *= 2) {
        for (i = 0; i < n; i += 2 * w) {
            size_t lo = i, mid = i + w < n ? i + w : n, hi = i + 2 * w < n ? i + 2 * w : n;
            size_t a = lo, b = mid, o = lo;
            while (a < mid || b < hi) {
                bool left = b >= hi || (a < mid && flash__order_cmp(c, keys[a], keys[b]) <= 0);
                size_t from = left ? a++ : b++;
                tmp[o] = items[from];
                ktmp[o++] = keys[from];
            }
        }
        memcpy(items, tmp, n * sizeof *items);
        memcpy(keys, ktmp, n * sizeof *keys);
    }
}

/* The rows (or ids) of tuple t as an array, sorted and cut for an ordered
   class; *n their count. NULL on ENOMEM. */
static void **flash__fetch_items(flash_fetch *f, size_t t, size_t *n) {
    flash_ctx *ctx = f->ctx;
    const flash_class *c = f->cls;
    size_t cnt = f->nrows[t], k = 0;
    flash__rows *r;
    bool sortable = c->norder > 0;
    void **items = (void **)flash__alloc(ctx, (cnt ? cnt : 1) * sizeof *items), **keys = NULL;
    if (!items) return NULL;
    for (r = f->rows[t]; r; r = r->next) {
        items[k++] = r->row;
        if (c->kind == FLASH_CLASS_IDS && !r->full) sortable = false; /* ids of a custom fallback */
    }
    if (sortable && cnt > 1) {
        void **tmp = (void **)flash__alloc(ctx, cnt * sizeof *tmp), **ktmp = (void **)flash__alloc(ctx, cnt * sizeof *ktmp);
        keys = items;
        if (c->kind == FLASH_CLASS_IDS) {
            keys = (void **)flash__alloc(ctx, cnt * sizeof *keys);
            if (keys)
                for (k = 0, r = f->rows[t]; r; r = r->next) keys[k++] = r->full;
        } else {
            keys = (void **)flash__alloc(ctx, cnt * sizeof *keys);
            if (keys) memcpy(keys, items, cnt * sizeof *keys);
        }
        if (!tmp || !ktmp || !keys) return NULL;
        flash__order_sort(c, items, keys, tmp, ktmp, cnt);
    }
    if (c->opts.limit && cnt > c->opts.limit) cnt = c->opts.limit;
    *n = cnt;
    return items;
}

/* The result of tuple t, or NULL for a not-found (one-row classes). */
static void *flash__fetch_result(flash_fetch *f, size_t t) {
    flash_ctx *ctx = f->ctx;
    const flash_class *c = f->cls;
    size_t k = 0, n = 0;
    void **items;
    if (flash__one_row(c->kind)) return f->row[t];
    if (c->kind == FLASH_CLASS_COUNT) {
        int64_t *cn = (int64_t *)flash__alloc(ctx, sizeof *cn);
        if (cn) *cn = f->count_set[t] ? f->counts[t] : (int64_t)f->nrows[t];
        return cn;
    }
    if (c->kind == FLASH_CLASS_EXISTS) {
        bool *e = (bool *)flash__alloc(ctx, sizeof *e);
        if (e) *e = f->count_set[t] ? f->counts[t] > 0 : f->nrows[t] > 0;
        return e;
    }
    items = flash__fetch_items(f, t, &n);
    if (!items) return NULL;
    if (c->kind == FLASH_CLASS_IDS) {
        flash_ids *ids = (flash_ids *)flash__alloc(ctx, sizeof *ids);
        if (!ids) return NULL;
        ids->count = n;
        ids->ids = (int64_t *)flash__alloc(ctx, (n ? n : 1) * sizeof *ids->ids);
        if (!ids->ids) return NULL;
        for (k = 0; k < n; k++) ids->ids[k] = *(int64_t *)items[k];
        return ids;
    }
    {
        flash_list *l = (flash_list *)flash__alloc(ctx, sizeof *l);
        if (!l) return NULL;
        l->count = n;
        l->items = items;
        return l;
    }
}

static size_t flash__max_value(flash_ctx *ctx) {
    const flash_cache *c = &ctx->desc.cache;
    return (c->vt && c->vt->max_value) ? c->vt->max_value(c->self) : (size_t)1 << 20;
}

static int flash__lock_key(flash_ctx *ctx, const char *key, size_t len, char **out, size_t *out_len);

FLASH_API int flash_fetch_done(flash_fetch *f, int status, const char *message) {
    flash__eb *eb;
    flash_ctx *ctx;
    flash_cache_item *fills[FLASH__FILL_KINDS] = {NULL, NULL, NULL}, *unlock = NULL;
    size_t nfill[FLASH__FILL_KINDS] = {0, 0, 0}, t, maxv, nunlock = 0;
    const flash_class *c;
    int rc = flash__fetch_check(f);
    if (rc == FLASH_ECANCELED && f && !f->done) {
        /* A late answer for a reset request: release its memory now. */
        flash__fetch_finish(f);
        return rc;
    }
    if (rc) return rc;
    flash__fetch_finish(f);
    eb = f->eb;
    ctx = f->ctx;
    c = f->cls;
    maxv = flash__max_value(ctx);
    if (status) {
        const char *m = flash__msgdup(ctx, status, message);
        for (t = 0; t < f->count; t++) {
            if (!f->error[t]) {
                f->error[t] = status;
                f->message[t] = m;
            }
        }
    }
    for (t = 0; t < f->count; t++) {
        size_t i = f->index[t];
        flash__query *q = eb->qs[i];
        void *result;
        bool none;
        int fill = eb->fill[i];
        if (f->error[t]) {
            if (!eb->served[i]) flash_batch_reject(eb->batch, i, f->error[t], f->message[t]);
            continue;
        }
        result = flash__fetch_result(f, t);
        none = result == NULL;
        if (none && !flash__one_row(c->kind)) {
            if (!eb->served[i]) flash_batch_reject(eb->batch, i, FLASH_ENOMEM, NULL);
            continue;
        }
        if (fill != FLASH__FILL_NONE && !(none && c->opts.no_cache_none) && !(f->dont_cache && f->dont_cache[t])) {
            void *val;
            size_t len;
            if (flash__encode_value(ctx, q, result, none, eb->ver[i], &val, &len) == FLASH_OK) {
                if (len > maxv) {
                    ctx->stats.fills_skipped++;
                    flash_ctx_log(ctx, FLASH_LOG_WARN,
                                  "%s: value for %s is %zu bytes, over the backend limit of %zu: not cached",
                                  c->name, q->key, len, maxv);
                } else {
                    if (!fills[fill]) fills[fill] = (flash_cache_item *)flash_calloc(ctx, f->count, sizeof **fills);
                    if (fills[fill]) {
                        flash_cache_item *it = &fills[fill][nfill[fill]++];
                        it->key = q->key;
                        it->key_len = q->key_len;
                        it->value = val;
                        it->value_len = len;
                        it->ttl_s = c->opts.timeout_s;
                        it->cas = eb->cas[i];
                    }
                }
            }
        }
        if (eb->served[i]) {
            /* Answered stale already: this was the refresh. Its lock goes
               (after the fill is sent), so the next stale mark is refreshed
               at once rather than when the lock expires. (A refresh won by
               a lease took no lock: nothing to release.) */
            if (!eb->lockreq[i]) continue;
            if (!unlock) unlock = (flash_cache_item *)flash_calloc(ctx, f->count, sizeof *unlock);
            if (unlock && flash__lock_key(ctx, q->key, q->key_len, (char **)&unlock[nunlock].key,
                                          &unlock[nunlock].key_len) == FLASH_OK)
                nunlock++;
            continue;
        }
        if (none) flash__eb_settle_none(eb, i);
        else flash_batch_resolve(eb->batch, i, result);
    }
    ctx->stats.fills += nfill[FLASH__FILL_ADD] + nfill[FLASH__FILL_CAS];
    flash__write(ctx, FLASH_CACHE_ADD, fills[FLASH__FILL_ADD], nfill[FLASH__FILL_ADD]);
    flash__write(ctx, FLASH_CACHE_CAS, fills[FLASH__FILL_CAS], nfill[FLASH__FILL_CAS]);
    flash__write(ctx, FLASH_CACHE_DELETE, unlock, nunlock);
    eb->fetches_pending--;
    flash__eb_maybe_end(eb);
    return FLASH_OK;
}

/* Start one fetch per class for the keys marked to go to the source. */
static void flash__eb_fetch(flash__eb *eb, const bool *to_source) {
    flash_ctx *ctx = eb->ctx;
    size_t i, j, k, nf = 0;
    flash_class **classes = (flash_class **)flash__alloc(ctx, eb->n * sizeof *classes);
    size_t *counts = (size_t *)flash_calloc(ctx, eb->n, sizeof *counts);
    flash_fetch **fs, *tail;
    if (!classes || !counts) {
        for (i = 0; i < eb->n; i++)
            if (to_source[i] && !eb->served[i]) flash_batch_reject(eb->batch, i, FLASH_ENOMEM, NULL);
        return;
    }
    /* Classes in first-asked order. */
    for (i = 0; i < eb->n; i++) {
        if (!to_source[i]) continue;
        for (j = 0; j < nf && classes[j] != eb->qs[i]->cls; j++) {
        }
        if (j == nf) classes[nf++] = eb->qs[i]->cls;
        counts[j]++;
    }
    fs = (flash_fetch **)flash__alloc(ctx, (nf ? nf : 1) * sizeof *fs);
    if (!fs) return;
    for (j = 0; j < nf; j++) {
        flash_fetch *f = (flash_fetch *)flash_calloc(ctx, 1, sizeof *f);
        size_t n = counts[j];
        if (!f) return;
        f->eb = eb;
        f->cls = classes[j];
        f->ctx = ctx;
        f->index = (size_t *)flash__alloc(ctx, n * sizeof *f->index);
        f->row = (void **)flash_calloc(ctx, n, sizeof *f->row);
        f->rows = (flash__rows **)flash_calloc(ctx, n, sizeof *f->rows);
        f->rows_tail = (flash__rows **)flash_calloc(ctx, n, sizeof *f->rows_tail);
        f->nrows = (size_t *)flash_calloc(ctx, n, sizeof *f->nrows);
        f->counts = (int64_t *)flash_calloc(ctx, n, sizeof *f->counts);
        f->count_set = (bool *)flash_calloc(ctx, n, sizeof *f->count_set);
        f->error = (int *)flash_calloc(ctx, n, sizeof *f->error);
        f->message = (const char **)flash_calloc(ctx, n, sizeof *f->message);
        if (!f->index || !f->row || !f->rows || !f->rows_tail || !f->nrows || !f->counts || !f->count_set ||
            !f->error || !f->message)
            return;
        for (i = 0, k = 0; i < eb->n; i++)
            if (to_source[i] && eb->qs[i]->cls == classes[j]) f->index[k++] = i;
        f->count = n;
        fs[j] = f;
    }
    /* Each fetch keeps the request's memory until its source answers, so a
       source without a cancel function may answer after a reset. */
    for (tail = eb->fetches; tail && tail->next_in_eb; tail = tail->next_in_eb) {
    }
    for (j = 0; j < nf; j++) {
        fs[j]->gen = flash__hold(ctx);
        /* in flight until it answers: a refresh of keys already answered
           stale keeps the context busy too (flash_run, flash_ctx_busy) */
        ctx->inflight++;
        if (tail) tail->next_in_eb = fs[j];
        else eb->fetches = fs[j];
        tail = fs[j];
        fs[j]->next_live = ctx->fetches; /* so that reset and destroy find it */
        if (ctx->fetches) ctx->fetches->prev_live = fs[j];
        ctx->fetches = fs[j];
    }
    eb->fetches_pending += nf;
    /* Dispatch after all are built: a fetch may complete inside the call. */
    for (j = 0; j < nf; j++) {
        flash_fetch *f = fs[j];
        const flash_class *c = f->cls;
        uint64_t gen = ctx->gen;
        ctx->stats.source_calls++;
        ctx->stats.source_keys += f->count;
        if (c->opts.fallback) {
            c->opts.fallback(ctx, f, c->opts.user_data);
        } else {
            f->src = flash__source_for(ctx, c->model);
            if (f->src.vt && f->src.vt->fetch) {
                f->src.vt->fetch(f->src.self, ctx, f);
            } else {
                flash_fetch_done(f, FLASH_ESOURCE,
                                 flash_sprintf(ctx, "no source for model %s (flash_ctx_set_source)", c->model->name));
            }
        }
        if (ctx->gen != gen) return; /* the source reset the context */
    }
}

/* The current version of q's class, or 0 (never bumped); *err when its
   version key could not be read. */
static uint64_t flash__eb_version(const flash__eb *eb, const flash_class *c, int *err) {
    size_t k;
    *err = 0;
    for (k = 0; k < eb->nver; k++) {
        if (eb->vcls[k] == c) {
            *err = eb->verr[k];
            return eb->vval[k];
        }
    }
    return 0;
}

static bool flash__parse_u64(const char *s, size_t n, uint64_t *out) {
    uint64_t x = 0;
    size_t i;
    if (!s || n == 0 || n > 20) return false;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9' || x > (UINT64_MAX - (uint64_t)(s[i] - '0')) / 10) return false;
        x = x * 10 + (uint64_t)(s[i] - '0');
    }
    *out = x;
    return true;
}

/* How long a refresh lock lives at most (it is deleted after the refresh):
   a reader that took it and died holds back the refresh that long. */
static uint32_t flash__lock_ttl(const flash_ctx *ctx, const flash_class *c) {
    uint32_t t = ctx->desc.refresh_lock_s;
    return c->opts.allowtime_s && c->opts.allowtime_s < t ? c->opts.allowtime_s : t;
}

/* The refresh lock of a key (allowtime): prefix:lock:<hash of the key>. */
static int flash__lock_key(flash_ctx *ctx, const char *key, size_t len, char **out, size_t *out_len) {
    size_t plen;
    const char *p = flash__prefix(ctx, &plen);
    char hex[33];
    char *k;
    if (!p) return FLASH_ENOMEM;
    flash__hex128(hex, key, len);
    k = (char *)flash__alloc(ctx, plen + 6 + 32 + 1);
    if (!k) return FLASH_ENOMEM;
    memcpy(k, p, plen);
    memcpy(k + plen, ":lock:", 6);
    memcpy(k + plen + 6, hex, 33);
    *out = k;
    *out_len = plen + 6 + 32;
    return FLASH_OK;
}

static void flash__engine_lock_done(flash_cache_op *op) {
    flash__eop *o = (flash__eop *)op->data;
    flash__eb *eb = o->eb;
    flash_ctx *ctx = o->ctx;
    eb->lock = NULL;
    if (o->gen == ctx->gen && !eb->canceled) { /* a reset request refreshes nothing */
        size_t i, k = 0;
        bool *refresh = (bool *)flash_calloc(ctx, eb->n, sizeof *refresh);
        bool any = false;
        /* Items are in key order of the keys that asked for a lock. */
        for (i = 0; i < eb->n && k < op->count; i++) {
            if (!eb->lockreq[i]) continue;
            if (op->items[k].status == FLASH_OK && refresh) {
                refresh[i] = true; /* this reader refreshes */
                any = true;
            }
            k++;
        }
        if (any) flash__eb_fetch(eb, refresh);
        flash__eb_maybe_end(eb);
    }
    flash__eop_unlink(o); /* last: it held the request's memory */
}

/* The stub lifetime of q's lease reads, or 0: no lease (the backend has
   none, the class none, or an only_cache query, which never fills). */
static uint32_t flash__class_lease(flash_ctx *ctx, const flash_class *cls) {
    const flash_cache *c = &ctx->desc.cache;
    if (!c->vt || !(c->vt->caps & FLASH_CACHE_CAP_LEASES)) return 0;
    return cls->opts.lease_s ? cls->opts.lease_s : ctx->desc.lease_s;
}
static uint32_t flash__lease_of(flash_ctx *ctx, const flash__query *q) {
    return (q->flags & FLASH_Q_ONLY_CACHE) ? 0 : flash__class_lease(ctx, q->cls);
}

/* A key a write marked stale on the server (allowtime with leases: see
   flash__targets_key), read with a lease. Whoever won it refreshes it from
   the source and fills by CAS against the mark (a newer write changes it),
   but not inside the lag window after the mark (its age is allowtime minus
   the mark's remaining lifetime): there it hands the lease back (MARK_STALE
   again, keeping the expiry) for a later reader. The others serve the
   stale value, or wait when there is none (a stub marked stale). Returns
   true when the key needs no more classification. */
static bool flash__eb_stale(flash__eb *eb, size_t i, flash_cache_item *it, uint64_t version, bool *to_source,
                            bool *any, flash_cache_item **back, size_t *nback) {
    flash_ctx *ctx = eb->ctx;
    flash__query *q = eb->qs[i];
    int64_t allow = (int64_t)q->cls->opts.allowtime_s * 1000, age;
    bool won = it->lease == FLASH_LEASE_WON, serve = false, none = false;
    void *result = NULL;
    if (it->ttl_left_ms > 0) age = allow > it->ttl_left_ms ? allow - it->ttl_left_ms : 0;
    else age = allow; /* no expiry or unknown: an old mark */
    if (it->status == FLASH_OK && allow > 0) {
        flash__hdr h;
        int r = flash__decode_value(ctx, q, it->value, it->value_len, &result, &none, &h);
        serve = r == 1 && h.version == version;
    }
    if (serve) {
        ctx->stats.cache_hits++;
        ctx->stats.stale_hits++;
        if (none) flash__eb_settle_none(eb, i);
        else flash_batch_resolve(eb->batch, i, result);
        eb->served[i] = true;
        eb->fill[i] = FLASH__FILL_NONE;
        if (!won) return true;
    } else if (!won) { /* nothing to serve: wait for the one refreshing it */
        eb->cas[i] = it->cas;
        eb->wait[i] = 1;
        eb->nwait++;
        return true;
    } else {
        ctx->stats.cache_misses++;
        eb->fill[i] = FLASH__FILL_NONE;
    }
    if (age >= (int64_t)ctx->desc.lag_window_ms) { /* refresh: fill by CAS against the mark */
        ctx->stats.stale_refreshes++;
        eb->fill[i] = FLASH__FILL_CAS;
        eb->cas[i] = it->cas;
        to_source[i] = true;
        *any = true;
        return true;
    }
    /* inside the lag window: no fill; the lease goes back */
    /* (allocated on first use: a get-many of n keys should not clear n
       items for the rare hand-back; without memory the lease just expires) */
    if (!*back) *back = (flash_cache_item *)flash_calloc(ctx, eb->n, sizeof **back);
    if (*back) {
        (*back)[*nback].key = q->key;
        (*back)[*nback].key_len = q->key_len;
        (*nback)++;
    }
    ctx->stats.fills_skipped++;
    if (!serve) { /* read the source for this request only */
        to_source[i] = true;
        *any = true;
    }
    return true;
}

static void flash__eb_after_cache(flash__eb *eb, flash_cache_item *items, int op_status);

/* Out of memory for a re-read: the keys that wait fail with FLASH_ENOMEM. */
static void flash__eb_fail_waiting(flash__eb *eb) {
    size_t i;
    for (i = 0; i < eb->n; i++) {
        if (!eb->wait[i]) continue;
        eb->wait[i] = 0;
        flash_batch_reject(eb->batch, i, FLASH_ENOMEM, NULL);
    }
    eb->nwait = 0;
    flash__eb_maybe_end(eb);
}

/* The re-read of the keys that wait for another reader's fill. */
static void flash__engine_reget_done(flash_cache_op *op) {
    flash__eop *o = (flash__eop *)op->data;
    flash__eb *eb = o->eb;
    flash_ctx *ctx = o->ctx;
    size_t i, k = 0;
    flash_cache_item *full = (flash_cache_item *)flash_calloc(ctx, eb->n + eb->nver, sizeof *full);
    ctx->stats.cache_round_trips += op->round_trips;
    eb->get = NULL;
    if (!full) {
        flash__eb_fail_waiting(eb);
        return;
    }
    for (i = 0; i < eb->n; i++)
        if (eb->wait[i]) full[i] = op->items[k++];
    for (i = 0; i < eb->nver; i++) full[eb->n + i] = op->items[k++];
    eb->rereading = true;
    flash__eb_after_cache(eb, full, op->status);
}

static int flash__version_key(flash_ctx *ctx, const flash_class *c, char **key, size_t *len);

/* The backoff is over: read the waiting keys again (and the versions). */
static void flash__eb_lease_timer(void *arg) {
    flash__eb *eb = (flash__eb *)arg;
    flash_ctx *ctx = eb->ctx;
    size_t i, k = 0, n = eb->nwait + eb->nver;
    flash__eop *o;
    flash_cache_item *items;
    eb->timer = NULL;
    if (eb->canceled || eb->gen != ctx->gen) return;
    o = (flash__eop *)flash_calloc(ctx, 1, sizeof *o);
    items = (flash_cache_item *)flash_calloc(ctx, n, sizeof *items);
    for (i = 0; o && items && i < eb->n; i++) {
        if (!eb->wait[i]) continue;
        items[k].key = eb->qs[i]->key;
        items[k].key_len = eb->qs[i]->key_len;
        items[k].lease_s = flash__lease_of(ctx, eb->qs[i]);
        k++;
    }
    for (i = 0; o && items && i < eb->nver; i++, k++)
        if (flash__version_key(ctx, eb->vcls[i], (char **)&items[k].key, &items[k].key_len)) break;
    if (!o || !items || k != n) {
        flash__eb_fail_waiting(eb);
        return;
    }
    o->ctx = ctx;
    o->gen = ctx->gen;
    o->eb = eb;
    o->op.code = FLASH_CACHE_GET;
    o->op.items = items;
    o->op.count = n;
    o->op.done = flash__engine_reget_done;
    o->op.data = o;
    eb->get = o;
    ctx->stats.lease_waits += eb->nwait;
    ctx->stats.cache_keys += eb->nwait;
    ctx->desc.cache.vt->submit(ctx->desc.cache.self, ctx->loop, &o->op);
}

/* Keys whose lease another reader holds: wait (backoff 2, 4, ... 64 ms, in
   all at most lease_wait_ms), then read again. Past the deadline, or on a
   loop without timers, they go to the source now, and fill by CAS against
   the stub they saw (a write in between, or the winner's fill, changed it:
   then the fill fails, as it must). */
static void flash__eb_wait(flash__eb *eb, bool *to_source, bool *any) {
    flash_ctx *ctx = eb->ctx;
    uint32_t left = ctx->desc.lease_wait_ms > eb->waited_ms ? ctx->desc.lease_wait_ms - eb->waited_ms : 0, delay;
    size_t i;
    eb->backoff_ms = eb->backoff_ms ? (eb->backoff_ms >= 32 ? 64 : eb->backoff_ms * 2) : 2;
    delay = eb->backoff_ms < left ? eb->backoff_ms : left;
    if (delay && ctx->loop.vt && ctx->loop.vt->timer)
        eb->timer = ctx->loop.vt->timer(ctx->loop.native, delay, flash__eb_lease_timer, eb);
    if (eb->timer) {
        eb->waited_ms += delay;
        return;
    }
    for (i = 0; i < eb->n; i++) {
        if (eb->wait[i] != 1) continue;
        eb->wait[i] = 0;
        ctx->stats.lease_timeouts++;
        ctx->stats.cache_misses++;
        eb->fill[i] = FLASH__FILL_CAS; /* eb->cas: the stub's */
        to_source[i] = true;
        *any = true;
    }
    eb->nwait = 0;
}

/* Classify every key of the batch after the cache answered (or without a
   cache), settle the hits and send the rest to the sources. */
static void flash__eb_after_cache(flash__eb *eb, flash_cache_item *items, int op_status) {
    flash_ctx *ctx = eb->ctx;
    size_t i, nlock = 0;
    int64_t now = flash__now(ctx), lag = (int64_t)ctx->desc.lag_window_ms;
    bool *to_source = (bool *)flash_calloc(ctx, eb->n, sizeof *to_source);
    bool any = false;
    size_t nback = 0; /* stale leases handed back (inside the lag window) */
    flash_cache_item *back = NULL;
    if (!to_source) {
        for (i = 0; i < eb->n; i++) flash_batch_reject(eb->batch, i, FLASH_ENOMEM, NULL);
        return;
    }
    /* Versions first: they follow the data keys in the same get-many. */
    for (i = 0; items && i < eb->nver; i++) {
        const flash_cache_item *it = &items[eb->n + i];
        int st = op_status ? op_status : it->status;
        eb->vval[i] = 0; /* absent (never bumped, or evicted): version 0 */
        eb->verr[i] = 0;
        if (st == FLASH_OK && !flash__parse_u64((const char *)it->value, it->value_len, &eb->vval[i]))
            eb->verr[i] = FLASH_EPROTO;
        else if (st != FLASH_OK && st != FLASH_ENOTFOUND)
            eb->verr[i] = st;
    }
    for (i = 0; i < eb->n; i++) {
        flash__query *q = eb->qs[i];
        int verr = 0;
        uint64_t version;
        int st;
        bool vunknown;
        if (eb->rereading) { /* only the keys that waited */
            if (eb->wait[i] != 1) continue;
            eb->wait[i] = 2;
            eb->nwait--;
        }
        version = flash__eb_version(eb, q->cls, &verr);
        st = items ? (op_status ? op_status : items[i].status) : FLASH_ENOTFOUND;
        /* A version key that could not be read: a DYNAMIC class cannot tell
           whether the value is current (a cache error for its keys); the
           others take their values as they are (a by-hand bump is not seen
           while its key is unreachable) and fill under version 0, which a
           later read of a bumped version refreshes. */
        vunknown = verr && q->cls->opts.invalidation != FLASH_INVALIDATE_DYNAMIC;
        if (!st && verr && !vunknown) st = verr;
        eb->ver[i] = version;
        eb->fill[i] = items ? FLASH__FILL_ADD : FLASH__FILL_NONE;
        if (items && st == FLASH_OK && items[i].value_len == 0) {
            /* Another reader's lease stub, read without a lease (only_cache):
               a miss that leaves the stub to its winner. */
            st = FLASH_ENOTFOUND;
            eb->fill[i] = FLASH__FILL_NONE;
        }
        if (items && items[i].stale && items[i].lease != FLASH_LEASE_NONE && !op_status &&
            (st == FLASH_OK || st == FLASH_ENOTFOUND) &&
            flash__eb_stale(eb, i, &items[i], version, to_source, &any, &back, &nback))
            continue;
        if (items && st == FLASH_ENOTFOUND && items[i].lease == FLASH_LEASE_WON) {
            /* This reader won the key's lease: read the source and fill by
               CAS against the stub (a write in between changes it). */
            ctx->stats.lease_wins++;
            ctx->stats.cache_misses++;
            eb->fill[i] = FLASH__FILL_CAS;
            eb->cas[i] = items[i].cas;
            to_source[i] = true;
            any = true;
            continue;
        }
        if (items && st == FLASH_ENOTFOUND && items[i].lease == FLASH_LEASE_LOST) {
            eb->cas[i] = items[i].cas; /* the stub: what a fill after the wait may replace */
            eb->wait[i] = 1;
            eb->nwait++;
            continue;
        }
        if (items && st == FLASH_OK) {
            void *result;
            bool none;
            flash__hdr h;
            int r = flash__decode_value(ctx, q, items[i].value, items[i].value_len, &result, &none, &h);
            int64_t age = r >= 0 ? now - h.time_ms : 0;
            const flash_cache_opts *co = &q->cls->opts;
            int64_t allow = (int64_t)co->allowtime_s * 1000;
            bool old = r == 1 && !vunknown && h.version != version, stale = r == 1 && (h.flags & FLASH__VF_STALE);
            bool serve = false; /* served as is while one reader refreshes it */
            if (old || stale) {
                /* Superseded (an older class version) or marked stale: the
                   class's allowtime bounds how long it may still be served
                   (age: since the stale mark, or since written); STALE
                   classes without one serve it until it is refreshed. */
                serve = allow ? age <= allow : co->invalidation == FLASH_INVALIDATE_STALE;
                if (q->flags & FLASH__Q_REFRESH) serve = false; /* a write's refresh replaces it */
                if (!serve && old) {
                    /* Refresh it, but only if it is still the value seen (an
                       invalidation may land first). */
                    r = 0;
                    eb->fill[i] = FLASH__FILL_CAS;
                    eb->cas[i] = items[i].cas;
                } else if (!serve) {
                    r = 0; /* too old to serve: a marker */
                    h.flags |= FLASH__VF_MARKER;
                }
            } else if (r == 1 && allow && co->invalidation == FLASH_INVALIDATE_OFF && age > allow) {
                serve = true; /* OFF with allowtime: refreshed every allowtime by one reader */
            }
            if (serve) {
                ctx->stats.cache_hits++;
                if (none) flash__eb_settle_none(eb, i);
                else flash_batch_resolve(eb->batch, i, result);
                eb->served[i] = true;
                /* One reader, whoever takes the lock, refreshes it; a stale
                   mark inside the lag window is not refreshed yet (a
                   replica may not have the write). */
                /* (a key re-read after a lease wait takes no lock here:
                   the batch has one lock op at most) */
                if ((!stale || age >= lag) && !(q->flags & FLASH_Q_ONLY_CACHE) && !eb->rereading) {
                    eb->fill[i] = FLASH__FILL_CAS;
                    eb->cas[i] = items[i].cas;
                    eb->lockreq[i] = 1;
                    nlock++;
                }
                continue;
            }
            if (r == 1) {
                ctx->stats.cache_hits++;
                if (none) flash__eb_settle_none(eb, i);
                else flash_batch_resolve(eb->batch, i, result);
                continue;
            }
            ctx->stats.cache_misses++;
            if (r == 0 && (h.flags & FLASH__VF_MARKER)) {
                /* Invalidated: read the source, and replace the marker only
                   if it is still the one seen; not inside the lag window,
                   when a replica may not have the write yet. */
                bool in_lag = age < lag && !(q->flags & FLASH__Q_REFRESH);
                eb->fill[i] = in_lag ? FLASH__FILL_NONE : FLASH__FILL_CAS;
                eb->cas[i] = items[i].cas;
                if (in_lag && !(q->flags & FLASH_Q_ONLY_CACHE)) ctx->stats.fills_skipped++;
            } else if (r < 0) {
                flash_ctx_log(ctx, FLASH_LOG_WARN, "%s: corrupt cached value at %s (%s): replaced",
                              q->cls->name, q->key, flash_strerror(r));
                eb->fill[i] = FLASH__FILL_CAS; /* as above: never over a newer write */
                eb->cas[i] = items[i].cas;
            } else if (eb->fill[i] != FLASH__FILL_CAS) {
                eb->fill[i] = FLASH__FILL_NONE; /* another key's or schema's value: leave it */
            }
        } else if (items && st != FLASH_ENOTFOUND) {
            ctx->stats.cache_errors++;
            if (ctx->desc.fail_on_cache_error) {
                flash_batch_reject(eb->batch, i, st,
                                   flash_sprintf(ctx, "cache backend failed for %s: %s", q->key, flash_strerror(st)));
                continue;
            }
            eb->fill[i] = FLASH__FILL_NONE; /* do not write to a failing backend */
        } else if (items) {
            ctx->stats.cache_misses++;
        }
        if (q->flags & FLASH_Q_ONLY_CACHE) {
            flash_batch_reject(eb->batch, i, FLASH_ENOTFOUND,
                               flash_sprintf(ctx, "%s: not in the cache (only_cache)", q->key));
            continue;
        }
        to_source[i] = true;
        any = true;
    }
    if (nlock) {
        /* One refresher per stale key: whoever adds its lock first. */
        flash__eop *o = (flash__eop *)flash_calloc(ctx, 1, sizeof *o);
        flash_cache_item *li = (flash_cache_item *)flash_calloc(ctx, nlock, sizeof *li);
        size_t k = 0;
        if (o && li) {
            for (i = 0; i < eb->n && k < nlock; i++) {
                if (!eb->lockreq[i]) continue;
                if (flash__lock_key(ctx, eb->qs[i]->key, eb->qs[i]->key_len, (char **)&li[k].key, &li[k].key_len))
                    break;
                li[k].value = "1";
                li[k].value_len = 1;
                li[k].ttl_s = flash__lock_ttl(ctx, eb->qs[i]->cls);
                k++;
            }
        }
        if (o && li && k == nlock) {
            o->eb = eb;
            o->op.code = FLASH_CACHE_ADD;
            o->op.items = li;
            o->op.count = nlock;
            o->op.done = flash__engine_lock_done;
            o->op.data = o;
            /* Tracked like a write: it may outlive the batch (every key was
               already answered stale), and holds the request's memory. */
            flash__eop_link(ctx, o, ctx->gen);
            eb->lock = o;
            ctx->stats.writes++;
            ctx->desc.cache.vt->submit(ctx->desc.cache.self, ctx->loop, &o->op);
        }
    }
    if (eb->rereading) {
        for (i = 0; i < eb->n; i++)
            if (eb->wait[i] == 2) eb->wait[i] = 0;
        eb->rereading = false;
    }
    if (nback) flash__write(ctx, FLASH_CACHE_MARK_STALE, back, nback); /* ttl 0: keep the expiry */
    if (eb->nwait && !eb->canceled) flash__eb_wait(eb, to_source, &any);
    if (any) flash__eb_fetch(eb, to_source);
    flash__eb_maybe_end(eb);
}

static void flash__engine_get_done(flash_cache_op *op) {
    flash__eop *o = (flash__eop *)op->data;
    flash__eb *eb = o->eb;
    flash_ctx *ctx = o->ctx;
    ctx->stats.cache_round_trips += op->round_trips; /* 0 when every key failed fast */
    eb->get = NULL;
    flash__eb_after_cache(eb, op->items, op->status);
    /* The batch holds the generation; the GET needs no hold of its own. */
}

/* prefix:Class:vN:@version — a class's version key (absent: version 0;
   bumped by DYNAMIC writes and flash_bump_version). */
static int flash__version_key(flash_ctx *ctx, const flash_class *c, char **key, size_t *len) {
    flash__buf b;
    flash__buf_init(&b, ctx, 64);
    flash__key_head(&b, ctx, c);
    flash__buf_put(&b, "@version", 9);
    if (b.err) return b.err;
    if (b.len - 1 > FLASH__MAX_KEY) return FLASH_ETOOLARGE;
    *key = (char *)b.p;
    *len = b.len - 1;
    return FLASH_OK;
}

static void flash__engine_batch(flash_ctx *ctx, flash_batch *b, void *ud) {
    size_t n = flash_batch_size(b), i, k;
    flash__eb *eb = (flash__eb *)flash_calloc(ctx, 1, sizeof *eb);
    (void)ud;
    if (!eb) {
        flash_batch_fail(b, FLASH_ENOMEM, NULL);
        return;
    }
    eb->ctx = ctx;
    eb->batch = b;
    eb->gen = ctx->gen;
    eb->n = n;
    eb->qs = (flash__query **)flash__alloc(ctx, n * sizeof *eb->qs);
    eb->fill = (uint8_t *)flash_calloc(ctx, n, 1);
    eb->cas = (uint64_t *)flash_calloc(ctx, n, sizeof *eb->cas);
    eb->ver = (uint64_t *)flash_calloc(ctx, n, sizeof *eb->ver);
    eb->served = (bool *)flash_calloc(ctx, n, sizeof *eb->served);
    eb->vcls = (flash_class **)flash__alloc(ctx, n * sizeof *eb->vcls);
    eb->wait = (uint8_t *)flash_calloc(ctx, n, 1);
    eb->lockreq = (uint8_t *)flash_calloc(ctx, n, 1);
    if (!eb->qs || !eb->fill || !eb->cas || !eb->ver || !eb->served || !eb->vcls || !eb->wait || !eb->lockreq) {
        flash_batch_fail(b, FLASH_ENOMEM, NULL);
        return;
    }
    for (i = 0; i < n; i++) {
        eb->qs[i] = (flash__query *)flash_batch_payload(b, i);
        /* Batches are mostly of one class: check the last one seen first. */
        if (eb->nver && eb->vcls[eb->nver - 1] == eb->qs[i]->cls) continue;
        for (k = 0; k < eb->nver && eb->vcls[k] != eb->qs[i]->cls; k++) {
        }
        if (k == eb->nver) eb->vcls[eb->nver++] = eb->qs[i]->cls;
    }
    flash_batch_set_data(b, eb); /* for flash__engine_cancel */
    eb->vval = (uint64_t *)flash_calloc(ctx, eb->nver ? eb->nver : 1, sizeof *eb->vval);
    eb->verr = (int *)flash_calloc(ctx, eb->nver ? eb->nver : 1, sizeof *eb->verr);
    if (!eb->vval || !eb->verr) {
        flash_batch_fail(b, FLASH_ENOMEM, NULL);
        return;
    }
    if (!ctx->desc.cache.vt) {
        eb->nver = 0;
        flash__eb_after_cache(eb, NULL, 0);
        return;
    }
    {
        /* One get-many: the keys, then the version key of each class. */
        flash__eop *o = (flash__eop *)flash_calloc(ctx, 1, sizeof *o);
        flash_cache_item *items = NULL, zero;
        if (n + eb->nver <= SIZE_MAX / sizeof *items)
            items = (flash_cache_item *)flash__alloc(ctx, (n + eb->nver) * sizeof *items);
        if (!o || !items) {
            flash_batch_fail(b, FLASH_ENOMEM, NULL);
            return;
        }
        /* Each item written once (a zeroed one copied, then its key), not
           zeroed in a pass of its own first. */
        memset(&zero, 0, sizeof zero);
        for (i = 0; i < n; i++) {
            items[i] = zero;
            items[i].key = eb->qs[i]->key;
            items[i].key_len = eb->qs[i]->key_len;
            items[i].lease_s = flash__lease_of(ctx, eb->qs[i]);
        }
        for (k = 0; k < eb->nver; k++) {
            items[n + k] = zero;
            if (flash__version_key(ctx, eb->vcls[k], (char **)&items[n + k].key, &items[n + k].key_len)) {
                flash_batch_fail(b, FLASH_ENOMEM, NULL);
                return;
            }
        }
        o->ctx = ctx;
        o->gen = ctx->gen;
        o->eb = eb;
        o->op.code = FLASH_CACHE_GET;
        o->op.items = items;
        o->op.count = n + eb->nver;
        o->op.done = flash__engine_get_done;
        o->op.data = o;
        eb->get = o;
        ctx->stats.cache_keys += n;
        ctx->desc.cache.vt->submit(ctx->desc.cache.self, ctx->loop, &o->op);
    }
}

static void flash__engine_cancel(flash_ctx *ctx, flash_batch *b, void *ud) {
    flash__eb *eb = (flash__eb *)flash_batch_data(b);
    flash_fetch *f;
    (void)ud;
    if (!eb) return;
    eb->canceled = true;
    if (eb->timer) {
        if (ctx->loop.vt && ctx->loop.vt->cancel) ctx->loop.vt->cancel(ctx->loop.native, eb->timer);
        eb->timer = NULL;
    }
    if (eb->get) {
        if (ctx->desc.cache.vt) ctx->desc.cache.vt->cancel(ctx->desc.cache.self, &eb->get->op);
        eb->get = NULL;
    }
    if (eb->lock) {
        if (ctx->desc.cache.vt) ctx->desc.cache.vt->cancel(ctx->desc.cache.self, &eb->lock->op);
        flash__eop_unlink(eb->lock);
        eb->lock = NULL;
    }
    for (f = eb->fetches; f; f = f->next_in_eb) flash__fetch_cancel(ctx, f);
}

/* ---- queries ---- */

static flash_promise *flash__or_none(flash_ctx *ctx, int code, const char *message, void *arg) {
    (void)arg;
    if (code == FLASH_ENOTFOUND) return flash_fulfilled(ctx, NULL);
    return flash_rejected(ctx, code, message);
}
static flash_promise *flash__or_404(flash_ctx *ctx, int code, const char *message, void *arg) {
    (void)arg;
    return flash_rejected(ctx, code == FLASH_ENOTFOUND ? FLASH_E404 : code, message);
}
static flash_promise *flash__none_on_exception(flash_ctx *ctx, int code, const char *message, void *arg) {
    (void)code;
    (void)message;
    (void)arg;
    return flash_fulfilled(ctx, NULL);
}

static flash_promise *flash__wrap(flash_ctx *ctx, flash_promise *p, int flags) {
    if (flags & FLASH_Q_NONE_ON_EXCEPTION) return flash_catch(ctx, p, flash__none_on_exception, NULL);
    if (flags & FLASH_Q_OR_NONE) return flash_catch(ctx, p, flash__or_none, NULL);
    if (flags & FLASH_Q_OR_404) return flash_catch(ctx, p, flash__or_404, NULL);
    return p;
}

static flash_promise *flash__query_run(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n,
                                   int flags) {
    flash__engine *e;
    flash__query *q;
    flash_class *cc;
    const char *msg = NULL;
    int err = 0, rc;
    size_t i;
    char *lkey;
    flash_promise *p;
    if (!ctx) return NULL;
    cc = flash__class_of(c, &err);
    if (!cc) {
        const char *why = c && c->error_message ? c->error_message
                          : c && c->canonical && c->canonical->error_message ? c->canonical->error_message
                                                                            : NULL;
        p = flash_rejected(ctx, err,
                           why ? flash_sprintf(ctx, "%s: %s", c->name, why)
                           : c ? "cache class not registered: its model was registered twice with different fields, "
                                 "or a key field is unknown"
                               : "NULL cache class");
        return flash__wrap(ctx, p, flags & FLASH_Q_NONE_ON_EXCEPTION);
    }
    rc = flash__check_values_fast(ctx, cc, values, n, &msg);
    if (rc) return flash__wrap(ctx, flash_rejected(ctx, rc, msg), flags & FLASH_Q_NONE_ON_EXCEPTION);
    e = flash__engine_get(ctx);
    /* The query and its values in one allocation (n <= 8: checked) */
    q = (flash__query *)flash__alloc(ctx, FLASH__ROUND8(sizeof *q) + n * sizeof *q->values);
    if (!e || !q) return NULL;
    q->cls = cc;
    q->flags = flags & (FLASH_Q_ONLY_CACHE | FLASH__Q_REFRESH); /* the flags that change what is fetched */
    q->values = (flash_value *)(void *)((char *)q + FLASH__ROUND8(sizeof *q));
    for (i = 0; i < n; i++) {
        q->values[i] = values[i];
        if ((values[i].type == FLASH_STR || values[i].type == FLASH_BYTES) && !values[i].is_null) {
            q->values[i].u.s.ptr = (const char *)flash_memdup(ctx, values[i].u.s.ptr, values[i].u.s.len);
            if (!q->values[i].u.s.ptr) return NULL;
        }
    }
    rc = flash__build_key(ctx, cc, q->values, n, 1, &q->key, &q->key_len, &q->full, &q->full_len);
    if (rc) return flash__wrap(ctx, flash_rejected(ctx, rc, "cannot build the cache key"), flags & FLASH_Q_NONE_ON_EXCEPTION);
    /* Memo key: the mode, then the full cache key (in place: build_key
       left a byte before it); a refresh's, a number of its own too (each
       write refreshes anew). */
    {
        char *k = q->full ? q->full : q->key;
        size_t klen = q->full ? q->full_len : q->key_len, extra = (q->flags & FLASH__Q_REFRESH) ? 8 : 0;
        if (!extra) {
            lkey = k - 1;
        } else {
            uint64_t seq = ++e->refreshes;
            lkey = (char *)flash__alloc(ctx, klen + 1 + extra);
            if (!lkey) return NULL;
            memcpy(lkey + 1, k, klen);
            memcpy(lkey + 1 + klen, &seq, 8);
        }
        lkey[0] = (char)('0' + q->flags);
        p = flash_load_with(e->loader, lkey, klen + 1 + extra, q);
    }
    return p ? flash__wrap(ctx, p, flags) : NULL;
}

FLASH_API flash_promise *flash_query_async(flash_ctx *ctx, const flash_class *c, const flash_value *values,
                                           size_t n, int flags) {
    return flash__query_run(ctx, c, values, n, flags & ~FLASH__Q_REFRESH);
}

FLASH_API flash_query *flash_query_new(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n) {
    flash_query *q;
    size_t i;
    if (!ctx) return NULL;
    q = (flash_query *)flash__alloc(ctx, sizeof *q);
    if (!q) return NULL;
    q->cls = c;
    q->count = n;
    q->values = (flash_value *)flash__alloc(ctx, (n ? n : 1) * sizeof *q->values);
    if (!q->values) return NULL;
    for (i = 0; i < n; i++) {
        q->values[i] = values[i];
        if ((values[i].type == FLASH_STR || values[i].type == FLASH_BYTES) && !values[i].is_null && values[i].u.s.ptr) {
            q->values[i].u.s.ptr = (const char *)flash_memdup(ctx, values[i].u.s.ptr, values[i].u.s.len);
            if (!q->values[i].u.s.ptr) return NULL;
        }
    }
    return q;
}

FLASH_API flash_promise *flash_query_run_async(flash_ctx *ctx, const flash_query *q, int flags) {
    if (!ctx) return NULL;
    if (!q) return flash_rejected(ctx, FLASH_EINVAL, "NULL query");
    return flash_query_async(ctx, q->cls, q->values, q->count, flags);
}

FLASH_API flash_promise *flash_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs, int flags) {
    flash_promise **ps;
    size_t i;
    if (!ctx) return NULL;
    if (n && !qs) return flash_rejected(ctx, FLASH_EINVAL, "NULL query array");
    ps = (flash_promise **)flash__alloc(ctx, (n ? n : 1) * sizeof *ps);
    if (!ps) return NULL;
    for (i = 0; i < n; i++) ps[i] = flash_query_run_async(ctx, qs[i], flags);
    return flash_gather(ctx, n, ps);
}

FLASH_API int flash_queries(flash_ctx *ctx, size_t n, flash_query *const *qs, int flags, void ***out) {
    void *v = NULL;
    int rc = flash_wait(ctx, flash_queries_async(ctx, n, qs, flags), &v);
    if (out) *out = (void **)v;
    return rc;
}

FLASH_API int flash_wait_result(flash_ctx *ctx, flash_promise *p, const flash_class *c, void *out) {
    void *v = NULL;
    int rc;
    if (!ctx || !c || !out) return FLASH_EINVAL;
    rc = flash_wait(ctx, p, &v);
    if (c->kind == FLASH_CLASS_COUNT) {
        int64_t n = v ? *(int64_t *)v : 0;
        memcpy(out, &n, sizeof n);
    } else if (c->kind == FLASH_CLASS_EXISTS) {
        bool e = v ? *(bool *)v : false;
        memcpy(out, &e, sizeof e);
    } else {
        memcpy(out, &v, sizeof v);
    }
    return rc;
}

/* ---- 9. invalidation ----------------------------------------------------- */

/* An invalidation in progress: up to three phases of backend writes. */
typedef struct flash__inv {
    flash_promise out;
    flash_ctx *ctx;
    uint64_t gen;
    size_t pending;          /* writes in flight */
    int error;
    const char *message;
    flash_cache_item *soft;  /* allowtime keys: GET, then mark stale */
    size_t nsoft;
    const flash_class **soft_cls;
    flash_query **reset;     /* keys refreshed once the writes landed (RESET) */
    size_t nreset;
    bool reset_started;
} flash__inv;

/* A marker value: the header alone. */
static int flash__marker(flash_ctx *ctx, void **out, size_t *len) {
    flash__buf b;
    flash__buf_init(&b, ctx, 24);
    flash__put_hdr(&b, FLASH__VF_MARKER, 0, 0, flash__now(ctx));
    flash__seal(&b);
    if (b.err) return b.err;
    *out = b.p;
    *len = b.len;
    return FLASH_OK;
}

/* The same value, marked stale as of now. */
static int flash__restamp(flash_ctx *ctx, const void *data, size_t len, void **out, size_t *out_len) {
    flash__rd r;
    flash__hdr h;
    flash__buf b;
    r.p = (const unsigned char *)data;
    r.end = r.p + len;
    r.err = 0;
    if (flash__read_hdr(&r, &h) != FLASH_OK || (h.flags & FLASH__VF_MARKER)) return FLASH_EPROTO;
    flash__buf_init(&b, ctx, len + 16);
    flash__put_hdr(&b, h.flags | FLASH__VF_STALE, h.schema, h.version, flash__now(ctx));
    flash__buf_put(&b, r.p, (size_t)(r.end - r.p));
    flash__seal(&b);
    if (b.err) return b.err;
    *out = b.p;
    *out_len = b.len;
    return FLASH_OK;
}

static flash_promise *flash__query_run(flash_ctx *ctx, const flash_class *c, const flash_value *values, size_t n,
                                   int flags);
static void flash__inv_settle(flash__inv *v);

static void flash__inv_refreshed(flash_ctx *ctx, flash_promise *p, void *arg) {
    flash__inv *v = (flash__inv *)arg;
    (void)ctx;
    (void)p; /* a refresh that failed leaves its marker: the next reader refills */
    v->pending--;
    flash__inv_settle(v);
}

/* RESET: once every marker landed, re-read the keys (a refresh query each:
   its get sees the marker, or a newer one, and its fill is a CAS on it). */
static bool flash__inv_start_reset(flash__inv *v) {
    flash_ctx *ctx = v->ctx;
    flash_promise **ps;
    size_t i;
    if (!v->nreset || v->reset_started || v->error) return false;
    v->reset_started = true;
    ps = (flash_promise **)flash__alloc(ctx, v->nreset * sizeof *ps);
    if (!ps) return false;
    for (i = 0; i < v->nreset; i++)
        ps[i] = flash__query_run(ctx, v->reset[i]->cls, v->reset[i]->values, v->reset[i]->count, FLASH__Q_REFRESH);
    v->pending++;
    if (flash_on_settle(ctx, flash_gather_settled(ctx, v->nreset, ps), flash__inv_refreshed, v) != FLASH_OK) {
        v->pending--;
        return false;
    }
    return true;
}

static void flash__inv_settle(flash__inv *v) {
    flash_ctx *ctx = v->ctx;
    if (v->pending || v->gen != ctx->gen || v->out.state != FLASH_PENDING) return;
    if (flash__inv_start_reset(v)) return;
    if (v->error) flash__fail(ctx, &v->out, v->error, v->message ? v->message : flash_strerror(v->error));
    else flash__fulfil(ctx, &v->out, NULL);
}

/* Count a write's failures: a marker or bump that did not land leaves a
   stale value possible, so the caller must hear of it. */
static void flash__inv_note(flash__inv *v, flash_cache_op *op, bool missing_ok) {
    size_t i;
    for (i = 0; i < op->count && !v->error; i++) {
        int st = op->status ? op->status : op->items[i].status;
        if (st == FLASH_OK || (missing_ok && st == FLASH_ENOTFOUND)) continue;
        v->error = st;
        v->message = flash_sprintf(v->ctx, "invalidation of %.*s failed: %s", (int)op->items[i].key_len,
                                   op->items[i].key, flash_strerror(st));
    }
}

static void flash__inv_write(flash__inv *v, flash_cache_opcode code, flash_cache_item *items, size_t n,
                             void (*then)(flash__eop *));

static void flash__inv_done(flash__eop *o) {
    flash__inv *v = (flash__inv *)o->arg;
    flash__inv_note(v, &o->op, o->op.code == FLASH_CACHE_DELETE);
    v->pending--;
    flash__inv_settle(v);
}

/* Stale-marking lost a race (the value changed or went): a plain marker. */
static void flash__inv_cas_done(flash__eop *o) {
    flash__inv *v = (flash__inv *)o->arg;
    flash_ctx *ctx = v->ctx;
    size_t i, k = 0;
    flash_cache_item *retry = (flash_cache_item *)flash_calloc(ctx, o->op.count, sizeof *retry);
    for (i = 0; i < o->op.count; i++) {
        const flash_cache_item *it = &o->op.items[i];
        int st = o->op.status ? o->op.status : it->status;
        if (st == FLASH_ENOTSTORED || st == FLASH_ENOTFOUND) {
            if (retry && flash__marker(ctx, (void **)&retry[k].value, &retry[k].value_len) == FLASH_OK) {
                retry[k].key = it->key;
                retry[k].key_len = it->key_len;
                retry[k].ttl_s = ctx->desc.stale_marker_ttl_s;
                k++;
            }
        } else if (st != FLASH_OK && !v->error) {
            v->error = st;
            v->message = flash_sprintf(ctx, "invalidation of %.*s failed: %s", (int)it->key_len, it->key,
                                       flash_strerror(st));
        }
    }
    flash__inv_write(v, FLASH_CACHE_SET, retry, k, flash__inv_done);
    v->pending--;
    flash__inv_settle(v);
}

/* The current values of allowtime keys: mark the present ones stale (CAS),
   put markers where there is none or only a marker. */
static void flash__inv_soft_done(flash__eop *o) {
    flash__inv *v = (flash__inv *)o->arg;
    flash_ctx *ctx = v->ctx;
    size_t i, nc = 0, nm = 0;
    flash_cache_item *cas = (flash_cache_item *)flash_calloc(ctx, o->op.count, sizeof *cas);
    flash_cache_item *mk = (flash_cache_item *)flash_calloc(ctx, o->op.count, sizeof *mk);
    if (!cas || !mk) {
        v->error = FLASH_ENOMEM;
    } else {
        for (i = 0; i < o->op.count; i++) {
            const flash_cache_item *it = &o->op.items[i];
            int st = o->op.status ? o->op.status : it->status;
            flash_cache_item *dst;
            if (st != FLASH_OK && st != FLASH_ENOTFOUND) {
                if (!v->error) {
                    v->error = st;
                    v->message = flash_sprintf(ctx, "invalidation of %.*s failed: %s", (int)it->key_len, it->key,
                                               flash_strerror(st));
                }
                continue;
            }
            if (st == FLASH_OK && flash__restamp(ctx, it->value, it->value_len, (void **)&cas[nc].value,
                                                 &cas[nc].value_len) == FLASH_OK) {
                dst = &cas[nc++];
                dst->cas = it->cas;
                dst->ttl_s = v->soft_cls[i]->opts.timeout_s;
            } else {
                dst = &mk[nm];
                if (flash__marker(ctx, (void **)&dst->value, &dst->value_len) != FLASH_OK) continue;
                nm++;
                dst->ttl_s = ctx->desc.stale_marker_ttl_s;
            }
            dst->key = it->key;
            dst->key_len = it->key_len;
            dst->flags = 0;
        }
        flash__inv_write(v, FLASH_CACHE_CAS, cas, nc, flash__inv_cas_done);
        flash__inv_write(v, FLASH_CACHE_SET, mk, nm, flash__inv_done);
    }
    v->pending--;
    flash__inv_settle(v);
}

static void flash__inv_write(flash__inv *v, flash_cache_opcode code, flash_cache_item *items, size_t n,
                             void (*then)(flash__eop *)) {
    if (!n || !v->ctx->desc.cache.vt) return; /* no backend: nothing is cached */
    if (flash__write_then(v->ctx, v->gen, code, items, n, then, v)) {
        v->pending++;
    } else if (!v->error) {
        v->error = FLASH_ENOMEM;
    }
}

/* The request memo forgets a key (both query modes). */
static void flash__memo_drop(flash_ctx *ctx, const char *full, size_t len) {
    flash__engine *e = (flash__engine *)ctx->engine;
    char *k;
    if (!e || !(k = (char *)flash__alloc(ctx, len + 1))) return;
    memcpy(k + 1, full, len);
    k[0] = '0';
    flash_clear(e->loader, k, len + 1);
    k[0] = (char)('0' + FLASH_Q_ONLY_CACHE);
    flash_clear(e->loader, k, len + 1);
}

/* A set of targets: keys to mark (hard: markers; soft: stale-marking for
   allowtime classes, with their classes) and version keys to bump. */
/* A key already in one of the lists (hashed: an invalidation of n rows is
   O(n), not O(n^2) as a scan of the list was). */
typedef struct flash__tseen {
    const char *key; /* NULL: an empty slot */
    uint32_t len, list;
    uint64_t hash;
} flash__tseen;

typedef struct flash__targets {
    flash_ctx *ctx;
    flash_cache_item *mark;  /* allowtime with leases: MARK_STALE (one op) */
    size_t nmark, cap_mark;
    flash_cache_item *hard, *soft, *bump;
    const flash_class **soft_cls;
    size_t nhard, nsoft, nbump, cap_hard, cap_soft, cap_bump;
    flash_query **reset;     /* RESET keys (also in hard): refreshed after */
    size_t nreset, cap_reset;
    bool force_reset;        /* flash_reset_queries: every key is RESET */
    flash__tseen *seen;
    size_t nseen, cap_seen;
    int error;
    const char *message;     /* why error is set, or NULL */
} flash__targets;

/* Room for one more item in *a (arena: the old array is abandoned). */
static bool flash__targets_room(flash__targets *t, flash_cache_item **a, size_t n, size_t *cap) {
    flash_cache_item *b;
    if (n < *cap) return true;
    b = (flash_cache_item *)flash_calloc(t->ctx, *cap ? *cap * 2 : 16, sizeof *b);
    if (!b) {
        t->error = FLASH_ENOMEM;
        return false;
    }
    if (n) memcpy(b, *a, n * sizeof *b);
    *a = b;
    *cap = *cap ? *cap * 2 : 16;
    return true;
}

static flash__tseen *flash__targets_slot(flash__tseen *tab, size_t cap, uint32_t list, const char *key, size_t len,
                                         uint64_t h) {
    size_t i = (size_t)h & (cap - 1);
    for (;; i = (i + 1) & (cap - 1)) {
        flash__tseen *e = &tab[i];
        if (!e->key || (e->hash == h && e->list == list && e->len == len && memcmp(e->key, key, len) == 0)) return e;
    }
}

/* True when key is already in list (0 hard, 1 soft, 2 bump, 3 mark); otherwise it
   is recorded (key must live as long as t: it is the item's). */
static bool flash__targets_has(flash__targets *t, uint32_t list, const char *key, size_t len) {
    uint64_t h = flash__hash(key, len) ^ list;
    flash__tseen *e;
    if ((t->nseen + 1) * 2 > t->cap_seen) {
        size_t cap = t->cap_seen ? t->cap_seen * 2 : 64, i;
        flash__tseen *tab = (flash__tseen *)flash_calloc(t->ctx, cap, sizeof *tab);
        if (!tab) {
            t->error = FLASH_ENOMEM;
            return true;
        }
        for (i = 0; i < t->cap_seen; i++)
            if (t->seen[i].key)
                *flash__targets_slot(tab, cap, t->seen[i].list, t->seen[i].key, t->seen[i].len, t->seen[i].hash) =
                    t->seen[i];
        t->seen = tab; /* the old table stays in the arena */
        t->cap_seen = cap;
    }
    e = flash__targets_slot(t->seen, t->cap_seen, list, key, len, h);
    if (e->key) return true;
    e->key = key;
    e->len = (uint32_t)len;
    e->list = list;
    e->hash = h;
    t->nseen++;
    return false;
}

/* Add the key of class c for values v: a marker, or stale-marking when the
   class serves stale values (STALE, allowtime), and for RESET a refresh
   after. The request memo forgets it. */
static void flash__targets_key(flash__targets *t, const flash_class *c, const flash_value *v) {
    flash_ctx *ctx = t->ctx;
    char *key, *full;
    size_t len, full_len;
    flash_cache_item *it;
    bool reset = t->force_reset || c->opts.invalidation == FLASH_INVALIDATE_RESET;
    int rc = flash__build_key(ctx, c, v, c->nfields, 0, &key, &len, &full, &full_len);
    if (rc) {
        if (!t->error) t->error = rc;
        return;
    }
    flash__memo_drop(ctx, full ? full : key, full ? full_len : len);
    if (!reset && c->opts.allowtime_s > 0 && flash__class_lease(ctx, c)) {
        /* stale-while-revalidate on the server: the value stays, stale for
           allowtime; one lease reader refreshes it (flash__eb_stale) */
        if (flash__targets_has(t, 3, key, len)) return;
        if (!flash__targets_room(t, &t->mark, t->nmark, &t->cap_mark)) return;
        it = &t->mark[t->nmark++];
        it->ttl_s = c->opts.allowtime_s;
    } else if (!reset && (c->opts.allowtime_s > 0 || c->opts.invalidation == FLASH_INVALIDATE_STALE)) {
        size_t old_cap = t->cap_soft;
        if (flash__targets_has(t, 1, key, len)) return;
        if (!flash__targets_room(t, &t->soft, t->nsoft, &t->cap_soft)) return;
        if (t->cap_soft != old_cap) { /* grow the class list alongside */
            const flash_class **bc = (const flash_class **)flash__alloc(ctx, t->cap_soft * sizeof *bc);
            if (!bc) {
                t->error = FLASH_ENOMEM;
                return;
            }
            if (t->nsoft) memcpy(bc, t->soft_cls, t->nsoft * sizeof *bc);
            t->soft_cls = bc;
        }
        t->soft_cls[t->nsoft] = c;
        it = &t->soft[t->nsoft++];
    } else {
        if (flash__targets_has(t, 0, key, len)) return;
        if (!flash__targets_room(t, &t->hard, t->nhard, &t->cap_hard)) return;
        it = &t->hard[t->nhard];
        if (flash__marker(ctx, (void **)&it->value, &it->value_len) != FLASH_OK) {
            t->error = FLASH_ENOMEM;
            return;
        }
        it->ttl_s = ctx->desc.stale_marker_ttl_s;
        t->nhard++;
        if (reset) {
            flash_query *q = flash_query_new(ctx, c, v, c->nfields);
            if (q && t->nreset == t->cap_reset) { /* arena: the old array is abandoned */
                size_t cap = t->cap_reset ? t->cap_reset * 2 : 16;
                flash_query **b = (flash_query **)flash__alloc(ctx, cap * sizeof *b);
                if (b && t->nreset) memcpy(b, t->reset, t->nreset * sizeof *b);
                t->reset = b;
                t->cap_reset = b ? cap : 0;
            }
            if (!q || !t->reset) {
                t->error = FLASH_ENOMEM;
                return;
            }
            t->reset[t->nreset++] = q;
        }
    }
    it->key = key;
    it->key_len = len;
}

static void flash__targets_bump(flash__targets *t, const flash_class *c) {
    flash_ctx *ctx = t->ctx;
    char *key;
    size_t len;
    if (flash__version_key(ctx, c, &key, &len) != FLASH_OK) {
        if (!t->error) t->error = FLASH_ENOMEM;
        return;
    }
    if (flash__targets_has(t, 2, key, len)) return;
    if (!flash__targets_room(t, &t->bump, t->nbump, &t->cap_bump)) return;
    t->bump[t->nbump].key = key;
    t->bump[t->nbump].key_len = len;
    t->bump[t->nbump].number = 1;
    t->bump[t->nbump].create = true;
    /* Created at the time in ms: above any version an evicted key had. */
    t->bump[t->nbump].initial = (uint64_t)flash__now(ctx);
    t->nbump++;
}

struct flash_key_sink {
    flash__targets *t;
    const flash_dependency *dep;
};

FLASH_API const flash_class *flash_key_sink_class(const flash_key_sink *sink) {
    return sink ? sink->dep->cls : NULL;
}

FLASH_API int flash_key_sink_add(flash_key_sink *sink, const flash_value *parts, size_t n) {
    flash__targets *t;
    const flash_class *c;
    const char *msg = NULL;
    int rc;
    if (!sink || (n && !parts)) return FLASH_EINVAL;
    t = sink->t;
    c = sink->dep->cls;
    rc = n == c->nfields ? flash__check_values(t->ctx, c, parts, n, &msg) : FLASH_EINVAL;
    if (rc != FLASH_OK) {
        if (!t->error) {
            t->error = rc;
            t->message = flash_sprintf(t->ctx, "invalidate: %s's dependency on %s gave a key %s%s", c->name,
                                       sink->dep->model->name,
                                       n != c->nfields ? "of another arity than the class's" : "that does not fit: ",
                                       n != c->nfields ? "" : (msg ? msg : flash_strerror(rc)));
        }
        return rc;
    }
    flash__targets_key(t, c, parts);
    return FLASH_OK;
}

/* The keys of the classes depending on m that row may be cached under. */
static void flash__targets_dependents(flash__targets *t, const flash_model *m, const void *row) {
    const flash_dependency *d;
    for (d = m->dependents; d; d = d->next) {
        const flash_class *c = d->cls;
        flash_key_sink sink;
        if (c->opts.invalidation == FLASH_INVALIDATE_OFF) continue;
        if (c->opts.invalidation == FLASH_INVALIDATE_DYNAMIC) {
            flash__targets_bump(t, c);
            continue;
        }
        sink.t = t;
        sink.dep = d;
        if (d->map) {
            d->map(t->ctx, row, &sink, d->user_data);
        } else {
            flash_value v[8];
            size_t k;
            for (k = 0; k < d->nfields; k++) v[k] = flash_row_value(m, row, d->fields[k]);
            flash_key_sink_add(&sink, v, d->nfields);
        }
    }
}

/* Every key of every class of m that row may be cached under. */
static void flash__targets_row(flash__targets *t, const flash_model *m, const void *row) {
    const flash_class *c;
    for (c = m->classes; c; c = c->next) {
        flash_value v[8];
        size_t k;
        if (c->opts.invalidation == FLASH_INVALIDATE_OFF) continue;
        if (c->opts.invalidation == FLASH_INVALIDATE_DYNAMIC) {
            flash__targets_bump(t, c);
            continue;
        }
        for (k = 0; k < c->nfields; k++) v[k] = flash_row_value(m, row, c->fields[k]);
        flash__targets_key(t, c, v);
    }
    flash__targets_dependents(t, m, row);
}

static flash_promise *flash__invalidate_run(flash_ctx *ctx, flash__targets *t) {
    flash__inv *v = (flash__inv *)flash_calloc(ctx, 1, sizeof *v);
    if (!v) return NULL;
    flash__promise_init(&v->out);
    v->ctx = ctx;
    v->gen = ctx->gen;
    if (t->error) {
        flash__fail(ctx, &v->out, t->error, t->message ? t->message : "invalidation: cannot build the keys");
        return &v->out;
    }
    ctx->stats.invalidations += t->nhard + t->nsoft + t->nbump + t->nmark;
    v->soft_cls = t->soft_cls;
    if (ctx->desc.cache.vt) { /* without a backend there is nothing to refresh */
        v->reset = t->reset;
        v->nreset = t->nreset;
    }
    /* absent keys (FLASH_ENOTFOUND) get a marker, as a lost stale-marking does */
    flash__inv_write(v, FLASH_CACHE_MARK_STALE, t->mark, t->nmark, flash__inv_cas_done);
    flash__inv_write(v, FLASH_CACHE_SET, t->hard, t->nhard, flash__inv_done);
    flash__inv_write(v, FLASH_CACHE_INCR, t->bump, t->nbump, flash__inv_done);
    flash__inv_write(v, FLASH_CACHE_GET, t->soft, t->nsoft, flash__inv_soft_done);
    flash__inv_settle(v); /* nothing to do (no backend, or no keys): done */
    return &v->out;
}

static const flash_model *flash__model_of(const flash_model *m) {
    if (!m || (!m->fields && !m->field_table)) return NULL;
    if (!m->canonical) flash_register_model((flash_model *)m);
    return m->canonical;
}

FLASH_API flash_promise *flash_invalidate_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                                     const void *const *old_rows, const void *const *new_rows) {
    flash__targets t;
    size_t i;
    const flash_model *cm;
    if (!ctx) return NULL;
    cm = flash__model_of(m);
    if (!cm) return flash_rejected(ctx, FLASH_EINVAL, "invalidate: not a model");
    if (cm->schema != m->schema)
        return flash_rejected(ctx, FLASH_EINVAL, "invalidate: a model registered twice with different fields");
    memset(&t, 0, sizeof t);
    t.ctx = ctx;
    for (i = 0; i < n; i++) {
        if (old_rows && old_rows[i]) flash__targets_row(&t, cm, old_rows[i]);
        if (new_rows && new_rows[i]) flash__targets_row(&t, cm, new_rows[i]);
    }
    return flash__invalidate_run(ctx, &t);
}

FLASH_API flash_promise *flash_invalidate_async(flash_ctx *ctx, const flash_model *m, const void *old_row,
                                                const void *new_row) {
    const void *o[1], *nw[1];
    o[0] = old_row;
    nw[0] = new_row;
    return flash_invalidate_rows_async(ctx, m, 1, o, nw);
}

FLASH_API int flash_invalidate(flash_ctx *ctx, const flash_model *m, const void *old_row, const void *new_row) {
    return flash_wait(ctx, flash_invalidate_async(ctx, m, old_row, new_row), NULL);
}

static flash_promise *flash__invalidate_queries(flash_ctx *ctx, size_t n, flash_query *const *qs, bool reset) {
    flash__targets t;
    size_t i;
    if (!ctx) return NULL;
    if (n && !qs) return flash_rejected(ctx, FLASH_EINVAL, "invalidate: NULL query array");
    memset(&t, 0, sizeof t);
    t.ctx = ctx;
    t.force_reset = reset;
    for (i = 0; i < n; i++) {
        const char *msg = NULL;
        int err = 0;
        flash_class *c = qs[i] ? flash__class_of(qs[i]->cls, &err) : NULL;
        if (!c) return flash_rejected(ctx, err ? err : FLASH_EINVAL, "invalidate: bad query");
        if ((err = flash__check_values(ctx, c, qs[i]->values, qs[i]->count, &msg)) != FLASH_OK)
            return flash_rejected(ctx, err, msg);
        flash__targets_key(&t, c, qs[i]->values);
    }
    return flash__invalidate_run(ctx, &t);
}

FLASH_API flash_promise *flash_invalidate_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs) {
    return flash__invalidate_queries(ctx, n, qs, false);
}

FLASH_API int flash_invalidate_queries(flash_ctx *ctx, size_t n, flash_query *const *qs) {
    return flash_wait(ctx, flash_invalidate_queries_async(ctx, n, qs), NULL);
}

FLASH_API flash_promise *flash_reset_queries_async(flash_ctx *ctx, size_t n, flash_query *const *qs) {
    return flash__invalidate_queries(ctx, n, qs, true);
}

FLASH_API int flash_reset_queries(flash_ctx *ctx, size_t n, flash_query *const *qs) {
    return flash_wait(ctx, flash_reset_queries_async(ctx, n, qs), NULL);
}

FLASH_API flash_promise *flash_bump_version_async(flash_ctx *ctx, const flash_model *m) {
    flash__targets t;
    const flash_class *c;
    const flash_dependency *d;
    const flash_model *cm;
    if (!ctx) return NULL;
    cm = flash__model_of(m);
    if (!cm) return flash_rejected(ctx, FLASH_EINVAL, "bump_version: not a model");
    memset(&t, 0, sizeof t);
    t.ctx = ctx;
    for (c = cm->classes; c; c = c->next) flash__targets_bump(&t, c);
    for (d = cm->dependents; d; d = d->next) flash__targets_bump(&t, d->cls);
    return flash__invalidate_run(ctx, &t);
}

FLASH_API int flash_bump_version(flash_ctx *ctx, const flash_model *m) {
    return flash_wait(ctx, flash_bump_version_async(ctx, m), NULL);
}

/* ---- writes ---- */

struct flash_write {
    flash_ctx *ctx;
    const flash_model *model;
    flash_write_kind kind;
    size_t n;
    void **rows;             /* copies of the caller's rows */
    void **old;              /* flash_write_set_old, NULL: none */
    flash_promise *out;
    uint64_t gen;
    bool done;
    struct flash_write *next_live, **prev_live; /* ctx->live_writes */
    void (*cancel)(void *self, flash_write *w);
    void *cancel_self;
};

static void flash__write_unlink(flash_write *w) {
    if (!w->prev_live) return;
    *w->prev_live = w->next_live;
    if (w->next_live) w->next_live->prev_live = w->prev_live;
    w->prev_live = NULL;
    w->next_live = NULL;
}

/* Context destroyed: the sources forget their writes in flight. */
static void flash__writes_cancel(flash_ctx *ctx) {
    flash_write *w;
    while ((w = ctx->live_writes) != NULL) {
        flash__write_unlink(w);
        w->done = true;
        if (w->cancel) w->cancel(w->cancel_self, w);
        else flash_ctx_log(ctx, FLASH_LOG_ERROR, "flash_ctx_destroy: a write of %s in flight cannot be cancelled",
                           w->model->name);
    }
}

FLASH_API void flash_write_on_cancel(flash_write *w, void (*cancel)(void *self, flash_write *w), void *self) {
    if (!w || w->done) return;
    w->cancel = cancel;
    w->cancel_self = self;
}

static void flash__write_inv_done(flash_ctx *ctx, flash_promise *p, void *arg) {
    flash_promise *out = (flash_promise *)arg;
    if (flash_promise_state(p) == FLASH_FULFILLED) flash_resolve(ctx, out, NULL);
    else
        flash_rejectf(ctx, out, flash_promise_error(p), "the write is committed, but its invalidation failed: %s",
                      flash_promise_message(p));
}

static flash_promise *flash__write_start(flash_ctx *ctx, const flash_model *m, flash_write_kind kind, size_t n,
                                         const void *const *rows) {
    const flash_model *cm = flash__model_of(m);
    flash_source src;
    flash_write *w;
    size_t i;
    if (!ctx) return NULL;
    if (!cm || (n && !rows)) return flash_rejected(ctx, FLASH_EINVAL, "write: no model or no rows");
    for (i = 0; i < n; i++)
        if (!rows[i]) return flash_rejected(ctx, FLASH_EINVAL, "write: a NULL row");
    if (cm->result)
        return flash_rejected(ctx, FLASH_EINVAL,
                              flash_sprintf(ctx, "write: %s is a result struct (FLASH_RESULT), no table holds it",
                                            cm->name));
    src = flash__source_for(ctx, cm);
    if (!src.vt || !src.vt->write)
        return flash_rejected(ctx, src.vt ? FLASH_EUNSUPPORTED : FLASH_ESOURCE,
                              flash_sprintf(ctx, "%s: the source of %s cannot write", src.vt ? src.vt->name : "no source",
                                            cm->name));
    if (n == 0) return flash_fulfilled(ctx, NULL);
    w = (flash_write *)flash_calloc(ctx, 1, sizeof *w);
    if (!w) return NULL;
    w->ctx = ctx;
    w->model = cm;
    w->kind = kind;
    w->n = n;
    w->rows = (void **)flash_calloc(ctx, n, sizeof *w->rows);
    w->old = (void **)flash_calloc(ctx, n, sizeof *w->old);
    w->out = flash_promise_new(ctx);
    if (!w->rows || !w->old || !w->out) return NULL;
    for (i = 0; i < n; i++)
        if (!(w->rows[i] = flash_row_copy(ctx, cm, rows[i]))) return NULL;
    w->gen = flash__hold(ctx); /* the write's memory lives until its source answers */
    w->next_live = ctx->live_writes;
    if (w->next_live) w->next_live->prev_live = &w->next_live;
    w->prev_live = &ctx->live_writes;
    ctx->live_writes = w;
    src.vt->write(src.self, ctx, w);
    return w->out;
}

FLASH_API flash_promise *flash_save_async(flash_ctx *ctx, const flash_model *m, const void *row) {
    return flash__write_start(ctx, m, FLASH_WRITE_SAVE, 1, &row);
}
FLASH_API flash_promise *flash_save_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                               const void *const *rows) {
    return flash__write_start(ctx, m, FLASH_WRITE_SAVE, n, rows);
}
FLASH_API flash_promise *flash_delete_async(flash_ctx *ctx, const flash_model *m, const void *row) {
    return flash__write_start(ctx, m, FLASH_WRITE_DELETE, 1, &row);
}
FLASH_API flash_promise *flash_delete_rows_async(flash_ctx *ctx, const flash_model *m, size_t n,
                                                 const void *const *rows) {
    return flash__write_start(ctx, m, FLASH_WRITE_DELETE, n, rows);
}
FLASH_API int flash_save(flash_ctx *ctx, const flash_model *m, const void *row) {
    return flash_wait(ctx, flash_save_async(ctx, m, row), NULL);
}
FLASH_API int flash_save_rows(flash_ctx *ctx, const flash_model *m, size_t n, const void *const *rows) {
    return flash_wait(ctx, flash_save_rows_async(ctx, m, n, rows), NULL);
}
FLASH_API int flash_delete(flash_ctx *ctx, const flash_model *m, const void *row) {
    return flash_wait(ctx, flash_delete_async(ctx, m, row), NULL);
}
FLASH_API int flash_delete_rows(flash_ctx *ctx, const flash_model *m, size_t n, const void *const *rows) {
    return flash_wait(ctx, flash_delete_rows_async(ctx, m, n, rows), NULL);
}

FLASH_API flash_ctx *flash_write_ctx(const flash_write *w) { return w ? w->ctx : NULL; }
FLASH_API const flash_model *flash_write_model(const flash_write *w) { return w ? w->model : NULL; }
FLASH_API flash_write_kind flash_write_kind_of(const flash_write *w) { return w ? w->kind : FLASH_WRITE_SAVE; }
FLASH_API size_t flash_write_count(const flash_write *w) { return w ? w->n : 0; }
FLASH_API const void *flash_write_row(const flash_write *w, size_t i) {
    return (w && !w->done && i < w->n) ? w->rows[i] : NULL;
}

FLASH_API int flash_write_set_old(flash_write *w, size_t i, const void *old_row) {
    if (!w || i >= w->n) return FLASH_EINVAL;
    if (w->done) return FLASH_ESTATE;
    if (!old_row) {
        w->old[i] = NULL;
        return FLASH_OK;
    }
    w->old[i] = flash_row_copy(w->ctx, w->model, old_row);
    return w->old[i] ? FLASH_OK : FLASH_ENOMEM;
}

FLASH_API int flash_write_done(flash_write *w, int status, const char *message) {
    flash_ctx *ctx;
    flash_promise *inv;
    bool live;
    if (!w) return FLASH_EINVAL;
    if (w->done) return FLASH_ESTATE;
    w->done = true;
    flash__write_unlink(w);
    ctx = w->ctx;
    live = w->gen == ctx->gen; /* else the context was reset meanwhile: nobody waits */
    if (status) {
        if (live) flash_reject(ctx, w->out, status, message);
        flash__unhold(ctx, w->gen);
        return FLASH_OK;
    }
    /* Committed: the keys of the old rows and of the saved ones. The keys
       are built inside the call: the rows may go right after. */
    inv = flash_invalidate_rows_async(ctx, w->model, w->n, (const void *const *)w->old,
                                      w->kind == FLASH_WRITE_SAVE ? (const void *const *)w->rows : NULL);
    if (live) {
        if (!inv) flash_reject(ctx, w->out, FLASH_ENOMEM, "the write is committed, but its invalidation failed");
        else flash_on_settle(ctx, inv, flash__write_inv_done, w->out);
    }
    flash__unhold(ctx, w->gen);
    return FLASH_OK;
}

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
