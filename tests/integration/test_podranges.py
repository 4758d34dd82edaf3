"""The pod ranges on the real API server (vpblu.core.podranges): the controller
writes every Node podCIDR into ConfigMap vpblu-system/vpblu-pod-ranges, adds its
--cluster-cidr, keeps a deleted Node's range in every node's DataPath, and says
so on the TunnelPolicy's PodRanges condition. Simulated daemons over real TLS
gRPC streams (off the autojump clock)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import attrs
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
from vpblu.core import podranges
from vpblu.lab.sim import SimCluster, SimDaemon, is_full_mesh

CONFIG_MAP_PATH = f"/api/v1/namespaces/vpblu-system/configmaps/{podranges.CONFIG_MAP}"
NAMED = ipaddress.ip_network("10.250.0.0/16")


def remembered(body: dict[str, object]) -> str:
    data = body.get("data") or {}
    assert isinstance(data, dict)
    return str(data.get(podranges.DATA_KEY, ""))


def covers(daemon: SimDaemon, *nets: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    state = daemon.applier.current
    return state is not None and all(
        any(net.subnet_of(c) for c in state.datapath.cluster_cidrs  # type: ignore[arg-type]
            if c.version == net.version) for net in nets)


async def test_pod_ranges_are_remembered_named_and_shown(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, _ = mesh
    settings = attrs.evolve(mesh.settings, cluster_cidrs=(NAMED,))
    tunnel = unique("a-ranges")  # sorts first: the TunnelPolicy in force
    # The API server is shared with the other tests, whose nodes had these same
    # podCIDRs: their lines would keep their names. Start from no memory.
    await aapi(env, "DELETE", CONFIG_MAP_PATH, ok=(200, 404))
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        async with running_controller(settings) as view, \
                SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), 3,
                                prefix=unique("pr")) as cluster:
            await wait_leading(view)
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(is_full_mesh(cluster))
            nodes = list(cluster.nodes.values())
            await wait_api(env, CONFIG_MAP_PATH, lambda b: all(
                f"{n.pod_cidr} {n.name}" in remembered(b) for n in nodes))
            shown = await wait_api(env, f"{GROUP_PATH}/tunnelpolicies/{tunnel}", lambda b: (
                "--cluster-cidr 10.250.0.0/16" in (condition(b, "PodRanges") or {}).get(
                    "message", "")))
            assert (condition(shown, "PodRanges") or {}).get("reason") == "Configured"
            gone = nodes[2]
            gone_cidr = ipaddress.ip_network(gone.pod_cidr)
            for daemon in cluster.daemons.values():
                assert covers(daemon, NAMED, gone_cidr), daemon.applier.current
            # The Node is deleted (its daemon runs on): the others drop its peer
            # and still cover its range; the condition lists it as remembered.
            await cluster.delete_node(gone.name)
            rest = [n.name for n in nodes[:2]]
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(is_full_mesh(cluster, rest), rest)
            for daemon in (cluster.daemons[n] for n in rest):
                assert covers(daemon, NAMED, gone_cidr), daemon.applier.current
            await wait_api(env, f"{GROUP_PATH}/tunnelpolicies/{tunnel}", lambda b: (
                f"{gone_cidr} (was {gone.name}'s)" in (condition(b, "PodRanges") or {}).get(
                    "message", "")))
    finally:
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}")
