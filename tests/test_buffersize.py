"""`imap`/`imap_unordered` read their input only `buffersize` chunks ahead of the caller.

The stdlib (before 3.16) has no `buffersize`, and its default reads the input as fast as its
workers take tasks; rpool's default is bounded too. The generators here record how far they
have been read, so the tests see exactly what the feeder took.
"""

import functools
import itertools
import os
import multiprocessing
import threading
import time

import pytest

import tasks

TIMEOUT = 10


class Recorder:
    """An input of `n` items (endless if None) that records how many were read and, at every
    read, how far reading ran ahead of what the caller had consumed."""

    def __init__(self, n=None, fail_at=None):
        self.n = n
        self.fail_at = fail_at
        self.read = 0
        self.consumed = 0
        self.max_ahead = 0
        self._lock = threading.Lock()

    def __iter__(self):
        for i in itertools.count() if self.n is None else range(self.n):
            if i == self.fail_at:
                raise KeyError(f"input item {i} is bad")
            with self._lock:
                self.read = i + 1
                self.max_ahead = max(self.max_ahead, self.read - self.consumed)
            yield i

    def took(self):
        with self._lock:
            self.consumed += 1


def settled_read(recorder, expected, quiet=0.3):
    """Wait (bounded) until `expected` items were read, then a little longer; return the count."""
    deadline = time.monotonic() + TIMEOUT
    while recorder.read < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(quiet)
    return recorder.read


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize, buffersize", [(1, 1), (1, 5), (3, 4)])
def test_nothing_consumed_reads_only_buffersize_chunks(make_rpool, fn, chunksize, buffersize):
    pool = make_rpool(2)
    source = Recorder()
    results = getattr(pool, fn)(tasks.square, source, chunksize, buffersize)
    assert settled_read(source, chunksize * buffersize) == chunksize * buffersize
    # Consuming one chunk's results lets the feeder read on, still bounded.
    got = [results.next(timeout=TIMEOUT) for _ in range(chunksize)]
    squares = {i * i for i in range(source.read)}
    assert all(v in squares for v in got)
    assert settled_read(source, chunksize * buffersize) <= chunksize * (buffersize + 1)


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
def test_default_reads_a_bounded_number_of_chunks(make_rpool, fn):
    from rpool import pool as rpool_pool

    pool = make_rpool(2)
    source = Recorder()  # endless: an unbounded feeder would never stop reading
    results = getattr(pool, fn)(tasks.square, source, 2)
    bound = rpool_pool._READ_AHEAD_PER_WORKER * 2 * 2
    assert settled_read(source, bound) == bound
    values = [results.next(timeout=TIMEOUT) for _ in range(10)]
    if fn == "imap":
        assert values == [i * i for i in range(10)]


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize, buffersize", [(1, 1), (1, 3), (4, 2), (7, 50)])
def test_results_are_all_there_and_reading_stays_bounded(make_pool_rpool_fork, fn, chunksize, buffersize):
    pool = make_pool_rpool_fork
    n = 200
    source = Recorder(n)
    out = []
    for value in getattr(pool, fn)(tasks.square, source, chunksize, buffersize=buffersize):
        out.append(value)
        source.took()
    if fn == "imap":
        assert out == [i * i for i in range(n)]
    else:
        assert sorted(out) == [i * i for i in range(n)]
    # A chunk is counted as yielded when its first item is, hence the one extra chunk.
    assert source.max_ahead <= chunksize * (buffersize + 1)


@pytest.fixture
def make_pool_rpool_fork():
    import rpool

    pool = rpool.get_context("fork").Pool(2)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_input_raising_halfway_surfaces_and_pool_stays_usable(make_rpool, fn, chunksize):
    pool = make_rpool(2)
    source = Recorder(100, fail_at=40)
    results = getattr(pool, fn)(tasks.square, source, chunksize, buffersize=2)
    out = []
    with pytest.raises(KeyError, match="input item 40 is bad"):
        for value in results:
            out.append(value)
    # Everything read before the bad item was yielded first (whole chunks only).
    expected = [i * i for i in range(40 - 40 % chunksize)]
    assert sorted(out) == expected
    assert pool.apply(tasks.square, (7,)) == 49
    assert list(pool.imap(tasks.square, range(5), buffersize=1)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
def test_order_and_timeouts_unchanged(make_rpool, fn):
    pool = make_rpool(2)
    delays = [(0.3, "a"), (0.01, "b"), (0.01, "c"), (0.2, "d")]
    results = getattr(pool, fn)(tasks.sleep_return, delays, buffersize=1)
    with pytest.raises(multiprocessing.TimeoutError):
        results.next(timeout=0.01)
    rest = [results.next(timeout=TIMEOUT) for _ in range(4)]
    if fn == "imap":
        assert rest == ["a", "b", "c", "d"]
    else:
        assert sorted(rest) == ["a", "b", "c", "d"]
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)


def test_close_then_join_runs_the_rest_of_the_input(make_rpool):
    pool = make_rpool(2)
    source = Recorder(300)
    results = pool.imap(tasks.square, source, 1, buffersize=2)
    assert results.next(timeout=TIMEOUT) == 0
    pool.close()
    pool.join()  # lifts the bound, as the stdlib's pool runs every queued task before joining
    assert source.read == 300
    assert list(results) == [i * i for i in range(1, 300)]


def test_terminate_stops_a_waiting_feeder(make_rpool):
    pool = make_rpool(2)
    source = Recorder()
    pool.imap_unordered(tasks.square, source, buffersize=3)
    settled_read(source, 3, quiet=0.1)
    pool.terminate()
    deadline = time.monotonic() + TIMEOUT
    while pool.__dict__.get("_read_aheads") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pool._read_aheads, "the feeder is still waiting after terminate()"
    assert source.read == 3


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
@pytest.mark.parametrize(
    "bad, error",
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)],
)
def test_buffersize_must_be_a_positive_int(make_rpool, fn, bad, error):
    pool = make_rpool(1)
    with pytest.raises(error, match="buffersize"):
        getattr(pool, fn)(tasks.square, range(3), 1, bad)
    assert pool.apply(tasks.square, (3,)) == 9


def test_thread_pool_takes_buffersize():
    import rpool

    source = Recorder()
    with rpool.ThreadPool(2) as pool:
        results = pool.imap(tasks.square, source, buffersize=4)
        assert settled_read(source, 4) == 4
        assert [results.next(timeout=TIMEOUT) for _ in range(3)] == [0, 1, 4]


@pytest.mark.parametrize("fn", ["imap", "imap_unordered"])
def test_threads_sharing_one_iterator_get_every_item_once(make_pool_rpool_fork, fn):
    # Items of an already decoded chunk are handed out without the iterator's lock.
    results = getattr(make_pool_rpool_fork, fn)(tasks.square, range(3000), 7, buffersize=4)
    seen = [[], [], []]

    def consume(into):
        for value in results:
            into.append(value)

    threads = [threading.Thread(target=consume, args=(into,)) for into in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(itertools.chain(*seen)) == [i * i for i in range(3000)]
    if fn == "imap":
        assert all(part == sorted(part) for part in seen)


# A list, tuple or range is fed by the caller's thread (no feeder thread): the same bounds hold.
# What was submitted is seen from the files the tasks create.

SEQUENCES = {"list": lambda n: list(range(n)), "tuple": lambda n: tuple(range(n)), "range": range}


def settled_files(directory, expected, quiet=0.3):
    deadline = time.monotonic() + TIMEOUT
    while len(os.listdir(directory)) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(quiet)
    return len(os.listdir(directory))


@pytest.mark.parametrize(
    "kind, fn, chunksize, buffersize",
    [("list", "imap", 1, 1), ("tuple", "imap_unordered", 1, 5), ("range", "imap", 3, 4), ("range", "imap_unordered", 1, 2)],
)
def test_a_sequence_is_submitted_only_buffersize_chunks_ahead(make_rpool, tmp_path, kind, fn, chunksize, buffersize):
    pool = make_rpool(2)
    touch = functools.partial(tasks.touch_in, str(tmp_path))
    results = getattr(pool, fn)(touch, SEQUENCES[kind](1000), chunksize, buffersize)
    assert settled_files(tmp_path, chunksize * buffersize) == chunksize * buffersize
    consumed = 0
    for _ in range(3):
        for _ in range(chunksize):
            results.next(timeout=TIMEOUT)
        consumed += 1
        # Never more than `buffersize` chunks past those yielded.
        assert settled_files(tmp_path, 0, quiet=0.1) <= chunksize * (consumed + buffersize)
    rest = list(results)
    assert len(rest) == 1000 - 3 * chunksize
    assert len(os.listdir(tmp_path)) == 1000


@pytest.mark.parametrize("kind", SEQUENCES)
def test_a_sequence_default_read_ahead_is_bounded(make_rpool, tmp_path, kind):
    from rpool import pool as rpool_pool

    pool = make_rpool(2)
    touch = functools.partial(tasks.touch_in, str(tmp_path))
    results = pool.imap(touch, SEQUENCES[kind](5000), 2)
    bound = rpool_pool._READ_AHEAD_PER_WORKER * 2 * 2
    assert settled_files(tmp_path, bound) == bound
    assert [results.next(timeout=TIMEOUT) for _ in range(3)] == [0, 1, 2]


def test_close_then_join_runs_the_rest_of_a_sequence(make_rpool, tmp_path):
    pool = make_rpool(2)
    touch = functools.partial(tasks.touch_in, str(tmp_path))
    results = pool.imap(touch, range(300), 1, buffersize=2)
    assert results.next(timeout=TIMEOUT) == 0
    pool.close()
    pool.join()  # lifts the bound, as the stdlib's pool runs every queued task before joining
    assert len(os.listdir(tmp_path)) == 300
    assert list(results) == list(range(1, 300))


def test_terminate_stops_feeding_a_sequence(make_rpool, tmp_path):
    pool = make_rpool(2)
    touch = functools.partial(tasks.touch_in, str(tmp_path))
    results = pool.imap_unordered(touch, range(10**6), buffersize=3)
    settled_files(tmp_path, 3, quiet=0.1)
    pool.terminate()
    assert not pool._read_aheads
    assert len(os.listdir(tmp_path)) == 3
    # Its three tasks ran: each is yielded (or, if its result had not come back, fails as
    # terminated), then the iterator ends.
    from rpool import PoolTerminatedError

    for _ in range(3):
        try:
            assert results.next(timeout=TIMEOUT) in (0, 1, 2)
        except PoolTerminatedError:
            pass
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)
