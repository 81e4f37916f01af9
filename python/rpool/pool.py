"""The public `Pool`: the stdlib's API, argument checks, pickling and result objects.

Scheduling, worker processes and result slots live in the Rust core (`rpool._rpool`); this
module only decides what to send and how to present what comes back.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib
import itertools
import multiprocessing
import os
import pickle
import reprlib
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence, Sized
from multiprocessing import TimeoutError, process
from types import TracebackType

from . import _rpool, _shm
from ._command import exec_command
from ._worker import dumps as _dumps
from ._worker import bootstrap_forked, cloud_dumps, mapstar, rangestar, starmapstar

# Imported where used, to keep a pool's start-up short: asyncio support, progress bars, logging
# (records from workers, a callback that raised), and typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Self, TypeVar
    from typing import Generic as _Generic

    from . import _progress

    T = TypeVar("T")
    S = TypeVar("S")

    # What a callback gets: the result; what an error callback gets: the exception.
    Callback = Callable[[T], object]
    ErrorCallback = Callable[[BaseException], object]
else:
    T = S = None

    class _Generic:
        """`typing.Generic` to type checkers; at run time, subscripting a result class gives a
        `types.GenericAlias`, as the stdlib's own result classes do."""

        __slots__ = ()
        __class_getitem__ = classmethod(types.GenericAlias)

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


def _log_exception(message: str, *args: object) -> None:
    import logging

    logging.getLogger("rpool").exception(message, *args)


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


def _decode(job: _rpool.Job, part: int) -> tuple[bool, Any]:
    """Turn part `part`'s outcome into `(success, value or exception)`."""
    decoded: tuple[bool, Any] | None = job.decode(part, _decode_other)  # a value: unpickled natively
    return _already_taken() if decoded is None else decoded


def _already_taken() -> tuple[bool, Any]:
    return False, RuntimeError("rpool: result was already taken")


def _decode_other(kind: int, data: Any) -> tuple[bool, Any]:
    """`_decode` for an outcome other than a pickled value (see `Job.take` for the kinds)."""
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
        import concurrent.futures  # imported here: `import rpool` stays quick

        return False, concurrent.futures.CancelledError()
    if kind == _OBJECT_VALUE:
        return True, data
    if kind == _OBJECT_RAISED:
        return False, data
    return False, PoolTerminatedError(data)


class ApplyResult(_Generic[T]):
    """The result of `apply_async`: `get`, `wait`, `ready`, `successful`, as the stdlib's."""

    __slots__ = ("_job", "_callback", "_error_callback", "_settled", "_success", "_value", "__weakref__")

    def __init__(
        self, job: _rpool.Job, callback: Callback[T] | None = None, error_callback: ErrorCallback | None = None
    ) -> None:
        self._job = job
        self._callback: Callable[[Any], object] | None = callback
        self._error_callback = error_callback
        self._settled = False
        self._success: bool | None = None
        self._value: Any = None

    def ready(self) -> bool:
        return self._job.ready()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        self._settle()
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        self._wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        if not self._wait(timeout):
            raise TimeoutError
        self._settle()
        if self._success:
            value: T = self._value
            return value
        raise self._value

    def _wait(self, timeout: float | None) -> bool:
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

    def __await__(self) -> Generator[Any, None, T]:
        """`await result`: the value (or the exception), without blocking the event loop."""
        from . import _aio

        yield from _aio.until(self._job, self._job.ready).__await__()
        return self.get()

    def _collect(self) -> tuple[bool, Any]:
        # `_decode` written out: rpool-callbacks runs this once per task, holding the GIL.
        decoded: tuple[bool, Any] | None = self._job.decode(0, _decode_other)
        return _already_taken() if decoded is None else decoded

    def _settle(self) -> None:
        if self._settled:
            return
        with _settle_lock:
            if not self._settled:
                self._success, self._value = self._collect()
                self._settled = True

    def _run_callbacks(self) -> None:
        """On rpool-callbacks: call the callback, then let waiters in. Until then nothing else
        settles a result that has callbacks (it is not ready), so no lock is needed here."""
        try:
            if not self._settled:
                self._success, self._value = self._collect()
                self._settled = True
            callback = self._callback if self._success else self._error_callback
            if callback is not None:
                try:
                    callback(self._value)
                except Exception:
                    _log_exception("rpool: callback %r raised; the pool carries on", callback)
        finally:
            self._callback = self._error_callback = None
            self._job.mark_ready()


# The stdlib's name for the same class.
AsyncResult = ApplyResult


class MapResult(ApplyResult[list[T]]):
    """The result of `map_async`/`starmap_async`: one part per chunk, values in input order."""

    __slots__ = ("_parts", "_progress", "_early")

    def __init__(
        self,
        job: _rpool.Job,
        parts: int,
        callback: Callback[list[T]] | None = None,
        error_callback: ErrorCallback | None = None,
    ) -> None:
        super().__init__(job, callback, error_callback)
        self._parts = parts
        self._progress: _progress.Tracker | None = None
        # Parts decoded by a waiting `get()` before the job completed.
        self._early: dict[int, tuple[bool, Any]] = {}

    def _wait(self, timeout: float | None) -> bool:
        if timeout is None and self._parts > 1 and not getattr(_callback_thread, "active", False):
            self._decode_early()
        if not super()._wait(timeout):
            return False
        if self._progress is not None:
            # The bar shows every item by the time `get()` returns, not a moment later.
            self._progress.finish()
        return True

    def _decode_early(self) -> None:
        """While `get()` waits: unpickle parts as they finish, some at a time, so that the
        parent's unpickling overlaps the workers' work instead of following all of it."""
        job, early = self._job, self._early
        step = max(1, self._parts // 16)
        done = 0
        while done < self._parts:
            job.wait_finished(min(done + step, self._parts) - 1)
            finished = job.finished_parts(done)
            if not finished:
                return
            done += len(finished)
            with _settle_lock:
                if self._settled:
                    return
                for part in finished:
                    if part not in early:
                        early[part] = _decode(job, part)

    def _run_callbacks(self) -> None:
        self._settle()  # under the lock: a waiting get() may be decoding parts (_decode_early)
        super()._run_callbacks()

    def _collect(self) -> tuple[bool, Any]:
        values: list[Any] | None = []
        failure = None
        early = self._early
        for part in range(self._parts):
            ok, value = early.pop(part) if part in early else _decode(self._job, part)
            if ok and failure is None and values is not None:
                values.append(value)
            elif not ok and failure is None:
                failure = value
                values = None
        if failure is not None:
            return False, failure
        return True, list(itertools.chain.from_iterable(values or ()))


# What `ItemQueue._pop` returns when no item is queued (None may be an item).
_EMPTY = object()


class IMapIterator(_rpool.ItemQueue, _Generic[T]):
    """The iterator of `imap` (in order) and `imap_unordered` (as tasks finish).

    Items of decoded chunks wait in the native `ItemQueue`, whose `__next__` hands them out;
    `_refill` (under the lock) waits for and decodes the next part when none is left.
    """

    def __init__(
        self, job: _rpool.Job, ordered: bool, chunked: bool, read_ahead: _ReadAhead | _SequenceFeed | None = None
    ) -> None:
        self._job = job
        self._ordered = ordered
        self._chunked = chunked
        self._next_part = 0
        self._input_error: BaseException | None = None
        self._lock = threading.Lock()
        self._progress: _progress.Tracker | None = None
        # Bounds how far the feeder reads the input ahead of this iterator (`buffersize`).
        self._read_ahead = read_ahead

    def __iter__(self) -> Self:
        return self

    if TYPE_CHECKING:  # served by ItemQueue.__next__: a Python one here would replace it

        def __next__(self) -> T: ...

    def next(self, timeout: float | None = None) -> T:
        item = self._pop(_EMPTY)
        if item is not _EMPTY:
            return item  # type: ignore[no-any-return]
        return self._refill(timeout)

    def _refill(self, timeout: float | None = None) -> T:
        """The next item once the queue is empty: wait for the next part and decode it."""
        with self._lock:
            while True:
                # Another thread may have refilled the queue while this one waited for the lock.
                item = self._pop(_EMPTY)
                if item is not _EMPTY:
                    return item  # type: ignore[no-any-return]
                part = self._wait_next_part(timeout)
                if part is None:
                    if self._progress is not None:
                        self._progress.finish()
                    error, self._input_error = self._input_error, None
                    if error is not None:
                        raise error
                    raise StopIteration
                ok, value = _decode(self._job, part)
                if self._read_ahead is not None and self._read_ahead.part_yielded():
                    # The feeder needs the GIL to read and submit more input; this thread would
                    # keep it while results are ready (up to the 5 ms switch interval), leaving
                    # the workers to run dry first. Let it in now.
                    time.sleep(0)
                if not ok:
                    raise value
                if not self._chunked:
                    return value  # type: ignore[no-any-return]
                self._extend(value)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        """`async for` over the results, waiting on the event loop instead of blocking it."""
        while True:
            try:
                return self.next(timeout=0)
            except StopIteration:
                raise StopAsyncIteration from None
            except TimeoutError:
                from . import _aio

                await _aio.until(self._job, self._has_next)

    def _has_next(self) -> bool:
        if self._has_items():
            return True
        if self._ordered:
            return self._job.wait_part(self._next_part, 0)
        return self._job.wait_any(0)

    def _wait_next_part(self, timeout: float | None) -> int | None:
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


# `imap` input read ahead of the caller, per worker, in chunks, when no `buffersize` is given:
# enough to keep every worker's prefetch full, small enough that an endless generator is fine.
_READ_AHEAD_PER_WORKER = 64


def _check_buffersize(buffersize: int | None) -> int | None:
    """`imap`'s `buffersize`: None or a positive int (as CPython's `Pool.imap` checks it)."""
    if buffersize is None:
        return None
    if isinstance(buffersize, bool) or not isinstance(buffersize, int):
        raise TypeError(f"buffersize must be an integer or None, not {type(buffersize).__name__}")
    if buffersize < 1:
        raise ValueError(f"buffersize must be None or > 0, not {buffersize!r}")
    return buffersize


class _ReadAhead:
    """How far an `imap` feeder may read its input: at most `limit` chunks submitted and not yet
    yielded to the caller. Once at the limit the feeder waits until half of them were yielded,
    so it wakes once per many results instead of once per result."""

    def __init__(self, limit: int, pool: Pool) -> None:
        self.limit = limit
        self.submitted = 0
        self.yielded = 0
        # join() lifts the limit: close()+join() runs all of the input, as the stdlib's pool does.
        self.unbounded = False
        # terminate(), or the pool is gone: read no more.
        self.stopped = False
        self._pool = weakref.ref(pool)
        self._feeder_waits = False
        self._changed = threading.Condition(threading.Lock())

    def _blocked(self, bound: int) -> bool:
        return self.submitted - self.yielded > bound and not (self.unbounded or self.stopped)

    def wait_for_room(self) -> bool:
        """On the feeder, before it reads the next chunk. False once it must stop reading."""
        with self._changed:
            if self._blocked(self.limit - 1):
                while self._blocked(self.limit // 2):
                    # Woken by part_yielded (which clears the flag), lift or stop; the timeout
                    # notices a pool that was dropped without terminate().
                    self._feeder_waits = True
                    if not self._changed.wait(1.0):
                        pool = self._pool()
                        if pool is None or pool._state == TERMINATE:
                            self.stopped = True
                self._feeder_waits = False
            return not self.stopped

    def part_submitted(self) -> None:
        with self._changed:
            self.submitted += 1

    def part_yielded(self) -> bool:
        """On the caller, per part yielded. True when that let a waiting feeder go on."""
        with self._changed:
            self.yielded += 1
            if self._feeder_waits and not self._blocked(self.limit // 2):
                self._feeder_waits = False
                self._changed.notify()
                return True
            return False

    def lift(self) -> None:
        with self._changed:
            self.unbounded = True
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self.stopped = True
            self._changed.notify()


class _SequenceFeed:
    """Feeds an `imap` job whose input is a list, tuple or range from the threads that use the
    iterator, instead of from a feeder thread: `limit` parts at the start, more as parts are
    yielded (keeping between `limit // 2` and `limit` ahead of the caller, as `_ReadAhead`
    does), the rest in join(). Such input is sliced, never read item by item, so this costs
    the caller little, where a feeder thread costs a thread start and a GIL hand-over per batch.
    """

    def __init__(
        self, pool: Pool, job: _rpool.Job, func: Callable[..., Any], items: Sequence[Any], chunksize: int,
        sizes: list[int] | None, limit: int, registry: set[Any],
    ) -> None:
        self._core = pool._core
        self._pack = pool._pack
        self._job = job
        self._func = func
        self._mapper = mapstar if chunksize != 1 else None
        self._pickled, self._ranged = _job_callable(func, self._mapper, items, pool._sends_by_name)
        self._native = _native_range(items, self._ranged, self._pickled)
        self._items = items
        self._chunksize = chunksize
        self._parts = -(-len(items) // chunksize)
        self._sizes = sizes
        self._registry = registry
        self.limit = limit
        self.submitted = 0
        self.yielded = 0
        self._sealed = False
        self._lock = threading.Lock()
        registry.add(self)

    def feed(self, upto: int) -> None:
        """Submit the parts before `upto` not yet submitted; seal the job after the last one.
        The first parts go out in batches that grow from one, so that workers start at once."""
        with self._lock:
            if self._sealed:
                return
            end = min(upto, self._parts)
            try:
                if self._native:
                    while self.submitted < end:
                        self._submit([], count=1 if self.submitted == 0 else end - self.submitted)
                else:
                    self._pack_and_submit(end)
            except ValueError as exc:  # terminated meanwhile: what was not submitted never runs
                if str(exc) != "Pool not running":
                    raise
                self._seal()
                return
            if self.submitted == self._parts:
                self._seal()

    def _pack_and_submit(self, end: int) -> None:
        """Pickle and submit the parts before `end`; one that cannot be pickled fails alone."""
        size, items, mapper = self._chunksize, self._items, self._mapper
        batch: list[bytes] = []
        most = 1 if self.submitted == 0 else end
        for part in range(self.submitted, end):
            start = part * size
            item = items[start : start + size] if mapper else items[start]
            try:
                batch.append(_pack_part(self._pack, self._pickled, self._ranged, self._func, mapper, item, start))
            except Exception as exc:
                self._submit(batch)
                self._submit([], failure=_dumps(exc))
                batch = []
                continue
            if len(batch) >= most:
                self._submit(batch)
                batch, most = [], min(2 * most, 256)
        self._submit(batch)

    def _submit(self, batch: list[bytes], failure: bytes | None = None, count: int = 0) -> None:
        """Submit `batch` as the next parts; with `failure`, fail the next part with it; with
        `count` (and a native range), have the core write the next `count` parts."""
        count = 1 if failure is not None else count or len(batch)
        if count == 0:
            return
        first = self.submitted
        if self._sizes is not None:  # the progress bar's item counts, before the parts can end
            self._sizes.extend(_chunk_lengths(len(self._items), self._chunksize, first, count))
        if failure is not None:
            self._core.fail_part(self._job, first, failure)
        elif self._native:
            _submit_range_chunks(self._core, self._job, first, count, self._items, self._chunksize, self._pickled)  # type: ignore[arg-type]
        else:
            _submit_batch(self._core, self._job, first, batch, self._pickled)
        self.submitted += count

    def _seal(self) -> None:
        self._sealed = True
        self._items = ()  # the input is not kept alive by a finished iterator
        self._core.seal(self._job, self.submitted)
        self._registry.discard(self)

    def part_yielded(self) -> bool:
        """On a thread taking results, per part yielded: top up the parts ahead. Returns
        False: no feeder thread waits for the GIL."""
        with self._lock:
            self.yielded += 1
            due = self.submitted - self.yielded <= self.limit // 2 and not self._sealed
        if due:
            self.feed(self.yielded + self.limit)
        return False

    def lift(self) -> None:
        """join(): run all of the input, as the stdlib's pool does."""
        self.feed(self._parts)

    def stop(self) -> None:
        """terminate(): submit no more."""
        with self._lock:
            if not self._sealed:
                self._seal()


def _chunks(iterable: Iterable[Any], size: int, numbered: bool = False) -> Iterator[Any]:
    """Tuples of up to `size` items; with `numbered`, `(index of the first item, chunk)` pairs."""
    it = iter(iterable)
    start = 0
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield (start, chunk) if numbered else chunk
        start += len(chunk)


def _input_items(chunk: Sequence[Any], start: int) -> list[tuple[str, Any]]:
    return [(f"input item {start + i}", item) for i, item in enumerate(chunk)]


# Set on rpool-callbacks while it runs callbacks.
_callback_thread = threading.local()


def _deliver(cache: dict[int, ApplyResult[Any]], job_ids: Iterable[int]) -> None:
    """Run on rpool-callbacks with the GIL: the callbacks of jobs that just finished."""
    _callback_thread.active = True
    take = cache.pop
    for job_id in job_ids:
        result = take(job_id, None)
        if result is not None:
            result._run_callbacks()


def _label(func: object) -> str:
    """How error messages name a task's function: `module.qualname`."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if not isinstance(name, str):
        return repr(func)[:200]
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) else name


# A function pickles by name (its module and qualified name), so its pickle never changes: it is
# made once per function (and per map helper), sent apart from the arguments, and workers keep
# what they unpickled (TASK_REUSABLE) instead of importing and looking it up for every task.
# Each entry also keeps the function's `_label`.
_by_name_cache: dict[Any, tuple[bytes, str]] = {}
_BY_NAME_MAX = 1024


def _by_name(
    func: object, mapper: Callable[..., Any] | None = None, ranged: bool = False
) -> tuple[bytes, str] | None:
    """The pickle of `func` (or of `partial(mapper, func)`, or with `ranged` of
    `partial(rangestar, mapper, func)`) and `func`'s label, if `func` is a function that pickles
    by name, else None: other callables may carry state, which must travel with each task."""
    kind = type(func)
    if kind is not types.FunctionType and not (
        kind is types.BuiltinFunctionType and isinstance(getattr(func, "__self__", None), types.ModuleType)
    ):
        return None
    key = func if mapper is None else (mapper, func, ranged)
    named = _by_name_cache.get(key)
    if named is None:
        if mapper is None:
            callable_: Any = func
        elif ranged:
            callable_ = functools.partial(rangestar, mapper, func)  # type: ignore[arg-type]
        else:
            callable_ = functools.partial(mapper, func)
        try:
            named = pickle.dumps(callable_, pickle.HIGHEST_PROTOCOL), _label(func)
        except Exception:
            return None  # the whole task is pickled instead, and its error names the culprit
        if len(_by_name_cache) >= _BY_NAME_MAX:
            _by_name_cache.clear()
        _by_name_cache[key] = named
    return named


def _job_callable(
    func: Callable[..., Any], mapper: Callable[..., Any] | None, iterable: object, by_name: bool
) -> tuple[bytes | None, bool]:
    """How a map or imap job sends its function: `(pickled callable, ranged)`. The callable is
    None when each part carries its whole call; `ranged`: the input is a range whose chunks go
    as rangestar's `(start, stop, step)`."""
    if not by_name:
        return None, False
    ranged = mapper is not None and type(iterable) is range
    named = _by_name(func, mapper, ranged)
    return (None, False) if named is None else (named[0], ranged)


def _pack_part(
    pack: Callable[..., bytes],
    pickled: bytes | None,
    ranged: bool,
    func: Callable[..., Any],
    mapper: Callable[..., Any] | None,
    item: Any,
    start: int,
) -> bytes:
    """The payload of one part of a map or imap job: `item` is its chunk (with `mapper`) or its
    one input item. With the job's `pickled` callable, only the arguments, `(item,)` or for a
    `ranged` chunk rangestar's three ints; without it, the whole call, pickled by `pack`. A part
    that cannot be pickled raises the error that names the input item to blame."""
    chunk = item if mapper is not None else (item,)
    call: tuple[Any, ...] = (mapper, (func, item), {}) if mapper is not None else (func, (item,), {})
    if pickled is None:
        payload: bytes = pack(call, func, functools.partial(_input_items, chunk, start))
        return payload
    if ranged:
        return _shm.dumps(((item.start, item.stop, item.step), {}))
    try:
        return _shm.dumps(((item,), {}))
    except Exception as exc:
        pack(call, func, functools.partial(_input_items, chunk, start))  # raises, naming the item
        raise UnpicklableTaskError(f"cannot pickle the input of {_label(func)}: {exc}") from exc


def _submit_batch(core: Any, job: _rpool.Job, first: int, batch: list[bytes], pickled: bytes | None) -> None:
    """Submit parts `first`, `first + 1`, ... of `job` in one go."""
    if not batch:
        return
    if pickled is None:
        core.submit_many(job, first, batch)
    else:
        core.submit_many(job, first, batch, pickled, True)


# A range whose bounds stay well inside 64 bits has its chunks' rangestar arguments written by
# the core (`submit_range_chunks`), not sliced and pickled here one chunk at a time.
_NATIVE_RANGE_LIMIT = 1 << 62


def _native_range(items: object, ranged: bool, pickled: bytes | None) -> bool:
    if not ranged or pickled is None or type(items) is not range:
        return False
    return all(-_NATIVE_RANGE_LIMIT < v < _NATIVE_RANGE_LIMIT for v in (items.start, items.stop, items.step))


def _submit_range_chunks(
    core: Any, job: _rpool.Job, first: int, count: int, items: range, size: int, pickled: bytes
) -> None:
    """Submit parts `first` to `first + count - 1` of a map over `items` in chunks of `size`."""
    core.submit_range_chunks(job, first, items.start, items.step, len(items), size, count, pickled)


def _chunk_lengths(total: int, size: int, first: int, count: int) -> list[int]:
    """How many items chunks `first` to `first + count - 1` hold, `total` items in chunks of `size`."""
    return [min(size, total - part * size) for part in range(first, first + count)]


def _slices(iterable: Sequence[Any], size: int, ranges: bool) -> list[tuple[int, Sequence[Any]]]:
    """`map`'s chunks as `(index of the first item, chunk)`. A list or tuple is sliced, and so is
    a range if `ranges` (its slices are ranges: its items are neither built nor pickled one by
    one here, see `rangestar`)."""
    if type(iterable) in (list, tuple) or (ranges and type(iterable) is range):
        return [(start, iterable[start : start + size]) for start in range(0, len(iterable), size)]
    return list(_chunks(iterable, size, numbered=True))


def _bar_label(func: object) -> str | None:
    """A progress bar's default description: the function's own name."""
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else None


def _open_bar(
    progress: _progress.Progress, total: int | None, func: object
) -> tuple[_progress.ProgressBar, bool] | None:
    """`_progress.open_bar`, which is imported only for a bar."""
    if progress is None or progress is False:
        return None
    from . import _progress

    return _progress.open_bar(progress, total, _bar_label(func))


def _tracker(
    job: _rpool.Job, bar: tuple[_progress.ProgressBar, bool], sizes: Sequence[int] | None
) -> _progress.Tracker:
    from . import _progress

    return _progress.Tracker(job, *bar, sizes)


# Names an object in an error message without printing all of a huge one.
_short_repr = reprlib.Repr()
_short_repr.maxother = _short_repr.maxstring = 120


def _dump_task(
    call: tuple[Any, ...],
    func: object,
    parts: Callable[[], list[tuple[str, Any]]],
    dumps: Callable[[Any], bytes] = _shm.dumps,
) -> bytes:
    """Pickle `call` for a worker with `dumps`. If it cannot be, find which of the function and
    `parts()` (`(what, object)` pairs: the arguments or input items) is to blame, and say so."""
    try:
        return dumps(call)
    except Exception as exc:
        culprit, blamed = "the task", None  # type: tuple[str, object]
        for what, obj in [("the function", func), *parts()]:
            try:
                dumps(obj)
            except Exception:
                culprit, blamed = f"{what} {_short_repr.repr(obj)}", obj
                break
        hint = _CLOUDPICKLE_HINT if dumps is _shm.dumps and _cloudpickle_would_help(blamed, exc) else ""
        raise UnpicklableTaskError(f"cannot pickle {culprit} for {_label(func)}: {exc}{hint}") from exc


_CLOUDPICKLE_HINT = (
    '; to send lambdas, closures and locally defined functions or classes, make the pool with '
    'serializer="cloudpickle" (pip install "rpool[cloudpickle]")'
)


def _cloudpickle_would_help(obj: object, exc: Exception) -> bool:
    """Plain pickle refused a function or class it could only send by name."""
    if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial, type)):
        return True
    text = str(exc)
    return "<lambda>" in text or "<locals>" in text or "local object" in text


_SERIALIZERS = ("pickle", "cloudpickle")


def _task_dumps(serializer: str) -> Callable[[Any], bytes]:
    """How tasks are pickled for `Pool(serializer=)`."""
    if serializer not in _SERIALIZERS:
        raise ValueError(f"serializer must be 'pickle' or 'cloudpickle', not {serializer!r}")
    if serializer == "pickle":
        return _shm.dumps
    try:
        importlib.import_module("cloudpickle")  # only to fail here, early and clearly
    except ImportError as exc:
        raise ImportError(
            'serializer="cloudpickle" needs cloudpickle, which is not installed: pip install "rpool[cloudpickle]"',
            name="cloudpickle",
        ) from exc
    return cloud_dumps


def _check_seconds(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, not {type(value).__name__}")
    if not 0 < value < 1e9:
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _check_pool_arguments(
    processes: int | None, initializer: Callable[..., object] | None, maxtasksperchild: int | None = None
) -> int:
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


def _start_method(context: Any) -> str:
    if context is None:
        return multiprocessing.get_context().get_start_method()
    return str(context.get_start_method())


_NAME_PREFIX = {"fork": "Fork", "spawn": "Spawn", "forkserver": "ForkServer"}

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    """A process pool with the API of `multiprocessing.Pool`, run by rpool's Rust core."""

    # How a call `(func, args, kwds)` goes to the core: `_pack(call, func, parts)` pickles it
    # (naming the part that cannot be); ThreadPool passes it as it is.
    _pack = staticmethod(_dump_task)
    # Whether tasks send a function that pickles by name apart from its arguments (`_by_name`);
    # only rpool's own process core reads such tasks.
    _sends_by_name = False
    # imap over a list, tuple or range is fed by the caller's thread (`_SequenceFeed`): only for
    # cores whose submit never blocks.
    _feeds_sequences = True
    # The core that runs the tasks: `_rpool.PoolCore` here, another for ThreadPool and Dask.
    _core: Any

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        task_timeout: float | None = None,
        max_memory_per_child: int | None = None,
        forward_logs: bool = False,
        serializer: str = "pickle",
        _early_server: _rpool.EarlyForkServer | None = None,
    ) -> None:
        self._state = "INIT"
        self._cache: dict[int, ApplyResult[Any]] = {}
        # The core caches logging levels; a level set since the last pool applies to this one.
        _rpool.reset_log_cache()
        processes = _check_pool_arguments(processes, initializer, maxtasksperchild)
        dumps = _task_dumps(serializer)
        if dumps is not _shm.dumps:
            self._pack = functools.partial(_dump_task, dumps=dumps)
        self._sends_by_name = dumps is _shm.dumps
        self._task_timeout = _check_seconds(task_timeout, "task_timeout")
        if max_memory_per_child is not None:
            if isinstance(max_memory_per_child, bool) or not isinstance(max_memory_per_child, int):
                raise TypeError("max_memory_per_child must be a number of bytes (int) or None")
            if max_memory_per_child <= 0:
                raise ValueError("max_memory_per_child must be a positive number of bytes or None")
        # A spawned worker re-importing a script without a main guard must not start pools of
        # its own, even "fork" ones (the stdlib refuses those too: its workers are daemonic).
        if getattr(process.current_process(), "_inheriting", False):
            from multiprocessing import spawn

            spawn._check_not_importing_main()  # type: ignore[attr-defined]  # raises the stdlib's error
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
            "start_method": method,
            # Workers send records at or above the parent's root level at this moment.
            "forward_logs": _root_log_level() if forward_logs else None,
            "serializer": serializer,
        }
        log_sink = _handle_worker_records if forward_logs else None
        deliver = functools.partial(_deliver, self._cache)
        if method == "fork":
            bootstrap = functools.partial(bootstrap_forked, setup)
            self._core = _rpool.PoolCore(
                processes, method, maxtasksperchild, deliver, fork_bootstrap=bootstrap, log_sink=log_sink
            )
        else:
            prep = _preparation_data(f"{_NAME_PREFIX[method]}PoolWorker")
            # The stdlib refuses to pickle an AuthenticationString outside its own spawning.
            prep["authkey"] = bytes(prep["authkey"])
            preamble = [pickle.dumps(prep, pickle.HIGHEST_PROTOCOL), dumps(setup)]
            entry = "forkserver_main" if method == "forkserver" else "spawn_main"
            self._core = _rpool.PoolCore(
                processes,
                method,
                maxtasksperchild,
                deliver,
                exec_argv=exec_command(entry),
                exec_preamble=preamble,
                log_sink=log_sink,
                forkserver=_early_server,
            )
        self._state = RUN
        if self._sends_by_name and type(self).apply_async is Pool.apply_async:
            # Shadows the method on this pool with its common case done natively, in one call
            # (see `_rpool.ApplyAsync`); the method still does everything else.
            vars(self)["apply_async"] = _rpool.ApplyAsync(
                self._core,
                weakref.ref(self),
                Pool.apply_async,
                _by_name_cache,
                _by_name,
                ApplyResult,
                self._cache,
                self._task_timeout,
                _shm.MIN_SHARED,
            ).apply_async
        _live_pools.add(self)

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} pool_size={self._processes}>"

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # --- single calls ---------------------------------------------------------------------

    def _time_limit(self, timeout: float | None) -> float | None:
        """A call's `timeout=` (seconds each task may run), or the pool's `task_timeout`."""
        if timeout is None:
            return self._task_timeout
        return _check_seconds(timeout, "timeout")

    def apply(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        *,
        timeout: float | None = None,
    ) -> T:
        """Call `func(*args, **kwds)` in a worker and return its result.

        `timeout`: seconds the call may run in the worker; past that, the worker is killed and
        `TaskTimeoutError` raised.
        """
        self._check_running()
        return self.apply_async(func, args, kwds, timeout=timeout).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callback[T] | None = None,
        error_callback: ErrorCallback | None = None,
        *,
        timeout: float | None = None,
    ) -> ApplyResult[T]:
        """Start `func(*args, **kwds)` in a worker; returns an `AsyncResult`."""
        # `_check_running` and `_time_limit` written out: this runs once per task.
        if self._state != RUN:
            raise ValueError("Pool not running")
        limit = self._task_timeout if timeout is None else _check_seconds(timeout, "timeout")
        named = _by_name(func) if self._sends_by_name else None
        payload = None
        if named is not None:
            try:
                payload = _shm.dumps((args, kwds))
            except Exception:
                named = None  # pickled whole below, to name the argument that cannot be
        if payload is None:
            payload = self._pack(
                (func, args, kwds),
                func,
                lambda: [(f"argument {i + 1}", a) for i, a in enumerate(args)]
                + [(f"keyword argument {k!r}", v) for k, v in kwds.items()],
            )
        has_callbacks = callback is not None or error_callback is not None
        label = _label(func) if named is None else named[1]
        job = self._core.new_job(1, has_callbacks, label, limit)
        result: ApplyResult[T] = ApplyResult(job, callback, error_callback)
        if has_callbacks:
            self._cache[job.id] = result
        if named is None:
            self._core.submit(job, 0, payload)
        else:
            self._core.submit(job, 0, payload, named[0], True)
        return result

    # --- map family -----------------------------------------------------------------------

    # `timeout=` on the map family limits how long each chunk may run in a worker.

    # `progress=` on the map family: True, a tqdm instance or a dict of tqdm keywords shows a
    # bar in the parent that advances by items as tasks end (see `_progress`).

    def map(
        self,
        func: Callable[[S], T],
        iterable: Iterable[S],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> list[T]:
        return self._map_async(func, iterable, mapstar, chunksize, timeout=timeout, progress=progress).get()

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> list[T]:
        return self._map_async(func, iterable, starmapstar, chunksize, timeout=timeout, progress=progress).get()

    def map_async(
        self,
        func: Callable[[S], T],
        iterable: Iterable[S],
        chunksize: int | None = None,
        callback: Callback[list[T]] | None = None,
        error_callback: ErrorCallback | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> MapResult[T]:
        return self._map_async(func, iterable, mapstar, chunksize, callback, error_callback, timeout, progress)

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callback[list[T]] | None = None,
        error_callback: ErrorCallback | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> MapResult[T]:
        return self._map_async(func, iterable, starmapstar, chunksize, callback, error_callback, timeout, progress)

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        mapper: Callable[..., Any],
        chunksize: int | None = None,
        callback: Callback[Any] | None = None,
        error_callback: ErrorCallback | None = None,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> MapResult[Any]:
        self._check_running()
        limit = self._time_limit(timeout)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)  # type: ignore[arg-type]
            if extra:
                chunksize += 1
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        pickled, ranged = _job_callable(func, mapper, iterable, self._sends_by_name)
        size, total = max(chunksize, 1), len(iterable)  # type: ignore[arg-type]
        native = _native_range(iterable, ranged, pickled)
        chunks = [] if native else _slices(iterable, size, ranged)  # type: ignore[arg-type]
        count = -(-total // size) if native else len(chunks)
        has_callbacks = callback is not None or error_callback is not None
        bar = _open_bar(progress, total, func)
        job = self._core.new_job(count, has_callbacks, _label(func), limit)
        result: MapResult[Any] = MapResult(job, count, callback, error_callback)
        if bar is not None:
            result._progress = _tracker(job, bar, _chunk_lengths(total, size, 0, count))
        if not count:
            # As the stdlib: an empty map is ready at once, and its callback is not called.
            job.mark_ready()
            return result
        if has_callbacks:
            self._cache[job.id] = result
        if native:
            # The first chunk alone, so that a worker starts while the core writes the rest.
            _submit_range_chunks(self._core, job, 0, 1, iterable, size, pickled)  # type: ignore[arg-type]
            _submit_range_chunks(self._core, job, 1, count - 1, iterable, size, pickled)  # type: ignore[arg-type]
        else:
            self._submit_chunks(job, func, mapper, chunks, pickled, ranged)
        return result

    def _submit_chunks(
        self,
        job: _rpool.Job,
        func: Callable[..., Any],
        mapper: Callable[..., Any],
        chunks: list[tuple[int, Any]],
        pickled: bytes | None,
        ranged: bool,
    ) -> None:
        """Pickle and submit a map's chunks in batches that grow from one: the workers start on
        the first chunk while the rest are pickled. A chunk that cannot be pickled fails the job
        (without its callbacks) and raises here, as the stdlib's map does."""
        core = self._core
        batch: list[bytes] = []
        first, size = 0, 1
        for part, (start, chunk) in enumerate(chunks):
            try:
                batch.append(_pack_part(self._pack, pickled, ranged, func, mapper, chunk, start))
            except BaseException as exc:
                self._cache.pop(job.id, None)
                _submit_batch(core, job, first, batch, pickled)
                failure = _dumps(exc)
                for rest in range(part, len(chunks)):
                    core.fail_part(job, rest, failure)
                raise
            if len(batch) >= size:
                _submit_batch(core, job, first, batch, pickled)
                first, batch, size = part + 1, [], min(2 * size, 256)
        _submit_batch(core, job, first, batch, pickled)

    def imap(
        self,
        func: Callable[[S], T],
        iterable: Iterable[S],
        chunksize: int = 1,
        buffersize: int | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> IMapIterator[T]:
        """Like `map`, but lazy: results are yielded in order as they arrive.

        `buffersize`: at most this many chunks are read from `iterable` ahead of the results
        yielded (default: 64 per worker), so an endless or huge generator is read as you go.
        """
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        buffersize = _check_buffersize(buffersize)
        return self._imap(
            func, iterable, chunksize, ordered=True, timeout=timeout, progress=progress, buffersize=buffersize
        )

    def imap_unordered(
        self,
        func: Callable[[S], T],
        iterable: Iterable[S],
        chunksize: int = 1,
        buffersize: int | None = None,
        *,
        timeout: float | None = None,
        progress: _progress.Progress = None,
    ) -> IMapIterator[T]:
        """Like `imap`, but results are yielded as soon as they are ready."""
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        buffersize = _check_buffersize(buffersize)
        return self._imap(
            func, iterable, chunksize, ordered=False, timeout=timeout, progress=progress, buffersize=buffersize
        )

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        timeout: float | None,
        progress: _progress.Progress = None,
        buffersize: int | None = None,
    ) -> IMapIterator[Any]:
        # The bar first: if it cannot be made, no open job is left for close() to wait on.
        total = len(iterable) if isinstance(iterable, Sized) else None
        bar = _open_bar(progress, total, func)
        job = self._core.new_job(None, False, _label(func), self._time_limit(timeout))
        limit = buffersize or _READ_AHEAD_PER_WORKER * self._processes
        read_aheads: set[Any] = self.__dict__.setdefault("_read_aheads", set())
        # Chunk sizes, appended by the feeder before each chunk goes out; None: one item per task.
        sizes: list[int] | None = [] if bar is not None and chunksize != 1 else None
        if self._feeds_sequences and type(iterable) in (list, tuple, range):
            feed = _SequenceFeed(self, job, func, iterable, chunksize, sizes, limit, read_aheads)  # type: ignore[arg-type]
            result: IMapIterator[Any] = IMapIterator(job, ordered, chunked=chunksize != 1, read_ahead=feed)
            if bar is not None:
                result._progress = _tracker(job, bar, sizes)
            elif not ordered and chunksize != 1:
                # Its __next__ decodes chunks that finished with a value itself, in any order.
                result._decode_finished_chunks(job, feed.part_yielded)
            feed.feed(limit)
            return result
        read_ahead = _ReadAhead(limit, self)
        read_aheads.add(read_ahead)
        result = IMapIterator(job, ordered, chunked=chunksize != 1, read_ahead=read_ahead)
        if bar is not None:
            result._progress = _tracker(job, bar, sizes)
        feeder = threading.Thread(
            target=_feed,
            args=(
                self._core, job, result, func, iterable, chunksize, self._pack, sizes, read_ahead, read_aheads,
                self._sends_by_name,
            ),
            name="rpool-feed",
            daemon=True,
        )
        feeder.start()
        return result

    def _release_read_aheads(self, how: str) -> None:
        """Wake `imap` feeders waiting for their caller: `lift` (join) or `stop` (terminate)."""
        for read_ahead in list(self.__dict__.get("_read_aheads", ())):
            getattr(read_ahead, how)()

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done."""
        if self._state == RUN:
            self._state = CLOSE
            self._core.close()

    def terminate(self) -> None:
        """Kill the workers now; unfinished tasks fail with PoolTerminatedError."""
        if self._state == "INIT":
            return
        self._state = TERMINATE
        self._release_read_aheads("stop")
        self._core.terminate()
        self._cache.clear()
        _live_pools.discard(self)
        _shm.trim()

    def join(self) -> None:
        """Wait for the workers to exit (after `close` or `terminate`) and the callbacks to run."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._release_read_aheads("lift")
        self._core.join()
        _live_pools.discard(self)
        _shm.trim()

    def __enter__(self) -> Self:
        self._check_running()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        self.terminate()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            self.terminate()


def _root_log_level() -> int:
    import logging

    return logging.getLogger().getEffectiveLevel()


def _handle_worker_records(records: list[bytes]) -> None:
    """On rpool-io (`Pool(forward_logs=True)`): hand workers' log records to this process's
    loggers, filtered by their levels here, before the results that follow them are delivered."""
    import logging

    for data in records:
        try:
            record = logging.makeLogRecord(pickle.loads(data))
            logger = logging.getLogger(record.name if record.name != "root" else None)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:
            _log_exception("rpool: could not handle a log record from a worker")


def _feed(
    core: Any,
    job: _rpool.Job,
    result: IMapIterator[Any],
    func: Callable[..., Any],
    iterable: Iterable[Any],
    chunksize: int,
    pack: Callable[..., Any],
    sizes: list[int] | None = None,
    read_ahead: _ReadAhead | None = None,
    read_aheads: set[_ReadAhead] | None = None,
    by_name: bool = False,
) -> None:
    """On an rpool-feed thread: read `imap`'s input and submit it, as the stdlib's task handler,
    no further ahead of the caller than `read_ahead` allows."""
    mapper = mapstar if chunksize != 1 else None
    pickled, ranged = _job_callable(func, mapper, iterable, by_name)
    part = 0
    try:
        if not mapper:
            items = iter(iterable)
        elif ranged and isinstance(iterable, range):
            # Its slices are ranges: nothing to build item by item.
            items = (iterable[i : i + chunksize] for i in range(0, len(iterable), chunksize))
        else:
            items = _chunks(iterable, chunksize)
        while read_ahead is None or read_ahead.wait_for_room():
            try:
                item = next(items)
            except StopIteration:
                break
            if sizes is not None:
                sizes.append(len(item) if mapper else 1)
            try:
                payload = _pack_part(pack, pickled, ranged, func, mapper, item, part * chunksize)
            except Exception as exc:
                core.fail_part(job, part, _dumps(exc))
            else:
                if pickled is None:
                    core.submit(job, part, payload)
                else:
                    core.submit(job, part, payload, pickled, True)
            part += 1
            if read_ahead is not None:
                read_ahead.part_submitted()
    except ValueError as exc:
        if str(exc) != "Pool not running":
            result._input_error = exc
    except Exception as exc:
        result._input_error = exc
    finally:
        core.seal(job, part)
        if read_aheads is not None:
            read_aheads.discard(read_ahead)


def _preparation_data(name: str) -> dict[str, Any]:
    """`multiprocessing.spawn.get_preparation_data(name)`: what an exec'd worker needs to rebuild
    the parent's sys.path, cwd, authkey and `__main__`.

    Made here (a few ms of each pool's start-up: multiprocessing.spawn brings multiprocessing.util,
    runpy and subprocess) unless the program imported multiprocessing.util, whose logging
    settings the stdlib's version adds. tests/test_startup.py checks both give the same.
    """
    if "multiprocessing.util" in sys.modules:
        from multiprocessing import spawn

        data: dict[str, Any] = spawn.get_preparation_data(name)
        return data
    original_dir = process.ORIGINAL_DIR  # type: ignore[attr-defined]
    # sys.path's "" (the current directory) is the one the parent started in.
    sys_path = sys.path.copy()
    if "" in sys_path:
        sys_path[sys_path.index("")] = original_dir
    data = {
        "log_to_stderr": False,
        "authkey": process.current_process().authkey,
        "name": name,
        "sys_path": sys_path,
        "sys_argv": sys.argv,
        "orig_dir": original_dir,
        "dir": os.getcwd(),
        "start_method": multiprocessing.get_start_method(),
    }
    main = sys.modules["__main__"]
    main_name = getattr(getattr(main, "__spec__", None), "name", None)
    if main_name is not None:
        data["init_main_from_name"] = main_name
    else:
        main_path = getattr(main, "__file__", None)
        if main_path is not None:
            if not os.path.isabs(main_path) and original_dir is not None:
                main_path = os.path.join(original_dir, main_path)
            data["init_main_from_path"] = os.path.normpath(main_path)
    return data


@atexit.register
def _terminate_live_pools() -> None:
    # A pool left open must not keep the interpreter from exiting, and the core's threads must be
    # gone before Python finalizes.
    for pool in list(_live_pools):
        pool.terminate()
