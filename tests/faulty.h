/* tests/faulty.h — a fault-injecting cache backend for tests.

   Wraps any flash_cache (not owned) and, by a seeded schedule, misbehaves the
   way a network cache does, while keeping the layer-6 contract: done() is
   called exactly once per operation that is not cancelled, never from inside
   submit(), and GET values stay valid until done() returns.

   Per operation (probabilities in 1/1000, drawn at submit in order):
     drop     the reply never comes. The request reaches the inner backend or
              not (a coin), and the wrapper completes the operation after
              timeout_ms with FLASH_ETIMEDOUT, as a real backend's request
              timeout would (on op->status or on every item: a coin).
     fail     the connection breaks: FLASH_EBACKEND for the operation (on
              op->status or on every item). The request may have been applied
              (a coin). Completes on the next tick or after the inner reply.
     delay    the inner reply is delivered 1..max_delay_ms later.
     reorder  the inner reply is held back 1..4 loop ticks, so that later
              operations complete first.
   Per item of an operation that is answered (not dropped or failed):
     item_fail  that key's status becomes FLASH_EBACKEND or FLASH_ETIMEDOUT
                (a server of a pool down); its value is not returned.
     corrupt    a GET value that was found comes back altered, in one of the
                ways corrupt_mode allows (FAULTY_CORRUPT_* bits).
   Every operation completes within timeout_ms of its submission, plus the
   inner backend's own time and a few loop ticks.

   Single-threaded, like the backends it wraps: use it from one loop. Destroy
   it after the contexts that use it (they cancel their operations), before
   the loop and the inner backend.
*/
#ifndef FLASH_TEST_FAULTY_H
#define FLASH_TEST_FAULTY_H
#include <stdbool.h>
#include <stdint.h>
#include "flash.h"

enum {
    FAULTY_CORRUPT_TRUNCATE = 1, /* cut the value short (at least one byte) */
    FAULTY_CORRUPT_EXTEND = 2,   /* append 1..8 bytes */
    FAULTY_CORRUPT_HEADER = 4,   /* flip bits in the first 6 bytes (magic, flags, schema) */
    FAULTY_CORRUPT_PAYLOAD = 8,  /* flip bits anywhere after them */
    FAULTY_CORRUPT_DETECTABLE = FAULTY_CORRUPT_TRUNCATE | FAULTY_CORRUPT_EXTEND | FAULTY_CORRUPT_HEADER,
    FAULTY_CORRUPT_ANY = 15
};

typedef struct faulty_desc {
    uint64_t seed;
    uint32_t p_drop, p_fail, p_delay, p_reorder; /* per operation, in 1/1000 */
    uint32_t p_item_fail, p_corrupt;             /* per item, in 1/1000 */
    uint32_t corrupt_mode;                       /* default: FAULTY_CORRUPT_DETECTABLE */
    uint32_t timeout_ms;                         /* default: 20 */
    uint32_t max_delay_ms;                       /* default: timeout_ms / 2 (at least 1) */
} faulty_desc;

typedef struct faulty_stats {
    uint64_t ops, items;          /* submitted */
    uint64_t faulted_ops;         /* operations with at least one fault of any kind */
    uint64_t dropped, failed, delayed, reordered; /* operations */
    uint64_t item_failures, corrupted;            /* items */
    uint64_t version_item_failures;  /* of item_failures: class version keys ("...@version") */
    uint64_t completed;           /* done() calls */
    uint64_t canceled;            /* operations cancelled before done() */
    uint64_t max_latency_ms;      /* longest submit -> done() */
} faulty_stats;

typedef struct faulty faulty;

faulty *faulty_create(flash_cache inner, const faulty_desc *desc);
flash_cache faulty_cache(faulty *f);
/* A new schedule (and new probabilities) for the operations submitted from
   now on; operations in flight keep their fate. */
void faulty_configure(faulty *f, const faulty_desc *desc);
faulty_stats faulty_get_stats(const faulty *f);
void faulty_stats_clear(faulty *f);
/* Operations submitted and neither completed nor cancelled. */
size_t faulty_pending(const faulty *f);
/* Frees the wrapper (not the inner backend). Operations still pending are
   forgotten without done(); destroy the contexts first. */
void faulty_destroy(faulty *f);

#endif
