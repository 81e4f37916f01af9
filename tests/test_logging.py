"""Logging: the core's own records under "rpool", and `Pool(forward_logs=True)`, which hands the
records tasks log in workers to the parent's handlers."""

import logging
import os
import time

import pytest

import ecosystem_tasks as T
import rpool
import tasks

METHODS = ("fork", "spawn", "forkserver")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def named(self, prefix):
        return [r for r in self.records if r.name.startswith(prefix)]


@pytest.fixture
def collect():
    handler = Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.getLogger("ecosystem.task").setLevel(logging.NOTSET)


def make_pool(method, **kwargs):
    return rpool.get_context(method).Pool(2, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_a_task_record_reaches_the_parent_before_its_result(collect, method):
    with make_pool(method, forward_logs=True) as pool:
        for x in range(5):
            assert pool.apply(T.log_and_return, (x,)) == x
            # No waiting: the record was handled before the result was delivered.
            records = collect.named("ecosystem.task")
            assert len(records) == x + 1, "each record arrives once, before the result"
        pids = set(pool._core.worker_pids())
    record = records[-1]
    assert record.getMessage() == f"task got 4 in {record.process}"
    assert record.process in pids and record.process != os.getpid()
    prefix = {"fork": "Fork", "spawn": "Spawn", "forkserver": "ForkServer"}[method]
    assert record.processName.startswith(f"{prefix}PoolWorker-")
    assert record.levelno == logging.WARNING


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_map_records_all_arrive_before_map_returns(collect, method):
    with make_pool(method, forward_logs=True) as pool:
        assert pool.map(T.log_and_return, range(40), 3) == list(range(40))
        messages = sorted(int(r.getMessage().split()[2]) for r in collect.named("ecosystem.task"))
    assert messages == list(range(40))


def test_exception_text_and_unpicklable_extras(collect):
    with make_pool("spawn", forward_logs=True) as pool:
        assert pool.apply(T.log_exception) == "logged"
        assert pool.apply(T.log_with_unpicklable_extra) == "logged"
    failed, extra = collect.named("ecosystem.task")
    assert failed.levelno == logging.ERROR and "ZeroDivisionError" in failed.exc_text
    assert "ZeroDivisionError" in logging.Formatter().format(failed)
    assert extra.getMessage() == "with extra" and "lock" in extra.lock_object


def test_records_from_task_threads_and_the_initializer(collect):
    with make_pool("fork", forward_logs=True, initializer=T.log_in_initializer) as pool:
        assert pool.apply(T.log_from_thread) == "done"
        assert [r.getMessage() for r in collect.named("ecosystem.thread")] == ["from a thread"]
        pool.close()
        pool.join()
    inits = collect.named("ecosystem.init")
    assert len(inits) == 2 and len({r.process for r in inits}) == 2


def test_parent_levels_decide(collect):
    with make_pool("fork", forward_logs=True) as pool:
        pool.apply(T.log_and_return, (1, logging.DEBUG))  # below the root level when the pool was made
        logging.getLogger("ecosystem.task").setLevel(logging.ERROR)
        pool.apply(T.log_and_return, (2,))  # the parent's logger now drops warnings
        logging.getLogger("ecosystem.task").setLevel(logging.NOTSET)
        pool.apply(T.log_and_return, (3,))
    assert [r.getMessage().split()[2] for r in collect.named("ecosystem.task")] == ["3"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_without_forward_logs_nothing_comes_back(collect, method):
    with make_pool(method) as pool:
        assert pool.apply(T.log_and_return, (1,)) == 1
    assert collect.named("ecosystem") == []


def test_executor_passes_forward_logs_on(collect):
    with rpool.ProcessPoolExecutor(1, forward_logs=True) as executor:
        assert executor.submit(T.log_and_return, 7).result(timeout=30) == 7
    assert len(collect.named("ecosystem.task")) == 1


def test_worker_lifecycle_is_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="rpool")
    with make_pool("fork") as pool:
        pid = tasks.kill_a_worker_and_wait_for_its_replacement(pool)
        time.sleep(0.1)
    rpool_records = [r for r in caplog.records if r.name == "rpool"]
    started = [r for r in rpool_records if r.levelno == logging.DEBUG and "started worker" in r.getMessage()]
    assert len(started) >= 3, "two workers and the replacement"
    died = [r for r in rpool_records if r.levelno == logging.WARNING and f"(pid {pid})" in r.getMessage()]
    assert died and "SIGKILL" in died[0].getMessage() and "starting a replacement" in died[0].getMessage()


def test_a_level_set_after_an_earlier_pool_applies_to_the_next(caplog):
    # caplog puts the "rpool" logger's level back afterwards.
    caplog.set_level(logging.WARNING, logger="rpool")
    with make_pool("fork") as pool:  # the core caches "rpool: DEBUG is off" here
        pool.apply(os.getpid)
    pool.join()
    caplog.set_level(logging.DEBUG, logger="rpool")
    with make_pool("fork") as pool:
        pool.apply(os.getpid)
    started = [r for r in caplog.records if r.name == "rpool" and "started worker" in r.getMessage()]
    assert len(started) == 2


def test_a_program_that_never_imported_logging_still_sees_the_cores_warnings(script_env):
    """The core starts Python's logging only when the program uses it, or for its first warning:
    a warning must still reach stderr (logging's last-resort handler), debug records not."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, rpool, tasks
        assert "logging" not in sys.modules
        with rpool.get_context("fork").Pool(1) as pool:
            pid = tasks.kill_a_worker_and_wait_for_its_replacement(pool)
        print(pid)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=script_env)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[-1])
    assert f"(pid {pid})" in proc.stderr and "SIGKILL" in proc.stderr
    assert "started worker" not in proc.stderr
