"""StateActor: recomputes paced by their own cost (issue 20).

While 1000 Nodes register, watch batches come faster than an O(N) recompute
takes; one recompute per batch held 86 % of the controller's loop. Here a
recompute's cost is faked on the mock clock (the fake cost clock jumps trio's
time by COST during each one), the pure core is the real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.actors.test_state import mesh, node, peers, vnode
from vpblu.actors.state import RECOMPUTE_SPACING, WATCHED_KINDS, StateActor
from vpblu.core.sources import Typed
from vpblu.messages import (
    KindChanged,
    KindListed,
    PushDelta,
    PushSync,
    SessionInbox,
    SessionOpened,
    StateInbox,
    StatusInbox,
)

COST = 0.1  # what each recompute takes, on the mock clock
JOINS = 200
BATCH_EVERY = 0.01  # a watch batch every 10 ms: ten per recompute


class FakeCost:
    """A cost clock whose every second reading (a recompute's end) moves
    trio's mock clock on by COST: the recompute took that long."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self._clock = clock
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        if self.readings % 2 == 0:
            self._clock.jump(COST)
        return self._clock.current_time()


class Harness:
    def __init__(self, clock: trio.testing.MockClock | None) -> None:
        self.send, receive = trio.open_memory_channel[StateInbox](10000)
        status_send, self.status = trio.open_memory_channel[StatusInbox](10000)
        kwargs = {} if clock is None else {"cost_clock": FakeCost(clock)}
        self.actor = StateActor(receive, status_send, term=1, **kwargs)  # type: ignore[arg-type]

    async def start(self, nodes: range) -> trio.MemoryReceiveChannel[SessionInbox]:
        objects: dict[str, tuple[Typed, ...]] = {
            "Node": tuple(node(i) for i in nodes),
            "VpbluNode": tuple(vnode(i) for i in nodes),
            "TunnelPolicy": (mesh(),),
        }
        for kind in WATCHED_KINDS:
            await self.send.send(KindListed(kind, objects.get(kind, ()), (), "1"))
        mailbox_send, mailbox = trio.open_memory_channel[SessionInbox](10000)
        await self.send.send(SessionOpened("n1", 1, mailbox_send))
        assert isinstance(await mailbox.receive(), PushSync)
        return mailbox

    async def join(self, i: int) -> None:
        await self.send.send(KindChanged("Node", (node(i),), (), (), str(i)))
        await self.send.send(KindChanged("VpbluNode", (vnode(i),), (), (), str(i)))


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def last_push_with(mailbox: trio.MemoryReceiveChannel[SessionInbox],
                         names: list[str]) -> PushSync | PushDelta:
    while True:
        push = await mailbox.receive()
        assert isinstance(push, PushSync | PushDelta)
        if peers(push.state) == names:
            return push


async def test_a_registration_storm_costs_at_most_half_the_loop_in_recomputes(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    h = Harness(autojump_clock)
    await nursery.start(h.actor.run)
    mailbox = await h.start(range(1, 3))
    before = h.actor.statistics().recomputes
    t0 = trio.current_time()
    for i in range(3, 3 + JOINS):
        await h.join(i)
        await trio.sleep(BATCH_EVERY)
    everyone = sorted(f"n{i}" for i in range(2, 3 + JOINS))
    with trio.fail_after(10 * COST):  # the last batches go out within about one pacing wait
        await last_push_with(mailbox, everyone)
    elapsed = trio.current_time() - t0
    recomputes = h.actor.statistics().recomputes - before
    # One recompute per batch would be 2 * JOINS of COST each: 40 s for 2 s of
    # batches. Paced, the recomputes take at most their share of the time,
    # and the batches (sent between them) are slowed down by no more than it.
    share = recomputes * COST / elapsed
    assert share <= 1 / (1 + RECOMPUTE_SPACING) + 0.05, (recomputes, elapsed)
    assert elapsed < (1 + RECOMPUTE_SPACING) * JOINS * BATCH_EVERY + 5 * COST, elapsed
    assert h.actor.statistics().last_recompute_seconds == pytest.approx(COST)


async def test_every_change_of_a_quiet_small_cluster_goes_out_at_once(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    """Real recompute costs (about a millisecond for 3 nodes): the pacing
    wait is that long, so a change right after another is not held back."""
    h = Harness(None)
    await nursery.start(h.actor.run)
    mailbox = await h.start(range(1, 4))
    for i in (4, 5, 6):
        t0 = trio.current_time()
        await h.join(i)
        with trio.fail_after(0.05):
            await last_push_with(mailbox, sorted(f"n{j}" for j in range(2, i + 1)))
        assert trio.current_time() - t0 <= 0.05
    assert h.actor.statistics().last_recompute_seconds < 0.05
