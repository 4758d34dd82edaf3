"""Fixtures every test tier shares: the real API server and the asyncio bridge."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio_asyncio

from vpblu.lab import controlleraudit
from vpblu.lab.testenv import AUDIT_DIR_ENV, DIR_PREFIX, OWNER_FILE, TestEnv, install_base

AUDIT_SUMMARY = pytest.StashKey[str]()
AUDIT_DIR = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Every TestEnv of this session (the shared one, each LocalCluster's and
    KubeletCluster's, the benchmark's in its own process) audits every write and
    leaves its log here when it closes (vpblu.lab.testenv.AUDIT_DIR_ENV)."""
    if os.environ.get(AUDIT_DIR_ENV):
        return  # a session inside another one's (tests of this hook): that one's
    directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}audit-"))
    (directory / OWNER_FILE).write_text(str(os.getpid()))  # swept if we are SIGKILLed
    os.environ[AUDIT_DIR_ENV] = str(directory)
    config.stash[AUDIT_DIR] = directory


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if any API server of the session saw the controller write
    what it does not own (README "Hardening")."""
    directory = os.environ.get(AUDIT_DIR_ENV)
    if not directory:
        return
    logs = sorted(Path(directory).glob("*.audit.log"))
    try:
        if not logs:
            return  # no API server in this session (unit and actor tests)
        summary = check_controller_audit(logs)
    except AuditViolation as exc:
        session.config.stash[AUDIT_SUMMARY] = str(exc)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        session.config.stash[AUDIT_SUMMARY] = summary
    finally:
        ours = session.config.stash.get(AUDIT_DIR, None)
        if ours is not None:
            shutil.rmtree(ours, ignore_errors=True)
            os.environ.pop(AUDIT_DIR_ENV, None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    summary = terminalreporter.config.stash.get(AUDIT_SUMMARY, None)
    if summary is not None:
        terminalreporter.write_line(summary, red="FAILED" in summary)


class AuditViolation(Exception):
    """The controller wrote what it does not own."""


def check_controller_audit(logs: Sequence[Path]) -> str:
    """A one-line summary of the controller's writes in these audit logs, or
    AuditViolation naming each one outside what kustomize/base's RBAC gives it."""
    started = time.monotonic()
    events = [e for log in logs for e in controlleraudit.read_audit_log(log)]
    wrong = controlleraudit.violations(events, controlleraudit.kustomize_rules())
    if wrong:
        shown = "\n  ".join(str(v) for v in wrong[:50])
        raise AuditViolation(
            f"FAILED kube-apiserver audit: the controller wrote {len(wrong)} time(s) what "
            f"it does not own:\n  {shown}")
    return (f"kube-apiserver audit: {controlleraudit.controller_writes(events)} controller "
            f"writes of {len(events)} audited on {len(logs)} API server(s), all its own "
            f"(checked in {time.monotonic() - started:.2f} s)")


@pytest.fixture(scope="session")
def kube() -> Iterator[TestEnv]:
    """One etcd + kube-apiserver for the whole session (integration and e2e).

    Synchronous on purpose: pytest-trio async fixtures cannot be
    session-scoped. Tests that need a pristine server start their own
    `TestEnv`; tests sharing this one use names of their own.

    Like every TestEnv of the session it audits every write; when the session
    ends, every write the controller made must be one it owns, or the run
    fails (`pytest_sessionfinish`).
    """
    with TestEnv.start() as env:
        yield env


@pytest.fixture(scope="session")
def vpblu_installed(kube: TestEnv) -> TestEnv:
    """The session API server with `kustomize/base` applied and its five CRDs
    Established and served (no controller-manager: the Deployment and DaemonSet
    exist but run nothing)."""
    install_base(kube)
    return kube


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """A trio-asyncio loop for one test: request it by name (not with
    `usefixtures`, which pytest-trio ignores for async fixtures, #124).

    Shielded: if the test is cancelled while the loop is starting or closing,
    an unshielded `open_loop` can deadlock waiting for its asyncio loop to stop
    (pytest-trio #71, trio-asyncio #115). The test body itself is not shielded.
    Under the autojump clock the asyncio loop's time jumps too: keep tests with
    real sockets off it.
    """
    with trio.CancelScope(shield=True):
        async with trio_asyncio.open_loop() as loop:
            yield loop
