"""`rpool.ThreadPool`: `multiprocessing.pool.ThreadPool`'s API on rpool's result slots.

The pool's threads are ordinary Python threads that take tasks from the core's queue
(`_rpool.ThreadCore`) and settle them with the objects themselves: nothing is pickled, as in
the stdlib. Everything else (`ApplyResult`, `MapResult`, `IMapIterator`, argument checks,
callbacks on rpool-callbacks) is `rpool.Pool`'s.
"""

from __future__ import annotations

import functools
import logging
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from . import _rpool
from .pool import RUN, Pool, _check_pool_arguments, _deliver, _live_pools

__all__ = ["ThreadPool"]

_log = logging.getLogger("rpool")


def _as_is(call: tuple[Any, ...], func: object = None, parts: object = None) -> tuple[Any, ...]:
    return call


class ThreadPool(Pool):
    """A pool of threads with the API of `multiprocessing.pool.ThreadPool`."""

    _pack = staticmethod(_as_is)  # type: ignore[assignment]

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._state = "INIT"
        self._cache: dict[int, Any] = {}
        processes = _check_pool_arguments(processes, initializer)
        self._processes = processes
        self._task_timeout = None
        self._core = _rpool.ThreadCore(processes, functools.partial(_deliver, self._cache))
        self._threads = [
            threading.Thread(
                target=_serve,
                args=(self._core, initializer, tuple(initargs)),
                name=f"rpool-thread-{i + 1}",
                daemon=True,
            )
            for i in range(processes)
        ]
        for thread in self._threads:
            thread.start()
        self._state = RUN
        _live_pools.add(self)

    def terminate(self) -> None:
        """Fail unfinished tasks, then wait for the threads (a running task cannot be stopped)."""
        super().terminate()
        if self._state == "TERMINATE" and threading.current_thread() not in self._threads:
            self._core.join()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Warn as Pool does, but do not wait here for tasks that may never end.
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            self._state = "TERMINATE"
            self._core.terminate()


def _serve(core: Any, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    """A pool thread: run the initializer, then tasks until the pool is closed and drained."""
    try:
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException:
                reason = f"a ThreadPool initializer raised:\n{traceback.format_exc()}"
                _log.error("rpool: %s", reason)
                core.break_pool(reason)
                return
        while (task := core.next_task()) is not None:
            task_id, (func, args, kwds) = task
            try:
                value, ok = func(*args, **kwds), True
            except BaseException as exc:  # SystemExit too: the task fails, the thread lives on
                value, ok = exc, False
            core.complete(task_id, ok, value)
            del task, func, args, kwds, value  # hold no task's objects while idle
    finally:
        core.thread_exited()
