"""`python -m vpblu.lab.demo` (`make demo`): a 3-node encrypted mesh on this machine,
shown converging and carrying traffic.

Owns the story told on the terminal, nothing else. The cluster is one of two,
chosen by --nodes-mode:

- `kubelet` (the default): `vpblu.lab.kubeletnodes.KubeletCluster`, real
  nodes (containerd, kubelet and kube-proxy in each node's namespaces,
  kube-controller-manager and kube-scheduler beside the API server) on which
  vpblu is installed as a user installs it, `kubectl apply -k` of an overlay
  naming the image `make image` built; the pods pinged are busybox pods run
  by kubelet.
- `namespaces`: `vpblu.lab.localcluster.LocalCluster`, hand-made nodes whose
  daemons and controllers run from this checkout (quicker to start, nothing
  of the image or of kubelet involved).

Either cluster removes everything it made when the demo ends (Ctrl-C, an
error, or `--duration` elapsed): no process, namespace, interface, mount or
containerd state is left behind, and no private key is ever printed (only
public keys, shortened).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from vpblu.lab.kubeletnodes import KubeletCluster, KubeletSettings
from vpblu.lab.localcluster import (
    KUSTOMIZE_SAMPLES,
    SYSTEM_NAMESPACE,
    WG_PORT,
    ClusterSettings,
    LocalCluster,
    Pod,
    underlay_packets,
)

CONVERGE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 30.0
PROGRESS_PERIOD = 1.0
STATUS_PERIOD = 2.0
CAPTURE_PINGS = 3
NODES_MODES = ("kubelet", "namespaces")
# The controllers' gRPC (TLS) port: on kubelet nodes the controller pods run on
# their nodes' host network, so the daemons' streams to them cross the underlay.
CONTROLLER_PORT = 7443
DEMO_POD_PREFIX = "demo-"


@attrs.frozen(slots=True)
class DemoSettings:
    nodes: int = 3
    # None: the live view runs until Ctrl-C.
    duration: float | None = None
    nodes_mode: str = attrs.field(default="kubelet",
                                  validator=attrs.validators.in_(NODES_MODES))


class Clock:
    def __init__(self) -> None:
        self.began = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def stamp(self) -> str:
        return f"[{self.elapsed():6.1f}s]"


def short(key: str | None) -> str:
    return f"{key[:8]}…" if key else "-"


def _interrupt(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt


@attrs.define
class Stage:
    """What the story needs to know of the cluster it is told on: the two
    kinds of node run their daemons and controllers differently."""

    cluster: LocalCluster
    # Extra capture filter: traffic between nodes that is not the mesh's and
    # is expected on the underlay (the daemons' TLS to host-network controllers).
    capture_exclude: str = ""
    capture_excluded_says: str = ""

    def pods(self) -> list[Pod]:
        """One pod per node to ping between."""
        return [node.pods[0] for node in self.cluster.nodes]

    def controllers_line(self) -> str:
        return ", ".join(f"{c.identity} {'up' if c.running else 'down'}"
                         for c in self.cluster.controllers)

    def daemon_states(self) -> dict[str, str]:
        return {n.name: "up" if n.daemon_running else "down" for n in self.cluster.nodes}


@attrs.define
class KubeletStage(Stage):
    @classmethod
    def of(cls, cluster: KubeletCluster) -> KubeletStage:
        """A KubeletCluster with vpblu installed (`KubeletCluster.install`)."""
        return cls(cluster, capture_exclude=f" and not tcp port {CONTROLLER_PORT}",
                   capture_excluded_says=f", and the daemons' TLS to the controllers (TCP "
                                         f"{CONTROLLER_PORT}, host network)")

    def pods(self) -> list[Pod]:
        # Pods of the demo's own, started once; the namespaces' Pod view of them.
        cluster = self.cluster
        assert isinstance(cluster, KubeletCluster)
        for node in cluster.nodes:
            if node.pods:
                continue
            name = f"{DEMO_POD_PREFIX}{node.name}"
            obj = cluster.run_pod(name, node, ["sleep", "1000000"])
            node.pods.append(Pod(name=name, netns=cluster.pod_netns(name),
                                 ip=ipaddress.IPv4Address(obj["status"]["podIP"]),
                                 host_veth="", node=node.name))
        return super().pods()

    def _system_pods(self) -> list[dict[str, Any]]:
        out = self.cluster.kubectl("get", "pods", "-n", SYSTEM_NAMESPACE, "-o", "json",
                                   check=False).stdout
        try:
            items: list[dict[str, Any]] = json.loads(out)["items"]
        except (ValueError, KeyError):
            return []
        return items

    def controllers_line(self) -> str:
        pods = [p for p in self._system_pods() if _component(p) == "controller"]
        return ", ".join(f"{p['metadata']['name']} {_state(p)}" for p in pods) or "none"

    def daemon_states(self) -> dict[str, str]:
        return {p["spec"].get("nodeName", "?"): _state(p) for p in self._system_pods()
                if _component(p) == "daemon"}


def _component(pod: dict[str, Any]) -> str:
    return str((pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component", ""))


def _state(pod: dict[str, Any]) -> str:
    """`up` (Ready), `stopping`, or the pod's phase (`Pending`, `Running` not Ready)."""
    if pod["metadata"].get("deletionTimestamp"):
        return "stopping"
    status = pod.get("status") or {}
    if any(c.get("type") == "Ready" and c.get("status") == "True"
           for c in status.get("conditions") or []):
        return "up"
    return str(status.get("phase", "?"))


@contextlib.contextmanager
def namespace_stage(settings: DemoSettings, say: Callable[[str], None]) -> Iterator[Stage]:
    """LocalCluster: the daemons and controllers run from this checkout."""
    say(f"starting a {settings.nodes}-node local cluster (network-namespace nodes)")
    cluster_settings = ClusterSettings(nodes=settings.nodes, log_level="WARNING")
    with LocalCluster.start(cluster_settings, progress=say) as cluster:
        yield Stage(cluster)


@contextlib.contextmanager
def kubelet_stage(settings: DemoSettings, say: Callable[[str], None]) -> Iterator[Stage]:
    """KubeletCluster: vpblu installed from the image by `kubectl apply -k`."""
    say(f"starting a {settings.nodes}-node local cluster (kubelet nodes: containerd, kubelet "
        "and kube-proxy on each)")
    with KubeletCluster.start_kubelet(KubeletSettings(nodes=settings.nodes, log_level="WARNING"),
                                      progress=say) as cluster:
        took = cluster.install()
        say(f"kubectl apply -k {cluster.dir / 'overlay'} (kustomize/base, the local image by "
            f"digest): controller Deployment and daemon DaemonSets rolled out ({took:.1f} s)")
        yield KubeletStage.of(cluster)


def run_demo(settings: DemoSettings, out: Callable[[str], None] = print) -> int:
    clock = Clock()
    # Installed explicitly: a shell starts background jobs with SIGINT
    # ignored, and SIGTERM (kill, systemd, a CI timeout) must clean up too.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)

    def say(msg: str) -> None:
        out(f"{clock.stamp()} {msg}")

    stage = kubelet_stage if settings.nodes_mode == "kubelet" else namespace_stage
    interrupted = False
    try:
        with stage(settings, say) as s:
            try:
                tell(s, settings, clock, out)
            except KeyboardInterrupt:
                # Said before the teardown, which takes a while on kubelet nodes
                # (a second Ctrl-C does not cut it short).
                interrupted = True
                say("interrupted")
            say("stopping: removing daemons, controllers, namespaces and interfaces"
                + (", kubelets, containerd and their state (up to a minute)"
                   if settings.nodes_mode == "kubelet" else ""))
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        say("interrupted: everything the demo created is removed")
        return 130
    say("done: nothing left behind")
    return 0


def tell(stage: Stage, settings: DemoSettings, clock: Clock,
         out: Callable[[str], None]) -> None:
    """The story on a started cluster: the policy applied, the mesh converging,
    pods pinging, the underlay captured, then the live view."""

    def say(msg: str) -> None:
        out(f"{clock.stamp()} {msg}")

    cluster = stage.cluster
    cluster.apply_kustomize(KUSTOMIZE_SAMPLES)
    say(f"kubectl apply -k kustomize/samples: TunnelPolicy default (FullMesh, port {WG_PORT})")
    converged = _converge(cluster, clock, say)
    say(f"MESH CONVERGED {converged:.1f} s after start: every node has every "
        "other node as a peer, with the keys in the VpbluNodes' status")
    pods = stage.pods()
    _ping_all(cluster, pods, say)
    handshakes = _wait_handshakes(cluster, clock)
    say(f"every tunnel has a WireGuard handshake ({handshakes:.1f} s after start)")
    _show_capture(stage, pods, say)
    _live(stage, settings, out)


def _converge(cluster: LocalCluster, clock: Clock, say: Callable[[str], None]) -> float:
    last = ""
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while True:
        # Checked first, so the last line printed shows the converged mesh.
        complete = cluster.mesh_complete()
        keys = cluster.public_keys()
        parts = []
        for node in cluster.nodes:
            dev = cluster.wg_device(node)
            peers = len(dev.peers) if dev else 0
            parts.append(f"{node.name} key={short(keys.get(node.name))} peers={peers}")
        line = f"leader={cluster.leader() or '-'} | " + " | ".join(parts)
        if line != last:
            say(line)
            last = line
        if complete:
            return clock.elapsed()
        if time.monotonic() > deadline:
            raise SystemExit(f"the mesh did not converge in {CONVERGE_TIMEOUT} s\n"
                             f"{cluster.diagnostics()}")
        time.sleep(PROGRESS_PERIOD / 4)


def _ping_all(cluster: LocalCluster, pods: list[Pod], say: Callable[[str], None]) -> None:
    say("pod-to-pod ping across every node pair:")
    failed = 0
    for src, dst in itertools.permutations(pods, 2):
        ok = cluster.ping(src, dst.ip, count=2)
        failed += not ok
        say(f"  {src.name} ({src.ip}, {src.node}) -> {dst.name} ({dst.ip}, {dst.node}): "
            f"{'ok' if ok else 'FAILED'}")
    if failed:
        raise SystemExit(f"{failed} pod pairs cannot reach each other\n{cluster.diagnostics()}")


def _wait_handshakes(cluster: LocalCluster, clock: Clock) -> float:
    def all_shaken() -> bool:
        for node in cluster.nodes:
            dev = cluster.wg_device(node)
            if dev is None or not dev.peers or any(p.latest_handshake == 0 for p in dev.peers):
                return False
        return True

    cluster.wait_for(all_shaken, HANDSHAKE_TIMEOUT, "every peer handshaken")
    return clock.elapsed()


def _show_capture(stage: Stage, pods: list[Pod], say: Callable[[str], None]) -> None:
    cluster = stage.cluster
    say(f"tcpdump on the underlay bridge while every pod pings every other pod "
        f"(all but ARP and the API server's address {cluster.controller_ip}"
        f"{stage.capture_excluded_says}):")
    bpf = f"not arp and not host {cluster.controller_ip}{stage.capture_exclude}"
    with cluster.capture(bpf) as lines:
        for src, dst in itertools.permutations(pods, 2):
            cluster.ping(src, dst.ip, count=CAPTURE_PINGS)
    packets = underlay_packets(lines)
    node_ips = {str(n.underlay_ip) for n in cluster.nodes}
    wireguard = [p for p in packets
                 if p[0].rpartition(".")[0] in node_ips and p[1].rpartition(".")[0] in node_ips
                 and p[0].endswith(f".{WG_PORT}") and p[1].endswith(f".{WG_PORT}")
                 and "UDP" in p[2]]
    pod_ips = {str(pod.ip) for pod in pods}
    cleartext = [line for line in lines if any(ip in line for ip in pod_ips)]
    for line in lines[:8]:
        say(f"  {line}")
    if len(lines) > 8:
        say(f"  … {len(lines) - 8} more")
    say(f"captured {len(lines)} packets: {len(wireguard)} are UDP {WG_PORT} between node "
        f"addresses, {len(lines) - len(wireguard)} are anything else, {len(cleartext)} "
        "carry a pod address in the clear")
    for line in [x for x in lines if f".{WG_PORT} > " not in x or "UDP" not in x][:5]:
        say(f"  NOT WIREGUARD: {line}")
    if not lines or len(wireguard) != len(lines) or cleartext:
        raise SystemExit("the underlay carried something other than WireGuard")


def _live(stage: Stage, settings: DemoSettings, out: Callable[[str], None]) -> None:
    tty = sys.stdout.isatty()
    out("live status (Ctrl-C to stop and clean up)" if settings.duration is None
        else f"live status for {settings.duration:.0f} s")
    ends = None if settings.duration is None else time.monotonic() + settings.duration
    while ends is None or time.monotonic() < ends:
        view = _status_view(stage)
        if tty:
            out("\x1b[2J\x1b[H" + view + "\n(Ctrl-C to stop and clean up)")
        else:
            out(view)
        time.sleep(STATUS_PERIOD)


def _status_view(stage: Stage) -> str:
    cluster = stage.cluster
    now = time.time()
    keys = cluster.public_keys()
    names = {v: k for k, v in keys.items()}
    daemons = stage.daemon_states()
    rows = [f"{time.strftime('%H:%M:%S')}  leader: {cluster.leader() or '-'}  controllers: "
            + stage.controllers_line()]
    rows.append(f"{'node':8} {'daemon':7} {'key':10} {'peer':8} {'endpoint':18} "
                f"{'handshake':>10} {'rx':>9} {'tx':>9}")
    for node in cluster.nodes:
        dev = cluster.wg_device(node)
        daemon = daemons.get(node.name, "down")
        if dev is None or not dev.peers:
            rows.append(f"{node.name:8} {daemon:7} {short(keys.get(node.name)):10} (no peers)")
            continue
        for i, p in enumerate(sorted(dev.peers, key=lambda p: names.get(p.public_key, ""))):
            age = f"{now - p.latest_handshake:.0f}s ago" if p.latest_handshake else "never"
            rows.append(
                f"{node.name if i == 0 else '':8} {daemon if i == 0 else '':7} "
                f"{short(dev.public_key) if i == 0 else '':10} "
                f"{names.get(p.public_key, short(p.public_key)):8} {p.endpoint or '-':18} "
                f"{age:>10} {p.rx_bytes:>9} {p.tx_bytes:>9}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpblu.lab.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of live status before cleaning up (default: until Ctrl-C)")
    parser.add_argument("--nodes-mode", choices=NODES_MODES, default="kubelet",
                        help="kubelet: real nodes (containerd, kubelet, kube-proxy), vpblu "
                             "installed from the image by kubectl apply -k (default); "
                             "namespaces: network-namespace nodes running the daemons and "
                             "controllers from this checkout (quicker to start)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(DemoSettings(nodes=args.nodes, duration=args.duration,
                                     nodes_mode=args.nodes_mode))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
