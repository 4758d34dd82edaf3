"""StatusActor: the only writer of vpblu objects' status.

Owns status writes: a key rotation's record (status.rotation, lastRotation;
the RotationActor waits on `RotationStatus.written` before it sends the step it
records), a daemon's reported public key into its VpbluNode
(creating the VpbluNode when the node has none yet), the conditions the
core computed for every policy and VpbluNode (Accepted / what was ignored and
why, with observedGeneration), and a VpbluNode's health from the HealthActor
(Connected, Applied, Ready, and KeyPublished, which compares the key the
daemon uses with the publicKey this very write leaves; peers up/total,
applied generation, key creation time). Conditions from different senders
are merged by type into one list. It never writes spec, and never decides
anything: it makes status equal to what it was told, level-triggered.

Writes are coalesced per object (only the newest wanted status of an object
is written; a burst of 1000 key reports on a mass reconnect becomes at most
one write per node), done by a few concurrent workers, skipped when the
object already shows it, and retried with backoff when the API server is
unavailable. A write for an object that has since been deleted is dropped,
and all it held for a deleted object is forgotten (`ObjectDeleted`, from the
StateActor, which watches them).

The status is the controller's alone (status.publicKey is the mesh's trust
anchor): every VpbluNode version the StatusGuardActor sees that this actor did
not write (`StatusObserved`) is read again and what it owns is restored at once;
when a status field had to be restored, a Warning Event on the VpbluNode names
the writer (the latest other manager of the status subresource in managedFields).
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Iterable, Mapping

import attrs
import trio

from vpblu.core.deletednodes import DeletedNodes
from vpblu.core.health import NodeHealth
from vpblu.core.model import Condition
from vpblu.kube.client import (
    EVENTS,
    FIELD_MANAGER,
    GROUP,
    VERSION,
    VPBLU_NODES,
    ApiError,
    ApiUnavailable,
    Conflict,
    KubeApi,
    NotFound,
    RawObject,
    ResourceKind,
)
from vpblu.messages import (
    NodeGone,
    NodeHealthReported,
    NodeRegistered,
    ObjectConditions,
    ObjectDeleted,
    PublicKeyReported,
    RotationStatus,
    StatusInbox,
    StatusObserved,
)
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)

WORKERS = 4
RETRY_DELAY = 1.0
RETRY_DELAY_MAX = 30.0
# Answers that say the write itself is refused (400 bad request, 413 too large,
# 422 invalid): the same status would be refused again, so it is not retried -
# it would hold a worker forever - until what is wanted for the object changes.
REFUSED_FOR_GOOD = frozenset({400, 413, 422})
# A condition's message is cut to this (the API's own limit is 32 KiB; every
# problem of a policy joined into one message once made a status too large).
MAX_CONDITION_MESSAGE = 1024
# The resourceVersions of an object's latest writes by this actor: their watch
# events (which may arrive after a newer write) are not someone else's.
OWN_VERSIONS = 8
# Events about a cluster-scoped object (a VpbluNode) must be in "default" (the
# API server refuses them elsewhere), as the Node controller's are.
EVENT_NAMESPACE = "default"


@attrs.frozen(slots=True)
class _Key:
    kind: str
    name: str


_UNSET = "unset"


@attrs.frozen(slots=True)
class _Wanted:
    """The part of an object's status one message decides."""

    public_key: str | None = None
    conditions: ObjectConditions | None = None
    # status.rotation: _UNSET leaves it alone, None removes it.
    rotation: RawObject | str | None = _UNSET
    last_rotation: RawObject | None = None
    health: NodeHealth | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions_status(wanted: ObjectConditions, current: list[RawObject]) -> list[RawObject]:
    """status.conditions as they should be; lastTransitionTime kept where the status held."""
    before = {c.get("type"): c for c in current if isinstance(c, dict)}
    out = []
    for cond in _merge_by_type(wanted.conditions).values():
        old = before.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        out.append({
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": _bounded(cond.message),
            "observedGeneration": wanted.generation,
            "lastTransitionTime": _now() if changed or old is None else old.get(
                "lastTransitionTime", _now()),
        })
    return out


def _bounded(message: str) -> str:
    if len(message) <= MAX_CONDITION_MESSAGE:
        return message
    more = f" ... ({len(message) - MAX_CONDITION_MESSAGE} more characters)"
    return message[:MAX_CONDITION_MESSAGE - len(more)] + more


def _merge_by_type(conditions: tuple[Condition, ...]) -> Mapping[str, Condition]:
    """One condition per type: a False beats a True, and messages of the same
    status are joined, so an object with three problems shows all three."""
    merged: dict[str, Condition] = {}
    for cond in sorted(conditions):
        old = merged.get(cond.type)
        if old is None or (old.status == "True" and cond.status == "False"):
            merged[cond.type] = cond
        elif old.status == cond.status and cond.message not in old.message:
            merged[cond.type] = attrs.evolve(old, message=f"{old.message}; {cond.message}")
    return merged


def _same_conditions(a: list[RawObject], b: list[RawObject]) -> bool:
    def strip(cs: list[RawObject]) -> list[tuple[object, ...]]:
        return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"),
                       c.get("observedGeneration")) for c in cs)
    return strip(a) == strip(b)


class StatusActor:
    def __init__(self, kube: KubeApi, inbox: trio.MemoryReceiveChannel[StatusInbox],
                 kinds: Mapping[str, ResourceKind],
                 metrics: ControllerMetrics | None = None,
                 event_namespace: str = EVENT_NAMESPACE) -> None:
        self._metrics = metrics
        self._event_namespace = event_namespace
        self._ours: dict[_Key, tuple[str, ...]] = {}
        # Objects someone else wrote: read again before the next write.
        self._suspect: set[_Key] = set()
        self.reverted = 0  # foreign status writes undone (an Event each)
        self.refused = 0  # writes the API server refused for good (not retried)
        self._kube = kube
        self._inbox = inbox
        self._kinds = dict(kinds)
        self._wanted: dict[_Key, _Wanted] = {}
        # Nodes deleted and not registered again: no VpbluNode is made for them;
        # the key a daemon says there meanwhile is held until they are.
        self._deleted_nodes = DeletedNodes()
        # Unbounded, with a reason: a key is queued at most once (`_queued`), so
        # the queue never holds more entries than there are objects.
        self._dirty_send, self._dirty_receive = trio.open_memory_channel[_Key](math.inf)
        self._queued: set[_Key] = set()
        # A key a worker is writing is not queued again: the worker itself
        # notices (by `_version`) that newer status arrived and writes again.
        self._busy: set[_Key] = set()
        self._version: dict[_Key, int] = {}
        # RotationStatus messages waiting for their version to be written.
        self._waiters: dict[_Key, list[tuple[int, trio.Event]]] = {}
        # Per object, the resourceVersion and status this actor's last write
        # returned: the next write is a patch onto that version, without a
        # read first (a GET before each PATCH was half the API calls when 1000
        # nodes change condition at once). Anyone else's write in between makes
        # the patch a Conflict, after which the object is read again.
        self._seen: dict[_Key, tuple[str, RawObject]] = {}
        self._writes = 0

    @property
    def writes(self) -> int:
        """How many status writes reached the API server (for tests and the bench)."""
        return self._writes

    @property
    def remembered(self) -> int:
        """How many objects this actor holds anything for: the live ones, and
        the reported keys of deleted VpbluNodes."""
        return len(self._wanted.keys() | self._seen.keys() | self._version.keys())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(self._worker)
            task_status.started()
            async for message in self._inbox:
                if isinstance(message, StatusObserved):
                    self._observed(message)
                    continue
                if isinstance(message, NodeRegistered):
                    held = self._deleted_nodes.registered(message.node)
                    if held is None:
                        continue
                    # Its daemon stayed connected and said its key while the Node
                    # was away: written now, as if it had just said it.
                    message = PublicKeyReported(message.node, held)
                if isinstance(message, NodeGone):
                    if message.deleted:
                        self._deleted_nodes.deleted(message.node)
                    gone = _Key(VPBLU_NODES.kind, message.node)
                    self._seen.pop(gone, None)
                    if gone in self._queued or gone in self._busy:
                        # A write owed or in flight wants nothing now: it finds the
                        # object gone and forgets it then, never making it again.
                        self._wanted[gone] = _Wanted()
                        self._version[gone] = self._version.get(gone, 0) + 1
                    else:
                        self._forget(gone)
                        self._wanted.pop(gone, None)  # the reported key too: a new machine
                    continue
                if isinstance(message, ObjectDeleted):
                    gone = _Key(message.kind, message.name)
                    self._seen.pop(gone, None)
                    # A write still owed to it finds it gone, and forgets it then.
                    if gone not in self._queued and gone not in self._busy:
                        self._forget(gone)
                    continue
                match message:
                    case PublicKeyReported(node=node, public_key=key) if (
                            node in self._deleted_nodes):
                        log.info("node %s: its Node is deleted; the key its daemon said is "
                                 "held until a Node of that name is registered", node)
                        self._deleted_nodes.hold(node, key)
                        continue
                    case PublicKeyReported(node=node, public_key=key):
                        k = _Key(VPBLU_NODES.kind, node)
                        self._wanted[k] = attrs.evolve(self._wanted.get(k, _Wanted()),
                                                       public_key=key)
                    case NodeHealthReported(node=node, health=health):
                        k = _Key(VPBLU_NODES.kind, node)
                        self._wanted[k] = attrs.evolve(self._wanted.get(k, _Wanted()),
                                                       health=health)
                    case ObjectConditions(kind=kind, name=name):
                        k = _Key(kind, name)
                        self._wanted[k] = attrs.evolve(self._wanted.get(k, _Wanted()),
                                                       conditions=message)
                    case RotationStatus(node=node, record=record, public_key=key, last=last):
                        k = _Key(VPBLU_NODES.kind, node)
                        wanted = attrs.evolve(
                            self._wanted.get(k, _Wanted()),
                            rotation=None if record is None else record.to_status())
                        if key is not None:
                            wanted = attrs.evolve(wanted, public_key=key)
                        if last is not None:
                            wanted = attrs.evolve(wanted, last_rotation=last.to_status())
                        self._wanted[k] = wanted
                        self._waiters.setdefault(k, []).append(
                            (self._version.get(k, 0) + 1, message.written))
                self._version[k] = self._version.get(k, 0) + 1
                if k not in self._queued and k not in self._busy:
                    self._queued.add(k)
                    self._dirty_send.send_nowait(k)
            nursery.cancel_scope.cancel()

    def _observed(self, message: StatusObserved) -> None:
        k = _Key(message.kind, message.name)
        if k not in self._wanted or message.resource_version in self._ours.get(k, ()):
            return
        # Someone else wrote it: what this actor last wrote may no longer hold.
        self._seen.pop(k, None)
        self._suspect.add(k)
        self._version[k] = self._version.get(k, 0) + 1
        if k not in self._queued and k not in self._busy:
            self._queued.add(k)
            self._dirty_send.send_nowait(k)

    def _forget(self, key: _Key) -> None:
        """Drop what is held for a deleted object. A key a connected daemon
        reported is kept: the next write for that node makes its VpbluNode
        again, with the key (a daemon reports it only when its stream opens)."""
        self._seen.pop(key, None)
        self._ours.pop(key, None)
        self._suspect.discard(key)
        wanted = self._wanted.pop(key, None)
        self._version.pop(key, None)
        for _version, event in self._waiters.pop(key, []):
            event.set()
        if wanted is not None and wanted.public_key is not None:
            self._wanted[key] = _Wanted(public_key=wanted.public_key)

    async def _worker(self) -> None:
        async for key in self._dirty_receive:
            self._queued.discard(key)
            self._busy.add(key)
            try:
                await self._write_until_current(key)
            finally:
                self._busy.discard(key)

    async def _write_until_current(self, key: _Key) -> None:
        delay = RETRY_DELAY
        while True:
            version = self._version[key]
            try:
                await self._write(key, self._wanted[key])
                self._wake(key, version)
                if self._version[key] == version:
                    return
            except NotFound:
                log.info("status of %s %s not written: it no longer exists", key.kind, key.name)
                self._wake(key, version)
                if self._version[key] == version:
                    self._forget(key)
                    return
                # Newer status came while this write ran (a busy key is not
                # queued again): the key a deleted Node's daemon said, handed
                # over as its Node registers again, makes the object anew.
                continue
            except Conflict:
                continue  # someone wrote in between: read again and redo
            except (ApiUnavailable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status in REFUSED_FOR_GOOD:
                    self.refused += 1
                    if self._metrics is not None:
                        self._metrics.reconcile_errors.labels("status_refused").inc()
                    log.error("status of %s %s refused by the API server (%r): not retried "
                              "until what it should say changes", key.kind, key.name, exc)
                    if self._version[key] == version:
                        return
                    continue
                if self._metrics is not None:
                    self._metrics.reconcile_errors.labels("status_write").inc()
                log.warning("status of %s %s: %r; retrying in %.1fs",
                            key.kind, key.name, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)

    def _wake(self, key: _Key, version: int) -> None:
        waiting = self._waiters.get(key, [])
        for v, event in waiting:
            if v <= version:
                event.set()
        self._waiters[key] = [(v, e) for v, e in waiting if v > version]

    async def _write(self, key: _Key, wanted: _Wanted) -> None:
        kind = self._kinds[key.kind]
        seen = None if key in self._suspect else self._seen.get(key)
        read: RawObject | None = None
        if seen is None:
            read = await self._read(key, kind, wanted)
            seen = _version_and_status(read)
        self._suspect.discard(key)
        version, status = seen
        patch = _patch(wanted, status, key.name)
        if patch and read is not None:
            # Whoever else owns a field this patch puts back is named, however
            # the re-read came about: the watch's word that someone else wrote
            # (StatusObserved) may arrive after a Conflict already made this
            # actor read the object and restore it.
            writer = foreign_status_writer(read, patch)
            if writer is not None:
                uid = str(read.get("metadata", {}).get("uid", ""))
                await self._report_foreign(key, writer, uid, patch)
        if not patch:
            if key in self._seen:
                # What this actor last wrote says there is nothing to do; that
                # may be stale (someone else edited the status), so a skipped
                # write is always confirmed by a fresh read.
                del self._seen[key]
                await self._write(key, wanted)
            return
        try:
            # Onto the version the patch was computed from: lastTransitionTime
            # and the skipped fields are only right for that one.
            result = await self._kube.patch_status(kind, key.name, patch,
                                                   resource_version=version)
        except ApiError:
            self._seen.pop(key, None)
            raise
        self._writes += 1
        if self._metrics is not None:
            self._metrics.status_writes.inc()
        self._seen[key] = _version_and_status(result)
        self._remember_ours(key, self._seen[key][0])

    def _remember_ours(self, key: _Key, resource_version: str) -> None:
        self._ours[key] = (*self._ours.get(key, ())[-(OWN_VERSIONS - 1):], resource_version)

    async def _report_foreign(self, key: _Key, writer: str, uid: str, patch: RawObject) -> None:
        """A Warning Event on the object naming who wrote its status; never raises
        (the status is restored whether or not the Event is made)."""
        self.reverted += 1
        message = (f"status of {key.kind} {key.name} was written by {writer}; the vpblu "
                   f"controller owns it and restored {', '.join(sorted(patch))}")
        log.warning("%s", message)
        now = _now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{key.name}.", "namespace": self._event_namespace},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": key.kind,
                               "name": key.name, "uid": uid},
            "reason": "StatusReverted", "message": message[:1024], "type": "Warning",
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self._kube.create(EVENTS, event, namespace=self._event_namespace)
        except (ApiUnavailable, ApiError) as exc:
            log.warning("cannot record an Event for %s %s: %r", key.kind, key.name, exc)

    async def _read(self, key: _Key, kind: ResourceKind, wanted: _Wanted) -> RawObject:
        try:
            current = await self._kube.get(kind, key.name)
        except NotFound:
            if (kind is not VPBLU_NODES or wanted.public_key is None
                    or key.name in self._deleted_nodes):
                raise
            # A daemon connected before anyone made its VpbluNode: make it now.
            current = await self._kube.create(VPBLU_NODES, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "VpbluNode",
                "metadata": {"name": key.name}, "spec": {},
            })
            self._remember_ours(key, _version_and_status(current)[0])
        return current


def foreign_status_writer(obj: RawObject, fields: Iterable[str] | None = None) -> str | None:
    """Who else last wrote `obj`'s status: the latest managedFields entry of the
    status subresource whose manager is not the controller (and, given
    `fields`, that owns one of those status fields). A field the controller
    wrote back is the controller's again, so one foreign write is named once."""
    entries = [m for m in (obj.get("metadata", {}).get("managedFields") or ())
               if isinstance(m, dict) and m.get("subresource") == "status"
               and m.get("manager") != FIELD_MANAGER
               and (fields is None or _owns_status_field(m, fields))]
    if not entries:
        return None
    latest = max(entries, key=lambda m: str(m.get("time") or ""))
    return f"{latest.get('manager')!r} ({latest.get('operation')} at {latest.get('time')})"


def _owns_status_field(entry: RawObject, fields: Iterable[str]) -> bool:
    owned = (entry.get("fieldsV1") or {}).get("f:status")
    return isinstance(owned, dict) and any(f"f:{name}" in owned for name in fields)


def _version_and_status(obj: RawObject) -> tuple[str, RawObject]:
    return str(obj.get("metadata", {}).get("resourceVersion", "")), dict(obj.get("status") or {})


def _patch(wanted: _Wanted, status: RawObject, name: str = "") -> RawObject:
    """The merge patch that makes `status` show `wanted` (empty: it does)."""
    patch: RawObject = {}
    if wanted.public_key is not None and status.get("publicKey") != wanted.public_key:
        patch["publicKey"] = wanted.public_key
    if wanted.rotation != _UNSET and status.get("rotation") != wanted.rotation:
        patch["rotation"] = wanted.rotation
    if wanted.last_rotation is not None and status.get("lastRotation") != wanted.last_rotation:
        patch["lastRotation"] = wanted.last_rotation
    conditions = wanted.conditions
    if wanted.health is not None:
        published = patch.get("publicKey", status.get("publicKey"))
        fields, health_conditions = _health_status(wanted.health, published, name)
        patch.update({f: v for f, v in fields.items() if status.get(f) != v})
        conditions = ObjectConditions(
            VPBLU_NODES.kind, name, conditions.generation if conditions is not None else 0,
            (*(conditions.conditions if conditions is not None else ()), *health_conditions))
    if conditions is not None:
        old = list(status.get("conditions") or [])
        new = conditions_status(conditions, old)
        if not _same_conditions(old, new):
            patch["conditions"] = new
    return patch


def _health_status(health: NodeHealth, published: object,
                   name: str) -> tuple[RawObject, tuple[Condition, ...]]:
    """The status fields a NodeHealth sets, and its conditions with KeyPublished:
    whether status.publicKey (as this very write leaves it) is the key the daemon
    uses. A fact about the status being written, so it is decided here."""
    fields: RawObject = {}
    if health.peers_total is not None and health.peers_up is not None:
        fields["peers"] = f"{health.peers_up}/{health.peers_total}"
        fields["peersUp"] = health.peers_up
        fields["peersTotal"] = health.peers_total
    if health.applied_generation is not None:
        fields["appliedGeneration"] = health.applied_generation
    if health.key_created is not None:
        fields["keyCreated"] = datetime.datetime.fromtimestamp(
            health.key_created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if health.public_key is None:
        key = Condition(VPBLU_NODES.kind, name, "KeyPublished", "Unknown", "NoKeyReported",
                        "the daemon has not said which key it uses")
    elif published == health.public_key:
        key = Condition(VPBLU_NODES.kind, name, "KeyPublished", "True", "Published",
                        "status.publicKey is the key the daemon uses")
    else:
        key = Condition(VPBLU_NODES.kind, name, "KeyPublished", "False", "NotPublished",
                        "status.publicKey is not (yet) the key the daemon uses")
    return fields, (*health.conditions, key)
