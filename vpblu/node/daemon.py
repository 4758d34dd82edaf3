"""The node daemon: the key, the WireGuard backend and the supervised tree of node actors.

Owns the order in which a node comes up and the bridge from the warm stream to
the kernel actors. `run_daemon` loads the key first (a damaged key file stops
the daemon before anything on the node is touched), picks the WireGuard
backend (and logs which), and runs one supervisor over NetlinkActor, MtuActor,
BpfMapActor and StreamActor, in that order: the interface exists before its
MTU is set, and the kernel actors hold their resources before the stream can
ask them for anything. `KernelApplier` is the StreamActor's `Applier`: it asks
the NetlinkActor and the BpfMapActor by message and raises when either fails,
so the StreamActor acknowledges the generation with an error.

Order of one apply (no packet is ever marked for a CIDR that has no mesh
route): (1) the NetlinkActor gets the new peers and the union of the new
routes and those the classifier still marks; (2) the BpfMapActor gets the new
routes and blocks; (3) only if a route went away, the NetlinkActor gets the
exact state, removing routes nothing marks any more. Behind all of it the mesh
table ends in ``unreachable default`` (NetlinkActor), so even a marked packet
without a route is dropped, never sent in the clear through the main table.
After a restart the applier does not know what the pinned maps mark; its first
apply may then remove a route a moment before its mark, and those packets hit
the unreachable default: dropped, not leaked.

`cleanup_node` is the uninstall: it removes everything the daemon created and
keeps the key unless asked. It must never run while a daemon runs on the node,
and the daemon itself never removes anything because the controller or the
API server went away (DESIGN §7).
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from vpblu import wire
from vpblu.messages import (
    Applied,
    ApplyDataPath,
    ApplyDesiredState,
    ApplyOutcome,
    BpfMapInbox,
    DataPathApplied,
    MtuInbox,
    NetlinkInbox,
    RotationStepDone,
    RunRotationStep,
)
from vpblu.model import NodeDesiredState, Route
from vpblu.node.bpfmaps import BpfMapActor
from vpblu.node.config import DaemonConfig
from vpblu.node.keys import KEY_FILE_NAME, KeyStore
from vpblu.node.mtu import IptablesMtuKernel, MtuActor
from vpblu.node.netlink import IPRouteKernel, NetlinkActor, remove_mesh
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.node.wireguard import (
    KernelBackend,
    UserspaceBackend,
    WireGuardBackend,
    select_backend,
)
from vpblu.supervisor import ChildSpec, Strategy, Supervisor, with_inbox_clone

log = logging.getLogger(__name__)

# One apply step waits this long for its actor's reply; an actor that crashed
# holding the request never answers, and the StreamActor must get an error Ack
# rather than hang (its next SyncState retries, level-triggered).
APPLY_STEP_TIMEOUT = 30.0
# A rotation step may wait behind an apply, and runs under the NetlinkActor's own
# ROTATION_STEP_TIMEOUT (45 s).
ROTATION_STEP_WAIT = 90.0


@attrs.frozen(slots=True)
class DaemonSettings:
    config: DaemonConfig
    stream: StreamSettings


class _Writes(Protocol):
    @property
    def writes(self) -> int: ...


class WriteCounted(Protocol):
    """A kernel adapter that counts its writes (IPRouteKernel, a WireGuardBackend)."""

    def statistics(self) -> _Writes: ...


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
    ) -> None:
        self._netlink = netlink
        self._datapath = datapath
        self._routes_counter = routes_counter
        self._wireguard_counter = wireguard_counter
        self._step_timeout = step_timeout
        # The routes the classifier was last told to mark.
        self._marked_routes: tuple[Route, ...] = ()
        self._applies = 0
        self._map_writes = 0
        self._last_apply: float | None = None

    def statistics(self) -> ApplierStatistics:
        return ApplierStatistics(
            self._applies,
            self._routes_counter.statistics().writes,
            self._wireguard_counter.statistics().writes,
            self._map_writes,
            self._last_apply,
        )

    async def apply(self, state: NodeDesiredState) -> None:
        started = trio.current_time()
        before = self.statistics()
        wanted = {r.cidr for r in state.routes}
        still_marked = tuple(r for r in self._marked_routes if r.cidr not in wanted)
        widened = attrs.evolve(state, routes=state.routes + still_marked)
        first = await self._apply_netlink(widened)
        datapath = await self._apply_datapath(state)
        self._marked_routes = state.routes
        last = await self._apply_netlink(state) if still_marked else Applied()
        elapsed = trio.current_time() - started
        self._applies += 1
        self._map_writes += datapath.written + datapath.deleted
        self._last_apply = elapsed
        after = self.statistics()
        log.info(
            "apply done in %.1f ms: %d peers, %d routes, %d blocks; writes netlink=%d "
            "wireguard=%d maps=%d; since start netlink=%d wireguard=%d; "
            "peers +%d ~%d -%d, routes +%d -%d",
            elapsed * 1000,
            len(state.peers),
            len(state.routes),
            len(state.blocks),
            after.netlink_writes - before.netlink_writes,
            after.wireguard_writes - before.wireguard_writes,
            after.map_writes - before.map_writes,
            after.netlink_writes,
            after.wireguard_writes,
            len(first.peers_added),
            len(first.peers_changed),
            len(first.peers_removed),
            len(first.routes_added),
            len(last.routes_removed),
        )

    async def rotate(self, step: wire.RotationStep) -> RotationStepDone:
        send, receive = trio.open_memory_channel[RotationStepDone](1)
        async with send, receive:
            with trio.move_on_after(ROTATION_STEP_WAIT) as scope:
                await self._netlink.send(RunRotationStep(step, send))
                done = await receive.receive()
        if scope.cancelled_caught:
            return RotationStepDone(f"no answer from the netlink actor in {ROTATION_STEP_WAIT}s")
        return done

    async def _apply_netlink(self, state: NodeDesiredState) -> Applied:
        send, receive = trio.open_memory_channel[ApplyOutcome](1)
        async with send, receive:
            with trio.fail_after(self._step_timeout):
                await self._netlink.send(ApplyDesiredState(state, send))
                outcome = await receive.receive()
        match outcome:
            case Applied():
                return outcome
            case _:
                raise ApplyError(f"netlink: {outcome.error}")

    async def _apply_datapath(self, state: NodeDesiredState) -> DataPathApplied:
        send, receive = trio.open_memory_channel[DataPathApplied](1)
        async with send, receive:
            with trio.fail_after(self._step_timeout):
                await self._datapath.send(ApplyDataPath(state.routes, state.blocks, reply=send))
                result = await receive.receive()
        if result.refused is not None:
            raise ApplyError(f"eBPF maps: {result.refused}")
        return result


async def run_daemon(settings: DaemonSettings) -> None:
    """Run the node daemon until cancelled or its supervisor gives up.

    Raises `vpblu.node.keys.KeyFileError` before touching the node when the
    key file is unusable, and `SupervisorEscalation` when the tree gives up.
    Must run inside `trio_asyncio.open_loop()` (the stream's transport needs it).
    """
    config = settings.config
    keys = await trio.to_thread.run_sync(KeyStore.load_or_create, config.state_dir)
    try:
        log.info("node %s: key %s (public %s)", config.node_name, keys.path, keys.public_key)
        backend = await select_backend(config)
        kernel = IPRouteKernel()
        mtu_kernel = IptablesMtuKernel()
        # Unbuffered: a request waits for its actor, and the actor's reply is the
        # only acknowledgement the applier needs.
        netlink_send, netlink_recv = trio.open_memory_channel[NetlinkInbox](0)
        bpf_send, bpf_recv = trio.open_memory_channel[BpfMapInbox](0)
        mtu_send, mtu_recv = trio.open_memory_channel[MtuInbox](0)
        applier = KernelApplier(
            netlink_send, bpf_send, routes_counter=kernel, wireguard_counter=backend
        )
        stream = StreamActor(config.node_name, lambda: keys.public_key, applier, settings.stream,
                             rotator=applier)
        tree = Supervisor(
            "daemon",
            [
                ChildSpec(
                    "netlink",
                    with_inbox_clone(
                        lambda inbox: NetlinkActor(config, keys, backend, kernel, inbox),
                        netlink_recv,
                    ),
                ),
                ChildSpec(
                    "mtu",
                    with_inbox_clone(lambda inbox: MtuActor(config, mtu_kernel, inbox), mtu_recv),
                ),
                ChildSpec(
                    "bpfmaps", with_inbox_clone(lambda inbox: BpfMapActor(config, inbox), bpf_recv)
                ),
                # One StreamActor object across restarts: it keeps what it applied,
                # so a reconnect after its crash still says the right generation.
                ChildSpec("stream", lambda: stream.run),
            ],
            strategy=Strategy.ONE_FOR_ONE,
        )
        # The original channel ends stay open for the tree's lifetime (see
        # with_inbox_clone); the MtuActor's sender is kept so its inbox never ends.
        async with netlink_send, netlink_recv, bpf_send, bpf_recv, mtu_send, mtu_recv:
            await tree.run()
    finally:
        keys.close()


async def cleanup_node(config: DaemonConfig, *, remove_key: bool = False) -> None:
    """Remove what the daemon created on this node: the classifier's tc filters
    (and clsact qdiscs left empty) and pinned maps, the MSS clamp rules, the
    mesh rules, routes and unreachable defaults, and the interface. Idempotent.
    The key stays unless `remove_key`."""
    _unused_bpf_send, unused_bpf = trio.open_memory_channel[BpfMapInbox](0)
    _unused_mtu_send, unused_mtu = trio.open_memory_channel[MtuInbox](0)
    async with _unused_bpf_send, unused_bpf, _unused_mtu_send, unused_mtu:
        # The classifier first: once it stops marking, removing the rule and
        # routes changes nothing for any packet.
        await BpfMapActor(config, unused_bpf).cleanup()
        await MtuActor(config, IptablesMtuKernel(), unused_mtu).cleanup()
    userspace = UserspaceBackend()
    backend: WireGuardBackend = (
        userspace if userspace.socket_path(config.interface).exists() else KernelBackend()
    )
    await remove_mesh(config, backend, IPRouteKernel())
    if remove_key:
        key_file = trio.Path(config.state_dir / KEY_FILE_NAME)
        await key_file.unlink(missing_ok=True)
        log.info("removed the key file %s", key_file)
    log.info("node %s: cleanup done", config.node_name)

