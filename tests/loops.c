/* tests/loops.c — see loops.h. */
#define _GNU_SOURCE /* uv.h needs the POSIX types */
#include "loops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/loop/libev.h"
#include "backends/loop/libevent.h"
#include "backends/loop/libuv.h"
#include "backends/loop/poll.h"

/* poll: the built-in loop is its own adapter. */
static void *poll_create_with(const flash_allocator *alloc) { return flash_poll_create_with(alloc); }
static void *poll_create(void) { return flash_poll_create(); }
static void poll_destroy(void *native) { flash_poll_destroy((flash_poll *)native); }
static flash_loop poll_loop(void *native) { return flash_poll_loop((flash_poll *)native); }
static int poll_attach(flash_ctx *ctx, void *native) { return flash_poll_attach(ctx, (flash_poll *)native); }
static int poll_run(void *native) { return flash_poll_run((flash_poll *)native); }

/* libuv: the adapter first, so that the pair's address is the adapter's. */
typedef struct uv_pair {
    flash_libuv a;
    uv_loop_t loop;
} uv_pair;
static void *libuv_create_with(const flash_allocator *alloc) {
    uv_pair *p = (uv_pair *)calloc(1, sizeof *p);
    if (p && uv_loop_init(&p->loop) != 0) {
        free(p);
        return NULL;
    }
    if (p) cr_assert_eq(flash_libuv_init(&p->a, &p->loop, alloc), 0);
    return p;
}
static void *libuv_create(void) { return libuv_create_with(NULL); }
/* The close callbacks pool and free the handles: run them before closing. */
static void libuv_destroy(void *native) {
    uv_pair *p = (uv_pair *)native;
    int rc;
    if (!p) return;
    flash_libuv_close(&p->a);
    uv_run(&p->loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(&p->loop);
    free(p);
    cr_expect_eq(rc, 0, "libuv: uv_loop_close: %s", uv_strerror(rc));
}
static flash_loop libuv_flash_loop(void *native) { return flash_libuv_loop(&((uv_pair *)native)->a); }
static int libuv_attach(flash_ctx *ctx, void *native) { return flash_libuv_attach(ctx, &((uv_pair *)native)->a); }
static int libuv_run(void *native) { return uv_run(&((uv_pair *)native)->loop, UV_RUN_DEFAULT) < 0 ? -1 : 0; }

/* libev: ev_loop_destroy closes the adapter by itself (ev_cleanup). */
typedef struct ev_pair {
    flash_libev a;
    struct ev_loop *loop;
} ev_pair;
static void *libev_create_with(const flash_allocator *alloc) {
    ev_pair *p = (ev_pair *)calloc(1, sizeof *p);
    if (p && (p->loop = ev_loop_new(EVFLAG_AUTO)) == NULL) {
        free(p);
        return NULL;
    }
    if (p) cr_assert_eq(flash_libev_init(&p->a, p->loop, alloc), 0);
    return p;
}
static void *libev_create(void) { return libev_create_with(NULL); }
static void libev_destroy(void *native) {
    ev_pair *p = (ev_pair *)native;
    if (!p) return;
    ev_loop_destroy(p->loop);
    free(p);
}
static flash_loop libev_flash_loop(void *native) { return flash_libev_loop(&((ev_pair *)native)->a); }
static int libev_attach(flash_ctx *ctx, void *native) { return flash_libev_attach(ctx, &((ev_pair *)native)->a); }
static int libev_run(void *native) {
    ev_run(((ev_pair *)native)->loop, 0);
    return 0;
}

/* libevent: no destroy hook, so close first. */
typedef struct le_pair {
    flash_libevent a;
    struct event_base *base;
} le_pair;
static void *libevent_create_with(const flash_allocator *alloc) {
    /* Debian's libev.so exports libevent's names for its emulation layer. */
    char want[24];
    ev_uint32_t v = event_get_version_number();
    le_pair *p;
    snprintf(want, sizeof want, "%u.%u.", (unsigned)(v >> 24), (unsigned)(v >> 16 & 0xff));
    cr_assert_eq(strncmp(event_get_version(), want, strlen(want)), 0,
                 "libevent: event_* calls reach libev %s instead of libevent %s: link -levent before -lev",
                 event_get_version(), want);
    p = (le_pair *)calloc(1, sizeof *p);
    if (p && (p->base = event_base_new()) == NULL) {
        free(p);
        return NULL;
    }
    if (p) cr_assert_eq(flash_libevent_init(&p->a, p->base, alloc), 0);
    return p;
}
static void *libevent_create(void) { return libevent_create_with(NULL); }
static void libevent_destroy(void *native) {
    le_pair *p = (le_pair *)native;
    if (!p) return;
    flash_libevent_close(&p->a);
    event_base_free(p->base);
    free(p);
}
static flash_loop libevent_flash_loop(void *native) { return flash_libevent_loop(&((le_pair *)native)->a); }
static int libevent_attach(flash_ctx *ctx, void *native) {
    return flash_libevent_attach(ctx, &((le_pair *)native)->a);
}
static int libevent_run(void *native) { return event_base_dispatch(((le_pair *)native)->base) < 0 ? -1 : 0; }

const flash_test_loop flash_test_loops[] = {
    {"poll", poll_create, poll_create_with, poll_destroy, poll_loop, poll_attach, poll_run},
    {"libuv", libuv_create, libuv_create_with, libuv_destroy, libuv_flash_loop, libuv_attach, libuv_run},
    {"libev", libev_create, libev_create_with, libev_destroy, libev_flash_loop, libev_attach, libev_run},
    {"libevent", libevent_create, libevent_create_with, libevent_destroy, libevent_flash_loop, libevent_attach,
     libevent_run},
};
const size_t flash_test_loop_count = sizeof flash_test_loops / sizeof flash_test_loops[0];
const size_t flash_test_loop_indexes[] = {0, 1, 2, 3};
_Static_assert(sizeof flash_test_loop_indexes == sizeof flash_test_loops / sizeof flash_test_loops[0] * sizeof(size_t),
               "one index per loop");

const flash_test_loop *flash_test_loop_find(const char *name) {
    size_t i;
    for (i = 0; name && i < flash_test_loop_count; i++)
        if (strcmp(flash_test_loops[i].name, name) == 0) return &flash_test_loops[i];
    return NULL;
}
