"""TelemetryReporter: what of each telemetry sample goes up one stream.

Owns the record of what the controller was told on the current stream (the
peer list and, per peer, whether it was up, its bytes and endpoint last sent)
and decides, per sample, whether to send a whole sample, a partial one (only
the peers that changed meaningfully, by position in the last whole list:
`wire.PeerUpdates`) or nothing. Pure: no I/O, and time is passed in.

Every message, whole or partial, names the peers that are down now (no
handshake within HANDSHAKE_FRESH at the sample: `Telemetry.down`), and the
controller takes that word for who is up. A peer's row goes up only when:
- its endpoint changed, or it came up or went down - urgent: sent at once,
  rate-bounded by the StreamActor (and the down list changed with it);
- its bytes moved by `BYTES_REPORT` or more since last sent - with the next
  heartbeat; smaller moves wait for the whole sample.
A renewed handshake alone is not sent. WireGuard renews every peer's session
every two minutes, so reporting renewals (so that the controller could age
each peer's handshake itself) was N x (N-1) rows per two minutes: at N=1000
about 8000 a second into the controller, most of what telemetry cost it
(a quarter more CPU in a quiet mesh, measured with and without telemetry
over one window). The handshake times the controller holds are those of the
last whole sample or of the peer's last row: at most FULL_REFRESH old, plus
the renewal interval; up or down is always the daemon's latest word, and
exact per-peer ages are on the daemon's own /metrics.

A whole sample goes first on every stream and with the first heartbeat
after the peer list changed; with the first heartbeat 0.75-1 x
`FULL_REFRESH` after the previous one (`REFRESH_JITTER`, drawn each time), a
refresh of every row (`PeerUpdates.every_row`: each peer's handshake and
bytes, not its name or endpoint - decoding and interning 999 of each, 1000
nodes every 5 minutes, was what telemetry cost a quiet controller once
renewals were gone). A changed peer list waits for the beat: while a 1000-node
mesh forms, every node's list grows for a minute, and a whole sample of up to
999 rows per node every 5 s was most of the controller's CPU in the
formation (13 s of it per formation, against 2.3 s without telemetry). Until
that beat the controller holds the previous list (its peers up/total lag by
at most a beat); an urgent change of the node's own fields (the down list
among them) goes meanwhile without peer rows.

Everything but the peers (generation, key, MTU, rotation, data-path
counters, the down list) is in every message; a change of the key, MTU,
rotation, cleartext guard or down list is urgent. A new applied generation
is not: the daemon's Ack has told the controller already (its health takes
the newer of the two), and sending it again at once was one more message
from every node for every change of the mesh - at N=1000, a thousand
telemetry messages after each join, beside the thousand acks.
"""

from __future__ import annotations

import itertools
import math
import operator
import random
from array import array

import attrs

from vpblu.core.health import HANDSHAKE_FRESH, peers_down
from vpblu.core.wire import PeerColumns, PeerUpdates, Telemetry

BYTES_REPORT = 1 << 20
FULL_REFRESH = 300.0
# Each refresh is due a random 0-REFRESH_JITTER share of FULL_REFRESH early.
# Daemons that sent their whole lists together (a mesh formed, a controller
# failed over) would otherwise refresh together for ever, a thousand of them
# within one beat every five minutes: at N=1000 the leader's RSS rose 35-55
# MiB in each such wave. Early only, so no handshake time the controller
# holds is older than it was.
REFRESH_JITTER = 0.25


def _head(t: Telemetry) -> tuple[object, ...]:
    """The node's own fields whose change is urgent (not the generation: acked)."""
    d = t.datapath
    return (t.public_key, t.mtu, t.rotation, t.down,
            None if d is None else (d.guard_cleartext, d.guard_attached))


def _up(t: Telemetry) -> tuple[bool, ...]:
    """Per peer: a handshake within HANDSHAKE_FRESH at the sample (0, never, is
    below any limit), in C."""
    limit = t.sampled_at - HANDSHAKE_FRESH
    return tuple(map(operator.ge, t.peers.latest_handshakes, itertools.repeat(limit)))


class TelemetryReporter:
    """One stream's reporter: make a new one for every stream."""

    def __init__(self, *, full_refresh: float = FULL_REFRESH,
                 bytes_report: int = BYTES_REPORT, jitter: float = REFRESH_JITTER,
                 rng: random.Random | None = None) -> None:
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"refresh jitter {jitter} is outside [0, 1)")
        self._full_refresh = full_refresh
        self._bytes_report = bytes_report
        self._jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._names: tuple[str, ...] | None = None  # None: nothing sent on this stream
        self._up: list[bool] = []
        self._rx: array[int] = array("Q")
        self._tx: array[int] = array("Q")
        self._endpoints: list[str] = []
        self._head: tuple[object, ...] | None = None
        self._refresh_due = -math.inf
        self.whole_sent = 0
        self.refreshes_sent = 0
        self.partial_sent = 0
        self.rows_sent = 0

    def plan(self, sample: Telemetry, now: float, *, beat: bool) -> Telemetry | None:
        """What to send for the whole sample `sample` at `now` (monotonic
        seconds); None: nothing (never when `beat`: a heartbeat always carries
        a sample). What is returned counts as sent, and names the peers down."""
        sample = attrs.evolve(sample, down=peers_down(sample))
        peers = sample.peers
        refresh = beat and now >= self._refresh_due
        if self._names is None or (beat and self._names != peers.names) or (
                refresh and peers.endpoints != tuple(self._endpoints)):
            self._names = peers.names
            self._up = list(_up(sample))
            self._rx, self._tx = peers.rx_bytes[:], peers.tx_bytes[:]
            self._endpoints = list(peers.endpoints)
            self._head, self._refresh_due = _head(sample), self._next_refresh(now)
            self.whole_sent += 1
            self.rows_sent += len(peers)
            return sample
        head = _head(sample)
        if refresh:  # the same list: every row's handshake and bytes, no names
            self._up = list(_up(sample))
            self._rx, self._tx = peers.rx_bytes[:], peers.tx_bytes[:]
            self._head, self._refresh_due = head, self._next_refresh(now)
            self.refreshes_sent += 1
            self.rows_sent += len(peers)
            return attrs.evolve(sample, peers=PeerColumns(), peer_updates=PeerUpdates(
                latest_handshakes=peers.latest_handshakes, rx_bytes=peers.rx_bytes,
                tx_bytes=peers.tx_bytes, every_row=True))
        if self._names != peers.names:  # positions would name the old list: the beat sends it
            if head == self._head:
                return None
            self._head = head
            self.partial_sent += 1
            return attrs.evolve(sample, peers=PeerColumns(), peer_updates=PeerUpdates())
        up = _up(sample)
        positions, urgent = self._changed(sample, up)
        if not beat and not urgent and head == self._head:
            return None
        handshakes, rx, tx, endpoints = (peers.latest_handshakes, peers.rx_bytes,
                                         peers.tx_bytes, peers.endpoints)
        for i in positions:
            self._up[i], self._rx[i], self._tx[i], self._endpoints[i] = (
                up[i], rx[i], tx[i], endpoints[i])
        self._head = head
        self.partial_sent += 1
        self.rows_sent += len(positions)
        return attrs.evolve(sample, peers=PeerColumns(), peer_updates=PeerUpdates(
            positions, [handshakes[i] for i in positions], [rx[i] for i in positions],
            [tx[i] for i in positions], [endpoints[i] for i in positions]))

    def _next_refresh(self, now: float) -> float:
        return now + self._full_refresh * (1.0 - self._jitter * self._rng.random())

    def _changed(self, sample: Telemetry, up: tuple[bool, ...]) -> tuple[list[int], bool]:
        """Positions of the rows worth sending, and whether one is urgent."""
        peers = sample.peers
        everyone = range(len(peers))
        urgent: set[int] = set()
        # Found in C: a quiet mesh's samples differ from what was sent in
        # nothing but renewed handshakes, which are not looked at.
        if up != tuple(self._up):
            urgent.update(itertools.compress(everyone, map(operator.ne, up, self._up)))
        if peers.endpoints != tuple(self._endpoints):
            urgent.update(itertools.compress(everyone, map(operator.ne, peers.endpoints,
                                                           self._endpoints)))
        moved: set[int] = set()
        if peers.rx_bytes != self._rx or peers.tx_bytes != self._tx:
            change = map(operator.add,
                         map(abs, map(operator.sub, peers.rx_bytes, self._rx)),
                         map(abs, map(operator.sub, peers.tx_bytes, self._tx)))
            moved.update(itertools.compress(
                everyone, map(operator.ge, change, itertools.repeat(self._bytes_report))))
        return sorted(urgent | moved), bool(urgent)
