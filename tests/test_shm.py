"""Large buffers (>= 1 MiB) travel through shared memory in rpool (rpool._shm).

What the caller sees must be what the stdlib gives: the same types (bytes stays bytes, bytearray
stays bytearray), the same values, shared references kept, errors the same. The rpool-only tests
check that no memfd outlives the tasks and pools that used it.
"""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import shm_tasks as T
from conftest import TESTS_DIR

MiB = 1 << 20
BIG = 3 * MiB


def payload(byte, n=BIG):
    return bytes([byte]) * n


def digest(obj):
    return type(obj).__name__, len(obj), hashlib.sha1(obj).hexdigest()


def memfds():
    """This process's descriptors for rpool's shared-memory files, and its mappings of them."""
    return [fd for fd, _ in T.open_memfds()] + [span for span, _ in T.mapped_memfds()]


def no_memfds_left():
    from rpool import _shm

    deadline = time.monotonic() + 5
    while True:
        _shm.trim()
        left = memfds()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_arguments_and_results_keep_their_types(make_pool):
    pool = make_pool(2)
    data = payload(1)
    mutable = bytearray(payload(2))
    assert pool.apply(T.describe, (data,)) == digest(data)
    assert pool.apply(T.describe, (mutable,)) == digest(mutable)
    for value in (data, mutable):
        back = pool.apply(T.echo, (value,))
        assert type(back) is type(value) and back == value


def test_buffers_nested_in_containers_and_keywords(make_pool):
    pool = make_pool(2)
    a, b = payload(3), bytearray(payload(4, 2 * MiB))
    nested = {"list": [a, (b, 5)], "small": b"x"}
    assert pool.apply(T.describe, ([a, b],)) == [digest(a), digest(b)]
    back = pool.apply(T.echo, (), {"obj": nested})
    assert back == nested
    assert type(back["list"][0]) is bytes and type(back["list"][1][0]) is bytearray
    results = pool.map(T.describe, [[a], [b], [b"small"]], chunksize=1)
    assert results == [[digest(a)], [digest(b)], [digest(b"small")]]


def test_one_object_twice_stays_one_object(make_pool):
    pool = make_pool(1)
    data = payload(5)
    assert pool.apply(T.same_object, ((data, data),)) is True
    back = pool.apply(T.echo, ([data, data],))
    assert back[0] is back[1] and back[0] == data


def test_large_results_of_many_tasks(make_pool):
    pool = make_pool(2)
    sizes = [BIG + i for i in range(6)]
    results = pool.map(T.fill, sizes, chunksize=2)
    assert [len(r) for r in results] == sizes and all(type(r) is bytes for r in results)
    unordered = sorted(len(r) for r in pool.imap_unordered(T.fill, sizes))
    assert unordered == sizes


def test_payloads_growing_and_shrinking_through_reused_shared_memory(make_pool):
    """rpool reuses its memfds and keeps them mapped on both sides: a bigger payload than the
    last one must grow them, a smaller one must not read stale bytes past its end."""
    pool = make_pool(1)
    for i, size in enumerate([2 * MiB, 3 * MiB, 9 * MiB + 1, 2 * MiB + 7, 9 * MiB + 4097, BIG]):
        data = bytearray(payload(20 + i, size))
        assert pool.apply(T.describe, (data,)) == digest(data)
        back = pool.apply(T.echo, (data,))
        assert type(back) is bytearray and digest(back) == digest(data)


def test_an_exception_carrying_a_large_buffer(make_pool):
    pool = make_pool(1)
    data = payload(6)
    with pytest.raises(ValueError) as info:
        pool.apply(T.raise_with, (data,))
    assert info.value.args[0] == data


def test_a_memoryview_cannot_be_pickled(make_pool_fork):
    pool = make_pool_fork(1)
    with pytest.raises(TypeError):
        pool.apply(len, (memoryview(payload(7)),))
    assert pool.apply(len, (payload(7),)) == BIG


def test_numpy_arrays_arrive_writable(make_pool_fork):
    numpy = pytest.importorskip("numpy")
    pool = make_pool_fork(1)
    array = numpy.ones((512, 1024), dtype=numpy.float64)  # 4 MiB
    assert pool.apply(T.numpy_sum, (array,)) == (2.0 * array.size, "<f8", (512, 1024))
    back = pool.apply(T.echo, (array,))
    assert back.flags.writeable and (back == array).all()


# --- rpool only --------------------------------------------------------------------------------


def test_only_large_buffers_take_the_shared_path():
    from rpool import _shm

    small = (len, (b"x" * 1000,), {})
    assert type(_shm.dumps(small)) is bytes
    shared = _shm.dumps((len, (payload(8),), {}))
    assert isinstance(shared, _shm.SharedPayload) and len(shared) < 4096
    assert pickle.loads(shared) == (len, (payload(8),), {})


def test_buffers_are_copied_only_within_their_bounds():
    from rpool import _rpool

    assert _rpool.read_buffer(b"abcdef", 2, 3, True) == bytearray(b"cde")
    with pytest.raises(ValueError, match="past the end"):
        _rpool.read_buffer(b"abcdef", 4, 3, False)
    target = bytearray(6)
    _rpool.write_buffer(target, 3, b"xyz")
    assert target == bytearray(b"\0\0\0xyz")
    with pytest.raises(ValueError, match="past the end"):
        _rpool.write_buffer(target, 4, b"xyz")
    with pytest.raises(BufferError):
        _rpool.write_buffer(b"read-only", 0, b"x")


def test_few_mappings_of_other_processes_memfds_are_kept():
    """Each kept mapping holds its file's memory even after the sender closes it."""
    from rpool import _shm

    sent = [_shm.dumps(payload(30 + i, 2 * MiB)) for i in range(_shm._MappedFiles.KEEP + 2)]
    for i, data in enumerate(sent):
        assert pickle.loads(data) == payload(30 + i, 2 * MiB)
    assert len(_shm._mapped.maps) == _shm._MappedFiles.KEEP
    del sent, data
    assert no_memfds_left() == []


def test_a_payload_read_after_its_memfd_was_reused_is_refused():
    from rpool import _shm

    first = _shm.dumps(payload(9))
    assert pickle.loads(first) == payload(9)  # read: the memfd may be written again
    second = _shm.dumps(payload(10))
    with pytest.raises(RuntimeError, match="reused"):
        pickle.loads(first)
    assert pickle.loads(second) == payload(10)


def test_no_memfd_outlives_finished_tasks(make_rpool):
    pool = make_rpool(2)
    for i in range(4):
        assert pool.apply(T.echo, (payload(i),)) == payload(i)
    unread = [pool.apply_async(T.fill, (BIG,)) for _ in range(3)]
    pool.close()
    pool.join()
    assert [len(r.get(timeout=10)) for r in unread] == [BIG] * 3
    assert no_memfds_left() == []


def test_no_memfd_outlives_a_worker_killed_with_a_large_task(make_rpool):
    from rpool import WorkerLostError

    pool = make_rpool(1)
    with pytest.raises(WorkerLostError):
        pool.apply(T.die_holding, (payload(11),))
    assert pool.apply(len, (payload(12),)) == BIG
    assert no_memfds_left() == []


def test_no_memfd_outlives_a_timeout_or_terminate(make_rpool):
    from rpool import TaskTimeoutError

    pool = make_rpool(2)
    with pytest.raises(TaskTimeoutError):
        pool.apply(T.sleep_holding, (payload(13),), timeout=0.5)
    pending = [pool.apply_async(T.sleep_holding, (payload(14),)) for _ in range(3)]
    pool.terminate()
    pool.join()
    assert all(r.ready() for r in pending)
    assert no_memfds_left() == []


def test_a_killed_parent_leaves_no_shared_memory_behind(tmp_path):
    """Memfds have no name: once the parent and its workers are gone, so is the memory."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, rpool, shm_tasks
            if __name__ == "__main__":
                pool = rpool.Pool(2, context=rpool.get_context("forkserver"))
                pool.apply(len, (b"x" * (3 << 20),))
                pending = pool.apply_async(shm_tasks.sleep_holding, (b"y" * (3 << 20),))
                print(*pool._core.worker_pids(), flush=True)
                sys.stdin.read()
            """
        )
    )
    before = set(os.listdir("/dev/shm"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        time.sleep(0.3)  # the second task is in a worker, reading its shared memory
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    # Other programs on the machine may add their own files meanwhile.
    assert [name for name in set(os.listdir("/dev/shm")) - before if "rpool" in name] == []


def test_a_worker_forked_while_a_large_task_runs_does_not_hold_its_memory():
    """Only a forked worker inherits the parent's descriptors, the core's memfds among them."""
    import rpool

    pool = rpool.Pool(2, maxtasksperchild=1, context=rpool.get_context("fork"))
    with pool:
        _forked_worker_holds_nothing(pool)


def _forked_worker_holds_nothing(pool):
    busy = pool.apply_async(T.sleep_holding, (payload(15), 2))
    time.sleep(0.3)
    # The other worker exits after this task; its replacement is forked while `busy` runs.
    pool.apply(T.memfd_links)
    assert pool.apply(T.memfd_links) == []
    assert busy.get(timeout=30) == BIG
