/* The model-cache suite of test_engine.c again, on the libuv loop (memory backend). */
#define ENGINE_SUITE engine_libuv
#define ENGINE_LOOP "libuv"
#define ENGINE_BACKEND FIXTURE_MEMORY
#include "test_engine.c"
