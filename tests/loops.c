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

/* poll: the built-in loop. */
static void *poll_create(void) { return flash_poll_create(); }
static void poll_destroy(void *native) { flash_poll_destroy((flash_poll *)native); }
static flash_loop poll_loop(void *native) { return flash_poll_loop((flash_poll *)native); }
static int poll_attach(flash_ctx *ctx, void *native) { return flash_poll_attach(ctx, (flash_poll *)native); }

/* libuv: handles are freed by their close callbacks, so run the loop until
   they have run before closing it. */
static void *libuv_create(void) {
    uv_loop_t *loop = (uv_loop_t *)malloc(sizeof *loop);
    if (loop && uv_loop_init(loop) != 0) {
        free(loop);
        loop = NULL;
    }
    return loop;
}
static void libuv_destroy(void *native) {
    uv_loop_t *loop = (uv_loop_t *)native;
    int rc;
    if (!loop) return;
    flash_libuv_release(loop);
    uv_run(loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(loop);
    free(loop);
    cr_expect_eq(rc, 0, "libuv: uv_loop_close: %s", uv_strerror(rc));
}
static flash_loop libuv_flash_loop(void *native) { return flash_libuv_loop((uv_loop_t *)native); }
static int libuv_attach(flash_ctx *ctx, void *native) { return flash_libuv_attach(ctx, (uv_loop_t *)native); }

/* libev: ev_loop_destroy frees the adapter's handles by itself (ev_cleanup). */
static void *libev_create(void) { return ev_loop_new(EVFLAG_AUTO); }
static void libev_destroy(void *native) {
    if (native) ev_loop_destroy((struct ev_loop *)native);
}
static flash_loop libev_flash_loop(void *native) { return flash_libev_loop((struct ev_loop *)native); }
static int libev_attach(flash_ctx *ctx, void *native) { return flash_libev_attach(ctx, (struct ev_loop *)native); }

/* libevent: no destroy hook, so release first. */
static void *libevent_create(void) {
    /* Debian's libev.so exports libevent's names for its emulation layer. */
    char want[24];
    ev_uint32_t v = event_get_version_number();
    snprintf(want, sizeof want, "%u.%u.", (unsigned)(v >> 24), (unsigned)(v >> 16 & 0xff));
    cr_assert_eq(strncmp(event_get_version(), want, strlen(want)), 0,
                 "libevent: event_* calls reach libev %s instead of libevent %s: link -levent before -lev",
                 event_get_version(), want);
    return event_base_new();
}
static void libevent_destroy(void *native) {
    if (!native) return;
    flash_libevent_release((struct event_base *)native);
    event_base_free((struct event_base *)native);
}
static flash_loop libevent_flash_loop(void *native) { return flash_libevent_loop((struct event_base *)native); }
static int libevent_attach(flash_ctx *ctx, void *native) {
    return flash_libevent_attach(ctx, (struct event_base *)native);
}

const flash_test_loop flash_test_loops[] = {
    {"poll", poll_create, poll_destroy, poll_loop, poll_attach},
    {"libuv", libuv_create, libuv_destroy, libuv_flash_loop, libuv_attach},
    {"libev", libev_create, libev_destroy, libev_flash_loop, libev_attach},
    {"libevent", libevent_create, libevent_destroy, libevent_flash_loop, libevent_attach},
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
