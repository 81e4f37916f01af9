"""`rpool.distributed.Pool`: rpool's `Pool` API on a Dask `distributed` cluster.

    pip install "rpool[distributed]"

The methods and result objects are `rpool.Pool`'s own code: this `Pool` subclasses it and gives
it a different core. Each task (one chunk of a map) becomes one impure Dask task that runs
`_run_part` on a worker; that returns the same `(ok, pickled result)` pair a local rpool worker
sends back, and the parent files it into a `JobBoard` (Rust, `src/board.rs`) result slot, so
`get`/`wait`, callbacks and errors behave as they do locally.

    apply_async / map_async / imap feeder
        └─► _DaskCore.submit ──client.submit──► Dask worker: _run_part(payload) -> (ok, bytes)
    Future done ─► Dask's callback thread ─► queue ─► rpool-dask-collect: gather a batch,
        JobBoard.settle(job, part, ...) ─► rpool-callbacks (callbacks, one at a time) ─► ready
    a task with a time limit starts ─► Dask event ─► same queue: rpool-dask-collect settles it
        as timed out at its deadline (and the worker interrupts the task's thread)

Functions and arguments are pickled with cloudpickle (as Dask does), so functions defined in the
script itself reach workers on other machines; results and exceptions come back the same way.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import heapq
import logging
import os
import queue
import threading
import time
import uuid

try:
    import cloudpickle
    import distributed
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rpool.distributed needs Dask's distributed scheduler; install it with: pip install 'rpool[distributed]'"
    ) from exc

from . import _rpool
from ._worker import execute
from .pool import _LOST, _RAISED, _TERMINATED, _TIMED_OUT, _VALUE, CLOSE, RUN, TERMINATE, TaskTimeoutError
from .pool import _check_seconds, _deliver, _dump_task, _live_pools
from .pool import Pool as _LocalPool

__all__ = ["Pool"]

_log = logging.getLogger("rpool")

_TERMINATED_MESSAGE = "the pool was terminated before this task finished"
_CANCELLED_MESSAGE = "the task was cancelled on the Dask cluster (client.cancel, restart or shutdown)"

# How many chunks of one imap/imap_unordered may be submitted and unfinished, per worker slot.
_IMAP_CHUNKS_PER_SLOT = 4


def _cloud_dumps(obj):
    return cloudpickle.dumps(obj, protocol=5)


def _run_part(payload, time_limit=None, started_topic=None):
    """On a Dask worker: run one pickled `(func, args, kwds)`; returns `(ok, pickled result)`.

    With a `time_limit`, tell the parent the clock started (an event on `started_topic`), and
    when the limit passes raise `_DeadlinePassed` in this thread: Dask cannot kill a task, and
    its worker may be running others. Code blocked in C meets the exception once that call returns.
    """
    if time_limit is None:
        return execute(payload, dumps=_cloud_dumps)
    worker = distributed.get_worker()
    worker.log_event(started_topic, worker.get_current_task())
    deadline = _Deadline(threading.get_ident())
    timer = threading.Timer(time_limit, deadline.interrupt)
    timer.daemon = True
    timer.start()
    try:
        try:
            outcome = execute(payload, dumps=_cloud_dumps)
        finally:
            timer.cancel()
            deadline.disarm()
    except _DeadlinePassed:
        pass
    if deadline.passed:
        message = f"the task ran past its time limit of {time_limit:g} s; rpool interrupted it on its Dask worker"
        return False, _cloud_dumps(TaskTimeoutError(message))
    return outcome


class _DeadlinePassed(BaseException):
    """Raised in a Dask task's thread when its time limit passes (not an Exception, so that
    the task's own `except Exception` does not swallow it)."""


class _Deadline:
    """Raises `_DeadlinePassed` in one thread when `interrupt` is called, unless disarmed first."""

    def __init__(self, thread_id):
        self._thread_id = ctypes.c_ulong(thread_id)
        self._lock = threading.Lock()
        self._armed = True
        self.passed = False

    def interrupt(self):
        with self._lock:
            if self._armed:
                self.passed = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(self._thread_id, ctypes.py_object(_DeadlinePassed))

    def disarm(self):
        with self._lock:
            self._armed = False
            if self.passed:
                # Withdraw the exception if the thread has not met it yet.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(self._thread_id, None)


class _RunInitializer(distributed.WorkerPlugin):
    """Runs the pool's initializer once in every worker process, including ones that join later."""

    def __init__(self, initializer, initargs):
        self.initializer = initializer
        self.initargs = initargs

    def setup(self, worker):
        self.initializer(*self.initargs)


def _local_cluster(n_workers, scheduler_kwargs=None):
    """A LocalCluster of `n_workers` single-threaded worker processes, reachable on 127.0.0.1
    only, without dashboards (the scheduler's health endpoints take a free loopback port)."""
    return distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0", **(scheduler_kwargs or {})},
    )


def _connect(client_or_address, processes):
    """`(client, cluster, owns_client)`; `cluster` is a LocalCluster this pool started, or None."""
    if client_or_address is None:
        cluster = _local_cluster(processes or os.cpu_count() or 1)
        try:
            return distributed.Client(cluster, set_as_default=False), cluster, True
        except BaseException:
            cluster.close()
            raise
    if isinstance(client_or_address, str):
        return distributed.Client(client_or_address, set_as_default=False), None, True
    if isinstance(client_or_address, distributed.Client):
        return client_or_address, None, False
    hint = " (to start N local workers, pass processes=N)" if isinstance(client_or_address, int) else ""
    raise TypeError(
        "client_or_address must be None, a scheduler address such as 'tcp://host:8786' or a "
        f"distributed.Client, not {type(client_or_address).__name__}{hint}"
    )


def _worker_slots(client):
    """How many tasks the cluster runs at once now (its workers' threads), at least 1."""
    return max(1, sum(client.nthreads().values()))


class _DaskCore:
    """What `rpool.Pool` asks of its core (`new_job`, `submit`, `fail_part`, `seal`, `close`,
    `terminate`, `join`), done with a Dask client and a `JobBoard` of result slots."""

    def __init__(self, client, cluster, owns_client, processes, deliver):
        self._client = client
        self._cluster = cluster
        self._owns_client = owns_client
        self._imap_limit = processes * _IMAP_CHUNKS_PER_SLOT
        self._board = _rpool.JobBoard(deliver)
        self._plugin = None
        self._state = RUN
        self._released = False
        self._changed = threading.Condition()
        # Dask key -> (future, job, part) of every submitted task that has not been settled yet.
        self._pending = {}
        # id of an open (imap) job -> how many of its parts are pending.
        self._open_jobs = {}
        self._finished = queue.SimpleQueue()
        # Tasks with a time limit say on this topic when they start; the clock runs from then.
        self._started_topic = f"rpool-started-{uuid.uuid4().hex}"
        client.subscribe_topic(self._started_topic, self._on_started)
        self._collector = threading.Thread(target=self._collect, name="rpool-dask-collect", daemon=True)
        self._collector.start()

    def add_initializer(self, initializer, initargs):
        """Run `initializer` in every worker; raises what it raised if it fails on any of them."""
        # Named first: the scheduler keeps the plugin even when a worker's setup fails.
        self._plugin = f"rpool-initializer-{uuid.uuid4().hex}"
        self._client.register_plugin(_RunInitializer(initializer, tuple(initargs)), name=self._plugin)

    # --- what rpool.Pool calls ----------------------------------------------------------------

    def new_job(self, total, has_callbacks, label="", time_limit=None):
        job = self._board.new_job(total, has_callbacks, label, time_limit)
        if total is None:
            with self._changed:
                self._open_jobs[job.id] = 0
        return job

    def submit_many(self, job, first, payloads):
        for i, payload in enumerate(payloads):
            self.submit(job, first + i, payload)

    def submit(self, job, part, payload):
        limit = job.time_limit
        # Named after the function, as Dask names its own tasks (its dashboard groups by prefix).
        key = f"{job.label or 'rpool'}-{uuid.uuid4().hex}"
        with self._changed:
            # An imap feeder waits here while its job has as many chunks in flight as allowed.
            while self._open_jobs.get(job.id, 0) >= self._imap_limit and self._state != TERMINATE:
                self._changed.wait(0.1)
            if self._state == TERMINATE:
                raise ValueError("Pool not running")
            # Filed before the task exists, so that its settling never misses it.
            slot = self._pending[key] = [None, job, part]
            if job.id in self._open_jobs:
                self._open_jobs[job.id] += 1
        # The slot holds the future until the task is settled: Dask forgets unreferenced tasks.
        if limit is None:
            future = self._client.submit(_run_part, payload, key=key, pure=False)
        else:
            future = self._client.submit(_run_part, payload, limit, self._started_topic, key=key, pure=False)
        slot[0] = future
        future.add_done_callback(self._finished.put)
        if self._state == TERMINATE:
            future.cancel()

    def fail_part(self, job, part, exc):
        self._board.settle(job, part, _RAISED, exc)

    def seal(self, job, total):
        with self._changed:
            self._open_jobs.pop(job.id, None)
            self._changed.notify_all()
        self._board.seal(job, total)

    def close(self):
        with self._changed:
            if self._state == RUN:
                self._state = CLOSE

    def terminate(self):
        """Settle every unfinished task as terminated and let go of the cluster."""
        with self._changed:
            self._state = TERMINATE
            self._board.terminate()
            pending = list(self._pending.values())
            self._pending.clear()
            self._open_jobs.clear()
            self._changed.notify_all()
        if pending and not self._released:
            try:
                # Queued tasks never start; running ones run to the end on a cluster this pool
                # does not own (Dask cannot interrupt them), and their results are dropped.
                self._client.cancel([future for future, _, _ in pending if future is not None], force=True)
            except Exception:
                _log.debug("rpool: could not cancel tasks on the Dask cluster", exc_info=True)
        for _, job, part in pending:
            self._board.settle(job, part, _TERMINATED, _TERMINATED_MESSAGE)
        # Idle workers stop on their own quickly; busy ones would get 4 s of grace from Dask.
        self._release(kill_workers=bool(pending))

    def join(self, timeout=None):
        """Wait until every task was settled and its callbacks ran, then let go of the cluster."""
        with self._changed:
            while self._pending or self._open_jobs:
                self._changed.wait(0.1)
        self._release()
        return True

    # --- results --------------------------------------------------------------------------

    def _on_started(self, event):
        """On the client's event loop: a task with a time limit started on its worker."""
        self._finished.put(event[1])

    def _collect(self):
        """On rpool-dask-collect: settle tasks that finished, fetching their results in batches,
        and tasks that ran past their time limit. Its queue brings finished futures, keys of
        timed tasks that started, and None to stop."""
        deadlines = []  # heap of (time.monotonic() deadline, key)
        while True:
            wait = max(0.0, deadlines[0][0] - time.monotonic()) if deadlines else None
            try:
                items = [self._finished.get(timeout=wait)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._finished.get_nowait())
                except queue.Empty:
                    break
            if any(item is None for item in items):
                return
            now = time.monotonic()
            with self._changed:
                for key in (item for item in items if isinstance(item, str)):
                    if key in self._pending:
                        heapq.heappush(deadlines, (now + self._pending[key][1].time_limit, key))
                finished = [(f, self._pending.get(f.key)) for f in items if not isinstance(f, str)]
            finished = [(future, slot) for future, slot in finished if slot is not None]
            for (future, _), outcome in zip(finished, self._outcomes(finished)):
                self._settle(future.key, *outcome)
            while deadlines and deadlines[0][0] <= time.monotonic():
                self._time_out(heapq.heappop(deadlines)[1])

    def _settle(self, key, kind, data):
        """File task `key`'s outcome (the first one wins) and forget the task."""
        with self._changed:
            slot = self._pending.get(key)
        if slot is None:
            return
        _, job, part = slot
        self._board.settle(job, part, kind, data)
        with self._changed:
            if self._pending.pop(key, None) is not None and job.id in self._open_jobs:
                self._open_jobs[job.id] -= 1
            self._changed.notify_all()

    def _time_out(self, key):
        with self._changed:
            slot = self._pending.get(key)
        if slot is None:
            return
        future, job, part = slot
        message = (
            f"{job.describe_part(part)} ran past its time limit of {job.time_limit:g} s on the Dask "
            "cluster; Dask cannot kill a task, so rpool interrupts its Python code on the worker "
            "(code blocked in C finishes that call first)"
        )
        self._settle(key, _TIMED_OUT, message)
        future.cancel()

    def _outcomes(self, batch):
        """`(kind, data)` for each `(future, slot)`: one gather for the tasks that finished."""
        finished = [future for future, _ in batch if future.status == "finished"]
        try:
            gathered = dict(zip((f.key for f in finished), self._client.gather(finished)))
        except Exception:
            gathered = {}
        return [self._outcome(future, gathered) for future, _ in batch]

    def _outcome(self, future, gathered):
        try:
            if future.key in gathered:
                ok, data = gathered[future.key]
            else:
                ok, data = future.result()
            return (_VALUE if ok else _RAISED), data
        except distributed.KilledWorker as exc:
            return _LOST, f"the Dask cluster gave up on this task: the workers that ran it died ({exc})"
        except distributed.client.FutureCancelledError:
            return _TERMINATED, _CANCELLED_MESSAGE
        except Exception as exc:
            # Dask itself failed the task (say, a worker could not unpickle it).
            try:
                return _RAISED, _cloud_dumps(exc)
            except Exception:
                return _RAISED, _cloud_dumps(RuntimeError(f"the Dask task failed: {exc!r}"))

    # --- shutdown ---------------------------------------------------------------------------

    def _release(self, kill_workers=False):
        """Stop the collector and callbacks threads, then close what this pool opened (once).
        `kill_workers`: stop an owned cluster's busy workers now rather than after Dask's grace."""
        with self._changed:
            if self._released:
                return
            self._released = True
        self._finished.put(None)
        if self._collector is not threading.current_thread():
            self._collector.join()
        self._board.close()
        steps = []
        if self._owns_client:
            steps.append(self._client.close)
        else:
            steps.append(functools.partial(self._client.unsubscribe_topic, self._started_topic))
            if self._plugin is not None:
                steps.append(functools.partial(self._client.unregister_worker_plugin, self._plugin))
        if self._cluster is not None:
            if kill_workers:
                steps.append(functools.partial(self._cluster.sync, _kill_workers, list(self._cluster.workers.values())))
            steps.append(self._cluster.close)
        for step in steps:
            try:
                step()
            except Exception:
                _log.warning("rpool: error while letting go of the Dask cluster", exc_info=True)


async def _kill_workers(nannies):
    """Close a LocalCluster's nannies, giving their worker processes 0.2 s to stop before
    SIGKILL (a nanny closing itself waits 4 s for a running task, which terminate must not)."""
    await asyncio.gather(*(n.close(timeout=0.25, reason="rpool-terminate") for n in nannies), return_exceptions=True)


class Pool(_LocalPool):
    """rpool's `Pool` on a Dask cluster: the same methods, result objects and errors.

    `client_or_address`: None starts a local cluster of `processes` worker processes (default:
    one per CPU) on 127.0.0.1 only, without a dashboard, and shuts it down with the pool; a
    scheduler address string (`'tcp://host:8786'`) connects a client this pool closes; a
    `distributed.Client` is borrowed and never closed.

    `processes` on an existing cluster sizes the default chunks (as the stdlib's rule does with
    the pool size) and imap's in-flight window; it does not cap the cluster. By default it is the
    number of worker threads when the pool is made.

    `initializer(*initargs)` runs once in every worker process, also in workers that join or
    restart later. `maxtasksperchild` cannot be honoured by Dask and is refused.

    `timeout=` on a call (or `task_timeout` for the pool) limits how long each task or chunk may
    run, counted from when it starts on its worker: past it, the result raises
    `rpool.TaskTimeoutError` at once. Dask cannot kill a task (its worker may be running others),
    so rpool raises an exception in the task's thread instead: Python code stops there, code
    blocked in C (a long sleep, I/O, a NumPy call) finishes that call first.
    """

    # Tasks travel with cloudpickle, so that functions defined in the user's script reach workers
    # that never imported it.
    _pack = staticmethod(functools.partial(_dump_task, dumps=_cloud_dumps))
    # The Dask core's submit blocks while an imap has its window of chunks in flight: that must
    # be a feeder thread, not the caller.
    _feeds_sequences = False

    def __init__(
        self,
        client_or_address=None,
        processes=None,
        initializer=None,
        initargs=(),
        maxtasksperchild=None,
        *,
        task_timeout=None,
        max_memory_per_child=None,
    ):
        self._state = "INIT"
        self._cache = {}
        self._task_timeout = _check_seconds(task_timeout, "task_timeout")
        if max_memory_per_child is not None:
            raise ValueError(
                "rpool.distributed.Pool does not support max_memory_per_child: give the Dask "
                "workers a memory_limit instead (Dask restarts a worker that exceeds it)"
            )
        if maxtasksperchild is not None:
            raise ValueError(
                "rpool.distributed.Pool does not support maxtasksperchild: Dask workers are not "
                "replaced after a number of tasks (see Dask's worker 'lifetime' options instead)"
            )
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        client, cluster, owns_client = _connect(client_or_address, processes)
        try:
            self._processes = processes or _worker_slots(client)
            deliver = functools.partial(_deliver, self._cache)
            self._core = _DaskCore(client, cluster, owns_client, self._processes, deliver)
            if initializer is not None:
                self._core.add_initializer(initializer, initargs)
        except BaseException:
            if hasattr(self, "_core"):
                self._core.terminate()
            else:
                if owns_client:
                    client.close()
                if cluster is not None:
                    cluster.close()
            raise
        self._state = RUN
        _live_pools.add(self)

    @property
    def client(self):
        """The `distributed.Client` this pool submits to."""
        return self._core._client


def _terminate_open_pools():
    for pool in list(_live_pools):
        if isinstance(pool, Pool):
            pool.terminate()


# A pool left open is terminated at exit before concurrent.futures shuts its executors down (Dask
# runs future callbacks on one), which happens before atexit handlers run: the same hook as theirs.
threading._register_atexit(_terminate_open_pools)
