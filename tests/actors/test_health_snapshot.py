"""HealthActor's read-only snapshot (HealthSnapshotWanted), on the autojump
clock: what the dashboard reads on the leader."""

from __future__ import annotations

import trio
import trio.testing

from tests.actors.test_health import report, running, sample
from vpblu.messages import HealthInbox, HealthSnapshot, HealthSnapshotWanted


async def ask(send: trio.MemorySendChannel[HealthInbox]) -> HealthSnapshot:
    reply, answer = trio.open_memory_channel[HealthSnapshot](1)
    async with reply, answer:
        await send.send(HealthSnapshotWanted(reply))
        with trio.fail_after(1):
            return await answer.receive()


async def test_the_snapshot_holds_every_node_with_its_latest_telemetry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        assert (await ask(h.send)).nodes == ()
        first, newer = sample(2, 3), sample(3, 3)
        await h.send.send(report("n2", first))
        await h.send.send(report("n1", first))
        await trio.sleep(4)
        await h.send.send(report("n1", newer))
        snap = await ask(h.send)
        assert [v.node for v in snap.nodes] == ["n1", "n2"]
        n1, n2 = snap.nodes
        assert n1.telemetry is newer and n1.connected and n1.acked_generation == 5
        assert n2.telemetry is first and 3.9 < n2.telemetry_age < 4.1
        # Silent past the limit: still held, no longer connected.
        await trio.sleep(80)
        assert not any(v.connected for v in (await ask(h.send)).nodes)


async def test_an_asker_that_went_away_costs_the_actor_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        reply, answer = trio.open_memory_channel[HealthSnapshot](1)
        await answer.aclose()
        await h.send.send(HealthSnapshotWanted(reply))  # nobody listens
        full, _keep = trio.open_memory_channel[HealthSnapshot](1)
        full.send_nowait(HealthSnapshot(()))
        await h.send.send(HealthSnapshotWanted(full))  # no room: dropped, never waited on
        await h.send.send(report("n1", sample(1, 1)))
        await trio.sleep(1)
        assert [v.node for v in (await ask(h.send)).nodes] == ["n1"]
