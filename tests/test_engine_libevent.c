/* The model-cache suite of test_engine.c again, on the libevent loop (memory backend). */
#define ENGINE_SUITE engine_libevent
#define ENGINE_LOOP "libevent"
#define ENGINE_BACKEND FIXTURE_MEMORY
#include "test_engine.c"
