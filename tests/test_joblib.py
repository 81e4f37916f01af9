"""A real `joblib.Parallel` run on the rpool backend."""

import os

import pytest

joblib = pytest.importorskip("joblib")

import rpool.joblib  # noqa: E402
import tasks  # noqa: E402

rpool.joblib.register()


def test_parallel_runs_on_rpool_workers():
    with joblib.parallel_config(backend="rpool"):
        backend, _ = joblib.parallel.get_active_backend()
        assert isinstance(backend, rpool.joblib.RpoolBackend)
        results = joblib.Parallel(n_jobs=2)(joblib.delayed(tasks.square)(i) for i in range(20))
        pids = joblib.Parallel(n_jobs=2)(joblib.delayed(tasks.sleep_getpid)(0.05) for _ in range(6))
    assert results == [i * i for i in range(20)]
    assert os.getpid() not in pids
    assert 1 <= len(set(pids)) <= 2


def test_parallel_backend_context_and_return_as_list():
    with joblib.parallel_backend("rpool", n_jobs=2):
        results = joblib.Parallel()(joblib.delayed(tasks.add)(i, b=1) for i in range(5))
    assert results == [1, 2, 3, 4, 5]


def test_an_exception_in_a_task_reaches_the_caller_and_the_backend_recovers():
    with joblib.parallel_config(backend="rpool", n_jobs=2):
        with pytest.raises(tasks.CustomError, match="x"):
            joblib.Parallel()(
                joblib.delayed(tasks.raise_custom)("x") if i == 3 else joblib.delayed(tasks.square)(i) for i in range(8)
            )
        # A new call runs after the abort. (Not the same Parallel object: joblib 1.6 keeps the
        # aborted call's look-ahead batches in it, with any backend, and runs them next time.)
        assert joblib.Parallel()(joblib.delayed(tasks.square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_return_as_generator():
    with joblib.parallel_config(backend="rpool", n_jobs=2):
        out = joblib.Parallel(return_as="generator")(joblib.delayed(tasks.square)(i) for i in range(6))
        assert list(out) == [0, 1, 4, 9, 16, 25]
        out = joblib.Parallel(return_as="generator_unordered")(joblib.delayed(tasks.square)(i) for i in range(6))
        assert sorted(out) == [0, 1, 4, 9, 16, 25]


def test_an_exception_object_returned_as_a_value_is_not_raised():
    with joblib.parallel_config(backend="rpool", n_jobs=2):
        out = joblib.Parallel()(joblib.delayed(tasks.identity)(ValueError("a value")) for _ in range(2))
    assert all(isinstance(v, ValueError) for v in out)


def test_n_jobs_one_runs_in_this_process_and_minus_one_uses_all_cores():
    with joblib.parallel_config(backend="rpool"):
        assert joblib.Parallel(n_jobs=1)(joblib.delayed(tasks.getpid)() for _ in range(2)) == [os.getpid()] * 2
    backend = rpool.joblib.RpoolBackend()
    assert backend.effective_n_jobs(-1) == os.cpu_count()
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)


def test_pool_options_pass_through_to_rpool():
    with joblib.parallel_config(backend="rpool", n_jobs=2, maxtasksperchild=1):
        pids = joblib.Parallel(batch_size=1)(joblib.delayed(tasks.sleep_getpid)(0.01) for _ in range(4))
    assert len(set(pids)) == 4
