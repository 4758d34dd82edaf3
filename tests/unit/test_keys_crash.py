"""Fault injection for the key store: a real process writing a key is SIGKILLed
at each step (every file-system call it makes, in turn), then a fresh start must
find one whole key - the same one at every later start - mode 0600 in a 0700
directory, with no temporary left behind.

The child counts the os calls `vpblu.node.keys` makes once its imports are done
and kills itself with SIGKILL just before call number N, so the break points
are the real sequence, not a list kept by hand that could drift from the code.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vpblu.node.kernel.wireguard import public_key_of
from vpblu.node.keys import KEY_FILE_NAME, KeyStore

CHILD_TIMEOUT = 60.0

_CHILD = r"""
import base64, fcntl, json, os, signal, sys
from pathlib import Path
from vpblu.node import keys
from vpblu.node.kernel.wireguard import public_key_of

state, action, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
steps = []

def report(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()

def breaking(name, real):
    def call(*args, **kwargs):
        if name == "write" and len(args) == 2 and len(args[1]) == 45:
            # Only the public half leaves the child (it may end up in a failure message).
            report(written=public_key_of(base64.b64decode(args[1].strip())))
        steps.append(name)
        if len(steps) - 1 == kill_at:
            report(killed_before=name, step=kill_at)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

if action == "stage":
    keys.KeyStore.load_or_create(state).close()
for name in ("open", "write", "fsync", "close", "link", "rename", "unlink", "chmod",
             "mkdir", "lstat"):
    setattr(os, name, breaking(name, getattr(os, name)))
fcntl.flock = breaking("flock", fcntl.flock)
store = keys.KeyStore.load_or_create(state)
if action == "stage":
    store.stage("r1")
report(done=True, steps=steps)
"""


def _run_child(state: Path, action: str, kill_at: int) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(state), action, str(kill_at)],
        capture_output=True, timeout=CHILD_TIMEOUT, check=False, text=True,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if any("done" in e for e in events):
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    return events


def _start_and_check(state: Path) -> str:
    store = KeyStore.load_or_create(state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        key_file = state / KEY_FILE_NAME
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        leftovers = [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], leftovers
        for p in state.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
        return store.public_key
    finally:
        store.close()


def _steps(tmp_path: Path, action: str, precreated: bool) -> list[str]:
    dry = tmp_path / "dry"
    if precreated:
        dry.mkdir(mode=0o755)
        os.chmod(dry, 0o755)
    events = _run_child(dry, action, -1)
    steps = next(e for e in events if "done" in e)["steps"]
    assert isinstance(steps, list) and "link" in steps, steps
    return [str(s) for s in steps]


@pytest.mark.parametrize("precreated", [False, True], ids=["fresh", "precreated-0755"])
def test_sigkill_at_each_step_of_the_first_key_then_a_start_finds_one_key(
    tmp_path: Path, precreated: bool
) -> None:
    steps = _steps(tmp_path, "create", precreated)
    link_step = steps.index("link")
    for kill_at in range(len(steps)):
        state = tmp_path / f"k{kill_at}"
        if precreated:
            state.mkdir(mode=0o755)
            os.chmod(state, 0o755)  # what kubelet's DirectoryOrCreate leaves
        events = _run_child(state, "create", kill_at)
        assert events[-1].get("killed_before") == steps[kill_at], (kill_at, events)
        first = _start_and_check(state)
        assert _start_and_check(state) == first, f"killed before {steps[kill_at]} #{kill_at}"
        written = [str(e["written"]) for e in events if "written" in e]
        if kill_at > link_step:
            # The key file was linked before the kill: that key, not a new one.
            assert first == written[0]


def test_sigkill_at_each_step_of_staging_a_rotation_key_keeps_the_active_key(
    tmp_path: Path,
) -> None:
    steps = _steps(tmp_path, "stage", precreated=False)
    for kill_at in range(len(steps)):
        state = tmp_path / f"s{kill_at}"
        state.mkdir(mode=0o700)
        events = _run_child(state, "stage", kill_at)
        assert "killed_before" in events[-1], (kill_at, events)
        # The child made the key before its os calls were counted.
        active = (state / KEY_FILE_NAME).read_text().strip()
        store = KeyStore.load_or_create(state)
        try:
            assert store.public_key == public_key_of(base64.b64decode(active))
            # Either no rotation, or K' staged whole, for the rotation it was made for.
            if store.rotating:
                assert store.rotation_id == "r1"
                assert store.staged_public_key is not None
            assert store.stage("r1") == store.staged_public_key
        finally:
            store.close()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []
