"""What a worker process runs in Python: set itself up, run tasks, exit the stdlib's way.

The loop itself (read a task frame, call `execute`, write the result frame) is in Rust
(`src/child.rs`); this module holds the steps that need Python's own machinery.
"""

from __future__ import annotations

import _pickle as pickle  # `pickle`'s own functions, without importing its Python half (re...)
import itertools
import os
import sys

from . import _shm
from ._rpool import quick_loads

# Everything else is imported where it is used: an exec'd worker and the fork server import
# this module first thing, and each module here adds to every worker's start-up. Even
# multiprocessing (~15 ms here): what the stdlib sets in a worker's `multiprocessing.process`
# (its name, authkey, start method...) is set when something first imports it (`_mp_state`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from typing import Any

    # What a worker's bootstrap returns: `(execute, maxtasksperchild, max_memory_per_child)`.
    Booted = tuple[Callable[..., tuple[bool, bytes]], int | None, int | None]
else:
    import _signal  # `signal`'s functions, without its enums (the enum module is slow to import)

_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL


def dumps(obj: object) -> bytes:
    """Pickle like the stdlib's pool (ForkingPickler), taking plain pickle's faster path first.

    ForkingPickler only adds reducers for objects plain pickle refuses (connections, sockets),
    so anything plain pickle accepts pickles the same way through both.
    """
    try:
        return pickle.dumps(obj, _PROTOCOL)
    except Exception:
        import io
        from multiprocessing.reduction import ForkingPickler

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


def rangestar(mapper: Callable[[Any, Any], list[Any]], func: Callable[..., Any], start: int, stop: int, step: int) -> list[Any]:
    """`mapper(func, range(start, stop, step))`: a chunk of a range travels as three ints (a
    pickled range costs a global lookup each time, more than a small tuple of its items)."""
    return mapper(func, range(start, stop, step))


def dump_exception(exc: BaseException, dumps: Callable[[object], bytes] = dumps) -> bytes:
    """Pickle a task's exception with its traceback text (it becomes a RemoteTraceback cause)."""
    from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError  # type: ignore[attr-defined]

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
            args, kwds = quick_loads(payload)  # plain arguments: read natively
        elif func_pickle is not None:
            func = pickle.loads(func_pickle)
            args, kwds = quick_loads(payload)
        else:
            func, args, kwds = pickle.loads(payload)
        result = func(*args, **kwds)
    except BaseException as exc:  # SystemExit too: the task fails, the worker lives on
        return False, dump_exception(exc, dumps)
    try:
        return True, dumps(result)
    except Exception as exc:
        from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]

        return False, dumps(MaybeEncodingError(exc, result))


def _become_worker(setup: dict[str, Any], number: int, forked: bool) -> Booted:
    util = sys.modules.get("multiprocessing.util")
    if forked and util is not None:
        # What the stdlib's Process._bootstrap does in a forked child (if the parent never
        # imported multiprocessing.util, it registered neither finalizers nor after-forkers).
        util._finalizer_registry.clear()
        util._run_after_forkers()
    # As the stdlib's Process._bootstrap: a worker's start method is its pool's, whatever the
    # parent's default (which spawn's preparation data carries) is.
    _mp_state.set(
        children=set(),
        start_method=setup["start_method"],
        name=f"{setup['name_prefix']}PoolWorker-{number}",
        _identity=(number,),
    )
    if sys.stdin is not None:
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)
        except (OSError, ValueError):
            pass
    # Ctrl-C goes to the whole process group: the parent handles it, workers must not spew
    # tracebacks (the parent terminates them).
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if setup.get("forward_logs") is not None:
        from ._logfwd import forward_logs

        forward_logs(setup["forward_logs"])
    initializer = setup["initializer"]
    if initializer is not None:
        initializer(*setup["initargs"])
    if setup.get("serializer") == "cloudpickle":
        import functools

        return functools.partial(execute, dumps=result_dumps), setup["maxtasks"], setup.get("max_memory")
    return execute, setup["maxtasks"], setup.get("max_memory")


class _MultiprocessingState:
    """What the stdlib sets in a worker's `multiprocessing.process` (its name, authkey, start
    method...), set in multiprocessing at once if it is imported (a forked worker), else when
    something first imports it: an exec'd worker whose tasks never touch multiprocessing does
    not pay for importing it. A hook on sys.meta_path sees that import."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def set(self, **settings: Any) -> None:
        self.settings.update(settings)
        if "multiprocessing" in sys.modules:
            self.apply(settings)
        elif not any(isinstance(finder, _ApplyStateOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _ApplyStateOnImport())

    def apply(self, settings: dict[str, Any]) -> None:
        import multiprocessing
        from multiprocessing import process

        me = process.current_process()
        for key, value in settings.items():
            if key == "children":
                process._children = set()  # type: ignore[attr-defined]
            elif key == "orig_dir":
                process.ORIGINAL_DIR = value  # type: ignore[attr-defined]
            elif key == "start_method":
                multiprocessing.set_start_method(value, force=True)
            else:  # name, authkey, _identity, _inheriting
                setattr(me, key, value)


_mp_state = _MultiprocessingState()


class _ApplyStateOnImport:
    """A finder that finds nothing itself: it hands out the spec of `multiprocessing` that the
    other finders give, with a loader that applies `_mp_state` once the package has run (and then
    takes this finder off sys.meta_path)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "multiprocessing":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                spec.loader = _ThenApplyState(spec.loader)
                return spec
        return None


class _ThenApplyState:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ApplyStateOnImport)]
        _mp_state.apply(_mp_state.settings)


def bootstrap_forked(setup: dict[str, Any], number: int) -> Booted:
    """In a forked worker: `setup` is the parent's own dict, inherited with its memory."""
    return _become_worker(setup, number, forked=True)


def prepare(data: bytes) -> None:
    """In an exec'd worker: rebuild sys.path, cwd, authkey and `__main__` as the stdlib's spawn does."""
    # As the stdlib's spawn_main: a script without `if __name__ == "__main__":` that makes a
    # pool while its main module is re-imported here gets the stdlib's "bootstrapping phase"
    # RuntimeError instead of starting workers of its own.
    _mp_state.set(_inheriting=True)
    try:
        _prepare(pickle.loads(data))
    finally:
        _mp_state.set(_inheriting=False)


def _prepare(data: dict[str, Any]) -> None:
    """What `multiprocessing.spawn.prepare` (CPython 3.11) does with the keys of
    `spawn.get_preparation_data`, in its order, without importing multiprocessing.spawn and
    multiprocessing.util (and with them subprocess) unless a key needs them."""
    _mp_state.set(**{key: data[key] for key in ("name", "authkey") if key in data})
    if data.get("log_to_stderr"):
        from multiprocessing import util

        util.log_to_stderr()
    if "log_level" in data:
        from multiprocessing import util

        util.get_logger().setLevel(data["log_level"])
    if "sys_path" in data:
        sys.path = data["sys_path"]
    if "sys_argv" in data:
        sys.argv = data["sys_argv"]
    if "dir" in data:
        os.chdir(data["dir"])
    if "orig_dir" in data:
        _mp_state.set(orig_dir=data["orig_dir"])
    if "start_method" in data:
        _mp_state.set(start_method=data["start_method"])
    # Re-running the parent's main module is the stdlib's own code: it is the costly step anyway.
    if "init_main_from_name" in data:
        from multiprocessing import spawn

        spawn._fixup_main_from_name(data["init_main_from_name"])  # type: ignore[attr-defined]
    elif "init_main_from_path" in data:
        from multiprocessing import spawn

        spawn._fixup_main_from_path(data["init_main_from_path"])  # type: ignore[attr-defined]


def load_setup(data: bytes) -> dict[str, Any]:
    setup: dict[str, Any] = pickle.loads(data)
    return setup


def bootstrap_spawned(setup: bytes, number: int) -> Booted:
    return _become_worker(pickle.loads(setup), number, forked=False)


def exit_worker() -> None:
    """The stdlib's exit steps for a child: finalizers, non-daemon threads, flushed streams."""
    # Finalizers (and children to reap) exist only if something imported multiprocessing.util.
    util = sys.modules.get("multiprocessing.util")
    try:
        if util is not None:
            util._exit_function()
    finally:
        # Non-daemon threads exist only if something imported threading.
        threading = sys.modules.get("threading")
        try:
            if threading is not None:
                threading._shutdown()
        except Exception:
            pass
        _flush_std_streams()


def _flush_std_streams() -> None:
    # As multiprocessing.util._flush_std_streams.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


def forkserver_main() -> None:
    """Entry point of the `forkserver` start method's server process."""
    from rpool import _rpool

    # Ctrl-C reaches the whole process group; the pool in the parent handles it.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    os._exit(_rpool.forkserver_main())


def spawn_main() -> None:
    """Entry point of a worker started by exec (`python -c ...`)."""
    from rpool import _rpool

    os._exit(_rpool.worker_main())
