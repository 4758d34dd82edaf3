"""Did the controller write only what it owns? Read from kube-apiserver's audit log.

Owns the check behind the README's Hardening row "kube-apiserver's audit of
a full test run: the controller wrote no object it does not own": the session
API server of the test suite logs every write (`TestEnv.audit_writes`: the
write verbs at Metadata level), and at the end of the session every write the
controller made must be one the rules below allow.

Which requests are the controller's: those authenticated as its
ServiceAccount (`system:serviceaccount:vpblu-system:vpblu-controller`, as in a
cluster), and those sent with its User-Agent (`CONTROLLER_USER_AGENT`) - the
suite mostly runs the controller in-process with the admin kubeconfig, where
RBAC would refuse nothing, so the audit is what holds it to its rules.

What it may write is derived, not collected from what happened to be written:
the rules kustomize/base binds to the controller's ServiceAccount (ClusterRole
rules anywhere, Role rules in their namespace, resourceNames honoured),
evaluated the way RBAC evaluates them, for the write verbs only. By the
product's design they are: the status subresource of every vpblu kind,
VpbluNodes (create, the ownerReference patch, delete), Events, its Lease,
TokenReviews and SubjectAccessReviews. One allowance: a controller with the
admin identity runs on the Lease a test named (`--lease-name`, unique per
test so tests do not wait on each other's leases), so for it the Lease rules'
resourceNames and namespace are not applied (a Lease is still all it may
write there, and never delete).

A write attempt counts whatever the answer was: a refused write (403) is a
write the controller should not have tried. Never writes anything.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from vpblu.kube.client import CONTROLLER_USER_AGENT

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_BASE = REPO / "kustomize" / "base"
CONTROLLER_NAMESPACE = "vpblu-system"
CONTROLLER_SERVICE_ACCOUNT = "vpblu-controller"
CONTROLLER_USER = f"system:serviceaccount:{CONTROLLER_NAMESPACE}:{CONTROLLER_SERVICE_ACCOUNT}"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
KUSTOMIZE_TIMEOUT = 60.0


@attrs.frozen(slots=True)
class Rule:
    """One RBAC PolicyRule bound to the controller; `namespace` None: cluster-wide."""

    api_groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    resource_names: frozenset[str] = frozenset()
    namespace: str | None = None

    def allows(self, verb: str, group: str, resource: str, namespace: str | None,
               name: str | None, *, any_lease: bool = False) -> bool:
        if verb not in self.verbs and "*" not in self.verbs:
            return False
        if group not in self.api_groups and "*" not in self.api_groups:
            return False
        if resource not in self.resources and "*" not in self.resources:
            return False
        lease = any_lease and (group, resource) == ("coordination.k8s.io", "leases")
        if self.namespace is not None and namespace != self.namespace and not lease:
            return False
        # RBAC: a rule with resourceNames never allows create or deletecollection.
        if self.resource_names and not lease:
            return verb not in ("create", "deletecollection") and name in self.resource_names
        return True


@attrs.frozen(slots=True)
class Violation:
    user: str
    user_agent: str
    verb: str
    what: str  # group/resource[/subresource] namespace/name
    code: int | None

    def __str__(self) -> str:
        return (f"{self.verb} {self.what} by {self.user} ({self.user_agent}), "
                f"answered {self.code}")


def controller_rules(rendered: Iterable[Mapping[str, Any]],
                     service_account: str = CONTROLLER_SERVICE_ACCOUNT,
                     namespace: str = CONTROLLER_NAMESPACE) -> tuple[Rule, ...]:
    """The rules the rendered manifests bind to that ServiceAccount."""
    docs = [d for d in rendered if d]
    roles = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d
             for d in docs if d.get("kind") in ("Role", "ClusterRole")}
    rules: list[Rule] = []
    for binding in docs:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and s.get("namespace") == namespace for s in binding.get("subjects") or ()):
            continue
        scope = binding["metadata"].get("namespace") \
            if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], ref["name"], scope if ref["kind"] == "Role" else None))
        if role is None:
            raise ValueError(f"{binding['kind']} {binding['metadata']['name']} refers to "
                             f"{ref['kind']} {ref['name']}, which the manifests do not have")
        for r in role.get("rules") or ():
            rules.append(Rule(frozenset(r.get("apiGroups") or ()),
                              frozenset(r.get("resources") or ()),
                              frozenset(r.get("verbs") or ()),
                              frozenset(r.get("resourceNames") or ()), scope))
    if not rules:
        raise ValueError(f"no RBAC rule is bound to ServiceAccount {namespace}/{service_account}")
    return tuple(rules)


def kustomize_rules(base: Path = KUSTOMIZE_BASE, kubectl: str = "kubectl") -> tuple[Rule, ...]:
    """`controller_rules` of `kubectl kustomize base`, as an operator installs it."""
    out = subprocess.run([kubectl, "kustomize", str(base)], check=True, capture_output=True,
                         text=True, timeout=KUSTOMIZE_TIMEOUT).stdout
    return controller_rules(yaml.safe_load_all(out))


def is_controller(event: Mapping[str, Any]) -> bool:
    agent = str(event.get("userAgent") or "")
    return ((event.get("user") or {}).get("username") == CONTROLLER_USER
            or agent == CONTROLLER_USER_AGENT or agent.startswith(CONTROLLER_USER_AGENT + "/"))


def read_audit_log(path: Path) -> Iterator[dict[str, Any]]:
    """The audit events of a JSON-lines log (a line cut short by a stopped server: skipped)."""
    with path.open() as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event


def violations(events: Iterable[Mapping[str, Any]], rules: Iterable[Rule]) -> list[Violation]:
    """Every write of the controller's that no rule allows (each audit ID once)."""
    rules = tuple(rules)
    found: list[Violation] = []
    seen: set[str] = set()
    for event in events:
        verb = str(event.get("verb") or "")
        if verb not in WRITE_VERBS or not is_controller(event):
            continue
        audit_id = str(event.get("auditID") or "")
        if audit_id:
            if audit_id in seen:
                continue  # ResponseStarted and ResponseComplete of one request
            seen.add(audit_id)
        ref = event.get("objectRef") or {}
        group = str(ref.get("apiGroup") or "")
        resource = str(ref.get("resource") or "")
        if ref.get("subresource"):
            resource = f"{resource}/{ref['subresource']}"
        namespace = ref.get("namespace") or None
        name = ref.get("name") or None
        as_service_account = (event.get("user") or {}).get("username") == CONTROLLER_USER
        if any(r.allows(verb, group, resource, namespace, name,
                        any_lease=not as_service_account) for r in rules):
            continue
        found.append(Violation(
            str((event.get("user") or {}).get("username") or ""),
            str(event.get("userAgent") or ""), verb,
            f"{group or 'core'}/{resource} {namespace or '-'}/{name or '-'}",
            (event.get("responseStatus") or {}).get("code")))
    return found


def controller_writes(events: Iterable[Mapping[str, Any]]) -> int:
    """How many write requests the controller made (for the report)."""
    ids = {str(e.get("auditID") or id(e)) for e in events
           if e.get("verb") in WRITE_VERBS and is_controller(e)}
    return len(ids)
