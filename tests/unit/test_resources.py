"""Raw API objects become typed values, or an InvalidObject naming the field."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from vpblu.core import model
from vpblu.core.sources import InvalidObject
from vpblu.kube.resources import (
    parse_block_policy,
    parse_node,
    parse_rotation_policy,
    parse_route_policy,
    parse_tunnel_policy,
    parse_vpblu_node,
)


def obj(name: str, spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 3, "resourceVersion": "7"},
            "spec": spec or {}, **extra}


def test_node_prefers_pod_cidrs_and_takes_internal_ip() -> None:
    raw = obj("n1", {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
              status={"addresses": [{"type": "Hostname", "address": "n1"},
                                    {"type": "InternalIP", "address": "192.0.2.1"}]})
    node = parse_node(raw)
    assert str(node.internal_ip) == "192.0.2.1"
    assert [str(c) for c in node.pod_cidrs] == ["10.244.1.0/24", "fd00:1::/64"]
    assert node.meta.generation == 3


def test_vpblu_node_endpoint_and_key() -> None:
    key = "A" * 43 + "="
    vn = parse_vpblu_node(obj("n1", {"endpoint": "[2001:db8::1]:51820"},
                              status={"publicKey": key}))
    assert vn.endpoint == model.Endpoint("2001:db8::1", 51820)
    assert vn.public_key == key


def test_policies_become_model_values() -> None:
    tunnel = parse_tunnel_policy(obj("t", {"mode": "Explicit", "listenPort": 51000,
                                           "peerings": [{"nodes": ["a", "b"]}]}))
    assert tunnel.policy == model.TunnelPolicy(
        "t", 3, model.TunnelMode.EXPLICIT, 51000, model.DEFAULT_KEEPALIVE, [("a", "b")])
    migrating = parse_tunnel_policy(obj("m", {"clusterCIDRs": ["10.244.0.0/16", "fd00::/56"],
                                              "failOpen": True}))
    assert isinstance(migrating.policy, model.TunnelPolicy)
    assert migrating.policy.cluster_cidrs == (model.network("10.244.0.0/16"),
                                              model.network("fd00::/56"))
    assert migrating.policy.fail_open
    route = parse_route_policy(obj("r", {"routes": [{"cidr": "10.9.0.0/16", "via": "a"}]}))
    assert route.policy == model.RoutePolicy("r", 3, (model.RouteOverride("10.9.0.0/16", "a"),))
    pair = {"from": "10.1.0.0/16", "to": "10.2.0.0/16"}
    block = parse_block_policy(obj("b", {"cidrPairs": [pair], "isolate": ["c"]}))
    assert isinstance(block.policy, model.BlockPolicy)
    assert block.policy.isolate == frozenset({"c"})
    rotation = parse_rotation_policy(obj("rot", {"schedule": "0 3 * * 0", "overlapSeconds": 60}))
    assert isinstance(rotation.policy, model.RotationPolicy)
    assert rotation.policy.overlap_seconds == 60


@pytest.mark.parametrize(("parse", "raw", "field"), [
    (parse_node, obj("n", {"podCIDR": "10.244.1.1/24"}), "spec.podCIDRs"),
    (parse_node, obj("n", status={"addresses": [{"type": "InternalIP", "address": "x"}]}),
     "status.addresses"),
    (parse_vpblu_node, obj("n", {"endpoint": "nonsense"}), "spec.endpoint"),
    (parse_vpblu_node, obj("n", status={"publicKey": "c2hvcnQ="}), "status.publicKey"),
    (parse_tunnel_policy, obj("t", {"mode": "Fullmesh"}), "spec.mode"),
    (parse_tunnel_policy, obj("t", {"mode": "Explicit"}), "spec.peerings"),
    (parse_tunnel_policy, obj("t", {"listenPort": 70000}), "spec"),
    (parse_tunnel_policy, obj("t", {"mode": "Explicit", "peerings": [{"nodes": ["a", "a"]}]}),
     "spec.peerings[0].nodes"),
    (parse_tunnel_policy, obj("t", {"clusterCIDRs": ["10.244.1.7/16"]}), "spec.clusterCIDRs[0]"),
    (parse_tunnel_policy, obj("t", {"clusterCIDRs": ["0.0.0.0/0"]}), "spec.clusterCIDRs[0]"),
    (parse_tunnel_policy, obj("t", {"failOpen": "yes"}), "spec.failOpen"),
    (parse_route_policy, obj("r", {"routes": [{"cidr": "10.0.0.0/33", "via": "a"}]}),
     "spec.routes[0]"),
    (parse_block_policy, obj("b", {"cidrPairs": [{"from": "10.0.0.0/8"}]}), "spec.cidrPairs[0]"),
    (parse_rotation_policy, obj("x", {"schedule": "0 3 * *"}), "spec.schedule"),
    (parse_rotation_policy, obj("x", {"schedule": "61 * * * *"}), "spec.schedule"),
    (parse_rotation_policy, obj("x", {"schedule": "0 3 * * 0", "overlapSeconds": 0}),
     "spec.overlapSeconds"),
])
def test_invalid_objects_name_the_field(parse: Any, raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse(raw)
    assert str(err.value).startswith(field + ":")


def test_a_rotation_record_round_trips_through_status_and_decides_the_published_key() -> None:
    from vpblu.core import wire
    from vpblu.core.sources import RotationPhase, RotationRecord
    from vpblu.kube.resources import parse_vpblu_node

    old, new = (base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2))
    for phase, published in ((RotationPhase.ACTIVATE, old), (RotationPhase.RETIRE, new),
                             (RotationPhase.ROLLING_BACK, old)):
        record = RotationRecord("r1", phase, wire.RotationStepKind.ACTIVATE, old, new,
                                ("b",), "t", 5)
        raw = {"metadata": {"name": "a"},
               "status": {"publicKey": new, "rotation": record.to_status()}}
        parsed = parse_vpblu_node(raw)
        assert parsed.rotation == record
        assert parsed.published_key == published
