"""FakeKubeApi: an in-memory stand-in for `vpblu.kube.client.KubeApi` in actor tests.

A fake, named as one: it keeps objects per kind with a global
resourceVersion counter and an event history, serves list and watch from it,
and lets a test inject the faults the real API server produces (unavailable,
410 Gone, a watch that breaks, a compacted history). Claims about the real
API server are tested against the real one in tests/integration.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from vpblu.kube.client import (
    ApiError,
    ApiUnavailable,
    Conflict,
    Gone,
    ListResult,
    NotFound,
    RawObject,
    ResourceKind,
    WatchEvent,
)


class FakeKubeApi:
    def __init__(self) -> None:
        self._rv = 0
        self._objects: dict[str, dict[str, RawObject]] = defaultdict(dict)
        self._history: dict[str, list[WatchEvent]] = defaultdict(list)
        self._changed = trio.Condition()
        self.compacted_before = 0  # watches from an older resourceVersion get 410
        self.unavailable = False  # every call fails as if the server were down
        self.fail_next: list[Exception] = []  # raised by the next calls, in order
        self.calls: list[tuple[str, str]] = []  # (verb, kind)
        self.open_watches = 0

    # --- test controls ---------------------------------------------------------

    def _check(self, verb: str, kind: ResourceKind) -> None:
        self.calls.append((verb, kind.kind))
        if self.unavailable:
            raise ApiUnavailable("fake: API server is down")
        if self.fail_next:
            raise self.fail_next.pop(0)

    async def _record(self, kind: ResourceKind, etype: str, obj: RawObject) -> None:
        async with self._changed:
            self._history[kind.kind].append(WatchEvent(etype, copy.deepcopy(obj)))
            self._changed.notify_all()

    async def put(self, kind: ResourceKind, obj: RawObject) -> RawObject:
        """Create or update as an outside writer would (no faults, no conflict check)."""
        self._rv += 1
        obj = copy.deepcopy(obj)
        md = obj.setdefault("metadata", {})
        name = md["name"]
        existed = name in self._objects[kind.kind]
        old_gen = self._objects[kind.kind].get(name, {}).get("metadata", {}).get("generation", 0)
        md["resourceVersion"] = str(self._rv)
        md.setdefault("generation", old_gen + 1)
        self._objects[kind.kind][name] = obj
        await self._record(kind, "MODIFIED" if existed else "ADDED", obj)
        return copy.deepcopy(obj)

    async def remove(self, kind: ResourceKind, name: str) -> None:
        self._rv += 1
        obj = self._objects[kind.kind].pop(name)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        await self._record(kind, "DELETED", obj)

    async def bookmark(self, kind: ResourceKind) -> None:
        self._rv += 1
        await self._record(kind, "BOOKMARK", {"metadata": {"resourceVersion": str(self._rv)}})

    async def go_down(self) -> None:
        """Every call, and every open watch, fails until `come_back`."""
        async with self._changed:
            self.unavailable = True
            self._changed.notify_all()

    def come_back(self) -> None:
        self.unavailable = False

    def compact(self) -> None:
        """Forget history: any watch from an older resourceVersion now gets 410."""
        self.compacted_before = self._rv + 1

    # --- KubeApi ---------------------------------------------------------------

    async def list(self, kind: ResourceKind, *, namespace: str | None = None,
                   label_selector: str | None = None) -> ListResult:
        await trio.lowlevel.checkpoint()
        self._check("list", kind)
        items = tuple(copy.deepcopy(o) for o in self._objects[kind.kind].values())
        return ListResult(items, str(self._rv))

    @asynccontextmanager
    async def watch(self, kind: ResourceKind, resource_version: str, *,
                    namespace: str | None = None,
                    label_selector: str | None = None) -> AsyncIterator[_FakeWatch]:
        await trio.lowlevel.checkpoint()
        self._check("watch", kind)
        if int(resource_version) < self.compacted_before - 1:
            raise Gone(410, "Expired", f"too old resource version: {resource_version}")
        self.open_watches += 1
        try:
            yield _FakeWatch(self, kind, int(resource_version))
        finally:
            self.open_watches -= 1

    async def get(self, kind: ResourceKind, name: str, *,
                  namespace: str | None = None) -> RawObject:
        await trio.lowlevel.checkpoint()
        self._check("get", kind)
        try:
            return copy.deepcopy(self._objects[kind.kind][name])
        except KeyError:
            raise NotFound(404, "NotFound", f"{kind.kind} {name} not found") from None

    async def create(self, kind: ResourceKind, body: RawObject, *,
                     namespace: str | None = None) -> RawObject:
        await trio.lowlevel.checkpoint()
        self._check("create", kind)
        if "name" not in body["metadata"]:  # generateName, as the API server does it
            body = copy.deepcopy(body)
            body["metadata"]["name"] = (f"{body['metadata']['generateName']}"
                                        f"{len(self._objects[kind.kind]):05d}")
        if body["metadata"]["name"] in self._objects[kind.kind]:
            raise Conflict(409, "AlreadyExists", "exists")
        return await self.put(kind, body)

    async def replace(self, kind: ResourceKind, name: str, body: RawObject, *,
                      namespace: str | None = None) -> RawObject:
        await trio.lowlevel.checkpoint()
        self._check("replace", kind)
        current = self._objects[kind.kind].get(name)
        if current is None:
            raise NotFound(404, "NotFound", name)
        want = body.get("metadata", {}).get("resourceVersion")
        if want and want != current["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict", "the object has been modified")
        body = copy.deepcopy(body)
        body["metadata"]["generation"] = current["metadata"].get("generation", 1)
        return await self.put(kind, body)

    async def delete(self, kind: ResourceKind, name: str, *,
                     namespace: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self._check("delete", kind)
        if name not in self._objects[kind.kind]:
            raise NotFound(404, "NotFound", name)
        await self.remove(kind, name)

    async def patch_status(self, kind: ResourceKind, name: str, status: RawObject, *,
                           namespace: str | None = None,
                           resource_version: str | None = None) -> RawObject:
        await trio.lowlevel.checkpoint()
        self._check("patch_status", kind)
        current = self._objects[kind.kind].get(name)
        if current is None:
            raise NotFound(404, "NotFound", name)
        if resource_version is not None and resource_version != current["metadata"][
                "resourceVersion"]:
            raise Conflict(409, "Conflict", "the object has been modified")
        obj = copy.deepcopy(current)
        merged: dict[str, Any] = dict(obj.get("status") or {})
        merged.update(status)
        obj["status"] = merged
        obj["metadata"].pop("generation", None)
        obj["metadata"]["generation"] = current["metadata"].get("generation", 1)
        return await self.put(kind, obj)

    async def patch_json(self, kind: ResourceKind, name: str, operations: Sequence[RawObject],
                         *, namespace: str | None = None) -> RawObject:
        """Only what the controller sends: a uid test, then adding ownerReferences."""
        await trio.lowlevel.checkpoint()
        self._check("patch_json", kind)
        current = self._objects[kind.kind].get(name)
        if current is None:
            raise NotFound(404, "NotFound", name)
        obj = copy.deepcopy(current)
        for op in operations:
            if op["op"] == "test" and op["path"] == "/metadata/uid":
                if obj["metadata"].get("uid") != op["value"]:
                    raise ApiError(422, "Invalid", "test operation failed")
            elif op["op"] == "add" and op["path"] == "/metadata/ownerReferences":
                obj["metadata"]["ownerReferences"] = list(op["value"])
            elif op["op"] == "add" and op["path"] == "/metadata/ownerReferences/-":
                obj["metadata"].setdefault("ownerReferences", []).append(op["value"])
            else:
                raise ApiError(422, "Invalid", f"the fake does not patch {op}")
        return await self.put(kind, obj)

    async def delete_uid(self, kind: ResourceKind, name: str, uid: str, *,
                         namespace: str | None = None) -> None:
        current = self._objects[kind.kind].get(name)
        if current is not None and current["metadata"].get("uid") != uid:
            raise Conflict(409, "Conflict", "precondition failed: uid")
        await self.delete(kind, name, namespace=namespace)

    async def token_review(self, token: str, audiences: Sequence[str]) -> RawObject:
        raise ApiError(501, "NotImplemented", "the fake has no TokenReview")

    # --- for _FakeWatch ---------------------------------------------------------

    def _events_after(self, kind: ResourceKind, rv: int) -> list[WatchEvent]:
        return [e for e in self._history[kind.kind] if int(e.resource_version) > rv]


class _FakeWatch:
    def __init__(self, api: FakeKubeApi, kind: ResourceKind, rv: int) -> None:
        self._api = api
        self._kind = kind
        self._rv = rv

    async def next_batch(self) -> Sequence[WatchEvent]:
        api = self._api
        async with api._changed:
            while True:
                if api.unavailable:
                    raise ApiUnavailable("fake: watch stream broke")
                events = api._events_after(self._kind, self._rv)
                if events:
                    self._rv = int(events[-1].resource_version)
                    return events
                await api._changed.wait()


class SeverableClient:
    """One client's connection to a FakeKubeApi, which a test can cut alone
    (a crashed or partitioned replica) while other clients still get through."""

    def __init__(self, api: FakeKubeApi) -> None:
        self._api = api
        self.severed = False
        self.delay = 0.0  # every call takes this long first (a slow or busy server)

    def __getattr__(self, verb: str) -> Any:
        target = getattr(self._api, verb)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await trio.sleep(self.delay)
            if self.severed:
                raise ApiUnavailable("fake: this client is cut off")
            return await target(*args, **kwargs)

        return call
