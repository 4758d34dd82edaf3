"""The benchmark's join starts from the spare daemon back on a served stream:
after a leave ended its stream, the next join waits (outside the timed event)
for a new stream and its SyncState, so the join does not measure the daemon's
reconnect backoff."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from vpblu.lab import bench
from vpblu.node.stream import StreamStatistics


def _stats(connected: bool, connects: int, syncs: int) -> StreamStatistics:
    return StreamStatistics("127.0.0.1:1" if connected else None, 0, connects, 0, 0, 0, syncs)


@attrs.define
class FakeStreamActor:
    now: StreamStatistics

    def statistics(self) -> StreamStatistics:
        return self.now


@attrs.define
class FakeSpareDaemon:
    """Stands in for a SimDaemon: only its name and its stream's statistics."""

    stream: FakeStreamActor
    name: str = "spare"


async def test_the_join_waits_for_a_new_stream_that_was_served(
        autojump_clock: trio.testing.MockClock) -> None:
    before_leave = _stats(True, connects=3, syncs=3)
    daemon = FakeSpareDaemon(FakeStreamActor(before_leave))

    async def reconnect() -> None:
        await trio.sleep(1.0)
        daemon.stream.now = _stats(False, connects=3, syncs=3)  # the leave ended it
        await trio.sleep(2.0)
        daemon.stream.now = _stats(True, connects=4, syncs=3)  # up, not yet served
        await trio.sleep(0.5)
        daemon.stream.now = _stats(True, connects=4, syncs=4)  # its SyncState applied

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconnect)
        await bench._wait_served_again(daemon, before_leave)  # type: ignore[arg-type]
        assert trio.current_time() == pytest.approx(3.5, abs=0.05)


async def test_a_spare_never_served_again_is_an_error_naming_it(
        autojump_clock: trio.testing.MockClock) -> None:
    before_leave = _stats(True, connects=3, syncs=3)
    daemon = FakeSpareDaemon(FakeStreamActor(_stats(False, connects=3, syncs=3)))
    with pytest.raises(RuntimeError, match="spare daemon spare had no new served stream"):
        await bench._wait_served_again(daemon, before_leave)  # type: ignore[arg-type]
    assert trio.current_time() == pytest.approx(bench.SERVED_AGAIN_TIMEOUT, abs=0.05)
