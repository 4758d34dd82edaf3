"""The cluster's pod ranges when nobody names them all (vpblu.core.podranges and
the core's DataPath.cluster_cidrs): every Node podCIDR seen stays a pod range
after its Node is deleted; named ranges add to it; the TunnelPolicy's PodRanges
condition says what is covered and from where."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from vpblu.core import podranges
from vpblu.core.desiredstate import MESSAGE_LIMIT, compute, recompute
from vpblu.core.model import (
    ClusterSnapshot,
    Condition,
    DataPathChanged,
    NodeInfo,
    PodRange,
    TunnelPolicy,
    network,
)
from vpblu.core.sources import NodeSource, ObjectMeta, PodRangesSource

KEY = "A" * 43 + "="


def info(i: int, cidr: str | None = None) -> NodeInfo:
    return NodeInfo(f"n{i}", ipaddress.ip_address(f"192.0.2.{i}"),
                    (cidr or f"10.244.{i}.0/24",), public_key=KEY[:-2] + f"{i:01d}=")


def source(i: int, *cidrs: str) -> NodeSource:
    return NodeSource(ObjectMeta(f"n{i}", 1, "1", f"uid-{i}"), None,
                      tuple(network(c) for c in cidrs or (f"10.244.{i}.0/24",)))


def stored(ranges: Sequence[tuple[str, str]], rv: str = "1") -> PodRangesSource:
    return PodRangesSource(ObjectMeta(podranges.CONFIG_MAP, 0, rv, "cm"),
                           tuple(PodRange(network(c), n) for c, n in ranges))


def cluster_of(snapshot: ClusterSnapshot, node: str = "n1") -> list[str]:
    return [str(c) for c in compute(snapshot).states[node].datapath.cluster_cidrs]


def pod_ranges(snapshot: ClusterSnapshot) -> Condition:
    (cond,) = [c for c in compute(snapshot).conditions if c.type == "PodRanges"]
    return cond


MESH = TunnelPolicy("mesh")


# --- the core: what every node's DataPath covers -------------------------------------


def test_a_deleted_nodes_remembered_range_stays_in_every_datapath() -> None:
    remembered = (PodRange("10.244.1.0/24", "n1"), PodRange("10.244.3.0/24", "n3"))
    # n3 is gone; only its remembered range says its pods' addresses are pods'.
    snapshot = ClusterSnapshot(nodes=[info(1)], tunnel_policies=[MESH],
                               remembered_pod_ranges=remembered)
    assert cluster_of(snapshot) == ["10.244.1.0/24", "10.244.3.0/24"]
    without = ClusterSnapshot(nodes=[info(1)], tunnel_policies=[MESH])
    assert cluster_of(without) == ["10.244.1.0/24"]  # what it was before: n3 in the clear


def test_every_source_adds_and_the_union_is_collapsed() -> None:
    snapshot = ClusterSnapshot(
        nodes=[info(1), info(2, "fd00:10:244:2::/64")],
        tunnel_policies=[TunnelPolicy("mesh", cluster_cidrs=("10.250.0.0/24",))],
        cluster_cidrs=("10.244.0.0/17",),
        remembered_pod_ranges=(PodRange("10.244.128.0/17", "old"),
                               PodRange("10.250.1.0/24", "older")))
    assert cluster_of(snapshot) == ["10.244.0.0/16", "10.250.0.0/23", "fd00:10:244:2::/64"]
    # No TunnelPolicy (the mesh off) is fail-closed on the same ranges.
    off = ClusterSnapshot(nodes=[info(1)], cluster_cidrs=("10.244.0.0/16",),
                          remembered_pod_ranges=(PodRange("10.9.0.0/24", "x"),))
    assert cluster_of(off) == ["10.9.0.0/24", "10.244.0.0/16"]


def test_a_node_deleted_changes_no_datapath_when_its_range_is_remembered() -> None:
    remembered = tuple(PodRange(f"10.244.{i}.0/24", f"n{i}") for i in (1, 2, 3))
    before = compute(ClusterSnapshot(nodes=[info(1), info(2), info(3)], tunnel_policies=[MESH],
                                     remembered_pod_ranges=remembered))
    after = recompute(before, ClusterSnapshot(nodes=[info(1), info(2)], tunnel_policies=[MESH],
                                              remembered_pod_ranges=remembered))
    for node in ("n1", "n2"):
        assert not any(isinstance(c, DataPathChanged) for c in after.changes.get(node, ()))
        assert [str(c) for c in after.result.states[node].datapath.cluster_cidrs] == [
            "10.244.1.0/24", "10.244.2.0/23"]
    # Without the memory the same delete shrinks every node's cluster ranges.
    plain = recompute(compute(ClusterSnapshot(nodes=[info(1), info(2), info(3)],
                                              tunnel_policies=[MESH])),
                      ClusterSnapshot(nodes=[info(1), info(2)], tunnel_policies=[MESH]))
    assert DataPathChanged in {type(c) for c in plain.changes["n1"]}


def test_the_pod_ranges_condition_says_what_is_covered_and_from_where() -> None:
    plain = pod_ranges(ClusterSnapshot(nodes=[info(1)], tunnel_policies=[MESH]))
    assert (plain.kind, plain.name, plain.status, plain.reason) == (
        "TunnelPolicy", "mesh", "True", "NodePodCIDRs")
    assert "every Node's podCIDRs" in plain.message and "--cluster-cidr" in plain.message
    named = pod_ranges(ClusterSnapshot(
        nodes=[info(1)], tunnel_policies=[TunnelPolicy("mesh", cluster_cidrs=("10.9.0.0/16",))],
        cluster_cidrs=("10.244.0.0/16",),
        remembered_pod_ranges=(PodRange("10.244.1.0/24", "n1"),
                               PodRange("10.244.3.0/24", "n3"))))
    assert named.reason == "Configured"
    assert named.message == (
        "traffic to these pod ranges goes into the mesh or is dropped, and the cleartext "
        "guard watches for them: spec.clusterCIDRs 10.9.0.0/16; the controller's "
        "--cluster-cidr 10.244.0.0/16; every Node's podCIDRs; the podCIDRs of Nodes that "
        "are gone, remembered in ConfigMap vpblu-system/vpblu-pod-ranges; "
        "10.244.3.0/24 (was n3's)")
    # A thousand gone Nodes: the message stays bounded and counts the rest.
    many = pod_ranges(ClusterSnapshot(
        nodes=[info(1)], tunnel_policies=[MESH],
        remembered_pod_ranges=tuple(PodRange(f"10.{i // 250}.{i % 250}.0/24", f"n{i}")
                                    for i in range(1000))))
    assert len(many.message) <= MESSAGE_LIMIT and many.message.endswith("more remembered ranges")
    # A join does not rewrite it (the live Nodes' ranges are not listed).
    joined = pod_ranges(ClusterSnapshot(nodes=[info(1), info(2)], tunnel_policies=[MESH]))
    assert joined.message == plain.message


# --- the ConfigMap's text ------------------------------------------------------------


def test_lines_parse_format_and_merge() -> None:
    text = podranges.format_lines([PodRange("10.244.2.0/24", "n2"),
                                   PodRange("10.244.1.0/24", "n1")])
    assert text.startswith("#") and text.endswith("10.244.1.0/24 n1\n10.244.2.0/24 n2\n")
    ranges, problems = podranges.parse_lines(
        text + "fd00::/64 v6  # dual-stack\n10.244.1.7/24 bad\n0.0.0.0/0 all\nx y z\n\n")
    assert [(str(r.cidr), r.node) for r in ranges] == [
        ("10.244.1.0/24", "n1"), ("10.244.2.0/24", "n2"), ("fd00::/64", "v6")]
    assert len(problems) == 3 and "line 8" in problems[0] and "host bits" in problems[0]
    assert "default route" in problems[1] and "'<cidr> <node>'" in problems[2]
    # An operator's own lines and comments are kept; only what is missing is added.
    edited = "# mine\n10.244.1.0/24 n1\n"
    assert podranges.merged(edited, [PodRange("10.244.1.0/24", "n1")]) is None
    assert podranges.merged(edited, [PodRange("10.244.9.0/24", "n9")]) == (
        "# mine\n10.244.1.0/24 n1\n10.244.9.0/24 n9\n")
    assert podranges.merged(None, [PodRange("10.244.9.0/24", "n9")]) == (
        podranges.HEADER + "10.244.9.0/24 n9\n")


# --- the StateActor's memory ---------------------------------------------------------


def test_the_memory_only_grows_until_the_config_map_is_edited() -> None:
    memory = podranges.PodRangeMemory()
    memory.follow(None, [source(1), source(2)])
    assert [str(r.cidr) for r in memory.ranges] == ["10.244.1.0/24", "10.244.2.0/24"]
    unsent = memory.unsent()
    assert [r.node for r in unsent] == ["n1", "n2"]
    memory.handed(unsent)
    assert memory.unsent() == ()
    # n2 deleted before its line was written: still a pod range.
    memory.follow(None, [source(1)])
    assert [str(r.cidr) for r in memory.ranges] == ["10.244.1.0/24", "10.244.2.0/24"]
    # The ConfigMap now holds both; a relist of it changes nothing.
    first = stored([("10.244.1.0/24", "n1"), ("10.244.2.0/24", "n2")])
    memory.follow(first, [source(1)])
    ranges = memory.ranges
    memory.follow(first, [source(1)])
    assert memory.ranges is ranges and memory.unsent() == ()
    # An operator releases n2's range: it goes; a live Node's range removed by
    # mistake is pending again at once, and handed to the writer.
    memory.follow(stored([], rv="2"), [source(1)])
    assert [str(r.cidr) for r in memory.ranges] == ["10.244.1.0/24"]
    assert [str(r.cidr) for r in memory.unsent()] == ["10.244.1.0/24"]
