"""`rpool.ProcessPoolExecutor` side by side with `concurrent.futures.ProcessPoolExecutor`.

The same programs run through both executors; where rpool deliberately differs (a dead worker
fails only its own future) the test says so and checks both behaviours.
"""

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import time

import pytest

import executor_tasks
import rpool
import tasks

EXECUTORS = {"stdlib": cf.ProcessPoolExecutor, "rpool": rpool.ProcessPoolExecutor}


@pytest.fixture(params=["stdlib", "rpool"])
def make_executor(request):
    """make_executor(max_workers=2, **kw): an executor of the fixture's impl, "fork" unless given."""
    made = []

    def make(max_workers=2, **kwargs):
        kwargs.setdefault("mp_context", multiprocessing.get_context("fork"))
        executor = EXECUTORS[request.param](max_workers, **kwargs)
        made.append(executor)
        return executor

    make.impl = request.param
    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


def test_is_an_executor():
    assert issubclass(rpool.ProcessPoolExecutor, cf.Executor)


def test_submit_returns_a_future_with_the_result(make_executor):
    executor = make_executor()
    future = executor.submit(tasks.add, 2, b=5)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=10) == 7
    assert future.done() and not future.cancelled()
    assert future.exception() is None


def test_exception_is_the_tasks_with_a_remote_traceback(make_executor):
    executor = make_executor()
    future = executor.submit(tasks.raise_custom, "x")
    with pytest.raises(tasks.CustomError):
        future.result(timeout=10)
    exc = future.exception()
    assert isinstance(exc, tasks.CustomError)
    assert "raise_custom" in str(exc.__cause__)


def test_map_is_in_order_with_any_chunksize(make_executor):
    executor = make_executor()
    expected = [a + b + c for a, b, c in zip(range(20), range(20, 40), range(40, 60))]
    for chunksize in (1, 3, 50):
        got = executor.map(executor_tasks.add3, range(20), range(20, 40), range(40, 60), chunksize=chunksize)
        assert list(got) == expected
    assert list(executor.map(tasks.square, [])) == []


def test_map_rejects_a_bad_chunksize(make_executor):
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        make_executor().map(tasks.square, range(3), chunksize=0)


def test_map_reraises_the_first_failure_in_order(make_executor):
    results = make_executor().map(tasks.fail_on, range(6))
    assert [next(results), next(results), next(results)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(results)


def test_map_timeout_counts_from_the_call(make_executor):
    executor = make_executor(1)
    results = executor.map(tasks.sleep_and_return, [0.05, 3.0], [1, 2], timeout=0.5)
    started = time.monotonic()
    assert next(results) == 1
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert time.monotonic() - started < 2.5


def test_as_completed_and_wait(make_executor):
    executor = make_executor()
    futures = [executor.submit(tasks.sleep_and_return, d, d) for d in (0.3, 0.0, 0.1)]
    order = [f.result() for f in cf.as_completed(futures, timeout=10)]
    assert sorted(order) == [0.0, 0.1, 0.3]
    done, not_done = cf.wait(futures, timeout=10)
    assert len(done) == 3 and not not_done


def test_initializer_runs_in_every_worker(make_executor):
    executor = make_executor(2, initializer=tasks.set_init_value, initargs=("ready",))
    assert list(executor.map(tasks.get_init_value, range(6))) == ["ready"] * 6


def test_max_tasks_per_child_replaces_workers(make_executor):
    # The stdlib refuses max_tasks_per_child with "fork": use spawn for both.
    executor = make_executor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    pids = [executor.submit(tasks.getpid).result(timeout=30) for _ in range(3)]
    assert len(set(pids)) == 3


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_workers": 0}, ValueError),
        ({"max_workers": -1}, ValueError),
        ({"max_workers": 1, "max_tasks_per_child": 0}, ValueError),
        ({"max_workers": 1, "max_tasks_per_child": "1"}, TypeError),
        ({"max_workers": 1, "initializer": 3}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    for cls in EXECUTORS.values():
        with pytest.raises(error):
            cls(mp_context=multiprocessing.get_context("spawn"), **kwargs)


def test_submit_after_shutdown_raises(make_executor):
    executor = make_executor()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(tasks.square, 2)


def test_shutdown_waits_for_submitted_work(make_executor, tmp_path):
    executor = make_executor()
    paths = [str(tmp_path / f"f{i}") for i in range(4)]
    futures = [executor.submit(executor_tasks.sleep_then_touch, 0.1, p) for p in paths]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert all(os.path.exists(p) for p in paths)


def test_with_block_waits_for_results(make_executor):
    with make_executor() as executor:
        futures = [executor.submit(tasks.sleep_and_return, 0.05, i) for i in range(4)]
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


def test_cancel_a_pending_future_stops_its_task(make_executor, tmp_path):
    executor = make_executor(1)
    assert executor.submit(tasks.square, 1).result(timeout=10) == 1  # the worker is up
    blocker = executor.submit(tasks.sleep_and_return, 0.5, "done")
    time.sleep(0.1)  # the blocker has started
    # The stdlib hands a few calls to its queue ahead of time (they can no longer be cancelled);
    # rpool prefetches too. Far enough down the queue, a future is still pending.
    queued = [executor.submit(executor_tasks.touch, str(tmp_path / f"q{i}")) for i in range(80)]
    last = queued[-1]
    assert last.cancel() is True
    assert last.cancelled() and last.done()
    with pytest.raises(cf.CancelledError):
        last.result(timeout=0)
    assert blocker.cancel() is False  # running
    assert blocker.result(timeout=10) == "done"
    executor.shutdown(wait=True)
    assert not (tmp_path / "q79").exists()
    assert all(f.result() for f in queued[:-1])


def test_shutdown_cancel_futures(make_executor, tmp_path):
    executor = make_executor(1)
    blocker = executor.submit(tasks.sleep_and_return, 0.5, "done")
    queued = [executor.submit(executor_tasks.touch, str(tmp_path / f"q{i}")) for i in range(80)]
    time.sleep(0.1)
    executor.shutdown(wait=True, cancel_futures=True)
    assert blocker.result(timeout=0) == "done"
    cancelled = [f for f in queued if f.cancelled()]
    ran = [f for f in queued if not f.cancelled()]
    assert cancelled, "some pending futures are cancelled"
    assert all(f.done() for f in queued)
    for f in ran:
        assert os.path.exists(f.result(timeout=0))
    for i, f in enumerate(queued):
        if f.cancelled():
            assert not (tmp_path / f"q{i}").exists()


def test_dead_worker_fails_only_its_own_future(make_executor):
    """The stdlib breaks the whole executor (BrokenProcessPool); rpool fails one future."""
    executor = make_executor(2)
    survivor = executor.submit(tasks.sleep_and_return, 0.5, "survivor")
    time.sleep(0.1)
    doomed = executor.submit(executor_tasks.exit_now, 3)
    if make_executor.impl == "stdlib":
        with pytest.raises(cf.process.BrokenProcessPool):
            doomed.result(timeout=10)
        with pytest.raises(cf.process.BrokenProcessPool):
            survivor.result(timeout=10)
        with pytest.raises(cf.process.BrokenProcessPool):
            executor.submit(tasks.square, 3)
        return
    with pytest.raises(rpool.WorkerLostError, match="exited with code 3"):
        doomed.result(timeout=10)
    assert survivor.result(timeout=10) == "survivor"
    assert executor.submit(tasks.square, 3).result(timeout=10) == 9
    assert list(executor.map(tasks.square, range(4))) == [0, 1, 4, 9]


def test_run_in_executor(make_executor):
    executor = make_executor()

    async def main():
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(executor, tasks.square, i) for i in range(5)))
        with pytest.raises(ValueError):
            await loop.run_in_executor(executor, tasks.raise_value_error, "in a loop")
        return results

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_run_in_a_fresh_executor_without_keeping_it(run_script):
    """`run_in_executor(rpool.ProcessPoolExecutor(), f, x)`: the executor is not kept, the work ends."""
    proc = run_script(
        """
        import asyncio, tasks

        async def main():
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(M.ProcessPoolExecutor(), tasks.square, 7)

        if __name__ == "__main__":
            print(asyncio.run(main()))
        """,
        "rpool",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "49"
    assert "ResourceWarning" not in proc.stderr


def test_rpool_context_and_pool_options_pass_through():
    with rpool.ProcessPoolExecutor(1, mp_context=rpool.get_context("spawn")) as executor:
        assert executor.max_workers == 1
        assert executor.submit(tasks.process_name).result(timeout=30).startswith("SpawnPoolWorker")
    with pytest.raises(TypeError):
        rpool.ProcessPoolExecutor(1, no_such_option=True)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_exec_start_methods(method):
    """The executor over rpool's exec'd workers: results, a death, and the executor carries on."""
    with rpool.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as executor:
        assert list(executor.map(tasks.square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        with pytest.raises(rpool.WorkerLostError):
            executor.submit(executor_tasks.exit_now, 5).result(timeout=30)
        assert executor.submit(tasks.process_name).result(timeout=30).startswith(
            {"spawn": "SpawnPoolWorker", "forkserver": "ForkServerPoolWorker"}[method]
        )


def test_task_timeout_passes_through_to_the_pool():
    with rpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), task_timeout=0.3) as executor:
        with pytest.raises(rpool.TaskTimeoutError):
            executor.submit(tasks.sleep_and_return, 5, "late").result(timeout=30)
        assert executor.submit(tasks.square, 6).result(timeout=30) == 36
