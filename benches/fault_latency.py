"""How long rpool takes to report worker faults, per start method.

    python benches/fault_latency.py [--repeat N]

For each fault, a task notes the time just before it dies (or the test kills it) and the parent
notes when `get()` raised; the table gives the median and worst gap in milliseconds. For time
limits it gives how far past its limit the task was when `TaskTimeoutError` arrived. The stdlib
pool is not measured: it never reports these faults (its `get()` waits forever).
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))

import rpool  # noqa: E402
from fault_tasks import die_noting_time, note_time_and_sleep, sleep  # noqa: E402


def gap_ms(path, raised_at):
    with open(path) as f:
        return (raised_at - float(f.read().split()[0])) * 1000


def self_inflicted(pool, path, how, arg):
    result = pool.apply_async(die_noting_time, (path, how, arg))
    try:
        result.get(timeout=30)
    except rpool.WorkerLostError:
        return gap_ms(path, time.time())
    raise AssertionError("the task did not fail")


def killed_from_outside(pool, path, _how, _arg):
    result = pool.apply_async(note_time_and_sleep, (path, 30))
    while not os.path.exists(path) or not open(path).read():
        time.sleep(0.001)
    pid = int(open(path).read().split()[1])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    try:
        result.get(timeout=30)
    except rpool.WorkerLostError:
        return (time.time() - killed_at) * 1000
    raise AssertionError("the task did not fail")


def over_time_limit(pool, _path, _how, _arg):
    limit = 0.2
    started = time.time()
    try:
        pool.apply(sleep, (30,), timeout=limit)
    except rpool.TaskTimeoutError:
        return (time.time() - started - limit) * 1000
    raise AssertionError("the task was not stopped")


FAULTS = [
    ("SIGKILL from inside", self_inflicted, "signal", signal.SIGKILL),
    ("SIGSEGV", self_inflicted, "signal", signal.SIGSEGV),
    ("os._exit(3)", self_inflicted, "exit", 3),
    ("SIGKILL from the parent", killed_from_outside, None, None),
    ("time limit 0.2 s (ms past it)", over_time_limit, None, None),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    print(f"{'fault':32} {'method':11} {'median ms':>10} {'max ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, measure, how, arg in FAULTS:
            for method in ("fork", "spawn", "forkserver"):
                gaps = []
                with rpool.get_context(method).Pool(2) as pool:
                    pool.apply(sleep, (0,))
                    for i in range(args.repeat):
                        path = os.path.join(tmp, f"{method}-{len(name)}-{i}")
                        gaps.append(measure(pool, path, how, arg))
                print(f"{name:32} {method:11} {statistics.median(gaps):10.2f} {max(gaps):8.2f}", flush=True)


if __name__ == "__main__":
    main()
