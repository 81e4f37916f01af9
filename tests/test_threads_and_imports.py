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
