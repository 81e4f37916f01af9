"""Where a pool is made: at import time, and from a thread that ends before the pool does.

Both matter for the fork start method in rpool, whose parent runs its own threads: workers must
not inherit a module import lock held by a thread they do not have, and must not die with a
short-lived thread that created them.
"""

import subprocess
import sys
import textwrap
import threading

import tasks


def test_pool_made_while_its_module_is_imported(tmp_path, script_env):
    # rpool only, and fork only. The stdlib deadlocks here: its task thread pickles
    # `modpool.square`, which waits for modpool's import lock, held by the main thread that waits
    # for the map. Under spawn and forkserver every worker would import modpool and make a pool
    # of its own (the stdlib's "missing __main__ guard" mistake), so those are not tested.
    (tmp_path / "modpool.py").write_text(
        textwrap.dedent(
            """\
            import rpool
            def square(x):
                return x * x
            POOL = rpool.get_context("fork").Pool(2)
            RESULT = POOL.map(square, range(6))
            POOL.close()
            POOL.join()
            """
        )
    )
    main = tmp_path / "main.py"
    main.write_text("if __name__ == '__main__':\n    import modpool\n    print(modpool.RESULT)\n")
    proc = subprocess.run(
        [sys.executable, str(main)], capture_output=True, text=True, timeout=45, env=script_env, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 1, 4, 9, 16, 25]"


def test_pool_outlives_the_thread_that_made_it(make_pool):
    made = []
    creator = threading.Thread(target=lambda: made.append(make_pool(2)))
    creator.start()
    creator.join(timeout=30)
    assert made, "the pool was not created"
    pool = made[0]
    # Enough tasks, some slow, that both workers must take part after their creator is gone.
    results = pool.map_async(tasks.sleep_return, [(0.05, i) for i in range(8)], chunksize=1)
    assert results.get(timeout=30) == list(range(8))
    assert pool.apply(tasks.square, (9,)) == 81


def test_initializer_that_always_fails_fails_tasks_instead_of_hanging(make_rpool):
    # rpool only: the stdlib respawns such workers forever and the task never ends.
    import rpool

    import time

    pool = make_rpool(2, initializer=tasks.failing_initializer)
    # Let every worker fail before the first submission too: the pool must still be made (as
    # the stdlib's is) and then fail the task, whichever comes first.
    time.sleep(0.5)
    result = pool.apply_async(tasks.square, (3,))
    try:
        result.get(timeout=30)
    except rpool.WorkerLostError as exc:
        message = str(exc)
    else:
        raise AssertionError("a task ran although every worker failed in its initializer")
    assert "initializer" in message
    assert "RuntimeError: the initializer cannot reach its database" in message
    # Later submissions fail the same way at once rather than queueing forever.
    with_later = pool.apply_async(tasks.square, (4,))
    try:
        with_later.get(timeout=5)
    except rpool.WorkerLostError:
        pass
    else:
        raise AssertionError("a later task ran on a pool whose initializer always fails")


def test_workers_die_with_a_killed_parent(tmp_path, script_env):
    # rpool only: every stdlib pool leaves its busy workers running when the parent is SIGKILLed.
    import os
    import signal
    import time

    for method in ("fork", "spawn", "forkserver"):
        script = tmp_path / f"parent_{method}.py"
        script.write_text(
            textwrap.dedent(
                f"""\
                import rpool, tasks
                if __name__ == "__main__":
                    pool = rpool.get_context({method!r}).Pool(2)
                    pids = set(pool.map(tasks.sleep_getpid, [0.2] * 4, chunksize=1))
                    print(" ".join(map(str, pids)), flush=True)
                    pool.map(tasks.sleep_and_return, [30] * 2, chunksize=1)
                """
            )
        )
        parent = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=script_env, cwd=str(tmp_path)
        )
        try:
            workers = [int(p) for p in parent.stdout.readline().split()]
            assert workers, f"{method}: the script reported no worker pids"
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(timeout=10)
            deadline = time.monotonic() + 3
            alive = workers
            while alive and time.monotonic() < deadline:
                time.sleep(0.05)
                alive = [pid for pid in alive if _exists(pid)]
            assert not alive, f"{method}: workers {alive} outlived their SIGKILLed parent"
        finally:
            parent.kill()
            parent.wait()


def _exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
