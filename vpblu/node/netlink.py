"""The NetlinkActor: the daemon's mesh interface, its routing table and its rule.

Owns, on this node: the WireGuard interface ``config.interface`` (created or
adopted through a `WireGuardBackend`, its private key from the `KeyStore`, its
listen port, its socket fwmark ``config.wg_socket_fwmark``, its peers, link
up), every route in table ``config.table`` that points into that interface,
the ``unreachable default`` routes (IPv4 and IPv6) that make that table fail
closed, the rule ``fwmark config.fwmark/config.fwmark_mask lookup config.table``, and
the interface's rp_filter. Its inbox takes `ApplyDesiredState` and replies
with what it changed (`Applied`) or the error (`ApplyFailed`), and
`RunRotationStep`: during a key rotation it also owns the bridge interface
``<interface>-rot`` and runs the steps of `vpblu.node.rotation` (one at a time,
between applies, so a step and an apply never write the same device at once).

While a rotation is in progress the NetlinkActor must not "repair" what the
rotation did: a mesh-table route that points into the bridge counts as present
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

import trio

from vpblu.core import wire
from vpblu.core.model import IPNetwork, NodeDesiredState
from vpblu.messages import (
    Applied,
    ApplyDesiredState,
    ApplyFailed,
    ApplyOutcome,
    NetlinkInbox,
    RotationStepDone,
    RunRotationStep,
)
from vpblu.node import rotation
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iproute import KernelStatistics, MeshRule
from vpblu.node.kernel.wireguard import PeerConfig, WireGuardBackend, WireGuardError, plan_update
from vpblu.node.keys import KeyFileError, KeyStore

log = logging.getLogger(__name__)

EEXIST = 17
ESRCH = 3
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

    async def add_rule(self, rule: MeshRule) -> None: ...

    async def delete_rule(self, rule: MeshRule) -> None: ...

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


def mesh_rules(config: DaemonConfig) -> tuple[MeshRule, ...]:
    return tuple(
        MeshRule(family, config.fwmark, config.fwmark_mask, config.table, config.rule_priority)
        for family in (socket.AF_INET, socket.AF_INET6)
    )


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

    @property
    def interface(self) -> str:
        return self._config.interface

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.prepare()
        task_status.started()
        async with self._inbox:
            async for message in self._inbox:
                match message:
                    case ApplyDesiredState(state=state, reply=reply):
                        outcome = await self._apply_or_fail(state)
                        await reply.send(outcome)
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

    async def prepare(self) -> None:
        """Create or adopt the interface and bring key, fwmark, link, rules and
        rp_filter to what they should be, writing only what differs."""
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
        # Fail closed: a packet the classifier marked for a CIDR whose route
        # is gone (or not there yet) must hit this, not fall through the rule
        # to the main table and leave in the clear. Before the rule, so the
        # table never routes marked packets without it.
        for family in (socket.AF_INET, socket.AF_INET6):
            if not await self._kernel.has_unreachable_default(self._config.table, family):
                await self._kernel.add_unreachable_default(self._config.table, family)
        for rule in mesh_rules(self._config):
            if not await self._kernel.has_rule(rule):
                await self._kernel.add_rule(rule)

    async def _apply_or_fail(self, state: NodeDesiredState) -> ApplyOutcome:
        try:
            return await self.apply(state)
        except (WireGuardError, OSError, trio.TooSlowError) as exc:
            # Reported, not raised: what was written stays, and the next
            # (level-triggered) desired state retries from the kernel's state.
            log.warning("%s: applying the desired state failed: %s", self.interface, exc)
            return ApplyFailed(f"{type(exc).__name__}: {exc}")

    async def apply(self, state: NodeDesiredState) -> Applied:
        iface = self.interface
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

        table = self._config.table
        have_routes = await self._kernel.routes(table, iface)
        # A route a rotation moved into the bridge is there: it goes home by a step.
        on_bridge = await self._kernel.routes(table, self.bridge)
        want_routes = frozenset(r.cidr for r in state.routes)
        routes_added = _ordered(want_routes - have_routes - on_bridge)
        routes_removed = _ordered(have_routes - want_routes)
        for cidr in routes_added:
            await self._kernel.add_route(table, iface, cidr)
        for cidr in routes_removed:
            await self._kernel.delete_route(table, iface, cidr)
        return Applied(
            added,
            changed,
            removed,
            routes_added,
            routes_removed,
            listen_port_changed=update.listen_port is not None,
        )

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
            self._config.wg_socket_fwmark)
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
            case kind.ROLL_BACK_PEER:
                await rotation.roll_back_peer(backend, routes, layout)
            case kind.ABANDON_ROTATING:
                await rotation.close_rotating_bridge(backend, routes, layout)
                await trio.to_thread.run_sync(keys.roll_back)
        return ""

    async def cleanup(self) -> None:
        """Remove the rules, routes and interface this actor owns."""
        await remove_mesh(self._config, self._backend, self._kernel)


async def remove_mesh(config: DaemonConfig, backend: WireGuardBackend, kernel: MeshKernel) -> None:
    """Uninstall: the rules first (marked packets then take the main table's
    path, which is what they did before the mesh existed), then the routes,
    the fail-closed defaults and the interface. Needs no key, so an operator
    can clean up a node whose key file is gone or damaged."""
    iface = config.interface
    for rule in mesh_rules(config):
        if await kernel.has_rule(rule):
            await kernel.delete_rule(rule)
    if await kernel.link_state(iface) is not None:
        for cidr in await kernel.routes(config.table, iface):
            await kernel.delete_route(config.table, iface, cidr)
    for family in (socket.AF_INET, socket.AF_INET6):
        if await kernel.has_unreachable_default(config.table, family):
            await kernel.delete_unreachable_default(config.table, family)
    if await kernel.link_state(iface) is not None:
        await backend.delete_interface(iface)


def _ordered(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


