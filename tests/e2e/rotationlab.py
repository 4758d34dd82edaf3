"""A mesh of network namespaces running real wireguard-go, for the rotation tests.

Owns the namespaces `vr-*`, the veths between them, the wireguard-go processes it starts
(by pid) and the flow probes (through its `Reaper`). Everything is torn down in
`RotationLab.close`, which the fixture calls even when a test fails; a step of it that
fails does not skip the others. Interface names are machine-unique (`vr-` prefix)
because wireguard-go's UAPI sockets share /var/run/wireguard across namespaces.

`UapiDevices` (the daemon's `UserspaceBackend`, with lab-owned wireguard-go processes) and
`IpRoutes` are the rotation seams (`WireGuardBackend`, `MeshRoutes`) for one node namespace.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tests.e2e.flowprobe import READY, RECEIVING
from tests.e2e.procs import Helper, Reaper, start_udp_probes, stop, wait_all
from vpblu.core.model import Endpoint, IPNetwork, network
from vpblu.node.kernel.wireguard import DeviceUpdate, PeerUpdate, UserspaceBackend

UAPI_DIR = Path("/var/run/wireguard")
SOCKET_WAIT = 5.0
POLL = 0.02
STOP_TIMEOUT = 3.0  # a wireguard-go process, after SIGTERM and again after SIGKILL
PROBE_READY_TIMEOUT = 30.0  # python starts in a namespace, six at once, on 2 cores
PROBE_STOP_TIMEOUT = 15.0
NETNS_GONE_TIMEOUT = 5.0
PROBE = Path(__file__).with_name("flowprobe.py")
HUB = "vr-hub"
POD_MARK = 0x00B10000
WG_MARK = 0x00B20000
MESH_TABLE = 5182
LISTEN_PORT = 51820
MTU = 1420


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )


def public_key_of(private_key: bytes) -> str:
    raw = (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode()


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def _b64(hex_text: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_text)).decode()


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class UapiDevices(UserspaceBackend):
    """wireguard-go devices of one namespace: the daemon's UAPI backend, except that the
    lab starts each wireguard-go in the foreground and owns it by pid."""

    def __init__(self, netns: str, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        super().__init__(netns=netns, socket_dir=UAPI_DIR)
        self.netns = netns
        self._processes = processes

    async def exists(self, interface: str) -> bool:
        return self.socket_path(interface).exists() and interface in self._processes

    async def ensure_interface(self, interface: str) -> bool:
        if await self.exists(interface):
            return False
        self._processes[interface] = spawn_wireguard_go(self.netns, interface)
        # wireguard-go has no readiness signal but its socket: poll for it.
        with trio.fail_after(SOCKET_WAIT):
            for _ in iter(int, 1):
                if self.socket_path(interface).exists():
                    break
                await trio.sleep(POLL)
        return True

    async def delete_interface(self, interface: str) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            await trio.run_process(
                ["ip", "-n", self.netns, "link", "del", interface], capture_stderr=True
            )
        proc = self._processes.pop(interface, None)
        if proc is not None:
            # Deleting the TUN makes wireguard-go exit; give it that chance first.
            with trio.move_on_after(3):
                for _ in iter(int, 1):
                    if proc.poll() is not None:
                        break
                    await trio.sleep(POLL)
            stop_process(proc)


class IpRoutes:
    """The mesh table of one namespace through iproute2 (`ip route replace` is one
    RTM_NEWROUTE with NLM_F_REPLACE: atomic per prefix)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns

    async def _ip(self, *argv: str) -> str:
        done = await trio.run_process(
            ["ip", "-n", self.netns, *argv], capture_stdout=True, capture_stderr=True
        )
        return done.stdout.decode()

    async def read(self, table: int) -> dict[IPNetwork, str]:
        rows = json.loads(await self._ip("-j", "route", "show", "table", str(table)) or "[]")
        return {network(r["dst"] if "/" in r["dst"] else f"{r['dst']}/32"): r["dev"] for r in rows}

    async def replace(self, table: int, cidr: IPNetwork, interface: str) -> None:
        await self._ip("route", "replace", str(cidr), "dev", interface, "table", str(table))

    async def link_mtu(self, interface: str) -> int:
        return int(json.loads(await self._ip("-j", "link", "show", interface))[0]["mtu"])

    async def link_up(self, interface: str, mtu: int) -> None:
        await self._ip("link", "set", interface, "mtu", str(mtu), "up")


def spawn_wireguard_go(netns: str, interface: str) -> subprocess.Popen[bytes]:
    """Foreground mode, so the lab owns the process by pid and can always end it."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, "wireguard-go", "-f", interface],
        env=dict(os.environ, WG_PROCESS_FOREGROUND="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL; TimeoutExpired if even that did not end it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@attrs.define
class LabNode:
    index: int
    netns: str
    primary: str
    private_key: bytes = attrs.field(repr=False)
    devices: UapiDevices
    routes: IpRoutes

    @property
    def underlay(self) -> str:
        return f"192.168.77.{self.index}"

    @property
    def pod_ip(self) -> str:
        return f"10.77.{self.index}.1"

    @property
    def pod_cidr(self) -> IPNetwork:
        return ipaddress.ip_network(f"10.77.{self.index}.0/24")

    @property
    def public_key(self) -> str:
        return public_key_of(self.private_key)


@attrs.frozen
class FlowResult:
    name: str
    sent: int
    received: int
    send_errors: int
    duplicates: int
    missing: tuple[int, ...]


class RotationLab:
    """Nodes `vr-n<i>` joined by veths to a bridge in `vr-hub`; each node's pod address
    sits on its `lo`, its pod sockets carry the classifier's fwmark, and `ip rule fwmark
    … lookup 5182` sends them into the mesh table, as on a vpblu node."""

    def __init__(self, count: int) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.probes = Reaper()
        self.namespaces: list[str] = []
        self.nodes: list[LabNode] = []
        self.count = count

    def build(self) -> None:
        run("ip", "netns", "add", HUB)
        self.namespaces.append(HUB)
        run("ip", "-n", HUB, "link", "add", "vr-hubbr", "type", "bridge")
        run("ip", "-n", HUB, "link", "set", "vr-hubbr", "up")
        for i in range(1, self.count + 1):
            ns = f"vr-n{i}"
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run(
                "ip",
                "link",
                "add",
                f"vr-n{i}u",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"vr-n{i}h",
                "netns",
                HUB,
            )
            run("ip", "-n", HUB, "link", "set", f"vr-n{i}h", "master", "vr-hubbr", "up")
            run("ip", "-n", ns, "addr", "add", f"192.168.77.{i}/24", "dev", f"vr-n{i}u")
            run("ip", "-n", ns, "link", "set", f"vr-n{i}u", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"10.77.{i}.1/32", "dev", "lo")
            run(
                "ip",
                "-n",
                ns,
                "rule",
                "add",
                "fwmark",
                f"{POD_MARK:#x}/0xff0000",
                "lookup",
                str(MESH_TABLE),
                "priority",
                str(MESH_TABLE),
            )
            # Decrypted pod packets arrive on the mesh interface with a source the main
            # table does not route back there; vpblu turns strict rp_filter off on it.
            run(
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            )
            self.nodes.append(
                LabNode(
                    i,
                    ns,
                    f"vr-n{i}m",
                    new_private_key(),
                    UapiDevices(ns, self.processes),
                    IpRoutes(ns),
                )
            )

    async def start_mesh(self) -> None:
        """Full mesh on the primaries, one route per remote pod CIDR into the primary."""
        for node in self.nodes:
            await node.devices.ensure_interface(node.primary)
            await node.routes.link_up(node.primary, MTU)
        for node in self.nodes:
            peers = tuple(
                PeerUpdate(
                    other.public_key,
                    endpoint=Endpoint(other.underlay, LISTEN_PORT),
                    allowed_ips=(other.pod_cidr,),
                    persistent_keepalive=25,
                )
                for other in self.nodes
                if other is not node
            )
            await node.devices.write(
                node.primary,
                DeviceUpdate(
                    private_key=node.private_key,
                    listen_port=LISTEN_PORT,
                    fwmark=WG_MARK,
                    peers=peers,
                ),
            )
            for other in self.nodes:
                if other is not node:
                    await node.routes.replace(MESH_TABLE, other.pod_cidr, node.primary)

    def probe(self, node: LabNode, name: str, *args: str) -> Helper:
        return self.probes.start(name, [
            "ip", "netns", "exec", node.netns, sys.executable, str(PROBE), *args,
            "--mark", hex(POD_MARK)])

    @staticmethod
    def finish(*probes: Helper, timeout: float = PROBE_STOP_TIMEOUT) -> list[dict[str, object]]:
        """Stop all senders at once (a receiver that stopped first would miss the other
        side's last datagrams), then collect what each probe counted."""
        stop(probes, timeout)
        return [probe.last_json() for probe in probes]

    def close(self) -> None:
        """Everything the lab made, gone; then an AssertionError naming what did not go
        quietly (a probe that needed SIGKILL, a process that outlived it, a namespace
        still there)."""
        problems = [f"killed: {k}" for k in self.probes.close(PROBE_STOP_TIMEOUT)]
        for name, proc in list(self.processes.items()):
            try:
                stop_process(proc)
            except subprocess.TimeoutExpired:
                problems.append(f"wireguard-go {name} (pid {proc.pid}) survived SIGKILL")
            self.processes.pop(name, None)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # wireguard-go removes its socket on a clean exit; a killed one may leave it.
        for node in self.nodes:
            for name in (node.primary, node.primary + "-rot"):
                with contextlib.suppress(FileNotFoundError):
                    (UAPI_DIR / f"{name}.sock").unlink()
        deadline = time.monotonic() + NETNS_GONE_TIMEOUT
        while (left := set(self.namespaces) & set(netns_names())) and \
                time.monotonic() < deadline:
            time.sleep(POLL)
        if left:
            problems.append(f"namespaces still there {NETNS_GONE_TIMEOUT} s after "
                            f"ip netns del: {sorted(left)}")
        if problems:
            raise AssertionError("the rotation lab's teardown: " + "; ".join(problems))


def netns_names() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line]


@attrs.frozen
class DirectionCount:
    direction: str
    sent: int
    received: int
    missing_count: int
    send_errors: int
    rate: float


@attrs.frozen
class StreamCount:
    direction: str
    sent: int
    received: int
    error: str
    longest_stall: float


class MeshTraffic:
    """Sequence-numbered UDP both ways between `hub` and each of `others`, plus one TCP
    stream into `hub` (from the first other) and one out of it (to the last)."""

    def __init__(
        self, lab: RotationLab, hub: LabNode, others: list[LabNode], rate: int, tcp_kib: int
    ) -> None:
        self.lab = lab
        self.hub = hub
        self.others = others
        self.rate = rate
        self.tcp_kib = tcp_kib
        self._udp: list[tuple[LabNode, LabNode, Helper, Helper]] = []
        self._tcp: list[tuple[str, Helper, Helper]] = []

    async def start(self) -> None:
        """Every flow and stream carrying data when this returns."""
        await trio.to_thread.run_sync(self._start)

    def _start(self) -> None:
        lab, hub = self.lab, self.hub
        for port, other in enumerate(self.others, start=7000):
            pair = [
                lab.probe(a, f"udp probe {a.netns}->{b.netns}", "udp", "--bind", a.pod_ip,
                          "--peer", b.pod_ip, "--port", str(port), "--rate", str(self.rate),
                          "--control-stdin")
                for a, b in ((hub, other), (other, hub))
            ]
            self._udp.append((hub, other, pair[0], pair[1]))
        streams = [(self.others[0], hub, 7100), (hub, self.others[-1], 7101)]
        servers = [
            lab.probe(dst, f"tcp server {dst.netns}", "tcp-server", "--bind", dst.pod_ip,
                      "--port", str(port))
            for _, dst, port in streams
        ]
        udp = [p for _, _, a, b in self._udp for p in (a, b)]
        start_udp_probes(udp, PROBE_READY_TIMEOUT, "the lab's UDP flows")
        wait_all(servers, READY, PROBE_READY_TIMEOUT, "the lab's TCP servers listening")
        for (src, dst, port), server in zip(streams, servers, strict=True):
            client = lab.probe(
                src, f"tcp client {src.netns}->{dst.netns}", "tcp-client", "--bind",
                src.pod_ip, "--peer", dst.pod_ip, "--port", str(port),
                "--rate", str(self.tcp_kib))
            self._tcp.append((f"{src.netns}->{dst.netns}", client, server))
        wait_all(servers, RECEIVING, PROBE_READY_TIMEOUT, "the lab's TCP streams flowing")

    def stop(self) -> tuple[list[DirectionCount], list[StreamCount]]:
        procs = [p for _, _, a, b in self._udp for p in (a, b)] + [
            p for _, c, s in self._tcp for p in (c, s)
        ]
        counted = iter(self.lab.finish(*procs))
        udp: list[DirectionCount] = []
        for a, b, _, _ in self._udp:
            near, far = next(counted), next(counted)
            for src, dst, tx, rx in ((a, b, near, far), (b, a, far, near)):
                udp.append(
                    DirectionCount(
                        f"{src.netns}->{dst.netns}",
                        int(tx["sent"]),  # type: ignore[call-overload]
                        int(rx["received"]),  # type: ignore[call-overload]
                        int(rx["missing_count"]) + int(tx["sent"]) - int(rx["highest"]),  # type: ignore[call-overload]
                        int(tx["send_errors"]),  # type: ignore[call-overload]
                        float(tx["sent"]) / float(tx["duration"]),  # type: ignore[arg-type]
                    )
                )
        tcp = []
        for name, _, _ in self._tcp:
            client, server = next(counted), next(counted)
            tcp.append(
                StreamCount(
                    name,
                    int(client["bytes"]),  # type: ignore[call-overload]
                    int(server["bytes"]),  # type: ignore[call-overload]
                    str(client["error"] or server["error"]),
                    float(server.get("longest_stall", 0.0)),  # type: ignore[arg-type]
                )
            )
        return udp, tcp
