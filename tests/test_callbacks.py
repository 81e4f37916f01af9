"""Callbacks: run in the parent, one at a time, before get() returns."""

import os
import threading
import time

import pytest

import tasks

T = 30


def test_apply_async_callback_runs_in_parent_before_get_returns(make_pool):
    pool = make_pool()
    calls = []

    def callback(value):
        calls.append((os.getpid(), value))

    res = pool.apply_async(tasks.square, (9,), callback=callback)
    assert res.get(timeout=T) == 81
    # get() returned => the callback has already run
    assert calls == [(os.getpid(), 81)]


def test_error_callback_runs_in_parent_before_get_returns(make_pool):
    pool = make_pool()
    calls = []

    def error_callback(exc):
        calls.append((os.getpid(), type(exc), str(exc)))

    res = pool.apply_async(tasks.raise_value_error, ("cb",), error_callback=error_callback)
    with pytest.raises(ValueError):
        res.get(timeout=T)
    assert calls == [(os.getpid(), ValueError, "cb")]


def test_callback_runs_before_wait_returns(make_pool):
    pool = make_pool()
    calls = []
    res = pool.apply_async(tasks.sleep_and_return, (0.2, "v"), callback=calls.append)
    res.wait(timeout=T)
    assert res.ready()
    assert calls == ["v"]


def test_map_async_callback_in_parent(make_pool):
    pool = make_pool()
    calls = []

    def callback(value):
        calls.append((os.getpid(), value))

    res = pool.map_async(tasks.square, range(5), chunksize=2, callback=callback)
    assert res.get(timeout=T) == [0, 1, 4, 9, 16]
    assert calls == [(os.getpid(), [0, 1, 4, 9, 16])]


def test_starmap_async_error_callback(make_pool):
    pool = make_pool()
    ok, errors = [], []
    res = pool.starmap_async(
        tasks.fail_on, [(1,), (3,)], callback=ok.append, error_callback=errors.append
    )
    with pytest.raises(ValueError, match="^bad 3$"):
        res.get(timeout=T)
    assert ok == []
    assert [str(e) for e in errors] == ["bad 3"]


def test_all_callbacks_run_after_close_join(make_pool):
    pool = make_pool()
    seen, errors = [], []
    for i in range(12):
        pool.apply_async(tasks.sleep_and_return, (0.01 * (i % 3), i), callback=seen.append)
    pool.apply_async(tasks.raise_value_error, ("e",), error_callback=errors.append)
    pool.map_async(tasks.square, range(4), callback=seen.append)
    pool.close()
    pool.join()
    assert sorted(x for x in seen if isinstance(x, int)) == list(range(12))
    assert [x for x in seen if isinstance(x, list)] == [[0, 1, 4, 9]]
    assert [str(e) for e in errors] == ["e"]


def test_callbacks_in_completion_order_single_worker(make_pool):
    pool = make_pool(1)
    seen = []
    for i in range(10):
        pool.apply_async(tasks.identity, (i,), callback=seen.append)
    pool.close()
    pool.join()
    assert seen == list(range(10))


def test_callbacks_run_one_at_a_time(make_pool):
    pool = make_pool()
    lock = threading.Lock()
    state = {"active": 0, "max": 0, "count": 0, "pids": set()}

    def callback(_value):
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
            state["pids"].add(os.getpid())
        time.sleep(0.01)
        with lock:
            state["active"] -= 1
            state["count"] += 1

    results = [
        pool.apply_async(tasks.square, (i,), callback=callback, error_callback=callback)
        for i in range(20)
    ]
    results += [
        pool.apply_async(tasks.raise_value_error, (), callback=callback, error_callback=callback)
        for _ in range(5)
    ]
    results.append(pool.map_async(tasks.square, range(10), chunksize=1, callback=callback))
    for r in results:
        r.wait(timeout=T)
    assert all(r.ready() for r in results)
    assert state["count"] == 26
    assert state["max"] == 1
    assert state["pids"] == {os.getpid()}


def test_callback_can_submit_more_work(make_pool):
    """A callback may call apply_async (but must not block on it)."""
    pool = make_pool()
    followups = []
    done = threading.Event()

    def callback(value):
        followups.append(
            pool.apply_async(tasks.square, (value,), callback=lambda v: done.set())
        )

    first = pool.apply_async(tasks.add, (1, 2), callback=callback)
    assert first.get(timeout=T) == 3
    assert len(followups) == 1
    assert followups[0].get(timeout=T) == 9
    assert done.wait(T)


# --------------------------------------------------------------- rpool-only
# The stdlib (3.11) result-handler thread dies when a callback raises, so every
# later result of that pool hangs forever.  rpool must keep serving.
def _join_with_deadline(pool, seconds=20):
    t = threading.Thread(target=pool.join, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def _raise_runtime_error(_):
    raise RuntimeError("callback failed on purpose")


def test_rpool_raising_callback_does_not_stop_pool(make_rpool):
    pool = make_rpool()
    bad = pool.apply_async(tasks.square, (2,), callback=_raise_runtime_error)
    bad.wait(timeout=T)
    assert bad.ready()
    # later results are still delivered, later callbacks still run
    seen = []
    assert pool.apply(tasks.square, (3,)) == 9
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
    r = pool.apply_async(tasks.square, (5,), callback=seen.append)
    assert r.get(timeout=T) == 25
    assert seen == [25]
    pool.close()
    assert _join_with_deadline(pool), "join() hung after a callback raised"


def test_rpool_raising_error_callback_does_not_stop_pool(make_rpool):
    pool = make_rpool()
    bad = pool.apply_async(tasks.raise_value_error, (), error_callback=_raise_runtime_error)
    bad.wait(timeout=T)
    assert bad.ready()
    assert pool.apply(tasks.square, (3,)) == 9
    bad_map = pool.map_async(tasks.square, range(3), callback=_raise_runtime_error)
    bad_map.wait(timeout=T)
    assert bad_map.ready()
    assert list(pool.imap(tasks.square, range(3))) == [0, 1, 4]
    pool.close()
    assert _join_with_deadline(pool), "join() hung after an error_callback raised"
