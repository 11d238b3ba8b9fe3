/* The model-cache suite of test_engine.c again, on the libev loop (memory backend). */
#define ENGINE_SUITE engine_libev
#define ENGINE_LOOP "libev"
#define ENGINE_BACKEND FIXTURE_MEMORY
#include "test_engine.c"
