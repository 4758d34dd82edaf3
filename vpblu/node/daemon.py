"""The node daemon: the key, the WireGuard backend and the supervised tree of node actors.

Owns the order in which a node comes up and the bridge from the warm stream to
the kernel actors. `run_daemon` loads the key first (a damaged key file stops
the daemon before anything on the node is touched), picks the WireGuard
backend (and logs which), and runs one supervisor over NetlinkActor, MtuActor,
BpfMapActor and StreamActor, in that order: the interface exists before its
MTU is set, and the kernel actors hold their resources before the stream can
ask them for anything. The StreamActor applies through
`vpblu.node.applier.KernelApplier` and samples telemetry through
`vpblu.node.telemetry.KernelTelemetry`.

`cleanup_node` is the uninstall: it removes everything the daemon created and
keeps the key unless asked. It must never run while a daemon runs on the node,
and the daemon itself never removes anything because the controller or the
API server went away (DESIGN §7).
"""

from __future__ import annotations

import logging

import attrs
import trio

from vpblu.messages import (
    BpfMapInbox,
    MtuInbox,
    NetlinkInbox,
)
from vpblu.metrics import PER_PEER_LIMIT, DaemonMetrics
from vpblu.metricsserver import metrics_child
from vpblu.node.applier import KernelApplier
from vpblu.node.bpfmaps import BpfMapActor
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iproute import IPRouteKernel
from vpblu.node.kernel.iptables import IptablesMtuKernel
from vpblu.node.kernel.wireguard import (
    KernelBackend,
    UserspaceBackend,
    WireGuardBackend,
    select_backend,
)
from vpblu.node.keys import KEY_FILE_NAME, KeyStore
from vpblu.node.mtu import MtuActor
from vpblu.node.netlink import NetlinkActor, remove_mesh
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.node.telemetry import KernelTelemetry
from vpblu.supervisor import ChildSpec, Strategy, Supervisor, with_inbox_clone

log = logging.getLogger(__name__)


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
                             rotator=applier,
                             telemetry=KernelTelemetry(netlink_send, bpf_send))
        metrics = DaemonMetrics(per_peer_limit=settings.metrics_per_peer_limit)
        metrics.read_from(stream)
        # Ready once a SyncState is applied: before that the node carries
        # whatever the previous daemon left, and nothing from this one.
        served = [] if settings.metrics_listen is None else [metrics_child(
            metrics.registry, settings.metrics_listen,
            ready=lambda: (stream.applied is not None,
                           "applied" if stream.applied is not None
                           else "no desired state applied yet"))]
        tree = Supervisor(
            "daemon",
            [
                *served,
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
    """Remove what the daemon created on this node: the data-path programs' tc
    filters on the pod veths and the underlay (and clsact qdiscs left empty) and
    pinned maps, the MSS clamp rules, the
    mesh rules, routes and unreachable defaults, and the interface. Idempotent.
    The key stays unless `remove_key`."""
    _unused_bpf_send, unused_bpf = trio.open_memory_channel[BpfMapInbox](0)
    _unused_mtu_send, unused_mtu = trio.open_memory_channel[MtuInbox](0)
    async with _unused_bpf_send, unused_bpf, _unused_mtu_send, unused_mtu:
        # The programs first: blocks and the underlay guard stop dropping before
        # the mesh's rules and routes go.
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

