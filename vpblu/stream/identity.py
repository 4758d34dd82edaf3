"""Who is on the other end of a warm stream: proving a daemon's node identity.

Owns the `Authenticator` seam the Mesh server asks before it serves a stream,
and its production implementation over TokenReview. A daemon has no RBAC of
its own; it presents its projected ServiceAccount token (audience `vpblu`),
and the API server says which node the pod holding it runs on: bound pod
tokens carry the `authentication.kubernetes.io/node-name` extra since
Kubernetes 1.30. This module must never log, store or echo a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import trio

AUDIENCE = "vpblu"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
TOKEN_REVIEW_TIMEOUT = 10.0
# TokenReviews in flight at once; the rest wait their turn (see authenticate).
TOKEN_REVIEW_CONCURRENCY = 16


@attrs.frozen(slots=True)
class Identity:
    """What the API server vouches for: the node the token's pod runs on."""

    node_name: str
    username: str = ""


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
        return Identity(node_name=str(node_names[0]), username=username)
