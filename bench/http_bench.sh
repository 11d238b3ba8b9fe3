#!/usr/bin/env bash
# bench/http_bench.sh — examples/http_server under wrk, on memcached + SQLite.
#
# Starts a memcached (free loopback port) and the server on a seeded SQLite
# file in a temp dir, then runs wrk twice over GET /events/event<1..100>
# (random slugs): first from a cold cache, then warm. For each run prints
# wrk's requests/s and, from /stats deltas, cache round trips, cache hits and
# source (database) calls per request, wrk's mean latency, and (when perf can count the
# raw_syscalls tracepoint) the server's system calls per request, in all and
# those to the cache (sendto/recvfrom: memcached; the HTTP side uses
# write/writev/read). Everything is killed and removed on exit.
#
#   bench/http_bench.sh            (builds build/examples/http_server if missing)
#
# Environment: HTTP_BENCH_SECONDS (default 5), HTTP_BENCH_CONNECTIONS (32),
# HTTP_BENCH_THREADS (2), HTTP_SERVER (default build/examples/http_server).
#
# Expected round trips per request: 2 (event + participant list, then the
# users), 1 for the tenth of the events with no participants: 1.9.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
SECONDS_=${HTTP_BENCH_SECONDS:-5}
CONNS=${HTTP_BENCH_CONNECTIONS:-32}
THREADS=${HTTP_BENCH_THREADS:-2}
bin=${HTTP_SERVER:-$root/build/examples/http_server}

fail() {
    echo "http_bench: FAILED: $*" >&2
    exit 1
}
command -v wrk >/dev/null || fail "wrk is not installed"
command -v memcached >/dev/null || fail "memcached is not installed"
command -v curl >/dev/null || fail "curl is not installed"
if [ ! -x "$bin" ]; then
    make -s -C "$root" "build/examples/http_server" >&2 || fail "could not build $bin"
fi

tmp=$(mktemp -d /tmp/flash-http-bench-XXXXXX)
chmod 755 "$tmp"
mc_pid=""
srv_pid=""
cleanup() {
    [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null || true
    [ -n "$mc_pid" ] && kill "$mc_pid" 2>/dev/null && wait "$mc_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        if port_free "$p"; then
            echo "$p"
            return
        fi
    done
    fail "no free port"
}

mc_port=$(free_port)
user_opt=()
[ "$(id -u)" = 0 ] && user_opt=(-u nobody)
memcached -l 127.0.0.1 -p "$mc_port" -U 0 -t 1 -m 64 "${user_opt[@]}" &
mc_pid=$!
# memcached must be listening before the server starts (a port taken by then
# would leave the cache down for the whole run: every request to the source).
for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$mc_port") 2>/dev/null && break
    kill -0 "$mc_pid" 2>/dev/null || fail "memcached exited (port $mc_port taken?)"
    sleep 0.01
done
(exec 3<>"/dev/tcp/127.0.0.1/$mc_port") 2>/dev/null || fail "memcached does not listen on $mc_port"

http_port=$(free_port)
"$bin" --sqlite "$tmp/bench.db" --seed --memcached "127.0.0.1:$mc_port" --port "$http_port" >"$tmp/server.log" 2>&1 &
srv_pid=$!
for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$http_port/stats" && break
    kill -0 "$srv_pid" 2>/dev/null || fail "http_server exited: $(cat "$tmp/server.log")"
    sleep 0.01
done
curl -s -o /dev/null "http://127.0.0.1:$http_port/stats" || fail "http_server does not answer"

cat >"$tmp/slugs.lua" <<'EOF'
request = function()
    return wrk.format("GET", "/events/event" .. math.random(1, 100))
end
EOF

stat() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" <<<"$2"; }

printf 'flash http_server: memcached + SQLite, wrk -t%s -c%s -d%ss, GET /events/event<1..100>\n\n' \
    "$THREADS" "$CONNS" "$SECONDS_"
perf_ok=0
ev=raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom
command -v perf >/dev/null && perf stat -e "$ev" true >/dev/null 2>&1 && perf_ok=1
printf '%-8s %12s %10s %16s %14s %16s %8s %14s %16s\n' run requests/s latency "round trips/req" "cache hits/req" \
    "source calls/req" non-200 "syscalls/req" "send+recv/req"
for run in cold warm; do
    before=$(curl -s "http://127.0.0.1:$http_port/stats")
    perf_pid=""
    if [ "$perf_ok" = 1 ]; then
        perf stat -x, -e "$ev" -p "$srv_pid" -o "$tmp/perf.$run" &
        perf_pid=$!
        sleep 0.2
    fi
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_}s" -s "$tmp/slugs.lua" "http://127.0.0.1:$http_port/")
    after=$(curl -s "http://127.0.0.1:$http_port/stats")
    sys=0 sr=0
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        sys=$(awk -F, '$3 == "raw_syscalls:sys_enter" { print $1 }' "$tmp/perf.$run")
        sr=$(awk -F, '$3 ~ /sys_enter_(sendto|recvfrom)$/ { n += $1 } END { print n + 0 }' "$tmp/perf.$run")
    fi
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
    lat=$(awk '$1 == "Latency" { print $2; exit }' <<<"$out")
    [ -n "$rps" ] || fail "wrk: $out"
    n=$(($(stat event_requests "$after") - $(stat event_requests "$before")))
    ok=$(($(stat 200 "$after") - $(stat 200 "$before")))
    rt=$(($(stat cache_round_trips "$after") - $(stat cache_round_trips "$before")))
    hits=$(($(stat cache_hits "$after") - $(stat cache_hits "$before")))
    src=$(($(stat source_calls "$after") - $(stat source_calls "$before")))
    [ "$n" -gt 0 ] || fail "no requests counted"
    awk -v run="$run" -v rps="$rps" -v n="$n" -v rt="$rt" -v hits="$hits" -v src="$src" -v bad=$((n - ok)) \
        -v sys="${sys:-0}" -v sr="${sr:-0}" -v p="$perf_ok" -v lat="$lat" \
        'BEGIN { printf "%-8s %12.0f %10s %16.3f %14.2f %16.4f %8d", run, rps, lat, rt / n, hits / n, src / n, bad
                 if (p) printf " %14.2f %16.2f\n", sys / n, sr / n; else printf " %14s %16s\n", "n/a", "n/a" }'
done
echo
echo "(2 round trips per request with participants: event + list, then users; 1 without: 1.9 expected)"
