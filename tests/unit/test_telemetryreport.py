"""What of each telemetry sample goes up the stream (TelemetryReporter), and
that the controller's merge of what went up (through the codec) keeps its
view of the peers true: ages computed from the handshakes it holds."""

from __future__ import annotations

import attrs
import pytest

from vpblu.core import health, wire
from vpblu.node.telemetryreport import (
    BYTES_REPORT,
    FULL_REFRESH,
    HANDSHAKE_REPORT_AGE,
    HANDSHAKE_URGENT_AGE,
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


def test_a_renewed_handshake_goes_with_the_beat_once_the_held_one_is_old() -> None:
    mesh, reporter = Mesh(), TelemetryReporter()
    assert reporter.plan(mesh.sample(T0), 0.0, beat=True) is not None
    # Renewed 20 s after the one sent (held one young): not worth a row.
    mesh.handshakes[3] += 20
    quiet = reporter.plan(mesh.sample(T0 + 30), 30.0, beat=True)
    assert quiet is not None and quiet.peer_updates == wire.PeerUpdates()
    # Held one older than HANDSHAKE_REPORT_AGE: with the beat, not before.
    at = mesh.handshakes[5] + HANDSHAKE_REPORT_AGE + 1
    mesh.handshakes[5] = int(at) - 1
    assert reporter.plan(mesh.sample(at), 40.0, beat=False) is None
    sent = reporter.plan(mesh.sample(at), 60.0, beat=True)
    assert sent is not None and sent.peer_updates is not None
    # Peer 3's held one is 59 s old; peer 5's renewal goes as a handshake alone.
    assert sent.peer_updates.handshake_positions == (5,) and sent.peer_updates.positions == ()
    assert sent.peer_updates.renewed_handshakes == (mesh.handshakes[5],)
    # Held one older than HANDSHAKE_URGENT_AGE: at once, between beats.
    at = mesh.handshakes[9] + HANDSHAKE_URGENT_AGE + 1
    mesh.handshakes[9] = int(at) - 1
    urgent = reporter.plan(mesh.sample(at), 70.0, beat=False)
    assert urgent is not None and urgent.peer_updates is not None
    assert 9 in urgent.peer_updates.handshake_positions


def test_a_peer_whose_handshake_stops_turns_down_on_the_controller_without_a_word() -> None:
    """The daemon sends nothing for a handshake that does not advance; the
    controller's age of it grows on its own, and the peer is down 180 s after
    its last handshake (HANDSHAKE_FRESH), not later and not earlier."""
    mesh, reporter, controller = Mesh(10), TelemetryReporter(), Controller()
    for i in range(10):
        mesh.handshakes[i] = int(T0)
    held = controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    stopped = mesh.handshakes[4]
    for k in range(1, 30):  # the others renew every 120 s; peer 4 never again
        at = T0 + 10 * k
        for i in range(10):
            if i != 4 and at - mesh.handshakes[i] >= 120:
                mesh.handshakes[i] = int(at)
        planned = reporter.plan(mesh.sample(at), at - T0, beat=k % 3 == 0)
        if planned is not None:
            assert planned.peer_updates is None or (
                4 not in planned.peer_updates.positions
                and 4 not in planned.peer_updates.handshake_positions)
            held = controller.receive(planned)
        # The controller evaluates at `at` plus up to 9 s after receiving.
        for elapsed in (0.0, 9.0):
            down = health.peers_down(held, elapsed)
            now = at + elapsed
            expected = ("node-4",) if now - stopped > health.HANDSHAKE_FRESH else ()
            if planned is not None:
                assert down == expected, (k, elapsed)
    assert health.peers_down(held, 0.0) == ("node-4",)


def test_the_controller_never_sees_a_live_peer_as_down() -> None:
    """WireGuard renewing every 120-145 s (keepalives), samples every 10 s,
    beats every 22.5-37.5 s: every live peer is up in every merged view, at
    any moment until the next message can arrive."""
    mesh, reporter, controller = Mesh(50), TelemetryReporter(), Controller()
    for i in range(50):
        mesh.handshakes[i] = int(T0) - (i * 3) % 120
    held = controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    next_beat = 37.5
    renew = [120 + (i * 7) % 26 for i in range(50)]  # each peer's own renewal gap
    last_message = 0.0
    for k in range(1, 400):
        t = 10.0 * k
        at = T0 + t
        for i in range(50):
            if at - mesh.handshakes[i] >= renew[i]:
                mesh.handshakes[i] = int(at)
        beat = t >= next_beat
        if beat:
            next_beat = t + 37.5  # the slowest jittered beat
        planned = reporter.plan(mesh.sample(at), t, beat=beat, next_beat=next_beat)
        if planned is not None:
            held = controller.receive(planned)
            last_message = t
        # Every sample (10 s apart), the controller's view, aged since its
        # last message, has every peer up, up to the next sample.
        assert health.peers_down(held, t + 10 - last_message) == (), k
    assert last_message > 0
    assert controller.rows < 50 * 400 / 3  # far fewer rows than whole samples per beat
    # Most renewals ride a beat: those between beats (a renewal late in a
    # long beat gap) add fewer messages than the beats themselves.
    beats = 4000 / 37.5
    assert controller.messages < 2 * beats, controller.messages


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
    assert reporter.plan(mesh.sample(T0 + FULL_REFRESH), FULL_REFRESH, beat=False) is None
    whole = reporter.plan(mesh.sample(T0 + FULL_REFRESH), FULL_REFRESH, beat=True)
    assert whole is not None and not whole.partial
    assert controller.receive(whole).peers.rx_bytes[1] == BYTES_REPORT - 1


def test_a_changed_peer_list_goes_with_the_beat_and_a_new_mtu_at_once() -> None:
    mesh, reporter, controller = Mesh(5), TelemetryReporter(), Controller()
    controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    mesh.names.append("node-new")
    mesh.handshakes.append(0)
    mesh.rx.append(0)
    mesh.tx.append(0)
    mesh.endpoints.append("")
    mesh.handshakes[0] = 0  # down, but on a list the controller does not have yet
    assert reporter.plan(mesh.sample(T0 + 10), 10.0, beat=False) is None
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


def test_a_renewal_alone_carries_no_other_column_and_the_controller_keeps_them() -> None:
    """A renewed handshake goes as two integers; the controller's merged view
    keeps the peer's endpoint and bytes as held (the very tuples: a merge of
    renewals copies one column). Bytes moved past the threshold with it make
    the row whole."""
    mesh, reporter, controller = Mesh(), TelemetryReporter(), Controller()
    first = controller.receive(reporter.plan(mesh.sample(T0), 0.0, beat=True))  # type: ignore[arg-type]
    at = T0 + HANDSHAKE_REPORT_AGE + 10  # the held ones 70-80 s old, still up
    mesh.handshakes[10] = mesh.handshakes[11] = int(at)
    mesh.rx[10] += 100  # under the threshold: waits
    mesh.tx[11] += BYTES_REPORT  # past it: the row goes whole
    sent = reporter.plan(mesh.sample(at), at - T0, beat=True)
    assert sent is not None and sent.peer_updates is not None
    u = sent.peer_updates
    assert (u.handshake_positions, u.positions) == ((10,), (11,))
    assert u.tx_bytes == (BYTES_REPORT,) and len(u) == 2
    held = controller.receive(sent)
    assert held.peers.latest_handshakes[10] == held.peers.latest_handshakes[11] == int(at)
    assert held.peers.rx_bytes[10] == 0 and held.peers.tx_bytes[11] == BYTES_REPORT
    assert held.peers.endpoints == first.peers.endpoints
    mesh.handshakes[12] = int(at)
    renewal = reporter.plan(mesh.sample(at + 30), at + 30 - T0, beat=True)
    assert renewal is not None and renewal.peer_updates is not None
    assert renewal.peer_updates.positions == () and renewal.peer_updates.rx_bytes == ()
    merged = controller.receive(renewal)
    assert merged.peers.latest_handshakes[12] == int(at)
    assert merged.peers.endpoints is held.peers.endpoints
    assert merged.peers.rx_bytes is held.peers.rx_bytes
    # The bytes under the threshold reach the controller with the whole list.
    whole = reporter.plan(mesh.sample(T0 + FULL_REFRESH), FULL_REFRESH, beat=True)
    assert whole is not None and controller.receive(whole).peers.rx_bytes[10] == 100


def test_a_renewal_outside_the_held_list_is_refused() -> None:
    held = Mesh(3).sample(T0)
    bad = wire.Telemetry(sampled_at=T0, peer_updates=wire.PeerUpdates(
        handshake_positions=(3,), renewed_handshakes=(1,)))
    with pytest.raises(ValueError, match="position 3 of a list of 3"):
        bad.merged_onto(held)
    with pytest.raises(ValueError, match="differ in length"):
        wire.PeerUpdates(handshake_positions=(1, 2), renewed_handshakes=(1,))
