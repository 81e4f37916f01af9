"""`progress=` on the map family: a real tqdm bar, read back through its count."""

import io
import sys
import time

import pytest
from tqdm import tqdm

import ecosystem_tasks as T
import rpool

METHODS = ("fork", "spawn")


@pytest.fixture(params=METHODS)
def pool(request):
    with rpool.get_context(request.param).Pool(2) as pool:
        yield pool
    pool.join()


def quiet_bar(**kwargs):
    return tqdm(file=io.StringIO(), **kwargs)


@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_counts_every_item(pool, chunksize):
    bar = quiet_bar()
    assert pool.map(T.square, range(123), chunksize, progress=bar) == [x * x for x in range(123)]
    assert (bar.n, bar.total) == (123, 123)


def test_starmap_and_async_forms(pool):
    bar = quiet_bar()
    assert pool.starmap(pow, [(2, 3)] * 10, 3, progress=bar) == [8] * 10
    assert bar.n == 10
    bar = quiet_bar()
    assert pool.map_async(T.square, range(50), 4, progress=bar).get(timeout=30) == [x * x for x in range(50)]
    assert bar.n == 50
    bar = quiet_bar()
    assert pool.starmap_async(pow, [(3, 2)] * 9, 2, progress=bar).get(timeout=30) == [9] * 9
    assert bar.n == 9


@pytest.mark.parametrize("chunksize", [1, 4])
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_counts_every_item(pool, method, chunksize):
    bar = quiet_bar()
    results = list(getattr(pool, method)(T.square, range(37), chunksize, progress=bar))
    assert sorted(results) == [x * x for x in range(37)]
    assert (bar.n, bar.total) == (37, 37)


def test_imap_of_a_generator_learns_its_total_at_the_end(pool):
    bar = quiet_bar()
    results = list(pool.imap_unordered(T.square, (x for x in range(25)), chunksize=4, progress=bar))
    assert len(results) == 25
    assert (bar.n, bar.total) == (25, 25)


def test_async_for_counts_too(pool):
    import asyncio

    bar = quiet_bar()

    async def collect():
        return [y async for y in pool.imap(T.square, range(12), progress=bar)]

    assert asyncio.run(collect()) == [x * x for x in range(12)]
    assert bar.n == 12


def test_the_bar_advances_as_tasks_end_not_at_the_end(pool, tmp_path):
    gate = tmp_path / "gate"
    bar = quiet_bar()
    result = pool.starmap_async(T.wait_for_file_on, [(x, str(gate), 19) for x in range(20)], 1, progress=bar)
    # Items 0..18 end at once; the last waits for the gate. The bar must show them meanwhile.
    deadline = time.monotonic() + 20
    while bar.n < 19 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bar.n == 19
    assert not result.ready()
    gate.touch()
    result.get(timeout=30)
    assert bar.n == 20


def test_failed_tasks_count_as_ended(pool):
    bar = quiet_bar()
    with pytest.raises(ValueError, match="three"):
        pool.map(T.fail_on_3, range(10), 1, progress=bar)
    assert bar.n == 10


def test_owned_bar_from_a_dict_is_drawn_and_closed(pool):
    out = io.StringIO()
    pool.map(T.square, range(40), progress={"file": out, "desc": "squares", "ascii": True})
    text = out.getvalue()
    assert "squares" in text and "40/40" in text
    assert text.endswith("\n"), "an owned bar is closed when the map ends"


def test_progress_true_draws_on_stderr(pool, capsys):
    pool.map(T.square, range(30), progress=True)
    err = capsys.readouterr().err
    assert "30/30" in err and "square" in err


def test_a_callers_bar_is_left_open_and_keeps_its_total(pool):
    bar = quiet_bar(total=1000)
    pool.map(T.square, range(10), progress=bar)
    pool.map(T.square, range(15), progress=bar)
    assert (bar.n, bar.total) == (25, 1000)
    assert not bar.disable
    bar.close()


def test_empty_map(pool):
    bar = quiet_bar()
    assert pool.map(T.square, [], progress=bar) == []
    assert bar.n == 0


def test_thread_pool_too():
    bar = quiet_bar()
    with rpool.ThreadPool(3) as pool:
        assert pool.map(lambda x: x + 1, range(100), 9, progress=bar) == list(range(1, 101))
        assert bar.n == 100
        bar = quiet_bar()
        assert len(list(pool.imap_unordered(abs, range(-5, 5), progress=bar))) == 10
        assert bar.n == 10


def test_progress_false_and_none_draw_nothing(pool, capsys):
    pool.map(T.square, range(5), progress=False)
    pool.map(T.square, range(5), progress=None)
    assert capsys.readouterr().err == ""


def test_a_bad_progress_value_is_a_type_error(pool):
    with pytest.raises(TypeError, match="progress must be True, a tqdm instance or a dict"):
        pool.map(T.square, range(5), progress="yes")


def test_without_tqdm_the_error_says_what_to_install(pool, monkeypatch):
    # A None entry in sys.modules makes `import tqdm.auto` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r'pip install "rpool\[progress\]"'):
        pool.map(T.square, range(5), progress=True)
    with pytest.raises(ImportError, match=r"rpool\[progress\]"):
        pool.imap(T.square, range(5), progress={"desc": "x"})
    bar = quiet_bar()
    assert pool.map(T.square, range(5), progress=bar) == [0, 1, 4, 9, 16], "an instance needs no import"


def test_dask_pool_too():
    pytest.importorskip("distributed")
    from rpool.distributed import Pool as DaskPool

    with DaskPool(processes=2) as pool:
        bar = quiet_bar()
        assert pool.map(T.square, range(60), 7, progress=bar) == [x * x for x in range(60)]
        assert bar.n == 60
        bar = quiet_bar()
        assert len(list(pool.imap_unordered(T.square, range(30), 4, progress=bar))) == 30
        assert bar.n == 30


@pytest.mark.parametrize("method", ["imap", "imap_unordered", "map_async"])
def test_a_refused_bar_leaves_nothing_for_close_to_wait_on(method):
    pool = rpool.Pool(1)
    try:
        with pytest.raises(TypeError):
            getattr(pool, method)(T.square, range(3), progress=3.5)
        pool.close()
        pool.join()  # bounded by the test's timeout: an unsealed imap job would hang it
    finally:
        pool.terminate()
