"""`rpool.ProcessPoolExecutor`: a `concurrent.futures.Executor` over rpool's `Pool`.

Each `submit` is one `apply_async`; its callbacks (on rpool-callbacks) settle the future. Unlike
the stdlib's executor, a worker that dies fails only the future of the task it was running
(`rpool.WorkerLostError`) and the executor carries on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .pool import Pool

__all__ = ["ProcessPoolExecutor"]


class _Future(concurrent.futures.Future[Any]):
    """A future whose `cancel()` also takes its task out of the pool's queue."""

    def __init__(self) -> None:
        super().__init__()
        self._unqueue: Callable[[], int] | None = None

    def cancel(self) -> bool:
        with self._condition:
            if self._unqueue is not None and not self.done() and not self.running():
                if not self._unqueue():
                    # A worker has the task already: too late, as in the stdlib.
                    self.set_running_or_notify_cancel()
                    return False
            return super().cancel()


def _process_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _chunks(iterables: tuple[Iterable[Any], ...], chunksize: int) -> Iterator[list[tuple[Any, ...]]]:
    it = zip(*iterables)
    while chunk := list(itertools.islice(it, chunksize)):
        yield chunk


_live_executors: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()


class ProcessPoolExecutor(concurrent.futures.Executor):
    """`concurrent.futures.ProcessPoolExecutor`'s API, run by rpool's core.

    `mp_context` is a `multiprocessing` or `rpool` context (its start method is used); other
    keyword arguments go to `rpool.Pool`.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        **pool_options: Any,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._pool = Pool(max_workers, initializer, initargs, max_tasks_per_child, context=mp_context, **pool_options)
        self._max_workers = self._pool._processes
        self._lock = threading.Lock()
        self._shutdown = False
        self._pending: set[_Future] = set()
        _live_executors.add(self)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = _Future()
            result = self._pool.apply_async(
                fn, args, kwargs, callback=future.set_result, error_callback=lambda exc: _fail(future, exc)
            )
            future._unqueue = lambda: self._pool._core.cancel(result._job)
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """As the stdlib's: submitted at once, yielded in order, `timeout` counted from this call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        results = super().map(_process_chunk, itertools.repeat(fn), _chunks(iterables, chunksize), timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._pending) if cancel_futures else []
        for future in pending:
            future.cancel()
        self._pool.close()
        if wait:
            self._pool.join()
        _live_executors.discard(self)

    def __del__(self) -> None:
        # As the stdlib's, a forgotten executor (`run_in_executor(ProcessPoolExecutor(), ...)`)
        # finishes its work and lets its workers exit.
        if not getattr(self, "_shutdown", True):
            self._pool.close()


def _fail(future: _Future, exc: BaseException) -> None:
    # A future cancelled out of the queue already says so (its part ends as cancelled).
    if not future.cancelled():
        future.set_exception(exc)


@atexit.register
def _finish_live_executors() -> None:
    # As the stdlib: at exit, an executor that was not shut down (or not waited for) still runs
    # what was submitted. Registered after rpool.pool's hook, so it runs before pools are killed.
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
