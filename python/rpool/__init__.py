"""rpool: a drop-in `multiprocessing.Pool` whose core is written in Rust."""

from __future__ import annotations

# `import rpool` stays light: every exec'd worker and the fork server import this package first,
# and need none of the pool's modules (typing, the pool's stdlib imports, not even
# multiprocessing). The public names below are imported on first use by `__getattr__`; mypy
# sees them through these imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from multiprocessing import TimeoutError, cpu_count
    from typing import Any

    from .executor import ProcessPoolExecutor
    from .pool import (
        ApplyResult,
        AsyncResult,
        IMapIterator,
        MapResult,
        Pool,
        PoolTerminatedError,
        RemoteError,
        TaskTimeoutError,
        UnpicklableTaskError,
        WorkerLostError,
    )
    from .threadpool import ThreadPool

__all__ = [
    "Pool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "TimeoutError",
    "WorkerLostError",
    "PoolTerminatedError",
    "TaskTimeoutError",
    "UnpicklableTaskError",
    "RemoteError",
    "get_context",
    "cpu_count",
    "ProcessPoolExecutor",
    "ThreadPool",
]

class Context:
    """A start method, as `multiprocessing.get_context(method)` gives, whose `Pool` is rpool's."""

    def __init__(self, method: str) -> None:
        self._method = method

    def get_start_method(self, allow_none: bool = False) -> str:
        return self._method

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        **options: Any,
    ) -> Pool:
        """`rpool.Pool` with this start method; `options` are rpool's own keywords."""
        early = _early_fork_server() if self._method == "forkserver" else None
        try:
            from .pool import Pool

            return Pool(processes, initializer, initargs, maxtasksperchild, context=self, _early_server=early, **options)
        finally:
            if early is not None:
                early.stop()  # unless the pool took it

    def __repr__(self) -> str:
        return f"<rpool.Context {self._method!r}>"


# What `multiprocessing.get_all_start_methods()` gives on Linux, known without importing it.
_START_METHODS = ("fork", "spawn", "forkserver")


def get_context(method: str | None = None) -> Context:
    """The context for `method` ('fork', 'spawn', 'forkserver'); None means Python's default."""
    if method is None:
        import multiprocessing

        method = multiprocessing.get_context().get_start_method()
    if method not in _START_METHODS:
        raise ValueError(f"cannot find context for {method!r}")
    return Context(method)


def _early_fork_server() -> Any:
    """Start the fork server of the pool about to be made, before importing rpool.pool (and
    multiprocessing, ~15 ms): the server's interpreter boots meanwhile. The pool's core takes it
    if its command line is the same; else it is stopped."""
    import sys

    from . import _command, _rpool

    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None and getattr(mp_process.current_process(), "_inheriting", False):
        return None  # a spawned child importing its main module: Pool() refuses (see rpool.pool)
    try:
        return _rpool.EarlyForkServer(_command.exec_command("forkserver_main"))
    except OSError:
        return None  # the pool tries again itself, and reports why it cannot


# Where each lazily imported public name lives (the executor also pulls in concurrent.futures).
_LAZY = {
    # The stdlib's own: `except multiprocessing.TimeoutError` catches rpool's timeouts.
    "TimeoutError": "multiprocessing",
    "cpu_count": "multiprocessing",
    "ProcessPoolExecutor": ".executor",
    "ThreadPool": ".threadpool",
    **dict.fromkeys(
        [
            "Pool",
            "AsyncResult",
            "ApplyResult",
            "MapResult",
            "IMapIterator",
            "WorkerLostError",
            "PoolTerminatedError",
            "TaskTimeoutError",
            "UnpicklableTaskError",
            "RemoteError",
        ],
        ".pool",
    ),
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    # `rpool.distributed` needs Dask, so it is imported on first use, never by `import rpool`.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
