"""Pool.apply_async returns at once, so the four workers run four tasks at a time.

Run:  python examples/apply_async.py   (takes about 20 / 4 x 0.1 s = 0.5 s)
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
    pool = Pool(4)
    for i in range(20):
        pool.apply_async(fun, args=(i,))
    pool.close()  # no more tasks
    pool.join()  # wait for the workers to finish them all
    print(f"20 apply_async calls on Pool(4): {time.perf_counter() - start:.2f} s")
