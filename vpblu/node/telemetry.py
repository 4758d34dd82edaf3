"""KernelTelemetry: the StreamActor's `TelemetrySource` on a real node.

Owns how one telemetry sample is put together: it asks the NetlinkActor
(`ReadMesh`: the interface's peers with their handshakes, bytes and
endpoints, the key in use, the MTU, the fail-closed sink's drops) and the
BpfMapActor (`ReadDataPathCounters`: the programs' counters, the cleartext
guard's among them) by message, names the peers by the applied desired state,
and stamps the sample with the node's wall clock (WireGuard's handshake times
are wall-clock seconds; ages are differences of the two, see
`vpblu.core.health`).

It only reads. An actor that does not answer within `READ_TIMEOUT` (busy with
a long apply or a rotation step, or restarting) costs this sample its part:
no mesh reading means no sample at all (`TelemetryUnavailable`, and the
StreamActor sends a plain heartbeat), no counters means a sample without them.
The actors' messages are imported where they are sent: the daemon makes this
source before its Hello, which waits for none of `vpblu.messages`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from vpblu.core import wire
from vpblu.core.model import NodeDesiredState

if TYPE_CHECKING:
    from vpblu.messages import BpfMapInbox, MeshReading, NetlinkInbox

READ_TIMEOUT = 5.0


class TelemetryUnavailable(Exception):
    """No sample now (the NetlinkActor did not answer)."""


class KernelTelemetry:
    """`vpblu.node.stream.TelemetrySource` over the NetlinkActor and the BpfMapActor."""

    def __init__(
        self,
        netlink: trio.MemorySendChannel[NetlinkInbox],
        datapath: trio.MemorySendChannel[BpfMapInbox],
        *,
        read_timeout: float = READ_TIMEOUT,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._netlink = netlink
        self._datapath = datapath
        self._read_timeout = read_timeout
        self._wall_clock = wall_clock

    async def sample(self, applied: NodeDesiredState | None) -> wire.Telemetry:
        mesh = await self._ask_mesh()
        if mesh is None:
            raise TelemetryUnavailable("the netlink actor did not answer")
        counters = await self._ask_counters()
        if counters is not None:
            counters = wire.DataPathCounters(
                counters.passed, counters.dropped_blocked, counters.delivered,
                counters.delivery_dropped_blocked, counters.guard_cleartext,
                counters.guard_dropped, mesh.fail_closed_drops, counters.guard_attached)
        return wire.Telemetry(
            sampled_at=self._wall_clock(),
            public_key=mesh.public_key,
            key_created=mesh.key_created,
            mtu=mesh.mtu,
            rotation=mesh.rotation,
            peers=peer_columns(mesh, applied),
            datapath=counters,
        )

    async def _ask_mesh(self) -> MeshReading | None:
        from vpblu.messages import MeshReading, ReadMesh

        send, receive = trio.open_memory_channel[MeshReading](1)
        async with send, receive:
            with trio.move_on_after(self._read_timeout):
                await self._netlink.send(ReadMesh(send))
                try:
                    return await receive.receive()
                except trio.EndOfChannel:
                    return None  # it could not read the interface
        return None

    async def _ask_counters(self) -> wire.DataPathCounters | None:
        from vpblu.messages import ReadDataPathCounters

        send, receive = trio.open_memory_channel[wire.DataPathCounters](1)
        async with send, receive:
            with trio.move_on_after(self._read_timeout):
                await self._datapath.send(ReadDataPathCounters(send))
                return await receive.receive()
        return None


def peer_columns(mesh: MeshReading, applied: NodeDesiredState | None) -> wire.PeerColumns:
    """Every peer of the applied state, named, with what the interface shows for
    its key (never handshaked, 0 bytes, when the interface lacks it)."""
    if applied is None:
        return wire.PeerColumns()
    device = {p.public_key: p for p in mesh.peers}
    rows = []
    for peer in applied.peers:
        seen = device.get(peer.public_key)
        if seen is None:
            rows.append(wire.PeerStats(peer.name, 0, 0, 0, ""))
        else:
            rows.append(wire.PeerStats(peer.name, seen.latest_handshake, seen.rx_bytes,
                                       seen.tx_bytes, seen.endpoint))
    return wire.PeerColumns.of(rows)
