"""Health end to end on the real API server: the real controller, simulated
daemons sending telemetry over real TLS gRPC. Every VpbluNode becomes Ready,
`vpblu status` says healthy; a daemon gone makes its node not Ready within
10 s and `vpblu status` exit non-zero; back, Ready again. The controller's
/metrics passes promtool (when installed); a quiet mesh writes no status."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_asyncio

from tests.integration.meshlab import (
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
from vpblu.actors.health import HealthSettings
from vpblu.lab.sim import SimCluster, is_full_mesh
from vpblu.lab.testenv import free_port

NODES = 4
GONE_WITHIN = 10.0


def ready(body: dict[str, Any]) -> bool:
    return (condition(body, "Ready") or {}).get("status") == "True"


def status_command(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vpblu.cli", "status", "--kubeconfig",
                           str(kubeconfig), *args], capture_output=True, text=True,
                          timeout=60, check=False)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_nodes_become_ready_and_a_daemon_gone_is_not_ready_within_10s(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    metrics_port = free_port()
    # Counts (PEERS) that move without a transition are written at most every
    # update_interval: short here, so the test need not wait a minute for 3/3.
    settings = attrs.evolve(settings, metrics_listen=f"127.0.0.1:{metrics_port}",
                            health=HealthSettings(update_interval=2.0))
    tunnel = unique("health")
    async with running_controller(settings) as view:
        await wait_leading(view)
        assert await http_get(metrics_port, "/readyz") == (200, b"the Mesh server listens\n")
        await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                   policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
        try:
            async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                       NODES, prefix=unique("hl")) as cluster:
                with trio.fail_after(60):
                    await cluster.wait_all(is_full_mesh(cluster))
                full = f"{NODES - 1}/{NODES - 1}"
                for name in cluster.daemons:
                    body = await wait_api(
                        env, f"{GROUP_PATH}/vpblunodes/{name}",
                        lambda b: ready(b) and (b.get("status") or {}).get("peers") == full)
                    status = body["status"]
                    assert status["appliedGeneration"] > 0 and status["keyCreated"]
                    kinds = {c["type"]: c["status"] for c in status["conditions"]}
                    assert kinds["Connected"] == kinds["Applied"] == "True"
                    assert kinds["KeyPublished"] == "True"
                names = sorted(cluster.daemons)
                ours = ["--node", names[0]]
                done = await trio.to_thread.run_sync(status_command, env.kubeconfig_path, *ours)
                assert done.returncode == 0, done.stdout + done.stderr
                printed = await trio.to_thread.run_sync(
                    lambda: env.kubectl("get", "vpblunodes", names[0]).stdout)
                header, row = printed.splitlines()[:2]
                assert header.split() == ["NAME", "READY", "PEERS", "GENERATION", "KEY", "AGE",
                                          "ROTATION", "AGE"]
                assert row.split()[1:3] == ["True", f"{NODES - 1}/{NODES - 1}"]

                # Quiet: heartbeats and telemetry flow, the statuses do not change.
                writes_before = await trio.to_thread.run_sync(
                    lambda: [env.request("GET", f"{GROUP_PATH}/vpblunodes/{n}").body[
                        "metadata"]["resourceVersion"] for n in names])
                await trio.sleep(8)
                writes_after = await trio.to_thread.run_sync(
                    lambda: [env.request("GET", f"{GROUP_PATH}/vpblunodes/{n}").body[
                        "metadata"]["resourceVersion"] for n in names])
                assert writes_after == writes_before

                # A daemon gone: its node is not Ready within 10 s.
                victim = names[1]
                gone_at = trio.current_time()
                cluster.stop_daemon(victim)
                await wait_api(env, f"{GROUP_PATH}/vpblunodes/{victim}",
                               lambda b: not ready(b))
                elapsed = trio.current_time() - gone_at
                print(f"{victim} not Ready {elapsed:.2f} s after its daemon stopped")
                assert elapsed <= GONE_WITHIN
                done = await trio.to_thread.run_sync(status_command, env.kubeconfig_path,
                                                     "--node", victim)
                assert done.returncode == 1, done.stdout + done.stderr
                assert "NotConnected" in done.stdout

                # Back: Ready again.
                await cluster.start_daemon(victim)
                await wait_api(env, f"{GROUP_PATH}/vpblunodes/{victim}", ready)

                status, exposition = await http_get(metrics_port, "/metrics")
                assert status == 200
                assert b"vpblu_convergence_seconds_bucket" in exposition
                assert b"vpblu_leader 1.0" in exposition
                if shutil.which("promtool"):
                    checked = await trio.to_thread.run_sync(lambda: subprocess.run(
                        ["promtool", "check", "metrics"], input=exposition,
                        capture_output=True, timeout=60, check=False))
                    assert checked.returncode == 0, checked.stdout + checked.stderr
        finally:
            await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}",
                       ok=(200, 202, 404))
