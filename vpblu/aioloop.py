"""The asyncio loop under trio that every vpblu process runs its asyncio
libraries (kubernetes-asyncio, grpclib) on.

trio-asyncio's own loop turns every report to asyncio's exception handler
into an exception raised in the loop's nursery, which ends the whole loop
and everything on it. Libraries report there what plain asyncio only logs:
grpclib's "Unclosed connection" when a Channel is collected unclosed (a
connect whose caller was cancelled the moment it returned), aiohttp's
unclosed sessions, an asyncio task's exception nobody retrieved. In a
benchmark of 1000 simulated daemons under load, one such report ended the
run with 280 of them; in the controller or a daemon it would end the
process and every stream with it. Here they are logged, as asyncio does,
and the loop goes on. Tests keep trio-asyncio's strict loop (tests/conftest.py)
so that a leak still fails them.

Cancelled timers are dropped from the loop's heap. trio-asyncio keeps a
cancelled asyncio timer in its heap until the timer's time comes (its
`_timer_handle_cancelled` does nothing, where asyncio's own loop counts them
and rebuilds the heap once they are half of it), and aiohttp cancels and
re-arms a connection's sock_read timer on every chunk it reads: each chunk of
each Kubernetes watch (WATCH_READ_TIMEOUT, 320 s) and each TLS handshake (60 s)
left a dead timer behind, holding its protocol object, and every timer pushed
or popped walked a heap of them. Profiled at N=1000 (issue 20), 15 % of the
controller's main thread was trio-asyncio's heappop. Here, as asyncio does,
once the cancels since the last rebuild reach half the heap (and at least
MIN_CANCELLED_TO_PURGE), the heap is rebuilt without the cancelled ones:
O(1) per cancel, amortized.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio_asyncio

# Cancels counted before a rebuild of the timer heap is considered (asyncio's
# own loop uses 100 and half of the heap too).
MIN_CANCELLED_TO_PURGE = 100


def log_only(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own default: log the report (with its traceback), nothing more."""
    asyncio.BaseEventLoop.default_exception_handler(loop, context)  # type: ignore[arg-type]


@asynccontextmanager
async def open_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """`trio_asyncio.open_loop()` whose exception handler logs instead of raising."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(log_only)
        TimerPurge(loop).install()
        yield loop


class TimerPurge:
    """Drops cancelled timers from a trio-asyncio loop's heap (see the module
    docstring). Installed as the loop's `_timer_handle_cancelled`, which
    asyncio's TimerHandle.cancel calls for each timer cancelled the first time."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self._loop = loop
        self.cancelled = 0  # cancels since the last rebuild
        self.purges = 0
        self.purged = 0  # cancelled timers dropped, over all rebuilds

    def install(self) -> None:
        self._loop._timer_handle_cancelled = self.cancelled_one

    def cancelled_one(self, handle: asyncio.TimerHandle) -> None:
        self.cancelled += 1
        timers: list[asyncio.TimerHandle] = self._loop._timers
        if self.cancelled < max(MIN_CANCELLED_TO_PURGE, len(timers) // 2):
            return
        if not self._loop.is_running():
            return  # closing: trio-asyncio is cancelling every timer, iterating the heap
        # Runs inside TimerHandle.cancel, before the handle is marked: it is
        # dropped by identity. In place: the loop holds this list. No await
        # here, so the loop never sees the heap half rebuilt.
        kept = [t for t in timers if not t.cancelled() and t is not handle]
        self.purged += len(timers) - len(kept)
        timers[:] = kept
        heapq.heapify(timers)
        self.cancelled = 0
        self.purges += 1
