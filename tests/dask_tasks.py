"""Task functions for tests/test_distributed.py that only make sense on a Dask worker."""

import os
import threading
import time
from pathlib import Path

import distributed


def task_key(_=None):
    """The Dask key of the task running this call: items of one chunk share it."""
    return distributed.get_worker().get_current_task()


def return_lock(_=None):
    """A result that even cloudpickle cannot pickle."""
    return threading.Lock()


def kill_own_worker(_=None):
    os.kill(os.getpid(), 9)


def sleep_then_touch(directory, name, delay):
    time.sleep(delay)
    Path(directory, name).touch()
    return name


def worker_address(_=None):
    return distributed.get_worker().address


def fresh_token(_=None):
    """Different on every call: two runs of the same call give two tokens."""
    return os.urandom(16).hex()


def spin_forever(_=None):
    """Pure Python that never returns: only an exception raised in its thread stops it."""
    while True:
        pass
