"""Task functions for benches/fault_latency.py (a module of their own so workers can import it)."""

import os
import time


def die_noting_time(path, how, arg):
    """Write the time, then die by signal `arg` or exit with code `arg`."""
    import faulthandler

    faulthandler.disable()
    with open(path, "w") as f:
        f.write(repr(time.time()))
    if how == "signal":
        os.kill(os.getpid(), arg)
        time.sleep(10)
    os._exit(arg)


def note_time_and_sleep(path, seconds):
    with open(path, "w") as f:
        f.write(f"{time.time()!r} {os.getpid()}")
    time.sleep(seconds)


def sleep(seconds):
    time.sleep(seconds)
