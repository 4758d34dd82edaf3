"""RotationsActor: one RotationActor per node, started and stopped as nodes
come and go, and the leader's `RotationPorts` that connect them to the
StatusActor and the StateActor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import trio

from vpblu.actors.rotation import (
    PEERS_TIMEOUT,
    ROTATION_MAILBOX,
    PeersUnknown,
    RotationActor,
    RotationPorts,
    RotationSettings,
    RotationToken,
)
from vpblu.core import wire
from vpblu.core.sources import LastRotation, RotationRecord
from vpblu.messages import (
    NodeRotationView,
    PeersWanted,
    RotationInbox,
    RotationRecorded,
    RotationResultReceived,
    RotationResultsReceived,
    RotationsInbox,
    RotationStatus,
    RotationViews,
    SendRotationStep,
    StateInbox,
    StatusInbox,
)
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)


class LeaderRotationPorts:
    """`RotationPorts` on the leader: status through the StatusActor, steps through
    the StateActor (which holds the sessions)."""

    def __init__(self, status: trio.MemorySendChannel[StatusInbox],
                 state: trio.MemorySendChannel[StateInbox],
                 metrics: ControllerMetrics | None = None) -> None:
        self._status = status
        self._state = state
        self._metrics = metrics

    async def persist(self, node: str, record: RotationRecord | None, *,
                      public_key: str | None = None, last: LastRotation | None = None) -> None:
        message = RotationStatus(node, record, public_key, last)
        await self._status.send(message)
        await message.written.wait()
        # Before the step this record announces goes out (the same inbox):
        # the StateActor publishes a rotating node's key from what was
        # recorded here, not from a status anyone may patch.
        await self._state.send(RotationRecorded(node, record, public_key))
        if self._metrics is not None:
            phase = record.phase.value if record is not None else None
            self._metrics.rotation_recorded(node, phase,
                                            last.outcome if last is not None else None)

    async def send_step(self, nodes: Sequence[str], step: wire.RotationStep, *,
                        gather: bool = False) -> None:
        await self._state.send(SendRotationStep(tuple(nodes), step, gather))

    async def peers_of(self, node: str) -> tuple[str, ...]:
        reply, answer = trio.open_memory_channel[tuple[str, ...]](1)
        await self._state.send(PeersWanted(node, reply))
        # A StateActor that restarts drops the question: do not wait forever.
        with trio.move_on_after(PEERS_TIMEOUT):
            async with answer:
                return await answer.receive()
        raise PeersUnknown(f"no answer in {PEERS_TIMEOUT:.0f}s to who peers with {node}")

    def wall_clock(self) -> float:
        return time.time()


class RotationsActor:
    """Starts one RotationActor per node and stops it when the node goes; routes
    daemons' RotationResults to the rotating node's actor. Holds the RotationToken."""

    def __init__(self, ports: RotationPorts, inbox: trio.MemoryReceiveChannel[RotationsInbox],
                 settings: RotationSettings | None = None, *,
                 metrics: ControllerMetrics | None = None) -> None:
        self._ports = ports
        self._metrics = metrics
        self.answers_dropped = 0  # answers a rotation's full mailbox could not take
        self._inbox = inbox
        self._settings = settings if settings is not None else RotationSettings()
        # Batches as large as the RotationPolicies allow (each node's view says its
        # policy's maxConcurrent).
        self._token = RotationToken(limit=wire.MAX_ROTATION_SLOTS)
        self._actors: dict[str, tuple[trio.CancelScope,
                                      trio.MemorySendChannel[RotationInbox]]] = {}
        self._forwarded: dict[str, NodeRotationView] = {}

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._actors)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, trio.open_nursery() as nursery:
            task_status.started()
            async for message in self._inbox:
                match message:
                    case RotationViews(nodes=views):
                        await self._update(nursery, views)
                    case RotationResultReceived():
                        self._route(message)
                    case RotationResultsReceived(node=node, results=results):
                        for result in results:
                            self._route(RotationResultReceived(node, result))
            nursery.cancel_scope.cancel()

    def _route(self, message: RotationResultReceived) -> None:
        """An answer to the rotating node's actor (whose rotation it is)."""
        actor = self._actors.get(message.result.rotating_node)
        if actor is not None:
            try:
                actor[1].send_nowait(message)
            except trio.WouldBlock:
                self._answer_dropped(message.result.rotating_node)
            except trio.BrokenResourceError:
                pass  # its actor is ending: so is its rotation's wait

    def _answer_dropped(self, node: str) -> None:
        """An answer its rotation's full mailbox could not take: the step it
        answers is re-sent when the rotation's resend interval passes."""
        self.answers_dropped += 1
        if self._metrics is not None:
            self._metrics.rotation_messages_dropped.labels("answer").inc()
        if self.answers_dropped == 1 or self.answers_dropped % 1000 == 0:
            log.warning("rotation of %s: an answer dropped on a full mailbox (%d so far); "
                        "its step goes again", node, self.answers_dropped)

    async def _update(self, nursery: trio.Nursery, views: tuple[NodeRotationView, ...]) -> None:
        wanted = {v.node: v for v in views}
        for gone in set(self._actors) - set(wanted):
            scope, mailbox = self._actors.pop(gone)
            self._forwarded.pop(gone, None)
            scope.cancel()
            await mailbox.aclose()
        for node, view in wanted.items():
            if node not in self._actors:
                self._actors[node] = await nursery.start(self._run_actor, node)
            elif self._forwarded.get(node) == view:
                continue  # only a changed view wakes the node's actor
            try:
                self._actors[node][1].send_nowait(view)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self._forwarded.pop(node, None)  # offered again with the next views
            else:
                self._forwarded[node] = view

    async def _run_actor(self, node: str, *, task_status: trio.TaskStatus[
            tuple[trio.CancelScope, trio.MemorySendChannel[RotationInbox]]]
            = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[RotationInbox](ROTATION_MAILBOX)
        with trio.CancelScope() as scope:
            actor = RotationActor(node, self._ports, self._token, receive, self._settings)
            task_status.started((scope, send))
            await actor.run()
