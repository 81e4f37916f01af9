"""Pool.apply blocks until the task is done, so tasks run one at a time.

Run:  python examples/apply.py   (takes about 20 x 0.1 s = 2 s)
"""
import os
import time

from rpool import Pool


def fun(i):
    print(f"task {i:2d} running in process {os.getpid()}", flush=True)
    time.sleep(0.1)
    return i * i


if __name__ == "__main__":
    start = time.perf_counter()
    with Pool(4) as pool:
        for i in range(20):
            pool.apply(fun, args=(i,))
    print(f"20 apply calls on Pool(4): {time.perf_counter() - start:.2f} s")
