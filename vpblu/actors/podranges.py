"""PodRangesActor: on the leader, the remembered pod ranges reach their ConfigMap.

Owns the writes to ConfigMap vpblu-system/vpblu-pod-ranges (what it is and why:
vpblu.core.podranges), and the typing of that ConfigMap at the watcher
boundary (`parse_pod_ranges`). The StateActor hands it the live Nodes'
podCIDRs the ConfigMap lacks (`RememberPodRanges`); it adds them, creating
the ConfigMap if there is none. It must never remove or rewrite a line it did
not add: removing one is an operator's decision (releasing a range), and a
concurrent edit is kept by writing with the read resourceVersion (a Conflict
is read again and merged). A failed write is retried with backoff, for ever:
the StateActor keeps the ranges in effect meanwhile, and only a failover in
that window could lose them.
"""

from __future__ import annotations

import logging

import tenacity
import trio

from vpblu.core import podranges
from vpblu.core.model import IPNetwork, PodRange
from vpblu.core.sources import PodRangesSource, RawObject
from vpblu.kube import client as k
from vpblu.kube.resources import meta_of
from vpblu.messages import RememberPodRanges

log = logging.getLogger(__name__)

NAMESPACE = "vpblu-system"
LABELS = {"app.kubernetes.io/name": "vpblu", "app.kubernetes.io/component": "pod-ranges"}
LABEL_SELECTOR = "app.kubernetes.io/name=vpblu,app.kubernetes.io/component=pod-ranges"
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0


def parse_pod_ranges(raw: RawObject) -> PodRangesSource:
    """The ConfigMap as the StateActor reads it. Never InvalidObject for its
    data: a line that is no range is left out and logged (the others stay in
    force), since refusing the whole object would forget every range in it."""
    meta = meta_of(raw)  # another name with the label: typed too, and not read
    data = raw.get("data") or {}
    text = data.get(podranges.DATA_KEY, "") if isinstance(data, dict) else ""
    ranges, problems = podranges.parse_lines(text if isinstance(text, str) else "")
    for problem in problems if meta.name == podranges.CONFIG_MAP else ():
        log.warning("ConfigMap %s/%s data.%s: %s", NAMESPACE, meta.name, podranges.DATA_KEY,
                    problem)
    return PodRangesSource(meta, ranges, problems)


class PodRangesActor:
    def __init__(self, kube: k.KubeApi, inbox: trio.MemoryReceiveChannel[RememberPodRanges]
                 ) -> None:
        self._kube = kube
        self._inbox = inbox
        self._wanted: dict[IPNetwork, PodRange] = {}
        self.writes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox:
            task_status.started()
            while True:
                self._take(await self._inbox.receive())
                while True:  # everything queued goes in one write
                    try:
                        self._take(self._inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                retrying = tenacity.AsyncRetrying(
                    sleep=trio.sleep,
                    wait=tenacity.wait_exponential_jitter(multiplier=RETRY_INITIAL, max=RETRY_MAX),
                    retry=tenacity.retry_if_exception_type((k.ApiError, k.ApiUnavailable)),
                    before_sleep=_log_retry,
                    reraise=True,
                )
                await retrying(self._write)
                self._wanted.clear()

    def _take(self, message: RememberPodRanges) -> None:
        for r in message.ranges:
            self._wanted.setdefault(r.cidr, r)

    async def _write(self) -> None:
        added = tuple(self._wanted.values())
        try:
            current = await self._kube.get(k.CONFIG_MAPS, podranges.CONFIG_MAP,
                                           namespace=NAMESPACE)
        except k.NotFound:
            await self._kube.create(k.CONFIG_MAPS, {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": podranges.CONFIG_MAP, "namespace": NAMESPACE,
                             "labels": dict(LABELS)},
                "data": {podranges.DATA_KEY: podranges.format_lines(added)},
            }, namespace=NAMESPACE)
            self.writes += 1
            log.info("pod ranges remembered in new ConfigMap %s/%s: %s", NAMESPACE,
                     podranges.CONFIG_MAP, ", ".join(str(r.cidr) for r in added))
            return
        data = dict(current.get("data") or {})
        text = data.get(podranges.DATA_KEY)
        new = podranges.merged(text if isinstance(text, str) else None, added)
        metadata = current.get("metadata") or {}
        labels = dict(metadata.get("labels") or {})
        if new is None and all(labels.get(key) == value for key, value in LABELS.items()):
            return  # it holds them already (written by another leader, or by hand)
        if new is not None:
            data[podranges.DATA_KEY] = new
        body = dict(current)
        # The label is what the leader's watch selects it by: an operator who
        # made the ConfigMap by hand gets it added.
        body["metadata"] = {**metadata, "labels": {**labels, **LABELS}}
        body["data"] = data
        await self._kube.replace(k.CONFIG_MAPS, podranges.CONFIG_MAP, body,
                                 namespace=NAMESPACE)
        self.writes += 1
        log.info("pod ranges remembered in ConfigMap %s/%s: %s", NAMESPACE,
                 podranges.CONFIG_MAP, ", ".join(str(r.cidr) for r in added))


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("ConfigMap %s/%s: %s; writing again in %.1fs", NAMESPACE,
                podranges.CONFIG_MAP, exc, delay)
