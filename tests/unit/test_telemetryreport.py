"""What of each telemetry sample goes up the stream (TelemetryReporter), and
that the controller's merge of what went up (through the codec) keeps its
view of the peers true: who is down is the daemon's word in every message."""

from __future__ import annotations

import random

import attrs
import pytest

from vpblu.core import health, wire
from vpblu.node.telemetryreport import (
    BYTES_REPORT,
    FULL_REFRESH,
    REFRESH_JITTER,
    TelemetryReporter,
)
from vpblu.stream import codec

N = 1000
T0 = 1_800_000_000.0


class Mesh:
    """A node's WireGuard as a sample: every peer up, handshakes staggered."""

    def __init__(self, n: int = N) -> None:
        self.names = [f"node-{i}" for i in range(n)]
        self.handshakes = [int(T0) - (i % 100) for i in range(n)]
        self.rx = [0] * n
        self.tx = [0] * n
        self.endpoints = [f"192.0.2.{i % 250}:51820" for i in range(n)]

    def sample(self, at: float, **kw: object) -> wire.Telemetry:
        return wire.Telemetry(sampled_at=at, mtu=1420, applied_generation=7, **kw,  # type: ignore[arg-type]
                              peers=wire.PeerColumns(self.names, self.handshakes, self.rx,
                                                     self.tx, self.endpoints))


class Controller:
    """The controller's side: decode what went up, merge it like the session."""

    def __init__(self) -> None:
        self.held: wire.Telemetry | None = None
        self.rows = 0
        self.messages = 0

    def receive(self, sent: wire.Telemetry) -> wire.Telemetry:
        decoded = codec.decode_node_message(codec.encode_node_message(sent))
        assert isinstance(decoded, wire.Telemetry)
        self.rows += len(decoded.peer_updates) if decoded.peer_updates is not None \
            else len(decoded.peers)
        self.messages += 1
        self.held = decoded if self.held is None else decoded.merged_onto(self.held)
        return self.held


def test_whole_first_then_only_what_changed_and_nothing_between_beats_when_quiet() -> None:
    mesh, reporter, controller = Mesh(), TelemetryReporter(), Controller()
    first = reporter.plan(mesh.sample(T0), 0.0, beat=False)
    assert first is not None and not first.partial and len(first.peers) == N
    controller.receive(first)
    assert reporter.plan(mesh.sample(T0 + 10), 10.0, beat=False) is None
    beat = reporter.plan(mesh.sample(T0 + 30), 30.0, beat=True)
    assert beat is not None and beat.peer_updates == wire.PeerUpdates()
    held = controller.receive(beat)
    assert held.sampled_at == T0 + 30 and held.peers == first.peers


def test_a_renewed_handshake_is_not_sent() -> None:
    mesh, reporter, controller = Mesh(), TelemetryReporter(), Controller()
    controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    for k in range(1, 10):  # every peer renewed, again and again
        mesh.handshakes = [int(T0) + 10 * k] * N
        at = T0 + 10 * k
        assert reporter.plan(mesh.sample(at), 10.0 * k, beat=False) is None
    beat = reporter.plan(mesh.sample(T0 + 100), 100.0, beat=True)
    assert beat is not None and beat.peer_updates == wire.PeerUpdates() and beat.down == ()
    held = controller.receive(beat)
    assert held.down == () and tuple(held.peers.latest_handshakes) == tuple(
        int(T0) - (i % 100) for i in range(N))  # as the whole sample said


def test_a_peer_whose_handshake_stops_is_named_down_at_once() -> None:
    """The daemon names a peer down in its first sample past HANDSHAKE_FRESH
    after its last handshake, at once (between beats), with its row; the
    controller's view says so from that message on, and not before."""
    mesh, reporter, controller = Mesh(10), TelemetryReporter(), Controller()
    for i in range(10):
        mesh.handshakes[i] = int(T0)
    held = controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    stopped = mesh.handshakes[4]
    named_at = None
    for k in range(1, 30):  # the others renew every 120 s; peer 4 never again
        at = T0 + 10 * k
        for i in range(10):
            if i != 4 and at - mesh.handshakes[i] >= 120:
                mesh.handshakes[i] = int(at)
        planned = reporter.plan(mesh.sample(at), at - T0, beat=k % 3 == 0)
        if planned is not None:
            held = controller.receive(planned)
        if at - stopped > health.HANDSHAKE_FRESH:
            assert held.down == ("node-4",), k
            if named_at is None:
                named_at = at
                assert planned is not None and planned.peer_updates is not None
                assert planned.peer_updates.positions == (4,)
        else:
            assert held.down == (), k
    assert named_at == T0 + 190


def test_the_controller_never_sees_a_live_peer_as_down() -> None:
    """WireGuard renewing every 120-145 s (keepalives), samples every 10 s,
    beats every 22.5-37.5 s: no live peer is ever named down, and the rows
    sent are few (renewals are not)."""
    mesh, reporter, controller = Mesh(50), TelemetryReporter(), Controller()
    for i in range(50):
        mesh.handshakes[i] = int(T0) - (i * 3) % 120
    held = controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    next_beat = 37.5
    renew = [120 + (i * 7) % 26 for i in range(50)]  # each peer's own renewal gap
    for k in range(1, 400):
        t = 10.0 * k
        at = T0 + t
        for i in range(50):
            if at - mesh.handshakes[i] >= renew[i]:
                mesh.handshakes[i] = int(at)
        beat = t >= next_beat
        if beat:
            next_beat = t + 37.5  # the slowest jittered beat
        planned = reporter.plan(mesh.sample(at), t, beat=beat)
        if planned is not None:
            held = controller.receive(planned)
        assert held.down == (), k
    # Whole samples (refreshes) at most every (1 - REFRESH_JITTER) x
    # FULL_REFRESH, nothing else: no row between them.
    wholes = 1 + int(4000 // (FULL_REFRESH * (1 - REFRESH_JITTER)))
    assert controller.rows <= 50 * (wholes + 1), controller.rows
    beats = 4000 / 37.5
    assert controller.messages < 1.5 * beats, controller.messages


def test_an_endpoint_change_or_a_peer_up_goes_at_once() -> None:
    mesh, reporter = Mesh(), TelemetryReporter()
    reporter.plan(mesh.sample(T0), 0.0, beat=True)
    mesh.endpoints[7] = "198.51.100.7:51820"
    moved = reporter.plan(mesh.sample(T0 + 10), 10.0, beat=False)
    assert moved is not None and moved.peer_updates is not None
    assert moved.peer_updates.positions == (7,)
    assert moved.peer_updates.endpoints == ("198.51.100.7:51820",)
    mesh.handshakes[8] = 0  # gone (peer re-made): down
    gone = reporter.plan(mesh.sample(T0 + 20), 20.0, beat=False)
    assert gone is not None and gone.peer_updates is not None
    assert gone.peer_updates.positions == (8,)
    mesh.handshakes[8] = int(T0 + 25)
    back = reporter.plan(mesh.sample(T0 + 30), 30.0, beat=False)
    assert back is not None and back.peer_updates is not None
    assert back.peer_updates.positions == (8,)


def test_bytes_go_past_the_threshold_and_the_whole_list_every_few_minutes() -> None:
    mesh, reporter, controller = Mesh(), TelemetryReporter(), Controller()
    controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    mesh.rx[1] += BYTES_REPORT - 1
    mesh.tx[2] += BYTES_REPORT
    sent = reporter.plan(mesh.sample(T0 + 30), 30.0, beat=True)
    assert sent is not None and sent.peer_updates is not None
    assert sent.peer_updates.positions == (2,)
    held = controller.receive(sent)
    assert held.peers.tx_bytes[2] == BYTES_REPORT and held.peers.rx_bytes[1] == 0
    # The whole list with the first beat FULL_REFRESH after the last one.
    mesh.handshakes = [int(T0 + FULL_REFRESH) - 5] * N  # renewed meanwhile: all still up
    assert reporter.plan(mesh.sample(T0 + FULL_REFRESH), FULL_REFRESH, beat=False) is None
    refresh = reporter.plan(mesh.sample(T0 + FULL_REFRESH), FULL_REFRESH, beat=True)
    assert refresh is not None and refresh.peer_updates is not None
    assert refresh.peer_updates.every_row and refresh.peer_updates.endpoints == ()
    held = controller.receive(refresh)
    assert held.peers.rx_bytes[1] == BYTES_REPORT - 1
    assert tuple(held.peers.latest_handshakes) == (int(T0 + FULL_REFRESH) - 5,) * N
    assert held.peers.names == tuple(mesh.names) and held.peers.endpoints == tuple(
        mesh.endpoints)
    # A moved endpoint not yet sent makes the refresh a whole sample.
    mesh.endpoints[3] = "198.51.100.3:51820"
    whole = reporter.plan(mesh.sample(T0 + 2 * FULL_REFRESH), 2 * FULL_REFRESH, beat=True)
    assert whole is not None and not whole.partial
    assert controller.receive(whole).peers.endpoints[3] == "198.51.100.3:51820"


def test_a_refresh_of_another_length_is_refused() -> None:
    held = Mesh(3).sample(T0)
    bad = wire.Telemetry(sampled_at=T0, peer_updates=wire.PeerUpdates(
        latest_handshakes=(1, 2), rx_bytes=(0, 0), tx_bytes=(0, 0), every_row=True))
    with pytest.raises(ValueError, match="a refresh of 2 rows onto a list of 3 peers"):
        bad.merged_onto(held)
    with pytest.raises(ValueError, match="no positions and no endpoints"):
        wire.PeerUpdates((0,), (1,), (0,), (0,), ("",), every_row=True)


def test_a_changed_peer_list_goes_with_the_beat_and_a_new_mtu_at_once() -> None:
    mesh, reporter, controller = Mesh(5), TelemetryReporter(), Controller()
    controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    mesh.names.append("node-new")
    mesh.handshakes.append(0)
    mesh.rx.append(0)
    mesh.tx.append(0)
    mesh.endpoints.append("")
    mesh.handshakes[0] = 0  # down, but on a list the controller does not have yet
    named = reporter.plan(mesh.sample(T0 + 10), 10.0, beat=False)  # urgent, without rows
    assert named is not None and named.peer_updates == wire.PeerUpdates()
    assert named.down == ("node-0", "node-new")
    assert controller.receive(named).down == ("node-0", "node-new")
    assert reporter.plan(mesh.sample(T0 + 12), 12.0, beat=False) is None
    # A new generation alone waits for the beat: the daemon's Ack carried it.
    applied = attrs.evolve(mesh.sample(T0 + 15), applied_generation=8)
    assert reporter.plan(applied, 15.0, beat=False) is None
    shrunk = attrs.evolve(mesh.sample(T0 + 20), applied_generation=8, mtu=1380)
    sent = reporter.plan(shrunk, 20.0, beat=False)
    assert sent is not None and sent.mtu == 1380 and sent.applied_generation == 8
    assert sent.peer_updates == wire.PeerUpdates()
    held = controller.receive(sent)
    assert held.applied_generation == 8 and len(held.peers) == 5
    grown = reporter.plan(mesh.sample(T0 + 30), 30.0, beat=True)
    assert grown is not None and not grown.partial and len(grown.peers) == 6
    assert controller.receive(grown).peers.names[-1] == "node-new"


def test_a_new_generation_alone_goes_with_the_beat() -> None:
    mesh, reporter, controller = Mesh(3), TelemetryReporter(), Controller()
    controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    newer = attrs.evolve(mesh.sample(T0 + 5), applied_generation=9)
    assert reporter.plan(newer, 5.0, beat=False) is None
    beat = reporter.plan(attrs.evolve(mesh.sample(T0 + 30), applied_generation=9), 30.0,
                         beat=True)
    assert beat is not None and beat.partial
    assert controller.receive(beat).applied_generation == 9


def test_a_partial_sample_outside_the_held_list_is_refused() -> None:
    held = Mesh(3).sample(T0)
    bad = wire.Telemetry(sampled_at=T0, peer_updates=wire.PeerUpdates((3,), (1,), (0,), (0,),
                                                                      ("",)))
    with pytest.raises(ValueError, match="position 3 of a list of 3"):
        bad.merged_onto(held)
    with pytest.raises(ValueError, match="carries peer updates, not peers"):
        attrs.evolve(held, peer_updates=wire.PeerUpdates())


def test_the_held_counters_are_compact_and_a_merge_leaves_its_base_alone() -> None:
    """The leader holds N x (N-1) rows: counters that fit take 4 bytes a value,
    a column whose new value needs 8 is widened (never wrapped), a value
    outside uint64 is refused, and merging rows copies, never writes into the
    held sample."""
    mesh = Mesh(3)
    base = Controller().receive(TelemetryReporter().plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    assert base.peers.packed_rows is not None
    for column in (base.peers.latest_handshakes, base.peers.rx_bytes, base.peers.tx_bytes):
        assert column.typecode == "I" and column.itemsize == 4
    before = base.peers.rx_bytes.tolist()
    update = wire.PeerUpdates((1,), wire.narrow((5,)), wire.narrow((2**64 - 1,)),
                              wire.narrow((0,)), ("192.0.2.9:51820",))
    merged = update.onto(base.peers)
    assert merged.rx_bytes.tolist() == [before[0], 2**64 - 1, before[2]]
    assert merged.rx_bytes.itemsize == 8 and merged.tx_bytes.itemsize == 4
    assert merged.endpoints[1] == "192.0.2.9:51820" and merged.names == base.peers.names
    assert base.peers.rx_bytes.tolist() == before
    assert base.peers.endpoints[1] != "192.0.2.9:51820"
    refreshed = wire.PeerUpdates(latest_handshakes=(1, 2, 3), rx_bytes=(2**40, 0, 0),
                                 tx_bytes=(0, 0, 0), every_row=True).onto(merged)
    assert refreshed.rx_bytes.tolist() == [2**40, 0, 0]
    assert refreshed.packed_rows == merged.packed_rows
    with pytest.raises(ValueError, match="is outside"):
        wire.PeerColumns(("a",), (2**64,), (0,), (0,), ("",))
    with pytest.raises(ValueError, match="is outside"):
        wire.PeerColumns.packed(("a",), (0,), (2**64,), (0,), ("",))
    with pytest.raises(ValueError, match="is outside"):
        wire.PeerUpdates((0,), (-1,), (0,), (0,), ("",))
    with pytest.raises(ValueError, match="NUL"):
        wire.PeerColumns.packed(("a\0b",), (0,), (0,), (0,), ("",))


def _refresh_times(jitter: float, nodes: int = 50, cycles: int = 3) -> list[list[float]]:
    """Per node, when its first `cycles` refreshes went: every node sent its
    whole list at 0 (a mesh formed) and beats every 10 s."""
    mesh = Mesh(4)
    times: list[list[float]] = []
    for k in range(nodes):
        reporter = TelemetryReporter(jitter=jitter, rng=random.Random(k))
        reporter.plan(mesh.sample(T0), 0.0, beat=True)
        went: list[float] = []
        t = 0.0
        while len(went) < cycles:
            t += 10.0
            sent = reporter.plan(mesh.sample(T0 + t), t, beat=True)
            if sent is not None and sent.peer_updates is not None and sent.peer_updates.every_row:
                went.append(t)
        times.append(went)
    return times


def test_refreshes_of_nodes_that_sent_together_drift_apart_and_none_comes_late() -> None:
    """Without jitter a thousand daemons whose lists went together refresh
    together for ever; with it the third refresh of 50 such nodes is spread
    over more than 100 s, and no refresh comes later than FULL_REFRESH (plus
    the beat that carries it) after the one before."""
    together = _refresh_times(0.0)
    assert {tuple(went) for went in together} == {(300.0, 600.0, 900.0)}
    spread = _refresh_times(REFRESH_JITTER)
    third = [went[2] for went in spread]
    assert max(third) - min(third) > 100.0, (min(third), max(third))
    for went in spread:
        gaps = [b - a for a, b in zip([0.0, *went], went, strict=False)]
        assert all(FULL_REFRESH * (1 - REFRESH_JITTER) <= g <= FULL_REFRESH + 10.0
                   for g in gaps), gaps


def test_a_refresh_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"refresh jitter 1\.0 is outside"):
        TelemetryReporter(jitter=1.0)
