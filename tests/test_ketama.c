/* The memcached backend places keys exactly where libmemcached's weighted
   ketama does. libmemcached is linked into this test only.

   "libmemcached's ketama" here is memcached_behavior_set(memc,
   MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1): distribution
   MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED, MD5 as key and distribution
   hash. The same continuum comes from MEMCACHED_BEHAVIOR_DISTRIBUTION =
   MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA with MD5 key hash as soon as a
   server has a weight above 1 (libmemcached then turns weighting on). */
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <string.h>

#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/memcached.h"
#include "harness.h"

enum { NKEYS = 10000 };

/* Deterministic keys: short and long, printable, some memcached-invalid
   bytes never (hashing does not care, but keep them realistic). */
static size_t make_key(int i, char *out) {
    static uint32_t seed;
    if (i == 0) seed = 12345;
    if (i % 3 == 0) return (size_t)sprintf(out, "key:%d", i);
    if (i % 3 == 1) return (size_t)sprintf(out, "flash:User:v1:id=%d", i * 7919);
    seed = seed * 1103515245u + 12345u;
    size_t len = 1 + (seed >> 8) % 250;
    for (size_t k = 0; k < len; k++) {
        seed = seed * 1103515245u + 12345u;
        out[k] = (char)('!' + (seed >> 16) % 94);
    }
    out[len] = 0;
    return len;
}

typedef enum { LIBMC_KETAMA_WEIGHTED, LIBMC_KETAMA_WEIGHTED_AFTER_ADD, LIBMC_DISTRIBUTION_KETAMA_MD5 } libmc_mode;

/* Every key on the same server index as libmemcached; returns the per-server
   key counts in counts (may be NULL). */
static void check_list(const flash_memcached_server *servers, size_t n, libmc_mode mode, size_t *counts) {
    flash_poll *p = flash_poll_create();
    flash_memcached_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    d.loop = flash_poll_loop(p);
    d.servers = servers;
    d.server_count = n;
    flash_cache c = flash_memcached_create(&d, &err); /* connects lazily: nothing is sent */
    cr_assert_not_null(c.self, "create: %d", err);

    memcached_st *m = memcached_create(NULL);
    cr_assert_not_null(m);
    if (mode == LIBMC_KETAMA_WEIGHTED) {
        cr_assert_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1), MEMCACHED_SUCCESS);
    } else if (mode == LIBMC_DISTRIBUTION_KETAMA_MD5) {
        cr_assert_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                                            MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA), MEMCACHED_SUCCESS);
        cr_assert_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_HASH, MEMCACHED_HASH_MD5), MEMCACHED_SUCCESS);
        cr_assert_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_HASH, MEMCACHED_HASH_MD5),
                     MEMCACHED_SUCCESS);
    }
    for (size_t i = 0; i < n; i++) {
        /* weight 0 and port 0 mean the defaults (1, 11211) on both sides */
        cr_assert_eq(memcached_server_add_with_weight(m, servers[i].host, servers[i].port ? servers[i].port : 11211,
                                                      servers[i].weight),
                     MEMCACHED_SUCCESS);
    }
    if (mode == LIBMC_KETAMA_WEIGHTED_AFTER_ADD)
        cr_assert_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1), MEMCACHED_SUCCESS);
    cr_assert_eq(memcached_server_count(m), n);

    if (counts) memset(counts, 0, n * sizeof *counts);
    char key[256];
    for (int i = 0; i < NKEYS; i++) {
        size_t len = make_key(i, key);
        uint32_t want = memcached_generate_hash(m, key, len);
        int got = flash_memcached_server_for_key(c, key, len);
        cr_assert_eq((uint32_t)got, want, "key %d (%s): flash says server %d, libmemcached %u", i, key, got, want);
        if (counts) counts[got]++;
    }
    memcached_free(m);
    flash_cache_destroy(c);
    flash_poll_destroy(p);
}

FLASH_TEST(ketama, same_host_three_ports_default_weights) {
    const flash_memcached_server s[] = {{"127.0.0.1", 11211, 0}, {"127.0.0.1", 11212, 0}, {"127.0.0.1", 11213, 0}};
    size_t counts[3];
    check_list(s, 3, LIBMC_KETAMA_WEIGHTED, counts);
    for (int i = 0; i < 3; i++) cr_assert_gt(counts[i], NKEYS / 6); /* all used */
    check_list(s, 3, LIBMC_KETAMA_WEIGHTED_AFTER_ADD, NULL);
}

FLASH_TEST(ketama, default_port_is_left_out_of_the_point_names) {
    const flash_memcached_server s[] = {{"127.0.0.1", 0, 1}, {"127.0.0.2", 11211, 1}, {"127.0.0.3", 0, 1},
                                        {"127.0.0.4", 11211, 1}};
    check_list(s, 4, LIBMC_KETAMA_WEIGHTED, NULL);
}

FLASH_TEST(ketama, weights_scale_the_points) {
    const flash_memcached_server s[] = {{"127.0.0.1", 22122, 1}, {"127.0.0.2", 11211, 2}, {"127.0.0.3", 33133, 3}};
    size_t counts[3];
    check_list(s, 3, LIBMC_KETAMA_WEIGHTED, counts);
    cr_assert_lt(counts[0], counts[2]);
    /* a weight above 1 turns weighting on with the plain ketama distribution */
    check_list(s, 3, LIBMC_DISTRIBUTION_KETAMA_MD5, NULL);
}

FLASH_TEST(ketama, uneven_weights_and_rounding) {
    const flash_memcached_server a[] = {{"127.0.0.1", 11211, 100}, {"127.0.0.2", 11211, 1}, {"127.0.0.3", 11211, 1}};
    check_list(a, 3, LIBMC_KETAMA_WEIGHTED, NULL);
    const flash_memcached_server b[] = {{"127.0.0.1", 11300, 3}, {"127.0.0.1", 11301, 7}};
    check_list(b, 2, LIBMC_KETAMA_WEIGHTED, NULL);
    const flash_memcached_server c[] = {{"127.0.0.9", 11211, 1000}, {"127.0.0.8", 11211, 1}};
    check_list(c, 2, LIBMC_KETAMA_WEIGHTED, NULL);
    /* 1/25 * 160/4 * 5 is 8 in real numbers but just under 8 in float:
       libmemcached gives the first server 28 points, not 32 */
    const flash_memcached_server d[] = {{"127.0.0.1", 11211, 1}, {"127.0.0.2", 11211, 12}, {"127.0.0.3", 11211, 3},
                                        {"127.0.0.4", 11211, 4}, {"127.0.0.5", 11211, 5}};
    check_list(d, 5, LIBMC_KETAMA_WEIGHTED, NULL);
}

FLASH_TEST(ketama, ten_servers_mixed_ports_and_weights) {
    flash_memcached_server s[10];
    char hosts[10][32];
    for (int i = 0; i < 10; i++) {
        snprintf(hosts[i], sizeof hosts[i], "127.0.1.%d", i + 1);
        s[i].host = hosts[i];
        s[i].port = (uint16_t)(i % 2 ? 20000 + i : 11211);
        s[i].weight = (uint32_t)(1 + i % 5);
    }
    size_t counts[10];
    check_list(s, 10, LIBMC_KETAMA_WEIGHTED, counts);
    for (int i = 0; i < 10; i++) cr_assert_gt(counts[i], 0);
    check_list(s, 10, LIBMC_DISTRIBUTION_KETAMA_MD5, NULL);
}

FLASH_TEST(ketama, host_names_and_ipv6_literals_hash_as_written) {
    const flash_memcached_server s[] = {{"localhost", 11211, 1}, {"127.0.0.1", 11211, 1}, {"::1", 11299, 2}};
    check_list(s, 3, LIBMC_KETAMA_WEIGHTED, NULL);
}

FLASH_TEST(ketama, one_server_takes_every_key) {
    const flash_memcached_server s[] = {{"127.0.0.1", 11999, 5}};
    size_t counts[1];
    check_list(s, 1, LIBMC_KETAMA_WEIGHTED, counts);
    cr_assert_eq(counts[0], NKEYS);
}
