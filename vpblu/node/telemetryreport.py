"""TelemetryReporter: what of each telemetry sample goes up one stream.

Owns the record of what the controller was told on the current stream (the
peer list and, per peer, the handshake, bytes and endpoint last sent) and
decides, per sample, whether to send a whole sample, a partial one (only the
peers that changed meaningfully, by position in the last whole list:
`wire.PeerUpdates`) or nothing. Pure: no I/O, and time is passed in.

Why: every daemon sending every peer on every heartbeat is N x (N-1) rows per
30 s at the controller (about a third of a core at N=1000, measured), nearly
all of them unchanged. A peer's row goes up only when:
- its endpoint changed, or it came up or went down (its handshake crossed
  `HANDSHAKE_FRESH` either way) - urgent: sent at once, rate-bounded by the
  StreamActor;
- its handshake advanced and the one the controller holds is older than
  `HANDSHAKE_REPORT_AGE` - with the next heartbeat; at once only when the
  held one would be older than `HANDSHAKE_URGENT_AGE` by the next heartbeat
  (the caller says when that is), so the controller hears of a live peer's
  new handshake before its own view of it ages past HANDSHAKE_FRESH
  (WireGuard renews every 120 s of traffic or keepalives: each renewal is
  sent once, ~1/120 s per peer instead of 1/30 s, nearly always with a beat;
  as the handshake alone, two integers, unless its bytes moved too);
- its bytes moved by `BYTES_REPORT` or more since last sent - with the next
  heartbeat; smaller moves wait for the whole sample.
A whole sample goes first on every stream, with the first heartbeat after
the peer list changed, and with the first heartbeat `FULL_REFRESH` after the
previous whole one (bytes and handshake ages on the controller are never
older than that). A changed peer list waits for the beat: while a 1000-node
mesh forms, every node's list grows for a minute, and a whole sample of up to
999 rows per node every 5 s was most of the controller's CPU in the
formation (13 s of it per formation, against 2.3 s without telemetry). Until
that beat the controller holds the previous list (its peers up/total lag by
at most a beat); an urgent change of the node's own fields meanwhile goes
without peer rows.

The controller merges partial samples into the stream's last whole one and
computes ages from the handshake times it holds, so a peer whose handshake
stops advancing turns down there HANDSHAKE_FRESH after its last reported
handshake without the daemon sending anything. Everything but the peers
(generation, key, MTU, rotation, data-path counters) is in every message; a
change of the key, MTU, rotation or cleartext guard is urgent. A new applied
generation is not: the daemon's Ack has told the controller already (its
health takes the newer of the two), and sending it again at once was one more
message from every node for every change of the mesh - at N=1000, a thousand
telemetry messages after each join, beside the thousand acks.
"""

from __future__ import annotations

import itertools
import math
import operator

import attrs

from vpblu.core.health import HANDSHAKE_FRESH
from vpblu.core.wire import PeerColumns, PeerUpdates, Telemetry

HANDSHAKE_REPORT_AGE = 60.0
# A renewal goes at once when the held handshake would be older than this by
# the next beat; the 10 s left cover the rate bound (a message waits up to 5 s)
# and a late beat. Renewals come at a held age of 120-145 s (REKEY_AFTER_TIME
# plus up to one keepalive) and beats 22.5-37.5 s apart, so some always go
# between beats: a bound with less room would send more of them.
HANDSHAKE_URGENT_AGE = HANDSHAKE_FRESH - 10.0
BYTES_REPORT = 1 << 20
FULL_REFRESH = 300.0


def _head(t: Telemetry) -> tuple[object, ...]:
    """The node's own fields whose change is urgent (not the generation: acked)."""
    d = t.datapath
    return (t.public_key, t.mtu, t.rotation,
            None if d is None else (d.guard_cleartext, d.guard_attached))


class TelemetryReporter:
    """One stream's reporter: make a new one for every stream."""

    def __init__(self, *, full_refresh: float = FULL_REFRESH,
                 bytes_report: int = BYTES_REPORT) -> None:
        self._full_refresh = full_refresh
        self._bytes_report = bytes_report
        self._names: tuple[str, ...] | None = None  # None: nothing sent on this stream
        self._handshakes: list[int] = []
        self._rx: list[int] = []
        self._tx: list[int] = []
        self._endpoints: list[str] = []
        self._head: tuple[object, ...] | None = None
        self._whole_at = -math.inf
        self.whole_sent = 0
        self.partial_sent = 0
        self.rows_sent = 0

    def plan(self, sample: Telemetry, now: float, *, beat: bool,
             next_beat: float | None = None) -> Telemetry | None:
        """What to send for the whole sample `sample` at `now` (monotonic
        seconds); None: nothing (never when `beat`: a heartbeat always carries
        a sample). `next_beat`: when the next heartbeat goes (None: now). What
        is returned counts as sent."""
        peers = sample.peers
        if self._names is None or (beat and (self._names != peers.names
                                             or now >= self._whole_at + self._full_refresh)):
            self._names = peers.names
            self._handshakes, self._rx, self._tx = (list(peers.latest_handshakes),
                                                    list(peers.rx_bytes), list(peers.tx_bytes))
            self._endpoints = list(peers.endpoints)
            self._head, self._whole_at = _head(sample), now
            self.whole_sent += 1
            self.rows_sent += len(peers)
            return sample
        head = _head(sample)
        if self._names != peers.names:  # positions would name the old list: the beat sends it
            if head == self._head:
                return None
            self._head = head
            self.partial_sent += 1
            return attrs.evolve(sample, peers=PeerColumns(), peer_updates=PeerUpdates())
        wait = 0.0 if next_beat is None or beat else max(0.0, next_beat - now)
        positions, renewed, urgent = self._changed(sample, wait)
        if not beat and not urgent and head == self._head:
            return None
        handshakes, rx, tx, endpoints = (peers.latest_handshakes, peers.rx_bytes,
                                         peers.tx_bytes, peers.endpoints)
        for i in positions:
            self._handshakes[i], self._rx[i], self._tx[i], self._endpoints[i] = (
                handshakes[i], rx[i], tx[i], endpoints[i])
        renewals = [handshakes[i] for i in renewed]
        for i, hs in zip(renewed, renewals, strict=True):
            self._handshakes[i] = hs
        self._head = head
        self.partial_sent += 1
        self.rows_sent += len(positions) + len(renewed)
        return attrs.evolve(sample, peers=PeerColumns(), peer_updates=PeerUpdates(
            positions, [handshakes[i] for i in positions], [rx[i] for i in positions],
            [tx[i] for i in positions], [endpoints[i] for i in positions],
            renewed, renewals))

    def _changed(self, sample: Telemetry, wait: float) -> tuple[list[int], list[int], bool]:
        """Positions of the whole rows worth sending, of the rows whose renewed
        handshake alone is worth sending, and whether one is urgent (`wait`:
        seconds until the next heartbeat)."""
        peers = sample.peers
        at = sample.sampled_at
        up_limit = at - HANDSHAKE_FRESH
        report_limit = at - HANDSHAKE_REPORT_AGE
        urgent_limit = at + wait - HANDSHAKE_URGENT_AGE
        threshold = self._bytes_report
        sent_hs, sent_rx, sent_tx, sent_ep = self._handshakes, self._rx, self._tx, self._endpoints
        # The rows that differ from what was sent, found in C: a peer's
        # handshake renews every two minutes, so a sample of 999 peers taken
        # every 10 s differs in some 80 rows, and only those are looked at.
        differ: set[int] = set()
        everyone = range(len(peers))
        for column, sent in ((peers.latest_handshakes, sent_hs), (peers.endpoints, sent_ep),
                             (peers.rx_bytes, sent_rx), (peers.tx_bytes, sent_tx)):
            if column != tuple(sent):
                differ.update(itertools.compress(everyone, map(operator.ne, column, sent)))
        if not differ:
            return [], [], False  # the quiet case
        positions: list[int] = []
        renewed: list[int] = []
        any_urgent = False
        handshakes, rxs, txs, endpoints = (peers.latest_handshakes, peers.rx_bytes,
                                           peers.tx_bytes, peers.endpoints)
        for i in sorted(differ):
            hs, rx, tx, ep, was = handshakes[i], rxs[i], txs[i], endpoints[i], sent_hs[i]
            moved = abs(rx - sent_rx[i]) + abs(tx - sent_tx[i]) >= threshold
            if ep != sent_ep[i] or (hs != 0 and hs >= up_limit) != (was != 0 and was >= up_limit):
                any_urgent = True
            elif hs != was and (hs < was or was < report_limit):
                any_urgent = any_urgent or was < urgent_limit
                if not moved:
                    renewed.append(i)  # the handshake alone; bytes wait for their own move
                    continue
            elif not moved:
                continue
            positions.append(i)
        return positions, renewed, any_urgent
