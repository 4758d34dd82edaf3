"""LeaseThreadActor against FakeKubeApi (on the Lease thread's own loop): a keeper
that dies while leading says so before it goes; a main loop wedged past the
watchdog loses the Lease, a busy one under it keeps it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.leader import LeaseSettings
from vpblu.actors.leasethread import LeaseThreadActor
from vpblu.kube import client as k
from vpblu.kube.client import ResourceKind
from vpblu.messages import LeaderObserved

SETTINGS = LeaseSettings(lease_duration=3.0, renew_deadline=2.0, retry_period=0.1)


class BreaksAfterLeading(FakeKubeApi):
    """A fake API whose Lease GET raises an error no LeaderActor expects once the
    Lease has been taken: the Lease thread's actor crashes while leading."""

    async def get(self, kind: ResourceKind, name: str, *,
                  namespace: str | None = None) -> k.RawObject:
        if any(verb in ("create", "replace") for verb, _ in self.calls):
            raise RuntimeError("fake: the client broke")
        return await super().get(kind, name, namespace=namespace)


@asynccontextmanager
async def fake_client() -> AsyncIterator[k.KubeApi]:
    yield BreaksAfterLeading()  # made on the Lease thread's loop, used only there


async def test_a_lease_keeper_that_dies_while_leading_says_it_no_longer_leads() -> None:
    send, receive = trio.open_memory_channel[LeaderObserved](16)
    actor = LeaseThreadActor(fake_client, "me", "me:7443", send, SETTINGS)
    seen: list[LeaderObserved] = []
    ended: list[BaseException] = []

    async def keeper() -> None:
        try:
            await actor.run()
        except BaseException as e:  # the crash is what is under test
            ended.append(e)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper)
            async for observed in receive:
                seen.append(observed)
    assert ended, "the keeper should have ended with its thread's crash"
    assert [o.is_me for o in seen] == [True, False], seen
    assert seen[-1] == LeaderObserved(False, None, None)


async def test_a_main_loop_wedged_past_the_watchdog_gives_up_the_lease() -> None:
    made: list[FakeKubeApi] = []

    @asynccontextmanager
    async def client() -> AsyncIterator[k.KubeApi]:
        made.append(FakeKubeApi())
        yield made[-1]

    send, receive = trio.open_memory_channel[LeaderObserved](16)
    actor = LeaseThreadActor(client, "me", "me:7443", send, SETTINGS, wedged_after=1.5)
    ended: list[BaseException] = []

    async def keeper() -> None:
        try:
            await actor.run()
        except BaseException as e:  # the thread's end is what is under test
            ended.append(e)

    def holder() -> object:
        return made[0]._objects["Lease"]["vpblu-controller"]["spec"].get("holderIdentity")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper)
            assert (await receive.receive()).is_me
            time.sleep(0.5)  # noqa: ASYNC251 (a busy stretch, well under the watchdog)
            await trio.sleep(1)
            assert holder() == "me" and not ended
            time.sleep(4)  # noqa: ASYNC251 (wedged: the main loop runs nothing)
            seen = [o.is_me async for o in receive]
    assert holder() is None, "the wedged replica should have released the Lease"
    assert seen == [False], seen
    assert ended and "the Lease thread ended" in repr(ended[0]), ended
