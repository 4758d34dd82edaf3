"""MetricsServer: /metrics, /healthz and /readyz over plain HTTP, on trio.

Owns one TCP listener and the little HTTP/1.1 it speaks: a GET request line
and headers (at most `MAX_REQUEST` bytes, within `REQUEST_TIMEOUT`), one
response, then the connection closes. That is all Prometheus and the kubelet's
probes need, so no web framework (and no second event loop) is pulled in.

- /metrics: `prometheus_client.generate_latest` of the process's own registry
  (text format 0.0.4).
- /healthz: liveness. Answering at all proves the trio loop runs; `live`
  may add a reason to fail (200 "ok" or 503 with the reason).
- /readyz: readiness from `ready` (the controller: its Mesh server listens,
  follower or leader; the daemon: it has applied a SyncState).

It never blocks the loop on a slow client (each connection is its own task
with a deadline) and never serves anything but these paths (404, 405).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from vpblu.supervisor import ChildSpec

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
BIND_RETRY_INITIAL = 1.0
BIND_RETRY_MAX = 60.0
# A check answers (ok, reason); the reason is the body when not ok.
Check = Callable[[], tuple[bool, str]]


def always_ok() -> tuple[bool, str]:
    return True, "ok"


@attrs.frozen(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 503: "Service Unavailable"}


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, *, host: str, port: int,
                 ready: Check = always_ok, live: Check = always_ok) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._ready = ready
        self._live = live
        self.port = port  # the bound port once listening (port 0 picks one)
        self.listening = trio.Event()
        self.requests = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Observability must never take the mesh down: a port that cannot be
        # bound (taken by another process, a second replica on the same host)
        # is logged and retried with backoff here, never raised to the
        # supervisor, whose escalation would end the whole controller or daemon.
        delay = BIND_RETRY_INITIAL
        while True:
            try:
                listeners = await trio.open_tcp_listeners(self._port, host=self._host)
                break
            except OSError as exc:
                log.warning("metrics and probes cannot listen on %s:%d (%s); retrying in %.0f s",
                            self._host, self._port, exc, delay)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(delay)
                delay = min(delay * 2, BIND_RETRY_MAX)
        self.port = listeners[0].socket.getsockname()[1]
        self.listening.set()
        log.info("metrics and probes on %s:%d", self._host, self.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started()

    def respond(self, method: str, path: str) -> Response:
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"GET only\n")
        if path == "/metrics":
            return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        ok, reason = (self._live if path == "/healthz" else self._ready)()
        return Response(200 if ok else 503, f"{reason}\n".encode())

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            response, method = Response(408, b"request timeout\n"), "GET"
            with trio.move_on_after(REQUEST_TIMEOUT):
                head = await _read_head(stream)
                parts = head.split(b"\r\n", 1)[0].split() if head is not None else []
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                    response = Response(400, b"bad request\n")
                else:
                    method = parts[0].decode("latin-1")
                    response = self.respond(method, parts[1].decode("latin-1"))
            self.requests += 1
            header = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}\r\n"
                      f"Content-Type: {response.content_type}\r\n"
                      f"Content-Length: {len(response.body)}\r\n"
                      "Connection: close\r\n\r\n").encode()
            # The client may have gone away meanwhile: nothing to tell it then.
            with (trio.move_on_after(REQUEST_TIMEOUT),
                  contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)):
                await stream.send_all(header + (b"" if method == "HEAD" else response.body))


def metrics_child(registry: CollectorRegistry, listen: str, *,
                  ready: Check = always_ok) -> ChildSpec:
    """The server as a supervised child listening on "host:port"."""
    host, _, port = listen.rpartition(":")
    server = MetricsServer(registry, host=host.strip("[]") or "0.0.0.0", port=int(port),
                           ready=ready)
    return ChildSpec("metrics", lambda: server.run)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request up to its blank line; None when it is too long or cut short."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return None
        if not chunk:
            return None
        data += chunk
    return data
