"""Helper processes an e2e test starts (flow probes, tcpdump, iperf3): each in a session
of its own, its output read against deadlines, and reaped on every exit path.

Owns the processes started through a `Reaper` and nothing else: it signals no process
it did not start and no process group but the one each of them leads. Every wait is
bounded and its failure says what was waited for. A helper's stdin is a pipe the helper
may treat as its lifeline (flowprobe's --control-stdin): if the test dies, it ends.

`reap` is the one way helpers end: SIGTERM, one shared deadline for all of them, SIGKILL
to the process group of any still running then, every pipe closed. The `reaper` fixture
(tests/e2e/conftest.py) reaps whatever a test left and fails the test when that took a
SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import trio

from tests.e2e.flowprobe import READY, RECEIVING, START

# SIGTERM to exit, for all the helpers reaped together.
REAP_TIMEOUT = 15.0
# SIGKILL to exit: only a process stuck in the kernel takes longer.
KILL_TIMEOUT = 5.0
# Output still in the pipe after the process exited.
DRAIN_TIMEOUT = 1.0
POLL = 0.02
TAIL = 2000  # characters of output quoted in a failure

STDOUT = "stdout"
STDERR = "stderr"


class Helper:
    """One helper process; what it printed so far, by stream."""

    def __init__(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.process = process
        self.reaped = False
        self._read: dict[str, bytearray] = {}
        self._open: dict[int, str] = {}
        for stream, pipe in ((STDOUT, process.stdout), (STDERR, process.stderr)):
            if pipe is not None:
                self._read[stream] = bytearray()
                self._open[pipe.fileno()] = stream

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self, stream: str = STDOUT) -> str:
        return self._read.get(stream, bytearray()).decode(errors="replace")

    def lines(self, stream: str = STDOUT) -> list[str]:
        return [line.strip() for line in self.output(stream).splitlines() if line.strip()]

    def last_line(self) -> str:
        lines = self.lines()
        return lines[-1] if lines else ""

    def last_json(self) -> dict[str, Any]:
        """The JSON object on the last line of stdout (flowprobe's result)."""
        try:
            value = json.loads(self.last_line())
        except json.JSONDecodeError:
            raise AssertionError(f"{self.name} printed no result: {self.describe()}") from None
        assert isinstance(value, dict), self.describe()
        return value

    def describe(self) -> str:
        parts = [f"{self.name} (pid {self.process.pid}, exit {self.process.poll()})"]
        for stream in self._read:
            parts.append(f"{stream}: {self.output(stream)[-TAIL:]!r}")
        return "; ".join(parts)

    def send(self, line: str) -> None:
        """One line on the helper's stdin."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(
                f"{self.name} is gone before it read {line!r}: {self.describe()}") from None

    def wait_for_line(self, prefix: str, timeout: float, what: str,
                      stream: str = STDOUT) -> None:
        """Until the helper printed a line starting with `prefix` on `stream`."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines(stream)):
            if stream not in self._open.values():
                raise AssertionError(f"waiting for {what}: {self.name} closed its {stream} "
                                     f"without saying {prefix!r}: {self.describe()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waiting for {what}: {self.name} did not say "
                                     f"{prefix!r} within {timeout} s: {self.describe()}")
            self._pump(left)

    def wait_exit(self, timeout: float, what: str) -> int:
        """Until the helper exited by itself (nothing signalled); its exit code."""
        if not self.finish(time.monotonic() + timeout):
            raise AssertionError(f"waiting for {what}: {self.name} still running after "
                                 f"{timeout} s: {self.describe()}")
        code = self.process.poll()
        assert code is not None
        return code

    def _pump(self, timeout: float) -> None:
        """Read what the open pipes hold, waiting up to `timeout` for something."""
        if not self._open:
            time.sleep(min(timeout, POLL))
            return
        readable, _, _ = select.select(list(self._open), [], [], max(timeout, 0.0))
        for fd in readable:
            chunk = os.read(fd, 65536)
            if chunk:
                self._read[self._open[fd]] += chunk
            else:
                del self._open[fd]

    def finish(self, deadline: float) -> bool:
        """Drain the pipes until the process exited (True) or `deadline` (False); then
        what its pipes still hold."""
        # Reading while waiting: a helper blocked on a full pipe would never exit.
        while self.running:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, POLL))
        drained = time.monotonic() + DRAIN_TIMEOUT
        while self._open and time.monotonic() < drained:
            self._pump(drained - time.monotonic())
        return True

    def kill_group(self) -> bool:
        """SIGKILL to every live process in the helper's group, and wait until they are
        gone; False if there was none."""
        # The helper leads its group (start_new_session), so its pid is the group id,
        # and no new process gets that pid while the group has members.
        if not group_members(self.process.pid):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(POLL)
        return True

    def close_pipes(self) -> None:
        self.reaped = True
        pipes: list[IO[bytes] | None] = [self.process.stdin, self.process.stdout,
                                         self.process.stderr]
        for pipe in pipes:
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        self._open.clear()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def reap(helpers: Sequence[Helper], timeout: float = REAP_TIMEOUT) -> list[str]:
    """End every helper: SIGTERM and EOF on stdin to those running, one deadline
    `timeout` s away for all of them to exit, then SIGKILL to the process group of each
    still running (and of any whose group outlived it). Every pipe ends closed, and what
    the helpers printed stays readable. Returns what had to be killed."""
    helpers = [h for h in helpers if not h.reaped]
    for helper in helpers:
        if helper.running:
            with contextlib.suppress(ProcessLookupError):
                helper.process.send_signal(signal.SIGTERM)
        if helper.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                helper.process.stdin.close()
    deadline = time.monotonic() + timeout
    killed = []
    for helper in helpers:
        if helper.finish(deadline):
            if helper.kill_group():
                killed.append(f"what {helper.name} left in its process group")
            continue
        helper.kill_group()
        if helper.finish(time.monotonic() + KILL_TIMEOUT):
            killed.append(helper.describe())
        else:
            killed.append(f"{helper.describe()}, and still there {KILL_TIMEOUT} s after "
                          f"SIGKILL")
    for helper in helpers:
        helper.close_pipes()
    return killed


def raise_if_killed(killed: list[str], timeout: float, failing: BaseException | None) -> None:
    """An AssertionError if `reap` had to kill something; only a note on `failing`, the
    exception already on its way out, if there is one (it says more)."""
    if not killed:
        return
    why = f"helpers still running {timeout} s after SIGTERM were killed: {'; '.join(killed)}"
    if failing is None:
        raise AssertionError(why)
    failing.add_note(why)


def stop(helpers: Sequence[Helper], timeout: float = REAP_TIMEOUT,
         failing: BaseException | None = None) -> None:
    """`reap`, failing (or noting on `failing`) when that took a SIGKILL."""
    raise_if_killed(reap(helpers, timeout), timeout, failing)


def wait_all(helpers: Sequence[Helper], prefix: str, timeout: float, what: str) -> None:
    """Until every helper printed a line starting with `prefix`, one deadline for all."""
    deadline = time.monotonic() + timeout
    for helper in helpers:
        helper.wait_for_line(prefix, max(deadline - time.monotonic(), 0.0), what)


@contextmanager
def reaped(*helpers: Helper, within: float = REAP_TIMEOUT) -> Iterator[None]:
    """The helpers are stopped when the with-block ends, whichever way it ends."""
    try:
        yield
    except BaseException as exc:
        stop(helpers, within, failing=exc)
        raise
    stop(helpers, within)


def start_udp_probes(probes: Sequence[Helper], timeout: float, what: str) -> None:
    """flowprobe's udp start under --control-stdin, one deadline for all of it: every
    probe bound, then `start` to each (so no datagram meets a closed port), then
    datagrams arriving at every probe."""
    deadline = time.monotonic() + timeout
    wait_all(probes, READY, timeout, f"{what}: every probe bound")
    for probe in probes:
        probe.send(START)
    wait_all(probes, RECEIVING, max(deadline - time.monotonic(), 0.0),
             f"{what}: datagrams arriving at every probe")


async def stop_from_trio(helpers: Sequence[Helper], within: float = REAP_TIMEOUT,
                         failing: BaseException | None = None) -> None:
    """`stop(helpers, within, failing)` in a worker thread, so the trio tasks of the test
    (a fake controller) keep running; shielded, so a finally block being cancelled still
    reaps."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(stop, helpers, within, failing)


@asynccontextmanager
async def reaped_from_trio(*helpers: Helper, within: float = REAP_TIMEOUT
                           ) -> AsyncIterator[None]:
    """`reaped` for an async with-block."""
    try:
        yield
    except BaseException as exc:
        await stop_from_trio(helpers, within, failing=exc)
        raise
    await stop_from_trio(helpers, within)


class Reaper:
    """Starts helpers and keeps every one, to reap whatever a test left (the fixture)."""

    def __init__(self) -> None:
        self.helpers: list[Helper] = []

    def start(self, name: str, argv: Sequence[str], *, stdout: Any = subprocess.PIPE,
              stderr: Any = None) -> Helper:
        """`argv` in a new session (its own process group), stdin a pipe."""
        process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=stdout,
                                   stderr=stderr, start_new_session=True)
        helper = Helper(name, process)
        self.helpers.append(helper)
        return helper

    def close(self, timeout: float = REAP_TIMEOUT) -> list[str]:
        return reap(self.helpers, timeout)
