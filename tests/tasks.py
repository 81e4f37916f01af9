"""Module-level task functions used by the test-suite.

Everything here must be importable by name in a freshly spawned worker, so
the functions live at module level (pytest puts ``tests/`` on ``sys.path``
because there is no ``tests/__init__.py``; keep it that way).
"""

import importlib
import multiprocessing
import os
import sys
import time

# A module global that a test modifies in the parent: a forked worker sees the
# modified value, a spawned / forkserver worker re-imports this module and sees
# the initial one.
STATE = "initial"

# Set by the initializer in each worker.
_INIT_VALUE = None


# --------------------------------------------------------------- plain tasks
def square(x):
    return x * x


def add(a, b=0):
    return a + b


def mul(a, b):
    return a * b


def identity(x):
    return x


def getpid(_=None):
    return os.getpid()


def sleep_and_return(delay, value=None):
    time.sleep(delay)
    return value


def sleep_return(pair):
    """Single-argument variant (for imap): ``pair`` is ``(delay, value)``."""
    delay, value = pair
    time.sleep(delay)
    return value


def sleep_getpid(delay):
    time.sleep(delay)
    return os.getpid()


def kwargs_echo(*args, **kwargs):
    return (args, sorted(kwargs.items()))


def nbytes(data):
    return len(data)


class Adder:
    def __init__(self, k):
        self.k = k

    def add(self, x):
        return x + self.k


class Payload:
    """A weak-referenceable argument / result object."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, Payload) and other.n == self.n

    def __hash__(self):
        return hash(self.n)

    def __repr__(self):
        return f"Payload({self.n})"


def payload_n(p):
    return p.n


def payload_double(p):
    return Payload(p.n * 2)


# --------------------------------------------------------------- failures
class CustomError(Exception):
    pass


def raise_value_error(msg="boom"):
    raise ValueError(msg)


def raise_custom(*args):
    raise CustomError(*args)


def fail_on(x, bad=(3,)):
    """Identity, except raise ValueError('bad <x>') for x in ``bad``."""
    if x in bad:
        raise ValueError(f"bad {x}")
    return x


def fail_on_1_and_3(x):
    return fail_on(x, bad=(1, 3))


def return_lambda(_=None):
    """The result cannot be pickled."""
    return lambda: 1


def return_unpicklable_if_2(x):
    if x == 2:
        return lambda: 1
    return x


def raise_unpicklable_exception(_=None):
    """The exception itself cannot be pickled (its __dict__ holds a lambda)."""
    exc = ValueError("unpicklable exception")
    exc.fn = lambda: 1
    raise exc


# --------------------------------------------------------------- worker state
def get_state(_=None):
    return STATE


def set_init_value(value):
    global _INIT_VALUE
    _INIT_VALUE = value


def get_init_value(_=None):
    return _INIT_VALUE


def get_init_value_and_pid(_=None):
    return (_INIT_VALUE, os.getpid())


def init_record_pid(proxy_list, value=None):
    """Initializer: append our pid to a Manager list proxy, remember value."""
    global _INIT_VALUE
    proxy_list.append(os.getpid())
    _INIT_VALUE = value


def append_to_proxy(proxy, value):
    proxy.append(value)
    return len(proxy)


def get_authkey(_=None):
    return bytes(multiprocessing.current_process().authkey)


def import_and_get_value(modname):
    return importlib.import_module(modname).VALUE


def get_sys_path(_=None):
    return list(sys.path)


def _explode_on_unpickle():
    raise ValueError("cannot rebuild this result in the parent")


class FailsToUnpickle:
    """Pickles fine in the worker; unpickling it (in the parent) raises."""

    def __reduce__(self):
        return (_explode_on_unpickle, ())


def return_fails_to_unpickle(_=None):
    return FailsToUnpickle()


def fails_to_unpickle_if_2(x):
    return FailsToUnpickle() if x == 2 else x


class NeedsTwoArgsError(Exception):
    """Pickles fine, but unpickling calls cls(*args) with one arg -> TypeError."""

    def __init__(self, a, b):
        super().__init__(a)
        self.b = b

    def __reduce__(self):
        # What BaseException.__reduce__ gives, written out: otherwise importing Dask (tblib's
        # pickling support) teaches every exception class that exists then to rebuild itself.
        return type(self), self.args


def raise_needs_two_args_error(_=None):
    raise NeedsTwoArgsError("first", "second")


def getenv(name):
    return os.environ.get(name)


def getcwd(_=None):
    return os.getcwd()


def process_name(_=None):
    return multiprocessing.current_process().name


def failing_initializer():
    raise RuntimeError("the initializer cannot reach its database")


# --------------------------------------------------------------- faults (issue #3)
def kill_self(signum):
    """Die by a signal mid-task, as the OOM killer (SIGKILL) or a C extension (SIGSEGV) would."""
    import faulthandler

    faulthandler.disable()  # a forked worker inherits pytest's, which would print a stack dump
    os.kill(os.getpid(), signum)
    time.sleep(10)


def exit_now(code):
    os._exit(code)


def exit_on(x, bad=5):
    """A map task whose worker dies at item ``bad``."""
    if x == bad:
        os._exit(7)
    return x


def write_pid_and_sleep(path, delay):
    """Tell the test which worker runs this (by a file), then run long enough to be killed."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(delay)
    return os.getpid()


def sleep_unless(x, slow=3, delay=30):
    """Return ``x`` at once, except item ``slow``, which takes ``delay`` seconds."""
    if x == slow:
        time.sleep(delay)
    return x


def ignore_sigterm_and_sleep(delay):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(delay)


_HOG = []


def grow_and_getpid(nbytes):
    """Keep ``nbytes`` of touched memory alive in this worker; return its pid."""
    block = bytearray(nbytes)
    block[::4096] = b"x" * len(block[::4096])
    _HOG.append(block)
    return os.getpid()


def exiting_initializer():
    os._exit(3)


def write_pid_at_exit(path):
    """Register a multiprocessing finalizer that writes this worker's pid to `path` when the
    worker exits the stdlib's way (`util._exit_function`); return the pid."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _write_pid, args=(path,), exitpriority=10)
    return os.getpid()


def _write_pid(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def shares_and_types(obj):
    """What pickling may change about `obj`: which of its lists and dicts are one object, and
    the type of every item (with the items themselves, for equality)."""
    seen = {}

    def walk(o):
        if isinstance(o, (list, dict)):
            if id(o) in seen:
                return ("same as", seen[id(o)])
            seen[id(o)] = len(seen)
            items = o.items() if isinstance(o, dict) else enumerate(o)
            return (type(o).__name__, [(k, walk(v)) for k, v in items])
        if isinstance(o, tuple):
            return ("tuple", [walk(v) for v in o])
        return (type(o).__name__, repr(o))

    return walk(obj)


def shares_of_call(*args, **kwargs):
    """`shares_and_types` of a call's arguments, as the function received them."""
    return shares_and_types((list(args), kwargs))


def touch_in(directory, name):
    """Create the file `name` in `directory`: a record that this task ran."""
    with open(os.path.join(directory, str(name)), "w"):
        pass
    return name


def kill_a_worker_and_wait_for_its_replacement(pool, timeout=20):
    """SIGKILL one of `pool`'s workers (rpool's) between tasks; return its pid once another
    worker runs tasks in its place."""
    import signal

    pid = pool.apply(os.getpid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid in pool._core.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.apply(os.getpid) != pid
    return pid
