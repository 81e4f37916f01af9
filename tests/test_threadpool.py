"""`rpool.ThreadPool` side by side with `multiprocessing.pool.ThreadPool`."""

import multiprocessing
import multiprocessing.pool
import threading
import time

import pytest

import rpool
import tasks

THREAD_POOLS = {"stdlib": multiprocessing.pool.ThreadPool, "rpool": rpool.ThreadPool}


@pytest.fixture(params=["stdlib", "rpool"])
def make_tp(request):
    made = []

    def make(processes=3, **kwargs):
        pool = THREAD_POOLS[request.param](processes, **kwargs)
        made.append(pool)
        return pool

    make.impl = request.param
    yield make
    for pool in made:
        pool.terminate()
        pool.join()


def test_results_and_ordering(make_tp):
    pool = make_tp()
    assert pool.apply(tasks.add, (1,), {"b": 2}) == 3
    assert pool.map(tasks.square, range(50)) == [x * x for x in range(50)]
    assert pool.map(tasks.square, range(50), chunksize=7) == [x * x for x in range(50)]
    assert pool.starmap(tasks.mul, [(1, 2), (3, 4)]) == [2, 12]
    assert list(pool.imap(tasks.square, range(20), chunksize=3)) == [x * x for x in range(20)]
    assert sorted(pool.imap_unordered(tasks.square, range(20))) == [x * x for x in range(20)]
    assert pool.map_async(tasks.square, range(5)).get(10) == [0, 1, 4, 9, 16]
    assert pool.starmap_async(tasks.mul, [(2, 2)]).get(10) == [4]
    assert pool.map(tasks.square, []) == []


def test_nothing_is_pickled(make_tp):
    pool = make_tp()
    lock = threading.Lock()  # cannot be pickled
    closure_value = 41
    assert pool.apply(lambda: closure_value + 1) == 42
    assert pool.apply(lambda lk: lk, (lock,)) is lock
    obj = object()
    assert pool.map(lambda x: obj, range(3)) == [obj, obj, obj]
    assert list(pool.imap(lambda x: (x, lock), [1]))[0][1] is lock


def test_runs_on_the_pools_threads_concurrently(make_tp):
    pool = make_tp(3)
    names = pool.map(lambda _: (time.sleep(0.1), threading.get_ident())[1], range(6), chunksize=1)
    assert threading.get_ident() not in names
    assert 1 < len(set(names)) <= 3


def test_errors_are_the_raised_objects(make_tp):
    pool = make_tp()
    error = tasks.CustomError("mine")

    def raiser():
        raise error

    with pytest.raises(tasks.CustomError) as info:
        pool.apply(raiser)
    assert info.value is error
    with pytest.raises(ValueError):
        pool.map(tasks.fail_on, range(5))
    result = pool.apply_async(raiser)
    result.wait(10)
    assert result.ready() and not result.successful()
    it = pool.imap(tasks.fail_on, range(5))
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(it)
    assert next(it) == 4


def test_callbacks_run_on_one_other_thread(make_tp):
    pool = make_tp()
    seen = []
    done = threading.Event()

    def callback(value):
        seen.append((value, threading.get_ident()))

    results = [pool.apply_async(tasks.square, (i,), callback=callback) for i in range(10)]
    errors = []
    failing = pool.apply_async(tasks.raise_value_error, ("x",), error_callback=lambda e: (errors.append(e), done.set()))
    for r in results:
        r.get(10)
    failing.wait(10)
    assert done.wait(10)
    assert sorted(v for v, _ in seen) == [i * i for i in range(10)]
    callback_threads = {t for _, t in seen}
    assert len(callback_threads) == 1 and threading.get_ident() not in callback_threads
    assert isinstance(errors[0], ValueError)
    mapped = []
    pool.map_async(tasks.square, range(4), callback=mapped.append).wait(10)
    assert mapped == [[0, 1, 4, 9]]


def test_initializer_runs_on_each_thread(make_tp):
    local = threading.local()

    def init(value):
        local.value = value

    pool = make_tp(2, initializer=init, initargs=("set",))
    values = pool.map(lambda _: (time.sleep(0.02), local.value)[1], range(8), chunksize=1)
    assert values == ["set"] * 8


def test_close_then_join_finishes_the_work(make_tp):
    pool = make_tp(2)
    results = [pool.apply_async(tasks.sleep_and_return, (0.05, i)) for i in range(6)]
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(tasks.square, (1,))
    pool.join()
    assert [r.get(0) for r in results] == list(range(6))


def test_join_while_running_is_an_error(make_tp):
    pool = make_tp()
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()


def test_terminate_returns_and_the_pool_stops(make_tp):
    pool = make_tp(1)
    running = pool.apply_async(tasks.sleep_and_return, (0.3, "r"))
    queued = [pool.apply_async(tasks.square, (i,)) for i in range(5)]
    time.sleep(0.05)
    pool.terminate()
    pool.join()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(tasks.square, (2,))
    if make_tp.impl == "rpool":
        # The stdlib leaves these unready forever; rpool fails them.
        for r in [running, *queued]:
            with pytest.raises(rpool.PoolTerminatedError):
                r.get(1)


def test_with_block(make_tp):
    with make_tp() as pool:
        assert pool.map(tasks.square, range(3)) == [0, 1, 4]
    with pytest.raises(ValueError):
        pool.map(tasks.square, range(3))


@pytest.mark.parametrize("kwargs, error", [({"processes": 0}, ValueError), ({"initializer": 1}, TypeError)])
def test_bad_arguments(kwargs, error):
    for cls in THREAD_POOLS.values():
        with pytest.raises(error):
            cls(**kwargs)


def test_signature_matches_the_stdlib():
    import inspect

    def shape(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert shape(rpool.ThreadPool) == shape(multiprocessing.pool.ThreadPool)


def test_a_failing_initializer_fails_tasks_instead_of_hanging():
    # The stdlib restarts the thread forever and the task hangs; rpool fails it.
    pool = rpool.ThreadPool(1, initializer=tasks.failing_initializer)
    try:
        with pytest.raises(rpool.WorkerLostError, match="cannot reach its database"):
            pool.apply(tasks.square, (2,))
    finally:
        pool.terminate()
        pool.join()


def test_threads_exit_after_close_and_join():
    before = threading.active_count()
    pool = rpool.ThreadPool(4)
    pool.map(tasks.square, range(10))
    pool.close()
    pool.join()
    assert threading.active_count() == before


def test_a_time_limit_is_refused_clearly():
    with rpool.ThreadPool(1) as pool:
        with pytest.raises(ValueError, match="cannot limit how long a task runs"):
            pool.apply(tasks.square, (2,), timeout=1)
        assert pool.apply(tasks.square, (2,)) == 4
