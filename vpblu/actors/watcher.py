"""WatcherActor: one per watched kind; list, then watch, forever.

Owns one kind's list/watch against the API server and the translation of its
events into typed `KindListed` / `KindChanged` messages for the StateActor.
It must never invent a deletion: when the API server goes away the watcher
only waits and retries; deletions are reported only when the API server says
so (a DELETED event) or a fresh list no longer has the object.

Protocol (as kopf and client-go do it): list, remember the list's
resourceVersion, watch from it with bookmarks, carry each event's (and
bookmark's) resourceVersion forward; a watch the server ends normally is
reopened from there; 410 Gone means that version was compacted away, so
relist. Errors back off exponentially with jitter (tenacity), capped, with no
attempt limit: an API server that is down for an hour must still be picked up
again when it returns, and nothing here gets worse by waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import tenacity
import trio

from vpblu.core.sources import InvalidObject, Typed
from vpblu.kube.client import (
    ApiError,
    ApiUnavailable,
    Gone,
    KubeApi,
    RawObject,
    ResourceKind,
    WatchEvent,
)
from vpblu.kube.resources import meta_of
from vpblu.messages import InvalidSource, KindChanged, KindListed, WatchMessage
from vpblu.metrics import ControllerMetrics

log = logging.getLogger(__name__)

RETRY_INITIAL = 0.2
RETRY_MAX = 30.0
RETRY_JITTER = 0.5

Parser = Callable[[RawObject], Typed]


class WatcherActor:
    def __init__(
        self,
        kube: KubeApi,
        kind: ResourceKind,
        parse: Parser,
        out: trio.MemorySendChannel[WatchMessage],
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._kube = kube
        self._kind = kind
        self._parse = parse
        self._out = out
        self._namespace = namespace
        self._label_selector = label_selector
        self._resource_version: str | None = None
        self._watches = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._out:
            await self._with_retries(self._relist)
            task_status.started()
            while True:
                await self._with_retries(self._watch_once)

    async def _with_retries(self, step: Callable[[], Awaitable[None]]) -> None:
        retrying = tenacity.AsyncRetrying(
            sleep=trio.sleep,
            wait=tenacity.wait_exponential_jitter(
                multiplier=RETRY_INITIAL, max=RETRY_MAX, jitter=RETRY_JITTER),
            retry=tenacity.retry_if_exception_type((ApiUnavailable, ApiError)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        await retrying(step)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s watcher: %s; retrying in %.1fs (attempt %d)",
                    self._kind.kind, exc, delay, state.attempt_number)

    async def _relist(self) -> None:
        result = await self._kube.list(self._kind, namespace=self._namespace,
                                       label_selector=self._label_selector)
        objects, invalid = [], []
        for raw in result.items:
            typed = self._type(raw)
            if isinstance(typed, InvalidSource):
                invalid.append(typed)
            else:
                objects.append(typed)
        self._resource_version = result.resource_version
        log.info("%s watcher: listed %d objects at resourceVersion %s",
                 self._kind.kind, len(result.items), result.resource_version)
        await self._out.send(KindListed(self._kind.kind, tuple(objects), tuple(invalid),
                                        result.resource_version))

    async def _watch_once(self) -> None:
        # Every (re)opening but the first: a server that ended the watch, a
        # 410 Gone, an error retried.
        if self._metrics is not None and self._watches:
            self._metrics.watch_restarts.labels(self._kind.kind).inc()
        self._watches += 1
        if self._resource_version is None:
            await self._relist()
        assert self._resource_version is not None
        try:
            async with self._kube.watch(self._kind, self._resource_version,
                                        namespace=self._namespace,
                                        label_selector=self._label_selector) as stream:
                while True:
                    batch = await stream.next_batch()
                    if not batch:
                        return  # the server ended the watch; reopen from where we are
                    await self._deliver(batch)
        except Gone:
            log.info("%s watcher: resourceVersion %s is gone; relisting",
                     self._kind.kind, self._resource_version)
            self._resource_version = None

    async def _deliver(self, batch: Sequence[WatchEvent]) -> None:
        upserted: dict[str, Typed] = {}
        deleted: dict[str, None] = {}
        invalid: dict[str, InvalidSource] = {}
        for event in batch:
            rv = event.resource_version
            if event.type == "BOOKMARK":
                if rv:
                    self._resource_version = rv
                continue
            try:
                name = meta_of(event.object).name
            except InvalidObject as exc:
                log.warning("%s watcher: event without a name ignored: %s", self._kind.kind, exc)
                continue
            # Within one batch the last event per name wins: the consumer works
            # level-triggered and only needs each object's latest state.
            upserted.pop(name, None)
            deleted.pop(name, None)
            invalid.pop(name, None)
            if event.type == "DELETED":
                deleted[name] = None
            else:
                typed = self._type(event.object)
                if isinstance(typed, InvalidSource):
                    invalid[name] = typed
                else:
                    upserted[name] = typed
            if rv:
                self._resource_version = rv
        if upserted or deleted or invalid:
            await self._out.send(KindChanged(
                self._kind.kind, tuple(upserted.values()), tuple(deleted),
                tuple(invalid.values()), self._resource_version or ""))

    def _type(self, raw: RawObject) -> Typed | InvalidSource:
        try:
            return self._parse(raw)
        except InvalidObject as exc:
            meta = raw.get("metadata") or {}
            name = str(meta.get("name", "?"))
            log.warning("%s %s is invalid: %s", self._kind.kind, name, exc)
            return InvalidSource(self._kind.kind, name, int(meta.get("generation") or 0), str(exc))
