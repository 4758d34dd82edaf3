"""WireGuard devices behind one seam, and the arithmetic of peer differences.

Owns the two ways to configure a WireGuard interface: the kernel module over
generic netlink (`KernelBackend`, pyroute2) and wireguard-go over its UAPI
socket (`UserspaceBackend`, the ``get=1`` / ``set=1`` text protocol), plus the
pure functions that turn "what the device has" and "what it should have" into
the smallest write (`diff_peers`, `plan_update`).

Must never: write ``replace_peers=true`` to a live interface (it drops every
session, also of peers that did not change: STACK.md measured tunnels dark for
≈ 15 s), restart an interface that is up, write anything when nothing differs,
or keep, log or raise a private key (`DeviceState` keeps only the public half).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vpblu.core.model import Endpoint, IPNetwork, Peer, network
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.nsexec import command_prefix, run_in_netns

log = logging.getLogger(__name__)

UAPI_SOCKET_DIR = Path("/var/run/wireguard")
UAPI_TIMEOUT = 5.0
UAPI_MAX_RESPONSE = 64 * 1024 * 1024
INTERFACE_START_TIMEOUT = 10.0
INTERFACE_START_POLL = 0.02
# How long a daemon that never starts wireguard-go itself (`wireguard_go ==
# "external"`) waits for the node's wireguard-go to answer before its NetlinkActor
# fails (and is restarted by its supervisor, with backoff).
EXTERNAL_WAIT_TIMEOUT = 60.0
EXTERNAL_WAIT_POLL = 0.2
KERNEL_PROBE_INTERFACE = "vpblu-probe0"


class WireGuardError(Exception):
    """A WireGuard device refused or failed a request."""


def _sorted_networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    nets = {network(v) for v in values}
    return tuple(sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


@attrs.frozen(slots=True)
class PeerConfig:
    """One peer as a WireGuard device holds it (keyed by its public key)."""

    public_key: str
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_sorted_networks)
    persistent_keepalive: int = 0
    # When the last handshake completed (seconds since the epoch, 0.0 for never).
    # Observed, not configured: it takes no part in comparisons, so a device whose
    # sessions renewed still equals its desired configuration.
    latest_handshake: float = attrs.field(default=0.0, eq=False)
    rx_bytes: int = attrs.field(default=0, eq=False)
    tx_bytes: int = attrs.field(default=0, eq=False)

    @classmethod
    def from_peer(cls, peer: Peer) -> PeerConfig:
        return cls(peer.public_key, peer.endpoint, peer.allowed_ips, peer.persistent_keepalive)


def _sorted_peers(peers: Iterable[PeerConfig]) -> tuple[PeerConfig, ...]:
    return tuple(sorted(peers, key=lambda p: p.public_key))


@attrs.frozen(slots=True)
class DeviceState:
    """What a device holds now. `public_key` is derived from its private key,
    which is read and dropped; None when the device has no private key."""

    public_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[PeerConfig, ...] = attrs.field(default=(), converter=_sorted_peers)

    def peer_map(self) -> dict[str, PeerConfig]:
        return {p.public_key: p for p in self.peers}

    def peer(self, public_key: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


@attrs.frozen(slots=True)
class PeerUpdate:
    """A change to one peer. None fields are left as the device has them."""

    public_key: str
    remove: bool = False
    endpoint: Endpoint | None = None
    # Not None: the peer's allowed IPs become exactly these (replace_allowed_ips).
    allowed_ips: tuple[IPNetwork, ...] | None = None
    persistent_keepalive: int | None = None


@attrs.frozen(slots=True)
class DeviceUpdate:
    """One write to a device. Empty fields are not written."""

    private_key: bytes | None = attrs.field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    peers: tuple[PeerUpdate, ...] = ()

    def is_empty(self) -> bool:
        return (
            self.private_key is None
            and self.listen_port is None
            and self.fwmark is None
            and not self.peers
        )


@attrs.frozen(slots=True)
class BackendStatistics:
    reads: int
    writes: int


class WireGuardBackend(Protocol):
    """How the NetlinkActor reaches a WireGuard device (kernel or userspace)."""

    @property
    def name(self) -> str: ...

    async def ensure_interface(self, interface: str) -> bool:
        """Create `interface`, or adopt it if it exists; True if it was created."""
        ...

    async def read(self, interface: str) -> DeviceState: ...

    async def write(self, interface: str, update: DeviceUpdate) -> None: ...

    async def delete_interface(self, interface: str) -> None: ...

    async def exists(self, interface: str) -> bool:
        """Whether `interface` is there and answers (the rotation's bridge may not be)."""
        ...

    def statistics(self) -> BackendStatistics: ...


# --- the difference --------------------------------------------------------------


def diff_peers(
    current: Iterable[PeerConfig], desired: Iterable[PeerConfig]
) -> tuple[PeerUpdate, ...]:
    """The peer updates that turn `current` into `desired`, nothing for equal peers.

    Adds and changes come before removals: when a node's key changes, the new
    peer takes over the allowed IPs before the old one goes, so its routes
    never have a gap. A desired endpoint of None leaves the device's (learned)
    endpoint alone.
    """
    have = {p.public_key: p for p in current}
    want = {p.public_key: p for p in desired}
    updates: list[PeerUpdate] = []
    for key in sorted(want):
        new = want[key]
        old = have.get(key)
        if old is None:
            updates.append(
                PeerUpdate(
                    key,
                    endpoint=new.endpoint,
                    allowed_ips=new.allowed_ips,
                    persistent_keepalive=new.persistent_keepalive,
                )
            )
            continue
        endpoint = (
            new.endpoint if new.endpoint is not None and new.endpoint != old.endpoint else None
        )
        allowed = new.allowed_ips if new.allowed_ips != old.allowed_ips else None
        keepalive = (
            new.persistent_keepalive
            if new.persistent_keepalive != old.persistent_keepalive
            else None
        )
        if endpoint is not None or allowed is not None or keepalive is not None:
            updates.append(
                PeerUpdate(
                    key, endpoint=endpoint, allowed_ips=allowed, persistent_keepalive=keepalive
                )
            )
    updates.extend(PeerUpdate(key, remove=True) for key in sorted(set(have) - set(want)))
    return tuple(updates)


def plan_update(
    current: DeviceState,
    *,
    listen_port: int | None,
    fwmark: int | None,
    peers: Iterable[PeerConfig] | None,
) -> DeviceUpdate:
    """The smallest DeviceUpdate from `current` to the given targets (None: don't care)."""
    return DeviceUpdate(
        listen_port=listen_port
        if listen_port is not None and listen_port != current.listen_port
        else None,
        fwmark=fwmark if fwmark is not None and fwmark != current.fwmark else None,
        peers=diff_peers(current.peers, peers) if peers is not None else (),
    )


# --- the UAPI text protocol ---------------------------------------------------------


def _b64_to_hex(key: str) -> str:
    return base64.b64decode(key, validate=True).hex()


def _hex_to_b64(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise WireGuardError(f"UAPI: a key is 32 bytes, got {len(raw)}")
    return base64.b64encode(raw).decode()


def serialize_set(update: DeviceUpdate) -> bytes:
    """The ``set=1`` request for `update` (never ``replace_peers``)."""
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append(f"private_key={update.private_key.hex()}")
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.fwmark is not None:
        lines.append(f"fwmark={update.fwmark}")
    for peer in update.peers:
        lines.append(f"public_key={_b64_to_hex(peer.public_key)}")
        if peer.remove:
            lines.append("remove=true")
            continue
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        if peer.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode()


def check_errno(response: str) -> None:
    """Raise unless the response ends in ``errno=0``."""
    for line in reversed(response.splitlines()):
        if line.startswith("errno="):
            value = line.partition("=")[2]
            if value.strip() != "0":
                raise WireGuardError(f"UAPI: device answered errno={value.strip()}")
            return
    raise WireGuardError("UAPI: response without errno")


def parse_get(response: str) -> DeviceState:
    """Parse a ``get=1`` response. The private key is turned into its public
    key on the spot and not kept."""
    check_errno(response)
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: list[PeerConfig] = []
    peer: dict[str, Any] | None = None

    def finish() -> None:
        if peer is not None:
            peers.append(PeerConfig(**peer))

    for line in response.splitlines():
        if not line or line.startswith("errno="):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError("UAPI: malformed line in get response")
        if key == "public_key":
            finish()
            peer = {"public_key": _hex_to_b64(value), "allowed_ips": []}
        elif peer is None:
            if key == "private_key":
                try:
                    public_key = public_key_of(bytes.fromhex(value))
                except ValueError:
                    raise WireGuardError("UAPI: malformed private_key") from None
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
        elif key == "endpoint":
            peer["endpoint"] = Endpoint.parse(value)
        elif key == "allowed_ip":
            peer["allowed_ips"].append(value)
        elif key == "persistent_keepalive_interval":
            peer["persistent_keepalive"] = int(value)
        elif key == "last_handshake_time_sec":
            peer["latest_handshake"] = peer.get("latest_handshake", 0.0) + int(value)
        elif key == "last_handshake_time_nsec":
            peer["latest_handshake"] = peer.get("latest_handshake", 0.0) + int(value) / 1e9
        elif key in ("rx_bytes", "tx_bytes"):
            peer[key] = int(value)
    finish()
    return DeviceState(public_key, listen_port, fwmark, peers)


# --- wireguard-go --------------------------------------------------------------------


class UserspaceBackend:
    """wireguard-go, configured over ``/var/run/wireguard/<interface>.sock``.

    With `start` (a daemon run by hand or in the namespace-node lab),
    wireguard-go is started daemonized (it forks itself and the launcher
    exits) in a session of its own, so a daemon crash or ``kill -9`` leaves it
    running and traffic flowing; the next daemon adopts the interface whose
    socket answers. In a container that is not enough: the runtime ends every
    process of the container (its cgroup, its PID namespace) with it, and the
    socket lives in the container's own /var/run/wireguard. So the DaemonSet
    runs without `start`: wireguard-go belongs to a pod of its own
    (`vpblu daemon wireguard-go`, kustomize/base/wireguard.yaml) that a
    rollout of the daemon does not touch, its socket on a hostPath, and the
    daemon only ever adopts it, waiting up to EXTERNAL_WAIT_TIMEOUT for it.
    The socket directory is shared by all network namespaces: interface names
    must be unique per machine.

    `start_also`: interfaces it starts itself even without `start` - the key
    rotation's bridge, which lives for one overlap window only: nothing runs
    it for the daemon (the node's wireguard-go is the mesh interface's), and
    it need not outlive the daemon's pod (a daemon gone mid-rotation loses the
    bridge, as when it ran every wireguard-go). Its container needs
    /dev/net/tun for that.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        socket_dir: Path = UAPI_SOCKET_DIR,
        executable: str = "wireguard-go",
        start: bool = True,
        start_also: Collection[str] = (),
        external_wait: float = EXTERNAL_WAIT_TIMEOUT,
    ) -> None:
        self._netns = netns
        self._socket_dir = socket_dir
        self._executable = executable
        self._start = start
        self._start_also = frozenset(start_also)
        self._external_wait = external_wait
        self._reads = 0
        self._writes = 0

    @property
    def start_also(self) -> frozenset[str]:
        """The interfaces it starts itself even without `start`."""
        return self._start_also

    @property
    def name(self) -> str:
        return "userspace"

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(reads=self._reads, writes=self._writes)

    def socket_path(self, interface: str) -> Path:
        return self._socket_dir / f"{interface}.sock"

    async def _request(self, interface: str, request: bytes) -> str:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock, trio.fail_after(UAPI_TIMEOUT):
            await sock.connect(str(self.socket_path(interface)))
            await _send_all(sock, request)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > UAPI_MAX_RESPONSE:
                    raise WireGuardError("UAPI: response too large")
                # A response ends with "errno=N\n\n".
                tail = b"".join(chunks[-2:])
                if tail.endswith(b"\n\n") and b"errno=" in tail:
                    break
        return b"".join(chunks).decode()

    async def exists(self, interface: str) -> bool:
        return await self.answers(interface)

    async def answers(self, interface: str) -> bool:
        try:
            await self.read(interface)
        except (OSError, WireGuardError, trio.TooSlowError):
            return False
        return True

    async def read(self, interface: str) -> DeviceState:
        self._reads += 1
        return parse_get(await self._request(interface, b"get=1\n\n"))

    async def write(self, interface: str, update: DeviceUpdate) -> None:
        if update.is_empty():
            return
        self._writes += 1
        check_errno(await self._request(interface, serialize_set(update)))

    async def ensure_interface(self, interface: str) -> bool:
        if await self.answers(interface):
            log.info("adopting running wireguard-go interface %s", interface)
            return False
        if not self._start and interface not in self._start_also:
            return await self._wait_external(interface)
        env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
        result = await trio.run_process(
            [*command_prefix(self._netns), self._executable, interface],
            env=env,
            start_new_session=True,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        if result.returncode != 0:
            raise WireGuardError(
                f"wireguard-go {interface} exited with {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}"
            )
        with trio.fail_after(INTERFACE_START_TIMEOUT):
            # Nothing signals readiness but the socket answering: poll it.
            while not await self.answers(interface):  # noqa: ASYNC110
                await trio.sleep(INTERFACE_START_POLL)
        log.info("started wireguard-go for %s", interface)
        return True

    async def _wait_external(self, interface: str) -> bool:
        log.info("waiting for the node's wireguard-go to answer on %s",
                 self.socket_path(interface))
        with trio.move_on_after(self._external_wait):
            # Nothing signals readiness but the socket answering: poll it.
            while not await self.answers(interface):  # noqa: ASYNC110
                await trio.sleep(EXTERNAL_WAIT_POLL)
            log.info("adopting wireguard-go interface %s (started by the node)", interface)
            return False
        raise WireGuardError(
            f"no wireguard-go answers on {self.socket_path(interface)} after "
            f"{self._external_wait:.0f} s: this daemon never starts one itself "
            f"(--wireguard-go=external); is `vpblu daemon wireguard-go` (the "
            f"vpblu-wireguard DaemonSet) running on this node, with "
            f"{self._socket_dir} shared?"
        )

    async def delete_interface(self, interface: str) -> None:
        # wireguard-go closes and exits when its TUN link is deleted.
        await run_in_netns(self._netns, lambda: _delete_link(interface))
        with trio.move_on_after(INTERFACE_START_TIMEOUT):
            while self.socket_path(interface).exists():  # noqa: ASYNC110
                await trio.sleep(INTERFACE_START_POLL)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def _delete_link(interface: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=interface)
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: already gone
                raise


# --- the kernel module ---------------------------------------------------------------


def kernel_peer(update: PeerUpdate) -> dict[str, Any]:
    """pyroute2 0.9 `WireGuard.set(peer=...)` form of one peer update."""
    peer: dict[str, Any] = {"public_key": update.public_key}
    if update.remove:
        peer["remove"] = True
        return peer
    if update.endpoint is not None:
        peer["endpoint_addr"] = str(update.endpoint.host)
        peer["endpoint_port"] = update.endpoint.port
    if update.persistent_keepalive is not None:
        peer["persistent_keepalive"] = update.persistent_keepalive
    if update.allowed_ips is not None:
        peer["replace_allowed_ips"] = True
        peer["allowed_ips"] = [str(n) for n in update.allowed_ips]
    return peer


def _key_value(attr: Any) -> str | None:
    if attr is None:
        return None
    value = attr["value"] if isinstance(attr, Mapping) or hasattr(attr, "__getitem__") else attr
    return value.decode() if isinstance(value, bytes) else str(value)


def _kernel_timespec(value: Any) -> float:
    """pyroute2 decodes WGPEER_A_LAST_HANDSHAKE_TIME as {tv_sec, tv_nsec}."""
    try:
        return float(value["tv_sec"]) + float(value["tv_nsec"]) / 1e9
    except (KeyError, TypeError, ValueError):
        return 0.0


def parse_kernel_info(messages: Iterable[Any]) -> DeviceState:
    """Fold pyroute2 `WireGuard.info()` messages (large devices come in several)
    into one DeviceState. The private key is turned into its public key and
    dropped."""
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[str, dict[str, Any]] = {}
    for msg in messages:
        pub = _key_value(msg.get_attr("WGDEVICE_A_PUBLIC_KEY"))
        if pub is not None:
            public_key = pub
        elif (priv := _key_value(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))) is not None:
            public_key = public_key_of(base64.b64decode(priv))
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key_value(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key is None:
                continue
            # A peer with many allowed IPs continues in the next message.
            entry = peers.setdefault(key, {"public_key": key, "allowed_ips": []})
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            if ep is not None and ep.get("port"):
                addr = ipaddress.ip_address(ep["addr"])
                if not addr.is_unspecified:
                    entry["endpoint"] = Endpoint(addr, ep["port"])
            keepalive = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            if keepalive is not None:
                entry["persistent_keepalive"] = keepalive
            handshake = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if handshake:
                entry["latest_handshake"] = _kernel_timespec(handshake)
            for attr, field in (("WGPEER_A_RX_BYTES", "rx_bytes"),
                                ("WGPEER_A_TX_BYTES", "tx_bytes")):
                if (count := p.get_attr(attr)) is not None:
                    entry[field] = int(count)
            for aip in p.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                if "addr" in aip:
                    entry["allowed_ips"].append(aip["addr"])
    return DeviceState(public_key, listen_port, fwmark, [PeerConfig(**e) for e in peers.values()])


class KernelBackend:
    """The kernel's WireGuard, over generic netlink with pyroute2 0.9.

    Not exercised end to end on the test machines (their kernel has no
    wireguard module); `kernel_peer` and `parse_kernel_info` are unit-tested.
    pyroute2's `set()` carries one peer per call, so an update with several
    peers is several netlink writes, device fields riding on the first.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns
        self._reads = 0
        self._writes = 0

    @property
    def name(self) -> str:
        return "kernel"

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(reads=self._reads, writes=self._writes)

    async def ensure_interface(self, interface: str) -> bool:
        def ensure() -> bool:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=interface):
                    return False
                ipr.link("add", ifname=interface, kind="wireguard")
                return True

        created = await run_in_netns(self._netns, ensure)
        log.info(
            "%s kernel WireGuard interface %s", "created" if created else "adopting", interface
        )
        return created

    async def read(self, interface: str) -> DeviceState:
        def info() -> DeviceState:
            from pyroute2 import WireGuard

            with WireGuard() as wg:
                return parse_kernel_info(wg.info(interface))

        self._reads += 1
        return await run_in_netns(self._netns, info)

    async def write(self, interface: str, update: DeviceUpdate) -> None:
        if update.is_empty():
            return
        self._writes += 1
        private = (
            base64.b64encode(update.private_key).decode()
            if update.private_key is not None
            else None
        )

        def apply() -> None:
            from pyroute2 import WireGuard

            with WireGuard() as wg:
                peers: list[dict[str, Any] | None] = [kernel_peer(p) for p in update.peers] or [
                    None
                ]
                for i, peer in enumerate(peers):
                    if i == 0:
                        wg.set(
                            interface,
                            listen_port=update.listen_port,
                            fwmark=update.fwmark,
                            private_key=private,
                            peer=peer,
                        )
                    else:
                        wg.set(interface, peer=peer)

        try:
            await run_in_netns(self._netns, apply)
        except Exception as exc:
            # pyroute2 errors carry no key material, but say which write failed.
            raise WireGuardError(f"kernel WireGuard write to {interface} failed: {exc}") from None

    async def delete_interface(self, interface: str) -> None:
        await run_in_netns(self._netns, lambda: _delete_link(interface))

    async def exists(self, interface: str) -> bool:
        def lookup() -> bool:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                return bool(ipr.link_lookup(ifname=interface))

        return await run_in_netns(self._netns, lookup)


# --- choosing ---------------------------------------------------------------------------


def kernel_has_wireguard(probe: str = KERNEL_PROBE_INTERFACE) -> bool:
    """Whether this network namespace's kernel makes WireGuard links, by making
    one named `probe` (and deleting it). Callers that may probe at the same time
    (the daemon and `vpblu daemon wireguard-go`) use different names: a probe
    link someone else made would answer EEXIST, not "no WireGuard"."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=probe, kind="wireguard")
        except NetlinkError:
            return False
        ipr.link("del", ifname=probe)
        return True


async def select_backend(config: DaemonConfig, *, netns: str | None = None,
                         start_also: Collection[str] = ()) -> WireGuardBackend:
    """The backend `config.wireguard_backend` asks for; "auto" probes the kernel.
    `start_also`: the userspace backend's interfaces it starts even when the mesh
    interface's wireguard-go runs elsewhere (the rotation slots' bridges)."""
    choice = config.wireguard_backend
    if choice == "auto":
        has_kernel = await run_in_netns(netns, kernel_has_wireguard)
        choice = "kernel" if has_kernel else "userspace"
        log.info(
            "WireGuard backend: %s (auto: the kernel %s WireGuard links)",
            choice,
            "can create" if has_kernel else "cannot create",
        )
    else:
        log.info("WireGuard backend: %s (configured)", choice)
    if choice == "kernel":
        return KernelBackend(netns=netns)
    if choice == "userspace":
        return UserspaceBackend(netns=netns, start=config.wireguard_go == "start",
                                start_also=start_also)
    raise ValueError(f"wireguard_backend must be auto, kernel or userspace, not {choice!r}")


def public_key_of(private: bytes) -> str:
    """The base64 public key that belongs to a raw 32-byte private key (X25519)."""
    public = X25519PrivateKey.from_private_bytes(private).public_key()
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
