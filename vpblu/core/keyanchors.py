"""Which public key the leader tells a node's peers: the trust anchor.

Owns, on the leader, the answer to "which key is node X's?" for the desired
state. PURE: no I/O, no clock; the StateActor feeds it and asks it.

The key of a node whose daemon is connected is the one that daemon said in
its Hello on an authenticated stream (its token bound to a current daemon Pod
on that node: vpblu.stream.podbinding), never what the VpbluNode's status says
at the moment: anyone allowed to patch the status could otherwise make every
peer trust a key of their choosing until the StatusGuard put it back. The
status is what the controller wrote; it is read back only where nothing better
is known:

- a node whose daemon was connected to this leader and is not now: the key
  that daemon last said (a status patched while it is away changes nothing),
  as long as the VpbluNode is the same object (uid) and no rotation is
  recorded in its status;
- a node with no daemon seen by this leader: status.publicKey (the key its
  daemon last said, as the controller wrote it), or mid-rotation the record's key;
- a rotation this leader runs: the record its own RotationActor persisted
  (`rotation_recorded`, after the API server confirmed the write), never one
  read back; when it ends, the key it ends on (K' after Retire, K after a
  rollback) is the daemon's key from then on, as its next Hello will say;
- a rotation a previous leader started: the record that was in the status
  when this leader first listed the VpbluNodes, until this leader's
  RotationActor records its own step (it resumes before sending anything). A
  record that shows up later and was not recorded here is someone else's
  write and is ignored.

Must never read the API or the clock, and never hold a private key.
"""

from __future__ import annotations

from collections.abc import Iterable

from vpblu.core.sources import RotationRecord, VpbluNodeSource


class KeyAnchors:
    def __init__(self) -> None:
        # node -> (session id, the key its daemon uses): from the current
        # session's Hello, then from the end of a rotation on that session.
        self._connected: dict[str, tuple[int, str]] = {}
        # node -> (VpbluNode uid, key): what its daemon said last, kept when the
        # session ends, for as long as that VpbluNode object lives.
        self._last_said: dict[str, tuple[str, str]] = {}
        # Rotations this leader recorded and has not finished.
        self._recorded: dict[str, RotationRecord] = {}
        # status.rotation of each VpbluNode at this leader's first listing
        # (None until that listing).
        self._inherited: dict[str, RotationRecord] | None = None

    def opened(self, node: str, session_id: int, public_key: str) -> bool:
        """A daemon's stream for `node` is up with this Hello key; True when
        the key its peers should hold may have changed."""
        current = self._connected.get(node)
        if current is not None and current[0] > session_id:
            return False  # a stale open after a newer one
        self._connected[node] = (session_id, public_key)
        return current is None or current[1] != public_key

    def closed(self, node: str, session_id: int, uid: str | None = None) -> bool:
        """That session ended; True when it was the node's current one. `uid`:
        the node's VpbluNode at that moment, whose key is then the one the
        daemon said last (None: no VpbluNode, nothing kept)."""
        current = self._connected.get(node)
        if current is None or current[0] != session_id:
            return False
        del self._connected[node]
        if uid is not None:
            self._last_said[node] = (uid, current[1])
        else:
            self._last_said.pop(node, None)
        return True

    def listed(self, sources: Iterable[object]) -> None:
        """The VpbluNodes listed; only this leader's first listing counts."""
        if self._inherited is not None:
            return
        self._inherited = {s.meta.name: s.rotation for s in sources
                           if isinstance(s, VpbluNodeSource) and s.rotation is not None}

    def rotation_recorded(self, node: str, record: RotationRecord | None,
                          public_key: str | None) -> None:
        """This leader's RotationActor persisted `record` for `node` (None: the
        rotation ended, on `public_key` when given)."""
        if self._inherited is not None:
            self._inherited.pop(node, None)
        if record is not None:
            self._recorded[node] = record
            return
        self._recorded.pop(node, None)
        current = self._connected.get(node)
        if public_key is not None and current is not None:
            self._connected[node] = (current[0], public_key)
        last = self._last_said.get(node)
        if public_key is not None and last is not None:
            self._last_said[node] = (last[0], public_key)

    def published_key(self, node: str, source: VpbluNodeSource | None) -> str | None:
        """The key `node`'s peers are told."""
        connected = self._connected.get(node)
        if connected is None:
            if source is None:
                return None
            last = self._last_said.get(node)
            if last is not None and last[0] == source.meta.uid and source.rotation is None:
                return last[1]
            return source.published_key
        record = self._recorded.get(node)
        if record is not None:
            return record.published_key
        status_record = source.rotation if source is not None else None
        if status_record is not None and self._inherited is not None \
                and self._inherited.get(node) == status_record:
            return status_record.published_key
        return connected[1]

    def current_key(self, node: str, source: VpbluNodeSource | None) -> str | None:
        """The key `node`'s daemon uses outside a rotation (a new rotation's K)."""
        connected = self._connected.get(node)
        if connected is not None:
            return connected[1]
        return source.public_key if source is not None else None
