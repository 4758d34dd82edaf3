"""The daemon's guard against stale key-rotation steps, kept across restarts.

Owns ``<state_dir>/rotation.stamp`` (mode 0600, in the 0700 state directory the
KeyStore keeps): the highest rotation-step stamp this node has accepted, as one
decimal line. A stamp is the leader's term in the high 32 bits and the leader's
step sequence in the low ones (vpblu/actors/rotation.py), so a step stamped
below it comes from a deposed leader (or is an old copy of a step the node has
already passed) and is refused, not run.

Why on disk: the guard in memory alone forgot everything when the daemon
restarted, and a restarted daemon then ran whatever stale step reached it first
(a deposed leader's Retire after the new leader had rolled back, say). The new
highest stamp is on disk (fsynced, atomically renamed) *before* `admit` lets the
step through, so no step is ever run that a restart could forget.

How long: a stamp on disk is honoured by a restarted daemon for
`STAMP_MEMORY_SECONDS` after it was written, then forgotten. A stale step comes
from a leader that lost its Lease moments ago (its in-flight and re-sent steps),
never hours later; and the term comes from the Lease's leaseTransitions, which
start again at 0 when the Lease is deleted (the controller reinstalled): a stamp
kept forever would make every node refuse every step of every later leader, the
rollbacks too, which retry for ever. While the daemon runs it keeps the highest
stamp in memory, as it always did.

Must never: lower the stamp, or refuse a step stamped exactly at the highest
(steps are re-sent with the same stamp and are idempotent). A file that cannot
be read as a stamp is reported and replaced on the next accepted step: the
guard then knows what it would have known without the file (nothing), which is
what the daemon did before the file existed; refusing to start over it would
take the node's mesh down for a safety net.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)

STAMP_FILE_NAME = "rotation.stamp"
STAMP_FILE_MODE = 0o600
_TMP_SUFFIX = ".tmp"
_MAX_STAMP = (1 << 64) - 1
# Far longer than a deposed leader keeps sending (a Lease lasts seconds, a step is
# re-sent for STEP_TIMEOUT = 60 s) and than a daemon takes to restart.
STAMP_MEMORY_SECONDS = 3600.0


class StepGuard:
    """The highest accepted rotation-step stamp, overall and per rotation slot;
    persisted when `path` is given.

    Rotations that run at once (each in its own slot, vpblu/node/rotation.py) are
    stamped from the leader's one sequence, so their steps reach a node interleaved:
    a step stamped below one of another slot is not stale. A step is refused when
    its term (the high 32 bits) is below the highest term seen (a deposed leader),
    or when it is below the highest stamp seen in its own slot (an old copy of a
    step this slot has passed). With one slot this is exactly "below the highest".
    The file holds the highest stamp on its first line (what daemons before slots
    wrote and read) and, unless slot 1 is all there is, ``slot=stamp`` pairs on the
    second.
    """

    def __init__(self, path: Path | None = None, highest: int = 0,
                 slots: dict[int, int] | None = None) -> None:
        self._path = path
        self._highest = highest
        # A file from before slots knew one slot only: its stamp was slot 1's.
        self._slots = dict(slots) if slots is not None else ({1: highest} if highest else {})

    @classmethod
    def load(cls, state_dir: Path, *, now: float | None = None) -> StepGuard:
        """The guard of `state_dir` (which must exist), with what its file says if it
        was written less than `STAMP_MEMORY_SECONDS` before `now` (the wall clock)."""
        path = state_dir / STAMP_FILE_NAME
        for stale in state_dir.glob(f".{STAMP_FILE_NAME}.*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)  # a write a killed daemon left half-done
        try:
            written = path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            log.error("%s: cannot read the rotation step guard (%s); starting from 0", path, exc)
            return cls(path)
        age = (time.time() if now is None else now) - written
        if age > STAMP_MEMORY_SECONDS:
            log.info("%s: the last rotation step was %.0f s ago; its stamp is forgotten", path,
                     age)
            return cls(path)
        try:
            lines = text.splitlines()
            highest = _stamp(lines[0] if lines else "")
            slots: dict[int, int] | None = None
            if len(lines) > 1 and lines[1].strip():
                slots = {}
                for pair in lines[1].split():
                    slot, _, stamp = pair.partition("=")
                    slots[int(slot)] = min(_stamp(stamp), highest)
        except ValueError as exc:
            log.error("%s: not a rotation step stamp (%s); starting from 0", path, exc)
            return cls(path)
        return cls(path, highest, slots)

    @property
    def highest(self) -> int:
        return self._highest

    @property
    def path(self) -> Path | None:
        return self._path

    def highest_in(self, slot: int) -> int:
        return self._slots.get(slot, 0)

    def writes(self, stamp: int, slot: int = 1) -> bool:
        """Whether admitting `stamp` writes the file (else `admit` does no I/O)."""
        return self._path is not None and stamp > self._slots.get(slot, 0) and \
            _term(stamp) >= _term(self._highest)

    def admit(self, stamp: int, slot: int = 1) -> str | None:
        """None if a step stamped `stamp` in `slot` may run (the stamp is then that
        slot's highest, on disk first); else why it is refused. Blocking I/O: call it
        in a thread."""
        if _term(stamp) < _term(self._highest):
            return f"stale step: stamp {stamp} is below {self._highest}"
        in_slot = self._slots.get(slot, 0)
        if stamp < in_slot:
            return f"stale step: stamp {stamp} is below {in_slot}"
        if stamp > in_slot:
            highest = max(self._highest, stamp)
            # Slots of an older term are forgotten: the term check refuses them all.
            slots = {k: v for k, v in self._slots.items() if _term(v) == _term(highest)}
            slots[slot] = stamp
            if self._path is not None:
                # One slot at its highest: the one line daemons before slots wrote.
                pairs = ("" if slots == {1: highest} else
                         " ".join(f"{k}={v}" for k, v in sorted(slots.items())) + "\n")
                _write_atomically(self._path, f"{highest}\n{pairs}".encode())
            self._highest = highest
            self._slots = slots
        return None


def _term(stamp: int) -> int:
    return stamp >> 32


def _stamp(text: str) -> int:
    value = int(text.strip())
    if not 0 <= value <= _MAX_STAMP:
        raise ValueError(f"{value} is not a 64-bit stamp")
    return value


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STAMP_FILE_MODE)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
