"""Pool lifecycle, start methods, worker environment and reference hygiene."""

import gc
import multiprocessing
import os
import sys
import time
import uuid
import weakref

import pytest

import tasks

T = 30


# ------------------------------------------------------------ close / join / terminate
def test_close_lets_pending_tasks_finish(make_pool):
    pool = make_pool()
    results = [pool.apply_async(tasks.sleep_and_return, (0.1, i)) for i in range(4)]
    mres = pool.map_async(tasks.square, range(6))
    pool.close()
    pool.join()
    assert all(r.ready() for r in results)
    assert [r.get(timeout=0) for r in results] == [0, 1, 2, 3]
    assert mres.get(timeout=0) == [0, 1, 4, 9, 16, 25]


def test_close_join_terminate_are_idempotent(make_pool):
    pool = make_pool()
    assert pool.apply(tasks.square, (2,)) == 4
    pool.close()
    pool.close()
    pool.join()
    pool.join()
    pool.terminate()
    pool.terminate()
    pool.join()


def test_terminate_returns_promptly_with_busy_workers(make_pool):
    pool = make_pool()
    for _ in range(4):
        pool.apply_async(tasks.sleep_and_return, (0.5, None))
    start = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="^Pool not running$"):
        pool.apply(tasks.square, (1,))


def test_context_manager(make_pool):
    pool = make_pool()
    with pool as entered:
        assert entered is pool
        assert entered.map(tasks.square, range(3)) == [0, 1, 4]
    # __exit__ terminates the pool
    with pytest.raises(ValueError, match="^Pool not running$"):
        pool.apply(tasks.square, (1,))
    pool.join()


def test_context_manager_propagates_exception(make_pool):
    pool = make_pool()
    with pytest.raises(KeyError, match="inside"):
        with pool:
            raise KeyError("inside")
    with pytest.raises(ValueError, match="^Pool not running$"):
        pool.map(tasks.square, [1])


def test_context_manager_on_closed_pool_raises(make_pool_fork):
    pool = make_pool_fork()
    pool.close()
    with pytest.raises(ValueError, match="^Pool not running$"):
        with pool:
            pass


# ------------------------------------------------------------ start methods
def test_get_context_start_method(make_pool):
    assert make_pool.ctx.get_start_method() == make_pool.method


def test_start_method_is_honoured(make_pool, monkeypatch):
    # A forked worker inherits the parent's modified module state; spawn and
    # forkserver workers re-import the module and see its initial value.
    monkeypatch.setattr(tasks, "STATE", "modified-in-parent")
    pool = make_pool()
    expected = "modified-in-parent" if make_pool.method == "fork" else "initial"
    assert pool.apply(tasks.get_state) == expected
    assert set(pool.map(tasks.get_state, range(4), chunksize=1)) == {expected}


def test_pool_with_context_keyword(make_pool, monkeypatch):
    monkeypatch.setattr(tasks, "STATE", "modified-in-parent")
    pool = make_pool.with_context_kwarg(2)
    expected = "modified-in-parent" if make_pool.method == "fork" else "initial"
    assert pool.apply(tasks.get_state) == expected
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]


def test_module_level_pool_default_context(make_pool_fork):
    pool = make_pool_fork.track(make_pool_fork.module.Pool(2))
    assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]
    assert pool.apply(tasks.getpid) != os.getpid()


def test_processes_none_uses_cpu_count(make_pool_fork, manager):
    pids = manager.list()
    pool = make_pool_fork(None, initializer=tasks.init_record_pid, initargs=(pids,))
    assert pool.apply(tasks.square, (2,)) == 4
    pool.close()
    pool.join()
    assert len(pids) in {os.cpu_count(), len(os.sched_getaffinity(0))}
    assert len(set(pids)) == len(pids)


# ------------------------------------------------------------ initializer
def test_initializer_runs_in_every_worker(make_pool, manager):
    pids = manager.list()
    pool = make_pool(2, initializer=tasks.init_record_pid, initargs=(pids, "hello"))
    results = pool.map(tasks.get_init_value_and_pid, range(8), chunksize=1)
    assert {value for value, _ in results} == {"hello"}
    pool.close()
    pool.join()
    assert len(pids) == 2
    assert len(set(pids)) == 2
    assert {pid for _, pid in results} <= set(pids)
    assert os.getpid() not in pids


def test_initializer_sets_global(make_pool):
    pool = make_pool(2, initializer=tasks.set_init_value, initargs=({"k": [1, 2]},))
    assert pool.apply(tasks.get_init_value) == {"k": [1, 2]}
    assert pool.map(tasks.get_init_value, range(4), chunksize=1) == [{"k": [1, 2]}] * 4


def test_initializer_reruns_in_replacement_workers(make_pool, manager):
    pids = manager.list()
    pool = make_pool(1, initializer=tasks.init_record_pid, initargs=(pids, "v"),
                     maxtasksperchild=1)
    results = [pool.apply(tasks.get_init_value_and_pid) for _ in range(3)]
    assert [value for value, _ in results] == ["v", "v", "v"]
    assert len({pid for _, pid in results}) == 3
    assert {pid for _, pid in results} <= set(pids)


# ------------------------------------------------------------ maxtasksperchild
def test_maxtasksperchild_one_fresh_process_per_task(make_pool):
    pool = make_pool(2, maxtasksperchild=1)
    results = [pool.apply_async(tasks.getpid) for _ in range(6)]
    pids = [r.get(timeout=T) for r in results]
    assert len(set(pids)) == 6
    assert os.getpid() not in pids
    assert pool.map(tasks.square, range(5), chunksize=1) == [0, 1, 4, 9, 16]


def test_maxtasksperchild_two_with_one_worker(make_pool_fork):
    pool = make_pool_fork(1, maxtasksperchild=2)
    pids = [pool.apply(tasks.getpid) for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    assert len(set(pids)) == 3


# ------------------------------------------------------------ worker environment
def test_workers_have_parent_authkey(make_pool):
    pool = make_pool()
    expected = bytes(multiprocessing.current_process().authkey)
    assert pool.map(tasks.get_authkey, range(4), chunksize=1) == [expected] * 4


def test_manager_proxy_in_args(make_pool, manager):
    shared = manager.list()
    pool = make_pool()
    assert pool.apply(tasks.append_to_proxy, (shared, "a")) == 1
    pool.starmap(tasks.append_to_proxy, [(shared, i) for i in range(4)])
    assert sorted(shared[1:]) == [0, 1, 2, 3]
    assert shared[0] == "a"


def test_workers_see_parent_sys_path(make_pool, tmp_path, monkeypatch):
    modname = "rpool_extra_" + uuid.uuid4().hex
    value = "value-" + modname
    (tmp_path / f"{modname}.py").write_text(f"VALUE = {value!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = make_pool()
    try:
        assert pool.apply(tasks.import_and_get_value, (modname,)) == value
        worker_path = pool.apply(tasks.get_sys_path)
        assert str(tmp_path) in worker_path
    finally:
        sys.modules.pop(modname, None)


# ------------------------------------------------------------ reference hygiene
def _eventually_collected(ref, seconds=3.0):
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if ref() is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_no_reference_kept_to_apply_argument_and_result(make_pool):
    pool = make_pool()
    arg = tasks.Payload(21)
    arg_ref = weakref.ref(arg)
    res = pool.apply_async(tasks.payload_double, (arg,))
    value = res.get(timeout=T)
    assert value == tasks.Payload(42)
    value_ref = weakref.ref(value)
    del arg, res, value
    assert _eventually_collected(arg_ref), "pool still references the argument"
    assert _eventually_collected(value_ref), "pool still references the result"
    assert pool.apply(tasks.square, (2,)) == 4


def test_no_reference_kept_to_map_arguments_and_results(make_pool):
    pool = make_pool()
    args = [tasks.Payload(i) for i in range(6)]
    arg_refs = [weakref.ref(a) for a in args]
    res = pool.map_async(tasks.payload_double, args, chunksize=2)
    values = res.get(timeout=T)
    assert values == [tasks.Payload(2 * i) for i in range(6)]
    value_refs = [weakref.ref(v) for v in values]
    del args, res, values
    assert all(_eventually_collected(r) for r in arg_refs)
    assert all(_eventually_collected(r) for r in value_refs)


def test_no_reference_kept_by_imap(make_pool):
    pool = make_pool()
    args = [tasks.Payload(i) for i in range(4)]
    arg_refs = [weakref.ref(a) for a in args]
    values = list(pool.imap(tasks.payload_double, args))
    assert values == [tasks.Payload(2 * i) for i in range(4)]
    value_refs = [weakref.ref(v) for v in values]
    del args, values
    assert all(_eventually_collected(r) for r in arg_refs)
    assert all(_eventually_collected(r) for r in value_refs)


def test_no_reference_kept_to_failed_task_argument(make_pool):
    pool = make_pool()
    arg = tasks.Payload(3)
    arg_ref = weakref.ref(arg)
    res = pool.apply_async(tasks.raise_custom, (arg,))
    with pytest.raises(tasks.CustomError):
        res.get(timeout=T)
    del arg, res
    assert _eventually_collected(arg_ref)


class _Collector:
    def __init__(self):
        self.items = []

    def append(self, x):
        self.items.append(x)


def test_no_reference_kept_to_callbacks(make_pool):
    pool = make_pool()
    ok, err = _Collector(), _Collector()
    ok_ref, err_ref = weakref.ref(ok), weakref.ref(err)
    r1 = pool.apply_async(tasks.square, (3,), callback=ok.append, error_callback=err.append)
    r2 = pool.map_async(tasks.fail_on, range(5), callback=ok.append, error_callback=err.append)
    assert r1.get(timeout=T) == 9
    with pytest.raises(ValueError):
        r2.get(timeout=T)
    assert ok.items == [9]
    assert [str(e) for e in err.items] == ["bad 3"]
    del ok, err, r1, r2
    assert _eventually_collected(ok_ref), "pool still references the callback"
    assert _eventually_collected(err_ref), "pool still references the error_callback"


def test_no_reference_kept_when_result_never_fetched(make_pool):
    pool = make_pool()
    arg = tasks.Payload(8)
    arg_ref = weakref.ref(arg)
    seen = _Collector()
    seen_ref = weakref.ref(seen)
    pool.apply_async(tasks.payload_double, (arg,))
    pool.apply_async(tasks.payload_double, (arg,), callback=seen.append)
    pool.map_async(tasks.payload_n, [arg, arg])
    del arg
    pool.close()
    pool.join()
    assert seen.items == [tasks.Payload(16)]
    del seen
    assert _eventually_collected(arg_ref), "pool still references the argument"
    assert _eventually_collected(seen_ref), "pool still references the callback"


def test_pool_cannot_be_pickled(make_pool_fork):
    import pickle

    pool = make_pool_fork()
    with pytest.raises(NotImplementedError,
                       match="^pool objects cannot be passed between processes or pickled$"):
        pickle.dumps(pool)


def test_workers_inherit_environment_and_cwd(make_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("RPOOL_TEST_VARIABLE", "value-from-parent")
    monkeypatch.chdir(tmp_path)
    pool = make_pool()
    # The cwd is part of the stdlib's spawn preparation data (forkserver too).
    assert os.path.samefile(pool.apply(tasks.getcwd), tmp_path)
    if make_pool.method != "forkserver":
        # forkserver workers get the environment the fork server started with
        assert pool.apply(tasks.getenv, ("RPOOL_TEST_VARIABLE",)) == "value-from-parent"


def test_worker_process_names(make_pool):
    import re

    prefix = {"fork": "Fork", "spawn": "Spawn", "forkserver": "ForkServer"}[make_pool.method]
    pool = make_pool()
    names = pool.map(tasks.process_name, range(6), chunksize=1)
    for name in names:
        assert re.fullmatch(prefix + r"PoolWorker-\d+", name), name
