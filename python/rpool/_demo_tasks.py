"""Task functions for ``python -m rpool demo``.

They live in their own importable module (not in ``__main__``) so that
workers started with "spawn" or "forkserver" can unpickle them.
"""
import time


def noop(x=None):
    return x


def square(x):
    return x * x


def sleepy(i, seconds=0.1):
    time.sleep(seconds)
    return i * i
