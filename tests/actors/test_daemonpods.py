"""DaemonPodsActor against FakeKubeApi and fake streams: which streams reach the
sessions, and which it ends (Pod gone, token expired), on the autojump clock.
The real thing is tests/integration/test_pod_identity.py."""

from __future__ import annotations

import attrs
import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.daemonpods import DAEMON_NAMESPACE, DaemonPodsActor
from vpblu.kube.client import PODS
from vpblu.messages import NodeGone, NodePresence, NodeRegistered
from vpblu.stream.identity import Identity
from vpblu.stream.podbinding import DaemonPods
from vpblu.stream.transport import NodeStream

WALL = 1_800_000_000.0  # the fake wall clock: this plus trio's virtual time


@attrs.define(eq=False)
class FakeNodeStream:
    """What the actor uses of a NodeStream: identity, node name, close()."""

    identity: Identity
    close_reason: str | None = None

    @property
    def node_name(self) -> str:
        return self.identity.node_name

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason


def pod(name: str, uid: str, node: str) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": DAEMON_NAMESPACE, "uid": uid,
                         "labels": {"app.kubernetes.io/component": "daemon"}},
            "spec": {"nodeName": node}, "status": {"phase": "Running"}}


def identity(node: str, pod_name: str, uid: str, expires_in: float | None = None) -> Identity:
    return Identity(node, "sa", pod_name=pod_name, pod_uid=uid,
                    expires_at=None if expires_in is None else WALL + expires_in)


async def run_gate(nursery: trio.Nursery, kube: FakeKubeApi,
                   nodes: trio.MemoryReceiveChannel[NodePresence] | None = None) -> tuple[
        trio.MemorySendChannel[NodeStream], trio.MemoryReceiveChannel[NodeStream],
        DaemonPodsActor]:
    streams_in, gate_in = trio.open_memory_channel[NodeStream](8)
    gate_out, admitted = trio.open_memory_channel[NodeStream](8)
    actor = DaemonPodsActor(kube, DaemonPods(DAEMON_NAMESPACE), gate_in, gate_out,
                            wall_clock=lambda: WALL + trio.current_time(), nodes_gone=nodes)
    await nursery.start(actor.run)
    return streams_in, admitted, actor


async def test_streams_end_when_their_token_expires_or_their_pod_goes(
        autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    for name, uid, node in (("d-a", "ua", "a"), ("d-b", "ub", "b"), ("d-c", "uc", "c")):
        await kube.put(PODS, pod(name, uid, node))
    async with trio.open_nursery() as nursery:
        streams, admitted, actor = await run_gate(nursery, kube)
        expiring = FakeNodeStream(identity("a", "d-a", "ua", expires_in=30))
        staying = FakeNodeStream(identity("b", "d-b", "ub"))
        orphaned = FakeNodeStream(identity("c", "d-c", "uc"))
        stranger = FakeNodeStream(identity("c", "d-x", "ux"))
        for s in (expiring, staying, orphaned, stranger):
            await streams.send(s)  # type: ignore[arg-type]
        got = [await admitted.receive() for _ in range(3)]
        assert got == [expiring, staying, orphaned]  # type: ignore[comparison-overlap]
        await trio.sleep(10)
        assert stranger.close_reason is not None and "not a vpblu daemon Pod" in (
            stranger.close_reason)
        assert not any(s.closed for s in got)
        await kube.remove(PODS, "d-c")
        await trio.sleep(1)
        assert orphaned.close_reason is not None and "d-c" in orphaned.close_reason
        await trio.sleep(25)  # past the token's exp (30 s after the start)
        assert expiring.close_reason == "no longer authorized: its token expired"
        assert not staying.closed
        assert (actor.refused, actor.ended) == (1, 2)
        nursery.cancel_scope.cancel()



async def test_a_node_gone_ends_its_stream_and_its_daemon_is_let_in_again(
        autojump_clock: trio.testing.MockClock) -> None:
    """NodeGone (deleted or replaced) ends that node's stream: its daemon says its
    key again in a new Hello, which is admitted (the StatusActor decides whether
    to write it). NodeRegistered changes nothing here."""
    kube = FakeKubeApi()
    for name, uid, node in (("d-a", "ua", "a"), ("d-b", "ub", "b")):
        await kube.put(PODS, pod(name, uid, node))
    tell, told = trio.open_memory_channel[NodePresence](8)
    async with trio.open_nursery() as nursery:
        streams, admitted, actor = await run_gate(nursery, kube, told)

        async def offer(node: str, pod_name: str, uid: str) -> FakeNodeStream:
            stream = FakeNodeStream(identity(node, pod_name, uid))
            await streams.send(stream)  # type: ignore[arg-type]
            assert await admitted.receive() is stream  # type: ignore[comparison-overlap]
            return stream

        first_a, first_b = await offer("a", "d-a", "ua"), await offer("b", "d-b", "ub")
        await tell.send(NodeGone("a", deleted=True))
        await trio.sleep(1)
        assert first_a.closed and not first_b.closed
        again_a = await offer("a", "d-a", "ua")
        await tell.send(NodeRegistered("a"))
        await tell.send(NodeGone("b"))  # replaced: a Node of that name exists
        await trio.sleep(1)
        assert not again_a.closed and first_b.closed
        await offer("b", "d-b", "ub")
        assert (actor.refused, actor.ended) == (0, 2)
        nursery.cancel_scope.cancel()
