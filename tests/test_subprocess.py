"""Whole-interpreter behaviour, checked by running scripts in a subprocess:
exit with an open pool, clean stderr, ``__main__`` functions under
spawn/forkserver, and Ctrl-C (SIGINT) interrupting blocking calls.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

# Seconds a script may take to exit after SIGINT.
SIGINT_EXIT_DEADLINE = 8


def _alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _assert_all_gone(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker processes still alive after exit: {alive}")
        time.sleep(0.05)


def _pids_from(stdout, prefix="PIDS"):
    for line in stdout.splitlines():
        if line.startswith(prefix + " "):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError(f"no {prefix} line in {stdout!r}")


# --------------------------------------------------------------- clean runs
def test_normal_run_exit_status_and_clean_stderr(impl_method, run_script):
    impl, method = impl_method
    proc = run_script(
        f"""
        import tasks

        def on_result(value):
            print("callback", value)

        if __name__ == "__main__":
            with M.get_context({method!r}).Pool(2) as pool:
                print(pool.map(tasks.square, range(5)))
                pool.apply_async(tasks.add, (2, 3), callback=on_result).get(timeout=30)
                print(sorted(pool.imap_unordered(tasks.square, range(3))))
            pool2 = M.get_context({method!r}).Pool(2)
            print(pool2.apply(tasks.add, (40, 2)))
            pool2.close()
            pool2.join()
            print("done")
        """,
        impl,
        timeout=60,
    )
    assert proc.stderr == ""
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["[0, 1, 4, 9, 16]", "callback 5", "[0, 1, 4]", "42", "done"]


@pytest.mark.parametrize("busy", ["idle", "busy", "callback"])
def test_open_pool_in_module_global_exits_cleanly(impl_method, run_script, busy):
    impl, method = impl_method
    proc = run_script(
        f"""
        import tasks

        def on_result(value):
            print("callback", value, flush=True)

        if __name__ == "__main__":
            pool = M.get_context({method!r}).Pool(2)
            print(pool.apply(tasks.square, (3,)))
            pids = set(pool.map(tasks.sleep_getpid, [0.05] * 4, chunksize=1))
            print("PIDS", *sorted(pids), flush=True)
            if {busy!r} == "busy":
                pool.apply_async(tasks.sleep_and_return, (0.5, None))
                pool.apply_async(tasks.sleep_and_return, (0.5, None))
            elif {busy!r} == "callback":
                pool.apply_async(tasks.sleep_and_return, (0.2, "late"), callback=on_result)
                pool.apply_async(tasks.square, (4,), callback=on_result)
            # no close()/terminate(): the interpreter must still exit
        """,
        impl,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "9"
    assert proc.stderr == ""
    _assert_all_gone(_pids_from(proc.stdout))


def test_unreferenced_pool_does_not_block_exit(impl_method, run_script):
    impl, method = impl_method
    proc = run_script(
        f"""
        import gc
        import tasks

        def use_pool():
            pool = M.get_context({method!r}).Pool(2)
            return pool.map(tasks.square, range(4))

        if __name__ == "__main__":
            print(use_pool())
            gc.collect()
            print(use_pool())
        """,
        impl,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[0, 1, 4, 9]", "[0, 1, 4, 9]"]
    assert proc.stderr == ""


def test_functions_defined_in_main(impl_method, run_script):
    impl, method = impl_method
    proc = run_script(
        f"""
        import os

        class Box:
            def __init__(self, v):
                self.v = v

        def triple(x):
            return 3 * x

        def unbox(b):
            return b.v

        def init(value):
            global INIT
            INIT = value

        def read_init(_):
            return INIT

        if __name__ == "__main__":
            ctx = M.get_context({method!r})
            with ctx.Pool(2, initializer=init, initargs=("i",)) as pool:
                print(pool.map(triple, range(5)))
                print(pool.apply(unbox, (Box(7),)))
                print(sorted(set(pool.map(read_init, range(4)))))
                print(pool.apply(os.getpid) != os.getpid())
        """,
        impl,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[0, 3, 6, 9, 12]", "7", "['i']", "True"]
    assert proc.stderr == ""


# --------------------------------------------------------------- Ctrl-C
BLOCKING_CALLS = {
    "apply": "pool.apply(time.sleep, (30,))",
    "async_get": "pool.apply_async(time.sleep, (30,)).get()",
    "map": "pool.map(time.sleep, [30] * 4, chunksize=1)",
    "imap": "list(pool.imap(time.sleep, [30] * 4))",
    "wait": "pool.apply_async(time.sleep, (30,)).wait()",
    "join": "pool.apply_async(time.sleep, (30,)); pool.close(); pool.join()",
}


def _default_sigint():
    """In the script's process: take SIGINT back to its default, as in a terminal. Started from a
    shell's background job (`pytest &`, nohup), the test run ignores it, and so would the script:
    Python installs its KeyboardInterrupt handler only over the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_and_interrupt(write_script, script_env, impl, method, call, group):
    path = write_script(
        f"""
        import time
        import tasks

        if __name__ == "__main__":
            pool = M.get_context({method!r}).Pool(2)
            pids = set(pool.map(tasks.sleep_getpid, [0.05] * 4, chunksize=1))
            print("PIDS", *sorted(pids), flush=True)
            print("ready", flush=True)
            {call}
            print("not interrupted", flush=True)
        """,
        impl,
    )
    errfile = path.with_suffix(".stderr")
    with open(errfile, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=script_env,
            cwd=str(path.parent),
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    lines = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                ready.set()
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert ready.wait(30), "script never printed 'ready'"
        assert "ready" in lines, (lines, errfile.read_text())
        time.sleep(0.5)  # let it enter the blocking call
        assert proc.poll() is None, errfile.read_text()
        sent = time.monotonic()
        if group:
            os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal
        else:
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=SIGINT_EXIT_DEADLINE + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"script did not exit after SIGINT; stderr: {errfile.read_text()}")
        elapsed = time.monotonic() - sent
        t.join(5)
        return proc.returncode, lines, errfile.read_text(), elapsed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stray workers, if any
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.parametrize("call", sorted(BLOCKING_CALLS))
def test_sigint_interrupts_blocking_call(impl_method, write_script, script_env, call):
    impl, method = impl_method
    rc, lines, stderr, elapsed = _run_and_interrupt(
        write_script, script_env, impl, method, BLOCKING_CALLS[call], group=False
    )
    assert "KeyboardInterrupt" in stderr
    assert "not interrupted" not in lines
    assert rc != 0
    assert elapsed < SIGINT_EXIT_DEADLINE, f"took {elapsed:.1f} s to exit after SIGINT"
    _assert_all_gone(_pids_from("\n".join(lines)))


def test_sigint_to_process_group(impl_method, write_script, script_env):
    """Ctrl-C in a terminal signals the parent *and* its workers."""
    impl, method = impl_method
    rc, lines, stderr, elapsed = _run_and_interrupt(
        write_script, script_env, impl, method, BLOCKING_CALLS["apply"], group=True
    )
    assert "KeyboardInterrupt" in stderr
    assert "not interrupted" not in lines
    assert rc != 0
    assert elapsed < SIGINT_EXIT_DEADLINE, f"took {elapsed:.1f} s to exit after SIGINT"
    _assert_all_gone(_pids_from("\n".join(lines)))
