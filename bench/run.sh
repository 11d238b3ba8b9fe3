#!/usr/bin/env bash
# flash benchmarks, four parts by default (BENCH_PARTS) and a fifth on demand:
#
#   loader     flash's loader against graphql's dataloader (node, required)
#              and Python's aiodataloader (optional), run interleaved; the
#              tasks (bench/tasks_bench.c: spawn, await/resume, RSS, and
#              1,000 resolver tasks x 3 loads against async functions +
#              dataloader, bench/resolvers_bench.js); then the memory checks
#   memcached  the full path over a real memcached (started here on a free
#              loopback port, killed on exit) against libmemcached's multi-get
#              and the N+1 pattern, with flash's and the server's counters
#              checked (bench/memcached_bench.c)
#   redis      one flash request (a gather of 1,000 / 10,000 cached model
#              gets, decoded) on a 3-master Redis Cluster, on one Redis and
#              on a 3-server memcached pool (all started here on free loopback
#              ports, temp dirs, killed on exit; the cluster joined with
#              redis-cli --cluster create), interleaved; flash's per-node
#              requests and each node's INFO commandstats MGET calls (memcached:
#              cmd_get) checked on every request (bench/redis_bench.c)
#   scale      cost per key as the batch grows: the loader sweep (10 .. 1M
#              distinct loads per request, flash against graphql's
#              dataloader, with callgrind's instructions and simulated L2
#              misses per load) and the memcached sweep (1 .. 100k keys per
#              tick: flash, flash with the default max_batch, flash's
#              backend alone, libmemcached; a memcached started here)
#   changes    (only when named: BENCH_PARTS=changes) PostgreSQL's change
#              stream into memcached: a wal_level=logical cluster (initdb, a
#              few seconds) and a memcached started here; row changes/s, the
#              ratio to decoding alone, lag p50/p99 (bench/changes_bench.c)
#   hotkeys    (only when named: BENCH_PARTS=hotkeys) hot keys over real
#              memcached processes started by the program: 4 processes x 16
#              requests cold-reading one key (source reads, without and with
#              leases), a hot key invalidated under reads (source reads and
#              cache ops per invalidation, age of stale reads: markers,
#              leases, allowtime, allowtime + leases), one of 3 servers killed
#              under load (source reads/s without and with a gutter pool)
#              (bench/hotkey_bench.c)
#   http       (only when named: BENCH_PARTS=http) issue #16 item 4: the HTTP
#              example under wrk with 32 and 1 connections, cold and warm
#              (bench/http_bench.sh: requests/s, round trips, syscalls per
#              request by perf when it can count them)
#
# Every run ends with the goals of issue #16 that are not measured by one
# part: item 4 (from the http part when it ran) and item 5 (the loop
# adapters' lines, counted now).
#
# Prints one table per part; exits non-zero when a required peer could not be
# run, the peers did different work, a count did not verify, or memory grew.
#
#   bench/run.sh [--no-build]
#
# Environment: BENCH_RUNS (default 5, at least 5 for the medians to mean
# anything), BENCH_REPS (timed repetitions per scenario per run, default 11),
# BENCH_PY_REPS (default 3: aiodataloader is slow), BENCH_MC_REPS (memcached
# and redis parts, default BENCH_REPS), BENCH_PARTS ("loader memcached redis scale"),
# BENCH_SCALE_RUNS (3) and BENCH_SCALE_REPS (3: the scale part), DATALOADER_DIR
# (npm prefix for the dataloader package, default bench/out/npm), PYTHON.
#
# Nothing of the peers is committed: npm installs dataloader into
# bench/out/npm (git-ignored) when it is missing; memcached,
# libmemcached-dev, redis-server and redis-tools (redis-cli) are installed
# with apt-get when missing (as root).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
RUNS=${BENCH_RUNS:-5}
REPS=${BENCH_REPS:-11}
PY_REPS=${BENCH_PY_REPS:-3}
MC_REPS=${BENCH_MC_REPS:-$REPS}
PARTS=${BENCH_PARTS:-loader memcached redis scale}
SCALE_RUNS=${BENCH_SCALE_RUNS:-3}
SCALE_REPS=${BENCH_SCALE_REPS:-3}
DL_DIR=${DATALOADER_DIR:-$out/npm}
SCENARIOS="distinct dup50 ticks memo"

fail() {
    echo "bench: FAILED: $*" >&2
    exit 1
}
note() { echo "bench: $*" >&2; }
has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

mkdir -p "$out"
[ "$RUNS" -ge 1 ] 2>/dev/null || fail "BENCH_RUNS must be a number"
[ "$RUNS" -ge 5 ] || note "BENCH_RUNS=$RUNS: fewer than 5 runs, medians are weak"
[ "$MC_REPS" -ge 1 ] 2>/dev/null || fail "BENCH_MC_REPS must be a number"
for p in $PARTS; do
    case $p in loader | memcached | redis | scale | changes | hotkeys | http) ;; *) fail "BENCH_PARTS: unknown part '$p' (loader, memcached, redis, scale, changes, hotkeys, http)" ;; esac
done

as_root() { [ "$(id -u)" = 0 ]; }
apt_ready() {
    # apt-cache knows nothing until the package lists were fetched once.
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 && as_root; then
        apt-get update -qq >/dev/null 2>&1 || true
    fi
}

median() { sort -g | awk '{a[NR] = $1} END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
fmt() { awk -v x="$1" -v d="${2:-1}" 'BEGIN { if (x == "nan" || x == "") print "n/a"; else printf "%.*f\n", d, x }'; }

# ---- memcached + libmemcached-dev (the memcached part; before the build) -----
# ---- redis-server + redis-cli + memcached (the redis part) --------------------
if has_part memcached || has_part redis || has_part scale || has_part hotkeys || has_part http; then
    mc_need=()
    command -v memcached >/dev/null 2>&1 || mc_need+=(memcached)
    if has_part http; then
        command -v wrk >/dev/null 2>&1 || mc_need+=(wrk)
        command -v curl >/dev/null 2>&1 || mc_need+=(curl)
    fi
    if has_part memcached || has_part scale; then
        [ -e /usr/include/libmemcached/memcached.h ] || mc_need+=(libmemcached-dev)
    fi
    if has_part redis; then
        command -v redis-server >/dev/null 2>&1 || mc_need+=(redis-server)
        command -v redis-cli >/dev/null 2>&1 || mc_need+=(redis-tools)
    fi
    if [ ${#mc_need[@]} -gt 0 ]; then
        as_root && command -v apt-get >/dev/null 2>&1 \
            || fail "${mc_need[*]} missing and cannot apt-get install (not root): the memcached/redis parts cannot run (BENCH_PARTS=loader skips them)"
        note "installing ${mc_need[*]} (Debian packages)"
        apt_ready
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "${mc_need[@]}" >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${mc_need[@]}" >/dev/null; } \
            || fail "apt-get install ${mc_need[*]} failed"
        # Debian starts the service on install; the benchmark starts its own.
        if command -v service >/dev/null 2>&1; then
            [[ " ${mc_need[*]} " != *" memcached "* ]] || service memcached stop >/dev/null 2>&1 || true
            [[ " ${mc_need[*]} " != *" redis-server "* ]] || service redis-server stop >/dev/null 2>&1 || true
        fi
    fi
fi

bins=()
has_part loader && bins+=(out/loader_bench out/memory_bench out/tasks_bench)
has_part memcached && bins+=(out/memcached_bench out/mc_cost_bench)
has_part redis && bins+=(out/redis_bench)
has_part scale && bins+=(out/loader_bench out/memcached_bench)
has_part changes && bins+=(out/changes_bench)
has_part hotkeys && bins+=(out/hotkey_bench)
if [ "${1:-}" != --no-build ] && [ ${#bins[@]} -gt 0 ]; then
    make -s -C "$here" "${bins[@]}"
fi
for b in "${bins[@]}"; do
    [ -x "$here/$b" ] || fail "bench program $b not built"
done
status=0

# ---- node + graphql's dataloader (required by the loader and scale parts) -----
DL=$DL_DIR/node_modules/dataloader
need_dataloader() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        as_root && command -v apt-get >/dev/null 2>&1 || fail "node/npm missing and cannot apt-get install them (not root)"
        note "installing nodejs and npm (Debian packages)"
        apt_ready
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null \
            || fail "apt-get install nodejs npm failed"
    fi
    if ! node -e "require('$DL')" >/dev/null 2>&1; then
        note "installing graphql's dataloader with npm into $DL_DIR"
        mkdir -p "$DL_DIR"
        npm install --prefix "$DL_DIR" --no-save --no-audit --no-fund --loglevel=error dataloader@^2 >&2 \
            || fail "npm install dataloader failed: the dataloader column cannot be measured"
        node -e "require('$DL')" >/dev/null 2>&1 || fail "dataloader installed in $DL_DIR but node cannot load it"
    fi
}

# ==== part 1: loader + promise overhead, memory =================================
if has_part loader; then
    need_dataloader

    # ---- Python's aiodataloader (optional) ---------------------------------------
    PY=""
    PY_REASON=""
    find_py() {
        local c
        for c in ${PYTHON:-} python3 /usr/bin/python3; do
            command -v "$c" >/dev/null 2>&1 || continue
            if "$c" -c 'import aiodataloader' >/dev/null 2>&1; then
                PY=$c
                return 0
            fi
        done
        return 1
    }
    if ! find_py; then
        pkgs=""
        if command -v apt-cache >/dev/null 2>&1; then
            apt_ready
            pkgs=$(apt-cache search --names-only aiodataloader 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
        fi
        if [ -n "$pkgs" ] && as_root; then
            note "installing $pkgs (Debian packages)"
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 || true
            find_py || PY_REASON="Debian package(s) $pkgs installed but no python3 imports aiodataloader"
        elif [ -n "$pkgs" ]; then
            PY_REASON="Debian package(s) $pkgs exist but installing needs root"
        else
            PY_REASON="no python3 here imports aiodataloader, no Debian package provides it (apt-cache search aiodataloader: nothing), and PyPI is not reachable from this machine"
        fi
    fi

    # ---- interleaved runs ---------------------------------------------------------
    rm -f "$out"/flash.* "$out"/node.* "$out"/py.* "$out"/tasks.* "$out"/noderes.* "$out"/err.*
    run_flash() { "$out/loader_bench" "$REPS" >"$out/flash.$1" 2>"$out/err.flash.$1" || { cat "$out/err.flash.$1" >&2; fail "loader_bench (flash) failed"; }; }
    run_node() { DATALOADER_PATH=$DL node "$here/dataloader_bench.js" "$REPS" >"$out/node.$1" 2>"$out/err.node.$1" || { cat "$out/err.node.$1" >&2; fail "dataloader_bench.js (node) failed"; }; }
    run_tasks() { "$out/tasks_bench" "$REPS" >"$out/tasks.$1" 2>"$out/err.tasks.$1" || { cat "$out/err.tasks.$1" >&2; fail "tasks_bench (flash) failed"; }; }
    run_node_res() { DATALOADER_PATH=$DL node "$here/resolvers_bench.js" "$REPS" >"$out/noderes.$1" 2>"$out/err.noderes.$1" || { cat "$out/err.noderes.$1" >&2; fail "resolvers_bench.js (node) failed"; }; }
    run_py() {
        if ! "$PY" "$here/aiodataloader_bench.py" "$PY_REPS" >"$out/py.$1" 2>"$out/err.py.$1"; then
            cat "$out/err.py.$1" >&2
            PY_REASON="aiodataloader_bench.py failed with $PY (see bench/out/err.py.$1)"
            PY=""
        fi
    }

    note "running $RUNS interleaved runs (flash $REPS reps, dataloader $REPS reps${PY:+, aiodataloader $PY_REPS reps} per scenario each)"
    for r in $(seq 1 "$RUNS"); do
        # Alternate who goes first so that drift on the machine hits both sides.
        if [ $((r % 2)) = 1 ]; then
            run_flash "$r"; run_node "$r"; [ -z "$PY" ] || run_py "$r"; run_tasks "$r"; run_node_res "$r"
        else
            run_node_res "$r"; run_tasks "$r"; [ -z "$PY" ] || run_py "$r"; run_node "$r"; run_flash "$r"
        fi
    done

    # Same work on every side: same batches, same keys per batch, same results.
    # flash's many/<scenario> rows (flash_load_many) do each scenario's work too.
    checks() { grep '^check ' "$1" | grep -v '^check many/' || true; }
    checks_many() { grep '^check many/' "$1" | sed 's#^check many/#check #' || true; }
    for r in $(seq 1 "$RUNS"); do
        [ "$(checks "$out/flash.$r" | wc -l)" = 4 ] || fail "loader_bench printed no checks in run $r"
        diff <(checks "$out/flash.$r") <(checks "$out/node.$r") >&2 \
            || fail "flash and dataloader did different work (check lines differ in run $r)"
        [ "$(checks_many "$out/flash.$r" | wc -l)" = 4 ] || fail "loader_bench printed no many/ checks in run $r"
        diff <(checks_many "$out/flash.$r") <(checks "$out/node.$r") >&2 \
            || fail "flash_load_many and dataloader did different work (check lines differ in run $r)"
        [ "$(checks "$out/tasks.$r" | wc -l)" = 1 ] || fail "tasks_bench printed no check in run $r"
        diff <(checks "$out/tasks.$r") <(checks "$out/noderes.$r") >&2 \
            || fail "flash tasks and async functions + dataloader did different work (check lines differ in run $r)"
        if [ -n "$PY" ]; then
            diff <(checks "$out/flash.$r") <(checks "$out/py.$r") >&2 \
                || fail "flash and aiodataloader did different work (check lines differ in run $r)"
        fi
    done

    # ---- statistics ------------------------------------------------------------------
    values() { # scenario files...
        local s=$1
        shift
        awk -v s="$s" '$1 == s { print $2 }' "$@"
    }
    # Median ns/load over every timed repetition of every run.
    med_all() { values "$2" "$out/$1".[0-9]* | median; }
    # Median over runs of (peer's median in run r) / (flash's median in run r).
    paired_ratio() { # peer scenario
        local r f p
        for r in $(seq 1 "$RUNS"); do
            f=$(values "$2" "$out/flash.$r" | median)
            p=$(values "$2" "$out/$1.$r" | median)
            awk -v p="$p" -v f="$f" 'BEGIN { if (f > 0) printf "%.4f\n", p / f }'
        done | median
    }

    # Median over runs of (a's median in run r) / (b's median in run r).
    paired_ratio2() { # a b scenario [b's scenario]
        local r f p
        for r in $(seq 1 "$RUNS"); do
            p=$(values "$3" "$out/$1.$r" | median)
            f=$(values "${4:-$3}" "$out/$2.$r" | median)
            awk -v p="$p" -v f="$f" 'BEGIN { if (f > 0) printf "%.4f\n", p / f }'
        done | median
    }

    # ---- instructions per load (callgrind: repeatable where seconds are not) -----
    declare -A IPL
    CG_NOTE=""
    if command -v valgrind >/dev/null 2>&1; then
        for s in $SCENARIOS $(for x in $SCENARIOS; do echo "many/$x"; done); do
            cg=$out/callgrind.${s//\//_}.out
            valgrind --tool=callgrind --callgrind-out-file="$cg" --toggle-collect='cg_measure*' \
                "$out/loader_bench" --callgrind "$s" >"$out/callgrind.${s//\//_}.log" 2>&1 \
                || { cat "$out/callgrind.${s//\//_}.log" >&2; fail "callgrind run of scenario $s failed"; }
            ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$cg")
            [ -n "$ir" ] && [ "$ir" -gt 0 ] || fail "no instruction count in $cg"
            IPL[$s]=$(awk -v ir="$ir" 'BEGIN { printf "%.0f\n", ir / 100000 }')
        done
        CG_NOTE="instructions/load: callgrind Ir inside one timed-equivalent run (after a warm-up) / 100,000; see bench/out/callgrind.<scenario>.out"
    else
        for s in $SCENARIOS $(for x in $SCENARIOS; do echo "many/$x"; done); do IPL[$s]="n/a"; done
        CG_NOTE="instructions/load: n/a (valgrind not installed)"
    fi

    # ---- memory -----------------------------------------------------------------------
    mem_rc=0
    "$out/memory_bench" >"$out/memory.txt" 2>"$out/memory.err" || mem_rc=$?

    # ---- the table --------------------------------------------------------------------
    label() {
        case $1 in
        distinct) echo "(a) 100k distinct loads, one tick" ;;
        dup50) echo "(b) 100k loads, 50% duplicates" ;;
        ticks) echo "(c) 1,000 ticks x 100 loads" ;;
        memo) echo "(d) 100k memo hits" ;;
        esac
    }
    flash_hdr=$(grep -m1 '^# flash' "$out/flash.1" | sed 's/^# //')
    node_hdr=$(grep -m1 '^# dataloader' "$out/node.1" | sed 's/^# //')
    echo
    echo "== flash loader + promise overhead: ns per load (lower is better)"
    echo "   $flash_hdr"
    echo "   peer: $node_hdr"
    if [ -n "$PY" ]; then
        echo "   peer: $(grep -m1 '^# aiodataloader' "$out/py.1" | sed 's/^# //') ($PY)"
    fi
    echo "   $(nproc 2>/dev/null || echo '?') cores; $RUNS interleaved runs; ns/load = median of all timed repetitions;"
    echo "   ratio = median over runs of (peer median / flash median) in the same run; design target: flash <= 30 ns/load"
    echo
    row() { printf '%-36s | %11s | %11s | %13s | %10s | %14s | %10s\n' "$@"; }
    row "scenario" "flash ns" "flash instr" "dataloader ns" "dl/flash" "aiodataloader" "aio/flash"
    row "------------------------------------" "-----------" "-----------" "-------------" "----------" "--------------" "----------"
    for s in $SCENARIOS; do
        f=$(med_all flash "$s")
        n=$(med_all node "$s")
        nr=$(paired_ratio node "$s")
        if [ -n "$PY" ]; then
            p=$(fmt "$(med_all py "$s")" 0)
            pr="$(fmt "$(paired_ratio py "$s")" 1)x"
        else
            p="n/a*"
            pr="n/a*"
        fi
        row "$(label "$s")" "$(fmt "$f" 1)" "${IPL[$s]}" "$(fmt "$n" 0)" "$(fmt "$nr" 1)x" "$p" "$pr"
    done
    for s in $SCENARIOS; do
        f=$(med_all flash "many/$s")
        n=$(med_all node "$s")
        nr=$(paired_ratio2 node flash "$s" "many/$s")
        row "$(label "$s" | sed 's/^(\(.\)).*/(\1'"'"') the same, flash_load_many/')" "$(fmt "$f" 1)" "${IPL[many/$s]}" "$(fmt "$n" 0)" "$(fmt "$nr" 1)x" "" ""
    done
    echo
    echo "   (c): one context and one loader for all ticks, flash_wait on each tick's gather (the memo grows to 100k)."
    echo "   (a)-(c) time a whole request (flash_ctx_reset + loader + loads + gather + wait; peers: new DataLoader + loads"
    echo "   + Promise.all / asyncio.gather + await); (d) times only the second pass over resolved keys."
    echo "   (a')-(d'): the same loads and gather as one flash_load_many call (each load joins the gather as it is made);"
    echo "   the goals below are judged on (a)-(d), the general flash_load + flash_gather."
    echo "   $CG_NOTE"
    [ -n "$PY" ] || echo "   * aiodataloader: n/a (not installable here: $PY_REASON)"
    # ---- issue #16 item 1: the loader's goals, each met or not with its cause ------
    goal() { # value op target -> met / NOT met
        awk -v x="$1" -v op="$2" -v t="$3" 'BEGIN { if (x == "nan" || x == "" || x == "n/a") print "n/a";
            else if ((op == "le" && x + 0 <= t) || (op == "ge" && x + 0 >= t)) print "met"; else print "NOT met" }'
    }
    echo
    echo "   goals (issue #16 item 1): requests (a)-(c) <= 30 ns/load and <= 100 instructions/load, memo hits (d)"
    echo "   <= 10 ns and <= 40 instructions; >= 20x graphql's dataloader in every scenario of this run"
    grow() { printf '   %-36s | %-22s | %-24s | %-18s\n' "$@"; }
    grow "scenario" "ns/load" "instructions/load" "x dataloader"
    ns_miss=0; in_miss=0; dl_miss=0
    for s in $SCENARIOS; do
        if [ "$s" = memo ]; then tn=10; ti=40; else tn=30; ti=100; fi
        f=$(med_all flash "$s"); nr=$(paired_ratio node "$s")
        vn=$(goal "$f" le "$tn"); vi=$(goal "${IPL[$s]}" le "$ti"); vd=$(goal "$nr" ge 20)
        [ "$vn" = met ] || ns_miss=1
        [ "$vi" = met ] || in_miss=1
        [ "$vd" = met ] || dl_miss=1
        grow "$(label "$s")" "$(fmt "$f" 1) <= $tn: $vn" "${IPL[$s]} <= $ti: $vi" "$(fmt "$nr" 1)x: $vd"
    done
    if [ $in_miss = 1 ] && [ -f "$out/callgrind.distinct.out" ]; then
        echo "   cause (instructions), distinct, per load, by function (callgrind, self cost):"
        callgrind_annotate "$out/callgrind.distinct.out" 2>/dev/null | awk '
            /^ *[0-9,]+ +\([ 0-9.]+%\) +[^ ]+\.(c|h|S):[A-Za-z_][A-Za-z0-9_.]*( \[.*\])?$/ {
                gsub(/,/, "", $1); f = ($NF ~ /^\[/) ? $(NF - 1) : $NF; sub(/.*:/, "", f); sub(/\..*/, "", f)
                c[f] += $1 / 100000; if (!(f in o)) { o[f] = ++k; n[k] = f } }
            END { for (i = 1; i <= k; i++) if (c[n[i]] >= 3) printf "%s%s %.0f", (j++ ? ", " : "     "), n[i], c[n[i]]
                  if (j) print "" }'
        echo "     flash_load: checks, hash and the first memo slot probed (a hit ends there); flash__load_miss: the"
        echo "     new entry and its key, the batch's key array, the memo slot; flash__load_probe: the later slots of"
        echo "     a collision; flash_batch_resolve: each key's settle (checks, the gather's value recorded in place);"
        echo "     batch_fn: the benchmark's loop with flash_batch_key inlined; flash__gather_new: the gather's pass"
        echo "     over the promises (flash_load_many folds it into the loads: rows (a')-(d')). What is left is one"
        echo "     general promise per load through three passes (load, batch function, gather), each near its floor;"
        echo "     the next step is a smaller entry and memo slot (a hit compared by key words, no 16-byte slot)."
    fi
    if [ $ns_miss = 1 ]; then
        echo "   cause (ns): the 100k-load requests are memory-bound, not instruction-bound: BENCH_PARTS=scale shows"
        echo "     the same instructions/load at 10k and 100k loads per tick and the time per load rising with the"
        echo "     working set (entries + memo table beyond the 1 MiB L2, simulated cache misses per load); the"
        echo "     memo row is a random probe into a 4 MiB table per hit. flash_load_many hashes 8 keys ahead and"
        echo "     prefetches their slots (rows (a')-(d'): more instructions, fewer ns); flash_load cannot look ahead."
        echo "     On a shared 2-core VM the ns also move by +-30% or more with the other jobs: the instruction"
        echo "     counts are the stable figure."
    fi
    [ $dl_miss = 0 ] || echo "   cause (x dataloader): follows from the ns above; dataloader is memory-bound too (see scale)."
    # ---- tasks ------------------------------------------------------------------------
    verdict() { # value op target
        awk -v x="$1" -v op="$2" -v t="$3" 'BEGIN { if (x == "nan" || x == "") print "n/a";
            else if ((op == "le" && x <= t) || (op == "ge" && x >= t)) print "met"; else print "NOT met" }'
    }
    t_spawn=$(med_all tasks spawn)
    t_await=$(med_all tasks await)
    t_await_cb=$(med_all tasks await_cb)
    t_res=$(med_all tasks resolvers)
    t_res_cb=$(med_all tasks resolvers_cb)
    n_res=$(med_all noderes resolvers)
    r_res=$(paired_ratio2 noderes tasks resolvers)
    r_res_cb=$(paired_ratio2 noderes tasks resolvers resolvers_cb)
    rss=$(values rss_10k "$out"/tasks.[0-9]* | median)
    echo
    echo "== tasks (bench/tasks_bench.c; peer: bench/resolvers_bench.js, async functions + dataloader)"
    echo "   $(grep -m1 '^# flash' "$out/tasks.1" | sed 's/^# //')"
    echo "   peer: $(grep -m1 '^# dataloader' "$out/noderes.1" | sed 's/^# //')"
    echo "   medians of all timed repetitions over $RUNS interleaved runs; node/flash = median over runs of the ratio in the same run"
    echo
    trow() { printf '%-44s | %10s | %10s | %9s | %-16s\n' "$@"; }
    trow "row" "flash" "node" "node/flash" "target"
    trow "--------------------------------------------" "----------" "----------" "---------" "----------------"
    trow "empty spawn + finish, ns" "$(fmt "$t_spawn" 1)" "" "" "<= 100 ns: $(verdict "$t_spawn" le 100)"
    trow "await/resume pair, ns" "$(fmt "$t_await" 1)" "" "" "<= 40 ns: $(verdict "$t_await" le 40)"
    trow "  the same without a task (callback), ns" "$(fmt "$t_await_cb" 1)" "" "" ""
    trow "1,000 resolver tasks x 3 loads, ns/load" "$(fmt "$t_res" 1)" "$(fmt "$n_res" 0)" "$(fmt "$r_res" 1)x" ">= 10x: $(verdict "$r_res" ge 10)"
    trow "  the same with flash_then chains, ns/load" "$(fmt "$t_res_cb" 1)" "" "$(fmt "$r_res_cb" 1)x" ""
    trow "RSS per 10,000 suspended tasks, MiB" "$(awk -v b="$rss" 'BEGIN { if (b == "nan") print "n/a"; else printf "%.1f", b / 1048576 }')" "" "" \
        "$(awk -v b="$rss" 'BEGIN { if (b != "nan") printf "%.1f KiB/task", b / 10000 / 1024 }')"
    echo
    echo "   spawn: 10,000 spawns between resets (reset untimed); await: resolve + flash_drain resumes the task, which"
    echo "   makes the next promise and awaits it; resolvers: a whole request (flash_run: reset, loader, 1,000 spawns,"
    echo "   gather; node: new DataLoader, 1,000 async calls, Promise.all), 3 batches of 1,000 keys, 20 warm-ups each"

    echo
    echo "== memory (bench/memory_bench)"
    awk '$1 == "memory" {
            name = $2; $1 = ""; $2 = ""; sub(/^  */, "")
            printf "   %-38s %s\n", name, $0
         }' "$out/memory.txt"
    [ ! -s "$out/memory.err" ] || cat "$out/memory.err" >&2

    if [ "$mem_rc" = 0 ]; then
        echo "   memory across 100k flash_run cycles: flat (PASS)"
    else
        echo "   memory: FAIL (see the FAIL lines above)"
        echo "bench: FAILED: memory_bench (exit $mem_rc)" >&2
        status=1
    fi
fi

# ==== part 2: the full path over memcached ======================================
if has_part memcached; then
    mc_pid=""
    stop_mc() {
        if [ -n "$mc_pid" ]; then
            kill "$mc_pid" 2>/dev/null || true
            wait "$mc_pid" 2>/dev/null || true
            mc_pid=""
        fi
    }
    trap stop_mc EXIT
    trap 'exit 130' INT TERM HUP
    port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    # A free loopback port: one nobody listens on, then memcached must bind it
    # (another process may win the race: try again elsewhere).
    MC_PORT=""
    MC_ARGS="-l 127.0.0.1 -U 0 -m 256"
    mc_user=()
    as_root && mc_user=(-u nobody) # memcached will not run as root without -u
    for _ in 1 2 3 4 5 6 7 8; do
        port=$((20000 + RANDOM % 30000))
        ! port_open "$port" || continue
        # shellcheck disable=SC2086
        memcached $MC_ARGS -p "$port" ${mc_user[@]+"${mc_user[@]}"} >"$out/memcached.log" 2>&1 &
        mc_pid=$!
        for _i in $(seq 1 200); do
            if port_open "$port"; then
                MC_PORT=$port
                break
            fi
            kill -0 "$mc_pid" 2>/dev/null || break
            sleep 0.02
        done
        [ -z "$MC_PORT" ] || break
        stop_mc
    done
    [ -n "$MC_PORT" ] || { cat "$out/memcached.log" >&2; fail "could not start memcached on a free loopback port"; }
    note "memcached $MC_ARGS -p $MC_PORT (pid $mc_pid); $RUNS runs of memcached_bench, $MC_REPS reps per scenario each"

    rm -f "$out"/mc.* "$out"/err.mc.* "$out"/callgrind.mc.* "$out"/cachesim.mc.*
    for r in $(seq 1 "$RUNS"); do
        if ! "$out/memcached_bench" "$MC_PORT" "$MC_REPS" >"$out/mc.$r" 2>"$out/err.mc.$r"; then
            cat "$out/err.mc.$r" >&2
            kill -0 "$mc_pid" 2>/dev/null || note "memcached (pid $mc_pid) is gone: it exited or something killed it"
            fail "memcached_bench failed in run $r (see above; bench/out/mc.$r)"
        fi
    done
    # What a read costs memcached per key, by command (bench/mc_cost_bench.c).
    if ! "$out/mc_cost_bench" "$MC_PORT" $((RUNS * 3)) 200 >"$out/mc_cost" 2>"$out/err.mc_cost"; then
        cat "$out/err.mc_cost" >&2
        fail "mc_cost_bench failed (see above)"
    fi
    MC_SIZES="1000 10000"
    MC_ROWS="flash flash_mb raw libmc libmc_bin flash_n1 libmc_n1"
    # Every run verified the same things (it exits non-zero otherwise).
    nver=$(grep -c '^verify ' "$out/mc.1" || true)
    [ "$nver" -ge 12 ] || fail "memcached_bench printed only $nver verify lines in run 1"
    for r in $(seq 2 "$RUNS"); do
        [ "$(grep -c '^verify ' "$out/mc.$r" || true)" = "$nver" ] || fail "memcached_bench run $r verified other things than run 1"
    done

    mc_vals() { # row/N files... (MC_COL: 2 = ns/key, 3 = server CPU ns/key)
        local s=$1
        shift
        awk -v s="$s" -v c="${MC_COL:-2}" '$1 == s { print $c }' "$@"
    }
    # Median ns/key (or server CPU ns/key) over every timed repetition of every run.
    mc_med_all() { mc_vals "$1/$2" "$out"/mc.[0-9]* | median; }
    mc_srv_all() { MC_COL=3 mc_vals "$1/$2" "$out"/mc.[0-9]* | median; }
    # Median over runs of (row median in run r) / (base row median in run r).
    mc_ratio() { # row N [base]
        local r f p
        for r in $(seq 1 "$RUNS"); do
            f=$(mc_vals "${3:-flash}/$2" "$out/mc.$r" | median)
            p=$(mc_vals "$1/$2" "$out/mc.$r" | median)
            awk -v p="$p" -v f="$f" 'BEGIN { if (f > 0 && p != "nan" && f != "nan") printf "%.4f\n", p / f }'
        done | median
    }

    # ---- instructions per key (callgrind: the client's own work, repeatable) ---
    declare -A MIPK
    if command -v valgrind >/dev/null 2>&1; then
        # On the keys run 1 seeded (its key prefix): no seed under valgrind.
        mc_prefix=$(awk '$1 == "prefix" { print $2; exit }' "$out/mc.1")
        [ -n "$mc_prefix" ] || fail "memcached_bench printed no key prefix in run 1"
        note "callgrind: instructions per key of each row"
        for n in $MC_SIZES; do
            for s in $MC_ROWS; do
                [ -n "$(mc_vals "$s/$n" "$out/mc.1")" ] || { MIPK[$s/$n]="-"; continue; }
                cg=$out/callgrind.mc.$s.$n.out
                valgrind --tool=callgrind --callgrind-out-file="$cg" --toggle-collect='cg_measure*' \
                    "$out/memcached_bench" "$MC_PORT" --callgrind "$s" "$n" "$mc_prefix" >"$out/callgrind.mc.$s.$n.log" 2>&1 \
                    || { cat "$out/callgrind.mc.$s.$n.log" >&2; fail "callgrind run of memcached row $s/$n failed"; }
                ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$cg")
                [ -n "$ir" ] && [ "$ir" -gt 0 ] || fail "no instruction count in $cg"
                # Less the benchmark's own checks (cg_skip_*: the value hash of
                # the byte rows, the row compare of flash's), by their inclusive cost.
                sk=$(callgrind_annotate --inclusive=yes "$cg" 2>/dev/null |
                    awk '$0 ~ /:cg_skip_[a-z_]* \[/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
                MIPK[$s/$n]=$(awk -v ir="$ir" -v sk="$sk" -v n="$n" 'BEGIN { printf "%.0f\n", (ir - sk) / n }')
            done
        done
        MCG_NOTE="instr/key: callgrind Ir of the client process inside one run after a warm-up, less the benchmark's own checks (cg_skip_*), / N (user space only: not the server, not the kernel); bench/out/callgrind.mc.<row>.<N>.out"
        # Where the wall-clock gap is when the instructions are not: L1d misses
        # per key (a simulated 32 KiB L1d, 1 MiB last level), N=1000, less the checks.
        declare -A MD1
        for s in flash raw libmc; do
            [ -n "$(mc_vals "$s/1000" "$out/mc.1")" ] || continue
            cg=$out/cachesim.mc.$s.1000.out
            valgrind --tool=callgrind --cache-sim=yes --D1=32768,8,64 --LL=1048576,16,64 --callgrind-out-file="$cg" \
                --toggle-collect='cg_measure*' "$out/memcached_bench" "$MC_PORT" --callgrind "$s" 1000 "$mc_prefix" \
                >"$out/cachesim.mc.$s.1000.log" 2>&1 || { cat "$out/cachesim.mc.$s.1000.log" >&2; fail "callgrind --cache-sim run of $s/1000 failed"; }
            MD1[$s]=$(callgrind_annotate --inclusive=yes --show=D1mr,D1mw "$cg" 2>/dev/null | awk '
                /PROGRAM TOTALS/ || /:cg_skip_[a-z_]* \[/ {
                    line = $0; gsub(/\([^)]*\)/, "", line); gsub(",", "", line); split(line, f, " ")
                    v = (f[1] == "." ? 0 : f[1]) + (f[2] == "." ? 0 : f[2])
                    if (line ~ /PROGRAM TOTALS/) t = v; else k += v
                }
                END { printf "%.1f", (t - k) / 1000 }')
        done
    else
        for n in $MC_SIZES; do for s in $MC_ROWS; do MIPK[$s/$n]="n/a"; done; done
        MCG_NOTE="instr/key: n/a (valgrind not installed)"
    fi
    stop_mc

    mc_label() {
        case $1 in
        flash) echo "(a) flash: N x get_by_id, gather, decoded" ;;
        flash_mb) echo "(a) flash, default max_batch: N/1000 ops" ;;
        raw) echo "(a) flash backend alone: 1 GET op, bytes" ;;
        libmc) echo "(b) libmemcached mget+fetch_result, text" ;;
        libmc_bin) echo "(b) libmemcached mget+fetch_result, bin" ;;
        flash_n1) echo "(c) N+1 flash: flash_wait per key" ;;
        libmc_n1) echo "(c) N+1 libmemcached: memcached_get/key" ;;
        esac
    }
    echo
    echo "== full path over memcached: ns per key (lower is better)"
    echo "   $(grep -m1 '^# flash' "$out/mc.1" | sed 's/^# //')"
    echo "   memcached $MC_ARGS (started by run.sh); $(nproc 2>/dev/null || echo '?') cores shared by client and server;" \
        "$RUNS runs x $MC_REPS reps, order rotated every rep"
    echo "   ns/key = median of all timed reps (wall clock, client + server); x flash = median over runs of"
    echo "   (row median / flash median) in the same run; srv = memcached's CPU ns/key (rusage, median);"
    echo "   instr = the client's instructions/key (callgrind)"
    echo
    mrow() { printf '%-41s |%8s |%8s |%7s |%8s |%8s |%7s |%7s |%7s\n' "$@"; }
    mrow "row: N keys, all cached" "1k ns" "x flash" "1k srv" "10k ns" "x flash" "10k srv" "1k ins" "10k ins"
    mrow "-----------------------------------------" "--------" "--------" "-------" "--------" "--------" "-------" "-------" "-------"
    for s in $MC_ROWS; do
        cells=()
        for n in $MC_SIZES; do
            if [ -z "$(mc_vals "$s/$n" "$out/mc.1")" ]; then
                cells+=("-" "-" "-")
            else
                cells+=("$(fmt "$(mc_med_all "$s" "$n")" 0)" "$(fmt "$(mc_ratio "$s" "$n")" 2)x" "$(fmt "$(mc_srv_all "$s" "$n")" 0)")
            fi
        done
        mrow "$(mc_label "$s")" "${cells[@]}" "${MIPK[$s/1000]}" "${MIPK[$s/10000]}"
    done
    echo
    for n in $MC_SIZES; do
        echo "   N=$n: libmemcached (text) / flash backend alone (bytes vs bytes): $(fmt "$(mc_ratio libmc "$n" raw)" 2)x;" \
            "flash / flash backend alone (the model layer: keys, memo, decode): $(fmt "$(mc_ratio flash "$n" raw)" 2)x"
    done
    for n in $MC_SIZES; do
        rr=$(mc_ratio libmc "$n")
        verdict=$(awk -v r="$rr" 'BEGIN { if (r == "nan" || r == "") print "n/a"; else if (r >= 1) print "met"; else print "NOT met" }')
        echo "   target \"flash at least as fast per key as libmemcached's multi-get\", N=$n: $verdict (libmemcached/flash = $(fmt "$rr" 2)x)"
    done
    # The cause, in the stable figure: where flash's instructions per key go.
    for n in $MC_SIZES; do
        fi=${MIPK[flash/$n]:-} ri=${MIPK[raw/$n]:-} li=${MIPK[libmc/$n]:-}
        case "$fi$ri$li" in *[!0-9]* | "") continue ;; esac
        ml=$((fi - ri))
        mv=$(awk -v m="$ml" -v r="$ri" 'BEGIN { if (m <= 1.2 * r) print "met"; else print "NOT met" }')
        echo "   N=$n instructions/key: flash $fi = transport $ri + model layer $ml (keys, memo, decode; target <= 1.2x the transport: $mv, $(awk -v m="$ml" -v r="$ri" 'BEGIN { printf "%.2f", m / r }')x); libmemcached text $li"
    done
    if [ -n "${MD1[flash]:-}" ] && [ -n "${MD1[libmc]:-}" ]; then
        echo "   N=1000 L1d misses/key (callgrind --cache-sim: 32 KiB L1d, less the checks): flash ${MD1[flash]}, backend alone" \
            "${MD1[raw]:-n/a}, libmemcached text ${MD1[libmc]} -- where fewer instructions still take longer: flash's request"
        echo "   writes new memory for every key (the query, its key, the memo entry, the promise, the row and its strings, the"
        echo "   op's item, the backend's copy of the value); libmemcached reuses one result and one buffer (bench/out/cachesim.mc.*)"
    fi
    echo "   cause and next step (bench/out/callgrind.mc.flash.*.out): the model layer is the larger part -- the value's"
    echo "   decode (its check hash, the fields, the key check: flash__decode_value), the loader's memo insert and the"
    echo "   promises (flash.h layers 5 and 3: flash__load, flash_batch_resolve, the gather: ~350/key after the loader"
    echo "   work), the query and its key (flash__query_run, flash__build_key); the transport's largest items are"
    echo "   the reply parser and the copy of each value (flash_memcached_parse, flash__mc_take_value). Next: a decoder"
    echo "   per model (no type switch per field), the memo insert (layer 5), values decoded from the read buffer without"
    echo "   the backend's copy. memcached's own CPU per key is in the srv column and the table below (get vs gets)"
    grep -m1 '^# libmc_bin' "$out/mc.1" | sed 's/^# /   /' || true
    echo "   $MCG_NOTE"
    echo "   Timed: (a) flash_ctx_reset + the queries + flash_gather + flash_wait (the model layer builds the keys,"
    echo "   memoises, decodes every row into a User struct); backend alone and (b): values as bytes, not decoded."
    echo "   flash reads with one multi-key gets (writes: meta commands); libmemcached text sends one multi-key get."
    echo
    echo "== memcached's CPU per key read, by command (1,000 keys per request, all hits, 60-byte values;"
    echo "   bench/mc_cost_bench.c: rusage_user + rusage_system deltas over 200 requests per sample, median of"
    echo "   $((RUNS * 3)) interleaved samples; client wall ns/key beside it)"
    printf '   %-32s %12s %12s\n' command "srv ns/key" "wall ns/key"
    for v in get gets mg_v mg_vf mg_vfc; do
        case $v in
        get) l="get k1..kN (no CAS)" ;; gets) l="gets k1..kN (flash's read)" ;;
        mg_v) l="mg k v  per key + mn" ;; mg_vf) l="mg k v f  per key + mn" ;; mg_vfc) l="mg k v f c  per key + mn" ;;
        esac
        printf '   %-32s %12s %12s\n' "$l" "$(fmt "$(awk -v v="$v" '$1 == v { print $2 }' "$out/mc_cost" | median)" 0)" \
            "$(fmt "$(awk -v v="$v" '$1 == v { print $3 }' "$out/mc_cost" | median)" 0)"
    done
    echo
    echo "== memcached counts (verified before the timed reps of every run; run 1 shown)"
    grep '^verify ' "$out/mc.1" | sed 's/^verify /   /'
    echo "   verified: all $RUNS runs ($nver checks each)"
fi

# ==== part 3: one request on a Redis Cluster, one Redis, a memcached pool ========
# 3 cluster-enabled redis-servers (joined with redis-cli --cluster create), one
# standalone redis-server and 3 memcacheds, each on a free loopback port with
# its own temp dir, killed on exit; then bench/redis_bench.c BENCH_RUNS times
# (each run: the 3 backends interleaved, order rotated every rep).
if has_part redis; then
    rb_dir=$(mktemp -d /tmp/flash-bench-redis-XXXXXX)
    rb_pids=()
    stop_redis() {
        local p
        for p in ${rb_pids[@]+"${rb_pids[@]}"}; do kill "$p" 2>/dev/null || true; done
        for p in ${rb_pids[@]+"${rb_pids[@]}"}; do wait "$p" 2>/dev/null || true; done
        rb_pids=()
        [ -z "$rb_dir" ] || rm -rf "$rb_dir"
        rb_dir=""
    }
    trap stop_redis EXIT
    trap 'exit 130' INT TERM HUP
    port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    rb_mc_user=()
    as_root && rb_mc_user=(-u nobody)
    RB_PORT=""
    # rb_start KIND NAME: a server on a free port (its bus port free too) -> RB_PORT
    rb_start() {
        local kind=$1 d=$rb_dir/$2 port pid
        mkdir -p "$d"
        as_root && chmod 777 "$d"
        RB_PORT=""
        for _ in 1 2 3 4 5 6 7 8; do
            port=$((20000 + RANDOM % 30000))
            ! port_open "$port" && ! port_open $((port + 10000)) || continue
            case $kind in
            cluster) redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$d" \
                --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 >"$d/log" 2>&1 & ;;
            redis) redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$d" >"$d/log" 2>&1 & ;;
            memcached) memcached -l 127.0.0.1 -U 0 -m 256 -p "$port" ${rb_mc_user[@]+"${rb_mc_user[@]}"} >"$d/log" 2>&1 & ;;
            esac
            pid=$!
            rb_pids+=("$pid")
            for _i in $(seq 1 250); do
                if port_open "$port"; then
                    RB_PORT=$port
                    return 0
                fi
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.02
            done
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
        cat "$d/log" >&2
        fail "could not start $kind ($2) on a free loopback port"
    }
    RB_C=(); RB_M=()
    for i in 1 2 3; do rb_start cluster "node$i"; RB_C+=("$RB_PORT"); done
    rb_start redis single; RB_R=$RB_PORT
    for i in 1 2 3; do rb_start memcached "mc$i"; RB_M+=("$RB_PORT"); done
    redis-cli --cluster create "127.0.0.1:${RB_C[0]}" "127.0.0.1:${RB_C[1]}" "127.0.0.1:${RB_C[2]}" \
        --cluster-replicas 0 --cluster-yes >"$rb_dir/create.log" 2>&1 \
        || { cat "$rb_dir/create.log" >&2; fail "redis-cli --cluster create failed"; }
    # Every node must know the whole map before flash asks one of them.
    for _i in $(seq 1 500); do
        ok=1
        for p in "${RB_C[@]}"; do
            info=$(redis-cli -p "$p" cluster info 2>/dev/null | tr -d '\r')
            case $info in *cluster_state:ok*cluster_slots_ok:16384*cluster_known_nodes:3*) ;; *) ok=0 ;; esac
        done
        [ $ok = 1 ] && break
        sleep 0.02
    done
    [ $ok = 1 ] || fail "the redis cluster on ${RB_C[*]} did not reach cluster_state:ok with 3 nodes"
    rb_args=("$(IFS=,; echo "${RB_C[*]}")" "$RB_R" "$(IFS=,; echo "${RB_M[*]}")")
    note "redis cluster :${rb_args[0]}, redis :$RB_R, memcached pool :${rb_args[2]}; $RUNS runs of redis_bench, $MC_REPS reps each"
    rm -f "$out"/rd.* "$out"/err.rd.*
    for r in $(seq 1 "$RUNS"); do
        "$out/redis_bench" "${rb_args[@]}" "$MC_REPS" >"$out/rd.$r" 2>"$out/err.rd.$r" \
            || { cat "$out/err.rd.$r" >&2; fail "redis_bench failed in run $r (see above; bench/out/rd.$r)"; }
    done
    stop_redis
    nver=$(grep -c '^verify ' "$out/rd.1" || true)
    [ "$nver" = 6 ] || fail "redis_bench printed $nver verify lines in run 1 (want 6)"
    for r in $(seq 2 "$RUNS"); do
        [ "$(grep -c '^verify ' "$out/rd.$r" || true)" = "$nver" ] || fail "redis_bench run $r verified other things than run 1"
    done
    rd_vals() { awk -v s="$1" '$1 == s { print $2 }' "${@:2}"; }
    rd_med() { rd_vals "$1/$2" "$out"/rd.[0-9]* | median; }
    rd_ratio() { # row N: median over runs of (row median / redis median) in the same run
        local r f p
        for r in $(seq 1 "$RUNS"); do
            f=$(rd_vals "redis/$2" "$out/rd.$r" | median)
            p=$(rd_vals "$1/$2" "$out/rd.$r" | median)
            awk -v p="$p" -v f="$f" 'BEGIN { if (f > 0 && p != "nan" && f != "nan") printf "%.4f\n", p / f }'
        done | median
    }
    rd_label() {
        case $1 in
        cluster) echo "Redis Cluster, 3 masters" ;;
        redis) echo "one Redis" ;;
        mcpool) echo "memcached pool, 3 servers" ;;
        esac
    }
    echo
    echo "== one flash request on a Redis Cluster vs one Redis vs a memcached pool: ns per key (lower is better)"
    echo "   $(grep -m1 '^# flash' "$out/rd.1" | sed 's/^# //')"
    echo "   $(redis-server --version | awk '{print $1, $2, $3}'); $(memcached -V 2>/dev/null); $(nproc 2>/dev/null || echo '?')" \
        "cores shared by client and 7 servers; $RUNS runs x $MC_REPS reps, the 3 backends interleaved"
    echo "   request: flash_ctx_reset + N User_get_by_id_async + flash_gather + flash_wait, every key cached, rows decoded;"
    echo "   ns/key = median of all timed reps; x redis = median over runs of (row median / one Redis median) in the same run"
    echo
    rrow() { printf '%-30s |%8s |%8s |%8s |%8s\n' "$@"; }
    rrow "backend" "1k ns" "x redis" "10k ns" "x redis"
    rrow "------------------------------" "--------" "--------" "--------" "--------"
    for s in cluster redis mcpool; do
        rrow "$(rd_label "$s")" "$(fmt "$(rd_med "$s" 1000)" 0)" "$(fmt "$(rd_ratio "$s" 1000)" 2)x" \
            "$(fmt "$(rd_med "$s" 10000)" 0)" "$(fmt "$(rd_ratio "$s" 10000)" 2)x"
    done
    echo
    grep '^# N=' "$out/rd.1" | sed 's/^# /   /'
    echo
    echo "== per-node counts (checked on every request of every run, timed or not; run 1's first shown)"
    grep '^verify ' "$out/rd.1" | sed 's/^verify /   /; s/; /;\n      /g'
    echo "   verified: all $RUNS runs ($nver verify lines each, and every timed rep checked the same way)"
fi

# ==== part 5: cost per key as the batch grows (issue #16 item 6) ================
# The loader sweep: bench/loader_bench --scale and dataloader_bench.js --scale,
# BENCH_SCALE_RUNS interleaved runs of BENCH_SCALE_REPS samples each (a sample
# repeats one request of n distinct loads until it made 1M loads), the check
# lines compared; callgrind per size for instructions and simulated misses of
# a 1 MiB cache (this VM's L2 per core) per load. Then the memcached sweep:
# bench/memcached_bench PORT --scale on a memcached started here.
if has_part scale; then
    need_dataloader
    SC_SIZES="10 100 1000 10000 100000 1000000"
    rm -f "$out"/scale.* "$out"/nscale.* "$out"/err.scale.* "$out"/err.nscale.*
    run_fscale() { "$out/loader_bench" --scale "$SCALE_REPS" >"$out/scale.$1" 2>"$out/err.scale.$1" || { cat "$out/err.scale.$1" >&2; fail "loader_bench --scale failed"; }; }
    run_nscale() { DATALOADER_PATH=$DL node --max-old-space-size=4096 "$here/dataloader_bench.js" --scale "$SCALE_REPS" >"$out/nscale.$1" 2>"$out/err.nscale.$1" || { cat "$out/err.nscale.$1" >&2; fail "dataloader_bench.js --scale failed"; }; }
    note "scale: $SCALE_RUNS interleaved runs of the loader sweep (flash and dataloader, $SCALE_REPS samples per size each)"
    for r in $(seq 1 "$SCALE_RUNS"); do
        if [ $((r % 2)) = 1 ]; then run_fscale "$r"; run_nscale "$r"; else run_nscale "$r"; run_fscale "$r"; fi
        diff <(grep '^check ' "$out/scale.$r") <(grep '^check ' "$out/nscale.$r") >&2 \
            || fail "scale: flash and dataloader did different work (check lines differ in run $r)"
        [ "$(grep -c '^check ' "$out/scale.$r")" = 6 ] || fail "scale: loader_bench printed $(grep -c '^check ' "$out/scale.$r") checks in run $r (want 6)"
    done
    sc_med() { awk -v s="scale/$2" '$1 == s { print $2 }' "$out/$1".[0-9]* | median; }
    sc_ratio() { # n: median over runs of (dataloader median / flash median) in the same run
        local r f p
        for r in $(seq 1 "$SCALE_RUNS"); do
            f=$(awk -v s="scale/$1" '$1 == s { print $2 }' "$out/scale.$r" | median)
            p=$(awk -v s="scale/$1" '$1 == s { print $2 }' "$out/nscale.$r" | median)
            awk -v p="$p" -v f="$f" 'BEGIN { if (f > 0) printf "%.4f\n", p / f }'
        done | median
    }
    declare -A SC_IR SC_L2
    if command -v valgrind >/dev/null 2>&1; then
        for n in $SC_SIZES; do
            cg=$out/callgrind.scale.$n.out
            valgrind --tool=callgrind --cache-sim=yes --D1=65536,8,64 --LL=1048576,8,64 --callgrind-out-file="$cg" \
                --toggle-collect='cg_measure*' "$out/loader_bench" --callgrind "scale/$n" >"$out/callgrind.scale.$n.log" 2>&1 \
                || { cat "$out/callgrind.scale.$n.log" >&2; fail "callgrind run of scale/$n failed"; }
            # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
            read -r ir dlmr dlmw < <(awk '/^(summary|totals):/ { print $2, $9, $10; exit }' "$cg")
            [ -n "$ir" ] && [ "$ir" -gt 0 ] || fail "no instruction count in $cg"
            SC_IR[$n]=$(awk -v x="$ir" -v n="$n" 'BEGIN { printf "%.0f", x / n }')
            SC_L2[$n]=$(awk -v a="$dlmr" -v b="$dlmw" -v n="$n" 'BEGIN { printf "%.2f", (a + b) / n }')
        done
    else
        for n in $SC_SIZES; do SC_IR[$n]="n/a"; SC_L2[$n]="n/a"; done
    fi
    lab() { case $1 in 10) echo 10 ;; 100) echo 100 ;; 1000) echo 1k ;; 10000) echo 10k ;; 100000) echo 100k ;; 1000000) echo 1M ;; *) echo "$1" ;; esac; }
    srow() { printf '%-40s |%8s |%8s |%8s |%8s |%8s |%8s\n' "$@"; }
    echo
    echo "== scale: the loader, ns per load as the batch grows (one request of n distinct loads, like (a))"
    echo "   $(grep -m1 '^# flash' "$out/scale.1" | sed 's/^# //')"
    echo "   peer: $(grep -m1 '^# dataloader' "$out/nscale.1" | sed 's/^# //')"
    echo "   $SCALE_RUNS interleaved runs x $SCALE_REPS samples per size; ns = median of all samples; x = median over runs of the"
    echo "   ratio in the same run; instructions and L2 misses (a simulated 1 MiB cache, reads + writes) per load: callgrind"
    echo
    hdr=("loads per request"); for n in $SC_SIZES; do hdr+=("$(lab "$n")"); done
    srow "${hdr[@]}"
    srow "----------------------------------------" "--------" "--------" "--------" "--------" "--------" "--------"
    c=("flash ns/load"); for n in $SC_SIZES; do c+=("$(fmt "$(sc_med scale "$n")" 1)"); done; srow "${c[@]}"
    c=("flash instructions/load"); for n in $SC_SIZES; do c+=("${SC_IR[$n]}"); done; srow "${c[@]}"
    c=("flash L2 misses/load (simulated)"); for n in $SC_SIZES; do c+=("${SC_L2[$n]}"); done; srow "${c[@]}"
    c=("dataloader ns/load"); for n in $SC_SIZES; do c+=("$(fmt "$(sc_med nscale "$n")" 0)"); done; srow "${c[@]}"
    c=("dataloader / flash"); for n in $SC_SIZES; do c+=("$(fmt "$(sc_ratio "$n")" 1)x"); done; srow "${c[@]}"
    echo
    # Flat or falling: no size costs more than 1.25x the cheapest smaller size.
    flat_upto=""; rise_at=""; best=""
    for n in $SC_SIZES; do
        v=$(sc_med scale "$n")
        if [ -z "$best" ] || awk -v v="$v" -v b="$best" 'BEGIN { exit !(v < b) }'; then best=$v; fi
        if [ -z "$rise_at" ] && awk -v v="$v" -v b="$best" 'BEGIN { exit !(v <= 1.25 * b) }'; then flat_upto=$n; elif [ -z "$rise_at" ]; then rise_at=$n; fi
    done
    if [ -z "$rise_at" ]; then
        echo "   target \"cost per load flat or falling as the batch grows\" (within 25%): met from 10 to 1M loads"
    else
        echo "   target \"cost per load flat or falling as the batch grows\" (within 25%): met up to $(lab "$flat_upto") loads, NOT met from $(lab "$rise_at")"
        echo "   cause: instructions per load stay flat (${SC_IR[10000]} at 10k, ${SC_IR[100000]} at 100k, ${SC_IR[1000000]} at 1M) while the"
        echo "   misses of a 1 MiB cache per load grow (${SC_L2[10000]} -> ${SC_L2[100000]} -> ${SC_L2[1000000]}): past ~10k loads the"
        echo "   request's entries (64-72 bytes each) and memo table (16-byte slots, <= 50% full) leave the L2, past ~100k"
        echo "   the L3 too; every load probes the table at a random slot, and the gather and the batch function each"
        echo "   pass over the entries again. dataloader's cost per load grows the same way (row above)."
    fi

    # ---- the memcached sweep ----------------------------------------------------
    sc_mc_pid=""; SC_MC_PORT=""
    stop_sc_mc() { [ -z "$sc_mc_pid" ] || { kill "$sc_mc_pid" 2>/dev/null; wait "$sc_mc_pid" 2>/dev/null; sc_mc_pid=""; } || true; }
    trap stop_sc_mc EXIT
    trap 'exit 130' INT TERM HUP
    port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    sc_user=(); as_root && sc_user=(-u nobody)
    for _ in 1 2 3 4 5 6 7 8; do
        port=$((20000 + RANDOM % 30000))
        ! port_open "$port" || continue
        memcached -l 127.0.0.1 -U 0 -m 256 -p "$port" ${sc_user[@]+"${sc_user[@]}"} >"$out/memcached.scale.log" 2>&1 &
        sc_mc_pid=$!
        for _i in $(seq 1 200); do
            if port_open "$port"; then SC_MC_PORT=$port; break; fi
            kill -0 "$sc_mc_pid" 2>/dev/null || break
            sleep 0.02
        done
        [ -z "$SC_MC_PORT" ] || break
        stop_sc_mc
    done
    [ -n "$SC_MC_PORT" ] || { cat "$out/memcached.scale.log" >&2; fail "scale: could not start memcached on a free loopback port"; }
    note "scale: memcached_bench $SC_MC_PORT --scale 5 (about 90 s)"
    "$out/memcached_bench" "$SC_MC_PORT" --scale 5 >"$out/mcscale" 2>"$out/err.mcscale" \
        || { cat "$out/err.mcscale" >&2; fail "memcached_bench --scale failed"; }
    stop_sc_mc
    MS_SIZES="1 10 100 1000 10000 100000"
    ms_med() { awk -v s="$1/$2" '$1 == "scale" && $2 == s { print $3 }' "$out/mcscale" | median; }
    mlab() { case $1 in flash) echo "flash: gather of N get_by_id, one op" ;; flash_mb) echo "flash, default max_batch (1k keys/op)" ;;
        raw) echo "flash backend alone: one GET op" ;; libmc) echo "libmemcached mget + fetch" ;; esac; }
    echo
    echo "== scale: the full path over memcached, ns per key for N keys per tick (bench/memcached_bench --scale 5:"
    echo "   each sample N keys repeated up to 20,000 keys, medians of 5 interleaved samples; client and server share the cores)"
    echo
    srow "keys per tick" 1 10 100 1k 10k 100k
    srow "----------------------------------------" "--------" "--------" "--------" "--------" "--------" "--------"
    for row in flash flash_mb raw libmc; do
        c=("$(mlab "$row")"); for n in $MS_SIZES; do c+=("$(fmt "$(ms_med "$row" "$n")" 0)"); done; srow "${c[@]}"
    done
    echo
    for row in flash flash_mb libmc; do
        v1k=$(ms_med "$row" 1000); v100k=$(ms_med "$row" 100000); vmin=$v1k
        for n in 100 1000; do v=$(ms_med "$row" "$n"); awk -v v="$v" -v m="$vmin" 'BEGIN { exit !(v < m) }' && vmin=$v; done
        verdict=$(awk -v a="$vmin" -v b="$v100k" 'BEGIN { if (a == "nan" || b == "nan") print "n/a"; else if (b <= 1.25 * a) print "met"; else printf "NOT met (%.1fx from the best of 100..1k to 100k)", b / a }')
        echo "   $(mlab "$row"): flat or falling from 1k to 100k keys per tick (within 25%): $verdict"
    done
    echo "   causes, measured: (1) every row that sends one command for all N keys, libmemcached included, rises most:"
    echo "   one multi-key line of N keys and a reply of N values (~6 MB at 100k) through the socket buffers, on a server"
    echo "   sharing the 2 cores; flash's default max_batch (1,000-key ops, pipelined) avoids that part. (2) What is left"
    echo "   in that row is the client's memory, not its instructions (the memcached part's callgrind column: the same"
    echo "   instructions/key at 1k and 10k keys): the request's memo entries, decoded rows and value bytes outgrow the L2 and"
    echo "   the L3 as N grows, the effect the loader sweep above isolates (the loader alone: $(fmt "$(sc_med scale 1000)" 1) ns/load at"
    echo "   1k, $(fmt "$(sc_med scale 100000)" 1) at 100k in this run). Next step: a request that big is better served as several"
    echo "   requests (a context reset between them keeps the working set in cache)."
fi

# ==== part 4 (not default): the PostgreSQL change stream into memcached ==========
# BENCH_PARTS=changes: initdb a cluster (wal_level=logical) in a temp dir and a
# memcached, both on free loopback ports, then bench/changes_bench.c
# min(BENCH_RUNS, 3) times (medians). Not in the default parts: it needs
# PostgreSQL's server binaries and a few seconds of setup.
if has_part changes; then
    pg_bin=${FLASH_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
    [ -x "$pg_bin/initdb" ] || fail "no PostgreSQL server binaries (set FLASH_PG_BIN): the changes part cannot run"
    pgdir=$(mktemp -d /tmp/flash-bench-pg-XXXXXX)
    pg_user=()
    if as_root; then chown postgres "$pgdir" 2>/dev/null || chown nobody "$pgdir"; pg_user=(runuser -u "$(stat -c %U "$pgdir")" --); fi
    cpid=""; cmc=""
    stop_changes() {
        [ -z "$cpid" ] || "${pg_user[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null 2>&1 || true
        [ -z "$cmc" ] || { kill "$cmc" 2>/dev/null; wait "$cmc" 2>/dev/null; } || true
        rm -rf "$pgdir"
    }
    trap stop_changes EXIT
    port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    "${pg_user[@]}" "$pg_bin/initdb" -D "$pgdir/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >"$pgdir/initdb.log" 2>&1 \
        || { cat "$pgdir/initdb.log" >&2; fail "initdb failed"; }
    PG_PORT=$((20000 + RANDOM % 30000))
    "${pg_user[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/pg.log" -w -o "-p $PG_PORT -k $pgdir -c listen_addresses=127.0.0.1 \
        -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off -c synchronous_commit=off \
        -c full_page_writes=off -c shared_buffers=128MB" start >/dev/null 2>&1 || { cat "$pgdir/pg.log" >&2; fail "postgres did not start"; }
    cpid=1
    CMC_PORT=$((20000 + RANDOM % 30000))
    mc_user=(); as_root && mc_user=(-u nobody)
    memcached -l 127.0.0.1 -p "$CMC_PORT" -U 0 -m 256 ${mc_user[@]+"${mc_user[@]}"} >/dev/null 2>&1 &
    cmc=$!
    for _i in $(seq 1 200); do port_open "$CMC_PORT" && break; sleep 0.02; done
    port_open "$CMC_PORT" || fail "memcached did not start"
    CRUNS=$((RUNS < 3 ? RUNS : 3))
    note "postgres (wal_level=logical) on $PG_PORT, memcached on $CMC_PORT; $CRUNS runs of changes_bench"
    rm -f "$out"/changes.*
    for r in $(seq 1 "$CRUNS"); do
        "$out/changes_bench" "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" "$CMC_PORT" >"$out/changes.$r" 2>"$out/err.changes.$r" \
            || { cat "$out/err.changes.$r" >&2; fail "changes_bench failed in run $r"; }
    done
    cval() { awk -v k="$1" -v f="$2" '$1 == k { for (i = 2; i < NF; i++) if ($i == f) print $(i + 1) }' "$out"/changes.[0-9]* | median; }
    bulk=$(cval bulk rows_per_s); dec=$(cval decode rows_per_s); ratio=$(cval ratio "decode_per_s/bulk_per_s")
    load=$(cval load rows_per_s); p50=$(cval lag p50_ms); p99=$(cval lag p99_ms)
    echo
    echo "== change stream -> memcached (bench/changes_bench.c; medians of $CRUNS runs; $(nproc 2>/dev/null || echo '?') cores shared by postgres, memcached and the consumer)"
    echo "   $(grep -m1 '^# flash' "$out/changes.1" | sed 's/^# //')"
    printf '   %-62s %12s\n' "bulk UPDATE, row changes/s (2 keys each, acknowledged)" "$(fmt "$bulk" 0)"
    printf '   %-62s %12s\n' "decoding the same stream alone, row changes/s" "$(fmt "$dec" 0)"
    printf '   %-62s %12s\n' "decode alone / with invalidation (the cost of invalidating)" "$(fmt "$ratio" 2)x"
    printf '   %-62s %12s\n' "100-row transactions back to back, row changes/s" "$(fmt "$load" 0)"
    printf '   %-62s %12s\n' "  lag of each applied batch (oldest commit -> applied), p50 ms" "$(fmt "$p50" 0)"
    printf '   %-62s %12s\n' "  p99 ms" "$(fmt "$p99" 0)"
    verdict=$(awk -v x="$bulk" 'BEGIN { if (x == "nan" || x == "") print "n/a"; else if (x >= 50000) print "met"; else print "NOT met" }')
    echo "   target >= 50,000 row changes/s (bulk): $verdict"
fi

# ==== hotkeys (on demand): leases, stale serving, the gutter pool ===============
if has_part hotkeys; then
    HRUNS=$((RUNS < 3 ? RUNS : 3))
    note "$HRUNS runs of hotkey_bench (it starts its own memcached servers)"
    rm -f "$out"/hotkeys.*
    for r in $(seq 1 "$HRUNS"); do
        "$out/hotkey_bench" "$(command -v memcached)" 20 >"$out/hotkeys.$r" 2>"$out/err.hotkeys.$r" \
            || { cat "$out/err.hotkeys.$r" >&2; fail "hotkey_bench failed in run $r"; }
    done
    hval() { awk -v p="$1" -v v="$2" -v f="$3" '$1 == p && $2 == v { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == f) print kv[2] } }' "$out"/hotkeys.[0-9]* | median; }
    echo
    echo "== hot keys over memcached (bench/hotkey_bench.c; medians of $HRUNS runs; 4 reader processes x 16 requests; a source read takes 5 ms)"
    printf '   %-66s %10s %10s\n' "one cold key, 64 requests at once: source reads" "plain" "leases"
    printf '   %-66s %10s %10s\n' "  median of 20 rounds" "$(fmt "$(hval herd plain source_reads_median)" 0)" "$(fmt "$(hval herd leases source_reads_median)" 0)"
    printf '   %-66s %10s %10s\n' "  worst round" "$(fmt "$(hval herd plain source_reads_max)" 0)" "$(fmt "$(hval herd leases source_reads_max)" 0)"
    echo "   a hot key invalidated every 2 s under ~40k reads/s (5 invalidations):"
    printf '   %-22s %14s %12s %14s %12s %12s\n' "" "source reads" "writer ops" "reader writes" "stale age" "stale age"
    printf '   %-22s %14s %12s %14s %12s %12s\n' "" "/ invalidation" "/ inval." "/ inval." "p99 ms <=" "max ms"
    for v in markers leases allowtime allowtime+leases; do
        printf '   %-22s %14s %12s %14s %12s %12s\n' "$v" "$(fmt "$(hval inval "$v" source_reads_per_inval)" 2)" \
            "$(fmt "$(hval inval "$v" writer_ops_per_inval)" 2)" "$(fmt "$(hval inval "$v" reader_writes_per_inval)" 1)" \
            "$(fmt "$(hval inval "$v" 'stale_age_p99_ms<')" 0)" "$(fmt "$(hval inval "$v" stale_age_max_ms)" 0)"
    done
    printf '   %-66s %10s %10s\n' "one of 3 servers killed under load: source reads/s in the 3 s after" "no gutter" "gutter"
    printf '   %-66s %10s %10s\n' "" "$(fmt "$(hval gutter no-gutter source_reads_per_s_after_kill)" 0)" "$(fmt "$(hval gutter gutter source_reads_per_s_after_kill)" 0)"
    printf '   %-66s %10s %10s\n' "  reads/s meanwhile" "$(fmt "$(hval gutter no-gutter reads_per_s)" 0)" "$(fmt "$(hval gutter gutter reads_per_s)" 0)"
fi

# ==== http (on demand): many requests, one loop (issue #16 item 4) ==============
if has_part http; then
    make -s -C "$here/.." build/examples/http_server >&2 || fail "could not build the HTTP example"
    echo
    echo "== the HTTP example under wrk (bench/http_bench.sh; memcached + SQLite, one libuv loop, a task per request)"
    for c in 32 1; do
        t=2
        [ "$c" = 1 ] && t=1
        HTTP_BENCH_CONNECTIONS=$c HTTP_BENCH_THREADS=$t "$here/http_bench.sh" >"$out/http.c$c" 2>"$out/err.http.c$c" \
            || { cat "$out/err.http.c$c" >&2; fail "http_bench.sh failed with $c connections"; }
        echo "   -c$c:"
        grep -E '^(run|cold|warm) ' "$out/http.c$c" | sed 's/^/   /'
    done
fi

# ==== issue #16 items 4 and 5: goals no single part prints ======================
echo
echo "== issue #16, items 4 and 5"
if has_part http; then
    awk '$1 == "warm" { printf "   item 4, measured now: %.0f warm requests/s at -c32, %s syscalls per request (-c1: see above)\n", $2, $8 }' "$out/http.c32"
fi
echo "   item 4 target \"operations of concurrent requests leave in one write; >= 1.5x warm requests/s\": writes shared: met"
echo "     (recorded in the README: cache send+recv per request 2.12 -> 0.35 at -c32; the late flush took -c1 from 16.5"
echo "     back to 14.6 syscalls per request); >= 1.5x warm requests/s: NOT met (29.4k -> 29.0k, within the noise)."
echo "     Cause, measured: the server's cache I/O was a small part of its work (4.5 of 4.8 syscalls per request are the"
echo "     HTTP side's), and server, wrk and memcached share 2 cores. Next step: the HTTP side's reads/writes/epoll,"
echo "     measured on a machine where the server has a core of its own."
loops_over=""
for f in "$here"/../backends/loop/*.h; do
    n=$(wc -l <"$f")
    printf '   item 5: %-24s %4d lines\n' "backends/loop/$(basename "$f")" "$n"
    [ "$n" -le 250 ] || loops_over="$loops_over $(basename "$f")"
done
if [ -z "$loops_over" ]; then
    echo "   item 5 target \"each loop adapter <= 250 lines, the rest in flash.h's kit (flash_loop_kit)\": met"
else
    echo "   item 5 target \"each loop adapter <= 250 lines\": NOT met for$loops_over (poll.h is the loop itself, not an adapter of a library)"
fi

exit $status
