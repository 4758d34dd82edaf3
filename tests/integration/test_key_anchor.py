"""A connected node's key is the one its daemon said in its Hello (issue 19),
against the real API server: a VpbluNode status.publicKey swapped with
`kubectl patch --subresource=status` never reaches a peer, not even for the
moment before the StatusGuard puts it back.

The simulated daemons run the real StreamActor over real gRPC and TLS; their
RecordingApplier keeps every state the daemon applied, in order (their
"WireGuard": each peer with the key it is configured with). So "no peer's
WireGuard ever listed the swapped key" is checked on every state ever applied,
not on samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    GROUP_PATH,
    ControllerSetup,
    aapi,
    policy,
    published_mesh,
    unique,
    wait_api,
)
from vpblu.lab.sim import SimDaemon, is_full_mesh

OTHER_KEYS = ("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
              "2Ka1kq3+eBvCkbFD0GTnRxj1D/7Gu4Mo8sPz8gYlT3o=")
# The barrier after the swaps: a keepalive no other test uses.
BARRIER_KEEPALIVE = 23


async def test_a_swapped_status_key_never_reaches_a_peer(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = mesh.env
    tunnel = unique("anchor")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        await _swap_and_watch(mesh, tunnel, tmp_path)
    finally:
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))


async def _swap_and_watch(mesh: ControllerSetup, tunnel: str, tmp_path: Path) -> None:
    env = mesh.env
    async with published_mesh(mesh, tmp_path / "sim", 3, "anc") as (_view, cluster):
        name = sorted(cluster.daemons)[0]
        key = cluster.daemons[name].public_key
        path = f"{GROUP_PATH}/vpblunodes/{name}"

        for other in OTHER_KEYS:
            patch = json.dumps({"status": {"publicKey": other}})
            await trio.to_thread.run_sync(
                env.kubectl, "patch", "vpblunode", name, "--subresource=status",
                "--type=merge", "-p", patch)
            await wait_api(env, path,
                           lambda b: (b.get("status") or {}).get("publicKey") == key)

        def reverted_events(body: dict[str, Any]) -> bool:
            return any(e.get("reason") == "StatusReverted"
                       and e.get("involvedObject", {}).get("name") == name
                       and "kubectl-patch" in e.get("message", "")
                       for e in body.get("items") or ())

        await wait_api(env, "/api/v1/namespaces/default/events"
                            f"?fieldSelector=involvedObject.name%3D{name}", reverted_events)

        # A barrier: a change every node is pushed after the swaps. The
        # StateActor took in the swapped versions (a watch event each) long
        # before the TunnelPolicy change; once every daemon applied the new
        # keepalive, whatever the swaps could have caused was pushed too.
        keepalive = json.dumps({"spec": {"persistentKeepalive": BARRIER_KEEPALIVE}})
        await trio.to_thread.run_sync(lambda: env.kubectl(
            "patch", "tunnelpolicy", tunnel, "--type=merge", "-p", keepalive))

        def barrier(daemon: SimDaemon) -> bool:
            state = daemon.applier.current
            return (state is not None and bool(state.peers) and all(
                p.persistent_keepalive == BARRIER_KEEPALIVE for p in state.peers)
                    and is_full_mesh(cluster)(daemon))

        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(barrier)

        applied = 0
        for peer_name, daemon in cluster.daemons.items():
            for step in daemon.applier.history:
                applied += 1
                listed = {p.public_key for p in step.state.peers if p.name == name}
                assert not listed & set(OTHER_KEYS), (
                    f"{peer_name} was configured with a swapped key of {name} "
                    f"at t={step.at:.3f}: {listed}")
        print(f"{len(OTHER_KEYS)} swaps of {name}'s status key: 0 of {applied} states applied "
              "by the daemons listed a swapped key")
