"""A callback receives each result in the parent process as soon as it is ready.

Run:  python examples/apply_async_callback.py
"""
import os
import time

from rpool import Pool


def fun(i):
    time.sleep(0.1)
    return i, i * i, os.getpid()


def call_back(result):
    # Runs in the parent process (not in a worker), once per finished task.
    i, square, worker = result
    print(f"callback in process {os.getpid()}: fun({i}) = {square} (computed by {worker})")


if __name__ == "__main__":
    print(f"parent process is {os.getpid()}")
    pool = Pool(4)
    for i in range(20):
        pool.apply_async(func=fun, args=(i,), callback=call_back)
    pool.close()
    pool.join()
