"""The controller's RBAC as kustomize renders it is least privilege (issue 19):
the users' policies read-only, status subresources written, Pods read only in
vpblu-system, the Lease by name. tests/integration/test_rbac_audit.py runs the
controller under these rules and audits what it wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZE = Path(__file__).resolve().parents[2] / "kustomize" / "base"
READ = {"get", "list", "watch"}
POLICIES = {"tunnelpolicies", "routepolicies", "blockpolicies", "rotationpolicies"}


def _rules_of(subject: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(role kind, namespace, rule) for every rule bound to ServiceAccount `subject`."""
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    roles = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d
             for d in docs if d["kind"] in {"Role", "ClusterRole"}}
    rules = []
    for b in docs:
        if b["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(s.get("name") == subject for s in b.get("subjects", ())):
            continue
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"], ns)]
        rules += [(role["kind"], ns, r) for r in role["rules"]]
    return rules


def test_the_controller_holds_least_privilege() -> None:
    rules = _rules_of("vpblu-controller")
    assert rules
    for kind, ns, rule in rules:
        resources, verbs = set(rule["resources"]), set(rule["verbs"])
        assert "*" not in resources | verbs and "deletecollection" not in verbs, rule
        if resources & POLICIES:
            assert verbs <= READ, rule
        if "pods" in resources:
            assert (kind, ns) == ("Role", "vpblu-system") and verbs <= READ, rule
        if "leases" in resources and verbs != {"create"}:
            assert rule.get("resourceNames") == ["vpblu-controller"], rule
        if "events" in resources:
            assert verbs == {"create"}, rule
        if any(r.endswith("/status") for r in resources):
            assert all(r.endswith("/status") for r in resources), rule
            assert verbs <= READ | {"patch", "update"}, rule
        assert not resources & {"secrets", "nodes/status", "serviceaccounts"}, rule
        if "configmaps" in resources:
            # Only the remembered pod ranges' ConfigMap is written (create cannot
            # be limited by name), in vpblu-system.
            assert (kind, ns) == ("Role", "vpblu-system") and resources == {"configmaps"}, rule
            if verbs - READ - {"create"}:
                assert rule.get("resourceNames") == ["vpblu-pod-ranges"], rule
                assert verbs <= {"update", "patch"}, rule
        if "nodes" in resources:
            assert verbs <= READ, rule
