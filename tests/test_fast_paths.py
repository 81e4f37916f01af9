"""Behaviour the speed-ups must not change.

rpool sends a function that pickles by name apart from its arguments, once per task, and
workers keep what they unpickled; callables that carry state must still travel with every
task. `map` slices ranges, lists and tuples instead of rebuilding them item by item, submits
its chunks in batches, and a waiting `get()` unpickles chunks as they finish. Submissions
while short tasks are in flight are left for rpool's I/O thread to write in batches.
Each test runs the same program through the stdlib's pool and rpool's where both apply.
"""

import collections
import functools
import time

import pytest

import tasks


class Counter:
    """A callable whose state changes when it runs: each task must get the parent's copy."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return (x, self.calls)


def test_stateful_callable_instances_travel_with_each_task(make_pool_fork):
    pool = make_pool_fork(2)
    counter = Counter()
    assert pool.map(counter, range(12), chunksize=1) == [(x, 1) for x in range(12)]
    assert [pool.apply(counter, (x,)) for x in range(4)] == [(x, 1) for x in range(4)]
    assert pool.map(counter, range(6), chunksize=3) == [(0, 1), (1, 2), (2, 3), (3, 1), (4, 2), (5, 3)]


def test_builtin_methods_carry_their_object(make_pool_fork):
    # `items.count` is a builtin function bound to a list: its pickle holds the list, which
    # changes between calls, so it must be pickled afresh each time.
    pool = make_pool_fork(2)
    items = [1]
    assert pool.apply(items.count, (1,)) == 1
    items.append(1)
    assert pool.apply(items.count, (1,)) == 2
    items.extend([1, 1])
    assert pool.map(items.count, [1, 2], chunksize=1) == [4, 0]


def test_partials_carry_their_arguments(make_pool_fork):
    pool = make_pool_fork(2)
    for n in range(3):
        assert pool.apply(functools.partial(tasks.add, b=n), (10,)) == 10 + n
        assert pool.map(functools.partial(tasks.mul, n), range(4)) == [n * x for x in range(4)]


def test_functions_and_builtins_by_name_give_the_same_results(make_pool):
    pool = make_pool(2)
    assert [pool.apply(tasks.square, (x,)) for x in range(5)] == [x * x for x in range(5)]
    assert pool.apply(abs, (-4,)) == 4
    assert pool.apply(divmod, (17, 5)) == (3, 2)
    assert pool.apply(tasks.kwargs_echo, (1, 2), {"k": 3}) == tasks.kwargs_echo(1, 2, k=3)
    assert pool.map(abs, range(-5, 5), chunksize=3) == [abs(x) for x in range(-5, 5)]
    assert pool.starmap(tasks.add, [(1, 2), (3, 4)]) == [3, 7]
    # A function and a map of it share nothing that could mix them up in a worker.
    assert pool.map(tasks.square, [3]) == [9]
    assert pool.apply(tasks.square, (3,)) == 9


class Settings(dict):
    """A dict subclass: left to pickle, which keeps its type."""


_shared = [1, [2]]


@pytest.mark.parametrize(
    "args, kwds",
    [
        ((1, 2.5, "x", None), {}),
        ([1, 2], {"k": 3}),  # a list of arguments
        ((), {"a": b"\x00", "b": (True, False)}),
        ((1,), Settings(k=[1])),
        ((1,), collections.OrderedDict(k=2)),
        ((_shared, _shared), {}),  # one list twice
        ((_shared,), {"k": _shared}),  # one list in both
        (({"d": _shared},), {"k": _shared[1]}),
        (({1, 2},), {"k": frozenset([3])}),  # not plain data: left to pickle
        ((2**70, -(2**63)), {"big": 2**63}),
    ],
    ids=repr,
)
def test_apply_async_passes_arguments_as_the_stdlib_does(make_pool, args, kwds):
    # Plain arguments are pickled natively with the task; the rest go through pickle.
    pool = make_pool(2)
    expected = tasks.shares_of_call(*args, **kwds)
    assert pool.apply_async(tasks.shares_of_call, args, kwds).get(timeout=30) == expected
    seen = []
    pool.apply_async(tasks.shares_of_call, args, kwds, callback=seen.append).wait(timeout=30)
    assert seen == [expected]


def test_apply_async_takes_its_arguments_by_keyword(make_pool):
    pool = make_pool(2)
    seen = []
    result = pool.apply_async(
        func=tasks.kwargs_echo, args=(1,), kwds={"k": 2}, callback=seen.append, error_callback=None
    )
    assert result.get(timeout=30) == tasks.kwargs_echo(1, k=2)
    assert seen == [tasks.kwargs_echo(1, k=2)]
    assert pool.apply_async(tasks.kwargs_echo).get(timeout=30) == tasks.kwargs_echo()
    assert pool.apply_async(tasks.kwargs_echo, kwds={"k": 1}).get(timeout=30) == tasks.kwargs_echo(k=1)


@pytest.mark.parametrize("args, kwds", [(None, {}), ((1,), None), (5, {})], ids=repr)
def test_apply_async_with_arguments_that_cannot_be_unpacked_fails_at_get(make_pool_fork, args, kwds):
    # The stdlib calls func(*args, **kwds) in the worker: the error comes from get(). An
    # explicit None is not the same as leaving the argument out.
    pool = make_pool_fork(2)
    errors = []
    result = pool.apply_async(tasks.kwargs_echo, args, kwds, error_callback=errors.append)
    with pytest.raises(TypeError):
        result.get(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], TypeError)


def test_a_subclass_that_overrides_apply_async_is_called(make_pool_fork):
    # rpool puts a native apply_async on each pool, shadowing the method; not on a subclass
    # whose own method would then be skipped.
    base = type(make_pool_fork(1))

    class Recording(base):
        calls = 0

        def apply_async(self, *args, **kwargs):
            Recording.calls += 1
            return super().apply_async(*args, **kwargs)

    pool = make_pool_fork.track(Recording(2, context=make_pool_fork.ctx))
    assert pool.apply_async(tasks.square, (3,)).get(timeout=30) == 9
    assert pool.apply(tasks.square, (4,)) == 16
    assert Recording.calls == 2


@pytest.mark.parametrize(
    "data",
    [
        range(23),
        range(5, 100, 7),
        range(50, -50, -3),
        range(0),
        range(1),
        # Bounds near and past 2**62: the core writes chunk bounds only well inside 64 bits.
        range(2**62 - 20, 2**62 + 20, 3),
        range(-(2**63) - 5, -(2**63) + 5),
        range(2**64, 2**64 - 40, -9),
        list(range(31)),
        tuple(range(-8, 9)),
        [],
    ],
    ids=repr,
)
@pytest.mark.parametrize("chunksize", [None, 1, 4, 1000])
def test_map_over_sliceable_inputs(make_pool_fork, data, chunksize):
    pool = make_pool_fork(2)
    assert pool.map(tasks.square, data, chunksize) == [x * x for x in data]
    assert pool.map_async(tasks.identity, data, chunksize).get(timeout=30) == list(data)
    assert sorted(pool.imap_unordered(tasks.square, data, chunksize or 1)) == sorted(x * x for x in data)
    assert list(pool.imap(tasks.identity, data, chunksize or 1)) == list(data)
    pairs = [(x, x + 1) for x in data]
    assert pool.starmap(tasks.mul, pairs, chunksize) == [x * (x + 1) for x in data]


def test_map_of_a_list_subclass_sees_its_items(make_pool_fork):
    class Shouting(list):
        def __getitem__(self, index):  # slicing would bypass what iteration gives
            raise AssertionError("a list subclass is read by iteration, as the stdlib does")

        def __iter__(self):
            return iter([x * 10 for x in list.__iter__(self)])

    pool = make_pool_fork(2)
    assert pool.map(tasks.identity, Shouting([1, 2, 3]), 2) == [10, 20, 30]


def test_an_unpicklable_chunk_fails_the_map_without_callbacks(make_rpool):
    # rpool raises at submit time (the stdlib fails the result later); chunks already sent run
    # to no one, no callback is called, and the pool goes on.
    import rpool

    pool = make_rpool(2)
    called = []
    data = [1, 2, 3, lambda: 0, 5, 6]
    with pytest.raises(rpool.UnpicklableTaskError, match="input item 3"):
        pool.map_async(tasks.identity, data, 1, callback=called.append, error_callback=called.append)
    assert pool.map(tasks.square, range(10), 3) == [x * x for x in range(10)]
    pool.close()
    pool.join()
    assert called == []


def test_map_result_callback_and_waiting_get_agree(make_pool):
    pool = make_pool(2)
    got = []
    result = pool.map_async(tasks.square, range(200), 7, callback=got.append)
    values = result.get(timeout=60)
    assert values == [x * x for x in range(200)]
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [values]


def test_map_get_reports_the_failing_chunk_while_decoding_early(make_pool_fork):
    pool = make_pool_fork(2)
    result = pool.map_async(tasks.fail_on, range(40), 2)
    with pytest.raises(ValueError):
        result.get(timeout=60)
    assert not result.successful()
    assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]


def test_map_get_reports_a_result_that_cannot_be_unpickled(make_rpool):
    # (The stdlib's result thread dies of this, and its pool hangs.)
    pool = make_rpool(2)
    result = pool.map_async(tasks.return_fails_to_unpickle, range(6), 1)
    with pytest.raises(ValueError, match="cannot rebuild"):
        result.get(timeout=60)
    assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]


def test_get_with_and_without_timeout_return_the_same_list(make_pool_fork):
    pool = make_pool_fork(2)
    result = pool.map_async(tasks.sleep_return, [(0.01 * (i % 3), i) for i in range(30)], 1)
    assert result.get(timeout=60) == list(range(30))
    assert result.get() == list(range(30))
    assert result.get(timeout=1) == list(range(30))


def test_a_short_task_behind_a_long_one_elsewhere_is_not_held_back(make_pool_fork):
    # Tiny tasks teach the pool that tasks are short; then one worker takes a long task and
    # the pool's I/O thread goes to sleep. A task submitted now, while the long one is in
    # flight, is left for that thread to write: it must be woken for it, not found a second
    # (its longest sleep) or the long task later.
    pool = make_pool_fork(2)
    for _ in range(2):
        assert pool.map(tasks.identity, range(200), 1) == list(range(200))
        time.sleep(1.2)  # long enough for the I/O thread's longest sleep to begin
        slow = pool.apply_async(tasks.sleep_and_return, (2, "slow"))
        time.sleep(0.05)
        start = time.monotonic()
        assert pool.apply(tasks.identity, ("quick",)) == "quick"
        assert time.monotonic() - start < 0.5
        assert slow.get(timeout=30) == "slow"
