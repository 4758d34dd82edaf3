"""HealthActor: every node's health, on the leader, and when it is written.

Owns the latest `SessionReport` of each connected node (its telemetry among
them: in memory only, never in etcd per beat), what each node's VpbluNode
status should say about its daemon (`vpblu.core.health.evaluate`), and the
pacing of those writes. It never writes itself: it hands `NodeHealthReported`
to the StatusActor.

Writes happen on change only, and are rate-limited so 1000 nodes never mean
1000 writes per heartbeat:
- nothing is handed on when the evaluated health equals what was last handed
  on: a quiet mesh writes nothing, whatever its heartbeats carry (byte
  counters and handshake times are not in the status, key age is a creation
  time the printer column turns into an age);
- a transition (a condition's status changed) goes first, at most
  `transition_interval` after the node's previous write;
- any other change (peers up 37/99 -> 38/99 while a mesh forms) waits until
  `update_interval` (30 s) after the node's previous write, coalesced with
  whatever comes meanwhile;
- a new applied generation alone (the node applied what it was sent: Applied
  stays True) waits until `generation_interval` (5 min): every change of the
  mesh gives every node a generation, and at N=1000 writing each of them every
  30 s was a status write per node per half minute under any churn (700 of the
  930 writes while 24 nodes rotated), each one the API server's and etcd's
  work too. The GENERATION column lags by that much; `vpblu status` and the
  daemons' vpblu_applied_generation have the live figure;
- all of them share a token bucket of `writes_per_second` (burst `burst`).

A node is Connected while its newest session is open and the daemon said
something within `silent_limit` (a heartbeat comes at most every 37.5 s). A
node whose session ends is written once as not connected and then forgotten,
so the actor holds nothing for nodes that are gone. A new leader knows only
the nodes that connect to it: `grace` after it starts it lists the VpbluNodes
once and marks those whose status still claims Connected but that have no
session (their daemon died while no one led).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import typing
from collections.abc import Callable

import attrs
import trio

from vpblu.core import health as rules
from vpblu.core.health import NodeHealth, NodeObservation
from vpblu.core.wire import Telemetry
from vpblu.kube.client import VPBLU_NODES, ApiError, ApiUnavailable, KubeApi
from vpblu.messages import (
    HealthInbox,
    HealthSnapshot,
    HealthSnapshotWanted,
    NodeHealthReported,
    NodeTelemetryView,
    SessionReport,
    StatusInbox,
)
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)

SILENT_LIMIT = 75.0  # 2 x the longest jittered heartbeat gap (37.5 s)
TRANSITION_INTERVAL = 2.0
UPDATE_INTERVAL = 30.0
GENERATION_INTERVAL = 300.0
WRITES_PER_SECOND = 20.0
BURST = 20
GRACE = 60.0
# Even a quiet actor looks again this often (a daemon may fall silent).
SWEEP_PERIOD = 5.0
# The sessions and nodes-ready gauges are recounted at most this often (and
# so at every sweep at the latest).
GAUGE_PERIOD = 1.0
# A token, give or take float rounding: a refill computed to reach exactly 1
# may land a hair below it, and waking "when it reaches 1" would not advance.
_ONE_TOKEN = 1 - 1e-9


@attrs.frozen(slots=True)
class HealthSettings:
    silent_limit: float = SILENT_LIMIT
    transition_interval: float = TRANSITION_INTERVAL
    update_interval: float = UPDATE_INTERVAL
    generation_interval: float = GENERATION_INTERVAL
    writes_per_second: float = WRITES_PER_SECOND
    burst: int = BURST
    grace: float = GRACE
    sweep_period: float = SWEEP_PERIOD


@attrs.frozen(slots=True)
class HealthStatistics:
    nodes: int  # nodes held (connected, or owed a last write)
    connected: int
    ready: int
    handed_on: int  # NodeHealthReported sent to the StatusActor
    telemetry_received: int
    evaluations: int


@attrs.define
class _Node:
    report: SessionReport
    last_heard: float  # trio time of the last report from an open session
    wanted: NodeHealth | None = None  # the newest evaluation
    handed: NodeHealth | None = None  # the last one handed to the StatusActor
    handed_at: float = -math.inf
    # The earliest due time among this node's entries in the queues (None:
    # none); an entry with another time is stale and skipped.
    scheduled: float | None = None


class HealthActor:
    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel[HealthInbox],
        status: trio.MemorySendChannel[StatusInbox],
        kube: KubeApi | None = None,
        settings: HealthSettings = HealthSettings(),
        *,
        on_evaluated: Callable[[str, NodeHealth], None] | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._inbox = inbox
        self._status = status
        self._kube = kube
        self._settings = settings
        self._nodes: dict[str, _Node] = {}
        self._dirty: set[str] = set()
        # (due, node) heaps, transitions served before updates: only nodes owed
        # a write are in them, so a quiet 1000-node mesh costs nothing here.
        self._transitions: list[tuple[float, str]] = []
        self._updates: list[tuple[float, str]] = []
        self._tokens = float(settings.burst)
        self._tokens_at = 0.0
        self._handed_on = 0
        self._telemetry_received = 0
        self._evaluations = 0
        self._listed = False
        self._started = 0.0
        self._on_evaluated = on_evaluated

    def statistics(self) -> HealthStatistics:
        connected = ready = 0
        for node in self._nodes.values():
            wanted = node.wanted
            if wanted is None:
                continue
            c, r = wanted.condition("Connected"), wanted.condition("Ready")
            connected += c is not None and c.status == "True"
            ready += r is not None and r.status == "True"
        return HealthStatistics(len(self._nodes), connected, ready, self._handed_on,
                                self._telemetry_received, self._evaluations)

    def telemetry(self, node: str) -> Telemetry | None:
        """The latest telemetry of `node` (None: not connected, or none yet)."""
        held = self._nodes.get(node)
        return held.report.telemetry if held is not None else None

    def health(self, node: str) -> NodeHealth | None:
        held = self._nodes.get(node)
        return held.wanted if held is not None else None

    def snapshot(self) -> HealthSnapshot:
        """Every node held now, with its latest telemetry (read-only)."""
        now = trio.current_time()
        return HealthSnapshot(tuple(
            NodeTelemetryView(
                name, held.report.connected
                and now - held.last_heard <= self._settings.silent_limit,
                held.report.telemetry,
                max(0.0, now - held.report.telemetry_at) if held.report.telemetry else 0.0,
                held.report.acked_generation, held.report.apply_error)
            for name, held in sorted(self._nodes.items())))

    def _receive(self, message: HealthInbox) -> None:
        match message:
            case SessionReport():
                self._take(message)
            case HealthSnapshotWanted(reply=reply):
                # Never blocks the actor: the asker made room for exactly one.
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                         trio.ClosedResourceError):
                    reply.send_nowait(self.snapshot())
            case _:
                typing.assert_never(message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, self._status:
            self._started = self._tokens_at = trio.current_time()
            task_status.started()
            next_sweep = self._started + self._settings.sweep_period
            gauges_due = -math.inf
            while True:
                with trio.move_on_at(min(next_sweep, self._next_due())):
                    self._receive(await self._inbox.receive())
                while True:
                    try:
                        self._receive(self._inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                now = trio.current_time()
                if now >= next_sweep:
                    next_sweep = now + self._settings.sweep_period
                    self._dirty.update(self._nodes)
                    if not self._listed and now >= self._started + self._settings.grace:
                        await self._mark_orphans()
                self._evaluate(now)
                await self._hand_on(now)
                # The gauges count every node (O(N)): at most once per
                # GAUGE_PERIOD, not on every loop turn, where at N=1000 one
                # event's acks made it O(N^2) (a scrape comes every 15 s or more).
                if self._metrics is not None and now >= gauges_due:
                    gauges_due = now + GAUGE_PERIOD
                    stats = self.statistics()
                    self._metrics.sessions.set(stats.connected)
                    self._metrics.nodes_ready.set(stats.ready)

    def _take(self, report: SessionReport) -> None:
        held = self._nodes.get(report.node)
        if held is not None and report.session_id < held.report.session_id:
            return  # an older session's late word
        now = trio.current_time()
        if report.telemetry is not None and (held is None
                                             or report.telemetry is not held.report.telemetry):
            self._telemetry_received += 1
            if self._metrics is not None:
                self._metrics.telemetry_received.inc()
        if held is None:
            held = self._nodes[report.node] = _Node(report, now)
        held.report = report
        if report.connected:
            held.last_heard = now
        self._dirty.add(report.node)

    def _observe(self, held: _Node, now: float) -> NodeObservation:
        r = held.report
        connected = r.connected and now - held.last_heard <= self._settings.silent_limit
        return NodeObservation(connected, r.sent_generation, r.acked_generation, r.apply_error,
                               r.hello_key, r.telemetry,
                               max(0.0, now - r.telemetry_at) if r.telemetry else 0.0)

    def _evaluate(self, now: float) -> None:
        for name in self._dirty:
            held = self._nodes.get(name)
            if held is None:
                continue
            obs = self._observe(held, now)
            # Which peers are down is the daemon's word, in every sample.
            health = rules.evaluate(name, obs)
            self._evaluations += 1
            held.wanted = health
            if self._on_evaluated is not None:
                self._on_evaluated(name, health)
            self._schedule(name, held)
        self._dirty.clear()

    def _due(self, held: _Node) -> tuple[float, bool] | None:
        """When `held`'s wanted health may be handed on, and whether it is a
        transition (None: nothing to hand on)."""
        wanted = held.wanted
        if wanted is None or wanted == held.handed:
            return None
        if wanted.transitions_from(held.handed):
            return held.handed_at + self._settings.transition_interval, True
        if held.handed is not None and wanted == attrs.evolve(
                held.handed, applied_generation=wanted.applied_generation):
            return held.handed_at + self._settings.generation_interval, False
        return held.handed_at + self._settings.update_interval, False

    def _schedule(self, name: str, held: _Node) -> None:
        due = self._due(held)
        if due is None:
            held.scheduled = None
            return
        at, transition = due
        if held.scheduled is not None and held.scheduled <= at:
            return  # an entry fires no later, and is re-checked then
        heapq.heappush(self._transitions if transition else self._updates, (at, name))
        held.scheduled = at

    def _next_due(self) -> float:
        tops = [q[0][0] for q in (self._transitions, self._updates) if q]
        if not tops:
            return math.inf
        if self._tokens < _ONE_TOKEN:
            refilled = self._tokens_at + (1 - self._tokens) / self._settings.writes_per_second
            return max(min(tops), refilled)
        return min(tops)

    def _refill(self, now: float) -> None:
        rate, burst = self._settings.writes_per_second, self._settings.burst
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now

    async def _hand_on(self, now: float) -> None:
        self._refill(now)
        for queue in (self._transitions, self._updates):
            while queue and queue[0][0] <= now and self._tokens >= _ONE_TOKEN:
                at, name = heapq.heappop(queue)
                held = self._nodes.get(name)
                if held is None or held.scheduled != at:
                    continue  # stale: superseded by an earlier entry, or handed on
                held.scheduled = None
                due = self._due(held)
                if due is None:
                    continue
                if due[0] > now:
                    self._schedule(name, held)
                    continue
                assert held.wanted is not None
                self._tokens -= 1
                held.handed, held.handed_at = held.wanted, now
                self._handed_on += 1
                await self._status.send(NodeHealthReported(name, held.wanted))
                if not held.report.connected:
                    del self._nodes[name]  # written as gone; a new session starts afresh

    async def _mark_orphans(self) -> None:
        """VpbluNodes that claim Connected but have no session here: their daemon
        died while no one led (or before this leader's time)."""
        if self._kube is None:
            self._listed = True
            return
        try:
            listed = await self._kube.list(VPBLU_NODES)
        except (ApiUnavailable, ApiError) as exc:
            log.warning("listing VpbluNodes to find orphaned health: %r; later", exc)
            return
        self._listed = True
        for obj in listed.items:
            name = str((obj.get("metadata") or {}).get("name") or "")
            if not name or name in self._nodes:
                continue
            conditions = (obj.get("status") or {}).get("conditions") or []
            claims = any(isinstance(c, dict) and c.get("type") == "Connected"
                         and c.get("status") == "True" for c in conditions)
            if claims:
                log.info("node %s: its status says Connected but it has no stream here", name)
                self._nodes[name] = _Node(SessionReport(name, 0, False), -math.inf)
                self._dirty.add(name)
