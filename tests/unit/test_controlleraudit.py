"""The end-of-session audit check (vpblu.lab.controlleraudit, issue 19) is a real
check: writes outside what kustomize/base's RBAC gives the controller are
reported, and tests/conftest.py fails the session with them. Audit events are
written here by hand in kube-apiserver's format (audit.k8s.io/v1 Event)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import check_controller_audit
from vpblu.kube.client import CONTROLLER_USER_AGENT
from vpblu.lab.controlleraudit import (
    CONTROLLER_USER,
    Rule,
    controller_writes,
    kustomize_rules,
    read_audit_log,
    violations,
)
from vpblu.lab.testenv import AUDIT_DIR_ENV

ADMIN = "admin"
_ids = iter(range(1_000_000))


@pytest.fixture(scope="module")
def rules() -> tuple[Rule, ...]:
    return kustomize_rules()


def event(verb: str, resource: str, *, group: str = "", subresource: str = "",
          namespace: str | None = None, name: str | None = None, user: str = CONTROLLER_USER,
          agent: str = CONTROLLER_USER_AGENT, code: int = 200) -> dict[str, Any]:
    ref: dict[str, Any] = {"resource": resource, "apiVersion": "v1"}
    if group:
        ref["apiGroup"] = group
    if subresource:
        ref["subresource"] = subresource
    if namespace:
        ref["namespace"] = namespace
    if name:
        ref["name"] = name
    return {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
            "auditID": f"id-{next(_ids)}", "stage": "ResponseComplete", "verb": verb,
            "user": {"username": user}, "userAgent": agent, "objectRef": ref,
            "responseStatus": {"code": code}}


OWNED = [
    event("patch", "vpblunodes", group="vpblu.io", subresource="status", name="n1"),
    event("patch", "routepolicies", group="vpblu.io", subresource="status", name="r"),
    event("create", "vpblunodes", group="vpblu.io"),
    event("patch", "vpblunodes", group="vpblu.io", name="n1"),  # the ownerReference
    event("delete", "vpblunodes", group="vpblu.io", name="n1"),
    event("create", "events", namespace="default"),
    event("create", "leases", group="coordination.k8s.io", namespace="vpblu-system"),
    event("update", "leases", group="coordination.k8s.io", namespace="vpblu-system",
          name="vpblu-controller"),
    event("create", "tokenreviews", group="authentication.k8s.io"),
    event("create", "subjectaccessreviews", group="authorization.k8s.io"),
    # An in-process test controller (admin identity, the controller's agent) on
    # the Lease its test named.
    event("update", "leases", group="coordination.k8s.io", namespace="vpblu-system",
          name="lease-1234", user=ADMIN),
    event("patch", "vpblunodes", group="vpblu.io", subresource="status", name="n1",
          user=ADMIN),
]

NOT_OWNED = [
    event("patch", "tunnelpolicies", group="vpblu.io", name="mesh"),  # a user's spec
    event("delete", "nodes", name="n1"),
    event("update", "nodes", subresource="status", name="n1"),
    event("deletecollection", "vpblunodes", group="vpblu.io"),
    event("create", "secrets", namespace="vpblu-system", code=403),  # refused: still tried
    event("update", "leases", group="coordination.k8s.io", namespace="vpblu-system",
          name="someone-elses"),  # by name, as the ServiceAccount
    event("delete", "leases", group="coordination.k8s.io", namespace="vpblu-system",
          name="lease-1234", user=ADMIN),
    event("patch", "pods", namespace="vpblu-system", name="vpblu-daemon-x"),
    event("patch", "configmaps", namespace="kube-system", name="x", user=ADMIN),
]


def test_what_the_controller_owns_passes(rules: tuple[Rule, ...]) -> None:
    assert violations(OWNED, rules) == []


def test_each_write_it_does_not_own_is_reported(rules: tuple[Rule, ...]) -> None:
    for bad in NOT_OWNED:
        found = violations([*OWNED, bad], rules)
        assert [v.verb for v in found] == [bad["verb"]], bad
    reported = violations(NOT_OWNED, rules)
    assert len(reported) == len(NOT_OWNED)
    assert "core/secrets vpblu-system/-" in str(reported[4]) and "403" in str(reported[4])


def test_writes_by_others_and_reads_are_not_the_controller_s(rules: tuple[Rule, ...]) -> None:
    others = [event("delete", "nodes", name="n1", user=ADMIN, agent="kubectl/v1.32"),
              event("patch", "vpblunodes", group="vpblu.io", subresource="status",
                    name="n1", user=ADMIN, agent="kubectl-patch"),
              event("get", "secrets", namespace="default", name="s")]
    assert violations(others, rules) == []
    assert controller_writes([*OWNED, *others]) == len(OWNED)


def test_one_request_s_stages_count_once(rules: tuple[Rule, ...]) -> None:
    bad = event("delete", "nodes", name="n1")
    started = {**bad, "stage": "ResponseStarted"}
    assert len(violations([started, bad], rules)) == 1


def test_the_log_is_read_line_by_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text("\n".join(json.dumps(e) for e in OWNED[:2]) + '\n{"cut sh')
    assert len(list(read_audit_log(log))) == 2


def test_a_session_whose_controller_wrote_what_it_does_not_own_fails(tmp_path: Path) -> None:
    """The session hooks of tests/conftest.py fail the run: a pytest session whose
    API server left an audit log with a controller write it does not own exits
    non-zero, naming it."""
    logs = tmp_path / "audit"
    logs.mkdir()
    (logs / "env-1.audit.log").write_text(
        "\n".join(json.dumps(e) for e in [*OWNED, NOT_OWNED[1]]) + "\n")
    session = tmp_path / "session"
    session.mkdir()
    (session / "conftest.py").write_text(
        "from tests.conftest import pytest_configure, pytest_sessionfinish, "
        "pytest_terminal_summary  # noqa: F401\n")
    (session / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(session), str(session)],
                         capture_output=True, text=True, timeout=120, cwd=repo,
                         env={"PYTHONPATH": str(repo), "PATH": os.environ["PATH"],
                              AUDIT_DIR_ENV: str(logs)})
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout
    assert "1 passed" in run.stdout, run.stdout
    assert "delete core/nodes -/n1" in run.stdout, run.stdout
    (logs / "env-1.audit.log").write_text("\n".join(json.dumps(e) for e in OWNED) + "\n")
    assert "all its own" in check_controller_audit([logs / "env-1.audit.log"])
