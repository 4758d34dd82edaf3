"""Every message one vpblu actor sends another: the only coupling between actors.

This module owns the shapes of messages. It never does I/O, never reads a
clock, and holds no state; nothing here knows how a message is handled.

The rules, for everyone adding a section:

- A message is a frozen, slotted attrs class (``@attrs.frozen``): immutable,
  hashable, cheap, and impossible to grow a stray attribute by a typo.
- Each actor's inbox has one union type, named ``<Actor>Inbox`` and declared
  right under that actor's messages, e.g.
  ``SessionInbox = SyncNow | ApplyDelta | CloseSession``. The actor's
  receive channel is typed with it (``trio.MemoryReceiveChannel[SessionInbox]``),
  so mypy refuses a message sent to the wrong actor.
- Dispatch with ``match``, one ``case`` per class in the union, and end with
  ``case _: typing.assert_never(message)`` so that a message added to the
  union but not handled is a type error, not a silent drop.
- Fields use the domain's own types from ``vpblu.core.model`` (``Peer``,
  ``NodeDesiredState``, ``generation``), never a dict, never ``Any``: raw API
  dicts stop at the watcher boundary. Collections are tuples or frozensets.
- Put a validator (``attrs.field(validator=...)``) on any field where a wrong
  value can be built: a negative generation, an empty node name. The error
  then points at the sender, not at the actor that tripped over it later.
- Request/reply: the request carries its way back, a one-shot
  ``trio.MemorySendChannel`` (or a ``trio.Event`` when the answer is only
  "done"), created and closed by the asker. Never a callback.
- No private key, in any form (bytes, base64, a file's contents), ever
  appears in a message: messages are logged, repr'd and put in exceptions.
  Messages carry public keys and paths; the KeyStore alone reads key files.

Sections are headed with a comment naming the actor(s) whose inbox they
serve, in the order the actors are described in DESIGN.md.
"""

from __future__ import annotations

import attrs
import trio

from vpblu.core import wire
from vpblu.core.health import NodeHealth
from vpblu.core.model import (
    DEFAULT_MAX_CONCURRENT,
    Change,
    CidrPair,
    Condition,
    IPNetwork,
    NodeDesiredState,
    PodRange,
    Route,
    network,
)
from vpblu.core.sources import LastRotation, RotationRecord, Typed

# --- WatcherActor -> StateActor -----------------------------------------------------


@attrs.frozen(slots=True)
class InvalidSource:
    """An object the watcher could not type: reported as a status condition."""

    kind: str
    name: str
    generation: int
    message: str


@attrs.frozen(slots=True)
class KindListed:
    """The complete current set of one kind, after a (re)list.

    Level-triggered: the receiver replaces its whole view of `kind` with this,
    which is how deletions missed while a watch was down are noticed.
    """

    kind: str
    objects: tuple[Typed, ...]
    invalid: tuple[InvalidSource, ...]
    resource_version: str


@attrs.frozen(slots=True)
class KindChanged:
    """What one watch batch changed: upserted objects, deleted names, invalid ones."""

    kind: str
    upserted: tuple[Typed, ...]
    deleted: tuple[str, ...]
    invalid: tuple[InvalidSource, ...]
    resource_version: str


WatchMessage = KindListed | KindChanged


# --- LeaderActor -> whoever gates leader-only work ------------------------------------


@attrs.frozen(slots=True)
class LeaderObserved:
    """Who holds the Lease now, as this replica last saw it.

    `holder` None means nobody (never held, released, or expired). `address`
    is the holder's gRPC address, so a follower can redirect daemons there.
    """

    is_me: bool
    holder: str | None
    address: str | None
    # The Lease's leaseTransitions when this replica took it: every leader's
    # term is higher than the last one's, so generations stamped with it stay
    # monotonic across failovers (a daemon's genGuard would ignore a new
    # leader that started counting from 1).
    term: int = 0


# --- StateActor / NodeSessionActor -> StatusActor -----------------------------------


@attrs.frozen(slots=True)
class PublicKeyReported:
    """A daemon said (in its Hello) that this is its current public key."""

    node: str
    public_key: str


@attrs.frozen(slots=True)
class ObjectConditions:
    """The complete set of conditions one object should show now.

    Level-triggered: the StatusActor makes the object's status.conditions
    equal to this (keeping lastTransitionTime where a condition's status did
    not change), and writes nothing when it already is.
    """

    kind: str
    name: str
    generation: int
    conditions: tuple[Condition, ...]


@attrs.frozen(slots=True, eq=False)
class RotationStatus:
    """Make status.rotation of `node` this record (None: remove it), and publicKey /
    lastRotation when given; `written` is set once the API server has it (the
    RotationActor persists each step before sending it)."""

    node: str
    record: RotationRecord | None
    public_key: str | None = None
    last: LastRotation | None = None
    written: trio.Event = attrs.field(factory=trio.Event, repr=False)


@attrs.frozen(slots=True)
class ObjectDeleted:
    """`kind`/`name` is gone from the API: the StatusActor forgets what it
    wanted and last wrote there (a long-lived controller sees nodes come and
    go for months)."""

    kind: str
    name: str


@attrs.frozen(slots=True)
class NodeHealthReported:
    """What `node`'s VpbluNode status should say about its daemon (conditions
    Connected, Applied, Ready; peers up/total, applied generation, key age).
    Level-triggered, and already rate-limited by the HealthActor."""

    node: str
    health: NodeHealth


@attrs.frozen(slots=True)
class StatusObserved:
    """The API server shows `kind`/`name` at `resource_version` (a watch event):
    if that is not a version the StatusActor wrote, someone else wrote the
    object, and the status it owns is checked and, if changed, restored."""

    kind: str
    name: str
    resource_version: str


@attrs.frozen(slots=True)
class NodeGone:
    """The Node behind VpbluNode `node` is gone or was replaced (a new uid):
    its VpbluNode was deleted, and the key its daemon reported must be
    forgotten too, never written into a VpbluNode of a reused name.
    `deleted`: no Node of that name exists now. Until a `NodeRegistered`, no
    VpbluNode is made for it: the key a daemon still running there says is
    held by the StatusActor, not written (it would make the VpbluNode again)."""

    node: str
    deleted: bool = False


@attrs.frozen(slots=True)
class NodeRegistered:
    """A Node of that name exists again after a `NodeGone(deleted=True)`."""

    node: str


NodePresence = NodeGone | NodeRegistered

StatusInbox = (PublicKeyReported | ObjectConditions | RotationStatus | ObjectDeleted
               | NodeHealthReported | StatusObserved | NodeGone | NodeRegistered)


# --- StateActor <-> NodeSessionActor ------------------------------------------------


@attrs.frozen(slots=True)
class PushSync:
    """Send the node its whole desired state at `generation`."""

    generation: int
    state: NodeDesiredState


@attrs.frozen(slots=True)
class PushDelta:
    """Send the node `changes` taking it from `base_generation` to `generation`;
    `state` is the result, kept by the session for its periodic full resync."""

    generation: int
    base_generation: int
    changes: tuple[Change, ...]
    state: NodeDesiredState


@attrs.frozen(slots=True)
class PushRotationSteps:
    """Send the daemon key-rotation steps (not a desired state: no generation):
    every step the StateActor had for this node when it handed them over, one
    per rotation, so a batch of rotations costs one write per daemon and step."""

    steps: tuple[wire.RotationStep, ...]


SessionInbox = PushSync | PushDelta | PushRotationSteps


@attrs.frozen(slots=True, eq=False)
class SessionOpened:
    """A daemon's stream is up; `mailbox` reaches its NodeSessionActor.

    `session_id` tells two sessions of one node apart (a daemon that
    reconnects before its old stream is noticed dead): only the newest counts.
    `public_key` is the key the daemon said in its Hello: while this session
    is current, the key its peers are told (vpblu.core.keyanchors).
    """

    node: str
    session_id: int
    mailbox: trio.MemorySendChannel[SessionInbox]
    public_key: str | None = None


@attrs.frozen(slots=True)
class SessionClosed:
    node: str
    session_id: int


@attrs.frozen(slots=True)
class NodeAcked:
    """The daemon applied `generation` (or failed to, with `error`)."""

    node: str
    session_id: int
    generation: int
    error: str | None = None


# --- NodeSessionActor -> HealthActor -------------------------------------------------


@attrs.frozen(slots=True)
class SessionReport:
    """Everything one session knows about its daemon now (level-triggered: the
    newest report of the newest session replaces the rest). Sent when the
    session opens and closes, when it pushes or gets an ack, and with every
    batch from the daemon. `telemetry` is the latest this session received
    (None: none yet), `telemetry_at` when (trio's clock)."""

    node: str
    session_id: int
    connected: bool
    sent_generation: int = 0
    acked_generation: int = 0
    apply_error: str | None = None
    hello_key: str | None = None
    telemetry: wire.Telemetry | None = None
    telemetry_at: float = 0.0


@attrs.frozen(slots=True)
class NodeTelemetryView:
    """One node as the HealthActor holds it now: read-only, for the dashboard.
    `telemetry_age`: seconds since the telemetry came (trio's clock)."""

    node: str
    connected: bool
    telemetry: wire.Telemetry | None
    telemetry_age: float
    acked_generation: int
    apply_error: str | None


@attrs.frozen(slots=True)
class HealthSnapshot:
    nodes: tuple[NodeTelemetryView, ...]


@attrs.frozen(slots=True, eq=False)
class HealthSnapshotWanted:
    """Ask the HealthActor for what it holds (the dashboard, on the leader).
    The asker creates and closes `reply` (capacity 1)."""

    reply: trio.MemorySendChannel[HealthSnapshot]


HealthInbox = SessionReport | HealthSnapshotWanted


# --- RotationActor <-> StateActor / NodeSessionActor -----------------------------------


@attrs.frozen(slots=True)
class NodeRotationView:
    """What one node's RotationActor needs to know, level-triggered (from the StateActor)."""

    node: str
    public_key: str | None  # status.publicKey
    record: RotationRecord | None  # status.rotation
    last_rotation: LastRotation | None
    rotate_now: str | None  # the vpblu.io/rotate-now annotation
    schedule: str | None  # the cron schedule of the RotationPolicy covering the node
    # That policy's overlapSeconds: how long, once the node has switched, its
    # peers keep accepting both keys before Retire (0: no policy, on demand).
    overlap_seconds: float = 0.0
    # That policy's maxConcurrent: how many rotations may run in one batch with it.
    max_concurrent: int = DEFAULT_MAX_CONCURRENT


@attrs.frozen(slots=True)
class RotationViews:
    """Every node's NodeRotationView, sent when one changed (RotationActors start/stop
    with it). Built from the node's own objects only, so a node event costs O(N)
    here, not O(N * peers): who peers with a node is asked for (`PeersWanted`) when
    a rotation starts."""

    nodes: tuple[NodeRotationView, ...]


@attrs.frozen(slots=True)
class RotationResultReceived:
    """`node`'s daemon answered a rotation step."""

    node: str
    result: wire.RotationResult


@attrs.frozen(slots=True)
class RotationResultsReceived:
    """`node`'s daemon answered rotation steps: what one read from its stream
    held, passed on as one message (a daemon answers a batch's steps together)."""

    node: str
    results: tuple[wire.RotationResult, ...]


RotationInbox = NodeRotationView | RotationResultReceived
RotationsInbox = RotationViews | RotationResultReceived | RotationResultsReceived


@attrs.frozen(slots=True)
class SendRotationStep:
    """A RotationActor asks the StateActor (which holds the sessions) to pass a step
    on to each of `nodes` (one message for all of them: a step goes to every peer)."""

    nodes: tuple[str, ...]
    step: wire.RotationStep
    # Other rotations are in the same batch: their steps for the same nodes come
    # within moments (each after its own record is written), and may be held up to
    # STEP_GATHER to go with them, one message per node.
    gather: bool = False


@attrs.frozen(slots=True)
class RotationRecorded:
    """The leader's RotationActor persisted `record` for `node` (the API server
    confirmed it); None: the rotation ended, on `public_key` when given. The
    StateActor takes a rotating node's key from these, never from a status it
    reads back (vpblu.core.keyanchors)."""

    node: str
    record: RotationRecord | None
    public_key: str | None = None


@attrs.frozen(slots=True)
class PeersWanted:
    """A RotationActor asks the StateActor which nodes have `node` as a peer now
    (the nodes that must learn its new key); the answer goes to `reply`."""

    node: str
    reply: trio.MemorySendChannel[tuple[str, ...]] = attrs.field(eq=False, repr=False)


# --- StateActor -> PodRangesActor (vpblu/actors/podranges.py) ------------------------


@attrs.frozen(slots=True)
class RememberPodRanges:
    """Live Nodes' podCIDRs the pod-ranges ConfigMap does not hold yet: add them."""

    ranges: tuple[PodRange, ...]


StateInbox = (WatchMessage | SessionOpened | SessionClosed | NodeAcked | SendRotationStep
              | RotationResultReceived | RotationResultsReceived | PeersWanted
              | RotationRecorded)


# --- NetlinkActor (vpblu/node/netlink.py) ----------------------------------------


@attrs.frozen(slots=True)
class Applied:
    """What an apply changed. All empty: the kernel already matched."""

    peers_added: tuple[str, ...] = ()  # public keys
    peers_changed: tuple[str, ...] = ()
    peers_removed: tuple[str, ...] = ()
    routes_added: tuple[IPNetwork, ...] = ()
    routes_removed: tuple[IPNetwork, ...] = ()
    listen_port_changed: bool = False
    # Seconds each part took, in order ("device", "routes", "steering"): for the log.
    timings: tuple[tuple[str, float], ...] = attrs.field(default=(), eq=False)

    @property
    def changed_anything(self) -> bool:
        return bool(
            self.peers_added
            or self.peers_changed
            or self.peers_removed
            or self.routes_added
            or self.routes_removed
            or self.listen_port_changed
        )


@attrs.frozen(slots=True)
class ApplyFailed:
    """The apply stopped at an error; what was written before it stays."""

    error: str


ApplyOutcome = Applied | ApplyFailed


@attrs.frozen(slots=True)
class ApplyDesiredState:
    """Make the mesh interface's peers and the mesh table's routes match `state`.
    `whole`: it came as a whole SyncState, and what the kernel holds is read
    (False, a Delta's: what the last apply left may be taken as there)."""

    state: NodeDesiredState
    reply: trio.MemorySendChannel[ApplyOutcome] = attrs.field(eq=False, repr=False)
    whole: bool = attrs.field(default=True, kw_only=True)


@attrs.frozen(slots=True)
class RotationStepDone:
    """How one rotation step went: `error` None means done. `new_public_key` is
    the staged key's public half after a PREPARE."""

    error: str | None = None
    new_public_key: str = ""


@attrs.frozen(slots=True)
class RunRotationStep:
    """Do one step of a key rotation on this node (the NetlinkActor owns both the
    mesh interface and the rotation's bridge, so steps and applies never interleave)."""

    step: wire.RotationStep
    reply: trio.MemorySendChannel[RotationStepDone] = attrs.field(eq=False, repr=False)


@attrs.frozen(slots=True)
class DevicePeer:
    """One peer as the mesh interface holds it now (observed, not configured)."""

    public_key: str
    latest_handshake: int  # seconds since the epoch, 0: never
    rx_bytes: int
    tx_bytes: int
    endpoint: str  # "host:port", "" when WireGuard has none


@attrs.frozen(slots=True)
class MeshReading:
    """What the NetlinkActor's resources show now, for the daemon's telemetry."""

    public_key: str  # the key the interface uses
    key_created: float  # when that key's file was written (seconds since the epoch), 0 unknown
    rotation: str  # "Staged" (K' made, K active), "Activated" (K' active, K kept), "" none
    mtu: int  # of the mesh interface
    fail_closed_drops: int  # packets the fail-closed sink dropped
    peers: tuple[DevicePeer, ...]


@attrs.frozen(slots=True)
class ReadMesh:
    """Read the interface's peers, key and counters; never writes anything."""

    reply: trio.MemorySendChannel[MeshReading] = attrs.field(eq=False, repr=False)


NetlinkInbox = ApplyDesiredState | RunRotationStep | ReadMesh


# --- MtuActor (vpblu/node/mtu.py) -------------------------------------------------


@attrs.frozen(slots=True)
class MtuStatus:
    underlay_interface: str
    underlay_mtu: int
    mesh_mtu: int | None  # None: the mesh interface does not exist yet
    mss: int | None
    changed: bool


@attrs.frozen(slots=True)
class CheckMtu:
    """Re-check now instead of at the next period; the reply says what holds."""

    reply: trio.MemorySendChannel[MtuStatus] = attrs.field(eq=False, repr=False)


MtuInbox = CheckMtu


# --- daemon -> BpfMapActor ------------------------------------------------------------


def _routes(values: tuple[Route, ...] | list[Route]) -> tuple[Route, ...]:
    return tuple(sorted(values))


def _blocks(values: tuple[CidrPair, ...] | list[CidrPair]) -> tuple[CidrPair, ...]:
    return tuple(sorted(values))


def _cidrs(values: tuple[IPNetwork | str, ...] | list[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    return tuple(sorted({network(v) for v in values}, key=lambda n: (n.version, n.prefixlen, n)))


@attrs.frozen(slots=True)
class DataPathApplied:
    """What one ApplyDataPath wrote: `written` entries set, `deleted` removed.
    `refused` says why nothing was written (e.g. too many block rules)."""

    written: int
    deleted: int
    refused: str | None = None


@attrs.frozen(slots=True)
class ApplyDataPath:
    """The complete data-path policy this node's classifier should enforce now.

    Level-triggered: the BpfMapActor makes its pinned maps equal to this and
    writes only the entries that differ. `routes` are remote pod CIDRs (marked
    into the mesh); `local_cidrs` this node's own pod CIDRs; `cluster_cidrs`
    the whole cluster's pod ranges, which `strict` (fail-closed) uses to drop
    cluster traffic that has no remote route. `reply`, when given, receives one
    DataPathApplied.
    """

    routes: tuple[Route, ...] = attrs.field(default=(), converter=_routes)
    blocks: tuple[CidrPair, ...] = attrs.field(default=(), converter=_blocks)
    local_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_cidrs)
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_cidrs)
    strict: bool = False
    reply: trio.MemorySendChannel[DataPathApplied] | None = attrs.field(
        default=None, eq=False, repr=False
    )


@attrs.frozen(slots=True)
class ReadDataPathCounters:
    """Read the programs' counters (the fail-closed sink's is the NetlinkActor's)."""

    reply: trio.MemorySendChannel[wire.DataPathCounters] = attrs.field(eq=False, repr=False)


BpfMapInbox = ApplyDataPath | ReadDataPathCounters
