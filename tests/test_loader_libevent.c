/* The loader suite of test_loader.c again, every context on the libevent loop. */
#define LOADER_SUITE loader_libevent
#define LOADER_LOOP "libevent"
#include "test_loader.c"
