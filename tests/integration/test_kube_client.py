"""vpblu.kube.client's KubeClient on the real API server: status patches onto a given
resourceVersion, and the proxy environment read once, as client-go reads it."""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio_asyncio

from vpblu.kube.client import VPBLU_NODES, ApiUnavailable, Conflict, open_kube_client
from vpblu.kube.servicecidrs import service_cidrs
from vpblu.lab.testenv import TestEnv

pytestmark = pytest.mark.integration

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
# Nothing listens here: a request sent through this proxy fails at once.
DEAD_PROXY = "http://127.0.0.1:9"


async def test_status_patch_onto_a_stale_version_is_a_conflict(
    vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop,
) -> None:
    async with open_kube_client(vpblu_installed.kubeconfig_path) as kube:
        created = await kube.create(VPBLU_NODES, {
            "apiVersion": "vpblu.io/v1alpha1", "kind": "VpbluNode",
            "metadata": {"name": "rv-check"}, "spec": {}})
        try:
            first = created["metadata"]["resourceVersion"]
            patched = await kube.patch_status(VPBLU_NODES, "rv-check", {"publicKey": KEY},
                                              resource_version=first)
            assert patched["status"]["publicKey"] == KEY
            with pytest.raises(Conflict):
                await kube.patch_status(VPBLU_NODES, "rv-check", {"publicKey": None},
                                        resource_version=first)
            assert (await kube.get(VPBLU_NODES, "rv-check"))["status"]["publicKey"] == KEY
        finally:
            await kube.delete(VPBLU_NODES, "rv-check")


async def test_proxy_from_the_environment_is_used_unless_no_proxy_exempts_the_server(
    vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", DEAD_PROXY)
    async with open_kube_client(vpblu_installed.kubeconfig_path) as kube:
        with pytest.raises(ApiUnavailable):
            await kube.list(VPBLU_NODES)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with open_kube_client(vpblu_installed.kubeconfig_path) as kube:
        await kube.list(VPBLU_NODES)
        # Read once when the client opened: a proxy set later is not used.
        monkeypatch.delenv("NO_PROXY")
        await kube.list(VPBLU_NODES)


async def test_the_service_ranges_are_read_from_the_servicecidrs_unless_given(
    vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop,
) -> None:
    # The test API server runs with --service-cluster-ip-range=10.0.0.0/24, and
    # keeps the ServiceCIDR "kubernetes" for it.
    async with open_kube_client(vpblu_installed.kubeconfig_path) as kube:
        assert (await kube.server_version())["major"] == "1"
        found: tuple[object, ...] = ()
        with trio.move_on_after(30):  # the API server writes its ServiceCIDR soon after start
            for _ in range(150):
                if found := await service_cidrs(kube):
                    break
                await trio.sleep(0.2)
        assert found == (ipaddress.ip_network("10.0.0.0/24"),)
        given = (ipaddress.ip_network("10.96.0.0/12"),)
        assert await service_cidrs(kube, given) == given
