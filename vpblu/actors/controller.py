"""The controller process: its actor tree, assembled.

Owns the wiring, nothing else: which actors run, under which supervisor,
connected by which channels. The tree:

    controller (rest_for_one)
      mesh-server       gRPC Mesh service (TLS); follower mode redirects
      leadership        starts/stops the leader subtree on LeaderObserved
      leader            LeaseThreadActor: the LeaderActor on the Lease, on its own thread
        leader-work (one_for_all, only while this replica leads)
          status        StatusActor
          state         StateActor (its term stamps every generation)
          watch-<Kind>  one WatcherActor per kind
          pod-ranges    PodRangesActor (the remembered pod ranges' ConfigMap)
          health        HealthActor (telemetry in memory, paced VpbluNode health)
          sessions      SessionsActor -> one NodeSessionActor per daemon
          rotations     RotationsActor -> one RotationActor per node (key rotation)

The leader subtree is one_for_all because its actors share one view: if the
StateActor restarts, its view is empty and every watcher must list again to
refill it, exactly as a new leader does. Losing the Lease cancels the whole
subtree at once; streams are closed, and daemons reconnect to whoever leads,
keeping their mesh meanwhile.

The root is rest_for_one so that a restarted LeadershipActor (which starts
out not leading) is always followed by a restarted Lease keeper, which
releases the Lease on its way out and reports afresh; metrics and dashboard
(when configured) come last and restart alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import attrs
import trio

from vpblu import aioloop
from vpblu.actors.daemonpods import DAEMON_NAMESPACE
from vpblu.actors.health import HealthSettings
from vpblu.actors.leader import LeaseSettings
from vpblu.actors.leadership import Leadership, LeadershipActor
from vpblu.actors.leasethread import LeaseThreadActor, kubeconfig_client
from vpblu.actors.session import SessionSettings
from vpblu.core.model import IPNetwork
from vpblu.dashboard.server import DashboardSettings, dashboard_child
from vpblu.heaptrim import Heap, HeapTrimmer
from vpblu.kube import client as k
from vpblu.kube.servicecidrs import service_cidrs
from vpblu.kubeversion import require_supported
from vpblu.messages import LeaderObserved
from vpblu.metrics import ControllerMetrics
from vpblu.metricsserver import metrics_child
from vpblu.stream.identity import TokenReviewAuthenticator
from vpblu.stream.podbinding import DaemonPods, PodBoundAuthenticator
from vpblu.stream.tlsbuffers import shrink_tls_read_buffers
from vpblu.stream.transport import MeshServer, NodeStream, ServerTLS, split_address
from vpblu.supervisor import ChildSpec, Strategy, Supervisor, with_inbox_clone

log = logging.getLogger(__name__)

NEW_STREAMS = 64


def default_identity() -> str:
    """Unique per process start, so every new leader is a Lease transition."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{secrets.token_hex(3)}"


@attrs.frozen(slots=True)
class ControllerSettings:
    kubeconfig: Path | None
    listen: str
    advertise: str  # the address daemons reach this replica at (redirects point here)
    tls: ServerTLS
    identity: str = attrs.field(factory=default_identity)
    lease: LeaseSettings = attrs.field(factory=LeaseSettings)
    session: SessionSettings = attrs.field(factory=SessionSettings)
    # Who may speak for a node: the daemon's ServiceAccount. None accepts any
    # authenticated token carrying a node name (tests only).
    daemon_users: frozenset[str] | None = frozenset(
        {"system:serviceaccount:vpblu-system:vpblu-daemon"})
    # The cluster's Service ranges (kube-apiserver's --service-cluster-ip-range;
    # the API does not publish them): no RoutePolicy route may cover them.
    service_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=tuple)
    # The cluster's pod ranges (kube-controller-manager's --cluster-cidr), if
    # named: steered and guarded with every Node podCIDR ever seen
    # (vpblu.core.podranges), also where no Node holds a range yet.
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=tuple)
    health: HealthSettings = attrs.field(factory=HealthSettings)
    # "host:port" of /metrics, /healthz and /readyz (None: not served).
    metrics_listen: str | None = None
    # The web dashboard (None: not served); any replica serves it.
    dashboard: DashboardSettings | None = None


async def run_controller(
    settings: ControllerSettings,
    *,
    task_status: trio.TaskStatus[Leadership] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one controller replica until cancelled. Needs a trio-asyncio loop.

    `task_status.started` hands back this replica's `Leadership` view (for
    tests, the demo and the bench)."""
    host, port = split_address(settings.listen)
    # One TLS connection per node: not 256 KiB of read buffer each (tlsbuffers).
    shrink_tls_read_buffers()
    # The Lease is kept on a thread of its own with its own loop and client
    # (leasethread): neither a burst of TokenReviews nor a main loop held by a
    # thousand reconnecting daemons may queue the renewal and cost the lead.
    async with k.open_kube_client(settings.kubeconfig,
                                  user_agent=k.CONTROLLER_USER_AGENT) as kube:
        await require_supported(kube)  # UnsupportedKubernetes below vpblu.kubeversion.MINIMUM
        service_ranges = await service_cidrs(kube, settings.service_cidrs)
        observed_send, observed_receive = trio.open_memory_channel[LeaderObserved](16)
        streams_send, streams_receive = trio.open_memory_channel[NodeStream](NEW_STREAMS)
        # The token's Pod must be a current daemon Pod on its node (the leader's
        # DaemonPodsActor keeps `daemon_pods` and ends streams whose Pod went).
        daemon_pods = DaemonPods(DAEMON_NAMESPACE)
        authenticator = PodBoundAuthenticator(
            TokenReviewAuthenticator(kube, allowed_users=settings.daemon_users), daemon_pods)
        metrics = ControllerMetrics()
        server = MeshServer(host=host, port=port, tls=settings.tls,
                            authenticator=authenticator, new_streams=streams_send,
                            on_refused=lambda reason: metrics.stream_refusals.labels(reason).inc())
        view = Leadership()
        metrics.leader.set_function(lambda: 1.0 if view.leading else 0.0)
        metrics.read_server(server)
        children = [] if settings.metrics_listen is None else [
            metrics_child(metrics.registry, settings.metrics_listen,
                          ready=lambda: (server.serving, "the Mesh server listens"
                                         if server.serving else "the Mesh server is not up"))]
        if settings.dashboard is not None:
            children.append(dashboard_child(settings.dashboard, kube, settings.kubeconfig, view,
                                            settings.lease, settings.identity))
        # rest_for_one, in this order: a LeadershipActor that restarts (its leader
        # work escalated) starts with `leading` False and would never hear again
        # that this replica holds the Lease - the LeaderActor reports changes
        # only - so the Lease keeper after it restarts too: it releases the
        # Lease on the way out and reports afresh. Nothing else depends on
        # the metrics and dashboard children, which come last.
        root = Supervisor("controller", [
            ChildSpec("mesh-server", lambda: server.run),
            ChildSpec("leadership", with_inbox_clone(
                lambda observed: LeadershipActor(
                    kube, server, observed, streams_receive.clone(), settings.session, view,
                    service_cidrs=service_ranges,
                    cluster_cidrs=settings.cluster_cidrs,
                    health=settings.health,
                    metrics=metrics, daemon_pods=daemon_pods),
                observed_receive)),
            ChildSpec("leader", lambda: LeaseThreadActor(
                kubeconfig_client(settings.kubeconfig, k.CONTROLLER_USER_AGENT),
                settings.identity, settings.advertise, observed_send.clone(),
                settings.lease).run),
            *children,
            # Free heap a burst left behind goes back to the kernel (heaptrim).
            ChildSpec("heap-trim", lambda: HeapTrimmer(Heap.of_libc()).run),
        ], strategy=Strategy.REST_FOR_ONE)
        async with (streams_send, streams_receive, observed_send, observed_receive,
                    trio.open_nursery() as nursery):
            await nursery.start(root.run)
            task_status.started(view)


async def main_async(settings: ControllerSettings) -> None:
    async with aioloop.open_loop():
        await run_controller(settings)
