"""Start-up cost: `import rpool` and the bootstrap of exec'd workers (spawn, and the fork server)
import only what they use, and the light bootstrap still prepares a worker as the stdlib's spawn
does: argv, cwd and the original directory, start method, multiprocessing's log settings, the
main module run as `python -m`, finalizers run at exit.

Import checks run in fresh interpreters: the test process has imported everything already.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tasks
from conftest import IMPORT_LINES

# Imported by `import rpool` only on first use of a public name (or never, for asyncio and
# concurrent.futures unless asked for).
NOT_ON_IMPORT = (
    "rpool.pool",
    "rpool._rpool",
    "rpool._shm",
    "multiprocessing.pool",
    "multiprocessing.connection",
    "multiprocessing.spawn",
    "multiprocessing.util",
    "logging",
    "typing",
    "subprocess",
    "tempfile",
    "asyncio",
    "concurrent.futures",
)

# What an exec'd worker running a plain task has no use for (the parent is a `-c` script: no
# main module to re-run, no multiprocessing log settings): the same, but for the native module
# and rpool._shm, which it runs on.
NOT_IN_EXEC_WORKER = tuple(m for m in NOT_ON_IMPORT if m not in ("rpool._rpool", "rpool._shm"))


def _run_python(args, env, cwd=None, timeout=60):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded_at_startup(names, env):
    """Which of `names` a bare interpreter already has: site's .pth files may import some (this
    sandbox's CA hook imports certifi, and with it typing and tempfile)."""
    code = f"import json, sys; print(json.dumps(sorted(m for m in {tuple(names)!r} if m in sys.modules)))"
    return set(_run_python(["-c", code], env))


def test_import_rpool_imports_no_pool_machinery(script_env):
    code = f"import json, sys, rpool; print(json.dumps(sorted(m for m in {NOT_ON_IMPORT!r} if m in sys.modules)))"
    loaded = set(_run_python(["-c", code], script_env))
    assert loaded - _loaded_at_startup(NOT_ON_IMPORT, script_env) == set()


def test_public_names_load_on_first_use(script_env):
    code = textwrap.dedent(
        """
        import json, multiprocessing, sys
        import rpool
        listed = set(rpool.__all__) <= set(dir(rpool))
        from rpool import Pool, TimeoutError, get_context, cpu_count
        import rpool.pool
        out = {
            "listed": listed,
            "all": sorted(n for n in rpool.__all__ if getattr(rpool, n, None) is None),
            "pool": Pool is rpool.pool.Pool and rpool.WorkerLostError is rpool.pool.WorkerLostError,
            "timeout": TimeoutError is multiprocessing.TimeoutError,
            "cpu_count": cpu_count() == multiprocessing.cpu_count(),
            "context": type(get_context("spawn").Pool).__name__,
        }
        try:
            rpool.no_such_name
        except AttributeError:
            out["missing"] = "AttributeError"
        print(json.dumps(out))
        """
    )
    assert _run_python(["-c", code], script_env) == {
        "listed": True,
        "all": [],
        "pool": True,
        "timeout": True,
        "cpu_count": True,
        "context": "method",
        "missing": "AttributeError",
    }


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("forward_logs", [False, True], ids=["plain", "forward_logs"])
def test_exec_worker_imports_only_what_it_uses(method, forward_logs, script_env):
    # `eval` is a builtin: the task itself imports nothing.
    probe = f"sorted(m for m in {NOT_IN_EXEC_WORKER!r} if m in __import__('sys').modules)"
    code = textwrap.dedent(
        f"""
        import json, rpool
        with rpool.get_context({method!r}).Pool(1, forward_logs={forward_logs!r}) as pool:
            print(json.dumps(pool.apply(eval, ({probe!r},))))
        """
    )
    loaded = set(_run_python(["-c", code], script_env))
    # Forwarding logs needs logging in the worker: the probe sees it when it is there.
    expected = {"logging"} if forward_logs else set()
    at_startup = _loaded_at_startup(NOT_IN_EXEC_WORKER, script_env)
    assert loaded - at_startup == expected - at_startup


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_exec_worker_does_not_import_multiprocessing_until_a_task_does(method, script_env):
    """What the stdlib sets in a worker's multiprocessing (name, identity, authkey, start method)
    is set when a task first imports it, even after an import system lookup of it."""
    heavy = ("multiprocessing", "pickle", "threading", "enum", "re")
    probe = f"sorted(m for m in {heavy!r} if m in __import__('sys').modules)"
    code = textwrap.dedent(
        f"""
        import json, multiprocessing, rpool
        with rpool.get_context({method!r}).Pool(1) as pool:
            before = pool.apply(eval, ({probe!r},))
            theirs = pool.apply(startup_tasks.identity_after_find_spec)
        me = multiprocessing.current_process()
        print(json.dumps([before, theirs, me.authkey.hex()]))
        """
    )
    before, theirs, authkey = _run_python(["-c", "import startup_tasks\n" + code], script_env)
    assert set(before) - _loaded_at_startup(heavy, script_env) == set()
    prefix = {"spawn": "Spawn", "forkserver": "ForkServer"}[method]
    assert theirs == [f"{prefix}PoolWorker-1", [1], authkey, method, False]


# What the parent of an exec'd pool has no use for, unless the program imports it itself.
NOT_IN_PARENT = ("logging", "typing", "subprocess", "multiprocessing.spawn", "multiprocessing.util", "runpy")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_starting_a_pool_imports_only_what_it_uses(method, script_env):
    code = textwrap.dedent(
        f"""
        import json, sys, rpool
        with rpool.get_context({method!r}).Pool(2) as pool:
            assert pool.apply(abs, (-3,)) == 3
        print(json.dumps(sorted(m for m in {NOT_IN_PARENT!r} if m in sys.modules)))
        """
    )
    loaded = set(_run_python(["-c", code], script_env))
    assert loaded - _loaded_at_startup(NOT_IN_PARENT, script_env) == set()


_COMPARE_PREPARATION = textwrap.dedent(
    """
    import json, sys
    import rpool.pool
    ours = rpool.pool._preparation_data("SpawnPoolWorker")
    assert "multiprocessing.util" not in sys.modules
    from multiprocessing import spawn
    theirs = spawn.get_preparation_data("SpawnPoolWorker")
    for data in (ours, theirs):
        data["authkey"] = data["authkey"].hex()
    print(json.dumps([ours, theirs]))
    """
)


@pytest.mark.parametrize("main", ["-c", "script", "-m"])
def test_preparation_data_is_the_stdlibs(main, tmp_path, script_env):
    """rpool makes spawn's preparation data itself (sparing a pool's start-up multiprocessing.spawn's
    imports): it must be what `spawn.get_preparation_data` gives in the same process."""
    (tmp_path / "compare_preparation.py").write_text(_COMPARE_PREPARATION)
    env = dict(script_env, PYTHONPATH=os.pathsep.join([str(tmp_path), script_env["PYTHONPATH"]]))
    args = {
        "-c": ["-c", _COMPARE_PREPARATION],
        "script": ["compare_preparation.py", "an", "argument"],
        "-m": ["-m", "compare_preparation"],
    }[main]
    ours, theirs = _run_python(args, env, cwd=str(tmp_path))
    assert ours == theirs
    assert ("init_main_from_name" in ours, "init_main_from_path" in ours) == {
        "-c": (False, False),
        "script": (False, True),
        "-m": (True, False),
    }[main]


@pytest.mark.parametrize(
    "flags", [[], ["-B", "-s", "-OO"], ["-I", "-q"], ["-E", "-P", "-b"], ["-W", "error", "-X", "utf8"], ["-X", "dev"]]
)
def test_workers_get_the_interpreters_flags_as_the_stdlib_gives_them(flags, script_env):
    code = (
        "import json, subprocess, rpool.pool; "
        "print(json.dumps([rpool._command.interpreter_flags(), subprocess._args_from_interpreter_flags()]))"
    )
    ours, theirs = _run_python([*flags, "-c", code], script_env)
    assert ours == theirs


@pytest.mark.parametrize("impl", ["stdlib", "rpool"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_prepared_as_by_spawn(impl, method, tmp_path, script_env):
    """argv, cwd, the original directory and multiprocessing's log settings reach the worker
    (spawn.prepare's keys; a forked one inherits them), its start method is its pool's, and the
    script's own functions run there."""
    later = tmp_path / "later"
    later.mkdir()
    script = tmp_path / "script.py"
    script.write_text(
        IMPORT_LINES[impl]
        + "\n"
        + textwrap.dedent(
            f"""
            import json, multiprocessing, os, sys
            import multiprocessing.util as util

            def report(_):
                import multiprocessing.process
                return {{
                    "argv": sys.argv[1:],
                    "cwd": os.getcwd(),
                    "orig_dir": multiprocessing.process.ORIGINAL_DIR,
                    "method": multiprocessing.get_start_method(allow_none=True),
                    "log_to_stderr": util._log_to_stderr,
                    "log_level": util._logger.level if util._logger is not None else None,
                }}

            if __name__ == "__main__":
                util.log_to_stderr(45)  # above ERROR: multiprocessing's own records stay quiet
                os.chdir({str(later)!r})
                with M.get_context({method!r}).Pool(1) as pool:
                    print(json.dumps(pool.apply(report, (0,))))
            """
        )
    )
    got = _run_python([str(script), "alpha", "beta"], script_env, cwd=str(tmp_path))
    assert got == {
        "argv": ["alpha", "beta"],
        "cwd": str(later),
        "orig_dir": str(tmp_path),
        "method": method,
        "log_to_stderr": True,
        "log_level": 45,
    }


@pytest.mark.parametrize("impl", ["stdlib", "rpool"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_main_module_run_with_dash_m(impl, method, tmp_path, script_env):
    """`python -m module`: workers re-import the module by name and can run its functions."""
    (tmp_path / "startup_main_mod.py").write_text(
        IMPORT_LINES[impl]
        + "\n"
        + textwrap.dedent(
            f"""
            import json

            def triple(x):
                return 3 * x

            if __name__ == "__main__":
                with M.get_context({method!r}).Pool(2) as pool:
                    print(json.dumps(pool.map(triple, range(4))))
            """
        )
    )
    env = dict(script_env, PYTHONPATH=os.pathsep.join([str(tmp_path), script_env["PYTHONPATH"]]))
    assert _run_python(["-m", "startup_main_mod"], env, cwd=str(tmp_path)) == [0, 3, 6, 9]


def test_finalizers_registered_by_a_task_run_at_worker_exit(make_pool, tmp_path):
    path = tmp_path / "finalized"
    pool = make_pool(1)
    pid = pool.apply(tasks.write_pid_at_exit, (str(path),))
    pool.close()
    pool.join()
    assert path.read_text() == str(pid)
