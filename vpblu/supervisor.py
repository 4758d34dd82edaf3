"""Supervision on trio nurseries, the way OTP supervisors behave.

A `Supervisor` owns the lifetimes of the child actors named by its
`ChildSpec`s: it starts them in order through `nursery.start` (so it is itself
"started" only once every child is), restarts a crashed child after an
exponential backoff with jitter (tenacity computes the delay, trio's clock
sleeps it), applies its `Strategy` to the crashed child's siblings, and gives
up — stopping every child and raising `SupervisorEscalation` — when children
crash more than `max_restarts` times in `period` seconds or one raises
`TerminalError`. A supervisor is a child like any other (its `run` has the
actor signature), so trees are nested nurseries and an escalation is simply
the inner supervisor crashing in its parent's eyes.

It must never: swallow `trio.Cancelled` (cancellation from above stops every
child and propagates); restart without a delay; run two incarnations of one
child at once; log one crash twice on its way up the tree. It owns no actor's
state: an actor's inbox belongs to whoever made the channel, see
`with_inbox_clone`.

What counts as a crash: any `Exception`, and also `asyncio.CancelledError`.
The latter comes back from a trio-asyncio future that the asyncio side
cancelled; it is not a trio cancellation, and treating it as one would end the
child silently and never restart it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Protocol, TypeVar

import attrs
import tenacity
import trio

logger = logging.getLogger(__name__)

# Five crashes in thirty seconds is a storm the backoff alone would already
# slow to a crawl (0.5 + 1 + 2 + 4 + 8 s): past it, restarting this subtree
# is not helping and the parent should decide.
DEFAULT_MAX_RESTARTS = 5
DEFAULT_PERIOD = 30.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.5
# A child that ran this long was healthy: its next crash is a new incident
# and starts again from the shortest delay.
BACKOFF_STABLE_AFTER = 60.0


class Restart(Enum):
    PERMANENT = "permanent"  # restarted after a crash and after a normal return
    TRANSIENT = "transient"  # restarted after a crash only
    TEMPORARY = "temporary"  # never restarted, not even when a sibling's crash stops it


class Strategy(Enum):
    ONE_FOR_ONE = "one_for_one"  # restart the crashed child only
    ONE_FOR_ALL = "one_for_all"  # restart every child
    REST_FOR_ONE = "rest_for_one"  # restart the crashed child and those started after it


class TerminalError(Exception):
    """A failure that retrying cannot fix: the supervisor escalates at once."""


class SupervisorEscalation(Exception):
    """A supervisor gave up; `__cause__` is the child's last error."""

    def __init__(self, supervisor: str, child: str, reason: str) -> None:
        super().__init__(f"supervisor {supervisor!r} gave up: child {child!r} {reason}")
        self.supervisor = supervisor
        self.child = child


class Runnable(Protocol):
    """One incarnation of a child: an actor's bound `run`, or a supervisor's."""

    def __call__(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


class Actor(Protocol):
    def run(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


def _non_empty(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: a child needs a name")


@attrs.frozen
class ChildSpec:
    """`factory` is called for every (re)start and must build a fresh actor."""

    name: str = attrs.field(validator=_non_empty)
    factory: Callable[[], Runnable]
    restart: Restart = Restart.PERMANENT


@attrs.frozen
class Backoff:
    # A zero initial delay would let a crash loop spin the CPU.
    initial: float = attrs.field(default=BACKOFF_INITIAL, validator=attrs.validators.gt(0))
    maximum: float = attrs.field(default=BACKOFF_MAX, validator=attrs.validators.gt(0))
    jitter: float = attrs.field(default=BACKOFF_JITTER, validator=attrs.validators.ge(0))
    stable_after: float = BACKOFF_STABLE_AFTER

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number `attempt` (1-based) of a crashing child."""
        wait = tenacity.wait_exponential_jitter(
            multiplier=self.initial, max=self.maximum, jitter=self.jitter
        )
        # tenacity's wait strategies read only the attempt number of a call state.
        state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
        state.attempt_number = attempt
        return wait(state)


@attrs.frozen
class ChildStatistics:
    name: str
    running: bool
    restarts: int
    last_error: type[BaseException] | None


@attrs.frozen
class SupervisorStatistics:
    name: str
    strategy: Strategy
    children: tuple[ChildStatistics, ...]


M = TypeVar("M")


def with_inbox_clone(
    make: Callable[[trio.MemoryReceiveChannel[M]], Actor],
    inbox: trio.MemoryReceiveChannel[M],
) -> Callable[[], Runnable]:
    """A child factory whose every incarnation receives from a fresh clone of `inbox`.

    The inbox survives restarts because the actor never owns the channel: the
    code that opened it keeps the original receive end open for the tree's
    lifetime, so a crashing incarnation closing its clone leaves the buffer
    and the senders' ends intact, and the next incarnation reads on from the
    next queued message. Only the message an incarnation held when it crashed
    is gone; actors work level-triggered, so the next message (or the resync
    every restart performs) covers it. The clone is closed here, on every
    exit, even if the actor forgets to.
    """

    def factory() -> Runnable:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            async with inbox.clone() as clone:
                await make(clone).run(task_status=task_status)

        return run

    return factory


@attrs.define(eq=False)
class _Child:
    spec: ChildSpec
    # Bumped whenever the supervisor stops or replaces the current incarnation
    # on purpose: exits and pending restarts carrying an older number are stale.
    generation: int = 0
    scope: trio.CancelScope | None = None
    done: trio.Event = attrs.field(factory=lambda: _set(trio.Event()))
    running: bool = False
    running_since: float | None = None
    starts: int = 0
    attempt: int = 0
    last_error: type[BaseException] | None = None


def _set(event: trio.Event) -> trio.Event:
    event.set()
    return event


@attrs.frozen(eq=False)
class _Exited:
    name: str
    generation: int
    error: BaseException | None


@attrs.define(eq=False)
class _Handshake:
    """The task_status a child sees: marks it running before passing `started` on."""

    child: _Child
    status: trio.TaskStatus[None]
    called: bool = False

    def started(self, value: None = None) -> None:
        self.called = True
        self.child.running = True
        self.child.running_since = trio.current_time()
        self.status.started()


def _is_crash(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        # A group holding trio.Cancelled or KeyboardInterrupt is the task being
        # torn down from outside, not a crash, even if an error rode along.
        return all(_is_crash(e) for e in exc.exceptions)
    return isinstance(exc, Exception | asyncio.CancelledError)


class Supervisor:
    """Runs its children in one nursery and restarts them as its strategy says.

    `run` has the actor signature, so a supervisor nests as a child:
    ``ChildSpec("sessions", lambda: Supervisor("sessions", strategy=...).run)``.
    The object may be run again after it ended (a parent restarting it).
    """

    def __init__(
        self,
        name: str,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        period: float = DEFAULT_PERIOD,
        backoff: Backoff = Backoff(),  # frozen, so one shared default is safe
    ) -> None:
        self.name = name
        self._specs = tuple(children)
        if len({s.name for s in self._specs}) != len(self._specs):
            raise ValueError(f"supervisor {name!r}: child names must be unique")
        self._strategy = strategy
        self._max_restarts = max_restarts
        self._period = period
        self._backoff = backoff
        self._nursery: trio.Nursery | None = None
        self._children: dict[str, _Child] = {}  # in start order, which rest_for_one relies on
        self._restart_times: collections.deque[float] = collections.deque()
        self._escalation: SupervisorEscalation | None = None
        self._exits_send: trio.MemorySendChannel[_Exited]
        self._exits: trio.MemoryReceiveChannel[_Exited]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._nursery is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        # A run starts from the specs alone: children added by start_child do
        # not outlive the run that added them (their owner adds them again).
        self._children = {spec.name: _Child(spec) for spec in self._specs}
        self._restart_times.clear()
        self._escalation = None
        # Unbounded so that a child's exit report can never block: each
        # incarnation reports once, so the queue never outgrows the children.
        self._exits_send, self._exits = trio.open_memory_channel[_Exited](math.inf)
        try:
            async with self._exits_send, self._exits, trio.open_nursery() as nursery:
                self._nursery = nursery
                for child in list(self._children.values()):
                    await self._bring_up(child, child.generation)
                task_status.started()
                async for exited in self._exits:
                    self._on_exit(exited)
        finally:
            self._nursery = None
        # Only _escalate ends the loop above without an exception: it cancels
        # the nursery, whose scope absorbs that Cancelled once every child is gone.
        escalation = self._escalation
        if escalation is None:
            raise RuntimeError(f"supervisor {self.name!r} stopped without a reason")
        raise escalation from escalation.__cause__

    async def start_child(self, spec: ChildSpec) -> None:
        """Add a child and return once it has started.

        Unlike a restart, a crash before it starts is not retried: it is
        raised here, to the caller that asked for the child, and the name is free again.
        """
        nursery = self._running_nursery()
        if spec.name in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
        child = self._children[spec.name] = _Child(spec)
        try:
            await nursery.start(self._incarnation, child, child.generation)
        except BaseException:
            if self._children.get(spec.name) is child:
                del self._children[spec.name]
            raise

    async def terminate_child(self, name: str) -> None:
        """Stop a child for good and return once its incarnation has ended."""
        self._running_nursery()
        child = self._children.pop(name, None)
        if child is None:
            raise LookupError(f"supervisor {self.name!r} has no child {name!r}")
        child.generation += 1
        if child.scope is not None:
            child.scope.cancel()
        await child.done.wait()

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            name=self.name,
            strategy=self._strategy,
            children=tuple(
                ChildStatistics(
                    name=c.spec.name,
                    running=c.running,
                    restarts=max(c.starts - 1, 0),
                    last_error=c.last_error,
                )
                for c in self._children.values()
            ),
        )

    def _running_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        return self._nursery

    async def _incarnation(
        self, child: _Child, generation: int, *, task_status: trio.TaskStatus[None]
    ) -> None:
        if child.generation != generation:
            # Superseded between nursery.start and this first step, before its
            # scope existed to be cancelled.
            task_status.started()
            return
        handshake = _Handshake(child, task_status)
        child.scope = scope = trio.CancelScope()
        child.done = done = trio.Event()
        child.running_since = None
        child.starts += 1
        error: BaseException | None = None
        try:
            try:
                with scope:
                    await child.spec.factory()(task_status=handshake)
            except BaseException as exc:
                if not _is_crash(exc) or not handshake.called:
                    # A crash before `started` goes to whoever awaits nursery.start.
                    raise
                error = exc
        finally:
            child.running = False
            done.set()
        if not handshake.called:
            task_status.started()  # stopped on purpose while starting: let start() return
        # trio-asyncio may answer our own cancel with asyncio's CancelledError.
        ours = scope.cancel_called and isinstance(error, asyncio.CancelledError)
        if error is not None and not ours:
            self._record_crash(child, error)
        self._exits_send.send_nowait(_Exited(child.spec.name, generation, error))

    async def _bring_up(self, child: _Child, generation: int) -> None:
        """Start one child, retrying crashes during its startup with backoff."""
        nursery = self._running_nursery()
        while self._children.get(child.spec.name) is child and child.generation == generation:
            try:
                await nursery.start(self._incarnation, child, generation)
                return
            except BaseException as exc:
                if not _is_crash(exc):
                    raise
                self._record_crash(child, exc)
                delay = self._judge(child, exc)
                if delay is None:
                    await trio.sleep_forever()  # _judge cancelled the nursery: raises Cancelled now
                await trio.sleep(delay)

    def _on_exit(self, exited: _Exited) -> None:
        child = self._children.get(exited.name)
        if child is None or child.generation != exited.generation:
            return  # an incarnation we stopped on purpose
        restart = child.spec.restart
        if restart is Restart.TEMPORARY or (exited.error is None and restart is Restart.TRANSIENT):
            del self._children[exited.name]
            return
        if exited.error is None:
            logger.warning("%s/%s returned but is permanent", self.name, exited.name)
        delay = self._judge(child, exited.error)
        if delay is None:
            return
        group = self._group(child)
        previous = []
        for member in group:
            member.generation += 1
            if member.scope is not None:
                member.scope.cancel()
            previous.append(member.done)
            if member.spec.restart is Restart.TEMPORARY:
                del self._children[member.spec.name]
        again = [(m, m.generation) for m in group if m.spec.restart is not Restart.TEMPORARY]
        self._running_nursery().start_soon(self._restart, again, previous, delay)

    async def _restart(
        self, group: list[tuple[_Child, int]], previous: list[trio.Event], delay: float
    ) -> None:
        # The new incarnation may need what the old one still holds (a socket,
        # an interface, a lease): let every stopped sibling finish first.
        for done in previous:
            await done.wait()
        await trio.sleep(delay)
        for child, generation in group:
            await self._bring_up(child, generation)

    def _group(self, child: _Child) -> list[_Child]:
        if self._strategy is Strategy.ONE_FOR_ONE:
            return [child]
        order = list(self._children.values())
        if self._strategy is Strategy.ONE_FOR_ALL:
            return order
        return order[order.index(child) :]

    def _judge(self, child: _Child, error: BaseException | None) -> float | None:
        """The delay before restarting `child`, or None once the supervisor gives up."""
        if isinstance(error, TerminalError):
            self._escalate(child, error, "raised a TerminalError")
            return None
        now = trio.current_time()
        self._restart_times.append(now)
        while self._restart_times[0] <= now - self._period:
            self._restart_times.popleft()
        if len(self._restart_times) > self._max_restarts:
            reason = f"brought restarts above {self._max_restarts} in {self._period:g} s"
            self._escalate(child, error, reason)
            return None
        since = child.running_since
        stable = since is not None and now - since >= self._backoff.stable_after
        child.attempt = 1 if stable else child.attempt + 1
        delay = self._backoff.delay(child.attempt)
        logger.info("%s: restarting %s in %.2f s", self.name, child.spec.name, delay)
        return delay

    def _record_crash(self, child: _Child, error: BaseException) -> None:
        child.last_error = type(error)
        if isinstance(error, SupervisorEscalation):
            return  # the supervisor that gave up logged it, and the crash beneath it
        logger.error("%s/%s crashed", self.name, child.spec.name, exc_info=error)

    def _escalate(self, child: _Child, error: BaseException | None, reason: str) -> None:
        if self._escalation is None:
            self._escalation = SupervisorEscalation(self.name, child.spec.name, reason)
            self._escalation.__cause__ = error
            logger.error("%s", self._escalation)
        self._running_nursery().cancel_scope.cancel()
