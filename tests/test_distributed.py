"""rpool.distributed.Pool on real Dask clusters, all on 127.0.0.1.

The behaviour suite of `rpool.Pool` (test_basic, test_callbacks, test_errors, test_lifecycle,
test_chunking) runs here a second time with `make_pool` building distributed pools: those of
2 processes borrow one local cluster of 2 worker processes started once for this module; other
sizes start (and own) a cluster of their own. Tests that cannot apply to a Dask cluster are
listed in NOT_ON_DASK with the reason. Then come tests of what is specific to Dask.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import distributed
import pytest

import dask_tasks
import tasks
import test_basic
import test_callbacks
import test_chunking
import test_errors
import test_lifecycle

import rpool
import rpool.distributed

T = 30
TESTS_DIR = Path(__file__).resolve().parent

NOT_ON_DASK = {
    # cloudpickle (Dask's pickler) pickles lambdas and local functions, which these expect to fail.
    "test_unpicklable_result_gives_maybe_encoding_error": "a lambda result pickles",
    "test_unpicklable_result_in_map": "a lambda result pickles",
    "test_unpicklable_exception_gives_maybe_encoding_error": "an exception holding a lambda pickles",
    "test_unpicklable_function": "a local function pickles",
    # Worker recycling: Dask has no maxtasksperchild (the pool refuses it, tested below).
    "test_maxtasksperchild_one_fresh_process_per_task": "maxtasksperchild",
    "test_maxtasksperchild_two_with_one_worker": "maxtasksperchild",
    "test_maxtasksperchild_must_be_positive_int": "any maxtasksperchild is refused",
    "test_initializer_reruns_in_replacement_workers": "maxtasksperchild",
    "test_map_default_chunksize": "counts chunks with maxtasksperchild=1 (see test_chunks_follow_stdlib_rule)",
    "test_map_default_chunksize_all_methods": "maxtasksperchild",
    "test_map_explicit_chunksize": "maxtasksperchild",
    "test_starmap_chunking": "maxtasksperchild",
    "test_map_of_generator_uses_its_length": "maxtasksperchild",
    "test_imap_default_chunksize_is_one": "maxtasksperchild",
    "test_imap_explicit_chunksize": "maxtasksperchild",
    "test_imap_unordered_chunks_stay_together": "maxtasksperchild",
    # Start methods and contexts: Dask's nanny starts the workers.
    "test_get_context_start_method": "no start method",
    "test_start_method_is_honoured": "no start method",
    "test_pool_with_context_keyword": "no context",
    "test_module_level_pool_default_context": "no context",
    "test_get_context_unknown_method": "no context",
    "test_worker_process_names": "Dask names its worker processes",
    # The workers started before the test changed its environment and cwd.
    "test_workers_inherit_environment_and_cwd": "workers outlive the test",
    "test_workers_see_parent_sys_path": "workers outlive the test",
    # 3000 one-item tasks: Dask's overhead is milliseconds per task, so this takes many seconds.
    "test_imap_unordered_many_items": "slow by design on Dask; chunked imap is tested",
    # processes=None means one worker per CPU on this machine: too slow to start on big machines.
    "test_processes_none_uses_cpu_count": "starts a cluster of cpu_count workers",
}
SUITE = (test_basic, test_callbacks, test_chunking, test_errors, test_lifecycle)


def _reuse_behaviour_tests():
    names = {name for module in SUITE for name in vars(module) if name.startswith("test_")}
    assert NOT_ON_DASK.keys() <= names, f"stale NOT_ON_DASK entries: {NOT_ON_DASK.keys() - names}"
    for module in SUITE:
        for name, test in vars(module).items():
            if name.startswith("test_") and callable(test) and name not in NOT_ON_DASK:
                globals()[name] = test


_reuse_behaviour_tests()

SESSION_WORKERS = 2


@pytest.fixture(scope="module")
def dask_client():
    """One loopback cluster of 2 worker processes for this module (so, once per session; it is
    gone before other modules count child processes). Dask gives up on a task after its second
    worker dies (allowed_failures=1) to keep the worker-death tests short."""
    cluster = rpool.distributed._local_cluster(SESSION_WORKERS, scheduler_kwargs={"allowed_failures": 1})
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class DaskPoolFactory:
    """`make_pool(processes=2, **kw)` for distributed pools; every pool is terminated at teardown."""

    impl = "distributed"
    module = rpool.distributed

    def __init__(self, client):
        self.client = client
        self.pools = []

    def __call__(self, processes=SESSION_WORKERS, **kwargs):
        if processes == SESSION_WORKERS:
            pool = rpool.distributed.Pool(self.client, processes, **kwargs)
        else:
            pool = rpool.distributed.Pool(None, processes, **kwargs)
        self.pools.append(pool)
        return pool

    def cleanup(self):
        for pool in reversed(self.pools):
            pool.terminate()
            pool.join()


@pytest.fixture
def make_pool(dask_client):
    factory = DaskPoolFactory(dask_client)
    try:
        yield factory
    finally:
        factory.cleanup()
    # A test that left tasks running on the shared workers must not slow the next one down.
    dask_client.wait_for_workers(SESSION_WORKERS, timeout=T)


make_pool_fork = make_rpool = make_pool


# --------------------------------------------------------------- importing
def test_import_rpool_does_not_import_dask():
    code = "import sys, rpool; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T, check=True)
    assert out.stdout.strip() == "[]"


def test_rpool_distributed_is_reachable_as_an_attribute():
    assert rpool.distributed.Pool.__module__ == "rpool.distributed"
    assert issubclass(rpool.distributed.Pool, rpool.Pool)


# --------------------------------------------------------------- arguments
def test_task_timeout_must_be_positive(dask_client):
    with pytest.raises(ValueError, match="task_timeout"):
        rpool.distributed.Pool(dask_client, task_timeout=0)


def test_maxtasksperchild_and_max_memory_per_child_are_refused(dask_client):
    with pytest.raises(ValueError, match="maxtasksperchild"):
        rpool.distributed.Pool(dask_client, maxtasksperchild=10)
    with pytest.raises(ValueError, match="max_memory_per_child"):
        rpool.distributed.Pool(dask_client, max_memory_per_child=1 << 30)


def test_a_number_as_first_argument_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="processes=N"):
        rpool.distributed.Pool(4)


# --------------------------------------------------------------- Dask-specific semantics
def _chunk_sizes(keys):
    sizes, previous = [], None
    for key in keys:
        if key != previous:
            sizes.append(0)
            previous = key
        sizes[-1] += 1
    assert len(set(keys)) == len(sizes), keys
    return sizes


def test_chunks_follow_stdlib_rule(make_pool):
    pool = make_pool()
    # stdlib rule with 2 processes: 9 items -> chunks of ceil(9 / 8) = 2
    keys = pool.map(dask_tasks.task_key, range(9))
    assert _chunk_sizes(keys) == [2, 2, 2, 2, 1]
    # Dask keys carry the function's name, as Dask's own do.
    assert all(key.startswith("dask_tasks.task_key-") for key in keys)
    assert _chunk_sizes(pool.map(dask_tasks.task_key, range(9), chunksize=4)) == [4, 4, 1]
    assert _chunk_sizes(pool.starmap(dask_tasks.task_key, [(i,) for i in range(5)], chunksize=2)) == [2, 2, 1]
    assert _chunk_sizes(list(pool.imap(dask_tasks.task_key, range(4)))) == [1, 1, 1, 1]
    assert _chunk_sizes(list(pool.imap(dask_tasks.task_key, range(7), chunksize=3))) == [3, 3, 1]


def test_same_call_twice_runs_twice(make_pool):
    pool = make_pool()
    assert pool.apply(dask_tasks.fresh_token) != pool.apply(dask_tasks.fresh_token)
    assert len(set(pool.map(dask_tasks.fresh_token, [0, 0], chunksize=1))) == 2
    first = pool.apply_async(dask_tasks.fresh_token, (1,))
    second = pool.apply_async(dask_tasks.fresh_token, (1,))
    assert first.get(timeout=T) != second.get(timeout=T)


def test_local_functions_travel_by_value(make_pool):
    pool = make_pool()
    offset = 10

    def add_offset(x):
        return x + offset

    assert pool.map(add_offset, range(3)) == [10, 11, 12]
    assert pool.apply(lambda: "lambda ran") == "lambda ran"


def test_result_cloudpickle_cannot_pickle_gives_maybe_encoding_error(make_pool):
    import multiprocessing.pool

    pool = make_pool()
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="^Error sending result"):
        pool.apply(dask_tasks.return_lock)
    assert pool.apply(tasks.square, (6,)) == 36


def test_imap_keeps_a_bounded_number_of_chunks_in_flight(make_pool):
    pool = make_pool()
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield (0.05, i)

    it = pool.imap(tasks.sleep_return, items())
    assert it.next(timeout=T) == 0
    time.sleep(0.5)
    # 2 workers finish at most ~40 tasks of 50 ms in that time; without a bound all 1000 go out.
    assert len(pulled) < 100
    pool.terminate()


def test_worker_killed_mid_task_gives_worker_lost_error(make_pool):
    pool = make_pool(initializer=tasks.set_init_value, initargs=("set",))
    result = pool.apply_async(dask_tasks.kill_own_worker)
    with pytest.raises(rpool.WorkerLostError, match="died"):
        result.get(timeout=T)
    assert result.ready() and not result.successful()
    # The nanny restarts the workers, the initializer runs in the new ones, the pool carries on.
    pool.client.wait_for_workers(SESSION_WORKERS, timeout=T)
    assert set(pool.client.run(tasks.get_init_value).values()) == {"set"}
    assert pool.map(tasks.get_init_value, range(4), chunksize=1) == ["set"] * 4


def test_timeout_fails_the_task_when_its_limit_passes(make_pool):
    pool = make_pool()
    # The task would sleep 2 s in C; the error comes at the deadline, before that.
    result = pool.apply_async(tasks.sleep_and_return, (2, "late"), timeout=0.3)
    with pytest.raises(rpool.TaskTimeoutError, match="ran past its time limit of 0.3 s"):
        result.get(timeout=1.5)
    assert pool.apply(tasks.square, (3,), timeout=10) == 9
    assert pool.map(tasks.square, range(6), timeout=10) == [0, 1, 4, 9, 16, 25]
    with pytest.raises(rpool.TaskTimeoutError, match=r"chunk 2 of 3"):
        pool.map(tasks.sleep_and_return, [0.01, 1.5, 0.01], chunksize=1, timeout=0.3)


def test_timeout_stops_python_code_on_the_worker(make_pool):
    pool = make_pool(task_timeout=0.3)
    for _ in range(SESSION_WORKERS):
        with pytest.raises(rpool.TaskTimeoutError):
            pool.apply(dask_tasks.spin_forever)
    # Both single-threaded workers would spin forever had rpool not stopped the loops.
    for _ in range(10):
        pids = pool.map_async(tasks.sleep_getpid, [0.2, 0.2], chunksize=1).get(timeout=T)
        if len(set(pids)) == 2:
            break
    assert len(set(pids)) == 2


def test_borrowed_client_is_never_closed(dask_client):
    pool = rpool.distributed.Pool(dask_client)
    assert pool.client is dask_client
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
    pool.close()
    pool.join()
    with rpool.distributed.Pool(dask_client) as pool:
        pool.apply_async(tasks.sleep_and_return, (0.2,))
    pool.join()
    assert dask_client.status == "running"
    assert dask_client.submit(tasks.square, 5, pure=False).result(timeout=T) == 25


def test_borrowed_client_initializer_is_unregistered(dask_client):
    pool = rpool.distributed.Pool(dask_client, initializer=tasks.set_init_value, initargs=("x",))
    plugins = lambda: dask_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert any(name.startswith("rpool-initializer-") for name in plugins())
    pool.close()
    pool.join()
    assert not any(name.startswith("rpool-initializer-") for name in plugins())


def test_failing_initializer_fails_the_pool_and_leaves_no_plugin(dask_client):
    with pytest.raises(RuntimeError, match="cannot reach its database"):
        rpool.distributed.Pool(dask_client, initializer=tasks.failing_initializer)
    plugins = dask_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert not any(name.startswith("rpool-initializer-") for name in plugins)
    assert dask_client.submit(tasks.square, 4, pure=False).result(timeout=T) == 16


def test_terminate_on_borrowed_client_cancels_queued_tasks(dask_client, tmp_path):
    pool = rpool.distributed.Pool(dask_client)
    results = [pool.apply_async(dask_tasks.sleep_then_touch, (str(tmp_path), str(i), 0.5)) for i in range(8)]
    results[0].wait(timeout=T)
    pool.terminate()
    done_before = len(list(tmp_path.iterdir()))
    pool.join()
    terminated = 0
    for r in results:
        try:
            r.get(timeout=0)
        except rpool.PoolTerminatedError:
            terminated += 1
    assert terminated >= 4
    # Tasks that were running finish on their own (Dask cannot stop them), the queued ones never
    # start: uncancelled, all 8 would have run within 2 s on the 2 workers.
    time.sleep(2.5)
    assert len(list(tmp_path.iterdir())) <= done_before + SESSION_WORKERS < 8


def _listening_addresses():
    import psutil

    me = psutil.Process()
    addresses = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def test_default_pool_owns_a_loopback_cluster_and_stops_its_work():
    import urllib.error
    import urllib.request

    with rpool.distributed.Pool(processes=1) as pool:
        client = pool.client
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
        assert _listening_addresses() == {"127.0.0.1"}
        # The scheduler's HTTP server answers health checks, and has no dashboard.
        http = f"http://127.0.0.1:{info['services']['dashboard']}"
        assert urllib.request.urlopen(f"{http}/health", timeout=T).status == 200
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{http}/status", timeout=T)
        assert pool.apply(tasks.square, (3,)) == 9
        worker_pid = pool.apply(tasks.getpid)
        busy = pool.apply_async(tasks.sleep_and_return, (60, "never"))
        time.sleep(0.3)
        start = time.monotonic()
    assert time.monotonic() - start < 15
    with pytest.raises(rpool.PoolTerminatedError):
        busy.get(timeout=0)
    assert client.status == "closed"
    deadline = time.monotonic() + T
    while _alive(worker_pid):
        assert time.monotonic() < deadline, "the owned cluster's worker outlived terminate()"
        time.sleep(0.1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pool_left_open_at_exit_is_terminated_quietly(tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(
        "import rpool.distributed, tasks\n"
        "if __name__ == '__main__':\n"
        "    pool = rpool.distributed.Pool(processes=1)\n"
        "    print(pool.apply(tasks.square, (7,)))\n"
        "    pending = pool.apply_async(tasks.sleep_and_return, (60,))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=T, env=env, cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, "49\n"), out.stderr
    assert "Traceback" not in out.stderr and " ERROR " not in out.stderr, out.stderr


# --------------------------------------------------------------- a cluster started with the dask CLI
@pytest.fixture
def cli_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1; the scheduler address."""
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    loopback = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    commands = [[sys.executable, "-m", "dask", "scheduler", "--port", "0", *loopback, "--scheduler-file", str(scheduler_file)]]
    commands += [
        [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file), *loopback,
         "--nthreads", "1", "--no-nanny", "--name", f"cli-worker-{n}", "--death-timeout", "60"]
        for n in (1, 2)
    ]
    procs = []
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + T
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            assert procs[0].poll() is None, "dask scheduler exited"
            time.sleep(0.1)
        import json

        for _ in range(50):
            try:
                address = json.loads(scheduler_file.read_text())["address"]
                break
            except ValueError:
                time.sleep(0.1)
        yield address, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=T)


def test_pool_by_address_on_dask_cli_cluster(cli_cluster):
    address, procs = cli_cluster
    assert address.startswith("tcp://127.0.0.1:")
    with rpool.distributed.Pool(address, initializer=tasks.set_init_value, initargs=("cli",)) as pool:
        client = pool.client
        client.wait_for_workers(2, timeout=T)
        assert set(client.run(tasks.get_init_value).values()) == {"cli"}
        assert len(set(pool.map(dask_tasks.worker_address, range(40), chunksize=1))) == 2
        offset = 100
        assert pool.map(lambda x: x + offset, range(5)) == [100, 101, 102, 103, 104]
        assert list(pool.imap(tasks.square, range(5))) == [0, 1, 4, 9, 16]
        seen = []
        assert pool.apply_async(tasks.square, (4,), callback=seen.append).get(timeout=T) == 16
        assert seen == [16]
    assert client.status == "closed"
    assert all(proc.poll() is None for proc in procs), "the pool must not stop a cluster it does not own"
