/* The loader suite of test_loader.c again, every context on the libuv loop. */
#define LOADER_SUITE loader_libuv
#define LOADER_LOOP "libuv"
#include "test_loader.c"
