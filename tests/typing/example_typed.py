"""A small program that uses every public name of rpool, checked with `mypy --strict` (and run)
by tests/test_typing.py. The annotations on the left are what the checker must infer."""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import Future

import rpool
import rpool.joblib
from rpool import (
    ApplyResult,
    AsyncResult,
    IMapIterator,
    MapResult,
    Pool,
    PoolTerminatedError,
    ProcessPoolExecutor,
    RemoteError,
    TaskTimeoutError,
    ThreadPool,
    TimeoutError,
    UnpicklableTaskError,
    WorkerLostError,
    cpu_count,
    get_context,
)


def square(x: int) -> int:
    return x * x


def describe(x: int, label: str) -> str:
    return f"{label}{x}"


async def awaited(pool: Pool) -> tuple[int, list[int], list[int]]:
    one: int = await pool.apply_async(square, (4,))
    many: list[int] = await pool.map_async(square, range(3))
    streamed: list[int] = [y async for y in pool.imap(square, range(3))]
    return one, many, streamed


def main() -> None:
    workers: int = cpu_count()
    assert workers >= 1
    ctx = get_context("spawn")
    assert ctx.get_start_method() == "spawn"
    with ctx.Pool(2, forward_logs=True, serializer="pickle") as pool:
        value: int = pool.apply(square, (3,))
        values: list[int] = pool.map(square, range(4), progress=False)
        labels: list[str] = pool.starmap(describe, [(1, "a"), (2, "b")])
        pending: ApplyResult[int] = pool.apply_async(square, (5,), callback=lambda v: None)
        also: AsyncResult[int] = pending
        mapped: MapResult[int] = pool.map_async(square, range(3), error_callback=lambda e: None)
        starred: MapResult[str] = pool.starmap_async(describe, [(3, "c")])
        ordered: IMapIterator[int] = pool.imap(square, range(3), chunksize=2)
        unordered: IMapIterator[int] = pool.imap_unordered(square, range(3), timeout=30.0)
        assert value == 9 and values == [0, 1, 4, 9] and labels == ["a1", "b2"]
        assert also.get(timeout=30) == 25 and pending.ready() and pending.successful()
        mapped.wait(30)
        assert mapped.get() == [0, 1, 4] and starred.get() == ["c3"]
        assert list(ordered) == [0, 1, 4] and sorted(unordered) == [0, 1, 4]
        assert asyncio.run(awaited(pool)) == (16, [0, 1, 4], [0, 1, 4])
        bar_kwargs = {"file": io.StringIO()}
        assert pool.map(square, range(3), progress=bar_kwargs) == [0, 1, 4]
    pool.join()

    with Pool(1, task_timeout=30.0, max_memory_per_child=1 << 30) as pool:
        errors: tuple[type[Exception], ...] = (
            WorkerLostError,
            PoolTerminatedError,
            TaskTimeoutError,
            UnpicklableTaskError,
            RemoteError,
            TimeoutError,
        )
        try:
            pool.apply(square, (lambda: 1,))
        except errors as exc:
            assert isinstance(exc, UnpicklableTaskError)

    with ThreadPool(2) as threads:
        doubled: list[int] = threads.map(lambda x: 2 * x, range(3))
        assert doubled == [0, 2, 4]

    with ProcessPoolExecutor(max_workers=1) as executor:
        future: Future[int] = executor.submit(square, 6)
        assert future.result(timeout=30) == 36
        assert list(executor.map(square, range(3), timeout=30)) == [0, 1, 4]

    rpool.joblib.register()
    logging.getLogger("rpool").debug("done")


if __name__ == "__main__":
    main()
