"""HealthActor on the autojump clock: transitions go out quickly, a quiet
mesh writes nothing, other changes and bursts are paced; and the StatusActor
writes what it hands on (merged with the core's conditions, KeyPublished
decided against the very status it writes)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from tests.fakes.streams import public_key
from vpblu.actors.health import HealthActor, HealthSettings
from vpblu.actors.status import StatusActor
from vpblu.core import wire
from vpblu.core.health import NodeHealth
from vpblu.core.model import Condition
from vpblu.kube.client import VPBLU_NODES
from vpblu.messages import (
    HealthInbox,
    NodeHealthReported,
    ObjectConditions,
    PublicKeyReported,
    SessionReport,
    StatusInbox,
)

SETTINGS = HealthSettings(silent_limit=75, transition_interval=2, update_interval=60,
                          writes_per_second=20, burst=20, grace=60, sweep_period=5)


def sample(up: int, total: int, *, generation: int = 5) -> wire.Telemetry:
    """`up` of `total` peers handshaked 10 s before a sample taken now (the
    others never; the daemon names them down)."""
    now = 1_000_000 + trio.current_time()
    names = tuple(f"p{i}" for i in range(total))
    handshakes = tuple(int(now) - 10 if i < up else 0 for i in range(total))
    return wire.Telemetry(sampled_at=now, applied_generation=generation,
                          public_key=public_key(1), key_created=1000.0,
                          peers=wire.PeerColumns(names, handshakes, (0,) * total, (0,) * total,
                                                 ("",) * total),
                          down=names[up:])


def report(node: str, t: wire.Telemetry | None, *, sid: int = 1, connected: bool = True,
           generation: int = 5) -> SessionReport:
    return SessionReport(node, sid, connected, generation, generation, None, public_key(1), t,
                         trio.current_time())


class Harness:
    def __init__(self, kube: FakeKubeApi | None = None,
                 settings: HealthSettings = SETTINGS) -> None:
        self.send, inbox = trio.open_memory_channel[HealthInbox](1000)
        status_send, self.status = trio.open_memory_channel[StatusInbox](1000)
        self.actor = HealthActor(inbox, status_send, kube, settings)
        self.handed: list[tuple[float, NodeHealthReported]] = []

    async def collect(self) -> None:
        async for message in self.status:
            assert isinstance(message, NodeHealthReported)
            self.handed.append((trio.current_time(), message))

    def of(self, node: str) -> list[tuple[float, NodeHealth]]:
        return [(t, m.health) for t, m in self.handed if m.node == node]


@asynccontextmanager
async def running(kube: FakeKubeApi | None = None,
                  settings: HealthSettings = SETTINGS) -> AsyncIterator[Harness]:
    h = Harness(kube, settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        nursery.start_soon(h.collect)
        yield h
        nursery.cancel_scope.cancel()


def status_of(health: NodeHealth, ctype: str) -> str | None:
    cond = health.condition(ctype)
    return cond.status if cond is not None else None


async def test_ready_is_written_at_once_and_a_quiet_mesh_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        await h.send.send(report("n1", sample(3, 3)))
        await trio.sleep(1)
        [(at, first)] = h.of("n1")
        assert at < 1 and status_of(first, "Ready") == "True"
        assert (first.peers_up, first.peers_total) == (3, 3)
        # An hour of heartbeats, each with a fresh sample that says the same.
        for _ in range(120):
            await trio.sleep(30)
            await h.send.send(report("n1", sample(3, 3)))
        await trio.sleep(1)
        assert len(h.of("n1")) == 1
        assert h.actor.statistics().telemetry_received == 121


async def test_a_daemon_gone_is_not_ready_within_the_transition_interval_and_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        await h.send.send(report("n1", sample(3, 3)))
        await trio.sleep(10)
        gone_at = trio.current_time()
        await h.send.send(report("n1", sample(3, 3), connected=False))
        await trio.sleep(10)
        [(_, _ready), (at, gone)] = h.of("n1")
        assert at - gone_at <= SETTINGS.transition_interval
        assert status_of(gone, "Connected") == "False" and status_of(gone, "Ready") == "False"
        assert h.actor.statistics().nodes == 0
        # The old session's late word changes nothing; a new session starts afresh.
        await h.send.send(report("n1", sample(3, 3), sid=2))
        await trio.sleep(1)
        assert status_of(h.of("n1")[-1][1], "Ready") == "True"


async def test_transitions_of_one_node_are_spaced(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as h:
        for i in range(20):  # a flapping peer, every 0.5 s
            await h.send.send(report("n1", sample(3 if i % 2 else 2, 3)))
            await trio.sleep(0.5)
        await trio.sleep(5)
        times = [t for t, _ in h.of("n1")]
        assert all(b - a >= SETTINGS.transition_interval for a, b in itertools.pairwise(times))
        assert len(times) <= 10 / SETTINGS.transition_interval + 2


async def test_counts_that_move_without_a_transition_are_coalesced_per_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        await h.send.send(report("n1", sample(1, 100)))  # Ready False, 1/100
        await trio.sleep(1)
        for up in range(2, 100):  # the mesh forms: one more peer every second
            await h.send.send(report("n1", sample(up, 100)))
            await trio.sleep(1)
        await h.send.send(report("n1", sample(100, 100)))  # Ready: a transition
        await trio.sleep(60)  # (silent longer than 75 s, it would stop being Connected)
        written = h.of("n1")
        # The first, one update a minute while forming, and Ready at once.
        assert 3 <= len(written) <= 4
        assert [h.peers_up for _, h in written][-1] == 100
        assert status_of(written[-1][1], "Ready") == "True"
        assert written[-1][0] < 101 + SETTINGS.transition_interval


async def test_a_new_applied_generation_alone_waits_for_the_generation_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        await h.send.send(report("n1", sample(3, 3), generation=5))
        await trio.sleep(1)
        # Every change of the mesh: a generation pushed, applied and acked.
        for generation in range(6, 30):
            await trio.sleep(10)
            await h.send.send(report("n1", sample(3, 3, generation=generation),
                                     generation=generation))
        await trio.sleep(1)
        assert len(h.of("n1")) == 1  # 4 min of churn, under the generation interval
        # A count that moves still goes at the update pace, the generation with it.
        await h.send.send(report("n1", sample(2, 3, generation=40), generation=40))
        await trio.sleep(SETTINGS.transition_interval + 1)
        _, latest = h.of("n1")[-1]
        assert (latest.peers_up, latest.applied_generation) == (2, 40)
        # And the generation alone after the generation interval.
        await trio.sleep(SETTINGS.generation_interval)
        await h.send.send(report("n1", sample(2, 3, generation=41), generation=41))
        await trio.sleep(1)
        assert h.of("n1")[-1][1].applied_generation == 41


async def test_a_thousand_nodes_are_written_at_the_bucket_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        for _ in range(4):  # heartbeats every 30 s
            for i in range(1000):
                await h.send.send(report(f"n{i:04d}", sample(3, 3)))
            await trio.sleep(30)
        times = sorted(t for t, _ in h.handed)
        assert len(times) == 1000
        start = times[0]
        for second in range(int(times[-1] - start) + 1):
            in_it = [t for t in times if start + second <= t < start + second + 1]
            assert len(in_it) <= SETTINGS.writes_per_second + SETTINGS.burst
        assert times[-1] - start <= 1000 / SETTINGS.writes_per_second + 1
        # Then quiet: heartbeats for ten minutes write nothing more.
        before = len(h.handed)
        for _ in range(20):
            for i in range(1000):
                await h.send.send(report(f"n{i:04d}", sample(3, 3)))
            await trio.sleep(30)
        assert len(h.handed) == before


async def test_a_silent_daemon_stops_being_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as h:
        await h.send.send(report("n1", sample(3, 3)))
        await trio.sleep(SETTINGS.silent_limit + SETTINGS.sweep_period + 1)
        last = h.of("n1")[-1][1]
        assert status_of(last, "Connected") == "False"


async def test_a_new_leader_marks_nodes_that_claim_connected_but_never_came(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    claims = {"conditions": [{"type": "Connected", "status": "True"}]}
    await kube.put(VPBLU_NODES, {"metadata": {"name": "dead"}, "spec": {}, "status": claims})
    await kube.put(VPBLU_NODES, {"metadata": {"name": "alive"}, "spec": {}, "status": claims})
    async with running(kube) as h:
        await h.send.send(report("alive", sample(1, 1)))
        await trio.sleep(SETTINGS.grace + SETTINGS.sweep_period + 1)
        [(_, dead)] = h.of("dead")
        assert status_of(dead, "Connected") == "False"
        assert [status_of(x, "Ready") for _, x in h.of("alive")] == ["True"]


async def test_the_status_actor_writes_health_beside_the_cores_conditions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    await kube.put(VPBLU_NODES, {"metadata": {"name": "n1"}, "spec": {}})
    send, inbox = trio.open_memory_channel[StatusInbox](100)
    status = StatusActor(kube, inbox, {"VpbluNode": VPBLU_NODES})
    ready = Condition("VpbluNode", "n1", "Ready", "True", "Ready", "fine")
    health = NodeHealth((ready,), peers_up=2, peers_total=3, applied_generation=9,
                        key_created=0.0, public_key=public_key(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(status.run)
        await send.send(ObjectConditions("VpbluNode", "n1", 1, (Condition(
            "VpbluNode", "n1", "DaemonScheduled", "True", "DaemonPod", "pod x is Running"),)))
        await send.send(NodeHealthReported("n1", health))
        await trio.sleep(1)
        got = (await kube.get(VPBLU_NODES, "n1"))["status"]
        by_type = {c["type"]: c for c in got["conditions"]}
        assert by_type["Ready"]["status"] == "True"
        assert by_type["DaemonScheduled"]["status"] == "True"  # kept, not replaced
        assert by_type["KeyPublished"]["status"] == "False"  # no publicKey in status yet
        assert got["peers"] == "2/3" and got["appliedGeneration"] == 9
        assert got["keyCreated"] == "1970-01-01T00:00:00Z"
        await send.send(PublicKeyReported("n1", public_key(1)))
        await trio.sleep(1)
        got = (await kube.get(VPBLU_NODES, "n1"))["status"]
        assert {c["type"]: c["status"] for c in got["conditions"]}["KeyPublished"] == "True"
        writes = status.writes
        await send.send(NodeHealthReported("n1", health))  # the same again: no write
        await trio.sleep(1)
        assert status.writes == writes
        nursery.cancel_scope.cancel()
