"""Service traffic between nodes is encrypted (issue 16), with the real kube-proxy.

One `LocalCluster` per kube-proxy mode (iptables, nftables): a real
kube-apiserver, two controller replicas, three nodes each running the real
daemon (wireguard-go, bcc eBPF on the pods' veths) and the real kube-proxy
(built from the Go module proxy like the API server) in the node's namespace.
No kube-controller-manager runs, so each test writes its Service and the
Service's EndpointSlice itself, as the endpointslice controller would.

What the product promises: whatever address a pod calls (a pod IP, a
ClusterIP, a NodePort), pod traffic between nodes crosses the underlay only
inside WireGuard. So while the traffic flows, tcpdump on the underlay bridge
must see nothing but WireGuard UDP between node addresses (and, for the
NodePort, the outside client's own exchange with the node it called), and no
packet with a pod address in the clear.

kube-proxy rewrites a ClusterIP or NodePort to the backend pod's address in
netfilter's PREROUTING, after tc ingress on the pod's veth has run: a
classifier that decides "into the mesh" on the pre-DNAT destination lets the
request leave in the clear (DESIGN.md section 6). Before steering by
destination (487ebd0) both tests failed in both modes the same way: the
client's SYN left node1 as 10.244.1.11 > 10.244.2.11:5401 (ClusterIP), and
node3's forward of the NodePort connection as <node3> > 10.244.1.11:5402,
in the clear, retransmitted until the connect timed out.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.e2e.conftest import CLUSTER_CONVERGE_TIMEOUT
from vpblu.lab.localcluster import (
    KUSTOMIZE_SAMPLES,
    POD_SUPERNET,
    WG_PORT,
    ClusterError,
    ClusterSettings,
    LocalCluster,
    Pod,
    underlay_packets,
)

PROXY_MODES = ("iptables", "nftables")
DAEMON_METRICS_PORT = 9091  # the daemon's default --metrics-listen
SERVICE_PORT = 80
CLUSTER_IP_BACKEND_PORT = 5401
NODE_PORT = 30080
NODE_PORT_BACKEND_PORT = 5402
# kube-proxy programs a new Service within its 1 s minSyncPeriod; the bound is
# for 2 shared cores.
PROGRAMMED_TIMEOUT = 30.0
# A few MB, counted by bytes rather than time, so a loaded machine only makes
# the transfer slower.
TRANSFER_BYTES = 8 * 1024 * 1024
# Connect and each read: a SYN that leaves in the clear dies on the underlay,
# and the client gives up after this.
IO_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 120.0
BLOCKED_BACKEND_PORT = 5403
# A blocked connect fails after PROBE_TIMEOUT; an allowed one moves a few segments.
PROBE_BYTES = 64 * 1024
PROBE_TIMEOUT = 3.0
BLOCK_TIMEOUT = 15.0
SERVER_EXIT_TIMEOUT = 5.0
# 8 MiB is thousands of full-size segments: far more WireGuard data packets
# than keepalives and handshakes could account for.
MIN_WIREGUARD_PACKETS = 1000
WG_CONTROL_LENGTHS = frozenset({"32", "92", "148"})
# The API server's --service-cluster-ip-range (vpblu.lab.testenv), a /24.
SERVICE_RANGE = "10.0.0"
# Any pod address (the pod supernet) or Service address seen by tcpdump is
# cleartext pod traffic.
CLEARTEXT = re.compile(rf"\b(?:{re.escape(POD_SUPERNET)}|{re.escape(SERVICE_RANGE)})\.\d+")


@pytest.fixture(scope="module", params=PROXY_MODES)
def proxied(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A 3-node LocalCluster with the sample FullMesh and kube-proxy in `param` mode."""
    with LocalCluster.start(ClusterSettings(nodes=3, proxy_mode=request.param)) as c:
        c.apply_kustomize(KUSTOMIZE_SAMPLES)
        c.wait_for(c.mesh_complete, CLUSTER_CONVERGE_TIMEOUT, "a complete FullMesh")
        # The classifier and the guard attach after the Hello (bcc compiles on a
        # thread): on a loaded machine well after the mesh is complete.
        c.wait_for(lambda: guards_attached(c), CLUSTER_CONVERGE_TIMEOUT,
                   "every daemon's /metrics reporting its underlay guard attached")
        yield c


def guards_attached(cluster: LocalCluster) -> bool:
    """Every daemon's /metrics says its underlay guard is attached. A daemon
    serves /metrics only after its Hello (vpblu.node.daemon): a refused
    connection until then is "not yet", not an error."""
    try:
        counts = guard_counts(cluster)
    except ClusterError:
        return False
    return all(attached == 1.0 for attached, _ in counts.values())


# The two ends of a checked TCP transfer, run with `python -c` in a namespace:
# TRANSFER_BYTES of seeded random bytes, compared by SHA-256 at the far end.
SERVER = """
import hashlib, json, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(1)
listener.settimeout(float(sys.argv[3]))
print("listening", flush=True)
try:
    conn, peer = listener.accept()
except OSError as exc:
    print(json.dumps({"error": f"no connection: {exc}"}), flush=True)
    sys.exit(0)
conn.settimeout(float(sys.argv[3]))
digest, count = hashlib.sha256(), 0
try:
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        count += len(chunk)
    error = ""
except OSError as exc:
    error = f"{type(exc).__name__}: {exc}"
conn.close()
print(json.dumps({"bytes": count, "sha256": digest.hexdigest(), "peer": peer[0],
                  "error": error}), flush=True)
"""
CLIENT = """
import hashlib, json, random, socket, sys
address, port, bind, size, timeout = sys.argv[1:6]
data = random.Random(16).randbytes(int(size))
try:
    sock = socket.create_connection((address, int(port)), timeout=float(timeout),
                                    source_address=(bind, 0))
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    sock.close()
    error = ""
except OSError as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "error": error}), flush=True)
"""


def _json(text: str, what: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        return result
    except (IndexError, ValueError):
        return {"error": f"{what} printed no result: {text.strip()[-300:]!r}"}


def tcp_transfer(cluster: LocalCluster, server: Pod, server_port: int, client_netns: str,
                 client_ip: ipaddress.IPv4Address, address: str, port: int, *,
                 size: int = TRANSFER_BYTES, io_timeout: float = IO_TIMEOUT) -> str:
    """`size` bytes over TCP from a client in `client_netns` to
    `address`:`port`, which must reach `server` on `server_port`. "" if they
    all arrived intact, else what went wrong."""
    srv = cluster.popen_in(server.netns, [
        sys.executable, "-c", SERVER, str(server.ip), str(server_port), str(io_timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "listening":
            return f"the server in {server.name} did not start"
        client = cluster.exec_in(
            client_netns, sys.executable, "-c", CLIENT, address, str(port), str(client_ip),
            str(size), str(io_timeout), check=False, timeout=TRANSFER_TIMEOUT)
        out, _ = srv.communicate(timeout=io_timeout + SERVER_EXIT_TIMEOUT)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    sent, got = _json(client.stdout + client.stderr, "the client"), _json(out, "the server")
    if sent.get("error") or got.get("error"):
        return f"client: {sent.get('error')!r}, server: {got.get('error')!r}"
    if (got["bytes"], got["sha256"]) != (sent["bytes"], sent["sha256"]):
        return f"sent {sent}, received {got}"
    return ""


def wait_programmed(cluster: LocalCluster, cluster_ip: str, backend: Pod) -> None:
    cluster.wait_for(
        lambda: all(cluster.service_programmed(n, cluster_ip, backend) for n in cluster.nodes),
        PROGRAMMED_TIMEOUT, f"kube-proxy's rules for {cluster_ip} -> {backend.ip} on every node")


def not_wireguard(cluster: LocalCluster, lines: Sequence[str],
                  allowed: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Captured packets other than WireGuard UDP between node addresses and the
    `allowed` (address.port, address.port) conversations, either way."""
    node_ips = {str(n.underlay_ip) for n in cluster.nodes}
    flows = {frozenset(pair) for pair in allowed}
    bad = []
    for line in lines:
        parsed = underlay_packets([line])
        if not parsed:
            bad.append(line)
            continue
        src, dst, summary = parsed[0]
        (src_ip, _, src_port), (dst_ip, _, dst_port) = src.rpartition("."), dst.rpartition(".")
        if (src_ip in node_ips and dst_ip in node_ips and src_port == dst_port == str(WG_PORT)
                and summary.startswith("UDP")):
            continue
        if frozenset((src, dst)) in flows:
            continue
        bad.append(line)
    return bad


def wireguard_data(cluster: LocalCluster, lines: Sequence[str], a: str, b: str) -> int:
    """WireGuard data packets (not keepalives or handshakes) between nodes a and b."""
    ends = {str(cluster.node(a).underlay_ip), str(cluster.node(b).underlay_ip)}
    return sum(1 for src, dst, summary in underlay_packets(lines)
               if {src.rpartition(".")[0], dst.rpartition(".")[0]} == ends
               and summary.startswith("UDP")
               and summary.split("length ")[-1] not in WG_CONTROL_LENGTHS)


def guard_counts(cluster: LocalCluster) -> dict[str, tuple[float, float]]:
    """Per node, the underlay guard's (attached, cleartext packets) from the
    daemon's own /metrics (served in the node's namespace)."""
    counts = {}
    for node in cluster.nodes:
        text = cluster.exec_in(node.netns, "curl", "-sf", f"http://127.0.0.1:{DAEMON_METRICS_PORT}"
                               "/metrics").stdout
        values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line.startswith(("vpblu_cleartext_packets_total ",
                                          "vpblu_cleartext_guard_attached ")))
        # Absent until the daemon's first data-path sample: not attached, none counted.
        counts[node.name] = (float(values.get("vpblu_cleartext_guard_attached", 0.0)),
                             float(values.get("vpblu_cleartext_packets_total", 0.0)))
    return counts


def assert_encrypted(cluster: LocalCluster, lines: Sequence[str],
                     allowed: Sequence[tuple[str, str]] = ()) -> None:
    guards = guard_counts(cluster)
    assert guards == {n.name: (1.0, 0.0) for n in cluster.nodes}, (
        f"the underlay guard (attached, cleartext packets) per node: {guards}")
    in_clear = [line for line in lines if CLEARTEXT.search(line)]
    assert not in_clear, (f"{len(in_clear)} packet(s) with a pod or Service address in the "
                          f"clear on the underlay, e.g.:\n" + "\n".join(in_clear[:10]))
    other = not_wireguard(cluster, lines, allowed)
    assert not other, ("packets other than WireGuard between nodes on the underlay:\n"
                       + "\n".join(other[:10]))


def test_a_pod_calls_a_cluster_ip_whose_only_backend_is_on_another_node(
        proxied: LocalCluster) -> None:
    """Not masqueraded (the client is in the cluster CIDR): the request leaves
    node1 addressed pod to pod after kube-proxy's DNAT, and must go into the
    mesh."""
    cluster = proxied
    node1, node2, _ = cluster.nodes
    client, backend = node1.pods[0], node2.pods[0]
    cluster_ip = cluster.create_service("across", backend, SERVICE_PORT,
                                        CLUSTER_IP_BACKEND_PORT)
    try:
        wait_programmed(cluster, cluster_ip, backend)
        with cluster.capture(f"not arp and not host {cluster.controller_ip}") as lines:
            problem = tcp_transfer(cluster, backend, CLUSTER_IP_BACKEND_PORT, client.netns,
                                   client.ip, cluster_ip, SERVICE_PORT)
        assert_encrypted(cluster, lines)
        assert not problem, problem
        assert wireguard_data(cluster, lines, node1.name, node2.name) \
            >= MIN_WIREGUARD_PACKETS, lines[-20:]
    finally:
        cluster.delete_service("across")


def test_a_node_port_on_node3_reaches_a_pod_on_node1(proxied: LocalCluster) -> None:
    """The client is outside the cluster, on the underlay (the bridge's own
    address): its exchange with node3's NodePort is its business and in the
    clear; node3's forwarding to the pod on node1 must be encrypted."""
    cluster = proxied
    node1, _, node3 = cluster.nodes
    backend = node1.pods[0]
    cluster_ip = cluster.create_service("nodeport", backend, SERVICE_PORT,
                                        NODE_PORT_BACKEND_PORT, node_port=NODE_PORT)
    try:
        wait_programmed(cluster, cluster_ip, backend)
        outside = cluster.gateway_ip
        with cluster.capture(f"not arp and not host {cluster.controller_ip}") as lines:
            problem = tcp_transfer(cluster, backend, NODE_PORT_BACKEND_PORT,
                                   cluster.underlay_netns, outside, str(node3.underlay_ip),
                                   NODE_PORT)
        client_flows = {(src, dst) for src, dst, _ in underlay_packets(lines)
                        if src.startswith(f"{outside}.")
                        and dst == f"{node3.underlay_ip}.{NODE_PORT}"}
        assert_encrypted(cluster, lines,
                         allowed=[*client_flows, *((d, s) for s, d in client_flows)])
        assert not problem, problem
        assert wireguard_data(cluster, lines, node3.name, node1.name) \
            >= MIN_WIREGUARD_PACKETS, lines[-20:]
    finally:
        cluster.delete_service("nodeport")


def test_a_block_policy_holds_whether_the_pod_is_called_by_ip_or_by_service(
        proxied: LocalCluster) -> None:
    """The block is enforced as the client sends (its address and the pod's)
    and again as the packet reaches the pod, after kube-proxy's DNAT: a
    ClusterIP is no way around it."""
    cluster = proxied
    node1, node2, _ = cluster.nodes
    client, backend = node1.pods[0], node2.pods[0]
    cluster_ip = cluster.create_service("blocked", backend, SERVICE_PORT, BLOCKED_BACKEND_PORT)
    policy = {"apiVersion": "vpblu.io/v1alpha1", "kind": "BlockPolicy",
              "metadata": {"name": "client-to-backend"},
              "spec": {"cidrPairs": [{"from": f"{client.ip}/32", "to": f"{backend.ip}/32"}]}}

    def reaches(address: str, port: int) -> str:
        return tcp_transfer(cluster, backend, BLOCKED_BACKEND_PORT, client.netns, client.ip,
                            address, port, size=PROBE_BYTES, io_timeout=PROBE_TIMEOUT)

    try:
        wait_programmed(cluster, cluster_ip, backend)
        assert reaches(cluster_ip, SERVICE_PORT) == "", "the Service works before the block"
        cluster.apply(policy)
        cluster.wait_for(lambda: not cluster.ping(client, backend.ip, count=1),
                         BLOCK_TIMEOUT, f"{client.name} -> {backend.name} blocked by IP")
        assert reaches(str(backend.ip), BLOCKED_BACKEND_PORT) != "", "reached by IP"
        assert reaches(cluster_ip, SERVICE_PORT) != "", "reached through the ClusterIP"
        cluster.delete("blockpolicy", "client-to-backend")
        cluster.wait_for(lambda: cluster.ping(client, backend.ip, count=1),
                         BLOCK_TIMEOUT, f"{client.name} -> {backend.name} unblocked")
        assert reaches(cluster_ip, SERVICE_PORT) == "", "the Service works again"
    finally:
        cluster.delete("blockpolicy", "client-to-backend")
        cluster.delete_service("blocked")
