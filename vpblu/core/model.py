"""The cluster as vpblu sees it: typed, immutable values, and nothing else.

This module owns the shapes of the objects the controller reads from the
Kubernetes API (Node, VpbluNode and the four policy kinds) once the watcher
boundary has turned raw API dicts into them, and the shapes of a node's
desired state. It never does I/O, never reads a clock and holds no state.

The Custom Resources (group ``vpblu.io``, version ``v1alpha1``, all
cluster-scoped) carry these spec fields; ``kustomize/base/crds`` is the schema
the API server enforces, this module is what the controller understands:

VpbluNode (name = the Node's name)
    spec.endpoint         optional "host:port" overriding the Node's InternalIP
    status.publicKey      the daemon's current WireGuard public key (base64)
    status.conditions     Ready, KeyRotation, ...

TunnelPolicy
    spec.mode             "FullMesh" | "Explicit"
    spec.listenPort       1..65535, default 51820
    spec.persistentKeepalive  0..65535 seconds, default 25 (0 = off)
    spec.peerings         Explicit only: [{nodes: [a, b]}], each an undirected pair
    spec.clusterCIDRs     optional extra pod ranges of the cluster (e.g. the whole
                          /16 the pod CIDRs are cut from): traffic to them that has
                          no tunnel is dropped, never sent in the clear (added to the
                          controller's --cluster-cidr and every Node podCIDR it has
                          seen, deleted Nodes' too: vpblu.core.podranges)
    spec.failOpen         default false; true lets traffic to a pod range without a
                          tunnel leave unencrypted (an explicit, visible migration aid)

RoutePolicy
    spec.routes           [{cidr: CIDR, via: nodeName}] — traffic to `cidr` goes
                          through `via`'s tunnel instead of the owner derived
                          from Node podCIDRs

BlockPolicy
    spec.cidrPairs        [{from: CIDR, to: CIDR}] dropped by the classifier
                          (one direction; list both to block both)
    spec.nodePairs        [{nodes: [a, b]}] never peered with each other
    spec.isolate          [nodeName] — no peers, and nobody peers with it
    spec.drain            [nodeName] — never chosen as a RoutePolicy `via`

RotationPolicy
    spec.schedule         5-field cron
    spec.overlapSeconds   how long peers accept both keys, 1..3600
    spec.maxConcurrent    how many nodes rotate at once, 1..16 (default 8); rotation
                          slot k listens on listenPort + k
    spec.nodes            optional [nodeName] it applies to (empty = all)
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import operator
from collections.abc import Iterable
from enum import Enum
from typing import Any

import attrs

from vpblu.core.spans import IPNetwork as IPNetwork
from vpblu.core.spans import collapse as collapse

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_LISTEN_PORT = 51820
DEFAULT_KEEPALIVE = 25
WG_KEY_LEN = 32


def network(value: str | IPNetwork) -> IPNetwork:
    """Parse a CIDR strictly (host bits must be zero): `10.0.0.1/24` is an error."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return ipaddress.ip_network(value, strict=True)


def _networks(values: Any) -> tuple[IPNetwork, ...]:
    return tuple(sorted({network(v) for v in values}, key=_net_key))


def _net_key(n: IPNetwork) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)


def check_public_key(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A WireGuard key is 32 bytes in standard base64 (44 characters)."""
    if value is None:
        return
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{attribute.name}: not base64: {exc}") from None
    if len(raw) != WG_KEY_LEN:
        raise ValueError(f"{attribute.name}: a WireGuard key is {WG_KEY_LEN} bytes, got {len(raw)}")


def _names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


def _check_port(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"{attribute.name}: port {value} is outside 1..65535")


def _check_keepalive(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name}: {value} is outside 0..65535")


def _check_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 253:
        raise ValueError(f"{attribute.name}: a node name is 1..253 characters, got {value!r}")


@attrs.frozen(slots=True, order=True)
class Endpoint:
    """Where a node's WireGuard listens on the underlay."""

    host: IPAddress = attrs.field(converter=ipaddress.ip_address)
    port: int = attrs.field(validator=_check_port)

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"endpoint {text!r} is not host:port")
        return cls(host.strip("[]"), int(port))


# Typed converters: mypy's attrs plugin cannot see through a bare `tuple`.
def _route_overrides(values: Iterable[RouteOverride]) -> tuple[RouteOverride, ...]:
    return tuple(values)

def _cidr_pairs(values: Iterable[CidrPair]) -> tuple[CidrPair, ...]:
    return tuple(values)

def _node_infos(values: Iterable[NodeInfo]) -> tuple[NodeInfo, ...]:
    return tuple(values)

def _tunnel_policies(values: Iterable[TunnelPolicy]) -> tuple[TunnelPolicy, ...]:
    return tuple(values)

def _route_policies(values: Iterable[RoutePolicy]) -> tuple[RoutePolicy, ...]:
    return tuple(values)

def _block_policies(values: Iterable[BlockPolicy]) -> tuple[BlockPolicy, ...]:
    return tuple(values)

def _rotation_policies(values: Iterable[RotationPolicy]) -> tuple[RotationPolicy, ...]:
    return tuple(values)


# --- what the watchers produce -------------------------------------------------


@attrs.frozen(slots=True)
class NodeInfo:
    """One Kubernetes node merged with its VpbluNode: everything the core needs."""

    name: str = attrs.field(validator=_check_name)
    internal_ip: IPAddress | None = attrs.field(
        default=None, converter=attrs.converters.optional(ipaddress.ip_address)
    )
    pod_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    public_key: str | None = attrs.field(default=None, validator=check_public_key)
    endpoint_override: Endpoint | None = None


class TunnelMode(Enum):
    FULL_MESH = "FullMesh"
    EXPLICIT = "Explicit"


def _pair(value: Any) -> frozenset[str]:
    pair = frozenset(value)
    if len(pair) != 2:
        raise ValueError(f"a node pair names two different nodes, got {sorted(value)}")
    return pair


def _pairs(values: Any) -> frozenset[frozenset[str]]:
    return frozenset(_pair(v) for v in values)


@attrs.frozen(slots=True)
class TunnelPolicy:
    name: str
    generation: int = 1
    mode: TunnelMode = TunnelMode.FULL_MESH
    listen_port: int = attrs.field(default=DEFAULT_LISTEN_PORT, validator=_check_port)
    persistent_keepalive: int = attrs.field(default=DEFAULT_KEEPALIVE, validator=_check_keepalive)
    peerings: frozenset[frozenset[str]] = attrs.field(default=frozenset(), converter=_pairs)
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    fail_open: bool = False


@attrs.frozen(slots=True)
class RouteOverride:
    cidr: IPNetwork = attrs.field(converter=network)
    via: str = attrs.field(validator=_check_name)


@attrs.frozen(slots=True)
class RoutePolicy:
    name: str
    generation: int = 1
    routes: tuple[RouteOverride, ...] = attrs.field(default=(), converter=_route_overrides)


@attrs.frozen(slots=True, order=True)
class CidrPair:
    """Packets from `src` to `dst` are dropped by the classifier."""

    src: IPNetwork = attrs.field(converter=network, order=_net_key)
    dst: IPNetwork = attrs.field(converter=network, order=_net_key)
    # The order above as a plain tuple, made once: a state sorts its pairs by it.
    sort_key: tuple[tuple[int, int, int], tuple[int, int, int]] = attrs.field(
        init=False, eq=False, order=False, repr=False, hash=False,
        default=attrs.Factory(lambda b: (_net_key(b.src), _net_key(b.dst)), takes_self=True))


@attrs.frozen(slots=True)
class BlockPolicy:
    name: str
    generation: int = 1
    cidr_pairs: tuple[CidrPair, ...] = attrs.field(default=(), converter=_cidr_pairs)
    node_pairs: frozenset[frozenset[str]] = attrs.field(default=frozenset(), converter=_pairs)
    isolate: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    drain: frozenset[str] = attrs.field(default=frozenset(), converter=_names)


# Rotations at once when a RotationPolicy does not say (vpblu/actors/rotation.py), and
# the most it may say: one bridge per slot, `<interface>-rot<k>` on listenPort + k.
# The default is measured (python -m vpblu.bench --scenarios rotation --sizes 100,300
# --quick --rotation-max-concurrent K, 2026-11-27, medians of 2-4 runs at a load
# average of 5-13, calibration 42-87 ms CPU): the whole cluster at N=100 in 202, 80, 80
# and 67 s for K = 1, 4, 8, 16, at N=300 (sampled) about 1740, 554, 427 and 466 s, the
# controller's CPU per rotated node at N=300 1614, 784, 728 and 704 ms. 8 is the
# fastest at N=300; 16 is within the noise there and needs eight more UDP ports.
DEFAULT_MAX_CONCURRENT = 8
MAX_CONCURRENT = 16


@attrs.frozen(slots=True)
class RotationPolicy:
    name: str
    schedule: str
    generation: int = 1
    overlap_seconds: int = 30
    nodes: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    max_concurrent: int = DEFAULT_MAX_CONCURRENT


@attrs.frozen(slots=True, order=True)
class PodRange:
    """A pod range the controller remembers: `cidr` was a podCIDR of Node `node`
    (the first Node seen holding it). vpblu.core.podranges owns why."""

    cidr: IPNetwork = attrs.field(converter=network, order=_net_key)
    node: str


def _pod_ranges(values: Any) -> tuple[PodRange, ...]:
    return tuple(sorted(values, key=lambda r: (_net_key(r.cidr), r.node)))


@attrs.frozen(slots=True)
class ClusterSnapshot:
    """Everything the pure core reads, keyed by object name. Immutable.

    Besides the objects: `cluster_cidrs`, the pod ranges the controller was
    configured with (`--cluster-cidr`), and `remembered_pod_ranges`, every Node
    podCIDR the controller has seen (vpblu.core.podranges): both are pod ranges
    of the cluster whatever Nodes exist now."""

    nodes: tuple[NodeInfo, ...] = attrs.field(default=(), converter=_node_infos)
    tunnel_policies: tuple[TunnelPolicy, ...] = attrs.field(default=(), converter=_tunnel_policies)
    route_policies: tuple[RoutePolicy, ...] = attrs.field(default=(), converter=_route_policies)
    block_policies: tuple[BlockPolicy, ...] = attrs.field(default=(), converter=_block_policies)
    rotation_policies: tuple[RotationPolicy, ...] = attrs.field(
        default=(), converter=_rotation_policies
    )
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    remembered_pod_ranges: tuple[PodRange, ...] = attrs.field(default=(), converter=_pod_ranges)


# --- what the core produces ------------------------------------------------------


@attrs.frozen(slots=True, order=True)
class Peer:
    """One WireGuard peer of a node, as the node should configure it."""

    name: str
    public_key: str = attrs.field(validator=check_public_key)
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...] = attrs.field(converter=_networks, order=False)
    persistent_keepalive: int = attrs.field(default=0, validator=_check_keepalive)


_by_name = operator.attrgetter("name")


@attrs.frozen(slots=True, order=True)
class Route:
    """`cidr` is reached through the mesh interface towards peer `via`."""

    cidr: IPNetwork = attrs.field(converter=network, order=_net_key)
    via: str
    # The order above as a plain tuple, made once: sorting a 1000-route state
    # by it costs a fifth of computing each key again.
    sort_key: tuple[tuple[int, int, int], str] = attrs.field(
        init=False, eq=False, order=False, repr=False, hash=False,
        default=attrs.Factory(lambda r: (_net_key(r.cidr), r.via), takes_self=True))


def _sorted_peers(values: Any) -> tuple[Peer, ...]:
    return tuple(sorted(values, key=_by_name))


# Sorting by a key is ~10x faster than by attrs' generated __lt__ (a
# 1000-route state), and by a key made once faster still.
_by_sort_key = operator.attrgetter("sort_key")


def _sorted_routes(values: Any) -> tuple[Route, ...]:
    return tuple(sorted(values, key=_by_sort_key))


def _sorted_blocks(values: Any) -> tuple[CidrPair, ...]:
    return tuple(sorted(values, key=_by_sort_key))


@attrs.frozen(slots=True)
class DataPath:
    """Which destinations a node steers into the mesh, and what happens to those
    that have no tunnel.

    Every packet whose (translated) destination is in `cluster_cidrs` is routed
    by the mesh table: to a peer's tunnel when a route says so, back to the
    main table for `local_cidrs` (this node's own pods), and otherwise dropped
    and counted (fail-closed) - unless `fail_open`, when it leaves by the main
    table, unencrypted, and the underlay guard counts it."""

    local_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    fail_open: bool = False


NO_DATAPATH = DataPath()


@attrs.frozen(slots=True)
class NodeDesiredState:
    """What one node's daemon should have in its kernel, in a canonical order
    (peers by name, routes and blocks by address) so equal states compare equal."""

    node: str
    listen_port: int = DEFAULT_LISTEN_PORT
    peers: tuple[Peer, ...] = attrs.field(default=(), converter=_sorted_peers)
    routes: tuple[Route, ...] = attrs.field(default=(), converter=_sorted_routes)
    blocks: tuple[CidrPair, ...] = attrs.field(default=(), converter=_sorted_blocks)
    datapath: DataPath = NO_DATAPATH


class ConditionStatus(Enum):
    TRUE = "True"
    FALSE = "False"


@attrs.frozen(slots=True, order=True)
class Condition:
    """What the core ignored and why, addressed to the object that caused it."""

    kind: str  # "TunnelPolicy", "RoutePolicy", "BlockPolicy", "RotationPolicy", "VpbluNode"
    name: str
    type: str  # "Accepted", "Ready", ...
    status: str  # "True" | "False"
    reason: str  # CamelCase, e.g. "ConflictingRoute"
    message: str


# --- the smallest changes between two desired states of one node ---------------


@attrs.frozen(slots=True)
class PeerAdded:
    peer: Peer


@attrs.frozen(slots=True)
class PeerChanged:
    """The peer's key, endpoint, allowed IPs or keepalive changed; the whole new peer."""

    peer: Peer


@attrs.frozen(slots=True)
class PeerRemoved:
    name: str


@attrs.frozen(slots=True)
class RouteAdded:
    route: Route


@attrs.frozen(slots=True)
class RouteRemoved:
    route: Route


@attrs.frozen(slots=True)
class BlockAdded:
    block: CidrPair


@attrs.frozen(slots=True)
class BlockRemoved:
    block: CidrPair


@attrs.frozen(slots=True)
class ListenPortChanged:
    port: int = attrs.field(validator=_check_port)


@attrs.frozen(slots=True)
class DataPathChanged:
    """The node's whole DataPath, replaced."""

    datapath: DataPath


Change = (
    PeerAdded
    | PeerChanged
    | PeerRemoved
    | RouteAdded
    | RouteRemoved
    | BlockAdded
    | BlockRemoved
    | ListenPortChanged
    | DataPathChanged
)
