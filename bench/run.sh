#!/usr/bin/env bash
# flash benchmarks: flash's loader against graphql's dataloader (node, required)
# and Python's aiodataloader (optional), run interleaved on this machine, then
# the memory checks. Prints one table; exits non-zero when a required peer
# could not be run, the peers did different work, or memory grew.
#
#   bench/run.sh [--no-build]
#
# Environment: BENCH_RUNS (default 5, at least 5 for the medians to mean
# anything), BENCH_REPS (timed repetitions per scenario per run, default 11),
# BENCH_PY_REPS (default 3: aiodataloader is slow), DATALOADER_DIR (npm
# prefix for the dataloader package, default bench/out/npm), PYTHON.
#
# Nothing of the peers is committed: npm installs dataloader into
# bench/out/npm (git-ignored) when it is missing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
RUNS=${BENCH_RUNS:-5}
REPS=${BENCH_REPS:-11}
PY_REPS=${BENCH_PY_REPS:-3}
DL_DIR=${DATALOADER_DIR:-$out/npm}
SCENARIOS="distinct dup50 ticks memo"

fail() {
    echo "bench: FAILED: $*" >&2
    exit 1
}
note() { echo "bench: $*" >&2; }

mkdir -p "$out"
if [ "${1:-}" != --no-build ]; then
    make -s -C "$here" build
fi
[ -x "$out/loader_bench" ] && [ -x "$out/memory_bench" ] || fail "bench programs not built"
[ "$RUNS" -ge 1 ] 2>/dev/null || fail "BENCH_RUNS must be a number"
[ "$RUNS" -ge 5 ] || note "BENCH_RUNS=$RUNS: fewer than 5 runs, medians are weak"

as_root() { [ "$(id -u)" = 0 ]; }
apt_ready() {
    # apt-cache knows nothing until the package lists were fetched once.
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 && as_root; then
        apt-get update -qq >/dev/null 2>&1 || true
    fi
}

# ---- node + graphql's dataloader (required) ---------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    as_root && command -v apt-get >/dev/null 2>&1 || fail "node/npm missing and cannot apt-get install them (not root)"
    note "installing nodejs and npm (Debian packages)"
    apt_ready
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null \
        || fail "apt-get install nodejs npm failed"
fi
DL=$DL_DIR/node_modules/dataloader
if ! node -e "require('$DL')" >/dev/null 2>&1; then
    note "installing graphql's dataloader with npm into $DL_DIR"
    mkdir -p "$DL_DIR"
    npm install --prefix "$DL_DIR" --no-save --no-audit --no-fund --loglevel=error dataloader@^2 >&2 \
        || fail "npm install dataloader failed: the dataloader column cannot be measured"
    node -e "require('$DL')" >/dev/null 2>&1 || fail "dataloader installed in $DL_DIR but node cannot load it"
fi

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
rm -f "$out"/flash.* "$out"/node.* "$out"/py.* "$out"/err.*
run_flash() { "$out/loader_bench" "$REPS" >"$out/flash.$1" 2>"$out/err.flash.$1" || { cat "$out/err.flash.$1" >&2; fail "loader_bench (flash) failed"; }; }
run_node() { DATALOADER_PATH=$DL node "$here/dataloader_bench.js" "$REPS" >"$out/node.$1" 2>"$out/err.node.$1" || { cat "$out/err.node.$1" >&2; fail "dataloader_bench.js (node) failed"; }; }
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
        run_flash "$r"; run_node "$r"; [ -z "$PY" ] || run_py "$r"
    else
        [ -z "$PY" ] || run_py "$r"; run_node "$r"; run_flash "$r"
    fi
done

# Same work on every side: same batches, same keys per batch, same results.
checks() { grep '^check ' "$1" || true; }
for r in $(seq 1 "$RUNS"); do
    [ "$(checks "$out/flash.$r" | wc -l)" = 4 ] || fail "loader_bench printed no checks in run $r"
    diff <(checks "$out/flash.$r") <(checks "$out/node.$r") >&2 \
        || fail "flash and dataloader did different work (check lines differ in run $r)"
    if [ -n "$PY" ]; then
        diff <(checks "$out/flash.$r") <(checks "$out/py.$r") >&2 \
            || fail "flash and aiodataloader did different work (check lines differ in run $r)"
    fi
done

# ---- statistics ------------------------------------------------------------------
median() { sort -g | awk '{a[NR] = $1} END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
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
fmt() { awk -v x="$1" -v d="${2:-1}" 'BEGIN { if (x == "nan" || x == "") print "n/a"; else printf "%.*f\n", d, x }'; }

# ---- instructions per load (callgrind: repeatable where seconds are not) -----
declare -A IPL
CG_NOTE=""
if command -v valgrind >/dev/null 2>&1; then
    for s in $SCENARIOS; do
        cg=$out/callgrind.$s.out
        valgrind --tool=callgrind --callgrind-out-file="$cg" --toggle-collect='cg_measure*' \
            "$out/loader_bench" --callgrind "$s" >"$out/callgrind.$s.log" 2>&1 \
            || { cat "$out/callgrind.$s.log" >&2; fail "callgrind run of scenario $s failed"; }
        ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$cg")
        [ -n "$ir" ] && [ "$ir" -gt 0 ] || fail "no instruction count in $cg"
        IPL[$s]=$(awk -v ir="$ir" 'BEGIN { printf "%.0f\n", ir / 100000 }')
    done
    CG_NOTE="instructions/load: callgrind Ir inside one timed-equivalent run (after a warm-up) / 100,000; see bench/out/callgrind.<scenario>.out"
else
    for s in $SCENARIOS; do IPL[$s]="n/a"; done
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
echo
echo "   (c): one context and one loader for all ticks, flash_wait on each tick's gather (the memo grows to 100k)."
echo "   (a)-(c) time a whole request (flash_ctx_reset + loader + loads + gather + wait; peers: new DataLoader + loads"
echo "   + Promise.all / asyncio.gather + await); (d) times only the second pass over resolved keys."
echo "   $CG_NOTE"
[ -n "$PY" ] || echo "   * aiodataloader: n/a (not installable here: $PY_REASON)"
echo
echo "== memory (bench/memory_bench)"
awk '$1 == "memory" {
        name = $2; $1 = ""; $2 = ""; sub(/^  */, "")
        printf "   %-38s %s\n", name, $0
     }' "$out/memory.txt"
[ ! -s "$out/memory.err" ] || cat "$out/memory.err" >&2

status=0
if [ "$mem_rc" = 0 ]; then
    echo "   memory across 100k flash_run cycles: flat (PASS)"
else
    echo "   memory: FAIL (see the FAIL lines above)"
    echo "bench: FAILED: memory_bench (exit $mem_rc)" >&2
    status=1
fi
exit $status
