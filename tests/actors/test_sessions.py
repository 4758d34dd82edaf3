"""SessionsActor: a daemon that reconnects twice at once ends up with exactly
one session, its newest (FakeNodeStreams, virtual time)."""

from __future__ import annotations

from typing import cast

import trio
import trio.testing

from tests.fakes.streams import FakeNodeStream
from vpblu.actors.session import SessionSettings
from vpblu.actors.sessions import SessionsActor
from vpblu.messages import SessionClosed, SessionOpened, StateInbox, StatusInbox
from vpblu.stream.transport import NodeStream


async def test_reconnecting_twice_at_once_leaves_only_the_newest_session(
        autojump_clock: trio.testing.MockClock) -> None:
    streams_send, streams = trio.open_memory_channel[NodeStream](4)
    state_send, state = trio.open_memory_channel[StateInbox](100)
    status_send, _status = trio.open_memory_channel[StatusInbox](100)
    actor = SessionsActor(streams, state_send, status_send, SessionSettings())
    first, second = FakeNodeStream("n0"), FakeNodeStream("n0")
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        # Both streams arrive before either session has done anything.
        await streams_send.send(cast(NodeStream, first))
        await streams_send.send(cast(NodeStream, second))
        await trio.sleep(1)
        seen = []
        while True:
            try:
                seen.append(state.receive_nowait())
            except trio.WouldBlock:
                break
        opened = [m for m in seen if isinstance(m, SessionOpened)]
        closed = [m for m in seen if isinstance(m, SessionClosed)]
        assert [m.session_id for m in opened] == [1, 2]
        assert [m.session_id for m in closed] == [1]
        assert first.closed_reason is not None
        assert second.closed_reason is None
        nursery.cancel_scope.cancel()


async def test_a_session_that_ends_leaves_no_entry_behind(
        autojump_clock: trio.testing.MockClock) -> None:
    """Daemons that come and go (and reconnect) leave the node -> session table
    empty once their streams are gone."""
    streams_send, streams = trio.open_memory_channel[NodeStream](4)
    state_send, _state = trio.open_memory_channel[StateInbox](10_000)
    status_send, _status = trio.open_memory_channel[StatusInbox](10_000)
    actor = SessionsActor(streams, state_send, status_send, SessionSettings())
    fakes = [FakeNodeStream(f"n{i % 50}") for i in range(200)]
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for fake in fakes:
            await streams_send.send(cast(NodeStream, fake))
        await trio.sleep(1)
        assert actor.statistics().current == 50
        for fake in fakes:
            fake.drop()
        with trio.fail_after(60):
            while actor.statistics().current:  # noqa: ASYNC110 (virtual time)
                await trio.sleep(0.1)
        assert actor.statistics().started == 200
        nursery.cancel_scope.cancel()
