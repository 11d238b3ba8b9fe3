/* The model-cache suite of test_engine.c again, on the run's 3-master Redis
   Cluster (poll loop). */
#define ENGINE_SUITE engine_redis_cluster
#define ENGINE_LOOP "poll"
#define ENGINE_BACKEND FIXTURE_REDIS_CLUSTER
#include "test_engine.c"
