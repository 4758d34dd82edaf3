"""The daemon's userspace backend with `--wireguard-go=external` (the DaemonSet's
way): it adopts the node's wireguard-go once its socket answers and never
starts one itself. A fake UAPI server (a trio Unix socket answering `get=1`)
stands in for wireguard-go; the real one is in tests/e2e/test_kubeletnodes.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.wireguard import UserspaceBackend, WireGuardError

FAKE_GET_REPLY = b"listen_port=51820\nerrno=0\n\n"
NEVER_RUN = "/nonexistent/wireguard-go"  # a start would fail with this name


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a Unix socket's path has at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="wgx", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _fake_wireguard_go(path: Path, *, task_status: trio.TaskStatus[None]) -> None:
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        listener.listen(8)
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                request = b""
                while not request.endswith(b"\n\n"):
                    chunk = await conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                if request == b"get=1\n\n":
                    await conn.send(FAKE_GET_REPLY)


async def test_external_adopts_the_socket_that_answers_later(socket_dir: Path) -> None:
    backend = UserspaceBackend(socket_dir=socket_dir, executable=NEVER_RUN, start=False,
                               external_wait=30.0)
    async with trio.open_nursery() as nursery:

        async def late() -> None:
            await trio.sleep(0.3)
            await nursery.start(_fake_wireguard_go, backend.socket_path("wg-mesh"))

        nursery.start_soon(late)
        with trio.fail_after(30.0):
            created = await backend.ensure_interface("wg-mesh")
        nursery.cancel_scope.cancel()
    assert created is False


async def test_external_never_starts_wireguard_go_and_says_what_to_check(
        socket_dir: Path, autojump_clock: trio.testing.MockClock) -> None:
    backend = UserspaceBackend(socket_dir=socket_dir, executable=NEVER_RUN, start=False,
                               external_wait=60.0)
    began = trio.current_time()
    with pytest.raises(WireGuardError) as caught:
        await backend.ensure_interface("wg-mesh")
    assert trio.current_time() - began == pytest.approx(60.0, abs=1.0)
    text = str(caught.value)
    assert str(backend.socket_path("wg-mesh")) in text
    assert "vpblu-wireguard" in text and "--wireguard-go=external" in text


def test_wireguard_go_mode_is_start_or_external() -> None:
    assert DaemonConfig(node_name="n").wireguard_go == "start"
    assert DaemonConfig(node_name="n", wireguard_go="external").wireguard_go == "external"
    with pytest.raises(ValueError, match="wireguard_go"):
        DaemonConfig(node_name="n", wireguard_go="kernel")


def test_wireguard_go_command_idles_with_kernel_wireguard_until_sigterm() -> None:
    """`vpblu daemon wireguard-go` where the kernel has WireGuard: nothing to run,
    it waits for SIGTERM (as a container's PID 1 must) and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "vpblu.cli", "daemon", "wireguard-go",
         "--wireguard-backend", "kernel"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "NODE_NAME": "n1"})
    try:
        deadline = time.monotonic() + 30.0
        said = ""
        assert proc.stderr is not None
        while "idling" not in said:
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"the command idling within 30 s: {said}")
            said += proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
