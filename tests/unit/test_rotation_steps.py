"""The rotation steps' ordering guards and idempotency, on fake devices and routes.
(That the order loses no packet is proven on real wireguard-go in
tests/e2e/test_rotation_mechanism.py.)"""

from __future__ import annotations

import ipaddress
import re

import pytest
import trio

from tests.fakes.wireguard import FakeMeshRoutes, FakeWireGuardDevices
from vpblu.core.model import Endpoint
from vpblu.node.kernel.wireguard import DeviceUpdate, PeerUpdate
from vpblu.node.kernel.wireguard import public_key_of as pub
from vpblu.node.rotation import (
    PREWARM_TIMEOUT,
    BridgeLayout,
    RotationError,
    activate_rotating_node,
    distribute_to_peer,
    prepare_rotating_node,
    retire_peer_bridge,
    roll_back_rotating_node,
    switch_peer_primary,
)

TABLE = 5182
LAYOUT = BridgeLayout.for_primary("wg-mesh", 51820, TABLE, 0xB20000)
R_OLD, R_NEW, P_KEY, Q_KEY = (bytes([i]) * 32 for i in (1, 2, 3, 4))
R_CIDR = ipaddress.ip_network("10.1.0.0/24")
Q_CIDR = ipaddress.ip_network("10.3.0.0/24")


async def peer_node(log: list[str]) -> tuple[FakeWireGuardDevices, FakeMeshRoutes]:
    """A peer P whose primary holds R's old key for R_CIDR and another peer Q."""
    devices, routes = FakeWireGuardDevices(log), FakeMeshRoutes(log)
    await devices.ensure_interface("wg-mesh")
    await devices.write(
        "wg-mesh",
        DeviceUpdate(
            private_key=P_KEY,
            listen_port=51820,
            peers=(
                PeerUpdate(
                    pub(R_OLD), endpoint=Endpoint("192.0.2.1", 51820), allowed_ips=(R_CIDR,)
                ),
                PeerUpdate(
                    pub(Q_KEY), endpoint=Endpoint("192.0.2.3", 51820), allowed_ips=(Q_CIDR,)
                ),
            ),
        ),
    )
    await routes.replace(TABLE, R_CIDR, "wg-mesh")
    await routes.replace(TABLE, Q_CIDR, "wg-mesh")
    log.clear()
    return devices, routes


async def test_distribute_builds_a_bridge_to_the_new_key_and_moves_only_its_prefixes() -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)
    await distribute_to_peer(devices, routes, LAYOUT, P_KEY, pub(R_OLD), pub(R_NEW))
    bridge = await devices.read("wg-mesh-rot")
    assert bridge.public_key == pub(P_KEY) and bridge.listen_port == 51821
    entry = bridge.peer(pub(R_NEW))
    assert entry is not None and entry.allowed_ips == (R_CIDR,)
    assert entry.endpoint == Endpoint("192.0.2.1", 51821) and entry.latest_handshake > 0
    assert await routes.read(TABLE) == {R_CIDR: "wg-mesh-rot", Q_CIDR: "wg-mesh"}
    # The handshake comes before the route: nothing is sent on an unwarmed path.
    assert log.index(f"route {R_CIDR} wg-mesh-rot") > max(
        i for i, line in enumerate(log) if line.startswith("write wg-mesh-rot")
    )
    # The primary still accepts the old key.
    assert (await devices.read("wg-mesh")).peer(pub(R_OLD)) is not None


async def test_switch_swaps_the_entry_in_one_write_and_a_rerun_writes_nothing() -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)
    await distribute_to_peer(devices, routes, LAYOUT, P_KEY, pub(R_OLD), pub(R_NEW))
    log.clear()
    await switch_peer_primary(devices, routes, LAYOUT, pub(R_OLD), pub(R_NEW))
    assert log[0] == f"write wg-mesh -{pub(R_OLD)[:4]} +{pub(R_NEW)[:4]}"
    primary = await devices.read("wg-mesh")
    new = primary.peer(pub(R_NEW))
    assert primary.peer(pub(R_OLD)) is None and new is not None
    assert new.allowed_ips == (R_CIDR,) and new.endpoint == Endpoint("192.0.2.1", 51820)
    assert (await routes.read(TABLE))[R_CIDR] == "wg-mesh"
    log.clear()
    await switch_peer_primary(devices, routes, LAYOUT, pub(R_OLD), pub(R_NEW))
    assert log == []


async def test_a_bridge_that_still_carries_a_route_is_not_deleted() -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)
    await distribute_to_peer(devices, routes, LAYOUT, P_KEY, pub(R_OLD), pub(R_NEW))
    with pytest.raises(RotationError, match=re.escape("10.1.0.0/24")):
        await retire_peer_bridge(devices, routes, LAYOUT)
    assert await devices.exists("wg-mesh-rot")


async def test_activate_moves_every_route_before_it_rekeys_the_primary() -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)  # reuse the shape: a node with two routed peers
    await devices.write("wg-mesh", DeviceUpdate(private_key=R_OLD))
    await prepare_rotating_node(devices, routes, LAYOUT, R_NEW)
    log.clear()
    await activate_rotating_node(devices, routes, LAYOUT, R_NEW)
    assert log[-1] == "write wg-mesh key"
    assert set((await routes.read(TABLE)).values()) == {"wg-mesh-rot"}
    assert (await devices.read("wg-mesh")).public_key == pub(R_NEW)
    # Rolling back gives the idle primary K again and brings the routes home.
    await roll_back_rotating_node(devices, routes, LAYOUT, R_OLD)
    assert (await devices.read("wg-mesh")).public_key == pub(R_OLD)
    assert set((await routes.read(TABLE)).values()) == {"wg-mesh"}


async def test_prepare_refuses_a_staged_key_equal_to_the_active_one() -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)
    with pytest.raises(RotationError):
        await prepare_rotating_node(devices, routes, LAYOUT, P_KEY)


async def test_no_route_moves_onto_a_bridge_that_never_handshakes(autojump_clock: object) -> None:
    log: list[str] = []
    devices, routes = await peer_node(log)
    devices.answering = False
    start = trio.current_time()
    with pytest.raises(RotationError, match="no handshake"):
        await distribute_to_peer(devices, routes, LAYOUT, P_KEY, pub(R_OLD), pub(R_NEW))
    assert trio.current_time() - start == pytest.approx(PREWARM_TIMEOUT, abs=0.1)
    assert (await routes.read(TABLE))[R_CIDR] == "wg-mesh"
