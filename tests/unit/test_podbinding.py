"""DaemonPods.check: which Pod-bound identities speak for a node, and why not."""

from __future__ import annotations

import base64
import json

import pytest

from vpblu.stream.identity import AuthenticationFailed, Identity, token_expiry
from vpblu.stream.podbinding import DaemonPod, DaemonPods, PodsNotKnown

SA = "system:serviceaccount:vpblu-system:vpblu-daemon"
ME = Identity("node-a", SA, pod_name="d-a", pod_uid="u1")


def _pods(*pods: DaemonPod) -> DaemonPods:
    view = DaemonPods("vpblu-system")
    view.replace(pods)
    return view


def test_the_current_daemon_pod_on_its_node_speaks_for_it() -> None:
    _pods(DaemonPod("d-a", "u1", "node-a", False)).check(ME)


@pytest.mark.parametrize(("pods", "identity", "why"), [
    ((), ME, "not a vpblu daemon Pod"),
    ((DaemonPod("d-a", "u2", "node-a", False),), ME, "another uid"),
    ((DaemonPod("d-a", "u1", "node-a", True),), ME, "being deleted"),
    ((DaemonPod("d-a", "u1", "node-b", False),), ME, "runs on node 'node-b'"),
    ((DaemonPod("d-a", "u1", "node-a", False),), Identity("node-a", SA), "not bound to a Pod"),
], ids=["no-such-pod", "recreated", "terminating", "other-node", "node-bound"])
def test_anything_else_is_refused_saying_why(
        pods: tuple[DaemonPod, ...], identity: Identity, why: str) -> None:
    with pytest.raises(AuthenticationFailed, match=why):
        _pods(*pods).check(identity)


def test_before_the_first_list_the_answer_is_not_now() -> None:
    view = DaemonPods("vpblu-system")
    with pytest.raises(PodsNotKnown):
        view.check(ME)
    view.replace([DaemonPod("d-a", "u1", "node-a", False)])
    view.check(ME)
    view.forget()
    with pytest.raises(PodsNotKnown):
        view.check(ME)


def test_a_deleted_pod_is_forgotten() -> None:
    view = _pods(DaemonPod("d-a", "u1", "node-a", False))
    view.delete("d-a")
    with pytest.raises(AuthenticationFailed):
        view.check(ME)


def _jwt(claims: object) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


def test_token_expiry_reads_exp_and_nothing_else() -> None:
    assert token_expiry(_jwt({"exp": 1700000000, "sub": "x"})) == 1700000000.0
    assert token_expiry(_jwt({"sub": "x"})) is None
    assert token_expiry(_jwt({"exp": True})) is None
    assert token_expiry(_jwt([1])) is None
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
