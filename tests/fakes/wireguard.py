"""In-memory stand-ins for the rotation seams: WireGuard devices and the mesh table.

`FakeWireGuardDevices` (a `WireGuardBackend`) applies `DeviceUpdate`s the way the
kernel and wireguard-go do (peers keyed by public key, updates in order, a keepalive
switched on from 0 "sends" a keepalive that completes a handshake when `answering`
is true) and records every call in `log`, so tests can assert order.
`FakeMeshRoutes` is a dict per table.
"""

from __future__ import annotations

import attrs
import trio

from vpblu.core.model import IPNetwork
from vpblu.node.kernel.wireguard import (
    BackendStatistics,
    DeviceState,
    DeviceUpdate,
    PeerConfig,
    public_key_of,
)


@attrs.define
class FakeDevice:
    private_key: bytes | None = attrs.field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, PeerConfig] = attrs.Factory(dict)


class FakeWireGuardDevices:
    def __init__(self, log: list[str], *, answering: bool = True) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.log = log
        self.answering = answering
        self.writes = 0

    @property
    def name(self) -> str:
        return "fake"

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(reads=0, writes=self.writes)

    async def exists(self, interface: str) -> bool:
        return interface in self.devices

    async def ensure_interface(self, interface: str) -> bool:
        if interface in self.devices:
            return False
        self.devices[interface] = FakeDevice()
        self.log.append(f"create {interface}")
        return True

    async def read(self, interface: str) -> DeviceState:
        dev = self.devices[interface]
        public = None if dev.private_key is None else public_key_of(dev.private_key)
        return DeviceState(public, dev.listen_port, dev.fwmark, tuple(dev.peers.values()))

    async def write(self, interface: str, update: DeviceUpdate) -> None:
        dev = self.devices[interface]
        self.writes += 1
        parts = []
        if update.private_key is not None and update.private_key != dev.private_key:
            dev.private_key = update.private_key
            parts.append("key")
        if update.listen_port is not None:
            dev.listen_port = update.listen_port
        if update.fwmark is not None:
            dev.fwmark = update.fwmark
        for change in update.peers:
            old = dev.peers.get(change.public_key)
            if change.remove:
                dev.peers.pop(change.public_key, None)
                parts.append(f"-{change.public_key[:4]}")
                continue
            peer = old or PeerConfig(change.public_key)
            peer = attrs.evolve(
                peer,
                endpoint=change.endpoint or peer.endpoint,
                allowed_ips=peer.allowed_ips if change.allowed_ips is None else change.allowed_ips,
            )
            if change.persistent_keepalive is not None:
                switched_on = peer.persistent_keepalive == 0 and change.persistent_keepalive > 0
                peer = attrs.evolve(peer, persistent_keepalive=change.persistent_keepalive)
                if switched_on and self.answering:
                    peer = attrs.evolve(peer, latest_handshake=trio.current_time() + 1.0)
            dev.peers[change.public_key] = peer
            parts.append(f"+{change.public_key[:4]}")
        self.log.append(f"write {interface} {' '.join(parts)}".rstrip())

    async def delete_interface(self, interface: str) -> None:
        self.devices.pop(interface, None)
        self.log.append(f"delete {interface}")


class FakeMeshRoutes:
    def __init__(self, log: list[str]) -> None:
        self.tables: dict[int, dict[IPNetwork, str]] = {}
        self.mtu: dict[str, int] = {}
        self.log = log

    async def read(self, table: int) -> dict[IPNetwork, str]:
        return dict(self.tables.get(table, {}))

    async def replace(self, table: int, cidr: IPNetwork, interface: str) -> None:
        self.tables.setdefault(table, {})[cidr] = interface
        self.log.append(f"route {cidr} {interface}")

    async def link_mtu(self, interface: str) -> int:
        return self.mtu.get(interface, 1420)

    async def link_up(self, interface: str, mtu: int) -> None:
        self.mtu[interface] = mtu
