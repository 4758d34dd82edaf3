"""StateActor: the cluster snapshot, the desired state, and who needs what.

Owns the leader's view of the cluster (the latest typed object of every
watched kind), the desired state computed from it by the pure core, and, per
connected node, the generation and state last pushed to it. It sends each
NodeSessionActor only its own node's changes, and each object's conditions
to the StatusActor. It never talks to the API server or to a stream itself.

Invariants:
- Nothing is pushed to any node until every watched kind has been listed
  once. A new leader must not tell a daemon "you have no peers" just because
  its watchers have not caught up: that is the one way a controller
  failover could tear a working mesh down.
- Work is level-triggered: messages only mark the view dirty; after draining
  whatever is queued, the actor recomputes once. A burst of 1000 watch events
  costs one recompute, not 1000.
- Recomputes are paced by their own cost: the next one waits at least
  RECOMPUTE_SPACING times as long as the last one took (messages are handled
  meanwhile and coalesce into it). A recompute is O(N), and while 1000 Nodes
  register the watch batches come faster than that: one recompute per batch
  was O(N^2) and held 86 % of the controller's main thread (the leader's
  Lease, TLS accepts and acks waited behind it). A small cluster's recompute
  takes about a millisecond, so its changes still go out within one.
- Generations are `term << 32 | sequence`, where the term is the Lease's
  transition count when this replica became leader: they only grow, across
  failovers too, so a daemon's genGuard never ignores a new leader.
- A session that cannot take a push at once (its bounded mailbox is full: a
  slow daemon) never slows the others: the push is dropped, the node is
  marked, and it gets one fresh PushSync as soon as its mailbox has room.
- An object that becomes invalid keeps its last valid version in effect (and
  gets a condition saying so): a typo in a policy edit must not tear down a
  working mesh.
- A node that acknowledges with an error gets a full PushSync (it has not
  what we think it has), and no deltas meanwhile: at once after the first
  error (a refused delta is the protocol's way to ask for one), then after
  1 s, 2 s, 4 s ... up to a minute while its acks keep saying error, per
  node, across reconnects; a good ack ends it. A change of its desired state
  goes out sooner (at most once a second), since it may be the fix. Without
  this, a state every daemon refuses made every node resync in a tight loop.
- A connected node's peers are told the key its daemon said in its Hello
  (vpblu.core.keyanchors), not status.publicKey: a status anyone may patch
  never changes what peers hold while that daemon is connected.
- The pod ranges every node steers and guards (DataPath.cluster_cidrs) never
  shrink by themselves: a deleted Node's podCIDR stays one, remembered in a
  ConfigMap this leader reads before its first push (vpblu.core.podranges).
- Mid-rotation, a node's peers are told the key its rotation record says
  (`RotationRecord.published_key`: the old key until Retire; the record this
  leader's RotationActor recorded, `RotationRecorded`), not the key its
  daemon reports: an ordinary PeerChanged would swap the key in place and lose
  packets (vpblu/node/rotation.py).

It is also the leader's switchboard for rotations: it hands every node's
`NodeRotationView` to the RotationsActor after each recompute, passes a
RotationActor's `SendRotationStep` to the sessions of the nodes it names (every
step a node is owed goes as one message at the end of the actor's turn; dropped
when the node has no session, held while its mailbox is full), and passes
daemons' RotationResults back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import attrs
import trio

from vpblu.core import desiredstate, wire
from vpblu.core.changes import diff
from vpblu.core.convergence import ConvergenceTracker
from vpblu.core.keyanchors import KeyAnchors
from vpblu.core.model import (
    DEFAULT_MAX_CONCURRENT,
    BlockPolicy,
    Change,
    ClusterSnapshot,
    Condition,
    IPNetwork,
    NodeDesiredState,
    NodeInfo,
    RotationPolicy,
    RoutePolicy,
    TunnelPolicy,
)
from vpblu.core.podranges import CONFIG_MAP as POD_RANGES_CONFIG_MAP
from vpblu.core.podranges import PodRangeMemory
from vpblu.core.sources import (
    ROTATE_NOW_ANNOTATION,
    DaemonPodSource,
    NodeSource,
    PodRangesSource,
    PolicySource,
    Typed,
    VpbluNodeSource,
)
from vpblu.messages import (
    InvalidSource,
    KindChanged,
    KindListed,
    NodeAcked,
    NodeRotationView,
    ObjectConditions,
    ObjectDeleted,
    PeersWanted,
    PushDelta,
    PushRotationSteps,
    PushSync,
    RememberPodRanges,
    RotationRecorded,
    RotationResultReceived,
    RotationResultsReceived,
    RotationsInbox,
    RotationViews,
    SendRotationStep,
    SessionClosed,
    SessionInbox,
    SessionOpened,
    StateInbox,
    StatusInbox,
)
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)

P = TypeVar("P", TunnelPolicy, RoutePolicy, BlockPolicy, RotationPolicy)

SEQUENCE_BITS = 32
# How often nodes whose mailbox overflowed are offered their PushSync again.
RETRY_OVERFLOWED = 0.2
# Rotation steps held for a full mailbox: looked at this often, and a session
# holds at most this many (one per rotation: every slot of a batch and its own).
RETRY_OWED_STEPS = 0.05
MAX_OWED_STEPS = 2 * wire.MAX_ROTATION_SLOTS
# A step of a batch of rotations waits at most this long for the other members'
# steps to the same nodes (each member sends its own after its record is
# written: moments apart), so every daemon gets them in one message. A lone
# rotation's steps go at the end of the actor's turn.
STEP_GATHER = 0.05
# A rotation's key change (its record reached Retire, or it rolled back) waits
# this long for the other members' changes: one push per peer for the batch.
KEY_GATHER = 0.2
# A policy's Applied condition ("k/N nodes applied generation G") follows the
# nodes' acks at most this often: a change's acks from 1000 nodes arrive over
# a second or two and are one or two status writes, not one per ack batch. A
# quiet mesh changes no count and writes nothing.
APPLIED_REPORT_PERIOD = 1.0
# The policies whose effect reaches the nodes' desired states.
APPLIED_KINDS = ("TunnelPolicy", "RoutePolicy", "BlockPolicy")
# The resync of a node whose acks say error: the second waits this long, each
# next one twice as long, up to the maximum (the first goes at once).
RESYNC_BACKOFF_INITIAL = 1.0
RESYNC_BACKOFF_MAX = 60.0
# After a recompute that took d seconds, the next waits RECOMPUTE_SPACING * d
# (at most MAX_RECOMPUTE_WAIT): under a backlog recomputes take at most
# 1 / (1 + RECOMPUTE_SPACING) of the loop - half - and the rest is left to
# the sessions, the acks and the Lease's hand-over.
RECOMPUTE_SPACING = 1.0
MAX_RECOMPUTE_WAIT = 2.0


def resync_delay(errors: int) -> float:
    """How long after the last resync the next may go, after `errors` error
    acks in a row: 0, then RESYNC_BACKOFF_INITIAL doubling to RESYNC_BACKOFF_MAX."""
    if errors <= 1:
        return 0.0
    return min(RESYNC_BACKOFF_INITIAL * 2.0 ** min(errors - 2, 32), RESYNC_BACKOFF_MAX)

# The kinds whose status the StatusActor writes.
STATUS_KINDS = frozenset({"VpbluNode", "TunnelPolicy", "RoutePolicy", "BlockPolicy",
                          "RotationPolicy"})
# ConfigMap: the remembered pod ranges (vpblu.core.podranges), read before any push.
WATCHED_KINDS = ("Node", "VpbluNode", "TunnelPolicy", "RoutePolicy", "BlockPolicy",
                 "RotationPolicy", "Pod", "ConfigMap")


@attrs.define
class _Session:
    session_id: int
    mailbox: trio.MemorySendChannel[SessionInbox]
    sent_generation: int = 0
    sent_state: NodeDesiredState | None = None
    needs_sync: bool = True
    acked_generation: int = 0
    # Rotation steps not handed over yet, the latest per rotation: all of them
    # go as one PushRotationSteps at the end of the actor's turn, or as soon as
    # a full mailbox has room, ahead of any state push.
    owed_steps: dict[str, wire.RotationStep] = attrs.Factory(dict)
    fresh_steps: int = 0  # of those, steps not yet counted as deferred


@attrs.define
class _Failing:
    """A node whose acks say error, until one does not."""

    errors: int = 0  # error acks since its last good one
    worst: int = 0  # the highest generation it acked with an error
    resynced_at: float = -math.inf  # when its last resync went out
    due: float | None = None  # when its next resync goes (None: none is waiting)


@attrs.frozen(slots=True)
class StateStatistics:
    generation: int
    recomputes: int
    nodes: int
    sessions: int
    pushes: int
    overflows: int
    synced: bool
    resyncs_after_error: int = 0  # PushSyncs sent because a node acked an error
    failing: int = 0  # nodes whose last ack was an error
    last_recompute_seconds: float = 0.0  # what the last recompute cost (it paces the next)
    rotation_steps_deferred: int = 0  # steps held while a session's mailbox was full
    rotation_steps_dropped: int = 0  # steps not held (more rotations than slots): re-sent later


class StateActor:
    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel[StateInbox],
        status: trio.MemorySendChannel[StatusInbox],
        *,
        term: int,
        rotations: trio.MemorySendChannel[RotationsInbox] | None = None,
        service_cidrs: Sequence[IPNetwork] = (),
        metrics: ControllerMetrics | None = None,
        cluster_cidrs: Sequence[IPNetwork] = (),
        pod_ranges: trio.MemorySendChannel[RememberPodRanges] | None = None,
        cost_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._inbox = inbox
        self._metrics = metrics
        # What a recompute's cost is measured with: this thread's CPU time,
        # not the wall clock, which on a loaded host counts the time the
        # process was not even running and would double it in the wait (a
        # fake in actor tests, where trio's clock does not move during one).
        # And the earliest time on trio's clock the next recompute may start.
        self._cost_clock = cost_clock
        self._recompute_after = -math.inf
        self._last_recompute_cost = 0.0
        # Convergence (vpblu_convergence_seconds): when the first message that
        # made the view dirty arrived, and which nodes one recompute pushed to.
        self._convergence = ConvergenceTracker()
        self._dirty_since: float | None = None
        self._pushed_now: set[str] | None = None
        # The cluster's Service ranges, which no RoutePolicy route may cover.
        self._service_cidrs = tuple(service_cidrs)
        # The pod ranges named by the controller's configuration, the ones
        # remembered (vpblu.core.podranges) and where new ones are written.
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._pod_range_memory = PodRangeMemory()
        self._pod_ranges = pod_ranges
        self._failing: dict[str, _Failing] = {}
        self._resyncs_after_error = 0
        self._status = status
        self._rotations = rotations
        self._term = term
        self._sequence = 0
        self._objects: dict[str, dict[str, Typed]] = {k: {} for k in WATCHED_KINDS}
        self._invalid: dict[tuple[str, str], InvalidSource] = {}
        self._listed: set[str] = set()
        self._sessions: dict[str, _Session] = {}
        # The nodes whose session is owed a PushSync (`_Session.needs_sync`):
        # looked at after every batch of messages, and a batch is often one
        # ack, so finding them must not mean scanning all N sessions.
        self._unsynced: set[str] = set()
        # The nodes whose session holds rotation steps not handed over yet.
        self._owing_steps: set[str] = set()
        # When the held steps go (None: none held): at once, after STEP_GATHER
        # for a batch's, or RETRY_OWED_STEPS after a full mailbox refused them.
        self._steps_due: float | None = None
        self._steps_deferred = 0
        self._steps_dropped = 0
        self._result: desiredstate.DesiredResult | None = None
        self._node_infos: dict[str, tuple[NodeSource, VpbluNodeSource | None, str | None,
                                          NodeInfo]] = {}
        # Which key each node's peers are told (the trust anchor).
        self._anchors = KeyAnchors()
        self._sent_conditions: dict[tuple[str, str], ObjectConditions] = {}
        self._dirty = False
        self._recomputes = 0
        self._pushes = 0
        self._overflows = 0
        self._acks: dict[str, int] = {}
        # Rotation views per node with the VpbluNode object each was built from.
        self._views: dict[str, tuple[VpbluNodeSource | None, NodeRotationView]] = {}
        self._view_policies: list[RotationPolicy] = []
        self._sent_views: tuple[NodeRotationView, ...] = ()
        self._views_dirty = False  # a view's input changed, no desired state did
        self._daemon_conditions_cache: list[Condition] | None = None
        # Per policy: its metadata.generation and the desired-state generation
        # current when the leader took it in (a node that acked that, or is
        # caught up with all it was sent, has applied it).
        self._policy_since: dict[tuple[str, str], tuple[int, int]] = {}
        self._acks_moved = False
        self._applied_reported_at = -math.inf

    @property
    def generation(self) -> int:
        return (self._term << SEQUENCE_BITS) | self._sequence

    def statistics(self) -> StateStatistics:
        return StateStatistics(self.generation, self._recomputes, len(self._states()),
                               len(self._sessions), self._pushes, self._overflows,
                               self._synced, self._resyncs_after_error, len(self._failing),
                               self._last_recompute_cost, self._steps_deferred,
                               self._steps_dropped)

    def acked(self) -> Mapping[str, int]:
        """The generation each connected node last acknowledged."""
        return {n: s.acked_generation for n, s in self._sessions.items()}

    def _states(self) -> Mapping[str, NodeDesiredState]:
        return self._result.states if self._result is not None else {}

    @property
    def _synced(self) -> bool:
        return self._listed.issuperset(WATCHED_KINDS)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, self._status:
            task_status.started()
            while True:
                now = trio.current_time()
                wake = min(now + RETRY_OVERFLOWED if self._overflowed() else math.inf,
                           self._steps_due if self._steps_due is not None else math.inf,
                           self._next_resync(), self._next_applied_report(),
                           self._recompute_after if self._dirty and self._synced
                           else math.inf)
                message: StateInbox | None = None
                with trio.move_on_at(wake):
                    message = await self._inbox.receive()
                # Outside the deadline: a message is never cut off half handled.
                if message is not None:
                    await self._handle(message)
                if self._dirty and self._dirty_since is None:
                    self._dirty_since = trio.current_time()
                # Level-triggered: take everything already queued, then act once.
                while True:
                    try:
                        await self._handle(self._inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                # Rotation steps first, as they came: one message per node.
                if self._steps_due is not None and trio.current_time() >= self._steps_due:
                    self._hand_owed_steps()
                if (self._dirty and self._synced
                        and trio.current_time() >= self._recompute_after):
                    await self._recompute()
                elif self._views_dirty and self._result is not None:
                    self._views_dirty = False
                    await self._report_rotation_views()
                elif (self._acks_moved and self._result is not None
                      and trio.current_time() >= self._next_applied_report()):
                    await self._report_conditions(self._result.conditions)
                if self._synced:
                    self._release_resyncs()
                    self._push_pending_syncs()

    async def _forget_status(self, kind: str, names: Iterable[str]) -> None:
        for name in names:
            self._sent_conditions.pop((kind, name), None)
            if kind in STATUS_KINDS:
                await self._status.send(ObjectDeleted(kind, name))

    def _overflowed(self) -> bool:
        return bool(self._unsynced)

    async def _handle(self, message: StateInbox) -> None:
        match message:
            case KindListed(kind=kind, objects=objects, invalid=invalid):
                previous = self._objects[kind]
                fresh = {_name(o): o for o in objects}
                # An object that is invalid now but was valid before stays in
                # effect at its last valid version.
                for bad in invalid:
                    if bad.name in previous:
                        fresh[bad.name] = previous[bad.name]
                self._objects[kind] = fresh
                await self._forget_status(kind, previous.keys() - fresh.keys())
                self._invalid = {k: v for k, v in self._invalid.items() if k[0] != kind}
                self._invalid.update({(kind, b.name): b for b in invalid})
                self._listed.add(kind)
                self._dirty = True
                if kind == "VpbluNode":
                    self._anchors.listed(objects)
                if kind in ("Node", "Pod"):
                    self._daemon_conditions_cache = None
            case KindChanged(kind=kind, upserted=upserted, deleted=deleted, invalid=invalid):
                view = self._objects[kind]
                changed = bool(deleted or invalid)
                for obj in upserted:
                    name = _name(obj)
                    before = view.get(name)
                    view[name] = obj
                    was_invalid = self._invalid.pop((kind, name), None) is not None
                    # Our own status writes come back as events that change
                    # nothing we read (a new resourceVersion): at 1000 nodes a
                    # recompute each would double the work of every event.
                    if was_invalid or before is None:
                        changed = True
                    elif not changed and not _same(before, obj):
                        # A rotation's record, written before each of its steps
                        # (8 a rotation), keeps the key peers are told: only the
                        # rotation views change, not a desired state.
                        if self._rotation_only(name, before, obj):
                            self._views_dirty = True
                        else:
                            changed = True
                for name in deleted:
                    view.pop(name, None)
                    self._invalid.pop((kind, name), None)
                await self._forget_status(kind, deleted)
                for bad in invalid:
                    self._invalid[(kind, bad.name)] = bad
                if changed:
                    self._dirty = True
                    if kind in ("Node", "Pod"):
                        self._daemon_conditions_cache = None
            case SessionOpened(node=node, session_id=sid, mailbox=mailbox, public_key=key):
                old = self._sessions.get(node)
                if old is not None and old.session_id > sid:
                    return  # a stale open arriving after a newer one
                self._sessions[node] = _Session(sid, mailbox)
                self._unsynced.add(node)
                if key is not None and self._anchors.opened(node, sid, key):
                    self._dirty = self._dirty or self._key_moved(node)
            case SessionClosed(node=node, session_id=sid):
                current = self._sessions.get(node)
                vn = self._objects["VpbluNode"].get(node)
                uid = vn.meta.uid if isinstance(vn, VpbluNodeSource) else None
                if self._anchors.closed(node, sid, uid):
                    self._dirty = self._dirty or self._key_moved(node)
                if current is not None and current.session_id == sid:
                    del self._sessions[node]
                    self._acks_moved = True
                    self._unsynced.discard(node)
                    self._converged(self._convergence.forget(node, trio.current_time()))
            case SendRotationStep(nodes=nodes, step=step, gather=gather):
                for node in nodes:
                    session = self._sessions.get(node)
                    if session is not None:
                        self._owe_step(node, session, step)
                due = trio.current_time() + (STEP_GATHER if gather else 0.0)
                if self._owing_steps:
                    self._steps_due = due if self._steps_due is None else min(self._steps_due,
                                                                              due)
            case RotationRecorded(node=node, record=record, public_key=key):
                self._anchors.rotation_recorded(node, record, key)
                if self._key_moved(node):
                    # The members of a batch reach Retire together: their new
                    # keys go to every peer in one push, not one push each.
                    if not self._dirty:
                        self._recompute_after = max(self._recompute_after,
                                                    trio.current_time() + KEY_GATHER)
                    self._dirty = True
            case PeersWanted(node=node, reply=reply):
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                         trio.ClosedResourceError):
                    reply.send_nowait(self._peers_of(node))
            case RotationResultReceived() | RotationResultsReceived():
                if self._rotations is not None:
                    await self._rotations.send(message)
            case NodeAcked(node=node, session_id=sid, generation=gen, error=error):
                current = self._sessions.get(node)
                if current is not None and current.session_id == sid:
                    if error is None:
                        current.acked_generation = max(current.acked_generation, gen)
                        self._acks_moved = True
                        self._converged(self._convergence.acked(node, gen, trio.current_time()))
                        failing = self._failing.get(node)
                        if failing is not None and gen >= failing.worst:
                            del self._failing[node]
                    else:
                        if self._metrics is not None:
                            self._metrics.reconcile_errors.labels("daemon_apply").inc()
                        self._failed(node, current, gen, error)

    def _rotation_only(self, name: str, before: Typed, after: Typed) -> bool:
        """Whether `after` differs from `before` only in what the rotation views
        read (the rotation record, the last rotation, annotations), without
        changing the key `name`'s peers are told."""
        if not (isinstance(before, VpbluNodeSource) and isinstance(after, VpbluNodeSource)):
            return False
        same_rest = attrs.evolve(before, rotation=after.rotation,
                                 last_rotation=after.last_rotation,
                                 meta=attrs.evolve(before.meta,
                                                   annotations=after.meta.annotations))
        return (_same(same_rest, after) and self._anchors.published_key(name, before)
                == self._anchors.published_key(name, after))

    def _key_moved(self, node: str) -> bool:
        """Whether `node`'s peers would now be told another key than the last
        recompute told them (a reconnect with the same key costs no recompute:
        at N=1000 a connect storm is 1000 of them)."""
        cached = self._node_infos.get(node)
        if cached is None:
            return False  # not in the mesh yet: the recompute that adds it reads the key
        vn = self._objects["VpbluNode"].get(node)
        return cached[2] != self._anchors.published_key(
            node, vn if isinstance(vn, VpbluNodeSource) else None)

    def _converged(self, durations: list[float]) -> None:
        if self._metrics is not None:
            for seconds in durations:
                self._metrics.convergence.observe(seconds)

    def _failed(self, node: str, session: _Session, generation: int, error: str) -> None:
        """The node could not apply `generation`: whatever it has now is not
        what we think, so it gets a whole PushSync, and no deltas before it;
        when is `resync_delay` after its last one."""
        failing = self._failing.setdefault(node, _Failing())
        failing.errors += 1
        failing.worst = max(failing.worst, generation)
        due = max(trio.current_time(), failing.resynced_at + resync_delay(failing.errors))
        failing.due = due if failing.due is None else min(failing.due, due)
        log.warning("node %s could not apply generation %d: %s; a full resync in %.1f s",
                    node, generation, error, failing.due - trio.current_time())
        session.needs_sync = True
        self._unsynced.discard(node)

    def _next_resync(self) -> float:
        if not self._failing:
            return math.inf
        return min((f.due for f in self._failing.values() if f.due is not None),
                   default=math.inf)

    def _release_resyncs(self) -> None:
        """Owe a PushSync to each failing node whose resync is due."""
        if not self._failing:
            return
        now = trio.current_time()
        for node, failing in self._failing.items():
            if failing.due is None or failing.due > now:
                continue
            failing.due = None
            session = self._sessions.get(node)
            if session is None:
                continue  # its next session opens with a PushSync anyway
            failing.resynced_at = now
            self._resyncs_after_error += 1
            session.needs_sync = True
            self._unsynced.add(node)

    def snapshot(self) -> ClusterSnapshot:
        keys: dict[str, VpbluNodeSource] = {
            n: o for n, o in self._objects["VpbluNode"].items() if isinstance(o, VpbluNodeSource)}
        nodes = []
        for name, src in sorted(self._objects["Node"].items()):
            assert isinstance(src, NodeSource)
            vn = keys.get(name)
            key = self._anchors.published_key(name, vn)
            # NodeInfo validates keys and addresses: build it once per change
            # of its sources, not on every recompute of a 1000-node cluster.
            cached = self._node_infos.get(name)
            if cached is None or cached[0] is not src or cached[1] is not vn or cached[2] != key:
                info = NodeInfo(
                    name=name,
                    internal_ip=src.internal_ip,
                    pod_cidrs=src.pod_cidrs,
                    public_key=key,
                    endpoint_override=vn.endpoint if vn else None,
                )
                cached = (src, vn, key, info)
                self._node_infos[name] = cached
            nodes.append(cached[3])
        for gone in self._node_infos.keys() - self._objects["Node"].keys():
            del self._node_infos[gone]
        config_map = self._objects["ConfigMap"].get(POD_RANGES_CONFIG_MAP)
        self._pod_range_memory.follow(
            config_map if isinstance(config_map, PodRangesSource) else None,
            (src for src in self._objects["Node"].values() if isinstance(src, NodeSource)))
        return ClusterSnapshot(
            cluster_cidrs=self._cluster_cidrs,
            remembered_pod_ranges=self._pod_range_memory.ranges,
            nodes=nodes,
            tunnel_policies=self._policies("TunnelPolicy", TunnelPolicy),
            route_policies=self._policies("RoutePolicy", RoutePolicy),
            block_policies=self._policies("BlockPolicy", BlockPolicy),
            rotation_policies=self._policies("RotationPolicy", RotationPolicy),
        )

    def _policies(self, kind: str, cls: type[P]) -> list[P]:
        return [o.policy for _, o in sorted(self._objects[kind].items())
                if isinstance(o, PolicySource) and isinstance(o.policy, cls)]

    async def _recompute(self) -> None:
        started = self._cost_clock()
        self._dirty = False
        self._recomputes += 1
        seen, self._dirty_since = self._dirty_since or trio.current_time(), None
        self._pushed_now = set()
        snapshot = self.snapshot()
        self._remember_pod_ranges()
        previous = self._result
        if previous is None:
            self._result = desiredstate.compute(snapshot, service_cidrs=self._service_cidrs)
            changes: Mapping[str, tuple[Change, ...]] = {}
        else:
            recomputed = desiredstate.recompute(previous, snapshot,
                                                service_cidrs=self._service_cidrs)
            self._result = recomputed.result
            changes = recomputed.changes
        self._sequence += 1
        generation = self.generation
        states = self._states()
        for gone in self._failing.keys() - states.keys():
            del self._failing[gone]
        for node, session in self._sessions.items():
            if session.needs_sync or session.sent_state is None:
                failing = self._failing.get(node)
                if failing is not None and failing.due is not None and (
                        states.get(node) or NodeDesiredState(node)) != session.sent_state:
                    # New content may be the fix: it goes sooner than the
                    # backoff says, but at most once per initial delay.
                    failing.due = min(failing.due,
                                      failing.resynced_at + RESYNC_BACKOFF_INITIAL)
                continue  # a PushSync is owed anyway
            new = states.get(node) or NodeDesiredState(node)
            sent = session.sent_state
            if new is sent:
                continue
            if not _size(sent) or not _size(new):
                # From or to nothing (a mesh forming or going away): the whole
                # state is the delta, so it is sent as such, without a diff.
                if new != sent:
                    self._offer(node, session, PushSync(generation, new))
                continue
            old_state = previous.states.get(node) if previous is not None else None
            node_changes = changes.get(node, ()) if sent is old_state else diff(sent, new)
            if not node_changes:
                continue
            if whole_state_cheaper(len(node_changes), _size(new)):
                # A delta as long as the state it builds is sent as that
                # state: no more bytes, and the daemon replaces instead of
                # inserting one by one.
                self._offer(node, session, PushSync(generation, new))
            else:
                self._offer(node, session, PushDelta(generation, session.sent_generation,
                                                     node_changes, new))
        self._convergence.pushed(generation, seen, self._pushed_now)
        self._pushed_now = None
        # The cost is the part no other task runs in: the awaits below yield.
        cost = max(0.0, self._cost_clock() - started)
        if self._metrics is not None:
            self._metrics.generation.set(generation)
            self._metrics.nodes.set(len(self._states()))
            self._metrics.recomputes.inc()
            self._metrics.recompute_seconds.inc(cost)
        self._last_recompute_cost = cost
        self._recompute_after = trio.current_time() + min(cost * RECOMPUTE_SPACING,
                                                          MAX_RECOMPUTE_WAIT)
        await self._report_conditions(self._result.conditions)
        self._views_dirty = False
        await self._report_rotation_views()

    def _remember_pod_ranges(self) -> None:
        """Hand the writer the live podCIDRs its ConfigMap lacks (never waiting:
        a full mailbox or a writer restarting is tried at the next recompute)."""
        unsent = self._pod_range_memory.unsent()
        if unsent and self._pod_ranges is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                self._pod_ranges.send_nowait(RememberPodRanges(unsent))
                self._pod_range_memory.handed(unsent)

    async def _report_rotation_views(self) -> None:
        """Every node's rotation view, sent when one of them changed. A view is
        rebuilt only when its inputs (the VpbluNode object, the policies) are new
        objects, so a recompute of a quiet 1000-node cluster costs ~N lookups."""
        if self._rotations is None:
            return
        policies = self._policies("RotationPolicy", RotationPolicy)
        if policies != self._view_policies:
            self._view_policies = policies
            self._views.clear()
        views = []
        for name in sorted(self._objects["Node"]):
            vn = self._objects["VpbluNode"].get(name)
            source = vn if isinstance(vn, VpbluNodeSource) else None
            # A new rotation's K: the key the daemon said, not a patched status.
            key = self._anchors.current_key(name, source)
            cached = self._views.get(name)
            if cached is None or cached[0] is not source or cached[1].public_key != key:
                policy = next((p for p in policies if not p.nodes or name in p.nodes), None)
                cached = (source, NodeRotationView(
                    node=name,
                    public_key=key,
                    record=source.rotation if source else None,
                    last_rotation=source.last_rotation if source else None,
                    rotate_now=source.meta.annotation(ROTATE_NOW_ANNOTATION) if source else None,
                    schedule=policy.schedule if policy else None,
                    overlap_seconds=float(policy.overlap_seconds) if policy else 0.0,
                    max_concurrent=(policy.max_concurrent if policy
                                    else DEFAULT_MAX_CONCURRENT),
                ))
                self._views[name] = cached
            views.append(cached[1])
        for gone in self._views.keys() - self._objects["Node"].keys():
            del self._views[gone]
        sent = self._sent_views
        if len(views) == len(sent) and all(a is b for a, b in zip(views, sent, strict=True)):
            return
        self._sent_views = tuple(views)
        await self._rotations.send(RotationViews(self._sent_views))

    def _peers_of(self, node: str) -> tuple[str, ...]:
        # Peering is symmetric (Topology.is_neighbour): the nodes that have
        # `node` as a peer are exactly the peers in its own desired state.
        state = self._states().get(node)
        return tuple(p.name for p in state.peers) if state is not None else ()

    def _owe_step(self, node: str, session: _Session, step: wire.RotationStep) -> None:
        """Hold a rotation step for `node` until the end of this turn, a batch's up
        to STEP_GATHER (or, when the mailbox is full, until it has room): every step
        held for a node then goes as one message. The rotations of a batch reach a
        phase together, so each daemon gets one write with every member's step, not
        one per member; and a step lost here would wait out its rotation's resend
        interval (at N=1000 the mailboxes are often full of deltas)."""
        owed = session.owed_steps
        if step.rotation_id not in owed and len(owed) >= MAX_OWED_STEPS:
            self._steps_dropped += 1
            if self._metrics is not None:
                self._metrics.rotation_messages_dropped.labels("step").inc()
            return
        owed.pop(step.rotation_id, None)
        owed[step.rotation_id] = step  # the latest stamp of a rotation supersedes the rest
        session.fresh_steps += 1
        self._owing_steps.add(node)

    def _hand_owed_steps(self) -> None:
        for node in list(self._owing_steps):
            session = self._sessions.get(node)
            if session is None:
                self._owing_steps.discard(node)
                continue
            owed = session.owed_steps
            try:
                session.mailbox.send_nowait(PushRotationSteps(tuple(owed.values())))
            except trio.WouldBlock:
                # Held past the turn they came in: counted once each.
                self._steps_deferred += session.fresh_steps
                session.fresh_steps = 0
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the session is ending; the rotation re-sends to the next one
            owed.clear()
            session.fresh_steps = 0
            self._owing_steps.discard(node)
        # What a full mailbox refused is offered again shortly.
        self._steps_due = (trio.current_time() + RETRY_OWED_STEPS if self._owing_steps
                           else None)

    def _push_pending_syncs(self) -> None:
        for node in list(self._unsynced):
            session = self._sessions[node]
            state = self._states().get(node) or NodeDesiredState(node)
            self._offer(node, session, PushSync(self.generation, state))

    def _offer(self, node: str, session: _Session, push: PushSync | PushDelta) -> None:
        try:
            session.mailbox.send_nowait(push)
        except trio.WouldBlock:
            if not session.needs_sync:
                self._overflows += 1
                log.info("node %s is slow: dropping deltas, a full sync follows", node)
            session.needs_sync = True
            self._unsynced.add(node)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the session is ending; its SessionClosed is on the way
        self._pushes += 1
        if self._pushed_now is not None:
            self._pushed_now.add(node)
        if self._metrics is not None:
            self._metrics.pushes.labels("sync" if isinstance(push, PushSync) else "delta").inc()
        session.needs_sync = False
        self._unsynced.discard(node)
        session.sent_generation = push.generation
        session.sent_state = push.state

    def _daemon_conditions(self) -> list[Condition]:
        """Per node: is a vpblu daemon Pod bound to it? (No key yet is then explained.)
        Rebuilt only when a Node or a Pod changed."""
        if self._daemon_conditions_cache is None:
            self._daemon_conditions_cache = self._build_daemon_conditions()
        return self._daemon_conditions_cache

    def _build_daemon_conditions(self) -> list[Condition]:
        pods: dict[str, list[DaemonPodSource]] = {}
        for pod in self._objects["Pod"].values():
            if isinstance(pod, DaemonPodSource) and pod.node_name is not None:
                pods.setdefault(pod.node_name, []).append(pod)
        out = []
        for node in self._objects["Node"]:
            mine = sorted(pods.get(node, ()), key=lambda p: p.meta.name)
            if mine:
                text = ", ".join(f"pod {p.meta.name} is {p.phase}" for p in mine)
                out.append(Condition("VpbluNode", node, "DaemonScheduled", "True",
                                     "DaemonPod", text))
            else:
                out.append(Condition("VpbluNode", node, "DaemonScheduled", "False",
                                     "NoDaemonPod", "no vpblu daemon Pod is bound to this node"))
        return out

    def _next_applied_report(self) -> float:
        if not self._acks_moved or self._result is None:
            return math.inf
        return self._applied_reported_at + APPLIED_REPORT_PERIOD

    def _applied_conditions(self) -> list[Condition]:
        """Each policy's Applied condition: how many of the nodes in the desired
        state have applied its current generation (its metadata.generation)."""
        self._acks_moved = False
        self._applied_reported_at = trio.current_time()
        nodes = self._states().keys()
        since_by_node: dict[int, int] = {}
        out = []
        for kind in APPLIED_KINDS:
            for name, obj in self._objects.get(kind, {}).items():
                if (kind, name) in self._invalid:
                    continue  # its Accepted=False InvalidSpec says it all
                key, meta_generation = (kind, name), obj.meta.generation
                taken = self._policy_since.get(key)
                if taken is None or taken[0] != meta_generation:
                    taken = self._policy_since[key] = (meta_generation, self.generation)
                since = taken[1]
                applied = since_by_node.get(since)
                if applied is None:
                    applied = since_by_node[since] = sum(
                        1 for n in nodes if _has_applied(self._sessions.get(n), since))
                total = len(nodes)
                done = applied == total
                out.append(Condition(
                    kind, name, "Applied", "True" if done else "False",
                    "Applied" if done else "Pending",
                    f"{applied}/{total} nodes have applied generation {meta_generation}"))
        live = {(k, n) for k in APPLIED_KINDS for n in self._objects.get(k, {})}
        for gone in self._policy_since.keys() - live:
            del self._policy_since[gone]
        return out

    async def _report_conditions(self, conditions: tuple[Condition, ...]) -> None:
        by_object: dict[tuple[str, str], list[Condition]] = {}
        for cond in (*conditions, *self._daemon_conditions(), *self._applied_conditions()):
            by_object.setdefault((cond.kind, cond.name), []).append(cond)
        for (kind, name), bad in self._invalid.items():
            # What the operator must see is that the current edit was refused;
            # the core's verdict on the older version it still runs is moot.
            kept = name in self._objects.get(kind, {})
            suffix = " (its last valid version stays in effect)" if kept else ""
            by_object[(kind, name)] = [Condition(
                kind, name, "Accepted", "False", "InvalidSpec", bad.message + suffix)]
        for (kind, name), conds in by_object.items():
            generation = self._generation_of(kind, name)
            invalid = self._invalid.get((kind, name))
            if invalid is not None:
                generation = invalid.generation
            ordered = tuple(sorted(conds, key=_condition_order)) if len(conds) > 1 else tuple(
                conds)
            sent = self._sent_conditions.get((kind, name))
            if sent is not None and sent.generation == generation and sent.conditions == ordered:
                continue
            message = ObjectConditions(kind, name, generation, ordered)
            self._sent_conditions[(kind, name)] = message
            await self._status.send(message)

    def _generation_of(self, kind: str, name: str) -> int:
        obj = self._objects.get(kind, {}).get(name)
        return obj.meta.generation if obj is not None else 0


def _has_applied(session: _Session | None, since: int) -> bool:
    """The node acknowledged generation `since` or later, or everything it was
    sent (a change that left its state alone was not sent to it)."""
    if session is None or session.needs_sync or session.acked_generation == 0:
        return False
    return session.acked_generation >= since or (
        session.acked_generation >= session.sent_generation)


def _condition_order(c: Condition) -> tuple[str, str, str, str, str, str]:
    # Condition's own order (attrs' __lt__ is ~10x slower than a key sort).
    return c.kind, c.name, c.type, c.status, c.reason, c.message


def _same(old: Typed, new: Typed) -> bool:
    """`new` says what `old` said: only its resourceVersion moved, or its
    ownerReferences (which no desired state reads: the ownership actor sets
    them on every VpbluNode after its Node registered, and at N=1000 those
    writes overlapped a mesh's formation, a recompute each - 173 recomputes
    and 5 s of CPU in one formation)."""
    if old == new:
        return True
    if (old.meta.resource_version == new.meta.resource_version
            and old.meta.owners == new.meta.owners):
        return False
    moved = attrs.evolve(new.meta, resource_version=old.meta.resource_version,
                         owners=old.meta.owners)
    return attrs.evolve(new, meta=moved) == old


def whole_state_cheaper(changes: int, size: int) -> bool:
    """Whether a node's change goes as its whole state (PushSync) rather than a delta.

    A delta as long as the state it builds costs no fewer bytes, and the daemon then
    replaces instead of inserting one by one. (vpblu.lab.wholestate replaces this
    with `True` in its own process: the benchmark's baseline for what deltas save.)
    """
    return changes >= size


def _size(state: NodeDesiredState) -> int:
    return len(state.peers) + len(state.routes) + len(state.blocks)


def _name(obj: Typed) -> str:
    return obj.meta.name
