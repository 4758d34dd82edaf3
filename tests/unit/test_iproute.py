"""The pyroute2 adapter turns the kernel's refusals into OSError, and keeps
one IPRoute on one thread for the daemon's namespace.

pyroute2's NetlinkError is not an OSError: before this, an EEXIST from the
kernel (a RoutePolicy route colliding with the mesh table's own default)
escaped the NetlinkActor's `except OSError` and crashed it, instead of being
reported in the apply's ack.
"""

from __future__ import annotations

import errno
import gc
import threading
from typing import Any

import pytest
import trio
from pyroute2.netlink.exceptions import NetlinkError

from vpblu.node.kernel import iproute
from vpblu.node.kernel.iproute import IPRouteKernel


@pytest.mark.parametrize(("error", "message"), [
    (NetlinkError(errno.EEXIST, "File exists"), "netlink: File exists"),
    (NetlinkError(errno.ENETUNREACH), "netlink: Network is unreachable"),
])
async def test_a_netlink_refusal_is_an_os_error_with_the_kernel_s_errno(
        error: NetlinkError, message: str) -> None:
    def refused(ipr: Any) -> None:
        raise error

    kernel = IPRouteKernel()
    with pytest.raises(OSError) as raised:
        await kernel._call(refused)
    await kernel.aclose()
    assert raised.value.errno == error.code
    assert str(raised.value) == f"[Errno {error.code}] {message}"
    assert raised.value.__cause__ is error


async def test_other_errors_pass_unchanged() -> None:
    def broken(ipr: Any) -> None:
        raise KeyError("attrs")

    kernel = IPRouteKernel()
    with pytest.raises(KeyError):
        await kernel._call(broken)
    await kernel.aclose()


def _netlink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vpblu-netlink"]


async def test_calls_share_one_thread_and_one_iproute_until_closed() -> None:
    """In the daemon's own namespace, one IPRoute serves call after call (a
    new one per call cost as much CPU as the call), on one thread, until
    `aclose`; the next call then starts again."""
    kernel = IPRouteKernel()
    seen: list[tuple[int, Any]] = []

    def who(ipr: Any) -> bool:
        seen.append((threading.get_ident(), ipr))
        return bool(ipr.link_lookup(ifname="lo"))

    assert await kernel._call(who) and await kernel._call(who)
    assert await kernel.link_state("lo") is True
    (t1, ipr1), (t2, ipr2) = seen
    assert t1 == t2 != threading.get_ident() and ipr1 is ipr2
    assert len(_netlink_threads()) == 1
    await kernel.aclose()
    assert not _netlink_threads()
    assert await kernel._call(who)
    assert seen[-1][1] is not ipr1
    await kernel.aclose()
    gc.collect()  # an unclosed socket or loop would warn here, and warnings are errors
    assert not _netlink_threads()


async def test_an_error_that_is_not_the_kernel_s_refusal_starts_a_new_iproute() -> None:
    kernel = IPRouteKernel()
    made: list[Any] = []

    def broken(ipr: Any) -> None:
        made.append(ipr)
        raise KeyError("attrs")

    def refused(ipr: Any) -> None:
        made.append(ipr)
        raise NetlinkError(errno.EEXIST, "File exists")

    try:
        with pytest.raises(OSError):
            await kernel._call(refused)
        with pytest.raises(OSError):
            await kernel._call(refused)
        with pytest.raises(KeyError):
            await kernel._call(broken)
        with pytest.raises(KeyError):
            await kernel._call(broken)
    finally:
        await kernel.aclose()
    assert made[0] is made[1] is made[2] and made[3] is not made[2]


async def test_an_idle_netlink_thread_ends_and_the_next_call_starts_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iproute, "IDLE_SECONDS", 0.05)
    kernel = IPRouteKernel()
    assert await kernel.link_state("lo") is True
    (thread,) = _netlink_threads()
    await trio.to_thread.run_sync(thread.join, 5.0)
    assert not thread.is_alive()
    assert await kernel.link_state("lo") is True
    await kernel.aclose()
    assert not _netlink_threads()
