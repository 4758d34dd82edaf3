"""KeyAnchors: which key a node's peers are told (issue 19, the trust anchor).

Named cases of the pure rule: a connected daemon's Hello key beats any status;
a rotation's key comes from the records this leader persisted, or from the
record a previous leader left (as first listed), never from a record that
appears later in the status."""

from __future__ import annotations

import base64

from vpblu.core import wire
from vpblu.core.keyanchors import KeyAnchors
from vpblu.core.sources import ObjectMeta, RotationPhase, RotationRecord, VpbluNodeSource


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


HELLO, STATUS, NEW, FORGED = key(1), key(2), key(3), key(4)


def source(public_key: str | None = STATUS,
           rotation: RotationRecord | None = None) -> VpbluNodeSource:
    return VpbluNodeSource(ObjectMeta("n1", 1, "7", "uid-n1"), None, public_key, rotation)


def record(phase: RotationPhase, old: str = HELLO, new: str = NEW) -> RotationRecord:
    return RotationRecord("r1", phase, wire.RotationStepKind.PREPARE, old, new)


def connected(session_id: int = 1, hello: str = HELLO) -> KeyAnchors:
    anchors = KeyAnchors()
    anchors.listed([])
    anchors.opened("n1", session_id, hello)
    return anchors


def test_a_node_without_a_daemon_is_what_its_status_says() -> None:
    anchors = KeyAnchors()
    assert anchors.published_key("n1", source()) == STATUS
    assert anchors.published_key("n1", source(rotation=record(RotationPhase.RETIRE))) == NEW
    assert anchors.published_key("n1", None) is None


def test_a_connected_daemon_s_hello_key_beats_a_patched_status() -> None:
    anchors = connected()
    assert anchors.published_key("n1", source(FORGED)) == HELLO
    assert anchors.current_key("n1", source(FORGED)) == HELLO


def test_a_forged_rotation_record_is_ignored_while_connected() -> None:
    anchors = connected()
    forged = record(RotationPhase.RETIRE, old=HELLO, new=FORGED)
    assert anchors.published_key("n1", source(rotation=forged)) == HELLO


def test_this_leader_s_rotation_publishes_its_records_and_ends_on_its_key() -> None:
    anchors = connected()
    anchors.rotation_recorded("n1", record(RotationPhase.ACTIVATE), None)
    # The daemon reconnects after Activate with K' in its Hello: peers keep K.
    anchors.opened("n1", 2, NEW)
    assert anchors.published_key("n1", source()) == HELLO
    anchors.rotation_recorded("n1", record(RotationPhase.RETIRE), None)
    assert anchors.published_key("n1", source()) == NEW
    anchors.opened("n1", 3, HELLO)  # a stale Hello's key does not matter mid-rotation
    anchors.rotation_recorded("n1", None, NEW)
    assert anchors.published_key("n1", source(FORGED)) == NEW
    assert anchors.current_key("n1", source(FORGED)) == NEW


def test_a_rolled_back_rotation_ends_on_the_old_key() -> None:
    anchors = connected()
    anchors.rotation_recorded("n1", record(RotationPhase.ROLLING_BACK), None)
    anchors.rotation_recorded("n1", None, HELLO)
    assert anchors.published_key("n1", source(rotation=record(RotationPhase.RETIRE))) == HELLO


def test_a_previous_leader_s_record_counts_until_this_leader_records_its_own() -> None:
    inherited = record(RotationPhase.RETIRE)
    anchors = KeyAnchors()
    anchors.listed([source(rotation=inherited)])
    anchors.opened("n1", 1, NEW)
    assert anchors.published_key("n1", source(rotation=inherited)) == NEW
    # A record written over it by someone else is not the inherited one.
    other = record(RotationPhase.RETIRE, new=FORGED)
    assert anchors.published_key("n1", source(rotation=other)) == NEW
    anchors.rotation_recorded("n1", None, NEW)
    # Put back after this leader finished it: not honoured again.
    assert anchors.published_key("n1", source(rotation=inherited)) == NEW
    anchors.listed([source(rotation=other)])  # a relist is not a first listing
    assert anchors.published_key("n1", source(rotation=other)) == NEW


def test_sessions_open_and_close_by_id() -> None:
    anchors = connected(session_id=5)
    assert not anchors.opened("n1", 4, FORGED)  # stale
    assert anchors.published_key("n1", source()) == HELLO
    assert not anchors.closed("n1", 4)
    assert anchors.closed("n1", 5)
    assert anchors.published_key("n1", source()) == STATUS
    assert anchors.opened("n1", 6, HELLO)
    assert not anchors.opened("n1", 7, HELLO)  # the same key: nothing to recompute


def test_a_daemon_gone_away_keeps_its_last_key_against_a_patched_status() -> None:
    anchors = connected()
    assert anchors.closed("n1", 1, "uid-n1")
    # Away: a status patched meanwhile (STATUS is not what the daemon said) is ignored...
    assert anchors.published_key("n1", source()) == HELLO
    # ...for that VpbluNode only: a new object of the same name is read from its status,
    other = VpbluNodeSource(ObjectMeta("n1", 1, "9", "uid-other"), None, STATUS)
    assert anchors.published_key("n1", other) == STATUS
    # none at all means no key, and a rotation in the status is read as before.
    assert anchors.published_key("n1", None) is None
    assert anchors.published_key("n1", source(rotation=record(RotationPhase.DISTRIBUTE))) \
        == record(RotationPhase.DISTRIBUTE).published_key


def test_a_session_closed_without_a_vpblunode_keeps_nothing() -> None:
    anchors = connected()
    assert anchors.closed("n1", 1, None)
    assert anchors.published_key("n1", source()) == STATUS
