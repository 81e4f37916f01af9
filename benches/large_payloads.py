"""Large payloads, rpool vs multiprocessing.Pool: `apply(len, (x,))` and an echo `apply(echo, (x,))`
of a 64 MiB bytes, bytearray (and numpy array, if numpy is installed).

Both pools run side by side with the same start method; calls alternate between them, and each
row is the median of the repetitions, in MiB/s of payload moved (the echo moves it both ways).

    python benches/large_payloads.py                 # 64 MiB, 9 repetitions, fork
    python benches/large_payloads.py --method spawn --reps 15
    python benches/large_payloads.py --quick         # 2 MiB, 2 repetitions (CI)
"""

import argparse
import multiprocessing
import statistics
import time

MiB = 1 << 20


def echo(x):
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--mib", type=int, default=64, help="payload size in MiB")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="2 MiB, 2 repetitions")
    ap.add_argument("--only", help="run only the workloads whose name contains this")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.reps = 2, 2
    import rpool

    size = args.mib * MiB
    payloads = {"bytes": b"\x01" * size, "bytearray": bytearray(b"\x01") * size}
    try:
        import numpy

        payloads["numpy"] = numpy.ones(size // 8, dtype=numpy.float64)
    except ImportError:
        pass
    ctx = multiprocessing.get_context(args.method)
    pools = {"multiprocessing": ctx.Pool(2), "rpool": rpool.Pool(2, context=ctx)}
    try:
        for pool in pools.values():
            pool.map(echo, range(8), 1)
        print(f"large_payloads: {args.mib} MiB, start method {args.method!r}, {args.reps} repetitions, medians")
        header = f"{'workload':<34}{'multiprocessing':>18}{'rpool':>14}{'rpool vs mp':>13}"
        print(header)
        print("-" * len(header), flush=True)
        for kind, payload in payloads.items():
            for name, func, moved in [("len", len, size), ("echo", echo, 2 * size)]:
                label = f"apply({name}, {args.mib} MiB {kind})"
                if args.only and args.only not in label:
                    continue
                times = {lib: [] for lib in pools}
                for rep in range(args.reps):
                    order = list(pools.items()) if rep % 2 == 0 else list(pools.items())[::-1]
                    for lib, pool in order:
                        t = time.perf_counter()
                        result = pool.apply(func, (payload,))
                        times[lib].append(time.perf_counter() - t)
                        if func is len:
                            assert result == len(payload), (lib, result)
                        else:
                            assert type(result) is type(payload) and len(result) == len(payload), lib
                        del result
                rate = {lib: moved / MiB / statistics.median(t) for lib, t in times.items()}
                ratio = rate["rpool"] / rate["multiprocessing"]
                print(
                    f"{label:<34}{rate['multiprocessing']:>12.0f} MiB/s{rate['rpool']:>8.0f} MiB/s{ratio:>12.2f}x",
                    flush=True,
                )
    finally:
        for pool in pools.values():
            pool.terminate()
            pool.join()


if __name__ == "__main__":
    main()
