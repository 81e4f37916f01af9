"""A joblib parallel backend that runs `joblib.Parallel` on an `rpool.Pool`.

    import rpool.joblib
    rpool.joblib.register()
    with joblib.parallel_config(backend="rpool"):
        joblib.Parallel(n_jobs=2)(joblib.delayed(f)(i) for i in range(10))

joblib is optional: `pip install rpool[joblib]`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

try:
    import joblib as _joblib  # type: ignore[import-untyped, unused-ignore]
    from joblib.parallel import ParallelBackendBase as _ParallelBackendBase  # type: ignore[import-untyped, unused-ignore]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rpool.joblib needs joblib: pip install 'rpool[joblib]'") from exc

from .pool import Pool

__all__ = ["RpoolBackend", "register"]


class _Outcome(NamedTuple):
    ok: bool
    value: Any


class RpoolBackend(_ParallelBackendBase):  # type: ignore[misc, unused-ignore]
    """Runs joblib's batches of calls as `apply_async` tasks on an `rpool.Pool`.

    Keyword arguments given to `parallel_config(backend="rpool", ...)` go to `rpool.Pool`
    (for example `maxtasksperchild`).
    """

    supports_retrieve_callback = True
    default_n_jobs = 1

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, **pool_options: Any):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **pool_options)
        self._pool: Pool | None = None
        self._n_jobs = 1

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max((os.cpu_count() or 1) + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **options: Any) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        if n_jobs == 1:
            # As joblib's process backends: one job runs in the calling process.
            raise _joblib.parallel.FallbackToBackend(_joblib.parallel.SequentialBackend(nesting_level=self.nesting_level))
        # `options` are joblib's memmapping settings (max_nbytes, mmap_mode, ...): rpool does not
        # memory-map arguments, so only the backend's own keywords go to the pool.
        self._n_jobs = n_jobs
        self._pool = Pool(n_jobs, **self.backend_kwargs)
        return n_jobs

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> Any:
        """Run one joblib batch (`func()`); `callback` gets an outcome for `retrieve_result_callback`."""
        if self._pool is None:
            raise RuntimeError("the rpool joblib backend is not configured")
        if callback is None:
            return self._pool.apply_async(func)
        return self._pool.apply_async(
            func,
            callback=lambda value: callback(_Outcome(True, value)),
            error_callback=lambda exc: callback(_Outcome(False, exc)),
        )

    def retrieve_result_callback(self, out: _Outcome) -> Any:
        if out.ok:
            return out.value
        raise out.value

    def terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Kill the running batches; with `ensure_ready`, start a fresh pool for later calls."""
        self.terminate()
        if ensure_ready:
            self.configure(n_jobs=self._n_jobs, parallel=self.parallel)


def register(name: str = "rpool") -> None:
    """Make `name` a joblib backend: `joblib.parallel_config(backend="rpool")`."""
    _joblib.register_parallel_backend(name, RpoolBackend)
