"""KernelApplier: the StreamActor's `Applier` (and `Rotator`). It asks
the NetlinkActor and the BpfMapActor by message and raises when either fails,
so the StreamActor acknowledges the generation with an error.

Order of one apply: (1) the BpfMapActor gets the blocks and the pod ranges,
so a new block is enforced before a new tunnel can carry the traffic it
refuses; (2) the NetlinkActor gets the peers, routes and steering. Nothing
is marked, so no order between the two can leak: a pod range without a
tunnel route falls to the fail-closed sink of the mesh table, whatever step
is in flight (vpblu.node.netlink).

Before the data-path programs are loaded (the daemon starts the stream and
the NetlinkActor first, and the BpfMapActor compiles meanwhile: `datapath_ready`
is not set yet), a state without blocks goes to the NetlinkActor alone, at
once: peers and routes do not wait for the compiler, since there is nothing
for the programs to enforce; what encrypts is the steering, which is the
NetlinkActor's. The maps catch up with the latest state as soon as the
programs are there (`catch_up`). A state with blocks still waits for the maps
first: a tunnel never carries a pair a block refuses, whether or not the
programs were ready.

The StreamActor holds one from before the daemon's Hello, so this module
imports the actors' messages only where it sends them (`vpblu.messages` is
a good part of the daemon's imports, and the Hello waits for none of it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from vpblu.core import wire
from vpblu.core.model import NodeDesiredState

if TYPE_CHECKING:
    from vpblu.messages import (
        Applied,
        BpfMapInbox,
        DataPathApplied,
        NetlinkInbox,
        RotationStepDone,
    )

log = logging.getLogger(__name__)

# One apply step waits this long for its actor's reply; an actor that crashed
# holding the request never answers, and the StreamActor must get an error Ack
# rather than hang (its next SyncState retries, level-triggered).
APPLY_STEP_TIMEOUT = 30.0

# A rotation step may wait behind an apply, and runs under the NetlinkActor's own
# ROTATION_STEP_TIMEOUT (45 s).
ROTATION_STEP_WAIT = 90.0


class WriteCount(Protocol):
    @property
    def writes(self) -> int: ...


class WriteCounted(Protocol):
    """A kernel adapter that counts its writes (IPRouteKernel, a WireGuardBackend)."""

    def statistics(self) -> WriteCount: ...


@attrs.frozen(slots=True)
class ApplierStatistics:
    applies: int
    netlink_writes: int  # routes, rules, links, sysctls
    wireguard_writes: int  # UAPI / generic netlink writes
    map_writes: int  # eBPF map entries set or deleted
    last_apply_seconds: float | None


class ApplyError(Exception):
    """A kernel actor refused or failed its part of an apply."""


class KernelApplier:
    """`vpblu.node.stream.Applier` over the NetlinkActor and the BpfMapActor, and
    `vpblu.node.stream.Rotator` over the NetlinkActor."""

    def __init__(
        self,
        netlink: trio.MemorySendChannel[NetlinkInbox],
        datapath: trio.MemorySendChannel[BpfMapInbox],
        *,
        routes_counter: WriteCounted,
        wireguard_counter: WriteCounted,
        step_timeout: float = APPLY_STEP_TIMEOUT,
        datapath_ready: trio.Event | None = None,
    ) -> None:
        self._netlink = netlink
        self._datapath = datapath
        self._routes_counter = routes_counter
        self._wireguard_counter = wireguard_counter
        self._step_timeout = step_timeout
        self._applies = 0
        self._map_writes = 0
        self._last_apply: float | None = None
        # None: the data path takes messages from the start (tests, a fake).
        self._datapath_ready = datapath_ready
        # The state the maps have not been given yet (set while not ready).
        self._datapath_behind: NodeDesiredState | None = None
        # One apply at a time: `catch_up` and `apply` both write the maps.
        self._lock = trio.Lock()

    def statistics(self) -> ApplierStatistics:
        return ApplierStatistics(
            self._applies,
            self._routes_counter.statistics().writes,
            self._wireguard_counter.statistics().writes,
            self._map_writes,
            self._last_apply,
        )

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> None:
        async with self._lock:
            await self._apply(state, whole)

    async def catch_up(self) -> None:
        """Give the maps the latest state `apply` took without them (no-op when
        none): call once the data path is ready."""
        async with self._lock:
            state, self._datapath_behind = self._datapath_behind, None
            if state is not None:
                try:
                    result = await self._apply_datapath(state)
                except BaseException:
                    self._datapath_behind = state  # the next catch_up tries again
                    raise
                self._map_writes += result.written + result.deleted
                log.info("data path caught up: %d map writes, %d blocks",
                         result.written + result.deleted, len(state.blocks))

    async def _apply(self, state: NodeDesiredState, whole: bool) -> None:
        started = trio.current_time()
        before = self.statistics()
        ready = self._datapath_ready is None or self._datapath_ready.is_set()
        if ready or state.blocks:
            datapath = await self._apply_datapath(state)
            self._datapath_behind = None
        else:
            from vpblu.messages import DataPathApplied

            datapath = DataPathApplied(0, 0)
            self._datapath_behind = state
        maps_done = trio.current_time()
        applied = await self._apply_netlink(state, whole)
        elapsed = trio.current_time() - started
        parts = ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in
                          (("maps", maps_done - started), *applied.timings))
        self._applies += 1
        self._map_writes += datapath.written + datapath.deleted
        self._last_apply = elapsed
        after = self.statistics()
        log.info(
            "apply done in %.1f ms (%s ms): %d peers, %d routes, %d blocks; writes netlink=%d "
            "wireguard=%d maps=%d; since start netlink=%d wireguard=%d; "
            "peers +%d ~%d -%d, routes +%d -%d%s",
            elapsed * 1000,
            parts,
            len(state.peers),
            len(state.routes),
            len(state.blocks),
            after.netlink_writes - before.netlink_writes,
            after.wireguard_writes - before.wireguard_writes,
            after.map_writes - before.map_writes,
            after.netlink_writes,
            after.wireguard_writes,
            len(applied.peers_added),
            len(applied.peers_changed),
            len(applied.peers_removed),
            len(applied.routes_added),
            len(applied.routes_removed),
            "" if self._datapath_behind is None else "; maps follow once the programs load",
        )

    async def rotate(self, step: wire.RotationStep) -> RotationStepDone:
        from vpblu.messages import RotationStepDone, RunRotationStep

        send, receive = trio.open_memory_channel[RotationStepDone](1)
        async with send, receive:
            with trio.move_on_after(ROTATION_STEP_WAIT) as scope:
                await self._netlink.send(RunRotationStep(step, send))
                done = await receive.receive()
        if scope.cancelled_caught:
            return RotationStepDone(f"no answer from the netlink actor in {ROTATION_STEP_WAIT}s")
        return done

    async def _apply_netlink(self, state: NodeDesiredState, whole: bool) -> Applied:
        from vpblu.messages import Applied, ApplyDesiredState, ApplyOutcome

        send, receive = trio.open_memory_channel[ApplyOutcome](1)
        async with send, receive:
            with trio.fail_after(self._step_timeout):
                await self._netlink.send(ApplyDesiredState(state, send, whole=whole))
                outcome = await receive.receive()
        match outcome:
            case Applied():
                return outcome
            case _:
                raise ApplyError(f"netlink: {outcome.error}")

    async def _apply_datapath(self, state: NodeDesiredState) -> DataPathApplied:
        from vpblu.messages import ApplyDataPath, DataPathApplied

        send, receive = trio.open_memory_channel[DataPathApplied](1)
        async with send, receive:
            with trio.fail_after(self._step_timeout):
                datapath = state.datapath
                await self._datapath.send(ApplyDataPath(
                    state.routes, state.blocks, local_cidrs=datapath.local_cidrs,
                    cluster_cidrs=datapath.cluster_cidrs, strict=not datapath.fail_open,
                    reply=send))
                result = await receive.receive()
        if result.refused is not None:
            raise ApplyError(f"eBPF maps: {result.refused}")
        return result
