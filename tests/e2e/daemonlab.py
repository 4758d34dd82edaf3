"""Real `vpblu daemon run` processes in the lab's node namespaces, fed by a FakeController.

    underlay netns vd-ul: br0 10.77.0.254  <- FakeController (TLS gRPC) listens here
      node netns vd-n<i>: `nsenter --net=/run/netns/vd-n<i> python -m vpblu daemon run ...`
        pods vd-n<i>p<j> behind host veths vd-n<i>p<j> (the daemon's --pod-veth-glob)

`daemon_lab` builds it and always takes it down: every daemon process it
started is killed (by its own handle), every wireguard-go of the lab's
interfaces ended, the namespaces deleted, the pinned maps removed and the
temporary directory (prefix vd-) deleted, also when the test fails.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
import trio_asyncio

from tests.e2e.netns import UNDERLAY_GATEWAY, Lab, Node, in_ns, run
from tests.fakes.controller import TOKEN_PREFIX, FakeController
from vpblu.core.model import Endpoint, NodeDesiredState, Peer, Route
from vpblu.lab.pki import CertAuthority
from vpblu.node.kernel.bcc import MAP_NAMES, remove_pins
from vpblu.node.kernel.nsexec import call_in_netns
from vpblu.stream.transport import ServerTLS

REPO = Path(__file__).resolve().parents[2]
PREFIX = "vd"
LISTEN_PORT = 51820
UNDERLAY_MTU = 1400
MESH_MTU = UNDERLAY_MTU - 80
START_TIMEOUT = 60.0  # a daemon process to its Hello: interpreter and imports (slow under load)
STOP_TIMEOUT = 10.0
APPLY_LINE = re.compile(
    r"apply done in (?P<ms>[\d.]+) ms(?: \([^)]*\))?: .* writes netlink=(?P<netlink>\d+) "
    r"wireguard=(?P<wireguard>\d+) maps=(?P<maps>\d+); since start netlink=(?P<total_netlink>\d+) "
    r"wireguard=(?P<total_wireguard>\d+)"
)


@attrs.frozen
class ApplyLine:
    ms: float
    netlink: int
    wireguard: int
    maps: int
    total_netlink: int  # since the process started, its preparation included
    total_wireguard: int

    @property
    def writes(self) -> int:
        return self.netlink + self.wireguard + self.maps


def pin_dir(node: Node) -> Path:
    return Path(f"/sys/fs/bpf/{node.netns}")


@attrs.define
class DaemonProcess:
    node: Node
    argv: list[str]
    log_path: Path
    process: trio.Process | None = None
    starts: int = 0

    async def start(self) -> None:
        assert self.process is None or self.process.returncode is not None
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.process = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd=REPO
            )
        finally:
            os.close(fd)
        self.starts += 1

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def applies(self) -> list[ApplyLine]:
        return [
            ApplyLine(float(m["ms"]), int(m["netlink"]), int(m["wireguard"]), int(m["maps"]),
                      int(m["total_netlink"]), int(m["total_wireguard"]))
            for m in APPLY_LINE.finditer(self.log())
        ]


def daemon_argv(node: Node, controller: str, ca: Path, token: Path, state: Path,
                command: str = "run") -> list[str]:
    argv = [
        "nsenter", f"--net=/run/netns/{node.netns}",
        sys.executable, "-m", "vpblu", "daemon", command,
        "--node-name", node.name,
        "--interface", node.wg_interface,
        "--state-dir", str(state),
        "--bpf-pin-dir", str(pin_dir(node)),
        "--pod-veth-glob", f"{node.netns}p*",
    ]
    if command == "run":
        argv += ["--controller", controller, "--ca", str(ca), "--token-file", str(token)]
    return argv


@attrs.define
class DaemonLab:
    lab: Lab
    nodes: list[Node]
    controller: FakeController
    address: str
    tmp: Path
    ca: Path
    daemons: dict[str, DaemonProcess] = attrs.field(factory=dict)

    def state_dir(self, node: Node) -> Path:
        return self.tmp / f"state-{node.name}"

    def daemon(self, node: Node) -> DaemonProcess:
        if node.name not in self.daemons:
            token = self.tmp / f"token-{node.name}"
            token.write_text(f"{TOKEN_PREFIX}{node.name}\n")
            self.daemons[node.name] = DaemonProcess(
                node,
                daemon_argv(node, self.address, self.ca, token, self.state_dir(node)),
                self.tmp / f"{node.name}.log",
            )
        return self.daemons[node.name]

    async def start(self, node: Node) -> str:
        """Start the node's daemon; return its public key once it said Hello."""
        d = self.daemon(node)
        seen = len(self.controller.hellos(node.name))
        await d.start()
        with trio.move_on_after(START_TIMEOUT):
            hello = await self.controller.wait_hello(node.name, seen + 1)
            return hello.public_key
        raise AssertionError(f"{node.name}'s daemon said no Hello within {START_TIMEOUT:.0f} s "
                             f"of its start (log: {d.log_path})")

    async def cleanup(self, node: Node) -> subprocess.CompletedProcess[bytes]:
        argv = daemon_argv(node, "", self.ca, Path(), self.state_dir(node), command="cleanup")
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=REPO)


def full_mesh(node: Node, keys: dict[str, str], members: list[Node]) -> NodeDesiredState:
    peers, routes = [], []
    for other in members:
        if other is node:
            continue
        peers.append(Peer(other.name, keys[other.name],
                          Endpoint(other.underlay_ip, LISTEN_PORT), (other.pod_cidr,)))
        routes.append(Route(other.pod_cidr, other.name))
    return NodeDesiredState(node.name, LISTEN_PORT, peers, routes)


def _listen_in(netns: str) -> socket.socket:
    return call_in_netns(netns, lambda: socket.create_server((UNDERLAY_GATEWAY, 0)))


@asynccontextmanager
async def daemon_lab(nodes: int) -> AsyncIterator[DaemonLab]:
    tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    lab = Lab(PREFIX)
    built: list[Node] = []
    the_lab: DaemonLab | None = None
    try:
        lab.__enter__()
        for i in range(1, nodes + 1):
            node = lab.add_node(i, f"10.78.{i}.0/24", mtu=UNDERLAY_MTU)
            lab.add_pod(node, 1)
            built.append(node)
        ca = CertAuthority.create("vd-mesh-ca")
        ca.write(tmp / "ca.pem")
        ca.issue("controller", ip_addresses=(UNDERLAY_GATEWAY,), server=True).write(
            tmp / "server.pem", tmp / "server.key")
        sock = await trio.to_thread.run_sync(_listen_in, lab.underlay)
        address = f"{UNDERLAY_GATEWAY}:{sock.getsockname()[1]}"
        controller = FakeController(ServerTLS(tmp / "server.pem", tmp / "server.key"), sock)
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            the_lab = DaemonLab(lab, built, controller, address, tmp, tmp / "ca.pem")
            try:
                yield the_lab
            finally:
                with trio.CancelScope(shield=True):
                    for d in the_lab.daemons.values():
                        await d.stop()
                nursery.cancel_scope.cancel()
    finally:
        lab.close()
        for node in built:
            remove_pins(pin_dir(node))
        shutil.rmtree(tmp, ignore_errors=True)


# --- what cleanup must give back ---------------------------------------------------------

_BUILTIN_CHAIN = re.compile(r"^:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT ")


def iptables_rules(netns: str) -> str:
    """iptables-save without comments, counters and empty tables: the nft backend
    keeps a table (with its empty built-in chains) after its last rule is deleted,
    which changes no packet's fate."""
    tables: list[str] = []
    current: list[str] = []
    for line in in_ns(netns, "iptables-save").splitlines():
        if line.startswith("#") or _BUILTIN_CHAIN.match(line):
            continue
        if line.startswith("*"):
            current = [line]
        elif line == "COMMIT":
            if len(current) > 1:
                tables.extend([*current, line])
        else:
            current.append(re.sub(r"\[\d+:\d+\]", "", line))
    return "\n".join(tables)


def node_state(node: Node) -> dict[str, str]:
    """Links, rules, routes of all tables, tc qdiscs and filters, iptables, pins."""
    snap = node.snapshot()
    snap["iptables"] = iptables_rules(node.netns)
    tc = [run("ip", "netns", "exec", node.netns, "tc", "qdisc", "show")]
    for pod in node.pods:
        for where in ("ingress", "egress"):
            tc.append(run("ip", "netns", "exec", node.netns, "tc", "filter", "show", "dev",
                          pod.host_veth, where))
    snap["tc"] = "".join(tc)
    pins = pin_dir(node)
    snap["pins"] = " ".join(sorted(os.listdir(pins))) if pins.exists() else "<none>"
    return snap


# --- the pinned maps' ids, read the way any other process would ----------------------------

_SYS_BPF = 321  # x86_64
_BPF_OBJ_GET = 7


class _ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


def pinned_map_ids(node: Node) -> dict[str, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    ids = {}
    for name in MAP_NAMES:
        path = ctypes.create_string_buffer(os.fsencode(pin_dir(node) / name))
        attr = _ObjGet(ctypes.cast(path, ctypes.c_void_p).value or 0, 0, 0)
        fd = libc.syscall(_SYS_BPF, _BPF_OBJ_GET, ctypes.byref(attr), ctypes.sizeof(attr))
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {name}")
        try:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                ids[name] = next(int(line.split()[1]) for line in info
                                 if line.startswith("map_id:"))
        finally:
            os.close(fd)
    return ids
