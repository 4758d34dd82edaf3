"""Who is on the other end of a warm stream: proving a daemon's node identity.

Owns the `Authenticator` seam the Mesh server asks before it serves a stream,
and its production implementation over TokenReview. A daemon has no RBAC of
its own; it presents its projected ServiceAccount token (audience `vpblu`),
and the API server says which node the pod holding it runs on: bound pod
tokens carry the `authentication.kubernetes.io/node-name` extra since
Kubernetes 1.30. This module must never log, store or echo a token.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import trio

AUDIENCE = "vpblu"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
# A Pod-bound token names its Pod too (the API server checks, at every review,
# that a Pod of that name and uid still exists); vpblu.stream.podbinding checks
# it is a current daemon Pod on the node.
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
TOKEN_REVIEW_TIMEOUT = 10.0
# TokenReviews in flight at once; the rest wait their turn (see authenticate).
TOKEN_REVIEW_CONCURRENCY = 16


@attrs.frozen(slots=True)
class Identity:
    """What the API server vouches for: the node the token's pod runs on."""

    node_name: str
    username: str = ""
    # The Pod the token is bound to ("" for a token not bound to a Pod).
    pod_name: str = ""
    pod_uid: str = ""
    # The token's `exp` claim (Unix time), read once the API server vouched for
    # the token; None when it has none. A stream ends when it passes.
    expires_at: float | None = None


class AuthenticationFailed(Exception):
    """The token proves nothing (invalid, expired, wrong audience, not node-bound)."""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Identity:
        """The token's identity, or `AuthenticationFailed`. Other errors mean
        the check itself could not be made (API server unreachable)."""
        ...


class TokenReviewer(Protocol):
    """The one call this needs from `vpblu.kube.client.KubeApi`."""

    async def token_review(self, token: str, audiences: Sequence[str]) -> dict[str, Any]: ...


class TokenReviewAuthenticator:
    """`Authenticator` over the API server's TokenReview.

    `allowed_users` (e.g. the daemon's ServiceAccount,
    "system:serviceaccount:vpblu-system:vpblu-daemon"), when given, is the
    only set of users accepted: any other pod on a node could otherwise mint
    a `vpblu` token bound to itself and speak for that node.
    """

    def __init__(self, api: TokenReviewer, *, audience: str = AUDIENCE,
                 allowed_users: frozenset[str] | None = None,
                 concurrency: int = TOKEN_REVIEW_CONCURRENCY) -> None:
        self._api = api
        self._audience = audience
        self._allowed_users = allowed_users
        # A thousand daemons reconnecting at once wait here, in order, instead
        # of as a thousand requests in the API client's pool, where they would
        # time out together and all reconnect again.
        self._limiter = trio.CapacityLimiter(concurrency)

    async def authenticate(self, token: str) -> Identity:
        async with self._limiter:
            with trio.fail_after(TOKEN_REVIEW_TIMEOUT):
                review = await self._api.token_review(token, [self._audience])
        status = review.get("status") or {}
        if not status.get("authenticated"):
            raise AuthenticationFailed(status.get("error") or "the API server rejected the token")
        # The API server answers with the audiences the token is valid for
        # among those asked; an empty answer on an authenticated review means
        # the server's own default audience, which is not ours.
        if self._audience not in (status.get("audiences") or ()):
            raise AuthenticationFailed(f"the token is not for audience {self._audience!r}")
        user = status.get("user") or {}
        username = str(user.get("username", ""))
        if self._allowed_users is not None and username not in self._allowed_users:
            raise AuthenticationFailed(f"user {username!r} may not speak for a node")
        node_names = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or []
        if len(node_names) != 1 or not node_names[0]:
            raise AuthenticationFailed(
                f"the token of {username!r} is not bound to a pod on a node "
                f"(no {NODE_NAME_EXTRA} claim)"
            )
        extra = user.get("extra") or {}
        return Identity(node_name=str(node_names[0]), username=username,
                        pod_name=_single(extra.get(POD_NAME_EXTRA)),
                        pod_uid=_single(extra.get(POD_UID_EXTRA)),
                        expires_at=token_expiry(token))


def _single(values: Any) -> str:
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified: call it only on a token the API
    server has just vouched for (it checked the signature). None when the
    token is not a JWT or has no numeric `exp`."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)
