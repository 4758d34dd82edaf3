"""The userspace backend of a daemon whose node runs the mesh interface's
wireguard-go (`--wireguard-go=external`) still starts the key rotation's bridge
itself: nothing else would, and the rotation waited for it forever (found on the
kubelet nodes, tests/e2e/test_kubelet_acceptance.py). A stand-in executable
records that it was run; the real wireguard-go is in that e2e test."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpblu.node.kernel.wireguard import UserspaceBackend, WireGuardError

SHORT_WAIT = 0.3


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: a Unix socket's path has at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="wgb", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _recording_executable(workdir: Path) -> tuple[Path, Path]:
    """A stand-in for wireguard-go that writes its argument to a file and fails."""
    ran = workdir / "ran"
    script = workdir / "fake-wireguard-go"
    script.write_text(f'#!/bin/sh\necho "$1" >> {ran}\nexit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, ran


async def test_external_mode_starts_the_bridge_it_is_told_to_and_only_adopts_the_rest(
        workdir: Path) -> None:
    script, ran = _recording_executable(workdir)
    backend = UserspaceBackend(socket_dir=workdir, executable=str(script), start=False,
                               start_also=("wg-mesh-rot",), external_wait=SHORT_WAIT)
    with pytest.raises(WireGuardError, match="exited with 3"):
        await backend.ensure_interface("wg-mesh-rot")
    assert ran.read_text().split() == ["wg-mesh-rot"]
    # The mesh interface is the node's: waited for, never started.
    with pytest.raises(WireGuardError, match="never starts one itself"):
        await backend.ensure_interface("wg-mesh")
    assert ran.read_text().split() == ["wg-mesh-rot"]
