"""LeaderActor against FakeKubeApi on virtual time: election, expiry, release, step-down."""

from __future__ import annotations

import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi, SeverableClient
from vpblu.actors.leader import LeaderActor, LeaseSettings
from vpblu.kube.client import LEASES
from vpblu.messages import LeaderObserved

SETTINGS = LeaseSettings(lease_duration=6, renew_deadline=4, retry_period=1)


class Replica:
    def __init__(self, kube: FakeKubeApi, name: str) -> None:
        self.name = name
        self.seen: list[LeaderObserved] = []
        self._send, self._receive = trio.open_memory_channel[LeaderObserved](100)
        self.client = SeverableClient(kube)
        self.actor = LeaderActor(self.client, name, f"{name}:7443", self._send, SETTINGS)
        self.scope = trio.CancelScope()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.actor.run)
                task_status.started()
                async for msg in self._receive:
                    self.seen.append(msg)
                    self._changed.set()
                    self._changed = trio.Event()

    async def wait_leading(self, want: bool = True) -> None:
        while self.leading != want:
            await self._changed.wait()

    @property
    def leading(self) -> bool:
        return bool(self.seen) and self.seen[-1].is_me


async def test_one_of_two_leads(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    a, b = Replica(kube, "a"), Replica(kube, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await trio.sleep(20)
        assert [a.leading, b.leading].count(True) == 1
        leader, follower = (a, b) if a.leading else (b, a)
        assert follower.seen[-1] == LeaderObserved(False, leader.name, f"{leader.name}:7443")
        nursery.cancel_scope.cancel()


async def test_graceful_release_hands_over_within_a_retry_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    a, b = Replica(kube, "a"), Replica(kube, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(2)
        await nursery.start(b.run)
        await trio.sleep(5)
        assert a.leading and not b.leading
        a.scope.cancel()
        t0 = trio.current_time()
        await b.wait_leading()
        assert trio.current_time() - t0 <= SETTINGS.retry_period * 2 + 0.5
        lease = await kube.get(LEASES, "vpblu-controller", namespace="vpblu-system")
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
        assert b.seen[-1].term == 1
        nursery.cancel_scope.cancel()


async def test_crashed_leader_is_replaced_after_the_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    a, b = Replica(kube, "a"), Replica(kube, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(2)
        await nursery.start(b.run)
        await trio.sleep(3)
        # "Crash": a stops renewing without releasing (its API calls all fail).
        a_calls = kube.calls.count(("replace", "Lease"))
        a.client.severed = True
        t0 = trio.current_time()
        await b.wait_leading()
        waited = trio.current_time() - t0
        # Not before the lease expired on b's clock, and not much after.
        assert SETTINGS.lease_duration - 1 <= waited <= SETTINGS.lease_duration + 3
        # And a, unable to renew, stepped down by itself before b took over.
        assert not a.leading
        assert a_calls > 0
        nursery.cancel_scope.cancel()


async def test_leader_steps_down_when_it_cannot_renew(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    a = Replica(kube, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(2)
        assert a.leading
        await kube.go_down()
        t0 = trio.current_time()
        await a.wait_leading(False)
        assert trio.current_time() - t0 <= SETTINGS.renew_deadline + SETTINGS.retry_period + 0.5
        kube.come_back()
        await a.wait_leading()
        # Leading again is a new term, though the Lease was still ours.
        terms = [seen.term for seen in a.seen if seen.is_me]
        assert terms[-1] > terms[0]
        nursery.cancel_scope.cancel()


async def test_a_slow_renewal_within_the_deadline_keeps_the_lead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    a = Replica(kube, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.wait_leading()
        # A renewal (two calls) now takes longer than a retry period, but less than
        # the renew deadline: a busy leader, not a dead one.
        a.client.delay = SETTINGS.retry_period * 0.75  # get + replace: 1.5 periods
        await trio.sleep(30)
        assert a.leading
        assert [m.is_me for m in a.seen] == [True]
        nursery.cancel_scope.cancel()
