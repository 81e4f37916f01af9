"""What a worker process runs in Python: set itself up, run tasks, exit the stdlib's way.

The loop itself (read a task frame, call `execute`, write the result frame) is in Rust
(`src/child.rs`); this module holds the steps that need Python's own machinery.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable
from multiprocessing import process, spawn, util
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError  # type: ignore[attr-defined]
from multiprocessing.reduction import ForkingPickler
from typing import Any

# What a worker's bootstrap returns: `(execute, maxtasksperchild, max_memory_per_child)`.
Booted = tuple[Callable[..., tuple[bool, bytes]], int | None, int | None]

from . import _shm

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: object) -> bytes:
    """Pickle like the stdlib's pool (ForkingPickler), taking plain pickle's faster path first.

    ForkingPickler only adds reducers for objects plain pickle refuses (connections, sockets),
    so anything plain pickle accepts pickles the same way through both.
    """
    try:
        return pickle.dumps(obj, _PROTOCOL)
    except Exception:
        buf = io.BytesIO()
        ForkingPickler(buf, _PROTOCOL).dump(obj)
        return buf.getvalue()


def cloud_dumps(obj: object) -> bytes:
    """Pickle with cloudpickle (`Pool(serializer="cloudpickle")`): lambdas, closures and
    functions of `__main__` travel by value."""
    import cloudpickle  # type: ignore[import-untyped, import-not-found, unused-ignore]

    data: bytes = cloudpickle.dumps(obj, _PROTOCOL)
    return data


def result_dumps(obj: object) -> bytes:
    """A worker's results under `serializer="cloudpickle"`: plain pickle's speed for plain data,
    cloudpickle for what plain pickle refuses (a lambda returned by a task)."""
    try:
        return _shm.dumps_result(obj)
    except Exception:
        return cloud_dumps(obj)


def mapstar(func: Callable[[Any], Any], chunk: Any) -> list[Any]:
    return list(map(func, chunk))


def starmapstar(func: Callable[..., Any], chunk: Any) -> list[Any]:
    return list(itertools.starmap(func, chunk))


def dump_exception(exc: BaseException, dumps: Callable[[object], bytes] = dumps) -> bytes:
    """Pickle a task's exception with its traceback text (it becomes a RemoteTraceback cause)."""
    try:
        return dumps(ExceptionWithTraceback(exc, exc.__traceback__))
    except Exception as err:
        return dumps(MaybeEncodingError(err, exc))


def execute(
    payload: bytes,
    func: Callable[..., Any] | None = None,
    func_pickle: bytes | None = None,
    dumps: Callable[[object], bytes] = _shm.dumps_result,
) -> tuple[bool, bytes]:
    """Run one task. Never raises: returns `(ok, pickled result)`.

    `payload` is a pickled `(func, args, kwds)`, or only `(args, kwds)` when the function came
    apart: as `func` (unpickled, and kept, by the serve loop) or as `func_pickle`.
    `dumps` pickles the result or exception (rpool.distributed passes cloudpickle's); the
    default sends large buffers through shared memory (rpool._shm).
    """
    try:
        if func is not None:
            args, kwds = pickle.loads(payload)
        elif func_pickle is not None:
            func = pickle.loads(func_pickle)
            args, kwds = pickle.loads(payload)
        else:
            func, args, kwds = pickle.loads(payload)
        result = func(*args, **kwds)
    except BaseException as exc:  # SystemExit too: the task fails, the worker lives on
        return False, dump_exception(exc, dumps)
    try:
        return True, dumps(result)
    except Exception as exc:
        return False, dumps(MaybeEncodingError(exc, result))


def record_payload(record: logging.LogRecord) -> bytes:
    """Pickle a LogRecord's attributes for the parent: the message rendered (its arguments may
    not pickle, or mean nothing there), the traceback as text, extras that cannot be pickled as
    their repr."""
    attrs = dict(record.__dict__)
    attrs["msg"] = record.getMessage()
    attrs["args"] = None
    if record.exc_info:
        attrs["exc_text"] = record.exc_text or logging.Formatter().formatException(record.exc_info)
    attrs["exc_info"] = None
    attrs.pop("message", None)
    try:
        return pickle.dumps(attrs, _PROTOCOL)
    except Exception:
        for key, value in attrs.items():
            try:
                pickle.dumps(value, _PROTOCOL)
            except Exception:
                attrs[key] = repr(value)
        return pickle.dumps(attrs, _PROTOCOL)


class ForwardingHandler(logging.Handler):
    """In a worker of `Pool(forward_logs=True)`: send each record to the parent's `logging`."""

    def emit(self, record: logging.LogRecord) -> None:
        # The same record may reach this handler on several loggers of its chain: send it once.
        if getattr(record, "_rpool_forwarded", False):
            return
        record._rpool_forwarded = True
        try:
            from rpool import _rpool

            _rpool.forward_log(record_payload(record))
        except Exception:
            self.handleError(record)


def forward_logs(level: int) -> None:
    """Send this worker's log records to the parent, which handles them with its own handlers.

    Handlers inherited from a forked parent would print each record a second time, so every
    logger that has handlers gets the forwarding handler instead; the root logger always does,
    with the parent's root level.
    """
    handler = ForwardingHandler()
    root = logging.getLogger()
    loggers: list[logging.Logger] = [root] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        if logger.handlers or logger is root:
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.addHandler(handler)
    root.setLevel(level)


def _become_worker(setup: dict[str, Any], number: int, forked: bool) -> Booted:
    if forked:
        # What the stdlib's Process._bootstrap does in a forked child.
        util._finalizer_registry.clear()  # type: ignore[attr-defined]
        util._run_after_forkers()  # type: ignore[attr-defined]
    process._children = set()  # type: ignore[attr-defined]
    me = process.current_process()
    me.name = f"{setup['name_prefix']}PoolWorker-{number}"
    me._identity = (number,)
    if sys.stdin is not None:
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)
        except (OSError, ValueError):
            pass
    # Ctrl-C goes to the whole process group: the parent handles it, workers must not spew
    # tracebacks (the parent terminates them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup.get("forward_logs") is not None:
        forward_logs(setup["forward_logs"])
    initializer = setup["initializer"]
    if initializer is not None:
        initializer(*setup["initargs"])
    if setup.get("serializer") == "cloudpickle":
        return functools.partial(execute, dumps=result_dumps), setup["maxtasks"], setup.get("max_memory")
    return execute, setup["maxtasks"], setup.get("max_memory")


def bootstrap_forked(setup: dict[str, Any], number: int) -> Booted:
    """In a forked worker: `setup` is the parent's own dict, inherited with its memory."""
    return _become_worker(setup, number, forked=True)


def prepare(data: bytes) -> None:
    """In an exec'd worker: rebuild sys.path, cwd, authkey and `__main__` as the stdlib's spawn does."""
    me = process.current_process()
    # As the stdlib's spawn_main: a script without `if __name__ == "__main__":` that makes a
    # pool while its main module is re-imported here gets the stdlib's "bootstrapping phase"
    # RuntimeError instead of starting workers of its own.
    me._inheriting = True  # type: ignore[attr-defined]
    try:
        spawn.prepare(pickle.loads(data))
    finally:
        me._inheriting = False  # type: ignore[attr-defined]


def load_setup(data: bytes) -> dict[str, Any]:
    setup: dict[str, Any] = pickle.loads(data)
    return setup


def bootstrap_spawned(setup: bytes, number: int) -> Booted:
    return _become_worker(pickle.loads(setup), number, forked=False)


def exit_worker() -> None:
    """The stdlib's exit steps for a child: finalizers, non-daemon threads, flushed streams."""
    try:
        util._exit_function()  # type: ignore[attr-defined]
    finally:
        try:
            import threading

            threading._shutdown()  # type: ignore[attr-defined]
        except Exception:
            pass
        util._flush_std_streams()  # type: ignore[attr-defined]


def forkserver_main() -> None:
    """Entry point of the `forkserver` start method's server process."""
    from rpool import _rpool

    # Ctrl-C reaches the whole process group; the pool in the parent handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os._exit(_rpool.forkserver_main())


def spawn_main() -> None:
    """Entry point of a worker started by exec (`python -c ...`)."""
    from rpool import _rpool

    os._exit(_rpool.worker_main())
