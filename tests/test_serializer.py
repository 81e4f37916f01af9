"""`Pool(serializer="cloudpickle")`: lambdas and closures as tasks, with the real cloudpickle."""

import sys
import threading

import pytest

import ecosystem_tasks as T
import rpool

METHODS = ("fork", "spawn", "forkserver")


@pytest.fixture(params=METHODS)
def cloud_pool(request):
    with rpool.get_context(request.param).Pool(2, serializer="cloudpickle") as pool:
        yield pool
    pool.join()


def test_lambdas_and_closures_run(cloud_pool):
    offset = 10

    def local_function(x):
        return x * offset

    assert cloud_pool.map(lambda x: x + offset, range(5)) == [10, 11, 12, 13, 14]
    assert cloud_pool.apply(local_function, (3,)) == 30
    assert cloud_pool.apply(T.make_adder(5), (1,)) == 6
    assert cloud_pool.starmap(lambda a, b: a - b, [(5, 1), (7, 2)]) == [4, 5]
    assert list(cloud_pool.imap(lambda x: -x, range(4), 2)) == [0, -1, -2, -3]
    assert sorted(cloud_pool.imap_unordered(lambda x: x % 3, range(6))) == [0, 0, 1, 1, 2, 2]
    got = []
    cloud_pool.apply_async(lambda: "called back", callback=got.append).get(timeout=30)
    assert got == ["called back"]


def test_a_task_may_return_a_lambda(cloud_pool):
    doubler = cloud_pool.apply(lambda: (lambda y: y * 2))
    assert doubler(21) == 42


def test_plain_data_still_round_trips(cloud_pool):
    assert cloud_pool.map(T.square, range(100), 7) == [x * x for x in range(100)]


def test_task_exceptions_keep_their_type(cloud_pool):
    with pytest.raises(ZeroDivisionError):
        cloud_pool.apply(lambda: 1 / 0)


def test_lambda_initializer_under_spawn():
    marker = "set by a lambda"
    with rpool.get_context("spawn").Pool(1, serializer="cloudpickle", initializer=lambda: setattr(T, "MARK", marker)) as pool:
        assert pool.apply(lambda: T.MARK) == marker


def test_executor_takes_the_serializer():
    with rpool.ProcessPoolExecutor(1, serializer="cloudpickle") as executor:
        assert executor.submit(lambda x: x * 3, 4).result(timeout=30) == 12
        assert list(executor.map(lambda x: x + 1, range(3))) == [1, 2, 3]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_default_pickle_refuses_a_lambda_and_suggests_cloudpickle(method):
    with rpool.get_context(method).Pool(1) as pool:
        with pytest.raises(rpool.UnpicklableTaskError, match=r'serializer="cloudpickle".*rpool\[cloudpickle\]'):
            pool.map(lambda x: x, range(3))
        with pytest.raises(rpool.UnpicklableTaskError, match='serializer="cloudpickle"'):
            pool.apply(T.square, (lambda: 1,))
        with pytest.raises(rpool.UnpicklableTaskError) as caught:
            pool.apply(T.square, (threading.Lock(),))
        assert "cloudpickle" not in str(caught.value), "cloudpickle cannot send a lock either"
        assert pool.apply(T.square, (4,)) == 16


def test_cloudpickle_still_refuses_a_lock(cloud_pool):
    with pytest.raises(rpool.UnpicklableTaskError, match="argument 1") as caught:
        cloud_pool.apply(T.square, (threading.Lock(),))
    assert 'serializer="cloudpickle"' not in str(caught.value)


@pytest.mark.parametrize("bad", ["json", "", None, 1, "Cloudpickle"])
def test_an_unknown_serializer_is_a_value_error(bad):
    with pytest.raises(ValueError, match="serializer must be 'pickle' or 'cloudpickle'"):
        rpool.Pool(1, serializer=bad)


def test_explicit_pickle_is_the_default():
    with rpool.Pool(1, serializer="pickle") as pool:
        assert pool.apply(T.square, (3,)) == 9


def test_without_cloudpickle_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)
    with pytest.raises(ImportError, match=r'pip install "rpool\[cloudpickle\]"'):
        rpool.Pool(1, serializer="cloudpickle")
