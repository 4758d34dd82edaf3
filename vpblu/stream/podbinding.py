"""Pod-bound identity: a token speaks for a node only while its Pod is a
current daemon Pod on that node.

TokenReview proves a token is valid and, for a Pod-bound token, names the Pod
(name and uid) and the node it runs on. That alone lets any Pod of the
`vpblu-daemon` ServiceAccount (or, from Kubernetes 1.31, a Node-bound token of
it) speak for a node. So the controller also requires the token's Pod to be one
of the DaemonSet's Pods it watches (namespace and labels), with that uid, on
the node the token names, and not being deleted.

Owns `DaemonPods`, the leader's view of those Pods (written by
`vpblu.actors.daemonpods.DaemonPodsActor` alone; read here, synchronously, no
I/O), and `PodBoundAuthenticator`, the `Authenticator` that applies it after
TokenReview. The same check runs again when the stream reaches the leader's
sessions (a Pod deleted between the review and then) and whenever a Pod
changes, which ends established streams (see the actor).

Must never: admit a stream while the view has not been listed (a new leader
answers "not now", and the daemon retries), or log a token.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import trio

from vpblu.stream.identity import AuthenticationFailed, Authenticator, Identity

# A stream that arrives while a new leader is listing the daemon Pods waits this
# long for the list (about one API round trip) before it is told "not now": the
# daemon's backoff would otherwise delay every reconnect after a failover.
SYNC_WAIT = 5.0


@attrs.frozen(slots=True)
class DaemonPod:
    name: str
    uid: str
    node_name: str | None
    terminating: bool  # metadata.deletionTimestamp is set


class PodsNotKnown(Exception):
    """The daemon Pods are not listed yet (no leader, or one that just started):
    the check cannot be made now, which is not a refusal."""


class DaemonPods:
    """The daemon Pods (one namespace, the DaemonSet's labels) as the leader's
    watch last listed them, by name."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._by_name: dict[str, DaemonPod] = {}
        self._synced = False
        self._listed = trio.Event()

    @property
    def synced(self) -> bool:
        return self._synced

    def replace(self, pods: Iterable[DaemonPod]) -> None:
        self._by_name = {p.name: p for p in pods}
        self._synced = True
        self._listed.set()

    def upsert(self, pod: DaemonPod) -> None:
        self._by_name[pod.name] = pod

    def delete(self, name: str) -> None:
        self._by_name.pop(name, None)

    def forget(self) -> None:
        """No longer known (leadership ended): every check says "not now"."""
        self._by_name = {}
        self._synced = False
        if self._listed.is_set():
            self._listed = trio.Event()

    async def wait_synced(self) -> None:
        await self._listed.wait()

    def __len__(self) -> int:
        return len(self._by_name)

    def check(self, identity: Identity) -> None:
        """Nothing if `identity`'s Pod is a current daemon Pod on its node;
        `AuthenticationFailed` saying why not; `PodsNotKnown` if unknown yet."""
        if not identity.pod_name or not identity.pod_uid:
            raise AuthenticationFailed(
                f"the token of {identity.username!r} is not bound to a Pod "
                "(a daemon presents its Pod's projected token)")
        if not self._synced:
            raise PodsNotKnown("the controller has not listed the daemon Pods yet")
        where = f"Pod {self.namespace}/{identity.pod_name}"
        pod = self._by_name.get(identity.pod_name)
        if pod is None:
            raise AuthenticationFailed(f"the token's {where} is not a vpblu daemon Pod "
                                       "(not one of the DaemonSet's, or deleted)")
        if pod.uid != identity.pod_uid:
            raise AuthenticationFailed(f"the token's {where} was deleted (a Pod of that "
                                       "name exists with another uid)")
        if pod.terminating:
            raise AuthenticationFailed(f"the token's {where} is being deleted")
        if pod.node_name != identity.node_name:
            raise AuthenticationFailed(
                f"the token's {where} runs on node {pod.node_name!r}, "
                f"not {identity.node_name!r}")


class PodBoundAuthenticator:
    """`Authenticator`: `inner` (TokenReview), then the Pod check."""

    def __init__(self, inner: Authenticator, pods: DaemonPods) -> None:
        self._inner = inner
        self._pods = pods

    async def authenticate(self, token: str) -> Identity:
        identity = await self._inner.authenticate(token)
        with trio.move_on_after(SYNC_WAIT):
            await self._pods.wait_synced()
        self._pods.check(identity)
        return identity
