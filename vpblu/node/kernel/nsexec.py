"""Run kernel calls inside a named network namespace.

Owns nothing but the switch of one worker thread into a network namespace and
back. The daemon in production runs in the host namespace (``netns=None``); the
end-to-end tests run one daemon per namespace in one process, so every kernel
adapter takes an optional namespace name and does its work through here.

Must never leave a thread in a foreign namespace, and never fork: pyroute2's own
``netns=`` support forks a helper process, which is unsafe in a threaded trio
program and leaks sockets.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

T = TypeVar("T")

NETNS_RUN_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000

# os.setns arrives in Python 3.12; the daemon runs on 3.11.
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call `fn` on this thread inside `netns` (None: where we are), then switch back."""
    if netns is None:
        return fn()
    # setns(CLONE_NEWNET) changes only the calling thread, and sockets keep the
    # namespace they were created in: everything `fn` opens lives in `netns`.
    with (
        open(NETNS_RUN_DIR / netns, "rb") as target,
        open("/proc/thread-self/ns/net", "rb") as home,
    ):
        _setns(target.fileno())
        try:
            return fn()
        finally:
            _setns(home.fileno())


async def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run the blocking `fn` on a worker thread inside `netns`.

    pyroute2's sync classes cannot be created on the trio thread once
    trio_asyncio is imported (STACK.md), so they always go to a thread.
    """
    return await trio.to_thread.run_sync(call_in_netns, netns, fn)


def command_prefix(netns: str | None) -> list[str]:
    """The argv prefix that runs a command inside `netns`."""
    return [] if netns is None else ["ip", "netns", "exec", netns]
