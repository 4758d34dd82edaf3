"""The daemon's stale-step guard with rotations in several slots (issue 24,
maxConcurrent): steps of rotations that run at once are stamped from the leader's one
sequence and reach a node interleaved, so a step is stale only below its own slot's
highest stamp or of an older term; what the file keeps survives a restart."""

from __future__ import annotations

from pathlib import Path

from vpblu.node.stepguard import STAMP_FILE_NAME, StepGuard

TERM_1 = 1 << 32
TERM_2 = 2 << 32


def test_interleaved_slots_are_admitted_and_each_slot_refuses_its_own_past(
        tmp_path: Path) -> None:
    guard = StepGuard.load(tmp_path)
    assert guard.admit(TERM_1 | 5, slot=2) is None
    # Slot 1's step was stamped before slot 2's but arrives after it: not stale.
    assert guard.admit(TERM_1 | 4, slot=1) is None
    assert guard.admit(TERM_1 | 4, slot=1) is None  # a re-sent step, same stamp
    assert guard.admit(TERM_1 | 3, slot=1) == f"stale step: stamp {TERM_1 | 3} is below " \
        f"{TERM_1 | 4}"
    assert guard.highest == TERM_1 | 5
    # A restart keeps each slot's highest.
    again = StepGuard.load(tmp_path)
    assert (again.highest_in(1), again.highest_in(2)) == (TERM_1 | 4, TERM_1 | 5)
    assert again.admit(TERM_1 | 3, slot=1) is not None
    assert again.admit(TERM_1 | 4, slot=2) is not None
    assert again.admit(TERM_1 | 6, slot=3) is None
    assert (tmp_path / STAMP_FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_an_older_terms_step_is_refused_in_every_slot(tmp_path: Path) -> None:
    guard = StepGuard.load(tmp_path)
    assert guard.admit(TERM_2 | 1, slot=1) is None
    refusal = guard.admit(TERM_1 | 99, slot=5)
    assert refusal == f"stale step: stamp {TERM_1 | 99} is below {TERM_2 | 1}"
    assert StepGuard.load(tmp_path).admit(TERM_1 | 99, slot=5) is not None
    assert guard.admit(TERM_2 | 2, slot=5) is None


def test_a_file_from_before_slots_is_slot_ones(tmp_path: Path) -> None:
    (tmp_path / STAMP_FILE_NAME).write_text(f"{TERM_1 | 7}\n")
    guard = StepGuard.load(tmp_path)
    assert guard.highest == TERM_1 | 7 and guard.highest_in(1) == TERM_1 | 7
    assert guard.admit(TERM_1 | 6, slot=1) is not None
    assert guard.admit(TERM_1 | 6, slot=2) is None
    assert not guard.writes(TERM_1 | 6, slot=2)
    assert guard.writes(TERM_1 | 8, slot=1)
