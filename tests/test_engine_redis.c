/* The model-cache suite of test_engine.c again, on a real Redis (poll loop). */
#define ENGINE_SUITE engine_redis
#define ENGINE_LOOP "poll"
#define ENGINE_BACKEND FIXTURE_REDIS
#include "test_engine.c"
