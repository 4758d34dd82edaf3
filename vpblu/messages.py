"""Every message one vpblu actor sends another, and nothing else.

Rules: frozen, slotted attrs classes; validators where a wrong value is
possible; one union type per actor inbox, dispatched with `match`; never a
dict, never a private key.
"""

from __future__ import annotations

import attrs
import trio

from vpblu.model import Change, Condition, NodeDesiredState
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
    # The Lease's leaseTransitions when this replica took it: every leader's
    # term is higher than the last one's, so generations stamped with it stay
    # monotonic across failovers (a daemon's genGuard would ignore a new
    # leader that started counting from 1).
    term: int = 0


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


# --- StateActor <-> NodeSessionActor ------------------------------------------------


@attrs.frozen(slots=True)
class PushSync:
    """Send the node its whole desired state at `generation`."""

    generation: int
    state: NodeDesiredState


@attrs.frozen(slots=True)
class PushDelta:
    """Send the node `changes` taking it from `base_generation` to `generation`;
    `state` is the result, kept by the session for its periodic full resync."""

    generation: int
    base_generation: int
    changes: tuple[Change, ...]
    state: NodeDesiredState


SessionCommand = PushSync | PushDelta


@attrs.frozen(slots=True, eq=False)
class SessionOpened:
    """A daemon's stream is up; `mailbox` reaches its NodeSessionActor.

    `session_id` tells two sessions of one node apart (a daemon that
    reconnects before its old stream is noticed dead): only the newest counts.
    """

    node: str
    session_id: int
    mailbox: trio.MemorySendChannel[SessionCommand]


@attrs.frozen(slots=True)
class SessionClosed:
    node: str
    session_id: int


@attrs.frozen(slots=True)
class NodeAcked:
    """The daemon applied `generation` (or failed to, with `error`)."""

    node: str
    session_id: int
    generation: int
    error: str | None = None


StateMessage = WatchMessage | SessionOpened | SessionClosed | NodeAcked
