"""The supervisor on virtual time: restarts, backoff, strategies, escalation, cleanup."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.testing
import trio_asyncio

from vpblu.supervisor import (
    Backoff,
    ChildSpec,
    ChildStatistics,
    Restart,
    Runnable,
    Strategy,
    Supervisor,
    SupervisorEscalation,
    TerminalError,
    with_inbox_clone,
)

# Jitter no larger than the initial delay keeps every delay strictly above the one before.
BACKOFF = Backoff(initial=1.0, maximum=100.0, jitter=0.5, stable_after=60.0)
LONG = 10_000.0  # virtual seconds: "long enough for everything pending to happen"


class Boom(Exception):
    pass


@attrs.frozen
class Life:
    """One incarnation of a FakeChild: how long it takes to start, runs, and how it ends."""

    seconds: float = math.inf
    raises: type[BaseException] | None = Boom  # None: return normally
    startup: float = 0.0
    crash_while_starting: bool = False
    cleanup: float = 0.0  # shielded, like an actor tearing down what it owns


@attrs.define(eq=False)
class FakeChild:
    """A scripted actor: its i-th incarnation lives `lives[i]`, later ones run forever."""

    name: str
    lives: tuple[Life, ...] = ()
    journal: list[str] = attrs.Factory(list)
    starts: list[float] = attrs.Factory(list)
    stops: list[float] = attrs.Factory(list)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        n = len(self.starts)
        life = self.lives[n] if n < len(self.lives) else Life()
        self.starts.append(trio.current_time())
        self.journal.append(f"start {self.name}")
        try:
            await trio.sleep(life.startup)
            if life.crash_while_starting:
                raise Boom(f"{self.name} while starting")
            task_status.started()
            self.journal.append(f"started {self.name}")
            await trio.sleep(life.seconds)
            if life.raises is not None:
                raise life.raises(f"{self.name} #{n}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(life.cleanup)
            self.stops.append(trio.current_time())
            self.journal.append(f"stop {self.name}")

    def spec(self, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        return ChildSpec(self.name, lambda: self.run, restart)


def crashes(n: int, after: float = 0.0) -> tuple[Life, ...]:
    return tuple(Life(seconds=after) for _ in range(n))


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_restarts_a_crashed_child_with_growing_delays(autojump_clock: trio.abc.Clock) -> None:
    child = FakeChild("a", crashes(5))
    sup = Supervisor("root", [child.spec()], max_restarts=100, backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        stats = sup.statistics()
        nursery.cancel_scope.cancel()
    delays = gaps(child.starts)
    assert len(delays) == 5
    for i, delay in enumerate(delays):
        assert 2**i <= delay <= 2**i + 0.5  # wait_exponential_jitter: 1, 2, 4, 8, 16 + jitter
    assert all(b > a for a, b in itertools.pairwise(delays))
    assert stats.children == (ChildStatistics("a", True, 5, Boom),)


async def test_backoff_resets_after_a_stable_run(autojump_clock: trio.abc.Clock) -> None:
    lives = (*crashes(3), Life(seconds=100.0), Life(seconds=0.0))
    child = FakeChild("a", lives)
    sup = Supervisor("root", [child.spec()], max_restarts=100, backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        nursery.cancel_scope.cancel()
    delays = gaps(child.starts)
    assert delays[2] >= 4.0  # third restart: backed off to 4 s
    # The fourth life ran 100 s > stable_after, so its crash is a fresh incident.
    assert 100.0 + 1.0 <= delays[3] <= 100.0 + 1.5
    assert 2.0 <= delays[4] <= 2.5  # and backoff grows again from there


async def test_escalates_when_restart_intensity_is_exceeded(autojump_clock: trio.abc.Clock) -> None:
    crashing = FakeChild("a", crashes(10))
    sibling = FakeChild("b")
    sup = Supervisor(
        "root", [crashing.spec(), sibling.spec()], max_restarts=3, period=60.0, backoff=BACKOFF
    )
    with pytest.raises(SupervisorEscalation) as caught:
        await sup.run()
    assert caught.value.supervisor == "root"
    assert caught.value.child == "a"
    assert isinstance(caught.value.__cause__, Boom)
    assert len(crashing.starts) == 4  # the start and three restarts; the fourth crash gives up
    assert sibling.stops == [trio.current_time()]  # stopped before the escalation left
    assert 1 + 2 + 4 <= trio.current_time() <= 1 + 2 + 4 + 1.5


async def test_escalating_while_starting_fails_the_parents_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    ready = FakeChild("a")
    never = FakeChild("b", (Life(crash_while_starting=True),) * 3)
    sup = Supervisor("root", [ready.spec(), never.spec()], max_restarts=2, backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        with pytest.raises(SupervisorEscalation) as caught:
            await nursery.start(sup.run)
    assert caught.value.child == "b"
    assert len(never.starts) == 3
    assert ready.stops == [trio.current_time()]


async def test_terminal_error_escalates_without_retry(autojump_clock: trio.abc.Clock) -> None:
    child = FakeChild("a", (Life(seconds=5.0, raises=TerminalError),))
    sup = Supervisor("root", [child.spec()], backoff=BACKOFF)
    with pytest.raises(SupervisorEscalation) as caught:
        await sup.run()
    assert isinstance(caught.value.__cause__, TerminalError)
    assert len(child.starts) == 1
    assert trio.current_time() == 5.0


async def run_strategy(strategy: Strategy) -> tuple[list[FakeChild], list[str]]:
    journal: list[str] = []
    a = FakeChild("a", journal=journal)
    b = FakeChild("b", crashes(1, after=10.0), journal=journal)
    c = FakeChild("c", journal=journal)
    sup = Supervisor("root", [x.spec() for x in (a, b, c)], strategy=strategy, backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        assert all(s.running for s in sup.statistics().children)
        nursery.cancel_scope.cancel()
    return [a, b, c], journal[6:-3]  # past the first start, before the final teardown


async def test_one_for_one_restarts_only_the_crashed_child(autojump_clock: trio.abc.Clock) -> None:
    (a, b, c), journal = await run_strategy(Strategy.ONE_FOR_ONE)
    assert [len(x.starts) for x in (a, b, c)] == [1, 2, 1]
    assert journal == ["stop b", "start b", "started b"]


async def test_one_for_all_restarts_every_sibling_in_order(autojump_clock: trio.abc.Clock) -> None:
    (a, b, c), journal = await run_strategy(Strategy.ONE_FOR_ALL)
    assert [len(x.starts) for x in (a, b, c)] == [2, 2, 2]
    assert sorted(journal[:3]) == ["stop a", "stop b", "stop c"]
    assert journal[3:] == ["start a", "started a", "start b", "started b", "start c", "started c"]
    assert 10.0 + 1.0 <= a.starts[1] <= 10.0 + 1.5  # siblings share the crashed child's backoff


async def test_rest_for_one_restarts_later_siblings_only(autojump_clock: trio.abc.Clock) -> None:
    (a, b, c), journal = await run_strategy(Strategy.REST_FOR_ONE)
    assert [len(x.starts) for x in (a, b, c)] == [1, 2, 2]
    assert sorted(journal[:2]) == ["stop b", "stop c"]
    assert journal[2:] == ["start b", "started b", "start c", "started c"]


async def test_no_two_incarnations_overlap(autojump_clock: trio.abc.Clock) -> None:
    crashing = FakeChild("a", crashes(1, after=1.0))
    slow = FakeChild("b", (Life(cleanup=20.0),))  # its cleanup outlasts a's backoff
    sup = Supervisor(
        "root", [crashing.spec(), slow.spec()], strategy=Strategy.ONE_FOR_ALL, backoff=BACKOFF
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        nursery.cancel_scope.cancel()
    assert slow.stops[0] == 21.0
    assert 21.0 + 1.0 <= crashing.starts[1] <= 21.0 + 1.5  # waited for b, then backed off
    assert slow.starts[1] >= crashing.starts[1]


@pytest.mark.parametrize(
    ("restart", "ending", "restarted"),
    [
        (Restart.PERMANENT, None, True),
        (Restart.PERMANENT, Boom, True),
        (Restart.TRANSIENT, None, False),
        (Restart.TRANSIENT, Boom, True),
        (Restart.TEMPORARY, None, False),
        (Restart.TEMPORARY, Boom, False),
    ],
)
async def test_restart_types(
    autojump_clock: trio.abc.Clock,
    restart: Restart,
    ending: type[BaseException] | None,
    restarted: bool,
) -> None:
    child = FakeChild("a", (Life(seconds=1.0, raises=ending),))
    sup = Supervisor("root", [child.spec(restart)], backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        stats = sup.statistics().children
        nursery.cancel_scope.cancel()
    assert len(child.starts) == (2 if restarted else 1)
    assert [s.name for s in stats] == (["a"] if restarted else [])


async def test_temporary_sibling_is_stopped_not_restarted(autojump_clock: trio.abc.Clock) -> None:
    crashing = FakeChild("a", crashes(1, after=1.0))
    temporary = FakeChild("t")
    sup = Supervisor(
        "root",
        [crashing.spec(), temporary.spec(Restart.TEMPORARY)],
        strategy=Strategy.ONE_FOR_ALL,
        backoff=BACKOFF,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(LONG)
        names = [s.name for s in sup.statistics().children]
        nursery.cancel_scope.cancel()
    assert len(temporary.starts) == 1
    assert temporary.stops == [1.0]
    assert names == ["a"]


async def test_started_only_once_every_child_started_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    journal: list[str] = []
    a = FakeChild("a", (Life(startup=3.0),), journal=journal)
    b = FakeChild("b", (Life(crash_while_starting=True), Life(startup=2.0)), journal=journal)
    sup = Supervisor("root", [a.spec(), b.spec()], backoff=BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # a's 3 s, b's crash while starting retried after ~1 s, then b's 2 s
        assert 3.0 + 1.0 + 2.0 <= trio.current_time() <= 3.0 + 1.5 + 2.0
        assert journal == [
            "start a", "started a", "start b", "stop b", "start b", "started b",
        ]  # fmt: skip
        nursery.cancel_scope.cancel()


async def test_dynamic_children(autojump_clock: trio.abc.Clock) -> None:
    sup = Supervisor("sessions", backoff=BACKOFF)
    node_a, node_b = FakeChild("node-a", (Life(startup=1.0),)), FakeChild("node-b")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(node_a.spec(Restart.TRANSIENT))
        assert trio.current_time() == 1.0  # returned once the child was started
        await sup.start_child(node_b.spec(Restart.TRANSIENT))
        with pytest.raises(ValueError, match="already has a child 'node-a'"):
            await sup.start_child(FakeChild("node-a").spec())
        assert [s.name for s in sup.statistics().children] == ["node-a", "node-b"]

        await sup.terminate_child("node-a")
        assert node_a.stops == [trio.current_time()]
        assert [s.name for s in sup.statistics().children] == ["node-b"]
        with pytest.raises(LookupError):
            await sup.terminate_child("node-a")

        # A child that fails to start is the caller's problem, and its name is free again.
        broken = FakeChild("node-c", (Life(crash_while_starting=True),))
        with pytest.raises(Boom):
            await sup.start_child(broken.spec())
        await sup.start_child(broken.spec())
        assert [s.name for s in sup.statistics().children] == ["node-b", "node-c"]
        await trio.sleep(LONG)
        assert len(node_a.starts) == 1  # terminated means gone, even though it is transient
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class TaskCounter(trio.abc.Instrument):
    live: set[trio.lowlevel.Task] = attrs.Factory(set)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.live.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.live.discard(task)


async def test_cancellation_from_above_stops_the_whole_tree(autojump_clock: trio.abc.Clock) -> None:
    leaves = [FakeChild(name) for name in ("x", "y", "z")]
    crashing = FakeChild("c", crashes(1, after=1.0))  # cancelled while in backoff
    inner = Supervisor("inner", [leaves[1].spec(), leaves[2].spec()], strategy=Strategy.ONE_FOR_ALL)
    root = Supervisor(
        "root",
        [leaves[0].spec(), ChildSpec("inner", lambda: inner.run), crashing.spec()],
        backoff=BACKOFF,
    )
    counter = TaskCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(root.run)
                await trio.sleep(1.5)
                assert len(counter.live) > 5
                dynamic = FakeChild("dyn")
                await root.start_child(dynamic.spec())
                scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert trio.current_time() == 1.5  # promptly: no virtual time passed
    assert counter.live == set()
    for leaf in [*leaves, dynamic]:
        assert leaf.stops == [1.5]
    assert all(not s.running for s in root.statistics().children)


async def test_a_crash_storm_does_not_spin() -> None:
    """Real clock: the backoff, not the CPU, decides how often a child can crash."""
    child = FakeChild("a", crashes(1000))
    backoff = Backoff(initial=0.01, maximum=0.1, jitter=0.005, stable_after=60.0)
    sup = Supervisor("root", [child.spec()], max_restarts=1000, backoff=backoff)
    cpu = time.process_time()
    with trio.move_on_after(1.0):
        await sup.run()
    used = time.process_time() - cpu
    # 0.01 + 0.02 + 0.04 + 0.08 = 0.15 s, then at most one start per 0.1 s: <= 14 starts.
    assert 5 <= len(child.starts) <= 14
    assert used < 0.5


async def test_inbox_messages_survive_a_restart(autojump_clock: trio.abc.Clock) -> None:
    handled: list[str] = []

    class Echo:
        """Handles text messages; 'boom' crashes it."""

        def __init__(self, inbox: trio.MemoryReceiveChannel[str]) -> None:
            self._inbox = inbox

        async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            async for message in self._inbox:
                if message == "boom":
                    raise Boom(message)
                handled.append(message)
                await trio.sleep(1.0)

    send, inbox = trio.open_memory_channel[str](8)
    async with send, inbox:
        echo = ChildSpec("echo", with_inbox_clone(Echo, inbox))
        sup = Supervisor("root", [echo], backoff=BACKOFF)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            for message in ("a", "boom", "b", "c", "boom", "d"):
                send.send_nowait(message)
            await trio.sleep(LONG)
            assert handled == ["a", "b", "c", "d"]
            # The parent's end plus the running incarnation's clone: crashed clones were closed.
            assert send.statistics().open_receive_channels == 2
            nursery.cancel_scope.cancel()
        assert send.statistics().open_receive_channels == 1


async def test_a_crash_is_logged_once_up_the_tree(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = FakeChild("leaf", (Life(seconds=1.0, raises=TerminalError),))
    made: list[Supervisor] = []

    def inner() -> Runnable:
        made.append(Supervisor("inner", [leaf.spec()], backoff=BACKOFF))
        return made[-1].run

    root = Supervisor("root", [ChildSpec("inner", inner)], backoff=BACKOFF)
    with caplog.at_level(logging.INFO, logger="vpblu.supervisor"):
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            await trio.sleep(LONG)
            stats = root.statistics()
            nursery.cancel_scope.cancel()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert tracebacks[0].getMessage() == "inner/leaf crashed"
    assert isinstance(tracebacks[0].exc_info[1], TerminalError)  # type: ignore[index]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "inner/leaf crashed",
        "supervisor 'inner' gave up: child 'leaf' raised a TerminalError",
    ]
    # The escalation was the inner supervisor crashing: root restarted a fresh one.
    assert len(made) == 2
    assert stats.children == (ChildStatistics("inner", True, 1, SupervisorEscalation),)
    assert len(leaf.starts) == 2


async def test_asyncio_cancelled_error_from_a_future_is_a_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A future cancelled on the asyncio side is not a trio cancellation."""
    attempts: list[float] = []

    async with trio_asyncio.open_loop() as loop:

        async def waits_on_asyncio(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            attempts.append(trio.current_time())
            if len(attempts) > 1:
                await trio.sleep_forever()
            future: asyncio.Future[None] = loop.create_future()
            loop.call_later(2.0, future.cancel)
            await trio_asyncio.aio_as_trio(future)

        factory: Callable[[], Runnable] = lambda: waits_on_asyncio  # noqa: E731
        sup = Supervisor("root", [ChildSpec("aio", factory)], backoff=BACKOFF)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(LONG)
            stats = sup.statistics()
            nursery.cancel_scope.cancel()
    assert stats.children == (ChildStatistics("aio", True, 1, asyncio.CancelledError),)
    assert 2.0 + 1.0 <= attempts[1] <= 2.0 + 1.5


async def test_statistics_are_frozen(autojump_clock: trio.abc.Clock) -> None:
    sup = Supervisor("root", [FakeChild("a").spec()])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        stats = sup.statistics()
        nursery.cancel_scope.cancel()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.children[0].restarts = 3  # type: ignore[misc]
    assert stats.children == (ChildStatistics("a", True, 0, None),)
    assert not sup.statistics().children[0].running


def test_child_names_must_be_unique_and_non_empty() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor("root", [FakeChild("a").spec(), FakeChild("a").spec()])
    with pytest.raises(ValueError, match="needs a name"):
        ChildSpec("", FakeChild("x").run)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0.0)
