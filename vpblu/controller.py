"""The controller process: its actor tree, assembled.

Owns the wiring, nothing else: which actors run, under which supervisor,
connected by which channels. The tree:

    controller (one_for_one)
      mesh-server       gRPC Mesh service (TLS); follower mode redirects
      leader            LeaderActor on the Lease
      leadership        starts/stops the leader subtree on LeaderObserved
        leader-work (one_for_all, only while this replica leads)
          status        StatusActor
          state         StateActor (its term stamps every generation)
          watch-<Kind>  one WatcherActor per kind
          sessions      SessionsActor -> one NodeSessionActor per daemon
          rotations     RotationsActor -> one RotationActor per node (key rotation)

The leader subtree is one_for_all because its actors share one view: if the
StateActor restarts, its view is empty and every watcher must list again to
refill it, exactly as a new leader does. Losing the Lease cancels the whole
subtree at once; streams are closed, and daemons reconnect to whoever leads,
keeping their mesh meanwhile.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import attrs
import trio
import trio_asyncio

from vpblu import kube as k
from vpblu import resources
from vpblu.actors.leader import LeaderActor, LeaseSettings
from vpblu.actors.rotation import LeaderRotationPorts, RotationsActor, RotationSettings
from vpblu.actors.session import SessionSettings
from vpblu.actors.sessions import SessionsActor
from vpblu.actors.state import STATUS_KINDS as STATUS_KIND_NAMES
from vpblu.actors.state import StateActor
from vpblu.actors.status import StatusActor
from vpblu.actors.watcher import Parser, WatcherActor
from vpblu.identity import TokenReviewAuthenticator
from vpblu.messages import LeaderObserved, RotationsInbox, StateInbox, StatusInbox
from vpblu.supervisor import ChildSpec, Strategy, Supervisor, with_inbox_clone
from vpblu.transport import MeshServer, NodeStream, ServerTLS, split_address

log = logging.getLogger(__name__)

STATE_INBOX = 256
STATUS_INBOX = 256
ROTATIONS_INBOX = 256
NEW_STREAMS = 64

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
)
# The kinds whose status the StatusActor writes (named once, in the StateActor,
# which tells the StatusActor when one of them is deleted).
STATUS_KINDS = {w.kind.kind: w.kind for w in WATCHED if w.kind.kind in STATUS_KIND_NAMES}


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
    # Push whole states instead of deltas (the benchmark's --compare baseline).
    full_pushes: bool = False


@attrs.define
class Leadership:
    """Whether this replica leads now: written by LeadershipActor only, read
    by tests, the demo and the bench (a statistic, not a channel)."""

    leading: bool = False
    term: int = 0


class LeadershipActor:
    """Starts the leader subtree when this replica leads and stops it when it
    does not; points the Mesh server's redirects at whoever leads."""

    def __init__(self, kube: k.KubeApi, server: MeshServer,
                 observed: trio.MemoryReceiveChannel[LeaderObserved],
                 streams: trio.MemoryReceiveChannel[NodeStream],
                 settings: ControllerSettings, view: Leadership) -> None:
        self._kube = kube
        self._server = server
        self._observed = observed
        self._streams = streams
        self._settings = settings
        self._view = view

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._view.leading = False
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
            kube, settings = self._kube, self._settings

            def watcher(w: Watched) -> ChildSpec:
                return ChildSpec(f"watch-{w.kind.kind}",
                                 lambda: WatcherActor(kube, w.kind, w.parse, state_send.clone(),
                                                      namespace=w.namespace,
                                                      label_selector=w.label_selector).run)

            children = [
                ChildSpec("status", with_inbox_clone(
                    lambda inbox: StatusActor(kube, inbox, STATUS_KINDS), status_receive)),
                ChildSpec("state", with_inbox_clone(
                    lambda inbox: StateActor(inbox, status_send.clone(), term=term,
                                             full_pushes=settings.full_pushes,
                                             rotations=rotations_send.clone()),
                    state_receive)),
                ChildSpec("rotations", with_inbox_clone(
                    lambda inbox: RotationsActor(
                        LeaderRotationPorts(status_send.clone(), state_send.clone()), inbox,
                        RotationSettings(term=term)),
                    rotations_receive)),
                *(watcher(w) for w in WATCHED),
                ChildSpec("sessions", lambda: SessionsActor(
                    self._streams.clone(), state_send.clone(), status_send.clone(),
                    settings.session).run),
            ]
            tree = Supervisor("leader-work", children, strategy=Strategy.ONE_FOR_ALL)
            async with (state_send, state_receive, status_send, status_receive,
                        rotations_send, rotations_receive):
                task_status.started(scope)
                await tree.run()


async def run_controller(
    settings: ControllerSettings,
    *,
    task_status: trio.TaskStatus[Leadership] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one controller replica until cancelled. Needs a trio-asyncio loop.

    `task_status.started` hands back this replica's `Leadership` view (for
    tests, the demo and the bench)."""
    host, port = split_address(settings.listen)
    # The Lease gets a client (a connection pool) of its own, as client-go
    # advises: a burst of TokenReviews from a thousand reconnecting daemons
    # must never queue the renewal behind it and cost the lead.
    async with (k.open_kube_client(settings.kubeconfig) as kube,
                k.open_kube_client(settings.kubeconfig) as lease_kube):
        observed_send, observed_receive = trio.open_memory_channel[LeaderObserved](16)
        streams_send, streams_receive = trio.open_memory_channel[NodeStream](NEW_STREAMS)
        authenticator = TokenReviewAuthenticator(kube, allowed_users=settings.daemon_users)
        server = MeshServer(host=host, port=port, tls=settings.tls,
                            authenticator=authenticator, new_streams=streams_send)
        view = Leadership()
        root = Supervisor("controller", [
            ChildSpec("mesh-server", lambda: server.run),
            ChildSpec("leadership", with_inbox_clone(
                lambda observed: LeadershipActor(
                    kube, server, observed, streams_receive.clone(), settings, view),
                observed_receive)),
            ChildSpec("leader", lambda: LeaderActor(
                lease_kube, settings.identity, settings.advertise, observed_send.clone(),
                settings.lease).run),
        ])
        async with (streams_send, streams_receive, observed_send, observed_receive,
                    trio.open_nursery() as nursery):
            await nursery.start(root.run)
            task_status.started(view)


async def main_async(settings: ControllerSettings) -> None:
    async with trio_asyncio.open_loop():
        await run_controller(settings)
