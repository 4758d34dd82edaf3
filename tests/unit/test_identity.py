"""TokenReviewAuthenticator reads the node out of the API server's answer, and nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from vpblu.stream.identity import (
    NODE_NAME_EXTRA,
    AuthenticationFailed,
    Identity,
    TokenReviewAuthenticator,
)

SA = "system:serviceaccount:vpblu-system:vpblu-daemon"


class FakeTokenReviewer:
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.asked: list[tuple[str, list[str]]] = []

    async def token_review(self, token: str, audiences: Sequence[str]) -> dict[str, Any]:
        self.asked.append((token, list(audiences)))
        return {"kind": "TokenReview", "status": self.status}


def bound(node: str | None, *, user: str = SA,
          audiences: Sequence[str] = ("vpblu",)) -> dict[str, Any]:
    extra = {NODE_NAME_EXTRA: [node]} if node else {}
    return {"authenticated": True, "audiences": list(audiences),
            "user": {"username": user, "extra": extra}}


async def test_a_node_bound_token_names_its_node() -> None:
    api = FakeTokenReviewer(bound("node-a"))
    identity = await TokenReviewAuthenticator(api).authenticate("t0ken")
    assert identity == Identity("node-a", SA)
    assert api.asked == [("t0ken", ["vpblu"])]


@pytest.mark.parametrize(("status", "says"), [
    ({"authenticated": False, "error": "token expired"}, "token expired"),
    ({}, "rejected"),
    (bound("node-a", audiences=()), "audience"),
    (bound(None), "not bound to a pod on a node"),
])
async def test_tokens_that_prove_nothing_are_refused(status: dict[str, Any], says: str) -> None:
    with pytest.raises(AuthenticationFailed, match=says):
        await TokenReviewAuthenticator(FakeTokenReviewer(status)).authenticate("t")


async def test_only_allowed_users_speak_for_a_node() -> None:
    api = FakeTokenReviewer(bound("node-a", user="system:serviceaccount:x:y"))
    auth = TokenReviewAuthenticator(api, allowed_users=frozenset({SA}))
    with pytest.raises(AuthenticationFailed, match="may not speak for a node"):
        await auth.authenticate("t")


class SlowTokenReviewer(FakeTokenReviewer):
    """Takes a while per review and remembers how many were in flight at once."""

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status)
        self.in_flight = 0
        self.most_in_flight = 0

    async def token_review(self, token: str, audiences: Sequence[str]) -> dict[str, Any]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(0.5)
            return await super().token_review(token, audiences)
        finally:
            self.in_flight -= 1


async def test_a_reconnect_storm_queues_here_not_in_the_api_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = SlowTokenReviewer(bound("node-a"))
    auth = TokenReviewAuthenticator(api, concurrency=4)
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(auth.authenticate, f"t{i}")
    assert len(api.asked) == 40
    assert api.most_in_flight == 4
    assert trio.current_time() == 40 / 4 * 0.5
