"""MeshFeed: the dashboard's current `meshview` document, refreshed on demand.

Owns reading what the pages show: the VpbluNodes, the policies and the Lease
from the API server (with the controller's client, read-only), and on the
leader the HealthActor's telemetry (`HealthSnapshotWanted`). A follower has
no telemetry of its own and shows what the leader wrote to the VpbluNodes'
status; it does not reach across to the leader, so the dashboard needs no
replica-to-replica channel, credentials or trust of its own, and a follower's
page stays right (only coarser) while the leader is being replaced.

Nothing is read while no one looks: the document is rebuilt at most every
`REFRESH` seconds, and only when a page, a stream or the JSON API asks. Every
open live stream asks once per `REFRESH`, so a change reaches the browser
within REFRESH plus the write's own delay (under 2 s).
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
                self._view = await self._read()
                self._at = trio.current_time()
            return self._view

    async def _read(self) -> JSON:
        assert all(kind in KINDS for kind in POLICY_KINDS)
        try:
            with trio.fail_after(READ_TIMEOUT):
                nodes = (await self._kube.list(k.VPBLU_NODES)).items
                policies = {kind: (await self._kube.list(rk)).items
                            for kind, rk in KINDS.items()}
                leader = await self._leader()
        except (k.ApiUnavailable, k.ApiError, trio.TooSlowError) as exc:
            raise FeedUnavailable(f"the API server could not be read: {exc!r}") from exc
        health = await self._health()
        return mesh_view(vpblu_nodes=nodes, policies=policies, leader=leader,
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
