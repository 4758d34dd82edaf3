"""DaemonPodsActor: on the leader, which daemon Pods exist, and which streams
may stay.

Owns the leader's `DaemonPods` view (vpblu.stream.podbinding) and the gate
between the Mesh server and the SessionsActor: its own WatcherActor lists and
watches the DaemonSet's Pods (one namespace, the daemon's labels) into the view;
every authenticated stream passes through here, is checked against the view
once more (its Pod may have gone since its TokenReview) and handed on, or closed
with the reason. It then ends a stream the moment its identity stops holding:

- its Pod is deleted, starts terminating, or is replaced by another uid of the
  same name (a watch event or a relist without it);
- its token's `exp` passes (the daemon reads its refreshed projected token
  when it reconnects; checked every `EXPIRY_SWEEP` seconds);
- its node's VpbluNode was deleted with its Node (`NodeGone`, from the
  NodeOwnershipActor): the key is forgotten with it, and the daemon, if it is
  still there, says its key again in the Hello of its next stream (the
  StatusActor holds it while no Node of that name exists).

A second watch of the daemon Pods (the StateActor has one for the VpbluNode
DaemonPod condition) costs one Pod per node; in return this gate depends on
nothing but the API server and is wired on its own.

Must never: hand on a stream the view does not admit, or read a stream (the
sessions do); it only closes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from vpblu.actors.watcher import WatcherActor
from vpblu.core.sources import DaemonPodSource, Typed
from vpblu.kube import client as k
from vpblu.kube import resources
from vpblu.messages import KindChanged, KindListed, NodeGone, NodePresence, WatchMessage
from vpblu.metrics import ControllerMetrics
from vpblu.stream.identity import AuthenticationFailed
from vpblu.stream.podbinding import DaemonPod, DaemonPods, PodsNotKnown
from vpblu.stream.transport import NodeStream

log = logging.getLogger(__name__)

DAEMON_NAMESPACE = "vpblu-system"
DAEMON_POD_SELECTOR = "app.kubernetes.io/name=vpblu,app.kubernetes.io/component=daemon"
WATCH_INBOX = 64
# How often streams are checked for an expired token and forgotten once closed.
EXPIRY_SWEEP = 1.0


def _daemon_pod(obj: Typed) -> DaemonPod | None:
    if not isinstance(obj, DaemonPodSource):
        return None
    return DaemonPod(obj.meta.name, obj.meta.uid, obj.node_name, obj.terminating)


class DaemonPodsActor:
    def __init__(
        self,
        kube: k.KubeApi,
        pods: DaemonPods,
        streams_in: trio.MemoryReceiveChannel[NodeStream],
        streams_out: trio.MemorySendChannel[NodeStream],
        *,
        label_selector: str = DAEMON_POD_SELECTOR,
        metrics: ControllerMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
        nodes_gone: trio.MemoryReceiveChannel[NodePresence] | None = None,
    ) -> None:
        self._nodes_gone = nodes_gone
        self._wall_clock = wall_clock  # a token's exp is wall-clock time
        self._kube = kube
        self._pods = pods
        self._in = streams_in
        self._out = streams_out
        self._label_selector = label_selector
        self._metrics = metrics
        self._live: list[NodeStream] = []
        self.refused = 0  # streams closed here before a session
        self.ended = 0  # established streams ended because their identity stopped holding

    @property
    def live(self) -> int:
        return len(self._live)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        watch_send, watch_receive = trio.open_memory_channel[WatchMessage](WATCH_INBOX)
        watcher = WatcherActor(self._kube, k.PODS, resources.parse_daemon_pod, watch_send,
                               namespace=self._pods.namespace,
                               label_selector=self._label_selector, metrics=self._metrics)
        try:
            async with self._in, self._out, watch_receive, trio.open_nursery() as nursery:
                nursery.start_soon(self._follow, watch_receive)
                if self._nodes_gone is not None:
                    nursery.start_soon(self._follow_gone, self._nodes_gone)
                await nursery.start(watcher.run)  # returns once listed (and applied, below)
                nursery.start_soon(self._sweep)
                task_status.started()
                async for stream in self._in:
                    await self._admit(stream)
                nursery.cancel_scope.cancel()
        finally:
            self._pods.forget()

    async def _admit(self, stream: NodeStream) -> None:
        try:
            self._pods.check(stream.identity)
        except (AuthenticationFailed, PodsNotKnown) as exc:
            log.warning("node %s: stream refused: %s", stream.node_name, exc)
            self.refused += 1
            stream.close(f"refused: {exc}")
            return
        self._live.append(stream)
        await self._out.send(stream)

    async def _follow(self, watch: trio.MemoryReceiveChannel[WatchMessage]) -> None:
        async for message in watch:
            match message:
                case KindListed(objects=objects):
                    self._pods.replace(p for p in map(_daemon_pod, objects) if p is not None)
                case KindChanged(upserted=upserted, deleted=deleted):
                    for pod in map(_daemon_pod, upserted):
                        if pod is not None:
                            self._pods.upsert(pod)
                    for name in deleted:
                        self._pods.delete(name)
            self._recheck()

    async def _follow_gone(self, gone: trio.MemoryReceiveChannel[NodePresence]) -> None:
        async with gone:
            async for message in gone:
                if not isinstance(message, NodeGone):
                    continue  # registered again: its daemon's stream is right as it is
                for stream in self._live:
                    if stream.node_name == message.node and not stream.closed:
                        self._end(stream, "its Node was deleted or replaced; say the key "
                                          "again in a new Hello")

    def _recheck(self) -> None:
        kept = []
        for stream in self._live:
            if stream.closed:
                continue
            try:
                self._pods.check(stream.identity)
            except (AuthenticationFailed, PodsNotKnown) as exc:
                self._end(stream, str(exc))
                continue
            kept.append(stream)
        self._live = kept

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(EXPIRY_SWEEP)
            now = self._wall_clock()
            kept = []
            for stream in self._live:
                if stream.closed:
                    continue
                expires_at = stream.identity.expires_at
                if expires_at is not None and expires_at <= now:
                    self._end(stream, "its token expired")
                    continue
                kept.append(stream)
            self._live = kept

    def _end(self, stream: NodeStream, why: str) -> None:
        log.warning("node %s: ending its stream: %s", stream.node_name, why)
        self.ended += 1
        stream.close(f"no longer authorized: {why}")
