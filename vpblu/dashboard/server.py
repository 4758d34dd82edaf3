"""The dashboard's server: hypercorn's trio worker, inside the controller.

Owns the dashboard's listening socket, its TLS and the app's dependencies.
Why hypercorn + Starlette: hypercorn has a native trio worker (`worker_serve`,
a nursery task with `task_status`, fed the socket made here), so the dashboard is one more
supervised child of the controller's trio tree and calls the API server
through the same trio-asyncio loop as every other actor; Starlette runs on
anyio, which runs on trio, and brings routing, forms, cookies and streaming
responses (the SSE stream) without a framework of its own. Quart-Trio would
do too; Starlette is smaller and its request handling is plain ASGI.

TLS with the controller's serving certificate (the Secret every replica
mounts) is the rule; plain HTTP is refused unless the address is loopback
(`kubectl port-forward` and tests). The TLS context is hypercorn's to use
but ours to make: every `CERT_CHECK` seconds the files are compared with
what was loaded, and a renewed pair is loaded into the live context (new
connections get it; a pair that does not load is reported and the old kept).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from vpblu.actors.leader import LeaseSettings
from vpblu.actors.leadership import Leadership
from vpblu.dashboard.access import Access, ReviewApi, open_user_api
from vpblu.dashboard.app import Dashboard, build_app
from vpblu.dashboard.feed import MeshFeed
from vpblu.dashboard.sessions import LoginLimiter, SessionBox, random_key, session_key
from vpblu.kube.client import KubeApi, KubeClient
from vpblu.supervisor import ChildSpec

log = logging.getLogger(__name__)

CERT_CHECK = 30.0
# A port that is taken (another process, a replica on the same host) is tried
# again, backing off, for as long as the controller runs: a dashboard that
# cannot listen never ends the controller (the supervisor would, after a few
# crashes), and never holds up its start.
BIND_RETRY = 1.0
BIND_RETRY_MAX = 30.0
DEFAULT_ADDR = ":8082"


class PlainHttpRefused(ValueError):
    """Plain HTTP on an address that is not loopback."""


@attrs.frozen(slots=True)
class DashboardSettings:
    """`listen`: host:port (":8082" is every address); `cert`/`key`: TLS
    (None: plain HTTP, loopback only)."""

    listen: str = DEFAULT_ADDR
    cert: Path | None = None
    key: Path | None = None
    login_per_minute: float = 10.0
    login_burst: int = 10

    def __attrs_post_init__(self) -> None:
        host, _ = split_listen(self.listen)
        if (self.cert is None) != (self.key is None):
            raise ValueError("the dashboard needs both a certificate and its key, or neither")
        if self.cert is None and not is_loopback(host):
            raise PlainHttpRefused(
                f"the dashboard serves plain HTTP only on loopback, not on {self.listen!r}: "
                "give it the controller's certificate")

    @property
    def tls(self) -> bool:
        return self.cert is not None


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"a dashboard address is host:port, not {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ReloadingConfig(Config):
    """A hypercorn Config whose TLS context is made once and refreshed in place."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self._cert, self._key = cert, key
        self._loaded = self._read()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["h2", "http/1.1"])
        self.context.load_cert_chain(cert, key)

    def _read(self) -> tuple[bytes, bytes]:
        return self._cert.read_bytes(), self._key.read_bytes()

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self.context

    def reload(self) -> bool:
        """Load the files again if they changed; whether they were."""
        now = self._read()
        if now == self._loaded:
            return False
        probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            probe.load_cert_chain(self._cert, self._key)
        except (ssl.SSLError, OSError) as exc:
            log.error("dashboard: the renewed certificate does not load (%r); "
                      "serving the previous one", exc)
            return False
        self.context.load_cert_chain(self._cert, self._key)
        self._loaded = now
        log.info("dashboard: serving the renewed certificate")
        return True


async def run_dashboard(settings: DashboardSettings, kube: KubeApi, review: ReviewApi,
                        kubeconfig: Path | None, leadership: Leadership, lease: LeaseSettings,
                        identity: str, *,
                        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                        ) -> None:
    """Serve until cancelled; `task_status.started` gets the bound URLs."""
    host, port = split_listen(settings.listen)
    config: Config
    if settings.cert is not None and settings.key is not None:
        reloading = _ReloadingConfig(settings.cert, settings.key)
        config = reloading
        box = SessionBox(session_key(settings.key.read_bytes()))
    else:
        reloading = None
        config = Config()
        box = SessionBox(random_key())
    bind_host = host or "0.0.0.0"
    config.bind = [f"[{bind_host}]:{port}" if ":" in bind_host else f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("vpblu.dashboard.hypercorn")
    config.include_server_header = False
    config.graceful_timeout = 1.0
    async with open_user_api(kubeconfig) as user_api:
        app = build_app(Dashboard(
            access=Access(review), feed=MeshFeed(kube, leadership, lease, identity),
            box=box, user_api=user_api,
            limiter=LoginLimiter(settings.login_per_minute, settings.login_burst),
            secure=settings.tls))
        started = False
        delay = BIND_RETRY
        while True:
            refused: OSError | None = None
            try:
                with _listening_socket(bind_host, port, config.backlog) as sock:
                    sockets = Sockets([sock] if settings.tls else [],
                                      [] if settings.tls else [sock], [])
                    async with trio.open_nursery() as nursery:
                        binds: list[str] = await nursery.start(functools.partial(
                            worker_serve, wrap_app(cast(Any, app), config.wsgi_max_body_size,
                                                   None),
                            config, sockets=sockets, shutdown_trigger=trio.sleep_forever))
                        log.info("dashboard on %s", ", ".join(binds))
                        if not started:
                            task_status.started(binds)
                            started = True
                        await _watch_certificate(reloading)
            except* OSError as group:
                refused = _leaf(group)
            if not started:  # the controller goes on: the dashboard is not the mesh
                task_status.started([])
                started = True
            log.error("dashboard: cannot listen on %s: %s; trying again in %.0f s",
                      settings.listen, refused, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX)


@contextlib.contextmanager
def _listening_socket(host: str, port: int, backlog: int) -> Iterator[socket.socket]:
    """The dashboard's listening socket, closed on every path (hypercorn's own
    socket making leaves a socket open when its bind fails)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        yield sock


def _leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    """The first OSError in a (nested) group: what hypercorn's bind raised."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, OSError)
    return first


async def _watch_certificate(reloading: _ReloadingConfig | None) -> None:
    while reloading is not None:
        await trio.sleep(CERT_CHECK)
        try:
            reloading.reload()
        except OSError as exc:
            log.error("dashboard: cannot read the certificate files: %r", exc)
    await trio.sleep_forever()


def dashboard_child(settings: DashboardSettings, kube: KubeClient, kubeconfig: Path | None,
                    leadership: Leadership, lease: LeaseSettings, identity: str) -> ChildSpec:
    """The dashboard as a supervised child of the controller (its API client
    reads and reviews; actions go out with the user's own token)."""

    def factory() -> Callable[..., Awaitable[None]]:
        return functools.partial(run_dashboard, settings, kube, kube, kubeconfig, leadership,
                                 lease, identity)

    return ChildSpec("dashboard", factory)
