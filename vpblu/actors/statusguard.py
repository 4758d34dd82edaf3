"""StatusGuardActor: on the leader, tells the StatusActor about every version
of every VpbluNode the API server shows.

Owns a watch of VpbluNodes of its own, nothing else: each object it lists or
sees change becomes a `StatusObserved` (kind, name, resourceVersion) for the
StatusActor, which knows which versions it wrote itself and restores the
status it owns when anyone else wrote (vpblu.actors.status). A watch event
arrives within milliseconds of the write, so a key swapped by `kubectl patch
--subresource=status` is put back well within a second.

Must never write anything or decide anything: it only reports what it saw.
"""

from __future__ import annotations

import trio

from vpblu.actors.watcher import WatcherActor
from vpblu.core.sources import VpbluNodeSource
from vpblu.kube import client as k
from vpblu.kube import resources
from vpblu.messages import KindChanged, KindListed, StatusInbox, StatusObserved, WatchMessage
from vpblu.metrics import ControllerMetrics

WATCH_INBOX = 64


class StatusGuardActor:
    def __init__(self, kube: k.KubeApi, status: trio.MemorySendChannel[StatusInbox],
                 metrics: ControllerMetrics | None = None) -> None:
        self._kube = kube
        self._status = status
        self._metrics = metrics

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        watch_send, watch_receive = trio.open_memory_channel[WatchMessage](WATCH_INBOX)
        watcher = WatcherActor(self._kube, k.VPBLU_NODES, resources.parse_vpblu_node,
                               watch_send, metrics=self._metrics)
        async with self._status, watch_receive, trio.open_nursery() as nursery:
            nursery.start_soon(self._report, watch_receive)
            await nursery.start(watcher.run)
            task_status.started()

    async def _report(self, watch: trio.MemoryReceiveChannel[WatchMessage]) -> None:
        kind = k.VPBLU_NODES.kind
        async for message in watch:
            match message:
                case KindListed(objects=objects, invalid=invalid) | \
                        KindChanged(upserted=objects, invalid=invalid):
                    for obj in objects:
                        if isinstance(obj, VpbluNodeSource):
                            await self._status.send(StatusObserved(
                                kind, obj.meta.name, obj.meta.resource_version))
                    # A status someone made unreadable: never a version we wrote.
                    for bad in invalid:
                        await self._status.send(StatusObserved(kind, bad.name, ""))
