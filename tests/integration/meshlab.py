"""A real controller against the session API server, for the controller tests.

Real sockets throughout (gRPC, TLS, the API server), so none of this runs on
the autojump clock.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import trio

from vpblu.actors.controller import ControllerSettings, run_controller
from vpblu.actors.leader import LeaseSettings
from vpblu.actors.leadership import Leadership
from vpblu.actors.session import SessionSettings
from vpblu.lab.sim import MeshPki, SimCluster, is_full_mesh
from vpblu.lab.testenv import TestEnv, free_port

GROUP_PATH = "/apis/vpblu.io/v1alpha1"
# Short leases: a failover takes seconds, not the production 15 s.
FAST_LEASE = dict(lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)
CONVERGE_TIMEOUT = 60.0  # 10 nodes converge in well under a second; the bound is for load
POLL = 0.05


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def controller_settings(env: TestEnv, pki: MeshPki, lease_name: str, *,
                        port: int | None = None, identity: str | None = None,
                        session: SessionSettings | None = None) -> ControllerSettings:
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    return ControllerSettings(
        kubeconfig=env.kubeconfig_path,
        listen=address,
        advertise=address,
        tls=pki.server,
        identity=identity or unique("ctrl"),
        lease=LeaseSettings(namespace="vpblu-system", name=lease_name, **FAST_LEASE),
        session=session or SessionSettings(),
    )


@asynccontextmanager
async def running_controller(settings: ControllerSettings) -> AsyncIterator[Leadership]:
    async with trio.open_nursery() as nursery:
        view: Leadership = await nursery.start(run_controller, settings)
        yield view
        nursery.cancel_scope.cancel()


async def wait_leading(view: Leadership) -> None:
    with trio.fail_after(CONVERGE_TIMEOUT):
        while True:
            if view.leading:
                return
            await trio.sleep(POLL)


def api(env: TestEnv, method: str, path: str, body: object = None,
        ok: tuple[int, ...] = (200, 201)) -> Any:
    answer = env.request(method, path, body)
    assert answer.status in ok, f"{method} {path}: {answer.status} {answer.message}"
    return answer.body


async def aapi(env: TestEnv, method: str, path: str, body: object = None,
               ok: tuple[int, ...] = (200, 201)) -> Any:
    return await trio.to_thread.run_sync(lambda: api(env, method, path, body, ok))


def policy(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "vpblu.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


async def wait_api(env: TestEnv, path: str, check: Any) -> Any:
    """Poll GET `path` until `check(body)` is true; the body."""
    answer = None
    with trio.move_on_after(CONVERGE_TIMEOUT):
        while True:
            answer = await trio.to_thread.run_sync(env.request, "GET", path)
            if answer.status == 200 and check(answer.body):
                return answer.body
            await trio.sleep(POLL * 4)
    raise AssertionError(f"GET {path}: condition not met in {CONVERGE_TIMEOUT} s; "
                         f"last answer {answer}")


def condition(body: dict[str, Any], ctype: str = "Accepted") -> dict[str, Any] | None:
    for cond in (body.get("status") or {}).get("conditions") or ():
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def mesh_pki(tmp_path: Path) -> MeshPki:
    return MeshPki.create(tmp_path / "mesh-pki")


class ControllerSetup(NamedTuple):
    """What a controller test starts from: the session API server with vpblu
    installed, a PKI of its own and controller settings on a lease of its own."""

    env: TestEnv
    pki: MeshPki
    settings: ControllerSettings


@asynccontextmanager
async def published_mesh(mesh: ControllerSetup, directory: Path, nodes: int,
                         prefix: str) -> AsyncIterator[tuple[Leadership, SimCluster]]:
    """The controller leading, `nodes` simulated daemons in a full mesh, and each
    one's key published on its VpbluNode's status (the point a key-swap test
    starts from)."""
    env = mesh.env
    async with running_controller(mesh.settings) as view, \
            SimCluster.open(env, directory, mesh.pki.client, (mesh.settings.advertise,),
                            nodes, prefix=unique(prefix)) as cluster:
        await wait_leading(view)
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))
        for name, daemon in cluster.daemons.items():
            await wait_api(env, f"{GROUP_PATH}/vpblunodes/{name}",
                           lambda b, key=daemon.public_key:
                           (b.get("status") or {}).get("publicKey") == key)
        yield view, cluster
