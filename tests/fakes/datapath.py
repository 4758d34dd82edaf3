"""FakePodLinks and FakeClassifierMaps: the data-path programs' kernel, in memory.

Fakes, named as such. FakeClassifierMaps keeps the tries as dicts and records
every table state a write left behind (`snapshots`), so a test can check what
the classifier could have seen between writes. The real ones are exercised on
real veths in tests/e2e/test_bpfmaps.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import attrs
import trio

from vpblu.core.model import IPNetwork
from vpblu.node.kernel.bcc import PodLink
from vpblu.node.kernel.bpftables import ClassifierConfig, ClassifierTables, DestKind, TableDiff

T = TypeVar("T")


class FakePodLinks:
    def __init__(self, links: list[PodLink], underlay: PodLink | None = None) -> None:
        self.links = list(links)
        self.underlay_link = underlay  # None: underlay() raises OSError, like no default route
        self.attached: dict[int, tuple[int, int]] = {}  # link index -> (classify, deliver) fds
        self.guards: dict[int, int] = {}  # link index -> guard fd
        self.vanished: set[int] = set()  # attach() finds these gone
        self.opened = 0
        self._changed = trio.Event()

    def add(self, link: PodLink) -> None:
        self.links.append(link)
        self._changed.set()

    def move_underlay(self, link: PodLink | None) -> None:
        self.underlay_link = link
        self._changed.set()

    async def open(self) -> None:
        self.opened += 1

    async def aclose(self) -> None:
        self.opened -= 1

    async def pod_links(self) -> list[PodLink]:
        return list(self.links)

    async def underlay(self) -> PodLink:
        if self.underlay_link is None:
            raise OSError("no default route: set underlay_interface")
        return self.underlay_link

    async def attach(self, link: PodLink, classify_fd: int, deliver_fd: int) -> bool:
        if link.index in self.vanished:
            return False
        self.attached[link.index] = (classify_fd, deliver_fd)
        return True

    async def detach(self, link: PodLink) -> None:
        self.attached.pop(link.index, None)

    async def attach_guard(self, link: PodLink, guard_fd: int) -> bool:
        if link.index in self.vanished:
            return False
        self.guards[link.index] = guard_fd
        return True

    async def detach_guard(self, link: PodLink) -> None:
        self.guards.pop(link.index, None)

    async def guarded_links(self) -> list[PodLink]:
        return [PodLink(index, f"link{index}") for index in self.guards]

    async def wait_link_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()


COUNTER_SIZES = {"counters": 4, "delivery_counters": 2, "guard_counters": 4}


@attrs.define
class FakeClassifierMaps:
    classify_fd: int = 100
    deliver_fd: int = 101
    guard_fd: int = 102
    block_src: dict[IPNetwork, int] = attrs.field(factory=dict)
    block_dst: dict[IPNetwork, int] = attrs.field(factory=dict)
    dest: dict[IPNetwork, DestKind] = attrs.field(factory=dict)
    config: ClassifierConfig = attrs.field(factory=lambda: ClassifierConfig(0, 0))
    writes: int = 0
    snapshots: list[ClassifierTables] = attrs.field(factory=list)
    closed: bool = False
    counter_values: dict[str, list[int]] = attrs.field(
        factory=lambda: {name: [0] * size for name, size in COUNTER_SIZES.items()}
    )

    def load(self, _source: Path, _pin_dir: Path) -> FakeClassifierMaps:
        """Stands in for BccClassifier(source, pin_dir): the same maps every time, like pins."""
        self.closed = False
        return self

    def map_ids(self) -> dict[str, int]:
        return {"block_src": 1, "block_dst": 2, "dest": 3, "config": 4, "counters": 5,
                "delivery_counters": 6, "guard_counters": 7}

    def read_tables(self) -> ClassifierTables:
        return ClassifierTables(self.block_src, self.block_dst, self.dest)

    def read_config(self) -> ClassifierConfig:
        return self.config

    def write_config(self, value: ClassifierConfig) -> None:
        self.config = value
        self.writes += 1

    def _write(self, table: dict[IPNetwork, T], change: TableDiff[IPNetwork, T]) -> None:
        for net, value in change.upserts.items():
            table[net] = value
            self.writes += 1
            self.snapshots.append(self.read_tables())
        for net in change.deletes:
            del table[net]
            self.writes += 1
            self.snapshots.append(self.read_tables())

    def write_block_src(self, change: TableDiff[IPNetwork, int]) -> None:
        self._write(self.block_src, change)

    def write_block_dst(self, change: TableDiff[IPNetwork, int]) -> None:
        self._write(self.block_dst, change)

    def write_dest(self, change: TableDiff[IPNetwork, DestKind]) -> None:
        self._write(self.dest, change)

    def counters(self, name: str) -> tuple[int, ...]:
        return tuple(self.counter_values[name])

    def close(self) -> None:
        self.closed = True
