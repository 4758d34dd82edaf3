"""Fail-closed, end to end (issue 16): traffic between pods of two nodes that
have no tunnel is dropped and counted on the sender's node, never sent in the
clear, and flows again once the tunnel exists.

On the shared LocalCluster (real API server, real controller, real daemons
with wireguard-go, a tcpdump on the underlay), three ways a pair can be
without a tunnel: a node whose key is not published (yet), an isolated node,
and a pair left out of an Explicit TunnelPolicy.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conftest import restore_cluster
from vpblu.lab.localcluster import LocalCluster, Node, Pod
from vpblu.node.config import MESH_TABLE
from vpblu.node.netlink import SINK_SUFFIX

pytestmark = pytest.mark.e2e

CHANGE_TIMEOUT = 30.0
PINGS = 5


@pytest.fixture
def healthy(cluster: LocalCluster) -> Iterator[LocalCluster]:
    restore_cluster(cluster)
    yield cluster
    restore_cluster(cluster)


def fail_closed_drops(cluster: LocalCluster, node: Node) -> int:
    """tx_dropped of the node's fail-closed sink (`ip -s link`: the node's /sys
    is the host's, nsenter --net does not remount it)."""
    out = cluster.exec_in(node.netns, "ip", "-j", "-s", "link", "show", "dev",
                          f"{node.interface}{SINK_SUFFIX}")
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["dropped"])


def pod_addresses(cluster: LocalCluster) -> set[str]:
    return {str(p.ip) for n in cluster.nodes for p in n.pods}


def peers_with(cluster: LocalCluster, node: Node, key: str, other: Node) -> bool:
    """`node` still has a tunnel to `other`: the peer in WireGuard, or the route
    of `other`'s pod CIDR into the mesh interface (the peer goes first)."""
    device = cluster.wg_device(node)
    if device is not None and device.peer(key) is not None:
        return True
    routes = cluster.exec_in(node.netns, "ip", "route", "show", "table", str(MESH_TABLE),
                             "exact", str(other.pod_cidr)).stdout
    return f"dev {node.interface} " in routes


def assert_dropped_not_leaked(cluster: LocalCluster, src: Pod, src_node: Node,
                              dst: ipaddress.IPv4Address) -> None:
    before = fail_closed_drops(cluster, src_node)
    with cluster.capture(f"not arp and not host {cluster.controller_ip}") as lines:
        assert not cluster.ping(src, dst, count=PINGS), f"{src.name} reached {dst} untunnelled"
    leaked = [line for line in lines if any(ip in line for ip in pod_addresses(cluster))]
    assert leaked == [], leaked
    dropped = fail_closed_drops(cluster, src_node) - before
    assert dropped >= PINGS, f"{src_node.name}'s sink counted {dropped} of {PINGS} pings"


def assert_flows(cluster: LocalCluster, src: Pod, dst: ipaddress.IPv4Address,
                 what: str) -> None:
    cluster.wait_for(lambda: cluster.ping(src, dst, count=1), CHANGE_TIMEOUT, what)


def check(cluster: LocalCluster, cut: Callable[[], None], heal: Callable[[], None],
          what: str, *, both_ways: bool = True) -> None:
    """node1 and node3 lose their tunnel by `cut`: pings between their pods are
    dropped and counted on the sending node (both ways, when node3's daemon
    runs to apply the change), none leaves in the clear; after `heal` they flow."""
    n1, _n2, n3 = cluster.nodes
    src, dst = n1.pods[0], n3.pods[0]
    assert cluster.ping(src, dst.ip, count=1), "the mesh works before the test"
    # The keys as they were: a cut may unpublish one, and the tunnel goes only
    # once the other side's WireGuard has dropped that very key.
    keys = cluster.public_keys()
    cut()
    try:
        ends = [(n1, n3), (n3, n1)] if both_ways else [(n1, n3)]
        cluster.wait_for(lambda: not any(peers_with(cluster, a, keys[b.name], b) for a, b in ends),
                         CHANGE_TIMEOUT, f"{n1.name} and {n3.name} without a tunnel")
        assert_dropped_not_leaked(cluster, src, n1, dst.ip)
        if both_ways:
            assert_dropped_not_leaked(cluster, dst, n3, src.ip)
    finally:
        heal()
    assert_flows(cluster, src, dst.ip, f"{what}: {src.name} -> {dst.name} once the tunnel is back")


def test_an_isolated_node_is_unreachable_and_nothing_leaves_in_the_clear(
        healthy: LocalCluster) -> None:
    cluster = healthy
    policy = {"apiVersion": "vpblu.io/v1alpha1", "kind": "BlockPolicy",
              "metadata": {"name": "isolate-n3"},
              "spec": {"isolate": [cluster.nodes[2].name]}}
    check(cluster, lambda: cluster.apply(policy),
          lambda: cluster.delete("blockpolicy", "isolate-n3"), "isolation lifted")


def test_a_pair_left_out_of_an_explicit_policy_is_dropped_not_sent_in_the_clear(
        healthy: LocalCluster) -> None:
    cluster = healthy
    n1, n2, n3 = (n.name for n in cluster.nodes)
    # Sorts before the sample's "default": the one in force.
    policy = {"apiVersion": "vpblu.io/v1alpha1", "kind": "TunnelPolicy",
              "metadata": {"name": "a-explicit"},
              "spec": {"mode": "Explicit",
                       "peerings": [{"nodes": [n1, n2]}, {"nodes": [n2, n3]}]}}
    check(cluster, lambda: cluster.apply(policy),
          lambda: cluster.delete("tunnelpolicy", "a-explicit"), "the Explicit policy gone")


def test_a_node_without_a_published_key_is_dropped_until_its_daemon_publishes_one(
        healthy: LocalCluster) -> None:
    cluster = healthy
    n3 = cluster.nodes[2]

    def unpublish() -> None:
        # A machine that joins (again) before its daemon first connects: its
        # Node and VpbluNode exist, its pod CIDR is a cluster range, no key.
        # The controllers are restarted in between: a running one keeps the
        # key a daemon once reported and would publish it on the new object.
        cluster.stop_daemon(n3)
        for controller in cluster.controllers:
            cluster.stop_controller(controller.index)
        cluster.deregister_node(n3)
        cluster.register_node(n3)
        for controller in cluster.controllers:
            cluster.start_controller(controller.index)
        cluster.wait_for(lambda: cluster.leader() is not None, CHANGE_TIMEOUT, "a leader")
        cluster.wait_for(lambda: n3.name not in cluster.public_keys(), CHANGE_TIMEOUT,
                         f"{n3.name} registered again without a key")

    # Only node1's side: node3's daemon is down and its kernel keeps what it had.
    check(cluster, unpublish, lambda: cluster.start_daemon(n3), "the daemon back",
          both_ways=False)
