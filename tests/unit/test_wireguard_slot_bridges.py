"""A daemon whose node runs the mesh interface's wireguard-go
(`--wireguard-go=external`) starts every rotation slot's bridge itself
(`wg-mesh-rot`, `wg-mesh-rot2` .. `wg-mesh-rot16`: rotations at once each have
their own, issue 24), and never the mesh interface. A stand-in executable records
what it was asked to run."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpblu.node.config import DaemonConfig
from vpblu.node.daemon import wireguard_backend
from vpblu.node.kernel.wireguard import UserspaceBackend, WireGuardError
from vpblu.node.rotation import MAX_SLOTS, bridge_names


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wgs", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_external_mode_starts_every_slots_bridge(workdir: Path) -> None:
    config = DaemonConfig(node_name="n", wireguard_backend="userspace",
                          wireguard_go="external")
    chosen = await wireguard_backend(config)
    assert isinstance(chosen, UserspaceBackend)
    names = bridge_names(config.interface)
    assert len(names) == MAX_SLOTS and names[:2] == ("wg-mesh-rot", "wg-mesh-rot2")
    ran = workdir / "ran"
    script = workdir / "fake-wireguard-go"
    script.write_text(f'#!/bin/sh\necho "$1" >> {ran}\nexit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    # Its choice, with the stand-in for wireguard-go and a private socket dir.
    assert chosen.start_also == frozenset(names)
    backend = UserspaceBackend(socket_dir=workdir, executable=str(script), start=False,
                               start_also=chosen.start_also, external_wait=0.3)
    for name in (names[1], names[-1]):
        with pytest.raises(WireGuardError, match="exited with 3"):
            await backend.ensure_interface(name)
    assert ran.read_text().split() == [names[1], names[-1]]
