"""BpfMapActor on real veths in network namespaces, judged by where real packets go
and by the programs' counters.

Needs root, bcc, kernel headers (scripts/setup-system.sh) and iptables.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio  # noqa: F401  the daemon imports it; pyroute2 must still work

from tests.e2e.datapath import (
    GW_ADDR,
    NODE_ADDR,
    OTHER_ADDR,
    REMOTE_ADDR,
    REMOTE_CIDR,
    Receiver,
    Sender,
    Topology,
    ns_socket,
    sh,
    topology,
    udp_socket,
)
from vpblu.core.model import CidrPair, Route, network
from vpblu.messages import ApplyDataPath, BpfMapInbox, DataPathApplied
from vpblu.node.bpfmaps import BpfMapActor, DataPathStatistics
from vpblu.node.kernel.bcc import MAP_NAMES

pytestmark = pytest.mark.e2e

TEST_TIMEOUT = 40
REPLY_TIMEOUT = 5
ATTACH_TIMEOUT = 3
BLOCK_DEADLINE = 1.0  # a blocked pair drops within this long of the map write
SETTLE = 0.02  # in flight through the veths when a write completes
DRAIN = 0.1  # for the last packets to arrive after the senders stop

FLOW_INTERVAL = 0.005  # tests with many flows send each more slowly (2 cores, shared)

REMOTE_ROUTES = (Route(REMOTE_CIDR, "node-b"),)
SERVICE_TO_A = "10.96.0.11"  # ClusterIPs, DNAT in the node like kube-proxy's iptables mode
SERVICE_TO_B = "10.96.0.10"

# The guard's view of the cluster: 10.99/16 is a remote node's pod CIDR (routed into
# the mesh), 10.240/16 this node's pods, 10.98/16 and fd00:98::/48 the pods of nodes
# without a tunnel (no route into the mesh: they would leave by the underlay).
GUARD_POLICY: dict[str, Any] = {
    "routes": REMOTE_ROUTES,
    "local_cidrs": ["10.240.0.0/16", "fd00:240::/48"],
    "cluster_cidrs": ["10.98.0.0/16", "fd00:98::/48"],
}
WIREGUARD_PORT = 51820


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


async def test_a_block_holds_whether_the_pod_is_called_by_ip_or_by_service(
    topo: Topology,
) -> None:
    """classify drops a blocked pair as the pod sends it (pre-DNAT addresses);
    deliver drops it as it reaches the pod, after kube-proxy's DNAT and whoever
    sent it: so calling the pod by a ClusterIP does not get past the block, nor
    does a remote pod coming out of the mesh."""
    with trio.fail_after(TEST_TIMEOUT):
        topo.add_service(SERVICE_TO_B, "b")
        topo.add_service(SERVICE_TO_A, "a")
        a, b, mesh_ns = topo.pods["a"], topo.pods["b"], f"vb-{topo.tag}-mesh"
        blocked = {
            "a->b by IP": Sender(a, topo.pod_ip("b"), stream=1, interval=FLOW_INTERVAL),
            "a->b by Service": Sender(a, SERVICE_TO_B, stream=2, interval=FLOW_INTERVAL),
            "remote pod->b": Sender(mesh_ns, topo.pod_ip("b"), stream=3, src=(REMOTE_ADDR, 0),
                                    interval=FLOW_INTERVAL),
        }
        allowed = {
            "b->a by IP": Sender(b, topo.pod_ip("a"), stream=4, interval=FLOW_INTERVAL),
            "b->a by Service": Sender(b, SERVICE_TO_A, stream=5, interval=FLOW_INTERVAL),
            "remote pod->a": Sender(mesh_ns, topo.pod_ip("a"), stream=6, src=(REMOTE_ADDR, 0),
                                    interval=FLOW_INTERVAL),
        }
        blocks = [
            CidrPair(f"{topo.pod_ip('a')}/32", f"{topo.pod_ip('b')}/32"),
            CidrPair(REMOTE_CIDR, f"{topo.pod_ip('b')}/32"),
        ]
        at_a, at_b = Receiver(), Receiver()
        async with trio.open_nursery() as servers:
            await servers.start(at_a.serve, a)
            await servers.start(at_b.serve, b)
            async with actor_running(topo) as (actor, send):
                await apply(send, routes=REMOTE_ROUTES)
                async with sending(*blocked.values(), *allowed.values()):
                    await trio.sleep(0.3)
                    block_at = trio.current_time()
                    await apply(send, routes=REMOTE_ROUTES, blocks=blocks)
                    blocked_at = trio.current_time()
                    await trio.sleep(0.5)
                await trio.sleep(DRAIN)
                stats = actor.statistics()
            servers.cancel_scope.cancel()

        at = {1: at_b, 2: at_b, 3: at_b, 4: at_a, 5: at_a, 6: at_a}
        for name, sender in blocked.items():
            got = at[sender.stream].stream(sender.stream).keys()
            before, after = sender.sent_between(0, block_at), sender.sent_between(
                blocked_at + SETTLE, float("inf"))
            assert before and set(before) <= got, f"{name}: did not pass before the block"
            assert after and not set(after) & got, f"{name}: passed the block"
        for name, sender in allowed.items():
            assert sender.sent and sender.lost(at[sender.stream]) == [], name
        by_ip = len(blocked["a->b by IP"].lost(at_b))
        at_delivery = len(blocked["a->b by Service"].lost(at_b)) + len(
            blocked["remote pod->b"].lost(at_b))
        print(f"dropped at the source (classify): {stats.dropped_blocked} (lost by IP {by_ip}); "
              f"at delivery (deliver): {stats.delivery_dropped_blocked} "
              f"(lost by Service and from the mesh {at_delivery}); delivered {stats.delivered}")
        # Every lost packet is one the programs dropped, each where expected.
        assert stats.dropped_blocked == by_ip
        assert stats.delivery_dropped_blocked == at_delivery
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


async def test_a_veth_created_after_start_gets_both_programs(topo: Topology) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        mesh_ns = f"vb-{topo.tag}-mesh"
        blocks = [CidrPair("10.240.3.0/24", "10.98.0.0/16"), CidrPair(REMOTE_CIDR, "10.240.3.0/24")]
        async with receivers(topo) as (mesh, gw), actor_running(topo) as (actor, send):
            await apply(send, routes=REMOTE_ROUTES, blocks=blocks)
            await trio.to_thread.run_sync(topo.add_pod, "c", 3)
            with trio.fail_after(ATTACH_TIMEOUT):
                await actor.wait_attached(topo.host_veth("c"))
            assert topo.host_veth("c") in actor.statistics().attached
            at_c = Receiver()
            sends = Sender(topo.pods["c"], OTHER_ADDR, stream=1)  # blocked at c's ingress
            reaches = Sender(mesh_ns, topo.pod_ip("c"), stream=2, src=(REMOTE_ADDR, 0))  # egress
            free = Sender(topo.pods["c"], REMOTE_ADDR, stream=3)
            async with trio.open_nursery() as servers:
                await servers.start(at_c.serve, topo.pods["c"])
                async with sending(sends, reaches, free):
                    await trio.sleep(0.2)
                await trio.sleep(DRAIN)
                servers.cancel_scope.cancel()
            stats = actor.statistics()
        assert sends.sent and not gw.stream(1)
        assert reaches.sent and not at_c.stream(2)
        assert free.sent and free.lost(mesh) == []
        assert stats.dropped_blocked == len(sends.sent)
        assert stats.delivery_dropped_blocked == len(reaches.sent)


async def test_restart_reuses_the_pinned_maps_writes_nothing_and_traffic_never_stops(
    topo: Topology,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        policy: dict[str, Any] = {
            "routes": REMOTE_ROUTES,
            "blocks": [CidrPair("10.240.2.0/24", "10.98.0.0/16"),
                       CidrPair(REMOTE_CIDR, "10.240.2.0/24")],
            "local_cidrs": ["10.240.0.0/16"],
            "cluster_cidrs": ["10.96.0.0/12", "10.240.0.0/16"],
        }
        at_b = Receiver()
        flow = Sender(topo.pods["a"], REMOTE_ADDR, stream=1)  # into the mesh
        local = Sender(topo.pods["a"], topo.pod_ip("b"), stream=2)  # through classify, deliver
        stays_blocked = Sender(topo.pods["b"], OTHER_ADDR, stream=3)  # classify drops it
        delivery_blocked = Sender(f"vb-{topo.tag}-mesh", topo.pod_ip("b"), stream=4,
                                  src=(REMOTE_ADDR, 0))  # deliver drops it
        async with receivers(topo) as (mesh, gw), trio.open_nursery() as servers:
            await servers.start(at_b.serve, topo.pods["b"])
            async with actor_running(topo) as (first, send):
                first_write = await apply(send, **policy)
                first_ids = first.statistics().map_ids
            async with sending(flow, local, stays_blocked, delivery_blocked):
                await trio.sleep(0.1)
                async with actor_running(topo) as (second, send):
                    restarted = second.statistics()
                    again = await apply(send, **policy)
                    await trio.sleep(0.1)
                    after = second.statistics()
            await trio.sleep(DRAIN)
            servers.cancel_scope.cancel()

        assert first_write.written == 2 + 2 + 3  # src and dst of two rules, three dest prefixes
        assert restarted.map_ids == first_ids
        assert set(first_ids) == set(MAP_NAMES)
        assert again == DataPathApplied(0, 0)
        assert after.entries_written == after.entries_deleted == 0
        assert flow.sent and local.sent
        assert flow.lost(mesh) == [], "the flow into the mesh had a gap across the restart"
        assert local.lost(at_b) == [], "the local flow had a gap across the restart"
        assert not gw.stream(1)
        # A blocked pair stays blocked throughout: no program swap lets one through.
        assert stays_blocked.sent and not gw.stream(3)
        assert delivery_blocked.sent and not at_b.stream(4)
        # `replace`, not a second filter next to the old one, in both directions.
        for pod in ("a", "b"):
            assert topo.filters(topo.host_veth(pod), "ingress") == 1
            assert topo.filters(topo.host_veth(pod), "egress") == 1
        assert topo.filters(topo.uplink_veth("gw"), "egress") == 1
        assert after.guard_link == topo.uplink_veth("gw")


def _underlay_v6(topo: Topology) -> None:
    """IPv6 on the underlay: the node fd00:250::1, gw fd00:250::2, which answers fd00:98::1."""
    gw = f"vb-{topo.tag}-gw"
    topo.in_node("ip", "addr", "add", "fd00:250::1/64", "dev", topo.uplink_veth("gw"), "nodad")
    sh("ip", "-n", gw, "addr", "add", "fd00:250::2/64", "dev", "eth0", "nodad")
    sh("ip", "-n", gw, "addr", "add", "fd00:98::1/128", "dev", "lo")
    topo.in_node("ip", "-6", "route", "add", "fd00:98::/48", "via", "fd00:250::2")


async def test_the_guard_counts_pod_traffic_leaving_the_underlay_and_strict_drops_it(
    topo: Topology,
) -> None:
    """The underlay guard: a packet for a pod of a node without a tunnel leaves the
    underlay in the clear: counted, and dropped once strict. Into the mesh, WireGuard's
    own UDP (node to node), and a pod reaching a non-pod address are never dropped;
    only the last is counted (apart)."""
    with trio.fail_after(TEST_TIMEOUT):
        _underlay_v6(topo)
        gw_ns, mesh_ns, a = f"vb-{topo.tag}-gw", f"vb-{topo.tag}-mesh", topo.pods["a"]
        gw, gw6, gw_wg, mesh = Receiver(), Receiver(), Receiver(), Receiver()
        flows = {
            # name: (sender, receiver, counted as cleartext)
            "pod->mesh": (Sender(a, REMOTE_ADDR, stream=1, interval=FLOW_INTERVAL), mesh, False),
            "pod->untunnelled pod": (
                Sender(a, OTHER_ADDR, stream=2, interval=FLOW_INTERVAL), gw, True),
            "node->untunnelled pod v6": (
                Sender(topo.node, "fd00:98::1", stream=3, interval=FLOW_INTERVAL), gw6, True),
            "wireguard node->node": (
                Sender(topo.node, GW_ADDR, stream=4, port=WIREGUARD_PORT,
                       src=(NODE_ADDR, WIREGUARD_PORT), interval=FLOW_INTERVAL), gw_wg, False),
            "pod->outside": (Sender(a, GW_ADDR, stream=5, interval=FLOW_INTERVAL), gw, False),
        }
        async with trio.open_nursery() as servers:
            await servers.start(gw.serve, gw_ns)
            await servers.start(gw6.serve, gw_ns, 40000, socket.AF_INET6)
            await servers.start(gw_wg.serve, gw_ns, WIREGUARD_PORT)
            await servers.start(mesh.serve, mesh_ns)
            async with actor_running(topo) as (actor, send):
                assert actor.statistics().guard_link == topo.uplink_veth("gw")
                await apply(send, **GUARD_POLICY)
                async with sending(*(sender for sender, _, _ in flows.values())):
                    await trio.sleep(0.4)
                    on_at = trio.current_time()
                    strict_on = await apply(send, strict=True, **GUARD_POLICY)
                    on = trio.current_time()
                    await trio.sleep(0.4)
                await trio.sleep(DRAIN)
                stats = actor.statistics()
            servers.cancel_scope.cancel()

        assert strict_on == DataPathApplied(written=1, deleted=0)  # the flag
        lost = {}
        for name, (sender, receiver, cleartext) in flows.items():
            got = receiver.stream(sender.stream).keys()
            lost[name] = sender.lost(receiver)
            assert sender.sent_between(0, on_at) and set(sender.sent_between(0, on_at)) <= got, (
                f"{name}: lost before strict")
            after = sender.sent_between(on + SETTLE, float("inf"))
            if cleartext:
                assert after and not set(after) & got, f"{name}: left in the clear under strict"
            else:
                assert lost[name] == [], f"{name}: dropped"
        leaks = [flows["pod->untunnelled pod"][0], flows["node->untunnelled pod v6"][0]]
        print(f"guard: cleartext {stats.guard_cleartext} (sent {sum(len(s.sent) for s in leaks)}"
              f"), dropped {stats.guard_dropped} (lost {sum(len(v) for v in lost.values())}), "
              f"pod->outside {stats.guard_pod_src_only}, encapsulated "
              f"{stats.guard_cleartext_encapsulated}")
        # Exact: every leaking packet counted once, every loss a strict drop, no other
        # flow counted (the mesh's, WireGuard's and ND/ARP never are).
        assert stats.guard_cleartext == sum(len(s.sent) for s in leaks)
        assert stats.guard_dropped == sum(len(v) for v in lost.values())
        assert stats.guard_pod_src_only == len(flows["pod->outside"][0].sent)
        assert stats.guard_cleartext_encapsulated == 0


# --- tunnels the guard looks into ----------------------------------------------------

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def _ipv4_udp(src: str, dst: str) -> bytes:
    payload = b"vpblu-guard-test"
    udp = _UDP.pack(40000, 40000, _UDP.size + len(payload), 0) + payload
    return _IPV4.pack(0x45, 0, _IPV4.size + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + udp


def _ipv6_udp(src: str, dst: str) -> bytes:
    payload = b"vpblu-guard-test"
    udp = _UDP.pack(40000, 40000, _UDP.size + len(payload), 0) + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), socket.IPPROTO_UDP, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + udp


def _ethernet(ethertype: int, packet: bytes) -> bytes:
    return b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + packet


def _geneve(protocol: int, inner: bytes, options: int = 0) -> bytes:
    """Geneve (RFC 8926): version 0, `options` 4-byte words of options, VNI 42."""
    return bytes([options & 0x3F, 0]) + struct.pack("!H", protocol) + b"\x00\x00\x2a\x00" + (
        b"\x00" * 4 * options) + inner


@attrs.define
class Crafted:
    """A hand-made encapsulated datagram, sent from the node to gw, out of the underlay."""

    name: str
    kind: int  # SOCK_DGRAM (UDP to `port`) or SOCK_RAW (IP protocol `port`)
    port: int
    payload: bytes
    pod_inner: bool  # the inner destination is a pod's: the guard must count (and drop)


CRAFTED = [
    Crafted("Geneve, Ethernet, 4 bytes of options", socket.SOCK_DGRAM, 6081,
            _geneve(0x6558, _ethernet(0x0800, _ipv4_udp("10.240.1.2", "10.98.7.7")), 1), True),
    Crafted("Geneve, IPv4 directly", socket.SOCK_DGRAM, 6081,
            _geneve(0x0800, _ipv4_udp("10.240.1.2", "10.98.7.8")), True),
    Crafted("Geneve, Ethernet, IPv6", socket.SOCK_DGRAM, 6081,
            _geneve(0x6558, _ethernet(0x86DD, _ipv6_udp("fd00:240::2", "fd00:98::7"))), True),
    Crafted("IPIP", socket.SOCK_RAW, socket.IPPROTO_IPIP,
            _ipv4_udp("10.240.1.2", "10.98.8.8"), True),
    Crafted("IPv6 in IPv4", socket.SOCK_RAW, socket.IPPROTO_IPV6,
            _ipv6_udp("fd00:240::2", "fd00:98::8"), True),
    Crafted("Geneve, no pod inside", socket.SOCK_DGRAM, 6081,
            _geneve(0x6558, _ethernet(0x0800, _ipv4_udp("192.0.2.1", "192.0.2.2"))), False),
    Crafted("IPIP, no pod inside", socket.SOCK_RAW, socket.IPPROTO_IPIP,
            _ipv4_udp("192.0.2.1", "192.0.2.2"), False),
]
TUNNEL_BURST = 10
THROUGH_VXLAN = b"through vxlan"


def _vxlan(topo: Topology, device: str, vni: int, port: int, inner: str) -> None:
    """A kernel VXLAN device from the node to gw on `port`; `inner`/24 routed into it."""
    topo.in_node("ip", "link", "add", device, "type", "vxlan", "id", str(vni), "remote", GW_ADDR,
                 "local", NODE_ADDR, "dstport", str(port), "dev", topo.uplink_veth("gw"))
    topo.in_node("ip", "link", "set", device, "up")
    for addr in (inner, f"192.0.{vni}.9"):
        topo.in_node("ip", "route", "add", f"{addr.rsplit('.', 1)[0]}.0/24", "dev", device)
        topo.in_node("ip", "neigh", "add", addr, "lladdr", "02:00:00:00:00:09", "dev", device)


@attrs.define
class Arrivals:
    """Every datagram (UDP payload, or IP payload for raw sockets) gw received, per socket."""

    got: dict[tuple[int, int], list[bytes]] = attrs.field(factory=dict)

    async def serve(self, ns: str, kind: int, port: int, *,
                    task_status: trio.TaskStatus[None]) -> None:
        with ns_socket(ns, socket.AF_INET, kind, port if kind == socket.SOCK_RAW else 0) as sock:
            if kind == socket.SOCK_DGRAM:
                await sock.bind(("0.0.0.0", port))
            task_status.started()
            while True:
                data = await sock.recv(2048)
                if kind == socket.SOCK_RAW:
                    data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets get the header
                self.got.setdefault((kind, port), []).append(data)

    def count(self, kind: int, port: int, payload: bytes) -> int:
        return sum(1 for d in self.got.get((kind, port), []) if d == payload)

    def ending(self, kind: int, port: int, tail: bytes) -> int:
        return sum(1 for d in self.got.get((kind, port), []) if d.endswith(tail))


async def test_the_guard_looks_inside_vxlan_geneve_and_ipip(topo: Topology) -> None:
    """Pod traffic wrapped in a cleartext tunnel is still pod traffic in the clear:
    kernel VXLAN devices (4789 and flannel's 8472) and hand-made Geneve, IPIP and
    IPv6-in-IP datagrams (this kernel has no drivers for them). The guard counts a
    pod destination inside and drops it when strict; a pod reaching a non-pod
    address through VXLAN, and tunnels with no pod inside, pass and are not counted
    as cleartext."""
    with trio.fail_after(TEST_TIMEOUT):
        gw_ns, a = f"vb-{topo.tag}-gw", topo.pods["a"]
        _vxlan(topo, f"vbx{topo.tag}", 4, 4789, "10.98.4.9")
        _vxlan(topo, f"vbf{topo.tag}", 5, 8472, "10.98.5.9")
        arrivals = Arrivals()
        sockets = {(socket.SOCK_DGRAM, 4789), (socket.SOCK_DGRAM, 8472)} | {
            (c.kind, c.port) for c in CRAFTED}

        async def burst() -> None:
            """TUNNEL_BURST of each: through VXLAN from pod a (to a pod and to a non-pod
            address), and each crafted datagram from the node."""
            with udp_socket(a) as pod:
                for _ in range(TUNNEL_BURST):
                    for dst in ("10.98.4.9", "10.98.5.9", "192.0.4.9", "192.0.5.9"):
                        await pod.sendto(THROUGH_VXLAN, (dst, 40000))
            for crafted in CRAFTED:
                with ns_socket(topo.node, socket.AF_INET, crafted.kind,
                               crafted.port if crafted.kind == socket.SOCK_RAW else 0) as sock:
                    for _ in range(TUNNEL_BURST):
                        await sock.sendto(crafted.payload, (GW_ADDR, crafted.port))
            await trio.sleep(DRAIN)

        def seen() -> dict[str, int]:
            return {
                # Only ours: a VXLAN device also sends its own IPv6 ND and MLD.
                "vxlan 4789": arrivals.ending(socket.SOCK_DGRAM, 4789, THROUGH_VXLAN),
                "vxlan 8472": arrivals.ending(socket.SOCK_DGRAM, 8472, THROUGH_VXLAN),
                **{c.name: arrivals.count(c.kind, c.port, c.payload) for c in CRAFTED},
            }

        async with trio.open_nursery() as servers:
            for kind, port in sorted(sockets):
                await servers.start(arrivals.serve, gw_ns, kind, port)
            async with actor_running(topo) as (actor, send):
                await apply(send, **GUARD_POLICY)
                await burst()
                open_seen, open_stats = seen(), actor.statistics()
                await apply(send, strict=True, **GUARD_POLICY)
                await burst()
                strict_seen, strict_stats = seen(), actor.statistics()
            servers.cancel_scope.cancel()

        pod_inner = [c for c in CRAFTED if c.pod_inner]
        # Not strict: everything arrives. VXLAN: a pod and a non-pod inner destination each.
        assert open_seen == {
            "vxlan 4789": 2 * TUNNEL_BURST, "vxlan 8472": 2 * TUNNEL_BURST,
            **{c.name: TUNNEL_BURST for c in CRAFTED}}
        encapsulated = (2 + len(pod_inner)) * TUNNEL_BURST
        assert _guard(open_stats) == (encapsulated, encapsulated, 0, 2 * TUNNEL_BURST)
        # Strict: what carries a pod destination inside is dropped, the rest arrives.
        grew = {name: strict_seen[name] - open_seen[name] for name in strict_seen}
        assert grew == {
            "vxlan 4789": TUNNEL_BURST, "vxlan 8472": TUNNEL_BURST,
            **{c.name: 0 if c.pod_inner else TUNNEL_BURST for c in CRAFTED}}
        assert _guard(strict_stats) == (
            2 * encapsulated, 2 * encapsulated, encapsulated, 4 * TUNNEL_BURST)
        print(f"guard, not strict: {_guard(open_stats)}, then strict: {_guard(strict_stats)} "
              "(cleartext, encapsulated, dropped, pod->outside)")


def _guard(stats: DataPathStatistics) -> tuple[int, int, int, int]:
    return (stats.guard_cleartext, stats.guard_cleartext_encapsulated, stats.guard_dropped,
            stats.guard_pod_src_only)


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
    for name in ("vpblu-classify", "vpblu-deliver", "vpblu-guard"):
        assert name in during
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
