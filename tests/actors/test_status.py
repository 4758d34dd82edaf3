"""StatusActor against FakeKubeApi: key reports, conditions, coalescing, retries."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.status import StatusActor
from vpblu.core.model import Condition
from vpblu.kube.client import TUNNEL_POLICIES, VPBLU_NODES
from vpblu.messages import ObjectConditions, ObjectDeleted, PublicKeyReported, StatusInbox

KINDS = {k.kind: k for k in (VPBLU_NODES, TUNNEL_POLICIES)}


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


async def run_status(nursery: trio.Nursery, kube: FakeKubeApi) -> tuple[
        trio.MemorySendChannel[StatusInbox], StatusActor]:
    send, receive = trio.open_memory_channel[StatusInbox](100)
    actor = StatusActor(kube, receive, KINDS)
    await nursery.start(actor.run)
    return send, actor


async def test_public_key_creates_the_vpblu_node(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        obj = await kube.get(VPBLU_NODES, "n1")
        assert obj["status"]["publicKey"] == key(1)
        # The same report again writes nothing.
        writes = actor.writes
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        assert actor.writes == writes
        nursery.cancel_scope.cancel()


async def test_a_burst_is_coalesced(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(VPBLU_NODES, {"metadata": {"name": "n1"}, "spec": {}})
    await kube.go_down()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        for i in range(50):
            await send.send(PublicKeyReported("n1", key(i)))
        await trio.sleep(5)
        kube.come_back()
        await trio.sleep(60)
        obj = await kube.get(VPBLU_NODES, "n1")
        assert obj["status"]["publicKey"] == key(49)
        assert actor.writes == 1
        nursery.cancel_scope.cancel()


async def test_conditions_keep_transition_time_while_status_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    await kube.put(TUNNEL_POLICIES, {"metadata": {"name": "mesh"}, "spec": {"mode": "FullMesh"}})
    ok = Condition("TunnelPolicy", "mesh", "Accepted", "True", "Accepted", "in effect")
    bad = Condition("TunnelPolicy", "mesh", "Accepted", "False", "MissingNode", "node x missing")
    bad2 = Condition("TunnelPolicy", "mesh", "Accepted", "False", "MissingNode", "node y missing")
    async with trio.open_nursery() as nursery:
        send, _ = await run_status(nursery, kube)
        await send.send(ObjectConditions("TunnelPolicy", "mesh", 1, (ok,)))
        await trio.sleep(1)
        [first] = (await kube.get(TUNNEL_POLICIES, "mesh"))["status"]["conditions"]
        assert first["status"] == "True"
        assert first["observedGeneration"] == 1
        await send.send(ObjectConditions("TunnelPolicy", "mesh", 2, (bad, bad2)))
        await trio.sleep(1)
        [second] = (await kube.get(TUNNEL_POLICIES, "mesh"))["status"]["conditions"]
        assert second["status"] == "False"
        assert "node x missing" in second["message"] and "node y missing" in second["message"]
        assert second["observedGeneration"] == 2
        nursery.cancel_scope.cancel()


async def test_deleted_object_is_dropped_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        cond = Condition("TunnelPolicy", "gone", "Accepted", "True", "Accepted", "")
        await send.send(ObjectConditions("TunnelPolicy", "gone", 1, (cond,)))
        await trio.sleep(120)
        assert kube.calls.count(("get", "TunnelPolicy")) == 1
        assert actor.writes == 0
        nursery.cancel_scope.cancel()


async def test_later_writes_patch_onto_the_version_written_without_reading_it_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    await kube.put(TUNNEL_POLICIES, {"metadata": {"name": "mesh"}, "spec": {"mode": "FullMesh"}})
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        for generation, status in enumerate(("True", "False", "True"), start=1):
            cond = Condition("TunnelPolicy", "mesh", "Accepted", status, "Accepted", status)
            await send.send(ObjectConditions("TunnelPolicy", "mesh", generation, (cond,)))
            await trio.sleep(1)
        [shown] = (await kube.get(TUNNEL_POLICIES, "mesh"))["status"]["conditions"]
        assert (shown["status"], shown["observedGeneration"]) == ("True", 3)
        assert actor.writes == 3
        assert kube.calls.count(("get", "TunnelPolicy")) - 1 == 1  # one read, plus ours above
        nursery.cancel_scope.cancel()


def _add_their_field(status: dict[str, object]) -> None:
    status["endpoint"] = "192.0.2.7:51820"


def _wipe_the_key(status: dict[str, object]) -> None:
    del status["publicKey"]


@pytest.mark.parametrize(("edit", "second", "expected"), [
    # Written onto their version (after a Conflict and a read), theirs kept.
    (_add_their_field, 2, {"publicKey": key(2), "endpoint": "192.0.2.7:51820"}),
    # What this actor wrote last says "already there"; a read says otherwise.
    (_wipe_the_key, 1, {"publicKey": key(1)}),
])
async def test_a_status_edited_by_someone_else_in_between_is_read_again(
    autojump_clock: trio.testing.MockClock, edit: Callable[[dict[str, object]], None],
    second: int, expected: dict[str, object],
) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        obj = await kube.get(VPBLU_NODES, "n1")
        edit(obj["status"])
        await kube.put(VPBLU_NODES, obj)
        await send.send(PublicKeyReported("n1", key(second)))  # e.g. a reconnect's report
        await trio.sleep(1)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"] == expected
        assert actor.writes == 2
        nursery.cancel_scope.cancel()


async def test_deleted_objects_are_forgotten_but_a_reported_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    for i in range(20):
        await kube.put(TUNNEL_POLICIES, {"metadata": {"name": f"t{i}"}, "spec": {}})
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        accepted = Condition("TunnelPolicy", "", "Accepted", "True", "Accepted", "")
        for i in range(20):
            await send.send(ObjectConditions("TunnelPolicy", f"t{i}", 1, (accepted,)))
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        assert actor.remembered == 21
        for i in range(20):
            await kube.remove(TUNNEL_POLICIES, f"t{i}")
            await send.send(ObjectDeleted("TunnelPolicy", f"t{i}"))
        await kube.remove(VPBLU_NODES, "n1")
        await send.send(ObjectDeleted("VpbluNode", "n1"))
        await trio.sleep(1)
        assert actor.remembered == 1
        # n1's daemon is still connected: the next write for n1 makes its
        # VpbluNode again, with the key it reported.
        scheduled = Condition("VpbluNode", "n1", "DaemonScheduled", "True", "DaemonPod", "")
        await send.send(ObjectConditions("VpbluNode", "n1", 1, (scheduled,)))
        await trio.sleep(1)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"]["publicKey"] == key(1)
        nursery.cancel_scope.cancel()
