"""Table tests for the pure core: each row is a rule, read as a spec.

Cases compare whole structures (every state, every condition), the way
Kilo's topology_test does, so a rule cannot pass by accident elsewhere.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import yaml

from vpblu.core.changes import apply, diff
from vpblu.core.desiredstate import (
    BLOCK_CAPACITY,
    MESSAGE_LIMIT,
    _capped,
    compute,
    diff_all,
    recompute,
)
from vpblu.core.model import (
    NO_DATAPATH,
    BlockAdded,
    BlockPolicy,
    BlockRemoved,
    CidrPair,
    ClusterSnapshot,
    Condition,
    DataPath,
    DataPathChanged,
    Endpoint,
    ListenPortChanged,
    NodeDesiredState,
    NodeInfo,
    Peer,
    PeerAdded,
    PeerChanged,
    PeerRemoved,
    Route,
    RouteAdded,
    RouteOverride,
    RoutePolicy,
    RouteRemoved,
    TunnelMode,
    TunnelPolicy,
)


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


A = NodeInfo("a", "192.168.0.1", ("10.0.1.0/24",), key(1))
B = NodeInfo("b", "192.168.0.2", ("10.0.2.0/24",), key(2))
C = NodeInfo("c", "192.168.0.3", ("10.0.3.0/24",), key(3))
MESH = TunnelPolicy("mesh")
# The pod ranges of A, B, C collapsed (10.0.2.0/24 and 10.0.3.0/24 merge).
AB = ("10.0.1.0/24", "10.0.2.0/24")
AC = ("10.0.1.0/24", "10.0.3.0/24")
ABC = ("10.0.1.0/24", "10.0.2.0/23")


def dp(node: NodeInfo, cluster: Sequence[str], *, fail_open: bool = False) -> DataPath:
    return DataPath(node.pod_cidrs, cluster, fail_open)


def peer(
    node: NodeInfo,
    allowed: Sequence[str] | None = None,
    *,
    port: int = 51820,
    keepalive: int = 25,
    endpoint: Endpoint | None = None,
) -> Peer:
    if endpoint is None and node.internal_ip is not None:
        endpoint = Endpoint(node.internal_ip, port)
    assert node.public_key is not None
    return Peer(
        name=node.name,
        public_key=node.public_key,
        endpoint=endpoint,
        allowed_ips=node.pod_cidrs if allowed is None else allowed,
        persistent_keepalive=keepalive,
    )


def state(
    name: str,
    *peers: Peer,
    port: int = 51820,
    blocks: Sequence[CidrPair] = (),
    routes: Sequence[Route] | None = None,
    datapath: DataPath = NO_DATAPATH,
) -> NodeDesiredState:
    """Routes default to the rule itself: each allowed IP of each peer, via it."""
    if routes is None:
        routes = [Route(cidr, p.name) for p in peers for cidr in p.allowed_ips]
    return NodeDesiredState(name, port, peers, routes, blocks, datapath)


def ok(kind: str, name: str) -> Condition:
    return Condition(kind, name, "Accepted", "True", "Accepted", "in force")


def refused(kind: str, name: str, reason: str, message: str) -> Condition:
    return Condition(kind, name, "Accepted", "False", reason, message)


def nodes_ok(*names: str) -> list[Condition]:
    return [ok("VpbluNode", n) for n in names]


@attrs.frozen
class Case:
    name: str
    snapshot: ClusterSnapshot
    states: Sequence[NodeDesiredState]
    conditions: Sequence[Condition]


CASES = [
    Case(
        "no TunnelPolicy: the mesh is off, blocks still apply, every node says why",
        ClusterSnapshot(
            nodes=[A, B],
            block_policies=[
                BlockPolicy("deny", cidr_pairs=[CidrPair("10.0.1.0/24", "10.0.2.0/24")])
            ],
        ),
        [
            state("a", blocks=[CidrPair("10.0.1.0/24", "10.0.2.0/24")]),
            state("b", blocks=[CidrPair("10.0.1.0/24", "10.0.2.0/24")]),
        ],
        [
            ok("BlockPolicy", "deny"),
            refused(
                "VpbluNode", "a", "NoTunnelPolicy", "no TunnelPolicy exists, so the mesh is off"
            ),
            refused(
                "VpbluNode", "b", "NoTunnelPolicy", "no TunnelPolicy exists, so the mesh is off"
            ),
        ],
    ),
    Case(
        "FullMesh: every pair, each pod CIDR routed via its node (routes spelled out)",
        ClusterSnapshot(nodes=[C, A, B], tunnel_policies=[MESH]),
        [
            state(
                "a",
                peer(B),
                peer(C),
                routes=[Route("10.0.2.0/24", "b"), Route("10.0.3.0/24", "c")],
            ),
            state(
                "b",
                peer(A),
                peer(C),
                routes=[Route("10.0.1.0/24", "a"), Route("10.0.3.0/24", "c")],
            ),
            state(
                "c",
                peer(A),
                peer(B),
                routes=[Route("10.0.1.0/24", "a"), Route("10.0.2.0/24", "b")],
            ),
        ],
        [ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "TunnelPolicy's listen port is every node's port and its endpoints' port; keepalive too",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[TunnelPolicy("mesh", listen_port=51000, persistent_keepalive=0)],
        ),
        [
            state("a", peer(B, port=51000, keepalive=0), port=51000),
            state("b", peer(A, port=51000, keepalive=0), port=51000),
        ],
        [ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b")],
    ),
    Case(
        "VpbluNode spec.endpoint overrides InternalIP:listenPort",
        ClusterSnapshot(
            nodes=[A, attrs.evolve(B, endpoint_override=Endpoint("203.0.113.7", 4500))],
            tunnel_policies=[MESH],
        ),
        [
            state("a", peer(B, endpoint=Endpoint("203.0.113.7", 4500))),
            state("b", peer(A)),
        ],
        [ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b")],
    ),
    Case(
        "dual stack: IPv4 and IPv6 pod CIDRs are both allowed and routed",
        ClusterSnapshot(
            nodes=[
                attrs.evolve(A, pod_cidrs=("fd00:1::/64", "10.0.1.0/24")),
                attrs.evolve(B, internal_ip="fd00:ffff::2"),
            ],
            tunnel_policies=[MESH],
        ),
        [
            state("a", peer(attrs.evolve(B, internal_ip="fd00:ffff::2"))),
            state("b", peer(A, ["10.0.1.0/24", "fd00:1::/64"])),
        ],
        [ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b")],
    ),
    Case(
        "Explicit: only the listed pairs peer",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[TunnelPolicy("mesh", mode=TunnelMode.EXPLICIT, peerings=[["a", "b"]])],
        ),
        [state("a", peer(B)), state("b", peer(A)), state("c")],
        [ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "Explicit: a peering naming a missing node is ignored and reported, the rest hold",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[
                TunnelPolicy("mesh", mode=TunnelMode.EXPLICIT, peerings=[["a", "zed"], ["b", "c"]])
            ],
        ),
        [state("a"), state("b", peer(C)), state("c", peer(B))],
        [
            refused("TunnelPolicy", "mesh", "UnknownNode", "peering a-zed ignored: no node zed"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "several TunnelPolicies: the first by name is in force, the others are superseded",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[
                TunnelPolicy("beta"),
                TunnelPolicy("alpha", mode=TunnelMode.EXPLICIT, peerings=[["a", "c"]]),
            ],
        ),
        [state("a", peer(C)), state("b"), state("c", peer(A))],
        [
            ok("TunnelPolicy", "alpha"),
            refused(
                "TunnelPolicy",
                "beta",
                "Superseded",
                "TunnelPolicy 'alpha' is in force; only one TunnelPolicy applies",
            ),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "RoutePolicy moves a whole pod CIDR: it leaves the owner, joins via, the owner routes it"
        " via too, via does not route it to itself",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("move", routes=[RouteOverride("10.0.1.0/24", "b")])],
        ),
        [
            state("a", peer(B, ["10.0.1.0/24", "10.0.2.0/24"]), peer(C)),
            state("b", peer(A, []), peer(C)),
            state("c", peer(A, []), peer(B, ["10.0.1.0/24", "10.0.2.0/24"])),
        ],
        [ok("RoutePolicy", "move"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "RoutePolicy moves part of a pod CIDR: the owner keeps the rest, split into CIDRs",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("part", routes=[RouteOverride("10.0.1.0/26", "b")])],
        ),
        [
            state("a", peer(B, ["10.0.1.0/26", "10.0.2.0/24"])),
            state("b", peer(A, ["10.0.1.64/26", "10.0.1.128/25"])),
        ],
        [ok("RoutePolicy", "part"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b")],
    ),
    Case(
        "RoutePolicy for a CIDR no node owns: via gains it",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("lan", routes=[RouteOverride("192.168.100.0/24", "b")])],
        ),
        [state("a", peer(B, ["10.0.2.0/24", "192.168.100.0/24"])), state("b", peer(A))],
        [ok("RoutePolicy", "lan"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b")],
    ),
    Case(
        "two RoutePolicies claim one CIDR: the first by name wins, the other is refused",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy("second", routes=[RouteOverride("10.0.1.0/24", "c")]),
                RoutePolicy("first", routes=[RouteOverride("10.0.1.0/24", "b")]),
            ],
        ),
        [
            state("a", peer(B, ["10.0.1.0/24", "10.0.2.0/24"]), peer(C)),
            state("b", peer(A, []), peer(C)),
            state("c", peer(A, []), peer(B, ["10.0.1.0/24", "10.0.2.0/24"])),
        ],
        [
            ok("RoutePolicy", "first"),
            refused(
                "RoutePolicy",
                "second",
                "ConflictingRoute",
                "route 10.0.1.0/24 via c ignored: RoutePolicy 'first' already routes it via b",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "overlapping routes via different nodes would give one node two peers with overlapping"
        " allowed IPs: the later is refused",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy(
                    "wide",
                    routes=[
                        RouteOverride("172.20.0.0/16", "b"),
                        RouteOverride("172.20.5.0/24", "c"),
                    ],
                )
            ],
        ),
        [
            state("a", peer(B, ["10.0.2.0/24", "172.20.0.0/16"]), peer(C)),
            state("b", peer(A), peer(C)),
            state("c", peer(A), peer(B, ["10.0.2.0/24", "172.20.0.0/16"])),
        ],
        [
            refused(
                "RoutePolicy",
                "wide",
                "OverlappingRoute",
                "route 172.20.5.0/24 via c ignored: it overlaps 172.20.0.0/16 which"
                " RoutePolicy 'wide' routes via b",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "the same CIDR via the same node in two RoutePolicies is agreement, not conflict",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy("one", routes=[RouteOverride("172.20.0.0/16", "b")]),
                RoutePolicy("two", routes=[RouteOverride("172.20.0.0/16", "b")]),
            ],
        ),
        [state("a", peer(B, ["10.0.2.0/24", "172.20.0.0/16"])), state("b", peer(A))],
        [
            ok("RoutePolicy", "one"),
            ok("RoutePolicy", "two"),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
        ],
    ),
    Case(
        "routes via a missing, an isolated or a drained node are refused; the owner keeps its CIDR",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy(
                    "bad",
                    routes=[
                        RouteOverride("10.0.1.0/24", "zed"),
                        RouteOverride("10.0.1.0/25", "c"),
                        RouteOverride("10.0.1.128/25", "b"),
                    ],
                )
            ],
            block_policies=[BlockPolicy("ops", isolate=["c"], drain=["b"])],
        ),
        [state("a", peer(B)), state("b", peer(A)), state("c")],
        [
            ok("BlockPolicy", "ops"),
            refused(
                "RoutePolicy",
                "bad",
                "UnknownNode",
                "route 10.0.1.0/24 via zed ignored: no node zed; "
                "route 10.0.1.0/25 via c ignored: c is isolated; "
                "route 10.0.1.128/25 via b ignored: b is drained",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "a route via a node without a key stays in force: the CIDR waits for that node",
        ClusterSnapshot(
            nodes=[A, B, attrs.evolve(C, public_key=None)],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("wait", routes=[RouteOverride("10.0.1.0/24", "c")])],
        ),
        [state("a", peer(B)), state("b", peer(A, [])), state("c")],
        [
            ok("RoutePolicy", "wait"),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
            refused(
                "VpbluNode",
                "c",
                "NoPublicKey",
                "no public key yet: no node peers with it until its daemon reports one",
            ),
        ],
    ),
    Case(
        "a default route is refused: it is every address (and the mesh table's own default)",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("all", routes=[RouteOverride("0.0.0.0/0", "b")])],
        ),
        [state("a", peer(B)), state("b", peer(A))],
        [
            refused(
                "RoutePolicy",
                "all",
                "DefaultRoute",
                "route 0.0.0.0/0 via b ignored: it is every address, a default route,"
                " not a pod range",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
        ],
    ),
    Case(
        "two /1 routes, 0.0.0.0/0 in two parts: one swallows the pod CIDRs, the other the"
        " node network; both are refused and every node keeps its own CIDR",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy(
                    "halves",
                    routes=[RouteOverride("0.0.0.0/1", "b"), RouteOverride("128.0.0.0/1", "b")],
                )
            ],
        ),
        [state("a", peer(B), peer(C)), state("b", peer(A), peer(C)),
         state("c", peer(A), peer(B))],
        [
            refused(
                "RoutePolicy",
                "halves",
                "CoversPodCIDR",
                "route 0.0.0.0/1 via b ignored: it contains 10.0.1.0/24, the whole pod CIDR of"
                " node a; a route may move a pod CIDR or a part of one, not a range of several;"
                " route 128.0.0.0/1 via b ignored: it covers 192.168.0.1, the InternalIP of"
                " node a; the node network must stay outside the mesh, whose tunnels run over"
                " it",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "two /1 routes where no node address or other pod CIDR is (IPv6 in an IPv4 cluster):"
        " the second would route every address, and is refused",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy("first", routes=[RouteOverride("::/1", "b")]),
                RoutePolicy("second", routes=[RouteOverride("8000::/1", "b")]),
            ],
        ),
        [state("a", peer(B, ["10.0.2.0/24", "::/1"])), state("b", peer(A))],
        [
            ok("RoutePolicy", "first"),
            refused(
                "RoutePolicy",
                "second",
                "CoversEverything",
                "route 8000::/1 via b ignored: with the routes accepted before it, the mesh"
                " would route every IPv6 address",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
        ],
    ),
    Case(
        "a route strictly containing another node's pod CIDR is refused; one containing only"
        " via's own pod CIDR moves that range whole",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            route_policies=[
                RoutePolicy(
                    "wide",
                    routes=[
                        RouteOverride("10.0.0.0/16", "b"),
                        RouteOverride("10.0.2.0/23", "b"),
                    ],
                )
            ],
        ),
        [state("a", peer(B, ["10.0.2.0/23"])), state("b", peer(A))],
        [
            refused(
                "RoutePolicy",
                "wide",
                "CoversPodCIDR",
                "route 10.0.0.0/16 via b ignored: it contains 10.0.1.0/24, the whole pod CIDR"
                " of node a; a route may move a pod CIDR or a part of one, not a range of"
                " several",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
        ],
    ),
    Case(
        "a route over a node's InternalIP is refused: the tunnels run over the node network",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            route_policies=[RoutePolicy("nodes", routes=[RouteOverride("192.168.0.2/32", "c")])],
        ),
        [state("a", peer(B), peer(C)), state("b", peer(A), peer(C)),
         state("c", peer(A), peer(B))],
        [
            refused(
                "RoutePolicy",
                "nodes",
                "CoversNodeAddress",
                "route 192.168.0.2/32 via c ignored: it covers 192.168.0.2, the InternalIP of"
                " node b; the node network must stay outside the mesh, whose tunnels run over"
                " it",
            ),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b", "c"),
        ],
    ),
    Case(
        "two nodes report one public key: the first by name keeps it, the second is not"
        " peered and is told which node holds its key",
        ClusterSnapshot(nodes=[A, attrs.evolve(B, public_key=key(1)), C],
                        tunnel_policies=[MESH]),
        [state("a", peer(C)), state("b"), state("c", peer(A))],
        [
            ok("TunnelPolicy", "mesh"),
            ok("VpbluNode", "a"),
            refused(
                "VpbluNode",
                "b",
                "DuplicatePublicKey",
                f"node a reports the same public key {key(1)}: WireGuard tells peers apart"
                " by key, so only a (first by name) is peered; this node is not, until its"
                " daemon reports a key of its own",
            ),
            ok("VpbluNode", "c"),
        ],
    ),
    Case(
        "BlockPolicy isolate beats FullMesh: no peers, and nobody peers with it",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            block_policies=[BlockPolicy("quarantine", isolate=["a"])],
        ),
        [state("a"), state("b", peer(C)), state("c", peer(B))],
        [ok("BlockPolicy", "quarantine"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "BlockPolicy node pair beats FullMesh: that pair never peers, each still peers the rest",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[MESH],
            block_policies=[BlockPolicy("apart", node_pairs=[["b", "a"]])],
        ),
        [state("a", peer(C)), state("b", peer(C)), state("c", peer(A), peer(B))],
        [ok("BlockPolicy", "apart"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "BlockPolicy node pair beats an Explicit peering",
        ClusterSnapshot(
            nodes=[A, B, C],
            tunnel_policies=[
                TunnelPolicy("mesh", mode=TunnelMode.EXPLICIT, peerings=[["a", "b"], ["a", "c"]])
            ],
            block_policies=[BlockPolicy("apart", node_pairs=[["a", "b"]])],
        ),
        [state("a", peer(C)), state("b"), state("c", peer(A))],
        [ok("BlockPolicy", "apart"), ok("TunnelPolicy", "mesh"), *nodes_ok("a", "b", "c")],
    ),
    Case(
        "BlockPolicy CIDR pairs go to every node, deduplicated and sorted across policies",
        ClusterSnapshot(
            nodes=[A, B],
            tunnel_policies=[MESH],
            block_policies=[
                BlockPolicy("two", cidr_pairs=[CidrPair("10.0.2.0/24", "10.0.1.0/24")]),
                BlockPolicy(
                    "one",
                    cidr_pairs=[
                        CidrPair("10.0.2.0/24", "10.0.1.0/24"),
                        CidrPair("10.0.1.0/24", "10.0.2.0/24"),
                    ],
                ),
            ],
        ),
        [
            state(
                "a",
                peer(B),
                blocks=[
                    CidrPair("10.0.1.0/24", "10.0.2.0/24"),
                    CidrPair("10.0.2.0/24", "10.0.1.0/24"),
                ],
            ),
            state(
                "b",
                peer(A),
                blocks=[
                    CidrPair("10.0.1.0/24", "10.0.2.0/24"),
                    CidrPair("10.0.2.0/24", "10.0.1.0/24"),
                ],
            ),
        ],
        [
            ok("BlockPolicy", "one"),
            ok("BlockPolicy", "two"),
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
        ],
    ),
    Case(
        "a node without a public key: nobody peers with it, it gets its own (empty) state",
        ClusterSnapshot(nodes=[A, B, attrs.evolve(C, public_key=None)], tunnel_policies=[MESH]),
        [state("a", peer(B)), state("b", peer(A)), state("c")],
        [
            ok("TunnelPolicy", "mesh"),
            *nodes_ok("a", "b"),
            refused(
                "VpbluNode",
                "c",
                "NoPublicKey",
                "no public key yet: no node peers with it until its daemon reports one",
            ),
        ],
    ),
    Case(
        "a node without an endpoint is peered without one (it reaches out), and reported",
        ClusterSnapshot(nodes=[A, attrs.evolve(B, internal_ip=None)], tunnel_policies=[MESH]),
        [
            state(
                "a",
                Peer(
                    name="b",
                    public_key=key(2),
                    endpoint=None,
                    allowed_ips=("10.0.2.0/24",),
                    persistent_keepalive=25,
                ),
            ),
            state("b", peer(A)),
        ],
        [
            ok("TunnelPolicy", "mesh"),
            ok("VpbluNode", "a"),
            refused(
                "VpbluNode",
                "b",
                "NoEndpoint",
                "no InternalIP and no spec.endpoint: its peers wait for it to reach them",
            ),
        ],
    ),
    Case(
        "overlapping pod CIDRs: the first node by name keeps it, the other loses it and is told",
        ClusterSnapshot(
            nodes=[attrs.evolve(B, pod_cidrs=("10.0.2.0/24", "10.0.1.128/25")), A],
            tunnel_policies=[MESH],
        ),
        [state("a", peer(B)), state("b", peer(A))],
        [
            ok("TunnelPolicy", "mesh"),
            ok("VpbluNode", "a"),
            refused(
                "VpbluNode",
                "b",
                "OverlappingPodCIDR",
                "pod CIDR 10.0.1.128/25 overlaps 10.0.1.0/24 of node a and is left out of"
                " this node's allowed IPs",
            ),
        ],
    ),
]


def cluster_datapath(snapshot: ClusterSnapshot, name: str) -> DataPath:
    """The DataPath rule, stated on its own for the cases above that are about
    something else: the node's own pod CIDRs; every node's pod CIDRs and the
    TunnelPolicy's clusterCIDRs, the controller's cluster CIDRs and the
    remembered pod ranges, collapsed; fail-closed unless the policy in force
    (the first by name) says failOpen. DATAPATH_CASES spell it out."""
    mine = next(n.pod_cidrs for n in snapshot.nodes if n.name == name)
    tunnel = min(snapshot.tunnel_policies, key=lambda t: t.name, default=None)
    every = [c for n in snapshot.nodes for c in n.pod_cidrs]
    every += tunnel.cluster_cidrs if tunnel is not None else ()
    every += [*snapshot.cluster_cidrs, *(r.cidr for r in snapshot.remembered_pod_ranges)]
    collapsed = [*ipaddress.collapse_addresses(c for c in every if c.version == 4),
                 *ipaddress.collapse_addresses(c for c in every if c.version == 6)]
    return DataPath(mine, collapsed, tunnel.fail_open if tunnel is not None else False)


def expected_states(case: Case) -> dict[str, NodeDesiredState]:
    return {s.node: s if s.datapath != NO_DATAPATH
            else attrs.evolve(s, datapath=cluster_datapath(case.snapshot, s.node))
            for s in case.states}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compute(case: Case) -> None:
    result = compute(case.snapshot)
    assert dict(result.states) == expected_states(case)
    assert list(result.states) == sorted(s.node for s in case.states)
    # The PodRanges condition has tests of its own (tests/unit/test_podranges.py).
    assert tuple(c for c in result.conditions if c.type != "PodRanges") == tuple(
        case.conditions)


# --- diff and apply ---------------------------------------------------------------

PA, PB, PC = peer(A), peer(B), peer(C)
PB_MOVED = peer(B, endpoint=Endpoint("192.168.9.2", 51820))
BLOCK = CidrPair("10.0.1.0/24", "10.0.2.0/24")


@attrs.frozen
class DiffCase:
    name: str
    old: NodeDesiredState
    new: NodeDesiredState
    changes: tuple[object, ...]


DIFF_CASES = [
    DiffCase("equal states: nothing", state("x", PA, PB), state("x", PA, PB), ()),
    DiffCase(
        "a peer joins: the peer and one route per allowed IP",
        state("x", PA),
        state("x", PA, PB),
        (PeerAdded(PB), RouteAdded(Route("10.0.2.0/24", "b"))),
    ),
    DiffCase(
        "a peer leaves: its name and its routes",
        state("x", PA, PB, PC),
        state("x", PA, PC),
        (PeerRemoved("b"), RouteRemoved(Route("10.0.2.0/24", "b"))),
    ),
    DiffCase(
        "a peer's endpoint changes: one PeerChanged with the whole new peer, routes untouched",
        state("x", PA, PB),
        state("x", PA, PB_MOVED),
        (PeerChanged(PB_MOVED),),
    ),
    DiffCase(
        "a CIDR moves between peers: both peers change, the route is replaced",
        state("x", PA, PB),
        state("x", peer(A, []), peer(B, ["10.0.1.0/24", "10.0.2.0/24"])),
        (
            PeerChanged(peer(A, [])),
            PeerChanged(peer(B, ["10.0.1.0/24", "10.0.2.0/24"])),
            RouteRemoved(Route("10.0.1.0/24", "a")),
            RouteAdded(Route("10.0.1.0/24", "b")),
        ),
    ),
    DiffCase(
        "listen port first, then peers, routes, blocks",
        state("x", PB, blocks=[BLOCK]),
        state("x", PA, port=51000),
        (
            ListenPortChanged(51000),
            PeerAdded(PA),
            PeerRemoved("b"),
            RouteAdded(Route("10.0.1.0/24", "a")),
            RouteRemoved(Route("10.0.2.0/24", "b")),
            BlockRemoved(BLOCK),
        ),
    ),
    DiffCase(
        "a block appears",
        state("x"),
        state("x", blocks=[BLOCK]),
        (BlockAdded(BLOCK),),
    ),
]


@pytest.mark.parametrize("case", DIFF_CASES, ids=[c.name for c in DIFF_CASES])
def test_diff_and_apply(case: DiffCase) -> None:
    assert diff(case.old, case.new) == case.changes
    assert apply(case.old, diff(case.old, case.new)) == case.new


def test_diff_refuses_states_of_two_nodes() -> None:
    with pytest.raises(ValueError, match="two different nodes"):
        diff(state("x"), state("y"))


def test_apply_is_idempotent_like_kernel_writes() -> None:
    full = state("x", PA, PB, blocks=[BLOCK])
    again = (PeerAdded(PA), RouteAdded(Route("10.0.1.0/24", "a")), BlockAdded(BLOCK))
    assert apply(full, again) == full
    gone = (PeerRemoved("zed"), RouteRemoved(Route("10.9.0.0/24", "zed")))
    assert apply(full, gone) == full
    assert apply(state("x"), (PeerChanged(PA),)) == state("x", PA, routes=[])


# --- recompute: what the StateActor sends -----------------------------------------


def test_join_sends_each_node_one_peer_and_its_routes_and_the_newcomer_everything() -> None:
    before = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[MESH]))
    after = recompute(before, ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[MESH]))
    # Its pod range joins everyone's cluster ranges too (fail-closed covers it).
    assert dict(after.changes) == {
        "a": (PeerAdded(PC), RouteAdded(Route("10.0.3.0/24", "c")), DataPathChanged(dp(A, ABC))),
        "b": (PeerAdded(PC), RouteAdded(Route("10.0.3.0/24", "c")), DataPathChanged(dp(B, ABC))),
        "c": (
            PeerAdded(PA),
            PeerAdded(PB),
            RouteAdded(Route("10.0.1.0/24", "a")),
            RouteAdded(Route("10.0.2.0/24", "b")),
            DataPathChanged(dp(C, ABC)),
        ),
    }
    assert after.removed == frozenset()
    assert dict(after.result.states) == {
        "a": state("a", PB, PC, datapath=dp(A, ABC)),
        "b": state("b", PA, PC, datapath=dp(B, ABC)),
        "c": state("c", PA, PB, datapath=dp(C, ABC)),
    }


def test_with_cluster_cidrs_covering_the_nodes_a_join_changes_no_one_s_data_path() -> None:
    wide = TunnelPolicy("mesh", cluster_cidrs=("10.0.0.0/16",))
    before = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[wide]))
    after = recompute(before, ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[wide]))
    assert after.changes["a"] == (PeerAdded(PC), RouteAdded(Route("10.0.3.0/24", "c")))
    assert after.result.states["a"].datapath is before.states["a"].datapath
    assert after.result.states["c"].datapath == dp(C, ("10.0.0.0/16",))


def test_leave_removes_the_peer_everywhere_and_names_the_node_gone() -> None:
    before = compute(ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[MESH]))
    after = recompute(before, ClusterSnapshot(nodes=[A, C], tunnel_policies=[MESH]))
    assert dict(after.changes) == {
        "a": (PeerRemoved("b"), RouteRemoved(Route("10.0.2.0/24", "b")),
              DataPathChanged(dp(A, AC))),
        "c": (PeerRemoved("b"), RouteRemoved(Route("10.0.2.0/24", "b")),
              DataPathChanged(dp(C, AC))),
    }
    assert after.removed == frozenset({"b"})


def test_new_key_is_one_peer_changed_per_node_and_unchanged_states_are_kept() -> None:
    before = compute(ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[MESH]))
    rekeyed = attrs.evolve(C, public_key=key(33))
    after = recompute(before, ClusterSnapshot(nodes=[A, B, rekeyed], tunnel_policies=[MESH]))
    assert dict(after.changes) == {
        "a": (PeerChanged(peer(rekeyed)),),
        "b": (PeerChanged(peer(rekeyed)),),
    }
    assert after.result.states["c"] is before.states["c"]
    # Unchanged peers stay the very same objects, so the next diff is cheap.
    assert after.result.states["a"].peers[0] is before.states["a"].peers[0]


def test_a_policy_change_recomputes_everything_and_equals_compute() -> None:
    before = compute(ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[MESH]))
    snapshot = ClusterSnapshot(
        nodes=[A, B, C],
        tunnel_policies=[MESH],
        block_policies=[BlockPolicy("q", isolate=["a"])],
    )
    after = recompute(before, snapshot)
    fresh = compute(snapshot)
    assert after.result == fresh
    assert dict(after.changes) == diff_all(before, fresh)
    assert dict(after.changes) == {
        "a": (
            PeerRemoved("b"),
            PeerRemoved("c"),
            RouteRemoved(Route("10.0.2.0/24", "b")),
            RouteRemoved(Route("10.0.3.0/24", "c")),
        ),
        "b": (PeerRemoved("a"), RouteRemoved(Route("10.0.1.0/24", "a"))),
        "c": (PeerRemoved("a"), RouteRemoved(Route("10.0.1.0/24", "a"))),
    }


def test_diff_all_leaves_out_unchanged_and_diffs_new_nodes_from_empty() -> None:
    wide = TunnelPolicy("mesh", cluster_cidrs=("10.0.0.0/16",))
    before = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[wide]))
    keyless = attrs.evolve(C, public_key=None)
    after = compute(ClusterSnapshot(nodes=[A, B, keyless], tunnel_policies=[wide]))
    # c has no key: nobody's state changes, and c's own state is the empty one
    # but for its data path.
    assert diff_all(before, after) == {"c": (DataPathChanged(dp(keyless, ("10.0.0.0/16",))),)}


# --- the data path: what is steered into the mesh, and fail-closed ----------------


def test_without_a_tunnel_policy_every_pod_range_is_fail_closed() -> None:
    result = compute(ClusterSnapshot(nodes=[A, B]))
    assert result.states["a"].datapath == dp(A, AB)
    assert result.states["b"].datapath == dp(B, AB)
    assert not result.states["a"].datapath.fail_open


def test_keyless_and_isolated_nodes_pod_ranges_are_still_cluster_ranges() -> None:
    snapshot = ClusterSnapshot(
        nodes=[A, B, attrs.evolve(C, public_key=None)],
        tunnel_policies=[MESH],
        block_policies=[BlockPolicy("quarantine", isolate=["b"])],
    )
    result = compute(snapshot)
    # a peers with nobody (b isolated, c without a key), yet traffic to either
    # is steered by the mesh table and dropped there, never sent in the clear.
    assert result.states["a"].peers == ()
    assert result.states["a"].datapath == dp(A, ABC)
    assert result.states["b"].datapath == dp(B, ABC)


def test_fail_open_and_cluster_cidrs_come_from_the_policy_in_force_and_show() -> None:
    open_policy = TunnelPolicy("a-migrating", fail_open=True,
                               cluster_cidrs=("10.0.0.0/16", "fd00::/48"))
    superseded = TunnelPolicy("b-strict", cluster_cidrs=("10.9.0.0/16",))
    result = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[open_policy, superseded]))
    assert result.states["a"].datapath == dp(A, ("10.0.0.0/16", "fd00::/48"), fail_open=True)
    accepted = next(c for c in result.conditions if c.name == "a-migrating")
    assert accepted.status == "True"
    assert accepted.message == ("in force; failOpen: traffic to a pod range without a tunnel"
                                " leaves UNENCRYPTED")


# --- what a policy cannot do to the data plane ------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_block_capacity_is_what_the_classifier_holds_and_what_the_crd_allows() -> None:
    from vpblu.node.kernel.bpftables import BLOCK_RULE_LIMIT

    crd = yaml.safe_load((ROOT / "kustomize/base/crds/blockpolicies.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert BLOCK_CAPACITY == BLOCK_RULE_LIMIT == spec["properties"]["cidrPairs"]["maxItems"]


def pairs(first: int, count: int) -> list[CidrPair]:
    return [CidrPair(f"10.{100 + i // 256}.{i % 256}.0/24", "10.0.2.0/24")
            for i in range(first, first + count)]


def test_block_policies_are_taken_in_name_order_while_their_pairs_fit() -> None:
    # a fills most of the data plane; b would overflow it and is refused
    # (its isolate still holds); c fits in what is left, b's pair shared with
    # a stays blocked because a blocks it.
    a = BlockPolicy("a", cidr_pairs=pairs(0, BLOCK_CAPACITY - 28))
    b = BlockPolicy("b", cidr_pairs=[*pairs(0, 1), *pairs(1000, 50)], isolate=["c"])
    c = BlockPolicy("c", cidr_pairs=pairs(2000, 28))
    result = compute(ClusterSnapshot(nodes=[A, B, C], tunnel_policies=[MESH],
                                     block_policies=[c, b, a]))
    wanted = {*a.cidr_pairs, *c.cidr_pairs}
    assert len(wanted) == BLOCK_CAPACITY
    for s in result.states.values():
        assert set(s.blocks) == wanted
    assert [p.name for p in result.states["a"].peers] == ["b"]  # c is isolated: b's isolate holds
    conditions = {(x.kind, x.name): x for x in result.conditions}
    assert conditions[("BlockPolicy", "a")].status == "True"
    assert conditions[("BlockPolicy", "c")].status == "True"
    assert conditions[("BlockPolicy", "b")] == refused(
        "BlockPolicy", "b", "BlockCapacityExceeded",
        f"its 51 cidrPairs are not applied: they would make {BLOCK_CAPACITY - 28 + 50} distinct"
        f" blocked CIDR pairs, and the data plane holds at most {BLOCK_CAPACITY}"
        f" ({BLOCK_CAPACITY - 28} in use by the BlockPolicies that sort before it);"
        " its isolate is in force")


def test_ten_thousand_pairs_across_policies_block_what_fits_and_refuse_the_rest() -> None:
    policies = [BlockPolicy(f"p{i:03d}", cidr_pairs=pairs(i * 100, 100)) for i in range(100)]
    result = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[MESH],
                                     block_policies=policies))
    assert len(result.states["a"].blocks) == 100  # p000; p001 would make 200
    refusals = [c for c in result.conditions if c.kind == "BlockPolicy" and c.status == "False"]
    assert [c.name for c in refusals] == [f"p{i:03d}" for i in range(1, 100)]
    assert {c.reason for c in refusals} == {"BlockCapacityExceeded"}
    assert [p.name for p in result.states["a"].peers] == ["b"]


def test_a_route_over_the_service_range_is_refused() -> None:
    snapshot = ClusterSnapshot(
        nodes=[A, B], tunnel_policies=[MESH],
        route_policies=[RoutePolicy("svc", routes=[RouteOverride("10.96.0.0/24", "b"),
                                                   RouteOverride("10.0.1.0/26", "b")])])
    services = [ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:96::/108")]
    result = compute(snapshot, service_cidrs=services)
    assert result.states["a"].peers == (peer(B, ["10.0.1.0/26", "10.0.2.0/24"]),)
    assert refused("RoutePolicy", "svc", "CoversServiceCIDR",
                   "route 10.96.0.0/24 via b ignored: it overlaps the Service range"
                   " 10.96.0.0/12") in result.conditions
    # Without the ranges the route is taken: the controller must be told them.
    assert compute(snapshot).states["a"].peers == (
        peer(B, ["10.0.1.0/26", "10.0.2.0/24", "10.96.0.0/24"]),)
    # recompute applies them as compute does.
    step = recompute(compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[MESH])), snapshot,
                     service_cidrs=services)
    assert step.result == result


def test_a_thousand_problems_make_one_capped_message() -> None:
    routes = [RouteOverride(f"10.50.{i // 256}.{i % 256}/32", "ghost") for i in range(1000)]
    result = compute(ClusterSnapshot(nodes=[A, B], tunnel_policies=[MESH],
                                     route_policies=[RoutePolicy("many", routes=routes)]))
    (cond,) = [c for c in result.conditions if c.kind == "RoutePolicy"]
    assert cond.reason == "UnknownNode"
    assert len(cond.message) <= MESSAGE_LIMIT
    shown = cond.message.count("ignored: no node ghost")
    assert cond.message.startswith("route 10.50.0.0/32 via ghost ignored: no node ghost; ")
    assert cond.message.endswith(f"; … and {1000 - shown} more problems")
    assert shown > 10


def test_capped_cuts_a_first_part_too_long_to_fit() -> None:
    assert _capped(["x" * 50, "y"], "problem", limit=30) == "x" * 7 + "…; … and 1 more problem"
    assert len(_capped(["x" * 50, "y"], "problem", limit=30)) == 30
    assert _capped(["x" * 50], "note", limit=30) == "x" * 29 + "…"
    assert _capped(["a", "b"], "problem", limit=30) == "a; b"
    assert _capped([str(i) for i in range(20)], "problem", limit=40) == (
        "0; 1; 2; 3; 4; 5; … and 14 more problems")
