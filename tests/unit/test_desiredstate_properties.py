"""Property tests for the pure core: invariants that hold for any snapshot.

Snapshots are small (up to 7 nodes) but dense in conflicts: pod CIDRs drawn
from a pool with nested ranges, policies naming nodes that do not exist,
several TunnelPolicies, keyless and endpointless nodes.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import random
from collections.abc import Mapping, Sequence

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpblu.core.changes import apply, diff
from vpblu.core.desiredstate import (
    DesiredResult,
    _collapse,
    _cover,
    _Findings,
    _overrides,
    _subtract,
    compute,
    diff_all,
    recompute,
)
from vpblu.core.model import (
    BlockPolicy,
    CidrPair,
    ClusterSnapshot,
    DataPath,
    Endpoint,
    IPNetwork,
    NodeDesiredState,
    NodeInfo,
    Peer,
    PodRange,
    RouteOverride,
    RoutePolicy,
    TunnelMode,
    TunnelPolicy,
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [f"n{i}" for i in range(7)]
GHOST = "ghost"  # named by policies, never a node
POD_POOL = [f"10.0.{i}.0/24" for i in range(10)] + [
    "10.0.0.0/16",  # holds every /24 above
    "10.0.1.0/26",
    "fd00:0:0:1::/64",
    "fd00:0:0:2::/64",
    "fd00:0:0:1::/80",
]
ROUTE_POOL = [*POD_POOL, "172.20.0.0/16", "172.20.1.0/24", "0.0.0.0/0", "10.0.3.128/25"]

keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
names_or_ghost = st.sampled_from([*NAMES, GHOST])
pairs = st.lists(names_or_ghost, min_size=2, max_size=2, unique=True)


@st.composite
def node_infos(draw: st.DrawFn, name: str) -> NodeInfo:
    index = NAMES.index(name) if name in NAMES else 99
    cidrs = draw(
        st.one_of(
            st.just([f"10.0.{index}.0/24"]),  # the usual: one CIDR of its own
            st.lists(st.sampled_from(POD_POOL), max_size=3),
        )
    )
    return NodeInfo(
        name=name,
        internal_ip=draw(st.one_of(st.none(), st.just(f"192.168.0.{index + 1}"))),
        pod_cidrs=cidrs,
        public_key=draw(st.one_of(keys, keys, keys, st.none())),
        endpoint_override=draw(
            st.one_of(st.none(), st.none(), st.just(Endpoint("203.0.113.9", 4500 + index)))
        ),
    )


@st.composite
def node_lists(draw: st.DrawFn) -> list[NodeInfo]:
    chosen = draw(st.lists(st.sampled_from(NAMES), max_size=len(NAMES), unique=True))
    return [draw(node_infos(name)) for name in chosen]


tunnel_policies = st.builds(
    TunnelPolicy,
    name=st.sampled_from(["t1", "t2", "t3"]),
    mode=st.sampled_from(TunnelMode),
    listen_port=st.sampled_from([51820, 51000]),
    persistent_keepalive=st.sampled_from([25, 0]),
    peerings=st.lists(pairs, max_size=5),
    cluster_cidrs=st.lists(st.sampled_from(["10.0.0.0/8", "fd00::/8", *ROUTE_POOL]), max_size=2),
    fail_open=st.booleans(),
)
route_policies = st.builds(
    RoutePolicy,
    name=st.sampled_from(["r1", "r2", "r3"]),
    routes=st.lists(
        st.builds(RouteOverride, cidr=st.sampled_from(ROUTE_POOL), via=names_or_ghost),
        max_size=3,
    ),
)
block_policies = st.builds(
    BlockPolicy,
    name=st.sampled_from(["b1", "b2"]),
    cidr_pairs=st.lists(
        st.builds(CidrPair, src=st.sampled_from(POD_POOL[:4]), dst=st.sampled_from(POD_POOL[:4])),
        max_size=2,
    ),
    node_pairs=st.lists(pairs, max_size=2),
    isolate=st.lists(names_or_ghost, max_size=2),
    drain=st.lists(names_or_ghost, max_size=2),
)


def _unique(items: Sequence[object]) -> list[object]:
    return list({getattr(i, "name"): i for i in items}.values())  # noqa: B009


@st.composite
def snapshots(draw: st.DrawFn, nodes: list[NodeInfo] | None = None) -> ClusterSnapshot:
    return ClusterSnapshot(
        nodes=draw(node_lists()) if nodes is None else nodes,
        tunnel_policies=_unique(draw(st.lists(tunnel_policies, max_size=2))),
        route_policies=_unique(draw(st.lists(route_policies, max_size=2))),
        block_policies=_unique(draw(st.lists(block_policies, max_size=2))),
        # The controller's --cluster-cidr, and podCIDRs of Nodes seen before.
        cluster_cidrs=draw(st.lists(st.sampled_from(["10.0.0.0/16", "fd00::/64"]), max_size=1)),
        remembered_pod_ranges=draw(st.lists(st.builds(
            PodRange, cidr=st.sampled_from(POD_POOL), node=st.sampled_from(["gone", *NAMES])),
            max_size=3)),
    )


@st.composite
def next_snapshots(draw: st.DrawFn, before: ClusterSnapshot) -> ClusterSnapshot:
    """What a watcher would see next: mostly node events, sometimes a policy edit."""
    nodes = []
    for node in before.nodes:
        fate = draw(st.sampled_from(["keep", "keep", "keep", "drop", "change"]))
        if fate == "keep":
            nodes.append(node)
        elif fate == "change":
            nodes.append(draw(node_infos(node.name)))
    present = {n.name for n in before.nodes}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)):
        if name not in present:
            nodes.append(draw(node_infos(name)))
    policies = draw(st.sampled_from(["same", "same", "same", "routes", "all"]))
    if policies == "same":
        return attrs.evolve(before, nodes=nodes)
    fresh = draw(snapshots(nodes))
    if policies == "routes":
        return attrs.evolve(before, nodes=nodes, route_policies=fresh.route_policies)
    return fresh


def _peerable(snapshot: ClusterSnapshot) -> set[str]:
    isolated = {n for b in snapshot.block_policies for n in b.isolate}
    # Of two nodes reporting one key, only the first by name holds it.
    holders: dict[str, str] = {}
    for n in sorted(snapshot.nodes, key=lambda n: n.name):
        if n.public_key is not None:
            holders.setdefault(n.public_key, n.name)
    return {n.name for n in snapshot.nodes
            if n.public_key is not None and holders[n.public_key] == n.name
            and n.name not in isolated}


def _blocked(snapshot: ClusterSnapshot) -> set[frozenset[str]]:
    return {pair for b in snapshot.block_policies for pair in b.node_pairs}


@SETTINGS
@given(snapshots())
def test_invariants(snapshot: ClusterSnapshot) -> None:
    result = compute(snapshot)
    states = result.states
    assert set(states) == {n.name for n in snapshot.nodes}
    peered = {(name, p.name) for name, s in states.items() for p in s.peers}
    # A node never peers with itself, and peering is symmetric (FullMesh and Explicit).
    assert all(a != b for a, b in peered)
    assert all((b, a) in peered for a, b in peered)
    # Everyone sees the same entry for a node: its one Peer object.
    by_name: dict[str, Peer] = {}
    for s in states.values():
        for p in s.peers:
            assert by_name.setdefault(p.name, p) is p
    blocked = _blocked(snapshot)
    peerable = _peerable(snapshot)
    for name, s in states.items():
        # No two peers of one node share or overlap an allowed IP.
        nets = [net for p in s.peers for net in p.allowed_ips]
        for x, y in itertools.combinations(nets, 2):
            assert not (x.version == y.version and x.overlaps(y)), (name, x, y)
        # Routes are exactly each peer's allowed IPs via that peer.
        assert len(set(s.routes)) == len(s.routes)
        assert {(r.cidr, r.via) for r in s.routes} == {
            (net, p.name) for p in s.peers for net in p.allowed_ips
        }
        # Blocked pairs, isolated and keyless nodes are never peered or routed to.
        for p in s.peers:
            assert frozenset((name, p.name)) not in blocked
            assert p.name in peerable and name in peerable
        assert len({p.name for p in s.peers}) == len(s.peers)
        # WireGuard knows a peer by its key: no two peers of a node share one.
        assert len({p.public_key for p in s.peers}) == len(s.peers)
        # Every node carries every CIDR pair block.
        assert set(s.blocks) == {c for b in snapshot.block_policies for c in b.cidr_pairs}
    # FullMesh peers every allowed pair; Explicit only listed pairs.
    tunnels = sorted(snapshot.tunnel_policies, key=lambda t: t.name)
    if tunnels:
        winner = tunnels[0]
        for a, b in itertools.permutations(peerable, 2):
            allowed = frozenset((a, b)) not in blocked and (
                winner.mode is TunnelMode.FULL_MESH or frozenset((a, b)) in winner.peerings
            )
            assert ((a, b) in peered) == allowed, (a, b)
    else:
        assert not peered
    # A drained node carries nothing but (parts of) its own pod CIDRs, which
    # may be collapsed: 10.0.4.0/24 and 10.0.5.0/24 are carried as 10.0.4.0/23.
    drained = {n for b in snapshot.block_policies for n in b.drain}
    nodes = {n.name: n for n in snapshot.nodes}
    for p in by_name.values():
        if p.name in drained:
            own = [c for version in (4, 6) for c in ipaddress.collapse_addresses(
                [x for x in nodes[p.name].pod_cidrs if x.version == version])]
            assert all(
                any(net.version == c.version and net.subnet_of(c) for c in own)  # type: ignore[arg-type]
                for net in p.allowed_ips
            ), (p.name, p.allowed_ips, own)
    # One Accepted condition per object read.
    keys_ = [(c.kind, c.name, c.type) for c in result.conditions]
    assert len(keys_) == len(set(keys_))
    assert list(result.conditions) == sorted(result.conditions)
    assert {n for k, n, _ in keys_ if k == "VpbluNode"} == set(nodes)


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_deterministic_whatever_the_order(snapshot: ClusterSnapshot, rnd: random.Random) -> None:
    shuffled = ClusterSnapshot(
        nodes=rnd.sample(snapshot.nodes, len(snapshot.nodes)),
        tunnel_policies=rnd.sample(snapshot.tunnel_policies, len(snapshot.tunnel_policies)),
        route_policies=rnd.sample(snapshot.route_policies, len(snapshot.route_policies)),
        block_policies=rnd.sample(snapshot.block_policies, len(snapshot.block_policies)),
        cluster_cidrs=snapshot.cluster_cidrs,
        remembered_pod_ranges=rnd.sample(snapshot.remembered_pod_ranges,
                                         len(snapshot.remembered_pod_ranges)),
    )
    first, second = compute(snapshot), compute(shuffled)
    assert first == second
    assert list(first.states) == list(second.states)


@SETTINGS
@given(snapshots())
def test_states_are_canonical(snapshot: ClusterSnapshot) -> None:
    # The core builds states without re-sorting; a normally built copy must
    # be equal and in the same order.
    for s in compute(snapshot).states.values():
        rebuilt = NodeDesiredState(s.node, s.listen_port, s.peers, s.routes, s.blocks,
                                   DataPath(s.datapath.local_cidrs, s.datapath.cluster_cidrs,
                                            s.datapath.fail_open))
        assert rebuilt == s
        assert (rebuilt.peers, rebuilt.routes, rebuilt.blocks) == (s.peers, s.routes, s.blocks)
        assert rebuilt.datapath.cluster_cidrs == s.datapath.cluster_cidrs


def _states(result: DesiredResult, name: str) -> NodeDesiredState:
    return result.states.get(name, NodeDesiredState(node=name))


@SETTINGS
@given(st.data())
def test_apply_of_diff_is_the_new_state_and_diff_is_minimal(data: st.DataObject) -> None:
    old = compute(data.draw(snapshots()))
    new = compute(data.draw(snapshots()))
    for name in NAMES:
        a, b = _states(old, name), _states(new, name)
        changes = diff(a, b)
        assert apply(a, changes) == b
        assert diff(a, a) == ()
        peers_a = {p.name: p for p in a.peers}
        peers_b = {p.name: p for p in b.peers}
        smallest = (
            (a.listen_port != b.listen_port)
            + sum(peers_a.get(n) != peers_b.get(n) for n in peers_a.keys() | peers_b.keys())
            + len(set(a.routes) ^ set(b.routes))
            + len(set(a.blocks) ^ set(b.blocks))
            + (a.datapath != b.datapath)
        )
        assert len(changes) == smallest


@SETTINGS
@given(st.data())
def test_incremental_equals_full_recompute(data: st.DataObject) -> None:
    snapshot = data.draw(snapshots())
    result = compute(snapshot)
    for _ in range(2):  # twice, so a recomputed result is itself a valid `previous`
        following = data.draw(next_snapshots(snapshot))
        step = recompute(result, following)
        fresh = compute(following)
        assert step.result == fresh
        assert list(step.result.states) == list(fresh.states)
        assert dict(step.changes) == diff_all(result, fresh)
        assert step.removed == set(result.states) - set(fresh.states)
        for name, state in fresh.states.items():
            assert apply(_states(result, name), step.changes.get(name, ())) == state
        snapshot, result = following, step.result


@SETTINGS
@given(snapshots())
def test_every_pod_range_is_a_cluster_range_of_every_node(snapshot: ClusterSnapshot) -> None:
    # Fail-closed holds only for what is in cluster_cidrs: every node's pod
    # CIDRs (keyless, isolated or overlapping alike), every remembered podCIDR
    # (a deleted Node's too) and the named ranges must be covered, on every node.
    result = compute(snapshot)
    every = [c for n in snapshot.nodes for c in n.pod_cidrs]
    every += [*snapshot.cluster_cidrs, *(r.cidr for r in snapshot.remembered_pod_ranges)]
    for state in result.states.values():
        cluster = state.datapath.cluster_cidrs
        for cidr in every:
            assert any(c.version == cidr.version and cidr.subnet_of(c)  # type: ignore[arg-type]
                       for c in cluster), (cidr, cluster)
        mine = next(n.pod_cidrs for n in snapshot.nodes if n.name == state.node)
        assert state.datapath.local_cidrs == mine


# --- routes: the O(R log R) resolution against the quadratic one it replaced -----


def reference_verdict(
    cidr: IPNetwork,
    via: str,
    accepted: Sequence[tuple[IPNetwork, str]],
    nodes: Mapping[str, NodeInfo],
    service_cidrs: Sequence[IPNetwork] = (),
) -> str | None:
    """Why a route is refused (None: it is accepted), decided the slow,
    obvious way: against every node and every route accepted before it (the
    conflict rule of the quadratic `_overrides` the core had, with the limits
    issue 16 added)."""
    same = [o for o in accepted if o[0].version == cidr.version]
    clash = [o for o in same if o[1] != via and o[0].overlaps(cidr)]  # type: ignore[arg-type]
    if via not in nodes:
        return "UnknownNode"
    if cidr.prefixlen == 0:
        return "DefaultRoute"
    if any(n.internal_ip is not None and n.internal_ip in cidr for n in nodes.values()):
        return "CoversNodeAddress"
    if any(c.version == cidr.version and c.overlaps(cidr)  # type: ignore[arg-type]
           for c in service_cidrs):
        return "CoversServiceCIDR"
    if any(n.name != via and c.version == cidr.version and c != cidr
           and c.subnet_of(cidr)  # type: ignore[arg-type]
           for n in nodes.values() for c in n.pod_cidrs):
        return "CoversPodCIDR"
    if clash:
        return "ConflictingRoute" if any(o[0] == cidr for o in clash) else "OverlappingRoute"
    if any(n.prefixlen == 0 for n in ipaddress.collapse_addresses([*(o[0] for o in same), cidr])):
        return "CoversEverything"
    return None


def reference_overrides(
    policies: Sequence[RoutePolicy],
    nodes: Mapping[str, NodeInfo],
    service_cidrs: Sequence[IPNetwork] = (),
) -> list[tuple[str, IPNetwork, str, str | None]]:
    """Every route, in the order read, with its `reference_verdict`."""
    verdicts: list[tuple[str, IPNetwork, str, str | None]] = []
    accepted: list[tuple[IPNetwork, str]] = []
    for policy in sorted(policies, key=lambda p: p.name):
        for route in policy.routes:
            reason = reference_verdict(route.cidr, route.via, accepted, nodes, service_cidrs)
            if reason is None:
                accepted.append((route.cidr, route.via))
            verdicts.append((policy.name, route.cidr, route.via, reason))
    return verdicts


def fast_overrides(
    policies: Sequence[RoutePolicy],
    nodes: Mapping[str, NodeInfo],
    service_cidrs: Sequence[IPNetwork] = (),
) -> list[tuple[str, IPNetwork, str, str | None]]:
    """The same verdicts from the core's `_overrides`, its problems read back."""
    findings = _Findings()
    accepted = iter(_overrides(policies, nodes, frozenset(), frozenset(), service_cidrs,
                               findings))
    verdicts: list[tuple[str, IPNetwork, str, str | None]] = []
    following = next(accepted, None)
    for policy in sorted(policies, key=lambda p: p.name):
        problems = iter(findings._objects[("RoutePolicy", policy.name)])
        for route in policy.routes:
            if (following is not None and following.policy == policy.name
                    and (following.cidr, following.via) == (route.cidr, route.via)):
                verdicts.append((policy.name, route.cidr, route.via, None))
                following = next(accepted, None)
            else:
                verdicts.append((policy.name, route.cidr, route.via, next(problems).reason))
    return verdicts


DENSE_ROUTES = [
    "10.0.0.0/16", "10.0.0.0/8", "10.0.1.0/24", "10.0.1.0/25", "10.0.1.128/25", "10.0.1.64/26",
    "10.0.2.0/24", "10.0.2.0/23", "10.0.3.0/24", "10.0.3.0/25", "172.20.0.0/16",
    "172.20.1.0/24", "0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "192.168.0.0/24",
    "192.168.0.2/32", "10.96.0.0/24", "::/1", "8000::/1", "fd00:0:0:1::/64", "fd00::/8",
]
dense_policies = st.builds(
    RoutePolicy,
    name=st.sampled_from(["r1", "r2", "r3"]),
    routes=st.lists(st.builds(RouteOverride, cidr=st.sampled_from(DENSE_ROUTES),
                              via=st.sampled_from([*NAMES[:4], GHOST])), max_size=12),
)


@SETTINGS
@given(node_lists(), st.lists(dense_policies, max_size=3), st.booleans())
def test_route_resolution_equals_the_quadratic_reference(
    nodes: list[NodeInfo], policies: list[RoutePolicy], with_services: bool
) -> None:
    by_name = {n.name: n for n in nodes}
    policies = _unique(policies)  # type: ignore[assignment]
    services = [ipaddress.ip_network("10.96.0.0/12")] if with_services else []
    assert fast_overrides(policies, by_name, services) == reference_overrides(
        policies, by_name, services)


def test_a_4096_route_policy_is_resolved_as_the_quadratic_reference_would() -> None:
    # The reference costs O(R^2) (seconds at 4096): every route is checked
    # against the routes the fast resolution accepted before it, for a
    # random sample of 256 routes, which is the same question one route at a time.
    rnd = random.Random(4096)
    nodes = {f"n{i:02d}": NodeInfo(f"n{i:02d}", f"192.168.1.{i + 1}", (f"10.0.{i}.0/24",),
                                   base64.b64encode(bytes([i + 1]) * 32).decode())
             for i in range(64)}
    routes = []
    for _ in range(4096):
        pod = rnd.choice(list(nodes.values())).pod_cidrs[0]
        prefix = rnd.choice([22, 24, 25, 26, 27, 28, 29, 30, 31, 32])
        net = ipaddress.ip_network(
            f"{pod.network_address + rnd.randrange(256)}/{prefix}", strict=False)
        routes.append(RouteOverride(net, rnd.choice([*nodes, "ghost"])))
    policy = RoutePolicy("many", routes=routes)
    fast = fast_overrides([policy], nodes)
    assert len(fast) == 4096
    reasons = {reason for *_, reason in fast}
    assert {None, "ConflictingRoute", "OverlappingRoute", "CoversPodCIDR",
            "UnknownNode"} <= reasons
    accepted: list[tuple[IPNetwork, str]] = []
    sample = set(rnd.sample(range(4096), 256))
    for i, (_, cidr, via, reason) in enumerate(fast):
        if i in sample:
            assert reference_verdict(cidr, via, accepted, nodes) == reason, (i, cidr, via)
        if reason is None:
            accepted.append((cidr, via))


networks = st.sampled_from([*POD_POOL, *DENSE_ROUTES, "10.0.4.0/23", "10.0.5.0/24",
                            "10.0.6.0/25", "10.0.6.128/25"]).map(ipaddress.ip_network)


@SETTINGS
@given(st.lists(networks, max_size=12))
def test_collapse_equals_ipaddress_collapse(nets: list[IPNetwork]) -> None:
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    assert _collapse(nets) == (*ipaddress.collapse_addresses(v4),  # type: ignore[arg-type]
                               *ipaddress.collapse_addresses(v6))  # type: ignore[arg-type]


@SETTINGS
@given(st.lists(networks, max_size=4, unique=True), st.lists(networks, max_size=8))
def test_subtract_equals_cutting_one_cidr_after_the_other(
    pieces: list[IPNetwork], cuts: list[IPNetwork]
) -> None:
    pieces = list(_collapse(pieces))  # the core subtracts from disjoint pod CIDRs
    slow = list(pieces)
    for cut in cuts:
        out: list[IPNetwork] = []
        for piece in slow:
            if piece.version != cut.version or not piece.overlaps(cut):  # type: ignore[arg-type]
                out.append(piece)
            elif piece.prefixlen < cut.prefixlen:
                out.extend(piece.address_exclude(cut))  # type: ignore[arg-type]
        slow = out
    assert _cover(_subtract(pieces, cuts)) == _collapse(slow)
