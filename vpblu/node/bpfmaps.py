"""BpfMapActor: owns the pod classifier (bpf/classifier.c), its pinned maps and its tc filters.

It compiles the classifier with bcc at start, keeps its maps pinned under
`config.bpf_pin_dir`, attaches it (tc clsact ingress, direct-action) to every
host-side pod veth matching `config.pod_veth_glob` — also those that appear
later — and makes the maps equal to the ApplyDataPath it receives, writing only
entries that differ.

Restart without a gap: bcc's BPF_TABLE_PINNED opens a map that is already
pinned instead of creating one, so a new daemon gets the same maps (same ids,
same entries) and the classifier the previous daemon attached keeps reading them
until `tc filter replace` swaps in the new program atomically, at the same
prio and handle. Traffic never sees an empty map. Stopping the actor leaves the
filters and pins in place on purpose (the data plane outlives the daemon,
DESIGN §7); only `cleanup()` (uninstall) removes them.

It never decides policy: what is routed, blocked or strict comes in the
message; and it never touches routes or ip rules (NetlinkActor owns those).
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from vpblu.messages import ApplyDataPath, BpfMapInbox, DataPathApplied
from vpblu.model import CidrPair, IPNetwork
from vpblu.node import bpftables
from vpblu.node.bpftables import (
    BLOCK_WORDS,
    ClassifierConfig,
    ClassifierTables,
    DestKind,
    TableDiff,
    TooManyBlockRules,
)
from vpblu.node.config import DaemonConfig

CLASSIFIER_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "classifier.c"
CLASSIFIER_FUNCTION = b"classify"
MAP_NAMES = ("block_src", "block_dst", "dest", "config", "counters")

# Indexes of the per-CPU counters (classifier.c COUNTER_*).
COUNTER_MARKED = 0
COUNTER_DROPPED_BLOCKED = 1
COUNTER_PASSED = 2
COUNTER_DROPPED_STRICT = 3

# Our filter's identity on a link: `tc filter replace` swaps a program only at
# the same parent, prio, protocol and handle. 0xB1 keeps clear of prio 1, which
# other tools commonly take.
TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress, "ffff:fff2"
TC_EGRESS_PARENT = 0xFFFFFFF3
FILTER_PRIO = 0xB1
FILTER_HANDLE = 0xB1
FILTER_NAME = "vpblu-classify"
ETH_P_ALL = 0x0003

RTMGRP_LINK = 1
NETLINK_RECV_SIZE = 1 << 16
MAX_DRAINED_EVENTS = 256

_FAMILY_BYTE = {4: 4, 6: 6}
_ADDR_BITS = {4: 32, 6: 128}


@attrs.frozen(slots=True)
class PodLink:
    index: int
    name: str


@attrs.frozen(slots=True)
class DataPathStatistics:
    marked: int
    dropped_blocked: int
    passed: int
    dropped_strict: int
    attached: tuple[str, ...]
    map_ids: Mapping[str, int]
    entries_written: int
    entries_deleted: int


class PodLinkControl(Protocol):
    """The kernel's links and tc, as far as the classifier needs them."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def pod_links(self) -> list[PodLink]: ...

    async def attach(self, link: PodLink, prog_fd: int) -> bool:
        """Attach (or swap in) the classifier; False when the link is already gone."""
        ...

    async def detach(self, link: PodLink) -> None: ...

    async def wait_link_change(self) -> None: ...


class ClassifierMaps(Protocol):
    """The loaded classifier and its maps."""

    prog_fd: int

    def map_ids(self) -> dict[str, int]: ...

    def read_tables(self) -> ClassifierTables: ...

    def read_config(self) -> ClassifierConfig: ...

    def write_config(self, value: ClassifierConfig) -> None: ...

    def write_block_src(self, change: TableDiff[IPNetwork, int]) -> None: ...

    def write_block_dst(self, change: TableDiff[IPNetwork, int]) -> None: ...

    def write_dest(self, change: TableDiff[IPNetwork, DestKind]) -> None: ...

    def counter(self, index: int) -> int: ...

    def close(self) -> None: ...


class NetlinkPodLinks:
    """PodLinkControl over pyroute2 in one network namespace (None: the current one).

    pyroute2's sync IPRoute cannot be created on the trio thread once
    trio_asyncio is imported (STACK.md), so every call runs in a worker thread,
    one at a time. Link changes come from a plain rtnetlink socket subscribed to
    RTMGRP_LINK and read by trio; its messages are only a trigger to relist
    (level-triggered), so they are never parsed.
    """

    def __init__(self, netns: str | None, glob: str) -> None:
        self._netns = netns
        self._glob = glob
        self._ipr: Any = None
        self._events: trio.socket.SocketType | None = None
        self._raw_events: socket.socket | None = None
        self._lock = trio.Lock()

    async def open(self) -> None:
        from pyroute2 import IPRoute, netns

        def make() -> tuple[Any, socket.socket]:
            if self._netns is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
                ipr = IPRoute()
            else:
                sock = netns.create_socket(
                    self._netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE
                )
                ipr = IPRoute(netns=self._netns)
            sock.bind((0, RTMGRP_LINK))
            return ipr, sock

        self._ipr, sock = await trio.to_thread.run_sync(make)
        self._raw_events = sock
        self._events = trio.socket.from_stdlib_socket(sock)

    async def aclose(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = self._raw_events = None
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            async with self._lock:
                await trio.to_thread.run_sync(ipr.close)

    async def _call(self, fn: Any) -> Any:
        async with self._lock:
            return await trio.to_thread.run_sync(fn)

    async def pod_links(self) -> list[PodLink]:
        def list_links() -> list[PodLink]:
            return [
                PodLink(msg["index"], msg.get("ifname"))
                for msg in self._ipr.get_links()
                if fnmatch.fnmatchcase(msg.get("ifname") or "", self._glob)
            ]

        result: list[PodLink] = await self._call(list_links)
        return result

    async def attach(self, link: PodLink, prog_fd: int) -> bool:
        from pyroute2 import NetlinkError

        def attach() -> bool:
            try:
                self._ipr.tc("add", "clsact", link.index)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False  # a pod deleted between the listing and now
                if exc.code != errno.EEXIST:
                    raise
            try:
                self._tc_replace(link, prog_fd)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise
            return True

        result: bool = await self._call(attach)
        return result

    def _tc_replace(self, link: PodLink, prog_fd: int) -> None:
        self._ipr.tc(
            "replace-filter",
            "bpf",
            link.index,
            handle=FILTER_HANDLE,
            parent=TC_INGRESS_PARENT,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            fd=prog_fd,
            name=FILTER_NAME,
            direct_action=True,
        )

    async def detach(self, link: PodLink) -> None:
        """Remove our filter, and the clsact qdisc once no filter at all is left on it:
        a clsact that still carries someone else's filter is not ours to remove."""
        from pyroute2 import NetlinkError

        def detach() -> None:
            try:
                self._ipr.tc(
                    "del-filter",
                    "bpf",
                    link.index,
                    handle=FILTER_HANDLE,
                    parent=TC_INGRESS_PARENT,
                    prio=FILTER_PRIO,
                    protocol=ETH_P_ALL,
                )
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise
            try:
                left = [
                    f
                    for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT)
                    for f in self._ipr.get_filters(index=link.index, parent=parent)
                    if f.get("kind")
                ]
                if not left:
                    self._ipr.tc("del", "clsact", link.index)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise

        await self._call(detach)

    async def wait_link_change(self) -> None:
        assert self._events is not None, "open() first"
        try:
            await self._events.recv(NETLINK_RECV_SIZE)
        except OSError as exc:
            # ENOBUFS: the kernel dropped events for us. Nothing is lost that
            # matters, since the caller relists everything on return.
            if exc.errno != errno.ENOBUFS:
                raise
        # Drain what else queued up (one relist answers them all), bounded so a
        # flood of link events cannot keep this from yielding.
        assert self._raw_events is not None
        for _ in range(MAX_DRAINED_EVENTS):
            try:
                self._raw_events.recv(NETLINK_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return


def _prefix_key(table: Any, net: IPNetwork) -> Any:
    key = table.Key()
    key.prefixlen = 8 + net.prefixlen
    key.family = _FAMILY_BYTE[net.version]
    key.addr = (ctypes.c_ubyte * 16)(*net.network_address.packed.ljust(16, b"\0"))
    return key


def _key_prefix(key: Any) -> IPNetwork:
    version = 4 if key.family == _FAMILY_BYTE[4] else 6
    raw = bytes(key.addr)[: _ADDR_BITS[version] // 8]
    return ipaddress.ip_network((raw, key.prefixlen - 8))


def _map_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("map_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF map")


class BccClassifier:
    """ClassifierMaps through bcc: compiles and loads bpf/classifier.c with its maps
    pinned under `pin_dir` (created when absent, reused when present)."""

    def __init__(self, source: Path, pin_dir: Path) -> None:
        from bcc import BPF

        pin_dir.mkdir(parents=True, exist_ok=True)
        self._bpf = BPF(
            src_file=os.fsencode(source),
            cflags=[f'-DVPBLU_PIN_DIR="{pin_dir}"', f"-DVPBLU_BLOCK_WORDS={BLOCK_WORDS}"],
        )
        self._fn = self._bpf.load_func(CLASSIFIER_FUNCTION, BPF.SCHED_CLS)
        self.prog_fd: int = self._fn.fd
        self._maps = {name: self._bpf[name.encode()] for name in MAP_NAMES}

    def map_ids(self) -> dict[str, int]:
        return {name: _map_id(table.get_fd()) for name, table in self._maps.items()}

    def read_tables(self) -> ClassifierTables:
        def bits(table: Any) -> dict[IPNetwork, int]:
            return {
                _key_prefix(k): sum(int(w) << (64 * i) for i, w in enumerate(v.w))
                for k, v in table.items()
            }

        dest = self._maps["dest"]
        return ClassifierTables(
            block_src=bits(self._maps["block_src"]),
            block_dst=bits(self._maps["block_dst"]),
            dest={_key_prefix(k): DestKind(v.value) for k, v in dest.items()},
        )

    def read_config(self) -> ClassifierConfig:
        table = self._maps["config"]
        value = table[table.Key(0)]
        return ClassifierConfig(
            mark=value.mark, mask=value.mask, strict=bool(value.flags & bpftables.FLAG_STRICT)
        )

    def write_config(self, value: ClassifierConfig) -> None:
        table = self._maps["config"]
        leaf = table.Leaf()
        leaf.mark, leaf.mask, leaf.flags = value.mark, value.mask, value.flags
        table[table.Key(0)] = leaf

    def _write_bits(self, table: Any, change: TableDiff[IPNetwork, int]) -> None:
        for net, bits in change.upserts.items():
            leaf = table.Leaf()
            for i in range(BLOCK_WORDS):
                leaf.w[i] = (bits >> (64 * i)) & 0xFFFFFFFFFFFFFFFF
            table[_prefix_key(table, net)] = leaf
        for net in change.deletes:
            del table[_prefix_key(table, net)]

    def write_block_src(self, change: TableDiff[IPNetwork, int]) -> None:
        self._write_bits(self._maps["block_src"], change)

    def write_block_dst(self, change: TableDiff[IPNetwork, int]) -> None:
        self._write_bits(self._maps["block_dst"], change)

    def write_dest(self, change: TableDiff[IPNetwork, DestKind]) -> None:
        table = self._maps["dest"]
        for net, kind in change.upserts.items():
            table[_prefix_key(table, net)] = table.Leaf(int(kind))
        for net in change.deletes:
            del table[_prefix_key(table, net)]

    def counter(self, index: int) -> int:
        table = self._maps["counters"]
        return sum(int(v) for v in table[table.Key(index)])

    def close(self) -> None:
        self._bpf.cleanup()


def remove_pins(pin_dir: Path) -> None:
    for name in MAP_NAMES:
        (pin_dir / name).unlink(missing_ok=True)
    if pin_dir.exists():
        pin_dir.rmdir()


class BpfMapActor:
    def __init__(
        self,
        config: DaemonConfig,
        inbox: trio.MemoryReceiveChannel[BpfMapInbox],
        *,
        netns: str | None = None,
        links: PodLinkControl | None = None,
        load_classifier: Callable[[Path, Path], ClassifierMaps] = BccClassifier,
        source: Path = CLASSIFIER_SOURCE,
    ) -> None:
        self._config = config
        self._inbox = inbox
        self._links: PodLinkControl = links or NetlinkPodLinks(netns, config.pod_veth_glob)
        self._source = source
        self._load_classifier = load_classifier
        self._maps: ClassifierMaps | None = None
        self._tables = ClassifierTables()
        self._rules: dict[int, CidrPair] = {}
        self._classifier_config: ClassifierConfig | None = None
        self._attached: dict[int, PodLink] = {}
        self._attachments_changed = trio.Event()
        self._written = 0
        self._deleted = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        source, pin_dir = self._source, self._config.bpf_pin_dir
        # Compiling takes ~0.4 s of CPU: off the trio thread.
        maps = await trio.to_thread.run_sync(self._load_classifier, source, pin_dir)
        self._maps = maps
        try:
            # Subscribe to link events before the first listing, so a veth
            # created in between is seen by one or the other.
            await self._links.open()
            try:
                self._load_kernel_state(maps)
                await self._attach_new()
                async with self._inbox, trio.open_nursery() as nursery:
                    nursery.start_soon(self._follow_links)
                    task_status.started()
                    async for message in self._inbox:
                        match message:
                            case ApplyDataPath():
                                await self._apply(maps, message)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._links.aclose()
        finally:
            self._maps = None
            maps.close()

    def _load_kernel_state(self, maps: ClassifierMaps) -> None:
        self._tables = maps.read_tables()
        self._rules = bpftables.decode_rules(self._tables.block_src, self._tables.block_dst)
        current = maps.read_config()
        wanted = ClassifierConfig(self._config.fwmark, self._config.fwmark_mask, current.strict)
        if current != wanted:
            maps.write_config(wanted)
            self._written += 1
        self._classifier_config = wanted

    async def _attach_new(self) -> None:
        assert self._maps is not None
        present = {link.index: link for link in await self._links.pod_links()}
        for index in self._attached.keys() - present.keys():
            del self._attached[index]
        for index, link in present.items():
            if self._attached.get(index) != link and await self._links.attach(
                link, self._maps.prog_fd
            ):
                self._attached[index] = link
        self._attachments_changed.set()
        self._attachments_changed = trio.Event()

    async def wait_attached(self, name: str) -> None:
        """Return once the classifier is attached to the link called `name`."""
        while name not in {link.name for link in self._attached.values()}:
            await self._attachments_changed.wait()

    async def _follow_links(self) -> None:
        while True:
            await self._links.wait_link_change()
            await self._attach_new()

    async def _apply(self, maps: ClassifierMaps, message: ApplyDataPath) -> None:
        try:
            rules = bpftables.assign_rule_ids(message.blocks, self._rules)
        except TooManyBlockRules as exc:
            await _reply(message, DataPathApplied(0, 0, refused=str(exc)))
            return
        written_before, deleted_before = self._written, self._deleted
        assert self._classifier_config is not None
        config = attrs.evolve(self._classifier_config, strict=message.strict)
        if not config.strict and self._classifier_config.strict:
            self._write_config(maps, config)
        kept = {i: rule for i, rule in self._rules.items() if rules.get(i) == rule}
        if kept != self._rules:
            # A freed bit may be reused by a new rule in this same write: clear
            # the removed rules first, so no prefix ever carries a bit that
            # means the old rule on one side and the new one on the other.
            stage = bpftables.tables(kept, ())
            await trio.to_thread.run_sync(
                self._write_tables, maps, attrs.evolve(stage, dest=self._tables.dest)
            )
        desired = bpftables.tables(
            rules, message.routes, message.local_cidrs, message.cluster_cidrs
        )
        await trio.to_thread.run_sync(self._write_tables, maps, desired)
        self._rules = rules
        self._write_config(maps, config)
        await _reply(
            message,
            DataPathApplied(self._written - written_before, self._deleted - deleted_before),
        )

    def _write_config(self, maps: ClassifierMaps, config: ClassifierConfig) -> None:
        if config != self._classifier_config:
            maps.write_config(config)
            self._classifier_config = config
            self._written += 1

    def _write_tables(self, maps: ClassifierMaps, desired: ClassifierTables) -> None:
        current = self._tables
        src = bpftables.diff(current.block_src, desired.block_src)
        dst = bpftables.diff(current.block_dst, desired.block_dst)
        dest = bpftables.diff(current.dest, desired.dest)
        maps.write_block_src(src)
        maps.write_block_dst(dst)
        maps.write_dest(dest)
        self._tables = desired
        for change in (src, dst, dest):
            self._written += len(change.upserts)
            self._deleted += len(change.deletes)

    def statistics(self) -> DataPathStatistics:
        maps = self._maps
        if maps is None:
            raise RuntimeError("the classifier is not loaded (run() is not running)")
        return DataPathStatistics(
            marked=maps.counter(COUNTER_MARKED),
            dropped_blocked=maps.counter(COUNTER_DROPPED_BLOCKED),
            passed=maps.counter(COUNTER_PASSED),
            dropped_strict=maps.counter(COUNTER_DROPPED_STRICT),
            attached=tuple(sorted(link.name for link in self._attached.values())),
            map_ids=maps.map_ids(),
            entries_written=self._written,
            entries_deleted=self._deleted,
        )

    async def cleanup(self) -> None:
        """Uninstall: remove our filter from every pod veth (and the clsact qdisc when
        nothing else is left on it) and the pinned maps. Call after run() returned."""
        await self._links.open()
        try:
            for link in await self._links.pod_links():
                await self._links.detach(link)
        finally:
            with trio.CancelScope(shield=True):
                await self._links.aclose()
        self._attached.clear()
        remove_pins(self._config.bpf_pin_dir)


async def _reply(message: ApplyDataPath, result: DataPathApplied) -> None:
    if message.reply is not None:
        await message.reply.send(result)
