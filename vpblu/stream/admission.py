"""Admission of unauthenticated streams: what may reach a TokenReview.

Owns a bounded queue in front of an `Authenticator` and a short cache of its
answers. Any pod can reach the controller's Service: without a bound, junk
bearer tokens queue TokenReviews without limit, load the API server's
priority level the Lease renewals share, and make real daemons time out
behind them. Here:

- at most `queue_limit` streams wait for (or are in) a review; one more is
  refused at once (`AdmissionRefused`), so a flood costs a refusal each, not
  a review each, and a real daemon's retry (with its backoff) finds room;
- the same token presented by several streams at once is reviewed once;
- an answer is kept for `cache_ttl` seconds, keyed by the SHA-256 of the
  token: a refused token is refused again without a review, a daemon that
  reconnects twice costs one review. The token itself is never stored.

It decides nothing about identity (that is the wrapped Authenticator's), and
must never log, store or echo a token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import attrs
import trio

from vpblu.stream.identity import AuthenticationFailed, Authenticator, Identity

# Streams waiting for or in a review. The TokenReviewAuthenticator runs 16 at
# once; this keeps a few rounds of them queued, no more.
QUEUE_LIMIT = 64
# How long an answer is reused. Short: a token that becomes valid (or a pod
# that is deleted) is seen within this; long enough to absorb a flood.
CACHE_TTL = 5.0
CACHE_SIZE = 4096  # answers kept (oldest go first)


class AdmissionRefused(Exception):
    """Too many streams wait for authentication: come back later."""


@attrs.frozen(slots=True)
class AdmissionStatistics:
    reviews: int  # answers asked of the wrapped Authenticator
    cache_hits: int  # answered from the cache or a review already in flight
    refused_full: int  # refused because the queue was full
    waiting: int  # streams waiting for or in a review now


@attrs.frozen(slots=True)
class _Answer:
    expires: float
    identity: Identity | None
    refusal: str = ""


class _InFlight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: _Answer | None = None


class Admission:
    """An `Authenticator` that admits through a bounded queue and a cache."""

    def __init__(self, inner: Authenticator, *, queue_limit: int = QUEUE_LIMIT,
                 cache_ttl: float = CACHE_TTL, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._inner = inner
        self._queue_limit = queue_limit
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[bytes, _Answer] = OrderedDict()
        self._in_flight: dict[bytes, _InFlight] = {}
        self._waiting = 0
        self._reviews = 0
        self._hits = 0
        self._refused = 0

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self._reviews, self._hits, self._refused, self._waiting)

    async def authenticate(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode()).digest()
        answer = self._cached(key)
        if answer is None:
            flight = self._in_flight.get(key)
            if flight is not None:
                self._hits += 1
                await flight.done.wait()
                answer = flight.answer
                if answer is None:  # that review failed without an answer
                    raise AdmissionRefused("the token could not be checked now; retry later")
            else:
                answer = await self._review(key, token)
        else:
            self._hits += 1
        if answer.identity is None:
            raise AuthenticationFailed(answer.refusal)
        return answer.identity

    def _cached(self, key: bytes) -> _Answer | None:
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.expires <= self._clock():
            del self._cache[key]
            return None
        return answer

    async def _review(self, key: bytes, token: str) -> _Answer:
        if self._waiting >= self._queue_limit:
            self._refused += 1
            raise AdmissionRefused(
                f"{self._waiting} streams are waiting for authentication; retry later")
        flight = self._in_flight[key] = _InFlight()
        self._waiting += 1
        try:
            self._reviews += 1
            try:
                identity = await self._inner.authenticate(token)
            except AuthenticationFailed as exc:
                answer = _Answer(self._clock() + self._cache_ttl, None, str(exc))
            else:
                answer = _Answer(self._clock() + self._cache_ttl, identity)
            # Other errors (the API server unreachable) are not answers: not kept.
            self._remember(key, answer)
            flight.answer = answer
            return answer
        finally:
            self._waiting -= 1
            del self._in_flight[key]
            flight.done.set()

    def _remember(self, key: bytes, answer: _Answer) -> None:
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
