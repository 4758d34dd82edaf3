"""Raw Kubernetes objects become typed values here, and nowhere else.

Owns the translation of API dicts (Node, VpbluNode and the four policy kinds)
into vpblu/core/sources.py values. A dict that cannot be typed raises `InvalidObject`
naming the field, so the watcher can report it as a status condition instead
of crashing; nothing past this module ever sees a dict.

What the CRD schemas already refuse is checked again here anyway: a cluster
may run an older CRD, and schema validation is skipped for objects written
before a schema tightened. Except for limits that only some entries of an
object break - a default route in a RoutePolicy, more cidrPairs than the data
plane holds - which are the pure core's: it ignores just those entries and
says so in a condition, where refusing the object here would drop the rest
of it too (a BlockPolicy's isolate with its pairs).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from croniter import croniter

from vpblu.core import model, wire
from vpblu.core.sources import (
    DaemonPodSource,
    InvalidObject,
    LastRotation,
    NodeSource,
    ObjectMeta,
    PolicySource,
    RawObject,
    RotationPhase,
    RotationRecord,
    VpbluNodeSource,
)


def meta_of(raw: RawObject) -> ObjectMeta:
    md = raw.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str):
        raise InvalidObject("metadata.name: missing")
    annotations = md.get("annotations") or {}
    return ObjectMeta(
        name=md["name"],
        generation=int(md.get("generation") or 0),
        resource_version=str(md.get("resourceVersion", "")),
        uid=str(md.get("uid", "")),
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
        owners=tuple((str(o.get("kind", "")), str(o.get("uid", "")))
                     for o in md.get("ownerReferences") or () if isinstance(o, dict)),
    )


def _field(raw: RawObject, path: str, default: Any = None) -> Any:
    cur: Any = raw
    for part in path.split("."):
        if not isinstance(cur, dict):
            return default
        cur = cur.get(part)
        if cur is None:
            return default
    return cur


@contextmanager
def _at(path: str) -> Iterator[None]:
    """A conversion failure inside the block names the field it came from."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidObject(f"{path}: {exc}") from None


def parse_node(raw: RawObject) -> NodeSource:
    meta = meta_of(raw)
    internal_ip = None
    for addr in _field(raw, "status.addresses", []):
        if isinstance(addr, dict) and addr.get("type") == "InternalIP":
            with _at("status.addresses"):
                internal_ip = ipaddress.ip_address(addr["address"])
            break
    # podCIDRs (dual-stack) supersedes podCIDR; old clusters set only the latter.
    cidrs = _field(raw, "spec.podCIDRs") or [c for c in [_field(raw, "spec.podCIDR")] if c]
    with _at("spec.podCIDRs"):
        pod_cidrs = tuple(model.network(c) for c in cidrs)
    return NodeSource(meta, internal_ip, pod_cidrs)


def parse_vpblu_node(raw: RawObject) -> VpbluNodeSource:
    meta = meta_of(raw)
    endpoint = None
    if endpoint_text := _field(raw, "spec.endpoint"):
        with _at("spec.endpoint"):
            endpoint = model.Endpoint.parse(endpoint_text)
    public_key = _field(raw, "status.publicKey")
    if public_key is not None:
        with _at("status.publicKey"):
            model.check_public_key(None, _PUBLIC_KEY_ATTR, public_key)
    rotation = None
    if isinstance(r := _field(raw, "status.rotation"), dict):
        with _at("status.rotation"):
            rotation = RotationRecord(
                rotation_id=str(r["rotationId"]), phase=RotationPhase(r["phase"]),
                step=wire.RotationStepKind[r["step"]], old_public_key=str(r["oldPublicKey"]),
                new_public_key=str(r.get("newPublicKey") or ""),
                peers=tuple(str(p) for p in r.get("peers") or ()),
                trigger=str(r.get("trigger") or ""), stamp=int(r.get("stamp") or 0),
                slot=int(r.get("slot") or 1))
    last = None
    if isinstance(r := _field(raw, "status.lastRotation"), dict):
        with _at("status.lastRotation"):
            last = LastRotation(str(r["rotationId"]), str(r["outcome"]),
                                str(r.get("trigger") or ""), float(r.get("finished") or 0),
                                str(r.get("message") or ""))
    return VpbluNodeSource(meta, endpoint, public_key, rotation, last)


_PUBLIC_KEY_ATTR = attrs.fields(model.NodeInfo).public_key


def _node_pairs(items: Any, path: str) -> tuple[tuple[str, ...], ...]:
    pairs = []
    for i, item in enumerate(items or ()):
        nodes = item.get("nodes") if isinstance(item, dict) else None
        if not isinstance(nodes, list) or len(nodes) != 2 or nodes[0] == nodes[1]:
            raise InvalidObject(f"{path}[{i}].nodes: a pair names two different nodes")
        pairs.append((str(nodes[0]), str(nodes[1])))
    return tuple(pairs)


def parse_tunnel_policy(raw: RawObject) -> PolicySource:
    meta = meta_of(raw)
    spec = raw.get("spec") or {}
    mode_text = spec.get("mode", model.TunnelMode.FULL_MESH.value)
    with _at("spec.mode"):
        mode = model.TunnelMode(mode_text)
    peerings = _node_pairs(spec.get("peerings"), "spec.peerings")
    if mode is model.TunnelMode.EXPLICIT and not peerings:
        raise InvalidObject("spec.peerings: Explicit mode needs at least one peering")
    cluster_cidrs = _cidrs(spec.get("clusterCIDRs"), "spec.clusterCIDRs")
    fail_open = _flag(spec.get("failOpen", False), "spec.failOpen")
    with _at("spec"):
        policy = model.TunnelPolicy(
            name=meta.name,
            generation=meta.generation,
            mode=mode,
            listen_port=int(spec.get("listenPort", model.DEFAULT_LISTEN_PORT)),
            persistent_keepalive=int(spec.get("persistentKeepalive", model.DEFAULT_KEEPALIVE)),
            peerings=peerings,
            cluster_cidrs=cluster_cidrs,
            fail_open=fail_open,
        )
    return PolicySource(meta, policy)


def _cidrs(items: Any, path: str) -> tuple[model.IPNetwork, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise InvalidObject(f"{path}: must be a list of CIDRs")
    nets = []
    for i, item in enumerate(items):
        with _at(f"{path}[{i}]"):
            net = model.network(item)
        if net.prefixlen == 0:
            raise InvalidObject(f"{path}[{i}]: {net} is every address, not a pod range")
        nets.append(net)
    return tuple(nets)


def _flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidObject(f"{path}: must be true or false, got {value!r}")
    return value


def parse_route_policy(raw: RawObject) -> PolicySource:
    meta = meta_of(raw)
    routes = []
    for i, item in enumerate(_field(raw, "spec.routes", [])):
        with _at(f"spec.routes[{i}]"):
            routes.append(model.RouteOverride(cidr=item["cidr"], via=item["via"]))
    return PolicySource(meta, model.RoutePolicy(meta.name, meta.generation, tuple(routes)))


def parse_block_policy(raw: RawObject) -> PolicySource:
    meta = meta_of(raw)
    spec = raw.get("spec") or {}
    cidr_pairs = []
    for i, item in enumerate(spec.get("cidrPairs") or ()):
        with _at(f"spec.cidrPairs[{i}]"):
            cidr_pairs.append(model.CidrPair(src=item["from"], dst=item["to"]))
    policy = model.BlockPolicy(
        name=meta.name,
        generation=meta.generation,
        cidr_pairs=tuple(cidr_pairs),
        node_pairs=_node_pairs(spec.get("nodePairs"), "spec.nodePairs"),
        isolate=frozenset(str(n) for n in spec.get("isolate") or ()),
        drain=frozenset(str(n) for n in spec.get("drain") or ()),
    )
    return PolicySource(meta, policy)


def parse_rotation_policy(raw: RawObject) -> PolicySource:
    meta = meta_of(raw)
    spec = raw.get("spec") or {}
    schedule = spec.get("schedule")
    if not isinstance(schedule, str) or len(schedule.split()) != 5:
        raise InvalidObject("spec.schedule: a cron schedule has 5 fields")
    # The CRD's pattern only counts fields; "61 * * * *" gets past it.
    if not croniter.is_valid(schedule):
        raise InvalidObject(f"spec.schedule: {schedule!r} is not a valid cron schedule")
    with _at("spec.overlapSeconds"):
        overlap = int(spec.get("overlapSeconds", 30))
    if not 1 <= overlap <= 3600:
        raise InvalidObject(f"spec.overlapSeconds: {overlap} is outside 1..3600")
    with _at("spec.maxConcurrent"):
        concurrent = int(spec.get("maxConcurrent", model.DEFAULT_MAX_CONCURRENT))
    if not 1 <= concurrent <= model.MAX_CONCURRENT:
        raise InvalidObject(
            f"spec.maxConcurrent: {concurrent} is outside 1..{model.MAX_CONCURRENT}")
    policy = model.RotationPolicy(
        name=meta.name, schedule=schedule, generation=meta.generation,
        overlap_seconds=overlap, nodes=frozenset(str(n) for n in spec.get("nodes") or ()),
        max_concurrent=concurrent,
    )
    return PolicySource(meta, policy)


def parse_daemon_pod(raw: RawObject) -> DaemonPodSource:
    meta = meta_of(raw)
    node_name = _field(raw, "spec.nodeName")
    return DaemonPodSource(meta, str(node_name) if node_name else None,
                           str(_field(raw, "status.phase", "Pending")),
                           terminating=_field(raw, "metadata.deletionTimestamp") is not None)
