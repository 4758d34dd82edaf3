"""SessionsActor: one NodeSessionActor per connected daemon, on the leader.

Owns the set of live sessions: it takes each authenticated stream the Mesh
server accepts, numbers it, and starts a NodeSessionActor for it under a
supervisor as a temporary child (a session is never restarted: its stream
is gone, and the daemon's reconnect makes a new one). A second stream for a
node that already has one replaces it: the old session is terminated first,
so a daemon that reconnects twice at once ends up with exactly one session,
its newest. It never reads a stream itself.
"""

from __future__ import annotations

import contextlib
import logging

import attrs
import trio

from vpblu.actors.session import NodeSessionActor, SessionSettings
from vpblu.messages import HealthInbox, StateInbox, StatusInbox
from vpblu.stream.transport import NodeStream
from vpblu.supervisor import ChildSpec, Restart, Supervisor

log = logging.getLogger(__name__)

# Sessions are temporary children: none is ever restarted, so this only
# bounds how many crash in a burst before the leader's tree is restarted.
SESSION_CRASH_LIMIT = 1000


@attrs.frozen(slots=True)
class SessionsStatistics:
    current: int  # nodes with a live session (entries of the node -> session table)
    started: int  # sessions started so far


class SessionsActor:
    def __init__(
        self,
        streams: trio.MemoryReceiveChannel[NodeStream],
        state: trio.MemorySendChannel[StateInbox],
        status: trio.MemorySendChannel[StatusInbox],
        settings: SessionSettings | None = None,
        health: trio.MemorySendChannel[HealthInbox] | None = None,
    ) -> None:
        self._streams = streams
        self._state = state
        self._status = status
        self._health = health
        self._settings = settings or SessionSettings()
        self._next_id = 0
        # node -> child name of its live session; an entry goes when its
        # session ends, so daemons that come and go leave nothing behind.
        self._current: dict[str, str] = {}

    def statistics(self) -> SessionsStatistics:
        return SessionsStatistics(len(self._current), self._next_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        supervisor = Supervisor("sessions", max_restarts=SESSION_CRASH_LIMIT, period=60.0)
        async with self._streams, self._state, self._status, trio.open_nursery() as nursery:
            try:
                await nursery.start(supervisor.run)
                task_status.started()
                async for stream in self._streams:
                    await self._replace(supervisor, stream)
                nursery.cancel_scope.cancel()
            finally:
                if self._health is not None:
                    await self._health.aclose()

    async def _replace(self, supervisor: Supervisor, stream: NodeStream) -> None:
        node = stream.node_name
        self._next_id += 1
        sid = self._next_id
        old = self._current.get(node)
        if old is not None:
            log.info("node %s reconnected; its previous session gives way", node)
            with contextlib.suppress(LookupError):  # it may have ended by itself
                await supervisor.terminate_child(old)
        name = f"session-{node}-{sid}"
        self._current[node] = name

        def factory() -> NodeSessionActor:
            return NodeSessionActor(stream, sid, self._state.clone(), self._status.clone(),
                                    self._settings,
                                    self._health.clone() if self._health is not None else None)

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await factory().run(task_status=task_status)
            finally:
                self._forget(node, name)

        try:
            await supervisor.start_child(ChildSpec(name, lambda: run, restart=Restart.TEMPORARY))
        except Exception:
            log.exception("node %s: the session could not start", node)
            self._forget(node, name)
            stream.close("the controller could not start a session")

    def _forget(self, node: str, name: str) -> None:
        # Only its own entry: a newer session of the node may have replaced it.
        if self._current.get(node) == name:
            del self._current[node]
