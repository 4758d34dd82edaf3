"""Admission of unauthenticated streams: what may reach a TokenReview.

Owns a bounded, per-source fair queue in front of an `Authenticator` and a
short cache of its answers. Any pod can reach the controller's Service:
without a bound, junk bearer tokens queue TokenReviews without limit, load
the API server's priority level the Lease renewals share, and make real
daemons time out behind them. Here:

- at most `concurrency` reviews run at once (the TokenReview rate is what
  bounds admission, not the queue: at the 16 at once measured at a few ms to
  a few tens of ms each on a loaded API server, 1000 reviews take 0.3-3 s);
- a stream waits only when it can be served in time: its expected wait
  (streams ahead / `concurrency` x the measured time of a review, a moving
  average) must stay under `max_wait`, below the server's 15 s
  authentication timeout; otherwise it is refused at once, which costs the
  daemon a short backoff where a wait ending in a timeout would cost it the
  wait, a backoff and a new TLS handshake. So the queue is sized to the
  TokenReview rate: on a quick API server a formation of 1000 daemons
  (re)connecting together after a controller failover all queue; on a slow
  one as many as can be reviewed in `max_wait` do;
- at most `queue_limit` streams wait for (or are in) a review whatever the
  rate. A waiting stream is a suspended task (a few KiB);
- per-source fairness: reviews are handed out round-robin over source
  addresses, so a source with a thousand streams waiting delays another
  source's stream by one review per round, not by a thousand; and when the
  queue is full, a stream from a source holding less than its share
  (`queue_limit` / sources waiting) takes the place of the newest waiting
  stream of the source holding the most, which is refused
  (`AdmissionRefused`) - a flood from one address fills the queue only while
  nobody else needs it. One more stream from a source at its share is
  refused at once, so a flood costs a refusal each, not a review each;
- the same token presented by several streams at once is reviewed once;
- an answer is kept for `cache_ttl` seconds, keyed by the SHA-256 of the
  token: a refused token is refused again without a review, a daemon that
  reconnects twice costs one review. The token itself is never stored.

Fairness is by source address only: daemons behind one address (a NAT, or
the benchmark's simulated daemons on loopback) share one share, which is the
whole queue while nobody else waits.

It decides nothing about identity (that is the wrapped Authenticator's), and
must never log, store or echo a token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs
import trio

from vpblu.stream.identity import (
    TOKEN_REVIEW_CONCURRENCY,
    AuthenticationFailed,
    Authenticator,
    Identity,
)

# Streams waiting for or in a review: a formation of 1000 daemons fits.
QUEUE_LIMIT = 1024
# The longest expected wait a stream is queued for (the server gives up on
# authentication after vpblu.stream.transport.AUTH_TIMEOUT, 15 s).
MAX_WAIT = 8.0
# The first guess at a review's time, before one was measured, and how much
# each measured review moves the average.
REVIEW_SECONDS = 0.05
REVIEW_WEIGHT = 0.1
# Reviews handed to the wrapped Authenticator at once (it has its own limit,
# the same by default: the order in which they go is decided here).
CONCURRENCY = TOKEN_REVIEW_CONCURRENCY
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
    refused_full: int  # refused because the queue was full (at once, or displaced)
    waiting: int  # streams waiting for or in a review now
    displaced: int = 0  # of refused_full: waiting streams whose place went to a fairer source
    sources: int = 0  # source addresses with streams waiting now
    review_seconds: float = 0.0  # the moving average of a review's time


@attrs.frozen(slots=True)
class _Answer:
    expires: float
    identity: Identity | None
    refusal: str = ""


class _InFlight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: _Answer | None = None


class _Waiter:
    __slots__ = ("displaced", "turn")

    def __init__(self) -> None:
        self.turn = trio.Event()
        self.displaced = False


class Admission:
    """An `Authenticator` that admits through a bounded, fair queue and a cache."""

    def __init__(self, inner: Authenticator, *, queue_limit: int = QUEUE_LIMIT,
                 concurrency: int = CONCURRENCY, max_wait: float = MAX_WAIT,
                 cache_ttl: float = CACHE_TTL, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = trio.current_time) -> None:
        if queue_limit < 1 or concurrency < 1:
            raise ValueError("admission needs room for at least one stream and one review")
        self._inner = inner
        self._queue_limit = queue_limit
        self._concurrency = concurrency
        self._max_wait = max_wait
        self._review_seconds = REVIEW_SECONDS
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[bytes, _Answer] = OrderedDict()
        self._in_flight: dict[bytes, _InFlight] = {}
        # Streams not yet in review, per source; the dict's order is the
        # round-robin order (a source served goes to the back).
        self._queued: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        # Streams waiting or in review, per source (what a share counts).
        self._held: dict[str, int] = {}
        self._waiting = 0
        self._reviewing = 0
        self._reviews = 0
        self._hits = 0
        self._refused = 0
        self._displaced = 0

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self._reviews, self._hits, self._refused, self._waiting,
                                   self._displaced, len(self._held), self._review_seconds)

    async def authenticate(self, token: str, *, source: str = "") -> Identity:
        """`source`: where the stream comes from (its address without the
        port), the unit of fairness; "" for all callers that do not say."""
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
                answer = await self._review(key, token, source)
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

    def _capacity(self) -> int:
        """How many streams may wait now: as many as are reviewed in max_wait."""
        rounds = int(self._max_wait / max(self._review_seconds, 1e-6))
        return max(1, min(self._queue_limit, rounds * self._concurrency))

    def _make_room(self, source: str) -> None:
        """The queue is full: displace the newest waiting stream of the source
        holding the most, if `source` holds less than its share; else refuse."""
        sources = len(self._held) + (source not in self._held)
        share = self._capacity() // sources
        if self._held.get(source, 0) < share:
            largest = max(self._queued, key=lambda s: self._held[s], default=None)
            if largest is not None and largest != source and self._held[largest] > share:
                victim = self._queued[largest].pop()
                if not self._queued[largest]:
                    del self._queued[largest]
                self._release(largest)
                victim.displaced = True
                victim.turn.set()
                self._displaced += 1
                self._refused += 1
                return
        self._refused += 1
        raise AdmissionRefused(
            f"{self._waiting} streams are waiting for authentication; retry later")

    def _release(self, source: str) -> None:
        self._waiting -= 1
        left = self._held[source] - 1
        if left:
            self._held[source] = left
        else:
            del self._held[source]

    def _dispatch(self) -> None:
        """Hand free review slots out, one source at a time, round-robin."""
        while self._reviewing < self._concurrency and self._queued:
            source, waiters = next(iter(self._queued.items()))
            waiter = waiters.popleft()
            if waiters:
                self._queued.move_to_end(source)
            else:
                del self._queued[source]
            self._reviewing += 1
            waiter.turn.set()

    async def _wait_turn(self, source: str) -> None:
        if self._waiting >= self._capacity():
            self._make_room(source)
        waiter = _Waiter()
        self._queued.setdefault(source, deque()).append(waiter)
        self._held[source] = self._held.get(source, 0) + 1
        self._waiting += 1
        self._dispatch()
        try:
            await waiter.turn.wait()
        except BaseException:
            if waiter.turn.is_set():
                if not waiter.displaced:  # given a slot as it was cancelled
                    self._reviewing -= 1
                    self._release(source)
                    self._dispatch()
            else:
                queue = self._queued[source]
                queue.remove(waiter)
                if not queue:
                    del self._queued[source]
                self._release(source)
            raise
        if waiter.displaced:
            raise AdmissionRefused(
                "too many streams from this address wait for authentication; retry later")

    async def _review(self, key: bytes, token: str, source: str) -> _Answer:
        # In flight from the moment it queues: the same token on other streams
        # waits for this answer instead of queuing again.
        flight = self._in_flight[key] = _InFlight()
        try:
            await self._wait_turn(source)
            try:
                self._reviews += 1
                began = self._clock()
                try:
                    identity = await self._inner.authenticate(token)
                except AuthenticationFailed as exc:
                    answer = _Answer(self._clock() + self._cache_ttl, None, str(exc))
                else:
                    answer = _Answer(self._clock() + self._cache_ttl, identity)
                # Other errors (the API server unreachable) are not answers: not kept.
                self._review_seconds += REVIEW_WEIGHT * (
                    self._clock() - began - self._review_seconds)
                self._remember(key, answer)
                flight.answer = answer
                return answer
            finally:
                self._reviewing -= 1
                self._release(source)
                self._dispatch()
        finally:
            del self._in_flight[key]
            flight.done.set()

    def _remember(self, key: bytes, answer: _Answer) -> None:
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
