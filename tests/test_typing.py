"""Typing: mypy --strict on a program that uses every public name, stubtest on the native module's
stubs, and mypy --strict on rpool's own annotated modules. Each runs mypy in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLE = TESTS_DIR / "typing" / "example_typed.py"
PACKAGE = Path(__import__("rpool").__file__).resolve().parent

# rpool.distributed (Dask has no complete annotations) and the demo command are not held to
# --strict; everything `import rpool` gives is.
STRICT_MODULES = [
    "__init__.py", "pool.py", "threadpool.py", "executor.py", "_aio.py", "_progress.py", "_worker.py", "_logfwd.py", "joblib.py"
]


def _module_name(filename):
    stem = filename.removesuffix(".py")
    return "rpool" if stem == "__init__" else f"rpool.{stem}"


def run(args, tmp_path, timeout=50):
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy_cache"))
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )


def test_example_passes_mypy_strict(tmp_path):
    done = run(["mypy", "--strict", "--no-incremental", str(EXAMPLE)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_catches_misuse(tmp_path):
    # The annotations carry types through: this must fail, or the check above proves nothing.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from rpool import Pool\n"
        "def square(x: int) -> int:\n"
        "    return x * x\n"
        "with Pool(1) as pool:\n"
        "    a: str = pool.apply(square, (1,))\n"
        "    b: list[str] = pool.map(square, [1])\n"
        "    c: str = pool.apply_async(square, (1,)).get()\n"
        "    d: list[str] = list(pool.imap_unordered(square, [1]))\n"
    )
    done = run(["mypy", "--strict", "--no-incremental", str(bad)], tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    for line in (5, 6, 7, 8):
        assert f"bad.py:{line}: error" in done.stdout, done.stdout


def test_native_module_stubs_match_stubtest(tmp_path):
    done = run(["mypy.stubtest", "rpool._rpool", "--mypy-config-file", os.devnull], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rpool_itself_passes_mypy_strict(tmp_path):
    # By module name, not path: given paths inside site-packages (a non-editable install), mypy
    # would take site-packages for a source folder and refuse the modules beside rpool.
    modules = [arg for name in STRICT_MODULES for arg in ("-m", _module_name(name))]
    done = run(["mypy", "--strict", "--no-incremental", *modules], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").exists()
    assert (PACKAGE / "_rpool.pyi").exists()
