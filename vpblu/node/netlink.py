"""The NetlinkActor: the daemon's mesh interface, its routing table and its rules.

Owns, on this node: the WireGuard interface ``config.interface`` (created or
adopted through a `WireGuardBackend`, its private key from the `KeyStore`, its
listen port, its socket fwmark ``config.wg_socket_fwmark``, its peers, its
addresses, link up), every route in table ``config.table``, every ip rule at
priority ``config.rule_priority`` and the one just before it, the fail-closed
sink ``<interface>-fc0`` (a veth whose peer stays down), and the interface's
rp_filter.

Steering is by destination, decided after kube-proxy's DNAT: routing happens
after PREROUTING (and OUTPUT) NAT, so a packet to a ClusterIP, a NodePort or an
externalIP is steered by the pod address it was translated to. The layout, per
address family::

    priority P-1  fwmark <wg socket mark> lookup main   WireGuard's own UDP stays out
    priority P    to <C> lookup T                       C in collapse(cluster ranges, routes)
    table T       <remote pod CIDR> dev <interface>     a tunnel route (rotation moves these)
                  throw <own pod CIDR> metric 4095      this node's pods: on to the main table
                  <cluster range> dev <sink> metric 4096  fail-closed: dropped and counted
                  (throw <cluster range> metric 4096 instead, when the TunnelPolicy says failOpen)
                  unreachable default                   the backstop, should the sink be gone

The interface carries the first address of each of this node's pod CIDRs, so
traffic the node itself sends into the mesh (host-network pods, kube-proxy's
masquerade of NodePort traffic) has a source the remote peer's allowed IPs
accept. Its inbox takes `ApplyDesiredState` and replies
with what it changed (`Applied`) or the error (`ApplyFailed`), and
`RunRotationStep`: during a key rotation it also owns the bridge interfaces
``<interface>-rot`` and ``<interface>-rot<k>`` (one per rotation slot k: rotations
that run at once use different slots) and runs the steps of `vpblu.node.rotation`
(one at a time, between applies, so a step and an apply never write the same device
at once).

While a rotation is in progress the NetlinkActor must not "repair" what the
rotation did: a mesh-table route that points into a bridge counts as present
(it is not added again into the primary), the bridge itself is never touched by
an apply, and `prepare` leaves the primary's private key alone when it is one of
the rotation's two keys (the KeyStore says which; only the steps re-key).

Must never: write when the kernel already matches, rewrite the whole peer set
or restart the interface (tunnels to unchanged peers would drop), touch a
route or rule it does not own, or delete anything because something failed
elsewhere (a dead controller or API server leaves the mesh as it is; only
`cleanup()`, called on an orderly uninstall, removes what it created).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterable
from typing import Protocol

import attrs
import trio

from vpblu.core import wire
from vpblu.core.changes import cidr_key
from vpblu.core.model import IPNetwork, NodeDesiredState, collapse, network
from vpblu.messages import (
    Applied,
    ApplyDesiredState,
    ApplyFailed,
    ApplyOutcome,
    DevicePeer,
    MeshReading,
    NetlinkInbox,
    ReadMesh,
    RotationStepDone,
    RunRotationStep,
)
from vpblu.node import rotation
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iproute import (
    CLUSTER_METRIC,
    LOCAL_METRIC,
    FallbackRoute,
    KernelStatistics,
    MeshRule,
    family_of,
)
from vpblu.node.kernel.wireguard import (
    DeviceState,
    PeerConfig,
    WireGuardBackend,
    WireGuardError,
    plan_update,
)
from vpblu.node.keys import KeyFileError, KeyStore

log = logging.getLogger(__name__)

EEXIST = 17
ESRCH = 3
RT_TABLE_MAIN = 254
SINK_SUFFIX = "-fc0"
SINK_PEER_SUFFIX = "-fc1"
# One step waits at most for a prewarm handshake per peer it touches (12 s each,
# concurrently on rollback) and a drain; a stuck device must not hold the
# actor's inbox (and every apply behind it) forever.
ROTATION_STEP_TIMEOUT = 45.0
ROTATING_NODE_STEPS = frozenset({
    wire.RotationStepKind.PREPARE,
    wire.RotationStepKind.ACTIVATE,
    wire.RotationStepKind.RETIRE_ROTATING,
    wire.RotationStepKind.ROLL_BACK_ROTATING,
    wire.RotationStepKind.ABANDON_ROTATING,
})


class MeshKernel(Protocol):
    """The links, routes, rules and sysctls the NetlinkActor touches."""

    async def link_state(self, interface: str) -> bool | None:
        """None if `interface` does not exist here, else whether it is up."""
        ...

    async def set_link_up(self, interface: str) -> None: ...

    async def routes(self, table: int, interface: str) -> frozenset[IPNetwork]:
        """Destinations of the routes in `table` whose device is `interface`."""
        ...

    async def add_route(self, table: int, interface: str, cidr: IPNetwork) -> None: ...

    async def delete_route(self, table: int, interface: str, cidr: IPNetwork) -> None: ...

    async def has_unreachable_default(self, table: int, family: int) -> bool: ...

    async def add_unreachable_default(self, table: int, family: int) -> None: ...

    async def delete_unreachable_default(self, table: int, family: int) -> None: ...

    async def has_rule(self, rule: MeshRule) -> bool: ...

    async def rules(self, priority: int) -> frozenset[MeshRule]:
        """Every rule at `priority` (both families)."""
        ...

    async def add_rule(self, rule: MeshRule) -> None: ...

    async def delete_rule(self, rule: MeshRule) -> None: ...

    async def fallback_routes(self, table: int) -> frozenset[FallbackRoute]: ...

    async def add_fallback_route(self, table: int, route: FallbackRoute) -> None:
        """Add or replace (one atomic write) the route for that prefix and metric."""
        ...

    async def delete_fallback_route(self, table: int, route: FallbackRoute) -> None: ...

    async def addresses(self, interface: str) -> frozenset[IPNetwork]: ...

    async def add_address(self, interface: str, address: IPNetwork) -> None: ...

    async def delete_address(self, interface: str, address: IPNetwork) -> None: ...

    async def ensure_sink(self, interface: str, peer: str) -> None: ...

    async def delete_link(self, interface: str) -> None: ...

    async def tx_dropped(self, interface: str) -> int: ...

    async def relax_rp_filter(self, interface: str) -> None: ...

    # What a key rotation needs besides (vpblu.node.rotation.MeshRoutes).

    async def table_routes(self, table: int) -> dict[IPNetwork, str]:
        """Every unicast route of `table`: destination -> device name."""
        ...

    async def replace_route(self, table: int, cidr: IPNetwork, interface: str) -> None:
        """One atomic RTM_NEWROUTE with NLM_F_REPLACE: the prefix is never unrouted."""
        ...

    async def link_mtu(self, interface: str) -> int: ...

    async def set_link_mtu_up(self, interface: str, mtu: int) -> None: ...

    def statistics(self) -> KernelStatistics: ...


class KernelMeshRoutes:
    """`vpblu.node.rotation.MeshRoutes` over a MeshKernel."""

    def __init__(self, kernel: MeshKernel) -> None:
        self._kernel = kernel

    async def read(self, table: int) -> dict[IPNetwork, str]:
        return await self._kernel.table_routes(table)

    async def replace(self, table: int, cidr: IPNetwork, interface: str) -> None:
        await self._kernel.replace_route(table, cidr, interface)

    async def link_mtu(self, interface: str) -> int:
        return await self._kernel.link_mtu(interface)

    async def link_up(self, interface: str, mtu: int) -> None:
        await self._kernel.set_link_mtu_up(interface, mtu)


def exemption_rules(config: DaemonConfig) -> tuple[MeshRule, ...]:
    """WireGuard's own encrypted UDP carries the socket mark and is routed by
    the main table, even if a steering rule (a RoutePolicy gone wrong) would
    cover a peer's endpoint: the tunnel never loops into itself."""
    return tuple(
        MeshRule(family, RT_TABLE_MAIN, config.rule_priority - 1,
                 fwmark=config.wg_socket_fwmark, mask=config.wg_socket_fwmark_mask)
        for family in (socket.AF_INET, socket.AF_INET6)
    )


def steering_rules(config: DaemonConfig, state: NodeDesiredState) -> frozenset[MeshRule]:
    """One ``to C lookup T`` per range steered into the mesh table: the
    cluster's pod ranges and every tunnel route (an older controller sends
    routes only), collapsed. A prefix of length 0 is never steered: a rule
    ``to 0.0.0.0/0`` would send the node's every packet into the mesh."""
    nets = [*state.datapath.cluster_cidrs, *(r.cidr for r in state.routes)]
    return frozenset(
        MeshRule(family_of(c), config.table, config.rule_priority, dst=c)
        for c in collapse(nets) if c.prefixlen > 0
    )


def fallback_routes(sink: str, state: NodeDesiredState) -> frozenset[FallbackRoute]:
    datapath = state.datapath
    cluster_device = None if datapath.fail_open else sink
    return frozenset([
        *(FallbackRoute(c, None, LOCAL_METRIC) for c in datapath.local_cidrs),
        *(FallbackRoute(c, cluster_device, CLUSTER_METRIC) for c in datapath.cluster_cidrs
          if c.prefixlen > 0),
    ])


def mesh_addresses(state: NodeDesiredState) -> frozenset[IPNetwork]:
    """The first address of each of this node's pod CIDRs, as a host prefix."""
    return frozenset(
        network(f"{next(c.hosts()) if c.num_addresses > 2 else c.network_address}"
                f"/{c.max_prefixlen}")
        for c in state.datapath.local_cidrs
    )


# How long what an apply left in the mesh table, rules and addresses is taken
# as what is there: after this, the next apply reads them all again (and
# writes back whatever someone else changed).
KNOWN_FOR = 30.0


@attrs.frozen(slots=True)
class _KnownKernel:
    """What the NetlinkActor's last finished apply left, read from the kernel
    at `read_at` (trio's clock) and kept up to date with its own writes."""

    read_at: float
    routes: frozenset[IPNetwork]  # in the mesh table through the interface
    on_bridge: frozenset[IPNetwork]  # in the mesh table through a rotation's bridge
    fallback: frozenset[FallbackRoute]
    rules: frozenset[MeshRule]
    addresses: frozenset[IPNetwork]


class NetlinkActor:
    def __init__(
        self,
        config: DaemonConfig,
        keys: KeyStore,
        backend: WireGuardBackend,
        kernel: MeshKernel,
        inbox: trio.MemoryReceiveChannel[NetlinkInbox],
    ) -> None:
        self._config = config
        self._keys = keys
        self._backend = backend
        self._kernel = kernel
        self._inbox = inbox
        # The last desired state applied, for a link made again under us.
        self._last_state: NodeDesiredState | None = None
        # What the mesh table, rules and addresses held after the last apply
        # that finished (None: read them at the next one; see `apply`).
        self._known: _KnownKernel | None = None

    @property
    def interface(self) -> str:
        return self._config.interface

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.prepare()
        task_status.started()
        async with self._inbox:
            async for message in self._inbox:
                match message:
                    case ApplyDesiredState(state=state, reply=reply, whole=whole):
                        outcome = await self._apply_or_fail(state, whole=whole)
                        await reply.send(outcome)
                    case ReadMesh(reply=read_reply):
                        device = await self._reconfigure_if_new()
                        reading = await self._read_or_none(device)
                        if reading is not None:
                            with contextlib.suppress(trio.BrokenResourceError,
                                                     trio.ClosedResourceError):
                                await read_reply.send(reading)
                        else:
                            await read_reply.aclose()
                    case RunRotationStep(step=step, reply=rotation_reply):
                        done = await self._rotate_or_fail(step)
                        # The asker may have gone (its stream dropped): the step is
                        # done all the same, and a resent step finds it done.
                        with contextlib.suppress(trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            await rotation_reply.send(done)

    @property
    def bridge(self) -> str:
        return self._config.interface + rotation.DEFAULT_BRIDGE_SUFFIX

    @property
    def sink(self) -> str:
        return self._config.interface + SINK_SUFFIX

    async def _read_or_none(self, device: DeviceState | None) -> MeshReading | None:
        try:
            return await self.read(device)
        except (WireGuardError, OSError) as exc:
            log.warning("%s: reading the interface for telemetry failed: %s", self.interface, exc)
            return None

    async def read(self, device: DeviceState | None = None) -> MeshReading:
        """The interface's peers (handshakes, bytes, endpoints), key, MTU and the
        fail-closed sink's drops, for the daemon's telemetry. Reads only;
        `device`: the device as just read, if it was."""
        if device is None:
            device = await self._backend.read(self.interface)
        keys = self._keys
        stat = await trio.Path(keys.path).stat()
        rotation = ("Staged" if keys.staged_public_key is not None
                    else "Activated" if keys.previous_public_key is not None else "")
        return MeshReading(
            public_key=keys.public_key,
            key_created=stat.st_mtime,
            rotation=rotation,
            mtu=await self._kernel.link_mtu(self.interface),
            fail_closed_drops=await self.fail_closed_drops(),
            peers=tuple(
                DevicePeer(p.public_key, int(p.latest_handshake), p.rx_bytes, p.tx_bytes,
                           str(p.endpoint) if p.endpoint is not None else "")
                for p in device.peers),
        )

    async def fail_closed_drops(self) -> int:
        """Packets to a pod range without a tunnel, dropped since the sink was made."""
        return await self._kernel.tx_dropped(self.sink)

    async def prepare(self) -> None:
        """Create or adopt the interface and bring key, fwmark, link, rules and
        rp_filter to what they should be, writing only what differs."""
        self._known = None
        iface = self.interface
        await self._backend.ensure_interface(iface)
        if await self._kernel.link_state(iface) is None:
            # The UAPI socket directory is shared by all network namespaces: a
            # socket that answers for a link we cannot see is someone else's.
            raise WireGuardError(
                f"{iface}: WireGuard answers but the link is not in this network namespace"
            )
        device = await self._backend.read(iface)
        rotation_keys = {self._keys.previous_public_key, self._keys.staged_public_key}
        if self._keys.rotating and device.public_key in rotation_keys:
            log.info("%s: a key rotation is in progress (%s); its steps own the key",
                     iface, self._keys.rotation_id)
        elif device.public_key != self._keys.public_key:
            log.info("%s: installing this node's key (public %s)", iface, self._keys.public_key)
            await self._keys.install(self._backend, iface)
        update = plan_update(
            device, listen_port=None, fwmark=self._config.wg_socket_fwmark, peers=None
        )
        await self._backend.write(iface, update)
        if not await self._kernel.link_state(iface):
            await self._kernel.set_link_up(iface)
        await self._kernel.relax_rp_filter(iface)
        await self._kernel.ensure_sink(self.sink, self._config.interface + SINK_PEER_SUFFIX)
        # The backstop: a packet steered into the table with no route there
        # (the sink gone, a route between two writes) is dropped, never sent
        # on through the main table in the clear. Before any rule steers.
        for family in (socket.AF_INET, socket.AF_INET6):
            if not await self._kernel.has_unreachable_default(self._config.table, family):
                await self._kernel.add_unreachable_default(self._config.table, family)
        for rule in exemption_rules(self._config):
            if not await self._kernel.has_rule(rule):
                await self._kernel.add_rule(rule)

    async def _reconfigure_if_new(self) -> DeviceState | None:
        """A WireGuard device without a private key is one made after ours went:
        the node's wireguard-go restarted (its vpblu-wireguard pod replaced),
        whose new link has no key, peers or routes. Prepare it again and apply
        the last desired state to it, at the next telemetry read, instead of
        at the next full SyncState. A key rotation never leaves the device
        without a key, and a device that cannot be read is left to the next
        read. Returns the device as read when it was left alone."""
        try:
            device = await self._backend.read(self.interface)
        except (WireGuardError, OSError, trio.TooSlowError):
            return None
        if device.public_key is not None:
            return device
        log.warning("%s: the WireGuard device has no key (its wireguard-go was replaced?): "
                    "configuring it again", self.interface)
        await self.prepare()  # forgets what the table held: the link is new
        if self._last_state is not None:
            await self._apply_or_fail(self._last_state)
        return None

    async def _apply_or_fail(self, state: NodeDesiredState, *,
                             whole: bool = True) -> ApplyOutcome:
        self._last_state = state
        try:
            return await self.apply(state, whole=whole)
        except (WireGuardError, OSError, trio.TooSlowError) as exc:
            # Reported, not raised: what was written stays, and the next
            # (level-triggered) desired state retries from the kernel's state.
            log.warning("%s: applying the desired state failed: %s", self.interface, exc)
            return ApplyFailed(f"{type(exc).__name__}: {exc}")

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> Applied:
        """Bring the device, the mesh table's routes and the steering to
        `state`, writing only what differs. What the table, the rules and the
        addresses hold is read from the kernel for a `whole` state (a
        SyncState: every (re)connect and resync), when the last apply did not
        finish, a rotation step or `prepare` ran since, or it was last read
        KNOWN_FOR seconds ago; else (a Delta) taken from what the last apply
        left: a peer joining or leaving then costs the device's read and
        write and one route, not five dumps (at N=10, nine daemons applying
        at once on two cores took 100-500 ms for the dumps). A write the
        kernel refuses fails the apply, and the next one reads everything."""
        iface = self.interface
        started = trio.current_time()
        known = self._known if (not whole and self._known is not None
                                and started - self._known.read_at < KNOWN_FOR) else None
        self._known = None  # until this apply has finished
        device = await self._backend.read(iface)
        update = plan_update(
            device,
            listen_port=state.listen_port,
            fwmark=self._config.wg_socket_fwmark,
            peers=[PeerConfig.from_peer(p) for p in state.peers],
        )
        await self._backend.write(iface, update)
        had = set(device.peer_map())
        added = tuple(
            p.public_key for p in update.peers if not p.remove and p.public_key not in had
        )
        changed = tuple(p.public_key for p in update.peers if not p.remove and p.public_key in had)
        removed = tuple(p.public_key for p in update.peers if p.remove)

        device_done = trio.current_time()
        table = self._config.table
        if known is not None:
            have_routes, on_bridge = known.routes, known.on_bridge
        else:
            # One read of the table: this interface's routes, and those a rotation
            # moved into a bridge (of any slot), which are there: they go home by a step.
            routes_now = await self._kernel.table_routes(table)
            have_routes = frozenset(c for c, i in routes_now.items() if i == iface)
            bridges = frozenset(rotation.bridge_names(iface))
            on_bridge = frozenset(c for c, i in routes_now.items() if i in bridges)
        want_routes = frozenset(r.cidr for r in state.routes)
        routes_added = _ordered(want_routes - have_routes - on_bridge)
        routes_removed = _ordered(have_routes - want_routes)
        for cidr in routes_added:
            await self._kernel.add_route(table, iface, cidr)
        routes_done = trio.current_time()
        steering = await self._apply_steering(state, known)
        steering_done = trio.current_time()
        for cidr in routes_removed:
            await self._kernel.delete_route(table, iface, cidr)
        done = trio.current_time()
        self._known = _KnownKernel(
            read_at=known.read_at if known is not None else started,
            routes=(have_routes | frozenset(routes_added)) - frozenset(routes_removed),
            on_bridge=on_bridge, fallback=steering[0], rules=steering[1],
            addresses=steering[2])
        return Applied(
            added,
            changed,
            removed,
            routes_added,
            routes_removed,
            listen_port_changed=update.listen_port is not None,
            timings=(("device", device_done - started),
                     ("routes", routes_done - device_done + done - steering_done),
                     ("steering", steering_done - routes_done)),
        )

    async def _apply_steering(
        self, state: NodeDesiredState, known: _KnownKernel | None,
    ) -> tuple[frozenset[FallbackRoute], frozenset[MeshRule], frozenset[IPNetwork]]:
        """Fallback routes before the rules that send traffic to them, rules
        added before the ones they replace are removed: no prefix is ever
        steered into the table without a route there, and no pod range is
        left unsteered between two writes. Returns the fallback routes, rules
        and addresses now in place; `known`: what is there (else read)."""
        table, kernel = self._config.table, self._kernel
        want_fallback = fallback_routes(self.sink, state)
        have_fallback = known.fallback if known is not None else await kernel.fallback_routes(table)
        by_prefix = {(r.cidr, r.metric) for r in want_fallback}
        for route in sorted(want_fallback - have_fallback, key=_fallback_key):
            await kernel.add_fallback_route(table, route)  # a replace: throw <-> sink atomically
        want_rules = steering_rules(self._config, state)
        have_rules = known.rules if known is not None else await kernel.rules(
            self._config.rule_priority)
        for rule in sorted(want_rules - have_rules, key=_rule_key):
            await kernel.add_rule(rule)
        # Anything else at our priority is ours and stale, such as the fwmark
        # rule of versions that steered by a mark set before DNAT.
        for rule in sorted(have_rules - want_rules, key=_rule_key):
            await kernel.delete_rule(rule)
        for route in sorted(have_fallback - want_fallback, key=_fallback_key):
            if (route.cidr, route.metric) not in by_prefix:  # else replaced above
                await kernel.delete_fallback_route(table, route)
        want_addresses = mesh_addresses(state)
        have_addresses = known.addresses if known is not None else await kernel.addresses(
            self.interface)
        for address in sorted(want_addresses - have_addresses, key=cidr_key):
            await kernel.add_address(self.interface, address)
        for address in sorted(have_addresses - want_addresses, key=cidr_key):
            await kernel.delete_address(self.interface, address)
        return want_fallback, want_rules, want_addresses

    async def _rotate_or_fail(self, step: wire.RotationStep) -> RotationStepDone:
        try:
            with trio.fail_after(ROTATION_STEP_TIMEOUT):
                public_key = await self.rotate(step)
        except (rotation.RotationError, KeyFileError, WireGuardError, OSError,
                trio.TooSlowError) as exc:
            log.warning("rotation %s: step %s failed: %s", step.rotation_id, step.step.name, exc)
            return RotationStepDone(f"{type(exc).__name__}: {exc}")
        log.info("rotation %s of %s: step %s done", step.rotation_id, step.rotating_node,
                 step.step.name)
        return RotationStepDone(None, public_key)

    async def rotate(self, step: wire.RotationStep) -> str:
        """Run one step; returns the staged public key after PREPARE, else ""."""
        self._known = None  # a step moves routes between the primary and a bridge
        kind = wire.RotationStepKind
        mine = step.rotating_node == self._config.node_name
        if mine != (step.step in ROTATING_NODE_STEPS):
            raise rotation.RotationError(
                f"step {step.step.name} for {step.rotating_node} does not run on "
                f"{self._config.node_name}")
        keys, backend = self._keys, self._backend
        routes = KernelMeshRoutes(self._kernel)
        device = await backend.read(self.interface)
        layout = rotation.BridgeLayout.for_primary(
            self.interface, device.listen_port, self._config.table,
            self._config.wg_socket_fwmark, step.slot)
        old, new = step.old_public_key, step.new_public_key
        match step.step:
            case kind.PREPARE:
                public_key = await trio.to_thread.run_sync(keys.stage, step.rotation_id)
                if keys.staged_public_key is not None:
                    await rotation.prepare_rotating_node(
                        backend, routes, layout, keys.staged_private_key())
                    await self._kernel.relax_rp_filter(layout.bridge)
                return public_key
            case kind.DISTRIBUTE:
                await rotation.distribute_to_peer(
                    backend, routes, layout, keys.active_private_key(), old, new)
                await self._kernel.relax_rp_filter(layout.bridge)
            case kind.ACTIVATE:
                if new not in (keys.staged_public_key, keys.public_key) or not keys.rotating:
                    raise rotation.RotationError(f"no staged key {new} to activate")
                # Active on disk before the primary holds it: a restart in between
                # finds a rotation in progress and leaves the primary alone.
                await trio.to_thread.run_sync(keys.activate, step.rotation_id)
                await rotation.activate_rotating_node(
                    backend, routes, layout, keys.active_private_key())
            case kind.SWITCH_PEER:
                await rotation.switch_peer_primary(backend, routes, layout, old, new)
            case kind.RETIRE_ROTATING:
                if keys.staged_public_key is not None:
                    raise rotation.RotationError("retire before activate")
                await rotation.retire_rotating_node(backend, routes, layout)
                await trio.to_thread.run_sync(keys.retire)
            case kind.RETIRE_PEER:
                await rotation.retire_peer_bridge(backend, routes, layout)
            case kind.ROLL_BACK_ROTATING:
                original = (keys.previous_private_key() if keys.previous_public_key
                            else keys.active_private_key())
                await rotation.roll_back_rotating_node(backend, routes, layout, original)
                await trio.to_thread.run_sync(keys.roll_back)
            case kind.SWAP_PEER:
                await rotation.swap_peer_entry(backend, routes, layout, old, new)
            case kind.ROLL_BACK_PEER:
                # A node rotating in the same batch that has activated holds a new key
                # on its primary (and its old one as the previous).
                await rotation.roll_back_peer(backend, routes, layout, old,
                                              rekeyed=keys.previous_public_key is not None)
            case kind.ABANDON_ROTATING:
                await rotation.close_rotating_bridge(backend, routes, layout)
                await trio.to_thread.run_sync(keys.roll_back)
        return ""

    async def cleanup(self) -> None:
        """Remove the rules, routes and interface this actor owns."""
        await remove_mesh(self._config, self._backend, self._kernel)


async def remove_mesh(config: DaemonConfig, backend: WireGuardBackend, kernel: MeshKernel) -> None:
    """Uninstall: the steering rules first (pod traffic then takes the main
    table's path, which is what it did before the mesh existed), then every
    rotation slot's bridge, the routes, the fail-closed sink and defaults, the
    exemption rules and the interface. Needs no key, so an operator can clean up
    a node whose key file is gone or damaged."""
    iface = config.interface
    for rule in sorted(await kernel.rules(config.rule_priority), key=_rule_key):
        if rule.table == config.table:
            await kernel.delete_rule(rule)
    # A daemon stopped or killed mid-rotation leaves its bridges (any slot's, routes
    # moved into them included; a wireguard-go bridge exits with its link). Deleting
    # the link takes its routes with it, and pod traffic no longer reaches the mesh
    # table once the rules above are gone.
    for bridge in rotation.bridge_names(iface):
        if await kernel.link_state(bridge) is not None:
            await backend.delete_interface(bridge)
    if await kernel.link_state(iface) is not None:
        for cidr in await kernel.routes(config.table, iface):
            await kernel.delete_route(config.table, iface, cidr)
    for route in await kernel.fallback_routes(config.table):
        await kernel.delete_fallback_route(config.table, route)
    await kernel.delete_link(iface + SINK_SUFFIX)
    for family in (socket.AF_INET, socket.AF_INET6):
        if await kernel.has_unreachable_default(config.table, family):
            await kernel.delete_unreachable_default(config.table, family)
    for rule in exemption_rules(config):
        if await kernel.has_rule(rule):
            await kernel.delete_rule(rule)
    if await kernel.link_state(iface) is not None:
        await backend.delete_interface(iface)


def _ordered(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(nets, key=cidr_key))


def _rule_key(rule: MeshRule) -> tuple[int, tuple[int, int, int], int]:
    return (rule.family, cidr_key(rule.dst) if rule.dst is not None else (0, 0, 0), rule.fwmark)


def _fallback_key(route: FallbackRoute) -> tuple[int, tuple[int, int, int]]:
    return (route.metric, cidr_key(route.cidr))


