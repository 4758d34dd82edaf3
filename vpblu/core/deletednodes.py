"""DeletedNodes: the Nodes deleted and not registered again, and the key
each one's daemon said meanwhile.

Owned by the StatusActor, which makes no VpbluNode for a deleted Node: a
daemon still running on a machine whose Node was deleted opens a new stream at
once and says its key, and writing it would make the VpbluNode again, for a
Node that does not exist. The key it said is held here instead, and written
when a Node of that name is registered again (the daemon is connected and says
nothing new until its next stream). Fed by the NodeOwnershipActor's
`NodeGone(deleted=True)` and `NodeRegistered`.

Bounded: past `limit` names the oldest is forgotten (its daemon Pod, bound to
a Node that no longer exists, was collected long before by the pod garbage
collector). PURE: no I/O, no clock.
"""

from __future__ import annotations

LIMIT = 65536


class DeletedNodes:
    def __init__(self, limit: int = LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._limit = limit
        # name -> the key its daemon said since; insertion order: the oldest first
        self._held: dict[str, str | None] = {}

    def deleted(self, name: str) -> None:
        """Deleted now: nothing said before this is held."""
        self._held.pop(name, None)
        self._held[name] = None
        if len(self._held) > self._limit:
            del self._held[next(iter(self._held))]

    def hold(self, name: str, public_key: str) -> None:
        """`name`'s daemon said `public_key` while its Node is deleted."""
        if name in self._held:
            self._held[name] = public_key

    def registered(self, name: str) -> str | None:
        """A Node of that name exists again: the key held for it, if any."""
        return self._held.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def __len__(self) -> int:
        return len(self._held)
