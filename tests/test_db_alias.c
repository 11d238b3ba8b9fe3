/* The database alias in keys (django-flash's `using`): `.db` on a model is
   part of every key of every class of the model, so the same table read
   from two databases never shares keys; no alias keeps today's keys. */
#define _GNU_SOURCE
#include "harness.h"

#include <string.h>
#include <unistd.h>

#include "backends/cache/memory.h"
#include "backends/source/table.h"
#include "flash.h"

#define ACCT_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(Account, ACCT_FIELDS, .db = "eu-west")
FLASH_GET_KEYS(Account, (id), (name))
FLASH_INSTANCE_CACHE(AccountOnName, Account, (name))
FLASH_INSTANCE_CACHE_OPT(AccountOnNameUS, Account, (name), .db = "us")

#define LEDGER_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(Ledger, LEDGER_FIELDS)
FLASH_GET_KEYS(Ledger, (id))

static char *key_of(flash_ctx *ctx, const flash_class *c, flash_value v) {
    char *key = NULL;
    size_t len = 0;
    cr_assert_eq(flash_cache_key(ctx, c, &v, 1, &key, &len, NULL), 0);
    return key;
}

FLASH_TEST(db_alias, keys_carry_the_alias_and_no_alias_keeps_todays_keys) {
    flash_ctx *ctx = flash_ctx_create(NULL);
    cr_assert_str_eq(key_of(ctx, &Account__get_by_id, flash_v_i64(7)), "flash:Account.id@eu-west:v1:7");
    cr_assert_str_eq(key_of(ctx, &AccountOnName_class, flash_v_str("a b")), "flash:AccountOnName@eu-west:v1:a%20b",
                     "named classes take the model's alias");
    cr_assert_str_eq(key_of(ctx, &AccountOnNameUS_class, flash_v_str("x")), "flash:AccountOnNameUS@us:v1:x",
                     "a class's own alias wins");
    cr_assert_str_eq(key_of(ctx, &Ledger__get_by_id, flash_v_i64(7)), "flash:Ledger.id:v1:7", "no alias: as before");
    flash_ctx_destroy(ctx);
}

/* Two databases hold different rows under the same ids; two contexts
   share one cache. With one model per database (same table, two aliases)
   neither sees the other's rows, and invalidation finds the aliased keys. */
#define EU_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL_OPT(CustomerEU, EU_FIELDS, .table = "customers", .db = "eu")
FLASH_GET_KEYS(CustomerEU, (id))
FLASH_MODEL_OPT(CustomerUS, EU_FIELDS, .table = "customers", .db = "us")
FLASH_GET_KEYS(CustomerUS, (id))

FLASH_TEST(db_alias, two_databases_one_cache_never_share_keys_and_invalidate_their_own) {
    flash_cache cache = flash_memory_create(NULL);
    flash_table *eu = flash_table_create(), *us = flash_table_create();
    CustomerEU e = {1, "Émile"};
    CustomerUS u = {1, "Uma"};
    flash_table_put(eu, &CustomerEU_model, &e);
    flash_table_put(us, &CustomerUS_model, &u);
    flash_desc d = {0};
    d.cache = cache;
    d.lag_window_ms = 1;
    flash_ctx *ce = flash_ctx_create(&d), *cu = flash_ctx_create(&d);
    flash_ctx_set_source(ce, NULL, flash_table_source(eu));
    flash_ctx_set_source(cu, NULL, flash_table_source(us));
    CustomerEU *re;
    CustomerUS *ru;
    cr_assert_eq(CustomerEU_get_by_id(ce, 1, &re), 0);
    cr_assert_eq(CustomerUS_get_by_id(cu, 1, &ru), 0);
    cr_assert_str_eq(re->name, "Émile");
    cr_assert_str_eq(ru->name, "Uma");
    flash_ctx_reset(ce);
    flash_ctx_reset(cu);
    flash_stats before = flash_ctx_stats(cu);
    cr_assert_eq(CustomerUS_get_by_id(cu, 1, &ru), 0);
    cr_assert_str_eq(ru->name, "Uma");
    cr_assert_eq(flash_ctx_stats(cu).cache_hits - before.cache_hits, 1, "served from its own key");
    /* A write in the US database invalidates the US key only. */
    CustomerUS u2 = {1, "Ursula"};
    flash_table_put(us, &CustomerUS_model, &u2);
    cr_assert_eq(flash_invalidate(cu, &CustomerUS_model, &u, &u2), 0);
    flash_ctx_reset(ce);
    flash_ctx_reset(cu);
    before = flash_ctx_stats(ce);
    cr_assert_eq(CustomerEU_get_by_id(ce, 1, &re), 0);
    cr_assert_str_eq(re->name, "Émile");
    cr_assert_eq(flash_ctx_stats(ce).cache_hits - before.cache_hits, 1, "the EU key was not touched");
    usleep(5 * 1000); /* past the lag window */
    cr_assert_eq(CustomerUS_get_by_id(cu, 1, &ru), 0);
    cr_assert_str_eq(ru->name, "Ursula");
    flash_ctx_destroy(ce);
    flash_ctx_destroy(cu);
    flash_table_destroy(eu);
    flash_table_destroy(us);
    flash_cache_destroy(cache);
}
