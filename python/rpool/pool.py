"""The public `Pool`: the stdlib's API, argument checks, pickling and result objects.

Scheduling, worker processes and result slots live in the Rust core (`rpool._rpool`); this
module only decides what to send and how to present what comes back.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
import pickle
import reprlib
import threading
import warnings
import weakref
from multiprocessing import TimeoutError
from multiprocessing import spawn as _spawn
from multiprocessing.pool import MaybeEncodingError

from . import _aio, _rpool, _shm
from ._worker import dumps as _dumps
from ._worker import bootstrap_forked, mapstar, starmapstar

__all__ = [
    "Pool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "WorkerLostError",
    "PoolTerminatedError",
    "TaskTimeoutError",
    "UnpicklableTaskError",
]

_log = logging.getLogger("rpool")

RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

# Outcome kinds as the core reports them (see PyJob.take in src/bindings.rs).
_VALUE, _RAISED, _LOST, _TERMINATED, _TIMED_OUT = 0, 1, 2, 3, 4
_CANCELLED, _OBJECT_VALUE, _OBJECT_RAISED = 5, 6, 7
_SHARED_VALUE, _SHARED_RAISED = 8, 9  # `(pickle, memfd)`: large buffers in shared memory

# Decoding a result happens once, whichever thread asks first.
_settle_lock = threading.Lock()


class WorkerLostError(multiprocessing.ProcessError):
    """The worker process running this task died (killed, crashed or exited) before finishing it."""


class PoolTerminatedError(multiprocessing.ProcessError):
    """The pool was terminated before this task finished."""


class TaskTimeoutError(TimeoutError):
    """The task ran past its time limit (`timeout=` or `Pool(task_timeout=)`); its worker was killed.

    Unlike the `TimeoutError` of `AsyncResult.get(timeout)`, which only stops waiting, this one
    means the task itself was stopped. It is a subclass of `multiprocessing.TimeoutError`.
    """


class UnpicklableTaskError(pickle.PicklingError, TypeError):
    """A task's function or arguments cannot be pickled; the message says which one.

    Also a `TypeError`, which is what pickle itself raises for most such objects.
    """


class RemoteError(Exception):
    """A worker raised an exception that could not be rebuilt in the parent."""


def _decode(job, part):
    """Turn part `part`'s outcome into `(success, value or exception)`."""
    taken = job.take(part)
    if taken is None:
        return False, RuntimeError("rpool: result was already taken")
    kind, data = taken
    if kind == _VALUE:
        try:
            return True, pickle.loads(data)
        except Exception as exc:
            return False, exc
    if kind == _RAISED:
        try:
            return False, pickle.loads(data)
        except Exception as exc:
            err = RemoteError(f"the task raised an exception that cannot be unpickled in the parent: {exc!r}")
            return False, err
    if kind == _SHARED_VALUE:
        try:
            return True, _shm.loads_received(*data)
        except Exception as exc:
            return False, exc
    if kind == _SHARED_RAISED:
        try:
            return False, _shm.loads_received(*data)
        except Exception as exc:
            err = RemoteError(f"the task raised an exception that cannot be unpickled in the parent: {exc!r}")
            return False, err
    if kind == _LOST:
        return False, WorkerLostError(data)
    if kind == _TIMED_OUT:
        return False, TaskTimeoutError(data)
    if kind == _CANCELLED:
        return False, concurrent.futures.CancelledError()
    if kind == _OBJECT_VALUE:
        return True, data
    if kind == _OBJECT_RAISED:
        return False, data
    return False, PoolTerminatedError(data)


class ApplyResult:
    """The result of `apply_async`: `get`, `wait`, `ready`, `successful`, as the stdlib's."""

    __slots__ = ("_job", "_callback", "_error_callback", "_settled", "_success", "_value", "__weakref__")

    def __init__(self, job, callback=None, error_callback=None):
        self._job = job
        self._callback = callback
        self._error_callback = error_callback
        self._settled = False
        self._success = None
        self._value = None

    def ready(self):
        return self._job.ready()

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        self._settle()
        return self._success

    def wait(self, timeout=None):
        self._wait(timeout)

    def get(self, timeout=None):
        if not self._wait(timeout):
            raise TimeoutError
        self._settle()
        if self._success:
            return self._value
        raise self._value

    def _wait(self, timeout):
        job = self._job
        if (
            getattr(_callback_thread, "active", False)
            and (self._callback is not None or self._error_callback is not None)
            and not job.ready()
        ):
            # A callback waits for a result whose own callback is still to run: only this
            # thread could run it, so run it here once the result is in, or both would wait forever.
            if not job.wait_complete(timeout):
                return False
            self._run_callbacks()
            return True
        return job.wait(timeout)

    def __await__(self):
        """`await result`: the value (or the exception), without blocking the event loop."""
        yield from _aio.until(self._job, self._job.ready).__await__()
        return self.get()

    def _collect(self):
        return _decode(self._job, 0)

    def _settle(self):
        if self._settled:
            return
        with _settle_lock:
            if not self._settled:
                self._success, self._value = self._collect()
                self._settled = True

    def _run_callbacks(self):
        """On rpool-callbacks: call the callback, then let waiters in."""
        try:
            self._settle()
            callback = self._callback if self._success else self._error_callback
            if callback is not None:
                try:
                    callback(self._value)
                except Exception:
                    _log.exception("rpool: callback %r raised; the pool carries on", callback)
        finally:
            self._callback = self._error_callback = None
            self._job.mark_ready()


# The stdlib's name for the same class.
AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of `map_async`/`starmap_async`: one part per chunk, values in input order."""

    __slots__ = ("_parts",)

    def __init__(self, job, parts, callback=None, error_callback=None):
        super().__init__(job, callback, error_callback)
        self._parts = parts

    def _collect(self):
        values = []
        failure = None
        for part in range(self._parts):
            ok, value = _decode(self._job, part)
            if ok and failure is None:
                values.append(value)
            elif not ok and failure is None:
                failure = value
                values = None
        if failure is not None:
            return False, failure
        return True, list(itertools.chain.from_iterable(values))


class IMapIterator:
    """The iterator of `imap` (in order) and `imap_unordered` (as tasks finish)."""

    def __init__(self, job, ordered, chunked):
        self._job = job
        self._ordered = ordered
        self._chunked = chunked
        self._next_part = 0
        self._buffer = collections.deque()
        self._input_error = None
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def next(self, timeout=None):
        with self._lock:
            while not self._buffer:
                part = self._wait_next_part(timeout)
                if part is None:
                    error, self._input_error = self._input_error, None
                    if error is not None:
                        raise error
                    raise StopIteration
                ok, value = _decode(self._job, part)
                if not ok:
                    raise value
                if self._chunked:
                    self._buffer.extend(value)
                else:
                    return value
            return self._buffer.popleft()

    __next__ = next

    def __aiter__(self):
        return self

    async def __anext__(self):
        """`async for` over the results, waiting on the event loop instead of blocking it."""
        while True:
            try:
                return self.next(timeout=0)
            except StopIteration:
                raise StopAsyncIteration from None
            except TimeoutError:
                await _aio.until(self._job, self._has_next)

    def _has_next(self):
        if self._buffer:
            return True
        if self._ordered:
            return self._job.wait_part(self._next_part, 0)
        return self._job.wait_any(0)

    def _wait_next_part(self, timeout):
        """The index of the next part to yield, or None when every part was yielded."""
        job = self._job
        if self._ordered:
            part = self._next_part
            if not job.wait_part(part, timeout):
                raise TimeoutError
            total = job.total()
            if total is not None and part >= total:
                return None
            self._next_part += 1
            return part
        if not job.wait_any(timeout):
            raise TimeoutError
        return job.pop_finished()


def _chunks(iterable, size, numbered=False):
    """Tuples of up to `size` items; with `numbered`, `(index of the first item, chunk)` pairs."""
    it = iter(iterable)
    start = 0
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield (start, chunk) if numbered else chunk
        start += len(chunk)


def _input_items(chunk, start):
    return [(f"input item {start + i}", item) for i, item in enumerate(chunk)]


# Set on rpool-callbacks while it runs callbacks.
_callback_thread = threading.local()


def _deliver(cache, job_ids):
    """Run on rpool-callbacks with the GIL: the callbacks of jobs that just finished."""
    _callback_thread.active = True
    for job_id in job_ids:
        result = cache.pop(job_id, None)
        if result is not None:
            result._run_callbacks()


def _label(func):
    """How error messages name a task's function: `module.qualname`."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if not isinstance(name, str):
        return repr(func)[:200]
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) else name


# Names an object in an error message without printing all of a huge one.
_short_repr = reprlib.Repr()
_short_repr.maxother = _short_repr.maxstring = 120


def _dump_task(call, func, parts, dumps=_shm.dumps):
    """Pickle `call` for a worker with `dumps`. If it cannot be, find which of the function and
    `parts()` (`(what, object)` pairs: the arguments or input items) is to blame, and say so."""
    try:
        return dumps(call)
    except Exception as exc:
        culprit = "the task"
        for what, obj in [("the function", func), *parts()]:
            try:
                dumps(obj)
            except Exception:
                culprit = f"{what} {_short_repr.repr(obj)}"
                break
        raise UnpicklableTaskError(f"cannot pickle {culprit} for {_label(func)}: {exc}") from exc


def _check_seconds(value, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, not {type(value).__name__}")
    if not 0 < value < 1e9:
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _check_pool_arguments(processes, initializer, maxtasksperchild=None):
    """The stdlib's checks of a pool's arguments; returns the number of workers."""
    if processes is None:
        processes = os.cpu_count() or 1
    if processes < 1:
        raise ValueError("Number of processes must be at least 1")
    if maxtasksperchild is not None:
        if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
            raise ValueError("maxtasksperchild must be a positive int or None")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    return processes


def _start_method(context):
    if context is None:
        return multiprocessing.get_context().get_start_method()
    return context.get_start_method()


_NAME_PREFIX = {"fork": "Fork", "spawn": "Spawn", "forkserver": "ForkServer"}

_live_pools = weakref.WeakSet()


class Pool:
    """A process pool with the API of `multiprocessing.Pool`, run by rpool's Rust core."""

    # How a call `(func, args, kwds)` goes to the core: `_pack(call, func, parts)` pickles it
    # (naming the part that cannot be); ThreadPool passes it as it is.
    _pack = staticmethod(_dump_task)

    def __init__(
        self,
        processes=None,
        initializer=None,
        initargs=(),
        maxtasksperchild=None,
        context=None,
        *,
        task_timeout=None,
        max_memory_per_child=None,
    ):
        self._state = "INIT"
        self._cache = {}
        processes = _check_pool_arguments(processes, initializer, maxtasksperchild)
        self._task_timeout = _check_seconds(task_timeout, "task_timeout")
        if max_memory_per_child is not None:
            if isinstance(max_memory_per_child, bool) or not isinstance(max_memory_per_child, int):
                raise TypeError("max_memory_per_child must be a number of bytes (int) or None")
            if max_memory_per_child <= 0:
                raise ValueError("max_memory_per_child must be a positive number of bytes or None")
        method = _start_method(context)
        if method not in _NAME_PREFIX:
            raise ValueError(f"cannot find context for {method!r}")
        self._processes = processes
        self._start_method = method
        setup = {
            "initializer": initializer,
            "initargs": tuple(initargs),
            "maxtasks": maxtasksperchild,
            "max_memory": max_memory_per_child,
            "name_prefix": _NAME_PREFIX[method],
        }
        deliver = functools.partial(_deliver, self._cache)
        if method == "fork":
            bootstrap = functools.partial(bootstrap_forked, setup)
            self._core = _rpool.PoolCore(processes, method, maxtasksperchild, deliver, fork_bootstrap=bootstrap)
        else:
            prep = _spawn.get_preparation_data(f"{_NAME_PREFIX[method]}PoolWorker")
            # The stdlib refuses to pickle an AuthenticationString outside its own spawning.
            prep["authkey"] = bytes(prep["authkey"])
            preamble = [pickle.dumps(prep, pickle.HIGHEST_PROTOCOL), _dumps(setup)]
            entry = "forkserver_main" if method == "forkserver" else "spawn_main"
            self._core = _rpool.PoolCore(
                processes, method, maxtasksperchild, deliver, exec_argv=_exec_command(entry), exec_preamble=preamble
            )
        self._state = RUN
        _live_pools.add(self)

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} pool_size={self._processes}>"

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    # --- single calls ---------------------------------------------------------------------

    def _time_limit(self, timeout):
        """A call's `timeout=` (seconds each task may run), or the pool's `task_timeout`."""
        if timeout is None:
            return self._task_timeout
        return _check_seconds(timeout, "timeout")

    def apply(self, func, args=(), kwds={}, *, timeout=None):
        """Call `func(*args, **kwds)` in a worker and return its result.

        `timeout`: seconds the call may run in the worker; past that, the worker is killed and
        `TaskTimeoutError` raised.
        """
        self._check_running()
        return self.apply_async(func, args, kwds, timeout=timeout).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None, *, timeout=None):
        """Start `func(*args, **kwds)` in a worker; returns an `AsyncResult`."""
        self._check_running()
        limit = self._time_limit(timeout)
        payload = self._pack(
            (func, args, kwds),
            func,
            lambda: [(f"argument {i + 1}", a) for i, a in enumerate(args)]
            + [(f"keyword argument {k!r}", v) for k, v in kwds.items()],
        )
        has_callbacks = callback is not None or error_callback is not None
        job = self._core.new_job(1, has_callbacks, _label(func), limit)
        result = ApplyResult(job, callback, error_callback)
        if has_callbacks:
            self._cache[job.id] = result
        self._core.submit(job, 0, payload)
        return result

    # --- map family -----------------------------------------------------------------------

    # `timeout=` on the map family limits how long each chunk may run in a worker.

    def map(self, func, iterable, chunksize=None, *, timeout=None):
        return self._map_async(func, iterable, mapstar, chunksize, timeout=timeout).get()

    def starmap(self, func, iterable, chunksize=None, *, timeout=None):
        return self._map_async(func, iterable, starmapstar, chunksize, timeout=timeout).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *, timeout=None):
        return self._map_async(func, iterable, mapstar, chunksize, callback, error_callback, timeout)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *, timeout=None):
        return self._map_async(func, iterable, starmapstar, chunksize, callback, error_callback, timeout)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None, error_callback=None, timeout=None):
        self._check_running()
        limit = self._time_limit(timeout)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        payloads = [
            self._pack((mapper, (func, chunk), {}), func, functools.partial(_input_items, chunk, start))
            for start, chunk in _chunks(iterable, max(chunksize, 1), numbered=True)
        ]
        has_callbacks = callback is not None or error_callback is not None
        job = self._core.new_job(len(payloads), has_callbacks, _label(func), limit)
        result = MapResult(job, len(payloads), callback, error_callback)
        if not payloads:
            # As the stdlib: an empty map is ready at once, and its callback is not called.
            job.mark_ready()
            return result
        if has_callbacks:
            self._cache[job.id] = result
        for part, payload in enumerate(payloads):
            self._core.submit(job, part, payload)
        return result

    def imap(self, func, iterable, chunksize=1, *, timeout=None):
        """Like `map`, but lazy: results are yielded in order as they arrive."""
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return self._imap(func, iterable, chunksize, ordered=True, timeout=timeout)

    def imap_unordered(self, func, iterable, chunksize=1, *, timeout=None):
        """Like `imap`, but results are yielded as soon as they are ready."""
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        return self._imap(func, iterable, chunksize, ordered=False, timeout=timeout)

    def _imap(self, func, iterable, chunksize, ordered, timeout):
        job = self._core.new_job(None, False, _label(func), self._time_limit(timeout))
        result = IMapIterator(job, ordered, chunked=chunksize != 1)
        feeder = threading.Thread(
            target=_feed,
            args=(self._core, job, result, func, iterable, chunksize, self._pack),
            name="rpool-feed",
            daemon=True,
        )
        feeder.start()
        return result

    # --- lifecycle ------------------------------------------------------------------------

    def close(self):
        """No more tasks; workers exit once the queued ones are done."""
        if self._state == RUN:
            self._state = CLOSE
            self._core.close()

    def terminate(self):
        """Kill the workers now; unfinished tasks fail with PoolTerminatedError."""
        if self._state == "INIT":
            return
        self._state = TERMINATE
        self._core.terminate()
        self._cache.clear()
        _live_pools.discard(self)
        _shm.trim()

    def join(self):
        """Wait for the workers to exit (after `close` or `terminate`) and the callbacks to run."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._core.join()
        _live_pools.discard(self)
        _shm.trim()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def __del__(self, _warn=warnings.warn):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            self.terminate()


def _feed(core, job, result, func, iterable, chunksize, pack):
    """On an rpool-feed thread: read `imap`'s input and submit it, as the stdlib's task handler."""
    mapper = mapstar if chunksize != 1 else None
    part = 0
    try:
        items = _chunks(iterable, chunksize) if mapper else iter(iterable)
        for item in items:
            call = (mapper, (func, item), {}) if mapper else (func, (item,), {})
            chunk = item if mapper else (item,)
            try:
                payload = pack(call, func, functools.partial(_input_items, chunk, part * chunksize))
            except Exception as exc:
                core.fail_part(job, part, _dumps(exc))
            else:
                core.submit(job, part, payload)
            part += 1
    except ValueError as exc:
        if str(exc) != "Pool not running":
            result._input_error = exc
    except Exception as exc:
        result._input_error = exc
    finally:
        core.seal(job, part)


def _exec_command(entry):
    from subprocess import _args_from_interpreter_flags

    exe = _spawn.get_executable()
    return [os.fsdecode(exe), *_args_from_interpreter_flags(), "-c", f"from rpool._worker import {entry}; {entry}()"]


@atexit.register
def _terminate_live_pools():
    # A pool left open must not keep the interpreter from exiting, and the core's threads must be
    # gone before Python finalizes.
    for pool in list(_live_pools):
        pool.terminate()
