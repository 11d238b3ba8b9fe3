#!/usr/bin/env bash
# tests/valgrind.sh — every example in build/examples/ under valgrind memcheck.
#
#   valgrind --leak-check=full --error-exitcode=1 --errors-for-leak-kinds=definite,indirect
#
# Fails on any memcheck error, any definite or indirect leak, or a non-zero
# exit of the example. How each example is run:
#   demo            as is (memory cache, no server)
#   memcached_app   against a memcached this script starts on a free port
#   http_server     started (SQLite in a temp dir, --seed) on a free port,
#                   sent a few requests, then stopped with SIGTERM
#   others          as is; with FLASH_MEMCACHED pointing at a memcached this
#                   script starts when the source mentions memcached; skipped
#                   (with the reason printed) when they listen for connections
#                   and have no driver here.
# Environment: VALGRIND_NO_BUILD=1 uses build/examples as it is (else
# `make examples` first).
set -uo pipefail

cd "$(dirname "$0")/.."
if [ "${VALGRIND_NO_BUILD:-0}" != 1 ]; then
    make -s examples >/dev/null || { echo "valgrind: make examples failed" >&2; exit 1; }
fi
command -v valgrind >/dev/null || { echo "valgrind: not installed (tests/deps.sh installs it)" >&2; exit 1; }

VG=(valgrind -q --leak-check=full --error-exitcode=1 --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --num-callers=30)
tmp=$(mktemp -d /tmp/flash-valgrind-XXXXXX)
chmod 777 "$tmp"
mc_pid=""
cleanup() {
    if [ -n "$mc_pid" ]; then kill "$mc_pid" 2>/dev/null; wait "$mc_pid" 2>/dev/null; fi
    [ "${VALGRIND_KEEP:-0}" = 1 ] || rm -rf "$tmp"
}
trap cleanup EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 40000))
        if ! port_open "$p"; then echo "$p"; return 0; fi
    done
    return 1
}

# Start one memcached for the whole run (as nobody when root: it refuses root).
mc_port=""
start_memcached() {
    [ -n "$mc_port" ] && return 0
    command -v memcached >/dev/null || return 1
    local user=()
    [ "$(id -u)" = 0 ] && user=(-u nobody)
    for _ in 1 2 3 4 5; do
        mc_port=$(free_port) || return 1
        memcached -l 127.0.0.1 -p "$mc_port" -U 0 -t 1 -m 64 "${user[@]}" >/dev/null 2>&1 &
        mc_pid=$!
        for _ in $(seq 1 200); do
            port_open "$mc_port" && return 0
            kill -0 "$mc_pid" 2>/dev/null || break
            sleep 0.02
        done
        kill "$mc_pid" 2>/dev/null
        wait "$mc_pid" 2>/dev/null
        mc_pid=""
    done
    mc_port=""
    return 1
}

http_get() { # port path -> the response, via curl or bash's /dev/tcp
    if command -v curl >/dev/null; then
        curl -s -m 30 -i "http://127.0.0.1:$1$2"
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\nHost: x\r\n\r\n' "$2" >&3 && timeout 30 cat <&3)
    fi
}

run_vg() { # name log args... : the example under valgrind, with a time limit
    local name=$1 log=$2
    shift 2
    timeout 600 "${VG[@]}" --log-file="$log" "$@"
}

drive_http_server() { # the example serves until SIGTERM: start, ask, stop
    local bin=$1 log=$2 port out rc pid
    port=$(free_port) || { echo "no free port"; return 1; }
    "${VG[@]}" --log-file="$log" "$bin" --port "$port" --sqlite "$tmp/http.db" --seed >"$tmp/http.out" 2>&1 &
    pid=$!
    for _ in $(seq 1 1500); do # valgrind starts slowly: up to 30 s
        port_open "$port" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.02
    done
    if ! port_open "$port"; then
        echo "did not start listening on $port"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        cat "$tmp/http.out"
        return 1
    fi
    rc=0
    for path in /events/event1 /events/event1 /events/event2 /events/no-such-event /stats /nowhere; do
        out=$(http_get "$port" "$path")
        case "$path" in
            /events/no-such-event|/nowhere) echo "$out" | head -1 | grep -q " 404" || { echo "GET $path: $(echo "$out" | head -1)"; rc=1; } ;;
            *) echo "$out" | head -1 | grep -q " 200" || { echo "GET $path: $(echo "$out" | head -1)"; rc=1; } ;;
        esac
    done
    kill -TERM "$pid"
    wait "$pid"
    local exit_rc=$?
    if [ $exit_rc -ne 0 ]; then
        echo "exited with $exit_rc after SIGTERM"
        rc=1
    fi
    return $rc
}

status=0
ran=0
skipped=0
for bin in build/examples/*; do
    [ -x "$bin" ] && [ -f "$bin" ] || continue
    name=$(basename "$bin")
    src="examples/$name.c"
    log="$tmp/$name.vg.log"
    reason=""
    rc=0
    case "$name" in
        demo)
            run_vg "$name" "$log" "$bin" >"$tmp/$name.out" 2>&1 || rc=$?
            ;;
        memcached_app)
            if start_memcached; then
                run_vg "$name" "$log" "$bin" "127.0.0.1:$mc_port" >"$tmp/$name.out" 2>&1 || rc=$?
            else
                reason="memcached could not be started"
            fi
            ;;
        http_server)
            drive_http_server "$bin" "$log" >"$tmp/$name.out" 2>&1 || rc=$?
            ;;
        *)
            if [ -f "$src" ] && grep -Eq 'uv_listen|listen\(|evconnlistener' "$src"; then
                reason="it serves connections and tests/valgrind.sh has no driver for it"
            elif [ -f "$src" ] && grep -q 'memcached' "$src"; then
                if start_memcached; then
                    FLASH_MEMCACHED="127.0.0.1:$mc_port" run_vg "$name" "$log" "$bin" >"$tmp/$name.out" 2>&1 || rc=$?
                else
                    reason="it uses memcached, which could not be started"
                fi
            else
                run_vg "$name" "$log" "$bin" >"$tmp/$name.out" 2>&1 || rc=$?
            fi
            ;;
    esac
    if [ -n "$reason" ]; then
        echo "valgrind $name: skipped: $reason"
        skipped=$((skipped + 1))
        continue
    fi
    ran=$((ran + 1))
    errors=$(grep -Ec '^==[0-9]+== .*(Invalid|uninitialised|Uninitialised|definitely lost|indirectly lost|Mismatched|overlap|Syscall param)' "$log" 2>/dev/null || true)
    if [ $rc -ne 0 ] || [ "${errors:-0}" -ne 0 ]; then
        status=1
        echo "valgrind $name: FAILED (exit $rc)"
        sed 's/^/    /' "$log" >&2
        tail -20 "$tmp/$name.out" | sed 's/^/    out: /' >&2
    else
        echo "valgrind $name: clean (no memcheck errors, no definite or indirect leaks)"
    fi
done
echo "valgrind: $ran examples run, $skipped skipped, $([ $status -eq 0 ] && echo 0 || echo some) failed"
exit $status
