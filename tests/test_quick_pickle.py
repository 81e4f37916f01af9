"""rpool pickles plain data (None, bool, int, float, str, bytes, tuple, list, dict) natively
for every task and result, and reads it back natively (`quick_loads`, else `pickle.loads`). What it writes must unpickle to what pickle's own output does, and
it must leave to pickle what it cannot write exactly: subclasses, huge ints, lone surrogates,
and lists or dicts met twice (pickle keeps them one object)."""

import enum
import math
import pickle

import pytest

import tasks
from rpool import _shm
from rpool._rpool import quick_dumps, quick_loads

LARGE = 1 << 20


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


PLAIN = [
    None, True, False,
    0, 1, 255, 256, 65535, 65536, -1, -128, -129, -256, -257, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
    2**40, -(2**40), 2**63 - 1, -(2**63),
    0.0, -0.0, 1.5, -2.25e-300, math.inf, -math.inf, math.nan,
    "", "a", "é" * 300, "x" * 70000, "\x00\U0001f600",
    b"", b"\x00\xff", b"y" * 300,
    (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), tuple(range(1000)),
    [], [1, [2, [3, []]]], list(range(300)),
    {}, {"a": 1, 2: (3,), (4, 5): [6]}, {"nested": {"deeper": {}}},
    ((5,), {}), (([1.5, "x"], None), {"key": b"v"}),
]


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return tasks.shares_and_types(a) == tasks.shares_and_types(b)


@pytest.mark.parametrize("obj", PLAIN, ids=lambda o: repr(o)[:30])
def test_plain_data_is_written_natively_and_unpickles_the_same(obj):
    data = quick_dumps(obj, LARGE, 16)
    assert type(data) is bytes
    assert _same(pickle.loads(data), pickle.loads(pickle.dumps(obj, 5)))


NOT_PLAIN = [
    2**63, -(2**63) - 1, 10**100,  # wider than 64 bits
    "\ud800",  # a lone surrogate has no UTF-8
    Colour.RED, Text("t"), 1 + 2j, {1, 2}, frozenset(), bytearray(b"ab"), type, len,
    [1, {2}],  # one item pickle must write fails the whole
]


@pytest.mark.parametrize("obj", NOT_PLAIN, ids=lambda o: repr(o)[:30])
def test_anything_else_is_left_to_pickle(obj):
    assert quick_dumps(obj, LARGE, 16) is False
    # The pool's own dumps still sends it, through pickle.
    assert _same(pickle.loads(_shm.dumps(obj)), obj)


def test_shared_and_self_holding_containers_are_left_to_pickle():
    inner = [1]
    shared = [inner, inner]
    assert quick_dumps(shared, LARGE, 16) is False
    looped = []
    looped.append(looped)
    assert quick_dumps(looped, LARGE, 16) is False
    d = {}
    assert quick_dumps({"a": d, "b": d}, LARGE, 16) is False
    # Equal but distinct lists are fine.
    assert type(quick_dumps([[1], [1]], LARGE, 16)) is bytes


def test_large_buffers_are_reported_for_shared_memory():
    big = b"x" * LARGE
    assert quick_dumps(big, LARGE, 16) is True
    assert quick_dumps(((1, [big]), {}), LARGE, 16) is True
    assert quick_dumps(bytearray(LARGE), LARGE, 16) is True
    assert type(quick_dumps(b"x" * (LARGE - 1), LARGE, 16)) is bytes


def test_deep_or_long_data_is_left_to_pickle():
    deep = []
    for _ in range(100):
        deep = [deep]
    assert quick_dumps(deep, LARGE, 16) is False
    assert quick_dumps(list(range(10000)), LARGE, 16) is False


ARGUMENTS = [
    [[1], [1]],
    [{"k": [1, 2]}, (None, True, -0.0)],
    ["é" * 300, b"\x00" * 300, 2**63 - 1, -(2**63)],
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=range(len(ARGUMENTS)))
def test_workers_get_and_return_the_same_objects(make_pool, args):
    pool = make_pool(2)
    # Both ways through the pool: arguments to the worker, the result back.
    assert pool.apply(tasks.shares_and_types, args[:1]) == tasks.shares_and_types(args[0])
    assert _same(pool.apply(tasks.identity, (args,)), args)


def test_a_list_passed_twice_stays_one_list_in_the_worker(make_pool):
    pool = make_pool(2)
    inner = [1, 2]
    expected = tasks.shares_and_types([inner, inner])
    assert expected[1][1][1] == ("same as", 1)
    assert pool.apply(tasks.shares_and_types, ([inner, inner],)) == expected
    assert pool.apply(tasks.identity, ([inner, inner],)) == [inner, inner]


@pytest.mark.parametrize("obj", PLAIN, ids=lambda o: repr(o)[:30])
def test_quick_loads_reads_what_quick_dumps_writes(obj):
    data = quick_dumps(obj, LARGE, 16)
    assert _same(quick_loads(data), pickle.loads(data))


@pytest.mark.parametrize("obj", PLAIN + NOT_PLAIN, ids=lambda o: repr(o)[:30])
def test_quick_loads_reads_any_pickle(obj):
    # What pickle itself wrote (frames, memo entries, other opcodes) goes to pickle.loads.
    for protocol in (2, 5):
        data = pickle.dumps(obj, protocol)
        assert _same(quick_loads(data), pickle.loads(data))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80\x05", b"\x80\x05K", b"\x80\x05K\x01K\x02", b"\x80\x05K\x01(\x86.", b"\x80\x05e.", b"\x80\x05(K\x01K\x02\x86t."],
)
def test_quick_loads_of_a_broken_pickle_does_as_pickle_does(data):
    try:
        expected = pickle.loads(data)
    except Exception as exc:
        with pytest.raises(type(exc)):
            quick_loads(data)
    else:
        assert _same(quick_loads(data), expected)
