"""Every message one vpblu actor sends another, and nothing else.

Rules: frozen, slotted attrs classes; validators where a wrong value is
possible; one union type per actor inbox, dispatched with `match`; never a
dict, never a private key.
"""

from __future__ import annotations

import attrs
import trio

from vpblu.model import CidrPair, Condition, IPNetwork, Route, network
from vpblu.resources import Typed

# --- WatcherActor -> StateActor -----------------------------------------------------


@attrs.frozen(slots=True)
class InvalidSource:
    """An object the watcher could not type: reported as a status condition."""

    kind: str
    name: str
    generation: int
    message: str


@attrs.frozen(slots=True)
class KindListed:
    """The complete current set of one kind, after a (re)list.

    Level-triggered: the receiver replaces its whole view of `kind` with this,
    which is how deletions missed while a watch was down are noticed.
    """

    kind: str
    objects: tuple[Typed, ...]
    invalid: tuple[InvalidSource, ...]
    resource_version: str


@attrs.frozen(slots=True)
class KindChanged:
    """What one watch batch changed: upserted objects, deleted names, invalid ones."""

    kind: str
    upserted: tuple[Typed, ...]
    deleted: tuple[str, ...]
    invalid: tuple[InvalidSource, ...]
    resource_version: str


WatchMessage = KindListed | KindChanged


# --- LeaderActor -> whoever gates leader-only work ------------------------------------


@attrs.frozen(slots=True)
class LeaderObserved:
    """Who holds the Lease now, as this replica last saw it.

    `holder` None means nobody (never held, released, or expired). `address`
    is the holder's gRPC address, so a follower can redirect daemons there.
    """

    is_me: bool
    holder: str | None
    address: str | None


# --- StateActor / NodeSessionActor -> StatusActor -----------------------------------


@attrs.frozen(slots=True)
class PublicKeyReported:
    """A daemon said (in its Hello) that this is its current public key."""

    node: str
    public_key: str


@attrs.frozen(slots=True)
class ObjectConditions:
    """The complete set of conditions one object should show now.

    Level-triggered: the StatusActor makes the object's status.conditions
    equal to this (keeping lastTransitionTime where a condition's status did
    not change), and writes nothing when it already is.
    """

    kind: str
    name: str
    generation: int
    conditions: tuple[Condition, ...]


StatusMessage = PublicKeyReported | ObjectConditions


# --- daemon -> BpfMapActor ------------------------------------------------------------


def _routes(values: tuple[Route, ...] | list[Route]) -> tuple[Route, ...]:
    return tuple(sorted(values))


def _blocks(values: tuple[CidrPair, ...] | list[CidrPair]) -> tuple[CidrPair, ...]:
    return tuple(sorted(values))


def _cidrs(values: tuple[IPNetwork | str, ...] | list[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    return tuple(sorted({network(v) for v in values}, key=lambda n: (n.version, n.prefixlen, n)))


@attrs.frozen(slots=True)
class DataPathApplied:
    """What one ApplyDataPath wrote: `written` entries set, `deleted` removed.
    `refused` says why nothing was written (e.g. too many block rules)."""

    written: int
    deleted: int
    refused: str | None = None


@attrs.frozen(slots=True)
class ApplyDataPath:
    """The complete data-path policy this node's classifier should enforce now.

    Level-triggered: the BpfMapActor makes its pinned maps equal to this and
    writes only the entries that differ. `routes` are remote pod CIDRs (marked
    into the mesh); `local_cidrs` this node's own pod CIDRs; `cluster_cidrs`
    the whole cluster's pod ranges, which `strict` (fail-closed) uses to drop
    cluster traffic that has no remote route. `reply`, when given, receives one
    DataPathApplied.
    """

    routes: tuple[Route, ...] = attrs.field(default=(), converter=_routes)
    blocks: tuple[CidrPair, ...] = attrs.field(default=(), converter=_blocks)
    local_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_cidrs)
    cluster_cidrs: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_cidrs)
    strict: bool = False
    reply: trio.MemorySendChannel[DataPathApplied] | None = attrs.field(
        default=None, eq=False, repr=False
    )


BpfMapsMessage = ApplyDataPath
