"""vpblu's kustomize base against a real kube-apiserver: it installs, and the CRD
schemas refuse bad objects with a message naming the field, and accept good ones."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vpblu.lab.testenv import BASE, CRD_NAMES, SAMPLES, TestEnv, established_crds

pytestmark = pytest.mark.integration

PLURALS = {
    "VpbluNode": "vpblunodes",
    "TunnelPolicy": "tunnelpolicies",
    "RoutePolicy": "routepolicies",
    "BlockPolicy": "blockpolicies",
    "RotationPolicy": "rotationpolicies",
}
KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="


def path(kind: str, name: str | None = None, status: bool = False) -> str:
    p = f"/apis/vpblu.io/v1alpha1/{PLURALS[kind]}"
    if name is not None:
        p += f"/{name}" + ("/status" if status else "")
    return p


def body(kind: str, name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "vpblu.io/v1alpha1", "kind": kind,
                           "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = spec
    return obj


def create(env: TestEnv, kind: str, name: str, spec: dict[str, Any] | None) -> Any:
    # Strict: a misspelt field is refused, not silently pruned.
    return env.request("POST", path(kind) + "?fieldValidation=Strict", body(kind, name, spec))


def test_base_applies_and_every_crd_is_established(vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    # Applying again changes nothing and still succeeds.
    out = env.kubectl("apply", "-k", str(BASE)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/tunnelpolicies.vpblu.io" in out
    assert established_crds(env) >= CRD_NAMES
    for kind, name in [("serviceaccount", "vpblu-controller"),
                       ("serviceaccount", "vpblu-daemon"),
                       ("deployment", "vpblu-controller"),
                       ("daemonset", "vpblu-daemon"),
                       ("service", "vpblu-controller"),
                       ("role", "vpblu-controller-leader-election")]:
        env.kubectl("get", "-n", "vpblu-system", kind, name)
    env.kubectl("get", "clusterrole", "vpblu-controller")


def test_rbac_grants_the_controller_what_it_needs_and_the_daemon_nothing(
    vpblu_installed: TestEnv,
) -> None:
    env = vpblu_installed

    def can(sa: str, *args: str) -> bool:
        result = env.kubectl("auth", "can-i", *args,
                             f"--as=system:serviceaccount:vpblu-system:{sa}", check=False)
        return result.stdout.strip() == "yes"

    assert can("vpblu-controller", "watch", "nodes")
    # Least privilege (issue 19): the daemon Pods only, the users' policies
    # read-only, their status written, the Lease by name.
    assert can("vpblu-controller", "list", "pods", "-n", "vpblu-system")
    assert not can("vpblu-controller", "list", "pods", "--all-namespaces")
    assert can("vpblu-controller", "patch", "vpblunodes.vpblu.io", "--subresource=status")
    assert can("vpblu-controller", "patch", "tunnelpolicies.vpblu.io", "--subresource=status")
    assert can("vpblu-controller", "watch", "tunnelpolicies.vpblu.io")
    for verb in ("create", "update", "patch", "delete"):
        assert not can("vpblu-controller", verb, "tunnelpolicies.vpblu.io")
    assert can("vpblu-controller", "delete", "vpblunodes.vpblu.io")
    assert not can("vpblu-controller", "deletecollection", "vpblunodes.vpblu.io")
    assert can("vpblu-controller", "create", "tokenreviews.authentication.k8s.io")
    assert can("vpblu-controller", "update", "leases.coordination.k8s.io/vpblu-controller",
               "-n", "vpblu-system")
    assert not can("vpblu-controller", "update", "leases.coordination.k8s.io/another",
                   "-n", "vpblu-system")
    assert not can("vpblu-controller", "update", "leases.coordination.k8s.io", "-n", "default")
    assert not can("vpblu-controller", "get", "secrets", "-n", "vpblu-system")
    for verb, what in [("get", "nodes"), ("list", "vpblunodes.vpblu.io"),
                       ("create", "tokenreviews.authentication.k8s.io"), ("get", "pods")]:
        assert not can("vpblu-daemon", verb, what)


def test_samples_apply(vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    try:
        env.kubectl("apply", "-k", str(SAMPLES))
        got = env.request("GET", path("TunnelPolicy", "default"))
        assert got.status == 200
        assert got.body["spec"]["mode"] == "FullMesh"
    finally:
        env.kubectl("delete", "-k", str(SAMPLES), "--ignore-not-found")


# (kind, spec, words the refusal must contain: the field path first)
INVALID = [
    ("TunnelPolicy", {"listenPort": 70000}, ["spec.listenPort", "65535"]),
    ("TunnelPolicy", {"listenPort": 0}, ["spec.listenPort"]),
    ("TunnelPolicy", {"persistentKeepalive": -1}, ["spec.persistentKeepalive"]),
    ("TunnelPolicy", {"mode": "Star"}, ["spec.mode", "Unsupported value"]),
    ("TunnelPolicy", {"mode": "Explicit"}, ["spec.peerings", "Explicit mode requires"]),
    ("TunnelPolicy", {"mode": "Explicit", "peerings": []},
     ["spec.peerings", "Explicit mode requires"]),
    ("TunnelPolicy", {"mode": "Explicit", "peerings": [{"nodes": ["a", "a"]}]},
     ["spec.peerings[0].nodes", "two different nodes"]),
    ("TunnelPolicy", {"mode": "Explicit", "peerings": [{"nodes": ["a", "b", "c"]}]},
     ["spec.peerings[0].nodes"]),
    ("TunnelPolicy", {"mode": "Explicit", "peerings": [{"nodes": ["a"]}]},
     ["spec.peerings[0].nodes"]),
    ("TunnelPolicy", {"mode": "FullMesh", "peerings": [{"nodes": ["a", "b"]}]},
     ["spec.peerings", "only allowed in Explicit mode"]),
    ("TunnelPolicy", {"listenport": 51821}, ["spec.listenport", "unknown field"]),
    ("TunnelPolicy", {"clusterCIDRs": ["10.244.0.0/33"]},
     ["spec.clusterCIDRs[0]", "must be a CIDR"]),
    ("TunnelPolicy", {"clusterCIDRs": ["10.244.1.7/16"]}, ["spec.clusterCIDRs[0]", "host bits"]),
    ("TunnelPolicy", {"clusterCIDRs": ["0.0.0.0/0"]}, ["spec.clusterCIDRs[0]", "default route"]),
    ("TunnelPolicy", {"failOpen": "yes"}, ["spec.failOpen"]),
    ("RoutePolicy", None, ["spec", "Required value"]),
    ("RoutePolicy", {"routes": []}, ["spec.routes"]),
    ("RoutePolicy", {"routes": [{"cidr": "10.0.0.0/33", "via": "n1"}]},
     ["spec.routes[0].cidr", "must be a CIDR"]),
    ("RoutePolicy", {"routes": [{"cidr": "10.244.1.7/24", "via": "n1"}]},
     ["spec.routes[0].cidr", "host bits zero"]),
    ("RoutePolicy", {"routes": [{"cidr": "10.244.1.0/24"}]}, ["spec.routes[0].via", "Required"]),
    ("RoutePolicy", {"routes": [{"cidr": "10.244.1.0/24", "via": "Node_1"}]},
     ["spec.routes[0].via"]),
    ("RoutePolicy", {"routes": [{"cidr": "10.244.1.0/24", "via": "n1"},
                                {"cidr": "10.244.1.0/24", "via": "n2"}]},
     ["spec.routes[1]", "Duplicate value"]),
    ("BlockPolicy", {}, ["spec", "must block something"]),
    ("BlockPolicy", {"cidrPairs": [{"from": "banana", "to": "10.0.0.0/8"}]},
     ["spec.cidrPairs[0].from", "must be a CIDR"]),
    ("BlockPolicy", {"cidrPairs": [{"from": "10.0.0.0/8"}]}, ["spec.cidrPairs[0].to", "Required"]),
    ("BlockPolicy", {"cidrPairs": [{"from": "10.0.0.0/8", "to": "fd00::/8"}]},
     ["spec.cidrPairs[0]", "same IP family"]),
    ("BlockPolicy", {"nodePairs": [{"nodes": ["n1", "n1"]}]},
     ["spec.nodePairs[0].nodes", "two different nodes"]),
    ("BlockPolicy", {"isolate": ["n1", "n1"]}, ["spec.isolate[1]", "Duplicate value"]),
    ("BlockPolicy", {"drain": [""]}, ["spec.drain[0]"]),
    ("RotationPolicy", {}, ["spec.schedule", "Required value"]),
    ("RotationPolicy", {"schedule": "0 3 * *"}, ["spec.schedule", "5-field cron"]),
    ("RotationPolicy", {"schedule": "0 3 * * * *"}, ["spec.schedule", "5-field cron"]),
    ("RotationPolicy", {"schedule": "@weekly"}, ["spec.schedule"]),
    ("RotationPolicy", {"schedule": "0 3 * * 0", "overlapSeconds": 0}, ["spec.overlapSeconds"]),
    ("RotationPolicy", {"schedule": "0 3 * * 0", "overlapSeconds": 3601},
     ["spec.overlapSeconds", "3600"]),
    ("RotationPolicy", {"schedule": "0 3 * * 0", "nodes": ["n1", "n1"]},
     ["spec.nodes[1]", "Duplicate value"]),
    ("VpbluNode", {"endpoint": "node1.example:51820"}, ["spec.endpoint"]),
    ("VpbluNode", {"endpoint": "192.0.2.7:70000"}, ["spec.endpoint", "port must be 1..65535"]),
    ("VpbluNode", {"endpoint": "192.0.2.300:51820"}, ["spec.endpoint", "must be an IP address"]),
    ("VpbluNode", {"endpoint": "2001:db8::7:51820"}, ["spec.endpoint"]),
    ("VpbluNode", {"endpoint": "192.0.2.7"}, ["spec.endpoint", "must be an IP address"]),
    ("VpbluNode", {"endpoint": "192.0.2.7:0"}, ["spec.endpoint", "port must be 1..65535"]),
]


@pytest.mark.parametrize(("kind", "spec", "words"), INVALID,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(INVALID)])
def test_invalid_object_is_refused_naming_the_field(
    vpblu_installed: TestEnv, kind: str, spec: dict[str, Any] | None, words: list[str],
) -> None:
    env = vpblu_installed
    name = f"invalid-{kind.lower()}"
    got = create(env, kind, name, spec)
    if got.status == 201:  # never leave it for the next case
        env.request("DELETE", path(kind, name))
    # 422 Invalid for schema violations, 400 BadRequest for strict decoding.
    assert got.status in (400, 422), (got.status, got.body)
    for word in words:
        assert word in got.message, got.message


VALID = [
    ("TunnelPolicy", None),
    ("TunnelPolicy", {"mode": "Explicit", "listenPort": 51821, "persistentKeepalive": 0,
                      "peerings": [{"nodes": ["n1", "n2"]}, {"nodes": ["n2", "n3.example"]}]}),
    ("TunnelPolicy", {"clusterCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"], "failOpen": True}),
    ("RoutePolicy", {"routes": [{"cidr": "10.244.1.0/24", "via": "n1"},
                                {"cidr": "fd00:10:244:1::/64", "via": "n2"}]}),
    ("BlockPolicy", {"cidrPairs": [{"from": "10.244.1.0/24", "to": "10.244.2.0/24"},
                                   {"from": "fd00::/64", "to": "fd01::/64"}]}),
    ("BlockPolicy", {"nodePairs": [{"nodes": ["n1", "n2"]}], "isolate": ["n3"],
                     "drain": ["n4"]}),
    ("RotationPolicy", {"schedule": "0 3 * * 0"}),
    ("RotationPolicy", {"schedule": "*/15 1-5 1,15 JAN-DEC MON-FRI", "overlapSeconds": 3600,
                        "nodes": ["n1", "n2"]}),
    ("VpbluNode", None),
    ("VpbluNode", {"endpoint": "192.0.2.7:51820"}),
    ("VpbluNode", {"endpoint": "[2001:db8::7]:51820"}),
]


@pytest.mark.parametrize(("kind", "spec"), VALID,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(VALID)])
def test_valid_object_is_accepted(
    vpblu_installed: TestEnv, kind: str, spec: dict[str, Any] | None,
) -> None:
    env = vpblu_installed
    name = f"valid-{kind.lower()}"
    got = create(env, kind, name, spec)
    try:
        assert got.status == 201, got.message
        stored = got.body.get("spec", {})
        assert stored | (spec or {}) == stored
    finally:
        env.request("DELETE", path(kind, name))


def test_defaults_are_filled_in(vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    try:
        tunnel = create(env, "TunnelPolicy", "defaults", None)
        rotation = create(env, "RotationPolicy", "defaults", {"schedule": "0 3 * * 0"})
        assert tunnel.body["spec"] == {"mode": "FullMesh", "listenPort": 51820,
                                       "persistentKeepalive": 25, "failOpen": False}
        assert rotation.body["spec"]["overlapSeconds"] == 30
    finally:
        env.request("DELETE", path("TunnelPolicy", "defaults"))
        env.request("DELETE", path("RotationPolicy", "defaults"))


def condition(type_: str, status: str = "True") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": "KeyPublished", "message": "ok",
            "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(("status", "words"), [
    ({"publicKey": "not-a-key"}, ["status.publicKey"]),
    ({"publicKey": KEY[:-2] + "B="}, ["status.publicKey"]),  # 33rd byte bits set
    ({"conditions": [condition("Ready", "Maybe")]}, ["status.conditions[0].status"]),
    ({"conditions": [condition("Ready"), condition("Ready")]},
     ["status.conditions[1]", "Duplicate value"]),
    ({"conditions": [{"type": "Ready", "status": "True"}]},
     ["status.conditions[0].reason", "Required value"]),
])
def test_vpblunode_status_is_validated(
    vpblu_installed: TestEnv, status: dict[str, Any], words: list[str],
) -> None:
    env = vpblu_installed
    name = "status-check"
    assert create(env, "VpbluNode", name, {}).status == 201
    try:
        bad = env.request("PATCH", path("VpbluNode", name, status=True), {"status": status},
                          content_type="application/merge-patch+json")
        assert bad.status == 422, (bad.status, bad.body)
        for word in words:
            assert word in bad.message, bad.message
        good = env.request(
            "PATCH", path("VpbluNode", name, status=True),
            {"status": {"publicKey": KEY, "conditions": [condition("Ready")]}},
            content_type="application/merge-patch+json")
        assert good.status == 200, good.message
        assert good.body["status"]["publicKey"] == KEY
    finally:
        env.request("DELETE", path("VpbluNode", name))


def test_policy_status_conditions_are_writable(vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    assert create(env, "BlockPolicy", "status-check", {"isolate": ["n1"]}).status == 201
    try:
        got = env.request(
            "PATCH", path("BlockPolicy", "status-check", status=True),
            {"status": {"conditions": [condition("Accepted", "False")]}},
            content_type="application/merge-patch+json")
        assert got.status == 200, got.message
        printed = env.kubectl("get", "blockpolicy", "status-check").stdout
        assert printed.split("\n")[0].split() == ["NAME", "ISOLATE", "DRAIN", "ACCEPTED", "AGE"]
        assert "False" in printed.split("\n")[1]
    finally:
        env.request("DELETE", path("BlockPolicy", "status-check"))


def test_printer_columns(vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    assert create(env, "TunnelPolicy", "columns", {"listenPort": 51999}).status == 201
    try:
        out = json.loads(env.kubectl("get", "tunnelpolicy", "columns", "-o", "json").stdout)
        assert out["spec"]["listenPort"] == 51999
        header, row = env.kubectl("get", "tunnelpolicy", "columns").stdout.splitlines()[:2]
        assert header.split() == ["NAME", "MODE", "PORT", "KEEPALIVE", "FAILOPEN", "ACCEPTED",
                                  "AGE"]
        assert row.split()[:5] == ["columns", "FullMesh", "51999", "25", "false"]
    finally:
        env.request("DELETE", path("TunnelPolicy", "columns"))
