"""The daemon's heartbeats are jittered, so daemons that connected together
do not all beat at once every period (StreamActor, with a fake stream)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from vpblu.core import wire
from vpblu.lab.sim import RecordingApplier
from vpblu.node.stream import HEARTBEAT_JITTER, StreamActor, StreamSettings
from vpblu.stream.transport import ClientTLS

PERIOD = 10.0
KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="


class FakeStream:
    """Records when each heartbeat was sent."""

    def __init__(self) -> None:
        self.beats: list[float] = []

    async def send_batch(self, messages: Sequence[wire.NodeMessage]) -> None:
        assert all(isinstance(m, wire.Heartbeat) for m in messages)
        self.beats.append(trio.current_time())


async def test_heartbeats_are_spread_around_their_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = StreamSettings(addresses=(), tls=ClientTLS(ca=Path("/nonexistent")),
                              token_file=Path("/nonexistent"), heartbeat_period=PERIOD)
    streams = [FakeStream() for _ in range(2)]
    with trio.move_on_after(100 * PERIOD):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                actor = StreamActor("a", lambda: KEY, RecordingApplier("a"), settings)
                nursery.start_soon(actor._heartbeat, stream)
    for stream in streams:
        gaps = [b - a for a, b in zip([0.0, *stream.beats], stream.beats, strict=False)]
        assert min(gaps) >= PERIOD * (1 - HEARTBEAT_JITTER)
        assert max(gaps) <= PERIOD * (1 + HEARTBEAT_JITTER)
        assert abs(statistics.mean(gaps) - PERIOD) < PERIOD * 0.1
    # Two daemons started together beat at different moments.
    assert not set(streams[0].beats) & set(streams[1].beats)
