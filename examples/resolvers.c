/* examples/resolvers.c — a GraphQL-shaped tree resolved by tasks.

       { events(slugs) { title participants { user { username profile { bio } } } } }

   One task per node, as a GraphQL server runs one resolver per field: the
   root spawns a task per event; an event's task resolves the event, then
   spawns the task of its participant list; that one spawns a task per
   participant's user; a user's task spawns its profile's task. A node's task
   waits for its children with flash_gather over their task promises.

   Each task is straight-line code (User_get_by_id and friends suspend only
   that task), yet every task of one level asks in the same tick, so the
   whole level is one batch: the tree costs one cache round trip per level
   (its depth), not one per node. The program checks that, cold (the cache
   empty: every level misses, is read from the table in one fetch per class
   and written back) and warm (every level hits), and exits non-zero if the
   round trips are not the depth.

   Runs with no server: the memory cache and an in-memory table as the
   database, no loop adapter (the context's internal queue drives them).

       make && ./build/examples/resolvers
*/
#define FLASH_IMPLEMENTATION
#include "flash.h"
#include "backends/cache/memory.h"
#include "backends/source/table.h"

#include <stdio.h>
#include <string.h>

#define EVENT_FIELDS(F) F(I64, id) F(STR, slug) F(STR, title)
FLASH_MODEL(Event, EVENT_FIELDS)
FLASH_INSTANCE_CACHE(EventCacheOnSlug, Event, (slug))

#define PARTICIPANT_FIELDS(F) F(I64, id) F(I64, event) F(I64, user)
FLASH_MODEL(Participant, PARTICIPANT_FIELDS)
FLASH_FILTER_KEYS(Participant, (event))

#define USER_FIELDS(F) F(I64, id) F(STR, username)
FLASH_MODEL(User, USER_FIELDS)
FLASH_GET_KEYS(User, (id))

#define PROFILE_FIELDS(F) F(I64, id) F(I64, user) F(STR, bio)
FLASH_MODEL(Profile, PROFILE_FIELDS)
FLASH_GET_KEYS(Profile, (user))

enum { EVENTS = 10, PER_EVENT = 20, USERS = 100 };

/* A resolved node: its kind and value, its children. In the arena. */
typedef struct node {
    const char *kind;
    const void *value;
    size_t nchildren;
    struct node **children;
    int depth; /* levels of loads in this subtree, itself included */
} node;

static node *node_new(flash_ctx *ctx, const char *kind, const void *value) {
    node *n = (node *)flash_calloc(ctx, 1, sizeof *n);
    if (n) {
        n->kind = kind;
        n->value = value;
        n->depth = 1;
    }
    return n;
}

/* Spawn fn(args[i]) for each i, wait for all of them: the node's children. */
static int resolve_children(flash_ctx *ctx, node *n, flash_task_fn fn, size_t count, void *const *args) {
    flash_promise **ps = (flash_promise **)flash_alloc(ctx, (count ? count : 1) * sizeof *ps);
    void *v;
    int rc;
    if (!ps) return FLASH_ENOMEM;
    for (size_t i = 0; i < count; i++) ps[i] = flash_spawn(ctx, fn, args[i]);
    if ((rc = flash_await(ctx, flash_gather(ctx, count, ps), &v)) != 0) return rc;
    n->nchildren = count;
    n->children = (node **)v;
    for (size_t i = 0; i < count; i++)
        if (n->children[i]->depth + 1 > n->depth) n->depth = n->children[i]->depth + 1;
    return 0;
}

/* profile { bio } */
static int resolve_profile(flash_ctx *ctx, void *arg, void **result) {
    const User *u = (const User *)arg;
    Profile *p;
    int rc = Profile_get_by_user_or_none(ctx, u->id, &p);
    if (rc) return rc;
    return (*result = node_new(ctx, "profile", p)) ? 0 : FLASH_ENOMEM;
}

/* user { username profile } */
static int resolve_user(flash_ctx *ctx, void *arg, void **result) {
    const Participant *part = (const Participant *)arg;
    User *u;
    node *n;
    int rc = User_get_by_id(ctx, part->user, &u);
    if (rc) return rc;
    if (!(n = node_new(ctx, "user", u))) return FLASH_ENOMEM;
    void *args[1] = {u};
    if ((rc = resolve_children(ctx, n, resolve_profile, 1, args)) != 0) return rc;
    *result = n;
    return 0;
}

/* participants { user } */
static int resolve_participants(flash_ctx *ctx, void *arg, void **result) {
    const Event *e = (const Event *)arg;
    flash_list *parts;
    node *n;
    int rc = Participant_filter_by_event(ctx, e->id, &parts);
    if (rc) return rc;
    if (!(n = node_new(ctx, "participants", parts))) return FLASH_ENOMEM;
    if ((rc = resolve_children(ctx, n, resolve_user, parts->count, parts->items)) != 0) return rc;
    *result = n;
    return 0;
}

/* event(slug) { title participants } */
static int resolve_event(flash_ctx *ctx, void *arg, void **result) {
    Event *e;
    node *n;
    int rc = EventCacheOnSlug_resolve(ctx, (const char *)arg, &e);
    if (rc) return rc;
    if (!(n = node_new(ctx, "event", e))) return FLASH_ENOMEM;
    void *args[1] = {e};
    if ((rc = resolve_children(ctx, n, resolve_participants, 1, args)) != 0) return rc;
    *result = n;
    return 0;
}

/* The query's root: no load of its own, one child per event slug. */
static char slugs[EVENTS][16];
static int resolve_root(flash_ctx *ctx, void *arg, void **result) {
    void *args[EVENTS];
    node *n = node_new(ctx, "query", NULL);
    int rc;
    (void)arg;
    if (!n) return FLASH_ENOMEM;
    for (int i = 0; i < EVENTS; i++) args[i] = slugs[i];
    if ((rc = resolve_children(ctx, n, resolve_event, EVENTS, args)) != 0) return rc;
    n->depth--; /* the root loads nothing */
    *result = n;
    return 0;
}

/* flash_run's entry: the request is one task, the root's. */
static flash_promise *query(flash_ctx *ctx, void *arg) { return flash_spawn(ctx, resolve_root, arg); }

static size_t count_nodes(const node *n) {
    size_t c = 1;
    for (size_t i = 0; i < n->nchildren; i++) c += count_nodes(n->children[i]);
    return c;
}

static void print_sample(const node *root) {
    const node *ev = root->children[0], *parts = ev->children[0];
    printf("    %s \"%s\": %zu participants, e.g.", ((const Event *)ev->value)->slug, ((const Event *)ev->value)->title,
           parts->nchildren);
    for (size_t i = 0; i < parts->nchildren && i < 3; i++) {
        const node *u = parts->children[i], *p = u->children[0];
        printf(" %s (%s)%s", ((const User *)u->value)->username, p->value ? ((const Profile *)p->value)->bio : "no profile",
               i + 1 < parts->nchildren && i < 2 ? "," : "");
    }
    printf("\n");
}

/* One request: reset, run the query, report. 0 when round trips == depth. */
static int run(flash_ctx *ctx, const char *label) {
    flash_stats before = flash_ctx_stats(ctx), after;
    void *v;
    int rc = flash_run(ctx, query, NULL, &v);
    if (rc) {
        fprintf(stderr, "resolvers: %s run failed: %s\n", label, flash_strerror(rc));
        return 1;
    }
    const node *root = (const node *)v;
    after = flash_ctx_stats(ctx);
    unsigned long long trips = after.cache_round_trips - before.cache_round_trips;
    size_t nodes = count_nodes(root) - 1; /* the root resolves nothing */
    printf("%s: depth %d, %zu nodes (%llu tasks), %llu cache round trips, %llu cache hits, %llu source calls\n", label,
           root->depth, nodes, (unsigned long long)(after.tasks - before.tasks), trips,
           (unsigned long long)(after.cache_hits - before.cache_hits),
           (unsigned long long)(after.source_calls - before.source_calls));
    print_sample(root);
    if (trips != (unsigned long long)root->depth) {
        fprintf(stderr, "resolvers: %s: %llu round trips for a tree of depth %d\n", label, trips, root->depth);
        return 1;
    }
    return 0;
}

int main(void) {
    flash_table *db = flash_table_create();
    flash_cache cache = flash_memory_create(NULL);
    flash_desc desc;
    int failed = 0;

    /* The database: 10 events, 20 participants each among 100 users, every
       user with a profile. */
    for (int i = 1; i <= USERS; i++) {
        char name[32], bio[48];
        snprintf(name, sizeof name, "user%d", i);
        snprintf(bio, sizeof bio, "bio of user %d", i);
        User u = {i, name};
        Profile p = {i, i, bio};
        flash_table_put(db, &User_model, &u);
        flash_table_put(db, &Profile_model, &p);
    }
    for (int e = 1; e <= EVENTS; e++) {
        char title[32];
        snprintf(slugs[e - 1], sizeof slugs[e - 1], "event%d", e);
        snprintf(title, sizeof title, "Event %d", e);
        Event ev = {e, slugs[e - 1], title};
        flash_table_put(db, &Event_model, &ev);
        for (int j = 0; j < PER_EVENT; j++) {
            Participant p = {e * 1000 + j, e, (e * 7 + j * 13) % USERS + 1};
            flash_table_put(db, &Participant_model, &p);
        }
    }

    memset(&desc, 0, sizeof desc);
    desc.cache = cache;
    flash_ctx *ctx = flash_ctx_create(&desc);
    if (!ctx || flash_ctx_set_source(ctx, NULL, flash_table_source(db))) {
        fprintf(stderr, "resolvers: cannot create the context\n");
        return 1;
    }

    printf("{ events { title participants { user { username profile { bio } } } } }: one task per node\n");
    failed |= run(ctx, "cold");
    failed |= run(ctx, "warm");
    flash_stats s = flash_ctx_stats(ctx);
    printf("task stacks mapped: %llu (pooled across both requests), task switches: %llu\n",
           (unsigned long long)s.task_stacks, (unsigned long long)s.task_switches);
    printf(failed ? "FAIL: round trips != depth\n" : "round trips = depth, not node count: OK\n");

    flash_ctx_destroy(ctx);
    flash_cache_destroy(cache);
    flash_table_destroy(db);
    return failed;
}
