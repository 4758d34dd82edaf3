"""StateActor (issue 19): a connected node's peers hold the key its daemon said
in its Hello; a VpbluNode status patched by someone else changes no push.
Fakes: the watchers and sessions are channels the test drives."""

from __future__ import annotations

import trio
import trio.testing

from tests.actors.test_state import Harness, key, meta, node, vnode
from vpblu.core.sources import VpbluNodeSource
from vpblu.messages import (
    KindChanged,
    PushDelta,
    PushSync,
    SessionClosed,
    SessionInbox,
    SessionOpened,
)

SWAPPED = key(99)


async def connect_with_hello(h: Harness, i: int) -> trio.MemoryReceiveChannel[SessionInbox]:
    h.sid += 1
    mailbox_send, mailbox = trio.open_memory_channel[SessionInbox](16)
    await h.send.send(SessionOpened(f"n{i}", h.sid, mailbox_send, key(i)))
    return mailbox


def key_of(push: object, peer: str) -> str:
    assert isinstance(push, PushSync | PushDelta), push
    return next(p.public_key for p in push.state.peers if p.name == peer)


async def test_a_patched_status_key_is_not_pushed_while_the_daemon_is_connected(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_all(range(1, 4))
        boxes = {i: await connect_with_hello(h, i) for i in (1, 2, 3)}
        for box in boxes.values():
            assert isinstance(await box.receive(), PushSync)
        swapped = VpbluNodeSource(meta("n1"), None, SWAPPED)
        await h.send.send(KindChanged("VpbluNode", (swapped,), (), (), "5"))
        with trio.move_on_after(30):
            push = await boxes[2].receive()
            raise AssertionError(f"a status patch was pushed to n2: {push}")
        # A change that does reach n2 still carries n1's Hello key.
        await h.send.send(KindChanged("Node", (node(4),), (), (), "6"))
        await h.send.send(KindChanged("VpbluNode", (vnode(4),), (), (), "7"))
        push = await boxes[2].receive()
        assert isinstance(push, PushDelta | PushSync)
        assert key_of(push, "n1") == key(1)
        # Once n1's daemon is gone, the status (as the controller restores it) counts.
        await h.send.send(SessionClosed("n1", 1))
        await h.send.send(KindChanged("VpbluNode", (vnode(1),), (), (), "8"))
        with trio.move_on_after(30):
            push = await boxes[2].receive()
            raise AssertionError(f"no change for n2, yet pushed {push}")
        nursery.cancel_scope.cancel()


async def test_a_daemon_with_a_new_key_is_published_from_its_hello(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_all(range(1, 3))
        peer = await connect_with_hello(h, 2)
        assert key_of(await peer.receive(), "n1") == key(1)
        # n1 reinstalled: its Hello says a new key before any status shows it.
        h.sid += 1
        mailbox_send, _mailbox = trio.open_memory_channel[SessionInbox](16)
        await h.send.send(SessionOpened("n1", h.sid, mailbox_send, key(41)))
        push = await peer.receive()
        assert key_of(push, "n1") == key(41)
        nursery.cancel_scope.cancel()
