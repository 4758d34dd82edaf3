"""LeaseThreadActor: the Lease kept on an OS thread of its own.

Owns the thread that runs this replica's `LeaderActor`, with its own trio
loop, its own asyncio loop (vpblu.aioloop) and its own Kubernetes client,
and the hand-over of every `LeaderObserved` it reports to the main loop.

Why a thread: the renewal must not wait for the controller's main loop. That
loop serves a thousand daemons' TLS accepts, HTTP/2 frames and the
StateActor's recomputes; in every N=1000 benchmark run a busy stretch of it
outlasted the renew deadline and the leader stepped down in the middle of a
connect storm - dropping every stream and making the storm worse. On its own
loop the renewal waits only for the GIL, which the main thread hands over
every `sys.getswitchinterval()` (5 ms) of pure-Python work, so a renewal's
few dozen switch points cost well under a second however long the main loop
is held.

What it must never do: act as the leader. It only reports; stepping down
(the thread saw the renew deadline pass, or another holder) reaches the
LeadershipActor as `LeaderObserved(False, ...)` through the main loop, which
cancels the leader work as before. The thread touches no state of the main
loop: messages cross by `TrioToken.run_sync_soon` into an unbounded channel
(its reason: the thread must never block on a busy main loop, and it sends
only on a change of holder, a handful per term), and the main loop stops the
thread by cancelling its scope through the thread's own token. On
cancellation the thread releases a held Lease (LeaderActor's shielded
release, bounded by one retry period) before this actor returns.

The other side of renewing on a thread: a main loop that never runs again (a
task stuck in a CPU loop, a deadlock in a C extension) would keep the Lease
for ever while leading nothing. So the thread asks the main loop for a
callback every `wedged_after / 10`; one not run within `wedged_after` (60 s:
far above the longest busy stretch measured at N=1000, a few seconds) makes
the thread release the Lease and end, and another replica leads. If the main
loop comes back it finds the thread gone and this actor fails: its supervisor
starts it again, and this replica competes for the Lease like any other.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path

import trio

from vpblu import aioloop
from vpblu.actors.leader import LeaderActor, LeaseSettings
from vpblu.kube import client as k
from vpblu.messages import LeaderObserved

log = logging.getLogger(__name__)

# A main loop that has run none of the Lease thread's callbacks this long is
# wedged: the Lease is released.
WEDGED_AFTER = 60.0

ClientFactory = Callable[[], AbstractAsyncContextManager[k.KubeApi]]


def kubeconfig_client(kubeconfig: Path | None, user_agent: str | None = None) -> ClientFactory:
    """The Lease thread's own client: opened and closed on the thread's loop."""
    return lambda: k.open_kube_client(kubeconfig, user_agent=user_agent)


def _deliver(inbox: trio.MemorySendChannel[LeaderObserved], observed: LeaderObserved) -> None:
    """On the main loop, as a run_sync_soon callback: it must never raise."""
    # Closed: the actor is stopping; its leader work is being cancelled with it.
    with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        inbox.send_nowait(observed)


class LeaseThreadActor:
    """Runs `LeaderActor(kube, identity, address, ..., settings)` on its own
    OS thread and forwards what it observes to `out` on the calling loop."""

    def __init__(self, open_client: ClientFactory, identity: str, address: str,
                 out: trio.MemorySendChannel[LeaderObserved],
                 settings: LeaseSettings | None = None, *,
                 wedged_after: float = WEDGED_AFTER) -> None:
        self._open_client = open_client
        self._wedged_after = wedged_after
        # When the main loop last ran the thread's callback (time.monotonic()):
        # written on the main thread, read on the Lease thread (one float).
        self._main_ran_at = time.monotonic()
        self._identity = identity
        self._address = address
        self._out = out
        self._settings = settings or LeaseSettings()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread_token: trio.lowlevel.TrioToken | None = None
        self._thread_scope: trio.CancelScope | None = None
        self._said_leading = False  # the last LeaderObserved forwarded was is_me

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        main_token = trio.lowlevel.current_trio_token()
        inbox_send, inbox_receive = trio.open_memory_channel[LeaderObserved](math.inf)
        async with self._out, inbox_send, inbox_receive, trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, inbox_receive)
            nursery.start_soon(self._run_thread, main_token, inbox_send)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._stop_thread()
                self._step_down_on_the_way_out()

    async def _forward(self, inbox: trio.MemoryReceiveChannel[LeaderObserved]) -> None:
        async for observed in inbox:
            await self._out.send(observed)
            self._said_leading = observed.is_me

    def _step_down_on_the_way_out(self) -> None:
        """Whatever ends this actor (its thread crashed, a restart, shutdown): once
        it is gone nobody renews the Lease, so the leader work must not go on
        through the restart backoff while another replica takes over."""
        if self._said_leading:
            self._said_leading = False
            with suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                self._out.send_nowait(LeaderObserved(False, None, None))

    async def _run_thread(self, main_token: trio.lowlevel.TrioToken,
                          inbox: trio.MemorySendChannel[LeaderObserved]) -> None:
        # Not abandoned on cancel: run() waits for the thread to release the Lease.
        await trio.to_thread.run_sync(
            self._thread_main, main_token, inbox, limiter=trio.CapacityLimiter(1))
        raise RuntimeError("the Lease thread ended while it should still run")

    def _stop_thread(self) -> None:
        """Thread-safe: cancel the thread's loop through its own token."""
        with self._lock:
            self._stopping = True
            token, scope = self._thread_token, self._thread_scope
        if token is not None and scope is not None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)

    # --- on the Lease thread ---------------------------------------------------------

    def _thread_main(self, main_token: trio.lowlevel.TrioToken,
                     inbox: trio.MemorySendChannel[LeaderObserved]) -> None:
        threading.current_thread().name = f"lease-{self._settings.name}"
        trio.run(self._thread_async, main_token, inbox)

    async def _thread_async(self, main_token: trio.lowlevel.TrioToken,
                            inbox: trio.MemorySendChannel[LeaderObserved]) -> None:
        with trio.CancelScope() as scope:
            with self._lock:
                if self._stopping:
                    return
                self._thread_token = trio.lowlevel.current_trio_token()
                self._thread_scope = scope
            async with aioloop.open_loop(), self._open_client() as kube:
                send, receive = trio.open_memory_channel[LeaderObserved](16)
                actor = LeaderActor(kube, self._identity, self._address, send, self._settings)
                async with receive, trio.open_nursery() as nursery:
                    nursery.start_soon(actor.run)
                    nursery.start_soon(self._watch_main_loop, main_token, scope)
                    async for observed in receive:
                        try:
                            main_token.run_sync_soon(_deliver, inbox, observed)
                        except trio.RunFinishedError:
                            # The main loop is gone: nobody left to lead for.
                            scope.cancel()
                            break
        # Cancelled by _stop_thread or the watchdog: LeaderActor released the
        # Lease on its way out.

    def _main_loop_ran(self) -> None:
        """On the main loop, as a run_sync_soon callback."""
        self._main_ran_at = time.monotonic()

    async def _watch_main_loop(self, main_token: trio.lowlevel.TrioToken,
                               scope: trio.CancelScope) -> None:
        period = self._wedged_after / 10
        while True:
            asked_at = time.monotonic()
            try:
                main_token.run_sync_soon(self._main_loop_ran)
            except trio.RunFinishedError:
                scope.cancel()  # the main loop is gone: nobody left to lead for
                return
            # One callback at a time: a wedged loop's queue does not grow.
            while self._main_ran_at < asked_at:
                if time.monotonic() - asked_at > self._wedged_after:
                    log.error("the controller's main loop has not run for %.0f s: "
                              "releasing the Lease for another replica to lead",
                              time.monotonic() - asked_at)
                    scope.cancel()
                    return
                await trio.sleep(period)
            await trio.sleep(period)
