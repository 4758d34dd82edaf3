"""The typed shapes of the API objects vpblu reads: what the watchers hand on.

Owns the values (a Node's addresses, a VpbluNode's key and rotation record,
a policy, a daemon Pod) that `vpblu.kube.resources` parses raw objects into.
Pure data: no I/O, no parsing, no clock.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from vpblu.core import model, wire

RawObject = dict[str, Any]


class InvalidObject(ValueError):
    """The object is well-formed JSON but not something vpblu can act on."""


@attrs.frozen(slots=True)
class ObjectMeta:
    name: str
    generation: int
    resource_version: str
    uid: str
    annotations: tuple[tuple[str, str], ...] = ()
    # metadata.ownerReferences as (kind, uid) pairs.
    owners: tuple[tuple[str, str], ...] = ()

    def owner_uid(self, kind: str) -> str | None:
        return next((uid for k, uid in self.owners if k == kind), None)

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@attrs.frozen(slots=True)
class NodeSource:
    """What vpblu reads from a core/v1 Node."""

    meta: ObjectMeta
    internal_ip: model.IPAddress | None
    pod_cidrs: tuple[model.IPNetwork, ...]


ROTATE_NOW_ANNOTATION = "vpblu.io/rotate-now"


class RotationPhase(enum.Enum):
    PREPARE = "Prepare"
    DISTRIBUTE = "Distribute"
    ACTIVATE = "Activate"
    RETIRE = "Retire"
    ROLLING_BACK = "RollingBack"


@attrs.frozen(slots=True)
class RotationRecord:
    """A key rotation in progress, as status.rotation of the rotating VpbluNode
    holds it: written by the leader's RotationActor *before* each step is sent,
    so a new leader knows where to resume or roll back."""

    rotation_id: str
    phase: RotationPhase
    step: wire.RotationStepKind
    old_public_key: str
    new_public_key: str = ""
    peers: tuple[str, ...] = ()
    trigger: str = ""  # the rotate-now annotation value (or "schedule") that started it
    stamp: int = 0
    slot: int = 1  # its bridges: vpblu/node/rotation.py BridgeLayout

    @property
    def published_key(self) -> str:
        """The key peers' primary interfaces hold for this node now: K until
        Retire, K' from Retire on (rotation.py: the switch happens then)."""
        if self.phase is RotationPhase.RETIRE and self.new_public_key:
            return self.new_public_key
        return self.old_public_key

    def to_status(self) -> RawObject:
        return {
            "rotationId": self.rotation_id, "phase": self.phase.value, "step": self.step.name,
            "oldPublicKey": self.old_public_key, "newPublicKey": self.new_public_key,
            "peers": list(self.peers), "trigger": self.trigger, "stamp": self.stamp,
            "slot": self.slot,
        }


@attrs.frozen(slots=True)
class LastRotation:
    """status.lastRotation: how the node's last rotation ended."""

    rotation_id: str
    outcome: str  # "Completed" or "RolledBack"
    trigger: str
    finished: float  # seconds since the epoch
    message: str = ""

    def to_status(self) -> RawObject:
        return {"rotationId": self.rotation_id, "outcome": self.outcome,
                "trigger": self.trigger, "finished": int(self.finished),
                "message": self.message}


@attrs.frozen(slots=True)
class VpbluNodeSource:
    """What vpblu reads from a VpbluNode (spec and the status it wrote itself)."""

    meta: ObjectMeta
    endpoint: model.Endpoint | None
    public_key: str | None
    rotation: RotationRecord | None = None
    last_rotation: LastRotation | None = None

    @property
    def published_key(self) -> str | None:
        """The key peers should hold for this node: mid-rotation the rotation decides."""
        return self.rotation.published_key if self.rotation is not None else self.public_key


@attrs.frozen(slots=True)
class PolicySource:
    """Any of the four policy kinds, typed."""

    meta: ObjectMeta
    policy: model.TunnelPolicy | model.RoutePolicy | model.BlockPolicy | model.RotationPolicy


@attrs.frozen(slots=True)
class DaemonPodSource:
    """A vpblu daemon Pod: which node it is bound to, and how it is doing."""

    meta: ObjectMeta
    node_name: str | None
    phase: str
    terminating: bool = False  # metadata.deletionTimestamp is set


@attrs.frozen(slots=True)
class PodRangesSource:
    """The ConfigMap where the leader keeps every Node podCIDR it has seen
    (vpblu.core.podranges): the ranges it holds, and its lines that are not
    ranges (kept out, and said on the TunnelPolicy's PodRanges condition)."""

    meta: ObjectMeta
    ranges: tuple[model.PodRange, ...]
    problems: tuple[str, ...] = ()


Typed = NodeSource | VpbluNodeSource | PolicySource | DaemonPodSource | PodRangesSource
