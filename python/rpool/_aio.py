"""asyncio support: wait for a result slot on the event loop, without a thread per wait.

Each event loop gets one non-blocking eventfd. A job that someone awaits is given a duplicate of
it (`Job.add_waker`); the core writes to it whenever a part finishes or the job becomes ready,
so the loop wakes up, reads it and re-checks the conditions it is waiting for.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._rpool import Job

if TYPE_CHECKING:
    import asyncio

# asyncio itself is imported by `until`, on first use: most programs never await a result, and
# importing it would add tens of milliseconds to every `import rpool` (and every worker's start).

_tokens = itertools.count(1)
_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()


class _LoopWaker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.token = next(_tokens)
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._reading = False
        weakref.finalize(self, os.close, self.fd)

    def wait(self, job: Job, condition: Callable[[], bool]) -> asyncio.Future[None]:
        loop = self._live_loop()
        future = loop.create_future()
        # Registered before the check: a change after it writes to the eventfd.
        job.add_waker(self.token, self.fd)
        if condition():
            future.set_result(None)
            return future
        self._waiters.append((condition, future))
        if not self._reading:
            loop.add_reader(self.fd, self._on_wake)
            self._reading = True
        return future

    def _live_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("rpool: the event loop is gone")
        return loop

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        waiting = []
        for condition, future in self._waiters:
            if future.done():  # the awaiting task was cancelled
                continue
            if condition():
                future.set_result(None)
            else:
                waiting.append((condition, future))
        self._waiters = waiting
        if not waiting:
            self._live_loop().remove_reader(self.fd)
            self._reading = False


def until(job: Job, condition: Callable[[], bool]) -> asyncio.Future[None]:
    """A future of the running loop, done once `condition()` holds; `job` says when to re-check."""
    import asyncio

    loop = asyncio.get_running_loop()
    waker = _wakers.get(loop)
    if waker is None:
        waker = _wakers[loop] = _LoopWaker(loop)
    return waker.wait(job, condition)
