"""The real controller against the real API server, with simulated daemons over
real TLS gRPC streams and real Pod-bound tokens (off the autojump clock)."""

from __future__ import annotations

import statistics
from pathlib import Path

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
from vpblu.lab.sim import SimCluster, SimDaemon, has_rotated, is_full_mesh

NODES = 10


def no_peers(daemon: SimDaemon) -> bool:
    return daemon.applier.current is not None and not daemon.applier.current.peers


async def test_ten_nodes_converge_to_a_full_mesh(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    tunnel = unique("mesh")
    async with running_controller(settings) as view:
        await wait_leading(view)
        async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                   NODES, prefix=unique("fm")) as cluster:
            # Without a TunnelPolicy the mesh is off, but every daemon is synced.
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(no_peers)
            # Each daemon's public key, from its Hello, lands in its VpbluNode,
            # and the VpbluNode says a daemon Pod is bound to its node.
            for daemon in cluster.daemons.values():
                await wait_api(env, f"{GROUP_PATH}/vpblunodes/{daemon.name}",
                               lambda b, d=daemon: (b.get("status") or {}).get("publicKey")
                               == d.public_key)
                await wait_api(env, f"{GROUP_PATH}/vpblunodes/{daemon.name}",
                               lambda b: any(
                                   c.get("type") == "DaemonScheduled" and c.get("status") == "True"
                                   for c in (b.get("status") or {}).get("conditions") or ()))
            timings = []
            for _ in range(3):
                began = trio.current_time()
                created = await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                                     policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))
                timings.append(trio.current_time() - began)
                accepted = await wait_api(
                    env, f"{GROUP_PATH}/tunnelpolicies/{tunnel}",
                    lambda b: (condition(b) or {}).get("status") == "True")
                cond = condition(accepted)
                assert cond is not None
                assert cond["observedGeneration"] == created["metadata"]["generation"]
                await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}")
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(no_peers)
            print(f"\n{NODES} nodes converged after the TunnelPolicy was created in "
                  f"{', '.join(f'{t * 1000:.0f}' for t in timings)} ms "
                  f"(median {statistics.median(timings) * 1000:.0f} ms)")
            for daemon in cluster.daemons.values():
                assert daemon.stream.statistics().refused_deltas == 0


async def test_node_deletion_blocks_and_a_stale_reconnect(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    tunnel, block = unique("mesh"), unique("block")
    async with running_controller(settings) as view:
        await wait_leading(view)
        await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                   policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
        try:
            async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                       5, prefix=unique("del")) as cluster:
                names = sorted(cluster.daemons)
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))

                # A deleted Node leaves every other node's peers.
                gone, rest = names[0], names[1:]
                await cluster.delete_node(gone)
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster, rest), rest)

                # A daemon that was away while things changed comes back with
                # a stale generation: it gets a SyncState, not deltas.
                away = cluster.daemons[rest[0]]
                stale = away.stream.statistics().applied_generation
                syncs_before = away.stream.statistics().syncs_applied
                cluster.stop_daemon(away.name)
                pair = {"from": cluster.nodes[rest[1]].pod_cidr,
                        "to": cluster.nodes[rest[2]].pod_cidr}
                await aapi(env, "POST", f"{GROUP_PATH}/blockpolicies",
                           policy("BlockPolicy", block, {"cidrPairs": [pair]}))

                def blocked(daemon: SimDaemon) -> bool:
                    state = daemon.applier.current
                    return state is not None and len(state.blocks) == 1 and \
                        str(state.blocks[0].src) == pair["from"] and \
                        str(state.blocks[0].dst) == pair["to"]

                others = [n for n in rest if n != away.name]
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(blocked, others)
                assert not blocked(away)
                await cluster.start_daemon(away.name)
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(blocked, rest)
                stats = away.stream.statistics()
                assert stats.applied_generation > stale
                assert stats.syncs_applied == syncs_before + 1
                assert stats.refused_deltas == 0
                # The BlockPolicy is accepted, for its generation.
                body = await wait_api(env, f"{GROUP_PATH}/blockpolicies/{block}",
                                      lambda b: (condition(b) or {}).get("status") == "True")
                assert (condition(body) or {})["observedGeneration"] == \
                    body["metadata"]["generation"]
                # Nobody lost a peer other than the deleted node.
                for name in rest:
                    assert cluster.daemons[name].applier.peers_removed == 1
        finally:
            for kind, name in (("tunnelpolicies", tunnel), ("blockpolicies", block)):
                await aapi(env, "DELETE", f"{GROUP_PATH}/{kind}/{name}", ok=(200, 404))


async def test_rotating_every_node_gives_every_daemon_the_new_keys(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    tunnel = unique("mesh")
    async with running_controller(settings) as view:
        await wait_leading(view)
        await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                   policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
        try:
            async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                       4, prefix=unique("rot")) as cluster:
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))
                old = {name: d.public_key for name, d in cluster.daemons.items()}
                done = has_rotated(cluster, sorted(cluster.daemons))
                for name in cluster.daemons:
                    await trio.to_thread.run_sync(lambda n=name: env.request(
                        "PATCH", f"{GROUP_PATH}/vpblunodes/{n}",
                        {"metadata": {"annotations": {"vpblu.io/rotate-now": "t1"}}},
                        content_type="application/merge-patch+json"))
                with trio.fail_after(4 * CONVERGE_TIMEOUT):
                    await cluster.wait_all(done)
                for name, daemon in cluster.daemons.items():
                    assert daemon.public_key != old[name]
                    state = daemon.applier.current
                    assert state is not None and len(state.peers) == 3
                    assert not {p.public_key for p in state.peers} & set(old.values())
                    body = await wait_api(env, f"{GROUP_PATH}/vpblunodes/{name}",
                                          lambda b, d=daemon: (b.get("status") or {}).get(
                                              "publicKey") == d.public_key)
                    assert (body["status"].get("lastRotation") or {}).get("trigger") == "t1"
        finally:
            await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))
