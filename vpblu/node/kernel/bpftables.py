"""The tables the data-path programs (bpf/classifier.c) read, computed from desired state.

Owns the pure translation from routes, blocks and the cluster's pod ranges to
map contents, and the difference between two such contents. It never touches
the kernel, never reads a clock and holds no state; BpfMapActor writes what it
computes.

Blocked CIDR pairs. One LPM lookup cannot match a (src CIDR, dst CIDR) pair, so
each block rule gets an id (a bit, 0..BLOCK_RULE_LIMIT-1) and the programs that
enforce blocks (`classify` at the source, `deliver` at the destination) do two
lookups: the src trie gives the bitmap of rules whose src CIDR contains the
packet's source, the dst trie the same for the destination; a non-zero AND means
one rule contains both. An LPM trie returns only the longest matching prefix, so
the bitmap stored at a prefix is the OR of the bits of every rule whose CIDR
contains that prefix, not only the rules that name it. The rule count is capped
at BLOCK_RULE_LIMIT (the bitmap's width, shared with the C source through
-DVPBLU_BLOCK_WORDS); more is refused with TooManyBlockRules, never truncated.

Rule ids are stable: a rule that stays keeps its bit, so adding or removing one
rule rewrites only the prefixes it touches. The ids need no storage of their
own: `decode_rules` recovers them from the tries (a rule's own CIDR is the
shortest prefix carrying its bit), which is how a restarted daemon picks up
the tables the previous one left pinned.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

import attrs

from vpblu.core.model import CidrPair, IPNetwork, Route

BLOCK_WORDS = 2
BLOCK_RULE_LIMIT = 64 * BLOCK_WORDS


class TooManyBlockRules(ValueError):
    """More distinct blocked pairs than the classifier's bitmap has bits."""


class DestKind(enum.IntEnum):
    """The kinds of entry in `dest`, the cluster's pod (and mesh-routed) ranges.

    No program acts on the kind any more: steering into the mesh is policy
    routing by destination (NetlinkActor), and for the underlay guard every
    entry is a pod address that must never leave in the clear. The kinds stay
    in the pinned trie for who reads it (`bpftool map dump`) and for the
    restart, which reads the trie back.
    """

    REMOTE = 1  # routed into the mesh (a remote node's pod CIDR, or a RoutePolicy CIDR)
    LOCAL = 2  # a pod CIDR of this node
    CLUSTER = 3  # a cluster pod range with no route of its own


FLAG_STRICT = 1


@attrs.frozen(slots=True)
class ClassifierConfig:
    """The programs' single config entry. Only `strict` is used (the underlay guard
    drops what it counts). `mark` and `mask` are the retired fwmark the classifier
    once set: the pinned entry keeps its layout across daemon versions, and they
    are written 0, which also makes a previous daemon's classifier, still attached
    until the new one replaces it, stop marking."""

    mark: int = 0
    mask: int = 0
    strict: bool = False

    @property
    def flags(self) -> int:
        return FLAG_STRICT if self.strict else 0


def _frozen_bits(value: Mapping[IPNetwork, int]) -> Mapping[IPNetwork, int]:
    return dict(value)


def _frozen_dest(value: Mapping[IPNetwork, DestKind]) -> Mapping[IPNetwork, DestKind]:
    return dict(value)


@attrs.frozen(slots=True)
class ClassifierTables:
    """The complete contents of the classifier's three tries (the config entry is apart)."""

    block_src: Mapping[IPNetwork, int] = attrs.field(factory=dict, converter=_frozen_bits)
    block_dst: Mapping[IPNetwork, int] = attrs.field(factory=dict, converter=_frozen_bits)
    dest: Mapping[IPNetwork, DestKind] = attrs.field(factory=dict, converter=_frozen_dest)


def assign_rule_ids(
    blocks: Iterable[CidrPair], current: Mapping[int, CidrPair], limit: int = BLOCK_RULE_LIMIT
) -> dict[int, CidrPair]:
    """Give every wanted rule a bit: kept rules keep theirs, new ones take the lowest free."""
    wanted = set(blocks)
    if len(wanted) > limit:
        raise TooManyBlockRules(
            f"{len(wanted)} blocked CIDR pairs, the classifier holds at most {limit}"
        )
    ids = {i: rule for i, rule in current.items() if rule in wanted}
    placed = set(ids.values())
    free = (i for i in range(limit) if i not in ids)
    for rule in sorted(wanted - placed):
        ids[next(free)] = rule
    return ids


def _contains(outer: IPNetwork, inner: IPNetwork) -> bool:
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def rule_bits(cidrs: Mapping[int, IPNetwork]) -> dict[IPNetwork, int]:
    """For each CIDR named by some rule: the OR of the bits of every rule whose CIDR contains it."""
    bits: dict[IPNetwork, int] = {}
    for prefix in set(cidrs.values()):
        bits[prefix] = 0
        for rule_id, cidr in cidrs.items():
            if _contains(cidr, prefix):
                bits[prefix] |= 1 << rule_id
    return bits


def decode_rules(
    block_src: Mapping[IPNetwork, int], block_dst: Mapping[IPNetwork, int]
) -> dict[int, CidrPair]:
    """The rules (by id) that tables written by `tables` encode: each rule's own
    CIDR is the least specific prefix carrying its bit. A bit present on only one
    side (tables written half-way) names no rule; the next write clears it."""

    def owners(side: Mapping[IPNetwork, int]) -> dict[int, IPNetwork]:
        found: dict[int, IPNetwork] = {}
        for prefix, bits in side.items():
            rule_id = 0
            while bits:
                if bits & 1:
                    best = found.get(rule_id)
                    if best is None or prefix.prefixlen < best.prefixlen:
                        found[rule_id] = prefix
                bits >>= 1
                rule_id += 1
        return found

    srcs, dsts = owners(block_src), owners(block_dst)
    return {i: CidrPair(srcs[i], dsts[i]) for i in srcs.keys() & dsts.keys()}


def dest_table(
    routes: Iterable[Route], local_cidrs: Iterable[IPNetwork], cluster_cidrs: Iterable[IPNetwork]
) -> dict[IPNetwork, DestKind]:
    """Destinations by kind; on an identical prefix a route wins over local, local over cluster."""
    table: dict[IPNetwork, DestKind] = {}
    for cidr in cluster_cidrs:
        table[cidr] = DestKind.CLUSTER
    for cidr in local_cidrs:
        table[cidr] = DestKind.LOCAL
    for route in routes:
        table[route.cidr] = DestKind.REMOTE
    return table


def tables(
    rules: Mapping[int, CidrPair],
    routes: Iterable[Route],
    local_cidrs: Iterable[IPNetwork] = (),
    cluster_cidrs: Iterable[IPNetwork] = (),
) -> ClassifierTables:
    return ClassifierTables(
        block_src=rule_bits({i: r.src for i, r in rules.items()}),
        block_dst=rule_bits({i: r.dst for i, r in rules.items()}),
        dest=dest_table(routes, local_cidrs, cluster_cidrs),
    )


K = TypeVar("K")
V = TypeVar("V")


@attrs.frozen(slots=True)
class TableDiff(Generic[K, V]):
    """Entries to write (new or changed) and keys to delete, to turn one table into another."""

    upserts: Mapping[K, V]
    deletes: frozenset[K]

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


def diff(current: Mapping[K, V], desired: Mapping[K, V]) -> TableDiff[K, V]:
    return TableDiff(
        upserts={k: v for k, v in desired.items() if current.get(k) != v},
        deletes=frozenset(current.keys() - desired.keys()),
    )
