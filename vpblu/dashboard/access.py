"""Who a dashboard user is and what they may do, asked of the API server.

Owns the dashboard's authentication (TokenReview of the bearer token the user
signs in with) and authorization (a SubjectAccessReview for the user's own
identity before every page, stream and action: view = get vpblunodes,
rotate = patch vpblunodes). The controller's ServiceAccount only *asks*
(create tokenreviews, subjectaccessreviews); it never lends its own rights:
an action is carried out with the user's token (`UserApi`), so the API server
authorizes it a second time, as the user.

Answers are cached for `DECISION_TTL` seconds per (user, verb), so a page with
a live stream costs one review every few seconds, not one per event; a
revoked RoleBinding is honoured within that time.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import attrs
import trio
import trio_asyncio

from vpblu.dashboard.sessions import Identity
from vpblu.kube.client import GROUP, VPBLU_NODES, ApiError, ApiUnavailable, RawObject

log = logging.getLogger(__name__)

DECISION_TTL = 5.0
REVIEW_TIMEOUT = 10.0
USER_CALL_TIMEOUT = 10.0
MAX_CACHED = 4096

VIEW = "get"
ROTATE = "patch"


class ReviewApi(Protocol):
    async def token_review(self, token: str, audiences: list[str]) -> RawObject: ...

    async def subject_access_review(self, spec: RawObject) -> RawObject: ...


class AccessUnavailable(Exception):
    """The API server could not be asked (the user sees 503, not a refusal)."""


@attrs.frozen(slots=True)
class Decision:
    allowed: bool
    reason: str = ""


class Access:
    """TokenReview and SubjectAccessReview for the dashboard, with a short cache."""

    def __init__(self, api: ReviewApi, *, audiences: tuple[str, ...] = (),
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._api = api
        self._audiences = list(audiences)
        self._clock = clock
        self._decisions: dict[tuple[Identity, str, str], tuple[float, Decision]] = {}

    async def authenticate(self, token: str) -> Identity | None:
        """The token's user, or None when the API server does not accept it."""
        try:
            with trio.fail_after(REVIEW_TIMEOUT):
                review = await self._api.token_review(token, self._audiences)
        except (ApiUnavailable, ApiError, trio.TooSlowError) as exc:
            raise AccessUnavailable(f"TokenReview failed: {exc!r}") from exc
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        return Identity(str(user.get("username", "")), str(user.get("uid", "")),
                        tuple(str(g) for g in user.get("groups") or ()),
                        tuple(sorted((str(k), tuple(str(x) for x in v))
                                     for k, v in extra.items())))

    async def authorize(self, who: Identity, verb: str, name: str = "") -> Decision:
        key = (who, verb, name)
        now = self._clock()
        cached = self._decisions.get(key)
        if cached is not None and now - cached[0] < DECISION_TTL:
            return cached[1]
        spec: dict[str, Any] = {
            "user": who.username, "uid": who.uid, "groups": list(who.groups),
            "extra": {k: list(v) for k, v in who.extra},
            "resourceAttributes": {"group": GROUP, "resource": VPBLU_NODES.plural,
                                   "verb": verb, **({"name": name} if name else {})},
        }
        try:
            with trio.fail_after(REVIEW_TIMEOUT):
                review = await self._api.subject_access_review(spec)
        except (ApiUnavailable, ApiError, trio.TooSlowError) as exc:
            raise AccessUnavailable(f"SubjectAccessReview failed: {exc!r}") from exc
        status = review.get("status") or {}
        decision = Decision(bool(status.get("allowed")) and not status.get("denied"),
                            str(status.get("reason") or status.get("evaluationError") or ""))
        if len(self._decisions) >= MAX_CACHED:
            self._decisions.clear()
        self._decisions[key] = (now, decision)
        return decision


class UserCallFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class UserApi:
    """Calls the API server with a user's bearer token (and nothing of the
    controller's: no client certificate, no ServiceAccount token)."""

    def __init__(self, host: str, session: aiohttp.ClientSession) -> None:
        self._host = host.rstrip("/")
        self._session = session

    async def annotate_vpblu_node(self, token: str, name: str, annotations: dict[str, str]
                                  ) -> None:
        """Merge-patch `annotations` onto VpbluNode `name`, as the token's user."""
        url = self._host + VPBLU_NODES.path(name=name)
        body = json.dumps({"metadata": {"annotations": annotations}})
        session = self._session

        async def call() -> tuple[int, str]:
            async with session.patch(
                    url, data=body, timeout=aiohttp.ClientTimeout(total=USER_CALL_TIMEOUT),
                    headers={"Authorization": f"Bearer {token}",
                             "Content-Type": "application/merge-patch+json",
                             "Accept": "application/json"}) as resp:
                return resp.status, await resp.text()

        try:
            status, text = await trio_asyncio.aio_as_trio(call)()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UserCallFailed(503, f"the API server could not be reached: {exc!r}") from exc
        if status >= 400:
            try:
                message = str(json.loads(text).get("message", text))
            except ValueError:
                message = text
            raise UserCallFailed(status, message[:500])


@asynccontextmanager
async def open_user_api(kubeconfig: Path | None) -> AsyncIterator[UserApi]:
    """A `UserApi` for the API server the controller uses (its address and CA
    from the kubeconfig, or in-cluster); needs a trio-asyncio loop."""
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config

    async def make() -> tuple[str, aiohttp.ClientSession]:
        cfg = k8s_client.Configuration()
        if kubeconfig is None:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        # Created inside asyncio context (STYLE.md, trio-asyncio traps).
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                        trust_env=False)
        return str(cfg.host), session

    host, session = await trio_asyncio.aio_as_trio(make)()
    try:
        yield UserApi(host, session)
    finally:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(session.close)()
