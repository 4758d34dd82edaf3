"""NodeSessionActor: one connected daemon's warm stream, on the leader.

Owns one daemon's stream for as long as it lasts: it forwards the pushes the
StateActor gives it (PushSync / PushDelta) to the daemon as SyncState /
Delta, reports the daemon's acknowledgements back, keeps the daemon in step
with a full SyncState every `resync_period`, and watches for acknowledgements
that never come. It tells the HealthActor (`SessionReport`) what it knows of
its daemon: open or closed, generations sent and acknowledged, the last apply
error, the latest telemetry. It never computes desired state and never touches the API
server; its only kernel of truth is "what did I last send, and what did the
daemon say it applied".

Batching: everything already in the mailbox goes out as one batch (one
crossing into asyncio, one write burst). A PushSync in a batch makes every
push queued before it moot, so those are dropped; this is how a slow daemon
whose mailbox overflowed catches up with one message instead of a backlog.

Acknowledgements: if the daemon has not acknowledged what was sent within
`ack_timeout`, the whole state is sent once more as a SyncState (a lost or
refused delta is the likely cause); if that is not acknowledged either, the
stream is closed, and the daemon's reconnect starts afresh. The daemon keeps
its mesh in the meantime: closing a stream never changes a node's kernel.
The clock counts from when the push was written out to the stream, not from
when it was queued, and does not run out while the daemon's answers wait
unread here: a leader that is behind (a whole-cluster rotation at N=1000 had
every session push at once, and the writes took longer than the timeout) is
slow on its own, and once timed from the queue every session resent its whole
state and then closed its stream in the same tenth of a second, which only
added to the backlog (tests/actors/test_session.py, the backlogged tests).
A daemon that stops reading is still caught: the stream's write times out
(vpblu/stream/transport.py WRITE_TIMEOUT) and the stream ends.
An error Ack is an answer too (the daemon is there, and said why it could not
apply): it goes to the StateActor, which resyncs the node with a backoff, and
the session neither resends nor closes the stream for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from vpblu.core import wire
from vpblu.core.model import NodeDesiredState
from vpblu.messages import (
    HealthInbox,
    NodeAcked,
    PublicKeyReported,
    PushDelta,
    PushRotationSteps,
    PushSync,
    RotationResultsReceived,
    SessionClosed,
    SessionInbox,
    SessionOpened,
    SessionReport,
    StateInbox,
    StatusInbox,
)
from vpblu.stream.transport import StreamClosed

log = logging.getLogger(__name__)

MAILBOX_SIZE = 64
RESYNC_PERIOD = 300.0
ACK_TIMEOUT = 15.0
# A push is reported to the HealthActor as sent-but-not-acknowledged only when
# its ack has not come within this: the ack (a few ms later, as a rule) reports
# both. Reporting every send at once cost each node two evaluations per event
# and flipped its Applied condition to Pending and back, a status write each.
PENDING_REPORT_DELAY = 1.0


class SessionStream(Protocol):
    """What a session needs of a stream (vpblu.stream.transport.NodeStream is one)."""

    @property
    def node_name(self) -> str: ...

    @property
    def hello(self) -> wire.Hello: ...

    async def receive_batch(self) -> list[wire.NodeMessage]: ...

    async def send_batch(self, messages: Sequence[wire.ControllerMessage], *,
                         timed: bool = False) -> None: ...

    def written_at(self) -> float | None:
        """When the last batch sent `timed` was written out (None: still queued)."""
        ...

    @property
    def unread(self) -> int:
        """Messages from the daemon that arrived and wait for `receive_batch`."""
        ...

    def close(self, reason: str) -> None: ...


@attrs.frozen(slots=True)
class SessionSettings:
    resync_period: float = RESYNC_PERIOD
    ack_timeout: float = ACK_TIMEOUT
    mailbox_size: int = MAILBOX_SIZE


StatePush = PushSync | PushDelta


def coalesce(batch: Sequence[StatePush]) -> list[StatePush]:
    """Drop every push queued before the last PushSync: the sync supersedes them."""
    for i in range(len(batch) - 1, -1, -1):
        if isinstance(batch[i], PushSync):
            return list(batch[i:])
    return list(batch)


def to_wire(push: StatePush) -> wire.SyncState | wire.Delta:
    match push:
        case PushSync(generation=gen, state=state):
            return wire.SyncState(gen, state)
        case PushDelta(generation=gen, base_generation=base, changes=changes):
            return wire.Delta(gen, base, changes)


class NodeSessionActor:
    def __init__(
        self,
        stream: SessionStream,
        session_id: int,
        state: trio.MemorySendChannel[StateInbox],
        status: trio.MemorySendChannel[StatusInbox],
        settings: SessionSettings = SessionSettings(),
        health: trio.MemorySendChannel[HealthInbox] | None = None,
    ) -> None:
        self._stream = stream
        self._health = health
        self._telemetry: wire.Telemetry | None = None
        self._telemetry_at = 0.0
        self._apply_error: str | None = None
        self._node = stream.node_name
        self._sid = session_id
        self._state = state
        self._status = status
        self._settings = settings
        self._mailbox_send, self._mailbox = trio.open_memory_channel[SessionInbox](
            settings.mailbox_size)
        self._latest: tuple[int, NodeDesiredState] | None = None
        self._sent_generation = 0
        self._sent_at = 0.0
        # While the latest push waits in the stream's outbox, when to look again.
        self._ack_check_at = math.inf
        self._acked_generation = 0
        self._answered_generation = 0  # acknowledged, with an error or without
        self._resent_for_ack = False
        # When a push not yet acknowledged is reported (math.inf: none owed).
        self._report_due = math.inf
        self.messages_sent = 0
        self._end_reason = "session ended"
        self._done = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._state, self._status, self._mailbox:
            try:
                hello = self._stream.hello
                await self._status.send(PublicKeyReported(self._node, hello.public_key))
                await self._state.send(SessionOpened(self._node, self._sid, self._mailbox_send,
                                                     hello.public_key))
                task_status.started()
                await self._report()
                async with trio.open_nursery() as nursery:
                    self._done = nursery.cancel_scope
                    nursery.start_soon(self._read)
                    nursery.start_soon(self._write)
            finally:
                self._stream.close(self._end_reason)
                with trio.CancelScope(shield=True):
                    await self._state.send(SessionClosed(self._node, self._sid))
                    if self._health is not None:
                        async with self._health:
                            await self._report(connected=False)

    async def _report(self, *, connected: bool = True) -> None:
        """Tell the HealthActor what this session knows now (level-triggered)."""
        self._report_due = math.inf  # whatever was owed goes in this report
        if self._health is None:
            return
        await self._health.send(SessionReport(
            self._node, self._sid, connected, self._sent_generation, self._acked_generation,
            self._apply_error, self._stream.hello.public_key, self._telemetry,
            self._telemetry_at))

    def _end(self, reason: str, *, problem: bool = True) -> None:
        """Stop the session (both tasks) and close the stream with `reason`."""
        if problem:
            log.warning("node %s: %s; closing its stream", self._node, reason)
        else:
            log.info("node %s: %s", self._node, reason)
        self._end_reason = reason
        self._done.cancel()

    async def _read(self) -> None:
        try:
            while True:
                batch = await self._stream.receive_batch()
                best: wire.Ack | None = None
                results: list[wire.RotationResult] = []
                for message in batch:
                    match message:
                        case wire.Ack(error=None):
                            if best is None or message.generation > best.generation:
                                best = message
                        case wire.Ack(generation=gen, error=error):
                            self._apply_error = error
                            self._answered_generation = max(self._answered_generation, gen)
                            await self._state.send(NodeAcked(self._node, self._sid, gen, error))
                        case wire.Heartbeat():
                            pass
                        case wire.Telemetry():
                            # A partial sample updates the stream's last whole
                            # one: the latest per node stays whole in memory.
                            if message.partial and self._telemetry is None:
                                self._end("peer updates before any whole telemetry sample")
                                return
                            try:
                                whole = message.merged_onto(self._telemetry) \
                                    if self._telemetry is not None else message
                            except ValueError as exc:
                                self._end(f"telemetry: {exc}")
                                return
                            self._telemetry, self._telemetry_at = whole, trio.current_time()
                        case wire.RotationResult():
                            results.append(message)
                        case wire.Hello():
                            self._end("a second Hello on one stream")
                            return
                if results:
                    await self._state.send(RotationResultsReceived(self._node, tuple(results)))
                if best is not None and best.generation > self._acked_generation:
                    self._acked_generation = best.generation
                    self._answered_generation = max(self._answered_generation, best.generation)
                    self._apply_error = None
                    await self._state.send(NodeAcked(self._node, self._sid, best.generation))
                await self._report()
        except StreamClosed as exc:
            self._end(f"stream closed: {exc}", problem=False)

    def _next_wakeup(self) -> float:
        deadline = math.inf
        if self._latest is not None:
            deadline = self._sent_at + self._settings.resync_period
        if self._sent_generation > self._answered_generation:
            deadline = min(deadline, self._ack_due())
        return min(deadline, self._report_due)

    def _ack_due(self) -> float:
        """When the push not yet answered is overdue: `ack_timeout` after it was
        written out; while it is still queued the clock has not started."""
        written = self._stream.written_at()
        if written is None:
            return self._ack_check_at
        return max(written + self._settings.ack_timeout, self._ack_check_at)

    def _behind_here(self) -> bool:
        """The wait is this controller's own: the push is still queued for the
        stream, or what the daemon said waits unread."""
        return self._stream.written_at() is None or self._stream.unread > 0

    async def _write(self) -> None:
        while True:
            batch: list[SessionInbox] = []
            with trio.move_on_at(self._next_wakeup()):
                batch.append(await self._mailbox.receive())
            while True:
                try:
                    batch.append(self._mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            if batch:
                # Rotation steps are not state: never coalesced away, sent as they are.
                steps = [s for p in batch if isinstance(p, PushRotationSteps) for s in p.steps]
                pushes = coalesce([p for p in batch if not isinstance(p, PushRotationSteps)])
                try:
                    if pushes:
                        self._latest = (pushes[-1].generation, pushes[-1].state)
                        await self._send([to_wire(p) for p in pushes])
                        self._resent_for_ack = False
                    if steps:
                        await self._stream.send_batch(steps)
                        self.messages_sent += len(steps)
                except StreamClosed as exc:
                    self._end(f"stream closed: {exc}", problem=False)
                    return
                continue
            # Woken by a deadline, not a push.
            now = trio.current_time()
            if now >= self._report_due:
                await self._report()  # a push still unacknowledged: Pending
                continue
            unacked = self._sent_generation > self._answered_generation
            if unacked and now >= self._ack_due():
                if self._behind_here():
                    self._ack_check_at = now + self._settings.ack_timeout
                    await trio.lowlevel.checkpoint()  # the reader takes what waits
                    continue
                if self._resent_for_ack:
                    self._end(f"generation {self._sent_generation} not acknowledged within "
                              f"{2 * self._settings.ack_timeout:.0f}s")
                    return
                self._resent_for_ack = True
                log.info("node %s: no ack for generation %d; sending the whole state again",
                         self._node, self._sent_generation)
            elif now < self._sent_at + self._settings.resync_period:
                continue  # the deadline moved (an ack came): nothing is due
            assert self._latest is not None
            generation, state = self._latest
            try:
                await self._send([wire.SyncState(generation, state)])
            except StreamClosed as exc:
                self._end(f"stream closed: {exc}", problem=False)
                return

    async def _send(self, messages: list[wire.SyncState | wire.Delta]) -> None:
        await self._stream.send_batch(messages, timed=True)
        self.messages_sent += len(messages)
        sent_before = self._sent_generation
        self._sent_generation = max(self._sent_generation, messages[-1].generation)
        self._sent_at = trio.current_time()
        self._ack_check_at = self._sent_at + self._settings.ack_timeout
        if self._sent_generation != sent_before:
            self._report_due = min(self._report_due, self._sent_at + PENDING_REPORT_DELAY)
