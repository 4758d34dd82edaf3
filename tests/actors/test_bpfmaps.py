"""BpfMapActor against an in-memory kernel: what it writes, in which order, and when it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

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
UNDERLAY = PodLink(1, "eth0")


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


async def test_start_clears_the_retired_mark_attaches_every_pod_link_and_guards_the_underlay(
) -> None:
    # The maps as a daemon that still steered by fwmark left them.
    maps = FakeClassifierMaps(config=ClassifierConfig(MESH_FWMARK, MESH_FWMARK_MASK, strict=True))
    links = FakePodLinks([PodLink(3, "veth1"), PodLink(4, "veth2")], underlay=UNDERLAY)
    async with running(maps, links) as (actor, _send):
        assert maps.config == ClassifierConfig(0, 0, strict=True)
        both = (maps.classify_fd, maps.deliver_fd)
        assert links.attached == {3: both, 4: both}
        assert links.guards == {UNDERLAY.index: maps.guard_fd}
        stats = actor.statistics()
        assert stats.attached == ("veth1", "veth2")
        assert stats.guard_link == "eth0"
    assert maps.closed and links.opened == 0
    # Stopping leaves the data plane in place (DESIGN §7).
    assert links.attached and links.guards


async def test_statistics_read_each_programs_counters() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([], underlay=UNDERLAY)
    maps.counter_values = {
        "counters": [7, 1, 2, 8],  # slots 0 and 3 retired: a previous daemon's counts
        "delivery_counters": [3, 4],
        "guard_counters": [5, 6, 9, 10],  # pod dst, pod src only, inner, dropped
    }
    async with running(maps, links) as (actor, _send):
        stats = actor.statistics()
    assert (stats.dropped_blocked, stats.passed) == (1, 2)
    assert (stats.delivered, stats.delivery_dropped_blocked) == (3, 4)
    assert stats.guard_cleartext == 5 + 9
    assert stats.guard_cleartext_encapsulated == 9
    assert stats.guard_pod_src_only == 6
    assert stats.guard_dropped == 10


async def test_the_guard_follows_the_underlay_and_leaves_no_other_link() -> None:
    maps, links = FakeClassifierMaps(), FakePodLinks([], underlay=None)
    links.guards[7] = maps.guard_fd  # a previous daemon's guard, on a former underlay
    async with running(maps, links) as (actor, send):
        # No underlay (no default route yet): no guard, and the actor still serves.
        assert actor.statistics().guard_link is None
        assert (await apply(send, routes=[Route("10.1.0.0/16", "b")])).written == 1
        links.move_underlay(UNDERLAY)
        with trio.fail_after(REPLY_TIMEOUT):
            await actor.wait_guard("eth0")
        assert links.guards == {UNDERLAY.index: maps.guard_fd}
        links.move_underlay(PodLink(2, "eth1"))
        with trio.fail_after(REPLY_TIMEOUT):
            await actor.wait_guard("eth1")
        assert links.guards == {2: maps.guard_fd}
        links.move_underlay(None)
        await trio.testing.wait_all_tasks_blocked()
        assert actor.statistics().guard_link is None


async def test_cleanup_removes_every_filter_and_guard() -> None:
    maps = FakeClassifierMaps()
    links = FakePodLinks([PodLink(3, "veth1")], underlay=UNDERLAY)
    async with running(maps, links) as (actor, _send):
        pass
    links.guards[7] = maps.guard_fd  # on a link that is no longer the underlay
    await actor.cleanup()
    assert links.attached == {} and links.guards == {}


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
            both = (maps.classify_fd, maps.deliver_fd)
            assert links.attached == {3: both, 9: both}
