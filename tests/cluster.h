/* tests/cluster.h — Redis Cluster and Sentinel deployments for the tests,
   all on loopback ports, in temp dirs.

   flash_test_cluster_shared   the run's 3-master cluster: started by the
                               first test process that asks (a file lock
                               keyed by the runner's pid), reused by the
                               others, stopped when the runner exits
   flash_test_cluster_start    a private cluster (replicas, node timeout),
                               stopped by _stop or at the test's exit
   flash_test_prefixed         a cache wrapper that renames "flash:..." keys
                               "<tag>:..." (same length): tests sharing one
                               cluster see their own keys only
*/
#ifndef FLASH_TEST_CLUSTER_H
#define FLASH_TEST_CLUSTER_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include "flash.h"

#define FLASH_TEST_CLUSTER_MAX 8
typedef struct flash_test_cluster {
    int n;                                   /* servers: masters, then replicas */
    uint16_t ports[FLASH_TEST_CLUSTER_MAX];
    pid_t pids[FLASH_TEST_CLUSTER_MAX];
    char dir[64];
} flash_test_cluster;

const flash_test_cluster *flash_test_cluster_shared(void);
bool flash_test_cluster_start(flash_test_cluster *c, int masters, int replicas_each, int node_timeout_ms);
void flash_test_cluster_stop(flash_test_cluster *c);
/* Kill one server (SIGKILL). */
void flash_test_cluster_kill(flash_test_cluster *c, int i);
/* Wait until every live node reports cluster_state:ok (up to ms). */
bool flash_test_cluster_wait_ok(const flash_test_cluster *c, int ms);

/* Run redis-cli -p port ARGS (a shell word list); its output in out. Returns
   the exit status. */
int flash_test_redis_cli(uint16_t port, char *out, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A redis-server on a free port with extra arguments ("--replicaof 127.0.0.1 P"
   or "--sentinel" with a config file written first: see _sentinel_start). */
bool flash_test_redis_spawn(uint16_t *port, pid_t *pid, const char *dir, const char *extra);
/* A sentinel monitoring 127.0.0.1:master_port as `name` (quorum 1). */
bool flash_test_sentinel_start(uint16_t *port, pid_t *pid, const char *dir, const char *name, uint16_t master_port);

flash_cache flash_test_prefixed(flash_cache inner);
#endif
