"""NodeSessionActor fault injection: drops, missing acks, overflow, resync.

The daemon is a FakeNodeStream; the StateActor and StatusActor are plain
channels the test reads. Virtual time throughout.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.fakes.streams import FakeNodeStream, FakeOutbox, public_key
from vpblu.actors.session import PENDING_REPORT_DELAY, NodeSessionActor, SessionSettings
from vpblu.core import wire
from vpblu.core.model import NodeDesiredState, Peer, PeerAdded
from vpblu.messages import (
    HealthInbox,
    NodeAcked,
    PublicKeyReported,
    PushDelta,
    PushSync,
    SessionClosed,
    SessionOpened,
    StateInbox,
    StatusInbox,
)

SETTINGS = SessionSettings(resync_period=300, ack_timeout=15, mailbox_size=4)


def peer(i: int) -> Peer:
    return Peer(f"n{i}", public_key(i), None, (f"10.244.{i}.0/24",), 25)


def state(*peers: int) -> NodeDesiredState:
    return NodeDesiredState("n0", 51820, tuple(peer(i) for i in peers))


class Harness:
    def __init__(self, stream: FakeNodeStream) -> None:
        self.stream = stream
        self.state_send, self.state = trio.open_memory_channel[StateInbox](100)
        self.status_send, self.status = trio.open_memory_channel[StatusInbox](100)
        self.actor = NodeSessionActor(stream, 7, self.state_send, self.status_send, SETTINGS)
        self.done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.actor.run(task_status=task_status)
        finally:
            self.done.set()

    async def opened(self) -> SessionOpened:
        msg = await self.state.receive()
        assert isinstance(msg, SessionOpened)
        return msg


async def test_pushes_reach_the_daemon_and_acks_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness(FakeNodeStream("n0", key=9))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        assert await h.status.receive() == PublicKeyReported("n0", public_key(9))
        opened = await h.opened()
        assert (opened.node, opened.session_id) == ("n0", 7)
        await opened.mailbox.send(PushSync(10, state(1)))
        await opened.mailbox.send(PushDelta(11, 10, (PeerAdded(peer(2)),), state(1, 2)))
        await h.stream.wait_sent(2)
        assert h.stream.sent == [wire.SyncState(10, state(1)),
                                 wire.Delta(11, 10, (PeerAdded(peer(2)),))]
        await h.stream.deliver(wire.Ack(10))
        assert await h.state.receive() == NodeAcked("n0", 7, 10)
        await h.stream.deliver(wire.Ack(11), wire.Ack(10))  # cumulative; an old ack is moot
        assert await h.state.receive() == NodeAcked("n0", 7, 11)
        await h.stream.deliver(wire.Ack(11, "netlink said no"))
        assert await h.state.receive() == NodeAcked("n0", 7, 11, "netlink said no")
        nursery.cancel_scope.cancel()


async def test_stream_dropped_mid_delta_ends_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        h.stream.write_gate = trio.Event()
        await opened.mailbox.send(PushSync(10, state(1)))
        await trio.sleep(1)  # the write is in flight...
        h.stream.drop()  # ...when the daemon's side dies
        h.stream.write_gate.set()
        await h.done.wait()
        assert await h.state.receive() == SessionClosed("n0", 7)
        assert h.stream.closed_reason is not None
        assert h.stream.sent == []


async def test_missing_ack_resends_the_whole_state_then_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        await opened.mailbox.send(PushSync(10, state(1)))
        await opened.mailbox.send(PushDelta(11, 10, (PeerAdded(peer(2)),), state(1, 2)))
        await h.stream.wait_sent(2)
        t0 = trio.current_time()
        await h.stream.wait_sent(3)
        assert trio.current_time() - t0 == SETTINGS.ack_timeout
        assert h.stream.sent[2] == wire.SyncState(11, state(1, 2))
        await h.done.wait()
        assert trio.current_time() - t0 == 2 * SETTINGS.ack_timeout
        assert h.stream.closed_reason is not None
        assert "not acknowledged" in h.stream.closed_reason
        assert await h.state.receive() == SessionClosed("n0", 7)


async def test_an_error_ack_is_an_answer_the_state_actor_acts_on_not_a_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The daemon refuses what it was sent: the StateActor hears it and resyncs
    # with a backoff; the session must not resend on its own after
    # ack_timeout, nor close a stream whose daemon answers.
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        await opened.mailbox.send(PushSync(10, state(1)))
        await h.stream.wait_sent(1)
        await h.stream.deliver(wire.Ack(10, "netlink: File exists"))
        assert await h.state.receive() == NodeAcked("n0", 7, 10, "netlink: File exists")
        await trio.sleep(4 * SETTINGS.ack_timeout)
        assert h.stream.sent == [wire.SyncState(10, state(1))]
        assert h.stream.closed_reason is None
        nursery.cancel_scope.cancel()


async def test_acked_session_only_resyncs_periodically(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        await opened.mailbox.send(PushSync(10, state(1)))
        await h.stream.wait_sent(1)
        await h.stream.ack_latest()
        t0 = trio.current_time()
        await h.stream.wait_sent(2)
        assert trio.current_time() - t0 == SETTINGS.resync_period
        assert h.stream.sent[1] == wire.SyncState(10, state(1))
        assert h.stream.closed_reason is None
        nursery.cancel_scope.cancel()


async def test_a_sync_supersedes_queued_deltas(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        h.stream.write_gate = trio.Event()
        await opened.mailbox.send(PushSync(10, state(1)))
        await trio.sleep(1)  # the session is stuck writing generation 10
        for gen in (11, 12, 13):
            opened.mailbox.send_nowait(
                PushDelta(gen, gen - 1, (PeerAdded(peer(gen)),), state(1)))
        opened.mailbox.send_nowait(PushSync(14, state(1, 2, 3)))
        h.stream.write_gate.set()
        await h.stream.wait_sent(2)
        await trio.sleep(1)
        assert h.stream.sent == [wire.SyncState(10, state(1)), wire.SyncState(14, state(1, 2, 3))]
        nursery.cancel_scope.cancel()


async def test_second_hello_is_a_protocol_violation(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(FakeNodeStream("n0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        await h.opened()
        await h.stream.deliver(wire.Hello("n0", public_key(1)))
        await h.done.wait()
        assert h.stream.closed_reason == "a second Hello on one stream"


async def test_a_push_is_reported_pending_only_when_its_ack_is_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One report per push acked in time (the ack's, carrying both generations);
    a push unacknowledged after PENDING_REPORT_DELAY is reported on its own."""
    stream = FakeNodeStream("n0", key=9)
    state_send, state_recv = trio.open_memory_channel[StateInbox](100)
    status_send, _status = trio.open_memory_channel[StatusInbox](100)
    health_send, health = trio.open_memory_channel[HealthInbox](100)
    actor = NodeSessionActor(stream, 7, state_send, status_send, SETTINGS, health_send)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        opened = await state_recv.receive()
        assert isinstance(opened, SessionOpened)
        assert (await health.receive()).sent_generation == 0
        await opened.mailbox.send(PushSync(10, state(1)))
        await stream.wait_sent(1)
        await stream.deliver(wire.Ack(10))
        report = await health.receive()
        assert (report.sent_generation, report.acked_generation) == (10, 10)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            health.receive_nowait()  # nothing owed: the send was not reported apart
        sent_at = trio.current_time()
        await opened.mailbox.send(PushDelta(11, 10, (PeerAdded(peer(2)),), state(1, 2)))
        report = await health.receive()
        assert (report.sent_generation, report.acked_generation) == (11, 10)
        assert trio.current_time() - sent_at == pytest.approx(PENDING_REPORT_DELAY)
        nursery.cancel_scope.cancel()


# --- a backlogged controller: the ack clock is the daemon's, not the leader's queue -----

BACKLOG_TEST_BOUND = 1000.0  # virtual seconds


async def test_a_push_still_queued_here_is_not_the_daemons_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The push waits 40 s in the controller's outbox (a leader behind on its
    writes), the daemon acks 2 s after it got it: no resend, no close."""
    outbox = FakeOutbox(per_message=40)
    h = Harness(FakeNodeStream("n0", outbox=outbox))
    with trio.fail_after(BACKLOG_TEST_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            await nursery.start(h.run)
            opened = await h.opened()
            t0 = trio.current_time()
            await opened.mailbox.send(PushSync(10, state(1)))
            await h.stream.wait_sent(1)
            assert trio.current_time() - t0 == 40
            await trio.sleep(2)
            await h.stream.ack_latest()
            assert await h.state.receive() == NodeAcked("n0", 7, 10)
            await trio.sleep(4 * SETTINGS.ack_timeout)
            assert h.stream.sent == [wire.SyncState(10, state(1))]
            assert h.stream.closed_reason is None
            nursery.cancel_scope.cancel()


async def test_an_unacknowledged_push_is_resent_and_closed_counting_from_its_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Silence after the write is still the daemon's: resent ack_timeout after the
    push was written (20 s after it was queued), closed ack_timeout after the
    resend was written (20 s after it was queued)."""
    outbox = FakeOutbox(per_message=20)
    h = Harness(FakeNodeStream("n0", outbox=outbox))
    with trio.fail_after(BACKLOG_TEST_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            await nursery.start(h.run)
            opened = await h.opened()
            t0 = trio.current_time()
            await opened.mailbox.send(PushSync(10, state(1)))
            await h.stream.wait_sent(2)
            resent_written = trio.current_time() - t0
            assert resent_written == 20 + SETTINGS.ack_timeout + 20
            assert h.stream.sent == [wire.SyncState(10, state(1))] * 2
            await h.done.wait()
            assert trio.current_time() - t0 == resent_written + SETTINGS.ack_timeout
            assert h.stream.closed_reason is not None
            assert "not acknowledged" in h.stream.closed_reason
            nursery.cancel_scope.cancel()


async def test_an_ack_waiting_unread_here_is_not_a_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The daemon acked at once, but the leader has not read it for 40 s."""
    h = Harness(FakeNodeStream("n0"))
    h.stream.read_gate = trio.Event()
    with trio.fail_after(BACKLOG_TEST_BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            opened = await h.opened()
            await opened.mailbox.send(PushSync(10, state(1)))
            await h.stream.wait_sent(1)
            await h.stream.ack_latest()
            await trio.sleep(40)
            assert h.stream.unread == 1
            h.stream.read_gate.set()
            assert await h.state.receive() == NodeAcked("n0", 7, 10)
            await trio.sleep(4 * SETTINGS.ack_timeout)
            assert h.stream.sent == [wire.SyncState(10, state(1))]
            assert h.stream.closed_reason is None
            nursery.cancel_scope.cancel()


async def test_a_leader_behind_on_every_stream_closes_none_of_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every session pushes at once (a key every node must learn) through one
    writer that takes 0.2 s a message, 40 s for all 200; each daemon acks 1 s after
    its push reached it. Timed from the queue, the sessions whose push was written
    after ack_timeout resent their whole state (behind everyone else's) and those
    after twice that closed their streams together (the N=1000 rotation: 1000
    streams in 0.1 s). Timed from the write: every push acked, nothing resent,
    nothing closed."""
    nodes = 200
    outbox = FakeOutbox(per_message=0.2)
    state_send, state_recv = trio.open_memory_channel[StateInbox](10 * nodes)
    status_send, _status = trio.open_memory_channel[StatusInbox](10 * nodes)
    streams = [FakeNodeStream(f"n{i}", outbox=outbox) for i in range(nodes)]
    acked: set[str] = set()

    async def daemon(stream: FakeNodeStream) -> None:
        await stream.wait_sent(1)
        await trio.sleep(1)
        await stream.ack_latest()

    with trio.fail_after(BACKLOG_TEST_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            for i, stream in enumerate(streams):
                actor = NodeSessionActor(stream, i, state_send.clone(), status_send.clone(),
                                         SETTINGS)
                await nursery.start(actor.run)
                nursery.start_soon(daemon, stream)
            mailboxes = []
            while len(mailboxes) < nodes:
                message = await state_recv.receive()
                if isinstance(message, SessionOpened):
                    mailboxes.append(message.mailbox)
            t0 = trio.current_time()
            for mailbox in mailboxes:
                mailbox.send_nowait(PushSync(10, state(1)))
            with trio.move_on_after(nodes * 0.2 + 10 * SETTINGS.ack_timeout):
                while len(acked) < nodes:
                    match await state_recv.receive():
                        case NodeAcked(node=node, generation=10, error=None):
                            acked.add(node)
            took = trio.current_time() - t0
            await trio.sleep(4 * SETTINGS.ack_timeout)
            closed = [s.node_name for s in streams if s.closed_reason is not None]
            resent = [s.node_name for s in streams if len(s.sent) > 1]
            assert (len(acked), closed, resent) == (nodes, [], [])
            assert took == pytest.approx(nodes * 0.2 + 1)
            nursery.cancel_scope.cancel()


async def test_answers_to_rotation_steps_read_together_go_on_as_one_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from vpblu.messages import PushRotationSteps, RotationResultsReceived

    h = Harness(FakeNodeStream("n0", key=9))
    steps = tuple(wire.RotationStep(f"r{i}", wire.RotationStepKind.SWITCH_PEER, f"n{i}",
                                    public_key(i), public_key(10 + i), stamp=i, slot=i)
                  for i in (1, 2, 3))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        opened = await h.opened()
        await opened.mailbox.send(PushRotationSteps(steps))
        await h.stream.wait_sent(3)
        assert h.stream.sent == list(steps)
        answers = [wire.RotationResult(s.rotation_id, s.step, s.rotating_node, s.stamp)
                   for s in steps]
        h.stream.deliver_at_once(*answers)
        assert await h.state.receive() == RotationResultsReceived("n0", tuple(answers))
        nursery.cancel_scope.cancel()
