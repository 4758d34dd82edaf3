"""LeaderActor: leader election on a coordination.k8s.io/v1 Lease.

Owns this replica's claim on the Lease: acquiring it, renewing it, noticing
its loss, and releasing it on a graceful shutdown. It reports every change of
holder as a `LeaderObserved` message; it never starts or stops leader work
itself (the controller root does, on those messages).

The rules are client-go's: a Lease held by someone else is taken over only
after it has gone unrenewed for `lease_duration` as measured on *our* clock
from when we last saw it change (never by comparing the holder's renewTime
with our wall clock: clocks skew). Every write carries the resourceVersion we
read, so two replicas racing for an expired Lease cannot both win: one gets
409 Conflict. A leader that cannot renew for `renew_deadline` (shorter than
`lease_duration`) stops leading before anyone else may take over; that gap is
what keeps two leaders from overlapping. Releasing sets the holder empty, so
the other replica takes over in one retry period rather than a lease duration.
"""

from __future__ import annotations

import datetime
import logging
import math

import attrs
import trio

from vpblu.kube.client import (
    LEASES,
    ApiError,
    ApiUnavailable,
    Conflict,
    KubeApi,
    NotFound,
    RawObject,
)
from vpblu.messages import LeaderObserved

log = logging.getLogger(__name__)

ADDRESS_ANNOTATION = "vpblu.io/leader-address"


@attrs.frozen(slots=True)
class LeaseSettings:
    namespace: str = "vpblu-system"
    name: str = "vpblu-controller"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")


def _micro_time(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderActor:
    def __init__(
        self,
        kube: KubeApi,
        identity: str,
        address: str,
        out: trio.MemorySendChannel[LeaderObserved],
        settings: LeaseSettings = LeaseSettings(),
    ) -> None:
        self._kube = kube
        self._identity = identity
        self._address = address
        self._out = out
        self._settings = settings
        # What we last saw of the Lease and when (on trio's clock).
        self._observed_record: tuple[str | None, str | None] | None = None
        self._observed_at = 0.0
        self._last_report: LeaderObserved | None = None
        self._leading = False
        self._last_renew = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._out:
            task_status.started()
            try:
                while True:
                    await self._step()
                    await trio.sleep(self._settings.retry_period)
            finally:
                if self._leading:
                    with trio.CancelScope(shield=True), trio.move_on_after(
                            self._settings.retry_period):
                        await self._release()

    async def _step(self) -> None:
        # A leader may keep trying one renewal for what is left of its renew
        # deadline: cutting a slow call off after one retry period made a
        # busy controller (1000 daemons reconnecting at once) step down,
        # which dropped every stream and made it busier still.
        budget = self._settings.retry_period
        if self._leading:
            left = self._settings.renew_deadline - (trio.current_time() - self._last_renew)
            budget = max(budget, left)
        try:
            with trio.fail_after(budget):
                await self._try_acquire_or_renew()
        except (ApiUnavailable, ApiError, trio.TooSlowError) as exc:
            log.warning("lease %s: %r", self._settings.name, exc)
        if self._leading and trio.current_time() - self._last_renew > self._settings.renew_deadline:
            log.error("lease %s: not renewed for %.1fs; stepping down",
                      self._settings.name, self._settings.renew_deadline)
            self._leading = False
            await self._report(LeaderObserved(False, None, None))

    def _spec(self, transitions: int, acquire_time: str | None) -> RawObject:
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        return {
            "holderIdentity": self._identity,
            "leaseDurationSeconds": math.ceil(self._settings.lease_duration),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _body(self, spec: RawObject, resource_version: str | None) -> RawObject:
        metadata: RawObject = {
            "name": self._settings.name,
            "namespace": self._settings.namespace,
            "annotations": {ADDRESS_ANNOTATION: self._address},
        }
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": metadata, "spec": spec}

    async def _try_acquire_or_renew(self) -> None:
        s = self._settings
        try:
            lease = await self._kube.get(LEASES, s.name, namespace=s.namespace)
        except NotFound:
            try:
                await self._kube.create(LEASES, self._body(self._spec(0, None), None),
                                        namespace=s.namespace)
            except Conflict:
                return  # someone else created it first; look again next round
            await self._became_leader(0)
            return

        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        address = (lease.get("metadata", {}).get("annotations") or {}).get(ADDRESS_ANNOTATION)
        record = (holder, spec.get("renewTime"))
        now = trio.current_time()
        if record != self._observed_record:
            self._observed_record = record
            self._observed_at = now

        if holder is not None and holder != self._identity:
            expired = now - self._observed_at > float(spec.get("leaseDurationSeconds") or 0)
            if not expired:
                if self._leading:
                    # Someone took it while we thought we led: we must stop at once.
                    self._leading = False
                await self._report(LeaderObserved(False, holder, address))
                return

        transitions = int(spec.get("leaseTransitions") or 0)
        acquire_time = spec.get("acquireTime")
        if holder != self._identity or not self._leading:
            # A new term also when we take back our own Lease after stepping
            # down (the API server was away): the term stamps generations,
            # and a term reused would make daemons ignore the new leader's
            # SyncStates as older than what the last one sent them.
            transitions += 1
            acquire_time = None
        rv = lease.get("metadata", {}).get("resourceVersion")
        try:
            body = self._body(self._spec(transitions, acquire_time), rv)
            await self._kube.replace(LEASES, s.name, body, namespace=s.namespace)
        except Conflict:
            return
        await self._became_leader(transitions)

    async def _became_leader(self, term: int) -> None:
        self._last_renew = trio.current_time()
        if not self._leading:
            log.info("lease %s: %s is now the leader", self._settings.name, self._identity)
            self._leading = True
        await self._report(LeaderObserved(True, self._identity, self._address, term))

    async def _report(self, observed: LeaderObserved) -> None:
        if observed != self._last_report:
            self._last_report = observed
            await self._out.send(observed)

    async def _release(self) -> None:
        s = self._settings
        try:
            lease = await self._kube.get(LEASES, s.name, namespace=s.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self._identity:
                return
            spec = dict(spec, holderIdentity=None, leaseDurationSeconds=1,
                        renewTime=_micro_time(datetime.datetime.now(datetime.UTC)))
            body = self._body(spec, lease.get("metadata", {}).get("resourceVersion"))
            await self._kube.replace(LEASES, s.name, body, namespace=s.namespace)
            log.info("lease %s: released by %s", s.name, self._identity)
        except (ApiUnavailable, ApiError) as exc:
            log.warning("lease %s: release failed (%r); it expires on its own", s.name, exc)
