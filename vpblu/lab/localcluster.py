"""A whole vpblu cluster on one machine: API server, two controllers, N nodes, pods.

Owns, for the lifetime of one `LocalCluster`: a `TestEnv` (etcd and
kube-apiserver on loopback) with `kustomize/base` applied by
`kubectl apply -k`, a throwaway CA and the controllers' serving certificate,
two controller replica processes, one underlay network, N node network
namespaces each running the real `vpblu daemon run` and the real kube-proxy,
and pods behind veths on every node. Used by the demo (`make demo`), the
end-to-end acceptance suite and the benchmark. It must never leave anything
behind: every exit path (normal exit, exception, Ctrl-C) stops kube-proxy and
the daemons, runs `vpblu daemon cleanup` on every node, stops the controllers
and the API forwarder, ends the wireguard-go processes of its
interfaces, deletes its namespaces, links, pin directories and temporary
directory. If the harness itself is SIGKILLed, its children die with it
(PR_SET_PDEATHSIG) and the next `LocalCluster.start` sweeps what is left
(`sweep_stale`). It never sends a packet outside the namespaces it created.

The layout (K is a free /24 picked at start; TAG 4 hex characters, so that
several clusters can run at once on one machine):

    root netns: veth vc<TAG>h 10.78.K.253/24 -- the controllers listen here
        (API server on 127.0.0.1, so the controllers stay in the root netns)
      └─ vc<TAG>c ─ bridge br0 (10.78.K.254/24) in netns vc-<TAG>-ul, the underlay
           └─ vc<TAG>u<i> ── vc<TAG>e<i> in node netns vc-<TAG>-n<i>, 10.78.K.<i>/24,
                              default via 10.78.K.254 (which does not forward:
                              anything sent in the clear dies on the underlay)
                 wg interface vc<TAG>w<i> (wireguard-go, started by the daemon)
                 └─ vc<TAG>p<i>x<j> ── eth0 in pod netns vc-<TAG>-n<i>p<j>:
                                       10.244.<i>.<10+j>/32, default via
                                       10.244.<i>.1 onlink

Pod routing is what a minimal CNI does: the node holds the gateway address
10.244.<i>.1/32 on every pod's host veth and a /32 host route per pod. The
daemon's eBPF classifier attaches to the host veths by name
(`--pod-veth-glob vc<TAG>p<i>x*`).

wireguard-go's UAPI sockets live in /var/run/wireguard, shared by every
network namespace, so each node's WireGuard interface has a machine-wide
unique name (vc<TAG>w<i>) instead of `wg-mesh`; the daemons do not get a mount
namespace of their own. Each daemon gets its own state dir, pin dir
(/sys/fs/bpf/vc<TAG>/n<i>) and token file (a bound ServiceAccount token of
`vpblu-daemon` for a Pod object on its node, 0600). Daemons run through
`nsenter --net=/run/netns/<ns>` (never `ip netns exec`, which remounts /sys
and hides the pinned maps).

kube-proxy (the binary `scripts/build-kube.sh` builds, mode iptables or
nftables) runs in each node's namespace the way the daemon does, from a
KubeProxyConfiguration file: hostnameOverride = the node's name, clusterCIDR
= the pod supernet, healthz and metrics on the namespace's own loopback,
`conntrack.maxPerCore: 0` (nf_conntrack_max is not per namespace; kube-proxy
exits when it cannot write it). It reaches the API server, which listens on
127.0.0.1 of the root namespace only, through `vpblu.lab.tcpforward` on the
controllers' address (TLS end to end, server name "localhost"), as the user
`system:kube-proxy` (a client certificate from the API server's client CA),
which the bootstrap RBAC binds to `system:node-proxier`. No
kube-controller-manager runs: `create_service` writes a Service and its
EndpointSlice as the endpointslice controller would.

The controllers authenticate to the API server as the `vpblu-controller`
ServiceAccount the kustomize base creates (a token kubeconfig), so its RBAC is
what is tested. Everything here is synchronous: call it from a test thread or
with `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import yaml

from vpblu.lab.pki import CertAuthority, write_private
from vpblu.lab.testenv import (
    ChildProcess,
    TestEnv,
    default_cache,
    free_port,
    install_base,
    pid_alive,
    spawn_child,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONTROLLER_METRICS_PORT = 9090
KUSTOMIZE_BASE = REPO / "kustomize" / "base"
KUSTOMIZE_SAMPLES = REPO / "kustomize" / "samples"

PREFIX = "vc"
DIR_PREFIX = "vc-cluster-"
OWNER_FILE = "owner.pid"
TAG_FILE = "tag"
NETNS_DIR = Path("/run/netns")
BPF_ROOT = Path("/sys/fs/bpf")
UNDERLAY_SUPERNET = ipaddress.ip_network("10.78.0.0/16")
POD_SUPERNET = "10.244"
CONTROLLER_HOST = 253
UNDERLAY_GATEWAY = 254
SYSTEM_NAMESPACE = "vpblu-system"
DAEMON_SA = "vpblu-daemon"
CONTROLLER_SA = "vpblu-controller"
LEASE_NAME = "vpblu-controller"
TOKEN_AUDIENCE = "vpblu"
# Long enough for a demo left running for a day; nothing here refreshes tokens.
TOKEN_DURATION = "24h"
WG_PORT = 51820
# The API server listens on 127.0.0.1 of the root namespace; nodes reach it
# through a forwarder (vpblu.lab.tcpforward) on the controllers' address.
API_FORWARD_PORT = 6443
# The serving certificate's name a client checks when it connects through the
# forwarder (the certificate has localhost and 127.0.0.1, not the forwarder's address).
API_SERVER_NAME = "localhost"
# kube-proxy authenticates with a client certificate as this user: the API
# server's bootstrap RBAC binds it to the ClusterRole system:node-proxier
# (ClusterRoleBinding system:node-proxier), as on a user's cluster.
KUBE_PROXY_USER = "system:kube-proxy"
KUBE_PROXY_ROLE = "system:node-proxier"
# In the node's namespace: each namespace has a loopback of its own.
KUBE_PROXY_HEALTHZ = "127.0.0.1:10256"
KUBE_PROXY_METRICS = "127.0.0.1:10249"
# What kube-proxy's rules look like once it has synced (see kube_proxy_rules).
KUBE_PROXY_SYNCED_MARK = {"iptables": ":KUBE-SERVICES ", "nftables": "chain services {"}
# EndpointSlices this harness writes by hand (no kube-controller-manager runs).
ENDPOINTSLICE_MANAGER = "localcluster.vpblu.io"
SERVICE_NAMESPACE = "default"

# A controller answers on its port within a second or two of starting (a
# Python import of grpclib and kubernetes-asyncio); the bound is for 2 cores
# shared with other suites.
CONTROLLER_START_TIMEOUT = 30.0
# kube-proxy programs its first rules about a second after it starts; the
# bound is for 2 cores shared with other suites.
KUBE_PROXY_READY_TIMEOUT = 60.0
PROCESS_STOP_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 60.0
WG_EXIT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
LOG_TAIL_BYTES = 4000
# Headers are all a capture's reader looks at; the kernel's buffer for tcpdump
# is sized for a few seconds of a pod's full-speed TCP.
CAPTURE_SNAPLEN = 160
CAPTURE_BUFFER_KIB = 16384


class ClusterError(RuntimeError):
    """The local cluster could not do what was asked (the message says why)."""


@attrs.frozen(slots=True)
class ClusterSettings:
    nodes: int = 3
    pods_per_node: int = 1
    # Leader election tuned for a demo and tests: failover in a few seconds.
    lease_duration: float = 4.0
    renew_deadline: float = 3.0
    retry_period: float = 0.5
    wireguard_backend: str = "userspace"
    log_level: str = "INFO"
    log_format: str = "text"  # the controllers' and daemons' --log-format
    underlay_mtu: int = 1500
    # False: Nodes, pods and controllers, but no daemon processes (a caller
    # that runs its own, e.g. a benchmark with simulated daemons).
    daemons: bool = True
    # The real kube-proxy in every node's namespace, so Services work as on a
    # user's node; `proxy_mode` is its mode ("iptables" or "nftables").
    kube_proxy: bool = True
    proxy_mode: str = attrs.field(default="iptables", validator=attrs.validators.in_(
        ("iptables", "nftables")))


@attrs.frozen(slots=True)
class Pod:
    name: str
    netns: str
    ip: ipaddress.IPv4Address
    host_veth: str
    node: str


@attrs.define
class Node:
    """One node: its namespace, addresses and the files its daemon uses."""

    index: int
    name: str
    netns: str
    underlay_ip: ipaddress.IPv4Address
    underlay_interface: str
    pod_cidr: ipaddress.IPv4Network
    interface: str
    pod_veth_glob: str
    state_dir: Path
    pin_dir: Path
    token_file: Path
    log_path: Path
    pods: list[Pod] = attrs.field(factory=list)
    daemon: ChildProcess | None = None
    daemon_starts: int = 0
    kube_proxy: ChildProcess | None = None

    @property
    def kube_proxy_log(self) -> Path:
        return self.log_path.with_name(f"kube-proxy-{self.name}.log")

    @property
    def kube_proxy_config(self) -> Path:
        return self.state_dir.parent / "kube-proxy.yaml"

    @property
    def daemon_running(self) -> bool:
        return self.daemon is not None and not self.daemon.exited()


@attrs.define
class Controller:
    """One controller replica process (`index` 0 or 1)."""

    index: int
    address: str
    log_path: Path
    process: ChildProcess | None = None
    starts: int = 0

    @property
    def identity(self) -> str:
        # A new identity per start, so every new leader is a Lease transition.
        return f"controller-{'ab'[self.index]}-{self.starts}"

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.exited()


@attrs.frozen(slots=True)
class WgPeer:
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix seconds; 0 = never
    rx_bytes: int
    tx_bytes: int


@attrs.frozen(slots=True)
class WgDevice:
    public_key: str
    listen_port: int
    peers: tuple[WgPeer, ...]

    def peer(self, public_key: str) -> WgPeer | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


def run(*argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited with {result.returncode}: "
                           f"{result.stderr.strip()[-1000:]}")
    return result


def nsenter(netns: str) -> list[str]:
    """The argv prefix that runs a command in `netns`, keeping /sys (and bpffs) as is."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--"]


def pids_where(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Processes whose argv (from /proc/<pid>/cmdline) `match` accepts."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if match(argv):
            pids.append(int(entry))
    return pids


def _wireguard_go_pids(prefix: str) -> list[int]:
    """Processes running `wireguard-go <interface>` for an interface named prefix*."""
    return pids_where(lambda argv: len(argv) >= 2 and argv[0].endswith(b"wireguard-go")
                      and argv[1].startswith(prefix.encode()))


def _remove_tag(tag: str) -> None:
    """Remove every kernel object named for `tag` (best effort, idempotent)."""
    for ns in sorted(_netns_names(f"{PREFIX}-{tag}-"), reverse=True):
        # Pods first (their names extend the node's), the underlay last.
        run("ip", "netns", "del", ns, check=False)
    run("ip", "link", "del", f"{PREFIX}{tag}h", check=False)
    deadline = time.monotonic() + WG_EXIT_TIMEOUT
    while _wireguard_go_pids(f"{PREFIX}{tag}w") and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    for pid in _wireguard_go_pids(f"{PREFIX}{tag}w"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for sock in Path("/var/run/wireguard").glob(f"{PREFIX}{tag}w*.sock"):
        sock.unlink(missing_ok=True)
    shutil.rmtree(BPF_ROOT / f"{PREFIX}{tag}", ignore_errors=True)


def _netns_names(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix)]


def sweep_stale(root: Path | None = None) -> list[str]:
    """Remove what clusters of dead harness processes left (they were SIGKILLed)."""
    root = Path(tempfile.gettempdir()) if root is None else root
    swept = []
    for d in root.glob(DIR_PREFIX + "*"):
        try:
            owner = int((d / OWNER_FILE).read_text())
            tag = (d / TAG_FILE).read_text().strip()
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            _remove_tag(tag)
            shutil.rmtree(d, ignore_errors=True)
            swept.append(tag)
    return swept


def _free_underlay() -> tuple[str, ipaddress.IPv4Network]:
    """A tag and an underlay /24 that no other cluster on this machine uses."""
    used = run("ip", "-4", "route", "show").stdout + run("ip", "-o", "link").stdout
    for _ in range(200):
        tag = f"{random.getrandbits(16):04x}"
        k = random.randrange(256)
        net = ipaddress.IPv4Network(f"10.78.{k}.0/24")
        if (f"{PREFIX}{tag}" not in used and str(net.network_address) not in used
                and not _netns_names(f"{PREFIX}-{tag}-")):
            return tag, net
    raise ClusterError("no free underlay subnet in 10.78.0.0/16")


class LocalCluster:
    """The cluster. Create with `LocalCluster.start()` (a context manager).

    Attributes: `env` (the TestEnv: kubectl, request), `nodes`, `controllers`,
    `tag`, `underlay` (its /24), `controller_ip`, `dir`.
    """

    def __init__(self, settings: ClusterSettings, env: TestEnv, directory: Path,
                 tag: str, underlay: ipaddress.IPv4Network) -> None:
        self.settings = settings
        self.env = env
        self.dir = directory
        self.tag = tag
        self.underlay = underlay
        self.underlay_netns = f"{PREFIX}-{tag}-ul"
        self.controller_ip = underlay[CONTROLLER_HOST]
        self.gateway_ip = underlay[UNDERLAY_GATEWAY]
        self.nodes: list[Node] = []
        self.controllers: list[Controller] = []
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=DIR_PREFIX)
        self._ca = CertAuthority.create(f"vpblu local cluster {tag} CA")
        self.ca_path = directory / "ca.crt"
        self._api_forwarder: ChildProcess | None = None
        self._captures = 0
        self.kube_proxy_ready_seconds = 0.0

    # --- lifecycle ------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(cls, settings: ClusterSettings | None = None, *,
              progress: Callable[[str], None] | None = None) -> Iterator[LocalCluster]:
        """A running cluster (mesh not necessarily converged) for the with-block."""
        settings = settings or ClusterSettings()
        say = progress or (lambda _msg: None)
        sweep_stale()
        tag, underlay = _free_underlay()
        directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{tag}-"))
        (directory / OWNER_FILE).write_text(str(os.getpid()))
        (directory / TAG_FILE).write_text(tag)
        try:
            with TestEnv.start() as env:
                cluster = cls(settings, env, directory, tag, underlay)
                try:
                    say(f"API server {env.server_url} ready "
                        f"({env.apiserver_start_seconds:.1f} s)")
                    cluster._install()
                    say("kubectl apply -k kustomize/base: CRDs established and served")
                    cluster._make_underlay()
                    if settings.kube_proxy:
                        cluster._prepare_kube_proxy()
                    for i in range(1, settings.nodes + 1):
                        cluster._make_node(i)
                    say(f"{settings.nodes} node namespaces on underlay {underlay}, "
                        f"{settings.pods_per_node} pod(s) each")
                    cluster._start_controllers()
                    say(f"2 controller replicas listening on {cluster.controller_ip}")
                    for node in cluster.nodes:
                        cluster.register_node(node)
                        if settings.daemons:
                            cluster.start_daemon(node)
                    say(f"{settings.nodes} nodes registered (Node, VpbluNode, daemon Pod, "
                        f"bound token){', daemons started' if settings.daemons else ''}")
                    if settings.kube_proxy:
                        for node in cluster.nodes:
                            cluster.start_kube_proxy(node)
                        cluster.kube_proxy_ready_seconds = cluster.wait_kube_proxies_ready()
                        say(f"kube-proxy ({settings.proxy_mode} mode) on every node: rules "
                            f"programmed ({cluster.kube_proxy_ready_seconds:.1f} s)")
                    yield cluster
                finally:
                    cluster.close()
        finally:
            _remove_tag(tag)
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        """Stop and remove everything, in dependency order. Idempotent, and a
        second Ctrl-C does not cut it short."""
        with _signals_deferred():
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self.stop_kube_proxy(node)
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self.stop_daemon(node)
            for node in self.nodes:
                try:
                    self.cleanup_daemon(node)
                except Exception as exc:
                    log.warning("vpblu daemon cleanup on %s failed: %s", node.name, exc)
            for controller in self.controllers:
                with contextlib.suppress(Exception):
                    self.stop_controller(controller.index)
            forwarder, self._api_forwarder = self._api_forwarder, None
            if forwarder is not None:
                with contextlib.suppress(Exception):
                    forwarder.stop()
            self._spawner.shutdown(wait=True)
            _remove_tag(self.tag)

    # --- the API --------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.env.kubectl(*args, input=input, check=check)

    def apply(self, manifest: dict[str, Any] | str) -> None:
        """`kubectl apply -f -` of one object (a dict) or YAML text."""
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        self.kubectl("apply", "-f", "-", input=text)

    def apply_kustomize(self, path: Path) -> None:
        self.kubectl("apply", "-k", str(path))

    def delete(self, kind: str, name: str, *, namespace: str | None = None) -> None:
        args = ["delete", kind, name, "--ignore-not-found", "--wait=false"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args)

    def get(self, kind: str, name: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self.kubectl(*args).stdout.strip()
        return json.loads(out) if out else None

    def public_keys(self) -> dict[str, str]:
        """node name -> status.publicKey of its VpbluNode (written by the controller)."""
        out = json.loads(self.kubectl("get", "vpblunodes", "-o", "json").stdout)
        keys = {}
        for item in out["items"]:
            key = (item.get("status") or {}).get("publicKey")
            if key:
                keys[item["metadata"]["name"]] = key
        return keys

    def leader(self) -> str | None:
        """The Lease's holder identity (None: no Lease yet)."""
        lease = self.get("lease", LEASE_NAME, namespace=SYSTEM_NAMESPACE)
        if lease is None:
            return None
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return str(holder) if holder else None

    def leading_controller(self) -> Controller | None:
        holder = self.leader()
        return next((c for c in self.controllers if c.running and c.identity == holder), None)

    def connected_nodes(self, controller: Controller) -> set[str]:
        """Nodes with an established TCP connection to this replica's port."""
        port = controller.address.rpartition(":")[2]
        out = run("ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
        by_ip = {str(n.underlay_ip): n.name for n in self.nodes}
        found = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                peer_ip = fields[-1].rpartition(":")[0]
                if peer_ip in by_ip:
                    found.add(by_ip[peer_ip])
        return found

    # --- controllers ------------------------------------------------------------------

    def start_controller(self, index: int) -> Controller:
        c = self.controllers[index]
        if c.running:
            raise ClusterError(f"controller {index} is already running")
        c.starts += 1
        s = self.settings
        argv = [
            sys.executable, "-m", "vpblu.cli", "--log-level", s.log_level,
            "--log-format", s.log_format, "controller",
            "--kubeconfig", str(self.dir / "controller.kubeconfig"),
            "--listen", c.address, "--advertise", c.address,
            "--tls-cert", str(self.dir / "controller.crt"),
            "--tls-key", str(self.dir / "controller.key"),
            "--identity", c.identity,
            "--lease-duration", str(s.lease_duration),
            "--renew-deadline", str(s.renew_deadline),
            "--retry-period", str(s.retry_period),
            # Both replicas share this host's network namespace: a port each.
            "--metrics-listen", f"{c.address.rpartition(':')[0]}:{CONTROLLER_METRICS_PORT + index}",
            # The dashboard on a free port of its own: its default, every
            # address on :8082, fails to bind when anything on the machine has
            # that port (the other replica, another cluster, a benchmark), and
            # a dashboard that cannot bind ends the controller.
            "--dashboard-addr", f"{c.address.rpartition(':')[0]}:{free_port()}",
        ]
        c.process = self._spawn(f"controller-{index}", argv, c.log_path)
        self._wait_listening(c)
        return c

    def stop_controller(self, index: int) -> None:
        c = self.controllers[index]
        proc, c.process = c.process, None
        if proc is not None:
            proc.stop()

    def kill_controller(self, index: int) -> None:
        c = self.controllers[index]
        proc, c.process = c.process, None
        if proc is not None:
            proc.kill()

    def _wait_listening(self, c: Controller) -> None:
        port = c.address.rpartition(":")[2]
        deadline = time.monotonic() + CONTROLLER_START_TIMEOUT
        while True:
            assert c.process is not None
            if c.process.exited():
                raise ClusterError(f"controller {c.index} exited with "
                                   f"{c.process.proc.returncode}:\n{c.process.log_tail()}")
            out = run("ss", "-Htln", f"( sport = :{port} )").stdout
            if out.strip():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"controller {c.index} not listening after "
                                   f"{CONTROLLER_START_TIMEOUT} s:\n{c.process.log_tail()}")
            time.sleep(POLL_INTERVAL)

    # --- nodes and daemons -------------------------------------------------------------

    def register_node(self, node: Node) -> None:
        """The Node (InternalIP, podCIDR), its VpbluNode, the daemon's Pod, its token."""
        self.env.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": str(node.underlay_ip)},
                {"type": "Hostname", "address": node.name}]},
        })
        if self.get("node", node.name) is None:
            raise ClusterError(f"Node {node.name} was not created")
        self.apply({"apiVersion": "vpblu.io/v1alpha1", "kind": "VpbluNode",
                    "metadata": {"name": node.name}, "spec": {}})
        pod = f"vpblu-daemon-{node.name}"
        # No kubelet: a Pod on a node is never removed once deleted
        # gracefully, so one that exists (a node registered again) is kept.
        if self.get("pod", pod, namespace=SYSTEM_NAMESPACE) is None:
            self.apply({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": SYSTEM_NAMESPACE,
                             "labels": {"app.kubernetes.io/name": "vpblu",
                                        "app.kubernetes.io/component": "daemon"}},
                "spec": {"nodeName": node.name, "serviceAccountName": DAEMON_SA,
                         "automountServiceAccountToken": False, "hostNetwork": True,
                         "containers": [{"name": "daemon", "image": "vpblu:0.1.0"}]},
            })
        token = self.kubectl(
            "create", "token", DAEMON_SA, "-n", SYSTEM_NAMESPACE,
            f"--audience={TOKEN_AUDIENCE}", "--bound-object-kind=Pod",
            f"--bound-object-name={pod}", f"--duration={TOKEN_DURATION}",
        ).stdout.strip()
        write_private(node.token_file, token.encode())

    def deregister_node(self, node: Node) -> None:
        """Delete the Node and its VpbluNode (the daemon keeps running)."""
        self.delete("node", node.name)
        self.delete("vpblunode", node.name)

    def daemon_resource_args(self, node: Node) -> list[str]:
        return [
            "--node-name", node.name,
            "--interface", node.interface,
            "--state-dir", str(node.state_dir),
            "--bpf-pin-dir", str(node.pin_dir),
            "--pod-veth-glob", node.pod_veth_glob,
            "--underlay-interface", node.underlay_interface,
        ]

    def start_daemon(self, node: Node) -> None:
        if node.daemon_running:
            raise ClusterError(f"the daemon of {node.name} is already running")
        node.daemon_starts += 1
        argv = [
            *nsenter(node.netns), sys.executable, "-m", "vpblu.cli",
            "--log-level", self.settings.log_level, "--log-format", self.settings.log_format,
            "daemon", "run",
            *(arg for c in self.controllers for arg in ("--controller", c.address)),
            "--ca", str(self.ca_path), "--token-file", str(node.token_file),
            "--wireguard-backend", self.settings.wireguard_backend,
            *self.daemon_resource_args(node),
        ]
        node.daemon = self._spawn(f"daemon-{node.name}", argv, node.log_path)

    def stop_daemon(self, node: Node) -> None:
        proc, node.daemon = node.daemon, None
        if proc is not None:
            proc.stop()

    def kill_daemon(self, node: Node) -> None:
        """kill -9: the daemon leaves its interface, routes and pinned maps behind."""
        proc, node.daemon = node.daemon, None
        if proc is not None:
            proc.kill()

    def cleanup_daemon(self, node: Node) -> None:
        """`vpblu daemon cleanup` in the node's namespace (the daemon must be stopped)."""
        run(*nsenter(node.netns), sys.executable, "-m", "vpblu.cli", "daemon", "cleanup",
            *self.daemon_resource_args(node), timeout=CLEANUP_TIMEOUT)

    def daemon_log(self, node: Node) -> str:
        try:
            return node.log_path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
        except OSError:
            return ""

    # --- kube-proxy -----------------------------------------------------------------------

    def start_kube_proxy(self, node: Node) -> None:
        """The real kube-proxy in the node's namespace (its Node must be registered:
        kube-proxy reads its addresses from it)."""
        if node.kube_proxy is not None and not node.kube_proxy.exited():
            raise ClusterError(f"kube-proxy on {node.name} is already running")
        binary = default_cache() / "bin" / "kube-proxy"
        if not os.access(binary, os.X_OK):
            raise ClusterError(f"{binary} is missing: run `bash scripts/build-kube.sh`")
        node.kube_proxy_config.write_text(yaml.safe_dump(self._kube_proxy_configuration(node)))
        node.kube_proxy = self._spawn(
            f"kube-proxy-{node.name}",
            [*nsenter(node.netns), str(binary), f"--config={node.kube_proxy_config}"],
            node.kube_proxy_log)

    def _kube_proxy_configuration(self, node: Node) -> dict[str, Any]:
        mode = self.settings.proxy_mode
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": node.name,
            "clusterCIDR": f"{POD_SUPERNET}.0.0/16",
            "mode": mode,
            # Loopback of the node's namespace: nothing on the underlay.
            "healthzBindAddress": KUBE_PROXY_HEALTHZ,
            "metricsBindAddress": KUBE_PROXY_METRICS,
            # nf_conntrack_max is not per namespace (read-only in a node's
            # namespace): 0 leaves the limit alone. The per-namespace timeouts
            # kube-proxy does set.
            "conntrack": {"maxPerCore": 0},
            # No OOM protection for a test process.
            "oomScoreAdj": 0,
        }

    def stop_kube_proxy(self, node: Node) -> None:
        proc, node.kube_proxy = node.kube_proxy, None
        if proc is not None:
            proc.stop()

    def kube_proxy_rules(self, node: Node) -> str:
        """kube-proxy's rules in the node's namespace: its nat table (iptables
        mode) or its `ip kube-proxy` table (nftables mode); "" if none yet."""
        if self.settings.proxy_mode == "nftables":
            argv = ["nft", "list", "table", "ip", "kube-proxy"]
        else:
            argv = ["iptables-save", "-t", "nat"]
        return self.exec_in(node.netns, *argv, check=False).stdout

    def kube_proxy_ready(self, node: Node) -> bool:
        """Its rules are programmed and its /healthz answers ok."""
        if KUBE_PROXY_SYNCED_MARK[self.settings.proxy_mode] not in self.kube_proxy_rules(node):
            return False
        result = self.exec_in(node.netns, "curl", "-sf", "--max-time", "2",
                              f"http://{KUBE_PROXY_HEALTHZ}/healthz", check=False)
        return result.returncode == 0

    def wait_kube_proxies_ready(self, timeout: float = KUBE_PROXY_READY_TIMEOUT) -> float:
        """Wait until every node's kube-proxy is ready; the seconds it took."""
        began = time.monotonic()
        waiting = [n for n in self.nodes if n.kube_proxy is not None]
        while waiting:
            for node in waiting:
                assert node.kube_proxy is not None
                if node.kube_proxy.exited():
                    raise ClusterError(
                        f"kube-proxy on {node.name} exited with "
                        f"{node.kube_proxy.proc.returncode}:\n{node.kube_proxy.log_tail()}")
            waiting = [n for n in waiting if not self.kube_proxy_ready(n)]
            if waiting and time.monotonic() - began > timeout:
                node = waiting[0]
                tail = node.kube_proxy.log_tail() if node.kube_proxy else ""
                raise ClusterError(
                    f"kube-proxy not ready after {timeout} s on "
                    f"{', '.join(n.name for n in waiting)} (no "
                    f"{KUBE_PROXY_SYNCED_MARK[self.settings.proxy_mode]!r} in its "
                    f"{self.settings.proxy_mode} rules, or /healthz not ok); "
                    f"{node.name}'s log:\n{tail}")
            if waiting:
                time.sleep(POLL_INTERVAL * 3)
        return time.monotonic() - began

    def kube_proxy_log(self, node: Node) -> str:
        try:
            return node.kube_proxy_log.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
        except OSError:
            return ""

    # --- Services (what kube-controller-manager would write) ------------------------------

    def create_service(self, name: str, backend: Pod, port: int, target_port: int, *,
                       node_port: int | None = None, protocol: str = "TCP") -> str:
        """A Service (ClusterIP, or NodePort with `node_port`) whose one endpoint
        is `backend`, and its EndpointSlice written by hand, as the endpointslice
        controller would (none runs here). The Service has no selector, which is
        how Kubernetes marks a Service whose endpoints someone else manages. The
        ClusterIP the API server allocated is returned."""
        spec: dict[str, Any] = {
            "type": "NodePort" if node_port is not None else "ClusterIP",
            "ports": [{"name": "main", "protocol": protocol, "port": port,
                       "targetPort": target_port,
                       **({"nodePort": node_port} if node_port is not None else {})}],
        }
        self.apply({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": SERVICE_NAMESPACE},
                    "spec": spec})
        self.apply({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-manual", "namespace": SERVICE_NAMESPACE,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by":
                                        ENDPOINTSLICE_MANAGER}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [str(backend.ip)], "nodeName": backend.node,
                           "conditions": {"ready": True, "serving": True,
                                          "terminating": False}}],
            "ports": [{"name": "main", "protocol": protocol, "port": target_port}],
        })
        service = self.get("service", name, namespace=SERVICE_NAMESPACE)
        if service is None:
            raise ClusterError(f"Service {name} was not created")
        return str(service["spec"]["clusterIP"])

    def delete_service(self, name: str) -> None:
        self.delete("endpointslice", f"{name}-manual", namespace=SERVICE_NAMESPACE)
        self.delete("service", name, namespace=SERVICE_NAMESPACE)

    def service_programmed(self, node: Node, cluster_ip: str, backend: Pod) -> bool:
        """The node's kube-proxy rules name the Service's address and its backend."""
        rules = self.kube_proxy_rules(node)
        return cluster_ip in rules and str(backend.ip) in rules

    # --- looking at the data plane --------------------------------------------------------

    def exec_in(self, netns: str, *argv: str, check: bool = True,
                timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run(*nsenter(netns), *argv, check=check, timeout=timeout)

    def popen_in(self, netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """A process in `netns` the caller owns (and must stop)."""
        return subprocess.Popen([*nsenter(netns), *argv], text=True, **kwargs)

    def ping(self, src: Pod, dst: ipaddress.IPv4Address, *, count: int = 2,
             wait: float = 1.0) -> bool:
        result = self.exec_in(src.netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                              "-W", str(wait), str(dst), check=False)
        return result.returncode == 0

    def wg_device(self, node: Node) -> WgDevice | None:
        """`wg show <interface> dump` in the node's namespace (None: no device yet)."""
        result = self.exec_in(node.netns, "wg", "show", node.interface, "dump", check=False)
        if result.returncode != 0:
            return None
        lines = result.stdout.splitlines()
        if not lines:
            return None
        head = lines[0].split("\t")
        peers = []
        for line in lines[1:]:
            f = line.split("\t")
            if len(f) < 8:
                continue
            peers.append(WgPeer(
                public_key=f[0], endpoint=None if f[2] == "(none)" else f[2],
                allowed_ips=tuple(a for a in f[3].split(",") if a and a != "(none)"),
                latest_handshake=int(f[4]), rx_bytes=int(f[5]), tx_bytes=int(f[6])))
        return WgDevice(public_key=head[1], listen_port=int(head[2]), peers=tuple(peers))

    def mesh_complete(self) -> bool:
        """Every node's device has exactly the other nodes as peers, with the keys
        the controller published in their VpbluNodes' status."""
        keys = self.public_keys()
        if set(keys) != {n.name for n in self.nodes if self._registered(n)}:
            return False
        for node in self.nodes:
            if node.name not in keys:
                continue
            dev = self.wg_device(node)
            if dev is None or dev.public_key != keys[node.name]:
                return False
            want = {k for name, k in keys.items() if name != node.name}
            if {p.public_key for p in dev.peers} != want:
                return False
        return True

    def _registered(self, node: Node) -> bool:
        return self.get("node", node.name) is not None

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll `condition` until true; the seconds it took. ClusterError on timeout."""
        began = time.monotonic()
        while not condition():
            for node in self.nodes:
                if node.daemon is not None and node.daemon.exited():
                    raise ClusterError(f"the daemon of {node.name} exited with "
                                       f"{node.daemon.proc.returncode} while waiting for "
                                       f"{what}\n{self.diagnostics()}")
            if time.monotonic() - began > timeout:
                raise ClusterError(f"not {what} after {timeout} s\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL * 3)
        return time.monotonic() - began

    def diagnostics(self) -> str:
        parts = []
        for c in self.controllers:
            tail = c.process.log_tail() if c.process else "(not running)"
            parts.append(f"--- controller {c.index} ({c.identity}):\n{tail[-1500:]}")
        for node in self.nodes:
            parts.append(f"--- daemon {node.name}:\n{self.daemon_log(node)[-1500:]}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def capture(self, bpf_filter: str = "", *,
                raw: bytearray | None = None) -> Iterator[list[str]]:
        """tcpdump on the underlay bridge for the with-block; the list fills with
        one line per packet (`tcpdump -n -tt`) when the block ends, and `raw`,
        if given, with the pcap file's bytes (each packet's first
        CAPTURE_SNAPLEN bytes: to look for a payload in the clear).

        Packets are written to a file while they flow (immediate mode, so
        none waits in a half-filled kernel block when tcpdump is stopped) and
        printed afterwards: text read from a pipe only at the end stalls
        tcpdump once the pipe is full (64 KiB, a few hundred packets) and the
        kernel drops the rest, so a busy capture would silently see only its
        first packets. An incomplete capture proves nothing: if tcpdump did
        not write every packet its filter took, the block ends with
        ClusterError (unless it raised already)."""
        lines: list[str] = []
        self._captures += 1
        pcap = self.dir / f"capture-{self._captures}.pcap"
        argv = [*nsenter(self.underlay_netns), "tcpdump", "-i", "br0", "-n", "-U",
                "--immediate-mode", "-s", str(CAPTURE_SNAPLEN), "-B", str(CAPTURE_BUFFER_KIB),
                "-w", str(pcap)]
        if bpf_filter:
            argv.append(bpf_filter)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        said = ""
        try:
            # tcpdump says "listening on" on stderr once it captures.
            assert proc.stderr is not None
            while "listening" not in said:
                line = proc.stderr.readline()
                if not line:
                    raise ClusterError(f"tcpdump did not start: {said}")
                said += line
            yield lines
        finally:
            # Let the last packets reach the capture buffer before stopping.
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            try:
                _, said = proc.communicate(timeout=PROCESS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, said = proc.communicate()
            if pcap.exists():
                out = run("tcpdump", "-r", str(pcap), "-n", "-tt", check=False).stdout
                if raw is not None:
                    raw.extend(pcap.read_bytes())
                pcap.unlink()
                lines.extend(line for line in out.splitlines() if line.strip())
        stats = {what: int(n) for n, what in re.findall(
            r"(\d+) packets? (captured|received by filter|dropped by kernel)", said)}
        # tcpdump reads every packet as it comes (immediate mode); the one the
        # kernel's filter may count in the instant SIGINT breaks its loop arrived
        # 0.3 s after the block ended, so it is not the block's (a fresh-clone run
        # once saw 5120 captured of 5121). More missing means tcpdump fell behind.
        if (len(stats) != 3 or stats["dropped by kernel"] > 0
                or not 0 <= stats["received by filter"] - stats["captured"] <= 1):
            raise ClusterError(f"the capture is incomplete: tcpdump said {said.strip()!r}")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- building --------------------------------------------------------------------------

    def _install(self) -> None:
        install_base(self.env)
        token = self.kubectl("create", "token", CONTROLLER_SA, "-n", SYSTEM_NAMESPACE,
                             f"--duration={TOKEN_DURATION}").stdout.strip()
        # Files, not embedded data (see TestEnv._write_kubeconfig).
        config = self.env.kubeconfig(CONTROLLER_SA, {"token": token})
        write_private(self.dir / "controller.kubeconfig", yaml.safe_dump(config).encode())

    def _prepare_kube_proxy(self) -> None:
        """What every node's kube-proxy needs: the API server reachable from the
        nodes' namespaces (a forwarder on the controllers' address), a client
        certificate for `system:kube-proxy` in a kubeconfig of its own, and the
        RBAC a user's cluster gives that user (checked, not made: the API
        server's bootstrap policy binds it to `system:node-proxier`)."""
        binding = self.get("clusterrolebinding", KUBE_PROXY_ROLE) or {}
        if (binding.get("roleRef", {}).get("name") != KUBE_PROXY_ROLE
                or {"kind": "User", "name": KUBE_PROXY_USER} not in [
                    {"kind": x.get("kind"), "name": x.get("name")}
                    for x in binding.get("subjects") or []]):
            raise ClusterError(f"no ClusterRoleBinding {KUBE_PROXY_ROLE} of the user "
                               f"{KUBE_PROXY_USER}: {binding}")
        listen = f"{self.controller_ip}:{API_FORWARD_PORT}"
        proc = self._spawn("api-forwarder", [
            sys.executable, "-m", "vpblu.lab.tcpforward", listen, f"127.0.0.1:{self.env.port}",
        ], self.dir / "api-forwarder.log")
        self._api_forwarder = proc
        deadline = time.monotonic() + CONTROLLER_START_TIMEOUT
        while not run("ss", "-Htln", f"( src {listen} )").stdout.strip():
            if proc.exited() or time.monotonic() > deadline:
                raise ClusterError(f"the API forwarder is not listening on {listen}:\n"
                                   f"{proc.log_tail()}")
            time.sleep(POLL_INTERVAL)
        cert = self.env.issue_client_cert(KUBE_PROXY_USER)
        config = self.env.client_kubeconfig(KUBE_PROXY_USER, cert.cert_pem, cert.key_pem,
                                            server=f"https://{listen}",
                                            tls_server_name=API_SERVER_NAME)
        write_private(self.dir / "kube-proxy.kubeconfig", yaml.safe_dump(config).encode())

    def _make_underlay(self) -> None:
        ns, tag = self.underlay_netns, self.tag
        self._add_netns(ns)
        # No IPv6 on the underlay: its link-local chatter (router
        # solicitations, MLD) is not what a capture is looking for.
        run(*nsenter(ns), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1")
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"{self.gateway_ip}/24", "dev", "br0")
        run("ip", "-n", ns, "link", "set", "br0", "up")
        host, bridge_side = f"{PREFIX}{tag}h", f"{PREFIX}{tag}c"
        run("ip", "link", "add", host, "type", "veth", "peer", "name", bridge_side,
            "netns", ns)
        run("ip", "-n", ns, "link", "set", bridge_side, "master", "br0", "up")
        run("sysctl", "-qw", f"net.ipv6.conf.{host}.disable_ipv6=1")
        run("ip", "addr", "add", f"{self.controller_ip}/24", "dev", host)
        run("ip", "link", "set", host, "up")
        # Two replicas on one address, told apart by port.
        self._ca.write(self.ca_path)
        self._ca.issue("vpblu-controller", dns_names=("vpblu-controller.vpblu-system.svc",),
                       ip_addresses=(str(self.controller_ip),), server=True,
                       ).write(self.dir / "controller.crt", self.dir / "controller.key")
        for index in range(2):
            port = 7443 + index
            self.controllers.append(Controller(
                index, f"{self.controller_ip}:{port}", self.dir / f"controller-{index}.log"))

    def _add_netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _make_node(self, i: int) -> Node:
        tag, s = self.tag, self.settings
        ns = f"{PREFIX}-{tag}-n{i}"
        node = Node(
            index=i, name=f"node{i}", netns=ns, underlay_ip=self.underlay[i],
            underlay_interface=f"{PREFIX}{tag}e{i}",
            pod_cidr=ipaddress.IPv4Network(f"{POD_SUPERNET}.{i}.0/24"),
            interface=f"{PREFIX}{tag}w{i}",
            pod_veth_glob=f"{PREFIX}{tag}p{i}x*",
            state_dir=self.dir / f"node{i}" / "state",
            pin_dir=BPF_ROOT / f"{PREFIX}{tag}" / f"n{i}",
            token_file=self.dir / f"node{i}" / "token",
            log_path=self.dir / f"daemon-node{i}.log",
        )
        node.state_dir.mkdir(parents=True, mode=0o700)
        self.nodes.append(node)
        self._add_netns(ns)
        bridge_side, eth = f"{PREFIX}{tag}u{i}", node.underlay_interface
        run("ip", "-n", self.underlay_netns, "link", "add", bridge_side, "type", "veth",
            "peer", "name", eth, "netns", ns)
        run("ip", "-n", self.underlay_netns, "link", "set", bridge_side, "mtu",
            str(s.underlay_mtu), "master", "br0", "up")
        run(*nsenter(ns), "sysctl", "-qw", f"net.ipv6.conf.{eth}.disable_ipv6=1",
            "net.ipv4.ip_forward=1")
        run("ip", "-n", ns, "link", "set", eth, "mtu", str(s.underlay_mtu))
        run("ip", "-n", ns, "addr", "add", f"{node.underlay_ip}/24", "dev", eth)
        run("ip", "-n", ns, "link", "set", eth, "up")
        run("ip", "-n", ns, "route", "add", "default", "via", str(self.gateway_ip))
        for j in range(1, s.pods_per_node + 1):
            self.add_pod(node, j)
        return node

    def add_pod(self, node: Node, j: int, *, ip: ipaddress.IPv4Address | None = None,
                name: str | None = None) -> Pod:
        """A pod on `node`: a namespace behind a veth, routed as a minimal CNI would.

        `ip` defaults to the j-th address of the node's pod CIDR (from .11); an
        address outside it stands for a subnet the node reaches (a RoutePolicy
        target)."""
        netns = f"{node.netns}p{j}"
        host_veth = f"{PREFIX}{self.tag}p{node.index}x{j}"
        pod = Pod(name=name or f"pod{node.index}-{j}", netns=netns,
                  ip=ip or node.pod_cidr[10 + j], host_veth=host_veth, node=node.name)
        gateway = node.pod_cidr[1]
        self._add_netns(netns)
        run("ip", "-n", node.netns, "link", "add", host_veth, "type", "veth", "peer", "name",
            "eth0", "netns", netns)
        run("ip", "-n", node.netns, "addr", "add", f"{gateway}/32", "dev", host_veth)
        run("ip", "-n", node.netns, "link", "set", host_veth, "up")
        run("ip", "-n", node.netns, "route", "add", f"{pod.ip}/32", "dev", host_veth)
        run("ip", "-n", netns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "route", "add", "default", "via", str(gateway), "dev", "eth0",
            "onlink")
        node.pods.append(pod)
        return pod

    def _start_controllers(self) -> None:
        for c in self.controllers:
            self.start_controller(c.index)

    def _spawn(self, name: str, argv: list[str], log_path: Path) -> ChildProcess:
        return spawn_child(self._spawner, name, argv, log_path, self.dir)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def underlay_packets(lines: Sequence[str]) -> list[tuple[str, str, str]]:
    """(source, destination, protocol summary) from `tcpdump -n` lines of IPv4 packets."""
    out = []
    pattern = re.compile(r"IP (\S+) > (\S+): (.*)")
    for line in lines:
        m = pattern.search(line)
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
    return out
