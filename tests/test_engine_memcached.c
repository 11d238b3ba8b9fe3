/* The model-cache suite of test_engine.c again, on a real memcached (poll loop). */
#define ENGINE_SUITE engine_memcached
#define ENGINE_LOOP "poll"
#define ENGINE_BACKEND FIXTURE_MEMCACHED
#include "test_engine.c"
