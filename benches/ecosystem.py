"""Rough timings of rpool's executor, ThreadPool and await against the stdlib equivalents.

    python benches/ecosystem.py [--n 2000]

Prints the median of 5 runs of each workload for both sides. Numbers on a busy machine are noisy.
"""

import argparse
import asyncio
import concurrent.futures as cf
import multiprocessing
import multiprocessing.pool
import statistics
import time

import rpool


def square(x):
    return x * x


def timed(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def executor_workloads(cls, n):
    ctx = multiprocessing.get_context("fork")
    with cls(2, mp_context=ctx) as ex:
        ex.submit(square, 1).result()
        yield "executor submit+result, one at a time (x100)", timed(
            lambda: [ex.submit(square, i).result() for i in range(100)]
        )
        yield f"executor map, chunksize=1 (n={n})", timed(lambda: list(ex.map(square, range(n))))

        async def awaits():
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(n)))

        yield f"run_in_executor, gathered (n={n})", timed(lambda: asyncio.run(awaits()))


def thread_pool_workloads(cls, n):
    with cls(4) as pool:
        yield f"ThreadPool map (n={n * 10})", timed(lambda: pool.map(square, range(n * 10)))
        yield f"ThreadPool apply_async+get (n={n})", timed(
            lambda: [r.get() for r in [pool.apply_async(square, (i,)) for i in range(n)]]
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    n = parser.parse_args().n
    rows = {}
    for side, executor, thread_pool in (
        ("stdlib", cf.ProcessPoolExecutor, multiprocessing.pool.ThreadPool),
        ("rpool", rpool.ProcessPoolExecutor, rpool.ThreadPool),
    ):
        for name, seconds in [*executor_workloads(executor, n), *thread_pool_workloads(thread_pool, n)]:
            rows.setdefault(name, {})[side] = seconds
    print(f"{'workload':50} {'stdlib s':>10} {'rpool s':>10} {'ratio':>7}")
    for name, sides in rows.items():
        print(f"{name:50} {sides['stdlib']:10.4f} {sides['rpool']:10.4f} {sides['stdlib'] / sides['rpool']:7.2f}")


if __name__ == "__main__":
    main()
