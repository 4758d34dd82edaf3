"""The health rules (vpblu.core.health): Connected, Applied, Ready, peers up,
and which peers a daemon names down."""

from __future__ import annotations

import attrs
import pytest

from vpblu.core import wire
from vpblu.core.health import (
    HANDSHAKE_FRESH,
    NodeObservation,
    evaluate,
    peers_down,
)


def telemetry(*handshakes: int, at: float = 10_000.0, generation: int = 7) -> wire.Telemetry:
    """A sample as the daemon sends it: the peers down named by its own rule."""
    names = tuple(f"p{i}" for i in range(len(handshakes)))
    sample = wire.Telemetry(
        sampled_at=at, applied_generation=generation, key_created=500.0,
        peers=wire.PeerColumns(names, handshakes, (0,) * len(names), (0,) * len(names),
                               ("",) * len(names)))
    return attrs.evolve(sample, down=peers_down(sample))


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


def test_who_is_down_is_the_daemons_word_not_aged_by_the_controller() -> None:
    """The handshake times the controller holds are not refreshed by renewals,
    so it never ages them: a sample whose held handshake is 100 s old stays
    Ready however long ago it came (a silent daemon is caught by Connected);
    a peer the daemon names down is down."""
    sample = telemetry(9_900)
    for elapsed in (0, 70, 90, 600):
        obs = NodeObservation(True, 7, 7, telemetry=sample, telemetry_elapsed=elapsed)
        assert statuses(obs)["Ready"] == "True"
        assert evaluate("n1", obs).peers_up == 1
    named = attrs.evolve(sample, down=("p0",))
    assert statuses(NodeObservation(True, 7, 7, telemetry=named))["Ready"] == "False"
    assert evaluate("n1", NodeObservation(True, 7, 7, telemetry=named)).peers_up == 0
    # A down list naming a peer of a list the controller does not hold yet.
    ahead = attrs.evolve(sample, down=("p0", "p-new"))
    assert evaluate("n1", NodeObservation(True, 7, 7, telemetry=ahead)).peers_up == 0


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


def test_peers_down_is_a_samples_own_time_plus_what_elapsed() -> None:
    base = telemetry(9_990, 9_950)
    assert peers_down(base) == ()
    assert peers_down(base, elapsed=140) == ("p1",)
    assert peers_down(telemetry(9_990, 9_950, at=9_980.0 + HANDSHAKE_FRESH)) == ("p1",)


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
