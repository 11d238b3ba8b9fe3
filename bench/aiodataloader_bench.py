"""aiodataloader_bench.py -- Python's aiodataloader doing the same work as
loader_bench.c (see there for the scenarios). Optional: run.sh runs it only
when some python3 can import aiodataloader.

usage: python3 aiodataloader_bench.py [reps]
prints "<scenario> <ns_per_load>" reps times per scenario after one warm-up,
and one "check ..." line per scenario (compared with flash's).
"""
import asyncio
import sys
import time

from aiodataloader import DataLoader

N, DUP_UNIQUE, TICKS, PER_TICK = 100000, 50000, 1000, 100
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
if reps < 1:
    sys.exit("usage: aiodataloader_bench.py [reps]")

keys = ["k%d" % i for i in range(N)]

# xorshift32 and Fisher-Yates, bit for bit as in loader_bench.c.
_rng = 2463534242


def rng_next():
    global _rng
    x = _rng
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    _rng = x
    return x


dup_seq = [i % DUP_UNIQUE for i in range(N)]
for i in range(N - 1, 0, -1):
    j = rng_next() % (i + 1)
    dup_seq[i], dup_seq[j] = dup_seq[j], dup_seq[i]

counters = {"calls": 0, "keys": 0}


async def batch_fn(ks):
    """Every key resolves to itself."""
    counters["calls"] += 1
    counters["keys"] += len(ks)
    return ks


results = None


async def run_distinct():
    global results
    loader = DataLoader(batch_load_fn=batch_fn)
    results = await asyncio.gather(*[loader.load(keys[i]) for i in range(N)])


async def run_dup50():
    global results
    loader = DataLoader(batch_load_fn=batch_fn)
    results = await asyncio.gather(*[loader.load(keys[k]) for k in dup_seq])


async def run_ticks():
    global results
    loader = DataLoader(batch_load_fn=batch_fn)
    out = []
    for t in range(TICKS):
        out.append(await asyncio.gather(*[loader.load(keys[t * PER_TICK + j]) for j in range(PER_TICK)]))
    results = out  # flattened by check_results, after the clock stopped


memo_loader = None


async def memo_setup():
    global memo_loader
    memo_loader = DataLoader(batch_load_fn=batch_fn)
    await asyncio.gather(*[memo_loader.load(keys[i]) for i in range(N)])


async def run_memo():
    global results
    results = await asyncio.gather(*[memo_loader.load(keys[i]) for i in range(N)])


SCENARIOS = [
    ("distinct", None, run_distinct, None),
    ("dup50", None, run_dup50, dup_seq),
    ("ticks", None, run_ticks, None),
    ("memo", memo_setup, run_memo, None),
]


def check_results(name, seq):
    """FNV-1a over the result strings, each followed by a 0 byte."""
    global results
    h = 2166136261
    if name == "ticks" and results is not None:
        results = [v for part in results for v in part]
    if results is None or len(results) != N:
        raise SystemExit("aiodataloader_bench: %s: wrong number of results" % name)
    for i in range(N):
        k = seq[i] if seq is not None else i
        r = results[i]
        if r != keys[k]:
            raise SystemExit("aiodataloader_bench: %s: result %d is not key %s" % (name, i, keys[k]))
        for b in r.encode() + b"\0":
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


async def main():
    global results
    try:
        from importlib.metadata import version
        ver = version("aiodataloader")
    except Exception:  # only informative
        ver = "?"
    print("# aiodataloader %s python %s loads_per_scenario=%d reps=%d"
          % (ver, sys.version.split()[0], N, reps), flush=True)
    for name, setup, run, seq in SCENARIOS:
        calls = bkeys = h = 0
        for r in range(-1, reps):  # r == -1: warm-up, not printed
            if setup:
                await setup()
            counters["calls"] = counters["keys"] = 0
            results = None
            t0 = time.perf_counter_ns()
            await run()
            t1 = time.perf_counter_ns()
            calls, bkeys = counters["calls"], counters["keys"]
            h = check_results(name, seq)
            if r >= 0:
                print("%s %.2f" % (name, (t1 - t0) / N), flush=True)
        print("check %s loads=%d batches=%d batch_keys=%d hash=%08x" % (name, N, calls, bkeys, h), flush=True)


asyncio.run(main())
