"""Error propagation, pickling failures, closed pools and argument validation."""

import multiprocessing
import multiprocessing.pool
import threading

import pytest

import tasks

T = 30


def _check_remote_traceback(exc, funcname):
    cause = exc.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback), repr(cause)
    text = str(cause)
    assert "Traceback (most recent call last)" in text
    assert funcname in text
    # the remote traceback ends with the original exception line
    assert f"{type(exc).__name__}: {exc}" in text


# ------------------------------------------------------------ worker errors
def test_apply_reraises_worker_exception(make_pool):
    pool = make_pool()
    with pytest.raises(ValueError, match="^kaboom$") as info:
        pool.apply(tasks.raise_value_error, ("kaboom",))
    _check_remote_traceback(info.value, "raise_value_error")


def test_apply_async_worker_exception(make_pool):
    pool = make_pool()
    res = pool.apply_async(tasks.raise_custom, ("a", 1))
    with pytest.raises(tasks.CustomError) as info:
        res.get(timeout=T)
    assert type(info.value) is tasks.CustomError
    assert info.value.args == ("a", 1)
    _check_remote_traceback(info.value, "raise_custom")
    assert res.ready() is True
    assert res.successful() is False
    # get() raises again on every call
    with pytest.raises(tasks.CustomError):
        res.get(timeout=T)


def test_pool_keeps_serving_after_worker_exception(make_pool):
    pool = make_pool()
    for _ in range(3):
        with pytest.raises(ValueError):
            pool.apply(tasks.raise_value_error)
    assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]


def test_map_raises_worker_exception(make_pool):
    pool = make_pool()
    with pytest.raises(ValueError, match="^bad 3$") as info:
        pool.map(tasks.fail_on, range(6))
    _check_remote_traceback(info.value, "fail_on")
    with pytest.raises(ValueError, match="^bad 3$"):
        pool.starmap(tasks.fail_on, [(i,) for i in range(6)], chunksize=2)
    assert pool.map(tasks.square, [3]) == [9]


def test_map_async_error_callback_gets_first_exception(make_pool):
    pool = make_pool()
    ok, errors = [], []
    res = pool.map_async(
        tasks.fail_on, range(6), chunksize=1, callback=ok.append, error_callback=errors.append
    )
    with pytest.raises(ValueError, match="^bad 3$"):
        res.get(timeout=T)
    assert res.successful() is False
    assert ok == []
    assert len(errors) == 1
    assert type(errors[0]) is ValueError
    assert str(errors[0]) == "bad 3"


def test_map_async_several_failures_one_error_callback(make_pool):
    pool = make_pool()
    errors = []
    res = pool.map_async(tasks.fail_on_1_and_3, range(6), chunksize=1, error_callback=errors.append)
    with pytest.raises(ValueError) as info:
        res.get(timeout=T)
    # close+join: every callback that will ever run has run
    pool.close()
    pool.join()
    assert len(errors) == 1
    assert str(errors[0]) in ("bad 1", "bad 3")
    assert str(info.value) == str(errors[0])


def test_imap_task_error_at_its_position_then_continues(make_pool):
    pool = make_pool()
    it = pool.imap(tasks.fail_on, range(6))  # chunksize=1
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="^bad 3$") as info:
        next(it)
    _check_remote_traceback(info.value, "fail_on")
    assert list(it) == [4, 5]


def test_imap_chunked_task_error(make_pool):
    pool = make_pool()
    got = []
    with pytest.raises(ValueError, match="^bad 3$"):
        for x in pool.imap(tasks.fail_on, range(6), chunksize=2):
            got.append(x)
    assert got == [0, 1]


def test_imap_unordered_task_error(make_pool):
    pool = make_pool()
    it = pool.imap_unordered(tasks.fail_on, range(6))
    got, errors = [], []
    while True:
        try:
            got.append(it.next(timeout=T))
        except StopIteration:
            break
        except ValueError as exc:
            errors.append(str(exc))
    assert sorted(got) == [0, 1, 2, 4, 5]
    assert errors == ["bad 3"]


def test_apply_async_error_callback(make_pool):
    pool = make_pool()
    ok, errors = [], []
    res = pool.apply_async(
        tasks.raise_value_error, ("x1",), callback=ok.append, error_callback=errors.append
    )
    with pytest.raises(ValueError, match="^x1$"):
        res.get(timeout=T)
    assert ok == []
    assert len(errors) == 1
    assert type(errors[0]) is ValueError
    assert errors[0].args == ("x1",)
    _check_remote_traceback(errors[0], "raise_value_error")


# ------------------------------------------------------------ pickling
def test_unpicklable_result_gives_maybe_encoding_error(make_pool):
    pool = make_pool()
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="^Error sending result"):
        pool.apply(tasks.return_lambda)
    res = pool.apply_async(tasks.return_lambda)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        res.get(timeout=T)
    assert res.successful() is False
    # the pool keeps serving
    assert pool.apply(tasks.square, (6,)) == 36
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]


def test_unpicklable_result_in_map(make_pool):
    pool = make_pool()
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(tasks.return_unpicklable_if_2, range(5))
    it = pool.imap(tasks.return_unpicklable_if_2, range(5))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        next(it)
    assert list(it) == [3, 4]
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]


def test_unpicklable_exception_gives_maybe_encoding_error(make_pool):
    pool = make_pool()
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="^Error sending result"):
        pool.apply(tasks.raise_unpicklable_exception)
    assert pool.apply(tasks.square, (5,)) == 25


def _raises_at_call_or_get(exc_type, call):
    """rpool may raise a pickling error at submit time, the stdlib from get()."""
    try:
        res = call()
    except exc_type as exc:
        return exc
    with pytest.raises(exc_type) as info:
        res.get(timeout=T)
    assert res.ready() and not res.successful()
    return info.value


def test_unpicklable_argument(make_pool):
    pool = make_pool()
    lock = threading.Lock()
    exc = _raises_at_call_or_get(TypeError, lambda: pool.apply_async(tasks.identity, (lock,)))
    assert "pickle" in str(exc)
    with pytest.raises(TypeError, match="pickle"):
        pool.apply(tasks.identity, (lock,))
    with pytest.raises(TypeError, match="pickle"):
        pool.map(tasks.identity, [1, lock, 3])
    exc = _raises_at_call_or_get(TypeError, lambda: pool.map_async(tasks.identity, [lock]))
    assert "pickle" in str(exc)
    # the pool keeps serving
    assert pool.apply(tasks.square, (4,)) == 16
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


def test_unpicklable_function(make_pool):
    pool = make_pool()

    def local_function(x):
        return x

    exc = _raises_at_call_or_get(
        (AttributeError, TypeError, __import__("pickle").PicklingError),
        lambda: pool.apply_async(local_function, (1,)),
    )
    assert "pickle" in str(exc).lower()
    assert pool.apply(tasks.square, (4,)) == 16


# ------------------------------------------------------------ input iterable errors
class InputBroke(Exception):
    pass


def _broken_iterable(n):
    yield from range(n)
    raise InputBroke("input broke")


def test_map_input_iterable_exception_is_raised_unwrapped(make_pool):
    pool = make_pool()
    with pytest.raises(InputBroke, match="^input broke$") as info:
        pool.map(tasks.square, _broken_iterable(5))
    assert not isinstance(info.value.__cause__, multiprocessing.pool.RemoteTraceback)
    with pytest.raises(InputBroke):
        pool.starmap(tasks.add, ((i, i) for i in _broken_iterable(3)))
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


@pytest.mark.parametrize("chunksize, expected", [(1, [0, 1, 4, 9, 16]), (2, [0, 1, 4, 9])])
def test_imap_input_iterable_exception(make_pool, chunksize, expected):
    pool = make_pool()
    got = []
    with pytest.raises(InputBroke, match="^input broke$"):
        for x in pool.imap(tasks.square, _broken_iterable(5), chunksize=chunksize):
            got.append(x)
    assert got == expected
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


def test_imap_unordered_input_iterable_exception(make_pool):
    pool = make_pool()
    got = []
    with pytest.raises(InputBroke, match="^input broke$"):
        for x in pool.imap_unordered(tasks.square, _broken_iterable(4)):
            got.append(x)
    assert set(got) <= {0, 1, 4, 9}
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


# ------------------------------------------------------------ closed pools
def _assert_not_running(pool):
    for call in (
        lambda: pool.apply(tasks.square, (1,)),
        lambda: pool.apply_async(tasks.square, (1,)),
        lambda: pool.map(tasks.square, [1]),
        lambda: pool.map_async(tasks.square, [1]),
        lambda: pool.starmap(tasks.add, [(1, 2)]),
        lambda: pool.starmap_async(tasks.add, [(1, 2)]),
        lambda: pool.imap(tasks.square, [1]),
        lambda: pool.imap_unordered(tasks.square, [1]),
    ):
        with pytest.raises(ValueError, match="^Pool not running$"):
            call()


def test_closed_pool_rejects_work(make_pool):
    pool = make_pool()
    assert pool.apply(tasks.square, (2,)) == 4
    pool.close()
    _assert_not_running(pool)
    pool.join()
    _assert_not_running(pool)


def test_terminated_pool_rejects_work(make_pool):
    pool = make_pool()
    pool.terminate()
    _assert_not_running(pool)
    pool.join()
    _assert_not_running(pool)


def test_join_before_close_raises(make_pool):
    pool = make_pool()
    with pytest.raises(ValueError, match="^Pool is still running$"):
        pool.join()
    # still usable afterwards
    assert pool.apply(tasks.square, (3,)) == 9


# ------------------------------------------------------------ argument validation
@pytest.mark.parametrize("processes", [0, -1])
def test_processes_must_be_positive(make_pool_fork, processes):
    with pytest.raises(ValueError, match="^Number of processes must be at least 1$"):
        make_pool_fork(processes)


@pytest.mark.parametrize("maxtasks", [0, -2, 0.5, 1.0, "1"])
def test_maxtasksperchild_must_be_positive_int(make_pool_fork, maxtasks):
    with pytest.raises(ValueError, match="^maxtasksperchild must be a positive int or None$"):
        make_pool_fork(2, maxtasksperchild=maxtasks)


def test_initializer_must_be_callable(make_pool_fork):
    with pytest.raises(TypeError, match="^initializer must be a callable$"):
        make_pool_fork(2, initializer=42)


@pytest.mark.parametrize("method_name", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [0, -1])
def test_imap_chunksize_must_be_positive(make_pool_fork, method_name, chunksize):
    pool = make_pool_fork()
    with pytest.raises(ValueError, match="^Chunksize must be 1\\+, not"):
        getattr(pool, method_name)(tasks.square, range(3), chunksize)
    assert pool.apply(tasks.square, (3,)) == 9


def test_get_context_unknown_method(make_pool_fork):
    with pytest.raises(ValueError):
        make_pool_fork.module.get_context("no-such-method")


# ------------------------------------------------------------ rpool-only
# The stdlib (3.11) unpickles results on its result-handler thread; if that
# raises, the thread dies and this result and every later one hang forever.
# rpool must fail only the affected task and keep serving.
def test_rpool_result_that_fails_to_unpickle_in_parent(make_rpool):
    pool = make_rpool()
    res = pool.apply_async(tasks.return_fails_to_unpickle)
    with pytest.raises(Exception) as info:  # noqa: PT011 - type not fixed by the stdlib
        res.get(timeout=T)
    assert not isinstance(info.value, multiprocessing.TimeoutError)
    assert "cannot rebuild this result" in str(info.value)
    assert res.successful() is False
    assert pool.apply(tasks.square, (3,)) == 9
    with pytest.raises(Exception) as info:  # noqa: PT011
        pool.map(tasks.return_fails_to_unpickle, range(3))
    assert not isinstance(info.value, multiprocessing.TimeoutError)
    assert pool.map(tasks.square, range(3)) == [0, 1, 4]


def test_rpool_exception_that_fails_to_unpickle_in_parent(make_rpool):
    pool = make_rpool()
    errors = []
    res = pool.apply_async(tasks.raise_needs_two_args_error, error_callback=errors.append)
    with pytest.raises(Exception) as info:  # noqa: PT011 - type not fixed by the stdlib
        res.get(timeout=T)
    assert not isinstance(info.value, multiprocessing.TimeoutError)
    assert "NeedsTwoArgsError" in str(info.value)
    assert errors == [info.value]
    assert pool.apply(tasks.square, (4,)) == 16


@pytest.mark.parametrize("container", [list, tuple])
def test_imap_unpicklable_input_item_fails_at_its_position_then_continues(make_pool, container):
    pool = make_pool()
    items = container([1, 2, threading.Lock(), 4])
    it = pool.imap(tasks.identity, items)
    assert [it.next(timeout=T) for _ in range(2)] == [1, 2]
    with pytest.raises((TypeError, AttributeError, __import__("pickle").PicklingError), match="pickle"):
        it.next(timeout=T)
    assert list(it) == [4]
    assert pool.apply(tasks.square, (4,)) == 16


def test_imap_unpicklable_input_item_fails_its_chunk(make_pool):
    pool = make_pool()
    got = []
    with pytest.raises((TypeError, AttributeError, __import__("pickle").PicklingError), match="pickle"):
        for x in pool.imap(tasks.identity, [1, 2, threading.Lock(), 4, 5], 2):
            got.append(x)
    assert got == [1, 2]


def test_rpool_imap_unordered_chunk_that_fails_to_unpickle_fails_alone(make_rpool):
    # Chunks of three: the one holding 2 comes back with an object the parent cannot rebuild.
    pool = make_rpool()
    it = pool.imap_unordered(tasks.fails_to_unpickle_if_2, range(9), 3)
    got, errors = [], []
    while True:
        try:
            # Both ways of asking: next() (served natively) and .next(timeout).
            got.append(it.next(timeout=T) if len(got) % 2 else next(it))
        except StopIteration:
            break
        except ValueError as exc:
            errors.append(str(exc))
    assert sorted(got) == [3, 4, 5, 6, 7, 8]
    assert errors == ["cannot rebuild this result in the parent"]
    assert pool.apply(tasks.square, (3,)) == 9
