"""What a daemon and the controller say to each other on the warm stream.

Owns the typed values of DESIGN §5: the daemon's `NodeMessage`s (Hello, Ack,
Heartbeat, Telemetry, RotationResult) and the controller's `ControllerMessage`s (SyncState,
Delta, Redirect, Refused, RotationStep). They are what the session and stream actors exchange with
`vpblu.stream.transport`; `vpblu.stream.codec` turns them into protobuf and back. Nothing
here does I/O or knows about gRPC.
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections.abc import Iterable
from typing import Any

import attrs

from vpblu.core.model import Change, NodeDesiredState, check_public_key

MAX_GENERATION = 2**64 - 1  # the proto field is uint64


def _check_generation(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= MAX_GENERATION:
        raise ValueError(f"{attribute.name}: generation {value} is outside 0..2**64-1")


def _check_node_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 253:
        raise ValueError(f"{attribute.name}: a node name is 1..253 characters, got {value!r}")


def _changes(values: Iterable[Change]) -> tuple[Change, ...]:
    return tuple(values)


# --- daemon -> controller --------------------------------------------------------


@attrs.frozen(slots=True)
class Hello:
    """The daemon's first message: who it is, its current key, what it applied."""

    node_name: str = attrs.field(validator=_check_node_name)
    public_key: str = attrs.field(validator=check_public_key)
    last_applied_generation: int = attrs.field(default=0, validator=_check_generation)
    daemon_version: str = ""


@attrs.frozen(slots=True)
class Ack:
    """`generation` was applied; or, with `error`, applying it failed."""

    generation: int = attrs.field(validator=_check_generation)
    error: str | None = None


@attrs.frozen(slots=True)
class Heartbeat:
    """Proof of life when there is nothing to acknowledge."""


class RotationStepKind(enum.IntEnum):
    """One step of a key rotation (values as in mesh.proto)."""

    PREPARE = 1
    DISTRIBUTE = 2
    ACTIVATE = 3
    SWITCH_PEER = 4
    RETIRE_ROTATING = 5
    RETIRE_PEER = 6
    ROLL_BACK_ROTATING = 7
    ROLL_BACK_PEER = 8
    ABANDON_ROTATING = 9
    SWAP_PEER = 10


# Rotations that run at once each hold a slot: their own bridge interface and
# port on every node they touch (vpblu/node/rotation.py BridgeLayout).
MAX_ROTATION_SLOTS = 16


def _check_slot(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= MAX_ROTATION_SLOTS:
        raise ValueError(f"{attribute.name}: a rotation slot is 1..{MAX_ROTATION_SLOTS}")


def _check_rotation_id(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 64:
        raise ValueError(f"{attribute.name}: a rotation id is 1..64 characters")


def _check_optional_key(inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        check_public_key(inst, attribute, value)


@attrs.frozen(slots=True)
class RotationResult:
    """What the daemon did with the RotationStep stamped `stamp`: done, or `error`.
    A PREPARE result carries the staged key's public half (never the private one)."""

    rotation_id: str = attrs.field(validator=_check_rotation_id)
    step: RotationStepKind
    rotating_node: str = attrs.field(validator=_check_node_name)
    stamp: int = attrs.field(validator=_check_generation)
    error: str | None = None
    new_public_key: str = attrs.field(default="", validator=_check_optional_key)


MAX_TELEMETRY_PEERS = 65536  # far above any mesh; a bound on what one message may carry


def _texts(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _counts(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _counters(values: Iterable[int]) -> array[int]:
    """A column of the proto's uint64s as an unsigned 64-bit array: 8 bytes a
    value where a tuple held 40 (a pointer and an int object). An unsigned
    array ("Q", or "I" from `narrow`) is taken as it is: a column is never
    changed once in a `PeerColumns` or `PeerUpdates`."""
    if isinstance(values, array) and values.typecode in ("I", "Q"):
        return values
    try:
        return array("Q", values)
    except OverflowError:
        raise ValueError("a peer counter is outside 0..2**64-1") from None


def narrow(values: Iterable[int]) -> array[int]:
    """A counter column in 4 bytes a value when every value fits, else in 8:
    for the columns the leader holds from every node (N x (N-1) rows).
    Handshake times, seconds since the epoch, fit until 2106; a byte counter
    until its peer has moved 4 GiB, and from then that node's column is 8
    bytes a value. Not for a column changed in place (the daemon's own)."""
    if iter(values) is values:  # an iterator: read once, tried twice below
        values = tuple(values)
    try:
        return array("I", values)
    except OverflowError:
        return _counters(values)


def _with_rows(column: array[int], positions: Iterable[int], values: array[int]) -> array[int]:
    """A copy of `column` with `values` at `positions`: 8 bytes a value when
    one of the new values needs it."""
    copy = column[:] if column.itemsize >= values.itemsize else array("Q", column)
    for i, v in zip(positions, values, strict=True):
        copy[i] = v
    return copy


_SEP = "\0"  # between a peer's name and its endpoint in a packed row


def _check_names(names: tuple[str, ...], *, packing: bool) -> None:
    n = len(names)
    if n > MAX_TELEMETRY_PEERS:
        raise ValueError(f"telemetry for {n} peers is more than {MAX_TELEMETRY_PEERS}")
    if n and (not all(names) or max(map(len, names)) > 253):
        raise ValueError("peer telemetry names a peer with an empty or over-long name")
    if packing and _SEP in "".join(names):
        raise ValueError("peer telemetry names a peer with a NUL in its name")


@attrs.frozen(slots=True)
class PeerStats:
    """One peer as the daemon's WireGuard device showed it (a row of `PeerColumns`)."""

    name: str
    latest_handshake: int  # seconds since the epoch on the daemon's clock, 0: never
    rx_bytes: int
    tx_bytes: int
    endpoint: str  # "host:port" WireGuard last used, "" when it has none


class PeerColumns:
    """Every peer's WireGuard statistics, as index-aligned columns.

    Columns, not one object per peer, because the controller receives one of
    these from every daemon on every heartbeat: at N=1000 that is ~33 messages
    of 999 peers a second, and turning repeated fields into tuples (names,
    endpoints) and unsigned arrays (the counters) is a few C-level conversions
    where 999 objects per message cost milliseconds. `rows()` gives the
    per-peer view for the few readers that want one.

    Held in one of two forms, read the same way. The daemon's, as sampled: a
    tuple of names, one of endpoints, 8-byte counters. The leader's
    (`packed`), which it holds for every node, N x (N-1) rows: one tuple of
    interned "name NUL endpoint" strings - one string for every node that
    sees a peer at the same endpoint - and counters `narrow`ed, 20 bytes a
    row where the daemon's form takes 40 (at N=1000, 19 MiB less). A packed
    one's `names` and `endpoints` are made when read, by the status and the
    dashboard, never per heartbeat. Immutable, like the attrs values around it.
    """

    __slots__ = (
        "_endpoints",
        "_names",
        "_packed",
        "latest_handshakes",
        "rx_bytes",
        "tx_bytes",
    )
    _names: tuple[str, ...]
    _endpoints: tuple[str, ...]
    _packed: tuple[str, ...] | None  # set: `_names` and `_endpoints` are ()
    latest_handshakes: array[int]
    rx_bytes: array[int]
    tx_bytes: array[int]

    def __init__(self, names: Iterable[str] = (), latest_handshakes: Iterable[int] = (),
                 rx_bytes: Iterable[int] = (), tx_bytes: Iterable[int] = (),
                 endpoints: Iterable[str] = ()) -> None:
        names = tuple(names)
        _check_names(names, packing=False)
        self._fill(names, tuple(endpoints), None, _counters(latest_handshakes),
                   _counters(rx_bytes), _counters(tx_bytes))

    @classmethod
    def packed(cls, names: Iterable[str], latest_handshakes: Iterable[int],
               rx_bytes: Iterable[int], tx_bytes: Iterable[int],
               endpoints: Iterable[str]) -> PeerColumns:
        """These columns in the leader's form (see the class)."""
        names, endpoints = tuple(names), tuple(endpoints)
        _check_names(names, packing=True)
        if len(endpoints) != len(names):
            raise ValueError("peer telemetry columns differ in length")
        rows = tuple(map(sys.intern, map(_SEP.join, zip(names, endpoints, strict=True))))
        return cls._made((), (), rows, narrow(latest_handshakes), narrow(rx_bytes),
                         narrow(tx_bytes))

    @classmethod
    def _made(cls, names: tuple[str, ...], endpoints: tuple[str, ...],
              packed: tuple[str, ...] | None, latest_handshakes: array[int],
              rx_bytes: array[int], tx_bytes: array[int]) -> PeerColumns:
        self = object.__new__(cls)
        self._fill(names, endpoints, packed, latest_handshakes, rx_bytes, tx_bytes)
        return self

    def _fill(self, names: tuple[str, ...], endpoints: tuple[str, ...],
              packed: tuple[str, ...] | None, latest_handshakes: array[int],
              rx_bytes: array[int], tx_bytes: array[int]) -> None:
        n = len(packed) if packed is not None else len(names)
        lengths = {len(latest_handshakes), len(rx_bytes), len(tx_bytes)}
        if packed is None:
            lengths.add(len(endpoints))
        if lengths != {n}:
            raise ValueError("peer telemetry columns differ in length")
        for slot, value in (("_names", names), ("_endpoints", endpoints), ("_packed", packed),
                            ("latest_handshakes", latest_handshakes),
                            ("rx_bytes", rx_bytes), ("tx_bytes", tx_bytes)):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"PeerColumns is immutable (setting {name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PeerColumns is immutable (deleting {name})")

    @property
    def packed_rows(self) -> tuple[str, ...] | None:
        """The packed form's rows ("name NUL endpoint"), None for the daemon's form."""
        return self._packed

    @property
    def names(self) -> tuple[str, ...]:
        if self._packed is None:
            return self._names
        return tuple(row.partition(_SEP)[0] for row in self._packed)

    @property
    def endpoints(self) -> tuple[str, ...]:
        if self._packed is None:
            return self._endpoints
        return tuple(row.partition(_SEP)[2] for row in self._packed)

    def __len__(self) -> int:
        return len(self._packed) if self._packed is not None else len(self._names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerColumns):
            return NotImplemented
        return (len(self) == len(other) and self.latest_handshakes == other.latest_handshakes
                and self.rx_bytes == other.rx_bytes and self.tx_bytes == other.tx_bytes
                and self.names == other.names and self.endpoints == other.endpoints)

    __hash__ = None  # type: ignore[assignment]  # like the arrays it holds

    def __repr__(self) -> str:
        form = "packed, " if self._packed is not None else ""
        return f"PeerColumns({form}{list(self.rows())!r})"

    def rows(self) -> Iterable[PeerStats]:
        return map(PeerStats, self.names, self.latest_handshakes, self.rx_bytes,
                   self.tx_bytes, self.endpoints)

    @classmethod
    def of(cls, peers: Iterable[PeerStats]) -> PeerColumns:
        rows = list(peers)
        return cls(tuple(p.name for p in rows), tuple(p.latest_handshake for p in rows),
                   tuple(p.rx_bytes for p in rows), tuple(p.tx_bytes for p in rows),
                   tuple(p.endpoint for p in rows))

    def with_rows(self, positions: tuple[int, ...], latest_handshakes: array[int],
                  rx_bytes: array[int], tx_bytes: array[int],
                  endpoints: tuple[str, ...]) -> PeerColumns:
        """A copy with the rows at `positions` replaced (in range: the caller checks)."""
        handshakes = _with_rows(self.latest_handshakes, positions, latest_handshakes)
        rx = _with_rows(self.rx_bytes, positions, rx_bytes)
        tx = _with_rows(self.tx_bytes, positions, tx_bytes)
        if self._packed is None:
            changed = list(self._endpoints)
            for i, e in zip(positions, endpoints, strict=True):
                changed[i] = e
            return self._made(self._names, tuple(changed), None, handshakes, rx, tx)
        rows = list(self._packed)
        for i, e in zip(positions, endpoints, strict=True):
            rows[i] = sys.intern(f"{rows[i].partition(_SEP)[0]}{_SEP}{e}")
        return self._made((), (), tuple(rows), handshakes, rx, tx)

    def with_counters(self, latest_handshakes: array[int], rx_bytes: array[int],
                      tx_bytes: array[int]) -> PeerColumns:
        """The same peers and endpoints with every row's counters replaced."""
        return self._made(self._names, self._endpoints, self._packed, latest_handshakes,
                          rx_bytes, tx_bytes)


@attrs.frozen(slots=True)
class PeerUpdates:
    """The peers that changed meaningfully since the last full `PeerColumns`
    sent on this stream, by position in it (columns, like `PeerColumns`).

    The daemon sends a full list first on every stream, whenever its peer set
    changes and every few minutes; in between only these rows (an endpoint
    moved, a peer came up or went down, its bytes moved), so a quiet 1000-node
    mesh does not carry 999 unchanged rows per node per heartbeat.
    """

    positions: tuple[int, ...] = attrs.field(default=(), converter=_counts)
    latest_handshakes: array[int] = attrs.field(default=(), converter=_counters)
    rx_bytes: array[int] = attrs.field(default=(), converter=_counters)
    tx_bytes: array[int] = attrs.field(default=(), converter=_counters)
    endpoints: tuple[str, ...] = attrs.field(default=(), converter=_texts)
    # True: a refresh of every row of the held list, in its order - no
    # positions, no endpoints (a moved endpoint goes as a row at once), the
    # handshake and byte columns whole. Every FULL_REFRESH the daemon sends
    # this instead of a whole sample while its peer list is unchanged: three
    # integer columns, where 999 names and endpoints to decode and intern made
    # the refreshes most of what telemetry cost a quiet 1000-node controller.
    every_row: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        n = len(self.latest_handshakes) if self.every_row else len(self.positions)
        if n > MAX_TELEMETRY_PEERS:
            raise ValueError(f"telemetry for {n} peers is more than {MAX_TELEMETRY_PEERS}")
        if self.every_row and (self.positions or self.endpoints):
            raise ValueError("a refresh of every row carries no positions and no endpoints")
        lengths = {len(self.latest_handshakes), len(self.rx_bytes), len(self.tx_bytes)}
        if not self.every_row:
            lengths.add(len(self.endpoints))
        if lengths != {n}:
            raise ValueError("peer update columns differ in length")

    def __len__(self) -> int:
        return len(self.latest_handshakes)

    def onto(self, base: PeerColumns) -> PeerColumns:
        """`base` with these rows replaced (ValueError for a position outside it,
        or a refresh of another length); with no rows, `base` itself."""
        if self.every_row:
            if len(self.latest_handshakes) != len(base):
                raise ValueError(f"a refresh of {len(self.latest_handshakes)} rows onto a "
                                 f"list of {len(base)} peers")
            return base.with_counters(self.latest_handshakes, self.rx_bytes, self.tx_bytes)
        if not self.positions:
            return base  # the usual partial sample: nothing but the node's own fields
        n = len(base)
        if max(self.positions) >= n or min(self.positions) < 0:
            raise ValueError(f"a peer update names position {max(self.positions)} "
                             f"of a list of {n} peers")
        return base.with_rows(self.positions, self.latest_handshakes, self.rx_bytes,
                              self.tx_bytes, self.endpoints)


@attrs.frozen(slots=True)
class DataPathCounters:
    """The node's data-path counters, packets since the pinned maps (or the
    fail-closed sink) were made: they survive daemon restarts."""

    passed: int = 0  # sent by a pod, not blocked
    dropped_blocked: int = 0  # a blocked pair, dropped as the pod sent it
    delivered: int = 0  # reached a pod, not blocked
    delivery_dropped_blocked: int = 0  # a blocked pair, dropped at delivery (after DNAT)
    guard_cleartext: int = 0  # pod-addressed packets that left the underlay in the clear
    guard_dropped: int = 0  # of those, dropped (strict mode)
    fail_closed_drops: int = 0  # to a pod range without a tunnel: dropped, never sent
    guard_attached: bool = False  # whether the cleartext guard is on the underlay now


@attrs.frozen(slots=True)
class Telemetry:
    """What the daemon sees on its node now: sent on the heartbeat and on a
    change (coalesced, at a bounded rate); the controller keeps the latest per
    node in memory only. Times are the daemon's clock: ages are differences of
    two of them (`sampled_at` - `latest_handshake`), so clock skew between node
    and controller never makes a handshake look old or young."""

    sampled_at: float  # seconds since the epoch, daemon's clock
    applied_generation: int = attrs.field(default=0, validator=_check_generation)
    public_key: str = attrs.field(default="", validator=_check_optional_key)
    key_created: float = 0.0  # when the key in use was made (its file's mtime); 0 unknown
    mtu: int = 0  # the mesh interface's MTU, 0 unknown
    # The node's own key-rotation state ("Staged", "Activated"), "" none.
    rotation: str = attrs.field(default="", validator=attrs.validators.max_len(64))
    peers: PeerColumns = attrs.field(factory=PeerColumns)
    datapath: DataPathCounters | None = None  # None: no data-path programs (simulated node)
    # Not None: a partial sample; `peers` is empty and these rows are what
    # changed since the stream's last full one (see `merged_onto`).
    peer_updates: PeerUpdates | None = None
    # The peers without a handshake within HANDSHAKE_FRESH at `sampled_at`,
    # as the daemon found them (`vpblu.core.health.peers_down`), in every
    # sample, whole or partial. The controller takes this word for who is up:
    # a handshake renewed (every peer's, every two minutes) is not sent, so
    # the handshake times it holds may be a whole sample old.
    down: tuple[str, ...] = attrs.field(default=(), converter=_texts)

    def __attrs_post_init__(self) -> None:
        if self.peer_updates is not None and len(self.peers):
            raise ValueError("a partial telemetry sample carries peer updates, not peers")
        if len(self.down) > MAX_TELEMETRY_PEERS:
            raise ValueError(f"telemetry names more than {MAX_TELEMETRY_PEERS} peers down")

    @property
    def partial(self) -> bool:
        return self.peer_updates is not None

    def merged_onto(self, base: Telemetry) -> Telemetry:
        """The whole sample this partial one stands for: `base` (the stream's
        previous whole sample) with the updated peers, and everything else
        from this one. A whole sample is returned as it is."""
        if self.peer_updates is None:
            return self
        return attrs.evolve(self, peers=self.peer_updates.onto(base.peers), peer_updates=None)


NodeMessage = Hello | Ack | Heartbeat | Telemetry | RotationResult


# --- controller -> daemon --------------------------------------------------------


@attrs.frozen(slots=True)
class SyncState:
    """The node's whole desired state; idempotent, replaces whatever it had."""

    generation: int = attrs.field(validator=_check_generation)
    state: NodeDesiredState


@attrs.frozen(slots=True)
class Delta:
    """Changes that turn `base_generation`'s state into `generation`'s."""

    generation: int = attrs.field(validator=_check_generation)
    base_generation: int = attrs.field(validator=_check_generation)
    changes: tuple[Change, ...] = attrs.field(default=(), converter=_changes)

    def __attrs_post_init__(self) -> None:
        if self.base_generation >= self.generation:
            raise ValueError(
                f"a delta moves forward: base generation {self.base_generation}"
                f" is not below generation {self.generation}"
            )


@attrs.frozen(slots=True)
class Redirect:
    """The daemon reached a follower; the leader's Mesh service is at `leader`."""

    leader: str


@attrs.frozen(slots=True)
class Refused:
    """The controller will not serve this stream, and says why before it closes."""

    reason: str


@attrs.frozen(slots=True)
class RotationStep:
    """Do one step of `rotating_node`'s key rotation K -> K' and answer with a
    RotationResult. Idempotent on the daemon; `stamp` orders steps like a generation."""

    rotation_id: str = attrs.field(validator=_check_rotation_id)
    step: RotationStepKind
    rotating_node: str = attrs.field(validator=_check_node_name)
    old_public_key: str = attrs.field(validator=check_public_key)
    new_public_key: str = attrs.field(default="", validator=_check_optional_key)
    stamp: int = attrs.field(default=0, validator=_check_generation)
    slot: int = attrs.field(default=1, validator=_check_slot)


ControllerMessage = SyncState | Delta | Redirect | Refused | RotationStep
