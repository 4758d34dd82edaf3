"""Rotations in batches (issue 24, maxConcurrent): several RotationActors sharing one
RotationToken, on fake ports and fake daemons (virtual time). What is checked is what
makes overlapping rotations safe on the nodes (vpblu/actors/rotation.py RotationToken):
no two rotations in flight share a slot, every member's Distribute is done before any
member activates, every Activate before any Swap, every Swap before any Switch; a
failure in one slot rolls that node back with its own slot's steps while the others
complete; a batch never holds more than the smallest maxConcurrent of its members."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import attrs
import trio
import trio.testing

from vpblu.actors.rotation import RotationActor, RotationSettings, RotationToken
from vpblu.core import wire
from vpblu.core.sources import LastRotation, RotationRecord
from vpblu.messages import NodeRotationView, RotationInbox, RotationResultReceived

Step = wire.RotationStepKind
NODES = ("a", "b", "c", "d", "e")


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


@attrs.frozen
class Sent:
    at: float
    rotating: str
    step: Step
    target: str
    slot: int
    stamp: int


@attrs.define
class FakeCluster:
    """Fake daemons of a FullMesh: every node peers with every other. Records every
    step sent; answers ok unless `faults[(rotating, step)]` says what to answer."""

    inboxes: dict[str, trio.MemorySendChannel[RotationInbox]] = attrs.Factory(dict)
    sent: list[Sent] = attrs.Factory(list)
    lasts: dict[str, LastRotation] = attrs.Factory(dict)
    faults: dict[tuple[str, Step], str] = attrs.Factory(dict)
    # Slots held by rotations in flight (first step sent .. final status written).
    holding: dict[str, int] = attrs.Factory(dict)
    slot_clash: list[str] = attrs.Factory(list)
    peers: tuple[str, ...] = NODES

    def ports(self, node: str) -> FakeNodePorts:
        return FakeNodePorts(self, node)


@attrs.define
class FakeNodePorts:
    cluster: FakeCluster
    node: str

    async def persist(self, node: str, record: RotationRecord | None, *,
                      public_key: str | None = None, last: LastRotation | None = None) -> None:
        await trio.sleep(0.01)
        holding = self.cluster.holding
        if record is None:
            holding.pop(node, None)
        else:
            other = [n for n, s in holding.items() if s == record.slot and n != node]
            if other:
                self.cluster.slot_clash.append(f"{node} and {other} in slot {record.slot}")
            holding[node] = record.slot
        if last is not None:
            self.cluster.lasts[node] = last

    async def send_step(self, nodes: Sequence[str], step: wire.RotationStep, *,
                        gather: bool = False) -> None:
        for node in nodes:
            await self.send_one(node, step)

    async def send_one(self, node: str, step: wire.RotationStep) -> None:
        cluster = self.cluster
        cluster.sent.append(Sent(trio.current_time(), step.rotating_node, step.step, node,
                                 step.slot, step.stamp))
        error = cluster.faults.get((step.rotating_node, step.step))
        new = key(10 + NODES.index(step.rotating_node)) if step.step is Step.PREPARE else ""
        # The daemon takes a moment, and answers on the rotating node's actor's inbox.
        await trio.sleep(0.05)
        await cluster.inboxes[step.rotating_node].send(RotationResultReceived(
            node, wire.RotationResult(step.rotation_id, step.step, step.rotating_node,
                                      step.stamp, error, new)))

    async def peers_of(self, node: str) -> tuple[str, ...]:
        return tuple(p for p in self.cluster.peers if p != node)

    def wall_clock(self) -> float:
        return 1_700_000_000.0 + trio.current_time()


def view(node: str, max_concurrent: int) -> NodeRotationView:
    return NodeRotationView(node, key(1 + NODES.index(node)), None, None, "go", None,
                            max_concurrent=max_concurrent)


async def rotate_together(cluster: FakeCluster, rotating: tuple[str, ...],
                          max_concurrent: dict[str, int] | int,
                          token: RotationToken) -> None:
    limits = (max_concurrent if isinstance(max_concurrent, dict)
              else dict.fromkeys(rotating, max_concurrent))
    async with trio.open_nursery() as nursery:
        for node in rotating:
            send, receive = trio.open_memory_channel[RotationInbox](64)
            cluster.inboxes[node] = send
            actor = RotationActor(node, cluster.ports(node), token, receive,
                                  RotationSettings(term=2))
            await nursery.start(actor.run)
        for node in rotating:
            await cluster.inboxes[node].send(view(node, limits[node]))
        with trio.fail_after(3600):
            while len(cluster.lasts) < len(rotating):  # noqa: ASYNC110 (a fake's record)
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


def first(cluster: FakeCluster, step: Step, rotating: set[str] | None = None) -> float:
    return min(s.at for s in cluster.sent
               if s.step is step and (rotating is None or s.rotating in rotating))


def last(cluster: FakeCluster, step: Step, rotating: set[str] | None = None) -> float:
    return max(s.at for s in cluster.sent
               if s.step is step and (rotating is None or s.rotating in rotating))


async def test_a_batch_rotates_together_in_phase_order_each_in_its_own_slot(
        autojump_clock: trio.testing.MockClock) -> None:
    cluster = FakeCluster()
    token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
    await rotate_together(cluster, ("a", "b", "c"), 3, token)
    assert {n: last.outcome for n, last in cluster.lasts.items()} == dict.fromkeys(
        "abc", "Completed")
    assert token.batches == 1 and token.largest_batch == 3
    assert not cluster.slot_clash
    slots = {s.rotating: s.slot for s in cluster.sent}
    assert sorted(slots.values()) == [1, 2, 3]
    # Every step of one rotation carries its slot, whoever it goes to.
    assert all(s.slot == slots[s.rotating] for s in cluster.sent)
    # The barriers: all Distributes before any Activate, all Activates before any
    # Swap, all Swaps before any Switch.
    assert last(cluster, Step.DISTRIBUTE) < first(cluster, Step.ACTIVATE)
    assert last(cluster, Step.ACTIVATE) < first(cluster, Step.SWAP_PEER)
    assert last(cluster, Step.SWAP_PEER) < first(cluster, Step.SWITCH_PEER)
    # Swap goes to the rotating node's peers that rotate in the batch, only.
    swaps = {(s.rotating, s.target) for s in cluster.sent if s.step is Step.SWAP_PEER}
    assert swaps == {(r, p) for r in "abc" for p in "abc" if p != r}
    # The three overlapped: whole-batch time is far below three rotations in a row.
    spans = {r: (min(s.at for s in cluster.sent if s.rotating == r),
                 max(s.at for s in cluster.sent if s.rotating == r)) for r in "abc"}
    assert max(start for start, _ in spans.values()) < min(end for _, end in spans.values())
    # Stamps rise across the batch (one sequence), and in each slot.
    for r in "abc":
        stamps = [s.stamp for s in cluster.sent if s.rotating == r]
        assert stamps == sorted(stamps)


async def test_a_failure_in_one_slot_rolls_that_node_back_and_the_others_complete(
        autojump_clock: trio.testing.MockClock) -> None:
    cluster = FakeCluster(faults={("b", Step.ACTIVATE): "RotationError: boom"})
    token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
    await rotate_together(cluster, ("a", "b", "c"), 3, token)
    assert cluster.lasts["b"].outcome == "RolledBack" and "boom" in cluster.lasts["b"].message
    assert cluster.lasts["a"].outcome == "Completed"
    assert cluster.lasts["c"].outcome == "Completed"
    assert not cluster.slot_clash
    slot_b = next(s.slot for s in cluster.sent if s.rotating == "b")
    rollback = [s for s in cluster.sent if s.step in (
        Step.ROLL_BACK_ROTATING, Step.ROLL_BACK_PEER, Step.ABANDON_ROTATING)]
    # Only b's rotation rolls back, on b's slot; nobody else's steps are undone.
    assert rollback and {(s.rotating, s.slot) for s in rollback} == {("b", slot_b)}
    # a and c ran every forward step to every peer; b's Swap went to nobody (it never
    # retired) while a and c still swap their entries on b (b's routes to them are on
    # their slots' bridges, and b's rollback needs b's primary to know their new keys).
    for r in "ac":
        assert {s.step for s in cluster.sent if s.rotating == r} >= {
            Step.PREPARE, Step.DISTRIBUTE, Step.ACTIVATE, Step.SWAP_PEER, Step.SWITCH_PEER,
            Step.RETIRE_ROTATING, Step.RETIRE_PEER}
    assert not [s for s in cluster.sent if s.rotating == "b" and s.step is Step.SWAP_PEER]
    assert {s.target for s in cluster.sent if s.step is Step.SWAP_PEER and s.rotating == "a"} \
        == {"b", "c"}
    # The others did not wait for b at the barriers after it failed.
    assert first(cluster, Step.SWAP_PEER) < last(cluster, Step.ABANDON_ROTATING)


async def test_a_batch_holds_at_most_the_smallest_max_concurrent_of_its_members(
        autojump_clock: trio.testing.MockClock) -> None:
    cluster = FakeCluster()
    token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
    await rotate_together(cluster, ("a", "b", "c", "d", "e"), 2, token)
    assert all(last.outcome == "Completed" for last in cluster.lasts.values())
    assert len(cluster.lasts) == 5
    assert token.largest_batch == 2 and token.batches == 3
    assert not cluster.slot_clash
    # Slots stay within maxConcurrent: the bridge ports are listenPort + 1 .. + 2.
    assert {s.slot for s in cluster.sent} == {1, 2}


async def test_rotations_of_different_batches_never_overlap(
        autojump_clock: trio.testing.MockClock) -> None:
    cluster = FakeCluster()
    token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
    await rotate_together(cluster, ("a", "b", "c", "d"), {"a": 2, "b": 2, "c": 2, "d": 2},
                          token)
    spans = sorted((min(s.at for s in cluster.sent if s.rotating == r),
                    max(s.at for s in cluster.sent if s.rotating == r), r) for r in "abcd")
    (_, end1, _), (_, end2, _), (start3, _, _), (start4, _, _) = spans
    assert max(end1, end2) < min(start3, start4)


async def test_max_concurrent_one_is_one_at_a_time(
        autojump_clock: trio.testing.MockClock) -> None:
    cluster = FakeCluster()
    token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
    await rotate_together(cluster, ("a", "b", "c"), 1, token)
    assert token.largest_batch == 1 and token.batches == 3
    assert {s.slot for s in cluster.sent} == {1}
    assert not [s for s in cluster.sent if s.step is Step.SWAP_PEER]
