"""FakeNodeStream: a daemon's stream as a NodeSessionActor sees it, in memory.

A fake, named as one. The test plays the daemon: it reads what the session
sent (`sent`), feeds acks (`deliver`), slows writes (`write_gate`) and breaks
the stream from either end (`drop`). The real stream is tested over real gRPC
in tests/integration.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import trio

from vpblu.core import wire
from vpblu.stream.transport import StreamClosed


def public_key(n: int) -> str:
    return base64.b64encode(bytes([n % 256]) * 32).decode()


class FakeNodeStream:
    def __init__(self, node: str, *, key: int = 1, last_applied: int = 0) -> None:
        self._hello = wire.Hello(node, public_key(key), last_applied)
        self._to_session_send, self._to_session = trio.open_memory_channel[wire.NodeMessage](100)
        self.sent: list[wire.ControllerMessage] = []
        self.batches = 0
        self.closed_reason: str | None = None
        self._dropped = False
        self._sent_event = trio.Event()
        # When set, send_batch blocks until the test sets it: a slow daemon.
        self.write_gate: trio.Event | None = None

    @property
    def node_name(self) -> str:
        return self._hello.node_name

    @property
    def hello(self) -> wire.Hello:
        return self._hello

    async def receive_batch(self) -> list[wire.NodeMessage]:
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

    async def send_batch(self, messages: Sequence[wire.ControllerMessage]) -> None:
        if self.write_gate is not None:
            await self.write_gate.wait()
        if self._dropped or self.closed_reason is not None:
            raise StreamClosed("fake: stream is closed")
        await trio.lowlevel.checkpoint()
        self.sent.extend(messages)
        self.batches += 1
        self._sent_event.set()
        self._sent_event = trio.Event()

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason

    # --- the test's side -------------------------------------------------------

    async def deliver(self, *messages: wire.NodeMessage) -> None:
        for m in messages:
            await self._to_session_send.send(m)

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
