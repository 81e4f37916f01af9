#!/usr/bin/env python3
"""Benchmark rpool.Pool against multiprocessing.Pool.

Runs the same workloads through both libraries in one process with the same
start method, interleaving the repetitions (the library that goes first
alternates), and prints the median of each workload for each library and the
ratio between them, with issue #4's target for each workload and whether it
is met.  It also measures a few machine floors, so the numbers can be read
against what the hardware and the interpreter allow.  The memory, lazy-input
and startup workloads run in fresh interpreters; lazy input is time-bounded.

This is a measuring tool, not a test: it exits non-zero only when a workload
raises or returns a wrong result.

    python benches/vs_stdlib.py                    # full run (a few minutes)
    python benches/vs_stdlib.py --quick            # tiny sizes, 1 repetition (CI)
    python benches/vs_stdlib.py --method spawn --json out.json --plot out.png
    python benches/vs_stdlib.py --only stdlib      # without rpool
    python benches/vs_stdlib.py --select 'apply|map'  # some workloads only
"""
import argparse
import contextlib
import faulthandler
import json
import multiprocessing
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
POOL_SIZE = 2
MiB = 1 << 20

FULL = dict(
    reps=5,
    apply_calls=2000,
    async_n=20_000,
    map1_n=20_000,
    mapd_n=1_000_000,
    imap_k=50_000,
    payload_mib=64,
    payload_calls=3,
    cpu_tasks=16,
    cpu_ms=50,
    floor_rounds=20_000,
    mem_pending=1_000_000,
    lazy_items=10_000_000,
    lazy_seconds=3.0,
    slow_reps=3,
    timeout=2400,
)
QUICK = dict(
    reps=1,
    apply_calls=100,
    async_n=1000,
    map1_n=1000,
    mapd_n=10_000,
    imap_k=10_000,
    payload_mib=16,
    payload_calls=1,
    cpu_tasks=4,
    cpu_ms=50,
    floor_rounds=2000,
    mem_pending=20_000,
    lazy_items=10_000_000,
    lazy_seconds=0.5,
    slow_reps=1,
    timeout=300,
)


def _make_tasks_importable():
    """Workers must be able to import bench_tasks, whatever the start method."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    old = os.environ.get("PYTHONPATH")
    parts = old.split(os.pathsep) if old else []
    if HERE not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + parts)


# --------------------------------------------------------------------------
# machine floors


def floor_pipe_roundtrip_us(rounds):
    """Median round trip of one byte between two processes (os.pipe + os.fork)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: echo every byte back until EOF
        try:
            os.close(w1)
            os.close(r2)
            while True:
                b = os.read(r1, 1)
                if not b:
                    break
                os.write(w2, b)
        finally:
            os._exit(0)
    os.close(r1)
    os.close(w2)
    samples = []
    try:
        for i in range(rounds + 100):
            t = time.perf_counter_ns()
            os.write(w1, b"x")
            os.read(r2, 1)
            if i >= 100:  # skip warm-up
                samples.append(time.perf_counter_ns() - t)
    finally:
        os.close(w1)
        os.close(r2)
        os.waitpid(pid, 0)
    return statistics.median(samples) / 1000


def floor_pickle_us():
    """pickle.dumps + pickle.loads of a small tuple, microseconds per pair."""
    obj = (12345, 2.5, "abc", None, (1, 2))
    n = 100_000
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) / n * 1e6


def floor_memcpy_mib_s(size=64 * MiB):
    """Copy a 64 MiB bytearray into another (pages already touched)."""
    src = bytearray(b"\x01") * size
    dst = bytearray(b"\x02") * size
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        dst[:] = src
        runs.append(time.perf_counter() - t)
    assert dst == src
    return size / MiB / statistics.median(runs)


def floor_interpreter_ms(reps):
    """Start and exit a fresh interpreter: `python -c pass`."""
    runs = []
    for _ in range(max(reps, 3)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1000


# --------------------------------------------------------------------------
# memory workloads: each runs in a fresh interpreter (formatted with str.format,
# hence the doubled braces) and prints one line of JSON with "value" and notes.

_SCRIPT_HELPERS = """
import json, os, sys, time
import bench_tasks as T
from {lib} import get_context

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def reset_peak():
    # Writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

def worker_pids(pool):
    if hasattr(pool, "_core"):
        return list(pool._core.worker_pids())
    return [p.pid for p in pool._pool]

def warm_pool():
    pool = get_context("{method}").Pool({pool_size})
    pool.map(T.sleepy_pid, [0.01] * (4 * {pool_size}), 1)
    return pool

def leave(pool, result):
    # Print, then kill the workers and exit at once: an orderly shutdown of a pool with a
    # million queued tasks, or a 10-million-item generator, is not what is measured here.
    print(json.dumps(result), flush=True)
    for pid in worker_pids(pool):
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    os._exit(0)
"""

# Both workers are kept busy, then `mem_pending` tiny tasks are submitted; the value is how much
# the parent's peak resident set grew (tasks, result objects, the library's bookkeeping).
PENDING_MEMORY_SCRIPT = _SCRIPT_HELPERS + """
pool = warm_pool()
held = [pool.apply_async(T.hold, (120,)) for _ in range({pool_size})]
time.sleep(0.5)
before = rss_mib()
exact = reset_peak()
t = time.perf_counter()
pending = [pool.apply_async(T.noop, (i,)) for i in range({mem_pending})]
submit_s = time.perf_counter() - t
time.sleep(0.5)
after = rss_mib()
peak = peak_mib() if exact else after
ready = sum(r.ready() for r in pending[:1000])
leave(pool, dict(value=peak - before, rss_growth_after=after - before, submit_s=submit_s,
                 first_1000_ready=ready, peak_exact=exact))
"""

# A warm pool at rest: the mean private memory (USS: Private_Clean + Private_Dirty) of its workers.
WORKER_MEMORY_SCRIPT = _SCRIPT_HELPERS + """
pool = warm_pool()
time.sleep(0.3)
uss, rss = [], []
for pid in worker_pids(pool):
    fields = {{}}
    with open(f"/proc/{{pid}}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[-1] == "kB":
                fields[key] = int(parts[0])
    uss.append((fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024)
    rss.append(fields.get("Rss", 0) / 1024)
leave(pool, dict(value=sum(uss) / len(uss), rss_mib=sum(rss) / len(rss)))
"""

# IMAP over a generator of `lazy_items` items, consumed slowly (one result per ms) for
# `lazy_seconds` (the run is time-bounded: the generator is never exhausted). The value is the
# parent's peak RSS growth; the notes say how far the generator was read ahead of the consumer.
LAZY_INPUT_SCRIPT = _SCRIPT_HELPERS + """
read = [0]
def items():
    for i in range({lazy_items}):
        read[0] = i + 1
        yield i

pool = warm_pool()
time.sleep(0.2)
before = rss_mib()
exact = reset_peak()
results = pool.IMAP(T.square, items())
consumed = 0
deadline = time.monotonic() + {lazy_seconds}
while time.monotonic() < deadline:
    value = next(results)
    if "IMAP" == "imap" and value != consumed * consumed:
        raise AssertionError(f"imap yielded {{value}} for item {{consumed}}")
    consumed += 1
    time.sleep(0.001)
peak = peak_mib() if exact else rss_mib()
leave(pool, dict(value=peak - before, read_ahead=read[0] - consumed, consumed=consumed,
                 generator_items={lazy_items}, peak_exact=exact))
"""


# --------------------------------------------------------------------------
# workloads: each run returns one sample (a float) and raises on a wrong result


class Target:
    """The issue's target for a workload, and whether a row of results meets it."""

    def __init__(self, text, ratio=None, value=None, slack=0.0):
        self.text = text
        self.ratio = ratio  # rpool vs mp must be at least this
        self.value = value  # or: rpool's own value must be at least this (higher is better)
        self.slack = slack  # lower-is-better values: rpool may exceed mp by this much (noise)

    def met(self, med, ratio, higher_is_better):
        rp, mp = med.get("rpool"), med.get("multiprocessing")
        if rp is None:
            return None
        if self.value is not None:
            return rp >= self.value
        if mp is None or ratio is None:
            return None
        if self.slack and not higher_is_better:
            return rp <= mp * (1 / self.ratio) + self.slack
        return ratio >= self.ratio


class Workload:
    def __init__(self, name, unit, higher_is_better, run, needs_pool=True, target=None, reps=None):
        self.name = name
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.run = run  # run(ctx) -> float
        self.needs_pool = needs_pool
        self.target = target
        self.reps = reps  # fewer repetitions for slow workloads (None: all)


@contextlib.contextmanager
def warm_pool(ctx, closes_itself=False):
    """A Pool(POOL_SIZE) whose workers have all started and run a task.

    On success the pool is closed and joined (unless the body already did);
    on any error it is terminated so that a broken pool cannot hang the run.
    """
    import bench_tasks

    pool = ctx.Pool(POOL_SIZE)
    try:
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < POOL_SIZE and time.monotonic() < deadline:
            seen.update(pool.map(bench_tasks.sleepy_pid, [0.005] * (2 * POOL_SIZE), 1))
        for _ in range(2 * POOL_SIZE):
            if pool.apply(bench_tasks.noop, (1,)) != 1:
                raise AssertionError("warm-up apply returned a wrong value")
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    if not closes_itself:
        pool.close()
        pool.join()


def make_workloads(P, method):
    import bench_tasks as T

    notes = {}  # what the subprocess workloads report beside their value, per library

    def apply_latency(ctx):
        with warm_pool(ctx) as pool:
            for _ in range(20):
                pool.apply(T.noop, (0,))
            samples = []
            for i in range(P["apply_calls"]):
                t = time.perf_counter_ns()
                r = pool.apply(T.noop, (i,))
                samples.append(time.perf_counter_ns() - t)
                if r != i:
                    raise AssertionError(f"apply(noop, ({i},)) returned {r!r}")
        return statistics.median(samples) / 1000

    def async_throughput(ctx):
        n = P["async_n"]
        got = []
        with warm_pool(ctx, closes_itself=True) as pool:
            t = time.perf_counter()
            for i in range(n):
                pool.apply_async(T.square, (i,), callback=got.append)
            pool.close()
            pool.join()
            elapsed = time.perf_counter() - t
        if len(got) != n or sum(got) != sum(i * i for i in range(n)):
            raise AssertionError(f"{len(got)} of {n} callbacks ran or results are wrong")
        return n / elapsed

    def timed_map(n, chunksize):
        def run(ctx):
            with warm_pool(ctx) as pool:
                t = time.perf_counter()
                if chunksize is None:
                    out = pool.map(T.square, range(n))
                else:
                    out = pool.map(T.square, range(n), chunksize)
                elapsed = time.perf_counter() - t
            if out != [i * i for i in range(n)]:
                raise AssertionError("map returned wrong results")
            return n / elapsed

        return run

    def imap_unordered(ctx):
        k = P["imap_k"]
        with warm_pool(ctx) as pool:
            t = time.perf_counter()
            out = list(pool.imap_unordered(T.square, range(k), 100))
            elapsed = time.perf_counter() - t
        if sorted(out) != [i * i for i in range(k)]:
            raise AssertionError("imap_unordered returned wrong results")
        return k / elapsed

    payload_bytes = b"\x01" * (P["payload_mib"] * MiB)
    payload_bytearray = bytearray(payload_bytes)

    def large_payload(payload, func, mib_moved):
        # MiB/s of payload moved: `len` moves it one way, `identity` there and back again.
        def run(ctx):
            samples = []
            with warm_pool(ctx) as pool:
                for _ in range(P["payload_calls"]):
                    t = time.perf_counter()
                    r = pool.apply(func, (payload,))
                    samples.append(time.perf_counter() - t)
                    if func is len and r != len(payload):
                        raise AssertionError(f"apply(len, (payload,)) returned {r!r}")
                    if func is T.identity and (type(r) is not type(payload) or r != payload):
                        raise AssertionError("the echoed payload differs from the one sent")
                    del r
            return mib_moved / statistics.median(samples)

        return run

    def in_subprocess(script, what):
        """Run `script` (formatted with lib, method, P) in a fresh interpreter; it prints JSON."""

        def run(lib_module):
            code = script.format(lib=lib_module, method=method, pool_size=POOL_SIZE, **P)
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=P["timeout"] / 4
            )
            if proc.returncode != 0:
                raise AssertionError(f"{what} script failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            notes.setdefault(what, {})[lib_module] = out
            return out["value"]

        return run

    # Calibrate the CPU-bound task in this process: spin(n) takes ~cpu_ms.
    n = 50_000
    while True:
        t = time.perf_counter()
        T.spin(n)
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        n *= 4
    spin_n = max(1, int(n * (P["cpu_ms"] / 1000) / dt))
    spin_expected = T.spin(spin_n)
    workers = min(POOL_SIZE, os.cpu_count() or 1)

    def cpu_bound(ctx):
        # Efficiency = time the workers spent in the tasks (measured in the
        # workers) / (usable workers x wall time of the map).  100% means the
        # pool added no overhead and never left a worker idle.
        tasks = P["cpu_tasks"]
        with warm_pool(ctx) as pool:
            t = time.perf_counter()
            out = pool.map(T.timed_spin, [spin_n] * tasks, 1)
            elapsed = time.perf_counter() - t
        if [acc for acc, _ in out] != [spin_expected] * tasks:
            raise AssertionError("spin returned wrong results")
        busy = sum(seconds for _, seconds in out)
        return 100.0 * busy / (workers * elapsed)

    def startup(start_method):
        def run(lib_module):
            code = (
                "import sys\n"
                f"from {lib_module} import get_context\n"
                f"pool = get_context({start_method!r}).Pool({POOL_SIZE})\n"
                "assert pool.apply(abs, (-3,)) == 3\n"
                "pool.close()\n"
                "pool.join()\n"
            )
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            elapsed = time.perf_counter() - t
            if proc.returncode != 0:
                raise AssertionError(f"startup script failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            return elapsed * 1000

        return run

    mib = P["payload_mib"]
    bytes_target = Target(">=4x", ratio=4)
    buffer_target = Target(">=10x", ratio=10)
    wl = [
        Workload(
            f"apply latency (median of {P['apply_calls']})", "us/call", False, apply_latency,
            target=Target(">=5x", ratio=5),
        ),
        Workload(
            f"apply_async+callback x{P['async_n']}, close+join", "tasks/s", True, async_throughput,
            target=Target(">=6x", ratio=6),
        ),
        Workload(
            f"map chunksize=1 x{P['map1_n']}", "items/s", True, timed_map(P["map1_n"], 1),
            target=Target(">=5x", ratio=5),
        ),
        Workload(
            f"map default chunks x{P['mapd_n']}", "items/s", True, timed_map(P["mapd_n"], None),
            target=Target(">=1.3x", ratio=1.3),
        ),
        Workload(
            f"imap_unordered(.., {P['imap_k']}, 100)", "items/s", True, imap_unordered,
            target=Target(">=3x", ratio=3),
        ),
        Workload(
            f"apply(len, {mib} MiB bytes)", "MiB/s", True, large_payload(payload_bytes, len, mib),
            target=bytes_target,
        ),
        Workload(
            f"echo {mib} MiB bytes (there and back)", "MiB/s", True,
            large_payload(payload_bytes, T.identity, 2 * mib), target=bytes_target,
        ),
        Workload(
            f"apply(len, {mib} MiB bytearray)", "MiB/s", True, large_payload(payload_bytearray, len, mib),
            target=buffer_target,
        ),
        Workload(
            f"echo {mib} MiB bytearray (there and back)", "MiB/s", True,
            large_payload(payload_bytearray, T.identity, 2 * mib), target=buffer_target,
        ),
        Workload(
            f"CPU-bound {P['cpu_tasks']}x{P['cpu_ms']}ms, {workers} workers",
            "% ideal",
            True,
            cpu_bound,
            target=Target(">=95%", value=95),
        ),
        Workload(
            f"parent RSS growth, {P['mem_pending']:,} pending apply_async", "MiB", False,
            in_subprocess(PENDING_MEMORY_SCRIPT, "pending memory"), needs_pool=False,
            target=Target("<= mp", ratio=1, slack=2), reps=P["slow_reps"],
        ),
        Workload(
            "worker USS at rest (private memory, mean)", "MiB", False,
            in_subprocess(WORKER_MEMORY_SCRIPT, "worker memory"), needs_pool=False,
            target=Target("<= mp", ratio=1, slack=0.5), reps=P["slow_reps"],
        ),
    ]
    for fn in ("imap", "imap_unordered"):
        wl.append(
            Workload(
                f"lazy {fn}: parent RSS peak growth, {P['lazy_seconds']:g} s", "MiB", False,
                in_subprocess(LAZY_INPUT_SCRIPT.replace("IMAP", fn), f"lazy {fn}"), needs_pool=False,
                target=Target("flat, <= mp", ratio=1, slack=4), reps=P["slow_reps"],
            )
        )
    # Startup for every start method, in fresh interpreters; the selected one first.
    methods = [method] + [m for m in multiprocessing.get_all_start_methods() if m != method]
    for m in methods:
        target = Target("<= mp", ratio=1) if m == "fork" else Target(">=2x", ratio=2)
        wl.append(
            Workload(f"startup {m}: Pool(2)+1 task+join", "ms", False, startup(m), needs_pool=False, target=target)
        )
    return wl, {"spin_n": spin_n, "cpu_workers": workers}, notes


# --------------------------------------------------------------------------
# driver


def fmt(x):
    if x is None:
        return "-"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def byte_compile_package(module):
    """Write the .pyc files of `module`'s package, as `pip install` does. Without them (an
    editable install under PYTHONDONTWRITEBYTECODE=1, say) every fresh interpreter compiles
    rpool's sources again, while the stdlib's .pyc files exist: startup would be measured
    unfairly. Returns a note for the output."""
    import compileall

    where = os.path.dirname(os.path.abspath(module.__file__))
    try:
        ok = compileall.compile_dir(where, quiet=2)
    except OSError as exc:
        ok, why = False, str(exc)
    else:
        why = "some files could not be written (read-only?)"
    if ok:
        return f"startup: {where} was byte-compiled first (compileall), so both libraries start from .pyc files."
    return f"startup: could not byte-compile {where} ({why}); rpool may be measured without .pyc files."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (for CI)")
    ap.add_argument(
        "--method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help=f"start method for both libraries (default: the interpreter's, {multiprocessing.get_start_method()})",
    )
    ap.add_argument("--reps", type=int, default=None, help="repetitions per workload and library")
    ap.add_argument("--json", metavar="PATH", help="write all results and samples as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)")
    ap.add_argument(
        "--only", choices=["stdlib", "rpool"], default=None, help="run only one library (e.g. while rpool is broken)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="abort the whole run after this many seconds")
    ap.add_argument("--select", metavar="REGEX", help="run only the workloads whose name matches (re.search)")
    args = ap.parse_args(argv)

    P = dict(QUICK if args.quick else FULL)
    if args.reps is not None:
        P["reps"] = max(1, args.reps)
    method = args.method or multiprocessing.get_start_method()
    # A hung pool must not hang CI forever: dump all tracebacks and exit.
    faulthandler.dump_traceback_later(args.timeout or P["timeout"], exit=True)

    _make_tasks_importable()

    libs = []  # (label, module name, context)
    if args.only != "rpool":
        libs.append(("multiprocessing", "multiprocessing", multiprocessing.get_context(method)))
    rpool_version = None
    if args.only != "stdlib":
        try:
            import rpool
        except ImportError as exc:
            print(f"cannot import rpool ({exc}); build it with `pip install .` or use --only stdlib", file=sys.stderr)
            return 2
        rpool_version = getattr(rpool, "__version__", "?")
        libs.append(("rpool", "rpool", rpool.get_context(method)))
    both = len(libs) == 2

    meta = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "start_method": method,
        "pool_size": POOL_SIZE,
        "quick": args.quick,
        "reps": P["reps"],
        "rpool_version": rpool_version,
    }
    print(
        f"vs_stdlib: Python {meta['python']} on {meta['platform']}, {meta['cpu_count']} CPUs, "
        f"start method {method!r}, {P['reps']} rep(s){' (quick)' if args.quick else ''}"
    )

    # Floors first, while this process has no threads and no children.
    print("\nmachine floors:", flush=True)
    floors = {}
    for key, label, unit, f in [
        ("pipe_roundtrip_us", "pipe ping-pong round trip (fork)", "us", lambda: floor_pipe_roundtrip_us(P["floor_rounds"])),
        ("pickle_small_tuple_us", "pickle dumps+loads small tuple", "us", floor_pickle_us),
        ("memcpy_64mib_mib_s", "64 MiB bytearray copy", "MiB/s", floor_memcpy_mib_s),
        ("interpreter_start_ms", "python -c pass", "ms", lambda: floor_interpreter_ms(P["reps"])),
    ]:
        floors[key] = f()
        print(f"  {label:<34} {fmt(floors[key]):>10} {unit}", flush=True)

    workloads, calib, notes = make_workloads(P, method)
    if args.select:
        import re

        workloads = [wk for wk in workloads if re.search(args.select, wk.name)]
    meta.update(calib)
    compile_note = None
    if any(lab == "rpool" for lab, _, _ in libs) and any(wk.name.startswith("startup") for wk in workloads):
        compile_note = byte_compile_package(rpool)
        meta["startup_note"] = compile_note

    names = [lab for lab, _, _ in libs]
    w = max([len(x.name) for x in workloads] + [10])
    header = f"{'workload':<{w}}  {'unit':<8}" + "".join(f"{n:>16}" for n in names)
    if both:
        header += f"{'rpool vs mp':>13}  {'target':<12} {'met?':<8}"
    print(f"\nmedians ({'rpool vs mp > 1 means rpool is better' if both else 'one library only'}):")
    print(header)
    print("-" * len(header), flush=True)

    results = []
    errors = []
    for wk in workloads:
        samples = {lab: [] for lab in names}
        failed = {}
        for rep in range(min(P["reps"], wk.reps or P["reps"])):
            order = libs if rep % 2 == 0 else libs[::-1]
            for lab, modname, ctx in order:
                if lab in failed:
                    continue
                try:
                    samples[lab].append(wk.run(modname if not wk.needs_pool else ctx))
                except Exception as exc:
                    failed[lab] = f"{type(exc).__name__}: {exc}"
                    errors.append(f"{lab}: {wk.name}: {failed[lab]}")
        med = {lab: (statistics.median(samples[lab]) if samples[lab] and lab not in failed else None) for lab in names}
        ratio = None
        if both and med["multiprocessing"] and med["rpool"]:
            mp_v, rp_v = med["multiprocessing"], med["rpool"]
            ratio = rp_v / mp_v if wk.higher_is_better else mp_v / rp_v
        row = f"{wk.name:<{w}}  {wk.unit:<8}" + "".join(
            f"{('ERROR' if lab in failed else fmt(med[lab])):>16}" for lab in names
        )
        met = wk.target.met(med, ratio, wk.higher_is_better) if (both and wk.target) else None
        if both:
            verdict = {True: "met", False: "NOT MET", None: "-"}[met]
            row += f"{(fmt(ratio) + 'x') if ratio else '-':>13}  {wk.target.text if wk.target else '':<12} {verdict:<8}"
        print(row, flush=True)
        results.append(
            {
                "workload": wk.name,
                "unit": wk.unit,
                "higher_is_better": wk.higher_is_better,
                "median": med,
                "samples": samples,
                "errors": failed,
                "ratio_rpool_vs_mp": ratio,
                "target": wk.target.text if wk.target else None,
                "target_ratio": wk.target.ratio if wk.target else None,
                "target_met": met,
            }
        )

    faulthandler.cancel_dump_traceback_later()
    if notes:
        print("\nnotes from the subprocess workloads (last repetition, per library):")
        for what, per_lib in notes.items():
            for lib, out in per_lib.items():
                extra = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in out.items() if k != "value")
                print(f"  {what:<22} {lib:<16} {extra}")
    print(
        "\nlazy input is time-bounded: each run consumes one result per ms for "
        f"{P['lazy_seconds']:g} s from a generator of {P['lazy_items']:,} items (never exhausted); "
        "read_ahead = items taken from the generator but not yet yielded to the consumer."
    )
    if compile_note:
        print(compile_note)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "floors": floors, "results": results, "notes": notes}, fh, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(args.plot, results, meta, both)
    return 1 if errors else 0


def plot(path, results, meta, both):
    if not both:
        print("--plot: needs both libraries; skipped")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; skipped (pip install matplotlib)")
        return
    rows = [r for r in results if r["ratio_rpool_vs_mp"] and r["ratio_rpool_vs_mp"] > 0]
    labels = [r["workload"] for r in rows]
    ratios = [r["ratio_rpool_vs_mp"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.8))
    colors = ["tab:green" if r["target_met"] else ("tab:orange" if x >= 1 else "tab:red") for r, x in zip(rows, ratios)]
    ax.barh(range(len(rows)), ratios, color=colors)
    for i, r in enumerate(rows):
        if r.get("target_ratio"):
            ax.plot([r["target_ratio"]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(ratios[i], i, f" {ratios[i]:.2f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.set_xlabel("rpool vs multiprocessing (>1: rpool better; black tick: the issue's target; green: met)")
    ax.set_title(
        f"rpool vs multiprocessing.Pool, start method {meta['start_method']!r}, Python {meta['python']}, "
        f"{meta['cpu_count']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
