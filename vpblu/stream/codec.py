"""Conversion between the warm stream's typed values and their protobuf form.

Owns the mapping of `vpblu.core.wire` and `vpblu.core.model` values onto
`vpblu/stream/proto/mesh.proto`, both ways. Decoding validates everything the model
validates (keys, CIDRs with host bits zero, ports, generations, names), so a
malformed message from the wire stops here as one `ProtocolViolation` naming
what was wrong, never as a crash somewhere past the transport.

Pure: no I/O, no clock, no gRPC. It must never log message contents (they name
nodes and keys; public keys only, but still noise).
"""

from __future__ import annotations

import sys
from typing import TypeVar

from vpblu.core import wire
from vpblu.core.model import (
    BlockAdded,
    BlockRemoved,
    Change,
    CidrPair,
    DataPath,
    DataPathChanged,
    Endpoint,
    ListenPortChanged,
    NodeDesiredState,
    Peer,
    PeerAdded,
    PeerChanged,
    PeerRemoved,
    Route,
    RouteAdded,
    RouteRemoved,
)
from vpblu.stream.proto import mesh_pb2 as pb

MAX_NAME_LEN = 253
# Decoded values are frozen, so equal wire values can share one object. A
# daemon decodes the same peers and routes on every resync and in every delta
# that names them, and the simulated daemons of the benchmark decode each
# other's peers in one process: building a Peer (key check, address parsing,
# sorting) costs ~15 us, finding it by its bytes ~0.4 us. Per process, bounded.
INTERN_LIMIT = 1 << 16


_K = TypeVar("_K")
_V = TypeVar("_V")


class ProtocolViolation(Exception):
    """A message from the other end is malformed or out of place."""


def _name(value: str, what: str) -> str:
    if not value or len(value) > MAX_NAME_LEN:
        raise ProtocolViolation(f"{what}: a node name is 1..{MAX_NAME_LEN} characters, "
                                f"got {value[:MAX_NAME_LEN + 1]!r}")
    return value


# --- values ------------------------------------------------------------------------


def encode_peer(peer: Peer) -> pb.Peer:
    msg = pb.Peer(
        name=peer.name,
        public_key=peer.public_key,
        allowed_ips=[str(n) for n in peer.allowed_ips],
        persistent_keepalive=peer.persistent_keepalive,
    )
    if peer.endpoint is not None:
        msg.endpoint.host = str(peer.endpoint.host)
        msg.endpoint.port = peer.endpoint.port
    return msg


# A Peer is keyed by its own serialized bytes (one C call, where reading its
# six fields through the protobuf wrappers costs ~3x more): equal bytes are
# equal values, and bytes that differ only in encoding just miss. A Route or
# a CidrPair has two strings, read faster than serialized.
_peers: dict[bytes, Peer] = {}
_routes: dict[tuple[str, str], Route] = {}
_blocks: dict[tuple[str, str], CidrPair] = {}
_datapaths: dict[bytes, DataPath] = {}


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    if len(cache) >= INTERN_LIMIT:
        cache.clear()  # a cluster that big, or churn: start over, never grow
    cache[key] = value
    return value


def decode_peer(msg: pb.Peer) -> Peer:
    key = msg.SerializeToString()
    peer = _peers.get(key)
    if peer is not None:
        return peer
    endpoint = msg.endpoint if msg.HasField("endpoint") else None
    return _remember(_peers, key, Peer(
        name=_name(msg.name, "peer name"),
        public_key=msg.public_key,
        endpoint=Endpoint(endpoint.host, endpoint.port) if endpoint is not None else None,
        allowed_ips=tuple(msg.allowed_ips),
        persistent_keepalive=msg.persistent_keepalive,
    ))


def encode_route(route: Route) -> pb.Route:
    return pb.Route(cidr=str(route.cidr), via=route.via)


def decode_route(msg: pb.Route) -> Route:
    key = (msg.cidr, msg.via)
    route = _routes.get(key)
    if route is not None:
        return route
    return _remember(_routes, key, Route(cidr=msg.cidr, via=_name(msg.via, "route via")))


def encode_block(block: CidrPair) -> pb.CidrPair:
    return pb.CidrPair(src=str(block.src), dst=str(block.dst))


def decode_block(msg: pb.CidrPair) -> CidrPair:
    key = (msg.src, msg.dst)
    block = _blocks.get(key)
    if block is not None:
        return block
    return _remember(_blocks, key, CidrPair(src=msg.src, dst=msg.dst))


def encode_datapath(datapath: DataPath) -> pb.DataPath:
    return pb.DataPath(local_cidrs=[str(n) for n in datapath.local_cidrs],
                       cluster_cidrs=[str(n) for n in datapath.cluster_cidrs],
                       fail_open=datapath.fail_open)


def decode_datapath(msg: pb.DataPath) -> DataPath:
    # Every node gets the same cluster ranges, again at every resync: interned.
    key = msg.SerializeToString()
    datapath = _datapaths.get(key)
    if datapath is not None:
        return datapath
    return _remember(_datapaths, key, DataPath(local_cidrs=tuple(msg.local_cidrs),
                                               cluster_cidrs=tuple(msg.cluster_cidrs),
                                               fail_open=msg.fail_open))


def encode_state(state: NodeDesiredState) -> pb.NodeDesiredState:
    return pb.NodeDesiredState(
        node=state.node,
        listen_port=state.listen_port,
        peers=[encode_peer(p) for p in state.peers],
        routes=[encode_route(r) for r in state.routes],
        blocks=[encode_block(b) for b in state.blocks],
        datapath=encode_datapath(state.datapath),
    )


def decode_state(msg: pb.NodeDesiredState) -> NodeDesiredState:
    if not 1 <= msg.listen_port <= 65535:
        raise ProtocolViolation(f"listen port {msg.listen_port} is outside 1..65535")
    peers = [decode_peer(p) for p in msg.peers]
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ProtocolViolation("a desired state names one peer twice")
    return NodeDesiredState(
        node=_name(msg.node, "node"),
        listen_port=msg.listen_port,
        peers=peers,
        routes=[decode_route(r) for r in msg.routes],
        blocks=[decode_block(b) for b in msg.blocks],
        datapath=decode_datapath(msg.datapath),
    )


def encode_change(change: Change) -> pb.Change:
    match change:
        case PeerAdded(peer):
            return pb.Change(peer_added=encode_peer(peer))
        case PeerChanged(peer):
            return pb.Change(peer_changed=encode_peer(peer))
        case PeerRemoved(name):
            return pb.Change(peer_removed=name)
        case RouteAdded(route):
            return pb.Change(route_added=encode_route(route))
        case RouteRemoved(route):
            return pb.Change(route_removed=encode_route(route))
        case BlockAdded(block):
            return pb.Change(block_added=encode_block(block))
        case BlockRemoved(block):
            return pb.Change(block_removed=encode_block(block))
        case ListenPortChanged(port):
            return pb.Change(listen_port_changed=port)
        case DataPathChanged(datapath):
            return pb.Change(datapath_changed=encode_datapath(datapath))


def decode_change(msg: pb.Change) -> Change:
    match msg.WhichOneof("change"):
        case "peer_added":
            return PeerAdded(decode_peer(msg.peer_added))
        case "peer_changed":
            return PeerChanged(decode_peer(msg.peer_changed))
        case "peer_removed":
            return PeerRemoved(_name(msg.peer_removed, "removed peer"))
        case "route_added":
            return RouteAdded(decode_route(msg.route_added))
        case "route_removed":
            return RouteRemoved(decode_route(msg.route_removed))
        case "block_added":
            return BlockAdded(decode_block(msg.block_added))
        case "block_removed":
            return BlockRemoved(decode_block(msg.block_removed))
        case "listen_port_changed":
            return ListenPortChanged(msg.listen_port_changed)
        case "datapath_changed":
            return DataPathChanged(decode_datapath(msg.datapath_changed))
        case _:
            raise ProtocolViolation("a Change carries no change")


# --- daemon -> controller ------------------------------------------------------------


def encode_node_message(message: wire.NodeMessage) -> pb.NodeMessage:
    match message:
        case wire.Hello():
            return pb.NodeMessage(hello=pb.Hello(
                node_name=message.node_name,
                public_key=message.public_key,
                last_applied_generation=message.last_applied_generation,
                daemon_version=message.daemon_version,
            ))
        case wire.Ack(generation, error):
            return pb.NodeMessage(ack=pb.Ack(generation=generation, error=error))
        case wire.Heartbeat():
            return pb.NodeMessage(heartbeat=pb.Heartbeat())
        case wire.Telemetry():
            return pb.NodeMessage(telemetry=encode_telemetry(message))
        case wire.RotationResult():
            return pb.NodeMessage(rotation_result=pb.RotationResult(
                rotation_id=message.rotation_id,
                step=int(message.step),  # type: ignore[arg-type]
                error=message.error,
                new_public_key=message.new_public_key,
                stamp=message.stamp,
                rotating_node=message.rotating_node,
            ))


def encode_telemetry(t: wire.Telemetry) -> pb.Telemetry:
    peers = t.peers
    msg = pb.Telemetry(
        sampled_at=t.sampled_at, applied_generation=t.applied_generation,
        public_key=t.public_key, key_created=t.key_created, mtu=t.mtu, rotation=t.rotation,
        down=t.down,
        peers=pb.PeerColumns(name=peers.names, latest_handshake=peers.latest_handshakes,
                             rx_bytes=peers.rx_bytes, tx_bytes=peers.tx_bytes,
                             endpoint=peers.endpoints),
    )
    if t.peer_updates is not None:
        u = t.peer_updates
        msg.peer_updates.CopyFrom(pb.PeerUpdates(
            position=u.positions, latest_handshake=u.latest_handshakes, rx_bytes=u.rx_bytes,
            tx_bytes=u.tx_bytes, endpoint=u.endpoints, every_row=u.every_row))
    if t.datapath is not None:
        d = t.datapath
        msg.datapath.CopyFrom(pb.DataPathCounters(
            passed=d.passed, dropped_blocked=d.dropped_blocked, delivered=d.delivered,
            delivery_dropped_blocked=d.delivery_dropped_blocked,
            guard_cleartext=d.guard_cleartext, guard_dropped=d.guard_dropped,
            fail_closed_drops=d.fail_closed_drops, guard_attached=d.guard_attached))
    return msg


def decode_telemetry(msg: pb.Telemetry) -> wire.Telemetry:
    """Columns become tuples and arrays in C (see `wire.PeerColumns`): what
    decodes this is the leader, which keeps the peers packed."""
    p = msg.peers
    datapath = None
    if msg.HasField("datapath"):
        d = msg.datapath
        datapath = wire.DataPathCounters(
            d.passed, d.dropped_blocked, d.delivered, d.delivery_dropped_blocked,
            d.guard_cleartext, d.guard_dropped, d.fail_closed_drops, d.guard_attached)
    updates = None
    if msg.HasField("peer_updates"):
        u = msg.peer_updates
        # Most messages of a quiet mesh: no row changed (shared, immutable).
        updates = _NO_UPDATES if not (
            u.every_row or u.position or u.latest_handshake or u.rx_bytes or u.tx_bytes
            or u.endpoint) else wire.PeerUpdates(
                tuple(u.position), wire.narrow(u.latest_handshake), wire.narrow(u.rx_bytes),
                wire.narrow(u.tx_bytes), tuple(u.endpoint), every_row=u.every_row)
    return wire.Telemetry(
        sampled_at=msg.sampled_at, applied_generation=msg.applied_generation,
        public_key=msg.public_key, key_created=msg.key_created, mtu=msg.mtu,
        rotation=msg.rotation, peer_updates=updates,
        down=tuple(map(sys.intern, msg.down)) if msg.down else (),
        # The leader's form (`wire.PeerColumns.packed`): it holds every node's
        # latest sample, N x (N-1) rows naming the same N nodes and endpoints.
        peers=_NO_PEERS if not (p.name or p.latest_handshake or p.rx_bytes or p.tx_bytes
                                or p.endpoint)
        else wire.PeerColumns.packed(p.name, p.latest_handshake, p.rx_bytes, p.tx_bytes,
                                     p.endpoint),
        datapath=datapath,
    )


_NO_UPDATES = wire.PeerUpdates()
_NO_PEERS = wire.PeerColumns()


def _rotation_step_kind(value: int) -> wire.RotationStepKind:
    try:
        return wire.RotationStepKind(value)
    except ValueError:
        raise ProtocolViolation(f"unknown rotation step {value}") from None


def _decode_node_message(msg: pb.NodeMessage) -> wire.NodeMessage:
    match msg.WhichOneof("kind"):
        case "hello":
            h = msg.hello
            return wire.Hello(
                node_name=_name(h.node_name, "hello node name"),
                public_key=h.public_key,
                last_applied_generation=h.last_applied_generation,
                daemon_version=h.daemon_version,
            )
        case "ack":
            error = msg.ack.error if msg.ack.HasField("error") else None
            return wire.Ack(generation=msg.ack.generation, error=error)
        case "heartbeat":
            return wire.Heartbeat()
        case "telemetry":
            return decode_telemetry(msg.telemetry)
        case "rotation_result":
            r = msg.rotation_result
            return wire.RotationResult(
                rotation_id=r.rotation_id,
                step=_rotation_step_kind(r.step),
                rotating_node=_name(r.rotating_node, "rotating node"),
                stamp=r.stamp,
                error=r.error if r.HasField("error") else None,
                new_public_key=r.new_public_key,
            )
        case _:
            raise ProtocolViolation("an empty NodeMessage")


def decode_node_message(msg: pb.NodeMessage) -> wire.NodeMessage:
    """The typed message, or `ProtocolViolation` saying what is malformed."""
    try:
        return _decode_node_message(msg)
    except ProtocolViolation:
        raise
    except (ValueError, TypeError) as exc:
        raise ProtocolViolation(f"malformed NodeMessage: {exc}") from None


# --- controller -> daemon ------------------------------------------------------------


def encode_controller_message(message: wire.ControllerMessage) -> pb.ControllerMessage:
    match message:
        case wire.SyncState(generation, state):
            return pb.ControllerMessage(
                sync_state=pb.SyncState(generation=generation, state=encode_state(state)))
        case wire.Delta(generation, base_generation, changes):
            return pb.ControllerMessage(delta=pb.Delta(
                generation=generation,
                base_generation=base_generation,
                changes=[encode_change(c) for c in changes],
            ))
        case wire.Redirect(leader):
            return pb.ControllerMessage(redirect=pb.Redirect(leader=leader))
        case wire.Refused(reason):
            return pb.ControllerMessage(refused=pb.Refused(reason=reason))
        case wire.RotationStep():
            return pb.ControllerMessage(rotation_step=pb.RotationStep(
                rotation_id=message.rotation_id,
                step=int(message.step),  # type: ignore[arg-type]
                rotating_node=message.rotating_node,
                old_public_key=message.old_public_key,
                new_public_key=message.new_public_key,
                stamp=message.stamp,
                slot=message.slot,
            ))


def _decode_controller_message(msg: pb.ControllerMessage) -> wire.ControllerMessage:
    match msg.WhichOneof("kind"):
        case "sync_state":
            if not msg.sync_state.HasField("state"):
                raise ProtocolViolation("a SyncState without a state")
            return wire.SyncState(
                generation=msg.sync_state.generation, state=decode_state(msg.sync_state.state))
        case "delta":
            return wire.Delta(
                generation=msg.delta.generation,
                base_generation=msg.delta.base_generation,
                changes=[decode_change(c) for c in msg.delta.changes],
            )
        case "redirect":
            if not msg.redirect.leader:
                raise ProtocolViolation("a Redirect without a leader address")
            return wire.Redirect(leader=msg.redirect.leader)
        case "refused":
            return wire.Refused(reason=msg.refused.reason)
        case "rotation_step":
            r = msg.rotation_step
            return wire.RotationStep(
                rotation_id=r.rotation_id,
                step=_rotation_step_kind(r.step),
                rotating_node=_name(r.rotating_node, "rotating node"),
                old_public_key=r.old_public_key,
                new_public_key=r.new_public_key,
                stamp=r.stamp,
                slot=r.slot or 1,
            )
        case _:
            raise ProtocolViolation("an empty ControllerMessage")


def decode_controller_message(msg: pb.ControllerMessage) -> wire.ControllerMessage:
    """The typed message, or `ProtocolViolation` saying what is malformed."""
    try:
        return _decode_controller_message(msg)
    except ProtocolViolation:
        raise
    except (ValueError, TypeError) as exc:
        raise ProtocolViolation(f"malformed ControllerMessage: {exc}") from None
