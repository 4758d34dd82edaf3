"""BpfMapActor on real veths in network namespaces, judged by where real packets go.

Needs root, bcc and kernel headers (scripts/setup-system.sh).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio  # noqa: F401  the daemon imports it; pyroute2 must still work

from tests.e2e.datapath import OTHER_ADDR, REMOTE_ADDR, Receiver, Sender, Topology, topology
from vpblu.core.model import CidrPair, Route, network
from vpblu.messages import ApplyDataPath, BpfMapInbox, DataPathApplied
from vpblu.node.bpfmaps import BpfMapActor

pytestmark = pytest.mark.e2e

TEST_TIMEOUT = 40
REPLY_TIMEOUT = 5
ATTACH_TIMEOUT = 3
BLOCK_DEADLINE = 1.0  # a blocked pair drops within this long of the map write
SETTLE = 0.02  # in flight through the veths when a write completes
DRAIN = 0.1  # for the last packets to arrive after the senders stop

REMOTE_ROUTES = (Route("10.99.0.0/16", "node-b"),)


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t


@asynccontextmanager
async def actor_running(
    topo: Topology,
) -> AsyncIterator[tuple[BpfMapActor, trio.MemorySendChannel[BpfMapInbox]]]:
    """The actor in its own nursery; leaving closes its inbox, so run() returns."""
    send, inbox = trio.open_memory_channel[BpfMapInbox](4)
    actor = BpfMapActor(topo.config, inbox, netns=topo.node)
    async with trio.open_nursery() as nursery, send:
        await nursery.start(actor.run)
        yield actor, send


async def apply(send: trio.MemorySendChannel[BpfMapInbox], **policy: Any) -> DataPathApplied:
    reply_send, reply_recv = trio.open_memory_channel[DataPathApplied](1)
    await send.send(ApplyDataPath(reply=reply_send, **policy))
    with trio.fail_after(REPLY_TIMEOUT):
        return await reply_recv.receive()


@asynccontextmanager
async def receivers(topo: Topology) -> AsyncIterator[tuple[Receiver, Receiver]]:
    mesh, gw = Receiver(), Receiver()
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve, f"vb-{topo.tag}-mesh")
        await nursery.start(gw.serve, f"vb-{topo.tag}-gw")
        yield mesh, gw
        await trio.sleep(DRAIN)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def sending(*senders: Sender) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for sender in senders:
            await nursery.start(sender.run)
        yield
        nursery.cancel_scope.cancel()


async def test_remote_pod_cidr_is_marked_into_the_mesh_table_other_traffic_is_not(
    topo: Topology,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        to_remote = Sender(topo.pods["a"], REMOTE_ADDR, stream=1)
        to_other = Sender(topo.pods["a"], OTHER_ADDR, stream=2)
        async with receivers(topo) as (mesh, gw), actor_running(topo) as (actor, send):
            async with sending(to_remote, to_other):
                await trio.sleep(0.2)
                routed_at = trio.current_time()
                result = await apply(send, routes=REMOTE_ROUTES)
                routed = trio.current_time()
                await trio.sleep(0.3)
                assert await apply(send, routes=REMOTE_ROUTES) == DataPathApplied(0, 0)
            await trio.sleep(DRAIN)
            stats = actor.statistics()

        assert result == DataPathApplied(written=1, deleted=0)
        before = to_remote.sent_between(0, routed_at)
        after = to_remote.sent_between(routed + SETTLE, float("inf"))
        assert before and after
        # Unmarked, the main table sends 10.99.0.1 to gw; marked, the fwmark rule sends it to mesh.
        assert set(before) <= gw.stream(1).keys()
        assert set(after) <= mesh.stream(1).keys()
        assert not set(after) & gw.stream(1).keys()
        assert to_other.sent.keys() == gw.stream(2).keys()
        assert not mesh.stream(2)
        assert stats.marked >= len(after)
        assert stats.passed >= len(before) + len(to_other.sent)
        assert stats.attached == (topo.host_veth("a"), topo.host_veth("b"))


async def test_blocked_pair_drops_within_a_second_and_unblocking_restores(
    topo: Topology,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        blocked = Sender(topo.pods["a"], OTHER_ADDR, stream=1)
        bystander = Sender(topo.pods["b"], OTHER_ADDR, stream=2)
        block = CidrPair("10.240.1.2/32", "10.98.0.0/16")
        async with receivers(topo) as (_mesh, gw), actor_running(topo) as (actor, send):
            async with sending(blocked, bystander):
                await trio.sleep(0.3)
                write_at = trio.current_time()
                added = await apply(send, blocks=[block])
                written = trio.current_time()
                await trio.sleep(0.5)
                unblock_at = trio.current_time()
                removed = await apply(send, blocks=[])
                unblocked = trio.current_time()
                await trio.sleep(0.3)
            await trio.sleep(DRAIN)
            stats = actor.statistics()

        assert added == DataPathApplied(written=2, deleted=0)  # one src, one dst prefix
        assert removed == DataPathApplied(written=0, deleted=2)
        lost = blocked.lost(gw)
        assert lost, "the block dropped nothing"
        first_lost_at = blocked.sent[min(lost)]
        delay = first_lost_at - write_at
        print(f"block write -> first lost packet: {delay * 1000:.1f} ms "
              f"(write took {(written - write_at) * 1000:.1f} ms)")
        assert 0 <= delay < BLOCK_DEADLINE
        assert set(blocked.sent_between(written + SETTLE, unblock_at)) <= set(lost)
        assert not set(blocked.sent_between(unblocked + SETTLE, float("inf"))) & set(lost)
        assert blocked.sent_between(unblocked + SETTLE, float("inf"))
        assert bystander.lost(gw) == []
        assert stats.dropped_blocked >= len(lost)


async def test_a_veth_created_after_start_gets_the_classifier(topo: Topology) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with receivers(topo) as (mesh, gw), actor_running(topo) as (actor, send):
            await apply(send, routes=REMOTE_ROUTES)
            await trio.to_thread.run_sync(topo.add_pod, "c", 3)
            with trio.fail_after(ATTACH_TIMEOUT):
                await actor.wait_attached(topo.host_veth("c"))
            assert topo.host_veth("c") in actor.statistics().attached
            late = Sender(topo.pods["c"], REMOTE_ADDR, stream=3)
            async with sending(late):
                await trio.sleep(0.2)
        assert late.sent
        assert late.sent.keys() == mesh.stream(3).keys()
        assert not gw.stream(3)


def _filters(topo: Topology, pod: str) -> int:
    from tests.e2e.datapath import sh

    out = sh("ip", "netns", "exec", topo.node, "tc", "filter", "show", "dev",
             topo.host_veth(pod), "ingress")
    return out.count("direct-action")


async def test_restart_reuses_the_pinned_maps_writes_nothing_and_traffic_never_stops(
    topo: Topology,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        policy: dict[str, Any] = {
            "routes": REMOTE_ROUTES,
            "blocks": [CidrPair("10.240.2.0/24", "10.98.0.0/16")],
            "local_cidrs": ["10.240.0.0/16"],
            "cluster_cidrs": ["10.96.0.0/12", "10.240.0.0/16"],
        }
        flow = Sender(topo.pods["a"], REMOTE_ADDR, stream=1)
        async with receivers(topo) as (mesh, gw):
            async with actor_running(topo) as (first, send):
                first_write = await apply(send, **policy)
                first_ids = first.statistics().map_ids
            async with sending(flow):
                await trio.sleep(0.1)
                async with actor_running(topo) as (second, send):
                    restarted = second.statistics()
                    again = await apply(send, **policy)
                    await trio.sleep(0.1)
                    after = second.statistics()

        assert first_write.written == 5  # src, dst, three dest prefixes
        assert restarted.map_ids == first_ids
        assert again == DataPathApplied(0, 0)
        assert after.entries_written == after.entries_deleted == 0
        assert flow.sent
        assert flow.lost(mesh) == [], "the flow had a gap across the restart"
        assert not gw.stream(1)
        # `replace`, not a second filter next to the old one.
        assert _filters(topo, "a") == _filters(topo, "b") == 1


async def test_strict_drops_unrouted_cluster_traffic_and_counts_it(topo: Topology) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        routed = Sender(topo.pods["a"], REMOTE_ADDR, stream=1)
        unrouted = Sender(topo.pods["a"], OTHER_ADDR, stream=2)
        policy: dict[str, Any] = {"routes": REMOTE_ROUTES, "cluster_cidrs": ["10.96.0.0/12"]}
        async with receivers(topo) as (mesh, gw), actor_running(topo) as (actor, send):
            assert (await apply(send, **policy)).written == 2
            async with sending(routed, unrouted):
                await trio.sleep(0.2)
                strict_on = await apply(send, strict=True, **policy)
                on_at = trio.current_time()
                await trio.sleep(0.3)
                off_at = trio.current_time()
                strict_off = await apply(send, strict=False, **policy)
                off = trio.current_time()
                await trio.sleep(0.2)
            await trio.sleep(DRAIN)
            stats = actor.statistics()

        assert strict_on == strict_off == DataPathApplied(written=1, deleted=0)  # the flag
        dropped = unrouted.sent_between(on_at + SETTLE, off_at)
        assert dropped and not set(dropped) & gw.stream(2).keys()
        assert set(unrouted.sent_between(off + SETTLE, float("inf"))) <= gw.stream(2).keys()
        assert stats.dropped_strict >= len(dropped)
        assert routed.lost(mesh) == []


async def test_cleanup_removes_filters_qdiscs_and_pins(topo: Topology) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        before = topo.tc_state()
        async with actor_running(topo) as (actor, send):
            await apply(send, routes=REMOTE_ROUTES)
        during = topo.tc_state()
        assert topo.pin_dir.exists()
        await actor.cleanup()
        after = topo.tc_state()

    assert "clsact" in during and "clsact" not in before
    assert after == before
    assert not topo.pin_dir.exists()


def test_both_families_round_trip_through_the_pinned_kernel_maps(topo: Topology) -> None:
    """IPv6 shares the tries with IPv4 (family byte + 16 address bytes): what is written
    reads back equal, and a second load over the same pins sees it."""
    from vpblu.node.kernel import bpftables
    from vpblu.node.kernel.bcc import CLASSIFIER_SOURCE, BccClassifier

    rules = bpftables.assign_rule_ids(
        [CidrPair("10.1.0.0/16", "10.2.0.0/16"), CidrPair("fd00:1::/64", "fd00:2::/48"),
         CidrPair("::/0", "fd00:2:0:1::/64")],
        {},
    )
    wanted = bpftables.tables(
        rules,
        [Route("fd00:99::/56", "b"), Route("10.99.0.0/16", "b")],
        [network("fd00:240::/64")],
        [network("fd00::/16")],
    )
    empty = bpftables.ClassifierTables()
    maps = BccClassifier(CLASSIFIER_SOURCE, topo.pin_dir)
    try:
        maps.write_block_src(bpftables.diff(empty.block_src, wanted.block_src))
        maps.write_block_dst(bpftables.diff(empty.block_dst, wanted.block_dst))
        maps.write_dest(bpftables.diff(empty.dest, wanted.dest))
        ids = maps.map_ids()
    finally:
        maps.close()
    again = BccClassifier(CLASSIFIER_SOURCE, topo.pin_dir)
    try:
        assert again.map_ids() == ids
        assert again.read_tables() == wanted
        assert bpftables.decode_rules(wanted.block_src, wanted.block_dst) == rules
    finally:
        again.close()
