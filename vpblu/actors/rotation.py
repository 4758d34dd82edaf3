"""RotationActor: one node's key rotation, driven from the leader.

Owns the phase machine of one node R's key rotation (DESIGN §6, the mechanism
in vpblu/node/rotation.py): *when* it starts (the node's RotationPolicy cron
schedule, read with croniter in UTC, or a new value of the VpbluNode annotation
``vpblu.io/rotate-now``), and which step goes to which daemon next:

    Prepare     PREPARE to R (it stages K' and answers K'.pub)
    Distribute  DISTRIBUTE to every peer P
    Activate    ACTIVATE to R
    Retire      SWITCH_PEER to every P, RETIRE_ROTATING to R, RETIRE_PEER to every P
    rollback    ROLL_BACK_ROTATING to R, ROLL_BACK_PEER to every P, ABANDON_ROTATING to R

Between steps it waits for every involved daemon's RotationResult, re-sending
the step to the silent ones (steps are idempotent: a daemon that reconnected, or
a step lost with a stream, just runs it again) once the leader has been quiet for
`RESEND_INTERVAL`, doubling each round, until no daemon has answered the step for
`STEP_TIMEOUT` (a stall; a busy leader whose answers keep coming is not one). A
failure or stall before Retire rolls back; Retire and the
rollback only go forward, retrying with backoff until every daemon has done its
part, because stopping halfway would leave a node half-rotated.

Before each step is sent, the record (phase, step, rotation id, K and K'.pub,
the peers involved) is written to the VpbluNode's status and the write is
confirmed (`RotationPorts.persist`). A new leader reads it back and resumes:
Prepare and Distribute roll back, Activate is re-sent and carried on, Retire and
a rollback continue at the recorded step. The StateActor publishes R's key to
its peers from the same record (`RotationRecord.published_key`: K until Retire),
so an ordinary PeerChanged never swaps R's key in place.

A peer that joins while a rotation runs (a new node, or one whose peering began)
is brought in where it stands: before Activate, R is sent Prepare again (the
daemon makes its bridge's entries match its primary's peers, the newcomer's
included; K' stays) and the newcomer gets Distribute, so Activate finds every
peer on the bridge; after Activate, the newcomer holds K while R's primary
answers with K' only, and its Switch is all it needs (at once, during the
overlap window, which polls the peer set every `LATE_PEER_POLL`). The peer set
is read again before Activate and before each round of Switches, and the
record's peers grow with it, so a new leader resumes with the newcomers too.

Several nodes at a time, in batches (issue 24): the `RotationToken` forms a batch of
up to the RotationPolicy's maxConcurrent nodes from the triggers that arrive within
`BATCH_GATHER` of its first, gives each member a slot k (1..16), and the next batch
starts when the last member has finished. Why slots: a node's bridge is keyed for
one rotation (on R it holds K'_R; on a peer P, P's own key and one entry K'_R), so
each rotation of a batch has its own bridge on every node it touches,
``<interface>-rot`` (k = 1) or ``<interface>-rot<k>``, on listenPort + k; the slot
travels in every step (RotationStep.slot) and in the record. Why barriers: two
members that peer each other (every pair does in a FullMesh) are each other's peers,
and their steps are only safe in phase order across the batch -
  - every member's Distribute before any member's Activate: a member distributes
    for the others with the key its primary holds, and Activate re-keys it (a
    bridge made after it would carry K' where the other's bridge expects K);
  - every Activate before any Swap, every Swap before any Switch: Switch on P
    handshakes P's primary (K'_P) with R's (K'_R), which answers only once R's
    primary holds K'_P, and a daemon runs one step at a time, so two members'
    Switches would wait on each other; Swap (SWAP_PEER, sent to the members among
    R's peers) only replaces R's entry K -> K' on their primaries, safe because
    their routes to R are on R's slot's bridge since Distribute.
A member whose step fails leaves the barriers (nobody waits for it) and rolls back
in its own slot while the others go on; its rollback's handshakes with activated
members succeed once their Swap has given its primary their new keys, and roll back
steps retry until they do. Each member's steps are stamped from the leader's one
sequence, so a daemon's StepGuard orders stamps per slot (vpblu/node/stepguard.py).
With maxConcurrent 1 a batch is one node and every step is what it was before
batches: Swap is sent to nobody.

The cost: a rotation is bound by the leader's CPU, not by waiting. The benchmark
(bench/results, the rotation scenario) measured, one node at a time, the
controller busy for most of each rotation's time: N=100, 20.4 s of its CPU in
26.7 s for all 100 nodes; N=1000, 36.9 s in 42.3 s for a sample of 20 (1.85 s of
CPU per rotated node). Part of that is paid per second, not per rotation, and a
batch shares it: sampled with py-spy during the N=1000 rotation, about 30% of the
controller was decoding telemetry and evaluating health (1000 daemons reporting
1000 peers each every 10 s). The rest (steps and results on the streams, status
writes, pushes) a batch now shares where it can: a member hands the StateActor one
message per step for all its peers, the StateActor gathers the batch's steps for
one node (STEP_GATHER in vpblu/actors/state.py) into one message and one write,
the daemon answers them together, and the members' new keys wait for each other
(KEY_GATHER) so a peer gets one push per batch. Measured at N=1000 in batches of
8: 0.85-1.2 s of the leader's CPU per rotated node, against 2.3 s one at a time
(README, the rotation scenario); each member still writes its own records and
its peers still run its O(N) steps, so a whole cluster of 1000 takes 17-24 min.

It never sees a private key (K' is made on R and only K'.pub comes back), and
it never talks to the API server or a stream itself: its `RotationPorts` do
(the StatusActor and the StateActor).
"""

from __future__ import annotations

import datetime
import logging
import math
import secrets
from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
import trio
from croniter import croniter

from vpblu.core import wire
from vpblu.core.sources import LastRotation, RotationPhase, RotationRecord
from vpblu.messages import (
    NodeRotationView,
    RotationInbox,
    RotationResultReceived,
)

log = logging.getLogger(__name__)

Step = wire.RotationStepKind

# A step stalls when no daemon has answered it for this long: a forward step then
# rolls back, Retire and a rollback try again.
STEP_TIMEOUT = 60.0
RESEND_INTERVAL = 5.0  # unanswered steps go again once the leader is quiet this long
RETRY_INITIAL = 1.0  # Retire and rollback steps retry forever, backing off to RETRY_MAX
RETRY_MAX = 30.0
SEQUENCE_BITS = 32
# Views and results for one node; a full mailbox drops a view (the next one is
# newer) or a result (the step is re-sent and answered again).
ROTATION_MAILBOX = 64
SCHEDULE_TRIGGER = "schedule"
PEERS_TIMEOUT = 10.0
# Peers that join mid-rotation: how often the peer set is read again at one point of
# the rotation (each round brings in what joined during the previous one), and how
# often bringing them in is tried before the rotation rolls back.
LATE_PEER_ROUNDS = 5
LATE_PEER_POLL = 1.0  # during the overlap window, how often the peer set is read
LATE_PEER_RETRIES = 4


class RotationPorts(Protocol):
    """How a RotationActor reaches the world: the StatusActor and the sessions."""

    async def persist(self, node: str, record: RotationRecord | None, *,
                      public_key: str | None = None, last: LastRotation | None = None) -> None:
        """Write status.rotation (None: remove it), and publicKey / lastRotation when
        given; return once the API server has it."""
        ...

    async def send_step(self, nodes: Sequence[str], step: wire.RotationStep, *,
                        gather: bool = False) -> None:
        """Offer `step` to each of `nodes`' daemons; silently nothing for one that is
        not connected. `gather`: other rotations of the batch send theirs too, and
        the steps for one node may wait a moment to go together."""
        ...

    async def peers_of(self, node: str) -> tuple[str, ...]:
        """The nodes whose desired state has `node` as a peer now (they must learn
        its new key); raises PeersUnknown if that cannot be learnt."""
        ...

    def wall_clock(self) -> float:
        """Seconds since the epoch (cron schedules are wall-clock times)."""
        ...


# The batch's barriers (RotationToken.barrier): a member says it has reached one, and
# goes on once every other member has too (or has left the batch).
GATE_ACTIVATE = 1  # every member's Distribute is done: Activate
GATE_SWAP = 2  # every member has activated (and waited out its overlap): Swap
GATE_SWITCH = 3  # every member's Swap is done: the Switches, then Retire
# How long a batch takes members after its first one (the others' triggers arrive
# within moments of each other: a schedule, or rotate-now set on many nodes).
BATCH_GATHER = 2.0


class RotationToken:
    """Which nodes rotate now (one batch at a time across the cluster), their slots,
    the barriers between the batch's phases, and the leader's one sequence of step
    stamps (shared by the leader's RotationActors).

    A batch takes members for `BATCH_GATHER` seconds after its first one, up to the
    smallest maxConcurrent among them (and `limit`); the next batch starts when every
    member has finished (completed or rolled back). Each member holds a slot, 1..16:
    its bridges on every node it touches (vpblu/node/rotation.py BridgeLayout), so
    two members never share a bridge. What makes members safe together although they
    peer each other (every pair does in a FullMesh) is the order of their phases:
    every member's Distribute is done before any member activates (a rotating node
    distributes with the key its primary holds, which must still be the old one),
    every member has activated before any Swap (a member's entry for another member
    on its primary goes K -> K' while its routes to that member are on a bridge), and
    every Swap is done before any Switch (whose handshake needs both primaries to
    hold each other's new key). A member that fails leaves the batch's barriers and
    rolls back on its own slot, while the others go on.

    A daemon refuses a step stamped below the highest it has seen in the step's slot
    (or of an older term), so the sequence rises across all the leader's rotations.
    """

    def __init__(self, limit: int = 1, gather: float = BATCH_GATHER) -> None:
        if not 1 <= limit <= wire.MAX_ROTATION_SLOTS:
            raise ValueError(f"a batch holds 1..{wire.MAX_ROTATION_SLOTS} rotations")
        self._limit = limit
        self._gather = gather
        self._sequence = 0
        self._members: dict[str, int] = {}  # node -> slot
        self._limits: dict[str, int] = {}
        self._gates: dict[str, int] = {}
        self._left: set[str] = set()
        self._admit_until = 0.0
        self._closed = True
        self._changed = trio.Event()
        self._last_answer_at = -math.inf
        self.batches = 0
        self.largest_batch = 0

    @property
    def holder(self) -> str | None:
        """The batch's first member (with a limit of 1, the one rotating node)."""
        return next(iter(self._members), None)

    @property
    def members(self) -> dict[str, int]:
        """The current batch: node -> slot."""
        return dict(self._members)

    @property
    def last_answer_at(self) -> float:
        """When the last answer to any rotation step reached the leader (-inf: none)."""
        return self._last_answer_at

    def answer_seen(self) -> None:
        self._last_answer_at = trio.current_time()

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _capacity(self) -> int:
        return min([self._limit, *self._limits.values()])

    def _admitting(self) -> bool:
        return not self._closed and trio.current_time() < self._admit_until

    def _may_join(self, limit: int, slot: int | None) -> bool:
        if not self._members:
            return True
        if slot is not None:
            # A rotation a previous leader left: it has its slot, and must finish.
            return self._admitting() and slot not in self._members.values()
        return self._admitting() and len(self._members) < min(self._capacity(), limit)

    async def acquire(self, node: str, limit: int = 1, *, slot: int | None = None,
                      gate: int = 0) -> int:
        """Join a batch (waiting for the next one if need be) and return the slot.
        `slot`: the one a resumed rotation holds; `gate`: the barrier it has passed."""
        while not self._may_join(limit, slot):
            await self._changed.wait()
        if not self._members:
            self._closed = False
            self._admit_until = trio.current_time() + self._gather
            self.batches += 1
        if slot is None:
            slot = min(set(range(1, wire.MAX_ROTATION_SLOTS + 1)) - set(self._members.values()))
            self._limits[node] = limit
        self._members[node] = slot
        self._gates[node] = gate
        self.largest_batch = max(self.largest_batch, len(self._members))
        if len(self._members) >= self._capacity():
            self._closed = True
        self._notify()
        return slot

    async def barrier(self, node: str, gate: int) -> None:
        """Until every other member of the batch has reached `gate` or left it; no
        member passes a barrier while the batch still takes members."""
        self._gates[node] = max(self._gates.get(node, 0), gate)
        self._notify()
        while True:
            if self._admitting():
                with trio.move_on_at(self._admit_until):
                    await self._changed.wait()
                continue
            self._closed = True
            if all(self._gates.get(m, 0) >= gate or m in self._left
                   for m in self._members if m != node):
                return
            await self._changed.wait()

    def leave(self, node: str) -> None:
        """`node`'s rotation failed: nobody waits for it at a barrier any more (it rolls
        back in its own slot, which it holds until `release`)."""
        self._left.add(node)
        self._notify()

    def release(self, node: str) -> None:
        """`node` has finished; its slot is free, and the batch ends with its last."""
        self._members.pop(node, None)
        self._limits.pop(node, None)
        self._gates.pop(node, None)
        self._left.discard(node)
        if not self._members:
            self._closed = True
        self._notify()


@attrs.frozen(slots=True)
class RotationSettings:
    term: int = 0
    step_timeout: float = STEP_TIMEOUT
    resend_interval: float = RESEND_INTERVAL


class PeersUnknown(Exception):
    """The StateActor did not say who peers with the node (it was restarting)."""


class StepFailed(Exception):
    """A daemon refused a step, or did not answer in time."""


@attrs.frozen(slots=True)
class RotationStatistics:
    completed: int
    rolled_back: int
    phase: RotationPhase | None
    results_dropped: int = 0  # answers to no step this actor is waiting for


def next_fire(schedule: str, after: float) -> float:
    """The first time the 5-field cron `schedule` fires after `after` (UTC, epoch s)."""
    start = datetime.datetime.fromtimestamp(after, datetime.UTC)
    fire: datetime.datetime = croniter(schedule, start).get_next(datetime.datetime)
    return fire.timestamp()


class RotationActor:
    def __init__(self, node: str, ports: RotationPorts, token: RotationToken,
                 inbox: trio.MemoryReceiveChannel[RotationInbox],
                 settings: RotationSettings = RotationSettings()) -> None:
        self._node = node
        self._ports = ports
        self._token = token
        self._inbox = inbox
        self._settings = settings
        self._view: NodeRotationView | None = None
        self._view_changed = trio.Event()
        # Answers to the step in flight, at most one per node (the latest): a
        # result for any other rotation or stamp (a stale resend, a confused
        # or hostile daemon) is dropped on arrival, so nothing piles up here
        # between rotations or while a step waits.
        self._awaiting: tuple[str, int] | None = None  # (rotation_id, stamp)
        self._results: dict[str, RotationResultReceived] = {}
        self._results_dropped = 0
        self._result_arrived = trio.Event()
        self._record: RotationRecord | None = None
        self._completed = 0
        self._rolled_back = 0
        self._handled_triggers: set[str] = set()
        self._slot = 1  # the batch slot of the rotation in progress

    def statistics(self) -> RotationStatistics:
        return RotationStatistics(self._completed, self._rolled_back,
                                  self._record.phase if self._record else None,
                                  self._results_dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, trio.open_nursery() as nursery:
            nursery.start_soon(self._receive)
            task_status.started()
            await self._drive()
            nursery.cancel_scope.cancel()

    async def _receive(self) -> None:
        async for message in self._inbox:
            match message:
                case NodeRotationView():
                    self._view = message
                    self._view_changed.set()
                    self._view_changed = trio.Event()
                case RotationResultReceived(node=node, result=result):
                    self._token.answer_seen()
                    if self._awaiting != (result.rotation_id, result.stamp):
                        self._results_dropped += 1
                        continue
                    self._results[node] = message
                    self._result_arrived.set()
                    self._result_arrived = trio.Event()

    async def _current_view(self) -> NodeRotationView:
        while self._view is None:
            await self._view_changed.wait()
        return self._view

    async def _drive(self) -> None:
        view = await self._current_view()
        if view.last_rotation is not None:
            self._handled_triggers.add(view.last_rotation.trigger)
        if view.record is not None:
            # A rotation a previous leader left: finish it before anything else, in
            # the slot it holds (its bridges have that slot's names and ports).
            self._handled_triggers.add(view.record.trigger)
            record = view.record
            passed = (GATE_SWITCH if record.phase is RotationPhase.RETIRE
                      else GATE_ACTIVATE if record.phase is RotationPhase.ACTIVATE else 0)
            self._slot = await self._token.acquire(
                self._node, wire.MAX_ROTATION_SLOTS, slot=record.slot, gate=passed)
            try:
                await self._resume(record)
            finally:
                self._token.release(self._node)
        since = self._ports.wall_clock()
        while True:
            trigger = await self._wait_for_trigger(since)
            self._handled_triggers.add(trigger)
            limit = (await self._current_view()).max_concurrent
            self._slot = await self._token.acquire(self._node, limit)
            try:
                view = await self._current_view()
                peers = await self._peers() if view.public_key is not None else ()
                if not peers:
                    log.info("node %s: no key or no peers yet; rotation skipped", self._node)
                    self._token.leave(self._node)
                else:
                    await self._rotate(view, trigger, peers)
            finally:
                self._token.release(self._node)
            since = self._ports.wall_clock()

    async def _wait_for_trigger(self, since: float) -> str:
        """Until the schedule fires or a new rotate-now value appears."""
        while True:
            view = await self._current_view()
            if view.rotate_now and view.rotate_now not in self._handled_triggers:
                return view.rotate_now
            deadline = float("inf")
            if view.schedule:
                fire = next_fire(view.schedule, since)
                deadline = trio.current_time() + max(0.0, fire - self._ports.wall_clock())
            changed = self._view_changed
            with trio.move_on_at(deadline):
                await changed.wait()
                continue
            return f"{SCHEDULE_TRIGGER}@{int(self._ports.wall_clock())}"

    # --- one rotation -----------------------------------------------------------------

    async def _peers(self) -> tuple[str, ...]:
        try:
            return await self._ports.peers_of(self._node)
        except PeersUnknown as exc:
            log.warning("node %s: %s", self._node, exc)
            return ()

    async def _rotate(self, view: NodeRotationView, trigger: str,
                      peers: tuple[str, ...]) -> None:
        assert view.public_key is not None
        record = RotationRecord(
            rotation_id=f"{secrets.token_hex(6)}", phase=RotationPhase.PREPARE,
            step=Step.PREPARE, old_public_key=view.public_key, peers=tuple(sorted(peers)),
            trigger=trigger, slot=self._slot)
        log.info("node %s: rotation %s starts (%s), %d peers, slot %d", self._node,
                 record.rotation_id, trigger, len(record.peers), self._slot)
        try:
            answers = await self._forward(record, RotationPhase.PREPARE, Step.PREPARE,
                                          [self._node])
            new_key = answers[self._node].new_public_key
            if not new_key or new_key == record.old_public_key:
                raise StepFailed(f"{self._node} staged no new key")
            record = attrs.evolve(record, new_public_key=new_key)
            await self._forward(record, RotationPhase.DISTRIBUTE, Step.DISTRIBUTE, record.peers)
            record = await self._bring_in_late_peers(record)
            await self._token.barrier(self._node, GATE_ACTIVATE)
            await self._forward(record, RotationPhase.ACTIVATE, Step.ACTIVATE, [self._node])
        except StepFailed as exc:
            self._token.leave(self._node)
            await self._roll_back(self._record or record, str(exc))
            return
        if view.overlap_seconds > 0:
            # The overlap window: R sends with K' and every peer still accepts
            # K too. Nothing is lost by waiting; it gives traffic that set out
            # under K (and slow handshakes) time to finish before K is dropped.
            log.info("node %s: rotation %s active; peers accept both keys for %.0fs",
                     self._node, record.rotation_id, view.overlap_seconds)
            record = await self._overlap(record, view.overlap_seconds)
        await self._token.barrier(self._node, GATE_SWAP)
        await self._retire(record, Step.SWAP_PEER)

    async def _overlap(self, record: RotationRecord, seconds: float) -> RotationRecord:
        """Wait out the overlap window; a peer that joins meanwhile gets its Switch at
        once (R's primary answers with K' only, so until then it cannot reach R)."""
        deadline = trio.current_time() + seconds
        while (left := deadline - trio.current_time()) > 0:
            await trio.sleep(min(left, LATE_PEER_POLL))
            grown = await self._with_current_peers(record)
            late = [p for p in grown.peers if p not in record.peers]
            if late:
                # Still the Activate phase: peers are published K until Retire.
                await self._until_done(grown, RotationPhase.ACTIVATE, Step.SWITCH_PEER, late)
                record = grown
        return record

    async def _resume(self, record: RotationRecord) -> None:
        log.info("node %s: resuming rotation %s at %s/%s", self._node, record.rotation_id,
                 record.phase.value, record.step.name)
        self._record = record
        match record.phase:
            case RotationPhase.PREPARE | RotationPhase.DISTRIBUTE:
                self._token.leave(self._node)
                await self._roll_back(record, f"leader changed during {record.phase.value}")
            case RotationPhase.ACTIVATE:
                try:
                    await self._forward(record, RotationPhase.ACTIVATE, Step.ACTIVATE,
                                        [self._node])
                except StepFailed as exc:
                    self._token.leave(self._node)
                    await self._roll_back(self._record or record, str(exc))
                    return
                await self._token.barrier(self._node, GATE_SWAP)
                await self._retire(record, Step.SWAP_PEER)
            case RotationPhase.RETIRE:
                await self._retire(record, record.step)
            case RotationPhase.ROLLING_BACK:
                self._token.leave(self._node)
                await self._roll_back(record, "resumed by a new leader", start=record.step)

    async def _retire(self, record: RotationRecord, start: Step) -> None:
        if _rank(start) <= _rank(Step.SWAP_PEER):
            # Peers rotating in the same batch hold this node's old key on a primary
            # that already has their own new one: each swaps the entry (its routes to
            # this node are on this slot's bridge) before any Switch handshakes.
            batch = self._token.members
            swapping = [p for p in record.peers if p in batch and p != self._node]
            if swapping:
                await self._until_done(record, RotationPhase.RETIRE, Step.SWAP_PEER, swapping)
            await self._token.barrier(self._node, GATE_SWITCH)
        if _rank(start) <= _rank(Step.SWITCH_PEER):
            # Peers that joined after Activate hold K for this node while its primary
            # already answers with K' only: their switch is all they need (their
            # primary takes K', and this node's primary has them since they joined).
            # Every peer is switched here, also one switched during the overlap: the
            # step is idempotent, and an apply of K (published until Retire) may have
            # put the old entry back on it since.
            switched: set[str] = set()
            for _ in range(LATE_PEER_ROUNDS):
                record = await self._with_current_peers(record)
                todo = [p for p in record.peers if p not in switched]
                if not todo:
                    break
                await self._until_done(record, RotationPhase.RETIRE, Step.SWITCH_PEER, todo)
                switched.update(todo)
        order = [(Step.RETIRE_ROTATING, (self._node,)), (Step.RETIRE_PEER, record.peers)]
        steps = [s for s in order if _rank(s[0]) >= _rank(start)]
        for step, nodes in steps:
            await self._until_done(record, RotationPhase.RETIRE, step, nodes)
        await self._ports.persist(self._node, None, public_key=record.new_public_key, last=(
            LastRotation(record.rotation_id, "Completed", record.trigger,
                         self._ports.wall_clock())))
        self._record = None
        self._completed += 1
        log.info("node %s: rotation %s completed (new key %s)", self._node,
                 record.rotation_id, record.new_public_key)

    async def _roll_back(self, record: RotationRecord, reason: str,
                         start: Step = Step.ROLL_BACK_ROTATING) -> None:
        log.warning("node %s: rotation %s rolls back: %s", self._node, record.rotation_id, reason)
        order = [(Step.ROLL_BACK_ROTATING, (self._node,)), (Step.ROLL_BACK_PEER, record.peers),
                 (Step.ABANDON_ROTATING, (self._node,))]
        for step, nodes in [s for s in order if _rank(s[0]) >= _rank(start)]:
            await self._until_done(record, RotationPhase.ROLLING_BACK, step, nodes)
        await self._ports.persist(self._node, None, public_key=record.old_public_key, last=(
            LastRotation(record.rotation_id, "RolledBack", record.trigger,
                         self._ports.wall_clock(), reason[:1000])))
        self._record = None
        self._rolled_back += 1

    # --- peers that join while the rotation runs -----------------------------------------

    async def _with_current_peers(self, record: RotationRecord) -> RotationRecord:
        """`record` with every node that peers with this one now added to its peers
        (never removed: a peer that left just answers its steps with nothing to do, or
        is not connected, and a removed entry is pruned by the ordinary apply)."""
        try:
            now = await self._ports.peers_of(self._node)
        except PeersUnknown as exc:
            log.warning("node %s: %s; the rotation's peers stay as they were", self._node, exc)
            return record
        late = set(now) - set(record.peers)
        if not late:
            return record
        log.info("node %s: rotation %s: %s joined while it runs", self._node,
                 record.rotation_id, ", ".join(sorted(late)))
        return attrs.evolve(record, peers=tuple(sorted({*record.peers, *late})))

    async def _bring_in_late_peers(self, record: RotationRecord) -> RotationRecord:
        """Before Activate moves every route of this node into its bridge, every peer
        must be on that bridge and have its own (Distribute). A peer that joined since
        Prepare is on neither: Prepare again (idempotent on the daemon: the same K',
        and the bridge's entries made to match the primary's peers, the new one
        included), then Distribute to the newcomers. The daemon learns a newcomer
        from its desired state a moment after the controller does, so a refusal is
        retried (`LATE_PEER_RETRIES`) before it fails the rotation (and rolls back)."""
        for _ in range(LATE_PEER_ROUNDS):
            grown = await self._with_current_peers(record)
            late = [p for p in grown.peers if p not in record.peers]
            if not late:
                return record
            delay = RETRY_INITIAL
            for attempt in range(LATE_PEER_RETRIES):
                try:
                    answers = await self._forward(grown, RotationPhase.PREPARE, Step.PREPARE,
                                                  [self._node])
                    if answers[self._node].new_public_key != grown.new_public_key:
                        raise StepFailed(f"{self._node} staged another key on Prepare again")
                    await self._forward(grown, RotationPhase.DISTRIBUTE, Step.DISTRIBUTE,
                                        late)
                    break
                except StepFailed as exc:
                    if attempt + 1 == LATE_PEER_RETRIES:
                        raise
                    log.warning("node %s: rotation %s: bringing in %s: %s; again in %.0fs",
                                self._node, grown.rotation_id, ", ".join(late), exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            record = grown
        return record

    # --- steps --------------------------------------------------------------------------

    def _stamp(self) -> int:
        return (self._settings.term << SEQUENCE_BITS) | self._token.next_sequence()

    async def _forward(self, record: RotationRecord, phase: RotationPhase, step: Step,
                       nodes: Iterable[str]) -> dict[str, wire.RotationResult]:
        """Persist, send, wait for every answer; StepFailed on an error or a stall."""
        return await self._step(record, phase, step, nodes, {})

    async def _until_done(self, record: RotationRecord, phase: RotationPhase, step: Step,
                          nodes: Iterable[str]) -> None:
        """Persist, send, and keep at it (backing off) until every node has done it.
        A node that answered an attempt has done the step: the next attempt is only
        for the others."""
        delay = RETRY_INITIAL
        pending = tuple(nodes)
        answers: dict[str, wire.RotationResult] = {}
        while True:
            try:
                await self._step(record, phase, step, pending, answers)
                return
            except StepFailed as exc:
                log.warning("node %s: rotation %s %s: %s; retrying in %.0fs", self._node,
                            record.rotation_id, step.name, exc, delay)
            pending = tuple(n for n in pending if n not in answers)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _step(self, record: RotationRecord, phase: RotationPhase, step: Step,
                    nodes: Iterable[str],
                    answers: dict[str, wire.RotationResult]) -> dict[str, wire.RotationResult]:
        """One step to `nodes`, answers into `answers` as they come (kept when it
        fails). StepFailed on an error answer, or when no node has answered for
        `step_timeout` (a stall, not a slow leader: a batch's phase of thousands of
        steps takes longer than that while its answers keep coming).

        Unanswered steps are re-sent when the leader has been quiet for a while
        (`_resend_at`), with the interval doubling each round: while answers come the
        steps are on their way, and a copy of one still queued at the leader (the
        StateActor's inbox, a session's mailbox, a stream) is carried and answered
        again for nothing. Re-sent every interval, a phase that takes longer than one (8 x 999
        steps at N=1000) queued more copies each round than the leader could carry,
        and the batch never finished (tests/actors/test_rotation_congestion.py)."""
        stamp = self._stamp()
        record = attrs.evolve(record, phase=phase, step=step, stamp=stamp)
        # Persisted before it is sent: a new leader must find every step it may have missed.
        with trio.move_on_after(self._settings.step_timeout) as persisting:
            await self._ports.persist(self._node, record)
        if persisting.cancelled_caught:
            raise StepFailed(f"{step.name}: the record was not written within "
                             f"{self._settings.step_timeout:.0f}s")
        self._record = record
        message = wire.RotationStep(record.rotation_id, step, self._node, record.old_public_key,
                                    record.new_public_key, stamp, record.slot)
        waiting = set(nodes)
        self._results.clear()
        self._awaiting = (record.rotation_id, stamp)
        stalled_at = trio.current_time() + self._settings.step_timeout
        interval = self._settings.resend_interval
        try:
            while waiting:
                await self._ports.send_step(sorted(waiting), message,
                                            gather=len(self._token.members) > 1)
                sent_at = trio.current_time()
                while waiting:
                    arrived = self._result_arrived
                    for node, received in self._results.items():
                        result = received.result
                        if node not in waiting:
                            continue
                        if result.error is not None:
                            raise StepFailed(f"{step.name} on {node}: {result.error}")
                        waiting.discard(node)
                        answers[node] = result
                        stalled_at = trio.current_time() + self._settings.step_timeout
                    self._results.clear()
                    if not waiting:
                        break
                    deadline = self._resend_at(sent_at, interval, stalled_at)
                    if trio.current_time() < deadline:
                        with trio.move_on_at(deadline):
                            await arrived.wait()
                        continue  # an answer came, or the deadline moved: look again
                    if trio.current_time() >= stalled_at:
                        raise StepFailed(
                            f"{step.name}: no answer within {self._settings.step_timeout:.0f}s "
                            f"(from {', '.join(sorted(waiting)[:5])}"
                            f"{' ...' if len(waiting) > 5 else ''})")
                    # Re-send to the silent ones, and wait twice as long before the next
                    # round: copies of one step stay a handful however long a phase takes.
                    interval = min(2 * interval, self._settings.step_timeout)
                    break
        finally:
            self._awaiting = None
            self._results.clear()
        return answers


    def _resend_at(self, sent_at: float, interval: float, stalled_at: float) -> float:
        """When the unanswered steps of a round sent at `sent_at` go again: once no
        answer to any rotation step has reached the leader for `interval` (answers to
        other steps mean the leader is carrying a backlog, which copies would only
        join), or none to this step for half the stall time; never sooner than
        `resend_interval` after the round, never after the stall."""
        settings = self._settings
        leader_quiet = max(self._token.last_answer_at, sent_at) + interval
        step_quiet = stalled_at - settings.step_timeout / 2
        return min(max(min(leader_quiet, step_quiet), sent_at + settings.resend_interval),
                   stalled_at)


def _rank(step: Step) -> int:
    order = [Step.PREPARE, Step.DISTRIBUTE, Step.ACTIVATE, Step.SWAP_PEER, Step.SWITCH_PEER,
             Step.RETIRE_ROTATING, Step.RETIRE_PEER, Step.ROLL_BACK_ROTATING,
             Step.ROLL_BACK_PEER, Step.ABANDON_ROTATING]
    return order.index(step)


