"""Fixtures every test tier shares: the real API server and the asyncio bridge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio_asyncio

from vpblu.lab.testenv import TestEnv, install_base


@pytest.fixture(scope="session")
def kube() -> Iterator[TestEnv]:
    """One etcd + kube-apiserver for the whole session (integration and e2e).

    Synchronous on purpose: pytest-trio async fixtures cannot be
    session-scoped. Tests that need a pristine server start their own
    `TestEnv`; tests sharing this one use names of their own.
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
