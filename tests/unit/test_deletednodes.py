"""DeletedNodes: deleted Nodes, the key held for each, registered again, bounded."""

from __future__ import annotations

import pytest

from vpblu.core.deletednodes import DeletedNodes


def test_a_name_is_deleted_until_registered_again_which_gives_the_key_held() -> None:
    names = DeletedNodes()
    names.hold("a", "K0")  # not deleted: nothing held
    names.deleted("a")
    assert "a" in names and "b" not in names
    names.hold("a", "K1")
    names.hold("a", "K2")
    assert names.registered("a") == "K2"
    assert "a" not in names and names.registered("a") is None
    assert names.registered("b") is None and len(names) == 0


def test_a_second_deletion_drops_the_key_held_before_it() -> None:
    names = DeletedNodes()
    names.deleted("a")
    names.hold("a", "K1")
    names.deleted("a")
    assert names.registered("a") is None


def test_past_the_limit_the_oldest_deletion_is_forgotten() -> None:
    names = DeletedNodes(limit=2)
    for name in ("a", "b"):
        names.deleted(name)
    names.deleted("a")  # deleted again: the newest now
    names.deleted("c")
    assert ("a" in names, "b" in names, "c" in names) == (True, False, True)
    assert len(names) == 2


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DeletedNodes(limit=0)
