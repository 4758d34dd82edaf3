"""A node network namespace with pods behind host veths, an underlay and a mesh path.

    pod A (10.240.1.2) --vbpa..-- NODE --vbg..-- gw   (the underlay: main table)
    pod B (10.240.2.2) --vbpb..--      --vbm..-- mesh (stands in for wg-mesh: MESH_TABLE)

The node steers by destination, as the NetlinkActor does: `ip rule to
10.99.0.0/16 lookup MESH_TABLE` (a remote node's pod CIDR); the rest of
10.96.0.0/12 goes by the main table to gw, the underlay, in the clear. Both gw
and mesh answer on 10.99.0.1 and 10.98.0.1, so where a packet arrives shows
which way the node sent it. `vbg..` is the underlay the daemon's config names,
where the cleartext guard goes.
Everything lives in namespaces named vb-<tag>-*, deleted (with their veths) on close.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio
from pyroute2 import netns as pr_netns

from vpblu.node.config import MESH_TABLE, DaemonConfig
from vpblu.node.kernel.bcc import remove_pins

UDP_PORT = 40000
REMOTE_ADDR = "10.99.0.1"  # in a remote pod CIDR, routed into the mesh
REMOTE_CIDR = "10.99.0.0/16"
OTHER_ADDR = "10.98.0.1"  # never routed to the mesh: leaves by the underlay
GW_ADDR = "10.250.0.2"  # the underlay's far end
NODE_ADDR = "10.250.0.1"  # the node's underlay address
SEND_INTERVAL = 0.002
_PACKET = struct.Struct("!IQd")  # stream, sequence number, send time


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@attrs.define
class Topology:
    tag: str
    node: str
    pin_dir: Path
    namespaces: list[str] = attrs.field(factory=list)
    pods: dict[str, str] = attrs.field(factory=dict)  # pod name -> pod namespace
    subnets: dict[str, int] = attrs.field(factory=dict)  # pod name -> its 10.240.<n>.0/24

    @property
    def config(self) -> DaemonConfig:
        return DaemonConfig(
            node_name=f"vb-{self.tag}",
            bpf_pin_dir=self.pin_dir,
            pod_veth_glob=f"vbp*{self.tag}",
            underlay_interface=self.uplink_veth("gw"),
        )

    def netns(self, name: str) -> str:
        ns = f"vb-{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def host_veth(self, pod: str) -> str:
        return f"vbp{pod}{self.tag}"

    def uplink_veth(self, name: str) -> str:
        return f"vb{name[0]}{self.tag}"

    def pod_ip(self, pod: str) -> str:
        return f"10.240.{self.subnets[pod]}.2"

    def in_node(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.node, *args)

    def add_service(self, cluster_ip: str, pod: str) -> None:
        """A ClusterIP the way kube-proxy's iptables mode makes one: DNAT in the
        node's nat PREROUTING (pods' traffic) and OUTPUT (the host's) to the pod."""
        for chain in ("PREROUTING", "OUTPUT"):
            self.in_node("iptables", "-w", "5", "-t", "nat", "-A", chain, "-d", cluster_ip,
                         "-j", "DNAT", "--to-destination", self.pod_ip(pod))

    def add_pod(self, pod: str, subnet: int) -> str:
        ns = self.netns(pod)
        host = self.host_veth(pod)
        sh("ip", "-n", self.node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", self.node, "addr", "add", f"10.240.{subnet}.1/24", "dev", host)
        sh("ip", "-n", self.node, "link", "set", host, "up")
        sh("ip", "-n", ns, "addr", "add", f"10.240.{subnet}.2/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"10.240.{subnet}.1")
        self.pods[pod] = ns
        self.subnets[pod] = subnet
        return ns

    def add_uplink(self, name: str, subnet: int) -> str:
        ns = self.netns(name)
        host = self.uplink_veth(name)
        sh("ip", "-n", self.node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", self.node, "addr", "add", f"10.250.{subnet}.1/30", "dev", host)
        sh("ip", "-n", self.node, "link", "set", host, "up")
        sh("ip", "-n", ns, "addr", "add", f"10.250.{subnet}.2/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for addr in (REMOTE_ADDR, OTHER_ADDR):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo")
        sh("ip", "-n", ns, "route", "add", "10.240.0.0/16", "via", f"10.250.{subnet}.1")
        return ns

    def tc_state(self) -> str:
        """Every qdisc and ingress/egress filter on the node's pod and uplink links, as text."""
        out = [sh("ip", "netns", "exec", self.node, "tc", "qdisc", "show")]
        links = [self.host_veth(pod) for pod in self.pods]
        links += [self.uplink_veth("gw"), self.uplink_veth("mesh")]
        for link in links:
            for where in ("ingress", "egress"):
                out.append(sh("ip", "netns", "exec", self.node, "tc", "filter", "show", "dev",
                              link, where))
        return "".join(out)

    def filters(self, link: str, where: str) -> int:
        """How many direct-action (ours) filters `link` carries at `where`."""
        return self.in_node("tc", "filter", "show", "dev", link, where).count("direct-action")


@contextmanager
def topology() -> Iterator[Topology]:
    tag = uuid.uuid4().hex[:4]
    topo = Topology(tag=tag, node="", pin_dir=Path(f"/sys/fs/bpf/vb-test-{tag}"))
    try:
        topo.node = topo.netns("node")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0"):
            sh("ip", "netns", "exec", topo.node, "sysctl", "-q", "-w", key)
        topo.add_pod("a", 1)
        topo.add_pod("b", 2)
        topo.add_uplink("gw", 0)
        topo.add_uplink("mesh", 1)
        sh("ip", "-n", topo.node, "route", "add", "10.96.0.0/12", "via", "10.250.0.2")
        sh("ip", "-n", topo.node, "route", "add", "default", "via", "10.250.1.2", "table",
           str(MESH_TABLE))
        sh("ip", "-n", topo.node, "rule", "add", "to", REMOTE_CIDR, "lookup", str(MESH_TABLE),
           "priority", "5182")
        yield topo
    finally:
        for ns in reversed(topo.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        remove_pins(topo.pin_dir)


def udp_socket(ns: str, family: int = socket.AF_INET) -> trio.socket.SocketType:
    return ns_socket(ns, family, socket.SOCK_DGRAM)


def ns_socket(ns: str, family: int, kind: int, proto: int = 0) -> trio.socket.SocketType:
    sock = pr_netns.create_socket(ns, family, kind, proto)
    return trio.socket.from_stdlib_socket(sock)


@attrs.define
class Receiver:
    """What arrived in one namespace: per stream, each sequence number with its send time."""

    got: dict[int, dict[int, float]] = attrs.field(factory=dict)

    def stream(self, stream: int) -> dict[int, float]:
        return self.got.get(stream, {})

    async def serve(
        self,
        ns: str,
        port: int = UDP_PORT,
        family: int = socket.AF_INET,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        with udp_socket(ns, family) as sock:
            if family == socket.AF_INET6:  # next to an IPv4 socket on the same port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            task_status.started()
            while True:
                data = await sock.recv(64)
                stream, seq, sent = _PACKET.unpack(data)
                self.got.setdefault(stream, {})[seq] = sent


@attrs.define
class Sender:
    """Sequence-numbered UDP at a fixed rate; `sent[seq]` is when each left (trio clock)."""

    ns: str
    dst: str
    stream: int
    port: int = UDP_PORT
    src: tuple[str, int] | None = None  # bound to this (address, port) when given
    interval: float = SEND_INTERVAL
    sent: dict[int, float] = attrs.field(factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.dst else socket.AF_INET
        with udp_socket(self.ns, family) as sock:
            if self.src is not None:
                await sock.bind(self.src)
            task_status.started()
            seq = 0
            next_at = trio.current_time()
            while True:
                now = trio.current_time()
                # A drop may surface as an error here; the receiver counts it lost.
                with contextlib.suppress(OSError):
                    await sock.sendto(_PACKET.pack(self.stream, seq, now), (self.dst, self.port))
                self.sent[seq] = now  # after the send: a cancelled send never left
                seq += 1
                next_at += self.interval
                await trio.sleep(max(0.0, next_at - trio.current_time()))

    def lost(self, receiver: Receiver) -> list[int]:
        got = receiver.stream(self.stream)
        return [seq for seq in self.sent if seq not in got]

    def sent_between(self, start: float, end: float) -> list[int]:
        return [seq for seq, at in self.sent.items() if start <= at <= end]
