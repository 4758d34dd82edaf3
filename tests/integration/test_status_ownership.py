"""The controller owns VpbluNode status (issue 19), against the real API server:
a key swapped with `kubectl patch --subresource=status` is put back, and a
Warning Event on the VpbluNode names the writer from managedFields."""

from __future__ import annotations

import json
import time
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
from vpblu.lab.sim import is_full_mesh

RESTORE_POLL = 0.02
OTHER_KEY = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


async def test_a_foreign_status_write_is_reverted_and_named_in_an_event(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = mesh.env
    tunnel = unique("mesh")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        await _swap_and_restore(mesh, tmp_path)
    finally:
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))


async def _swap_and_restore(mesh: ControllerSetup, tmp_path: Path) -> None:
    env = mesh.env
    async with published_mesh(mesh, tmp_path / "sim", 2, "own") as (_view, cluster):
        name = sorted(cluster.daemons)[0]
        key = cluster.daemons[name].public_key
        path = f"{GROUP_PATH}/vpblunodes/{name}"

        patch = json.dumps({"status": {"publicKey": OTHER_KEY}})
        await trio.to_thread.run_sync(lambda: env.kubectl(
            "patch", "vpblunode", name, "--subresource=status", "--type=merge", "-p", patch))
        patched_at = time.monotonic()

        def restored() -> dict[str, Any] | None:
            answer = env.request("GET", path)
            body: dict[str, Any] = answer.body
            return body if (body.get("status") or {}).get("publicKey") == key else None

        with trio.fail_after(CONVERGE_TIMEOUT):
            while await trio.to_thread.run_sync(restored) is None:  # noqa: ASYNC110 (API polls)
                await trio.sleep(RESTORE_POLL)
        elapsed = time.monotonic() - patched_at
        # The target is 1 s; under the shared machine's load it is
        # reported, not asserted (README "Hardening" has the measured figure).
        print(f"status.publicKey restored {elapsed:.3f} s after kubectl patch returned")

        def event_names_kubectl(body: dict[str, Any]) -> bool:
            return any(e.get("reason") == "StatusReverted" and e.get("type") == "Warning"
                       and "kubectl-patch" in e.get("message", "")
                       and "publicKey" in e.get("message", "")
                       and e.get("involvedObject", {}).get("name") == name
                       for e in body.get("items") or ())

        await wait_api(env, "/api/v1/namespaces/default/events"
                            f"?fieldSelector=involvedObject.name%3D{name}", event_names_kubectl)
        # The daemons never lost the right key (the peer still holds the daemon's key).
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))
