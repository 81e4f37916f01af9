"""What `progress=` costs on `Pool.map` of tiny tasks: the same map with and without a tqdm bar.

    python benches/progress_overhead.py              # 20,000 items, 15 rounds
    python benches/progress_overhead.py --quick      # smoke run

The bar writes to os.devnull so that terminal speed is not measured; runs alternate.
"""

import argparse
import os
import statistics
import time

import rpool


def square(x):
    return x * x


def timed(pool, items, chunksize, progress):
    start = time.perf_counter()
    pool.map(square, range(items), chunksize, progress=progress)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2,000 items, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds = 2_000, 3
    with open(os.devnull, "w") as sink, rpool.Pool(args.processes) as pool:
        print(f"Pool({args.processes}).map(square, range({args.items})), median of {args.rounds} rounds")
        for chunksize in (None, 1):
            plain, with_bar = [], []
            timed(pool, args.items, chunksize, None)  # warm-up
            for i in range(args.rounds):
                runs = [(plain, None), (with_bar, {"file": sink, "mininterval": 0.1})]
                for times, progress in runs if i % 2 == 0 else reversed(runs):
                    times.append(timed(pool, args.items, chunksize, progress))
            a, b = statistics.median(plain), statistics.median(with_bar)
            label = "default chunks" if chunksize is None else f"chunksize={chunksize}"
            print(f"  {label:15} without: {a * 1e3:8.2f} ms   progress=: {b * 1e3:8.2f} ms   ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
