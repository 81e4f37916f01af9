"""`await pool.apply_async(...)`, `await pool.map_async(...)` and `async for` over `imap`.

The stdlib's results are not awaitable, so these run on rpool only; the values they give are
checked against what the same calls give synchronously.
"""

import asyncio
import threading
import time

import pytest

import rpool
import tasks


@pytest.fixture(params=["Pool", "ThreadPool"])
def pool(request):
    if request.param == "Pool":
        p = rpool.get_context("fork").Pool(2)
    else:
        p = rpool.ThreadPool(2)
    yield p
    p.terminate()
    p.join()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_await_apply_async_and_map_async(pool):
    async def main():
        one = await pool.apply_async(tasks.add, (2,), {"b": 3})
        many = await pool.map_async(tasks.square, range(10), chunksize=3)
        star = await pool.starmap_async(tasks.mul, [(2, 3), (4, 5)])
        return one, many, star

    assert run(main()) == (5, pool.map(tasks.square, range(10)), [6, 20])


def test_await_raises_the_tasks_exception(pool):
    async def main():
        with pytest.raises(tasks.CustomError):
            await pool.apply_async(tasks.raise_custom, ("x",))
        with pytest.raises(ValueError):
            await pool.map_async(tasks.fail_on, range(5))

    run(main())


def test_await_runs_callbacks_first(pool):
    seen = []

    async def main():
        return await pool.apply_async(tasks.square, (4,), callback=seen.append)

    assert run(main()) == 16
    assert seen == [16]


def test_await_does_not_block_the_loop(pool):
    ticks = []

    async def ticker(stop):
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main():
        stop = asyncio.Event()
        tick_task = asyncio.create_task(ticker(stop))
        value = await pool.apply_async(tasks.sleep_and_return, (0.5, "slow"))
        stop.set()
        await tick_task
        return value

    assert run(main()) == "slow"
    assert len(ticks) >= 10, "the loop kept running while the task ran"


def test_no_thread_per_await(pool):
    async def main():
        before = threading.active_count()
        results = [pool.apply_async(tasks.sleep_and_return, (0.2, i)) for i in range(50)]
        gathered = asyncio.gather(*(_awaited(r) for r in results))
        await asyncio.sleep(0.05)
        during = threading.active_count()
        return await gathered, during - before

    values, extra_threads = run(main())
    assert values == list(range(50))
    assert extra_threads == 0


async def _awaited(result):
    return await result


def test_await_a_ready_result_and_await_twice(pool):
    result = pool.apply_async(tasks.square, (3,))
    result.wait(10)

    async def main():
        return await result, await result

    assert run(main()) == (9, 9)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_async_for_over_imap_and_imap_unordered(pool, chunksize):
    async def main():
        ordered = [x async for x in pool.imap(tasks.square, range(20), chunksize=chunksize)]
        unordered = [x async for x in pool.imap_unordered(tasks.square, range(20), chunksize=chunksize)]
        empty = [x async for x in pool.imap(tasks.square, [])]
        return ordered, unordered, empty

    ordered, unordered, empty = run(main())
    assert ordered == list(pool.imap(tasks.square, range(20)))
    assert sorted(unordered) == ordered
    assert empty == []


def test_async_for_raises_the_failing_item(pool):
    async def main():
        got = []
        with pytest.raises(ValueError):
            async for x in pool.imap(tasks.fail_on, range(6)):
                got.append(x)
        return got

    assert run(main()) == [0, 1, 2]


def test_cancelled_await_leaves_the_pool_working(pool):
    async def main():
        slow = pool.apply_async(tasks.sleep_and_return, (0.3, "late"))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_awaited(slow), 0.05)
        task = asyncio.create_task(_awaited(pool.apply_async(tasks.sleep_and_return, (0.3, "x"))))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The awaited tasks still ran; the pool takes new work.
        return await slow, await pool.apply_async(tasks.square, (5,))

    assert run(main()) == ("late", 25)
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


def test_await_a_terminated_task():
    pool = rpool.get_context("fork").Pool(1)
    result = pool.apply_async(tasks.sleep_and_return, (5, "never"))

    async def main():
        asyncio.get_running_loop().call_later(0.2, pool.terminate)
        with pytest.raises(rpool.PoolTerminatedError):
            await result

    run(main())
    pool.join()


def test_two_event_loops_in_two_threads(pool):
    results = pool.apply_async(tasks.sleep_and_return, (0.2, "shared"))
    out = []

    def in_thread():
        out.append(asyncio.run(_awaited(results)))

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == ["shared", "shared"]
