"""Simulated daemons: the real daemon stream over real TLS gRPC, a recording kernel.

Owns, for the integration tests and the benchmark, N stand-in nodes: each is
registered in a real API server (a Node with InternalIP and podCIDR, a
VpbluNode, a Pod of the `vpblu-daemon` ServiceAccount bound to the Node, and
a Pod-bound `vpblu` token), holds its own X25519 key pair, and runs the real
`StreamActor` against the real controller. Only the kernel is simulated: a
`RecordingApplier` records every NodeDesiredState the daemon applied and
counts the writes a real daemon would have made (the differences), and a
`SimTelemetry` reports a healthy WireGuard (every peer handshaked moments ago).

Kept lean for N=1000 (issue 8): API objects are made by a few threads at
once, a waiter re-checks only the nodes that applied something since it last
looked, and applied states share their Peer objects with the messages they
came from.

It must never touch a kernel, never reach an address other than loopback, and
never put a private key (the simulated WireGuard keys, the TLS keys) into a
log line, a repr or a file that is not 0600.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import logging
import operator
import sys
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vpblu.core import wire
from vpblu.core.changes import diff
from vpblu.core.model import NodeDesiredState, Peer, PeerRemoved
from vpblu.lab.pki import CertAuthority, write_private
from vpblu.lab.testenv import TestEnv
from vpblu.messages import RotationStepDone
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.stream.transport import ClientTLS, ServerTLS

log = logging.getLogger(__name__)

DAEMON_NAMESPACE = "vpblu-system"
DAEMON_SERVICE_ACCOUNT = "vpblu-daemon"
AUDIENCE = "vpblu"
# API calls made at once while registering or removing nodes: enough to hide
# each call's round trip, few enough not to crowd two shared cores.
API_CONCURRENCY = 8
FIRST_INTERNAL_IP = ipaddress.ip_address("172.16.0.1")
POD_NETWORK = ipaddress.ip_network("10.128.0.0/9")
POD_PREFIX = 24
HEARTBEAT_PERIOD = 30.0


class SimulatedApplyFailure(Exception):
    """A RecordingApplier told to fail."""


@attrs.frozen(slots=True)
class AppliedStep:
    """One apply: when (trio's clock), what, and how many writes it took."""

    at: float
    state: NodeDesiredState
    writes: int
    peers_removed: int


class RecordingApplier:
    """The simulated kernel: `Applier` that records, counts, and can misbehave.

    `fail_next(n)` makes the next n applies raise; `delay` makes every apply
    take that long (a slow node). `on_applied` is told the node's name after
    each successful apply. Without `keep_history` (the benchmark) it keeps
    only the current state and counts no writes.
    """

    def __init__(self, node: str, on_applied: Callable[[str], None] | None = None,
                 *, keep_history: bool = True) -> None:
        self.node = node
        self.current: NodeDesiredState | None = None
        self.history: list[AppliedStep] = []
        self.writes = 0
        self.peers_removed = 0
        self.applies = 0
        self.failures = 0
        self.delay = 0.0
        self._fail_next = 0
        self._keep_history = keep_history
        self._on_applied = on_applied

    def fail_next(self, count: int = 1) -> None:
        self._fail_next = count

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self._fail_next > 0:
            self._fail_next -= 1
            self.failures += 1
            raise SimulatedApplyFailure(f"node {self.node}: told to fail")
        self.applies += 1
        if not self._keep_history:
            # The benchmark's 1000 daemons share one process: there only
            # the state is kept, and the writes are not counted.
            self.current = state
            if self._on_applied is not None:
                self._on_applied(self.node)
            return
        changes = diff(self.current or NodeDesiredState(state.node), state)
        removed = sum(isinstance(c, PeerRemoved) for c in changes)
        self.writes += len(changes)
        self.peers_removed += removed
        self.current = state
        self.history.append(AppliedStep(trio.current_time(), state, len(changes), removed))
        if self._on_applied is not None:
            self._on_applied(self.node)

    @property
    def peer_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.current.peers) if self.current else frozenset()


def _new_key_pair() -> tuple[X25519PrivateKey, str]:
    private = X25519PrivateKey.generate()
    public = base64.b64encode(private.public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)).decode()
    return private, public


class SimRotator:
    """The simulated key store's side of a rotation (`stream.Rotator`): PREPARE
    stages a new pair (the same one again for a re-sent step), ACTIVATE makes it
    the node's key, a roll-back returns to the old one. Peer steps succeed (a
    real daemon would add or drop the bridge peer). Records every step."""

    def __init__(self, daemon: SimDaemon,
                 on_step: Callable[[str], None] | None = None) -> None:
        self._daemon = daemon
        self._on_step = on_step
        self._staged: dict[str, tuple[X25519PrivateKey, str]] = {}
        self._before: dict[str, tuple[X25519PrivateKey, str]] = {}
        self.steps: list[tuple[str, wire.RotationStepKind]] = []
        self.retired = 0  # rotations of this node's own key that completed

    async def rotate(self, step: wire.RotationStep) -> RotationStepDone:
        done = self._rotate(step)
        self.steps.append((step.rotation_id, step.step))
        if self._on_step is not None:
            self._on_step(self._daemon.name)
        return done

    def _rotate(self, step: wire.RotationStep) -> RotationStepDone:
        kind = wire.RotationStepKind
        if step.rotating_node != self._daemon.name:
            return RotationStepDone()
        daemon, rid = self._daemon, step.rotation_id
        match step.step:
            case kind.PREPARE:
                staged = self._staged.setdefault(rid, _new_key_pair())
                return RotationStepDone(new_public_key=staged[1])
            case kind.ACTIVATE:
                pair = self._staged.get(rid)
                if pair is None:
                    return RotationStepDone(f"rotation {rid}: no staged key")
                if daemon.public_key != pair[1]:
                    self._before[rid] = daemon.key_pair
                    daemon.key_pair = pair
            case kind.ROLL_BACK_ROTATING:
                if rid in self._before:
                    daemon.key_pair = self._before.pop(rid)
            case kind.RETIRE_ROTATING:
                if self._staged.pop(rid, None) is not None:
                    self.retired += 1
                self._before.pop(rid, None)
            case kind.ABANDON_ROTATING:
                self._staged.pop(rid, None)
                self._before.pop(rid, None)
        return RotationStepDone()


_PEER_NAME = operator.attrgetter("name")
_PEER_KEY = operator.attrgetter("public_key")
# Each Peer's endpoint as WireGuard shows it, by the Peer object's id (the
# daemons' decoder shares one object per distinct Peer across the whole
# process; `_ENDPOINT_PEERS` keeps each one alive, so an id in the table is
# still its object's): a key rotation gives every daemon new peer tuples, and
# a thousand daemons formatting 999 endpoints each after every apply were the
# bench's bottleneck. Looked up with `map(dict.get, ...)`, in C: a Python call
# per peer was still a tenth of the harness in a join.
_ENDPOINT_TEXTS: dict[int, str] = {}
_ENDPOINT_PEERS: dict[int, Peer] = {}
_ENDPOINT_TEXTS_KEPT = 1 << 16


def _endpoint_texts(peers: tuple[Peer, ...]) -> tuple[str, ...]:
    texts = tuple(map(_ENDPOINT_TEXTS.get, map(id, peers)))
    if None not in texts:
        return texts  # type: ignore[return-value]  # no None among them
    if len(_ENDPOINT_TEXTS) + len(peers) > _ENDPOINT_TEXTS_KEPT:
        _ENDPOINT_TEXTS.clear()
        _ENDPOINT_PEERS.clear()
        texts = (None,) * len(peers)
    # Only the peers not held yet (a rotation's new Peer objects) in Python.
    for peer in itertools.compress(peers, map(operator.is_, texts, itertools.repeat(None))):
        _ENDPOINT_PEERS[id(peer)] = peer
        _ENDPOINT_TEXTS[id(peer)] = (sys.intern(str(peer.endpoint))
                                     if peer.endpoint is not None else "")
    return tuple(map(_ENDPOINT_TEXTS.__getitem__, map(id, peers)))


# The handshake column of a healthy sample depends only on the second and the
# number of peers: daemons sampling in the same second share one column (a
# thousand of them computing 999 fresh ints each was a tenth of the harness).
_HANDSHAKES: dict[tuple[int, int, int], array[int]] = {}
_HANDSHAKES_KEPT = 64


def _handshakes(second: int, count: int, rekey: int) -> array[int]:
    held = _HANDSHAKES.get((second, count, rekey))
    if held is None:
        if len(_HANDSHAKES) >= _HANDSHAKES_KEPT:
            _HANDSHAKES.clear()
        # second - (second + 7 i) % rekey for every peer i, in C.
        ages = map(operator.mod, map(operator.add, itertools.repeat(second),
                                     range(0, 7 * count, 7)), itertools.repeat(rekey))
        held = _HANDSHAKES[second, count, rekey] = array(
            "Q", map(operator.sub, itertools.repeat(second), ages))
    return held


class SimTelemetry:
    """The simulated node's `stream.TelemetrySource`: a healthy mesh, where every
    applied peer handshakes every `REKEY` seconds like WireGuard carrying
    keepalives (staggered over the peers, so the latest handshake is 0 to
    REKEY - 1 s before the sample), except the peers named in `down` (never
    handshaked). Wall-clock times, like a real node's WireGuard."""

    REKEY = 120  # WireGuard's REKEY_AFTER_TIME

    def __init__(self, daemon: SimDaemon) -> None:
        self._daemon = daemon
        self.down: set[str] = set()
        self.samples = 0
        self._key_created = time.time()
        self._key = daemon.public_key
        # What a sample repeats until the applied peers change: names,
        # endpoints, zero counters. A thousand simulated daemons share
        # the benchmark's one process, and formatting 999 endpoints per sample
        # was most of that process's CPU (two thirds of it in the N=1000
        # rotation scenario), taken from the controller it measures.
        self._for: tuple[Peer, ...] | None = None
        self._names: tuple[str, ...] = ()
        self._endpoints: tuple[str, ...] = ()
        self._zeros: array[int] = array("Q")

    async def sample(self, applied: NodeDesiredState | None) -> wire.Telemetry:
        self.samples += 1
        now = time.time()
        if self._daemon.public_key != self._key:
            self._key, self._key_created = self._daemon.public_key, now
        peers = applied.peers if applied is not None else ()
        if peers is not self._for:
            self._for = peers
            self._names = tuple(map(_PEER_NAME, peers))
            self._endpoints = _endpoint_texts(peers)
            self._zeros = array("Q", (0,)) * len(peers)
        handshakes = _handshakes(int(now), len(peers), self.REKEY)
        if self.down:
            handshakes = array("Q", (0 if name in self.down else hs
                                     for name, hs in zip(self._names, handshakes, strict=True)))
        return wire.Telemetry(
            sampled_at=now, public_key=self._key, key_created=self._key_created, mtu=1420,
            peers=wire.PeerColumns(self._names, handshakes, self._zeros, self._zeros,
                                   self._endpoints),
        )


@attrs.frozen(slots=True)
class SimNode:
    name: str
    internal_ip: str
    pod_cidr: str

    @property
    def pod_name(self) -> str:
        return f"{DAEMON_SERVICE_ACCOUNT}-{self.name}"


class SimDaemon:
    """One simulated node's daemon: its key pair, its token file, its stream."""

    def __init__(self, node: SimNode, settings: StreamSettings,
                 on_applied: Callable[[str], None] | None = None,
                 *, keep_history: bool = True, telemetry: bool = True,
                 keys: dict[str, str] | None = None) -> None:
        self.node = node
        # Every daemon's public key by node name, shared by a SimCluster's
        # daemons and kept current here, so a predicate over 999 peers looks
        # them up in C (`is_full_mesh`).
        self._keys = keys if keys is not None else {}
        self.key_pair = _new_key_pair()
        self.applier = RecordingApplier(node.name, on_applied, keep_history=keep_history)
        self.settings = settings
        self.rotator = SimRotator(self, on_applied)
        self.telemetry = SimTelemetry(self)
        self.stream = StreamActor(node.name, lambda: self.public_key, self.applier, settings,
                                  self.rotator, self.telemetry if telemetry else None)
        self._scope: trio.CancelScope | None = None
        self._ended = trio.Event()

    @property
    def key_pair(self) -> tuple[X25519PrivateKey, str]:
        return self._key_pair

    @key_pair.setter
    def key_pair(self, pair: tuple[X25519PrivateKey, str]) -> None:
        self._key_pair = pair
        self._keys[self.node.name] = pair[1]

    @property
    def public_key(self) -> str:
        return self._key_pair[1]

    def __repr__(self) -> str:
        return f"SimDaemon({self.node.name!r}, {self.public_key})"

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def running(self) -> bool:
        return self._scope is not None

    def new_key(self) -> None:
        """A reinstalled node: a new key pair, announced at the next Hello."""
        self.key_pair = _new_key_pair()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            self._ended = trio.Event()
            try:
                await self.stream.run(task_status=task_status)
            finally:
                self._scope = None
                self._ended.set()

    async def wait_stopped(self) -> None:
        """Return once a `stop`ped daemon has ended (its stream closes in the
        background, bounded by the stream's close timeout)."""
        if self._scope is not None and self._scope.cancel_called:
            await self._ended.wait()

    def stop(self) -> None:
        """End the daemon process (its stream closes); what it applied stays."""
        if self._scope is not None:
            self._scope.cancel()


@attrs.frozen(slots=True)
class MeshPki:
    """TLS files for the Mesh stream on loopback: one CA, one server cert."""

    server: ServerTLS
    client: ClientTLS

    @classmethod
    def create(cls, directory: Path) -> MeshPki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertAuthority.create("vpblu mesh CA (simulation)")
        ca.write(directory / "ca.crt")
        ca.issue("vpblu-controller", dns_names=("localhost",), ip_addresses=("127.0.0.1",),
                 server=True).write(directory / "controller.crt", directory / "controller.key")
        return cls(ServerTLS(directory / "controller.crt", directory / "controller.key"),
                   ClientTLS(directory / "ca.crt"))


def sim_nodes(prefix: str, count: int) -> list[SimNode]:
    """`count` nodes with distinct InternalIPs and /24 pod CIDRs."""
    pods = POD_NETWORK.subnets(new_prefix=POD_PREFIX)
    return [SimNode(f"{prefix}-{i:04d}", str(FIRST_INTERNAL_IP + i), str(next(pods)))
            for i in range(count)]


class _Waiter:
    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.dirty: set[str] = set(self.names)
        self.event = trio.Event()


class SimCluster:
    """N simulated nodes registered in `env` and their daemons.

    Make one with `SimCluster.open(...)`; daemons start with it (or later,
    `start_daemon`) and everything it registered is deleted when the block
    ends, even when it ends with an error.
    """

    def __init__(self, env: TestEnv, directory: Path, tls: ClientTLS,
                 addresses: tuple[str, ...], nodes: list[SimNode], nursery: trio.Nursery,
                 *, keep_history: bool = True, telemetry: bool = True) -> None:
        self.env = env
        self.directory = directory
        self.nodes = {n.name: n for n in nodes}
        self._nursery = nursery
        self._waiters: list[_Waiter] = []
        self._limiter = trio.CapacityLimiter(API_CONCURRENCY)
        self.daemons: dict[str, SimDaemon] = {}
        self.keys: dict[str, str] = {}  # every daemon's public key now, by node
        for node in nodes:
            settings = StreamSettings(addresses=addresses, tls=tls,
                                      token_file=directory / f"{node.name}.token",
                                      daemon_version="sim", heartbeat_period=HEARTBEAT_PERIOD)
            self.daemons[node.name] = SimDaemon(node, settings, self._applied,
                                                keep_history=keep_history, telemetry=telemetry,
                                                keys=self.keys)

    @classmethod
    @asynccontextmanager
    async def open(cls, env: TestEnv, directory: Path, tls: ClientTLS,
                   addresses: tuple[str, ...], count: int, *, prefix: str = "sim",
                   start: bool = True, keep_history: bool = True,
                   telemetry: bool = True) -> AsyncIterator[SimCluster]:
        await trio.Path(directory).mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            cluster = cls(env, directory, tls, addresses, sim_nodes(prefix, count), nursery,
                          keep_history=keep_history, telemetry=telemetry)
            try:
                await cluster._each(cluster._register, list(cluster.nodes.values()))
                if start:
                    for name in cluster.daemons:
                        await cluster.start_daemon(name)
                yield cluster
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await cluster._each(cluster._unregister, list(cluster.nodes.values()))

    # --- daemons -------------------------------------------------------------------

    async def start_daemon(self, name: str) -> None:
        daemon = self.daemons[name]
        # A daemon stopped a moment ago may still be closing its stream: starting
        # it then was a no-op (test_controller's stale reconnect, found by timing).
        await daemon.wait_stopped()
        if not daemon.running:
            await self._nursery.start(daemon.run)

    def stop_daemon(self, name: str) -> None:
        self.daemons[name].stop()

    def _applied(self, name: str) -> None:
        for waiter in self._waiters:
            if name in waiter.names:
                waiter.dirty.add(name)
                waiter.event.set()

    async def wait_all(self, predicate: Callable[[SimDaemon], bool],
                       names: Iterable[str] | None = None) -> None:
        """Until `predicate` holds for every daemon named (default: all) at
        once. Each wake re-checks only the nodes that applied something, so
        a satisfied node that applies again is checked again too."""
        waiter = _Waiter(self.daemons if names is None else names)
        pending: set[str] = set()
        self._waiters.append(waiter)
        try:
            while True:
                dirty, waiter.dirty = waiter.dirty, set()
                for name in dirty:
                    if predicate(self.daemons[name]):
                        pending.discard(name)
                    else:
                        pending.add(name)
                if not pending and not waiter.dirty:
                    return
                await waiter.event.wait()
                waiter.event = trio.Event()
        finally:
            self._waiters.remove(waiter)

    # --- the API objects -----------------------------------------------------------

    async def _each(self, step: Callable[[SimNode], None], nodes: list[SimNode]) -> None:
        async def one(node: SimNode) -> None:
            await trio.to_thread.run_sync(step, node, limiter=self._limiter)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)

    def _call(self, method: str, path: str, body: object = None,
              ok: tuple[int, ...] = (200, 201)) -> None:
        answer = self.env.request(method, path, body)
        if answer.status not in ok:
            raise RuntimeError(f"{method} {path}: {answer.status} {answer.message}")

    def _register(self, node: SimNode) -> None:
        self._call("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"vpblu.io/simulated": "true"}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": node.internal_ip}]},
        })
        self._call("POST", "/apis/vpblu.io/v1alpha1/vpblunodes", {
            "apiVersion": "vpblu.io/v1alpha1", "kind": "VpbluNode",
            "metadata": {"name": node.name}, "spec": {},
        }, ok=(201, 409))
        self._call("POST", f"/api/v1/namespaces/{DAEMON_NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": node.pod_name, "namespace": DAEMON_NAMESPACE,
                         "labels": {"vpblu.io/simulated": "true",
                                    "app.kubernetes.io/name": "vpblu",
                                    "app.kubernetes.io/component": "daemon"}},
            "spec": {"nodeName": node.name, "serviceAccountName": DAEMON_SERVICE_ACCOUNT,
                     "containers": [{"name": "daemon", "image": "vpblu:simulated"}]},
        })
        token = self.env.request_token(DAEMON_SERVICE_ACCOUNT, DAEMON_NAMESPACE, [AUDIENCE],
                                       bound_pod=node.pod_name)
        write_private(self.directory / f"{node.name}.token", token.encode())

    def _unregister(self, node: SimNode) -> None:
        gone = (200, 202, 404)
        for method, path in (
            ("DELETE", f"/api/v1/namespaces/{DAEMON_NAMESPACE}/pods/{node.pod_name}"
                       "?gracePeriodSeconds=0"),
            ("DELETE", f"/apis/vpblu.io/v1alpha1/vpblunodes/{node.name}"),
            ("DELETE", f"/api/v1/nodes/{node.name}"),
        ):
            try:
                self._call(method, path, ok=gone)
            except Exception as exc:
                log.warning("simulated node %s: %s", node.name, exc)

    async def delete_node(self, name: str) -> None:
        """Delete the Node object (its daemon keeps running, as a dead node's would)."""
        await trio.to_thread.run_sync(
            self._call, "DELETE", f"/api/v1/nodes/{name}", None, (200, 202))


def is_full_mesh(cluster: SimCluster, names: Iterable[str] | None = None
                 ) -> Callable[[SimDaemon], bool]:
    """A `wait_all` predicate: the daemon peers with every other named node,
    with that node's current public key and exactly its pod CIDR."""
    members = frozenset(cluster.daemons if names is None else names)
    cidrs = {n: (ipaddress.ip_network(cluster.nodes[n].pod_cidr),) for n in members}
    # Peer objects (decoded values are shared) whose name and allowed IPs
    # were found right: at N=1000 comparing address objects again for every
    # daemon was a tenth of the harness. Kept alive, so an id stays theirs.
    shaped: dict[int, Peer] = {}
    keys = cluster.keys

    def check(daemon: SimDaemon) -> bool:
        state = daemon.applier.current
        if state is None or len(state.peers) != len(members) - 1:
            return False
        peers = state.peers
        # Only peers not seen before are looked at one by one.
        for peer in itertools.compress(peers, map(operator.not_,
                                                  map(shaped.__contains__, map(id, peers)))):
            if peer.name not in members or peer.allowed_ips != cidrs[peer.name]:
                return False
            shaped[id(peer)] = peer
        names = tuple(map(_PEER_NAME, peers))
        # Each peer's key is its daemon's current one, compared in C.
        return daemon.name not in names and all(
            map(operator.eq, map(_PEER_KEY, peers), map(keys.__getitem__, names)))

    return check



def has_rotated(cluster: SimCluster, rotating: Iterable[str]) -> Callable[[SimDaemon], bool]:
    """A `wait_all` predicate: every node in `rotating` retired one more own key
    than when this was called, and the daemon holds each of them, as a peer,
    by its new key."""
    retired = {name: cluster.daemons[name].rotator.retired for name in rotating}

    def done(name: str) -> bool:
        return cluster.daemons[name].rotator.retired > retired[name]

    def check(daemon: SimDaemon) -> bool:
        state = daemon.applier.current
        if state is None or (daemon.name in retired and not done(daemon.name)):
            return False
        return all(done(p.name) and p.public_key == cluster.daemons[p.name].public_key
                   for p in state.peers if p.name in retired)

    return check
