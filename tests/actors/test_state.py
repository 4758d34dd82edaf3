"""StateActor: the view, the pushes, and the rules that keep a mesh safe.

The watchers and sessions are plain channels the test drives; the pure core
is the real one.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from vpblu.actors.state import (
    MAX_OWED_STEPS,
    RESYNC_BACKOFF_INITIAL,
    RESYNC_BACKOFF_MAX,
    WATCHED_KINDS,
    StateActor,
)
from vpblu.core import model, wire
from vpblu.core.sources import NodeSource, ObjectMeta, PolicySource, Typed, VpbluNodeSource
from vpblu.messages import (
    InvalidSource,
    KindChanged,
    KindListed,
    NodeAcked,
    ObjectConditions,
    ObjectDeleted,
    PeersWanted,
    PushDelta,
    PushRotationSteps,
    PushSync,
    SendRotationStep,
    SessionClosed,
    SessionInbox,
    SessionOpened,
    StateInbox,
    StatusInbox,
)


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def meta(name: str, generation: int = 1) -> ObjectMeta:
    return ObjectMeta(name, generation, "1", f"uid-{name}")


def node(i: int) -> NodeSource:
    return NodeSource(meta(f"n{i}"), ipaddress.ip_address(f"192.0.2.{i}"),
                      (model.network(f"10.244.{i}.0/24"),))


def vnode(i: int) -> VpbluNodeSource:
    return VpbluNodeSource(meta(f"n{i}"), None, key(i))


def mesh(generation: int = 1) -> PolicySource:
    # A cluster range covering every node's pod CIDR, as operators are told to
    # set: a node joining then changes no one's data path, only their peers.
    return PolicySource(meta("mesh", generation), model.TunnelPolicy(
        "mesh", generation, cluster_cidrs=(model.network("10.244.0.0/16"),)))


class Harness:
    def __init__(self, term: int = 3) -> None:
        self.send, receive = trio.open_memory_channel[StateInbox](1000)
        status_send, self.status = trio.open_memory_channel[StatusInbox](1000)
        self.actor = StateActor(receive, status_send, term=term)
        self.sid = 0

    async def list_all(self, nodes: range, *, policy: bool = True) -> None:
        objects: dict[str, tuple[Typed, ...]] = {
            "Node": tuple(node(i) for i in nodes),
            "VpbluNode": tuple(vnode(i) for i in nodes),
            "TunnelPolicy": (mesh(),) if policy else (),
        }
        for kind in WATCHED_KINDS:
            await self.send.send(KindListed(kind, objects.get(kind, ()), (), "1"))

    async def connect(self, i: int, size: int = 16) -> trio.MemoryReceiveChannel[SessionInbox]:
        self.sid += 1
        mailbox_send, mailbox = trio.open_memory_channel[SessionInbox](size)
        await self.send.send(SessionOpened(f"n{i}", self.sid, mailbox_send))
        return mailbox


@pytest.fixture(name="h")
async def running_state_actor() -> AsyncIterator[Harness]:
    """A StateActor running for the test (term 3), cancelled after it."""
    h = Harness()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        yield h
        nursery.cancel_scope.cancel()


def peers(state: model.NodeDesiredState) -> list[str]:
    return [p.name for p in state.peers]


async def test_full_sync_then_deltas(autojump_clock: trio.testing.MockClock, h: Harness) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    sync = await box.receive()
    assert isinstance(sync, PushSync)
    assert peers(sync.state) == ["n2", "n3"]
    assert sync.generation >> 32 == 3  # stamped with the leader's term
    await h.send.send(KindChanged("Node", (node(4),), (), (), "2"))
    await h.send.send(KindChanged("VpbluNode", (vnode(4),), (), (), "3"))
    delta = await box.receive()
    assert isinstance(delta, PushDelta)
    assert delta.base_generation == sync.generation
    assert delta.generation > sync.generation
    assert [type(c).__name__ for c in delta.changes] == ["PeerAdded", "RouteAdded"]
    assert peers(delta.state) == ["n2", "n3", "n4"]
    await h.send.send(KindChanged("Node", (), ("n2",), (), "4"))
    delta2 = await box.receive()
    assert isinstance(delta2, PushDelta)
    assert peers(delta2.state) == ["n3", "n4"]


async def test_nothing_is_pushed_before_every_kind_is_listed(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    box = await h.connect(1)
    # A new leader whose watchers have listed all but one kind must not
    # tell the daemon anything (it would be "no peers": a torn-down mesh).
    await h.send.send(KindListed("Node", (node(1), node(2)), (), "1"))
    await h.send.send(KindListed("VpbluNode", (vnode(1), vnode(2)), (), "1"))
    await h.send.send(KindListed("RoutePolicy", (), (), "1"))
    await h.send.send(KindListed("BlockPolicy", (), (), "1"))
    await h.send.send(KindListed("RotationPolicy", (), (), "1"))
    await h.send.send(KindListed("Pod", (), (), "1"))
    await h.send.send(KindListed("ConfigMap", (), (), "1"))
    with trio.move_on_after(60):
        msg = await box.receive()
        raise AssertionError(f"pushed {msg} before TunnelPolicy was listed")
    await h.send.send(KindListed("TunnelPolicy", (mesh(),), (), "1"))
    sync = await box.receive()
    assert isinstance(sync, PushSync)
    assert peers(sync.state) == ["n2"]


async def test_invalid_update_keeps_the_last_valid_version(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 3))
    box = await h.connect(1)
    await box.receive()
    bad = InvalidSource("TunnelPolicy", "mesh", 2, "spec.mode: 'Fullmesh' is not valid")
    await h.send.send(KindChanged("TunnelPolicy", (), (), (bad,), "5"))
    with trio.move_on_after(30):
        msg = await box.receive()
        raise AssertionError(f"an invalid edit changed the mesh: {msg}")
    # The operator learns why, on the object itself.
    while True:
        cond = await h.status.receive()
        if isinstance(cond, ObjectConditions) and cond.name == "mesh" and cond.generation == 2:
            break
    [accepted] = cond.conditions
    assert accepted.status == "False"
    assert accepted.reason == "InvalidSpec"
    assert "spec.mode" in accepted.message and "stays in effect" in accepted.message


async def test_slow_session_gets_one_sync_instead_of_a_backlog(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 3))
    slow = await h.connect(1, size=2)
    fast = await h.connect(2, size=100)
    await trio.sleep(1)  # both have their PushSync queued
    for i in range(10, 20):  # ten joins; the slow daemon reads nothing
        await h.send.send(KindChanged("Node", (node(i),), (), (), str(i)))
        await h.send.send(KindChanged("VpbluNode", (vnode(i),), (), (), str(i)))
        await trio.sleep(1)
    assert h.actor.statistics().overflows == 1
    # The fast one got everything, undisturbed.
    received = [fast.receive_nowait() for _ in range(11)]
    assert isinstance(received[0], PushSync)
    assert all(isinstance(m, PushDelta) for m in received[1:])
    # The slow one: what fitted, then (once it reads) one full sync of the latest state.
    first = [slow.receive_nowait(), slow.receive_nowait()]
    await trio.sleep(1)
    final = slow.receive_nowait()
    assert isinstance(final, PushSync)
    assert peers(final.state) == sorted(["n2", *[f"n{i}" for i in range(10, 20)]])
    assert final.generation > first[-1].generation


async def test_reconnecting_twice_keeps_only_the_newest_session(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 3))
    await h.connect(1)  # session 1
    second = await h.connect(1)  # session 2: the same daemon, reconnected
    assert isinstance(await second.receive(), PushSync)
    # The old session's close arrives late: it must not drop the new one.
    await h.send.send(SessionClosed("n1", 1))
    await h.send.send(NodeAcked("n1", 1, 999))  # a stale ack from the old stream
    await h.send.send(KindChanged("Node", (node(5),), (), (), "9"))
    await h.send.send(KindChanged("VpbluNode", (vnode(5),), (), (), "9"))
    delta = await second.receive()
    assert isinstance(delta, PushDelta)
    assert h.actor.acked() == {"n1": 0}


async def test_no_tunnel_policy_means_no_peers_and_says_so(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 3), policy=False)
    box = await h.connect(1)
    sync = await box.receive()
    assert isinstance(sync, PushSync)
    assert sync.state.peers == ()
    reasons = set()
    while len(reasons) < 1:
        msg = await h.status.receive()
        if isinstance(msg, ObjectConditions) and msg.kind == "VpbluNode":
            reasons |= {c.reason for c in msg.conditions if c.type == "Accepted"}
    assert reasons == {"NoTunnelPolicy"}


async def test_whole_state_baseline_sends_whole_states(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What vpblu.lab.wholestate does in its process (the bench's --compare baseline).
    from vpblu.actors import state

    monkeypatch.setattr(state, "whole_state_cheaper", lambda changes, size: True)
    send, receive = trio.open_memory_channel[StateInbox](1000)
    status_send, _status = trio.open_memory_channel[StatusInbox](1000)
    h = Harness()
    h.send, h.actor = send, StateActor(receive, status_send, term=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_all(range(1, 3))
        box = await h.connect(1)
        await box.receive()
        await h.send.send(KindChanged("Node", (node(4),), (), (), "2"))
        await h.send.send(KindChanged("VpbluNode", (vnode(4),), (), (), "3"))
        push = await box.receive()
        assert isinstance(push, PushSync)
        assert peers(push.state) == ["n2", "n4"]
        nursery.cancel_scope.cancel()


async def test_each_node_says_whether_a_daemon_pod_is_bound_to_it(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    from vpblu.core.sources import DaemonPodSource

    await h.list_all(range(1, 3))
    pod = DaemonPodSource(meta("vpblu-daemon-abc"), "n1", "Running")
    await h.send.send(KindChanged("Pod", (pod,), (), (), "9"))
    seen: dict[str, tuple[str, str]] = {}
    while len(seen) < 2 or seen.get("n1", ("", ""))[0] != "True":
        msg = await h.status.receive()
        if isinstance(msg, ObjectConditions) and msg.kind == "VpbluNode":
            for c in msg.conditions:
                if c.type == "DaemonScheduled":
                    seen[msg.name] = (c.status, c.message)
    assert seen["n1"] == ("True", "pod vpblu-daemon-abc is Running")
    assert seen["n2"][0] == "False"


async def test_a_status_write_coming_back_does_not_recompute(
        autojump_clock: trio.testing.MockClock, h: Harness) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    await box.receive()
    await trio.sleep(1)
    before = h.actor.statistics().recomputes
    # Our own status write, echoed by the watch: a new resourceVersion only.
    echo = VpbluNodeSource(ObjectMeta("n2", 1, "9", "uid-n2"), None, key(2))
    await h.send.send(KindChanged("VpbluNode", (echo,), (), (), "9"))
    await trio.sleep(1)
    assert h.actor.statistics().recomputes == before
    # The ownership actor's ownerReferences: read by no desired state.
    owned = VpbluNodeSource(ObjectMeta("n2", 1, "9a", "uid-n2", owners=(("Node", "uid-node-n2"),)),
                            None, key(2))
    await h.send.send(KindChanged("VpbluNode", (owned,), (), (), "9a"))
    await trio.sleep(1)
    assert h.actor.statistics().recomputes == before
    # A new key is a change: recomputed and pushed.
    rekeyed = VpbluNodeSource(ObjectMeta("n2", 1, "10", "uid-n2"), None, key(42))
    await h.send.send(KindChanged("VpbluNode", (rekeyed,), (), (), "10"))
    delta = await box.receive()
    assert isinstance(delta, PushDelta)
    assert [type(c).__name__ for c in delta.changes] == ["PeerChanged"]
    assert h.actor.statistics().recomputes == before + 1


async def test_a_forming_mesh_is_pushed_as_whole_states(
        autojump_clock: trio.testing.MockClock, h: Harness) -> None:
    await h.list_all(range(1, 4), policy=False)
    box = await h.connect(1)
    first = await box.receive()
    assert isinstance(first, PushSync) and not first.state.peers
    # Every change is an addition: the state is sent, not 4 changes.
    await h.send.send(KindChanged("TunnelPolicy", (mesh(),), (), (), "2"))
    formed = await box.receive()
    assert isinstance(formed, PushSync)
    assert peers(formed.state) == ["n2", "n3"]
    await h.send.send(KindChanged("TunnelPolicy", (), ("mesh",), (), "3"))
    gone = await box.receive()
    assert isinstance(gone, PushSync) and not gone.state.peers


async def test_who_peers_with_a_node_is_answered_on_request(
        autojump_clock: trio.testing.MockClock, h: Harness) -> None:
    await h.list_all(range(1, 4))
    await trio.sleep(1)
    reply, answer = trio.open_memory_channel[tuple[str, ...]](1)
    await h.send.send(PeersWanted("n2", reply))
    assert await answer.receive() == ("n1", "n3")
    await h.send.send(PeersWanted("nobody", reply))
    assert await answer.receive() == ()


async def test_the_status_writer_is_told_of_deleted_objects(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    await h.send.send(KindChanged("VpbluNode", (), ("n2",), (), "2"))
    await h.send.send(KindChanged("Node", (), ("n2",), (), "3"))  # no status of ours
    # A relist after a broken watch: the policy vanished while unwatched.
    await h.send.send(KindListed("TunnelPolicy", (), (), "4"))
    await trio.sleep(1)
    deleted = set()
    while True:
        try:
            msg = h.status.receive_nowait()
        except trio.WouldBlock:
            break
        if isinstance(msg, ObjectDeleted):
            deleted.add((msg.kind, msg.name))
    assert deleted == {("VpbluNode", "n2"), ("TunnelPolicy", "mesh")}


# --- a node that cannot apply what it is sent -------------------------------------


async def refused_resync(box: trio.MemoryReceiveChannel[SessionInbox], h: Harness,
                         sid: int, error: str = "netlink: File exists") -> tuple[float, PushSync]:
    """Refuse what the session was last given; the PushSync that answers it, and when."""
    await h.send.send(NodeAcked("n1", sid, h.actor.generation, error))
    sync = await box.receive()
    assert isinstance(sync, PushSync)
    return trio.current_time(), sync


async def test_an_error_ack_resyncs_at_once_then_backs_off_doubling_to_a_minute(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    first = await box.receive()
    assert isinstance(first, PushSync)
    started = trio.current_time()
    times = []
    for _ in range(10):
        at, sync = await refused_resync(box, h, h.sid)
        assert sync.state == first.state
        times.append(at)
    gaps = [round(b - a, 3) for a, b in zip([started, *times], times, strict=False)]
    # At once (a refused delta asks for exactly this), then 1, 2, 4 ... capped.
    assert gaps == [0, RESYNC_BACKOFF_INITIAL, 2, 4, 8, 16, 32, RESYNC_BACKOFF_MAX,
                    RESYNC_BACKOFF_MAX, RESYNC_BACKOFF_MAX]
    stats = h.actor.statistics()
    assert (stats.resyncs_after_error, stats.failing) == (10, 1)
    # A good ack ends it: the next error is answered at once again.
    await h.send.send(NodeAcked("n1", h.sid, h.actor.generation))
    await trio.sleep(0.1)
    assert h.actor.statistics().failing == 0
    before = trio.current_time()
    at, _ = await refused_resync(box, h, h.sid)
    assert at == before


async def test_no_deltas_while_backing_off_and_a_change_goes_within_a_second(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    await box.receive()
    for _ in range(6):  # the next resync would wait 16 s
        last, _ = await refused_resync(box, h, h.sid)
    await h.send.send(NodeAcked("n1", h.sid, h.actor.generation, "still broken"))
    await trio.sleep(0.5)
    # A join while it backs off: no delta on a state it does not have, but the
    # new state (maybe the fix) as a whole, a second after the last resync.
    await h.send.send(KindChanged("Node", (node(7),), (), (), "7"))
    await h.send.send(KindChanged("VpbluNode", (vnode(7),), (), (), "7"))
    push = await box.receive()
    assert isinstance(push, PushSync)
    assert peers(push.state) == ["n2", "n3", "n7"]
    assert trio.current_time() == last + RESYNC_BACKOFF_INITIAL


async def test_error_acks_for_pushes_sent_before_a_good_resync_do_not_keep_it_failing(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    sync = await box.receive()
    assert isinstance(sync, PushSync)
    # Two joins go out as deltas; the daemon failed the first one, so it
    # refuses both (the second's base is not what it applied)...
    await h.send.send(KindChanged("Node", (node(5),), (), (), "5"))
    await h.send.send(KindChanged("VpbluNode", (vnode(5),), (), (), "5"))
    one = await box.receive()
    await h.send.send(KindChanged("Node", (node(6),), (), (), "6"))
    await h.send.send(KindChanged("VpbluNode", (vnode(6),), (), (), "6"))
    two = await box.receive()
    assert isinstance(one, PushDelta) and isinstance(two, PushDelta)
    await h.send.send(NodeAcked("n1", h.sid, one.generation, "apply failed"))
    resync = await box.receive()
    assert isinstance(resync, PushSync) and resync.generation == two.generation
    await h.send.send(NodeAcked("n1", h.sid, two.generation, "delta base is not applied"))
    # ... and then applies the resync: that ends it, stale error or not.
    await h.send.send(NodeAcked("n1", h.sid, resync.generation))
    await trio.sleep(RESYNC_BACKOFF_MAX)
    assert h.actor.statistics().failing == 0
    with trio.move_on_after(RESYNC_BACKOFF_MAX):
        extra = await box.receive()
        raise AssertionError(f"pushed {extra} to a node that applied the resync")


async def test_a_reconnect_keeps_the_backoff_of_a_failing_node(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1)
    await box.receive()
    for _ in range(4):
        last, _ = await refused_resync(box, h, h.sid)
    await h.send.send(SessionClosed("n1", h.sid))
    again = await h.connect(1)
    await again.receive()  # a new stream starts with a PushSync, always
    opened = trio.current_time()
    await h.send.send(NodeAcked("n1", h.sid, h.actor.generation, "still broken"))
    await again.receive()
    assert trio.current_time() == max(opened, last + 8)


async def test_routes_over_the_service_range_the_controller_was_given_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    status_send, h.status = trio.open_memory_channel[StatusInbox](1000)
    receive: trio.MemoryReceiveChannel[StateInbox]
    h.send, receive = trio.open_memory_channel[StateInbox](1000)
    h.actor = StateActor(receive, status_send, term=3,
                         service_cidrs=[ipaddress.ip_network("10.96.0.0/12")])
    route = PolicySource(meta("svc"), model.RoutePolicy("svc", 1, (
        model.RouteOverride("10.96.0.0/16", "n2"), model.RouteOverride("10.244.1.0/26", "n2"))))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_all(range(1, 4))
        await h.send.send(KindChanged("RoutePolicy", (route,), (), (), "2"))
        box = await h.connect(3)
        while True:
            msg = await h.status.receive()
            if isinstance(msg, ObjectConditions) and msg.name == "svc":
                break
        [accepted] = [c for c in msg.conditions if c.type == "Accepted"]
        assert (accepted.status, accepted.reason) == ("False", "CoversServiceCIDR")
        # Recomputes are paced, so the session may first get a state from before
        # the policy; the one that has the valid override must not have the other.
        with trio.fail_after(10):
            while True:
                sync = await box.receive()
                assert isinstance(sync, PushSync)
                via_n2 = {str(r.cidr) for r in sync.state.routes if r.via == "n2"}
                assert "10.96.0.0/16" not in via_n2, via_n2
                if "10.244.1.0/26" in via_n2:
                    break
        assert via_n2 == {"10.244.1.0/26", "10.244.2.0/24"}
        nursery.cancel_scope.cancel()


def step(rotation: str, stamp: int, rotating: int = 2) -> wire.RotationStep:
    return wire.RotationStep(rotation, wire.RotationStepKind.SWITCH_PEER, f"n{rotating}",
                             key(rotating), key(100 + rotating), stamp=stamp)


async def test_rotation_steps_wait_out_a_full_mailbox_and_go_without_another_message(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1, size=1)
    await trio.sleep(1)  # the PushSync fills the one slot
    for message in (step("r2", 1), step("r3", 1, rotating=3), step("r2", 2)):
        await h.send.send(SendRotationStep(("n1",), message))
    await trio.sleep(1)
    assert isinstance(await box.receive(), PushSync)
    with trio.fail_after(1):  # no message to the actor: its own timer hands them over
        pushed = await box.receive()
    # One message with every step held; the latest stamp of r2 supersedes the one before.
    assert isinstance(pushed, PushRotationSteps)
    assert [(s.rotation_id, s.stamp) for s in pushed.steps] == [("r3", 1), ("r2", 2)]
    stats = h.actor.statistics()
    assert (stats.rotation_steps_deferred, stats.rotation_steps_dropped) == (3, 0)
    with trio.move_on_after(5):
        raise AssertionError(f"pushed {await box.receive()} once more")


async def test_rotation_steps_held_for_a_session_are_bounded(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    await h.list_all(range(1, 4))
    box = await h.connect(1, size=1)
    await trio.sleep(1)
    for r in range(MAX_OWED_STEPS + 3):
        await h.send.send(SendRotationStep(("n1",), step(f"r{r}", 1)))
    await trio.sleep(0.01)
    stats = h.actor.statistics()
    assert (stats.rotation_steps_deferred, stats.rotation_steps_dropped) == (MAX_OWED_STEPS, 3)
    assert isinstance(await box.receive(), PushSync)
    held = await box.receive()
    assert isinstance(held, PushRotationSteps)
    assert [s.rotation_id for s in held.steps] == [f"r{r}" for r in range(MAX_OWED_STEPS)]


async def test_a_rotation_record_alone_updates_the_views_without_a_recompute(
        autojump_clock: trio.testing.MockClock) -> None:
    from vpblu.core.sources import RotationPhase, RotationRecord
    from vpblu.messages import RotationsInbox, RotationViews

    send, receive = trio.open_memory_channel[StateInbox](1000)
    status_send, status = trio.open_memory_channel[StatusInbox](1000)
    views_send, views = trio.open_memory_channel[RotationsInbox](1000)
    actor = StateActor(receive, status_send, term=3, rotations=views_send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, status)
        await nursery.start(actor.run)
        for kind in WATCHED_KINDS:
            objects = {"Node": (node(1), node(2)), "VpbluNode": (vnode(1), vnode(2)),
                       "TunnelPolicy": (mesh(),)}.get(kind, ())
            await send.send(KindListed(kind, objects, (), "1"))
        first = await views.receive()
        assert isinstance(first, RotationViews)
        before = actor.statistics().recomputes
        # The record a RotationActor writes before its Distribute: the key
        # published to n1's peers is still the old one.
        record = RotationRecord("r1", RotationPhase.DISTRIBUTE, wire.RotationStepKind.DISTRIBUTE,
                                key(2), key(42), ("n1",), "now", 7)
        recorded = VpbluNodeSource(ObjectMeta("n2", 1, "5", "uid-n2"), None, key(2), record)
        await send.send(KindChanged("VpbluNode", (recorded,), (), (), "5"))
        with trio.fail_after(5):
            update = await views.receive()
        assert isinstance(update, RotationViews)
        assert {v.node: v.record for v in update.nodes}["n2"] == record
        assert actor.statistics().recomputes == before
        # At Retire the record publishes the new key: that is a recompute.
        retired = VpbluNodeSource(ObjectMeta("n2", 1, "6", "uid-n2"), None, key(2),
                                  attrs.evolve(record, phase=RotationPhase.RETIRE,
                                               step=wire.RotationStepKind.SWITCH_PEER))
        await send.send(KindChanged("VpbluNode", (retired,), (), (), "6"))
        with trio.fail_after(5):
            await views.receive()
        assert actor.statistics().recomputes == before + 1
        nursery.cancel_scope.cancel()


async def _drain(channel: trio.MemoryReceiveChannel[StatusInbox]) -> None:
    async for _ in channel:
        pass


async def test_a_batch_s_steps_for_one_node_are_gathered_into_one_message(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    from vpblu.actors.state import STEP_GATHER

    await h.list_all(range(1, 5))
    box = await h.connect(1)
    assert isinstance(await box.receive(), PushSync)
    # Two members of a batch, their records written moments apart.
    await h.send.send(SendRotationStep(("n1",), step("r2", 1), gather=True))
    await trio.sleep(STEP_GATHER / 3)
    await h.send.send(SendRotationStep(("n1",), step("r3", 2, rotating=3), gather=True))
    with trio.fail_after(STEP_GATHER):
        pushed = await box.receive()
    assert isinstance(pushed, PushRotationSteps)
    assert [s.rotation_id for s in pushed.steps] == ["r2", "r3"]
    # A lone rotation's step is not held.
    started = trio.current_time()
    await h.send.send(SendRotationStep(("n1",), step("r4", 3, rotating=4)))
    alone = await box.receive()
    assert isinstance(alone, PushRotationSteps) and len(alone.steps) == 1
    assert trio.current_time() - started < STEP_GATHER / 2


async def test_the_new_keys_of_a_batch_reaching_retire_go_to_a_peer_in_one_push(
    autojump_clock: trio.testing.MockClock, h: Harness,
) -> None:
    from vpblu.actors.state import KEY_GATHER
    from vpblu.core.sources import RotationPhase, RotationRecord
    from vpblu.messages import RotationRecorded

    await h.list_all(range(1, 5))
    box = await h.connect(1)
    for i in (2, 3):  # connected with the key they had: the record decides what is published
        h.sid += 1
        mailbox_send, _ = trio.open_memory_channel[SessionInbox](16)
        await h.send.send(SessionOpened(f"n{i}", h.sid, mailbox_send, key(i)))
    assert isinstance(await box.receive(), PushSync)
    await trio.sleep(1)

    def retiring(i: int) -> RotationRecord:
        return RotationRecord(f"r{i}", RotationPhase.RETIRE, wire.RotationStepKind.SWAP_PEER,
                              key(i), key(40 + i), ("n1",), "now", 7, slot=i - 1)

    await h.send.send(RotationRecorded("n2", retiring(2)))
    await trio.sleep(KEY_GATHER / 2)
    await h.send.send(RotationRecorded("n3", retiring(3)))
    with trio.fail_after(KEY_GATHER * 2):
        delta = await box.receive()
    assert isinstance(delta, PushDelta)
    changed = {c.peer.name: c.peer.public_key for c in delta.changes
               if type(c).__name__ == "PeerChanged"}
    assert changed == {"n2": key(42), "n3": key(43)}
