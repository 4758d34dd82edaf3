"""The pure core: one ClusterSnapshot in, every node's desired state out.

This module owns the rules that turn the cluster (nodes, their keys,
endpoints and pod CIDRs, and the Tunnel/Route/Block policies) into what each
node's daemon should have in its kernel, the smallest difference between two
such states, and the status conditions that explain what was ignored. It
never does I/O, never reads a clock, never logs and never raises on bad
input: whatever the snapshot holds, the answer is a result plus conditions.
Same snapshot in, equal result out, whatever the order of its tuples.

Precedence: BlockPolicy > RoutePolicy > TunnelPolicy > derived from Node.

Derived from Node
    Each node X that can be peered is described once, by one `Peer` value
    ("how X looks to the others"): its public key; its endpoint (the
    VpbluNode's spec.endpoint, else InternalIP:listenPort, else none - the
    others then wait for X to reach them, which WireGuard allows); its allowed
    IPs (its pod CIDRs, after the rules below); the TunnelPolicy's keepalive.
    Every node that peers with X gets that same object, and one route per
    allowed IP of X, via X. Every node gets every BlockPolicy CIDR pair (the
    classifier drops on the source node, so each node needs the whole list).

TunnelPolicy
    None exists: the mesh is off - no node has peers or routes (blocks still
    apply); every VpbluNode says so with Accepted=False/NoTunnelPolicy.
    Several exist: the one whose name sorts first is in force, the others get
    Accepted=False/Superseded. FullMesh peers every pair; Explicit only the
    listed pairs (a pair naming a node that does not exist is ignored and
    reported). The policy's listenPort is every node's port.

RoutePolicy
    A route moves `cidr` to `via`'s tunnel: the CIDR is cut out of whichever
    node's pod CIDRs held it (a pod CIDR wholly inside it disappears, one that
    contains it is split) and added to `via`'s allowed IPs, so every node that
    peers with `via` routes it there - the owner included, since the operator
    said so; `via` itself never routes to itself. Policies are read in name
    order, routes in list order, and the first claim on an address range wins:
    a later route for the same CIDR (ConflictingRoute) or an overlapping one
    (OverlappingRoute) with a different `via` is ignored, as is a route via a
    node that does not exist (UnknownNode), is isolated (NodeIsolated) or is
    drained (NodeDrained). A route via a node that has no public key yet stays
    in force: the CIDR is unreachable until that node's daemon reports its key,
    rather than silently sent somewhere the operator did not choose.
    A route must not break the mesh it rides on, so these are ignored too:
    a default route, 0.0.0.0/0 or ::/0 (DefaultRoute); one that strictly
    contains the whole pod CIDR of a node other than `via` (CoversPodCIDR: a
    supernet would pull other nodes' pods into one tunnel - equal to a pod
    CIDR, or inside one, is the feature above); one that covers a node's
    InternalIP (CoversNodeAddress: the underlay's own WireGuard packets would
    be steered into the mesh); one that overlaps a Service range the
    controller was given (CoversServiceCIDR); and one that, with the routes
    accepted before it, would cover every address of its family
    (CoversEverything: 0.0.0.0/1 and 128.0.0.0/1 are 0.0.0.0/0 in two parts).

BlockPolicy
    cidrPairs go to every node; nodePairs are never peered; an isolated node
    has no peers and nobody peers with it; a drained node is never a `via`.
    A name that is not (yet) a node is harmless and applies when it joins.
    The data plane enforces at most BLOCK_CAPACITY distinct CIDR pairs (a bit
    each in the classifier's rule bitmap); a daemon refuses a larger set
    whole. So policies are taken in name order while the distinct pairs fit,
    and one whose pairs would overflow is refused (BlockCapacityExceeded): its
    cidrPairs are not applied, its nodePairs, isolate and drain still are, and
    a later, smaller policy that fits is still taken.

Nodes
    A node without a public key yet is not peered with, and peers with no one
    (a one-sided peer could not complete a handshake); it still gets its own
    state. A pod CIDR that overlaps another node's (WireGuard would silently
    move it between peers) is kept by the node whose name sorts first and left
    out of the other node's allowed IPs. Both are reported on the VpbluNode,
    as is a node with no endpoint. Two nodes reporting one public key cannot
    both be peers (WireGuard knows a peer by its key): the one whose name
    sorts first keeps it, the other is treated as keyless and told so
    (DuplicatePublicKey).

Conditions
    One condition of type "Accepted" per object read: status True when
    everything it asked for is in force, else False with the reason of its
    first problem and a message listing all of them (the entries that are
    fine stay in force), cut at MESSAGE_LIMIT characters with a count of the
    rest ("… and 37 more problems"): a 4096-route policy must not write a
    status the size of its spec. Sorted, so equal inputs give equal tuples.
    RotationPolicy is not read here: the RotationActor owns key rotation.
    The TunnelPolicy in force also gets one of type "PodRanges" (status
    True): which pod ranges the steering and the cleartext guard cover and
    where each comes from (see Pod ranges).

Pod ranges (every node's DataPath.cluster_cidrs)
    The union, collapsed, of the TunnelPolicy's clusterCIDRs, the controller's
    configured cluster CIDRs (`--cluster-cidr`), every Node podCIDR the
    controller remembers (vpblu.core.podranges: deleted Nodes' too) and every
    Node's podCIDRs now. A deleted Node's range stays in it: its machine may
    still run pods a stale route leads to, and that traffic must be dropped
    or tunnelled, never sent in the clear.

Cost (N nodes, P peers per node, R RoutePolicy routes)
    `compute` is O(N log N + R log R) to plan plus the size of its output,
    O(N * P); for FullMesh each state is assembled by slicing shared, sorted
    tuples, so the per-state Python work is O(1 + own CIDRs) and the rest is
    pointer copying. `diff` is one merge walk, O(size of both states).
    `recompute` is O(N log N + R log R + |dirty| * N) where `dirty` is the set
    of nodes whose peer entry or peerability changed: one node joining a
    1000-node FullMesh touches every state once, O(N), never O(N^2).
    (bench/desiredstate.py measures a 4096-route policy.)
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

import attrs

from vpblu.core.changes import (
    RouteKey,
    apply,
    block_key,
    canonical_state,
    diff,
    route_key,
)
from vpblu.core.model import (
    DEFAULT_KEEPALIVE,
    DEFAULT_LISTEN_PORT,
    BlockPolicy,
    Change,
    CidrPair,
    ClusterSnapshot,
    Condition,
    ConditionStatus,
    DataPath,
    DataPathChanged,
    Endpoint,
    IPNetwork,
    NodeDesiredState,
    NodeInfo,
    Peer,
    PeerAdded,
    PeerChanged,
    PeerRemoved,
    Route,
    RouteAdded,
    RoutePolicy,
    RouteRemoved,
    TunnelMode,
    TunnelPolicy,
)
from vpblu.core.spans import Piece as _Piece
from vpblu.core.spans import Span
from vpblu.core.spans import bits as _bits
from vpblu.core.spans import collapse as _collapse
from vpblu.core.spans import cover as _cover
from vpblu.core.spans import span as _span

ACCEPTED = "Accepted"

BLOCK_CAPACITY = 128
"""Distinct CIDR pairs the data plane enforces at once, across every
BlockPolicy: the bits of the classifier's rule bitmap
(vpblu.node.kernel.bpftables.BLOCK_RULE_LIMIT, which the core may not import;
a unit test keeps the two, and the CRD's cidrPairs maxItems, equal)."""

MESSAGE_LIMIT = 1024
"""The longest condition message the core writes, in characters."""

_KIND_TUNNEL = "TunnelPolicy"
_KIND_ROUTE = "RoutePolicy"
_KIND_BLOCK = "BlockPolicy"
_KIND_NODE = "VpbluNode"


# --- results ---------------------------------------------------------------------


@attrs.frozen(slots=True, eq=False)
class Topology:
    """How the mesh is wired for one snapshot, before it is spread into states.

    `peers` holds one shared `Peer` per node that can be peered (has a key, is
    not isolated, the mesh is on); `routes` the routes via that node. The
    sorted `mesh_peers`/`mesh_routes` tuples let a FullMesh state be cut out
    of them by slicing. Internal to the core; exposed for `recompute`.
    """

    snapshot: ClusterSnapshot
    mode: TunnelMode | None
    listen_port: int
    peers: Mapping[str, Peer]
    routes: Mapping[str, tuple[Route, ...]]
    blocked: Mapping[str, frozenset[str]]
    explicit: Mapping[str, frozenset[str]]
    blocks: tuple[CidrPair, ...]
    mesh_peers: tuple[Peer, ...]
    mesh_routes: tuple[Route, ...]
    peer_index: Mapping[str, int]
    route_index: Mapping[str, tuple[int, ...]]
    datapaths: Mapping[str, DataPath]

    def is_neighbour(self, node: str, other: str) -> bool:
        """True when `node` and `other` peer with each other (symmetric)."""
        if node == other or node not in self.peers or other not in self.peers:
            return False
        if other in self.blocked.get(node, ()):
            return False
        return self.mode is TunnelMode.FULL_MESH or other in self.explicit.get(node, ())


@attrs.frozen(slots=True)
class DesiredResult:
    """Every node's desired state (in node-name order) and the conditions."""

    states: Mapping[str, NodeDesiredState]
    conditions: tuple[Condition, ...]
    topology: Topology = attrs.field(eq=False, repr=False)


@attrs.frozen(slots=True)
class Recomputed:
    """What `recompute` found: the new result, and per node the changes that
    take its previous state to the new one (only nodes that changed; a node
    new to the cluster is diffed from an empty state); `removed` are nodes
    that left the snapshot."""

    result: DesiredResult
    changes: Mapping[str, tuple[Change, ...]]
    removed: frozenset[str]


# --- conditions ------------------------------------------------------------------


Message = str | Callable[[], str]
"""A condition message, or what makes it: a 4096-route policy may have
thousands of problems and only the first few fit in a condition, so route
messages are formatted when shown (an IP network's str() is slow)."""



@attrs.frozen(slots=True)
class _Problem:
    reason: str
    message: Message


class _Findings:
    """Problems per object, in the order found; becomes one condition each."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], list[_Problem]] = {}
        self._notes: dict[tuple[str, str], list[str]] = {}
        self._others: list[Condition] = []  # conditions of other types than Accepted

    def condition(self, condition: Condition) -> None:
        self._others.append(condition)

    def read(self, kind: str, name: str) -> None:
        self._objects.setdefault((kind, name), [])

    def problem(self, kind: str, name: str, reason: str, message: Message) -> None:
        self._objects.setdefault((kind, name), []).append(_Problem(reason, message))

    def note(self, kind: str, name: str, message: str) -> None:
        """Something an operator must see on an object that is in force."""
        self._notes.setdefault((kind, name), []).append(message)

    def conditions(self) -> tuple[Condition, ...]:
        out = []
        for (kind, name), problems in self._objects.items():
            if problems:
                out.append(
                    Condition(
                        kind=kind,
                        name=name,
                        type=ACCEPTED,
                        status=ConditionStatus.FALSE.value,
                        reason=problems[0].reason,
                        message=_capped([p.message for p in problems], "problem"),
                    )
                )
            else:
                out.append(
                    Condition(
                        kind=kind,
                        name=name,
                        type=ACCEPTED,
                        status=ConditionStatus.TRUE.value,
                        reason=ACCEPTED,
                        message=_capped(["in force", *self._notes.get((kind, name), ())],
                                        "note"),
                    )
                )
        out.extend(self._others)
        # One condition per (kind, name, type), so this key orders them
        # exactly as Condition's own order would, without attrs' slow __lt__.
        return tuple(sorted(out, key=lambda c: (c.kind, c.name, c.type)))


def _capped(parts: Sequence[Message], noun: str, limit: int = MESSAGE_LIMIT) -> str:
    """`parts` joined by "; ", at most `limit` characters: whole parts while
    they fit, then how many were left out ("… and 12 more problems"). Parts
    past the limit are never formatted."""
    shown: list[str] = []
    size = -2  # no separator before the first part
    for part in parts:
        text = part if isinstance(part, str) else part()
        shown.append(text)
        size += 2 + len(text)
        if size > limit:
            break
    else:
        return "; ".join(shown)

    def more(count: int) -> str:
        return f"; … and {count} more {noun}{'' if count == 1 else 's'}" if count else ""

    size, kept = -2, 0
    for text in shown:
        grown = size + 2 + len(text)
        if grown + len(more(len(parts) - kept - 1)) > limit:
            break
        size, kept = grown, kept + 1
    if kept == 0:  # the first part alone is too long: cut it
        tail = more(len(parts) - 1)
        return shown[0][: limit - len(tail) - 1] + "…" + tail
    return "; ".join(shown[:kept]) + more(len(parts) - kept)


# --- planning --------------------------------------------------------------------


@attrs.frozen(slots=True)
class _Claim:
    first: int
    last: int
    owner: str
    cidr: IPNetwork


class _Claims:
    """Disjoint address ranges, each owned by one node, searchable by bisect.
    The methods that take a `Span` are for callers that hold one already."""

    def __init__(self) -> None:
        self._starts: list[tuple[int, int]] = []
        self._claims: list[_Claim] = []

    @staticmethod
    def _span(net: IPNetwork) -> Span:
        return _span(net)

    def holder(self, net: IPNetwork) -> _Claim | None:
        """The claim overlapping `net`, if any (there is at most one that
        matters: claims are disjoint and CIDRs either nest or are apart)."""
        return self._holder(self._span(net))

    def _holder(self, span: Span) -> _Claim | None:
        version, first, last = span
        i = bisect.bisect_right(self._starts, (version, last))
        if i == 0:
            return None
        claim = self._claims[i - 1]
        if self._starts[i - 1][0] == version and claim.last >= first:
            return claim
        return None

    def add(self, net: IPNetwork, owner: str, span: Span | None = None) -> None:
        version, first, last = span or self._span(net)
        i = bisect.bisect_right(self._starts, (version, first))
        self._starts.insert(i, (version, first))
        self._claims.insert(i, _Claim(first, last, owner, net))

    def overlapping(self, net: IPNetwork) -> list[_Claim]:
        """Every claim overlapping `net`."""
        version, first, last = self._span(net)
        lo = bisect.bisect_left(self._starts, (version, first))
        found = []
        if lo > 0 and self._starts[lo - 1][0] == version and self._claims[lo - 1].last >= first:
            found.append(self._claims[lo - 1])
        hi = bisect.bisect_right(self._starts, (version, last))
        found.extend(self._claims[lo:hi])
        return found

    def container(self, span: Span) -> _Claim | None:
        """The claim that contains the span (or equals it), if any."""
        claim = self._holder(span)
        if claim is None:
            return None
        return claim if claim.first <= span[1] and claim.last >= span[2] else None

    def inside(self, span: Span) -> range:
        """The positions of the claims that lie inside the span (all of them
        start in it; one that starts there and is larger contains it, and
        `container` is the question for that)."""
        version, first, last = span
        lo = bisect.bisect_left(self._starts, (version, first))
        hi = bisect.bisect_right(self._starts, (version, last))
        if lo < hi and self._claims[lo].first == first and self._claims[lo].last > last:
            lo += 1
        return range(lo, hi)

    def __getitem__(self, position: int) -> _Claim:
        return self._claims[position]

    def absorb(self, net: IPNetwork, owner: str, span: Span, inside: range) -> None:
        """Replace the claims inside `net` (`inside(span)`) by one claim on `net`."""
        self._starts[inside.start:inside.stop] = [span[:2]]
        self._claims[inside.start:inside.stop] = [_Claim(span[1], span[2], owner, net)]


_Refusal = tuple[str, Callable[[], str]]


class _RouteLimits:
    """What a RoutePolicy route must stay clear of, searchable by bisect.

    Every node's pod CIDRs: a route may equal one or lie inside one (moving a
    pod range, or part of one, to another tunnel) but not strictly contain the
    pod CIDR of a node other than its `via`. Every node's InternalIP: steering
    the node network into the mesh would send the tunnels' own UDP into the
    tunnels. The Service ranges: their addresses are translated to pods before
    routing, and a route over them only hides where a Service's traffic goes.
    """

    def __init__(self, nodes: Iterable[NodeInfo], service_cidrs: Iterable[IPNetwork]) -> None:
        pods = sorted(((*_span(c)[:2], c.prefixlen, n.name, c) for n in nodes for c in n.pod_cidrs),
                      key=operator.itemgetter(0, 1, 2, 3))
        self._pod_starts = [(version, first) for version, first, *_ in pods]
        self._pods = [(prefixlen, owner, cidr) for _, _, prefixlen, owner, cidr in pods]
        ips = sorted(((ip.version, int(ip)), n.name, ip)
                     for n in nodes if (ip := n.internal_ip) is not None)
        self._ips = [at for at, _, _ in ips]
        self._ip_owners = [(name, ip) for _, name, ip in ips]
        self._services = tuple(service_cidrs)

    def problem(self, cidr: IPNetwork, span: Span, via: str) -> _Refusal | None:
        """Why the route must be ignored, or None. O(log N + S), plus the pod
        CIDRs of `via` itself that lie inside `cidr` (one, in any real cluster)."""
        if cidr.prefixlen == 0:
            return ("DefaultRoute", lambda: f"route {cidr} via {via} ignored: it is every"
                                            " address, a default route, not a pod range")
        version, first, last = span
        i = bisect.bisect_left(self._ips, (version, first))
        if i < len(self._ips) and self._ips[i] <= (version, last):
            owner, ip = self._ip_owners[i]
            return ("CoversNodeAddress",
                    lambda: f"route {cidr} via {via} ignored: it covers {ip}, the InternalIP of"
                            f" node {owner}; the node network must stay outside the mesh,"
                            " whose tunnels run over it")
        for service in self._services:
            if service.version == version and service.overlaps(cidr):
                return ("CoversServiceCIDR", lambda service=service: f"route {cidr} via {via}"
                        f" ignored: it overlaps the Service range {service}")
        lo = bisect.bisect_left(self._pod_starts, (version, first))
        hi = bisect.bisect_right(self._pod_starts, (version, last))
        for position in range(lo, hi):
            # Starting inside `cidr` and smaller than it: inside it.
            prefixlen, owner, pod = self._pods[position]
            if prefixlen > cidr.prefixlen and owner != via:
                return ("CoversPodCIDR",
                        lambda pod=pod, owner=owner: f"route {cidr} via {via} ignored: it"
                        f" contains {pod}, the whole pod CIDR of node {owner}; a route may move"
                        " a pod CIDR or a part of one, not a range of several")
        return None


class _Routed:
    """The routes accepted so far, for the conflict checks, in O(log R) each.

    Routes that overlap are all via one node (or the later would have been
    refused), so the accepted routes form disjoint regions, each the
    outermost CIDR of a group of nested routes via one node: "a route via
    another node overlaps this one" is "a region via another node contains
    it, or lies inside it", and the second is two counts by bisect - all the
    regions inside it against those of its own `via`.
    """

    def __init__(self) -> None:
        self._regions = _Claims()
        self._starts_by_via: dict[str, list[tuple[int, int]]] = {}
        self._first: dict[Span, _Override] = {}  # the first accepted route per CIDR
        self._covered = {4: 0, 6: 0}  # addresses inside the regions

    def take(self, route: _Override, span: Span) -> _Refusal | None:
        """Accept `route`, or say why not: another node's route overlaps it,
        or with the routes before it, it would cover every address of its
        family. O(log R), plus the regions it absorbs (each once)."""
        cidr, via = route.cidr, route.via
        same = self._first.get(span)
        if same is not None:
            if same.via == via:
                return None  # agreement: it is in force already
            return ("ConflictingRoute",
                    lambda: f"route {cidr} via {via} ignored: RoutePolicy {same.policy!r}"
                            f" already routes it via {same.via}")
        container = self._regions.container(span)
        if container is not None:
            if container.owner != via:
                return self._overlap(cidr, via, container)
            self._first[span] = route
            return None  # inside a region via the same node: nothing moves
        inside = self._regions.inside(span)
        version, first, last = span
        mine = self._starts_by_via.setdefault(via, [])
        below = bisect.bisect_left(mine, (version, first))
        above = bisect.bisect_right(mine, (version, last))
        if above - below != len(inside):
            return self._overlap(cidr, via, self._regions[self._first_other(inside, span, mine)])
        size = last - first + 1
        absorbed = 0
        if inside:
            absorbed = sum(self._regions[i].last - self._regions[i].first + 1 for i in inside)
        if self._covered[version] + size - absorbed >= 1 << _bits(version):
            return ("CoversEverything",
                    lambda: f"route {cidr} via {via} ignored: with the routes accepted"
                            f" before it, the mesh would route every IPv{version} address")
        self._regions.absorb(cidr, via, span, inside)
        self._covered[version] += size - absorbed
        mine[below:above] = [(version, first)]
        self._first[span] = route
        return None

    def _first_other(self, inside: range, span: Span, mine: list[tuple[int, int]]) -> int:
        """The position of the first region inside `span` that is not in
        `mine`: the count of such regions up to a position only grows along
        it, so bisect. O(log^2 R)."""
        version, first, _ = span
        below = bisect.bisect_left(mine, (version, first))
        lo, hi = inside.start, inside.stop - 1
        while lo < hi:
            mid = (lo + hi) // 2
            start = (version, self._regions[mid].first)
            if (mid - inside.start + 1) - (bisect.bisect_right(mine, start) - below) > 0:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _overlap(self, cidr: IPNetwork, via: str, claim: _Claim) -> _Refusal:
        other = self._first[(cidr.version, claim.first, claim.last)]
        return ("OverlappingRoute",
                lambda: f"route {cidr} via {via} ignored: it overlaps {other.cidr} which"
                        f" RoutePolicy {other.policy!r} routes via {other.via}")


@attrs.frozen(slots=True)
class _Override:
    cidr: IPNetwork
    via: str
    policy: str


def _tunnel(
    policies: Sequence[TunnelPolicy], nodes: Mapping[str, NodeInfo], findings: _Findings
) -> tuple[TunnelPolicy | None, dict[str, frozenset[str]]]:
    ordered = sorted(policies, key=operator.attrgetter("name"))
    if not ordered:
        return None, {}
    winner = ordered[0]
    for loser in ordered[1:]:
        findings.problem(
            _KIND_TUNNEL,
            loser.name,
            "Superseded",
            f"TunnelPolicy {winner.name!r} is in force; only one TunnelPolicy applies",
        )
    findings.read(_KIND_TUNNEL, winner.name)
    if winner.fail_open:
        findings.note(_KIND_TUNNEL, winner.name,
                      "failOpen: traffic to a pod range without a tunnel leaves UNENCRYPTED")
    explicit: dict[str, set[str]] = {}
    if winner.mode is TunnelMode.EXPLICIT:
        for pair in sorted(sorted(p) for p in winner.peerings):
            unknown = [n for n in pair if n not in nodes]
            if unknown:
                findings.problem(
                    _KIND_TUNNEL,
                    winner.name,
                    "UnknownNode",
                    f"peering {pair[0]}-{pair[1]} ignored: no node {', '.join(unknown)}",
                )
                continue
            explicit.setdefault(pair[0], set()).add(pair[1])
            explicit.setdefault(pair[1], set()).add(pair[0])
    return winner, {k: frozenset(v) for k, v in explicit.items()}


def _block(
    policies: Sequence[BlockPolicy], findings: _Findings, capacity: int = BLOCK_CAPACITY
) -> tuple[dict[str, frozenset[str]], frozenset[str], frozenset[str], tuple[CidrPair, ...]]:
    blocked: dict[str, set[str]] = {}
    isolated: set[str] = set()
    drained: set[str] = set()
    pairs: set[CidrPair] = set()
    for policy in policies:
        findings.read(_KIND_BLOCK, policy.name)
        for pair in policy.node_pairs:
            a, b = pair
            blocked.setdefault(a, set()).add(b)
            blocked.setdefault(b, set()).add(a)
        isolated.update(policy.isolate)
        drained.update(policy.drain)
        wanted = set(policy.cidr_pairs)
        new = wanted - pairs
        if len(pairs) + len(new) <= capacity:
            pairs |= new
            continue
        rest = [what for what, present in (("nodePairs", policy.node_pairs),
                                           ("isolate", policy.isolate),
                                           ("drain", policy.drain)) if present]
        findings.problem(
            _KIND_BLOCK,
            policy.name,
            "BlockCapacityExceeded",
            f"its {len(wanted)} cidrPairs are not applied: they would make"
            f" {len(pairs) + len(new)} distinct blocked CIDR pairs, and the data plane"
            f" holds at most {capacity} ({len(pairs)} in use by the BlockPolicies that"
            " sort before it)"
            + (f"; its {', '.join(rest)} {'are' if len(rest) > 1 else 'is'} in force"
               if rest else ""),
        )
    blocks = tuple(sorted(pairs, key=block_key))
    return (
        {k: frozenset(v) for k, v in blocked.items()},
        frozenset(isolated),
        frozenset(drained),
        blocks,
    )


def _claim_pod_cidrs(
    ordered: Sequence[NodeInfo], findings: _Findings
) -> tuple[_Claims, dict[str, list[IPNetwork]]]:
    claims = _Claims()
    kept: dict[str, list[IPNetwork]] = {}
    for node in ordered:
        mine = kept.setdefault(node.name, [])
        for cidr in node.pod_cidrs:
            holder = claims.holder(cidr)
            if holder is None:
                claims.add(cidr, node.name)
                mine.append(cidr)
            elif holder.owner != node.name:
                findings.problem(
                    _KIND_NODE,
                    node.name,
                    "OverlappingPodCIDR",
                    f"pod CIDR {cidr} overlaps {holder.cidr} of node {holder.owner}"
                    " and is left out of this node's allowed IPs",
                )
            # else: nested inside one of its own CIDRs, already covered.
    return claims, kept


def _overrides(
    policies: Sequence[RoutePolicy],
    nodes: Mapping[str, NodeInfo],
    isolated: frozenset[str],
    drained: frozenset[str],
    service_cidrs: Sequence[IPNetwork],
    findings: _Findings,
) -> list[_Override]:
    # O(R log R) for R routes, plus O(N log N) to index the nodes once there is a route.
    accepted: list[_Override] = []
    routed = _Routed()
    limits: _RouteLimits | None = None
    for policy in sorted(policies, key=operator.attrgetter("name")):
        findings.read(_KIND_ROUTE, policy.name)
        for route in policy.routes:
            cidr, via = route.cidr, route.via
            problem: _Refusal | tuple[str, str] | None = None
            if via not in nodes:
                problem = ("UnknownNode", f"route {cidr} via {via} ignored: no node {via}")
            elif via in isolated:
                problem = ("NodeIsolated", f"route {cidr} via {via} ignored: {via} is isolated")
            elif via in drained:
                problem = ("NodeDrained", f"route {cidr} via {via} ignored: {via} is drained")
            else:
                if limits is None:
                    limits = _RouteLimits(nodes.values(), service_cidrs)
                span = _span(cidr)
                problem = limits.problem(cidr, span, via)
                if problem is None:
                    override = _Override(cidr, via, policy.name)
                    problem = routed.take(override, span)
                    if problem is None:
                        accepted.append(override)
                        continue
            findings.problem(_KIND_ROUTE, policy.name, *problem)
    return accepted


def _subtract(pieces: Sequence[IPNetwork], cuts: Sequence[IPNetwork]) -> list[_Piece]:
    """The addresses of `pieces` outside every CIDR of `cuts`, as spans.

    One sorted sweep, O((P + C) log C) plus the output: cutting the pieces by
    one CIDR after the other (address_exclude) was O(P * C), P growing with
    every split, and 4096 small routes out of one pod CIDR took seconds."""
    merged: list[list[int]] = []  # [version, first, last], disjoint, sorted
    for version, first, last in sorted(_span(c) for c in cuts):
        if merged and merged[-1][0] == version and first <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], last)
        else:
            merged.append([version, first, last])
    starts = [(version, first) for version, first, _ in merged]
    out: list[_Piece] = []
    for piece in pieces:
        version, first, last = _span(piece)
        i = max(bisect.bisect_right(starts, (version, first)) - 1, 0)
        cursor = first
        while i < len(merged) and (merged[i][0], merged[i][1]) <= (version, last):
            cut_version, cut_first, cut_last = merged[i]
            if cut_version == version and cut_last >= cursor:
                if cut_first > cursor:
                    out.append((version, cursor, cut_first - 1, None))
                cursor = cut_last + 1
            i += 1
        if cursor == first:
            out.append((version, first, last, piece))  # untouched
        elif cursor <= last:
            out.append((version, cursor, last, None))
    return out


def _allowed_ips(
    kept: Mapping[str, list[IPNetwork]], claims: _Claims, overrides: Sequence[_Override]
) -> dict[str, tuple[IPNetwork, ...]]:
    cuts: dict[str, list[IPNetwork]] = {}
    gains: dict[str, list[IPNetwork]] = {}
    for override in overrides:
        gains.setdefault(override.via, []).append(override.cidr)
        for claim in claims.overlapping(override.cidr):
            cuts.setdefault(claim.owner, []).append(override.cidr)
    allowed: dict[str, tuple[IPNetwork, ...]] = {}
    for name, cidrs in kept.items():
        if name not in cuts and name not in gains:
            # Already canonical: NodeInfo sorts, and claims are disjoint.
            allowed[name] = tuple(cidrs) if len(cidrs) < 2 else _collapse(cidrs)
            continue
        cut = cuts.get(name)
        pieces: list[_Piece] = (_subtract(cidrs, cut) if cut
                                else [(*_span(c), c) for c in cidrs])
        pieces.extend((*_span(c), c) for c in gains.get(name, ()))
        allowed[name] = _cover(pieces)
    return allowed


def _same_endpoint(endpoint: Endpoint | None, node: NodeInfo, listen_port: int) -> bool:
    """`endpoint` is what `_peer` would build for `node` (without building one:
    parsing its address is most of a recompute's per-node cost)."""
    if node.endpoint_override is not None:
        return endpoint == node.endpoint_override
    if node.internal_ip is None:
        return endpoint is None
    return (endpoint is not None and endpoint.port == listen_port
            and endpoint.host == node.internal_ip)


def _peer(
    node: NodeInfo,
    public_key: str,
    allowed: tuple[IPNetwork, ...],
    listen_port: int,
    keepalive: int,
    previous: Peer | None,
) -> Peer:
    endpoint = node.endpoint_override
    if (
        previous is not None
        and previous.public_key == public_key
        and previous.allowed_ips == allowed
        and previous.persistent_keepalive == keepalive
        and _same_endpoint(previous.endpoint, node, listen_port)
    ):
        # Keep the very object so unchanged peers compare by identity, cheaply.
        return previous
    if endpoint is None and node.internal_ip is not None:
        endpoint = Endpoint(node.internal_ip, listen_port)
    return Peer(
        name=node.name,
        public_key=public_key,
        endpoint=endpoint,
        allowed_ips=allowed,
        persistent_keepalive=keepalive,
    )


def plan(
    snapshot: ClusterSnapshot,
    previous: Topology | None = None,
    *,
    service_cidrs: Sequence[IPNetwork] = (),
) -> tuple[Topology, tuple[Condition, ...]]:
    """Resolve every rule for `snapshot` into a Topology and its conditions.

    O(N log N + R log R) for N nodes and R RoutePolicy routes. With
    `previous`, peers whose inputs did not change are the previous objects
    themselves. `service_cidrs` are the cluster's Service ranges (the
    controller's configuration: the API does not publish them), which no
    route may cover.
    """
    findings = _Findings()
    ordered = sorted(snapshot.nodes, key=operator.attrgetter("name"))
    nodes = {node.name: node for node in ordered}
    tunnel, explicit = _tunnel(snapshot.tunnel_policies, nodes, findings)
    blocked, isolated, drained, blocks = _block(
        sorted(snapshot.block_policies, key=operator.attrgetter("name")), findings
    )
    for node in ordered:
        findings.read(_KIND_NODE, node.name)
        if tunnel is None:
            findings.problem(
                _KIND_NODE,
                node.name,
                "NoTunnelPolicy",
                "no TunnelPolicy exists, so the mesh is off",
            )
    claims, kept = _claim_pod_cidrs(ordered, findings)
    overrides = _overrides(snapshot.route_policies, nodes, isolated, drained, service_cidrs,
                           findings)
    allowed = _allowed_ips(kept, claims, overrides)

    listen_port = tunnel.listen_port if tunnel is not None else DEFAULT_LISTEN_PORT
    keepalive = tunnel.persistent_keepalive if tunnel is not None else DEFAULT_KEEPALIVE
    old_peers = previous.peers if previous is not None else {}
    old_routes = previous.routes if previous is not None else {}
    peers: dict[str, Peer] = {}
    routes: dict[str, tuple[Route, ...]] = {}
    key_holders: dict[str, str] = {}
    for node in ordered:
        name = node.name
        public_key = node.public_key
        if public_key is None:
            findings.problem(
                _KIND_NODE,
                name,
                "NoPublicKey",
                "no public key yet: no node peers with it until its daemon reports one",
            )
        elif (holder := key_holders.setdefault(public_key, name)) != name:
            findings.problem(
                _KIND_NODE,
                name,
                "DuplicatePublicKey",
                f"node {holder} reports the same public key {public_key}: WireGuard tells"
                f" peers apart by key, so only {holder} (first by name) is peered; this node"
                " is not, until its daemon reports a key of its own",
            )
            public_key = None
        if node.endpoint_override is None and node.internal_ip is None:
            findings.problem(
                _KIND_NODE,
                name,
                "NoEndpoint",
                "no InternalIP and no spec.endpoint: its peers wait for it to reach them",
            )
        if tunnel is None or public_key is None or name in isolated:
            continue
        old = old_peers.get(name)
        peer = _peer(node, public_key, allowed[name], listen_port, keepalive, old)
        peers[name] = peer
        if peer is old:
            routes[name] = old_routes[name]
        else:
            routes[name] = tuple(Route(cidr, name) for cidr in peer.allowed_ips)

    datapaths = _datapaths(ordered, tunnel, previous, snapshot)
    if tunnel is not None:
        findings.condition(_pod_ranges_condition(tunnel, snapshot, ordered))
    mesh_peers = tuple(peers.values())  # already in name order
    mesh_routes = tuple(sorted(itertools.chain.from_iterable(routes.values()), key=route_key))
    positions: dict[str, list[int]] = {}
    for i, route in enumerate(mesh_routes):
        positions.setdefault(route.via, []).append(i)
    topology = Topology(
        snapshot=snapshot,
        mode=tunnel.mode if tunnel is not None else None,
        listen_port=listen_port,
        peers=peers,
        routes=routes,
        blocked=blocked,
        explicit=explicit,
        blocks=blocks,
        mesh_peers=mesh_peers,
        mesh_routes=mesh_routes,
        peer_index={name: i for i, name in enumerate(peers)},
        route_index={name: tuple(p) for name, p in positions.items()},
        datapaths=datapaths,
    )
    return topology, findings.conditions()


def _datapaths(
    ordered: Sequence[NodeInfo], tunnel: TunnelPolicy | None, previous: Topology | None,
    snapshot: ClusterSnapshot,
) -> dict[str, DataPath]:
    """Each node's DataPath: its own pod CIDRs, and every pod range of the
    cluster - all nodes' pod CIDRs (overlapping ones and those of nodes without
    a key or isolated included: they are pod ranges all the same, and traffic
    to them must never leave in the clear), the TunnelPolicy's clusterCIDRs,
    the controller's cluster CIDRs and the remembered podCIDRs of every Node
    seen (deleted ones too), collapsed. No TunnelPolicy at all is fail-closed
    too: the mesh is off, so cross-node pod traffic is dropped, not sent in
    the clear. Unchanged values are the previous objects, so states compare
    by identity."""
    fail_open = tunnel.fail_open if tunnel is not None else False
    extra = tunnel.cluster_cidrs if tunnel is not None else ()
    cluster = _collapse({*extra, *snapshot.cluster_cidrs,
                         *(r.cidr for r in snapshot.remembered_pod_ranges),
                         *itertools.chain.from_iterable(n.pod_cidrs for n in ordered)})
    old = previous.datapaths if previous is not None else {}
    old_cluster = next(iter(old.values())).cluster_cidrs if old else None
    if cluster == old_cluster:
        cluster = old_cluster
    out: dict[str, DataPath] = {}
    for node in ordered:
        was = old.get(node.name)
        if (was is not None and was.cluster_cidrs is cluster and was.fail_open == fail_open
                and was.local_cidrs == node.pod_cidrs):
            out[node.name] = was
        else:
            out[node.name] = _datapath(node.pod_cidrs, cluster, fail_open)
    return out


def _pod_ranges_condition(tunnel: TunnelPolicy, snapshot: ClusterSnapshot,
                          ordered: Sequence[NodeInfo]) -> Condition:
    """The TunnelPolicy's PodRanges condition: the sources of cluster_cidrs.
    It lists the named ranges and the remembered ranges no Node holds now,
    not every Node's podCIDR, so a join does not rewrite it."""
    named = []
    if tunnel.cluster_cidrs:
        named.append(f"spec.clusterCIDRs {', '.join(map(str, tunnel.cluster_cidrs))}")
    if snapshot.cluster_cidrs:
        named.append(f"the controller's --cluster-cidr "
                     f"{', '.join(map(str, snapshot.cluster_cidrs))}")
    live = {c for n in ordered for c in n.pod_cidrs}
    deleted = [r for r in snapshot.remembered_pod_ranges if r.cidr not in live]
    head = ("traffic to these pod ranges goes into the mesh or is dropped, and the "
            "cleartext guard watches for them: " + "; ".join(
                [*named, "every Node's podCIDRs"]))
    if deleted:
        head += ("; the podCIDRs of Nodes that are gone, remembered in ConfigMap "
                 "vpblu-system/vpblu-pod-ranges")
    elif not named:
        head += (" (no range is named: set spec.clusterCIDRs or the controller's "
                 "--cluster-cidr to cover ranges no Node holds yet)")
    parts: list[Message] = [head, *(f"{r.cidr} (was {r.node or 'a Node'}'s)" for r in deleted)]
    return Condition(_KIND_TUNNEL, tunnel.name, "PodRanges", ConditionStatus.TRUE.value,
                     "Configured" if named else "NodePodCIDRs",
                     _capped(parts, "remembered range"))


def _datapath(local: tuple[IPNetwork, ...], cluster: tuple[IPNetwork, ...],
              fail_open: bool) -> DataPath:
    # Both tuples are canonical already (NodeInfo sorts, _collapse sorts): skip
    # the converters, which would sort the cluster's ranges once per node.
    datapath = object.__new__(DataPath)
    object.__setattr__(datapath, "local_cidrs", local)
    object.__setattr__(datapath, "cluster_cidrs", cluster)
    object.__setattr__(datapath, "fail_open", fail_open)
    return datapath


# --- states ----------------------------------------------------------------------


def state_for(topology: Topology, node: str) -> NodeDesiredState:
    """One node's desired state. FullMesh without blocked partners is cut from
    the shared sorted tuples: O(own CIDRs) Python work plus O(N) copying.
    Otherwise O(N) (FullMesh with blocks) or O(P log P) (Explicit)."""
    t = topology
    if node not in t.peers:
        return canonical_state(node, t.listen_port, (), (), t.blocks, t.datapaths[node])
    blocked = [x for x in t.blocked.get(node, ()) if x in t.peers]
    if t.mode is TunnelMode.FULL_MESH and not blocked:
        i = t.peer_index[node]
        peers = t.mesh_peers[:i] + t.mesh_peers[i + 1 :]
        parts = []
        start = 0
        for pos in t.route_index.get(node, ()):
            parts.append(t.mesh_routes[start:pos])
            start = pos + 1
        parts.append(t.mesh_routes[start:])
        routes = parts[0] if len(parts) == 1 else tuple(itertools.chain.from_iterable(parts))
        return canonical_state(node, t.listen_port, peers, routes, t.blocks, t.datapaths[node])
    if t.mode is TunnelMode.FULL_MESH:
        excluded = {node, *blocked}
        peers = tuple(p for p in t.mesh_peers if p.name not in excluded)
        routes = tuple(r for r in t.mesh_routes if r.via not in excluded)
        return canonical_state(node, t.listen_port, peers, routes, t.blocks, t.datapaths[node])
    partners = sorted(x for x in t.explicit.get(node, ()) if t.is_neighbour(node, x))
    peers = tuple(t.peers[x] for x in partners)
    routes = tuple(
        sorted(itertools.chain.from_iterable(t.routes[x] for x in partners), key=route_key)
    )
    return canonical_state(node, t.listen_port, peers, routes, t.blocks, t.datapaths[node])


def compute(
    snapshot: ClusterSnapshot,
    previous: Topology | None = None,
    *,
    service_cidrs: Sequence[IPNetwork] = (),
) -> DesiredResult:
    """Every node's desired state and the conditions, for one snapshot.

    O(N log N + R log R) planning plus the output, O(N * P) pointer copies;
    at FullMesh the per-node Python work is O(1 + its own CIDRs). With
    `previous`, unchanged peers and routes are the previous objects, so
    states compare (and diff) by identity, in C."""
    topology, conditions = plan(snapshot, previous, service_cidrs=service_cidrs)
    states = {name: state_for(topology, name) for name in _node_names(snapshot)}
    return DesiredResult(MappingProxyType(states), conditions, topology)


def _node_names(snapshot: ClusterSnapshot) -> list[str]:
    return sorted({node.name for node in snapshot.nodes})


# --- differences -----------------------------------------------------------------


class LazyChanges(Mapping[str, tuple[Change, ...]]):
    """`diff_all(old, new)` as a mapping that diffs a node only when asked: a
    policy change recomputes every state, but a caller that sends a node its
    whole state (a mesh forming or going away) never needs that node's diff."""

    def __init__(self, old: DesiredResult, new: DesiredResult) -> None:
        self._old = old
        self._new = new
        self._diffs: dict[str, tuple[Change, ...]] = {}

    def __getitem__(self, name: str) -> tuple[Change, ...]:
        changes = self._diffs.get(name)
        if changes is None:
            state = self._new.states[name]  # KeyError: not a node of `new`
            before = self._old.states.get(name)
            if before is state:
                changes = ()
            else:
                changes = diff(before if before is not None else NodeDesiredState(node=name),
                               state)
            self._diffs[name] = changes
        if not changes:
            raise KeyError(name)
        return changes

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._new.states if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def diff_all(old: DesiredResult, new: DesiredResult) -> dict[str, tuple[Change, ...]]:
    """Per node of `new`, the changes from its state in `old` (an empty state
    if it is new); nodes whose state did not change are left out, and so are
    nodes only in `old` (their sessions end). A state that is the same object,
    or equal tuple by tuple (shared peers compare by identity, in C), costs
    next to nothing; a changed one costs one `diff`."""
    out: dict[str, tuple[Change, ...]] = {}
    for name, state in new.states.items():
        before = old.states.get(name)
        if before is state:
            continue
        changes = diff(before if before is not None else NodeDesiredState(node=name), state)
        if changes:
            out[name] = changes
    return out


# --- incremental -----------------------------------------------------------------


def recompute(
    previous: DesiredResult,
    snapshot: ClusterSnapshot,
    *,
    service_cidrs: Sequence[IPNetwork] = (),
) -> Recomputed:
    """The result for `snapshot`, and per node the changes from `previous`.

    Equal to `compute(snapshot, service_cidrs=...)` with `diff_all(previous,
    that)`, but when the Tunnel and Block policies are unchanged (node events,
    RoutePolicy edits) it only looks at `dirty` nodes - those whose peer entry
    or peerability changed, found by identity against the previous Topology -
    and updates each other state with `apply`: O(N log N + R log R + |dirty|
    * N). A node joining a 1000-node FullMesh is one dirty node: every other
    state gets one PeerAdded and one RouteAdded per CIDR, the new node gets a
    full state.
    When a Tunnel or Block policy changed, every state may change; it falls
    back to compute + diff_all, O(N * P).
    """
    old = previous.topology
    before = old.snapshot
    if (
        snapshot.tunnel_policies != before.tunnel_policies
        or snapshot.block_policies != before.block_policies
    ):
        result = compute(snapshot, old, service_cidrs=service_cidrs)
        return Recomputed(
            result,
            LazyChanges(previous, result),
            frozenset(previous.states.keys() - result.states.keys()),
        )
    topology, conditions = plan(snapshot, old, service_cidrs=service_cidrs)
    dirty: list[str] = []
    flipped: set[str] = set()
    for name in old.peers.keys() | topology.peers.keys():
        was, now = old.peers.get(name), topology.peers.get(name)
        if was is now:
            continue
        dirty.append(name)
        if was is None or now is None:
            flipped.add(name)
    dirty.sort()
    seen: dict[tuple[str, str], _Moves] = {}
    states: dict[str, NodeDesiredState] = {}
    changes: dict[str, tuple[Change, ...]] = {}
    for name in _node_names(snapshot):
        state = previous.states.get(name)
        if state is None or name in flipped:
            new_state = state_for(topology, name)
            delta = diff(state if state is not None else NodeDesiredState(node=name), new_state)
        elif dirty and (name in old.peers or name in topology.peers):
            delta = _view_changes(old, topology, name, dirty, seen)
            new_state = apply(state, delta) if delta else state
        else:
            new_state, delta = state, ()
        datapath = topology.datapaths[name]
        if new_state.datapath is not datapath and new_state.datapath != datapath:
            new_state = apply(new_state, (DataPathChanged(datapath),))
            delta = (*delta, DataPathChanged(datapath))
        states[name] = new_state
        if delta:
            changes[name] = delta
    return Recomputed(
        DesiredResult(MappingProxyType(states), conditions, topology),
        MappingProxyType(changes),
        frozenset(previous.states.keys() - states.keys()),
    )


_Moves = tuple[tuple[Change, ...], tuple[tuple[RouteKey, Change], ...]]


def _view_changes(
    old: Topology,
    new: Topology,
    node: str,
    dirty: Sequence[str],
    seen: dict[tuple[str, str], _Moves] | None = None,
) -> tuple[Change, ...]:
    # What `node` sees change when the peers in `dirty` (sorted) changed, in
    # the same order `diff` would list it. O(|dirty| + changed routes). What
    # one dirty peer's change looks like is the same for every node that sees
    # it: `seen` keeps it across the nodes of one recompute (a peer carrying
    # a thousand RoutePolicy routes is compared once, not once per node).
    peer_changes: list[Change] = []
    route_changes: list[tuple[RouteKey, Change]] = []
    for other in dirty:
        was, now = old.is_neighbour(node, other), new.is_neighbour(node, other)
        if not (was or now):
            continue
        case = "changed" if was and now else "removed" if was else "added"
        moves = seen.get((other, case)) if seen is not None else None
        if moves is None:
            moves = _moves(old, new, other, case)
            if seen is not None:
                seen[(other, case)] = moves
        peer_changes.extend(moves[0])
        route_changes.extend(moves[1])
    route_changes.sort(key=operator.itemgetter(0))
    return (*peer_changes, *(change for _, change in route_changes))


def _moves(old: Topology, new: Topology, other: str, case: str) -> _Moves:
    if case == "changed":
        changed = old.peers[other] != new.peers[other]
        gone = set(old.routes[other])
        came = set(new.routes[other])
        return ((PeerChanged(new.peers[other]),) if changed else (),
                (*((route_key(r), RouteRemoved(r)) for r in gone - came),
                 *((route_key(r), RouteAdded(r)) for r in came - gone)))
    if case == "removed":
        return ((PeerRemoved(other),),
                tuple((route_key(r), RouteRemoved(r)) for r in old.routes[other]))
    return ((PeerAdded(new.peers[other]),),
            tuple((route_key(r), RouteAdded(r)) for r in new.routes[other]))
