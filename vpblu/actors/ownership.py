"""NodeOwnershipActor: on the leader, every VpbluNode belongs to its Node.

Owns the VpbluNodes' ownerReference to their Node and their deletion when that
Node is gone. A VpbluNode whose Node exists gets an ownerReference to it (that
Node's uid), so a real cluster's garbage collector deletes it with its Node.
A VpbluNode whose owner is gone - the Node deleted, or a Node of the same name
made again with another uid (a reinstalled machine, a reused name) - is deleted
here as well (preconditioned on its uid), without waiting for a garbage
collector (there may be none, and the key in its status must never pass to the
new machine), and the StatusActor is told to forget the key its daemon
reported (`NodeGone`), and the DaemonPodsActor to end that node's stream: a
daemon still running there (a Node object deleted and registered again under
it) says its key again in its next Hello. A key is only ever taken from a
daemon that is there, never carried over from the VpbluNode of a previous Node.
A VpbluNode made before its Node (an operator's endpoint for a node about to
join) is left alone until that Node appears.

A Node deleted (a watch event, or a relist without it) is told at once, with
or without a VpbluNode (`NodeGone(deleted=True)`, to the StatusActor and the
gate): its daemon may still run there, and the key it says in its next Hello
would otherwise make the VpbluNode again for a Node that is not there; the
StatusActor holds that key until a Node of that name is seen again (told as
`NodeRegistered`), and writes it then.

Level-triggered over its own watches of Nodes and VpbluNodes: after both are
listed, each change reconciles the names it touched; a failed API call is
retried with backoff for that name. Must never delete a VpbluNode that was not
owned by a Node, or one whose owner still exists.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from vpblu.actors.watcher import WatcherActor
from vpblu.core.sources import NodeSource, Typed, VpbluNodeSource
from vpblu.kube import client as k
from vpblu.kube import resources
from vpblu.messages import (
    KindChanged,
    KindListed,
    NodeGone,
    NodePresence,
    NodeRegistered,
    StatusInbox,
    WatchMessage,
)
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)

WATCH_INBOX = 64
RETRY_DELAY = 1.0
RETRY_DELAY_MAX = 30.0


class NodeOwnershipActor:
    def __init__(self, kube: k.KubeApi, status: trio.MemorySendChannel[StatusInbox],
                 metrics: ControllerMetrics | None = None, *,
                 nodes_gone: trio.MemorySendChannel[NodePresence] | None = None) -> None:
        self._nodes_gone = nodes_gone  # the gate, which ends that node's stream
        self._kube = kube
        self._status = status
        self._metrics = metrics
        self._nodes: dict[str, str] = {}  # Node name -> uid
        self._vpblu_nodes: dict[str, VpbluNodeSource] = {}
        self._listed: set[str] = set()
        # Node names whose deletion or (re)registration is still to be told.
        self._node_deleted: set[str] = set()
        self._node_added: set[str] = set()
        self._dirty: set[str] = set()
        self._delay: dict[str, float] = {}
        self.deleted = 0
        self.adopted = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[WatchMessage | None](WATCH_INBOX)
        watchers = [WatcherActor(self._kube, kind, parse, send.clone(), metrics=self._metrics)
                    for kind, parse in ((k.NODES, resources.parse_node),
                                        (k.VPBLU_NODES, resources.parse_vpblu_node))]
        async with (self._status, send, receive, contextlib.AsyncExitStack() as stack,
                    trio.open_nursery() as nursery):
            if self._nodes_gone is not None:
                await stack.enter_async_context(self._nodes_gone)
            nursery.start_soon(self._follow, receive, send.clone(), nursery)
            for watcher in watchers:
                await nursery.start(watcher.run)
            task_status.started()

    async def _follow(self, inbox: trio.MemoryReceiveChannel[WatchMessage | None],
                      poke: trio.MemorySendChannel[WatchMessage | None],
                      nursery: trio.Nursery) -> None:
        async with poke:
            async for message in inbox:
                match message:
                    case KindListed(kind=kind, objects=objects):
                        relisted = kind in self._listed
                        self._listed.add(kind)
                        before = set(self._nodes)
                        if kind == k.NODES.kind:
                            self._nodes = {}
                        else:
                            self._vpblu_nodes = {}
                        self._dirty.update(before, self._vpblu_nodes)
                        for obj in objects:
                            self._upsert(obj)
                        if kind == k.NODES.kind and relisted:
                            # Changes a broken watch missed (the first list tells none:
                            # this leader's gate and StatusActor start knowing none).
                            self._node_deleted |= before - self._nodes.keys()
                            self._node_added |= self._nodes.keys() - before
                    case KindChanged(kind=kind, upserted=upserted, deleted=deleted):
                        for obj in upserted:
                            if isinstance(obj, NodeSource) and obj.meta.name not in self._nodes:
                                self._node_added.add(obj.meta.name)
                            self._upsert(obj)
                        view = self._nodes if kind == k.NODES.kind else self._vpblu_nodes
                        for name in deleted:
                            view.pop(name, None)
                            self._dirty.add(name)
                            if kind == k.NODES.kind:
                                self._node_deleted.add(name)
                if len(self._listed) == 2:
                    await self._reconcile(poke, nursery)

    def _upsert(self, obj: Typed) -> None:
        if isinstance(obj, NodeSource):
            self._nodes[obj.meta.name] = obj.meta.uid
            self._dirty.add(obj.meta.name)
        elif isinstance(obj, VpbluNodeSource):
            self._vpblu_nodes[obj.meta.name] = obj
            self._dirty.add(obj.meta.name)

    async def _reconcile(self, poke: trio.MemorySendChannel[WatchMessage | None],
                         nursery: trio.Nursery) -> None:
        dirty, self._dirty = self._dirty, set()
        for name in sorted(dirty):
            try:
                await self._one(name)
                self._delay.pop(name, None)
            except (k.ApiUnavailable, k.ApiError) as exc:
                delay = self._delay.get(name, RETRY_DELAY)
                self._delay[name] = min(delay * 2, RETRY_DELAY_MAX)
                log.warning("VpbluNode %s: %r; trying again in %.1fs", name, exc, delay)
                nursery.start_soon(self._again, name, delay, poke.clone())

    async def _again(self, name: str, delay: float,
                     poke: trio.MemorySendChannel[WatchMessage | None]) -> None:
        async with poke:
            await trio.sleep(delay)
            self._dirty.add(name)
            await poke.send(None)

    async def _tell(self, message: NodePresence) -> None:
        await self._status.send(message)
        if self._nodes_gone is not None:
            await self._nodes_gone.send(message)

    async def _one(self, name: str) -> None:
        node_uid = self._nodes.get(name)
        told_deleted = node_uid is None and name in self._node_deleted
        if told_deleted:
            log.info("Node %s deleted: its daemon's stream is ended and no VpbluNode is "
                     "made for it until a Node of that name is registered", name)
            await self._tell(NodeGone(name, deleted=True))
        elif node_uid is not None and name in self._node_added:
            await self._tell(NodeRegistered(name))
        self._node_deleted.discard(name)
        self._node_added.discard(name)
        vn = self._vpblu_nodes.get(name)
        if vn is None:
            return
        owner = vn.meta.owner_uid(k.NODES.kind)
        if owner is not None and owner != node_uid:
            why = "was deleted" if node_uid is None else f"was replaced (now uid {node_uid})"
            log.warning("VpbluNode %s: its Node (uid %s) %s; deleting the VpbluNode and "
                        "forgetting its key", name, owner, why)
            # The key is forgotten before the object goes, so that no status write
            # in between makes the VpbluNode again with it. A deleted Node was told
            # just above, before this delete; told here: a replaced Node, and one
            # this leader found missing in its first list (that list tells none).
            gone = None if told_deleted else NodeGone(name, deleted=node_uid is None)
            if gone is not None:
                await self._status.send(gone)
            try:
                await self._kube.delete_uid(k.VPBLU_NODES, name, vn.meta.uid)
                self.deleted += 1
            except k.Conflict:
                pass  # a newer VpbluNode of that name: its own watch event decides
            except k.NotFound:
                pass  # gone already (the garbage collector)
            self._vpblu_nodes.pop(name, None)
            # Whoever runs there now says its key again (the gate ends its stream).
            if gone is not None and self._nodes_gone is not None:
                await self._nodes_gone.send(gone)
        elif owner is None and node_uid is not None:
            reference = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}
            path = "/metadata/ownerReferences"
            add = ({"op": "add", "path": f"{path}/-", "value": reference} if vn.meta.owners
                   else {"op": "add", "path": path, "value": [reference]})
            try:
                await self._kube.patch_json(k.VPBLU_NODES, name, [
                    {"op": "test", "path": "/metadata/uid", "value": vn.meta.uid}, add])
            except k.NotFound:
                return
            self.adopted += 1
