"""Fixtures every test tier shares: the real API server and the asyncio bridge."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio_asyncio

from vpblu.lab import controlleraudit
from vpblu.lab.testenv import TestEnv, install_base

AUDIT_SUMMARY = pytest.StashKey[str]()


class AuditedTestEnv(TestEnv):
    """The session's API server: it audits every write (vpblu.lab.controlleraudit)."""

    __test__ = False
    audit_writes = True


def check_controller_audit(log: Path) -> str:
    """Fail (the session, from the `kube` fixture's teardown) if the audit log shows a
    controller write outside what kustomize/base's RBAC gives the controller; else
    a one-line summary."""
    started = time.monotonic()
    rules = controlleraudit.kustomize_rules()
    events = list(controlleraudit.read_audit_log(log)) if log.exists() else []
    wrong = controlleraudit.violations(events, rules)
    if wrong:
        shown = "\n  ".join(str(v) for v in wrong[:50])
        pytest.fail(f"kube-apiserver's audit: the controller wrote {len(wrong)} time(s) "
                    f"what it does not own:\n  {shown}", pytrace=False)
    return (f"kube-apiserver audit: {controlleraudit.controller_writes(events)} controller "
            f"writes of {len(events)} audited, all its own "
            f"(checked in {time.monotonic() - started:.2f} s)")


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[TestEnv]:
    """One etcd + kube-apiserver for the whole session (integration and e2e).

    Synchronous on purpose: pytest-trio async fixtures cannot be
    session-scoped. Tests that need a pristine server start their own
    `TestEnv`; tests sharing this one use names of their own.

    It keeps an audit log of every write; when the session ends, every write
    the controller made in it must be one it owns, or the run fails
    (`check_controller_audit`, README "Hardening").
    """
    with AuditedTestEnv.start() as env:
        yield env
        request.config.stash[AUDIT_SUMMARY] = check_controller_audit(env.audit_log_path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    summary = terminalreporter.config.stash.get(AUDIT_SUMMARY, None)
    if summary is not None:
        terminalreporter.write_line(summary)


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
