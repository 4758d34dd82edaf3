"""The dashboard's session cookie, its CSRF token and the login rate limit.

Owns how a signed-in user is remembered between requests. Pure: no I/O, and
time is passed in.

A session is sealed with AES-256-GCM (authenticated encryption): the browser
holds it but can neither read nor change it, and a cookie altered by one bit,
sealed under another key or past its expiry is simply no session. It holds the
user's bearer token because actions run *as the user* (the API server
authorizes the patch, not the controller's own RBAC); the token therefore
never appears in the clear outside the API server's TLS connection and this
process's memory. The key comes from the controller's TLS private key through
HKDF, so every replica (they mount the same Secret) opens every replica's
cookies: any replica can answer a browser. A renewed certificate (new key)
ends the sessions made before it; users sign in again.

CSRF: every session carries a random token; every state-changing form
repeats it (`csrf` field) and the app compares them in constant time. The
cookie is also SameSite=Strict and HttpOnly.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import os
import secrets

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_TTL = 3600.0  # one hour, then sign in again (a token may have a shorter life)
_NONCE = 12
_INFO = b"vpblu dashboard session v1"
# Cookies over ~4 KB are dropped by browsers; a ServiceAccount token is ~1 KB.
MAX_COOKIE = 3900


@attrs.frozen(slots=True)
class Identity:
    """Who a token belongs to, as TokenReview said (SubjectAccessReview asks with it)."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@attrs.frozen(slots=True)
class Session:
    identity: Identity
    token: str = attrs.field(repr=False)  # the user's bearer token: never logged
    expires: float  # seconds since the epoch
    csrf: str = attrs.field(repr=False)


class SessionTooLarge(ValueError):
    """The token is too long to keep in a cookie."""


def session_key(material: bytes) -> bytes:
    """A 256-bit key derived from `material` (the TLS private key's bytes)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(material)


def random_key() -> bytes:
    """For a dashboard without TLS (loopback only): sessions live as long as the process."""
    return os.urandom(32)


class SessionBox:
    """Seals sessions into cookie values and opens them."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def new(self, identity: Identity, token: str, now: float,
            ttl: float = SESSION_TTL, not_after: float = math.inf) -> Session:
        return Session(identity, token, min(now + ttl, not_after), secrets.token_urlsafe(32))

    def seal(self, session: Session) -> str:
        body = json.dumps({
            "u": session.identity.username, "i": session.identity.uid,
            "g": list(session.identity.groups),
            "x": [[k, list(v)] for k, v in session.identity.extra],
            "t": session.token, "e": session.expires, "c": session.csrf,
        }, separators=(",", ":")).encode()
        nonce = os.urandom(_NONCE)
        sealed = base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, body, None)).decode()
        if len(sealed) > MAX_COOKIE:
            raise SessionTooLarge(f"a session of {len(sealed)} bytes does not fit a cookie")
        return sealed

    def open(self, value: str | None, now: float) -> Session | None:
        """The session in `value`, or None (absent, altered, foreign or expired)."""
        if not value or len(value) > MAX_COOKIE:
            return None
        try:
            raw = base64.urlsafe_b64decode(value.encode())
            body = json.loads(self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], None))
            session = Session(
                Identity(str(body["u"]), str(body["i"]), tuple(str(g) for g in body["g"]),
                         tuple((str(k), tuple(str(x) for x in v)) for k, v in body["x"])),
                str(body["t"]), float(body["e"]), str(body["c"]))
        except (ValueError, KeyError, TypeError, InvalidTag):
            return None
        return session if now < session.expires else None


def token_expiry(token: str) -> float:
    """The `exp` claim of a JWT bearer token (ServiceAccount and OIDC tokens
    are JWTs), or infinity when it has none. Read without verifying the
    signature: the API server's TokenReview already said the token is good;
    this only keeps a session from outliving it."""
    parts = token.split(".")
    if len(parts) != 3:
        return math.inf
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return math.inf
    return exp if math.isfinite(exp) else math.inf


def csrf_ok(session: Session, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(session.csrf.encode(),
                                                   str(presented).encode())


@attrs.define
class _Bucket:
    tokens: float
    at: float


class LoginLimiter:
    """Login attempts per client address: a token bucket of `burst` attempts
    refilled at `per_minute`; a failed and a good attempt cost the same (the
    limiter must not tell which tokens are valid). Holds at most `max_clients`
    addresses, forgetting the fullest buckets first."""

    def __init__(self, per_minute: float = 10.0, burst: int = 10,
                 max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self._max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, client: str, now: float) -> bool:
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self._forget_full(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst),
                            bucket.tokens + (now - bucket.at) * self.per_minute / 60.0)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after(self, client: str) -> float:
        bucket = self._buckets.get(client)
        if bucket is None or bucket.tokens >= 1.0:
            return 0.0
        return (1.0 - bucket.tokens) * 60.0 / self.per_minute

    def _forget_full(self, now: float) -> None:
        refill = self.per_minute / 60.0
        for client, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * refill >= self.burst:
                del self._buckets[client]
        if len(self._buckets) >= self._max_clients:
            self._buckets.pop(next(iter(self._buckets)))
