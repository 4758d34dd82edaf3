"""The acceptance suite on real nodes (issue 22, issue 17's "from the image").

One `KubeletCluster` for the module (vpblu/lab/kubeletnodes.py): the real
kube-apiserver, kube-controller-manager and kube-scheduler; three nodes, each
with containerd, kubelet and kube-proxy in its own network and mount
namespace; vpblu installed by `kubectl apply -k` of an overlay of
kustomize/base naming the image `make image` built, by digest - so the
daemons and both controller replicas are the image's, run by kubelet. The
test pods are real pods (busybox, one per node, each serving a canary file
over HTTP); the Service in front of one of them is programmed by the real
kube-proxy from kube-controller-manager's EndpointSlice.

The claims are those of tests/e2e/test_acceptance.py (and the rotation of
test_rotation_e2e.py), and so is their code wherever it does not care what
runs the daemons: the kubelet pods are given to it as `Pod`s whose network
namespace is their container's (/proc/<pid>/ns/net), so its `UdpFlow`
(sequence-numbered UDP both ways, tests/e2e/flowprobe.py), its ping matrix
and its FullMesh and BlockPolicy tests run here unchanged. What a kubelet
cluster does differently is done here as a user does it: the controllers go
away by `kubectl scale --replicas=0`, the leader by `kubectl delete pod`,
a node by `kubectl delete node`.

Tests put the cluster back as they found it (`healthy`); the node delete
comes last all the same (its kubelet is restarted to register the Node
again, but a test pod of that node may have been collected by then).
Every wait is bounded and says what it waited for; the sleeps left are
dwells (how long a state lasts under traffic is what is claimed).
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import test_acceptance as acceptance
from tests.e2e.procs import Reaper
from tests.e2e.test_acceptance import CONTROLLERS_DOWN_DWELL, UdpFlow, all_pairs_ping, pods
from tests.e2e.test_rotation_e2e import (
    AllTraffic,
    assert_keys_everywhere,
    request_rotation,
    wait_for_outcome,
)
from vpblu.lab import demo
from vpblu.lab.kubeletnodes import TEST_NAMESPACE, KubeletCluster, KubeletSettings
from vpblu.lab.localcluster import (
    SYSTEM_NAMESPACE,
    WG_PORT,
    ClusterError,
    Node,
    Pod,
    underlay_packets,
)

CONVERGE_TIMEOUT = 120.0
CHANGE_TIMEOUT = 30.0
SERVICE_TIMEOUT = 60.0
CONTROLLER_PORT = 7443  # the controllers' gRPC (TLS) on their nodes' host network
HTTP_PORT = 8080
SERVICE_PORT = 80
CONTROLLER_SELECTOR = "app.kubernetes.io/component=controller"
# Short enough that every captured packet's first bytes (the capture's snap
# length) hold a whole copy of it, were the payload in the clear: the file is
# the marker repeated, the request line names it too.
CANARY = f"vpblu-canary-{secrets.token_hex(6)}"
CANARY_COPIES = 4000
# Every test pod: the canary file, served by busybox httpd.
SERVE = (f"mkdir -p /www && i=0 && while [ $i -lt {CANARY_COPIES} ]; do echo {CANARY}; "
         f"i=$((i+1)); done > /www/{CANARY} && exec httpd -f -p {HTTP_PORT} -h /www")
BUSYBOX = "/bin/busybox"


@pytest.fixture(scope="module")
def cluster() -> Iterator[KubeletCluster]:
    began = time.monotonic()
    with KubeletCluster.start_kubelet(KubeletSettings(nodes=3)) as c:
        c.install()
        c.apply_tunnel_policy()
        for node in c.nodes:
            add_test_pod(c, node, f"canary-{node.name}")
        print(f"kubelet cluster up, vpblu installed, test pods running: "
              f"{time.monotonic() - began:.0f} s")
        yield c


def add_test_pod(cluster: KubeletCluster, node: Node, name: str) -> Pod:
    """A kubelet pod as the acceptance code's `Pod`: entered by its container's netns."""
    obj = cluster.run_pod(name, node, ["sh", "-c", SERVE], labels={"app": name})
    pod = Pod(name=name, netns=cluster.pod_netns(name),
              ip=ipaddress.IPv4Address(obj["status"]["podIP"]), host_veth="", node=node.name)
    node.pods.append(pod)
    return pod


# --- the cluster as kubectl sees it ------------------------------------------------------


def controller_pods(cluster: KubeletCluster) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", SYSTEM_NAMESPACE, "-l", CONTROLLER_SELECTOR,
                          "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def leader_pod(cluster: KubeletCluster) -> dict[str, Any] | None:
    """The controller pod holding the Lease (its identity is POD_NAME-<random>)."""
    holder = cluster.leader()
    if holder is None:
        return None
    name = holder.rpartition("-")[0]
    return next((p for p in controller_pods(cluster)
                 if p["metadata"]["name"] == name and not p["metadata"].get("deletionTimestamp")
                 and (p.get("status") or {}).get("phase") == "Running"), None)


def connected_nodes(cluster: KubeletCluster, pod: dict[str, Any]) -> set[str]:
    """Nodes with an established connection to the controller pod's gRPC port,
    seen on the pod's node (host network: the node's own sockets)."""
    node = cluster.node(pod["spec"]["nodeName"])
    out = cluster.exec_in(node.netns, "ss", "-Htn", "state", "established",
                          f"( sport = :{CONTROLLER_PORT} )").stdout
    by_ip = {str(n.underlay_ip): n.name for n in cluster.nodes}
    return {by_ip[f[-1].rpartition(":")[0]] for f in map(str.split, out.splitlines())
            if len(f) >= 4 and f[-1].rpartition(":")[0] in by_ip}


def leader_serves_every_node(cluster: KubeletCluster) -> bool:
    leader = leader_pod(cluster)
    return leader is not None and connected_nodes(cluster, leader) == {
        n.name for n in cluster.nodes}


def vpblunodes_ready(cluster: KubeletCluster) -> dict[str, str]:
    items = json.loads(cluster.kubectl("get", "vpblunodes", "-o", "json").stdout)["items"]
    return {i["metadata"]["name"]: c["status"] for i in items
            for c in (i.get("status") or {}).get("conditions", []) if c["type"] == "Ready"}


def whole(cluster: KubeletCluster) -> bool:
    """Every node's VpbluNode Ready and its device holding every other node's key."""
    return (vpblunodes_ready(cluster) == {n.name: "True" for n in cluster.nodes}
            and cluster.mesh_complete())


def restore(cluster: KubeletCluster) -> None:
    """Both replicas and every daemon rolled out, the leader serving every daemon,
    the mesh whole."""
    deploy = cluster.get("deployment", "vpblu-controller", namespace=SYSTEM_NAMESPACE)
    assert deploy is not None
    if deploy["spec"]["replicas"] != 2:
        cluster.kubectl("scale", "deployment/vpblu-controller", "-n", SYSTEM_NAMESPACE,
                        "--replicas=2")
    cluster.wait_rollout()
    cluster.wait_for(lambda: leader_serves_every_node(cluster), CONVERGE_TIMEOUT,
                     "every daemon connected to the leader")
    cluster.wait_for(lambda: whole(cluster), CONVERGE_TIMEOUT,
                     "every VpbluNode Ready and the mesh complete")


@pytest.fixture
def healthy(cluster: KubeletCluster) -> Iterator[KubeletCluster]:
    restore(cluster)
    yield cluster
    restore(cluster)


# --- FullMesh ----------------------------------------------------------------------------


def test_full_mesh_every_vpblunode_ready_every_peer_with_its_key_every_pod_pair_pings(
        healthy: KubeletCluster) -> None:
    cluster = healthy
    deploy = cluster.get("deployment", "vpblu-controller", namespace=SYSTEM_NAMESPACE)
    ds = cluster.get("daemonset", "vpblu-daemon", namespace=SYSTEM_NAMESPACE)
    assert deploy is not None and ds is not None
    # Both from the image by digest (the overlay's `images`), run by kubelet.
    images = {c["image"] for obj in (deploy, ds)
              for c in obj["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1 and "@sha256:" in images.pop(), images
    assert vpblunodes_ready(cluster) == {n.name: "True" for n in cluster.nodes}
    acceptance.test_full_mesh_peers_have_the_right_keys_and_every_pod_pair_pings(cluster)


# --- the underlay carries only WireGuard ------------------------------------------------


def test_pod_to_pod_by_ip_and_through_a_service_the_underlay_carries_only_wireguard(
        healthy: KubeletCluster) -> None:
    cluster = healthy
    a, b, _ = pods(cluster)
    cluster.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "canary", "namespace": TEST_NAMESPACE},
        "spec": {"selector": {"app": b.name},
                 "ports": [{"port": SERVICE_PORT, "targetPort": HTTP_PORT}]},
    })
    try:
        svc = cluster.get("service", "canary", namespace=TEST_NAMESPACE)
        assert svc is not None
        urls = [f"http://{b.ip}:{HTTP_PORT}/{CANARY}",
                f"http://{svc['spec']['clusterIP']}:{SERVICE_PORT}/{CANARY}"]

        def fetch(url: str, *, check: bool) -> int:
            # (busybox 1.35's wget -T segfaults: its timeout applet bounds it.)
            got = cluster.exec_in_pod(a.name, BUSYBOX, "sh", "-c",
                                      f"timeout 10 wget -q -O - {url} | grep -c {CANARY}",
                                      check=check)
            return int(got.stdout.strip() or 0)

        # The EndpointSlice (kube-controller-manager) has reached node1's kube-proxy.
        cluster.wait_for(lambda: fetch(urls[1], check=False) == CANARY_COPIES,
                         SERVICE_TIMEOUT, f"{a.name} fetching {urls[1]}")
        raw = bytearray()
        with cluster.capture(f"not arp and not host {cluster.controller_ip}",
                             raw=raw) as lines:
            assert [fetch(url, check=True) for url in urls] == [CANARY_COPIES] * 2
            assert all_pairs_ping(cluster) == []
    finally:
        cluster.kubectl("delete", "service", "canary", "-n", TEST_NAMESPACE, "--wait=false")
    # No byte of the payload (nor of the request line naming it) in the clear.
    assert CANARY.encode() not in raw, "the canary crossed the underlay in the clear"
    packets = underlay_packets(lines)
    assert len(packets) == len(lines), [x for x in lines if " IP " not in x][:10]
    node_ips = {str(n.underlay_ip) for n in cluster.nodes}
    wireguard = 0
    for src, dst, summary in packets:
        assert {src.rpartition(".")[0], dst.rpartition(".")[0]} <= node_ips, (src, dst, summary)
        ports = {src.rpartition(".")[2], dst.rpartition(".")[2]}
        if ports == {str(WG_PORT)} and summary.startswith("UDP"):
            wireguard += 1
        else:
            # The only other traffic between nodes: the daemons' TLS stream to
            # the controllers on their nodes' host network.
            assert str(CONTROLLER_PORT) in ports and not summary.startswith("UDP"), (
                src, dst, summary)
    # 2 x 4000 canary lines (~30 B each) in at most 1500-byte packets, and the pings.
    assert wireguard > 2 * CANARY_COPIES * len(CANARY) // 1500 + 24, wireguard
    pod_ips = {str(p.ip) for p in pods(cluster)} | {svc["spec"]["clusterIP"]}
    assert not [x for x in lines if any(ip in x for ip in pod_ips)]


# --- BlockPolicy -------------------------------------------------------------------------


def test_block_policy_stops_a_pair_within_a_second_and_deleting_restores(
        healthy: KubeletCluster, reaper: Reaper) -> None:
    # The acceptance test itself (UDP both ways on the blocked and an unblocked
    # pair; everything sent from 1 s after the apply until the delete is lost,
    # nothing on the other pair); it prints the measured figure.
    acceptance.test_block_policy_stops_a_pair_within_a_second_and_deleting_restores(
        healthy, reaper)


# --- the controllers ---------------------------------------------------------------------


def test_both_controllers_scaled_to_zero_traffic_continues_and_the_mesh_reconverges(
        healthy: KubeletCluster, reaper: Reaper) -> None:
    cluster = healthy
    a, b, _ = pods(cluster)
    with UdpFlow(reaper, a, b, 6003) as flow:
        cluster.kubectl("scale", "deployment/vpblu-controller", "-n", SYSTEM_NAMESPACE,
                        "--replicas=0")
        cluster.wait_for(lambda: not controller_pods(cluster), CONVERGE_TIMEOUT,
                         "no controller pod left")
        time.sleep(CONTROLLERS_DOWN_DWELL)
        assert all_pairs_ping(cluster) == []
        cluster.kubectl("scale", "deployment/vpblu-controller", "-n", SYSTEM_NAMESPACE,
                        "--replicas=2")
        cluster.wait_rollout()
        cluster.wait_for(lambda: leader_serves_every_node(cluster), CONVERGE_TIMEOUT,
                         "every daemon connected to the new leader")
        cluster.wait_for(lambda: whole(cluster), CONVERGE_TIMEOUT, "the mesh whole")
    flow.assert_lossless()


def test_leader_pod_deleted_under_traffic_the_other_replica_leads_and_no_packet_is_lost(
        healthy: KubeletCluster, reaper: Reaper) -> None:
    cluster = healthy
    old = leader_pod(cluster)
    assert old is not None
    old_name = old["metadata"]["name"]
    a, _, c = pods(cluster)
    with UdpFlow(reaper, a, c, 6004) as flow:
        cluster.kubectl("delete", "pod", old_name, "-n", SYSTEM_NAMESPACE, "--wait=false")

        def other_leads() -> bool:
            new = leader_pod(cluster)
            return new is not None and new["metadata"]["name"] != old_name

        cluster.wait_for(other_leads, CONVERGE_TIMEOUT, f"a replica other than {old_name} leading")
        cluster.wait_for(lambda: leader_serves_every_node(cluster), CONVERGE_TIMEOUT,
                         "every daemon on the new leader")
        cluster.wait_rollout()  # the Deployment's replacement for the deleted pod
        cluster.wait_for(lambda: whole(cluster), CONVERGE_TIMEOUT, "the mesh whole")
    flow.assert_lossless()


# --- key rotation ------------------------------------------------------------------------


def test_a_key_rotation_under_traffic_loses_no_packet(healthy: KubeletCluster,
                                                     reaper: Reaper) -> None:
    """One node's rotation, asked for as an operator does (the rotate-now
    annotation), under UDP on every pod pair and a checked TCP stream."""
    cluster = healthy
    node = cluster.nodes[0]
    before = cluster.public_keys()
    with AllTraffic(reaper, cluster) as traffic:
        trigger = f"kubelet-e2e-{time.time_ns()}"
        began = time.monotonic()
        request_rotation(cluster, node, trigger)
        last = wait_for_outcome(cluster, node, trigger)
        took = time.monotonic() - began
        assert last["outcome"] == "Completed", last
        time.sleep(acceptance.RESTORED_DWELL)
    print(f"rotation of {node.name}: {took:.1f} s; losses: {traffic.losses()}")
    traffic.assert_lossless()
    after = cluster.public_keys()
    assert after[node.name] != before[node.name]
    assert_keys_everywhere(cluster, before)


# --- the demo ----------------------------------------------------------------------------


def test_the_demo_tells_its_story_on_kubelet_nodes(healthy: KubeletCluster) -> None:
    """`make demo`'s default (kubelet nodes): what it shows once the cluster is up
    and vpblu installed - the samples' policy applied, the mesh converged, every
    pod pair pinging, a capture of the underlay holding only WireGuard besides
    the daemons' TLS to the controllers, and the live view of pods and tunnels.
    Told on this module's cluster (the demo's own start is KubeletCluster's
    start_kubelet and install, which the fixture runs; its process-level exits,
    --duration and Ctrl-C, are the cluster's context manager's)."""
    lines: list[str] = []
    settings = demo.DemoSettings(nodes=len(healthy.nodes), duration=demo.STATUS_PERIOD / 2)
    demo.tell(demo.KubeletStage.of(healthy), settings, demo.Clock(), lines.append)
    text = "\n".join(lines)
    print(text)
    assert "MESH CONVERGED" in text
    n = len(healthy.nodes)
    pings = [x for x in lines if " -> " in x]
    assert len(pings) == n * (n - 1) and all(x.endswith(": ok") for x in pings), pings
    m = re.search(r"captured (\d+) packets: (\d+) are UDP \d+ between node addresses, 0 are "
                  r"anything else, 0 carry a pod address in the clear", text)
    assert m is not None and m.group(1) == m.group(2) != "0", text
    view = [x for x in lines if "leader: " in x]
    assert view, text
    rows = view[-1].splitlines()
    assert rows[0].count(" up") == 2, rows[0]  # both controller pods Ready
    for node in healthy.nodes:
        row = next(r for r in rows if r.startswith(f"{node.name} "))
        assert row.split()[1] == "up" and "(no peers)" not in row, row


# --- node delete (last: a kubelet pod of the deleted node may be collected) -------------


def test_deleting_a_node_removes_its_peer_everywhere(healthy: KubeletCluster) -> None:
    """`kubectl delete node`: its VpbluNode goes and every other node drops its
    peer. Its kubelet is then restarted (a kubelet registers its Node only at
    start) and `healthy` waits for the mesh whole again. Last in the file: a
    pod of that node outlives the Node only within the pod GC's quarantine."""
    cluster = healthy
    gone = cluster.nodes[2]
    key = cluster.public_keys()[gone.name]
    seen: dict[str, object] = {}

    def peer_removed() -> bool:
        for node in cluster.nodes[:2]:
            device = cluster.wg_device(node)
            seen[node.name] = device and [p.public_key == key for p in device.peers]
        return all(peers == [False] for peers in seen.values())

    cluster.kubectl("delete", "node", gone.name, "--wait=false")
    try:
        try:
            took = cluster.wait_for(peer_removed, CHANGE_TIMEOUT, f"{gone.name}'s peer removed")
        except ClusterError as exc:
            raise AssertionError(f"{gone.name}'s peer still on a node (per node: is each "
                                 f"peer {gone.name}'s key?): {seen}\n{exc}") from None
        print(f"{gone.name}'s peer gone from every other node {took:.1f} s after the delete")
        # Its VpbluNode goes by the controller's NodeOwnershipActor or the garbage
        # collector: not necessarily before every peer has dropped it.
        cluster.wait_for(lambda: cluster.get("vpblunode", gone.name) is None, CHANGE_TIMEOUT,
                         f"{gone.name}'s VpbluNode deleted")
        a, b, _ = pods(cluster)
        assert cluster.ping(a, b.ip, count=1)
        # (a->c is not checked here: c's range stays a pod range after its Node
        # is deleted, so a->c by the lab's static host-gw route goes to a's
        # fail-closed sink, not in the clear - tests/e2e/test_podranges_e2e.py
        # shows that with a capture.)
    finally:
        cluster.restart_kubelet(gone)
