"""Keep the AsyncResult objects and read the return values in submission order.

Run:  python examples/apply_async_results.py
"""
import time

from rpool import Pool


def fun(i):
    time.sleep(0.1)
    return i * i


if __name__ == "__main__":
    pool = Pool(4)
    results = []
    for i in range(20):
        results.append(pool.apply_async(fun, args=(i,)))
    pool.close()
    pool.join()
    for i, result in enumerate(results):
        print(f"fun({i}) = {result.get()}")
