/* The loader suite of test_loader.c again, every context on the libev loop. */
#define LOADER_SUITE loader_libev
#define LOADER_LOOP "libev"
#include "test_loader.c"
