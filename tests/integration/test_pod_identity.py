"""Pod-bound identity (issue 19) against the real API server and the real
controller: a token speaks for a node only while its Pod is a current vpblu
daemon Pod on that node, minted by the API server's TokenRequest API for each
case (no fake tokens, no fake TokenReview)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    POLL,
    ControllerSetup,
    aapi,
    running_controller,
    unique,
    wait_leading,
)
from vpblu.core import wire
from vpblu.lab.sim import AUDIENCE, DAEMON_NAMESPACE, DAEMON_SERVICE_ACCOUNT, SimCluster
from vpblu.stream.transport import ConnectFailed, StreamClosed, open_mesh_stream

REFUSED_WITHIN = 20.0  # a refusal comes after one TokenReview; the bound is for load
DAEMON_LABELS = {"app.kubernetes.io/name": "vpblu", "app.kubernetes.io/component": "daemon"}
A_PUBLIC_KEY = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
PODS = f"/api/v1/namespaces/{DAEMON_NAMESPACE}/pods"


def pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": DAEMON_NAMESPACE, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": DAEMON_SERVICE_ACCOUNT,
                     "containers": [{"name": "daemon", "image": "vpblu:test"}]}}


async def attempt(setup: ControllerSetup, token: str, node: str) -> StreamClosed | ConnectFailed:
    """Open a stream as `node` with `token`; how it ended (never a SyncState)."""
    hello = wire.Hello(node, A_PUBLIC_KEY)
    try:
        async with open_mesh_stream(setup.settings.advertise, setup.pki.client, token,
                                    hello) as stream:
            with trio.fail_after(REFUSED_WITHIN):
                while True:
                    batch = await stream.receive_batch()
                    assert not any(isinstance(m, wire.SyncState) for m in batch), batch
    except (StreamClosed, ConnectFailed) as exc:
        return exc


async def mint(setup: ControllerSetup, pod_name: str) -> str:
    return await trio.to_thread.run_sync(lambda: setup.env.request_token(
        DAEMON_SERVICE_ACCOUNT, DAEMON_NAMESPACE, [AUDIENCE], bound_pod=pod_name))


async def test_tokens_of_a_deleted_or_non_daemon_pod_are_refused(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = mesh.env
    async with running_controller(mesh.settings) as view, \
            SimCluster.open(env, tmp_path / "sim", mesh.pki.client, (mesh.settings.advertise,),
                            1, prefix=unique("pid"), start=False) as cluster:
        await wait_leading(view)
        (node,) = cluster.nodes
        gone, leaving, other = unique("gone"), unique("leaving"), unique("other")
        for name, labels in ((gone, DAEMON_LABELS), (leaving, DAEMON_LABELS),
                             (other, {"app.kubernetes.io/name": "something-else"})):
            await aapi(env, "POST", PODS, pod(name, node, labels))
        tokens = {name: await mint(mesh, name) for name in (gone, leaving, other)}
        # Gone for good, and deleted gracefully (no kubelet here: it stays terminating,
        # and the API server still vouches for its token).
        await aapi(env, "DELETE", f"{PODS}/{gone}?gracePeriodSeconds=0", ok=(200,))
        await aapi(env, "DELETE", f"{PODS}/{leaving}", ok=(200,))
        try:
            outcomes = {name: await attempt(mesh, tokens[name], node) for name in tokens}
            for name, outcome in outcomes.items():
                assert isinstance(outcome, StreamClosed), (name, outcome)
                assert outcome.status == "UNAUTHENTICATED", (name, outcome)
            assert "not a vpblu daemon Pod" in str(outcomes[other])
            assert "being deleted" in str(outcomes[leaving])
            # The daemon Pod's own token still works: the refusals were about the Pods.
            await cluster.start_daemon(node)
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(lambda d: d.applier.current is not None)
        finally:
            for name in (leaving, other):
                await aapi(env, "DELETE", f"{PODS}/{name}?gracePeriodSeconds=0",
                           ok=(200, 404))


async def test_a_connected_daemon_whose_pod_is_deleted_is_disconnected(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    env = mesh.env
    async with running_controller(mesh.settings) as view, \
            SimCluster.open(env, tmp_path / "sim", mesh.pki.client, (mesh.settings.advertise,),
                            2, prefix=unique("pdel")) as cluster:
        await wait_leading(view)
        victim, bystander = sorted(cluster.daemons)
        with trio.fail_after(CONVERGE_TIMEOUT):  # both have a session: a state applied
            await cluster.wait_all(lambda d: d.applier.current is not None)
        bystander_connects = cluster.daemons[bystander].stream.statistics().connects
        pod_name = cluster.nodes[victim].pod_name
        # Deleted as `kubectl delete pod` does: it starts terminating (and, with no
        # kubelet to confirm, stays so; its token still passes TokenReview).
        await aapi(env, "DELETE", f"{PODS}/{pod_name}", ok=(200,))

        def ended() -> bool:
            return any(victim in r.getMessage() and "ending its stream" in r.getMessage()
                       and "being deleted" in r.getMessage() for r in caplog.records)

        with trio.fail_after(CONVERGE_TIMEOUT):
            while not (ended() and  # noqa: ASYNC110 (log records and statistics)
                       cluster.daemons[victim].stream.statistics().connected_to is None):
                await trio.sleep(POLL)
        # It tries again (with backoff) and is refused each time; it stays out.
        with trio.fail_after(CONVERGE_TIMEOUT):
            while sum("stream refused" in r.getMessage() or (  # noqa: ASYNC110
                    "refused a mesh stream" in r.getMessage() and pod_name in r.getMessage())
                    for r in caplog.records) < 1:
                await trio.sleep(POLL)
        # The daemon reads its refusal a moment after the controller logs it (a
        # stream the controller ended cleanly is tried again within 50 ms), then
        # backs off with no stream.
        with trio.fail_after(CONVERGE_TIMEOUT):
            while cluster.daemons[victim].stream.statistics().connected_to is not None:  # noqa: ASYNC110
                await trio.sleep(POLL)
        # The other node's stream was never touched.
        stats = cluster.daemons[bystander].stream.statistics()
        assert stats.connected_to is not None and stats.connects == bystander_connects
