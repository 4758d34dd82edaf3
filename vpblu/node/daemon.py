"""The node daemon: the key, the WireGuard backend and the supervised tree of node actors.

Owns the order in which a node comes up and the bridge from the warm stream to
the kernel actors. `run_daemon` loads the key first (a damaged key file stops
the daemon before anything on the node is touched), picks the WireGuard
backend (and logs which), and runs one supervisor over StreamActor,
BpfMapActor, NetlinkActor, MtuActor and the metrics server, in that order.
The StreamActor applies through `vpblu.node.applier.KernelApplier` and samples
telemetry through `vpblu.node.telemetry.KernelTelemetry`.

Announce first (issue 20): a new node is only part of the mesh once its
public key reaches the controller, so the stream opens and the Hello goes
out before anything slow: the kernel actors' modules are imported, the
WireGuard backend chosen (in "auto" a probe through pyroute2, whose import
alone is about 0.1 s of CPU), the eBPF programs compiled (bcc, about 0.5 s
of CPU) and the interface set up only once the first stream is open, or
after HELLO_FIRST_WAIT when no controller answers (the node still comes up
as last applied). Before the Hello this module imports only what the key,
the stream and the supervisor need: the actors' messages
(`vpblu.messages`), the kernel adapters and the WireGuard backends are
imported where they are used (`python bench/daemon_start.py` measures it). Then the BpfMapActor
compiles on a worker thread while the NetlinkActor brings up WireGuard, and
the first desired state is applied as soon as WireGuard is up: its peers and
routes do not wait for the compiler unless it carries blocks (see
`KernelApplier`); the programs attach, and the maps catch up, when ready.

What holds before the programs attach (the README says it for operators):
- encryption: steering into the mesh is the NetlinkActor's ip rules and
  mesh table, with the fail-closed sink for every pod range without a
  tunnel; none of it depends on the programs. The underlay guard (the
  count of cleartext, and the strict drop behind the steering) comes with
  them; on a restart the previous daemon's guard stays attached throughout.
- blocks: a desired state with blocks waits for the maps before any tunnel
  changes, as always; a state without blocks has nothing to enforce. On a
  restart the previous daemon's programs stay attached on their pinned
  maps, so the blocks in force before the restart hold throughout.

`cleanup_node` is the uninstall: it removes everything the daemon created and
keeps the key unless asked. It must never run while a daemon runs on the node,
and the daemon itself never removes anything because the controller or the
API server went away (DESIGN §7).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from vpblu.node.applier import KernelApplier, WriteCount, WriteCounted
from vpblu.node.config import DaemonConfig
from vpblu.node.keys import KEY_FILE_NAME, KeyStore
from vpblu.node.stepguard import StepGuard
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.node.telemetry import KernelTelemetry
from vpblu.supervisor import ChildSpec, Runnable, Strategy, Supervisor

if TYPE_CHECKING:
    from vpblu.messages import BpfMapInbox, MtuInbox, NetlinkInbox
    from vpblu.metrics import DaemonMetrics
    from vpblu.node.kernel.iproute import IPRouteKernel
    from vpblu.node.kernel.wireguard import WireGuardBackend

log = logging.getLogger(__name__)

# The default of DaemonSettings.metrics_per_peer_limit (vpblu.metrics.PER_PEER_LIMIT,
# not imported here: prometheus-client is one of the imports the Hello does not wait for).
PER_PEER_LIMIT = 100

# How long the kernel actors wait for the first stream to open before they
# start anyway: a controller that is down or slow must not keep the node from
# coming up as last applied (a TLS connect here takes tens of milliseconds).
HELLO_FIRST_WAIT = 2.0


@attrs.frozen(slots=True)
class _NoWrites:
    writes: int = 0


class _LaterCounter:
    """The applier's view of a kernel adapter's write count before the adapter
    exists (it is made after the Hello): nothing written yet."""

    def __init__(self) -> None:
        self.counted: WriteCounted | None = None

    def statistics(self) -> WriteCount:
        return _NoWrites() if self.counted is None else self.counted.statistics()


async def wireguard_backend(config: DaemonConfig) -> WireGuardBackend:
    """The node's WireGuard backend; a userspace one starts every rotation slot's
    bridge itself (rotations at once each have their own), even when the mesh
    interface's wireguard-go runs elsewhere (`--wireguard-go=external`)."""
    from vpblu.node.kernel.wireguard import select_backend
    from vpblu.node.rotation import bridge_names

    return await select_backend(config, start_also=bridge_names(config.interface))


class _KernelAdapters:
    """The WireGuard backend and the rtnetlink adapter, made once, on the
    NetlinkActor's first start (after the Hello), and kept across its
    restarts."""

    def __init__(self, config: DaemonConfig) -> None:
        self._config = config
        self._made: tuple[WireGuardBackend, IPRouteKernel] | None = None
        self.routes_counter = _LaterCounter()
        self.wireguard_counter = _LaterCounter()

    async def get(self) -> tuple[WireGuardBackend, IPRouteKernel]:
        if self._made is None:
            from vpblu.node.kernel.iproute import IPRouteKernel

            backend = await wireguard_backend(self._config)
            kernel = IPRouteKernel()
            self._made = backend, kernel
            self.wireguard_counter.counted = backend
            self.routes_counter.counted = kernel
        return self._made

    async def aclose(self) -> None:
        """End the rtnetlink adapter's thread (see `IPRouteKernel.aclose`)."""
        if self._made is not None:
            await self._made[1].aclose()


@attrs.frozen(slots=True)
class DaemonSettings:
    config: DaemonConfig
    stream: StreamSettings
    # "host:port" of /metrics, /healthz and /readyz (None: not served).
    metrics_listen: str | None = None
    metrics_per_peer_limit: int = PER_PEER_LIMIT


async def run_daemon(settings: DaemonSettings) -> None:
    """Run the node daemon until cancelled or its supervisor gives up.

    Raises `vpblu.node.keys.KeyFileError` before touching the node when the
    key file is unusable, and `SupervisorEscalation` when the tree gives up.
    Must run inside `trio_asyncio.open_loop()` (the stream's transport needs it).
    """
    config = settings.config
    started = trio.current_time()
    keys = await trio.to_thread.run_sync(KeyStore.load_or_create, config.state_dir)
    try:
        log.info("node %s: key %s (public %s)", config.node_name, keys.path, keys.public_key)
        adapters = _KernelAdapters(config)
        # Unbuffered: a request waits for its actor, and the actor's reply is the
        # only acknowledgement the applier needs. (Typed by annotation: the
        # message module is not imported before the Hello.)
        netlink_send: trio.MemorySendChannel[NetlinkInbox]
        netlink_recv: trio.MemoryReceiveChannel[NetlinkInbox]
        bpf_send: trio.MemorySendChannel[BpfMapInbox]
        bpf_recv: trio.MemoryReceiveChannel[BpfMapInbox]
        mtu_send: trio.MemorySendChannel[MtuInbox]
        mtu_recv: trio.MemoryReceiveChannel[MtuInbox]
        netlink_send, netlink_recv = trio.open_memory_channel(0)
        bpf_send, bpf_recv = trio.open_memory_channel(0)
        mtu_send, mtu_recv = trio.open_memory_channel(0)
        datapath_ready = trio.Event()
        applier = KernelApplier(
            netlink_send, bpf_send, routes_counter=adapters.routes_counter,
            wireguard_counter=adapters.wireguard_counter, datapath_ready=datapath_ready,
        )
        # The highest rotation-step stamp accepted, kept on disk across restarts.
        step_guard = await trio.to_thread.run_sync(StepGuard.load, config.state_dir)
        stream = StreamActor(config.node_name, lambda: keys.public_key, applier, settings.stream,
                             rotator=applier,
                             telemetry=KernelTelemetry(netlink_send, bpf_send),
                             step_guard=step_guard)
        announced = trio.Event()

        def hello_first(make: Callable[[], Awaitable[Runnable]]) -> Callable[[], Runnable]:
            """A child that, on its first start only, waits for the first
            stream (bounded) and only then imports and builds its actor."""

            def factory() -> Runnable:
                async def run(*, task_status: trio.TaskStatus[None]) -> None:
                    if not announced.is_set():
                        with trio.move_on_after(HELLO_FIRST_WAIT) as waited:
                            await stream.wait_connected()
                        announced.set()
                        log.info("kernel actors start %.3f s after the daemon (%s)",
                                 trio.current_time() - started,
                                 "no stream yet" if waited.cancelled_caught
                                 else "the Hello is out")
                    actor = await make()
                    await actor(task_status=task_status)

                return run

            return factory

        async def bpfmaps() -> Runnable:
            from vpblu.node.bpfmaps import BpfMapActor

            async def run(*, task_status: trio.TaskStatus[None]) -> None:
                # Started at once: compiling takes a worker thread while the
                # NetlinkActor brings WireGuard up; the applier reads
                # `datapath_ready` to know when the maps take messages.
                task_status.started()
                async with bpf_recv.clone() as inbox, trio.open_nursery() as nursery:
                    await nursery.start(BpfMapActor(config, inbox).run)
                    datapath_ready.set()
                    log.info("data-path programs attached %.3f s after the daemon started",
                             trio.current_time() - started)
                    await applier.catch_up()

            return run

        async def netlink() -> Runnable:
            from vpblu.node.netlink import NetlinkActor

            backend, kernel = await adapters.get()

            async def run(*, task_status: trio.TaskStatus[None]) -> None:
                async with netlink_recv.clone() as inbox:
                    actor = NetlinkActor(config, keys, backend, kernel, inbox)
                    await actor.run(task_status=task_status)

            return run

        async def mtu() -> Runnable:
            from vpblu.node.kernel.iptables import IptablesMtuKernel
            from vpblu.node.mtu import MtuActor

            async def run(*, task_status: trio.TaskStatus[None]) -> None:
                async with mtu_recv.clone() as inbox:
                    await MtuActor(config, IptablesMtuKernel(), inbox).run(
                        task_status=task_status)

            return run

        metrics: list[DaemonMetrics] = []

        async def served() -> Runnable:
            from vpblu.metrics import DaemonMetrics
            from vpblu.metricsserver import metrics_child

            assert settings.metrics_listen is not None
            if not metrics:
                metrics.append(DaemonMetrics(per_peer_limit=settings.metrics_per_peer_limit))
                metrics[0].read_from(stream)
            # Ready once a SyncState is applied: before that the node carries
            # whatever the previous daemon left, and nothing from this one.
            child = metrics_child(
                metrics[0].registry, settings.metrics_listen,
                ready=lambda: (stream.applied is not None,
                               "applied" if stream.applied is not None
                               else "no desired state applied yet"))
            return child.factory()

        tree = Supervisor(
            "daemon",
            [
                # One StreamActor object across restarts: it keeps what it applied,
                # so a reconnect after its crash still says the right generation.
                ChildSpec("stream", lambda: stream.run),
                ChildSpec("bpfmaps", hello_first(bpfmaps)),
                ChildSpec("netlink", hello_first(netlink)),
                ChildSpec("mtu", hello_first(mtu)),
                *([] if settings.metrics_listen is None
                  else [ChildSpec("metrics", hello_first(served))]),
            ],
            strategy=Strategy.ONE_FOR_ONE,
        )
        # The original channel ends stay open for the tree's lifetime (see
        # with_inbox_clone); the MtuActor's sender is kept so its inbox never ends.
        try:
            async with netlink_send, netlink_recv, bpf_send, bpf_recv, mtu_send, mtu_recv:
                await tree.run()
        finally:
            with trio.CancelScope(shield=True):
                await adapters.aclose()
    finally:
        keys.close()


async def cleanup_node(config: DaemonConfig, *, remove_key: bool = False) -> None:
    """Remove what the daemon created on this node: the data-path programs' tc
    filters on the pod veths and the underlay (and clsact qdiscs left empty) and
    pinned maps, the MSS clamp rules, the
    mesh rules, routes and unreachable defaults, every rotation slot's bridge
    (`<interface>-rot`, `<interface>-rot<k>`: a daemon stopped mid-rotation
    leaves them, and a wireguard-go serving one), the interface and stale
    wireguard-go UAPI sockets of any of them. Idempotent.
    The key stays unless `remove_key`."""
    from vpblu.messages import BpfMapInbox, MtuInbox
    from vpblu.node.bpfmaps import BpfMapActor
    from vpblu.node.kernel.iproute import IPRouteKernel
    from vpblu.node.kernel.iptables import IptablesMtuKernel
    from vpblu.node.kernel.wireguard import KernelBackend, UserspaceBackend
    from vpblu.node.mtu import MtuActor
    from vpblu.node.netlink import remove_mesh
    from vpblu.node.rotation import bridge_names

    _unused_bpf_send, unused_bpf = trio.open_memory_channel[BpfMapInbox](0)
    _unused_mtu_send, unused_mtu = trio.open_memory_channel[MtuInbox](0)
    async with _unused_bpf_send, unused_bpf, _unused_mtu_send, unused_mtu:
        # The programs first: blocks and the underlay guard stop dropping before
        # the mesh's rules and routes go.
        await BpfMapActor(config, unused_bpf).cleanup()
        await MtuActor(config, IptablesMtuKernel(), unused_mtu).cleanup()
    userspace = UserspaceBackend()
    interfaces = (config.interface, *bridge_names(config.interface))
    # wireguard-go serves the mesh interface or a rotation's bridge when its socket is
    # there (the primary's may be gone while a bridge's process still runs).
    backend: WireGuardBackend = (
        userspace if any(userspace.socket_path(i).exists() for i in interfaces)
        else KernelBackend()
    )
    kernel = IPRouteKernel()
    try:
        await remove_mesh(config, backend, kernel)
    finally:
        await kernel.aclose()
    # A wireguard-go ended by SIGKILL leaves its socket on the node's
    # /var/run/wireguard (one that exits on SIGTERM removes it). A socket that
    # answers belongs to a running wireguard-go whose link is in another network
    # namespace (the directory is shared): not this node's.
    for interface in interfaces:
        socket_path = trio.Path(userspace.socket_path(interface))
        if await socket_path.exists() and not await userspace.answers(interface):
            await socket_path.unlink(missing_ok=True)
            log.info("removed the stale UAPI socket %s", socket_path)
    if remove_key:
        key_file = trio.Path(config.state_dir / KEY_FILE_NAME)
        await key_file.unlink(missing_ok=True)
        log.info("removed the key file %s", key_file)
    log.info("node %s: cleanup done", config.node_name)

