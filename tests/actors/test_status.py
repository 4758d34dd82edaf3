"""StatusActor against FakeKubeApi: key reports, conditions, coalescing, retries."""

from __future__ import annotations

import base64

import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.status import StatusActor
from vpblu.kube import TUNNEL_POLICIES, VPBLU_NODES
from vpblu.messages import ObjectConditions, PublicKeyReported, StatusInbox
from vpblu.model import Condition

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


async def test_a_write_by_someone_else_in_between_is_read_not_overwritten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        # Someone else writes the object: its status now has a field of theirs
        # and a transition time this actor has not seen.
        obj = await kube.get(VPBLU_NODES, "n1")
        obj["status"]["endpoint"] = "192.0.2.7:51820"
        await kube.put(VPBLU_NODES, obj)
        await send.send(PublicKeyReported("n1", key(2)))
        await trio.sleep(1)
        status = (await kube.get(VPBLU_NODES, "n1"))["status"]
        assert status == {"publicKey": key(2), "endpoint": "192.0.2.7:51820"}
        assert actor.writes == 2
        nursery.cancel_scope.cancel()


async def test_what_it_wrote_last_never_skips_a_write_unread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        obj = await kube.get(VPBLU_NODES, "n1")
        del obj["status"]["publicKey"]  # someone wiped it
        await kube.put(VPBLU_NODES, obj)
        await send.send(PublicKeyReported("n1", key(1)))  # a reconnect reports it again
        await trio.sleep(1)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"]["publicKey"] == key(1)
        assert actor.writes == 2
        nursery.cancel_scope.cancel()
