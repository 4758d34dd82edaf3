"""Admission: a bounded review queue and a short cache of answers by token
hash, in front of a FakeAuthenticator (virtual time)."""

from __future__ import annotations

import hashlib
from functools import partial

import pytest
import trio
import trio.testing

from vpblu.stream.admission import Admission, AdmissionRefused
from vpblu.stream.identity import AuthenticationFailed, Identity


class FakeAuthenticator:
    """A slow review: 'good-N' tokens are node N's, others refused."""

    def __init__(self) -> None:
        self.reviews: list[str] = []
        self.gate = trio.Event()
        self.gate.set()

    async def authenticate(self, token: str) -> Identity:
        self.reviews.append(token)
        await self.gate.wait()
        await trio.sleep(0.1)
        if not token.startswith("good-"):
            raise AuthenticationFailed("junk")
        return Identity(token.removeprefix("good-"))


async def test_a_full_queue_refuses_at_once_and_a_later_retry_gets_in(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthenticator()
    fake.gate = trio.Event()
    admission = Admission(fake, queue_limit=4)
    outcomes: list[str] = []

    async def junk(i: int) -> None:
        with pytest.raises(AuthenticationFailed):
            await admission.authenticate(f"junk-{i}")
        outcomes.append("refused by review")

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(junk, i)
        await trio.sleep(0.01)
        started = trio.current_time()
        with pytest.raises(AdmissionRefused):
            await admission.authenticate("good-a")
        assert trio.current_time() == started  # refused without waiting
        assert admission.statistics().refused_full == 1
        fake.gate.set()
    assert outcomes == ["refused by review"] * 4
    assert (await admission.authenticate("good-a")).node_name == "a"


async def test_answers_are_cached_by_token_hash_for_a_short_time(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthenticator()
    admission = Admission(fake, cache_ttl=5.0)
    for _ in range(100):
        with pytest.raises(AuthenticationFailed):
            await admission.authenticate("junk")
        assert (await admission.authenticate("good-a")).node_name == "a"
    assert fake.reviews == ["junk", "good-a"]
    assert admission.statistics().cache_hits == 198
    # Kept by hash, never the token itself.
    assert all(isinstance(k, bytes) and len(k) == 32 for k in admission._cache)
    assert hashlib.sha256(b"junk").digest() in admission._cache
    await trio.sleep(5.0)
    await admission.authenticate("good-a")
    assert fake.reviews == ["junk", "good-a", "good-a"]


async def test_one_token_on_many_streams_at_once_is_reviewed_once(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthenticator()
    admission = Admission(fake, queue_limit=2)
    names: list[str] = []

    async def one() -> None:
        names.append((await admission.authenticate("good-b")).node_name)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert names == ["b"] * 50
    assert fake.reviews == ["good-b"]
    assert admission.statistics().refused_full == 0


async def test_a_review_that_could_not_be_made_is_not_cached(
        autojump_clock: trio.testing.MockClock) -> None:
    class Unreachable:
        calls = 0

        async def authenticate(self, token: str) -> Identity:
            self.calls += 1
            raise OSError("the API server is unreachable")

    inner = Unreachable()
    admission = Admission(inner)
    for _ in range(3):
        with pytest.raises(OSError):
            await admission.authenticate("good-a")
    assert inner.calls == 3
    assert admission.statistics().waiting == 0


async def test_reviews_go_round_robin_over_sources(
        autojump_clock: trio.testing.MockClock) -> None:
    """A source with many streams waiting delays another source's stream by
    one review per round, not by all of its own."""
    fake = FakeAuthenticator()
    admission = Admission(fake, concurrency=1)
    done: dict[str, float] = {}

    async def one(token: str, source: str) -> None:
        with pytest.raises(AuthenticationFailed):
            await admission.authenticate(token, source=source)
        done[token] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, f"junk-flood-{i}", "10.0.0.66")
        await trio.sleep(0.05)
        started = trio.current_time()
        nursery.start_soon(one, "junk-daemon", "10.0.0.7")
    # Within one round: after the flood's stream in review and its next one,
    # not after all 100 (0.1 s each).
    assert done["junk-daemon"] - started == pytest.approx(0.25)
    assert fake.reviews.index("junk-daemon") == 2
    assert admission.statistics().waiting == 0


async def test_a_full_queue_gives_a_fair_share_to_a_new_source(
        autojump_clock: trio.testing.MockClock) -> None:
    """One address flooding fills the queue only while nobody else needs it:
    a stream from another address takes the place of the flood's newest."""
    fake = FakeAuthenticator()
    fake.gate = trio.Event()
    admission = Admission(fake, queue_limit=8, concurrency=2)
    outcomes: dict[str, str] = {}

    async def one(token: str, source: str) -> None:
        try:
            identity = await admission.authenticate(token, source=source)
        except AdmissionRefused:
            outcomes[token] = "refused"
        except AuthenticationFailed:
            outcomes[token] = "reviewed"
        else:
            outcomes[token] = identity.node_name

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, f"junk-{i}", "10.0.0.66")
            await trio.sleep(0.001)
        # Full: the flooding address may not take a ninth place...
        with pytest.raises(AdmissionRefused):
            await admission.authenticate("junk-8", source="10.0.0.66")
        # ...but a daemon from another address takes the flood's newest one.
        for node in ("a", "b", "c", "d"):
            nursery.start_soon(one, f"good-{node}", f"10.0.1.{ord(node)}")
            await trio.sleep(0.001)
        stats = admission.statistics()
        assert stats.waiting == 8 and stats.displaced == 4 and stats.sources == 5
        fake.gate.set()
    assert [outcomes[f"good-{n}"] for n in "abcd"] == ["a", "b", "c", "d"]
    assert [outcomes[f"junk-{i}"] for i in range(8)] == ["reviewed"] * 4 + ["refused"] * 4
    assert admission.statistics().waiting == 0 and admission.statistics().sources == 0


async def test_a_stream_cancelled_while_queued_frees_its_place(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthenticator()
    fake.gate = trio.Event()
    admission = Admission(fake, queue_limit=2, concurrency=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(admission.authenticate, "good-a", source="x"))
        with trio.move_on_after(1):
            await admission.authenticate("good-b", source="x")
        assert admission.statistics().waiting == 1
        fake.gate.set()
    assert (await admission.authenticate("good-b", source="x")).node_name == "b"
    assert admission.statistics().waiting == 0


async def test_the_queue_holds_what_can_be_reviewed_in_time(
        autojump_clock: trio.testing.MockClock) -> None:
    """Reviews measured at 1 s with 2 at once: 8 s of waiting is 16 streams;
    the next is refused at once instead of waiting into the server's timeout."""

    class Slow(FakeAuthenticator):
        async def authenticate(self, token: str) -> Identity:
            await trio.sleep(0.9)
            return await super().authenticate(token)

    admission = Admission(Slow(), concurrency=2, max_wait=8.0)
    for i in range(30):  # measure: the average moves to ~1 s
        await admission.authenticate(f"good-warm{i}")
    assert admission.statistics().review_seconds == pytest.approx(1.0, abs=0.05)
    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(partial(admission.authenticate, f"good-{i}", source="x"))
        await trio.sleep(0.01)
        assert admission.statistics().waiting == 16
        with pytest.raises(AdmissionRefused):
            await admission.authenticate("good-late", source="x")
    assert admission.statistics().waiting == 0
