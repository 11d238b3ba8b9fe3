/* tests/consistency.h — the deterministic interleaving harness.

   A gate wraps a cache backend: operations submitted while the gate is shut
   wait in a queue until the test releases them, one at a time, onto the
   real backend. A gated source likewise holds fetches until released, and
   reads the table at that moment. With both, a reader's get-many, source
   read and fill, and a writer's database update and invalidation, happen
   exactly in the order a schedule says. */
#ifndef FLASH_TEST_CONSISTENCY_H
#define FLASH_TEST_CONSISTENCY_H
#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

typedef struct gate gate;
/* Wraps inner (not owned). Shut: every operation waits to be released. */
gate *gate_create(flash_cache inner, flash_loop loop);
void gate_destroy(gate *g);
/* The gate as a backend: with the inner backend's capabilities (leases),
   or (plain) with none, as a third-party backend would be. */
flash_cache gate_cache(gate *g);
flash_cache gate_cache_plain(gate *g);
void gate_shut(gate *g, bool shut);
/* A broken backend on purpose: every CAS store becomes a SET (a fill
   without compare-and-swap). The harness must find it inconsistent. */
void gate_blind_cas(gate *g, bool on);
size_t gate_waiting(const gate *g);
/* Apply the oldest waiting operation and run the loop until it completed
   (and what its completion started has settled). false when none waits. */
bool gate_release(gate *g);
/* The same for the newest waiting operation (a writer's, ahead of a
   reader's that waits). */
bool gate_release_newest(gate *g);

typedef struct gated_source gated_source;
gated_source *gated_source_create(flash_table *table, flash_loop loop);
void gated_source_destroy(gated_source *s);
flash_source gated_source_get(gated_source *s);
size_t gated_source_waiting(const gated_source *s);
/* Answer the oldest waiting fetch from the table as it is now. */
bool gated_source_release(gated_source *s);

/* Run the loop until nothing is ready (gated work stays waiting). */
void run_until_idle(flash_loop loop);

#endif
