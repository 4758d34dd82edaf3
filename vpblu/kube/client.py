"""The one adapter between vpblu and kubernetes-asyncio.

Owns the asyncio side of every Kubernetes API call the controller makes: the
ApiClient (an aiohttp session, created inside asyncio context and always
closed), list, watch, get/create/replace, status patches and TokenReview. The
rest of the controller sees plain trio and the `KubeApi` protocol; raw API
dicts leave this module only to be typed at once by the watcher or status
code that asked for them.

It must never retry on its own (the caller's actor owns backoff) and never
hide an error: HTTP failures become `ApiError` (with `Gone`, `Conflict` and
`NotFound` for the statuses callers act on), connection failures become
`ApiUnavailable`.

Watch streams are read on the asyncio side a whole buffer at a time and cross
into trio as a batch of events: crossing trio->asyncio costs far more than
parsing one event (STACK.md), and a burst of 1000 Node events should cost a
handful of crossings, not a thousand.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import aiohttp
import attrs
import trio
import trio_asyncio
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

T = TypeVar("T")
RawObject = dict[str, Any]

# A server-side watch ends after this long (the API server's own bound is
# --min-request-timeout..2x); the client read timeout must outlast it and the
# bookmarks that come about once a minute in between.
WATCH_SERVER_TIMEOUT = 290
WATCH_READ_TIMEOUT = WATCH_SERVER_TIMEOUT + 30
REQUEST_TIMEOUT = 10.0
# aiohttp's read buffer, as kubernetes-asyncio sizes it: one watch event can
# carry an object of up to etcd's 1.5 MiB request limit.
READ_BUFFER = 2**21
CONNECT_TIMEOUT = 5.0


@attrs.frozen(slots=True)
class ResourceKind:
    """Where a kind lives in the API. `group` is "" for the core group."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, *, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource is not None:
                base += f"/{subresource}"
        return base


GROUP = "vpblu.io"
VERSION = "v1alpha1"
NODES = ResourceKind("Node", "", "v1", "nodes")
PODS = ResourceKind("Pod", "", "v1", "pods", namespaced=True)
LEASES = ResourceKind("Lease", "coordination.k8s.io", "v1", "leases", namespaced=True)
VPBLU_NODES = ResourceKind("VpbluNode", GROUP, VERSION, "vpblunodes")
TUNNEL_POLICIES = ResourceKind("TunnelPolicy", GROUP, VERSION, "tunnelpolicies")
ROUTE_POLICIES = ResourceKind("RoutePolicy", GROUP, VERSION, "routepolicies")
BLOCK_POLICIES = ResourceKind("BlockPolicy", GROUP, VERSION, "blockpolicies")
ROTATION_POLICIES = ResourceKind("RotationPolicy", GROUP, VERSION, "rotationpolicies")
SERVICE_CIDRS = ResourceKind("ServiceCIDR", "networking.k8s.io", "v1", "servicecidrs")
EVENTS = ResourceKind("Event", "", "v1", "events", namespaced=True)
CONFIG_MAPS = ResourceKind("ConfigMap", "", "v1", "configmaps", namespaced=True)

# Every write names this manager (managedFields), so a status write by anyone
# else is told apart - and named - by the StatusActor.
FIELD_MANAGER = "vpblu-controller"
# The controller's User-Agent: audit logs (and API server metrics) tell its
# requests apart whatever credentials it runs with.
CONTROLLER_USER_AGENT = "vpblu-controller"


class ApiUnavailable(Exception):
    """The API server could not be reached or did not answer in time."""


class ApiError(Exception):
    """The API server answered with an HTTP error."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion is too old; the caller must relist."""


class Conflict(ApiError):
    """409: someone else wrote first (resourceVersion mismatch or already exists)."""


class NotFound(ApiError):
    """404."""


def _api_error(status: int, reason: str, body: str | bytes | None) -> ApiError:
    message = ""
    if body:
        try:
            message = str(json.loads(body).get("message", ""))
        except (ValueError, AttributeError):
            message = body.decode(errors="replace") if isinstance(body, bytes) else body
    cls = {410: Gone, 409: Conflict, 404: NotFound}.get(status, ApiError)
    return cls(status, reason, message)


@attrs.frozen(slots=True)
class ListResult:
    items: tuple[RawObject, ...]
    resource_version: str


@attrs.frozen(slots=True)
class WatchEvent:
    """One watch event: type is ADDED, MODIFIED, DELETED or BOOKMARK."""

    type: str
    object: RawObject

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class WatchStream(Protocol):
    async def next_batch(self) -> Sequence[WatchEvent]:
        """Wait for at least one event; return every event already received.

        An empty batch means the server ended the watch normally (its timeout):
        the caller re-watches from the last resourceVersion it saw.
        """
        ...


class KubeApi(Protocol):
    """What the controller asks of the API server. Fakes live in tests/."""

    async def list(self, kind: ResourceKind, *, namespace: str | None = None,
                   label_selector: str | None = None) -> ListResult: ...

    def watch(self, kind: ResourceKind, resource_version: str, *,
              namespace: str | None = None,
              label_selector: str | None = None) -> Any:
        """An async context manager yielding a `WatchStream`."""
        ...

    async def get(self, kind: ResourceKind, name: str, *,
                  namespace: str | None = None) -> RawObject: ...

    async def create(self, kind: ResourceKind, body: RawObject, *,
                     namespace: str | None = None) -> RawObject: ...

    async def replace(self, kind: ResourceKind, name: str, body: RawObject, *,
                      namespace: str | None = None) -> RawObject: ...

    async def delete(self, kind: ResourceKind, name: str, *,
                     namespace: str | None = None) -> None: ...

    async def patch_status(self, kind: ResourceKind, name: str, status: RawObject, *,
                           namespace: str | None = None,
                           resource_version: str | None = None) -> RawObject: ...

    async def patch_json(self, kind: ResourceKind, name: str, operations: Sequence[RawObject],
                         *, namespace: str | None = None) -> RawObject: ...

    async def delete_uid(self, kind: ResourceKind, name: str, uid: str, *,
                         namespace: str | None = None) -> None: ...

    async def token_review(self, token: str, audiences: Sequence[str]) -> RawObject: ...


class _AioWatch:
    """The asyncio half of one open watch: an aiohttp response read line-wise."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._partial = b""

    async def read_batch(self) -> list[WatchEvent]:
        content = self._response.content
        first = await content.readline()
        if not first:
            return []
        # Whatever else already arrived comes along in the same crossing.
        data = self._partial + first + content.read_nowait(-1)
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended on a newline
        events = []
        for line in lines:
            if line.strip():
                events.append(_parse_event(line))
        return events

    def close(self) -> None:
        # Synchronous in aiohttp: safe to call from trio, even in a cancelled scope.
        self._response.close()


def _parse_event(line: bytes) -> WatchEvent:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise ApiError(0, "MalformedWatchEvent", f"not JSON: {exc}") from None
    etype = raw.get("type")
    obj = raw.get("object")
    if not isinstance(etype, str) or not isinstance(obj, dict):
        raise ApiError(0, "MalformedWatchEvent", "event without type or object")
    if etype == "ERROR":
        raise _api_error(int(obj.get("code", 0)), str(obj.get("reason", "")),
                         json.dumps(obj))
    return WatchEvent(etype, obj)


class _TrioWatchStream:
    def __init__(self, aio: _AioWatch) -> None:
        self._aio = aio

    async def next_batch(self) -> Sequence[WatchEvent]:
        try:
            batch: list[WatchEvent] = await trio_asyncio.aio_as_trio(self._aio.read_batch)()
            return batch
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ApiUnavailable(f"watch stream broke: {exc!r}") from exc


class KubeClient:
    """`KubeApi` over kubernetes-asyncio. Create with `open_kube_client`."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api

    async def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            return cast(T, await trio_asyncio.aio_as_trio(fn)())
        except ApiException as exc:
            raise _api_error(exc.status, str(exc.reason), exc.body) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ApiUnavailable(f"{exc!r}") from exc

    async def _request(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                       body: Any = None, content_type: str = "application/json",
                       aio_timeout: float | aiohttp.ClientTimeout = REQUEST_TIMEOUT) -> Any:
        """One call on the asyncio side; the body is read and parsed there too."""
        api = self._api

        async def call() -> Any:
            resp = await api.call_api(
                path, method, query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=aio_timeout,
            )
            try:
                data = await resp.read()
                if resp.status >= 400:
                    raise _api_error(resp.status, resp.reason or "", data)
                return json.loads(data) if data else None
            finally:
                resp.release()

        return await self._call(call)

    async def list(self, kind: ResourceKind, *, namespace: str | None = None,
                   label_selector: str | None = None) -> ListResult:
        query = [("labelSelector", label_selector)] if label_selector else []
        raw = await self._request("GET", kind.path(namespace=namespace), query=query,
                                  aio_timeout=REQUEST_TIMEOUT * 6)
        items = tuple(raw.get("items") or ())
        return ListResult(items, str(raw.get("metadata", {}).get("resourceVersion", "")))

    @asynccontextmanager
    async def watch(self, kind: ResourceKind, resource_version: str, *,
                    namespace: str | None = None,
                    label_selector: str | None = None) -> AsyncIterator[WatchStream]:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(WATCH_SERVER_TIMEOUT)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        api = self._api
        path = kind.path(namespace=namespace)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=WATCH_READ_TIMEOUT)

        async def open_watch() -> _AioWatch:
            resp = await api.call_api(
                path, "GET", query_params=query, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
            )
            if resp.status >= 400:
                try:
                    data = await resp.read()
                finally:
                    resp.release()
                raise _api_error(resp.status, resp.reason or "", data)
            return _AioWatch(resp)

        aio = await self._call(open_watch)
        try:
            yield _TrioWatchStream(aio)
        finally:
            aio.close()

    async def get(self, kind: ResourceKind, name: str, *,
                  namespace: str | None = None) -> RawObject:
        result: RawObject = await self._request("GET", kind.path(namespace=namespace, name=name))
        return result

    async def server_version(self) -> RawObject:
        """The API server's /version (gitVersion, major, minor, ...)."""
        result: RawObject = await self._request("GET", "/version")
        return result

    async def create(self, kind: ResourceKind, body: RawObject, *,
                     namespace: str | None = None) -> RawObject:
        result: RawObject = await self._request("POST", kind.path(namespace=namespace), body=body,
                                                query=[("fieldManager", FIELD_MANAGER)])
        return result

    async def replace(self, kind: ResourceKind, name: str, body: RawObject, *,
                      namespace: str | None = None) -> RawObject:
        result: RawObject = await self._request(
            "PUT", kind.path(namespace=namespace, name=name), body=body)
        return result

    async def delete(self, kind: ResourceKind, name: str, *,
                     namespace: str | None = None) -> None:
        await self._request("DELETE", kind.path(namespace=namespace, name=name))

    async def patch_status(self, kind: ResourceKind, name: str, status: RawObject, *,
                           namespace: str | None = None,
                           resource_version: str | None = None) -> RawObject:
        """A merge patch of status; with `resource_version`, only onto that
        version of the object (else `Conflict`)."""
        body: RawObject = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        result: RawObject = await self._request(
            "PATCH", kind.path(namespace=namespace, name=name, subresource="status"),
            body=body, content_type="application/merge-patch+json",
            query=[("fieldManager", FIELD_MANAGER)])
        return result

    async def patch_json(self, kind: ResourceKind, name: str, operations: Sequence[RawObject],
                         *, namespace: str | None = None) -> RawObject:
        """A JSON patch (RFC 6902) of the object itself (metadata, say)."""
        result: RawObject = await self._request(
            "PATCH", kind.path(namespace=namespace, name=name), body=[*operations],
            content_type="application/json-patch+json", query=[("fieldManager", FIELD_MANAGER)])
        return result

    async def delete_uid(self, kind: ResourceKind, name: str, uid: str, *,
                         namespace: str | None = None) -> None:
        """Delete the object only if it is still the one with `uid` (else `Conflict`)."""
        await self._request("DELETE", kind.path(namespace=namespace, name=name),
                            body={"apiVersion": "v1", "kind": "DeleteOptions",
                                  "preconditions": {"uid": uid}})

    async def token_review(self, token: str, audiences: Sequence[str]) -> RawObject:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        result: RawObject = await self._request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body)
        return result


    async def subject_access_review(self, spec: RawObject) -> RawObject:
        """May the user in `spec` (user, uid, groups, extra, resourceAttributes) do it?"""
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        result: RawObject = await self._request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=body)
        return result


async def _settle_environment(api: k8s_client.ApiClient, cfg: k8s_client.Configuration) -> None:
    """Read the proxy environment once, not on every call.

    kubernetes-asyncio opens its aiohttp session with trust_env, and aiohttp
    then looks up the proxy variables and parses ~/.netrc on every request,
    each in an executor thread: a quarter of the controller's CPU while it
    writes 1000 statuses. The API server's proxy (HTTPS_PROXY / NO_PROXY, as
    client-go honours them) is resolved here, once, unless the kubeconfig
    names one; netrc never applies (the API server takes tokens or client
    certificates). The session is then replaced by one that trusts nothing
    but what it is given.
    """
    rest = api.rest_client
    if not cfg.proxy:
        url = urllib.parse.urlsplit(str(cfg.host))
        if url.hostname and not urllib.request.proxy_bypass(url.hostname):
            proxy = urllib.request.getproxies().get(url.scheme)
            if proxy:
                rest.proxy = proxy
    ssl_context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        ssl_context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
    if not cfg.verify_ssl:
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    if cfg.disable_strict_ssl_verification:
        ssl_context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    old = rest.pool_manager
    rest.pool_manager = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=cfg.connection_pool_maxsize, ssl=ssl_context),
        trust_env=False, read_bufsize=READ_BUFFER)
    await old.close()


@asynccontextmanager
async def open_kube_client(kubeconfig: Path | None, *,
                           user_agent: str | None = None) -> AsyncIterator[KubeClient]:
    """A `KubeClient` for the duration of the block; needs a running trio-asyncio loop.

    kubeconfig None means in-cluster configuration (the pod's ServiceAccount);
    `user_agent` replaces kubernetes-asyncio's generic one.
    """

    async def make() -> k8s_client.ApiClient:
        cfg = k8s_client.Configuration()
        if kubeconfig is None:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
        # aiohttp is created here, inside asyncio context (STYLE.md, trio-asyncio traps).
        api = k8s_client.ApiClient(configuration=cfg)
        if user_agent is not None:
            api.user_agent = user_agent
        await _settle_environment(api, cfg)
        return api

    api = await trio_asyncio.aio_as_trio(make)()
    try:
        yield KubeClient(api)
    finally:
        # The session must close even while the caller is being cancelled: an
        # unclosed aiohttp session is reported by the loop and ends the program.
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(api.close)()
