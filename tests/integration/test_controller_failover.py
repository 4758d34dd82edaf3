"""Leader failover with a crash: the leader is a `python -m vpblu controller`
process that gets SIGKILL (no graceful release); the follower runs in-process."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio
import trio_asyncio

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    FAST_LEASE,
    GROUP_PATH,
    aapi,
    controller_settings,
    mesh_pki,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.actors.state import SEQUENCE_BITS
from vpblu.lab.sim import SimCluster, SimDaemon, is_full_mesh
from vpblu.lab.testenv import TestEnv, free_port

NODES = 10


async def test_crashed_leader_is_replaced_and_no_daemon_loses_a_peer(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = vpblu_installed
    pki = mesh_pki(tmp_path)
    lease = unique("lease")
    tunnel = unique("mesh")
    port_a = free_port()
    address_a = f"127.0.0.1:{port_a}"
    command = [
        sys.executable, "-m", "vpblu", "--log-level=INFO", "controller",
        f"--kubeconfig={env.kubeconfig_path}", f"--listen={address_a}",
        f"--advertise={address_a}", f"--tls-cert={pki.server.cert}",
        f"--tls-key={pki.server.key}", "--identity=ctrl-a",
        "--lease-namespace=vpblu-system", f"--lease-name={lease}",
        f"--lease-duration={FAST_LEASE['lease_duration']}",
        f"--renew-deadline={FAST_LEASE['renew_deadline']}",
        f"--retry-period={FAST_LEASE['retry_period']}",
    ]
    settings_b = controller_settings(env, pki, lease, identity="ctrl-b")
    log_a = (tmp_path / "controller-a.log").open("wb")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        async with trio.open_nursery() as nursery:
            leader_a = await nursery.start(partial(
                trio.run_process, command, check=False, stdout=log_a,
                stderr=subprocess.STDOUT))
            await wait_api(env, f"/apis/coordination.k8s.io/v1/namespaces/vpblu-system/"
                                f"leases/{lease}",
                           lambda b: b["spec"].get("holderIdentity") == "ctrl-a")
            async with running_controller(settings_b) as view_b:
                # Daemons try the follower first: it redirects them to the leader.
                addresses = (settings_b.advertise, address_a)
                async with SimCluster.open(env, tmp_path / "sim", pki.client, addresses, NODES,
                                           prefix=unique("fo")) as cluster:
                    with trio.fail_after(CONVERGE_TIMEOUT):
                        await cluster.wait_all(is_full_mesh(cluster))
                    assert not view_b.leading
                    for daemon in cluster.daemons.values():
                        stats = daemon.stream.statistics()
                        assert stats.connected_to == address_a
                        assert stats.redirects >= 1
                    # Every key the leader was told is persisted (its status) before
                    # it dies: a key it never wrote is one the next leader cannot know
                    # until that daemon says it again.
                    for name, daemon in cluster.daemons.items():
                        await wait_api(env, f"{GROUP_PATH}/vpblunodes/{name}",
                                       lambda b, key=daemon.public_key:
                                       (b.get("status") or {}).get("publicKey") == key)
                    meshed = {n: len(d.applier.history) for n, d in cluster.daemons.items()}

                    killed_at = trio.current_time()
                    leader_a.send_signal(signal.SIGKILL)
                    await wait_leading(view_b)
                    took_lease = trio.current_time() - killed_at

                    def resynced(daemon: SimDaemon) -> bool:
                        stats = daemon.stream.statistics()
                        return stats.connected_to == settings_b.advertise and \
                            stats.applied_generation >> SEQUENCE_BITS == view_b.term

                    with trio.fail_after(CONVERGE_TIMEOUT):
                        await cluster.wait_all(resynced)
                    all_resynced = trio.current_time() - killed_at
                    assert view_b.term >= 1
                    print(f"\nfailover: leader killed -> lease taken {took_lease:.2f} s, "
                          f"-> all {NODES} daemons resynced {all_resynced:.2f} s")

                    # No daemon applied a state with fewer peers at any point
                    # after it had the full mesh, and none ever removed a peer.
                    for name, daemon in cluster.daemons.items():
                        assert daemon.applier.peers_removed == 0, name
                        for step in daemon.applier.history[meshed[name] - 1:]:
                            assert len(step.state.peers) == NODES - 1, (name, step)
                        assert is_full_mesh(cluster)(daemon)
            nursery.cancel_scope.cancel()
    finally:
        log_a.close()
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))
