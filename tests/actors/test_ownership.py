"""NodeOwnershipActor against FakeKubeApi, on the autojump clock: what it tells the
StatusActor and the gate (DaemonPodsActor) when a Node goes, and how often.
The real thing is tests/integration/test_node_ownership.py."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.ownership import NodeOwnershipActor
from vpblu.kube.client import NODES, VPBLU_NODES
from vpblu.messages import NodeGone, NodePresence, NodeRegistered, StatusInbox

SETTLE = 5.0  # virtual seconds: every watch event handled and every call made


def node(name: str, uid: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}


def vpblu_node(name: str, uid: str, owner: str | None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "uid": uid}
    if owner is not None:
        md["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name,
                                  "uid": owner}]
    return {"apiVersion": "vpblu.io/v1alpha1", "kind": "VpbluNode", "metadata": md}


def drain(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except trio.WouldBlock:
            return out


async def run_actor(nursery: trio.Nursery, kube: FakeKubeApi) -> tuple[
        trio.MemoryReceiveChannel[StatusInbox], trio.MemoryReceiveChannel[NodePresence]]:
    status_send, status = trio.open_memory_channel[StatusInbox](64)
    gate_send, gate = trio.open_memory_channel[NodePresence](64)
    actor = NodeOwnershipActor(kube, status_send, nodes_gone=gate_send)
    await nursery.start(actor.run)
    await trio.sleep(SETTLE)
    return status, gate


async def test_a_deleted_node_with_a_vpblu_node_is_told_once_before_its_delete(
        autojump_clock: trio.testing.MockClock) -> None:
    """`kubectl delete node` of a node that has a VpbluNode: the StatusActor and
    the gate each get one NodeGone(deleted=True) (not a second from the
    stale-owner branch), and it comes before the VpbluNode is deleted."""
    kube = FakeKubeApi()
    await kube.put(NODES, node("n1", "node-uid-1"))
    await kube.put(VPBLU_NODES, vpblu_node("n1", "vn-uid-1", "node-uid-1"))
    async with trio.open_nursery() as nursery:
        status, gate = await run_actor(nursery, kube)
        assert drain(status) == [] and drain(gate) == []
        await kube.remove(NODES, "n1")
        await trio.sleep(SETTLE)
        told = drain(status)
        assert told == [NodeGone("n1", deleted=True)], told
        assert drain(gate) == [NodeGone("n1", deleted=True)]
        assert ("delete", "VpbluNode") in kube.calls
        assert "n1" not in {o["metadata"]["name"] for o in (await kube.list(VPBLU_NODES)).items}
        nursery.cancel_scope.cancel()


async def test_a_replaced_node_is_told_once_as_replaced(
        autojump_clock: trio.testing.MockClock) -> None:
    """A Node of the same name with another uid (seen as one change): one
    NodeGone(deleted=False) to each, the old VpbluNode deleted."""
    kube = FakeKubeApi()
    await kube.put(NODES, node("n1", "node-uid-1"))
    await kube.put(VPBLU_NODES, vpblu_node("n1", "vn-uid-1", "node-uid-1"))
    async with trio.open_nursery() as nursery:
        status, gate = await run_actor(nursery, kube)
        await kube.put(NODES, node("n1", "node-uid-2"))
        await trio.sleep(SETTLE)
        assert drain(status) == [NodeGone("n1", deleted=False)]
        assert drain(gate) == [NodeGone("n1", deleted=False)]
        assert not (await kube.list(VPBLU_NODES)).items
        nursery.cancel_scope.cancel()


async def test_a_node_missing_at_the_first_list_is_told_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """A VpbluNode whose Node is gone when this leader first lists (the first
    list tells no deletion): the stale-owner branch tells it, once each."""
    kube = FakeKubeApi()
    await kube.put(VPBLU_NODES, vpblu_node("n1", "vn-uid-1", "node-uid-1"))
    async with trio.open_nursery() as nursery:
        status, gate = await run_actor(nursery, kube)
        assert drain(status) == [NodeGone("n1", deleted=True)]
        assert drain(gate) == [NodeGone("n1", deleted=True)]
        assert not (await kube.list(VPBLU_NODES)).items
        # Registered again: told once, and nothing else.
        await kube.put(NODES, node("n1", "node-uid-2"))
        await trio.sleep(SETTLE)
        assert drain(status) == [NodeRegistered("n1")]
        assert drain(gate) == [NodeRegistered("n1")]
        nursery.cancel_scope.cancel()
