"""The dashboard in a real browser: Debian's headless Chromium, driven by
Selenium, against the real controller (its dashboard over TLS with the
controller's certificate) on the real API server, with simulated daemons.

What a user sees: every page sends a stranger to the login; a token the API
server does not accept is refused; a token whose user may not `get
vpblunodes` is refused with a page that says so; a viewer sees the 3-node
mesh, and a node joining appears without a reload (measured from the moment
its VpbluNode exists); the rotate action is refused for the viewer and
rotates the node's key for an operator (`patch vpblunodes`), carried out
with the operator's own token. A screenshot of each page is saved under
$VPBLU_SCREENSHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import attrs
import trio
import trio_asyncio
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    GROUP_PATH,
    ControllerSetup,
    aapi,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.actors.health import HealthSettings
from vpblu.dashboard.server import DashboardSettings
from vpblu.lab.sim import SimCluster, has_rotated, is_full_mesh
from vpblu.lab.testenv import TestEnv, free_port

NODES = 3
JOIN_WITHIN = 2.0  # the promise: a change reaches an open page within 2 s
PAGE_TIMEOUT = 20.0
POLL = 0.05
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

T = TypeVar("T")


@contextmanager
def chromium(downloads: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium through Debian's chromedriver; quit on every exit path
    (chromedriver and the browser's processes with it)."""
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "chromium and chromium-driver are installed by scripts/setup-system.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={downloads / 'profile'}",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    # The controller's certificate is signed by the test's own mesh CA.
    options.accept_insecure_certs = True
    driver = webdriver.Chrome(options=options, service=Service(
        CHROMEDRIVER, log_output=str(downloads / "chromedriver.log")))
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()


class Browser:
    """The blocking driver, called from worker threads so the controller's
    trio loop keeps serving meanwhile."""

    def __init__(self, driver: webdriver.Chrome, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots

    async def run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)

    async def get(self, path: str) -> str:
        await self.run(lambda: self.driver.get(self.base + path))
        return await self.run(lambda: self.driver.current_url)

    async def text(self) -> str:
        return await self.run(lambda: self.driver.find_element(By.TAG_NAME, "body").text)

    async def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        assert await self.run(lambda: self.driver.save_screenshot(str(path))), path
        assert path.stat().st_size > 1000, f"{path} is empty"

    async def wait_for(self, what: str, check: Callable[[], bool],
                       within: float = PAGE_TIMEOUT) -> float:
        """Poll `check` in the browser until true; seconds it took."""
        start = time.monotonic()
        with trio.move_on_after(within):
            while True:
                try:
                    if await self.run(check):
                        return time.monotonic() - start
                except WebDriverException:
                    pass
                await trio.sleep(POLL)
        raise AssertionError(f"the browser did not show {what} within {within} s; "
                             f"page {self.driver.current_url}: {(await self.text())[:800]}")

    def has(self, css: str) -> bool:
        return bool(self.driver.find_elements(By.CSS_SELECTOR, css))

    async def sign_in(self, token: str) -> None:
        await self.get("/login")
        await self.run(lambda: self.driver.find_element(By.ID, "token").send_keys(token))
        await self.run(lambda: self.driver.find_element(By.ID, "sign-in").click())

    async def sign_out(self) -> None:
        await self.run(lambda: self.driver.find_element(By.ID, "logout").click())
        await self.wait_for("the login page", lambda: self.has("#login-form"))


@attrs.frozen
class Users:
    stranger: str  # authenticated, no RBAC on vpblu
    viewer: str  # get/list/watch vpblunodes
    operator: str  # and patch


def rbac(env: TestEnv, tag: str) -> tuple[Users, Callable[[], None]]:
    """Three ServiceAccounts with their ClusterRoles and bindings; a cleanup."""
    ns = "default"
    made: list[tuple[str, ...]] = []

    def kubectl(*args: str) -> None:
        env.kubectl(*args)

    for role, verbs in (("viewer", "get,list,watch"), ("operator", "get,list,watch,patch")):
        name = f"{tag}-{role}"
        kubectl("create", "clusterrole", name, f"--verb={verbs}", "--resource=vpblunodes.vpblu.io")
        made.append(("clusterrole", name))
    tokens = {}
    for who in ("stranger", "viewer", "operator"):
        sa = f"{tag}-{who}"
        kubectl("create", "serviceaccount", sa, "-n", ns)
        made.append(("serviceaccount", sa, "-n", ns))
        if who != "stranger":
            kubectl("create", "clusterrolebinding", sa, f"--clusterrole={tag}-{who}",
                    f"--serviceaccount={ns}:{sa}")
            made.append(("clusterrolebinding", sa))
        tokens[who] = env.create_token(sa, ns)

    def cleanup() -> None:
        for item in reversed(made):
            env.kubectl("delete", "--ignore-not-found", *item, check=False)

    return Users(**tokens), cleanup


def post_without_csrf(port: int, ca: Path, path: str, cookie: str) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST", path, body="csrf=guess", headers={
            "Cookie": f"vpblu_session={cookie}",
            "Content-Type": "application/x-www-form-urlencoded"})
        return conn.getresponse().status
    finally:
        conn.close()


async def test_the_dashboard_in_a_real_browser(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env, pki, settings = mesh
    port = free_port()
    settings = attrs.evolve(settings, dashboard=DashboardSettings(
        f"127.0.0.1:{port}", pki.server.cert, pki.server.key))
    shots = Path(os.environ.get("VPBLU_SCREENSHOTS") or tmp_path / "screenshots")
    await trio.Path(shots).mkdir(parents=True, exist_ok=True)
    tag = unique("dash")
    users, cleanup_rbac = await trio.to_thread.run_sync(rbac, env, tag)
    tunnel = unique("dash")
    joined: list[str] = []
    try:
        async with running_controller(settings) as view:
            await wait_leading(view)
            await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                       policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
            async with SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,),
                                       NODES, prefix=unique("db")) as cluster:
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))
                names = sorted(cluster.daemons)
                with chromium(tmp_path) as driver:
                    b = Browser(driver, f"https://127.0.0.1:{port}", shots)
                    await _strangers_go_to_the_login(b, names[0])
                    await _bad_tokens_are_refused(b, users)
                    joined.append(await _a_viewer_sees_the_mesh_live(
                        b, users, names, env, pki, settings, tmp_path))
                    await _rotation_needs_patch(b, users, names[0], cluster, env, port, pki)
    finally:
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))
        await trio.to_thread.run_sync(cleanup_rbac)
        for name in joined:
            await aapi(env, "DELETE", f"{GROUP_PATH}/vpblunodes/{name}", ok=(200, 404))


async def _strangers_go_to_the_login(b: Browser, node: str) -> None:
    for path in ("/", "/policies", "/events", f"/nodes/{node}"):
        url = await b.get(path)
        assert url.startswith(f"{b.base}/login?next="), (path, url)
        assert await b.run(lambda: b.has("#login-form")), path
    await b.shot("01-login")


async def _bad_tokens_are_refused(b: Browser, users: Users) -> None:
    await b.sign_in("not-a-token-the-api-server-knows")
    await b.wait_for("the refusal of a wrong token", lambda: b.has("#error"))
    assert "did not accept this token" in await b.text()
    assert not await b.run(lambda: b.driver.get_cookie("vpblu_session"))
    await b.shot("02-login-wrong-token")

    await b.sign_in(users.stranger)
    await b.wait_for("the refusal of a user without RBAC", lambda: b.has("#refused"))
    text = await b.text()
    assert "Not allowed" in text and "get vpblunodes" in text and ":default:" in text, text
    assert not await b.run(lambda: b.driver.get_cookie("vpblu_session"))
    await b.shot("03-refused-no-rbac")


async def _a_viewer_sees_the_mesh_live(b: Browser, users: Users, names: list[str],
                                       env: TestEnv, pki: Any, settings: Any,
                                       tmp_path: Path) -> str:
    await b.sign_in(users.viewer)
    await b.wait_for("the mesh page with every node",
                     lambda: all(b.has(f"#node-{n}") for n in names))
    cookie = await b.run(lambda: b.driver.get_cookie("vpblu_session"))
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert "-viewer" in await b.text()
    await b.wait_for("every node Ready", lambda: all(
        b.driver.find_element(By.CSS_SELECTOR, f"#node-{n} td:nth-child(2)").text == "True"
        for n in names))
    # Tunnels come from the daemons' telemetry, whose changed peer lists go with
    # the next heartbeat (30 s x [0.75, 1.25]): the bound covers one beat.
    await b.wait_for("every tunnel of the map", lambda: len(
        b.driver.find_elements(By.CSS_SELECTOR, "#map line.tunnel")) == 3,
        within=CONVERGE_TIMEOUT)
    await b.shot("04-mesh")
    for page, marker in (("/policies", "#policies tbody tr"), ("/events", "#events tbody tr"),
                         (f"/nodes/{names[0]}", "#tunnels tbody tr")):
        await b.get(page)
        await b.wait_for(f"{page} filled", lambda m=marker: b.has(m))  # type: ignore[misc]
        await b.shot("05-" + page.strip("/").replace("/", "-"))
    tunnels = await b.run(lambda: b.driver.find_elements(By.CSS_SELECTOR, "#tunnels tbody tr"))
    assert len(tunnels) == len(names) - 1

    # A node joins while the page is open: it appears without a reload.
    await b.get("/")
    await b.wait_for("the mesh page", lambda: b.has(f"#node-{names[0]}"))
    await b.run(lambda: b.driver.execute_script("window.vpbluNoReload = 1"))
    async with SimCluster.open(env, tmp_path / "sim-join", pki.client, (settings.advertise,),
                               1, prefix=unique("join")) as joining:
        (new,) = joining.daemons
        await wait_api(env, f"{GROUP_PATH}/vpblunodes/{new}", lambda body: True)
        took = await b.wait_for(f"the joining node {new}", lambda: b.has(f"#node-{new}"))
        assert await b.run(lambda: b.driver.execute_script("return window.vpbluNoReload")) == 1
        print(f"dashboard: a joining node appeared {took:.2f} s after its VpbluNode existed")
        assert took <= JOIN_WITHIN, f"the joining node took {took:.2f} s to appear"
        await b.shot("06-mesh-node-joined")
    # (No check that it goes again: the controller may write a departed
    # node's last health after the simulation deleted its VpbluNode, and so
    # make it anew; the test deletes what is left.)
    return new


async def _rotation_needs_patch(b: Browser, users: Users, node: str, cluster: SimCluster,
                                env: TestEnv, port: int, pki: Any) -> None:
    await b.get(f"/nodes/{node}")
    await b.run(lambda: b.driver.find_element(By.ID, "rotate").click())
    await b.wait_for("the refusal to rotate", lambda: b.has("#refused"))
    text = await b.text()
    assert "rotate" in text and "patch vpblunodes" in text, text
    await b.shot("07-rotate-refused-viewer")
    body = await aapi(env, "GET", f"{GROUP_PATH}/vpblunodes/{node}")
    assert "vpblu.io/rotate-now" not in (body["metadata"].get("annotations") or {})

    # A forged form (no session's CSRF token) is refused even with the cookie.
    cookie = (await b.run(lambda: b.driver.get_cookie("vpblu_session")) or {})["value"]
    status = await trio.to_thread.run_sync(post_without_csrf, port, pki.client.ca,
                                           f"/nodes/{node}/rotate", cookie)
    assert status == 403

    await b.get("/")
    await b.sign_out()
    await b.sign_in(users.operator)
    await b.wait_for("the mesh page", lambda: b.has(f"#node-{node}"))
    old_key = cluster.daemons[node].public_key
    done = has_rotated(cluster, [node])
    await b.get(f"/nodes/{node}")
    await b.run(lambda: b.driver.find_element(By.ID, "rotate").click())
    await b.wait_for("the rotation requested", lambda: b.has("#flash"))
    body = await aapi(env, "GET", f"{GROUP_PATH}/vpblunodes/{node}")
    assert body["metadata"]["annotations"]["vpblu.io/rotate-now"].startswith("dashboard-")
    with trio.fail_after(4 * CONVERGE_TIMEOUT):
        await cluster.wait_all(done)
    assert cluster.daemons[node].public_key != old_key
    new_key = cluster.daemons[node].public_key
    await b.wait_for("the new key on the node page", lambda: b.driver.find_element(
        By.CSS_SELECTOR, "dd[data-fact='Public key']").text == new_key, within=CONVERGE_TIMEOUT)
    await b.shot("08-node-rotated")
    await b.sign_out()
    assert (await b.get("/")).startswith(f"{b.base}/login")


def get_json(port: int, ca: Path, path: str, token: str | None) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def sign_in_over_http(port: int, ca: Path, token: str) -> str:
    """The session cookie a form sign-in on this replica sets (login CSRF pair included)."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", "/login")
        resp = conn.getresponse()
        page = resp.read().decode()
        nonce = re.search(r'name="csrf" value="([^"]+)"', page)
        pair = re.search(r"vpblu_login=([^;]+)", resp.getheader("Set-Cookie") or "")
        assert nonce and pair, page[:300]
        conn.request("POST", "/login", body=urlencode({"csrf": nonce[1], "token": token}),
                     headers={"Cookie": f"vpblu_login={pair[1]}",
                              "Origin": f"https://127.0.0.1:{port}",
                              "Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303, resp.status
        session = re.search(r"vpblu_session=([^;]+)", resp.getheader("Set-Cookie") or "")
        assert session
        return session[1]
    finally:
        conn.close()


def get_with_cookie(port: int, ca: Path, path: str, cookie: str) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": f"vpblu_session={cookie}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def meshtop_rows(source: Any, detail: str | None = None) -> tuple[list[str], str, list[str]]:
    """Run meshtop (textual's pilot, 80x24) on `source` in this worker thread's own
    asyncio loop: the rows, the status line and, with `detail`, that node's rows."""
    from textual.widgets import DataTable, Static

    from vpblu.meshtop import MeshTop

    app = MeshTop(source, refresh=3600)
    out: dict[str, Any] = {}

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            table = app.query_one("#table", DataTable)
            out["rows"] = [str(k.value) for k in table.rows]
            out["status"] = str(app.query_one("#status", Static).render())
            out["detail"] = []
            if detail is not None:
                table.move_cursor(row=out["rows"].index(detail))
                await pilot.press("enter")
                await pilot.pause()
                out["detail"] = [str(k.value) for k in table.rows]

    asyncio.run(main())
    return out["rows"], out["status"], out["detail"]


async def test_any_replica_answers_and_meshtop_reads_both_sources(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    """A follower's dashboard serves what the leader wrote to the API (its
    telemetry stays with the leader), with the same sign-in; meshtop shows the
    mesh from the kubeconfig and, with a token, from the dashboard's JSON API."""
    env, pki, settings = mesh
    ports = free_port(), free_port()
    # Peer counts that move without a transition are written every
    # update_interval: short here, so the follower's 2/2 comes soon.
    leader_settings = attrs.evolve(settings, health=HealthSettings(update_interval=2.0),
                                   dashboard=DashboardSettings(
                                       f"127.0.0.1:{ports[0]}", pki.server.cert, pki.server.key))
    grpc = free_port()
    follower_settings = attrs.evolve(
        settings, listen=f"127.0.0.1:{grpc}", advertise=f"127.0.0.1:{grpc}",
        identity=unique("follower"), dashboard=DashboardSettings(
            f"127.0.0.1:{ports[1]}", pki.server.cert, pki.server.key))
    users, cleanup_rbac = await trio.to_thread.run_sync(rbac, env, unique("dash"))
    tunnel = unique("dash")
    ca = pki.client.ca
    try:
        # The API server is the whole session's: VpbluNodes left by earlier
        # tests would be on these pages (they list the cluster) and in
        # meshtop's counts. Passed alone, failed in the full suite.
        await aapi(env, "DELETE", f"{GROUP_PATH}/vpblunodes")
        async with running_controller(leader_settings) as leading:
            await wait_leading(leading)
            async with running_controller(follower_settings) as following:
                assert not following.leading
                await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
                           policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
                async with SimCluster.open(env, tmp_path / "sim", pki.client,
                                           (settings.advertise,), NODES,
                                           prefix=unique("db")) as cluster:
                    with trio.fail_after(CONVERGE_TIMEOUT):
                        await cluster.wait_all(is_full_mesh(cluster))
                    names = sorted(cluster.daemons)
                    for port in ports:
                        assert (await trio.to_thread.run_sync(
                            get_json, port, ca, "/api/mesh", None))[0] == 401
                        assert (await trio.to_thread.run_sync(
                            get_json, port, ca, "/api/mesh", users.stranger))[0] == 403

                    async def both_show_the_mesh() -> tuple[Any, Any]:
                        with trio.fail_after(CONVERGE_TIMEOUT):
                            while True:
                                docs = [await trio.to_thread.run_sync(
                                    get_json, port, ca, "/api/mesh", users.viewer)
                                        for port in ports]
                                if all(status == 200 and [n["name"] for n in doc["nodes"]]
                                       == names and all(n["ready"] == "True"
                                                        for n in doc["nodes"])
                                       and all(n["peers"] == f"{NODES - 1}/{NODES - 1}"
                                               for n in doc["nodes"])
                                       and all(n["tunnels"] for n in docs[0][1]["nodes"])
                                       for status, doc in docs):
                                    return docs[0][1], docs[1][1]
                                await trio.sleep(0.2)

                    on_leader, on_follower = await both_show_the_mesh()
                    # A session made on the leader opens on the follower: both
                    # derive the cookie key from the controller's TLS key.
                    cookie = await trio.to_thread.run_sync(sign_in_over_http, ports[0], ca,
                                                           users.viewer)
                    for port in ports:
                        assert await trio.to_thread.run_sync(
                            get_with_cookie, port, ca, "/api/mesh", cookie) == 200
                    # Sign-in attempts are limited per address (10 at once, then
                    # 10 a minute), whatever they carry.
                    codes = [await trio.to_thread.run_sync(
                        post_without_csrf, ports[1], ca, "/login", "x") for _ in range(11)]
                    assert codes == [403] * 10 + [429], codes
                    assert on_leader["telemetry"] == "live"
                    assert all(len(n["tunnels"]) == NODES - 1 for n in on_leader["nodes"])
                    assert on_follower["leader"] == on_leader["leader"] == settings.identity
                    assert on_follower["servedBy"] == follower_settings.identity
                    assert "held in memory by the leader" in on_follower["telemetry"]
                    assert all(n["tunnels"] is None for n in on_follower["nodes"])
                    assert [n["peers"] for n in on_follower["nodes"]] == ["2/2"] * NODES

                    from vpblu.meshtop import ApiSource, DashboardSource

                    rows, status, detail = await trio.to_thread.run_sync(
                        meshtop_rows, DashboardSource(f"https://127.0.0.1:{ports[1]}",
                                                      users.viewer, ca), None)
                    assert rows == names and f"leader {settings.identity}" in status
                    rows, status, detail = await trio.to_thread.run_sync(
                        meshtop_rows, DashboardSource(f"https://127.0.0.1:{ports[0]}",
                                                      users.viewer, ca), names[0])
                    assert rows == names and detail == names[1:]
                    rows, status, _ = await trio.to_thread.run_sync(
                        meshtop_rows, ApiSource(env.kubeconfig_path, settings.lease.namespace,
                                                settings.lease.name), None)
                    assert rows == names and f"leader {settings.identity}" in status
                    assert f"{NODES}/{NODES} Ready" in status
    finally:
        await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))
        await trio.to_thread.run_sync(cleanup_rbac)


async def test_a_taken_port_never_stops_the_controller(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop) -> None:
    """The dashboard's port is held by someone else: the controller starts
    and leads anyway, and the dashboard listens once the port is free."""
    _, pki, settings = mesh
    port = free_port()
    squatter = trio.socket.socket()
    await squatter.bind(("127.0.0.1", port))
    squatter.listen()
    settings = attrs.evolve(settings, dashboard=DashboardSettings(
        f"127.0.0.1:{port}", pki.server.cert, pki.server.key))
    with squatter:
        async with running_controller(settings) as view:
            await wait_leading(view)
            squatter.close()
            with trio.fail_after(CONVERGE_TIMEOUT):
                while True:
                    try:
                        status, _ = await trio.to_thread.run_sync(
                            get_json, port, pki.client.ca, "/api/mesh", None)
                    except OSError:
                        await trio.sleep(0.2)
                        continue
                    assert status == 401
                    break
            assert view.leading
