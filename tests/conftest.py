"""Shared fixtures for the rpool behaviour suite.

Most tests run against both implementations ("stdlib" = multiprocessing.Pool,
"rpool") and every start method, so that the suite documents the stdlib
behaviour rpool has to reproduce.  Test ids look like ``test_map[rpool-spawn]``
so ``-k stdlib`` / ``-k rpool`` select one side.

If ``import rpool`` fails, the rpool-parametrized tests *fail* (they are not
skipped).
"""

import multiprocessing
import multiprocessing.pool
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

IMPLS = ("stdlib", "rpool")
METHODS = ("fork", "spawn", "forkserver")
IMPL_METHODS = [(impl, method) for impl in IMPLS for method in METHODS]


def _id(param):
    return "-".join(param)


def load_impl(impl):
    """Return the module implementing the Pool API for ``impl``."""
    if impl == "stdlib":
        return multiprocessing
    try:
        import rpool
    except Exception as exc:  # noqa: BLE001 - any import failure must fail the test
        pytest.fail(f"cannot import rpool: {exc!r}", pytrace=False)
    return rpool


def pool_class(impl):
    """The Pool class that accepts a ``context=`` keyword argument."""
    if impl == "stdlib":
        # multiprocessing.Pool is a bound method of the default context and
        # does not take ``context``; the class does.
        return multiprocessing.pool.Pool
    return load_impl(impl).Pool


class PoolFactory:
    """``make_pool(processes=2, **kw)`` -> a Pool of the fixture's impl/method.

    Every pool made here is terminated and joined at teardown.
    """

    def __init__(self, impl, method):
        self.impl = impl
        self.method = method
        self.module = load_impl(impl)
        self.ctx = self.module.get_context(method)
        self.pools = []

    def __call__(self, processes=2, **kwargs):
        pool = self.ctx.Pool(processes, **kwargs)
        self.pools.append(pool)
        return pool

    def with_context_kwarg(self, processes=2, **kwargs):
        """Build the pool as ``Pool(..., context=get_context(method))``."""
        pool = pool_class(self.impl)(processes, context=self.ctx, **kwargs)
        self.pools.append(pool)
        return pool

    def track(self, pool):
        self.pools.append(pool)
        return pool

    def cleanup(self):
        for pool in reversed(self.pools):
            pool.terminate()
            pool.join()
        self.pools.clear()


def _factory(impl, method):
    factory = PoolFactory(impl, method)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(params=IMPL_METHODS, ids=_id)
def make_pool(request):
    """Pool factory over impl x start method (6 variants)."""
    yield from _factory(*request.param)


@pytest.fixture(params=[(impl, "fork") for impl in IMPLS], ids=_id)
def make_pool_fork(request):
    """Pool factory over impl, fork only (for method-independent behaviour)."""
    yield from _factory(*request.param)


@pytest.fixture(params=[("rpool", method) for method in METHODS], ids=_id)
def make_rpool(request):
    """rpool-only pool factory (behaviour where rpool deliberately differs)."""
    yield from _factory(*request.param)


@pytest.fixture(params=IMPL_METHODS, ids=_id)
def impl_method(request):
    """(impl, method) for tests that run scripts in a subprocess."""
    impl, method = request.param
    load_impl(impl)  # fail early and clearly if rpool is not importable
    return impl, method


@pytest.fixture(scope="module")
def manager():
    with multiprocessing.Manager() as m:
        yield m


IMPORT_LINES = {
    "stdlib": "import multiprocessing as M",
    "rpool": "import rpool as M",
}


def _script_env():
    env = dict(os.environ)
    parts = [str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture
def script_env():
    """Environment for script subprocesses (``tests/`` on PYTHONPATH)."""
    return _script_env()


@pytest.fixture
def write_script(tmp_path):
    """write_script(source, impl) -> Path; ``M`` is the impl's module."""

    def write(source, impl, name="script.py"):
        path = tmp_path / name
        path.write_text(IMPORT_LINES[impl] + "\n" + textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def run_script(write_script, tmp_path):
    """run_script(source, impl, timeout=60) -> CompletedProcess (text)."""

    def run(source, impl, timeout=60):
        path = write_script(source, impl)
        return subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_script_env(),
            cwd=str(tmp_path),
        )

    return run
