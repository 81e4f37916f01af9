"""Task functions for the progress, log forwarding and serializer tests (importable by workers)."""

import logging
import os
import time


def square(x):
    return x * x


def wait_for_file_on(x, path, last):
    """Return `x` at once, except item `last`, which waits (up to 30 s) for `path` to exist."""
    if x == last:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x


def fail_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def log_and_return(x, level=logging.WARNING):
    logging.getLogger("ecosystem.task").log(level, "task got %s in %s", x, os.getpid())
    return x


def log_exception(_=None):
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("ecosystem.task").exception("division failed")
    return "logged"


def log_with_unpicklable_extra(_=None):
    logging.getLogger("ecosystem.task").warning("with extra", extra={"lock_object": __import__("threading").Lock()})
    return "logged"


def log_from_thread(_=None):
    import threading

    thread = threading.Thread(target=lambda: logging.getLogger("ecosystem.thread").warning("from a thread"))
    thread.start()
    thread.join()
    return "done"


def log_in_initializer():
    logging.getLogger("ecosystem.init").warning("initializer ran in %s", os.getpid())


def make_adder(n):
    return lambda x: x + n
