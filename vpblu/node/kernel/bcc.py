"""The kernel side of the data-path programs: the bcc-compiled bpf/classifier.c
(`classify`, `deliver`, `underlay_guard`) and its pinned maps (`ClassifierMaps`),
and the links they are attached to through tc (`PodLinkControl`): every pod's
host veth (classify at ingress, deliver at egress) and the node's underlay
(underlay_guard at egress), watched over rtnetlink.

Only the BpfMapActor calls these adapters; they keep no policy.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import importlib.resources
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import attrs
import trio

from vpblu.core.model import IPNetwork
from vpblu.node.kernel import bpftables
from vpblu.node.kernel.bpftables import (
    BLOCK_WORDS,
    ClassifierConfig,
    ClassifierTables,
    DestKind,
    TableDiff,
)
from vpblu.node.kernel.underlay import find_underlay

# bpf/ ships as the package vpblu.bpf (pyproject.toml), in a wheel as in a checkout.
CLASSIFIER_SOURCE = Path(str(importlib.resources.files("vpblu.bpf").joinpath("classifier.c")))

CLASSIFY_FUNCTION = b"classify"

DELIVER_FUNCTION = b"deliver"

GUARD_FUNCTION = b"underlay_guard"

# Every pinned map, for the uninstall. Their layouts are an ABI across daemon
# restarts (a new daemon opens what the old one pinned): add maps, never change one.
MAP_NAMES = (
    "block_src",
    "block_dst",
    "dest",
    "config",
    "counters",
    "delivery_counters",
    "guard_counters",
)

COUNTER_MAPS = ("counters", "delivery_counters", "guard_counters")

# Our filters' identity on a link: `tc filter replace` swaps a program only at
# the same parent, prio, protocol and handle. 0xB1 keeps clear of prio 1, which
# other tools commonly take. The name tells the three programs apart in `tc
# filter show` (and finds the guard on a link that is no longer the underlay).
TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress, "ffff:fff2"

TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact egress, "ffff:fff3"

FILTER_PRIO = 0xB1

FILTER_HANDLE = 0xB1

FILTER_NAME = "vpblu-classify"

DELIVER_FILTER_NAME = "vpblu-deliver"

GUARD_FILTER_NAME = "vpblu-guard"

_GONE = (errno.ENOENT, errno.EINVAL, errno.ENODEV)

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



class NetlinkPodLinks:
    """PodLinkControl over pyroute2 in one network namespace (None: the current one).

    pyroute2's sync IPRoute cannot be created on the trio thread once
    trio_asyncio is imported (STACK.md), so every call runs in a worker thread,
    one at a time. Link changes come from a plain rtnetlink socket subscribed to
    RTMGRP_LINK and read by trio; its messages are only a trigger to relist
    (level-triggered), so they are never parsed.
    """

    def __init__(self, netns: str | None, glob: str, underlay: str | None = None) -> None:
        self._netns = netns
        self._glob = glob
        self._underlay = underlay
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

    async def underlay(self) -> PodLink:
        """The underlay link (the configured one, or the default route's); OSError if none."""

        def find() -> PodLink:
            link = find_underlay(self._ipr, self._underlay)
            return PodLink(link.index, link.name)

        result: PodLink = await self._call(find)
        return result

    async def attach(self, link: PodLink, classify_fd: int, deliver_fd: int) -> bool:
        """classify at the veth's ingress, deliver at its egress (each swapped in
        atomically where a previous daemon left one)."""
        result: bool = await self._call(
            lambda: self._attach(
                link,
                (TC_INGRESS_PARENT, classify_fd, FILTER_NAME),
                (TC_EGRESS_PARENT, deliver_fd, DELIVER_FILTER_NAME),
            )
        )
        return result

    async def attach_guard(self, link: PodLink, guard_fd: int) -> bool:
        result: bool = await self._call(
            lambda: self._attach(link, (TC_EGRESS_PARENT, guard_fd, GUARD_FILTER_NAME))
        )
        return result

    def _attach(self, link: PodLink, *filters: tuple[int, int, str]) -> bool:
        from pyroute2 import NetlinkError

        try:
            self._ipr.tc("add", "clsact", link.index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False  # deleted between the listing and now
            if exc.code != errno.EEXIST:
                raise
        try:
            for parent, fd, name in filters:
                self._ipr.tc("replace-filter", "bpf", link.index, **_our_slot(parent),
                             fd=fd, name=name, direct_action=True)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True

    async def detach(self, link: PodLink) -> None:
        """Remove our filters, and the clsact qdisc once no filter at all is left on it:
        a clsact that still carries someone else's filter is not ours to remove."""
        await self._call(lambda: self._detach(link, TC_INGRESS_PARENT, TC_EGRESS_PARENT))

    async def detach_guard(self, link: PodLink) -> None:
        await self._call(lambda: self._detach(link, TC_EGRESS_PARENT))

    def _detach(self, link: PodLink, *parents: int) -> None:
        from pyroute2 import NetlinkError

        for parent in parents:
            try:
                self._ipr.tc("del-filter", "bpf", link.index, **_our_slot(parent))
            except NetlinkError as exc:
                if exc.code not in _GONE:
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
            if exc.code not in _GONE:
                raise

    async def guarded_links(self) -> list[PodLink]:
        """Every link whose egress carries our guard (wherever a daemon put it)."""
        from pyroute2 import NetlinkError

        def ours(index: int) -> bool:
            try:
                filters = self._ipr.get_filters(index=index, parent=TC_EGRESS_PARENT)
            except NetlinkError as exc:
                if exc.code in _GONE:
                    return False
                raise
            for f in filters:
                options = f.get_attr("TCA_OPTIONS")
                if options is not None and options.get_attr("TCA_BPF_NAME") == GUARD_FILTER_NAME:
                    return True
            return False

        def find() -> list[PodLink]:
            return [
                PodLink(msg["index"], msg.get("ifname"))
                for msg in self._ipr.get_links()
                if ours(msg["index"])
            ]

        result: list[PodLink] = await self._call(find)
        return result

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
    """ClassifierMaps through bcc: compiles bpf/classifier.c once, loads its three
    programs, with their maps pinned under `pin_dir` (created when absent, reused
    when present)."""

    def __init__(self, source: Path, pin_dir: Path) -> None:
        from bcc import BPF

        pin_dir.mkdir(parents=True, exist_ok=True)
        self._bpf = BPF(
            src_file=os.fsencode(source),
            cflags=[f'-DVPBLU_PIN_DIR="{pin_dir}"', f"-DVPBLU_BLOCK_WORDS={BLOCK_WORDS}"],
        )
        self._functions = {
            name: self._bpf.load_func(name, BPF.SCHED_CLS)
            for name in (CLASSIFY_FUNCTION, DELIVER_FUNCTION, GUARD_FUNCTION)
        }
        self.classify_fd: int = self._functions[CLASSIFY_FUNCTION].fd
        self.deliver_fd: int = self._functions[DELIVER_FUNCTION].fd
        self.guard_fd: int = self._functions[GUARD_FUNCTION].fd
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

    def counters(self, name: str) -> tuple[int, ...]:
        """A per-CPU counter map (one of COUNTER_MAPS), each entry summed over the CPUs."""
        table = self._maps[name]
        return tuple(sum(int(v) for v in table[table.Key(i)]) for i in range(table.max_entries))

    def close(self) -> None:
        self._bpf.cleanup()


def remove_pins(pin_dir: Path) -> None:
    for name in MAP_NAMES:
        (pin_dir / name).unlink(missing_ok=True)
    if pin_dir.exists():
        pin_dir.rmdir()


def _our_slot(parent: int) -> dict[str, int]:
    """The one filter slot vpblu takes on a link's clsact, in direction `parent`:
    attach replaces what is there, detach removes exactly it."""
    return {"handle": FILTER_HANDLE, "parent": parent, "prio": FILTER_PRIO,
            "protocol": ETH_P_ALL}
