"""StreamActor: the daemon's end of the warm stream to the leader.

Owns the daemon's connection to the controller and its record of what it has
applied: the desired state at the highest generation it applied. It connects
(TLS, with the node's ServiceAccount token), follows a follower's Redirect to
the leader, reconnects with exponential backoff and jitter, applies SyncState
and Deltas through the kernel actors (via the `Applier` seam) and
acknowledges what it applied.

Reconnecting: a stream the controller ended cleanly (gRPC status OK, with or
without a reason: its Node deleted and registered again, the lead moving) is
an answer, not a failure, so the first reconnect after it goes back to the
same controller within CLOSED_RECONNECT_JITTER (tens of milliseconds, so
daemons closed together do not arrive in one instant); a node whose stream
was ended to make it say its key again is back in the mesh without waiting
out a backoff (issue 20). Everything else (no connection, TLS, a refusal, a
reset, a second clean close within STABLE_AFTER of the last failure) backs
off exponentially with jitter from RECONNECT_INITIAL and moves to the next
address; so does a chain of redirects after the first (issue 19: a
controller redirecting to itself must not make every daemon spin).

A stream's end is seen while an apply runs: applies run on the actor's own
lane (a task outside the stream's), and while one runs the stream is read on,
so a stream that ends mid-apply (a node's first apply, wireguard-go starting,
can take seconds on a loaded node) is followed by the next stream's Hello at
once, and the apply finishes on the lane meanwhile; the new stream's first
batch waits for it. What the ended stream had sent but was not handled is
dropped (every stream starts with a full SyncState, and rotation steps are
resent), except that a Redirect or a refusal among it still decides where to
go next. An apply is never cancelled because a stream ended.

genGuard: a message whose generation is not above the applied one is ignored
(and the applied generation acknowledged again, so the controller knows where
the node stands). A Delta whose base is not exactly the applied generation is
refused with an error Ack; the controller answers with a full SyncState.

Rotation steps (`wire.RotationStep`) go to the `Rotator` seam one at a time,
on a task of their own so the stream keeps reading while a step waits for a
handshake; each is answered with a `wire.RotationResult`. A step stamped below
the highest stamp seen is a deposed leader's and is refused, not run (the
highest is kept on disk by the daemon's StepGuard, so a restart keeps it). Steps are
idempotent, so a step resent after a reconnect is simply run again.

Telemetry (`wire.Telemetry`, from the `TelemetrySource` seam) goes up the
stream on every heartbeat, in its place, and in between when something urgent
changed (applied generation, key, MTU, rotation, a peer up or down or moved):
sampled every `sample_period` and after every apply, sent at most once per
`telemetry_interval`, so a burst of changes is one message. What of a sample
goes is the stream's `vpblu.node.telemetryreport.TelemetryReporter`'s: a
whole sample first and every few minutes, in between only the peers that
changed meaningfully. Without a source, or when a sample fails, a plain
Heartbeat goes. `latest_telemetry` is always the whole latest sample.

It must never change the kernel because the controller went away: losing the
stream only starts the reconnect loop; the mesh stays as last applied. The
private key is not this actor's business: the Hello carries the public key.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from vpblu.core import wire
from vpblu.core.changes import apply
from vpblu.core.model import NodeDesiredState
from vpblu.node.stepguard import StepGuard
from vpblu.node.telemetryreport import FULL_REFRESH, TelemetryReporter
from vpblu.stream.transport import (
    ClientTLS,
    ConnectFailed,
    ControllerStream,
    StreamClosed,
    open_mesh_stream,
)
from vpblu.supervisor import Backoff

if TYPE_CHECKING:
    # Imported where used: the daemon's Hello waits for none of vpblu.messages.
    from vpblu.messages import RotationStepDone

log = logging.getLogger(__name__)

HEARTBEAT_PERIOD = 30.0
HEARTBEAT_JITTER = 0.25  # each beat comes after period x [0.75, 1.25]
RECONNECT_INITIAL = 0.2
RECONNECT_MAX = 30.0
RECONNECT_JITTER = 1.0
# The first reconnect after the controller ended the stream cleanly waits
# uniform(0, this): spread, but not a backoff.
CLOSED_RECONNECT_JITTER = 0.05
# Telemetry: a sample this often (and after each apply), sent when it changed,
# but at most once per TELEMETRY_INTERVAL; always with the heartbeat.
SAMPLE_PERIOD = 10.0
# Answers to rotation steps queued together go together, held at most this long.
RESULTS_HELD = 0.05
TELEMETRY_INTERVAL = 5.0
# A stream that stayed up this long counts as healthy: the backoff starts over.
STABLE_AFTER = 10.0
# Redirects in a row followed without waiting; the ones after back off
# (RECONNECT_INITIAL doubling up to RECONNECT_MAX, with jitter).
REDIRECTS_FREE = 1
# Rotation steps waiting to run; the controller sends one step per rotation in flight
# (at most 16 slots) and re-sends unanswered ones, so more than this queued means a
# confused controller: those are refused.
ROTATION_QUEUE = 64


class Applier(Protocol):
    """Makes the node's kernel match a desired state, by difference.

    Raises on failure; may be called again with the same state (idempotent).
    `whole`: the state came whole (a SyncState), not as a Delta's result.
    """

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> None: ...


class TelemetrySource(Protocol):
    """One fresh sample of what the node sees (peers named by `applied`); the
    StreamActor fills in the applied generation. May raise: the sample is skipped."""

    async def sample(self, applied: NodeDesiredState | None) -> wire.Telemetry: ...


class Rotator(Protocol):
    """Runs one key-rotation step on this node; never raises for a failed step
    (the error goes back to the controller in the RotationResult)."""

    async def rotate(self, step: wire.RotationStep) -> RotationStepDone: ...


@attrs.frozen(slots=True)
class StreamSettings:
    addresses: tuple[str, ...]
    tls: ClientTLS
    token_file: Path
    daemon_version: str = "0.1.0"
    heartbeat_period: float = HEARTBEAT_PERIOD
    sample_period: float = SAMPLE_PERIOD
    telemetry_interval: float = TELEMETRY_INTERVAL
    full_refresh: float = FULL_REFRESH  # a whole telemetry sample at least this often


@attrs.frozen(slots=True)
class AppliedRecord:
    generation: int
    state: NodeDesiredState


@attrs.frozen(slots=True)
class StreamStatistics:
    connected_to: str | None
    applied_generation: int
    connects: int
    redirects: int
    ignored_stale: int
    refused_deltas: int
    syncs_applied: int  # full SyncStates taken (each (re)connect brings one)
    messages_received: int = 0  # controller messages, over every stream so far
    bytes_received: int = 0  # their protobuf bytes (what the bench reports per event)
    highest_generation_seen: int = 0  # in any SyncState or Delta received
    telemetry_sent: int = 0
    apply_failures: int = 0
    # The wait before the latest reconnect, and whether it went back to the
    # same controller because that controller had ended the stream cleanly.
    last_reconnect_delay: float | None = None
    closed_reconnects: int = 0
    ended_mid_apply: int = 0  # streams that ended while an apply ran (it went on)


class _Redirected(Exception):
    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


class StreamActor:
    def __init__(
        self,
        node_name: str,
        public_key: Callable[[], str],
        applier: Applier,
        settings: StreamSettings,
        rotator: Rotator | None = None,
        telemetry: TelemetrySource | None = None,
        step_guard: StepGuard | None = None,
    ) -> None:
        self._node = node_name
        self._telemetry = telemetry
        self._latest_telemetry: wire.Telemetry | None = None
        self._telemetry_sent = 0
        self._highest_seen = 0
        self._apply_failures = 0
        # (seconds, succeeded) of every apply, for whoever measures them.
        self.apply_durations: list[tuple[float, bool]] = []
        self._public_key = public_key
        self._applier = applier
        self._rotator = rotator
        # In memory only unless the daemon gives one on disk (vpblu/node/stepguard.py).
        self._step_guard = step_guard if step_guard is not None else StepGuard()
        self._settings = settings
        self._applied: AppliedRecord | None = None
        self._connected_to: str | None = None
        self._connects = 0
        self._redirects = 0
        self._ignored_stale = 0
        self._refused_deltas = 0
        self._syncs_applied = 0
        self._last_reconnect_delay: float | None = None
        self._closed_reconnects = 0
        # Received on streams that ended, plus a way to read the live one's.
        self._received_before = (0, 0)
        self._live_received: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._applied_changed = trio.Event()
        # Set once the first stream is open (its Hello sent), never cleared.
        self._first_connected = trio.Event()
        # Where applies run (see the module docstring), and whether one runs.
        self._lane: trio.Nursery | None = None
        self._lane_idle = trio.Event()
        self._lane_idle.set()
        self._ended_mid_apply = 0

    @property
    def applied(self) -> AppliedRecord | None:
        return self._applied

    def statistics(self) -> StreamStatistics:
        gen = self._applied.generation if self._applied else 0
        live = self._live_received()
        return StreamStatistics(self._connected_to, gen, self._connects, self._redirects,
                                self._ignored_stale, self._refused_deltas, self._syncs_applied,
                                self._received_before[0] + live[0],
                                self._received_before[1] + live[1],
                                self._highest_seen, self._telemetry_sent,
                                self._apply_failures, self._last_reconnect_delay,
                                self._closed_reconnects, self._ended_mid_apply)

    @property
    def latest_telemetry(self) -> wire.Telemetry | None:
        """The last sample taken (sent or not), for the daemon's metrics."""
        return self._latest_telemetry

    async def wait_connected(self) -> None:
        """Return once a stream has been open (its Hello sent), now or earlier."""
        await self._first_connected.wait()

    async def wait_applied(self, generation: int) -> None:
        while self._applied is None or self._applied.generation < generation:
            await self._applied_changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as lane:
            self._lane = lane
            try:
                await self._connect_loop(task_status)
            finally:
                self._lane = None

    async def _connect_loop(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX, RECONNECT_JITTER)
        attempt = 0  # ends in a row, with no stream up for STABLE_AFTER in between
        redirects = 0  # redirects in a row, with no stream served in between
        target_index = 0
        override: str | None = None
        while True:
            address = override or self._settings.addresses[
                target_index % len(self._settings.addresses)]
            override = None
            started = trio.current_time()
            clean = False
            try:
                await self._session(address)
            except _Redirected as r:
                self._redirects += 1
                redirects += 1
                log.info("controller at %s is a follower; the leader is %s", address, r.leader)
                override = r.leader
                # The first redirect is an answer: followed at once. More in a
                # row (a controller naming itself, two followers naming each
                # other while the lead changes hands) back off like failures,
                # or every daemon spins on TLS handshakes.
                if redirects > REDIRECTS_FREE:
                    delay = backoff.delay(redirects - REDIRECTS_FREE)
                    log.info("%d redirects in a row; following in %.1fs", redirects, delay)
                    await trio.sleep(delay)
                continue
            except (ConnectFailed, StreamClosed) as exc:
                log.warning("mesh stream to %s: %s", address, exc)
                clean = ended_cleanly(exc)
            finally:
                self._connected_to = None
            if trio.current_time() - started > STABLE_AFTER:
                redirects = 0
                attempt = 0
            attempt += 1
            delay, same = reconnect_plan(attempt, clean=clean, backoff=backoff)
            if same:
                override = address
                self._closed_reconnects += 1
            else:
                target_index += 1
            self._last_reconnect_delay = delay
            log.info("reconnecting %sin %.3fs (the mesh stays as applied meanwhile)",
                     f"to {address} " if same else "", delay)
            await trio.sleep(delay)

    def _hello(self) -> wire.Hello:
        gen = self._applied.generation if self._applied else 0
        return wire.Hello(self._node, self._public_key(), gen, self._settings.daemon_version)

    async def _session(self, address: str) -> None:
        token = (await trio.Path(self._settings.token_file).read_text()).strip()
        async with open_mesh_stream(address, self._settings.tls, token, self._hello()) as stream:
            self._connects += 1
            self._connected_to = address
            self._first_connected.set()
            log.info("mesh stream to %s open", address)
            # The stream's end (a close, a Redirect, a refusal) is caught
            # inside the nursery and raised after it: raised through it, it
            # would arrive wrapped in an ExceptionGroup that `run` does not
            # catch, and the daemon would stop reconnecting.
            ended: _Redirected | StreamClosed | None = None
            self._live_received = lambda: stream.received
            steps_send, steps_receive = trio.open_memory_channel[wire.RotationStep](
                ROTATION_QUEUE)
            try:
                async with steps_send, steps_receive, trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, stream)
                    nursery.start_soon(self._rotations, stream, steps_receive)
                    try:
                        # Batches read while an apply ran, in order.
                        pending: deque[list[wire.ControllerMessage]] = deque()
                        while True:
                            batch = pending.popleft() if pending else await stream.receive_batch()
                            if _ends_the_stream(batch):
                                # It applies nothing: it raises before that.
                                acks = await self._handle(batch, steps_send)
                            else:
                                acks = await self._handle_on_lane(stream, batch, steps_send,
                                                                  pending)
                            if acks:
                                await stream.send_batch(acks)
                    except (_Redirected, StreamClosed) as exc:
                        ended = exc
                    nursery.cancel_scope.cancel()
            finally:
                # Also when cancelled (the daemon stopping): the counts of a
                # stream that ended must stay in the totals, once.
                done = stream.received
                self._received_before = (self._received_before[0] + done[0],
                                         self._received_before[1] + done[1])
                self._live_received = lambda: (0, 0)
            assert ended is not None
            raise ended

    async def _handle_on_lane(
        self,
        stream: ControllerStream,
        batch: list[wire.ControllerMessage],
        steps: trio.MemorySendChannel[wire.RotationStep],
        pending: deque[list[wire.ControllerMessage]],
    ) -> list[wire.NodeMessage]:
        """`_handle(batch)` on the lane, reading the stream on meanwhile (into
        `pending`). Returns its acks; raises the stream's end as soon as it
        comes, leaving the apply to finish on the lane."""
        await self._lane_idle.wait()  # an apply the previous stream left running
        lane = self._lane
        if lane is None:  # not under `run`
            return await self._handle(batch, steps)
        idle = self._lane_idle = trio.Event()
        result: list[list[wire.NodeMessage]] = []
        failed: list[Exception] = []
        abandoned = False

        async def work() -> None:
            try:
                result.append(await self._handle(batch, steps))
            except Exception as exc:
                failed.append(exc)
                if abandoned:
                    log.error("an apply left running by an ended stream failed",
                              exc_info=exc)
            finally:
                idle.set()

        lane.start_soon(work)
        closed: StreamClosed | None = None
        async with trio.open_nursery() as watch:
            async def read_on() -> None:
                nonlocal closed
                try:
                    while True:
                        pending.append(await stream.receive_batch())
                except StreamClosed as exc:
                    closed = exc
                    watch.cancel_scope.cancel()

            watch.start_soon(read_on)
            await idle.wait()
            watch.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if result:
            # Done first: the stream's end, if it came, is raised again by the
            # next read once `pending` is handled.
            return result[0]
        assert closed is not None
        abandoned = True
        self._ended_mid_apply += 1
        log.info("the stream ended during an apply: reconnecting now, the apply "
                 "finishes meanwhile")
        raise _end_among(pending, closed)

    async def _rotations(self, stream: _Sender,
                         steps: trio.MemoryReceiveChannel[wire.RotationStep]) -> None:
        from vpblu.messages import RotationStepDone

        async for step in steps:
            # Steps queued together (a batch of rotations reaching a phase at
            # once) are answered together, in one write, while the answers held
            # are younger than RESULTS_HELD: the controller waits on each.
            results: list[wire.NodeMessage] = []
            held_since = trio.current_time()
            while True:
                if self._rotator is None:
                    done = RotationStepDone("this daemon does not rotate keys")
                else:
                    done = await self._rotator.rotate(step)
                results.append(_result(step, done))
                if trio.current_time() - held_since >= RESULTS_HELD:
                    break
                try:
                    step = steps.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await stream.send_batch(results)
            except StreamClosed:
                return  # the receive loop sees the end too; a resent step is run again

    async def _heartbeat(self, stream: _Sender) -> None:
        """Heartbeats (carrying telemetry when there is a source) and, between
        them, telemetry that changed: see the module docstring."""
        # Jittered: daemons that (re)connected together, after a controller
        # failover say, would otherwise beat together, N at once every period.
        settings, source = self._settings, self._telemetry
        now = trio.current_time()
        next_beat = now + self._jittered(settings.heartbeat_period)
        next_sample = now  # the first sample goes out soon after connecting
        last_sent = -math.inf
        reporter = TelemetryReporter(full_refresh=settings.full_refresh)
        try:
            while True:
                applied_changed = self._applied_changed
                with trio.move_on_at(next_beat if source is None
                                     else min(next_beat, next_sample)):
                    if source is None:
                        await trio.sleep_forever()
                    else:
                        await applied_changed.wait()
                now = trio.current_time()
                beat = now >= next_beat
                if not beat and now < last_sent + settings.telemetry_interval:
                    next_sample = last_sent + settings.telemetry_interval  # coalesce
                    continue
                message: wire.NodeMessage = wire.Heartbeat()
                if source is not None:
                    next_sample = now + settings.sample_period
                    sample = await self._sample(source)
                    if sample is not None:
                        planned = reporter.plan(sample, now, beat=beat)
                        if planned is None:
                            continue
                        message = planned
                    elif not beat:
                        continue
                await stream.send_batch([message])
                # Any message is proof of life: the next beat is a period after it.
                next_beat = now + self._jittered(settings.heartbeat_period)
                if isinstance(message, wire.Telemetry):
                    last_sent = now
                    self._telemetry_sent += 1
        except StreamClosed:
            return  # the receive loop sees the end too, and reports it

    @staticmethod
    def _jittered(period: float) -> float:
        return period * random.uniform(1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER)

    async def _sample(self, source: TelemetrySource) -> wire.Telemetry | None:
        applied = self._applied
        try:
            sample = await source.sample(applied.state if applied else None)
        except Exception as exc:
            # Telemetry is best effort: a failed sample must never end the
            # stream (and with it the node's desired state); a beat still goes.
            log.warning("telemetry sample failed: %s", exc)
            return None
        sample = attrs.evolve(sample, applied_generation=applied.generation if applied else 0)
        self._latest_telemetry = sample
        return sample

    def _record_apply(self, seconds: float, *, ok: bool) -> None:
        # Drained by the daemon's metrics at each scrape; bounded if nobody scrapes.
        if len(self.apply_durations) >= APPLY_DURATIONS_KEPT:
            del self.apply_durations[: APPLY_DURATIONS_KEPT // 2]
        self.apply_durations.append((seconds, ok))

    async def _handle(
        self,
        batch: Sequence[wire.ControllerMessage],
        steps: trio.MemorySendChannel[wire.RotationStep],
    ) -> list[wire.NodeMessage]:
        """Fold the batch into one target state, apply it once, acknowledge;
        queue rotation steps for their own task."""
        applied = self._applied
        target = applied
        syncs = 0
        acks: list[wire.NodeMessage] = []
        for message in batch:
            current_gen = target.generation if target else 0
            match message:
                case wire.SyncState(generation=gen, state=state):
                    if target is not None and gen <= current_gen:
                        self._ignored_stale += 1
                        continue
                    target = AppliedRecord(gen, state)
                    syncs += 1
                case wire.Delta(generation=gen, base_generation=base, changes=changes):
                    if target is not None and gen <= current_gen:
                        self._ignored_stale += 1
                        continue
                    if target is None or base != current_gen:
                        self._refused_deltas += 1
                        acks.append(wire.Ack(gen, f"delta base {base} is not the applied "
                                                  f"generation {current_gen}"))
                        continue
                    target = AppliedRecord(gen, apply(target.state, changes))
                case wire.Redirect(leader=leader):
                    raise _Redirected(leader)
                case wire.Refused(reason=reason):
                    raise StreamClosed(f"the controller refused this daemon: {reason}")
                case wire.RotationStep(stamp=stamp, slot=slot):
                    from vpblu.messages import RotationStepDone

                    guard = self._step_guard
                    # A thread only for the fsynced write (a new highest stamp on disk).
                    refusal = (await trio.to_thread.run_sync(guard.admit, stamp, slot)
                               if guard.writes(stamp, slot) else guard.admit(stamp, slot))
                    if refusal is not None:
                        acks.append(_result(message, RotationStepDone(refusal)))
                        continue
                    try:
                        steps.send_nowait(message)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        continue  # its stream ended meanwhile: the step is resent
                    except trio.WouldBlock:
                        acks.append(_result(message, RotationStepDone(
                            "too many rotation steps queued")))
        for message in batch:
            if isinstance(message, wire.SyncState | wire.Delta):
                self._highest_seen = max(self._highest_seen, message.generation)
        if target is not None and target is not applied:
            started = trio.current_time()
            try:
                await self._applier.apply(target.state, whole=syncs > 0)
            except Exception as exc:
                log.exception("applying generation %d failed", target.generation)
                self._apply_failures += 1
                self._record_apply(trio.current_time() - started, ok=False)
                acks.append(wire.Ack(target.generation, f"apply failed: {exc}"))
                return acks
            self._record_apply(trio.current_time() - started, ok=True)
            self._applied = target
            self._syncs_applied += syncs
            self._applied_changed.set()
            self._applied_changed = trio.Event()
        if self._applied is not None:
            acks.append(wire.Ack(self._applied.generation))
        return acks


APPLY_DURATIONS_KEPT = 1024


def _ends_the_stream(batch: Sequence[wire.ControllerMessage]) -> bool:
    return any(isinstance(m, wire.Redirect | wire.Refused) for m in batch)


def _end_among(batches: Sequence[Sequence[wire.ControllerMessage]],
               closed: StreamClosed) -> _Redirected | StreamClosed:
    """How a stream that ended with `batches` unhandled ended: a Redirect or a
    refusal among them says it, else `closed`."""
    for batch in batches:
        for message in batch:
            match message:
                case wire.Redirect(leader=leader):
                    return _Redirected(leader)
                case wire.Refused(reason=reason):
                    return StreamClosed(f"the controller refused this daemon: {reason}")
    return closed


def ended_cleanly(exc: StreamClosed) -> bool:
    """The controller ended the stream on purpose and said so (gRPC status OK
    in its trailers); not a connect failure, a reset or a refusal."""
    return not isinstance(exc, ConnectFailed) and exc.status == "OK"


def reconnect_plan(attempt: int, *, clean: bool, backoff: Backoff) -> tuple[float, bool]:
    """(seconds to wait, back to the same controller?) before reconnect number
    `attempt` (1-based, in a row): the first after a clean end is jittered
    within CLOSED_RECONNECT_JITTER to the same controller; any other backs
    off (attempt 1: RECONNECT_INITIAL plus jitter, doubling) to the next."""
    if clean and attempt == 1:
        return random.uniform(0, CLOSED_RECONNECT_JITTER), True
    return backoff.delay(attempt), False


def _result(step: wire.RotationStep, done: RotationStepDone) -> wire.RotationResult:
    return wire.RotationResult(step.rotation_id, step.step, step.rotating_node, step.stamp,
                               done.error, done.new_public_key)


class _Sender(Protocol):
    async def send_batch(self, messages: Sequence[wire.NodeMessage]) -> None: ...
