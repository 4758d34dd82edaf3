"""The daemon's stale-step guard survives a restart (issue 24).

The real StreamActor over real loopback gRPC and TLS against a scripted Mesh
server, with the StepGuard the daemon uses on a real state directory: a step is
accepted at stamp S, the daemon is stopped in the middle of the rotation and a
new one started on the same state directory; the new one refuses a step stamped
below S (what a deposed leader still sends) without running it, and accepts the
next step. The control shows the same restart with a guard in memory only runs
the stale step: what the file fixes.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import attrs
import trio
import trio_asyncio

from tests.integration.test_stream import PROMPTLY, mesh_server
from vpblu.core import wire
from vpblu.lab.sim import MeshPki, RecordingApplier
from vpblu.messages import RotationStepDone
from vpblu.node.keys import KeyStore
from vpblu.node.stepguard import STAMP_FILE_NAME, STAMP_MEMORY_SECONDS, StepGuard
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.stream.transport import NodeStream

KEY = base64.b64encode(bytes(range(32))).decode()
NEW_KEY = base64.b64encode(bytes(range(2, 34))).decode()
TERM_1 = 1 << 32
TERM_2 = 2 << 32


@attrs.define
class RecordingRotator:
    """A fake Rotator: records which steps ran, and they all succeed."""

    ran: list[tuple[wire.RotationStepKind, int]] = attrs.Factory(list)

    async def rotate(self, step: wire.RotationStep) -> RotationStepDone:
        self.ran.append((step.step, step.stamp))
        return RotationStepDone(None, NEW_KEY if step.step is wire.RotationStepKind.PREPARE
                                else "")


def step(kind: wire.RotationStepKind, stamp: int) -> wire.RotationStep:
    return wire.RotationStep("r1", kind, "b", KEY, NEW_KEY, stamp)


async def answer_to(stream: NodeStream, sent: wire.RotationStep) -> wire.RotationResult:
    await stream.send_batch([sent])
    with trio.fail_after(PROMPTLY):
        while True:
            for message in await stream.receive_batch():
                if isinstance(message, wire.RotationResult) and message.stamp == sent.stamp:
                    return message


async def run_daemon_once(tmp_path: Path, pki: MeshPki, address: str,
                          streams: trio.MemoryReceiveChannel[NodeStream],
                          guard: StepGuard, rotator: RecordingRotator,
                          steps: list[wire.RotationStep]) -> list[wire.RotationResult]:
    """Start a daemon's StreamActor, offer it `steps` in order, stop it (the restart)."""
    token = tmp_path / "token"
    token.write_text("token-a")
    settings = StreamSettings(addresses=(address,), tls=pki.client, token_file=token)
    actor = StreamActor("a", lambda: KEY, RecordingApplier("a"), settings, rotator=rotator,
                        step_guard=guard)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        with trio.fail_after(PROMPTLY):
            stream = await streams.receive()
        answers = [await answer_to(stream, s) for s in steps]
        nursery.cancel_scope.cancel()
    return answers


async def test_a_restarted_daemon_refuses_a_step_below_what_it_accepted_before(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    state_dir = tmp_path / "state"
    KeyStore.load_or_create(state_dir)  # the daemon's state directory, as it starts
    rotator = RecordingRotator()
    async with mesh_server(pki) as (address, streams):
        # The first daemon: Distribute at the new leader's stamp, then it stops.
        first = await run_daemon_once(
            tmp_path, pki, address, streams, StepGuard.load(state_dir), rotator,
            [step(wire.RotationStepKind.DISTRIBUTE, TERM_2 | 7)])
        assert [a.error for a in first] == [None]
        stamp_file = state_dir / STAMP_FILE_NAME
        assert stat.S_IMODE(stamp_file.stat().st_mode) == 0o600
        assert stamp_file.read_text() == f"{TERM_2 | 7}\n"
        # The restarted daemon: a deposed leader's step (term 1) and an old copy of a
        # step it had passed are refused and not run; the current one is re-run
        # (idempotent, same stamp) and the next one runs.
        second = await run_daemon_once(
            tmp_path, pki, address, streams, StepGuard.load(state_dir), rotator,
            [step(wire.RotationStepKind.RETIRE_PEER, TERM_1 | 99),
             step(wire.RotationStepKind.ROLL_BACK_PEER, TERM_2 | 6),
             step(wire.RotationStepKind.DISTRIBUTE, TERM_2 | 7),
             step(wire.RotationStepKind.SWITCH_PEER, TERM_2 | 8)])
    errors = [a.error for a in second]
    assert errors[0] == f"stale step: stamp {TERM_1 | 99} is below {TERM_2 | 7}", errors
    assert errors[1] == f"stale step: stamp {TERM_2 | 6} is below {TERM_2 | 7}", errors
    assert errors[2:] == [None, None], errors
    assert rotator.ran == [(wire.RotationStepKind.DISTRIBUTE, TERM_2 | 7),
                           (wire.RotationStepKind.DISTRIBUTE, TERM_2 | 7),
                           (wire.RotationStepKind.SWITCH_PEER, TERM_2 | 8)]
    assert (state_dir / STAMP_FILE_NAME).read_text() == f"{TERM_2 | 8}\n"


async def test_control_a_guard_in_memory_only_forgets_on_restart(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    """What the daemon did before the file: the restarted daemon runs the stale step."""
    pki = MeshPki.create(tmp_path / "pki")
    rotator = RecordingRotator()
    async with mesh_server(pki) as (address, streams):
        await run_daemon_once(tmp_path, pki, address, streams, StepGuard(), rotator,
                              [step(wire.RotationStepKind.DISTRIBUTE, TERM_2 | 7)])
        second = await run_daemon_once(
            tmp_path, pki, address, streams, StepGuard(), rotator,
            [step(wire.RotationStepKind.RETIRE_PEER, TERM_1 | 99)])
    assert second[0].error is None
    assert rotator.ran[-1] == (wire.RotationStepKind.RETIRE_PEER, TERM_1 | 99)


def test_a_damaged_stamp_file_is_reported_and_replaced(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / STAMP_FILE_NAME).write_text("not a stamp\n")
    (tmp_path / f".{STAMP_FILE_NAME}.0123456789abcdef.tmp").write_text("12")
    guard = StepGuard.load(tmp_path)
    assert guard.highest == 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert guard.admit(5) is None
    assert StepGuard.load(tmp_path).highest == 5
    assert guard.admit(4) == "stale step: stamp 4 is below 5"


def test_a_stamp_older_than_the_memory_is_forgotten(tmp_path: Path) -> None:
    """A deposed leader's steps come within seconds; a stamp kept for ever would make a
    reinstalled controller (its Lease new, the term 0 again) refused by every node."""
    tmp_path.chmod(0o700)
    guard = StepGuard.load(tmp_path)
    assert guard.admit(TERM_2 | 7) is None
    written = (tmp_path / STAMP_FILE_NAME).stat().st_mtime
    soon = StepGuard.load(tmp_path, now=written + STAMP_MEMORY_SECONDS - 1)
    assert soon.highest == TERM_2 | 7
    later = StepGuard.load(tmp_path, now=written + STAMP_MEMORY_SECONDS + 1)
    assert later.highest == 0
    assert later.admit(TERM_1 | 1) is None  # a new Lease's first leader
