"""IPRouteKernel against a real kernel, in a network namespace of the test's own."""

from __future__ import annotations

import errno
import subprocess

import pytest
import trio

from vpblu.core.model import network
from vpblu.node.kernel.iproute import IPRouteKernel

TABLE = 4242


@pytest.fixture
def netns(veth_netns: str) -> str:
    """The veth pair up, m0 with an address: its routes live as long as it is up."""
    for argv in (["link", "set", "m1", "up"], ["link", "set", "m0", "up"],
                 ["address", "add", "10.91.0.1/32", "dev", "m0"]):
        subprocess.run(["ip", "-n", veth_netns, *argv], check=True)
    return veth_netns


def _table(netns: str) -> str:
    return subprocess.run(["ip", "-n", netns, "route", "show", "table", str(TABLE)],
                          check=True, capture_output=True, text=True).stdout


async def test_deleting_a_route_the_kernel_already_dropped_is_done_not_an_error(
        netns: str) -> None:
    kernel = IPRouteKernel(netns=netns)
    cidr = network("10.92.0.0/24")
    await kernel.add_route(TABLE, "m0", cidr)
    assert "10.92.0.0/24 dev m0" in _table(netns)
    with pytest.raises(OSError) as exists:
        await kernel.add_route(TABLE, "m0", cidr)
    assert exists.value.errno == errno.EEXIST  # other refusals still are errors
    # A leaving node's interface down: the kernel drops its routes itself.
    await trio.run_process(["ip", "-n", netns, "link", "set", "m0", "down"])
    assert "10.92.0.0/24" not in _table(netns)
    await kernel.delete_route(TABLE, "m0", cidr)  # ESRCH from the kernel: already gone
    assert "10.92.0.0/24" not in _table(netns)
