"""A deleted Node's pod range stays a pod range, end to end (vpblu.core.podranges).

`kubectl delete node` stops nothing on the machine: its pods keep their
addresses, and a route may still lead there (a host-gw CNI's, a static one).
Without a TunnelPolicy clusterCIDRs or a controller --cluster-cidr, the pod
ranges every node steers into the mesh and guards used to be the live Nodes'
podCIDRs only, so after the delete such traffic left the node in the clear.

On a LocalCluster of its own (real API server, real controllers under the
kustomize RBAC, real daemons with wireguard-go and eBPF, tcpdump on the
underlay bridge), with the sample FullMesh policy (no clusterCIDRs) and no
--cluster-cidr: node1 gets a host-gw route to node3's podCIDR via node3's
underlay address, node3's Node is deleted while its daemon and pods run on,
and a pod on node1 pings a pod on node3. Each ping is dropped and counted by
node1's fail-closed sink, none crosses the underlay in the clear - and the
same after both controllers are restarted (a new leader reads the remembered
range from the ConfigMap before its first push).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import restore_cluster
from tests.e2e.test_failclosed import assert_dropped_not_leaked, peers_with
from vpblu.core import podranges
from vpblu.lab.localcluster import SYSTEM_NAMESPACE, LocalCluster, Node

pytestmark = pytest.mark.e2e

CHANGE_TIMEOUT = 60.0  # generous: run under SCHED_IDLE next to other work
DAEMON_METRICS_PORT = 9091  # the daemon's default --metrics-listen


@pytest.fixture
def healthy(cluster: LocalCluster) -> Iterator[LocalCluster]:
    restore_cluster(cluster)
    yield cluster
    restore_cluster(cluster)


def remembered(cluster: LocalCluster) -> str:
    config_map = cluster.get("configmap", podranges.CONFIG_MAP, namespace=SYSTEM_NAMESPACE)
    return str(((config_map or {}).get("data") or {}).get(podranges.DATA_KEY, ""))


def applied_term(node: Node) -> int | None:
    """The leader term of the generation node's daemon applied last (None: its
    /metrics does not answer yet)."""
    url = f"http://{node.underlay_ip}:{DAEMON_METRICS_PORT}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("vpblu_applied_generation "):
                    return int(float(line.split()[1])) >> 32
    except (urllib.error.URLError, OSError):
        return None
    return None


def test_a_deleted_nodes_pods_are_unreachable_in_the_clear_also_after_failover(
        healthy: LocalCluster) -> None:
    cluster = healthy
    n1, _n2, n3 = cluster.nodes
    src, dst = n1.pods[0], n3.pods[0]
    assert cluster.ping(src, dst.ip, count=1), "the mesh works before the test"
    cluster.wait_for(lambda: f"{n3.pod_cidr} {n3.name}" in remembered(cluster),
                     CHANGE_TIMEOUT, f"{n3.name}'s podCIDR remembered in the ConfigMap")
    key = cluster.public_keys()[n3.name]
    # A host-gw CNI's route on node1: node3's pods via node3's node address.
    route = [str(n3.pod_cidr), "via", str(n3.underlay_ip), "dev", n1.underlay_interface]
    cluster.exec_in(n1.netns, "ip", "route", "replace", *route)
    try:
        cluster.deregister_node(n3)  # kubectl delete node; its daemon and pods run on
        cluster.wait_for(lambda: not peers_with(cluster, n1, key, n3), CHANGE_TIMEOUT,
                         f"{n1.name} without its tunnel to the deleted {n3.name}")
        assert_dropped_not_leaked(cluster, src, n1, dst.ip)

        # A new leader: both controllers stopped and started again.
        term = applied_term(n1)
        assert term is not None, f"{n1.name}'s daemon serves no vpblu_applied_generation"
        for controller in cluster.controllers:
            cluster.stop_controller(controller.index)
        for controller in cluster.controllers:
            cluster.start_controller(controller.index)
        cluster.wait_for(lambda: (applied_term(n1) or 0) > term, CHANGE_TIMEOUT,
                         f"{n1.name} applied a state of the new leader (term > {term})")
        assert f"{n3.pod_cidr} {n3.name}" in remembered(cluster)
        assert_dropped_not_leaked(cluster, src, n1, dst.ip)
        tunnel = cluster.get("tunnelpolicy", "default") or {}
        conditions = {c["type"]: c for c in (tunnel.get("status") or {}).get("conditions", ())}
        assert "PodRanges" in conditions, tunnel
        assert f"{n3.pod_cidr} (was {n3.name}'s)" in conditions["PodRanges"]["message"]
    finally:
        cluster.exec_in(n1.netns, "ip", "route", "del", *route, check=False)
