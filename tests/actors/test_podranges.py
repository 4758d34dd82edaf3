"""The remembered pod ranges on the leader: the StateActor keeps a deleted Node's
podCIDR in every DataPath, reads the ConfigMap before its first push and hands
new ranges to the PodRangesActor, which adds them to the ConfigMap (FakeKubeApi)
without touching an operator's lines. On the autojump clock; the real thing is
tests/e2e/test_podranges_e2e.py."""

from __future__ import annotations

import trio
import trio.testing

from tests.actors.test_state import Harness, mesh, node, vnode
from tests.fakes.kube import FakeKubeApi
from vpblu.actors.podranges import PodRangesActor, parse_pod_ranges
from vpblu.actors.state import WATCHED_KINDS, StateActor
from vpblu.core import podranges
from vpblu.core.model import PodRange, TunnelPolicy, network
from vpblu.core.sources import PolicySource, Typed
from vpblu.kube.client import CONFIG_MAPS, Conflict
from vpblu.messages import KindChanged, KindListed, PushDelta, PushSync, RememberPodRanges

SETTLE = 5.0


def config_map(text: str, rv: str = "7") -> dict[str, object]:
    return {"metadata": {"name": podranges.CONFIG_MAP, "namespace": "vpblu-system",
                         "resourceVersion": rv, "uid": "cm-uid"},
            "data": {podranges.DATA_KEY: text}}


def plain_mesh() -> PolicySource:
    return PolicySource(mesh().meta, TunnelPolicy("mesh"))  # no clusterCIDRs


class RangesHarness(Harness):
    def __init__(self) -> None:
        super().__init__()
        self.ranges_send, self.ranges = trio.open_memory_channel[RememberPodRanges](16)
        # The StateActor the base made, again with the writer's channel.
        self.actor = StateActor(self.actor._inbox, self.actor._status, term=3,
                                pod_ranges=self.ranges_send)

    async def list_kinds(self, objects: dict[str, tuple[Typed, ...]],
                         skip: str | None = None) -> None:
        for kind in WATCHED_KINDS:
            if kind != skip:
                await self.send.send(KindListed(kind, objects.get(kind, ()), (), "1"))


def cidrs(state_push: PushSync | PushDelta) -> list[str]:
    return [str(c) for c in state_push.state.datapath.cluster_cidrs]


async def test_a_deleted_nodes_range_stays_and_goes_to_the_writer(
        autojump_clock: trio.testing.MockClock) -> None:
    h = RangesHarness()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_kinds({"Node": (node(1), node(2), node(3)),
                            "VpbluNode": (vnode(1), vnode(2), vnode(3)),
                            "TunnelPolicy": (plain_mesh(),)})
        box = await h.connect(1)
        sync = await box.receive()
        assert isinstance(sync, PushSync)
        assert cidrs(sync) == ["10.244.1.0/24", "10.244.2.0/23"]
        handed = await h.ranges.receive()
        assert [(str(r.cidr), r.node) for r in handed.ranges] == [
            ("10.244.1.0/24", "n1"), ("10.244.2.0/24", "n2"), ("10.244.3.0/24", "n3")]
        # n3's Node is deleted before any ConfigMap holds its range.
        await h.send.send(KindChanged("Node", (), ("n3",), (), "2"))
        delta = await box.receive()  # a delta, or the whole state when that is as short
        assert isinstance(delta, PushSync | PushDelta)
        assert [p.name for p in delta.state.peers] == ["n2"]
        assert cidrs(delta) == ["10.244.1.0/24", "10.244.2.0/23"]
        with trio.move_on_after(SETTLE):
            raise AssertionError(f"handed again: {await h.ranges.receive()}")
        nursery.cancel_scope.cancel()


async def test_a_new_leader_reads_the_config_map_before_its_first_push(
        autojump_clock: trio.testing.MockClock) -> None:
    """The ConfigMap remembers n3 (deleted before this leader): nothing goes out
    until it is listed, and then n3's range is in the first push."""
    h = RangesHarness()
    remembered = parse_pod_ranges(config_map("10.244.3.0/24 n3\n"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        box = await h.connect(1)
        await h.list_kinds({"Node": (node(1), node(2)), "VpbluNode": (vnode(1), vnode(2)),
                            "TunnelPolicy": (plain_mesh(),)}, skip="ConfigMap")
        with trio.move_on_after(60):
            raise AssertionError(f"pushed before the ConfigMap was read: {await box.receive()}")
        await h.send.send(KindListed("ConfigMap", (remembered,), (), "1"))
        sync = await box.receive()
        assert isinstance(sync, PushSync)
        assert cidrs(sync) == ["10.244.1.0/24", "10.244.2.0/23"]
        handed = await h.ranges.receive()  # the live ones it lacks, not n3's
        assert [str(r.cidr) for r in handed.ranges] == ["10.244.1.0/24", "10.244.2.0/24"]
        # An operator releases n3's range by editing the ConfigMap.
        released = parse_pod_ranges(config_map(
            "10.244.1.0/24 n1\n10.244.2.0/24 n2\n", rv="8"))
        await h.send.send(KindChanged("ConfigMap", (released,), (), (), "2"))
        delta = await box.receive()
        assert isinstance(delta, PushSync | PushDelta)
        assert cidrs(delta) == ["10.244.1.0/24", "10.244.2.0/24"]
        nursery.cancel_scope.cancel()


async def test_the_writer_creates_then_only_adds_and_keeps_an_operators_lines(
        autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    send, inbox = trio.open_memory_channel[RememberPodRanges](8)
    actor = PodRangesActor(kube, inbox)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await send.send(RememberPodRanges((PodRange(network("10.244.1.0/24"), "n1"),)))
        await trio.sleep(SETTLE)
        made = await kube.get(CONFIG_MAPS, podranges.CONFIG_MAP)
        assert made["metadata"]["labels"]["app.kubernetes.io/component"] == "pod-ranges"
        assert made["data"][podranges.DATA_KEY] == podranges.HEADER + "10.244.1.0/24 n1\n"
        # An operator's edit: a comment, and n1's line gone (released).
        await kube.put(CONFIG_MAPS, {**made, "data": {podranges.DATA_KEY: "# kept\n"}})
        # The next write meets a Conflict once (another writer), reads again, merges.
        kube.fail_next.append(Conflict(409, "Conflict", "the object has been modified"))
        await send.send(RememberPodRanges((PodRange(network("10.244.4.0/24"), "n4"),)))
        await trio.sleep(SETTLE)
        text = (await kube.get(CONFIG_MAPS, podranges.CONFIG_MAP))["data"][podranges.DATA_KEY]
        assert text == "# kept\n10.244.4.0/24 n4\n"
        writes = actor.writes
        await send.send(RememberPodRanges((PodRange(network("10.244.4.0/24"), "n4"),)))
        await trio.sleep(SETTLE)
        assert actor.writes == writes  # it holds it already: nothing written
        nursery.cancel_scope.cancel()
