"""What a worker process runs in Python: set itself up, run tasks, exit the stdlib's way.

The loop itself (read a task frame, call `execute`, write the result frame) is in Rust
(`src/child.rs`); this module holds the steps that need Python's own machinery.
"""

import io
import itertools
import os
import pickle
import signal
import sys
from multiprocessing import process, spawn, util
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError
from multiprocessing.reduction import ForkingPickler

from . import _shm

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj):
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


def mapstar(func, chunk):
    return list(map(func, chunk))


def starmapstar(func, chunk):
    return list(itertools.starmap(func, chunk))


def dump_exception(exc, dumps=dumps):
    """Pickle a task's exception with its traceback text (it becomes a RemoteTraceback cause)."""
    try:
        return dumps(ExceptionWithTraceback(exc, exc.__traceback__))
    except Exception as err:
        return dumps(MaybeEncodingError(err, exc))


def execute(payload, dumps=_shm.dumps_result):
    """Run one pickled `(func, args, kwds)`. Never raises: returns `(ok, pickled result)`.

    `dumps` pickles the result or exception (rpool.distributed passes cloudpickle's); the
    default sends large buffers through shared memory (rpool._shm).
    """
    try:
        func, args, kwds = pickle.loads(payload)
        result = func(*args, **kwds)
    except BaseException as exc:  # SystemExit too: the task fails, the worker lives on
        return False, dump_exception(exc, dumps)
    try:
        return True, dumps(result)
    except Exception as exc:
        return False, dumps(MaybeEncodingError(exc, result))


def _become_worker(setup, number, forked):
    if forked:
        # What the stdlib's Process._bootstrap does in a forked child.
        util._finalizer_registry.clear()
        util._run_after_forkers()
    process._children = set()
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
    initializer = setup["initializer"]
    if initializer is not None:
        initializer(*setup["initargs"])
    return execute, setup["maxtasks"], setup.get("max_memory")


def bootstrap_forked(setup, number):
    """In a forked worker: `setup` is the parent's own dict, inherited with its memory."""
    return _become_worker(setup, number, forked=True)


def prepare(data):
    """In an exec'd worker: rebuild sys.path, cwd, authkey and `__main__` as the stdlib's spawn does."""
    me = process.current_process()
    # As the stdlib's spawn_main: a script without `if __name__ == "__main__":` that makes a
    # pool while its main module is re-imported here gets the stdlib's "bootstrapping phase"
    # RuntimeError instead of starting workers of its own.
    me._inheriting = True
    try:
        spawn.prepare(pickle.loads(data))
    finally:
        me._inheriting = False


def load_setup(data):
    return pickle.loads(data)


def bootstrap_spawned(setup, number):
    return _become_worker(pickle.loads(setup), number, forked=False)


def exit_worker():
    """The stdlib's exit steps for a child: finalizers, non-daemon threads, flushed streams."""
    try:
        util._exit_function()
    finally:
        try:
            import threading

            threading._shutdown()
        except Exception:
            pass
        util._flush_std_streams()


def forkserver_main():
    """Entry point of the `forkserver` start method's server process."""
    from rpool import _rpool

    # Ctrl-C reaches the whole process group; the pool in the parent handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os._exit(_rpool.forkserver_main())


def spawn_main():
    """Entry point of a worker started by exec (`python -c ...`)."""
    from rpool import _rpool

    os._exit(_rpool.worker_main())
