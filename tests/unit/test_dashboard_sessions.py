"""The dashboard's session cookie, CSRF, login rate limit, address rules and
its authorization cache (with a fake review API, named as such)."""

from __future__ import annotations

from typing import Any

import pytest

from vpblu.dashboard.access import ROTATE, VIEW, Access
from vpblu.dashboard.server import DashboardSettings, PlainHttpRefused
from vpblu.dashboard.sessions import (
    Identity,
    LoginLimiter,
    SessionBox,
    csrf_ok,
    random_key,
    session_key,
    token_expiry,
)

WHO = Identity("system:serviceaccount:ns:viewer", "uid-1", ("system:authenticated",),
               (("authentication.kubernetes.io/pod-name", ("p",)),))


def test_a_sealed_session_opens_only_intact_under_its_key_and_before_expiry() -> None:
    box = SessionBox(session_key(b"-----BEGIN PRIVATE KEY----- test"))
    session = box.new(WHO, "the-token", now=1000.0, ttl=60.0)
    sealed = box.seal(session)
    assert "the-token" not in sealed and "viewer" not in sealed  # encrypted, not just signed
    assert box.open(sealed, 1059.0) == session
    assert box.open(sealed, 1060.0) is None  # expired
    flipped = sealed[:20] + ("A" if sealed[20] != "A" else "B") + sealed[21:]
    assert box.open(flipped, 1001.0) is None
    assert SessionBox(random_key()).open(sealed, 1001.0) is None  # another replica's key
    assert box.open("", 1001.0) is None and box.open("garbage!", 1001.0) is None
    # The same key material (every replica mounts the same Secret) opens it.
    assert SessionBox(session_key(b"-----BEGIN PRIVATE KEY----- test")).open(
        sealed, 1001.0) == session
    assert box.new(WHO, "t", now=0.0, ttl=3600.0, not_after=10.0).expires == 10.0


def test_csrf_needs_the_sessions_own_token() -> None:
    box = SessionBox(random_key())
    session = box.new(WHO, "t", now=0.0)
    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, None) and not csrf_ok(session, "")
    assert not csrf_ok(session, box.new(WHO, "t", now=0.0).csrf)
    secret = box.new(WHO, "secret-token", now=0.0)
    assert secret.csrf not in repr(secret) and "secret-token" not in repr(secret)


def test_login_attempts_are_limited_per_client_and_refill() -> None:
    limiter = LoginLimiter(per_minute=6.0, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # another address has its own bucket
    assert limiter.retry_after("a") == pytest.approx(10.0)
    assert not limiter.allow("a", 9.0)
    assert limiter.allow("a", 19.5)
    small = LoginLimiter(per_minute=60.0, burst=1, max_clients=2)
    for i in range(10):
        assert small.allow(f"c{i}", float(i))
    assert len(small._buckets) <= 2


def test_plain_http_only_on_loopback() -> None:
    assert not DashboardSettings("127.0.0.1:8082").tls
    assert not DashboardSettings("[::1]:8082").tls
    for addr in (":8082", "0.0.0.0:8082", "10.0.0.1:8082"):
        with pytest.raises(PlainHttpRefused, match="only on loopback"):
            DashboardSettings(addr)
    with pytest.raises(ValueError, match="host:port"):
        DashboardSettings("8082")


class FakeReviews:
    """Answers like the API server for a fixed RBAC table; counts questions."""

    def __init__(self, allowed: set[tuple[str, str]]) -> None:
        self.allowed = allowed
        self.asked: list[dict[str, Any]] = []

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        if token != "good":
            return {"status": {"authenticated": False}}
        return {"status": {"authenticated": True, "user": {
            "username": WHO.username, "uid": WHO.uid, "groups": list(WHO.groups),
            "extra": {k: list(v) for k, v in WHO.extra}}}}

    async def subject_access_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.asked.append(spec)
        verb = spec["resourceAttributes"]["verb"]
        ok = (spec["user"], verb) in self.allowed
        return {"status": {"allowed": ok, "reason": "" if ok else "no RBAC"}}


async def test_access_reviews_the_users_own_identity_and_caches_briefly() -> None:
    clock = [0.0]
    fake = FakeReviews({(WHO.username, VIEW)})
    access = Access(fake, clock=lambda: clock[0])
    assert await access.authenticate("bad") is None
    who = await access.authenticate("good")
    assert who == WHO
    assert (await access.authorize(who, VIEW)).allowed
    refused = await access.authorize(who, ROTATE, "node-a")
    assert not refused.allowed and refused.reason == "no RBAC"
    spec = fake.asked[-1]
    assert spec["user"] == WHO.username and spec["groups"] == list(WHO.groups)
    assert spec["resourceAttributes"] == {"group": "vpblu.io", "resource": "vpblunodes",
                                          "verb": "patch", "name": "node-a"}
    await access.authorize(who, VIEW)
    assert len(fake.asked) == 2  # cached
    clock[0] = 10.0
    fake.allowed.clear()  # the RoleBinding was removed
    assert not (await access.authorize(who, VIEW)).allowed


def test_a_session_ends_when_its_jwt_does() -> None:
    import base64
    import json
    import math

    def jwt(claims: object) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.signature"

    assert token_expiry(jwt({"exp": 1234, "sub": "x"})) == 1234.0
    assert token_expiry(jwt({"sub": "x"})) == math.inf
    assert token_expiry("opaque-token") == math.inf
    assert token_expiry("a.!!!.c") == math.inf
    box = SessionBox(random_key())
    assert box.new(WHO, "t", now=1000.0, not_after=token_expiry(jwt({"exp": 1300}))
                   ).expires == 1300.0
