"""What a daemon and the controller say to each other on the warm stream.

Owns the typed values of DESIGN §5: the daemon's `NodeMessage`s (Hello, Ack,
Heartbeat, RotationResult) and the controller's `ControllerMessage`s (SyncState,
Delta, Redirect, Refused, RotationStep). They are what the session and stream actors exchange with
`vpblu.stream.transport`; `vpblu.stream.codec` turns them into protobuf and back. Nothing
here does I/O or knows about gRPC.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import attrs

from vpblu.core.model import Change, NodeDesiredState, check_public_key

MAX_GENERATION = 2**64 - 1  # the proto field is uint64


def _check_generation(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= MAX_GENERATION:
        raise ValueError(f"{attribute.name}: generation {value} is outside 0..2**64-1")


def _check_node_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 253:
        raise ValueError(f"{attribute.name}: a node name is 1..253 characters, got {value!r}")


def _changes(values: Iterable[Change]) -> tuple[Change, ...]:
    return tuple(values)


# --- daemon -> controller --------------------------------------------------------


@attrs.frozen(slots=True)
class Hello:
    """The daemon's first message: who it is, its current key, what it applied."""

    node_name: str = attrs.field(validator=_check_node_name)
    public_key: str = attrs.field(validator=check_public_key)
    last_applied_generation: int = attrs.field(default=0, validator=_check_generation)
    daemon_version: str = ""


@attrs.frozen(slots=True)
class Ack:
    """`generation` was applied; or, with `error`, applying it failed."""

    generation: int = attrs.field(validator=_check_generation)
    error: str | None = None


@attrs.frozen(slots=True)
class Heartbeat:
    """Proof of life when there is nothing to acknowledge."""


class RotationStepKind(enum.IntEnum):
    """One step of a key rotation (values as in mesh.proto)."""

    PREPARE = 1
    DISTRIBUTE = 2
    ACTIVATE = 3
    SWITCH_PEER = 4
    RETIRE_ROTATING = 5
    RETIRE_PEER = 6
    ROLL_BACK_ROTATING = 7
    ROLL_BACK_PEER = 8
    ABANDON_ROTATING = 9


def _check_rotation_id(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 64:
        raise ValueError(f"{attribute.name}: a rotation id is 1..64 characters")


def _check_optional_key(inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        check_public_key(inst, attribute, value)


@attrs.frozen(slots=True)
class RotationResult:
    """What the daemon did with the RotationStep stamped `stamp`: done, or `error`.
    A PREPARE result carries the staged key's public half (never the private one)."""

    rotation_id: str = attrs.field(validator=_check_rotation_id)
    step: RotationStepKind
    rotating_node: str = attrs.field(validator=_check_node_name)
    stamp: int = attrs.field(validator=_check_generation)
    error: str | None = None
    new_public_key: str = attrs.field(default="", validator=_check_optional_key)


NodeMessage = Hello | Ack | Heartbeat | RotationResult


# --- controller -> daemon --------------------------------------------------------


@attrs.frozen(slots=True)
class SyncState:
    """The node's whole desired state; idempotent, replaces whatever it had."""

    generation: int = attrs.field(validator=_check_generation)
    state: NodeDesiredState


@attrs.frozen(slots=True)
class Delta:
    """Changes that turn `base_generation`'s state into `generation`'s."""

    generation: int = attrs.field(validator=_check_generation)
    base_generation: int = attrs.field(validator=_check_generation)
    changes: tuple[Change, ...] = attrs.field(default=(), converter=_changes)

    def __attrs_post_init__(self) -> None:
        if self.base_generation >= self.generation:
            raise ValueError(
                f"a delta moves forward: base generation {self.base_generation}"
                f" is not below generation {self.generation}"
            )


@attrs.frozen(slots=True)
class Redirect:
    """The daemon reached a follower; the leader's Mesh service is at `leader`."""

    leader: str


@attrs.frozen(slots=True)
class Refused:
    """The controller will not serve this stream, and says why before it closes."""

    reason: str


@attrs.frozen(slots=True)
class RotationStep:
    """Do one step of `rotating_node`'s key rotation K -> K' and answer with a
    RotationResult. Idempotent on the daemon; `stamp` orders steps like a generation."""

    rotation_id: str = attrs.field(validator=_check_rotation_id)
    step: RotationStepKind
    rotating_node: str = attrs.field(validator=_check_node_name)
    old_public_key: str = attrs.field(validator=check_public_key)
    new_public_key: str = attrs.field(default="", validator=_check_optional_key)
    stamp: int = attrs.field(default=0, validator=_check_generation)


ControllerMessage = SyncState | Delta | Redirect | Refused | RotationStep
