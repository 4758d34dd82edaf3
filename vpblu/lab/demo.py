"""`python -m vpblu.lab.demo` (`make demo`): a 3-node encrypted mesh on this machine,
shown converging and carrying traffic.

Owns the story told on the terminal, nothing else: the cluster itself is
`vpblu.lab.localcluster`, which also removes everything when the demo ends
(Ctrl-C, an error, or `--duration` elapsed). It must never leave a process,
namespace or interface behind, and never print a private key (only public keys,
shortened).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence

import attrs

from vpblu.lab.localcluster import (
    KUSTOMIZE_SAMPLES,
    WG_PORT,
    ClusterSettings,
    LocalCluster,
    underlay_packets,
)

CONVERGE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 30.0
PROGRESS_PERIOD = 1.0
STATUS_PERIOD = 2.0
CAPTURE_PINGS = 3


@attrs.frozen(slots=True)
class DemoSettings:
    nodes: int = 3
    # None: the live view runs until Ctrl-C.
    duration: float | None = None


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


def run_demo(settings: DemoSettings, out: Callable[[str], None] = print) -> int:
    clock = Clock()
    # Installed explicitly: a shell starts background jobs with SIGINT
    # ignored, and SIGTERM (kill, systemd, a CI timeout) must clean up too.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)

    def say(msg: str) -> None:
        out(f"{clock.stamp()} {msg}")

    say(f"starting a {settings.nodes}-node local cluster")
    cluster_settings = ClusterSettings(nodes=settings.nodes, log_level="WARNING")
    try:
        with LocalCluster.start(cluster_settings, progress=say) as cluster:
            cluster.apply_kustomize(KUSTOMIZE_SAMPLES)
            say("kubectl apply -k kustomize/samples: TunnelPolicy default (FullMesh, "
                f"port {WG_PORT})")
            converged = _converge(cluster, clock, say)
            say(f"MESH CONVERGED {converged:.1f} s after start: every node has every "
                "other node as a peer, with the keys in the VpbluNodes' status")
            _ping_all(cluster, say)
            handshakes = _wait_handshakes(cluster, clock)
            say(f"every tunnel has a WireGuard handshake ({handshakes:.1f} s after start)")
            _show_capture(cluster, say)
            _live(cluster, settings, out)
            say("stopping: removing daemons, controllers, namespaces and interfaces")
    except KeyboardInterrupt:
        out(f"{clock.stamp()} interrupted: everything the demo created is removed")
        return 130
    say("done: nothing left behind")
    return 0


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


def _ping_all(cluster: LocalCluster, say: Callable[[str], None]) -> None:
    say("pod-to-pod ping across every node pair:")
    pods = [node.pods[0] for node in cluster.nodes]
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


def _show_capture(cluster: LocalCluster, say: Callable[[str], None]) -> None:
    say(f"tcpdump on the underlay bridge while every pod pings every other pod "
        f"(all but ARP and the controllers' address {cluster.controller_ip}):")
    pods = [node.pods[0] for node in cluster.nodes]
    with cluster.capture(f"not arp and not host {cluster.controller_ip}") as lines:
        for src, dst in itertools.permutations(pods, 2):
            cluster.ping(src, dst.ip, count=CAPTURE_PINGS)
    packets = underlay_packets(lines)
    node_ips = {str(n.underlay_ip) for n in cluster.nodes}
    wireguard = [p for p in packets
                 if p[0].rpartition(".")[0] in node_ips and p[1].rpartition(".")[0] in node_ips
                 and p[0].endswith(f".{WG_PORT}") and p[1].endswith(f".{WG_PORT}")
                 and "UDP" in p[2]]
    pod_ips = {str(pod.ip) for node in cluster.nodes for pod in node.pods}
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


def _live(cluster: LocalCluster, settings: DemoSettings, out: Callable[[str], None]) -> None:
    tty = sys.stdout.isatty()
    out("live status (Ctrl-C to stop and clean up)" if settings.duration is None
        else f"live status for {settings.duration:.0f} s")
    ends = None if settings.duration is None else time.monotonic() + settings.duration
    while ends is None or time.monotonic() < ends:
        view = _status_view(cluster)
        if tty:
            out("\x1b[2J\x1b[H" + view + "\n(Ctrl-C to stop and clean up)")
        else:
            out(view)
        time.sleep(STATUS_PERIOD)


def _status_view(cluster: LocalCluster) -> str:
    now = time.time()
    keys = cluster.public_keys()
    names = {v: k for k, v in keys.items()}
    rows = [f"{time.strftime('%H:%M:%S')}  leader: {cluster.leader() or '-'}  controllers: "
            + ", ".join(f"{c.identity} {'up' if c.running else 'down'}"
                        for c in cluster.controllers)]
    rows.append(f"{'node':8} {'daemon':7} {'key':10} {'peer':8} {'endpoint':18} "
                f"{'handshake':>10} {'rx':>9} {'tx':>9}")
    for node in cluster.nodes:
        dev = cluster.wg_device(node)
        daemon = "up" if node.daemon_running else "down"
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(DemoSettings(nodes=args.nodes, duration=args.duration))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
