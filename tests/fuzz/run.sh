#!/usr/bin/env bash
# tests/fuzz/run.sh SECONDS [HARNESS...] — build and run the libFuzzer harnesses.
#
# Each harness (default: all of tests/fuzz/fuzz_*.c) is built with
#   clang -g -O1 -fsanitize=fuzzer,address,undefined
# and run for SECONDS (-max_total_time), starting from its seed corpus
# tests/fuzz/corpus/<name>/ (read only: new inputs go to build/fuzz/corpus/<name>/).
# A crash (or leak, timeout, out-of-memory) is saved to
# tests/fuzz/crashes/<name>-<kind>-<sha1> (replay: build/fuzz/<name> FILE) and
# fuzzing goes on for the time left (up to 5 crashes), so one run can find several. Prints
#   fuzz <name>: <executions> execs, <crashes> crashes
# per harness and exits non-zero when any harness crashed or failed to build.
#
# Environment: CLANG (default clang), FUZZ_JOBS (harnesses run at once,
# default 1), FUZZ_KEEP_LOGS=1 keeps build/fuzz/<name>.log files' full text.
set -uo pipefail

cd "$(dirname "$0")/../.."
secs="${1:-}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: tests/fuzz/run.sh SECONDS [HARNESS...]" >&2
    exit 2
fi
shift
CLANG="${CLANG:-clang}"
FUZZ_JOBS="${FUZZ_JOBS:-1}"
out=build/fuzz
crashes_dir=tests/fuzz/crashes
mkdir -p "$out" "$crashes_dir"

if [ $# -gt 0 ]; then
    names=("$@")
else
    names=()
    for f in tests/fuzz/fuzz_*.c; do names+=("$(basename "$f" .c)"); done
fi

flags=(-std=c11 -Wall -Wextra -Wpedantic -Werror -g -O1 -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I.)

# Per-harness options: longer inputs for the parser (its 4 KiB line limit).
opts_for() {
    case "$1" in
        fuzz_memcached) echo "-max_len=9000 -dict=tests/fuzz/fuzz_memcached.dict" ;;
        fuzz_redis_cluster) echo "-max_len=4096 -dict=tests/fuzz/fuzz_redis_cluster.dict" ;;
        *) echo "-max_len=4096" ;;
    esac
}

build() {
    local name=$1
    "$CLANG" "${flags[@]}" "tests/fuzz/$name.c" -o "$out/$name" -lpthread -lm >"$out/$name.build.log" 2>&1
}

# Run one harness for $secs in total; writes "<execs> <crashes>" to $out/$name.result.
run_one() {
    local name=$1 start now left execs=0 crashes=0 rc n log="$out/$name.log"
    mkdir -p "$out/corpus/$name"
    : >"$log"
    start=$(date +%s)
    left=$secs
    while [ "$left" -gt 0 ]; do
        local before
        before=$(ls "$crashes_dir" | grep "^$name-" | sort)
        # shellcheck disable=SC2046
        ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:quarantine_size_mb=64 UBSAN_OPTIONS=print_stacktrace=1 \
            "$out/$name" -max_total_time="$left" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix="$crashes_dir/$name-" $(opts_for "$name") \
            "$out/corpus/$name" "tests/fuzz/corpus/$name" >"$out/$name.last.log" 2>&1
        rc=$?
        cat "$out/$name.last.log" >>"$log"
        n=$(grep -Eo '^Done [0-9]+ runs' "$out/$name.last.log" | grep -Eo '[0-9]+' | tail -1)
        [ -z "$n" ] && n=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$out/$name.last.log" | grep -Eo '[0-9]+$' | tail -1)
        execs=$((execs + ${n:-0}))
        if [ $rc -ne 0 ]; then
            crashes=$((crashes + 1))
            # artifacts: tests/fuzz/crashes/<name>-{crash,leak,timeout,oom}-<sha1>
            comm -13 <(echo "$before") <(ls "$crashes_dir" | grep "^$name-" | sort) | while read -r a; do
                [ -n "$a" ] && echo "fuzz $name: saved $crashes_dir/$a; reproduce: $out/$name $crashes_dir/$a" >&2
            done
            grep -E 'ERROR: |check failed|runtime error|SUMMARY' "$out/$name.last.log" | head -5 >&2
            if [ "$crashes" -ge 5 ]; then break; fi # the same bug tends to come back
        fi
        now=$(date +%s)
        left=$((secs - (now - start)))
        [ $rc -eq 0 ] && break
    done
    echo "$execs $crashes" >"$out/$name.result"
}

status=0
bpids=()
for name in "${names[@]}"; do
    if [ ! -f "tests/fuzz/$name.c" ]; then
        echo "fuzz $name: no such harness (tests/fuzz/$name.c)" >&2
        exit 1
    fi
    build "$name" &   # the builds in parallel: most of a short run's time
    bpids+=($!)
done
for i in "${!names[@]}"; do
    if ! wait "${bpids[$i]}"; then
        echo "fuzz ${names[$i]}: build failed" >&2
        cat "$out/${names[$i]}.build.log" >&2
        status=1
    fi
done
[ $status -ne 0 ] && exit $status

pids=()
for name in "${names[@]}"; do
    run_one "$name" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$FUZZ_JOBS" ]; then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do wait "$p"; done

for name in "${names[@]}"; do
    read -r execs crashes <"$out/$name.result"
    echo "fuzz $name: $execs execs, $crashes crashes"
    if [ "$execs" -eq 0 ] || [ "$crashes" -ne 0 ]; then status=1; fi
    [ "${FUZZ_KEEP_LOGS:-0}" = 1 ] || rm -f "$out/$name.last.log"
done
exit $status
