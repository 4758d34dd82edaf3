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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio_asyncio


def log_only(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own default: log the report (with its traceback), nothing more."""
    asyncio.BaseEventLoop.default_exception_handler(loop, context)  # type: ignore[arg-type]


@asynccontextmanager
async def open_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """`trio_asyncio.open_loop()` whose exception handler logs instead of raising."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(log_only)
        yield loop
