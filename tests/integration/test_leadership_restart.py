"""A replica whose leader work crashed leads again: the LeadershipActor restarts
with `leading` False, and the Lease keeper, which reports only changes, must
restart with it and report afresh - or the replica holds the Lease, renews it
forever and leads nothing, and no other replica can take over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from tests.integration.meshlab import (
    controller_settings,
    mesh_pki,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.actors.leadership import LeadershipActor
from vpblu.lab.testenv import TestEnv


async def test_a_replica_whose_leader_work_crashed_leads_again(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = vpblu_installed
    lease = unique("lease")
    settings = controller_settings(env, mesh_pki(tmp_path), lease, identity="ctrl-crash")
    original = LeadershipActor._lead
    crashed: list[int] = []

    async def lead_crashing_once(self: LeadershipActor, term: int, **kwargs: Any) -> None:
        if not crashed:  # injected fault: the first leader work fails as it starts
            crashed.append(term)
            raise RuntimeError("injected: the leader work failed to start")
        await original(self, term, **kwargs)

    monkeypatch.setattr(LeadershipActor, "_lead", lead_crashing_once)
    async with running_controller(settings) as view:
        await wait_api(env, f"/apis/coordination.k8s.io/v1/namespaces/vpblu-system/"
                            f"leases/{lease}",
                       lambda b: b["spec"].get("holderIdentity") == "ctrl-crash")
        await wait_leading(view)  # bounded: "wait_leading" fails after CONVERGE_TIMEOUT
        assert crashed, "the injected crash never ran"
        assert view.term > crashed[0], (view.term, crashed)
        # And it stays the leader (no restart loop).
        await trio.sleep(1.0)
        assert view.leading
