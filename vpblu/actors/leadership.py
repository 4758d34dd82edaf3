"""LeadershipActor: the leader-only subtree, started when this replica leads
and stopped when it does not.

Owns which kinds are watched and how the leader's actors are wired (one
WatcherActor per kind, the StateActor, the StatusActor, the RotationsActor,
the HealthActor, the SessionsActor, one-for-all). It never touches the Lease: the LeaderActor
tells it who leads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

from vpblu.actors.daemonpods import DaemonPodsActor
from vpblu.actors.health import HealthActor, HealthSettings
from vpblu.actors.ownership import NodeOwnershipActor
from vpblu.actors.podranges import LABEL_SELECTOR as POD_RANGES_SELECTOR
from vpblu.actors.podranges import NAMESPACE as POD_RANGES_NAMESPACE
from vpblu.actors.podranges import PodRangesActor, parse_pod_ranges
from vpblu.actors.rotation import RotationSettings
from vpblu.actors.rotations import LeaderRotationPorts, RotationsActor
from vpblu.actors.session import SessionSettings
from vpblu.actors.sessions import SessionsActor
from vpblu.actors.state import STATUS_KINDS as STATUS_KIND_NAMES
from vpblu.actors.state import StateActor
from vpblu.actors.status import StatusActor
from vpblu.actors.statusguard import StatusGuardActor
from vpblu.actors.watcher import Parser, WatcherActor
from vpblu.core.model import IPNetwork
from vpblu.kube import client as k
from vpblu.kube import resources
from vpblu.messages import (
    HealthInbox,
    LeaderObserved,
    NodePresence,
    RememberPodRanges,
    RotationsInbox,
    StateInbox,
    StatusInbox,
)
from vpblu.metrics import ControllerMetrics
from vpblu.stream.podbinding import DaemonPods
from vpblu.stream.transport import MeshServer, NodeStream
from vpblu.supervisor import ChildSpec, Strategy, Supervisor, with_inbox_clone

log = logging.getLogger(__name__)

STATE_INBOX = 256
STATUS_INBOX = 256
ROTATIONS_INBOX = 256
HEALTH_INBOX = 1024  # a report per session per batch: mass reconnects come in bursts
ADMITTED_STREAMS = 64  # streams the DaemonPodsActor admitted, on their way to the sessions
NODES_GONE = 64
POD_RANGES_INBOX = 64

DAEMON_POD_SELECTOR = "app.kubernetes.io/name=vpblu,app.kubernetes.io/component=daemon"


@attrs.frozen(slots=True)
class Watched:
    kind: k.ResourceKind
    parse: Parser
    namespace: str | None = None
    label_selector: str | None = None


WATCHED: tuple[Watched, ...] = (
    Watched(k.NODES, resources.parse_node),
    Watched(k.VPBLU_NODES, resources.parse_vpblu_node),
    Watched(k.TUNNEL_POLICIES, resources.parse_tunnel_policy),
    Watched(k.ROUTE_POLICIES, resources.parse_route_policy),
    Watched(k.BLOCK_POLICIES, resources.parse_block_policy),
    Watched(k.ROTATION_POLICIES, resources.parse_rotation_policy),
    # Only the daemon's own Pods: they tell each VpbluNode whether a daemon
    # is scheduled on its node at all (no key yet is then explained).
    Watched(k.PODS, resources.parse_daemon_pod, "vpblu-system", DAEMON_POD_SELECTOR),
    # The remembered pod ranges (vpblu.core.podranges).
    Watched(k.CONFIG_MAPS, parse_pod_ranges, POD_RANGES_NAMESPACE, POD_RANGES_SELECTOR),
)


# The kinds whose status the StatusActor writes (named once, in the StateActor,
# which tells the StatusActor when one of them is deleted).
STATUS_KINDS = {w.kind.kind: w.kind for w in WATCHED if w.kind.kind in STATUS_KIND_NAMES}


@attrs.define
class Leadership:
    """Whether this replica leads now: written by LeadershipActor only, read
    by tests, the demo and the bench (a statistic, not a channel)."""

    leading: bool = False
    term: int = 0
    # The HealthActor's inbox while this replica leads (None otherwise): the
    # dashboard asks it for a HealthSnapshot; it sends nothing else there.
    health: trio.MemorySendChannel[HealthInbox] | None = None


class LeadershipActor:
    """Starts the leader subtree when this replica leads and stops it when it
    does not; points the Mesh server's redirects at whoever leads."""

    def __init__(self, kube: k.KubeApi, server: MeshServer,
                 observed: trio.MemoryReceiveChannel[LeaderObserved],
                 streams: trio.MemoryReceiveChannel[NodeStream],
                 session: SessionSettings, view: Leadership, *,
                 service_cidrs: Sequence[IPNetwork] = (),
                 cluster_cidrs: Sequence[IPNetwork] = (),
                 health: HealthSettings | None = None,
                 metrics: ControllerMetrics | None = None,
                 daemon_pods: DaemonPods | None = None) -> None:
        # With `daemon_pods`, every stream passes the DaemonPodsActor (Pod-bound
        # identity) on its way to the sessions; None: straight there (tests).
        self._daemon_pods = daemon_pods
        self._health = health or HealthSettings()
        self._metrics = metrics
        self._kube = kube
        self._server = server
        self._observed = observed
        self._streams = streams
        self._session = session
        self._service_cidrs = tuple(service_cidrs)
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._view = view

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._view.leading = False
        try:
            await self._run(task_status)
        finally:
            # Crashed or stopped: the leader work is gone with it, and the view
            # (the vpblu_leader gauge, the dashboard) must not say "leading"
            # through the restart backoff.
            self._view.leading = False

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            work: trio.CancelScope | None = None
            turn_away = await nursery.start(self._turn_away)
            async for observed in self._observed:
                if observed.is_me and work is None:
                    turn_away.cancel()
                    self._server.redirect_to(None)
                    work = await nursery.start(self._lead, observed.term)
                    self._view.leading, self._view.term = True, observed.term
                elif not observed.is_me:
                    self._server.redirect_to(observed.address)
                    if work is not None:
                        log.warning("no longer the leader (now %s): stopping leader work",
                                    observed.holder)
                        work.cancel()
                        work = None
                        self._view.leading = False
                        turn_away = await nursery.start(self._turn_away)
            nursery.cancel_scope.cancel()

    async def _turn_away(
        self, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """While following: streams that reached us before the server knew
        where to redirect are closed; the daemon retries, and is redirected."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async for stream in self._streams:
                stream.close("this controller is not the leader")

    async def _lead(self, term: int, *,
                    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        log.info("leading (term %d)", term)
        with trio.CancelScope() as scope:
            state_send, state_receive = trio.open_memory_channel[StateInbox](STATE_INBOX)
            status_send, status_receive = trio.open_memory_channel[StatusInbox](STATUS_INBOX)
            rotations_send, rotations_receive = trio.open_memory_channel[RotationsInbox](
                ROTATIONS_INBOX)
            health_send, health_receive = trio.open_memory_channel[HealthInbox](HEALTH_INBOX)
            kube, metrics, pods = self._kube, self._metrics, self._daemon_pods
            admitted_send, admitted_receive = trio.open_memory_channel[NodeStream](
                ADMITTED_STREAMS)
            # VpbluNodes deleted with their Node: the gate ends that node's stream.
            gone_send, gone_receive = trio.open_memory_channel[NodePresence](NODES_GONE)
            ranges_send, ranges_receive = trio.open_memory_channel[RememberPodRanges](
                POD_RANGES_INBOX)
            to_sessions = self._streams if pods is None else admitted_receive
            gate = [] if pods is None else [ChildSpec("daemon-pods", lambda: DaemonPodsActor(
                kube, pods, self._streams.clone(), admitted_send.clone(), metrics=metrics,
                nodes_gone=gone_receive.clone()).run)]

            def watcher(w: Watched) -> ChildSpec:
                return ChildSpec(f"watch-{w.kind.kind}",
                                 lambda: WatcherActor(kube, w.kind, w.parse, state_send.clone(),
                                                      namespace=w.namespace,
                                                      label_selector=w.label_selector,
                                                      metrics=metrics).run)

            children = [
                ChildSpec("status", with_inbox_clone(
                    lambda inbox: StatusActor(kube, inbox, STATUS_KINDS, metrics), status_receive)),
                ChildSpec("status-guard", lambda: StatusGuardActor(
                    kube, status_send.clone(), metrics).run),
                ChildSpec("node-ownership", lambda: NodeOwnershipActor(
                    kube, status_send.clone(), metrics,
                    nodes_gone=None if pods is None else gone_send.clone()).run),
                ChildSpec("state", with_inbox_clone(
                    lambda inbox: StateActor(inbox, status_send.clone(), term=term,
                                             service_cidrs=self._service_cidrs,
                                             cluster_cidrs=self._cluster_cidrs,
                                             pod_ranges=ranges_send.clone(),
                                             rotations=rotations_send.clone(),
                                             metrics=metrics),
                    state_receive)),
                ChildSpec("rotations", with_inbox_clone(
                    lambda inbox: RotationsActor(
                        LeaderRotationPorts(status_send.clone(), state_send.clone(), metrics),
                        inbox,
                        RotationSettings(term=term), metrics=metrics),
                    rotations_receive)),
                ChildSpec("health", with_inbox_clone(
                    lambda inbox: HealthActor(inbox, status_send.clone(), kube, self._health,
                                              metrics=metrics),
                    health_receive)),
                ChildSpec("pod-ranges", with_inbox_clone(
                    lambda inbox: PodRangesActor(kube, inbox), ranges_receive)),
                *(watcher(w) for w in WATCHED),
                *gate,
                ChildSpec("sessions", lambda: SessionsActor(
                    to_sessions.clone(), state_send.clone(), status_send.clone(),
                    self._session, health_send.clone()).run),
            ]
            tree = Supervisor("leader-work", children, strategy=Strategy.ONE_FOR_ALL)
            async with (state_send, state_receive, status_send, status_receive,
                        rotations_send, rotations_receive, health_send, health_receive,
                        admitted_send, admitted_receive, gone_send, gone_receive,
                        ranges_send, ranges_receive):
                task_status.started(scope)
                self._view.health = health_send
                try:
                    await tree.run()
                finally:
                    self._view.health = None
