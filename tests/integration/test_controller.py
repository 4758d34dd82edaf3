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
from vpblu.sim import SimCluster, SimDaemon, is_full_mesh
from vpblu.testenv import TestEnv

NODES = 10


def no_peers(daemon: SimDaemon) -> bool:
    return daemon.applier.current is not None and not daemon.applier.current.peers


async def test_ten_nodes_converge_to_a_full_mesh(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = vpblu_installed
    pki = mesh_pki(tmp_path)
    settings = controller_settings(env, pki, unique("lease"))
    tunnel = unique("mesh")
    async with running_controller(settings) as view:
        await wait_leading(view)
        async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                   NODES, prefix=unique("fm")) as cluster:
            # Without a TunnelPolicy the mesh is off, but every daemon is synced.
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(no_peers)
            # Each daemon's public key, from its Hello, lands in its VpbluNode.
            for daemon in cluster.daemons.values():
                await wait_api(env, f"{GROUP_PATH}/vpblunodes/{daemon.name}",
                               lambda b, d=daemon: (b.get("status") or {}).get("publicKey")
                               == d.public_key)
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
