"""The RotationActor's phase machine on fake ports and fake daemons (virtual time):
the order of steps and of status writes, rollback on a failure at each phase and on a
timeout, and a new leader resuming from the persisted record."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import attrs
import pytest
import trio
import trio.testing

from vpblu.actors.rotation import RotationActor, RotationSettings, RotationToken, next_fire
from vpblu.core import wire
from vpblu.core.sources import LastRotation, RotationPhase, RotationRecord
from vpblu.messages import NodeRotationView, RotationInbox, RotationResultReceived

Step = wire.RotationStepKind
OLD = base64.b64encode(bytes([1]) * 32).decode()
NEW = base64.b64encode(bytes([2]) * 32).decode()
PEERS = ("b", "c")


@attrs.define
class FakeRotationPorts:
    """Records status writes and sent steps; fake daemons answer through `answer`."""

    inbox: trio.MemorySendChannel[RotationInbox]
    log: list[str] = attrs.Factory(list)
    persisted: list[RotationRecord | None] = attrs.Factory(list)
    public_keys: list[str | None] = attrs.Factory(list)
    lasts: list[LastRotation] = attrs.Factory(list)
    persist_times: list[float] = attrs.Factory(list)
    # (node, step) -> error text, or None to stay silent; absent: answer ok.
    faults: dict[tuple[str, Step], str | None] = attrs.Factory(dict)
    connected: Callable[[str], bool] = lambda _node: True
    peers: tuple[str, ...] = PEERS  # who peers with the rotating node
    # Called with each step as it is sent (before it is answered): a test's way to
    # change the cluster at a chosen point of the rotation.
    on_send: Callable[[FakeRotationPorts, str, Step], None] = lambda _p, _n, _s: None

    async def persist(self, node: str, record: RotationRecord | None, *,
                      public_key: str | None = None, last: LastRotation | None = None) -> None:
        await trio.sleep(0.01)  # a status write takes a moment
        self.persisted.append(record)
        self.persist_times.append(trio.current_time())
        self.public_keys.append(public_key)
        if last is not None:
            self.lasts.append(last)
        self.log.append("persist " + (f"{record.phase.value}/{record.step.name}"
                                      if record else "done"))

    async def send_step(self, nodes: Sequence[str], step: wire.RotationStep, *,
                        gather: bool = False) -> None:
        for node in nodes:
            await self.send_one(node, step)

    async def send_one(self, node: str, step: wire.RotationStep) -> None:
        # Every step is persisted before it is sent.
        last = self.persisted[-1]
        assert last is not None and last.step is step.step and last.stamp == step.stamp
        if not self.connected(node):
            return
        self.log.append(f"send {step.step.name} {node}")
        self.on_send(self, node, step.step)
        key = (node, step.step)
        if key in self.faults and self.faults[key] is None:
            return
        error = self.faults.get(key)
        new = NEW if step.step is Step.PREPARE else ""
        await self.inbox.send(RotationResultReceived(node, wire.RotationResult(
            step.rotation_id, step.step, "a", step.stamp, error, new)))

    async def peers_of(self, node: str) -> tuple[str, ...]:
        return self.peers

    def wall_clock(self) -> float:
        return 1_700_000_000.0 + trio.current_time()

    def sent(self) -> list[str]:
        return [e for e in self.log if e.startswith("send")]


def view(**changes: object) -> NodeRotationView:
    base = NodeRotationView("a", OLD, None, None, None, None)
    return attrs.evolve(base, **changes)  # type: ignore[arg-type]


async def run_one(ports: FakeRotationPorts, receive: trio.MemoryReceiveChannel[RotationInbox],
                  first: NodeRotationView, *, wait: Callable[[FakeRotationPorts], bool],
                  settings: RotationSettings | None = None) -> RotationActor:
    actor = RotationActor("a", ports, RotationToken(), receive,
                          settings or RotationSettings(term=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await ports.inbox.send(first)
        with trio.fail_after(3600):
            while not wait(ports):  # noqa: ASYNC110 (polling a fake's record, virtual time)
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return actor


def channel() -> tuple[trio.MemorySendChannel[RotationInbox],
                       trio.MemoryReceiveChannel[RotationInbox]]:
    return trio.open_memory_channel[RotationInbox](64)


HAPPY = [
    "send PREPARE a", "send DISTRIBUTE b", "send DISTRIBUTE c", "send ACTIVATE a",
    "send SWITCH_PEER b", "send SWITCH_PEER c", "send RETIRE_ROTATING a",
    "send RETIRE_PEER b", "send RETIRE_PEER c",
]
ROLLBACK = ["send ROLL_BACK_ROTATING a", "send ROLL_BACK_PEER b", "send ROLL_BACK_PEER c",
            "send ABANDON_ROTATING a"]


async def test_rotate_now_runs_every_phase_in_order_and_persists_before_each_step(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send)
    actor = await run_one(ports, receive, view(rotate_now="t1"),
                          wait=lambda p: bool(p.lasts))
    assert ports.sent() == HAPPY
    phases = [r.phase for r in ports.persisted if r is not None]
    assert phases == [RotationPhase.PREPARE, RotationPhase.DISTRIBUTE, RotationPhase.ACTIVATE,
                      *[RotationPhase.RETIRE] * 3]
    # K'.pub is in the record before any peer is told about it.
    assert all(r.new_public_key == NEW for r in ports.persisted[1:] if r is not None)
    assert ports.persisted[-1] is None and ports.public_keys[-1] == NEW
    assert ports.lasts[0].outcome == "Completed" and ports.lasts[0].trigger == "t1"
    stamps = [r.stamp for r in ports.persisted if r is not None]
    assert stamps == sorted(set(stamps)) and all(s >> 32 == 3 for s in stamps)
    assert actor.statistics().completed == 1


@pytest.mark.parametrize(("node", "step"), [("a", Step.PREPARE), ("c", Step.DISTRIBUTE),
                                            ("a", Step.ACTIVATE)])
async def test_a_failure_before_retire_rolls_back_in_the_mechanisms_order(
        autojump_clock: trio.testing.MockClock, node: str, step: Step) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, faults={(node, step): "boom"})
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    sent = ports.sent()
    assert sent[-4:] == ROLLBACK
    assert f"send {step.name} {node}" in sent
    assert not any("SWITCH_PEER" in e or "RETIRE" in e for e in sent)
    assert ports.lasts[0].outcome == "RolledBack" and "boom" in ports.lasts[0].message
    assert ports.persisted[-1] is None and ports.public_keys[-1] == OLD


async def test_a_silent_daemon_times_out_and_rolls_back_after_resending(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, faults={("b", Step.DISTRIBUTE): None})
    settings = RotationSettings(term=1, step_timeout=20.0, resend_interval=5.0)
    start = trio.current_time()
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts),
                  settings=settings)
    assert ports.sent()[-4:] == ROLLBACK
    # Re-sent every 5 s until the 20 s step timeout (c answered the first time).
    assert ports.sent().count("send DISTRIBUTE b") == 4
    assert trio.current_time() - start >= 20.0
    assert "no answer" in ports.lasts[0].message


async def test_retire_rolls_forward_and_retries_until_every_daemon_has_done_it(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, faults={("c", Step.SWITCH_PEER): "busy"})

    async def heal() -> None:
        await trio.sleep(40)
        ports.faults.clear()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal)
        await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    assert ports.lasts[0].outcome == "Completed"
    assert not any("ROLL_BACK" in e for e in ports.sent())
    assert ports.sent().count("send SWITCH_PEER c") >= 2


@pytest.mark.parametrize(("phase", "step", "expect"), [
    (RotationPhase.PREPARE, Step.PREPARE, ROLLBACK),
    (RotationPhase.DISTRIBUTE, Step.DISTRIBUTE, ROLLBACK),
    (RotationPhase.ACTIVATE, Step.ACTIVATE, ["send ACTIVATE a", *HAPPY[4:]]),
    (RotationPhase.RETIRE, Step.RETIRE_ROTATING, HAPPY[6:]),
    (RotationPhase.ROLLING_BACK, Step.ROLL_BACK_PEER, ROLLBACK[1:]),
])
async def test_a_new_leader_resumes_or_rolls_back_from_the_persisted_record(
        autojump_clock: trio.testing.MockClock, phase: RotationPhase, step: Step,
        expect: list[str]) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send)
    left = RotationRecord("r1", phase, step, OLD, NEW if phase is not RotationPhase.PREPARE
                          else "", PEERS, "t0", stamp=(2 << 32) | 9)
    await run_one(ports, receive, view(record=left, rotate_now="t0"),
                  wait=lambda p: bool(p.lasts))
    assert ports.sent() == expect
    # The new leader's stamps are above the old leader's.
    assert all(r.stamp > left.stamp for r in ports.persisted if r is not None)
    # The trigger that started the old rotation does not start another one.
    assert len(ports.lasts) == 1


async def test_the_schedule_fires_at_the_next_cron_time_and_one_trigger_fires_once(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send)
    start = trio.current_time()
    fire = next_fire("*/10 * * * *", ports.wall_clock())
    last = LastRotation("r0", "Completed", "t1", 0.0)
    # "t1" was handled before (lastRotation): only the schedule triggers.
    await run_one(ports, receive, view(schedule="*/10 * * * *", rotate_now="t1",
                                       last_rotation=last),
                  wait=lambda p: bool(p.lasts))
    assert ports.lasts[0].trigger.startswith("schedule@")
    elapsed = trio.current_time() - start
    assert fire - 1_700_000_000.0 - start <= elapsed < fire - 1_700_000_000.0 - start + 60


async def test_one_rotation_at_a_time_across_the_cluster(
        autojump_clock: trio.testing.MockClock) -> None:
    token = RotationToken()
    ports_by_node: dict[str, FakeRotationPorts] = {}
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        for node in ("a", "b"):
            send, receive = channel()
            ports = FakeRotationPorts(send, peers=("c",))
            ports_by_node[node] = ports
            actor = RotationActor(node, ports, token, receive, RotationSettings())
            await nursery.start(actor.run)
            await send.send(attrs.evolve(view(rotate_now="go"), node=node))

        async def watch() -> None:
            while True:
                if token.holder is not None and (not order or order[-1] != token.holder):
                    order.append(token.holder)
                await trio.sleep(0.001)

        nursery.start_soon(watch)
        with trio.fail_after(600):
            while not all(p.lasts for p in ports_by_node.values()):  # noqa: ASYNC110
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert sorted(order) == ["a", "b"]
    # The second rotation's first status write comes after the first one's last.
    first, second = (ports_by_node[n] for n in order)
    assert max(first.persist_times) <= min(second.persist_times)
    # A daemon that was a peer in the first rotation refuses a step stamped
    # below what it saw there: the stamps rise across both rotations.
    stamps = [r.stamp for p in (first, second) for r in p.persisted if r is not None]
    assert stamps == sorted(set(stamps)), stamps


async def test_peers_accept_both_keys_for_the_policys_overlap_before_retire(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send)
    await run_one(ports, receive, view(rotate_now="t1", overlap_seconds=45.0),
                  wait=lambda p: bool(p.lasts))
    assert ports.sent() == HAPPY
    at = {r.step: t for r, t in zip(ports.persisted, ports.persist_times, strict=True)
          if r is not None}
    assert at[Step.SWITCH_PEER] - at[Step.ACTIVATE] >= 45.0


async def test_a_node_nobody_peers_with_is_not_rotated(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, peers=())
    actor = RotationActor("a", ports, RotationToken(), receive, RotationSettings(term=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await send.send(view(rotate_now="go"))
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    assert ports.log == []  # nothing persisted, no step sent
    assert actor.statistics().completed == 0


async def test_results_for_no_running_rotation_are_dropped_on_arrival_not_kept(
        autojump_clock: trio.testing.MockClock) -> None:
    """A flood of RotationResults while nothing rotates (a stale resend, a
    hostile daemon) leaves nothing in the actor: counted and dropped."""
    send, receive = channel()
    ports = FakeRotationPorts(send)
    actor = RotationActor("a", ports, RotationToken(), receive, RotationSettings(term=3))
    flood = 10_000
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await send.send(view())
        for i in range(flood):
            await send.send(RotationResultReceived("b", wire.RotationResult(
                f"r{i}", Step.DISTRIBUTE, "a", i, None, "")))
        with trio.fail_after(60):
            while actor.statistics().results_dropped < flood:  # noqa: ASYNC110 (virtual time)
                await trio.sleep(0.1)
        assert actor._results == {}
        nursery.cancel_scope.cancel()


@attrs.define
class NoisyRotationPorts(FakeRotationPorts):
    """Before each real answer, a failed answer to the same rotation at the
    stamps on either side of the step's."""

    async def send_one(self, node: str, step: wire.RotationStep) -> None:
        for stamp in (step.stamp - 1, step.stamp + 1):
            await self.inbox.send(RotationResultReceived(node, wire.RotationResult(
                step.rotation_id, step.step, "a", stamp, "junk", "")))
        await super().send_one(node, step)


async def test_results_for_another_stamp_during_a_step_are_dropped_and_the_rotation_completes(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = NoisyRotationPorts(send)
    actor = await run_one(ports, receive, view(rotate_now="t1"),
                          wait=lambda p: bool(p.lasts))
    assert ports.sent() == HAPPY
    assert actor.statistics().completed == 1
    assert actor.statistics().results_dropped == 2 * len(HAPPY)
    assert actor._results == {}


# --- peers that join while a rotation runs (issue 24) ------------------------------------


def join_at(node: str, step: Step, newcomer: str) -> Callable[[FakeRotationPorts, str, Step],
                                                               None]:
    def hook(ports: FakeRotationPorts, to: str, sent: Step) -> None:
        if (to, sent) == (node, step) and newcomer not in ports.peers:
            ports.peers = (*ports.peers, newcomer)
    return hook


async def test_a_peer_that_joins_before_activate_is_put_on_the_bridge_and_distributed_to(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, on_send=join_at("c", Step.DISTRIBUTE, "d"))
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    # Prepare again (the daemon puts every peer of its primary on the bridge, d too),
    # Distribute to d alone, and d is in every later step.
    assert ports.sent() == [
        "send PREPARE a", "send DISTRIBUTE b", "send DISTRIBUTE c",
        "send PREPARE a", "send DISTRIBUTE d", "send ACTIVATE a",
        "send SWITCH_PEER b", "send SWITCH_PEER c", "send SWITCH_PEER d",
        "send RETIRE_ROTATING a", "send RETIRE_PEER b", "send RETIRE_PEER c",
        "send RETIRE_PEER d"]
    assert ports.lasts[0].outcome == "Completed"
    # A new leader would find d among the peers from the second Prepare on.
    records = [r for r in ports.persisted if r is not None]
    assert records[3].peers == ("b", "c", "d") and records[3].new_public_key == NEW


async def test_a_peer_that_joins_after_activate_gets_the_switch(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, on_send=join_at("a", Step.ACTIVATE, "d"))
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    assert ports.sent() == [*HAPPY[:4], "send SWITCH_PEER b", "send SWITCH_PEER c",
                            "send SWITCH_PEER d", "send RETIRE_ROTATING a",
                            "send RETIRE_PEER b", "send RETIRE_PEER c", "send RETIRE_PEER d"]
    assert ports.lasts[0].outcome == "Completed"


async def test_a_peer_that_joins_during_the_switch_is_switched_in_the_next_round(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    ports = FakeRotationPorts(send, on_send=join_at("c", Step.SWITCH_PEER, "d"))
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    assert ports.sent() == [*HAPPY[:6], "send SWITCH_PEER d", "send RETIRE_ROTATING a",
                            "send RETIRE_PEER b", "send RETIRE_PEER c", "send RETIRE_PEER d"]


async def test_a_newcomer_that_does_not_know_the_node_yet_is_asked_again(
        autojump_clock: trio.testing.MockClock) -> None:
    """The controller learns of d before d's daemon has applied a as a peer: d's
    Distribute fails at first and is tried again, the rotation goes on."""
    send, receive = channel()

    def join_then_heal(ports: FakeRotationPorts, to: str, sent: Step) -> None:
        if (to, sent) == ("c", Step.DISTRIBUTE) and "d" not in ports.peers:
            ports.peers = (*ports.peers, "d")
            ports.faults[("d", Step.DISTRIBUTE)] = "not a peer of this node"
        elif (to, sent) == ("d", Step.DISTRIBUTE) and ports.sent().count(
                "send DISTRIBUTE d") == 2:
            ports.faults.clear()  # the first was refused; d has applied a by now

    ports = FakeRotationPorts(send, on_send=join_then_heal)
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    assert ports.lasts[0].outcome == "Completed"
    assert ports.sent().count("send DISTRIBUTE d") == 2
    assert not any("ROLL_BACK" in e for e in ports.sent())


async def test_a_newcomer_that_never_takes_the_step_rolls_the_rotation_back(
        autojump_clock: trio.testing.MockClock) -> None:
    send, receive = channel()

    def join_broken(ports: FakeRotationPorts, to: str, sent: Step) -> None:
        if (to, sent) == ("c", Step.DISTRIBUTE) and "d" not in ports.peers:
            ports.peers = (*ports.peers, "d")
            ports.faults[("d", Step.DISTRIBUTE)] = "boom"

    ports = FakeRotationPorts(send, on_send=join_broken)
    await run_one(ports, receive, view(rotate_now="t1"), wait=lambda p: bool(p.lasts))
    assert ports.lasts[0].outcome == "RolledBack" and "boom" in ports.lasts[0].message
    # The newcomer rolls back too (its bridge may exist).
    assert ports.sent()[-5:] == ["send ROLL_BACK_ROTATING a", "send ROLL_BACK_PEER b",
                                 "send ROLL_BACK_PEER c", "send ROLL_BACK_PEER d",
                                 "send ABANDON_ROTATING a"]


async def test_a_peer_that_joins_in_the_overlap_window_is_switched_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """It cannot reach the rotating node until it holds K', so it does not wait for
    the window to end; Retire switches it again with the others (idempotent)."""
    send, receive = channel()
    ports = FakeRotationPorts(send)
    joined_at: list[float] = []

    async def join_later() -> None:
        await trio.sleep(20)
        ports.peers = (*ports.peers, "d")
        joined_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join_later)
        await run_one(ports, receive, view(rotate_now="t1", overlap_seconds=60.0),
                      wait=lambda p: bool(p.lasts))
    sent = ports.sent()
    assert sent[:5] == [*HAPPY[:4], "send SWITCH_PEER d"], sent
    assert sent[5:] == [*HAPPY[4:6], "send SWITCH_PEER d", "send RETIRE_ROTATING a",
                        "send RETIRE_PEER b", "send RETIRE_PEER c", "send RETIRE_PEER d"]
    switch_d = next(t for r, t in zip(ports.persisted, ports.persist_times, strict=True)
                    if r is not None and r.step is Step.SWITCH_PEER)
    assert switch_d - joined_at[0] <= 1.5  # within one poll, not at the window's end
    first = next(r for r in ports.persisted if r is not None and r.step is Step.SWITCH_PEER)
    assert first.phase is RotationPhase.ACTIVATE and first.peers == ("b", "c", "d")
    assert ports.lasts[0].outcome == "Completed"
