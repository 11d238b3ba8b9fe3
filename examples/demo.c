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

/* ---- the seed's coroutines as tasks ----------------------------------------

   A task is `async def`: inside one, flash_await and every sync form
   (User_get_by_id, ..._or_none, ..._or_404, EventCacheOnSlug_resolve)
   suspend only that task, and the loads of all tasks of a tick join one
   batch. Each step below is a task, spawned and waited for by run_task. */

static int run_task(flash_task_fn fn, void *arg) {
    int rc = flash_wait(ctx, flash_spawn(ctx, fn, arg), NULL);
    if (rc) printf("    task failed: %s\n", flash_strerror(rc));
    return rc;
}

/* user = await User.cache.get_async(id=user_id) */
static int ex_get_async(flash_ctx *c, void *arg, void **result) {
    void *v;
    int rc = flash_await(c, User_get_by_id_async(c, 42), &v);
    (void)arg;
    (void)result;
    if (rc) return rc;
    print_user("user", (User *)v);
    return 0;
}

/* users = await User.cache.filter_async(first_name=first_name); in a task
   the sync form is the await */
static int ex_filter_async(flash_ctx *c, void *arg, void **result) {
    flash_list *users;
    int rc = User_filter_by_first_name(c, "Ada", &users);
    (void)arg;
    (void)result;
    if (rc) return rc;
    printf("    %zu users named Ada, e.g. %s\n", users->count, ((User *)users->items[0])->username);
    return 0;
}

/* event = await EventCacheOnSlug(event_slug).resolve_async() */
static int ex_resolve_async(flash_ctx *c, void *arg, void **result) {
    Event *event;
    int rc = EventCacheOnSlug_resolve(c, "pycon", &event);
    (void)arg;
    (void)result;
    if (rc) return rc;
    printf("    event = Event(slug=%s, title=%s)\n", event->slug, event->title);
    return 0;
}

/* get_async_or_none() / get_async_or_404() */
static int ex_or_none_404(flash_ctx *c, void *arg, void **result) {
    User *user = NULL;
    int rc;
    (void)arg;
    (void)result;
    rc = User_get_by_id_or_none(c, 4242, &user);
    printf("    get_async_or_none(id=4242): rc=%d, value=%s\n", rc, user ? "a user" : "None");
    rc = User_get_by_id_or_404(c, 4242, &user);
    printf("    get_async_or_404(id=4242):  rc=%d (%s)\n", rc, flash_strerror(rc));
    rc = User_get_by_id(c, 4242, &user);
    printf("    get_async(id=4242):         rc=%d (%s)\n", rc, flash_strerror(rc));
    return 0;
}

/* user1 = await get_async(id=42); user2 = await get_async(id=42) */
static int ex_memo(flash_ctx *c, void *arg, void **result) {
    User *user1, *user2;
    int rc = User_get_by_id(c, 42, &user1);
    (void)arg;
    (void)result;
    if (rc) return rc;
    flash_stats mid = flash_ctx_stats(c);
    if ((rc = User_get_by_id(c, 42, &user2)) != 0) return rc;
    flash_stats end = flash_ctx_stats(c);
    printf("    user1 is user2: %s; the second query cost %llu round trips (memo)\n", user1 == user2 ? "yes" : "no",
           (unsigned long long)(end.cache_round_trips - mid.cache_round_trips));
    return 0;
}

/* users = await gather(*[User.cache.get_async(id=user_id) for user_id in user_ids]) */
static int ex_gather_list(flash_ctx *c, void *arg, void **result) {
    flash_promise *ps[100];
    void *v;
    (void)arg;
    (void)result;
    for (int i = 0; i < 100; i++) ps[i] = User_get_by_id_async(c, i + 1);
    int rc = flash_await(c, flash_gather(c, 100, ps), &v);
    if (rc) return rc;
    User **users = (User **)v;
    printf("    %d users, first %s, last %s\n", 100, users[0]->username, users[99]->username);
    return 0;
}

/* user, event = await gather(User.cache.get_async(id=user_id),
                              EventCacheOnSlug(slug=event_slug).resolve_async()) */
static int ex_gather_two(flash_ctx *c, void *arg, void **result) {
    flash_promise *ps[2] = {User_get_by_id_async(c, 7), EventCacheOnSlug_resolve_async(c, "djangocon")};
    void *v;
    (void)arg;
    (void)result;
    int rc = flash_await(c, flash_gather(c, 2, ps), &v);
    if (rc) return rc;
    print_user("user", ((User **)v)[0]);
    printf("    event = Event(slug=%s)\n", ((Event **)v)[1]->slug);
    return 0;
}

/* user_result, event_result = await gather(..., return_exceptions=True) */
static int ex_settled(flash_ctx *c, void *arg, void **result) {
    flash_promise *ps[2] = {User_get_by_id_async(c, 999), EventCacheOnSlug_resolve_async(c, "pycon")};
    void *v;
    (void)arg;
    (void)result;
    int rc = flash_await(c, flash_gather_settled(c, 2, ps), &v);
    if (rc) return rc;
    flash_settled *res = (flash_settled *)v;
    for (int i = 0; i < 2; i++) {
        if (res[i].state == FLASH_REJECTED) printf("    result %d: exception %d: %s\n", i, res[i].error, res[i].message);
        else printf("    result %d: value\n", i);
    }
    rc = flash_await(c, flash_gather(c, 2, ps), &v);
    printf("    (plain gather of the same rejects with the first error: %s)\n", flash_strerror(rc));
    return 0;
}

/* Ten tasks, each awaiting one user: their loads join one batch. */
static int one_user(flash_ctx *c, void *arg, void **result) {
    User *u = NULL;
    int rc = User_get_by_id(c, (int64_t)*(const int *)arg, &u);
    *result = u;
    return rc;
}
static int ex_many_tasks(flash_ctx *c, void *arg, void **result) {
    static const int ids[10] = {11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
    flash_promise *ps[10];
    void *v;
    (void)arg;
    (void)result;
    for (int i = 0; i < 10; i++) ps[i] = flash_spawn(c, one_user, (void *)&ids[i]);
    int rc = flash_await(c, flash_gather(c, 10, ps), &v);
    if (rc) return rc;
    printf("    10 tasks, 10 users (%s ... %s)\n", ((User **)v)[0]->username, ((User **)v)[9]->username);
    return 0;
}

/* The Django view of the seed. get_data gathers the user and the event:
       user, event = await gather(User.cache.get_async(id=user_id),
                                  EventCacheOnSlug(slug).resolve_async())
   one network call for both. run_in_async_loop is flash_run + flash_spawn. */
typedef struct view_args {
    int64_t user_id;
    const char *slug;
} view_args;

static int get_data(flash_ctx *c, void *arg, void **result) {
    const view_args *a = (const view_args *)arg;
    flash_promise *both[2] = {User_get_by_id_async(c, a->user_id), EventCacheOnSlug_resolve_async(c, a->slug)};
    void *v;
    int rc = flash_await(c, flash_gather(c, 2, both), &v); /* one round trip for both */
    if (rc) return rc;
    const User *user = ((User **)v)[0];
    const Event *event = ((Event **)v)[1];
    *result = flash_sprintf(c, "{\"user\": \"%s\", \"event\": {\"slug\": \"%s\", \"title\": \"%s\"}}", user->username,
                            event->slug, event->title);
    return *result ? 0 : FLASH_ENOMEM;
}
static flash_promise *my_view(flash_ctx *c, void *arg) { return flash_spawn(c, get_data, arg); }

/* The lower layer: the same view with callbacks (what tasks are built on). */
static flash_promise *serialize_event(flash_ctx *c, void *value, void *arg) {
    const Event *e = (const Event *)value;
    (void)arg;
    return flash_fulfilled(c, flash_sprintf(c, "{\"event\": {\"slug\": \"%s\", \"title\": \"%s\"}}", e->slug, e->title));
}
static flash_promise *my_view_callbacks(flash_ctx *c, void *event_slug) {
    return flash_then(c, EventCacheOnSlug_resolve_async(c, (const char *)event_slug), serialize_event, NULL);
}

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

    step("user = await User.cache.get_async(id=user_id)  (a task: flash_await)");
    run_task(ex_get_async, NULL);
    cost();

    step("users = await User.cache.filter_async(first_name=first_name)");
    run_task(ex_filter_async, NULL);
    cost();

    step("event = await EventCacheOnSlug(event_slug).resolve_async()");
    run_task(ex_resolve_async, NULL);
    cost();

    step("Without asyncio: user = User.cache.get(id=user_id)  (sync form outside a task: runs the loop)");
    User *user = NULL;
    rc = User_get_by_id(ctx, 42, &user);
    print_user("user", user);
    cost();

    step("Model.cache.get_async_or_none() and get_async_or_404()");
    run_task(ex_or_none_404, NULL);
    cost();

    flash_ctx_reset(ctx); /* a new request: the request memo starts empty */
    step("user1 = await get_async(id=42); user2 = await get_async(id=42)  (new request)");
    run_task(ex_memo, NULL);
    cost();

    flash_ctx_reset(ctx);
    step("users = await gather(*[User.cache.get_async(id=user_id) for user_id in user_ids])  (100 ids)");
    run_task(ex_gather_list, NULL);
    cost();

    flash_ctx_reset(ctx);
    step("10 coroutines, each: user = await User.cache.get_async(id=...)  (10 tasks, one batch)");
    run_task(ex_many_tasks, NULL);
    cost();

    flash_ctx_reset(ctx);
    step("user, event = await gather(User.cache.get_async(id=user_id), EventCacheOnSlug(slug=event_slug).resolve_async())");
    run_task(ex_gather_two, NULL);
    cost();

    flash_ctx_reset(ctx);
    step("user_result, event_result = await gather(..., return_exceptions=True)  (user 999 does not exist)");
    run_task(ex_settled, NULL);
    cost();

    step("@run_in_async_loop def my_view(request, event_slug): data = await get_data(user_id, event_slug)");
    view_args args = {7, "djangocon"};
    rc = flash_run(ctx, my_view, &args, &v); /* reset, spawn get_data, drive the loop to completion */
    printf("    my_view -> %s\n", rc ? flash_strerror(rc) : (const char *)v);
    cost();

    step("the lower layer: the same view with flash_then callbacks instead of a task");
    rc = flash_run(ctx, my_view_callbacks, (void *)"pycon", &v);
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
