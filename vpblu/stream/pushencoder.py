"""The controller's fast path from a push to protobuf wire bytes.

Owns `PushEncoder`: it turns the controller's `wire.ControllerMessage`s into
the bytes of a serialized `pb.ControllerMessage`, equal byte for byte to
what `vpblu.stream.codec.encode_controller_message(m).SerializeToString()` gives,
without building the message tree. The point is the Peer: one immutable
`Peer` object (desiredstate keeps unchanged peers as the very same object)
sits in up to N-1 nodes' states, so it is serialized once, cached by
identity (so are Routes and CidrPairs, shared the same way), and every
SyncState or Delta that carries it is put together by
concatenating cached bytes under hand-written tags and lengths (protobuf
wire format: a length-delimited field is a one-byte tag here, a varint
length, the bytes; a repeated message field is that once per element;
proto3 leaves out fields at their default value).

Measured with `bench/push_encoding.py` on 2 shared, busy cores (the times
swing 3-5x with the load; the ratios hold): a FullMesh node's SyncState
with 1000 peers and 1000 routes, warm cache, 0.9 ms instead of 74 ms (~80x;
0.2-0.3 ms instead of 9-20 ms in quieter runs without routes); cold (every
Peer new) it takes 0.6-2x the plain codec's time, paid once per Peer
object. One PeerAdded(+RouteAdded) Delta encoded for each of 1000
sessions: 2-4x faster (4 ms instead of 16 ms in a quieter run).

Decoding is untouched (the daemon uses `vpblu.stream.codec`). It must never be used
for anything a daemon sends, and never hold a Peer alive: the cache keeps
weak references only and forgets a Peer when it is collected.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import TypeVar

from vpblu.core import wire
from vpblu.core.model import (
    BlockAdded,
    BlockRemoved,
    CidrPair,
    DataPath,
    DataPathChanged,
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
from vpblu.stream import codec

V = TypeVar("V", Peer, Route, CidrPair, DataPath)

# Wire types (protobuf encoding spec): 0 varint, 2 length-delimited.
_VARINT = 0
_LEN = 2


def _tag(field: int, wire_type: int) -> bytes:
    return bytes([(field << 3) | wire_type])  # every field number here is below 16


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _uint(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""  # proto3: zero is not written


def _string(tag: bytes, value: str) -> bytes:
    return _field(tag, value.encode()) if value else b""


# Peer.name = 1, .public_key = 2, .endpoint = 3, .allowed_ips = 4, .persistent_keepalive = 5
_PEER_NAME = _tag(1, _LEN)
_PEER_KEY = _tag(2, _LEN)
_PEER_ENDPOINT = _tag(3, _LEN)
_PEER_ALLOWED_IP = _tag(4, _LEN)
_PEER_KEEPALIVE = _tag(5, _VARINT)
# Endpoint.host = 1, .port = 2
_ENDPOINT_HOST = _tag(1, _LEN)
_ENDPOINT_PORT = _tag(2, _VARINT)
# ControllerMessage.sync_state = 1, .delta = 2
_CM_SYNC = _tag(1, _LEN)
_CM_DELTA = _tag(2, _LEN)
# SyncState.generation = 1, .state = 2
_SYNC_GENERATION = _tag(1, _VARINT)
_SYNC_STATE = _tag(2, _LEN)
# NodeDesiredState.node = 1, .listen_port = 2, .peers = 3, .routes = 4, .blocks = 5,
# .datapath = 6
_STATE_NODE = _tag(1, _LEN)
_STATE_PORT = _tag(2, _VARINT)
_STATE_PEER = _tag(3, _LEN)
_STATE_ROUTE = _tag(4, _LEN)
_STATE_BLOCK = _tag(5, _LEN)
_STATE_DATAPATH = _tag(6, _LEN)
# DataPath.local_cidrs = 1, .cluster_cidrs = 2, .fail_open = 3
_DATAPATH_LOCAL = _tag(1, _LEN)
_DATAPATH_CLUSTER = _tag(2, _LEN)
_DATAPATH_FAIL_OPEN = _tag(3, _VARINT)
# Delta.generation = 1, .base_generation = 2, .changes = 3
_DELTA_GENERATION = _tag(1, _VARINT)
_DELTA_BASE = _tag(2, _VARINT)
_DELTA_CHANGE = _tag(3, _LEN)
# Change (a oneof: its members are written even at their default value)
_CHANGE_PEER_ADDED = _tag(1, _LEN)
_CHANGE_PEER_CHANGED = _tag(2, _LEN)
_CHANGE_PEER_REMOVED = _tag(3, _LEN)
_CHANGE_ROUTE_ADDED = _tag(4, _LEN)
_CHANGE_ROUTE_REMOVED = _tag(5, _LEN)
_CHANGE_BLOCK_ADDED = _tag(6, _LEN)
_CHANGE_BLOCK_REMOVED = _tag(7, _LEN)
_CHANGE_LISTEN_PORT = _tag(8, _VARINT)
_CHANGE_DATAPATH = _tag(9, _LEN)
# Route.cidr = 1, .via = 2; CidrPair.src = 1, .dst = 2
_ROUTE_CIDR = _tag(1, _LEN)
_ROUTE_VIA = _tag(2, _LEN)
_BLOCK_SRC = _tag(1, _LEN)
_BLOCK_DST = _tag(2, _LEN)



def _peer(peer: Peer) -> bytes:
    """pb.Peer's bytes, fields in number order as protobuf writes them."""
    parts = [_string(_PEER_NAME, peer.name), _string(_PEER_KEY, peer.public_key)]
    if peer.endpoint is not None:
        endpoint = (_string(_ENDPOINT_HOST, str(peer.endpoint.host))
                    + _uint(_ENDPOINT_PORT, peer.endpoint.port))
        parts.append(_field(_PEER_ENDPOINT, endpoint))
    parts.extend(_field(_PEER_ALLOWED_IP, str(n).encode()) for n in peer.allowed_ips)
    parts.append(_uint(_PEER_KEEPALIVE, peer.persistent_keepalive))
    return b"".join(parts)


def _route(route: Route) -> bytes:
    return _string(_ROUTE_CIDR, str(route.cidr)) + _string(_ROUTE_VIA, route.via)


def _block(block: CidrPair) -> bytes:
    return _string(_BLOCK_SRC, str(block.src)) + _string(_BLOCK_DST, str(block.dst))


def _datapath(datapath: DataPath) -> bytes:
    parts = [_string(_DATAPATH_LOCAL, str(n)) for n in datapath.local_cidrs]
    parts += [_string(_DATAPATH_CLUSTER, str(n)) for n in datapath.cluster_cidrs]
    if datapath.fail_open:  # proto3 leaves a false bool out
        parts.append(_uint(_DATAPATH_FAIL_OPEN, 1))
    return b"".join(parts)


class Pieces:
    """A serialized message as the byte strings it is made of, in order,
    without joining them: most of a SyncState is its peers' and routes'
    cached bytes, the same objects in every node's message. A SyncState of
    999 peers is ~150 KB; at a formation every stream queues one, and 1000
    joined copies waiting for their daemons to read were most of the
    controller's N=1000 peak. As pieces, a queued SyncState holds a list of
    references (~32 KB) and the stream joins one frame's worth at a time as
    it writes (`vpblu.stream.transport`)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        return b"".join(self.parts)


# Below this a SyncState is joined: pieces save nothing on a small message.
PIECES_MIN = 16 * 1024

# Rotation steps whose bytes are kept (a batch has at most 16 rotations, each
# with one step in flight).
STEPS_KEPT = 64


class PushEncoder:
    """Serializes controller messages, each distinct Peer object once.

    One per controller (the Mesh server holds it); trio side only, not
    thread-safe. Peers are cached by identity, so an equal but distinct
    Peer is encoded again (correct, just not shared).
    """

    def __init__(self) -> None:
        # id(value) -> (weak reference to that value, its serialized bytes
        # behind their varint length). The weak reference both drops the
        # entry when the value dies and proves on lookup that the id still
        # names the same object.
        self._cache: dict[int, tuple[weakref.ref[Peer | Route | CidrPair | DataPath], bytes]] = {}
        # Bytes encoded for the streams so far, by kind ("sync", "delta",
        # "other"): every message a stream sends is encoded here once (the
        # controller's vpblu_push_bytes_total).
        self.encoded_bytes: dict[str, int] = {"sync": 0, "delta": 0, "other": 0}
        # The last rotation steps encoded, by the step object: a RotationActor
        # sends one step object to every peer (999 at N=1000), so it is
        # serialized once, not once per stream. Held strongly, a few at a time.
        self._steps: dict[int, tuple[wire.RotationStep, bytes]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def _cached(self, value: V, serialize: Callable[[V], bytes]) -> bytes:
        key = id(value)
        entry = self._cache.get(key)
        if entry is not None and entry[0]() is value:
            return entry[1]
        data = serialize(value)
        data = _varint(len(data)) + data
        self._cache[key] = (weakref.ref(value, self._forget(key)), data)
        return data

    def _forget(
        self, key: int
    ) -> Callable[[weakref.ref[Peer | Route | CidrPair | DataPath]], None]:
        cache = self._cache

        def forget(ref: weakref.ref[Peer | Route | CidrPair | DataPath]) -> None:
            entry = cache.get(key)
            if entry is not None and entry[0] is ref:
                del cache[key]

        return forget

    def peer_bytes(self, peer: Peer) -> bytes:
        """The serialized pb.Peer of `peer` behind its varint length (what
        follows the tag of a Peer field), from the cache when it is there."""
        return self._cached(peer, _peer)

    def state_bytes(self, state: NodeDesiredState) -> bytes:
        """The serialized pb.NodeDesiredState."""
        return b"".join(self._state_parts(state))

    def _state_parts(self, state: NodeDesiredState) -> list[bytes]:
        """pb.NodeDesiredState's bytes as pieces: per element its field's tag,
        then the cached length and bytes (interleaved in C)."""
        parts = [_string(_STATE_NODE, state.node), _uint(_STATE_PORT, state.listen_port)]

        def repeated(tag: bytes, cached: list[bytes]) -> None:
            parts.extend(itertools.chain.from_iterable(zip(itertools.repeat(tag), cached)))

        repeated(_STATE_PEER, [self._cached(p, _peer) for p in state.peers])
        repeated(_STATE_ROUTE, [self._cached(r, _route) for r in state.routes])
        repeated(_STATE_BLOCK, [self._cached(b, _block) for b in state.blocks])
        parts += (_STATE_DATAPATH, self._cached(state.datapath, _datapath))
        return parts

    def change_bytes(self, change: object) -> bytes:
        """The serialized pb.Change."""
        match change:
            case PeerAdded(peer):
                return _CHANGE_PEER_ADDED + self._cached(peer, _peer)
            case PeerChanged(peer):
                return _CHANGE_PEER_CHANGED + self._cached(peer, _peer)
            case PeerRemoved(name):
                return _field(_CHANGE_PEER_REMOVED, name.encode())
            case RouteAdded(route):
                return _CHANGE_ROUTE_ADDED + self._cached(route, _route)
            case RouteRemoved(route):
                return _CHANGE_ROUTE_REMOVED + self._cached(route, _route)
            case BlockAdded(block):
                return _CHANGE_BLOCK_ADDED + self._cached(block, _block)
            case BlockRemoved(block):
                return _CHANGE_BLOCK_REMOVED + self._cached(block, _block)
            case ListenPortChanged(port):
                return _CHANGE_LISTEN_PORT + _varint(port)
            case DataPathChanged(datapath):
                return _CHANGE_DATAPATH + self._cached(datapath, _datapath)
        raise TypeError(f"not a Change: {type(change).__name__}")

    def encode(self, message: wire.ControllerMessage) -> bytes:
        """The serialized pb.ControllerMessage, byte for byte what the codec makes."""
        data = self.encode_for_stream(message)
        return data.join() if isinstance(data, Pieces) else data

    def encode_for_stream(self, message: wire.ControllerMessage) -> bytes | Pieces:
        """What `encode` gives, as `Pieces` when it is a SyncState of
        PIECES_MIN bytes or more (for a stream's outbox)."""
        data = self._encode(message)
        kind = ("sync" if isinstance(message, wire.SyncState)
                else "delta" if isinstance(message, wire.Delta) else "other")
        self.encoded_bytes[kind] += len(data)
        return data

    def _sync_state(self, generation: int, state: NodeDesiredState) -> bytes | Pieces:
        parts = self._state_parts(state)
        state_size = sum(map(len, parts))
        head = _uint(_SYNC_GENERATION, generation) + _SYNC_STATE + _varint(state_size)
        head = _CM_SYNC + _varint(len(head) + state_size) + head
        if len(head) + state_size < PIECES_MIN:
            return head + b"".join(parts)
        parts.insert(0, head)
        return Pieces(parts, len(head) + state_size)

    def _encode(self, message: wire.ControllerMessage) -> bytes | Pieces:
        match message:
            case wire.SyncState(generation, state):
                return self._sync_state(generation, state)
            case wire.Delta(generation, base_generation, changes):
                parts = [_uint(_DELTA_GENERATION, generation),
                         _uint(_DELTA_BASE, base_generation)]
                parts.extend(_field(_DELTA_CHANGE, self.change_bytes(c)) for c in changes)
                return _field(_CM_DELTA, b"".join(parts))
            case wire.RotationStep():
                held = self._steps.get(id(message))
                if held is not None and held[0] is message:
                    return held[1]
                step: bytes = codec.encode_controller_message(message).SerializeToString()
                if len(self._steps) >= STEPS_KEPT:
                    self._steps.clear()
                self._steps[id(message)] = (message, step)
                return step
            case _:
                # Rare and small (Redirect, Refused): the plain codec.
                data: bytes = codec.encode_controller_message(message).SerializeToString()
                return data
