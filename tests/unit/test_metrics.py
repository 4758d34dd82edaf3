"""Metrics: names per the Prometheus conventions, per-peer series bounded,
convergence bookkeeping, and (where Debian's prometheus is installed)
`promtool check metrics` on what both processes expose."""

from __future__ import annotations

import shutil
import subprocess

import attrs
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vpblu.core import wire
from vpblu.core.convergence import ConvergenceTracker
from vpblu.core.model import ListenPortChanged, NodeDesiredState
from vpblu.metrics import ControllerMetrics, DaemonMetrics
from vpblu.node.stream import StreamStatistics
from vpblu.stream.pushencoder import PushEncoder

NOW = 10_000.0


def telemetry(peers: int) -> wire.Telemetry:
    names = tuple(f"node-{i}" for i in range(peers))
    return wire.Telemetry(
        sampled_at=NOW, applied_generation=9, key_created=NOW - 3600, mtu=1420,
        peers=wire.PeerColumns(names, tuple(int(NOW) - 10 * (i + 1) for i in range(peers)),
                               tuple(range(peers)), tuple(range(peers)), ("",) * peers),
        datapath=wire.DataPathCounters(passed=10, dropped_blocked=1, guard_cleartext=0,
                                       fail_closed_drops=3, guard_attached=True))


@attrs.define
class FakeStream:
    latest_telemetry: wire.Telemetry | None
    apply_durations: list[tuple[float, bool]] = attrs.field(factory=list)

    def statistics(self) -> StreamStatistics:
        return StreamStatistics("ctrl:7443", 9, 2, 1, 0, 0, 3, 4, 100,
                                highest_generation_seen=11, telemetry_sent=5, apply_failures=1)


def daemon_exposition(peers: int, limit: int = 100) -> bytes:
    metrics = DaemonMetrics(per_peer_limit=limit, wall_clock=lambda: NOW + 5)
    stream = FakeStream(telemetry(peers), [(0.02, True), (0.5, False)])
    metrics.read_from(stream)
    out = generate_latest(metrics.registry)
    assert stream.apply_durations == []  # taken into the histogram
    return out


def samples(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_the_daemon_exposes_stream_peers_and_data_path() -> None:
    got = samples(daemon_exposition(3))
    assert got["vpblu_applied_generation"] == [({}, 9)]
    assert got["vpblu_generation_lag"] == [({}, 2)]
    assert got["vpblu_peers"] == [({}, 3)] and got["vpblu_peers_up"] == [({}, 3)]
    ages = {labels["peer"]: v for labels, v in got["vpblu_peer_handshake_age_seconds"]}
    assert ages == {"node-0": 15, "node-1": 25, "node-2": 35}
    assert got["vpblu_handshake_age_max_seconds"] == [({}, 35)]
    assert got["vpblu_fail_closed_dropped_packets_total"] == [({}, 3)]
    assert got["vpblu_cleartext_packets_total"] == [({}, 0)]
    assert ({"verdict": "blocked"}, 1) in got["vpblu_classified_packets_total"]
    assert ({"result": "error"}, 1) in got["vpblu_apply_duration_seconds_count"]
    assert got["vpblu_stream_connects_total"] == [({}, 2)]
    for name in got:
        assert name.startswith("vpblu_")


def test_per_peer_series_stop_above_the_limit() -> None:
    got = samples(daemon_exposition(150, limit=100))
    assert "vpblu_peer_handshake_age_seconds" not in got
    assert "vpblu_peer_receive_bytes_total" not in got
    assert got["vpblu_peers"] == [({}, 150)]
    assert got["vpblu_peers_receive_bytes_total"] == [({}, sum(range(150)))]


def test_a_daemon_without_telemetry_yet_still_exposes_its_stream() -> None:
    metrics = DaemonMetrics()
    metrics.read_from(FakeStream(None))
    got = samples(generate_latest(metrics.registry))
    assert got["vpblu_stream_connected"] == [({}, 1)]
    assert "vpblu_peers" not in got


@attrs.frozen
class FakeServerStatistics:
    pushed_bytes: dict[str, int]


@attrs.define
class FakeServer:
    """A MeshServer as the metrics see it: its statistics."""

    pushed: dict[str, int] = attrs.field(factory=dict)

    def statistics(self) -> FakeServerStatistics:
        return FakeServerStatistics(dict(self.pushed))


def controller_exposition() -> bytes:
    metrics = ControllerMetrics()
    metrics.read_server(FakeServer({"sync": 1200, "delta": 340}))
    metrics.nodes.set(3)
    metrics.nodes_ready.set(2)
    metrics.convergence.observe(0.03)
    metrics.pushes.labels("delta").inc(5)
    metrics.rotation_recorded("n1", "Distribute", None)
    metrics.rotation_recorded("n2", "Prepare", None)
    metrics.rotation_recorded("n2", None, "Completed")
    return generate_latest(metrics.registry)


def test_the_controller_exposes_convergence_pushes_and_rotations() -> None:
    got = samples(controller_exposition())
    assert ({"le": "0.05"}, 1) in got["vpblu_convergence_seconds_bucket"]
    assert ({"kind": "delta"}, 5) in got["vpblu_pushes_total"]
    phases = {labels["phase"]: v for labels, v in got["vpblu_rotations_in_progress"]}
    assert phases["Distribute"] == 1 and phases["Prepare"] == 0
    assert ({"outcome": "Completed"}, 1) in got["vpblu_rotations_total"]
    pushed = {labels["kind"]: v for labels, v in got["vpblu_push_bytes_total"]}
    assert pushed == {"sync": 1200, "delta": 340, "other": 0}
    assert got["vpblu_nodes"] == [({}, 3)] and got["vpblu_nodes_ready"] == [({}, 2)]


def test_push_bytes_are_what_the_encoder_handed_to_streams() -> None:
    encoder = PushEncoder()
    state = NodeDesiredState("n1", 51820, [], [])
    sync = encoder.encode(wire.SyncState(7, state))
    delta = encoder.encode(wire.Delta(8, 7, (ListenPortChanged(51821),)))
    other = encoder.encode(wire.Refused("no"))
    assert encoder.encoded_bytes == {"sync": len(sync), "delta": len(delta),
                                     "other": len(other)}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (Debian's prometheus) is not installed")
@pytest.mark.parametrize("exposition", [controller_exposition, lambda: daemon_exposition(3)])
def test_promtool_accepts_the_exposition(exposition: object) -> None:
    assert callable(exposition)
    done = subprocess.run(["promtool", "check", "metrics"], input=exposition(),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_convergence_waits_for_every_pushed_node() -> None:
    tracker = ConvergenceTracker(limit=3)
    tracker.pushed(5, seen=1.0, nodes={"a", "b"})
    tracker.pushed(6, seen=2.0, nodes={"a"})
    assert tracker.acked("a", 6, now=3.0) == [1.0]  # gen 6 done; 5 waits for b
    assert tracker.acked("b", 5, now=4.0) == [3.0]
    tracker.pushed(7, seen=5.0, nodes={"c", "d"})
    assert tracker.forget("c", now=6.0) == []
    assert tracker.forget("d", now=7.0) == [2.0]
    for gen in range(10, 15):
        tracker.pushed(gen, seen=0.0, nodes={"x"})
    assert len(tracker) == 3 and tracker.given_up == 2


def test_decoded_telemetry_is_packed_and_shares_its_rows() -> None:
    """The leader holds every node's latest sample: a peer's name and endpoint
    are one string that every node seeing it there shares, and the counters
    that fit take 4 bytes a value."""
    from vpblu.stream import codec
    from vpblu.stream.proto import mesh_pb2 as pb

    def decoded(sample: wire.Telemetry) -> wire.Telemetry:
        data = codec.encode_node_message(sample).SerializeToString()
        message = pb.NodeMessage()
        message.ParseFromString(data)
        out = codec.decode_node_message(message)
        assert isinstance(out, wire.Telemetry)
        return out

    base = telemetry(3)
    moved = wire.PeerColumns(base.peers.names, base.peers.latest_handshakes,
                             base.peers.rx_bytes, base.peers.tx_bytes, ("10.0.0.1:51820",) * 3)
    a = decoded(attrs.evolve(base, peers=moved))
    b = decoded(attrs.evolve(base, peers=moved))
    assert a == b
    assert a.peers.packed_rows is not None and b.peers.packed_rows is not None
    assert all(x is y for x, y in zip(a.peers.packed_rows, b.peers.packed_rows, strict=True))
    assert a.peers.names == base.peers.names
    assert a.peers.endpoints == ("10.0.0.1:51820",) * 3
    assert a.peers.latest_handshakes.itemsize == 4 and a.peers.rx_bytes.itemsize == 4
