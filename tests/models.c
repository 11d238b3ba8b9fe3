/* tests/models.c — see models.h. */
#include "models.h"
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

test_fixture fx;
static flash_stats last;
static const char *const first_names[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara"};

static void capture_log(int level, const char *message, void *ud) {
    size_t used = strlen(fx.log);
    (void)level;
    (void)ud;
    snprintf(fx.log + used, sizeof fx.log - used, "%s\n", message);
}

void events_of_owner(flash_ctx *ctx, flash_fetch *f, void *user_data) {
    (void)ctx;
    (void)user_data;
    fx.fallback_calls++;
    fx.fallback_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        int64_t owner = flash_fetch_key(f, i)[0].u.i64;
        for (int e = 10; e >= 1; e--) { /* newest first: a custom order */
            const Event *ev = flash_table_find(fx.db, &Event_model, flash_v_i64(e));
            if (ev && ev->owner == owner) flash_fetch_set_row(f, i, ev);
        }
    }
    flash_fetch_done(f, 0, NULL);
}

void event_by_title(flash_ctx *ctx, flash_fetch *f, void *user_data) {
    (void)ctx;
    (void)user_data;
    fx.fallback_calls++;
    fx.fallback_keys += flash_fetch_count(f);
    for (size_t i = 0; i < flash_fetch_count(f); i++) {
        const char *title = flash_fetch_key(f, i)[0].u.s.ptr;
        if (strncmp(title, "none", 4) == 0) continue; /* cache "none" */
        Event e = {1000 + (int64_t)i, "made-up", title, 0};
        flash_fetch_set_row(f, i, &e);
    }
    flash_fetch_done(f, 0, NULL);
}

void fixture_setup(const flash_desc *desc) {
    flash_desc d;
    memset(&fx, 0, sizeof fx);
    fx.db = flash_table_create();
    fx.loop = flash_poll_create();
    cr_assert(fx.db && fx.loop);
    for (int i = 1; i <= 100; i++) {
        char username[32];
        snprintf(username, sizeof username, "user%d", i);
        User u = {i, first_names[i % 5], username, 20 + i % 50, i * 1.5, i % 2 == 0, {"\0\1\2", 3}};
        cr_assert_eq(flash_table_put(fx.db, &User_model, &u), 0);
    }
    for (int i = 1; i <= 10; i++) {
        char slug[32], title[32];
        snprintf(slug, sizeof slug, "event%d", i);
        snprintf(title, sizeof title, "Event %d", i);
        Event e = {i, slug, title, i % 3};
        cr_assert_eq(flash_table_put(fx.db, &Event_model, &e), 0);
    }
    int id = 1;
    for (int u = 1; u <= 5; u++)
        for (int e = 1; e <= 3; e++) {
            Participant p = {id++, u, e};
            cr_assert_eq(flash_table_put(fx.db, &Participant_model, &p), 0);
        }
    if (desc) d = *desc;
    else memset(&d, 0, sizeof d);
    if (!d.cache.vt) {
        fx.cache = flash_memory_create(NULL);
        d.cache = fx.cache;
    }
    if (!d.logger.func) d.logger.func = capture_log;
    fx.ctx = flash_ctx_create(&d);
    cr_assert(fx.ctx);
    cr_assert_eq(flash_poll_attach(fx.ctx, fx.loop), 0);
    cr_assert_eq(flash_ctx_set_source(fx.ctx, NULL, flash_table_source(fx.db)), 0);
    last = flash_ctx_stats(fx.ctx);
}

void fixture_teardown(void) {
    flash_ctx_destroy(fx.ctx);
    flash_poll_destroy(fx.loop);
    if (fx.cache.vt) flash_cache_destroy(fx.cache);
    flash_table_destroy(fx.db);
    memset(&fx, 0, sizeof fx);
}

flash_stats stats_delta(void) {
    /* flash_stats is all uint64_t counters: subtract field by field. */
    flash_stats now = flash_ctx_stats(fx.ctx), d;
    uint64_t n[sizeof now / sizeof(uint64_t)], l[sizeof now / sizeof(uint64_t)];
    memcpy(n, &now, sizeof now);
    memcpy(l, &last, sizeof last);
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++) n[i] -= l[i];
    memcpy(&d, n, sizeof d);
    last = now;
    return d;
}

const flash_class *other_tu_user_by_id(void) { return &User__get_by_id; }
const flash_model *other_tu_user_model(void) { return &User_model; }
