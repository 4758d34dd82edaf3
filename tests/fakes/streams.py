"""FakeNodeStream: a daemon's stream as a NodeSessionActor sees it, in memory.

A fake, named as one. The test plays the daemon: it reads what the session
sent (`sent`), feeds acks (`deliver`), slows writes (`write_gate`) and breaks
the stream from either end (`drop`). It also plays a backlogged controller:
with an `outbox` (a `FakeOutbox`, shared by several streams if need be)
`send_batch` only queues, like the real stream, and what is queued reaches
`sent` when the outbox writes it; with `read_gate` set, what the daemon said
waits unread. The real stream is tested over real gRPC in tests/integration.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import trio

from vpblu.core import wire
from vpblu.stream.transport import StreamClosed


def public_key(n: int) -> str:
    return base64.b64encode(bytes([n % 256]) * 32).decode()


class FakeOutbox:
    """A controller's writers behind a backlog: one FIFO for every stream given it,
    writing one message each `per_message` seconds once `run` (a task) goes."""

    def __init__(self, per_message: float) -> None:
        self._per_message = per_message
        self._send, self._queue = trio.open_memory_channel[
            tuple["FakeNodeStream", wire.ControllerMessage]](math.inf)

    def put(self, stream: FakeNodeStream, message: wire.ControllerMessage) -> None:
        self._send.send_nowait((stream, message))

    async def run(self) -> None:
        async for stream, message in self._queue:
            await trio.sleep(self._per_message)
            stream.written(message)


class FakeNodeStream:
    def __init__(self, node: str, *, key: int = 1, last_applied: int = 0,
                 outbox: FakeOutbox | None = None) -> None:
        self._hello = wire.Hello(node, public_key(key), last_applied)
        self._to_session_send, self._to_session = trio.open_memory_channel[wire.NodeMessage](100)
        self.sent: list[wire.ControllerMessage] = []
        self.batches = 0
        self.closed_reason: str | None = None
        self._dropped = False
        self._sent_event = trio.Event()
        # When set, send_batch blocks until the test sets it: a slow daemon.
        self.write_gate: trio.Event | None = None
        # When set, what the daemon delivers waits unread until the test sets it.
        self.read_gate: trio.Event | None = None
        self.outbox = outbox
        self._timed_at: float | None = None
        self._enqueued = self._written = self._timed_mark = 0

    @property
    def node_name(self) -> str:
        return self._hello.node_name

    @property
    def hello(self) -> wire.Hello:
        return self._hello

    async def receive_batch(self) -> list[wire.NodeMessage]:
        if self.read_gate is not None:
            await self.read_gate.wait()
        try:
            first = await self._to_session.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StreamClosed("fake: the daemon went away") from None
        batch = [first]
        while True:
            try:
                batch.append(self._to_session.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return batch

    async def send_batch(self, messages: Sequence[wire.ControllerMessage], *,
                         timed: bool = False) -> None:
        if self.write_gate is not None:
            await self.write_gate.wait()
        if self._dropped or self.closed_reason is not None:
            raise StreamClosed("fake: stream is closed")
        await trio.lowlevel.checkpoint()
        self.batches += 1
        self._enqueued += len(messages)
        if timed:
            self._timed_mark, self._timed_at = self._enqueued, None
        for message in messages:
            if self.outbox is not None:
                self.outbox.put(self, message)
            else:
                self.written(message)

    def written(self, message: wire.ControllerMessage) -> None:
        """The controller's writer has put `message` on the wire."""
        self._written += 1
        if self._written == self._timed_mark:
            self._timed_at = trio.current_time()
        if self.closed_reason is not None or self._dropped:
            return
        self.sent.append(message)
        self._sent_event.set()
        self._sent_event = trio.Event()

    def written_at(self) -> float | None:
        return self._timed_at

    @property
    def unread(self) -> int:
        return self._to_session.statistics().current_buffer_used

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason

    # --- the test's side -------------------------------------------------------

    async def deliver(self, *messages: wire.NodeMessage) -> None:
        for m in messages:
            await self._to_session_send.send(m)

    def deliver_at_once(self, *messages: wire.NodeMessage) -> None:
        """As one read: all of them wait before the session looks."""
        for m in messages:
            self._to_session_send.send_nowait(m)

    async def ack_latest(self) -> int:
        generation = max(m.generation for m in self.sent
                         if isinstance(m, wire.SyncState | wire.Delta))
        await self.deliver(wire.Ack(generation))
        return generation

    def drop(self) -> None:
        """The daemon's side of the connection dies."""
        self._dropped = True
        self._to_session_send.close()

    async def wait_sent(self, count: int) -> None:
        while len(self.sent) < count:
            await self._sent_event.wait()
