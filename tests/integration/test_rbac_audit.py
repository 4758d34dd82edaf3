"""Least privilege, proven by the API server's own audit log (issue 19).

A kube-apiserver of its own with audit of every write (`TestEnv.audit_writes`),
kustomize/base applied as an operator would, and the real controller run with
the token of its ServiceAccount `vpblu-controller` - so it holds exactly the
RBAC of kustomize/base/controller-rbac.yaml, nothing else. Simulated daemons
join, a policy gets a condition, someone swaps a VpbluNode's key, a Node is
deleted. Then the audit log must show that everything the controller wrote
is one of its own objects (VpbluNodes, the status of any vpblu object, its
Lease, Events, reviews), and that it was never refused (403).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
import yaml

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    GROUP_PATH,
    ControllerSetup,
    aapi,
    condition,
    controller_settings,
    mesh_pki,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.lab.controlleraudit import kustomize_rules, violations
from vpblu.lab.pki import write_private
from vpblu.lab.sim import SimCluster, is_full_mesh
from vpblu.lab.testenv import TestEnv, install_base

CONTROLLER_USER = "system:serviceaccount:vpblu-system:vpblu-controller"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
VPBLU_KINDS = ("vpblunodes", "tunnelpolicies", "routepolicies", "blockpolicies",
               "rotationpolicies")
OTHER_KEY = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
# (verb, resource, subresource): what the controller may write, each its own.
OWNED = {
    ("create", "tokenreviews", ""), ("create", "subjectaccessreviews", ""),
    ("create", "leases", ""), ("update", "leases", ""), ("patch", "leases", ""),
    ("create", "events", ""),
    # The remembered pod ranges' ConfigMap (vpblu.core.podranges), by name.
    ("create", "configmaps", ""), ("update", "configmaps", ""),
    ("create", "vpblunodes", ""), ("patch", "vpblunodes", ""), ("delete", "vpblunodes", ""),
    *((verb, kind, "status") for kind in VPBLU_KINDS for verb in ("patch", "update")),
}


class AuditedEnv(TestEnv):
    __test__ = False
    audit_writes = True


@pytest.fixture(scope="module")
def audited() -> Iterator[TestEnv]:
    with AuditedEnv.start() as env:
        install_base(env)
        yield env


def controller_kubeconfig(env: TestEnv, path: Path) -> Path:
    """A kubeconfig holding the controller ServiceAccount's token (TokenRequest)."""
    token = env.request_token("vpblu-controller", "vpblu-system")
    write_private(path, yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "controller",
        "clusters": [{"name": "audited", "cluster": {
            "server": env.server_url,
            "certificate-authority-data": base64.b64encode(env.ca_pem).decode()}}],
        "users": [{"name": "controller", "user": {"token": token}}],
        "contexts": [{"name": "controller",
                      "context": {"cluster": "audited", "user": "controller"}}],
    }).encode())
    return path


def audit_events(env: TestEnv) -> list[dict[str, Any]]:
    lines = env.audit_log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


async def test_the_controller_writes_only_what_it_owns(
        audited: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = audited
    pki = mesh_pki(tmp_path)
    base = controller_settings(env, pki, "vpblu-controller")
    settings = attrs.evolve(
        base, kubeconfig=controller_kubeconfig(env, tmp_path / "controller.kubeconfig"))
    setup = ControllerSetup(env, pki, settings)
    tunnel, route = unique("mesh"), unique("route")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    await aapi(env, "POST", f"{GROUP_PATH}/routepolicies", policy(
        "RoutePolicy", route, {"routes": [{"cidr": "10.201.0.0/24", "via": "no-such-node"}]}))
    async with running_controller(setup.settings) as view, \
            SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), 3,
                            prefix=unique("rbac")) as cluster:
        await wait_leading(view)
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))
        swapped, deleted, _ = sorted(cluster.daemons)
        # A policy condition (policy status), a key swapped by someone else
        # (restored, an Event), a Node deleted (its VpbluNode deleted).
        await wait_api(env, f"{GROUP_PATH}/routepolicies/{route}",
                       lambda b: (condition(b) or {}).get("reason") == "UnknownNode")
        await trio.to_thread.run_sync(lambda: env.kubectl(
            "patch", "vpblunode", swapped, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"publicKey": OTHER_KEY}})))
        key = cluster.daemons[swapped].public_key
        await wait_api(env, f"{GROUP_PATH}/vpblunodes/{swapped}",
                       lambda b: (b.get("status") or {}).get("publicKey") == key)
        await wait_api(env, "/api/v1/namespaces/default/events", lambda b: any(
            e.get("reason") == "StatusReverted" for e in b.get("items") or ()))
        cluster.stop_daemon(deleted)
        await cluster.delete_node(deleted)
        with trio.fail_after(CONVERGE_TIMEOUT):
            while (await aapi(env, "GET", f"{GROUP_PATH}/vpblunodes/{deleted}",  # noqa: ASYNC110
                              ok=(200, 404))).get("kind") == "VpbluNode":
                await trio.sleep(0.1)

    ours = [e for e in audit_events(env) if e.get("user", {}).get("username") == CONTROLLER_USER]
    refused = [e for e in ours if e.get("responseStatus", {}).get("code") == 403]
    assert not refused, [(e["verb"], e["requestURI"]) for e in refused]
    writes = [e for e in ours if e["verb"] in WRITES]
    done = {(e["verb"], e["objectRef"].get("resource", ""),
             e["objectRef"].get("subresource", "")) for e in writes}
    not_owned = done - OWNED
    assert not not_owned, sorted(not_owned)
    # The same writes judged by the session-wide check (tests/conftest.py): the
    # rules of kustomize/base, names and namespaces included.
    assert violations(ours, kustomize_rules()) == []
    # The run did what the claims are about (the audit saw it).
    for needed in [("patch", "vpblunodes", "status"), ("patch", "routepolicies", "status"),
                   ("create", "events", ""), ("update", "leases", ""),
                   ("delete", "vpblunodes", ""), ("patch", "vpblunodes", "")]:
        assert needed in done, (needed, sorted(done))
    # Deleted: only the VpbluNode whose Node went; the Lease written: only its own.
    assert {e["objectRef"]["name"] for e in writes
            if e["verb"] == "delete"} == {deleted}
    assert {e["objectRef"].get("name") for e in writes
            if e["objectRef"].get("resource") == "leases"} <= {"vpblu-controller", None}
    assert {e["objectRef"].get("name") for e in writes
            if e["objectRef"].get("resource") == "configmaps"} <= {"vpblu-pod-ranges", None}
    print(f"audited controller writes: {sorted(done)}")
