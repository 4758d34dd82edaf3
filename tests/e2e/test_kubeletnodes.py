"""vpblu installed as a user installs it, on real nodes (issue 22, issue 17).

One `KubeletCluster` for the module: the real kube-apiserver with
kube-controller-manager and kube-scheduler, three nodes each running
containerd, kubelet and kube-proxy in its own network and mount namespace
(vpblu/lab/kubeletnodes.py). vpblu arrives by `kubectl apply -k` of an
overlay of kustomize/base that names the image `make image` built, by
digest; the DaemonSet, the Deployment, the certs Job, their probes, mounts,
tokens and Services are run by Kubernetes. Test pods are real pods (a
busybox image built from Debian's package) reached through a real Service.

The tests run in file order (the last removes vpblu); each says what it waited for.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import Helper, Reaper, raise_if_killed, reap, start_udp_probes, stop
from vpblu.lab.kubeletnodes import TEST_NAMESPACE, KubeletCluster, KubeletSettings
from vpblu.lab.localcluster import SYSTEM_NAMESPACE, WG_PORT, Node, underlay_packets

FLOWPROBE = Path(__file__).with_name("flowprobe.py")
BUSYBOX = "/bin/busybox"  # the test pod image's one binary
SERVER_PORT = 8080
CONTROL_PORT = "7443"  # the controller's gRPC (TLS), on the host network
SERVICE_PORT = 80
BLOB_MIB = 4
UDP_PORT = 7300
UDP_RATE = 200.0
FLOW_GRACE = 2.0
FLOW_READY_TIMEOUT = 30.0
FLOW_STOP_TIMEOUT = 15.0
RESTORED_DWELL = 2.0  # traffic after the restart: it flows again
SERVICE_TIMEOUT = 60.0
NODES_READY_TIMEOUT = 60.0
CONTROLLER_GONE_TIMEOUT = 60.0
WIREGUARD_POD_TIMEOUT = 90.0
GC_TIMEOUT = 30.0
MESH_BACK_TIMEOUT = 120.0
# A pod or Service address in the clear on the underlay.
CLEARTEXT = re.compile(r"\b10\.(244|0)\.\d+\.\d+\b")


@pytest.fixture(scope="module")
def cluster() -> Iterator[KubeletCluster]:
    with KubeletCluster.start_kubelet(KubeletSettings(nodes=3)) as c:
        c.install()
        c.apply_tunnel_policy()
        yield c


def _items(cluster: KubeletCluster, kinds: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kinds, "-n", SYSTEM_NAMESPACE, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def test_apply_k_runs_the_daemonset_on_every_node_and_the_deployment(
        cluster: KubeletCluster) -> None:
    by_name = {i["metadata"]["name"]: i["status"] for i in _items(cluster, "ds,deploy")}
    for name in ("vpblu-daemon", "vpblu-wireguard"):
        ds = by_name[name]
        assert ds["desiredNumberScheduled"] == ds["numberReady"] == ds["numberAvailable"] == 3, (
            name, ds)
    deploy = by_name["vpblu-controller"]
    assert deploy["readyReplicas"] == deploy["replicas"] == 2, deploy
    pods = _items(cluster, "pods")
    daemons = {p["spec"]["nodeName"] for p in pods
               if p["metadata"]["labels"].get("app.kubernetes.io/component") == "daemon"}
    assert daemons == {n.name for n in cluster.nodes}
    # The daemon runs without privilege, with the base's capabilities (issue 17).
    security = [c["securityContext"] for p in pods
                if p["metadata"]["labels"].get("app.kubernetes.io/component") == "daemon"
                for c in p["spec"]["containers"]]
    assert all(not s.get("privileged") and s["capabilities"] == {
        "drop": ["ALL"], "add": ["NET_ADMIN", "BPF", "PERFMON"]} for s in security), security
    # The image is the one `make image` built, by digest, run by containerd.
    images = {s["imageID"] for p in pods for s in p["status"].get("containerStatuses", [])}
    assert all("sha256:" in i for i in images), images
    # Ready needs every peer handshaked and is written after the rollouts
    # finish: wait for it (a snapshot right after the rollout saw node1 False).
    want = {n.name: "True" for n in cluster.nodes}
    deadline = time.monotonic() + NODES_READY_TIMEOUT
    while True:
        nodes = json.loads(cluster.kubectl("get", "vpblunodes", "-o", "json").stdout)["items"]
        ready = {n["metadata"]["name"]: c["status"] for n in nodes
                 for c in n.get("status", {}).get("conditions", []) if c["type"] == "Ready"}
        if ready == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ready == want, (f"every VpbluNode Ready within {NODES_READY_TIMEOUT:.0f} s "
                           f"of the rollouts: {ready}")


def test_a_real_pod_calls_a_real_service_whose_backend_is_on_another_node_encrypted(
        cluster: KubeletCluster) -> None:
    node1, node2, _ = cluster.nodes
    cluster.run_pod("web", node2, [
        "sh", "-c", f"mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/blob bs=1048576 "
        f"count={BLOB_MIB} && exec httpd -f -p {SERVER_PORT} -h /tmp/www"],
        labels={"app": "web"})
    cluster.run_pod("client", node1, ["sleep", "3600"])
    cluster.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": TEST_NAMESPACE},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"port": SERVICE_PORT, "targetPort": SERVER_PORT}]},
    })
    try:
        svc = cluster.get("service", "web", namespace=TEST_NAMESPACE)
        assert svc is not None
        url = f"http://{svc['spec']['clusterIP']}:{SERVICE_PORT}/blob"

        def answers() -> bool:
            # The EndpointSlice (kube-controller-manager) reaches node1's kube-proxy.
            # (busybox 1.35's wget -q -T N segfaults: its timeout applet bounds it.)
            return cluster.exec_in_pod("client", BUSYBOX, "timeout", "5", "wget", "-q", "-O",
                                       "/dev/null", url, check=False).returncode == 0

        cluster.wait_for(answers, SERVICE_TIMEOUT, f"the client pod fetching {url}")
        with cluster.capture(f"not arp and not host {cluster.controller_ip}") as lines:
            got = cluster.exec_in_pod("client", BUSYBOX, "sh", "-c",
                                      f"wget -q -O - {url} | wc -c")
        assert int(got.stdout.strip()) == BLOB_MIB * 1048576
        ends = {str(node1.underlay_ip), str(node2.underlay_ip)}
        in_clear = [line for line in lines if CLEARTEXT.search(line)]
        assert not in_clear, "\n".join(in_clear[:10])
        wireguard, other = 0, []
        for line in lines:
            parsed = underlay_packets([line])
            src, dst = (parsed[0][0], parsed[0][1]) if parsed else ("", "")
            if ({src.rpartition(".")[0], dst.rpartition(".")[0]} == ends
                    and src.endswith(f".{WG_PORT}") and dst.endswith(f".{WG_PORT}")):
                wireguard += 1
            elif CONTROL_PORT in (src.rpartition(".")[2], dst.rpartition(".")[2]):
                # The daemons' TLS stream to the controller (host network).
                continue
            elif {src.rpartition(".")[0], dst.rpartition(".")[0]} <= ends:
                other.append(line)
        assert not other, "\n".join(other[:10])
        # 4 MiB in packets of at most 1500 bytes.
        assert wireguard > BLOB_MIB * 1048576 // 1500, lines[-10:]
    finally:
        cluster.kubectl("delete", "service", "web", "-n", TEST_NAMESPACE, "--wait=false")


def _probe(cluster: KubeletCluster, reaper: Reaper, me: str, peer_ip: str, bind_ip: str,
           ) -> Helper:
    return reaper.start(f"udp probe {me}", [
        "nsenter", f"--net={cluster.pod_netns(me)}", "--", sys.executable, str(FLOWPROBE),
        "udp", "--bind", bind_ip, "--peer", peer_ip, "--port", str(UDP_PORT),
        "--rate", str(UDP_RATE), "--grace", str(FLOW_GRACE), "--control-stdin"])


def test_rollout_restart_replaces_every_daemon_and_loses_no_datagram(
        cluster: KubeletCluster, reaper: Reaper) -> None:
    """Sequence-numbered UDP both ways between pods on node1 and node2 while
    `kubectl rollout restart ds/vpblu-daemon` replaces every daemon pod: every
    pod is replaced and not one datagram is lost.

    wireguard-go (no kernel WireGuard on this machine) runs in the
    vpblu-wireguard DaemonSet's pod, not the daemon's: every node's wg-mesh
    is the same link (same ifindex) before and after, its wireguard-go pod the
    same and never restarted, and each new daemon adopts it (before this
    layout, 913-2945 datagrams were lost across the same restart)."""
    ips = {}
    for name in ("web", "client"):
        pod = cluster.get("pod", name, namespace=TEST_NAMESPACE)
        assert pod is not None, f"pod {name} (made by the Service test)"
        ips[name] = pod["status"]["podIP"]
    links = {n.name: _mesh_ifindex(cluster, n) for n in cluster.nodes}
    wireguard = _wireguard_pods(cluster)
    probes = [_probe(cluster, reaper, "client", ips["web"], ips["client"]),
              _probe(cluster, reaper, "web", ips["client"], ips["web"])]
    try:
        start_udp_probes(probes, FLOW_READY_TIMEOUT, "UDP client<->web")
        before = {p["metadata"]["name"] for p in _items(cluster, "pods")
                  if p["metadata"]["name"].startswith("vpblu-daemon-")}
        restarted_at = time.time()
        cluster.kubectl("rollout", "restart", "daemonset/vpblu-daemon", "-n", SYSTEM_NAMESPACE)
        cluster.wait_rollout()
        rolled_at = time.time()
        after = {p["metadata"]["name"] for p in _items(cluster, "pods")
                 if p["metadata"]["name"].startswith("vpblu-daemon-")}
        cluster.wait_for(cluster.mesh_complete, 60.0, "the mesh complete after the restart")
        time.sleep(RESTORED_DWELL)
    except BaseException as exc:
        stop(probes, FLOW_STOP_TIMEOUT, failing=exc)
        raise
    killed = reap(probes, FLOW_STOP_TIMEOUT)
    raise_if_killed(killed, FLOW_STOP_TIMEOUT, None)
    assert len(after) == 3 and not before & after, (before, after)
    results = {p.name: p.last_json() for p in probes}
    if any(r["missing_count"] for r in results.values()):
        for node in cluster.nodes:
            said = cluster.pod_logs(cluster.daemon_pod(node)).splitlines()
            print(f"{node.name}'s daemon, warnings:", *[line for line in said
                                                       if "WARN" in line or "ERROR" in line][:15],
                  sep="\n  ")
    for name, r in results.items():
        print(f"{name}: the rollout from datagram "
              f"{int((restarted_at - r['first_send_wall']) * r['rate'])} to "
              f"{int((rolled_at - r['first_send_wall']) * r['rate'])}")
        print(f"{name}: {r['missing_count']} of {r['sent']} lost across the restart "
              f"(first lost, as ranges: {_ranges(r['missing'])[:40]})")
    assert {n: (r["missing_count"], r["missing"][:20]) for n, r in results.items()} == {
        n: (0, []) for n in results}, results
    assert all(r["sent"] > UDP_RATE for r in results.values()), results
    # The interface outlived every daemon: the same link, the same wireguard-go.
    assert {n.name: _mesh_ifindex(cluster, n) for n in cluster.nodes} == links
    assert _wireguard_pods(cluster) == wireguard


def _ranges(seqs: list[int]) -> list[str]:
    """Sequence numbers as runs ("a-b"), to tell one outage from scattered loss."""
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return [f"{a}-{b}" if a != b else str(a) for a, b in runs]


def _mesh_ifindex(cluster: KubeletCluster, node: Node) -> str:
    out = cluster.exec_in(node.netns, "ip", "-o", "link", "show", "dev", "wg-mesh").stdout
    return out.split(":", 1)[0]


def _wireguard_pods(cluster: KubeletCluster) -> dict[str, tuple[str, int]]:
    """Node -> (uid, restarts) of its vpblu-wireguard pod."""
    return {p["spec"]["nodeName"]: (
        p["metadata"]["uid"], sum(c["restartCount"] for c in p["status"]["containerStatuses"]))
            for p in _items(cluster, "pods")
            if p["metadata"]["labels"].get("app.kubernetes.io/component") == "wireguard"}


def test_a_replaced_wireguard_pod_s_new_link_is_configured_again(
        cluster: KubeletCluster) -> None:
    """Deleting a node's vpblu-wireguard pod (what OnDelete asks of an operator
    who upgrades it) ends its wireguard-go and wg-mesh; the new pod's link has no
    key, and the daemon that is still running configures it again (at its next
    telemetry read): the mesh is complete again. An outage of that node, by
    design (docs/install.md); the time it took is printed."""
    node = cluster.nodes[2]
    old_link = _mesh_ifindex(cluster, node)
    old_pod = _wireguard_pods(cluster)[node.name]
    daemon = cluster.daemon_pod(node)
    cluster.kubectl("delete", "pod", "-n", SYSTEM_NAMESPACE, "-l",
                    "app.kubernetes.io/component=wireguard", "--field-selector",
                    f"spec.nodeName={node.name}", "--wait=true")
    began = time.monotonic()
    cluster.wait_for(lambda: cluster.daemonset_ready("vpblu-wireguard"), WIREGUARD_POD_TIMEOUT,
                     "vpblu-wireguard Ready again on every node")
    cluster.wait_for(cluster.mesh_complete, WIREGUARD_POD_TIMEOUT,
                     f"the mesh complete with {node.name}'s new wg-mesh")
    print(f"{node.name}: new wg-mesh configured {time.monotonic() - began:.1f} s after its "
          f"wireguard-go pod was deleted")
    assert _mesh_ifindex(cluster, node) != old_link
    assert _wireguard_pods(cluster)[node.name] != old_pod
    assert cluster.daemon_pod(node) == daemon  # the daemon did it, not a new one


def test_a_deleted_node_s_vpblunode_is_deleted_by_the_garbage_collector(
        cluster: KubeletCluster) -> None:
    """The VpbluNode is owned by its Node (ownerReference by uid): with no
    controller running (scaled to 0, so none deletes it itself), deleting the
    Node makes kube-controller-manager's garbage collector delete the VpbluNode.
    The kubelet then registers its Node again (a new uid) and, with the
    controller back, the node's VpbluNode comes back owned by the new Node."""
    node = cluster.nodes[2]
    vn = cluster.get("vpblunode", node.name)
    owner = cluster.get("node", node.name)
    assert vn is not None and owner is not None
    assert [(o["kind"], o["name"], o["uid"]) for o in vn["metadata"]["ownerReferences"]] == [
        ("Node", node.name, owner["metadata"]["uid"])], vn["metadata"]
    cluster.kubectl("scale", "deployment/vpblu-controller", "-n", SYSTEM_NAMESPACE,
                    "--replicas=0")
    try:
        cluster.wait_for(lambda: not [
            p for p in _items(cluster, "pods")
            if p["metadata"]["labels"].get("app.kubernetes.io/component") == "controller"],
            CONTROLLER_GONE_TIMEOUT, "every controller pod gone")
        cluster.kubectl("delete", "node", node.name, "--wait=true")
        took = cluster.wait_for(lambda: cluster.get("vpblunode", node.name) is None,
                                GC_TIMEOUT, f"VpbluNode {node.name} deleted by the GC")
        print(f"VpbluNode {node.name} gone {took:.1f} s after its Node, no controller running")
        assert {v["metadata"]["name"] for v in json.loads(cluster.kubectl(
            "get", "vpblunodes", "-o", "json").stdout)["items"]} == {
            n.name for n in cluster.nodes[:2]}
    finally:
        # Within the pod GC's 40 s quarantine: the node's pods are kept.
        cluster.restart_kubelet(node)
        cluster.kubectl("scale", "deployment/vpblu-controller", "-n", SYSTEM_NAMESPACE,
                        "--replicas=2")
    cluster.wait_rollout()
    cluster.wait_for(cluster.mesh_complete, MESH_BACK_TIMEOUT, "the mesh complete again")
    vn = cluster.get("vpblunode", node.name)
    owner = cluster.get("node", node.name)
    assert vn is not None and owner is not None
    assert [o["uid"] for o in vn["metadata"]["ownerReferences"]] == [owner["metadata"]["uid"]]


def test_delete_k_and_the_cleanup_leave_no_vpblu_state_on_any_node(
        cluster: KubeletCluster) -> None:
    before = {n.name: cluster.vpblu_state(n) for n in cluster.nodes}
    assert all(s["pins"] and s["rules"] for s in before.values()), before
    cluster.uninstall()
    after = {n.name: cluster.vpblu_state(n) for n in cluster.nodes}
    assert after == {n.name: dict.fromkeys(before[n.name], "") for n in cluster.nodes}, after
    left = cluster.kubectl("get", "all", "-n", SYSTEM_NAMESPACE, "--ignore-not-found",
                           check=False).stdout
    assert not left.strip(), left
