"""A small lab of network namespaces: nodes on a shared underlay, pods behind veths.

    underlay netns <prefix>-ul: bridge br0 (10.77.0.254/24)
      └─ veth <prefix>-n<i>u  ──  eth0 in node netns <prefix>-n<i> (10.77.0.<i>/24,
                                   default via 10.77.0.254, ip_forward on)
                                   └─ veth <prefix>-n<i>p<j> ── eth0 in pod netns
                                      <prefix>-n<i>p<j> (<pod_cidr>.<10+j>/32,
                                      default via <pod_cidr>.1 onlink)

Nothing is created in the caller's own namespace. `Lab.close()` removes every
namespace it made and ends every wireguard-go it knows the interface of (a
wireguard-go holds its namespace alive through its UDP socket, so deleting
the namespace alone would leak it). Use it as a context manager.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vpblu.node.rotation import bridge_names

UNDERLAY_NET = ipaddress.ip_network("10.77.0.0/24")
UNDERLAY_GATEWAY = "10.77.0.254"
WG_EXIT_TIMEOUT = 5.0


def run(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def in_ns(netns: str, *argv: str, check: bool = True) -> str:
    return run("ip", "netns", "exec", netns, *argv, check=check)


@dataclass
class Pod:
    netns: str
    ip: ipaddress.IPv4Address
    host_veth: str


@dataclass
class Node:
    name: str
    netns: str
    underlay_ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    wg_interface: str
    pods: list[Pod] = field(default_factory=list)

    def snapshot(self) -> dict[str, str]:
        """What `cleanup` must give back: links, rules, all routes, iptables."""
        return {
            "link": run("ip", "-n", self.netns, "-o", "link", "show"),
            "rule": run("ip", "-n", self.netns, "rule") + run("ip", "-n", self.netns, "-6", "rule"),
            # IPv6 link-local routes appear whenever address autoconfiguration
            # finishes, independent of anything under test.
            "route": "\n".join(
                line
                for line in (
                    run("ip", "-n", self.netns, "route", "show", "table", "all")
                    + run("ip", "-n", self.netns, "-6", "route", "show", "table", "all")
                ).splitlines()
                if "fe80:" not in line
            ),
            # Rules and chains of our own making; a table that only its
            # built-in chains are left in (`*nat` once any nat rule existed)
            # is the kernel's, not state that `cleanup` left behind.
            "iptables": "\n".join(
                line
                for line in in_ns(self.netns, "iptables-save").splitlines()
                if line.startswith("-A ")
                or (line.startswith(":") and line.split()[0][1:] not in BUILTIN_CHAINS)
            ),
        }


BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


class Lab:
    def __init__(self, prefix: str = "vw") -> None:
        self.prefix = prefix
        self.underlay = f"{prefix}-ul"
        self.nodes: list[Node] = []
        self._namespaces: list[str] = []

    def __enter__(self) -> Lab:
        self._add_netns(self.underlay)
        ns = self.underlay
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"{UNDERLAY_GATEWAY}/24", "dev", "br0")
        run("ip", "-n", ns, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def add_node(self, index: int, pod_cidr: str, *, mtu: int = 1500) -> Node:
        ns = f"{self.prefix}-n{index}"
        self._add_netns(ns)
        node = Node(
            name=f"node{index}",
            netns=ns,
            underlay_ip=UNDERLAY_NET[index],
            pod_cidr=ipaddress.ip_network(pod_cidr),
            wg_interface=f"{self.prefix}-wg{index}",
        )
        self.nodes.append(node)
        bridge_side = f"{self.prefix}-n{index}u"
        run(
            "ip",
            "-n",
            self.underlay,
            "link",
            "add",
            bridge_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        run(
            "ip",
            "-n",
            self.underlay,
            "link",
            "set",
            bridge_side,
            "mtu",
            str(mtu),
            "master",
            "br0",
            "up",
        )
        run("ip", "-n", ns, "link", "set", "eth0", "mtu", str(mtu))
        run("ip", "-n", ns, "addr", "add", f"{node.underlay_ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", UNDERLAY_GATEWAY)
        in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return node

    def add_pod(self, node: Node, index: int) -> Pod:
        ns = f"{node.netns}p{index}"
        self._add_netns(ns)
        host_veth = f"{node.netns}p{index}"
        gateway = node.pod_cidr[1]
        pod = Pod(netns=ns, ip=node.pod_cidr[10 + index], host_veth=host_veth)
        node.pods.append(pod)
        run(
            "ip",
            "-n",
            node.netns,
            "link",
            "add",
            host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        run("ip", "-n", node.netns, "addr", "add", f"{gateway}/32", "dev", host_veth)
        run("ip", "-n", node.netns, "link", "set", host_veth, "up")
        run("ip", "-n", node.netns, "route", "add", f"{pod.ip}/32", "dev", host_veth)
        run("ip", "-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", str(gateway), "dev", "eth0", "onlink")
        return pod

    def mark_pod_traffic(
        self, node: Node, pod: Pod, remote: Sequence[ipaddress.IPv4Network], fwmark: int, mask: int
    ) -> None:
        """Stand-in for the eBPF classifier: mark what a pod sends to remote pod CIDRs."""
        for cidr in remote:
            in_ns(
                node.netns,
                "iptables",
                "-w",
                "5",
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-i",
                pod.host_veth,
                "-d",
                str(cidr),
                "-j",
                "MARK",
                "--set-xmark",
                f"{fwmark:#x}/{mask:#x}",
            )

    def close(self) -> None:
        for node in self.nodes:
            # The rotation slots' bridges too: a test that fails mid-rotation leaves them.
            for interface in (node.wg_interface, *bridge_names(node.wg_interface)):
                stop_wireguard_go(node.netns, interface)
        for ns in reversed(self._namespaces):
            run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()


def wireguard_go_pids(interface: str) -> list[int]:
    """Processes running exactly `wireguard-go <interface>`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[0].endswith(b"wireguard-go") and argv[1] == interface.encode():
            pids.append(int(entry))
    return pids


def stop_wireguard_go(netns: str, interface: str) -> None:
    run("ip", "-n", netns, "link", "del", interface, check=False)
    deadline = time.monotonic() + WG_EXIT_TIMEOUT
    while wireguard_go_pids(interface) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in wireguard_go_pids(interface):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # One ended by SIGKILL (here or by a test) leaves its socket; the names are the lab's own.
    with contextlib.suppress(FileNotFoundError):
        if not wireguard_go_pids(interface):
            os.unlink(f"/var/run/wireguard/{interface}.sock")
