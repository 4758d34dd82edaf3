"""BpfMapActor: owns the data-path programs (bpf/classifier.c), their pinned maps
and their tc filters.

It compiles bpf/classifier.c with bcc at start, keeps its maps pinned under
`config.bpf_pin_dir`, and attaches (tc clsact, direct-action):
- to every host-side pod veth matching `config.pod_veth_glob`, also those that
  appear later: `classify` at ingress (a blocked pair dropped as the pod sends
  it) and `deliver` at egress (a blocked pair dropped as it reaches the pod,
  after kube-proxy's DNAT: the block holds when the pod is called by Service);
- to the node's underlay (`config.underlay_interface`, else the default
  route's device, looked up again on every link event): `underlay_guard` at
  egress, which counts every pod-addressed packet leaving in the clear (also
  inside VXLAN, Geneve, IPIP) and, when the message says `strict`, drops it.
  Its counter (`DataPathStatistics.guard_cleartext`) is the proof that no pod
  traffic leaves the node unencrypted.
It makes the maps equal to the ApplyDataPath it receives, writing only entries
that differ: `dest` holds every pod range (routes, local_cidrs, cluster_cidrs).

Restart without a gap: bcc's BPF_TABLE_PINNED opens a map that is already
pinned instead of creating one, so a new daemon gets the same maps (same ids,
same entries) and the programs the previous daemon attached keep reading them
until `tc filter replace` swaps in the new ones atomically, at the same prio
and handle. Traffic never sees an empty map. Stopping the actor leaves the
filters and pins in place on purpose (the data plane outlives the daemon,
DESIGN §7); only `cleanup()` (uninstall) removes them.

It never decides policy: what is routed, blocked or strict comes in the
message; and it never touches routes or ip rules (NetlinkActor owns those, and
steers into the mesh by destination).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import attrs
import trio

from vpblu.core import wire
from vpblu.core.model import CidrPair, IPNetwork
from vpblu.messages import ApplyDataPath, BpfMapInbox, DataPathApplied, ReadDataPathCounters
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel import bpftables
from vpblu.node.kernel.bcc import (
    CLASSIFIER_SOURCE,
    BccClassifier,
    NetlinkPodLinks,
    PodLink,
    remove_pins,
)
from vpblu.node.kernel.bpftables import (
    ClassifierConfig,
    ClassifierTables,
    DestKind,
    TableDiff,
    TooManyBlockRules,
)

log = logging.getLogger(__name__)

# Indexes of the per-CPU counters (classifier.c). `counters` (classify) keeps
# slots 0 and 3, retired (the fwmark, the strict drop): a pinned map keeps its layout.
COUNTER_DROPPED_BLOCKED = 1
COUNTER_PASSED = 2
DELIVERY_PASSED = 0  # delivery_counters (deliver)
DELIVERY_DROPPED_BLOCKED = 1
GUARD_POD_DST = 0  # guard_counters (underlay_guard)
GUARD_POD_SRC_ONLY = 1
GUARD_INNER = 2
GUARD_DROPPED = 3


@attrs.frozen(slots=True)
class DataPathStatistics:
    """The programs' counters (since the pins were created: they survive restarts)
    and what this actor attached and wrote."""

    passed: int  # classify: sent by a pod, not blocked
    dropped_blocked: int  # classify: a blocked pair, dropped as the pod sent it
    delivered: int  # deliver: reached a pod, not blocked
    delivery_dropped_blocked: int  # deliver: a blocked pair (e.g. called by Service)
    # underlay_guard: pod-addressed packets that left the underlay outside WireGuard,
    # outer destination or inside a tunnel (VXLAN, Geneve, IPIP). 0 is the promise.
    guard_cleartext: int
    guard_cleartext_encapsulated: int  # of guard_cleartext, inside a tunnel
    guard_dropped: int  # of guard_cleartext, dropped (strict)
    guard_pod_src_only: int  # from a pod address to a non-pod one (egress): counted only
    attached: tuple[str, ...]  # pod veths carrying classify and deliver
    guard_link: str | None  # the underlay carrying the guard, None while there is none
    map_ids: Mapping[str, int]
    entries_written: int
    entries_deleted: int


class PodLinkControl(Protocol):
    """The kernel's links and tc, as far as the programs need them."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def pod_links(self) -> list[PodLink]: ...

    async def underlay(self) -> PodLink:
        """The underlay link; OSError when there is none (no such link, no default route)."""
        ...

    async def attach(self, link: PodLink, classify_fd: int, deliver_fd: int) -> bool:
        """Attach (or swap in) classify and deliver; False when the link is already gone."""
        ...

    async def detach(self, link: PodLink) -> None: ...

    async def attach_guard(self, link: PodLink, guard_fd: int) -> bool:
        """Attach (or swap in) the guard at egress; False when the link is already gone."""
        ...

    async def detach_guard(self, link: PodLink) -> None: ...

    async def guarded_links(self) -> list[PodLink]:
        """Every link carrying the guard, wherever a daemon put it."""
        ...

    async def wait_link_change(self) -> None: ...


class ClassifierMaps(Protocol):
    """The loaded programs and their maps."""

    classify_fd: int
    deliver_fd: int
    guard_fd: int

    def map_ids(self) -> dict[str, int]: ...

    def read_tables(self) -> ClassifierTables: ...

    def read_config(self) -> ClassifierConfig: ...

    def write_config(self, value: ClassifierConfig) -> None: ...

    def write_block_src(self, change: TableDiff[IPNetwork, int]) -> None: ...

    def write_block_dst(self, change: TableDiff[IPNetwork, int]) -> None: ...

    def write_dest(self, change: TableDiff[IPNetwork, DestKind]) -> None: ...

    def counters(self, name: str) -> tuple[int, ...]:
        """One per-CPU counter map by name, each entry summed over the CPUs."""
        ...

    def close(self) -> None: ...


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
        self._links: PodLinkControl = links or NetlinkPodLinks(
            netns, config.pod_veth_glob, config.underlay_interface
        )
        self._source = source
        self._load_classifier = load_classifier
        self._maps: ClassifierMaps | None = None
        self._tables = ClassifierTables()
        self._rules: dict[int, CidrPair] = {}
        self._classifier_config: ClassifierConfig | None = None
        self._attached: dict[int, PodLink] = {}
        self._guarded: PodLink | None = None
        self._underlay_problem: str | None = None
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
                            case ReadDataPathCounters(reply=reply):
                                with contextlib.suppress(trio.BrokenResourceError,
                                                         trio.ClosedResourceError):
                                    await reply.send(self.counters())
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
        wanted = ClassifierConfig(strict=current.strict)  # a retired mark is cleared
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
                link, self._maps.classify_fd, self._maps.deliver_fd
            ):
                self._attached[index] = link
        await self._guard_underlay()
        self._attachments_changed.set()
        self._attachments_changed = trio.Event()

    async def _guard_underlay(self) -> None:
        """The guard on the underlay as it is now, and on no other link."""
        assert self._maps is not None
        try:
            underlay = await self._links.underlay()
        except OSError as exc:
            if str(exc) != self._underlay_problem:
                log.warning("no cleartext guard (no underlay): %s", exc)
                self._underlay_problem = str(exc)
            self._guarded = None
            return
        self._underlay_problem = None
        if underlay == self._guarded:
            return
        if not await self._links.attach_guard(underlay, self._maps.guard_fd):
            self._guarded = None  # gone already; its deletion is a link event
            return
        self._guarded = underlay
        log.info("cleartext guard on %s", underlay.name)
        for link in await self._links.guarded_links():
            if link.index != underlay.index:
                await self._links.detach_guard(link)

    async def wait_attached(self, name: str) -> None:
        """Return once classify and deliver are attached to the link called `name`."""
        while name not in {link.name for link in self._attached.values()}:
            await self._attachments_changed.wait()

    async def wait_guard(self, name: str) -> None:
        """Return once the guard is attached to the link called `name`."""
        while self._guarded is None or self._guarded.name != name:
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
        classify = maps.counters("counters")
        delivery = maps.counters("delivery_counters")
        guard = maps.counters("guard_counters")
        return DataPathStatistics(
            passed=classify[COUNTER_PASSED],
            dropped_blocked=classify[COUNTER_DROPPED_BLOCKED],
            delivered=delivery[DELIVERY_PASSED],
            delivery_dropped_blocked=delivery[DELIVERY_DROPPED_BLOCKED],
            guard_cleartext=guard[GUARD_POD_DST] + guard[GUARD_INNER],
            guard_cleartext_encapsulated=guard[GUARD_INNER],
            guard_dropped=guard[GUARD_DROPPED],
            guard_pod_src_only=guard[GUARD_POD_SRC_ONLY],
            attached=tuple(sorted(link.name for link in self._attached.values())),
            guard_link=self._guarded.name if self._guarded is not None else None,
            map_ids=maps.map_ids(),
            entries_written=self._written,
            entries_deleted=self._deleted,
        )

    def counters(self) -> wire.DataPathCounters:
        """The programs' counters as the daemon's telemetry carries them (the
        fail-closed sink's drops are the NetlinkActor's, filled in there)."""
        stats = self.statistics()
        return wire.DataPathCounters(
            passed=stats.passed, dropped_blocked=stats.dropped_blocked,
            delivered=stats.delivered, delivery_dropped_blocked=stats.delivery_dropped_blocked,
            guard_cleartext=stats.guard_cleartext, guard_dropped=stats.guard_dropped,
            guard_attached=stats.guard_link is not None)

    async def cleanup(self) -> None:
        """Uninstall: remove our filters from every pod veth and the guard from every
        link that carries it (and each clsact qdisc when nothing else is left on it),
        and the pinned maps. Call after run() returned."""
        await self._links.open()
        try:
            for link in await self._links.pod_links():
                await self._links.detach(link)
            for link in await self._links.guarded_links():
                await self._links.detach_guard(link)
        finally:
            with trio.CancelScope(shield=True):
                await self._links.aclose()
        self._attached.clear()
        self._guarded = None
        remove_pins(self._config.bpf_pin_dir)


async def _reply(message: ApplyDataPath, result: DataPathApplied) -> None:
    if message.reply is not None:
        await message.reply.send(result)
