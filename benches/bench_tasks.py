"""Task functions for benches/vs_stdlib.py.

They must be importable by worker processes, so they live in a module of
their own; vs_stdlib.py puts this directory on sys.path (and PYTHONPATH)
before it creates any pool.
"""
import os
import time


def noop(x=None):
    return x


def square(x):
    return x * x


def spin(n):
    """Burn CPU for n loop iterations (pure Python, holds the GIL)."""
    acc = 0
    for i in range(n):
        acc += i & 7
    return acc


def timed_spin(n):
    """spin(n), returning (result, seconds it took in the worker)."""
    start = time.perf_counter()
    acc = spin(n)
    return acc, time.perf_counter() - start


def sleepy_pid(seconds):
    """Sleep, then say which worker ran the task (used to warm pools up)."""
    time.sleep(seconds)
    return os.getpid()


def identity(x):
    """Return the argument itself (echo workloads send it back)."""
    return x


def hold(seconds):
    """Keep a worker busy (memory workloads queue tasks behind it)."""
    time.sleep(seconds)
    return seconds
