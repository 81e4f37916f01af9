"""Progress bars for the map family: a tqdm bar that advances, in the parent, as tasks end.

An `rpool-progress` thread waits on the job's result slot (`Job.wait_finished`, no polling) and
reads which parts finished since it last looked (`Job.finished_parts`); a part is a chunk, so
the bar advances by the chunk's number of items. tqdm is optional (`pip install rpool[progress]`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union


class ProgressBar(Protocol):
    """What rpool needs of a bar: tqdm's `update`, `close` and `total`."""

    total: Any

    def update(self, n: float | None = ...) -> bool | None: ...

    def close(self) -> None: ...


#: `progress=` takes True (a new tqdm bar), a tqdm instance, or keyword arguments for `tqdm()`.
Progress = Union[bool, ProgressBar, Mapping[str, Any], None]

_MISSING_TQDM = 'progress bars need tqdm, which is not installed: pip install "rpool[progress]"'


def _new_bar(total: int | None, desc: str | None, options: Mapping[str, Any]) -> ProgressBar:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_MISSING_TQDM, name="tqdm") from exc
    bar: ProgressBar = tqdm(**{"total": total, "desc": desc, **options})
    return bar


def open_bar(progress: Progress, total: int | None, desc: str | None) -> tuple[ProgressBar, bool] | None:
    """The bar for `progress=` and whether rpool owns it (closes it when done); None for no bar."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return _new_bar(total, desc, {}), True
    if isinstance(progress, Mapping):
        return _new_bar(total, desc, progress), True
    if callable(getattr(progress, "update", None)) and callable(getattr(progress, "close", None)):
        # The caller's bar: count into it, leave it open, and fill in a total it does not have.
        if getattr(progress, "total", None) is None and total is not None:
            progress.total = total
        return progress, False
    raise TypeError(
        "progress must be True, a tqdm instance or a dict of tqdm keyword arguments, "
        f"not {type(progress).__name__}"
    )


class Tracker:
    """Advances `bar` by each finished part's number of items until the job is complete.

    `sizes[part]` is that number (it may grow while `imap` reads its input); None means one item
    per part. `finish()` catches up and closes an owned bar; it runs on whichever thread sees the
    job complete first (the watcher, `get()`/`wait()`, or the end of an `imap` iteration).
    """

    def __init__(self, job: Any, bar: ProgressBar, owned: bool, sizes: Sequence[int] | None) -> None:
        self._job = job
        self._bar = bar
        self._owned = owned
        self._sizes = sizes
        self._seen = 0
        self._done = False
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="rpool-progress", daemon=True).start()

    def _watch(self) -> None:
        job = self._job
        while not self._done:
            job.wait_finished(self._seen, 1.0)
            self._advance()
            total = job.total()
            if total is not None and self._seen >= total:
                self.finish()

    def _advance(self) -> None:
        with self._lock:
            if self._done:
                return
            parts = self._job.finished_parts(self._seen)
            if not parts:
                return
            self._seen += len(parts)
            sizes = self._sizes
            self._bar.update(len(parts) if sizes is None else sum(sizes[p] for p in parts))

    def finish(self) -> None:
        """The job is complete: count what is left, close the bar if rpool opened it."""
        self._advance()
        with self._lock:
            if self._done:
                return
            self._done = True
        bar = self._bar
        if getattr(bar, "total", 0) is None:
            sizes = self._sizes
            bar.total = self._seen if sizes is None else sum(sizes)
        if self._owned:
            bar.close()
