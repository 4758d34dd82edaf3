"""Zero-loss key rotation on the node: the bridge interface and the two cut-overs.

Owns the daemon-side mechanism of one node's key rotation (Prepare → Distribute →
Activate → Retire) on the rotating node and on each of its peers: a transient *bridge*
WireGuard interface, the moves of mesh-table routes between the primary interface
(`wg-mesh`) and the bridge, the in-place re-key of the idle primary, the swap of the
rotating node's peer entry on each peer, and the rollbacks. It reaches WireGuard and the
routing table only through the `WireGuardBackend` and `MeshRoutes` seams, so it runs
unchanged on kernel WireGuard (netlink) and on wireguard-go (UAPI): the daemon's own
`vpblu.node.kernel.wireguard` backends, whose `PeerConfig.latest_handshake` tells a fresh
handshake from an old one. It never decides
*when* a phase runs (the controller's RotationActor does), never generates, stores or logs
a private key (the KeyStore hands it the bytes and zeroizes them), and never writes
``replace_peers`` to a live interface.

What WireGuard does, measured here (wireguard-go 0.0.20220316, two netns over a veth,
sequence-numbered UDP at 250 pkt/s each way, tests/e2e/flowprobe.py) and read in the
sources (wireguard-go ``Device.SetPrivateKey`` / ``Peer.ExpireCurrentKeypairs``; the
kernel's ``wg_set_device`` → ``wg_noise_expire_current_peer_keypairs`` does the same):

a. Changing a live interface's private key keeps every peer but marks each current and
   next keypair unusable *for sending* (send nonce → reject limit; kernel:
   ``sending.is_valid = false``) and clears the handshake, while the receive side of the
   old keypairs keeps working. Measured with B still holding A's old public key: A→B
   stops at once and for good (2014 of 2476 lost over 8 s; A's initiation under the new
   static key is dropped by B, retried every ≈5 s = REKEY_TIMEOUT); B→A loses nothing
   (0 of 2485) because B keeps its old session and A still decrypts it — until B needs a
   new handshake (REKEY_AFTER_TIME 120 s if B initiated, REJECT_AFTER_TIME 180 s at the
   latest), which A can no longer answer.
b. Replacing A's peer entry on B (``remove`` old key + add new key with the same allowed
   IPs, one UAPI write) discards every session with the old key. B first, A 2 s later:
   A→B lost the whole 2.00 s (501 packets), B→A lost 1.50 s (374): B's packets wait in the
   per-peer *staged queue* (128 packets, oldest dropped) and the newest 128 went out once
   A switched. A first, B 2 s later: A→B lost 1.50 s (376 = 2 s minus the 128 staged),
   B→A lost 0. In both orders traffic resumed within one round trip of the second step,
   because pending traffic starts a handshake at once. So on one interface the loss is
   the time between the two nodes' steps minus 128 packets: never zero on a real cluster.
c. No session survives a key change on either side: a re-keyed interface can only
   receive on its old keypairs, a removed peer takes its keypairs with it, and a peer
   entry is identified by its public key (it cannot be "changed", only replaced). Two
   entries on one interface cannot share allowed IPs (cryptokey routing maps each prefix
   to one peer, both for sending and for the source check on receive), so a single
   interface cannot accept both keys of one node for the same pod CIDR: the overlap has
   to span two interfaces.
d. One private key on two interfaces with different listen ports works, and one peer
   (public key) may sit on two interfaces of one node: a second pair of interfaces (A:51821
   ↔ B:51821, same keys) carried traffic while routes moved A first, then B, then both
   back, with 0 of 1486 / 0 of 1483 lost. But a peer entry must talk to exactly one remote
   interface: when B's second interface pointed at A's *primary* (the entry B's primary
   already talks to), WireGuard's endpoint roaming and per-interface sessions cut B→A for
   the rest of the run (751 of 1213 lost).

So a lossless switch needs, at every instant, that each node sends only on a path the
other end accepts. The mechanism keeps two disjoint interface pairs between the
rotating node R and each peer P and moves routes, never keys, on a live path:

    old path     R.primary(K)  ↔ P.primary(entry K)     until Activate
    bridge path  R.bridge(K')  ↔ P.bridge(entry K')     from Distribute to Retire
    new path     R.primary(K') ↔ P.primary(entry K')    from Retire

Prepare (R)     stage K' (the KeyStore writes it 0600 before its public key is published);
                create R.bridge with K' on the bridge port, the primary's peers (endpoints
                at their bridge ports), keepalive off. No route uses it.
Distribute (P)  create P.bridge with P's own key, one entry K' → R:bridge port, the
                allowed IPs P's primary gives R; handshake it (prewarm) and wait; move
                P's routes for those prefixes to P.bridge. P now sends on K', accepts both.
Activate (R)    move all of R's mesh routes to R.bridge; after a drain, re-key the now
                idle R.primary to K' in place. R sends on K' only; K stays in the KeyStore
                until Retire so a rollback can restore it.
Retire          (P) swap the entry on P.primary K → K' in one write, prewarm, move the
                routes back to P.primary (R.primary answers with K'); (R) move all routes
                back to R.primary, drain, delete R.bridge, zeroize K; (P) drain, delete
                P.bridge. Retire only rolls forward.

Rollback (any time before Retire): `roll_back_rotating_node` gives R.primary K back if
Activate had re-keyed it (it is idle then), handshakes every entry again and moves R's
routes home, keeping R.bridge; then each P `roll_back_peer` (routes home, P.bridge
deleted: P.primary never lost K); then `close_rotating_bridge`. R's bridge must outlive
the peers' bridges, or what a peer still sends into it is lost (measured: 265 packets
when R deleted it first). The controller then drops K' (zeroized by the KeyStore).

Two nodes' switches need no common instant: every cut-over is one `ip route replace`
per prefix on one node, between two paths that both ends accept. Barriers only order the
steps: Prepare(R) → Distribute(all P) → Activate(R) → switch_peer_primary(all P) →
retire_rotating_node(R) → retire_peer_bridge(all P). A re-keyed or deleted interface must
be idle first (`require_idle`), and a new path is handshaken before a route uses it
(`prewarm`), so the 128-packet staged queue never has to carry a gap.

Proven in tests/e2e/test_rotation_mechanism.py (3 nodes, wireguard-go, the rotating
node exchanging 250 pkt/s of sequence-numbered UDP each way with both peers plus a TCP
stream in and one out, 1 s of traffic in every intermediate state): full rotation with
every step run twice (a restarted daemon re-running its step) — ≈ 2 600 datagrams per
direction, 0 lost, TCP intact (≈ 5.5 MB each, longest receive stall 0.01-0.09 s), the old
key on no interface; rollback after Activate — 0 lost; the in-place control (re-key the
one interface, peers swap the entry 2 s later) loses 373-377 per outgoing direction and
0-1 incoming.

Restart and failover. Every step is idempotent and reads the device before it writes
(re-writing a device's current private key is a no-op in both implementations and keeps
the sessions), so a restarted daemon re-runs the step it was last told and changes
nothing that is already right; the kernel keeps interfaces and routes meanwhile
(wireguard-go must run outside the daemon's process group to survive it). The KeyStore
must hold K' on disk (0600) before K'.pub is published, must mark K' active *before*
Activate writes it to the primary (or a restarted NetlinkActor would "repair" the primary
back to K), and keeps K until `retire_rotating_node` has returned. The controller's
RotationActor persists phase, step and K'.pub in the VpbluNode status before each step,
so a new leader resumes by re-sending the current step; no daemon undoes anything
because its controller went away.

Kernel WireGuard: the same calls (netlink WG_CMD_SET_DEVICE instead of UAPI `set=1`;
several entries for one peer in one message are applied in order, which `prewarm`
relies on), the same semantics (see a-d), `ip link add wg-mesh-rot type wireguard`
instead of a wireguard-go process. Names do not alternate: the primary is always
`wg-mesh`; the bridge is always `wg-mesh-rot`, on listen port + 1 (the underlay must
allow it), and exists only during a rotation, so nothing keyed on the primary's name
(MTU, MSS clamp, metrics) follows a moving target; the bridge copies the primary's MTU
and socket fwmark, and an MSS clamp keyed on the interface name must cover it too.

Rotations at once (the controller's batches, vpblu/actors/rotation.py): each holds a
slot k and its own bridges, `wg-mesh-rot` (k = 1) or `wg-mesh-rot<k>` on listen port
+ k, on every node it touches, so two rotations never write one bridge and every
bridge still holds one rotation's keys. A node that rotates in a batch is also a peer
in the other members' rotations: it distributes for them before its own Activate (with
the key its primary holds), its primary's entry for another member R is swapped
K -> K' (`swap_peer_entry`) after every Activate and before any Switch, and a rollback
of R on it handshakes its re-keyed primary before routes go home (`roll_back_peer`).
Proven in tests/e2e/test_rotation_concurrent_e2e.py (three nodes rotating at once, each
in its slot, every pair under sequence-numbered UDP plus a TCP stream: 0 lost).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
import trio

from vpblu.core.model import Endpoint, IPNetwork
from vpblu.node.kernel.wireguard import (
    DeviceUpdate,
    PeerConfig,
    PeerUpdate,
    WireGuardBackend,
    public_key_of,
)

DEFAULT_BRIDGE_SUFFIX = "-rot"
# Rotations that run at once (the RotationPolicy's maxConcurrent) each hold a slot k:
# their bridge is `<primary>-rot` (k = 1) or `<primary>-rot<k>`, on the primary's listen
# port + k, on every node they touch. So the ports operators open between nodes are
# listenPort .. listenPort + maxConcurrent. The TunnelPolicy CRD keeps listenPort at
# most MAX_UDP_PORT - 1 for slot 1; a higher slot with no port fails that rotation.
BRIDGE_PORT_OFFSET = 1
MAX_SLOTS = 16
IFNAMSIZ = 15  # the longest interface name Linux takes
MAX_UDP_PORT = 65535
# A handshake takes one round trip; 12 s also covers one REKEY_TIMEOUT (5 s) retry when the
# first initiation is lost, and stays far below REKEY_ATTEMPT_TIME (90 s).
PREWARM_TIMEOUT = 12.0
HANDSHAKE_POLL_INTERVAL = 0.02
# Packets already handed to an interface leave its queues within a millisecond here; a
# quarter second is a wide margin before that interface is re-keyed or deleted.
DRAIN_SECONDS = 0.25
# Enabling a persistent keepalive (0 → n) sends one keepalive at once on both kernel and
# wireguard-go; with no usable session that starts a handshake. Used when the configured
# keepalive is 0.
PREWARM_KEEPALIVE = 25


class RotationError(Exception):
    """A rotation step found the node in a state it must not act on."""


class MeshRoutes(Protocol):
    """The mesh routing table (iproute2 or pyroute2). `replace` must be one atomic
    RTM_NEWROUTE with NLM_F_REPLACE, so a prefix is never without a route."""

    async def read(self, table: int) -> dict[IPNetwork, str]: ...

    async def replace(self, table: int, cidr: IPNetwork, interface: str) -> None: ...

    async def link_mtu(self, interface: str) -> int: ...

    async def link_up(self, interface: str, mtu: int) -> None: ...


@attrs.frozen(slots=True)
class BridgeLayout:
    """Where one node's primary and bridge interfaces live."""

    primary: str
    bridge: str
    listen_port: int
    bridge_port: int
    table: int
    fwmark: int

    @classmethod
    def for_primary(cls, primary: str, listen_port: int, table: int, fwmark: int,
                    slot: int = 1) -> BridgeLayout:
        """Slot `slot`'s bridge, on `listen_port` + `slot`; RotationError when there is
        no such port (the TunnelPolicy CRD refuses listenPort 65535; an object stored
        before that rule, a daemon configured by hand, or a slot above what the listen
        port leaves, ends here, and the rotation rolls back with this message in the
        node's lastRotation) or no such interface name."""
        if not 1 <= slot <= MAX_SLOTS:
            raise RotationError(f"rotation slot {slot} is outside 1..{MAX_SLOTS}")
        bridge_port = listen_port + slot * BRIDGE_PORT_OFFSET
        if not 1 <= bridge_port <= MAX_UDP_PORT:
            raise RotationError(
                f"listen port {listen_port} leaves no port for the rotation bridge of slot "
                f"{slot} (listen port + {slot}); use a listen port up to "
                f"{MAX_UDP_PORT - slot}, or a smaller maxConcurrent")
        bridge = bridge_name(primary, slot)
        if len(bridge) > IFNAMSIZ:
            raise RotationError(f"interface name {bridge!r} (rotation slot {slot}) is longer "
                                f"than {IFNAMSIZ} characters")
        return cls(primary, bridge, listen_port, bridge_port, table, fwmark)


def bridge_name(primary: str, slot: int = 1) -> str:
    """Slot `slot`'s bridge on a node whose primary is `primary`."""
    return primary + DEFAULT_BRIDGE_SUFFIX + ("" if slot == 1 else str(slot))


def bridge_names(primary: str) -> tuple[str, ...]:
    """Every slot's bridge name (what a route may point into during a rotation)."""
    return tuple(bridge_name(primary, k) for k in range(1, MAX_SLOTS + 1))


# --- building blocks ---------------------------------------------------------------


async def move_routes(
    routes: MeshRoutes,
    table: int,
    source: str,
    target: str,
    only: Iterable[IPNetwork] | None = None,
) -> tuple[IPNetwork, ...]:
    """Point every route of `table` that goes into `source` (and is in `only`, if given)
    into `target`, one atomic replace per prefix, and return what moved."""
    wanted = None if only is None else set(only)
    moved = []
    for cidr, interface in sorted((await routes.read(table)).items(), key=lambda kv: str(kv[0])):
        if interface != source or (wanted is not None and cidr not in wanted):
            continue
        await routes.replace(table, cidr, target)
        moved.append(cidr)
    return tuple(moved)


async def require_idle(routes: MeshRoutes, table: int, interface: str) -> None:
    """Refuse to re-key or delete an interface a route still sends into."""
    busy = sorted(str(c) for c, i in (await routes.read(table)).items() if i == interface)
    if busy:
        raise RotationError(f"{interface} still carries {', '.join(busy)}")


async def prewarm(devices: WireGuardBackend, interface: str, peer: PeerConfig) -> float:
    """Make `interface` complete a fresh handshake with `peer` now, before any route uses
    it, and return the handshake's time. A keepalive switched on from 0 is sent at once;
    with no usable session it starts the handshake."""
    before = peer.latest_handshake
    nudge = peer.persistent_keepalive or PREWARM_KEEPALIVE
    await devices.write(
        interface,
        DeviceUpdate(
            peers=(
                PeerUpdate(peer.public_key, persistent_keepalive=0),
                PeerUpdate(peer.public_key, persistent_keepalive=nudge),
            )
        ),
    )
    with trio.move_on_after(PREWARM_TIMEOUT):
        while True:
            now = (await devices.read(interface)).peer(peer.public_key)
            if now is not None and now.latest_handshake > before:
                break
            await trio.sleep(HANDSHAKE_POLL_INTERVAL)
    if peer.persistent_keepalive == 0:
        await devices.write(
            interface, DeviceUpdate(peers=(PeerUpdate(peer.public_key, persistent_keepalive=0),))
        )
    if now is None or now.latest_handshake <= before:
        raise RotationError(f"no handshake on {interface} within {PREWARM_TIMEOUT} s")
    return now.latest_handshake


async def open_bridge(
    devices: WireGuardBackend,
    routes: MeshRoutes,
    layout: BridgeLayout,
    private_key: bytes,
    peers: Sequence[PeerConfig],
) -> None:
    """Create (or adopt) the bridge with `private_key` and exactly these peers."""
    await devices.ensure_interface(layout.bridge)
    await routes.link_up(layout.bridge, await routes.link_mtu(layout.primary))
    have = {p.public_key for p in (await devices.read(layout.bridge)).peers}
    want = {p.public_key for p in peers}
    updates = [PeerUpdate(k, remove=True) for k in sorted(have - want)]
    updates += [
        PeerUpdate(
            p.public_key,
            endpoint=p.endpoint,
            allowed_ips=p.allowed_ips,
            persistent_keepalive=p.persistent_keepalive,
        )
        for p in peers
    ]
    await devices.write(
        layout.bridge,
        DeviceUpdate(
            private_key=private_key,
            listen_port=layout.bridge_port,
            fwmark=layout.fwmark,
            peers=tuple(updates),
        ),
    )


async def close_bridge(devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout) -> None:
    if not await devices.exists(layout.bridge):
        return
    await require_idle(routes, layout.table, layout.bridge)
    await trio.sleep(DRAIN_SECONDS)
    await devices.delete_interface(layout.bridge)


def _at_port(endpoint: Endpoint | None, port: int) -> Endpoint | None:
    return None if endpoint is None else Endpoint(endpoint.host, port)


# --- the rotating node ---------------------------------------------------------------


async def prepare_rotating_node(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout, new_private_key: bytes
) -> str:
    """Prepare: R.bridge holds K' and every peer of the primary (at their bridge ports,
    keepalive off so it does not knock on ports that are not open yet). Returns K'.pub."""
    primary = await devices.read(layout.primary)
    bridge_peers = [
        PeerConfig(p.public_key, _at_port(p.endpoint, layout.bridge_port), p.allowed_ips, 0)
        for p in primary.peers
    ]
    await open_bridge(devices, routes, layout, new_private_key, bridge_peers)
    public_key = (await devices.read(layout.bridge)).public_key
    if public_key is None or public_key == primary.public_key:
        raise RotationError("the staged key is missing or equals the active one")
    return public_key


async def activate_rotating_node(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout, new_private_key: bytes
) -> None:
    """Activate: every route into R.bridge, then re-key the idle primary to K'."""
    await move_routes(routes, layout.table, layout.primary, layout.bridge)
    await require_idle(routes, layout.table, layout.primary)
    await trio.sleep(DRAIN_SECONDS)
    await devices.write(layout.primary, DeviceUpdate(private_key=new_private_key))


async def retire_rotating_node(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout
) -> None:
    """Retire (after every peer switched its primary entry): routes back into the primary,
    which answers with K' on warm sessions, then drop the bridge. The caller zeroizes K."""
    await move_routes(routes, layout.table, layout.bridge, layout.primary)
    await close_bridge(devices, routes, layout)


async def roll_back_rotating_node(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout, old_private_key: bytes
) -> None:
    """Roll back, first step (any phase before Retire): the primary gets K back (it is
    idle if Activate ran), handshakes every peer again, and R's routes return to it.
    The bridge stays: peers may still send into it until they have rolled back too
    (`roll_back_peer`), and only then does `close_rotating_bridge` remove it."""
    primary = await devices.read(layout.primary)
    if primary.public_key != public_key_of(old_private_key):
        await require_idle(routes, layout.table, layout.primary)
        await devices.write(layout.primary, DeviceUpdate(private_key=old_private_key))
        async with trio.open_nursery() as nursery:
            for peer in (await devices.read(layout.primary)).peers:
                nursery.start_soon(prewarm, devices, layout.primary, peer)
    await move_routes(routes, layout.table, layout.bridge, layout.primary)


async def close_rotating_bridge(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout
) -> None:
    """Roll back, last step: every peer has left its bridge, so R's bridge goes."""
    await close_bridge(devices, routes, layout)


# --- every peer of the rotating node -----------------------------------------------


async def distribute_to_peer(
    devices: WireGuardBackend,
    routes: MeshRoutes,
    layout: BridgeLayout,
    own_private_key: bytes,
    old_public_key: str,
    new_public_key: str,
) -> None:
    """Distribute: P.bridge accepts K' for R's prefixes, its session is up, and P's routes
    to R go through it; P.primary still accepts K."""
    primary = await devices.read(layout.primary)
    entry = primary.peer(old_public_key)
    if entry is None:
        entry = primary.peer(new_public_key)
    if entry is None:
        raise RotationError("the rotating node is not a peer of this node")
    bridge_entry = PeerConfig(
        new_public_key,
        _at_port(entry.endpoint, layout.bridge_port),
        entry.allowed_ips,
        entry.persistent_keepalive,
    )
    await open_bridge(devices, routes, layout, own_private_key, [bridge_entry])
    current = (await devices.read(layout.bridge)).peer(new_public_key)
    assert current is not None
    if current.latest_handshake == 0.0:
        await prewarm(devices, layout.bridge, current)
    await move_routes(routes, layout.table, layout.primary, layout.bridge, entry.allowed_ips)


async def switch_peer_primary(
    devices: WireGuardBackend,
    routes: MeshRoutes,
    layout: BridgeLayout,
    old_public_key: str,
    new_public_key: str,
) -> None:
    """Retire, first half on P: the primary's entry K becomes K' in one write (R.primary
    already holds K' and is idle), handshake it, then routes back into the primary."""
    primary = await devices.read(layout.primary)
    old = primary.peer(old_public_key)
    new = primary.peer(new_public_key)
    if old is not None:
        await _replace_key(devices, layout.primary, old, old_public_key, new_public_key)
        new = (await devices.read(layout.primary)).peer(new_public_key)
    if new is None:
        raise RotationError("neither the old nor the new key is a peer of the primary")
    if new.latest_handshake == 0.0:
        await prewarm(devices, layout.primary, new)
    await move_routes(routes, layout.table, layout.bridge, layout.primary, new.allowed_ips)


async def swap_peer_entry(
    devices: WireGuardBackend,
    routes: MeshRoutes,
    layout: BridgeLayout,
    old_public_key: str,
    new_public_key: str,
) -> None:
    """Retire, before any Switch, on a peer P that rotates in the same batch as R: P's
    primary entry K -> K' in one write, nothing else. Two rotating nodes that peer
    each other each need the other's primary to hold its new key before either
    Switch can handshake (`switch_peer_primary` prewarms), and a daemon runs one step
    at a time, so without this round their Switches would wait on each other. Safe at
    any time after both Activates: P's routes to R are on P's bridge for R's slot since
    Distribute, so P's primary carries nothing to R."""
    primary = await devices.read(layout.primary)
    old = primary.peer(old_public_key)
    if old is None:
        if primary.peer(new_public_key) is None:
            raise RotationError("neither the old nor the new key is a peer of the primary")
        return
    on_primary = {c for c, i in (await routes.read(layout.table)).items()
                  if i == layout.primary}
    busy = sorted(str(c) for c in old.allowed_ips if c in on_primary)
    if busy:
        raise RotationError(f"{layout.primary} still carries {', '.join(busy)} to the "
                            f"rotating node; swap its entry only after Distribute")
    await _replace_key(devices, layout.primary, old, old_public_key, new_public_key)


async def _replace_key(devices: WireGuardBackend, interface: str, old: PeerConfig,
                       old_public_key: str, new_public_key: str) -> None:
    """One write: the peer `old` (under old_public_key) becomes new_public_key,
    with the same endpoint, allowed IPs and keepalive."""
    await devices.write(
        interface,
        DeviceUpdate(
            peers=(
                PeerUpdate(old_public_key, remove=True),
                PeerUpdate(
                    new_public_key,
                    endpoint=old.endpoint,
                    allowed_ips=old.allowed_ips,
                    persistent_keepalive=old.persistent_keepalive,
                ),
            )
        ),
    )


async def retire_peer_bridge(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout
) -> None:
    """Retire, last step on P (after R left its bridge): drop P.bridge."""
    await close_bridge(devices, routes, layout)


async def roll_back_peer(
    devices: WireGuardBackend, routes: MeshRoutes, layout: BridgeLayout,
    old_public_key: str = "",
    rekeyed: bool = False,
) -> None:
    """Roll back, second step on P: P.primary still holds K, so its routes go back there
    and P's bridge goes. R has already given its primary K back (`roll_back_rotating_node`)
    and still keeps its bridge for what P sent before this.

    `rekeyed`: P rotates in the same batch and has activated, so its primary holds a new
    key and no session of the old one can send: P's entry for R (`old_public_key`) is
    handshaken first, so the routes never wait in the staged queue. (It succeeds once
    R's primary holds P's new key: the batch's Swap round.)"""
    if rekeyed and old_public_key:
        entry = (await devices.read(layout.primary)).peer(old_public_key)
        routed = set((await routes.read(layout.table)).items())
        if entry is not None and any((c, layout.bridge) in routed for c in entry.allowed_ips):
            await prewarm(devices, layout.primary, entry)
    await move_routes(routes, layout.table, layout.bridge, layout.primary)
    await close_bridge(devices, routes, layout)
