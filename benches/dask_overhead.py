#!/usr/bin/env python3
"""Overhead of rpool.distributed.Pool (Dask) beside rpool.Pool on the same workloads.

Both pools have 2 single-threaded worker processes on this machine: `rpool.Pool(2)` and
`rpool.distributed.Pool(processes=2)`, which starts a loopback Dask LocalCluster. Every workload
runs through both, alternating which goes first, and the median of the repetitions is printed
with the cost per task or per chunk and the ratio distributed / local (above 1: Dask is slower).
On a real cluster add the network to the distributed numbers.

This is a measuring tool, not a test: it exits non-zero only when a workload returns a wrong result.

    python benches/dask_overhead.py               # full run (about a minute)
    python benches/dask_overhead.py --quick       # tiny sizes, one repetition (CI smoke run)
    python benches/dask_overhead.py --json out.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = 2

FULL = dict(reps=5, apply_calls=200, async_n=2000, map1_n=2000, mapd_n=200_000, imap_n=20_000, cpu_tasks=8, cpu_ms=50)
QUICK = dict(reps=1, apply_calls=20, async_n=100, map1_n=100, mapd_n=5_000, imap_n=1_000, cpu_tasks=4, cpu_ms=20)


def _make_tasks_importable():
    """Workers (spawned by Dask's nanny) must import bench_tasks: put it on both paths."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if HERE not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([HERE, *parts])


def _check(got, expected, what):
    if got != expected:
        raise AssertionError(f"{what}: wrong result")


def make_workloads(P, spin_per_ms):
    """name -> (unit, run(pool) -> (seconds, count)); the table shows seconds / count in `unit`."""
    import bench_tasks as T

    def apply_latency(pool):
        start = time.perf_counter()
        for i in range(P["apply_calls"]):
            _check(pool.apply(T.noop, (i,)), i, "apply")
        return time.perf_counter() - start, P["apply_calls"]

    def apply_async_throughput(pool):
        n = P["async_n"]
        start = time.perf_counter()
        results = [pool.apply_async(T.square, (i,)) for i in range(n)]
        _check([r.get(timeout=600) for r in results], [i * i for i in range(n)], "apply_async")
        return time.perf_counter() - start, n

    def map_one_per_chunk(pool):
        n = P["map1_n"]
        start = time.perf_counter()
        _check(pool.map(T.square, range(n), chunksize=1), [i * i for i in range(n)], "map chunksize=1")
        return time.perf_counter() - start, n

    def map_default_chunks(pool):
        n = P["mapd_n"]
        start = time.perf_counter()
        _check(pool.map(T.square, range(n)), [i * i for i in range(n)], "map")
        return time.perf_counter() - start, WORKERS * 4  # the stdlib rule makes 4 chunks per worker

    def imap_unordered_chunks_of_100(pool):
        n = P["imap_n"]
        start = time.perf_counter()
        _check(sorted(pool.imap_unordered(T.square, range(n), chunksize=100)), [i * i for i in range(n)], "imap")
        return time.perf_counter() - start, -(-n // 100)

    def cpu_bound(pool):
        n = P["cpu_tasks"]
        spins = [int(spin_per_ms * P["cpu_ms"])] * n
        start = time.perf_counter()
        _check(pool.map(T.spin, spins, chunksize=1), [T.spin(spins[0])] * n, "cpu")
        elapsed = time.perf_counter() - start
        # Report the time beyond a perfect split of the work over the workers, per task.
        return elapsed - n * P["cpu_ms"] / 1000 / WORKERS, n

    return {
        "apply (one at a time)": ("us/task", apply_latency),
        "apply_async (all at once)": ("us/task", apply_async_throughput),
        "map, chunksize=1": ("us/chunk", map_one_per_chunk),
        "map, default chunks": ("ms/chunk", map_default_chunks),
        "imap_unordered, chunksize=100": ("us/chunk", imap_unordered_chunks_of_100),
        "cpu-bound map, time over ideal": ("ms/task", cpu_bound),
    }


def _calibrate_spin():
    import bench_tasks as T

    n = 200_000
    start = time.perf_counter()
    T.spin(n)
    return n / ((time.perf_counter() - start) * 1000)


def _warm(pool):
    import bench_tasks as T

    seen, deadline = set(), time.monotonic() + 60
    while len(seen) < WORKERS and time.monotonic() < deadline:
        seen.update(pool.map(T.sleepy_pid, [0.01] * (2 * WORKERS), chunksize=1))
    if len(seen) < WORKERS:
        raise RuntimeError(f"only {len(seen)} of {WORKERS} workers answered")


def _startup(make_pool):
    import bench_tasks as T

    start = time.perf_counter()
    pool = make_pool()
    try:
        _check(pool.apply(T.noop, (1,)), 1, "startup")
        return time.perf_counter() - start
    finally:
        pool.terminate()
        pool.join()


_SCALE = {"us": 1e6, "ms": 1e3}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    P = QUICK if args.quick else FULL
    _make_tasks_importable()
    import rpool
    import rpool.distributed

    makers = {"local": lambda: rpool.Pool(WORKERS), "distributed": lambda: rpool.distributed.Pool(processes=WORKERS)}
    print(f"rpool.Pool({WORKERS}) vs rpool.distributed.Pool(processes={WORKERS}) on a loopback Dask LocalCluster")
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {P['reps']} repetition(s), medians\n")

    startup = {name: [] for name in makers}
    for rep in range(P["reps"]):
        for name in sorted(makers, reverse=rep % 2 == 1):
            startup[name].append(_startup(makers[name]))

    workloads = make_workloads(P, _calibrate_spin())
    samples = {(w, name): [] for w in workloads for name in makers}
    pools = {name: make() for name, make in makers.items()}
    try:
        for pool in pools.values():
            _warm(pool)
        for rep in range(P["reps"]):
            for workload, (_, run) in workloads.items():
                for name in sorted(pools, reverse=rep % 2 == 1):
                    seconds, count = run(pools[name])
                    samples[workload, name].append(seconds / count)
    finally:
        for pool in pools.values():
            pool.terminate()
            pool.join()

    rows = [("start a pool, first result", "ms", {n: statistics.median(s) for n, s in startup.items()})]
    rows += [(w, unit.split("/")[0], {n: statistics.median(samples[w, n]) for n in makers}) for w, (unit, _) in workloads.items()]
    units = {"start a pool, first result": "ms"} | {w: unit for w, (unit, _) in workloads.items()}
    print(f"{'workload':34} {'unit':>9} {'local':>10} {'distributed':>12} {'ratio':>7}")
    report = []
    for workload, scale, med in rows:
        local, dist = med["local"] * _SCALE[scale], med["distributed"] * _SCALE[scale]
        ratio = dist / local if local > 0 else float("nan")
        print(f"{workload:34} {units[workload]:>9} {local:10.1f} {dist:12.1f} {ratio:7.1f}")
        report.append({"workload": workload, "unit": units[workload], "local": local, "distributed": dist})
    print("\nratio = distributed / local; cpu-bound shows the time beyond a perfect split (noisy, can be < 0).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "cpus": os.cpu_count(), "params": P, "results": report}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
