"""The real controller under faults: the API server restarts, a daemon claims
another node, a policy the schema lets through makes no sense."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio_asyncio

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    GROUP_PATH,
    ControllerSetup,
    aapi,
    condition,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.lab.sim import SimCluster, SimDaemon, is_full_mesh

REFUSED_WITHIN = 10.0
REFUSALS = 2  # the first attempt and a retry (the daemon's backoff starts at 0.2 s)
LOG_POLL = 0.05


async def test_api_server_restart_then_a_change_still_converges(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    tunnel, block = unique("mesh"), unique("block")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        async with running_controller(settings) as view, \
                SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), 4,
                                prefix=unique("rs")) as cluster:
            await wait_leading(view)
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(is_full_mesh(cluster))
            await trio.to_thread.run_sync(env.restart_apiserver)
            await wait_leading(view)
            pair = {"from": cluster.nodes[sorted(cluster.nodes)[0]].pod_cidr,
                    "to": cluster.nodes[sorted(cluster.nodes)[1]].pod_cidr}
            await aapi(env, "POST", f"{GROUP_PATH}/blockpolicies",
                       policy("BlockPolicy", block, {"cidrPairs": [pair]}))

            def blocked(daemon: SimDaemon) -> bool:
                state = daemon.applier.current
                return state is not None and len(state.blocks) == 1 and \
                    is_full_mesh(cluster)(daemon)

            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(blocked)
            # The API server went away; nothing on the nodes did.
            for daemon in cluster.daemons.values():
                assert daemon.applier.peers_removed == 0
    finally:
        for kind, name in (("tunnelpolicies", tunnel), ("blockpolicies", block)):
            await aapi(env, "DELETE", f"{GROUP_PATH}/{kind}/{name}", ok=(200, 404))


async def test_a_daemon_speaking_for_another_node_is_refused_and_logged(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    env, pki, settings = mesh
    caplog.set_level(logging.WARNING)
    async with running_controller(settings) as view, \
            SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), 2,
                            prefix=unique("id"), start=False) as cluster:
        await wait_leading(view)
        honest, liar = sorted(cluster.daemons)
        # The liar presents the honest node's (valid, Pod-bound) token.
        token = (tmp_path / "sim" / f"{honest}.token").read_bytes()
        (tmp_path / "sim" / f"{liar}.token").write_bytes(token)
        await cluster.start_daemon(liar)
        await cluster.start_daemon(honest)
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(lambda d: d.applier.current is not None, [honest])
        why = f"the token speaks for node {honest!r}, the Hello for {liar!r}"

        def refusals() -> int:
            return sum("refused a mesh stream" in r.getMessage() and why in r.getMessage()
                       for r in caplog.records if r.name == "vpblu.stream.transport")

        def told() -> bool:
            # The daemon is told why (a gRPC PERMISSION_DENIED carrying the reason).
            return any(why in r.getMessage()
                       for r in caplog.records if r.name == "vpblu.node.stream")

        # The liar retries with backoff: a retry refused too shows that the refusal is
        # not a first-attempt accident, and the liar applied nothing meanwhile.
        with trio.move_on_after(REFUSED_WITHIN):
            while not (refusals() >= REFUSALS and told()):  # noqa: ASYNC110 (log records)
                await trio.sleep(LOG_POLL)
        assert refusals() >= REFUSALS and told(), (
            f"waited {REFUSED_WITHIN} s for the liar to be refused {REFUSALS} times and "
            f"told why: {refusals()} refusals, told: {told()}")
        assert cluster.daemons[liar].applier.applies == 0
        assert cluster.daemons[liar].stream.statistics().applied_generation == 0


async def test_nonsense_the_schema_lets_through_ends_as_a_condition(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    tunnel, first, second, ghost = unique("mesh"), unique("a-route"), unique("b-route"), \
        unique("ghost")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        async with running_controller(settings) as view, \
                SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), 3,
                                prefix=unique("bad")) as cluster:
            await wait_leading(view)
            names = sorted(cluster.nodes)
            cidr = "10.200.0.0/24"
            # A route via a node that does not exist, and two policies
            # claiming one CIDR through different nodes: valid to the schema.
            await aapi(env, "POST", f"{GROUP_PATH}/routepolicies", policy(
                "RoutePolicy", ghost, {"routes": [{"cidr": "10.201.0.0/24", "via": "no-such"}]}))
            await aapi(env, "POST", f"{GROUP_PATH}/routepolicies", policy(
                "RoutePolicy", first, {"routes": [{"cidr": cidr, "via": names[0]}]}))
            await aapi(env, "POST", f"{GROUP_PATH}/routepolicies", policy(
                "RoutePolicy", second, {"routes": [{"cidr": cidr, "via": names[1]}]}))

            def refused(reason: str) -> object:
                return lambda b: (condition(b) or {}).get("reason") == reason

            body = await wait_api(env, f"{GROUP_PATH}/routepolicies/{ghost}",
                                  refused("UnknownNode"))
            cond = condition(body) or {}
            assert cond["status"] == "False"
            assert cond["observedGeneration"] == body["metadata"]["generation"]
            await wait_api(env, f"{GROUP_PATH}/routepolicies/{second}",
                           refused("ConflictingRoute"))
            await wait_api(env, f"{GROUP_PATH}/routepolicies/{first}",
                           lambda b: (condition(b) or {}).get("status") == "True")

            # The first claim is in force everywhere, and the mesh is intact.
            def routed(daemon: SimDaemon) -> bool:
                state = daemon.applier.current
                if state is None or len(state.peers) != 2:
                    return False
                vias = {str(r.cidr): r.via for r in state.routes}
                return daemon.name == names[0] or vias.get(cidr) == names[0]

            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(routed)
            assert view.leading
    finally:
        for kind, name in (("tunnelpolicies", tunnel), ("routepolicies", first),
                           ("routepolicies", second), ("routepolicies", ghost)):
            await aapi(env, "DELETE", f"{GROUP_PATH}/{kind}/{name}", ok=(200, 404))
