"""Telemetry up the stream: when the daemon sends it (heartbeat, change,
coalesced), what KernelTelemetry reads from the kernel actors, and that the
controller's session hands the latest to the HealthActor. Virtual time."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio
import trio.testing

from tests.fakes.streams import FakeNodeStream, public_key
from vpblu.actors.session import NodeSessionActor, SessionSettings
from vpblu.core import wire
from vpblu.core.model import Endpoint, NodeDesiredState, Peer
from vpblu.lab.sim import RecordingApplier
from vpblu.messages import (
    BpfMapInbox,
    DevicePeer,
    HealthInbox,
    MeshReading,
    NetlinkInbox,
    ReadDataPathCounters,
    ReadMesh,
    SessionReport,
    StateInbox,
    StatusInbox,
)
from vpblu.node.stream import AppliedRecord, StreamActor, StreamSettings
from vpblu.node.telemetry import KernelTelemetry
from vpblu.stream.transport import ClientTLS

PERIOD = 30.0
INTERVAL = 5.0
SAMPLE = 10.0
SETTINGS = StreamSettings(addresses=(), tls=ClientTLS(ca=Path("/nonexistent")),
                          token_file=Path("/nonexistent"), heartbeat_period=PERIOD,
                          sample_period=SAMPLE, telemetry_interval=INTERVAL)


class RecordingStream:
    def __init__(self) -> None:
        self.sent: list[tuple[float, wire.NodeMessage]] = []

    async def send_batch(self, messages: Sequence[wire.NodeMessage]) -> None:
        self.sent.extend((trio.current_time(), m) for m in messages)

    def telemetry(self) -> list[tuple[float, wire.Telemetry]]:
        return [(t, m) for t, m in self.sent if isinstance(m, wire.Telemetry)]


class FakeSource:
    """A node whose MTU the test changes; counts samples."""

    def __init__(self) -> None:
        self.mtu = 1420
        self.samples = 0
        self.fail = False

    async def sample(self, applied: NodeDesiredState | None) -> wire.Telemetry:
        self.samples += 1
        if self.fail:
            raise RuntimeError("fake: cannot read")
        return wire.Telemetry(sampled_at=1000.0 + trio.current_time(), mtu=self.mtu)


async def test_telemetry_rides_every_heartbeat_and_a_change_goes_early_but_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = FakeSource()
    actor = StreamActor("a", lambda: public_key(1), RecordingApplier("a"), SETTINGS,
                        telemetry=source)
    stream = RecordingStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor._heartbeat, stream)
        await trio.sleep(1)
        [(first_at, _first)] = stream.telemetry()
        assert first_at == 0  # the first sample goes out at once
        # Quiet: nothing until the beat, and then the beat carries telemetry.
        await trio.sleep(PERIOD * 1.3)
        beats = stream.telemetry()
        assert len(beats) == 2
        assert PERIOD * 0.75 <= beats[1][0] <= PERIOD * 1.25
        assert not any(isinstance(m, wire.Heartbeat) for _, m in stream.sent)
        # A change: seen at the next sample (SAMPLE), sent then.
        changed_at = trio.current_time()
        source.mtu = 1380
        await trio.sleep(SAMPLE + 0.1)
        latest_at, latest = stream.telemetry()[-1]
        assert latest.mtu == 1380 and latest_at - changed_at <= SAMPLE
        # A flapping value: at most one message per INTERVAL, whatever the samples.
        before = len(stream.telemetry())
        for i in range(40):
            source.mtu = 1300 + i
            actor._applied_changed.set()  # an apply: sample again now
            actor._applied_changed = trio.Event()
            await trio.sleep(0.5)
        sent = stream.telemetry()[before:]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent)]
        assert sent and min(gaps) >= INTERVAL - 1e-9
        assert len(sent) <= 20 / INTERVAL + 1
        nursery.cancel_scope.cancel()
    assert actor.latest_telemetry is not None
    assert actor.statistics().telemetry_sent == len(stream.telemetry())


async def test_a_failing_sample_still_beats(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.fail = True
    actor = StreamActor("a", lambda: public_key(1), RecordingApplier("a"), SETTINGS,
                        telemetry=source)
    stream = RecordingStream()
    with trio.move_on_after(PERIOD * 3):
        await actor._heartbeat(stream)
    assert stream.telemetry() == []
    assert 2 <= sum(isinstance(m, wire.Heartbeat) for _, m in stream.sent) <= 4


async def test_the_telemetry_carries_the_applied_generation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = StreamActor("a", lambda: public_key(1), RecordingApplier("a"), SETTINGS,
                        telemetry=FakeSource())
    actor._applied = AppliedRecord(42, NodeDesiredState("a"))
    stream = RecordingStream()
    with trio.move_on_after(1):
        await actor._heartbeat(stream)
    [(_, sample)] = stream.telemetry()
    assert sample.applied_generation == 42


def peer(i: int) -> Peer:
    return Peer(f"n{i}", public_key(i), None, (f"10.244.{i}.0/24",), 25)


async def test_kernel_telemetry_names_peers_and_joins_the_counters() -> None:
    reading = MeshReading(public_key(1), 1234.0, "", 1420, 7, (
        DevicePeer(public_key(2), 990, 10, 20, "192.0.2.2:51820"),
        DevicePeer(public_key(9), 995, 1, 1, ""),  # not a desired peer: left out
    ))
    counters = wire.DataPathCounters(passed=5, guard_cleartext=0, guard_attached=True)

    async def netlink(inbox: trio.MemoryReceiveChannel[NetlinkInbox]) -> None:
        async for message in inbox:
            assert isinstance(message, ReadMesh)
            await message.reply.send(reading)

    async def bpf(inbox: trio.MemoryReceiveChannel[BpfMapInbox]) -> None:
        async for message in inbox:
            assert isinstance(message, ReadDataPathCounters)
            await message.reply.send(counters)

    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](0)
    bpf_send, bpf_recv = trio.open_memory_channel[BpfMapInbox](0)
    async with nl_send, bpf_send, trio.open_nursery() as nursery:
        nursery.start_soon(netlink, nl_recv)
        nursery.start_soon(bpf, bpf_recv)
        source = KernelTelemetry(nl_send, bpf_send, wall_clock=lambda: 1000.0)
        sample = await source.sample(NodeDesiredState("n1", peers=(peer(2), peer(3))))
        nursery.cancel_scope.cancel()
    assert sample.sampled_at == 1000.0 and sample.mtu == 1420 and sample.key_created == 1234.0
    assert list(sample.peers.rows()) == [
        wire.PeerStats("n2", 990, 10, 20, "192.0.2.2:51820"),
        wire.PeerStats("n3", 0, 0, 0, ""),  # desired, not on the interface (yet)
    ]
    assert sample.datapath == wire.DataPathCounters(passed=5, fail_closed_drops=7,
                                                    guard_attached=True)


async def test_kernel_telemetry_without_counters_when_the_maps_do_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reading = MeshReading(public_key(1), 0.0, "Staged", 1420, 0, ())

    async def netlink(inbox: trio.MemoryReceiveChannel[NetlinkInbox]) -> None:
        async for message in inbox:
            assert isinstance(message, ReadMesh)
            await message.reply.send(reading)

    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](0)
    bpf_send, _bpf_recv = trio.open_memory_channel[BpfMapInbox](0)  # nobody reads it
    async with nl_send, bpf_send, trio.open_nursery() as nursery:
        nursery.start_soon(netlink, nl_recv)
        sample = await KernelTelemetry(nl_send, bpf_send, read_timeout=2).sample(None)
        nursery.cancel_scope.cancel()
    assert sample.datapath is None and sample.rotation == "Staged"
    assert len(sample.peers) == 0


async def test_the_session_hands_the_latest_telemetry_to_the_health_actor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = FakeNodeStream("n0", key=4)
    state_send, state = trio.open_memory_channel[StateInbox](100)
    status_send, _status = trio.open_memory_channel[StatusInbox](100)
    health_send, health = trio.open_memory_channel[HealthInbox](100)
    actor = NodeSessionActor(stream, 3, state_send, status_send, SessionSettings(), health_send)
    sample = wire.Telemetry(sampled_at=5.0, applied_generation=0, mtu=1420)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        opened = await health.receive()
        assert opened == SessionReport("n0", 3, True, hello_key=public_key(4))
        await trio.sleep(2)
        await stream.deliver(sample)
        report = await health.receive()
        assert report.telemetry == sample and report.telemetry_at == trio.current_time()
        stream.drop()
        while (report := await health.receive()).connected:
            pass
        assert report.telemetry == sample  # what it knew, kept for the last word
    del state


async def test_the_session_merges_partial_samples_into_the_whole_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The controller holds each node's latest whole sample: peer updates
    replace the rows they name; a partial sample before any whole one, or one
    naming a row the whole one lacks, ends the stream (the daemon reconnects
    and starts with a whole one)."""
    stream = FakeNodeStream("n0", key=4)
    state_send, state = trio.open_memory_channel[StateInbox](100)
    status_send, _status = trio.open_memory_channel[StatusInbox](100)
    health_send, health = trio.open_memory_channel[HealthInbox](100)
    actor = NodeSessionActor(stream, 3, state_send, status_send, SessionSettings(), health_send)
    whole = wire.Telemetry(sampled_at=5.0, mtu=1420, peers=wire.PeerColumns(
        ("n1", "n2"), (1, 2), (10, 20), (30, 40), ("192.0.2.1:51820", "192.0.2.2:51820")))
    update = wire.Telemetry(sampled_at=35.0, mtu=1420, peer_updates=wire.PeerUpdates(
        (1,), (33,), (21,), (41,), ("198.51.100.2:51820",)))
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await health.receive()
        await stream.deliver(whole)
        assert (await health.receive()).telemetry == whole
        await stream.deliver(update)
        held = (await health.receive()).telemetry
        assert held is not None and not held.partial and held.sampled_at == 35.0
        assert held.peers == wire.PeerColumns(
            ("n1", "n2"), (1, 33), (10, 21), (30, 41), ("192.0.2.1:51820", "198.51.100.2:51820"))
        await stream.deliver(wire.Telemetry(sampled_at=40.0, peer_updates=wire.PeerUpdates(
            (2,), (1,), (0,), (0,), ("",))))
        while (await health.receive()).connected:
            pass
        assert stream.closed_reason is not None and "position 2" in stream.closed_reason
    del state

    stream = FakeNodeStream("n0", key=4)
    state_send, state = trio.open_memory_channel[StateInbox](100)
    status_send, _status = trio.open_memory_channel[StatusInbox](100)
    actor = NodeSessionActor(stream, 4, state_send, status_send)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await stream.deliver(update)
    assert stream.closed_reason == "peer updates before any whole telemetry sample"
    del state


async def test_a_quiet_mesh_sends_few_peer_rows(autojump_clock: trio.testing.MockClock) -> None:
    """Simulated WireGuard (renewing each peer every 120 s) at 200 peers over
    10 minutes: a whole sample at the start, a refresh of every row's
    handshake and bytes every 5 minutes, in between no rows (renewals are not
    sent) - under a third of the rows whole samples on every beat would carry."""
    from vpblu.lab.sim import SimTelemetry

    class Daemon:
        public_key = public_key(1)

    source = SimTelemetry(Daemon())  # type: ignore[arg-type]
    actor = StreamActor("a", lambda: public_key(1), RecordingApplier("a"), SETTINGS,
                        telemetry=source)
    actor._applied = AppliedRecord(1, NodeDesiredState("a", peers=tuple(
        peer(i) for i in range(2, 202))))
    stream = RecordingStream()
    with trio.move_on_after(600):
        await actor._heartbeat(stream)
    sent = [m for _, m in stream.telemetry()]
    whole = [m for m in sent if not m.partial]
    refreshes = [m for m in sent if m.peer_updates is not None and m.peer_updates.every_row]
    rows = sum(len(m.peers) if not m.partial else len(m.peer_updates or ()) for m in sent)
    assert len(whole) == 1 and 1 <= len(refreshes) <= 2
    assert rows < 200 * len(sent) / 3, (rows, len(sent))


async def test_the_simulated_sample_names_each_peer_with_its_endpoint() -> None:
    """The bench's simulated WireGuard: its cached columns (endpoint texts by
    Peer object, shared handshake columns) stay the applied peers' own, also
    when new Peer objects (a rotation's) join held ones."""
    from vpblu.lab.sim import SimTelemetry

    class Daemon:
        public_key = public_key(1)

    def reachable(i: int) -> Peer:
        return attrs.evolve(peer(i), endpoint=Endpoint(f"192.0.2.{i}", 51820))

    source = SimTelemetry(Daemon())  # type: ignore[arg-type]
    first = tuple(reachable(i) for i in range(2, 40))
    second = first[:10] + tuple(reachable(i) for i in range(40, 70)) + (peer(70),) + first[10:]
    for given in (first, second, first):
        state = NodeDesiredState("a", peers=given)
        sample, peers = await source.sample(state), state.peers
        assert sample.peers.names == tuple(p.name for p in peers)
        assert sample.peers.endpoints == tuple(str(p.endpoint or "") for p in peers)
        assert len(sample.peers.latest_handshakes) == len(peers)
        ages = [sample.sampled_at - hs for hs in sample.peers.latest_handshakes]
        assert all(-1 <= age <= SimTelemetry.REKEY for age in ages), ages
