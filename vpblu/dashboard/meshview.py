"""What the dashboard (and `vpblu meshtop --dashboard`) shows: the mesh as one
JSON-able document.

Owns turning what the API server holds (VpbluNodes with the health the leader
wrote, the four policy kinds with their conditions, the Lease) and, on the
leader, the HealthActor's in-memory telemetry (per-peer handshakes and bytes)
into that document. Pure: the caller passes the objects and the time; nothing
here does I/O. Throughput is bytes between two samples of the same peer over
the daemon's own clock, kept in `Rates` between calls.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from vpblu.core.wire import Telemetry
from vpblu.messages import HealthSnapshot, NodeTelemetryView

POLICY_KINDS = ("TunnelPolicy", "RoutePolicy", "BlockPolicy", "RotationPolicy")
MAX_EVENTS = 50

JSON = dict[str, Any]


@attrs.define
class Rates:
    """The previous sample of every (node, peer): (sampled_at, rx, tx)."""

    seen: dict[tuple[str, str], tuple[float, int, int, float, float]] = attrs.field(factory=dict)

    def rate(self, node: str, peer: str, at: float, rx: int, tx: int) -> tuple[float, float]:
        """Bytes per second received and sent since the previous sample (0 at first)."""
        key = (node, peer)
        old = self.seen.get(key)
        if old is not None and at == old[0]:
            return old[3], old[4]  # the same sample again: the same rate
        rx_rate = tx_rate = 0.0
        if old is not None and at > old[0] and rx >= old[1] and tx >= old[2]:
            rx_rate, tx_rate = (rx - old[1]) / (at - old[0]), (tx - old[2]) / (at - old[0])
        self.seen[key] = (at, rx, tx, rx_rate, tx_rate)
        return rx_rate, tx_rate

    def keep_only(self, nodes: Iterable[str]) -> None:
        alive = set(nodes)
        for key in [k for k in self.seen if k[0] not in alive]:
            del self.seen[key]


def _stamp(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def handshake_state(named_down: bool) -> str:
    """down: the daemon named the peer down (no handshake within 3 min at its
    latest sample); ok otherwise. Not from the age shown beside it: renewals
    are not reported, so the handshake time held is that of the daemon's last
    whole sample (at most 5 min old) or of the peer's last change."""
    return "down" if named_down else "ok"


def _conditions(obj: Mapping[str, Any]) -> list[JSON]:
    out = []
    for c in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(c, dict):
            out.append({k: c.get(k) for k in ("type", "status", "reason", "message",
                                               "lastTransitionTime")})
    return out


def _status_of(conditions: Sequence[JSON], ctype: str) -> str:
    return next((str(c.get("status")) for c in conditions if c.get("type") == ctype), "Unknown")


def tunnels(node: str, t: Telemetry, rates: Rates) -> list[JSON]:
    out = []
    down = frozenset(t.down)
    for p in t.peers.rows():
        age = t.sampled_at - p.latest_handshake if p.latest_handshake else None
        rx_rate, tx_rate = rates.rate(node, p.name, t.sampled_at, p.rx_bytes, p.tx_bytes)
        out.append({"peer": p.name, "handshakeAge": None if age is None else max(0.0, age),
                    "state": handshake_state(p.name in down),
                    "rxBytes": p.rx_bytes,
                    "txBytes": p.tx_bytes, "rxRate": rx_rate, "txRate": tx_rate,
                    "endpoint": p.endpoint})
    return sorted(out, key=lambda x: x["peer"])


def node_entry(obj: Mapping[str, Any] | None, name: str, live: NodeTelemetryView | None,
               rates: Rates, now: float) -> JSON:
    obj = obj or {}
    status = obj.get("status") or {}
    conditions = _conditions(obj)
    key_created = _stamp(status.get("keyCreated"))
    t = live.telemetry if live is not None else None
    if t is not None and t.key_created:
        key_created = t.key_created
    problem = ""
    for ctype in ("Connected", "Applied", "Ready", "KeyPublished"):
        c = next((c for c in conditions if c.get("type") == ctype), None)
        if c is not None and c.get("status") != "True":
            problem = f"{ctype}: {c.get('reason') or ''}: {c.get('message') or ''}"
            break
    last = status.get("lastRotation") or {}
    return {
        "name": name,
        "ready": _status_of(conditions, "Ready"),
        "connected": ("True" if live.connected else "False") if live is not None
        else _status_of(conditions, "Connected"),
        "applied": _status_of(conditions, "Applied"),
        "keyPublished": _status_of(conditions, "KeyPublished"),
        "peers": str(status.get("peers") or ""),
        "generation": status.get("appliedGeneration"),
        "keyAge": None if key_created is None else max(0.0, now - key_created),
        "publicKey": str(status.get("publicKey") or (t.public_key if t is not None else "")),
        "endpoint": str((obj.get("spec") or {}).get("endpoint") or ""),
        "rotation": str((status.get("rotation") or {}).get("phase") or ""),
        "rotationState": t.rotation if t is not None else "",
        "lastRotation": {k: last.get(k) for k in ("outcome", "finished", "trigger", "reason")
                         if last.get(k) is not None},
        "mtu": t.mtu if t is not None and t.mtu else None,
        "problem": problem,
        "conditions": conditions,
        "tunnels": tunnels(name, t, rates) if t is not None else None,
        "datapath": attrs.asdict(t.datapath) if t is not None and t.datapath else None,
    }


def policy_entry(kind: str, obj: Mapping[str, Any], nodes_applied: int, nodes: int) -> JSON:
    conditions = _conditions(obj)
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    return {"kind": kind, "name": str(meta.get("name", "")),
            "accepted": _status_of(conditions, "Accepted"),
            "summary": ", ".join(f"{k}={v}" for k, v in sorted(spec.items())
                                 if isinstance(v, str | int | bool))[:200],
            "appliedOn": f"{nodes_applied}/{nodes}", "conditions": conditions}


def events(vpblu_nodes: Sequence[Mapping[str, Any]],
           policies: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[JSON]:
    """The newest condition transitions of every object: what changed, and when."""
    out = []
    objects = [("VpbluNode", o) for o in vpblu_nodes] + [
        (kind, o) for kind in POLICY_KINDS for o in policies.get(kind, ())]
    for kind, obj in objects:
        name = str((obj.get("metadata") or {}).get("name", ""))
        for c in _conditions(obj):
            out.append({"time": c.get("lastTransitionTime") or "", "object": f"{kind}/{name}",
                        "type": c.get("type"), "status": c.get("status"),
                        "reason": c.get("reason"), "message": c.get("message")})
        last = (obj.get("status") or {}).get("lastRotation") or {}
        if last.get("finished"):
            out.append({"time": last.get("finished"), "object": f"{kind}/{name}",
                        "type": "Rotation", "status": last.get("outcome"),
                        "reason": last.get("trigger"), "message": last.get("reason") or ""})
    out.sort(key=lambda e: str(e["time"]), reverse=True)
    return out[:MAX_EVENTS]


def mesh_view(*, vpblu_nodes: Sequence[Mapping[str, Any]],
              policies: Mapping[str, Sequence[Mapping[str, Any]]], leader: str,
              served_by: str, leading: bool, health: HealthSnapshot | None,
              rates: Rates, now: float) -> JSON:
    """The whole document. Nodes are the VpbluNodes and, on the leader, any
    node with an open session but no VpbluNode yet."""
    by_name = {str((o.get("metadata") or {}).get("name", "")): o for o in vpblu_nodes}
    live = {v.node: v for v in health.nodes} if health is not None else {}
    # A node the HealthActor still holds but whose session closed and whose
    # VpbluNode is gone has left; one with an open session is shown at once.
    names = sorted(set(by_name) | {n for n, v in live.items() if v.connected})
    nodes = [node_entry(by_name.get(n), n, live.get(n), rates, now) for n in names]
    rates.keep_only(names)
    applied = sum(n["applied"] == "True" for n in nodes)
    return {
        "generatedAt": datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "leader": leader,
        "servedBy": served_by,
        "telemetry": "live" if health is not None else (
            "per-peer telemetry is held in memory by the leader" + (f" ({leader})"
                                                                     if leader else "")),
        "nodes": nodes,
        "ready": sum(n["ready"] == "True" for n in nodes),
        "policies": [policy_entry(kind, o, applied, len(nodes))
                     for kind in POLICY_KINDS for o in policies.get(kind, ())],
        "events": events(vpblu_nodes, policies),
    }
