"""The pyroute2 adapter turns the kernel's refusals into OSError.

pyroute2's NetlinkError is not an OSError: before this, an EEXIST from the
kernel (a RoutePolicy route colliding with the mesh table's own default)
escaped the NetlinkActor's `except OSError` and crashed it, instead of being
reported in the apply's ack.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from vpblu.node.kernel.iproute import IPRouteKernel


@pytest.mark.parametrize(("error", "message"), [
    (NetlinkError(errno.EEXIST, "File exists"), "netlink: File exists"),
    (NetlinkError(errno.ENETUNREACH), "netlink: Network is unreachable"),
])
async def test_a_netlink_refusal_is_an_os_error_with_the_kernel_s_errno(
        error: NetlinkError, message: str) -> None:
    def refused(ipr: Any) -> None:
        raise error

    with pytest.raises(OSError) as raised:
        await IPRouteKernel()._call(refused)
    assert raised.value.errno == error.code
    assert str(raised.value) == f"[Errno {error.code}] {message}"
    assert raised.value.__cause__ is error


async def test_other_errors_pass_unchanged() -> None:
    def broken(ipr: Any) -> None:
        raise KeyError("attrs")

    with pytest.raises(KeyError):
        await IPRouteKernel()._call(broken)
