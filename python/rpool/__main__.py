"""Command line entry point: ``python -m rpool demo``.

Runs a few small workloads through ``multiprocessing.Pool`` and
``rpool.Pool`` with the same start method and prints their times.
"""
import multiprocessing
import os
import sys
import time

USAGE = """\
usage: python -m rpool demo [--method fork|spawn|forkserver]

commands:
  demo    run a short (< 10 s) side-by-side comparison of
          multiprocessing.Pool and rpool.Pool and print a table of times

For a fuller benchmark see benches/vs_stdlib.py in the source tree.
"""


def _usage(code):
    print(USAGE, end="", file=sys.stdout if code == 0 else sys.stderr)
    return code


# Each workload takes a Pool class (or context-bound factory) and returns
# (seconds, value) where value is checked to be identical between libraries.


def _startup(make_pool):
    from rpool import _demo_tasks as t

    start = time.perf_counter()
    with make_pool() as pool:
        value = pool.apply(t.square, (7,))
        pool.close()
        pool.join()
    return time.perf_counter() - start, value


def _apply_loop(pool, n=300):
    from rpool import _demo_tasks as t

    pool.apply(t.noop, (0,))  # warm up
    start = time.perf_counter()
    values = [pool.apply(t.noop, (i,)) for i in range(n)]
    return time.perf_counter() - start, sum(values)


def _async_callbacks(pool, n=3000):
    from rpool import _demo_tasks as t

    got = []
    start = time.perf_counter()
    results = [pool.apply_async(t.square, (i,), callback=got.append) for i in range(n)]
    values = [r.get(timeout=60) for r in results]
    elapsed = time.perf_counter() - start
    # Callbacks run before get() returns, so all of them have been called.
    return elapsed, (sum(values), sorted(got) == sorted(values))


def _map(pool, n=100_000):
    from rpool import _demo_tasks as t

    start = time.perf_counter()
    values = pool.map(t.square, range(n))
    return time.perf_counter() - start, sum(values)


def _tutorial(make_pool):
    """The examples' workload: 20 x 0.1 s sleeps via apply_async on Pool(4)."""
    from rpool import _demo_tasks as t

    start = time.perf_counter()
    pool = make_pool(4)
    results = [pool.apply_async(t.sleepy, (i,)) for i in range(20)]
    pool.close()
    pool.join()
    return time.perf_counter() - start, [r.get() for r in results]


WORKLOADS = [
    # (label, needs a warm pool?, repetitions, function)
    ("Pool() start + 1 task + close/join", False, 3, _startup),
    ("300 x apply(noop)", True, 3, _apply_loop),
    ("3000 x apply_async(callback=...)", True, 3, _async_callbacks),
    ("map(square, range(100000))", True, 3, _map),
    ("20 x apply_async(sleep 0.1 s), Pool(4)", False, 1, _tutorial),
]


def _run_once(ctx, needs_pool, func):
    """One timed run: (seconds, value). Pool creation for warm-pool workloads is not timed."""
    if not needs_pool:
        return func(ctx.Pool)
    pool = ctx.Pool()
    try:
        pool.apply(_noop_task(), ())  # make sure the workers are up
        return func(pool)
    finally:
        pool.terminate()
        pool.join()


def _noop_task():
    from rpool import _demo_tasks as t

    return t.noop


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _fmt_seconds(s):
    return f"{s * 1000:9.1f} ms" if s < 10 else f"{s:9.2f} s "


def demo(method):
    import rpool

    libraries = [
        ("multiprocessing", multiprocessing.get_context(method)),
        ("rpool", rpool.get_context(method)),
    ]
    print(
        f"rpool demo: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"start method {method!r}, Pool() = {os.cpu_count()} workers"
    )
    print("(median of a few runs, libraries interleaved; benches/vs_stdlib.py measures properly)\n")

    # Untimed warm-up so that neither library pays one-off import costs in the table.
    for _, ctx in libraries:
        with ctx.Pool(1) as pool:
            pool.apply(_noop_task(), ())

    w = max(len(w[0]) for w in WORKLOADS)
    print(f"{'workload':<{w}}  {'multiprocessing':>15}  {'rpool':>15}  {'mp/rpool':>8}")
    print("-" * (w + 44))
    errors = []
    for label, needs_pool, reps, func in WORKLOADS:
        times = {name: [] for name, _ in libraries}
        values = {}
        for rep in range(reps):
            # Alternate which library goes first to avoid order bias.
            order = libraries if rep % 2 == 0 else libraries[::-1]
            for name, ctx in order:
                if name in values and isinstance(values[name], Exception):
                    continue
                try:
                    seconds, value = _run_once(ctx, needs_pool, func)
                except Exception as exc:  # keep going: show what works
                    values[name] = exc
                    errors.append(f"{name}: {label}: {type(exc).__name__}: {exc}")
                    continue
                times[name].append(seconds)
                values[name] = value
        cells, ratio, note = [], "", ""
        for name, _ in libraries:
            ok = not isinstance(values.get(name), Exception) and times[name]
            cells.append(_fmt_seconds(_median(times[name])) if ok else "error")
        if "error" not in cells:
            mp_t, rp_t = _median(times["multiprocessing"]), _median(times["rpool"])
            ratio = f"{mp_t / rp_t:7.2f}x" if rp_t > 0 else "n/a"
            if values["multiprocessing"] != values["rpool"]:
                note = "  <- results differ!"
                errors.append(f"{label}: results differ: {values['multiprocessing']!r} vs {values['rpool']!r}"[:300])
        print(f"{label:<{w}}  {cells[0]:>15}  {cells[1]:>15}  {ratio:>8}{note}", flush=True)
    print("\nmp/rpool > 1 means rpool took less time.")
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _usage(2)
    if argv[0] in ("-h", "--help", "help"):
        return _usage(0)
    if argv[0] != "demo":
        print(f"python -m rpool: unknown command {argv[0]!r}\n", file=sys.stderr)
        return _usage(2)
    method = multiprocessing.get_start_method()
    rest = argv[1:]
    if rest:
        if len(rest) == 2 and rest[0] == "--method" and rest[1] in multiprocessing.get_all_start_methods():
            method = rest[1]
        elif len(rest) == 1 and rest[0].startswith("--method=") and rest[0].split("=", 1)[1] in multiprocessing.get_all_start_methods():
            method = rest[0].split("=", 1)[1]
        else:
            print(f"python -m rpool demo: bad arguments {rest!r}\n", file=sys.stderr)
            return _usage(2)
    return demo(method)


if __name__ == "__main__":
    sys.exit(main())
