/* The one translation unit of the test binary that holds the implementation
   of flash.h and of every adapter header the tests use. */
#define FLASH_IMPLEMENTATION
/* SQLite change tracking's preupdate path (Debian's libsqlite3 has it). */
#define FLASH_SQLITE_PREUPDATE 1
#include "flash.h"
#include "backends/loop/poll.h"
#include "backends/cache/memory.h"
#include "backends/source/table.h"
#include "backends/cache/memcached.h"
#include "backends/cache/redis.h"
#include "backends/cache/redis_cluster.h"
#include "backends/loop/libev.h"
#include "backends/loop/libevent.h"
#include "backends/loop/libuv.h"
#include "backends/source/sqlite.h"
#include "backends/source/postgres.h"
#include "backends/changes/postgres.h"
