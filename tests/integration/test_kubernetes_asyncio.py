"""kubernetes-asyncio driven from trio through trio-asyncio, on the real API server:
create, list, watch a TunnelPolicy, and stop a blocked watch with a trio cancel scope."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_asyncio
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from vpblu.lab.testenv import TestEnv

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "vpblu.io", "v1alpha1", "tunnelpolicies"
# A blocked watch must end this soon after its cancel scope's deadline.
CANCEL_PROMPTNESS = 1.0
WATCH_IDLE = 0.3
TEST_TIMEOUT = 30.0


async def open_api(env: TestEnv) -> client.ApiClient:
    async def make() -> client.ApiClient:
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(env.kubeconfig_path),
                                      client_configuration=cfg, persist_config=False)
        # Inside asyncio context: aiohttp needs a running asyncio task.
        return client.ApiClient(configuration=cfg)

    api: client.ApiClient = await trio_asyncio.aio_as_trio(make)()
    return api


async def open_watch() -> watch.Watch:
    # Watch() opens an aiohttp session of its own: create it in asyncio context.
    return watch.Watch()


async def delete_if_present(api: client.ApiClient, name: str) -> None:
    try:
        await client.CustomObjectsApi(api).delete_cluster_custom_object(
            GROUP, VERSION, PLURAL, name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def session_closed(api: client.ApiClient) -> bool:
    closed: bool = api.rest_client.pool_manager.closed
    return closed


async def test_create_list_watch_then_cancel_the_blocked_watch(
    vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop,
) -> None:
    name = "aio-watch"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TunnelPolicy",
            "metadata": {"name": name}, "spec": {"mode": "FullMesh", "listenPort": 51830}}
    api = await open_api(vpblu_installed)
    watcher: Any = None
    try:
        with trio.fail_after(TEST_TIMEOUT):
            custom = client.CustomObjectsApi(api)
            before = await trio_asyncio.aio_as_trio(custom.list_cluster_custom_object)(
                GROUP, VERSION, PLURAL)
            created = await trio_asyncio.aio_as_trio(custom.create_cluster_custom_object)(
                GROUP, VERSION, PLURAL, body)
            assert created["spec"]["persistentKeepalive"] == 25  # defaulted by the schema
            after = await trio_asyncio.aio_as_trio(custom.list_cluster_custom_object)(
                GROUP, VERSION, PLURAL)
            assert name in {o["metadata"]["name"] for o in after["items"]}

            # From the resourceVersion before the create: the ADDED event is
            # delivered however late the watch connects.
            watcher = await trio_asyncio.aio_as_trio(open_watch)()
            events: list[tuple[str, str]] = []
            with trio.CancelScope() as scope:
                async for event in trio_asyncio.aio_as_trio(watcher.stream(
                    custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                    resource_version=before["metadata"]["resourceVersion"],
                )):
                    events.append((event["type"], event["object"]["metadata"]["name"]))
                    if events[-1] == ("ADDED", name):
                        # Nothing else will come: the watch now blocks until cancelled.
                        scope.deadline = trio.current_time() + WATCH_IDLE
            ended = trio.current_time()
            assert scope.cancelled_caught
            assert ("ADDED", name) in events
            assert ended - scope.deadline < CANCEL_PROMPTNESS
    finally:
        with trio.CancelScope(shield=True):
            try:
                if watcher is not None:
                    await trio_asyncio.aio_as_trio(watcher.close)()
                await trio_asyncio.aio_as_trio(delete_if_present)(api, name)
            finally:
                await trio_asyncio.aio_as_trio(api.close)()
    # Both aiohttp sessions are closed: the one behind our ApiClient and the one
    # Watch() opens for itself (an unclosed one would end the program, STACK.md).
    assert session_closed(api)
    assert session_closed(watcher._api_client)
