/* bench/changes_bench.c — the PostgreSQL change-stream consumer
   (backends/changes/postgres.h) into memcached.

     changes_bench CONNINFO MEMCACHED_PORT [ROWS]

   The server needs wal_level=logical (bench/run.sh's "changes" part starts
   one). Prints:
     bulk      one UPDATE of ROWS rows (default 100,000; REPLICA IDENTITY
               FULL, two keys per row): commit -> every row invalidated and
               acknowledged, in row changes/s
     decode    the same UPDATE on a second slot whose consumer maps no model:
               the stream read and parsed, nothing built or invalidated
     load      a writer thread commits 100-row UPDATEs back to back for 3 s
               while the consumer keeps up: row changes/s, and the lag of
               each applied batch (oldest commit in it -> applied) p50/p99 */
#define _GNU_SOURCE
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memcached.h"
#include "backends/changes/postgres.h"
#include "backends/loop/poll.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_FIELDS(F) F(I64, id) F(STR, username) F(STR, name)
FLASH_MODEL_OPT(BenchRow, BENCH_FIELDS, .table = "bench_rows")
FLASH_GET_KEYS(BenchRow, (id), (username))
/* Maps to no table: the decode-only consumer. */
FLASH_MODEL_OPT(NoRow, BENCH_FIELDS, .table = "no_such_table_here")

static const char *conninfo;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, PGconn *c) {
    fprintf(stderr, "changes_bench: %s: %s\n", what, c ? PQerrorMessage(c) : "");
    exit(1);
}

static void sql(PGconn *c, const char *q) {
    PGresult *r = PQexec(c, q);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        fprintf(stderr, "changes_bench: %s: %s", q, PQresultErrorMessage(r));
        exit(1);
    }
    PQclear(r);
}

static uint64_t insert_lsn(PGconn *c) {
    PGresult *r = PQexec(c, "SELECT pg_current_wal_insert_lsn()");
    uint64_t v = PQresultStatus(r) == PGRES_TUPLES_OK ? flash_pg_lsn_parse(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return v;
}

static flash_pg_changes *consumer(flash_poll *loop, flash_cache cache, const char *slot, const flash_model *m) {
    static const flash_model *ms[1];
    flash_pg_changes_desc d;
    int err = 0;
    memset(&d, 0, sizeof d);
    ms[0] = m;
    d.conninfo = conninfo;
    d.loop = flash_poll_loop(loop);
    d.cache = cache;
    d.publication = "bench_pub";
    d.slot = slot;
    d.create_publication = d.create_slot = true;
    d.models = ms;
    d.nmodels = 1;
    d.status_interval_ms = 200;
    flash_pg_changes *c = flash_pg_changes_create(&d, &err);
    if (!c) die("flash_pg_changes_create", NULL);
    return c;
}

/* Run until the consumer acknowledged lsn (or 120 s). */
static void run_until_acked(flash_poll *loop, flash_pg_changes *c, uint64_t lsn) {
    double end = now_s() + 120;
    while (flash_pg_changes_stats_get(c).acked_lsn < lsn && now_s() < end) flash_poll_run_once(loop, true);
    if (flash_pg_changes_stats_get(c).acked_lsn < lsn) {
        fprintf(stderr, "changes_bench: not acknowledged in 120 s: %s\n", flash_pg_changes_last_error(c));
        exit(1);
    }
}

static void run_until_streaming(flash_poll *loop, flash_pg_changes *c) {
    double end = now_s() + 20;
    while (!flash_pg_changes_stats_get(c).streaming && now_s() < end) flash_poll_run_once(loop, true);
    if (!flash_pg_changes_stats_get(c).streaming) {
        fprintf(stderr, "changes_bench: no stream: %s\n", flash_pg_changes_last_error(c));
        exit(1);
    }
}

typedef struct writer {
    volatile int stop;
    long rows, txns, table_rows;
} writer;

static void *write_loop(void *arg) {
    writer *w = (writer *)arg;
    PGconn *c = PQconnectdb(conninfo);
    long k = 0;
    char q[160];
    if (PQstatus(c) != CONNECTION_OK) die("writer connect", c);
    while (!w->stop) {
        long lo = (k * 100) % w->table_rows + 1;
        snprintf(q, sizeof q, "UPDATE bench_rows SET name = name || 'y' WHERE id BETWEEN %ld AND %ld", lo, lo + 99);
        sql(c, q);
        w->rows += 100;
        w->txns++;
        k++;
    }
    PQfinish(c);
    return NULL;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: changes_bench CONNINFO MEMCACHED_PORT [ROWS]\n");
        return 2;
    }
    conninfo = argv[1];
    uint16_t port = (uint16_t)atoi(argv[2]);
    long rows = argc > 3 ? atol(argv[3]) : 100000;
    char q[256];
    PGconn *admin = PQconnectdb(conninfo);
    if (PQstatus(admin) != CONNECTION_OK) die("connect", admin);
    sql(admin, "DROP PUBLICATION IF EXISTS bench_pub"); /* a publication forgets a dropped table */
    sql(admin, "DROP TABLE IF EXISTS bench_rows");
    sql(admin, "CREATE TABLE bench_rows (id int8 PRIMARY KEY, username text UNIQUE, name text)");
    sql(admin, "ALTER TABLE bench_rows REPLICA IDENTITY FULL");
    snprintf(q, sizeof q, "INSERT INTO bench_rows SELECT i, 'user' || i, 'name' || i FROM generate_series(1, %ld) i",
             rows);
    sql(admin, q);

    flash_poll *loop = flash_poll_create();
    flash_memcached_server srv = {"127.0.0.1", port, 0};
    flash_memcached_desc md;
    memset(&md, 0, sizeof md);
    md.loop = flash_poll_loop(loop);
    md.servers = &srv;
    md.server_count = 1;
    md.timeout_ms = 10000;
    int err = 0;
    flash_cache cache = flash_memcached_create(&md, &err);
    if (!cache.vt) die("memcached", NULL);

    flash_pg_changes *full = consumer(loop, cache, "bench_full", &BenchRow_model);
    run_until_streaming(loop, full);
    flash_pg_changes *dec = consumer(loop, cache, "bench_decode", &NoRow_model);
    run_until_streaming(loop, dec);
    /* Decode-only first, alone: stop the full consumer's reading by
       destroying it and recreating it after (its slot keeps the changes). */
    flash_pg_changes_destroy(full);

    printf("# flash changes_bench: %ld rows, REPLICA IDENTITY FULL, 2 get-key classes; memcached 127.0.0.1:%u\n",
           rows, (unsigned)port);
    /* ---- bulk: decode only ---- */
    double t0 = now_s();
    sql(admin, "UPDATE bench_rows SET name = name || 'x'");
    uint64_t lsn = insert_lsn(admin);
    double t_commit = now_s();
    run_until_acked(loop, dec, lsn);
    double t_dec = now_s() - t_commit;
    printf("update_s %.3f\n", t_commit - t0);
    printf("decode rows %ld s %.3f rows_per_s %.0f\n", rows, t_dec, rows / t_dec);
    flash_pg_changes_destroy(dec);

    /* ---- bulk: the full consumer, the same transaction from its slot ---- */
    double t1 = now_s();
    full = consumer(loop, cache, "bench_full", &BenchRow_model);
    run_until_acked(loop, full, lsn);
    double t_full = now_s() - t1;
    flash_pg_changes_stats s = flash_pg_changes_stats_get(full);
    if (s.changes != (uint64_t)rows || s.rows_invalidated != 2 * (uint64_t)rows) {
        fprintf(stderr, "changes_bench: %llu changes, %llu rows invalidated, wanted %ld and %ld\n",
                (unsigned long long)s.changes, (unsigned long long)s.rows_invalidated, rows, 2 * rows);
        return 1;
    }
    printf("bulk rows %ld s %.3f rows_per_s %.0f (connect + stream + invalidate + ack)\n", rows, t_full,
           rows / t_full);
    printf("ratio decode_per_s/bulk_per_s %.2f\n", (rows / t_dec) / (rows / t_full));

    /* ---- load: a writer for 3 s, lag per applied batch ---- */
    writer w;
    memset(&w, 0, sizeof w);
    w.table_rows = rows;
    pthread_t th;
    uint64_t batches0 = s.batches, changes0 = s.changes;
    size_t nlag = 0, caplag = 1 << 16;
    int64_t *lags = (int64_t *)malloc(caplag * sizeof *lags);
    pthread_create(&th, NULL, write_loop, &w);
    double tl = now_s(), tend = tl + 3;
    uint64_t seen = batches0;
    while (now_s() < tend) {
        flash_poll_run_once(loop, true);
        s = flash_pg_changes_stats_get(full);
        if (s.batches != seen && nlag < caplag) lags[nlag++] = s.lag_ms;
        seen = s.batches;
    }
    w.stop = 1;
    pthread_join(th, NULL);
    lsn = insert_lsn(admin);
    while (flash_pg_changes_stats_get(full).acked_lsn < lsn) {
        flash_poll_run_once(loop, true);
        s = flash_pg_changes_stats_get(full);
        if (s.batches != seen && nlag < caplag) lags[nlag++] = s.lag_ms;
        seen = s.batches;
    }
    double t_load = now_s() - tl;
    s = flash_pg_changes_stats_get(full);
    qsort(lags, nlag, sizeof *lags, cmp_i64);
    printf("load writer_rows %ld txns %ld consumer_changes %llu s %.3f rows_per_s %.0f\n", w.rows, w.txns,
           (unsigned long long)(s.changes - changes0), t_load, (double)(s.changes - changes0) / t_load);
    printf("lag batches %zu p50_ms %lld p99_ms %lld max_ms %lld\n", nlag,
           (long long)(nlag ? lags[nlag / 2] : -1), (long long)(nlag ? lags[(nlag * 99) / 100] : -1),
           (long long)(nlag ? lags[nlag - 1] : -1));
    free(lags);
    flash_pg_changes_destroy(full);
    flash_cache_destroy(cache);
    flash_poll_destroy(loop);
    sql(admin, "SELECT pg_drop_replication_slot('bench_full')");
    sql(admin, "SELECT pg_drop_replication_slot('bench_decode')");
    PQfinish(admin);
    return 0;
}
