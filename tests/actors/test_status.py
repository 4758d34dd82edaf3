"""StatusActor against FakeKubeApi: key reports, conditions, coalescing, retries."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.status import MAX_CONDITION_MESSAGE, WORKERS, StatusActor
from vpblu.core.model import Condition
from vpblu.kube.client import TUNNEL_POLICIES, VPBLU_NODES, ApiError
from vpblu.messages import (
    NodeGone,
    NodeRegistered,
    ObjectConditions,
    ObjectDeleted,
    PublicKeyReported,
    StatusInbox,
)

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


async def _reported_edited_reported(nursery: trio.Nursery, kube: FakeKubeApi,
                                    edit: Callable[[dict[str, Any]], None],
                                    second: int) -> StatusActor:
    """n1's key(1) reported and written; someone else then `edit`s the stored
    VpbluNode; then key(`second`) is reported (as a reconnect would)."""
    send, actor = await run_status(nursery, kube)
    await send.send(PublicKeyReported("n1", key(1)))
    await trio.sleep(1)
    obj = await kube.get(VPBLU_NODES, "n1")
    edit(obj)
    await kube.put(VPBLU_NODES, obj)
    await send.send(PublicKeyReported("n1", key(second)))
    await trio.sleep(1)
    return actor


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
        actor = await _reported_edited_reported(nursery, kube, lambda o: edit(o["status"]),
                                                second)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"] == expected
        assert actor.writes == 2
        nursery.cancel_scope.cancel()


def _foreign_entry(*fields: str) -> dict[str, object]:
    return {"manager": "kubectl-patch", "operation": "Update", "subresource": "status",
            "time": "2026-11-27T21:39:10Z",
            "fieldsV1": {"f:status": {f"f:{f}": {} for f in fields}}}


@pytest.mark.parametrize(("owned", "named"), [
    # The key was theirs: putting it back names them.
    (("publicKey",), True),
    # They own a field the controller leaves alone: nobody is named.
    (("endpoint",), False),
])
async def test_a_foreign_writer_is_named_when_a_conflict_restores_before_the_watch_says_so(
    autojump_clock: trio.testing.MockClock, owned: tuple[str, ...], named: bool,
) -> None:
    # No StatusObserved is sent: the next write's Conflict is how the actor
    # learns of the foreign write (the watch event may come later than that).
    def edit(obj: dict[str, Any]) -> None:
        if "publicKey" in owned:
            obj["status"]["publicKey"] = key(9)
        else:
            obj["status"]["endpoint"] = "192.0.2.7:51820"
        obj["metadata"]["managedFields"] = [_foreign_entry(*owned)]

    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        actor = await _reported_edited_reported(nursery, kube, edit, 2)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"]["publicKey"] == key(2)
        events = [e for e in kube._objects["Event"].values()
                  if e.get("reason") == "StatusReverted"]
        assert actor.reverted == len(events) == (1 if named else 0)
        if named:
            assert "kubectl-patch" in events[0]["message"]
            assert "publicKey" in events[0]["message"]
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



async def test_no_vpblu_node_for_a_deleted_node_the_key_said_meanwhile_is_written_once_it_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A daemon still running on a deleted Node says its key in a new Hello: no
    VpbluNode is made for a Node that is not there; registered again, the VpbluNode
    is made with the key said last. A Node replaced (deleted=False) forgets the key."""
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await send.send(PublicKeyReported("n2", key(2)))
        await trio.sleep(1)
        for name in ("n1", "n2"):
            await kube.remove(VPBLU_NODES, name)
        await send.send(NodeGone("n1", deleted=True))
        await send.send(NodeGone("n2"))
        await send.send(ObjectDeleted("VpbluNode", "n1"))
        await send.send(PublicKeyReported("n1", key(3)))  # its daemon's next Hello
        scheduled = Condition("VpbluNode", "n1", "DaemonScheduled", "True", "DaemonPod", "")
        await send.send(ObjectConditions("VpbluNode", "n1", 1, (scheduled,)))
        await send.send(ObjectConditions("VpbluNode", "n2", 1, (scheduled,)))
        await trio.sleep(5)
        assert (await kube.list(VPBLU_NODES)).items == ()
        await send.send(NodeRegistered("n1"))
        await send.send(NodeRegistered("n2"))  # nothing held: still nothing to write
        await trio.sleep(1)
        assert [o["metadata"]["name"] for o in (await kube.list(VPBLU_NODES)).items] == ["n1"]
        assert (await kube.get(VPBLU_NODES, "n1"))["status"]["publicKey"] == key(3)
        assert actor.remembered == 1
        nursery.cancel_scope.cancel()


class SlowReadFakeKube(FakeKubeApi):
    """A fake API server whose reads take `read_delay` seconds."""

    read_delay = 0.0

    async def get(self, kind, name, *, namespace=None):  # type: ignore[no-untyped-def]
        await trio.sleep(self.read_delay)
        return await super().get(kind, name, namespace=namespace)


async def test_a_key_held_for_a_deleted_node_is_written_when_a_write_was_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The Node comes back while a status write for its (deleted) VpbluNode is
    reading the object: that write finds it gone, and the held key that arrived
    meanwhile is still written, making the VpbluNode again (seen once in the
    integration suite: the key was dropped, and the node had no VpbluNode until
    its daemon's next stream)."""
    kube = SlowReadFakeKube()
    async with trio.open_nursery() as nursery:
        send, _ = await run_status(nursery, kube)
        await send.send(PublicKeyReported("n1", key(1)))
        await trio.sleep(1)
        await kube.remove(VPBLU_NODES, "n1")
        await send.send(NodeGone("n1", deleted=True))
        await send.send(ObjectDeleted("VpbluNode", "n1"))
        await send.send(PublicKeyReported("n1", key(3)))  # held: its Node is deleted
        kube.read_delay = 2.0
        scheduled = Condition("VpbluNode", "n1", "DaemonScheduled", "True", "DaemonPod", "")
        await send.send(ObjectConditions("VpbluNode", "n1", 1, (scheduled,)))
        await trio.sleep(1)  # that write is reading the object now
        await send.send(NodeRegistered("n1"))
        await trio.sleep(10)
        assert (await kube.get(VPBLU_NODES, "n1"))["status"]["publicKey"] == key(3)
        nursery.cancel_scope.cancel()


def conditions(name: str, ctype: str, status: str, message: str) -> ObjectConditions:
    return ObjectConditions("TunnelPolicy", name, 1, (
        Condition("TunnelPolicy", name, ctype, status, "Test", message),))


class RefusingFakeKube(FakeKubeApi):
    """A fake API server that refuses (422) every status write for `refuse`."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse
        self.refused: dict[str, int] = {}

    async def patch_status(self, kind, name, status, *, namespace=None,  # type: ignore[no-untyped-def]
                           resource_version=None):
        if name in self.refuse:
            await trio.lowlevel.checkpoint()
            self.refused[name] = self.refused.get(name, 0) + 1
            raise ApiError(422, "Unprocessable Entity", f"{name}: status is invalid")
        return await super().patch_status(kind, name, status, namespace=namespace,
                                          resource_version=resource_version)


async def test_a_refused_write_is_not_retried_and_holds_no_worker(
        autojump_clock: trio.testing.MockClock) -> None:
    bad = {f"bad{i}" for i in range(WORKERS + 2)}  # more than there are workers
    kube = RefusingFakeKube(bad)
    for name in [*sorted(bad), "good"]:
        await kube.put(TUNNEL_POLICIES, {"metadata": {"name": name}, "spec": {}})
    async with trio.open_nursery() as nursery:
        send, actor = await run_status(nursery, kube)
        for name in sorted(bad):
            await send.send(conditions(name, "Accepted", "False", "x" * 10))
        await trio.sleep(0.1)
        await send.send(conditions("good", "Accepted", "True", "ok"))
        await trio.sleep(600)  # ten minutes of virtual time: retries would show
        assert kube.refused == dict.fromkeys(bad, 1)
        assert actor.refused == len(bad)
        assert (await kube.get(TUNNEL_POLICIES, "good"))["status"]["conditions"][0][
            "message"] == "ok"
        # Once what it should say changes, it is tried again (and, accepted, written).
        kube.refuse.discard("bad0")
        await send.send(conditions("bad0", "Accepted", "True", "fixed"))
        await trio.sleep(1)
        assert (await kube.get(TUNNEL_POLICIES, "bad0"))["status"]["conditions"][0][
            "message"] == "fixed"
        nursery.cancel_scope.cancel()


async def test_condition_messages_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(TUNNEL_POLICIES, {"metadata": {"name": "p"}, "spec": {}})
    async with trio.open_nursery() as nursery:
        send, _actor = await run_status(nursery, kube)
        await send.send(conditions("p", "Accepted", "False", "y" * 100_000))
        await trio.sleep(1)
        message = (await kube.get(TUNNEL_POLICIES, "p"))["status"]["conditions"][0]["message"]
        assert len(message) == MAX_CONDITION_MESSAGE
        assert message.endswith(f"({100_000 - MAX_CONDITION_MESSAGE} more characters)")
        nursery.cancel_scope.cancel()
