"""MeshFeed: the dashboard's current `meshview` document, refreshed on demand.

Owns reading what the pages show: the VpbluNodes, the policies and the Lease
from the API server (with the controller's client, read-only), and on the
leader the HealthActor's telemetry (`HealthSnapshotWanted`). A follower has
no telemetry of its own and shows what the leader wrote to the VpbluNodes'
status; it does not reach across to the leader, so the dashboard needs no
replica-to-replica channel, credentials or trust of its own, and a follower's
page stays right (only coarser) while the leader is being replaced.

Nothing is read while no one looks: the document is rebuilt at most every
`REFRESH` seconds, and only when a page, a stream or the JSON API asks (five
LISTs and a GET: fine for hundreds of nodes; a watch-fed cache would be the
next step for thousands). Open live streams look often (app.STREAM_POLL), so
a change reaches the browser within REFRESH plus one read (under 2 s unless
the API server is slow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from vpblu.actors.leader import LeaseSettings
from vpblu.actors.leadership import Leadership
from vpblu.dashboard.meshview import JSON, POLICY_KINDS, Rates, mesh_view
from vpblu.kube import client as k
from vpblu.messages import HealthSnapshot, HealthSnapshotWanted

log = logging.getLogger(__name__)

REFRESH = 1.0
SNAPSHOT_TIMEOUT = 1.0
READ_TIMEOUT = 10.0
KINDS = {"TunnelPolicy": k.TUNNEL_POLICIES, "RoutePolicy": k.ROUTE_POLICIES,
         "BlockPolicy": k.BLOCK_POLICIES, "RotationPolicy": k.ROTATION_POLICIES}


class FeedUnavailable(Exception):
    """The API server could not be read (the page says so; nothing crashes)."""


class MeshFeed:
    def __init__(self, kube: k.KubeApi, leadership: Leadership, lease: LeaseSettings,
                 identity: str, *, refresh: float = REFRESH,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._kube = kube
        self._leadership = leadership
        self._lease = lease
        self._identity = identity
        self._refresh = refresh
        self._wall_clock = wall_clock
        self._rates = Rates()
        self._lock = trio.Lock()
        self._view: JSON | None = None
        self._at = -float("inf")

    async def current(self) -> JSON:
        async with self._lock:
            if trio.current_time() - self._at >= self._refresh or self._view is None:
                started = trio.current_time()  # the period counts from the read's start
                self._view = await self._read()
                self._at = started
            return self._view

    async def _read(self) -> JSON:
        assert all(kind in KINDS for kind in POLICY_KINDS)
        listed: dict[str, tuple[k.RawObject, ...]] = {}
        leader = [""]

        async def list_kind(kind: str, rk: k.ResourceKind) -> None:
            listed[kind] = (await self._kube.list(rk)).items

        async def read_leader() -> None:
            leader[0] = await self._leader()

        try:
            with trio.fail_after(READ_TIMEOUT):
                # Side by side: the page waits for the slowest read, not their sum.
                async with trio.open_nursery() as nursery:
                    for kind, rk in (("VpbluNode", k.VPBLU_NODES), *KINDS.items()):
                        nursery.start_soon(list_kind, kind, rk)
                    nursery.start_soon(read_leader)
        except* (k.ApiUnavailable, k.ApiError, trio.TooSlowError) as group:
            raise FeedUnavailable(
                f"the API server could not be read: {group.exceptions[0]!r}") from None
        nodes = listed.pop("VpbluNode")
        policies = listed
        health = await self._health()
        return mesh_view(vpblu_nodes=nodes, policies=policies, leader=leader[0],
                         served_by=self._identity, leading=self._leadership.leading,
                         health=health, rates=self._rates, now=self._wall_clock())

    async def _leader(self) -> str:
        try:
            lease = await self._kube.get(k.LEASES, self._lease.name,
                                         namespace=self._lease.namespace)
        except k.NotFound:
            return ""
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    async def _health(self) -> HealthSnapshot | None:
        inbox = self._leadership.health
        if inbox is None:
            return None
        reply, answer = trio.open_memory_channel[HealthSnapshot](1)
        async with reply, answer:
            try:
                # Never wait on a busy HealthActor's full inbox: this round
                # goes without telemetry instead.
                inbox.send_nowait(HealthSnapshotWanted(reply))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            with trio.move_on_after(SNAPSHOT_TIMEOUT):
                return await answer.receive()
        return None
