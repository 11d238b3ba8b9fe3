#!/usr/bin/env bash
# tests/tsan.sh — the threads test (tests/test_threads.c) under ThreadSanitizer.
#
# Four threads, each with its own contexts and poll loop and its own memcached
# backend instance against one real memcached, plus one memory backend shared
# by all. Built with -fsanitize=thread (TSan cannot be combined with ASan) and
# -DFLASH_THREADS_MAIN: a plain main instead of Criterion's runner, which
# cannot start under TSan (Snaipe/Criterion#274). Fails on any TSan report or
# failed check. Environment: CC (default cc), TSAN_RUNS (default 2).
set -euo pipefail

cd "$(dirname "$0")/.."
CC="${CC:-cc}"
runs="${TSAN_RUNS:-2}"
out=build/tsan
mkdir -p "$out"

"$CC" -std=c11 -Wall -Wextra -Wpedantic -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=thread \
    -DFLASH_THREADS_MAIN -I. -Itests \
    tests/test_threads.c tests/harness.c tests/models.c tests/loops.c tests/cluster.c tests/impl.c \
    -o "$out/flash_threads" -lcriterion -luv -levent -lev -lsqlite3 -lpq -lpthread -lm

status=0
for i in $(seq 1 "$runs"); do
    log="$out/threads.$i.log"
    if ! TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1" "$out/flash_threads" >"$log" 2>&1; then
        status=1
    fi
    if grep -q "ThreadSanitizer" "$log"; then
        status=1
    fi
    if [ $status -ne 0 ]; then
        cat "$log" >&2
        echo "tsan: run $i FAILED" >&2
        exit 1
    fi
    grep '^threads:' "$log" | sed "s/^threads:/tsan: run $i:/"
done
echo "tsan: $runs runs, 0 ThreadSanitizer reports"
