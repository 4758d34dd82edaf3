"""What a node's health is, from what its daemon said: pure.

Owns the rules behind a VpbluNode's Connected, Applied and Ready conditions
and its peers up/total, and which peers count as down. The controller's
HealthActor feeds it observations and writes what it returns; the daemon's
TelemetryReporter names the peers down in every sample (`peers_down`).

No I/O and no clock: every age is passed in. Ages in telemetry are differences
of two daemon times (`sampled_at` - `latest_handshake`), so skew between the
node's clock and the controller's never makes a handshake look fresh or
stale: a peer is down or up by the daemon's own clock, at its sample.
"""

from __future__ import annotations

import attrs

from vpblu.core.model import Condition
from vpblu.core.wire import Telemetry

# A peer counts as up while its latest handshake is younger than this.
# WireGuard renews a session every 2 minutes while it carries traffic (or
# keepalives), so 3 minutes is one missed renewal plus slack.
HANDSHAKE_FRESH = 180.0
KIND = "VpbluNode"
# Names listed in a condition's message before "and N more".
LISTED = 5


def handshake_ages(t: Telemetry, elapsed: float = 0.0) -> tuple[float | None, ...]:
    """Each peer's handshake age `elapsed` seconds after the sample (None: never)."""
    now = t.sampled_at
    return tuple(None if hs == 0 else max(0.0, now - hs) + elapsed
                 for hs in t.peers.latest_handshakes)


def peers_down(t: Telemetry, elapsed: float = 0.0) -> tuple[str, ...]:
    """The peers without a handshake within HANDSHAKE_FRESH, `elapsed` s after the sample."""
    limit = t.sampled_at + elapsed - HANDSHAKE_FRESH
    handshakes = t.peers.latest_handshakes
    if not handshakes or (0 not in handshakes and min(handshakes) >= limit):
        # The usual case, every peer up, found in C: the controller asks this
        # of every telemetry message (~33 a second of 999 peers at N=1000).
        return ()
    return tuple(name for name, hs in zip(t.peers.names, handshakes, strict=True)
                 if hs == 0 or hs < limit)


@attrs.frozen(slots=True)
class NodeObservation:
    """What the controller knows about one node's daemon now."""

    connected: bool
    desired_generation: int = 0  # the last generation pushed to it (0: nothing yet)
    acked_generation: int = 0
    apply_error: str | None = None  # its last error Ack, until a later success
    hello_key: str | None = None
    telemetry: Telemetry | None = None
    telemetry_elapsed: float = 0.0  # seconds since that telemetry arrived


@attrs.frozen(slots=True)
class NodeHealth:
    """What a VpbluNode's status says about its daemon. Equal values write nothing."""

    conditions: tuple[Condition, ...]
    peers_up: int | None = None
    peers_total: int | None = None
    applied_generation: int | None = None
    key_created: float | None = None  # seconds since the epoch
    public_key: str | None = None  # the key the daemon uses (KeyPublished compares it)

    def condition(self, ctype: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == ctype), None)

    def transitions_from(self, other: NodeHealth | None) -> bool:
        """Whether a condition's status differs from `other`'s (a transition)."""
        if other is None:
            return True
        return {c.type: c.status for c in self.conditions} != {
            c.type: c.status for c in other.conditions}


def _listed(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED} more"


def evaluate(node: str, obs: NodeObservation) -> NodeHealth:
    """Connected, Applied and Ready for `node`, and the fields beside them.
    Which peers are down is the daemon's word (`Telemetry.down`, its
    `peers_down` at the sample): the controller does not age the handshake
    times it holds, which renewals no longer refresh; a daemon that falls
    silent is not Connected after `silent_limit`."""

    def cond(ctype: str, status: str, reason: str, message: str) -> Condition:
        return Condition(KIND, node, ctype, status, reason, message)

    t = obs.telemetry
    applied_generation = t.applied_generation if t is not None else None
    if obs.acked_generation and (applied_generation is None
                                 or obs.acked_generation > applied_generation):
        applied_generation = obs.acked_generation
    down = t.down if t is not None else ()
    total = len(t.peers) if t is not None else None

    def health(*conditions: Condition) -> NodeHealth:
        return NodeHealth(
            conditions,
            # The down list may name peers of a list the controller does not
            # hold yet (a changed list waits for the beat).
            peers_up=None if total is None else max(0, total - len(down)),
            peers_total=total,
            applied_generation=applied_generation,
            key_created=t.key_created if t is not None and t.key_created else None,
            public_key=t.public_key if t is not None and t.public_key else obs.hello_key,
        )

    if not obs.connected:
        return health(
            cond("Connected", "False", "NoStream", "the daemon has no stream to the leader"),
            cond("Applied", "Unknown", "NotConnected", "not known while the daemon is away"),
            cond("Ready", "False", "NotConnected", "the daemon has no stream to the leader"),
        )
    connected = cond("Connected", "True", "StreamOpen", "the daemon's stream to the leader is up")
    if obs.apply_error is not None:
        applied = cond("Applied", "False", "ApplyFailed", obs.apply_error[:1024])
    elif obs.desired_generation == 0:
        applied = cond("Applied", "Unknown", "NothingSent", "no desired state was sent yet")
    elif obs.acked_generation >= obs.desired_generation:
        applied = cond("Applied", "True", "Applied",
                       "the daemon applied the desired generation")
    else:
        applied = cond("Applied", "False", "Pending",
                       "the daemon has not acknowledged the desired generation yet")
    if applied.status != "True":
        ready = cond("Ready", "False", "NotApplied", "the desired state is not applied")
    elif t is None:
        ready = cond("Ready", "Unknown", "NoTelemetry",
                     "the daemon sent no telemetry yet (peers' handshakes are not known)")
    elif down:
        ready = cond("Ready", "False", "PeersDown",
                     f"no handshake within {HANDSHAKE_FRESH:.0f}s: {_listed(down)}")
    else:
        ready = cond("Ready", "True", "Ready",
                     "connected, applied, every peer handshaked within "
                     f"{HANDSHAKE_FRESH:.0f}s")
    return health(connected, applied, ready)
