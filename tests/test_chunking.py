"""Chunking semantics.

With ``maxtasksperchild=1`` every chunk runs in a fresh worker process, so the
pids returned by ``getpid`` change exactly at chunk boundaries: grouping equal
consecutive pids recovers the chunk sizes.
"""

import itertools

import pytest

import tasks


def _chunk_sizes(pids):
    sizes = [len(list(group)) for _, group in itertools.groupby(pids)]
    # each chunk had its own process
    assert len(set(pids)) == len(sizes), pids
    return sizes


def _stdlib_default_chunksize(n, processes):
    chunksize, extra = divmod(n, processes * 4)
    if extra:
        chunksize += 1
    return chunksize


def _expected_sizes(n, chunksize):
    full, rest = divmod(n, chunksize)
    return [chunksize] * full + ([rest] if rest else [])


@pytest.mark.parametrize("n, processes", [(9, 2), (25, 3), (7, 2)])
def test_map_default_chunksize(make_pool_fork, n, processes):
    pool = make_pool_fork(processes, maxtasksperchild=1)
    pids = pool.map(tasks.getpid, range(n))
    expected = _expected_sizes(n, _stdlib_default_chunksize(n, processes))
    assert _chunk_sizes(pids) == expected
    # sanity: the formula gives what we think for these cases
    assert {(9, 2): [2, 2, 2, 2, 1], (25, 3): [3] * 8 + [1], (7, 2): [1] * 7}[
        (n, processes)
    ] == expected


def test_map_default_chunksize_all_methods(make_pool):
    pool = make_pool(2, maxtasksperchild=1)
    pids = pool.map(tasks.getpid, range(9))
    assert _chunk_sizes(pids) == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("chunksize, expected", [(4, [4, 4, 1]), (9, [9]), (50, [9])])
def test_map_explicit_chunksize(make_pool_fork, chunksize, expected):
    pool = make_pool_fork(2, maxtasksperchild=1)
    assert _chunk_sizes(pool.map(tasks.getpid, range(9), chunksize)) == expected
    assert _chunk_sizes(
        pool.map_async(tasks.getpid, range(9), chunksize=chunksize).get(timeout=30)
    ) == expected


def test_starmap_chunking(make_pool_fork):
    pool = make_pool_fork(2, maxtasksperchild=1)
    pids = pool.starmap(tasks.getpid, [(i,) for i in range(9)])
    assert _chunk_sizes(pids) == [2, 2, 2, 2, 1]
    pids = pool.starmap(tasks.getpid, [(i,) for i in range(5)], chunksize=2)
    assert _chunk_sizes(pids) == [2, 2, 1]


def test_map_of_generator_uses_its_length(make_pool_fork):
    # map() materialises an iterable without __len__ and then uses its length
    pool = make_pool_fork(2, maxtasksperchild=1)
    pids = pool.map(tasks.getpid, (i for i in range(9)))
    assert _chunk_sizes(pids) == [2, 2, 2, 2, 1]


def test_imap_default_chunksize_is_one(make_pool_fork):
    pool = make_pool_fork(2, maxtasksperchild=1)
    pids = list(pool.imap(tasks.getpid, range(5)))
    assert _chunk_sizes(pids) == [1, 1, 1, 1, 1]


def test_imap_explicit_chunksize(make_pool_fork):
    pool = make_pool_fork(2, maxtasksperchild=1)
    pids = list(pool.imap(tasks.getpid, range(7), chunksize=3))
    assert _chunk_sizes(pids) == [3, 3, 1]


def test_imap_unordered_chunks_stay_together(make_pool_fork):
    pool = make_pool_fork(2, maxtasksperchild=1)
    pids = list(pool.imap_unordered(tasks.getpid, range(7), chunksize=3))
    # order between chunks is unspecified, but items of a chunk are adjacent
    assert sorted(_chunk_sizes(pids)) == [1, 3, 3]


def test_single_chunk_runs_in_one_worker(make_pool):
    pool = make_pool()
    pids = pool.map(tasks.getpid, range(12), chunksize=12)
    assert len(set(pids)) == 1
