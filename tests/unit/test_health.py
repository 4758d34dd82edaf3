"""The health rules (vpblu.core.health): Connected, Applied, Ready, peers up,
and what in telemetry counts as a change."""

from __future__ import annotations

import pytest

from vpblu.core import wire
from vpblu.core.health import (
    HANDSHAKE_FRESH,
    NodeObservation,
    evaluate,
    peers_down,
    telemetry_digest,
)


def telemetry(*handshakes: int, at: float = 10_000.0, generation: int = 7) -> wire.Telemetry:
    names = tuple(f"p{i}" for i in range(len(handshakes)))
    return wire.Telemetry(
        sampled_at=at, applied_generation=generation, key_created=500.0,
        peers=wire.PeerColumns(names, handshakes, (0,) * len(names), (0,) * len(names),
                               ("",) * len(names)))


def statuses(obs: NodeObservation) -> dict[str, str]:
    return {c.type: c.status for c in evaluate("n1", obs).conditions}


def test_connected_applied_and_every_peer_fresh_is_ready() -> None:
    obs = NodeObservation(True, 7, 7, telemetry=telemetry(9_990, 9_900))
    health = evaluate("n1", obs)
    assert statuses(obs) == {"Connected": "True", "Applied": "True", "Ready": "True"}
    assert (health.peers_up, health.peers_total) == (2, 2)
    assert health.applied_generation == 7 and health.key_created == 500.0


@pytest.mark.parametrize(("obs", "ready_reason"), [
    (NodeObservation(False, 7, 7, telemetry=telemetry(9_990)), "NotConnected"),
    (NodeObservation(True, 8, 7, telemetry=telemetry(9_990)), "NotApplied"),
    (NodeObservation(True, 7, 7, apply_error="netlink said no"), "NotApplied"),
    (NodeObservation(True, 7, 7), "NoTelemetry"),
    (NodeObservation(True, 7, 7, telemetry=telemetry(9_990, 0)), "PeersDown"),
    (NodeObservation(True, 7, 7, telemetry=telemetry(9_990, int(10_000 - HANDSHAKE_FRESH - 1))),
     "PeersDown"),
])
def test_not_ready(obs: NodeObservation, ready_reason: str) -> None:
    ready = evaluate("n1", obs).condition("Ready")
    assert ready is not None and ready.status != "True" and ready.reason == ready_reason


def test_a_handshake_ages_while_no_new_sample_comes() -> None:
    sample = telemetry(9_900)  # 100 s old when sampled
    fresh = NodeObservation(True, 7, 7, telemetry=sample, telemetry_elapsed=70)
    stale = NodeObservation(True, 7, 7, telemetry=sample, telemetry_elapsed=90)
    assert statuses(fresh)["Ready"] == "True"
    assert statuses(stale)["Ready"] == "False"
    assert evaluate("n1", stale).peers_up == 0


def test_no_peers_is_ready_and_the_down_list_is_bounded() -> None:
    assert statuses(NodeObservation(True, 7, 7, telemetry=telemetry()))["Ready"] == "True"
    many = evaluate("n1", NodeObservation(True, 7, 7, telemetry=telemetry(*[0] * 12)))
    ready = many.condition("Ready")
    assert ready is not None and ready.message.endswith("and 7 more")


def test_applied_follows_acks_and_errors() -> None:
    assert statuses(NodeObservation(True, 0, 0))["Applied"] == "Unknown"
    assert statuses(NodeObservation(True, 9, 8))["Applied"] == "False"
    assert statuses(NodeObservation(True, 9, 9))["Applied"] == "True"
    assert statuses(NodeObservation(True, 9, 9, apply_error="x"))["Applied"] == "False"
    # The ack is newer than the telemetry's generation: the status says the ack's.
    assert evaluate("n1", NodeObservation(True, 9, 9, telemetry=telemetry(
        generation=8))).applied_generation == 9


def test_the_digest_ignores_counters_and_ages_but_not_who_is_up() -> None:
    base = telemetry(9_990, 9_950)
    moved = wire.Telemetry(
        sampled_at=10_030.0, applied_generation=7, key_created=500.0,
        peers=wire.PeerColumns(base.peers.names, (10_020, 9_950), (5, 5), (6, 6), ("", "")),
        datapath=None)
    assert telemetry_digest(base) == telemetry_digest(moved)
    assert peers_down(moved, elapsed=120) == ("p1",)
    later = telemetry(9_990, 9_950, at=10_000.0 + HANDSHAKE_FRESH)
    assert telemetry_digest(later) != telemetry_digest(base)  # p1 went stale
    assert telemetry_digest(telemetry(9_990, 9_950, generation=8)) != telemetry_digest(base)


@pytest.mark.parametrize(("handshakes", "down"), [
    ((), ()),
    ((9_990, 9_900, 9_850), ()),  # all up: the fast path
    ((9_990, 0, 9_850), ("p1",)),  # never handshaked
    ((9_990, 9_900, 10_000 - int(HANDSHAKE_FRESH) - 1), ("p2",)),  # stale
    ((10_000 - int(HANDSHAKE_FRESH), 9_999), ()),  # exactly at the limit: still up
    ((0, 0), ("p0", "p1")),
])
def test_peers_down_names_every_peer_without_a_fresh_handshake(
        handshakes: tuple[int, ...], down: tuple[str, ...]) -> None:
    assert peers_down(telemetry(*handshakes)) == down
