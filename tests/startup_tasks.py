"""Tasks for test_startup.py: this module imports nothing, so that a worker running them has
imported only what rpool itself imports."""


def identity_after_find_spec():
    """The worker's identity in multiprocessing, first looked up (not imported) through importlib."""
    import importlib.util
    import sys

    assert "multiprocessing" not in sys.modules
    assert importlib.util.find_spec("multiprocessing") is not None
    import multiprocessing

    me = multiprocessing.current_process()
    return [me.name, list(me._identity), bytes(me.authkey).hex(), multiprocessing.get_start_method(), me._inheriting]
