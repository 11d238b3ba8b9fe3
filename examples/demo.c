/* examples/demo.c — the seed page, example by example, in C.

   Runs with no server: the in-process memory cache, the built-in poll loop
   and an in-memory table as the database. Each step prints what it got and
   how many cache round trips and source (database) calls it cost.

       make demo
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/loop/poll.h"
#include "backends/source/table.h"

#include <stdio.h>
#include <string.h>

/* class User(Model): CacheMeta get_key_fields_list = [('id',)],
                                filter_key_fields_list = [('first_name',)] */
#define USER_FIELDS(F) F(I64, id) F(STR, first_name) F(STR, username)
FLASH_MODEL(User, USER_FIELDS)
FLASH_GET_KEYS(User, (id))
FLASH_FILTER_KEYS(User, (first_name))

/* class EventCacheOnSlug(InstanceCache): model = Event, key_fields = ('slug',) */
#define EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL(Event, EVENT_FIELDS)
FLASH_INSTANCE_CACHE(EventCacheOnSlug, Event, (slug))

static flash_ctx *ctx;
static flash_stats before;

static void step(const char *title) {
    before = flash_ctx_stats(ctx);
    printf("\n%s\n", title);
}

static void cost(void) {
    flash_stats now = flash_ctx_stats(ctx);
    printf("    -> cache round trips: %llu, cache hits: %llu, source calls: %llu\n",
           (unsigned long long)(now.cache_round_trips - before.cache_round_trips),
           (unsigned long long)(now.cache_hits - before.cache_hits),
           (unsigned long long)(now.source_calls - before.source_calls));
}

static void print_user(const char *label, const User *u) {
    if (u) printf("    %s = User(id=%lld, first_name=%s, username=%s)\n", label, (long long)u->id, u->first_name, u->username);
    else printf("    %s = None\n", label);
}

/* The Django view of the seed, as a coroutine: get_data resolves the event
   and serialises it; run_in_async_loop becomes flash_run. */
static flash_promise *serialize_event(flash_ctx *c, void *value, void *arg) {
    const Event *e = (const Event *)value;
    (void)arg;
    return flash_fulfilled(c, flash_sprintf(c, "{\"event\": {\"slug\": \"%s\", \"title\": \"%s\"}}", e->slug, e->title));
}
static flash_promise *get_data(flash_ctx *c, const char *event_slug) {
    return flash_then(c, EventCacheOnSlug_resolve_async(c, event_slug), serialize_event, NULL);
}
static flash_promise *my_view(flash_ctx *c, void *event_slug) { return get_data(c, (const char *)event_slug); }

int main(void) {
    static const char *const first[] = {"Ada", "Alan", "Grace", "Edsger", "Barbara"};
    flash_table *db = flash_table_create();
    flash_poll *loop = flash_poll_create();
    flash_cache cache = flash_memory_create(NULL);
    flash_desc desc;
    void *v;
    int rc;

    /* The "database": 100 users and two events. */
    for (int i = 1; i <= 100; i++) {
        char username[32];
        snprintf(username, sizeof username, "user%d", i);
        User u = {i, first[i % 5], username};
        flash_table_put(db, &User_model, &u);
    }
    Event pycon = {1, "pycon", "PyCon"}, djangocon = {2, "djangocon", "DjangoCon"};
    flash_table_put(db, &Event_model, &pycon);
    flash_table_put(db, &Event_model, &djangocon);

    memset(&desc, 0, sizeof desc);
    desc.cache = cache; /* memory backend: the embedded default */
    ctx = flash_ctx_create(&desc);
    flash_poll_attach(ctx, loop);
    flash_ctx_set_source(ctx, NULL, flash_table_source(db));

    printf("flash %d.%d.%d demo: memory cache, poll loop, in-memory table as the database\n",
           FLASH_VERSION_MAJOR, FLASH_VERSION_MINOR, FLASH_VERSION_PATCH);

    step("user = await User.cache.get_async(id=user_id)");
    User *user = NULL;
    rc = flash_wait(ctx, User_get_by_id_async(ctx, 42), &v);
    user = (User *)v;
    print_user("user", user);
    cost();

    step("users = await User.cache.filter_async(first_name=first_name)");
    rc = flash_wait(ctx, User_filter_by_first_name_async(ctx, "Ada"), &v);
    flash_list *users = (flash_list *)v;
    printf("    %zu users named Ada, e.g. %s\n", users->count, ((User *)users->items[0])->username);
    cost();

    step("event = await EventCacheOnSlug(event_slug).resolve_async()");
    rc = flash_wait(ctx, EventCacheOnSlug_resolve_async(ctx, "pycon"), &v);
    printf("    event = Event(slug=%s, title=%s)\n", ((Event *)v)->slug, ((Event *)v)->title);
    cost();

    step("Without asyncio: user = User.cache.get(id=user_id)  (sync form, same request memo)");
    rc = User_get_by_id(ctx, 42, &user);
    print_user("user", user);
    cost();

    step("Model.cache.get_async_or_none() and get_async_or_404()");
    rc = flash_wait(ctx, User_get_by_id_async_or_none(ctx, 4242), &v);
    printf("    get_async_or_none(id=4242): rc=%d, value=%s\n", rc, v ? "a user" : "None");
    rc = flash_wait(ctx, User_get_by_id_async_or_404(ctx, 4242), &v);
    printf("    get_async_or_404(id=4242):  rc=%d (%s)\n", rc, flash_strerror(rc));
    rc = User_get_by_id(ctx, 4242, &user);
    printf("    get(id=4242):               rc=%d (%s)\n", rc, flash_strerror(rc));
    cost();

    flash_ctx_reset(ctx); /* a new request: the request memo starts empty */
    step("user1 = await get_async(id=42); user2 = await get_async(id=42)  (new request)");
    User *user1 = NULL, *user2 = NULL;
    rc = flash_wait(ctx, User_get_by_id_async(ctx, 42), &v);
    user1 = (User *)v;
    flash_stats mid = flash_ctx_stats(ctx);
    rc = flash_wait(ctx, User_get_by_id_async(ctx, 42), &v);
    user2 = (User *)v;
    flash_stats end = flash_ctx_stats(ctx);
    printf("    user1 is user2: %s; the second query cost %llu round trips (memo)\n", user1 == user2 ? "yes" : "no",
           (unsigned long long)(end.cache_round_trips - mid.cache_round_trips));
    cost();

    flash_ctx_reset(ctx);
    step("users = await gather(*[User.cache.get_async(id=user_id) for user_id in user_ids])  (100 ids)");
    flash_promise *ps[100];
    for (int i = 0; i < 100; i++) ps[i] = User_get_by_id_async(ctx, i + 1);
    rc = flash_wait(ctx, flash_gather(ctx, 100, ps), &v);
    User **all = (User **)v;
    printf("    %d users, first %s, last %s\n", 100, all[0]->username, all[99]->username);
    cost();

    flash_ctx_reset(ctx);
    step("user, event = await gather(User.cache.get_async(id=user_id), EventCacheOnSlug(slug=event_slug).resolve_async())");
    flash_promise *two[2] = {User_get_by_id_async(ctx, 7), EventCacheOnSlug_resolve_async(ctx, "djangocon")};
    rc = flash_wait(ctx, flash_gather(ctx, 2, two), &v);
    void **pair = (void **)v;
    print_user("user", (User *)pair[0]);
    printf("    event = Event(slug=%s)\n", ((Event *)pair[1])->slug);
    cost();

    flash_ctx_reset(ctx);
    step("user_result, event_result = await gather(..., return_exceptions=True)  (user 999 does not exist)");
    flash_promise *mixed[2] = {User_get_by_id_async(ctx, 999), EventCacheOnSlug_resolve_async(ctx, "pycon")};
    rc = flash_wait(ctx, flash_gather_settled(ctx, 2, mixed), &v);
    flash_settled *res = (flash_settled *)v;
    for (int i = 0; i < 2; i++) {
        if (res[i].state == FLASH_REJECTED) printf("    result %d: exception %d: %s\n", i, res[i].error, res[i].message);
        else printf("    result %d: value\n", i);
    }
    printf("    (plain gather of the same rejects with the first error: ");
    rc = flash_wait(ctx, flash_gather(ctx, 2, mixed), &v);
    printf("%s)\n", flash_strerror(rc));
    cost();

    step("@run_in_async_loop def my_view(request, event_slug): data = await get_data(event_slug)");
    rc = flash_run(ctx, my_view, (void *)"pycon", &v); /* reset, run, drive the loop to completion */
    printf("    my_view -> %s\n", rc ? flash_strerror(rc) : (const char *)v);
    cost();

    flash_stats total = flash_ctx_stats(ctx);
    printf("\ntotals: %llu loads, %llu memo hits, %llu cache round trips, %llu cache hits, %llu misses, "
           "%llu source calls, %llu fills\n",
           (unsigned long long)total.loads, (unsigned long long)total.memo_hits,
           (unsigned long long)total.cache_round_trips, (unsigned long long)total.cache_hits,
           (unsigned long long)total.cache_misses, (unsigned long long)total.source_calls,
           (unsigned long long)total.fills);

    flash_ctx_destroy(ctx);
    flash_poll_destroy(loop);
    flash_cache_destroy(cache);
    flash_table_destroy(db);
    return 0;
}
