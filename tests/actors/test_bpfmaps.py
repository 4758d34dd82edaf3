"""BpfMapActor against an in-memory kernel: what it writes, in which order, and when it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.datapath import FakeClassifierMaps, FakePodLinks
from vpblu.core.model import CidrPair, Route
from vpblu.messages import ApplyDataPath, BpfMapInbox, DataPathApplied
from vpblu.node.bpfmaps import BpfMapActor
from vpblu.node.config import MESH_FWMARK, MESH_FWMARK_MASK, DaemonConfig
from vpblu.node.kernel import bpftables
from vpblu.node.kernel.bcc import PodLink
from vpblu.node.kernel.bpftables import BLOCK_RULE_LIMIT, ClassifierConfig, DestKind

REPLY_TIMEOUT = 5
CONFIG = DaemonConfig(node_name="n1", bpf_pin_dir=Path("/nonexistent/vb-fake"))


@asynccontextmanager
async def running(
    maps: FakeClassifierMaps, links: FakePodLinks
) -> AsyncIterator[tuple[BpfMapActor, trio.MemorySendChannel[BpfMapInbox]]]:
    send, inbox = trio.open_memory_channel[BpfMapInbox](4)
    actor = BpfMapActor(CONFIG, inbox, links=links, load_classifier=maps.load)
    async with trio.open_nursery() as nursery, send:
        await nursery.start(actor.run)
        yield actor, send


async def apply(send: trio.MemorySendChannel[BpfMapInbox], **policy: Any) -> DataPathApplied:
    reply_send, reply_recv = trio.open_memory_channel[DataPathApplied](1)
    await send.send(ApplyDataPath(reply=reply_send, **policy))
    with trio.fail_after(REPLY_TIMEOUT):
        return await reply_recv.receive()


def pair(i: int, dst: str = "10.200.0.0/16") -> CidrPair:
    return CidrPair(f"10.{i // 256}.{i % 256}.0/24", dst)


async def test_start_writes_the_mark_and_attaches_every_pod_link() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([PodLink(3, "veth1"), PodLink(4, "veth2")])
    async with running(maps, links) as (actor, _send):
        assert maps.config == ClassifierConfig(MESH_FWMARK, MESH_FWMARK_MASK, strict=False)
        assert links.attached == {3: maps.prog_fd, 4: maps.prog_fd}
        assert actor.statistics().attached == ("veth1", "veth2")
    assert maps.closed and links.opened == 0


async def test_reapplying_the_same_policy_writes_nothing() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([])
    policy: dict[str, Any] = {
        "routes": [Route("10.1.0.0/16", "b")],
        "blocks": [pair(1), pair(2)],
        "cluster_cidrs": ["10.0.0.0/8"],
        "strict": True,
    }
    async with running(maps, links) as (_actor, send):
        first = await apply(send, **policy)
        before = maps.writes
        assert await apply(send, **policy) == DataPathApplied(0, 0)
        assert maps.writes == before
    assert first.written == 2 + 1 + 2 + 1  # two src, one dst, two dest, the strict flag


async def test_a_restart_over_the_same_maps_finds_the_rules_and_writes_nothing() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([PodLink(3, "veth1")])
    policy: dict[str, Any] = {"routes": [Route("10.1.0.0/16", "b")], "blocks": [pair(1), pair(7)]}
    async with running(maps, links) as (_actor, send):
        await apply(send, **policy)
    written = maps.writes
    async with running(maps, links) as (actor, send):
        assert await apply(send, **policy) == DataPathApplied(0, 0)
        # One more rule writes only its own src prefix and the shared dst prefix
        # (which gains its bit): the kept rules kept their bits, so their src
        # prefixes are not rewritten.
        assert await apply(send, **{**policy, "blocks": [pair(1), pair(7), pair(9)]}) == (
            DataPathApplied(written=2, deleted=0)
        )
        assert actor.statistics().entries_written == 2
    assert maps.writes == written + 2


async def test_a_freed_rule_bit_is_cleared_before_a_new_rule_takes_it() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([])
    old = [CidrPair("10.1.0.0/16", "10.9.0.0/16"), CidrPair("10.2.0.0/16", "10.8.0.0/16")]
    new = [old[1], CidrPair("10.3.0.0/16", "10.7.0.0/16")]  # takes old[0]'s bit
    async with running(maps, links) as (_actor, send):
        await apply(send, blocks=old)
        maps.snapshots.clear()
        await apply(send, blocks=new)
    assert maps.snapshots
    for seen in maps.snapshots:
        rules = set(bpftables.decode_rules(seen.block_src, seen.block_dst).values())
        assert rules <= set(old) | set(new), f"a mixed rule was visible: {rules}"
    assert set(bpftables.decode_rules(maps.block_src, maps.block_dst).values()) == set(new)


async def test_too_many_blocks_are_refused_and_the_actor_keeps_serving() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([])
    async with running(maps, links) as (_actor, send):
        refused = await apply(send, blocks=[pair(i) for i in range(BLOCK_RULE_LIMIT + 1)])
        assert refused.refused is not None and "at most 128" in refused.refused
        assert (refused.written, refused.deleted) == (0, 0)
        assert maps.block_src == {}
        assert (await apply(send, routes=[Route("10.1.0.0/16", "b")])).written == 1
    assert maps.dest == {Route("10.1.0.0/16", "b").cidr: DestKind.REMOTE}


@pytest.mark.parametrize("vanished", [False, True])
async def test_links_that_appear_later_are_attached_unless_already_gone(vanished: bool) -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([PodLink(3, "veth1")])
    if vanished:
        links.vanished.add(9)
    async with running(maps, links) as (actor, _send):
        links.add(PodLink(9, "veth9"))
        if vanished:
            await trio.testing.wait_all_tasks_blocked()
            assert actor.statistics().attached == ("veth1",)
        else:
            with trio.fail_after(REPLY_TIMEOUT):
                await actor.wait_attached("veth9")
            assert links.attached == {3: maps.prog_fd, 9: maps.prog_fd}
