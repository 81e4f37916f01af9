"""Core API: apply / map / starmap / imap and AsyncResult semantics."""

import functools
import multiprocessing
import os
import time

import pytest

import tasks

T = 30  # generous timeout for get() calls that must not hang


# ------------------------------------------------------------------- apply
def test_apply(make_pool):
    pool = make_pool()
    assert pool.apply(tasks.square, (7,)) == 49
    assert pool.apply(tasks.add, (1,), {"b": 2}) == 3
    assert pool.apply(tasks.add, kwds={"a": 5, "b": 6}) == 11
    assert pool.apply(tasks.kwargs_echo, (1, "x"), {"k": None}) == ((1, "x"), [("k", None)])


def test_apply_runs_in_worker_process(make_pool):
    pool = make_pool()
    pid = pool.apply(tasks.getpid)
    assert isinstance(pid, int)
    assert pid != os.getpid()


def test_apply_builtins_partials_and_bound_methods(make_pool):
    pool = make_pool()
    assert pool.apply(pow, (2, 10)) == 1024
    assert pool.apply(len, ("abcd",)) == 4
    assert pool.apply(functools.partial(tasks.add, 10), (5,)) == 15
    assert pool.apply(tasks.Adder(3).add, (4,)) == 7


def test_apply_async(make_pool):
    pool = make_pool()
    res = pool.apply_async(tasks.add, (2, 3))
    assert res.get(timeout=T) == 5
    assert res.ready() is True
    assert res.successful() is True
    # get() may be called again and returns the same value
    assert res.get(timeout=T) == 5
    assert res.get() == 5


def test_apply_async_many_results_match(make_pool):
    pool = make_pool()
    results = [pool.apply_async(tasks.mul, (i, i + 1)) for i in range(40)]
    assert [r.get(timeout=T) for r in results] == [i * (i + 1) for i in range(40)]


def test_not_ready_then_ready(make_pool):
    pool = make_pool()
    res = pool.apply_async(tasks.sleep_and_return, (0.5, "late"))
    assert res.ready() is False
    with pytest.raises(ValueError):
        res.successful()
    assert res.wait(timeout=T) is None
    assert res.ready() is True
    assert res.successful() is True
    assert res.get(timeout=0) == "late"


def test_wait_with_timeout_returns_before_ready(make_pool):
    pool = make_pool()
    res = pool.apply_async(tasks.sleep_and_return, (0.5, 1))
    start = time.monotonic()
    assert res.wait(0.05) is None
    elapsed = time.monotonic() - start
    assert elapsed < 0.45
    assert res.ready() is False
    res.wait(timeout=T)
    assert res.ready() is True
    assert res.get(timeout=0) == 1


def test_get_timeout_raises_multiprocessing_timeouterror(make_pool):
    pool = make_pool()
    res = pool.apply_async(tasks.sleep_and_return, (0.5, "x"))
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        res.get(timeout=0.05)
    assert time.monotonic() - start < 0.45
    # the task is not cancelled: the value is still delivered afterwards
    assert res.get(timeout=T) == "x"


def test_map_async_get_timeout(make_pool):
    pool = make_pool()
    res = pool.map_async(tasks.sleep_and_return, [0.5, 0.5], chunksize=1)
    with pytest.raises(multiprocessing.TimeoutError):
        res.get(timeout=0.05)
    assert res.get(timeout=T) == [None, None]


# ------------------------------------------------------------------- map
def test_map(make_pool):
    pool = make_pool()
    assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]


def test_map_empty(make_pool):
    pool = make_pool()
    assert pool.map(tasks.square, []) == []
    assert pool.map(tasks.square, iter([])) == []
    assert pool.map_async(tasks.square, []).get(timeout=T) == []
    assert pool.starmap(tasks.add, []) == []
    assert list(pool.imap(tasks.square, [])) == []
    assert list(pool.imap_unordered(tasks.square, [])) == []


@pytest.mark.parametrize("chunksize", [1, 2, 7, 100])
def test_map_chunksizes_preserve_order(make_pool_fork, chunksize):
    pool = make_pool_fork()
    data = list(range(53))
    assert pool.map(tasks.square, data, chunksize) == [x * x for x in data]
    assert pool.map(tasks.square, data, chunksize=chunksize) == [x * x for x in data]


def test_map_generator_and_iterables(make_pool):
    pool = make_pool()
    assert pool.map(tasks.square, (x for x in range(6))) == [0, 1, 4, 9, 16, 25]
    assert pool.map(tasks.identity, "abc") == ["a", "b", "c"]
    assert pool.map(tasks.identity, {3: "x"}) == [3]
    assert pool.map(tasks.identity, range(3, 6)) == [3, 4, 5]


def test_map_many_items(make_pool):
    pool = make_pool()
    assert pool.map(tasks.square, range(2000)) == [x * x for x in range(2000)]


def test_map_large_payload_roundtrip(make_pool):
    pool = make_pool()
    blob = bytes(range(256)) * 8192  # 2 MiB
    assert pool.apply(tasks.nbytes, (blob,)) == len(blob)
    assert pool.apply(tasks.identity, (blob,)) == blob
    assert pool.map(tasks.nbytes, [blob, b"", blob[:10]]) == [len(blob), 0, 10]


def test_map_async_callback_gets_whole_list(make_pool):
    pool = make_pool()
    received = []
    res = pool.map_async(tasks.square, range(8), callback=received.append)
    assert res.get(timeout=T) == [x * x for x in range(8)]
    assert received == [[x * x for x in range(8)]]
    assert res.successful() is True


def test_map_result_is_a_list(make_pool):
    pool = make_pool()
    out = pool.map(tasks.identity, (1, 2))
    assert type(out) is list
    out = pool.map_async(tasks.identity, (1, 2)).get(timeout=T)
    assert type(out) is list


# ------------------------------------------------------------------- starmap
def test_starmap(make_pool):
    pool = make_pool()
    args = [(i, 10 * i) for i in range(7)]
    assert pool.starmap(tasks.add, args) == [11 * i for i in range(7)]
    assert pool.starmap(tasks.mul, iter(args), chunksize=3) == [10 * i * i for i in range(7)]


def test_starmap_async(make_pool):
    pool = make_pool()
    received = []
    res = pool.starmap_async(tasks.mul, [(2, 3), (4, 5)], callback=received.append)
    assert res.get(timeout=T) == [6, 20]
    assert received == [[6, 20]]


# ------------------------------------------------------------------- imap
def test_imap(make_pool):
    pool = make_pool()
    it = pool.imap(tasks.square, range(10))
    assert iter(it) is it
    assert list(it) == [x * x for x in range(10)]


@pytest.mark.parametrize("chunksize", [1, 3, 20])
def test_imap_chunksize_order(make_pool_fork, chunksize):
    pool = make_pool_fork()
    assert list(pool.imap(tasks.square, range(17), chunksize)) == [x * x for x in range(17)]
    assert list(pool.imap(tasks.square, iter(range(17)), chunksize=chunksize)) == [
        x * x for x in range(17)
    ]


def test_imap_next_timeout(make_pool):
    pool = make_pool()
    it = pool.imap(tasks.sleep_return, [(0.5, "a"), (0.0, "b")])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=T) == "a"
    assert it.next(timeout=T) == "b"
    with pytest.raises(StopIteration):
        it.next(timeout=T)
    with pytest.raises(StopIteration):
        next(it)


def test_imap_unordered(make_pool):
    pool = make_pool()
    it = pool.imap_unordered(tasks.square, range(20))
    assert iter(it) is it
    assert sorted(it) == [x * x for x in range(20)]
    assert sorted(pool.imap_unordered(tasks.square, range(20), chunksize=6)) == [
        x * x for x in range(20)
    ]


def test_imap_unordered_next_timeout(make_pool):
    pool = make_pool()
    it = pool.imap_unordered(tasks.sleep_return, [(0.5, "a")])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=T) == "a"
    with pytest.raises(StopIteration):
        it.next(timeout=T)


def _wait_for_two_workers(pool):
    """Until two distinct workers have answered concurrently-sleeping tasks."""
    for _ in range(30):
        pids = set(pool.map(tasks.sleep_getpid, [0.1, 0.1], chunksize=1))
        if len(pids) == 2:
            return pids
    raise AssertionError("never saw two distinct worker pids")


def test_imap_unordered_yields_in_completion_order(make_pool):
    pool = make_pool()
    _wait_for_two_workers(pool)
    it = pool.imap_unordered(tasks.sleep_return, [(0.5, "slow"), (0.0, "fast")])
    assert [it.next(timeout=T) for _ in range(2)] == ["fast", "slow"]


def test_imap_yields_in_order_even_if_later_items_finish_first(make_pool):
    pool = make_pool()
    _wait_for_two_workers(pool)
    it = pool.imap(tasks.sleep_return, [(0.5, "slow"), (0.0, "fast")])
    assert [it.next(timeout=T) for _ in range(2)] == ["slow", "fast"]


def test_two_workers_run_concurrently(make_pool):
    pool = make_pool(2)
    pids = _wait_for_two_workers(pool)
    assert os.getpid() not in pids
    start = time.monotonic()
    assert pool.map(tasks.sleep_and_return, [0.4, 0.4], chunksize=1) == [None, None]
    elapsed = time.monotonic() - start
    assert elapsed < 0.75, f"two 0.4 s tasks on 2 workers took {elapsed:.2f} s"


def test_single_worker_runs_everything(make_pool):
    pool = make_pool(1)
    pids = pool.map(tasks.getpid, range(10), chunksize=1)
    assert len(set(pids)) == 1
    assert pids[0] != os.getpid()


def test_mixed_concurrent_calls(make_pool):
    pool = make_pool()
    a = pool.map_async(tasks.square, range(50))
    b = pool.apply_async(tasks.add, (1, 2))
    c = pool.imap(tasks.square, range(5))
    d = pool.starmap_async(tasks.mul, [(1, 2), (3, 4)])
    assert list(c) == [0, 1, 4, 9, 16]
    assert d.get(timeout=T) == [2, 12]
    assert b.get(timeout=T) == 3
    assert a.get(timeout=T) == [x * x for x in range(50)]


def test_imap_unordered_many_items(make_pool):
    pool = make_pool()
    assert sorted(pool.imap_unordered(tasks.square, range(3000))) == [x * x for x in range(3000)]
    assert list(pool.imap(tasks.square, range(3000), chunksize=7)) == [x * x for x in range(3000)]


def test_calls_from_several_threads(make_pool):
    import threading

    pool = make_pool()
    errors, outputs = [], {}

    def worker(k):
        try:
            outputs[k] = (
                [pool.apply(tasks.add, (k, i)) for i in range(10)],
                pool.map(tasks.add, range(20), chunksize=3),
                list(pool.imap(tasks.square, range(k, k + 5))),
            )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for k in range(4):
        applied, mapped, imapped = outputs[k]
        assert applied == [k + i for i in range(10)]
        assert mapped == list(range(20))
        assert imapped == [x * x for x in range(k, k + 5)]


def test_same_result_waited_from_several_threads(make_pool):
    import threading

    pool = make_pool()
    res = pool.apply_async(tasks.sleep_and_return, (0.3, tasks.Payload(5)))
    got = []

    def waiter():
        got.append(res.get(timeout=T))

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert got == [tasks.Payload(5)] * 4
    # every thread sees the very same object
    assert len({id(x) for x in got}) == 1


def test_imap_partially_consumed_survives_close_join(make_pool):
    pool = make_pool()
    it = pool.imap(tasks.square, range(8))
    assert next(it) == 0
    pool.close()
    pool.join()
    assert list(it) == [x * x for x in range(1, 8)]


def test_args_as_list_and_starmap_lists(make_pool_fork):
    pool = make_pool_fork()
    assert pool.apply(tasks.add, [1, 2]) == 3
    assert pool.apply_async(tasks.add, [4], {"b": 5}).get(timeout=T) == 9
    assert pool.starmap(tasks.add, [[1, 2], (3, 4)]) == [3, 7]


def test_map_order_when_later_items_finish_first(make_pool):
    pool = make_pool()
    _wait_for_two_workers(pool)
    data = [(0.4, "a"), (0.0, "b"), (0.1, "c"), (0.0, "d")]
    assert pool.map(tasks.sleep_return, data, chunksize=1) == ["a", "b", "c", "d"]


def _slow_input():
    yield 3
    time.sleep(0.6)
    yield 4


def test_imap_consumes_input_lazily(make_pool):
    """The first result is available while the input is still being produced."""
    pool = make_pool()
    assert pool.apply(tasks.square, (1,)) == 1  # workers are up
    start = time.monotonic()
    it = pool.imap(tasks.square, _slow_input())
    assert it.next(timeout=T) == 9
    assert time.monotonic() - start < 0.5
    assert it.next(timeout=T) == 16
    with pytest.raises(StopIteration):
        next(it)
