"""Task functions for the executor, asyncio, ThreadPool and joblib tests (importable by workers)."""

import os
import time


def exit_now(code=3):
    os._exit(code)


def touch(path):
    with open(path, "w"):
        pass
    return path


def sleep_then_touch(delay, path):
    time.sleep(delay)
    return touch(path)


def add3(a, b, c):
    return a + b + c
