#!/usr/bin/env bash
# Installs what the test suite needs when it is missing (Debian; as root).
# Safe to run repeatedly: does nothing when everything is present.
set -euo pipefail

need=()
have_header() { [ -e "/usr/include/$1" ]; }
have_cmd() { command -v "$1" >/dev/null 2>&1; }

have_header criterion/criterion.h || need+=(libcriterion-dev)
have_cmd memcached                || need+=(memcached)
have_cmd redis-server             || need+=(redis-server)
have_header libmemcached/memcached.h || need+=(libmemcached-dev)  # ketama cross-check and bench only
have_header uv.h                  || need+=(libuv1-dev)
have_header ev.h                  || need+=(libev-dev)
have_header event2/event.h        || need+=(libevent-dev)
have_header sqlite3.h             || need+=(libsqlite3-dev)
have_header postgresql/libpq-fe.h || need+=(libpq-dev)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
have_cmd valgrind                 || need+=(valgrind)
have_cmd clang                    || need+=(clang)
# libFuzzer's runtime: only recommended by clang, and we install without those.
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1 || need+=(libclang-rt-dev)
have_cmd g++                      || need+=(g++)
have_cmd curl                     || need+=(curl)
# The AArch64 task switch, built and run under qemu by `make headers`.
have_cmd aarch64-linux-gnu-gcc    || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
have_cmd qemu-aarch64             || need+=(qemu-user)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages: ${need[*]}" >&2
    echo "deps: run as root, or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install; the tests start their own on free ports.
for svc in memcached redis-server postgresql; do
    if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
