"""`vpblu status` (also `kubectl vpblu status`): the mesh's health from the API.

Owns reading every VpbluNode's status (what the leader's HealthActor and
StatusActor wrote: Connected, Applied, Ready, KeyPublished, peers up/total,
applied generation, key creation time, rotation) and showing it: a table,
one node's conditions (`--node`), JSON or YAML (`-o`), and again on every
change (`--watch`). Kubeconfig-based, read-only, and it never reaches a node:
an operator with `get vpblunodes` can run it from anywhere, and CI can gate
on its exit status:

    0  every node is Ready
    1  the mesh is not healthy (a node not Ready, or no nodes at all)
    2  the API server could not be asked

Per-peer handshake ages live only in the leader's memory (the VpbluNode status
carries peers up/total, never a handshake time: that would be a write per
node every two minutes). `--node X --dashboard URL --token-file F` adds them,
read from the controller's dashboard JSON API (vpblu.dashboard, reviewed with
your token), as a table of X's tunnels: peer, latest handshake age, state,
endpoint, bytes. The state is the daemon's word as of its latest message; the
age is of the handshake the leader last heard of (the daemon's last whole
sample, at most 5 minutes old, or the peer's last change: renewals are not
sent up); the daemon's own vpblu_peer_handshake_age_seconds is exact.
Without it `--node` says where to find them.

`rows`, `render` and `tunnels_text` are pure: the command is the only part that
does I/O.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
import yaml

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_ERROR = 2
WATCH_PERIOD = 2.0
API_TIMEOUT = 15.0
CONDITIONS = ("Connected", "Applied", "Ready", "KeyPublished")


@attrs.frozen(slots=True)
class NodeRow:
    name: str
    conditions: dict[str, dict[str, Any]]  # type -> the condition as the API has it
    peers: str
    applied_generation: int | None
    key_created: str | None
    rotation: str
    public_key: str
    endpoint: str

    def status(self, ctype: str) -> str:
        return str(self.conditions.get(ctype, {}).get("status", "Unknown"))

    @property
    def ready(self) -> bool:
        return self.status("Ready") == "True"

    def problem(self) -> str:
        """Why the node is not Ready, in the words of its first unhappy condition."""
        for ctype in ("Connected", "Applied", "Ready", "KeyPublished"):
            cond = self.conditions.get(ctype)
            if cond is None:
                return f"no {ctype} condition yet (is the controller running?)"
            if cond.get("status") != "True":
                return f"{ctype}: {cond.get('reason', '')}: {cond.get('message', '')}"
        return ""


def rows(items: Sequence[dict[str, Any]]) -> list[NodeRow]:
    out = []
    for obj in items:
        status = obj.get("status") or {}
        conditions = {str(c.get("type")): dict(c) for c in status.get("conditions") or ()
                      if isinstance(c, dict)}
        out.append(NodeRow(
            name=str((obj.get("metadata") or {}).get("name", "")),
            conditions=conditions,
            peers=str(status.get("peers", "")),
            applied_generation=status.get("appliedGeneration"),
            key_created=status.get("keyCreated"),
            rotation=str((status.get("rotation") or {}).get("phase", "")),
            public_key=str(status.get("publicKey", "")),
            endpoint=str((obj.get("spec") or {}).get("endpoint", "")),
        ))
    return sorted(out, key=lambda r: r.name)


def healthy(table: Sequence[NodeRow]) -> bool:
    return bool(table) and all(r.ready for r in table)


def age(stamp: str | None, now: datetime.datetime) -> str:
    """kubectl's style: 45s, 12m, 5h, 3d."""
    if not stamp:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in [header, *body])


def render(table: Sequence[NodeRow], output: str, now: datetime.datetime,
           node: str | None = None) -> str:
    if output in ("json", "yaml"):
        data = [_as_dict(r, now) for r in table]
        if node is not None:
            data = [d for d in data if d["name"] == node]
        if output == "json":
            return json.dumps({"healthy": healthy(table), "nodes": data}, indent=2)
        return yaml.safe_dump({"healthy": healthy(table), "nodes": data}, sort_keys=False)
    if node is not None:
        return _one(next(r for r in table if r.name == node), now)
    wide = output == "wide"
    header = ["NAME", "READY", "CONNECTED", "APPLIED", "PEERS", "GENERATION", "KEY AGE",
              "ROTATION"]
    if wide:
        header += ["KEYPUBLISHED", "PUBLICKEY", "PROBLEM"]
    body = []
    for r in table:
        line = [r.name, r.status("Ready"), r.status("Connected"), r.status("Applied"),
                r.peers or "-", str(r.applied_generation or "-"), age(r.key_created, now),
                r.rotation or "-"]
        if wide:
            line += [r.status("KeyPublished"), r.public_key or "-", r.problem() or "-"]
        body.append(line)
    ready = sum(r.ready for r in table)
    summary = f"{ready}/{len(table)} nodes Ready: the mesh is " + (
        "healthy" if healthy(table) else "NOT healthy")
    return f"{_table(header, body)}\n{summary}" if table else "no VpbluNodes: NOT healthy"


def _one(r: NodeRow, now: datetime.datetime) -> str:
    lines = [f"Node:        {r.name}",
             f"Ready:       {r.status('Ready')}",
             f"Peers up:    {r.peers or '-'}",
             f"Generation:  {r.applied_generation or '-'}",
             f"Key age:     {age(r.key_created, now)}",
             f"Public key:  {r.public_key or '-'}",
             f"Rotation:    {r.rotation or '-'}",
             "Conditions:"]
    for ctype in sorted(r.conditions, key=lambda t: (t not in CONDITIONS, t)):
        c = r.conditions[ctype]
        lines.append(f"  {ctype:<16} {c.get('status', ''):<8} {c.get('reason', '')}: "
                     f"{c.get('message', '')}  (since "
                     f"{age(c.get('lastTransitionTime'), now)} ago)")
    return "\n".join(lines)


def _as_dict(r: NodeRow, now: datetime.datetime) -> dict[str, Any]:
    return {
        "name": r.name, "ready": r.ready, "peers": r.peers or None,
        "appliedGeneration": r.applied_generation, "keyCreated": r.key_created,
        "keyAge": age(r.key_created, now), "rotation": r.rotation or None,
        "publicKey": r.public_key or None,
        "conditions": {t: {k: c.get(k) for k in ("status", "reason", "message",
                                                  "lastTransitionTime")}
                       for t, c in sorted(r.conditions.items())},
    }


def default_kubeconfig() -> Path | None:
    """--kubeconfig, else $KUBECONFIG, else ~/.kube/config, else in-cluster."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return Path(env.split(os.pathsep)[0])
    home = Path.home() / ".kube" / "config"
    return home if home.exists() else None


class TunnelSource(Protocol):
    """Where `--node` finds per-peer detail (vpblu.meshtop.DashboardSource):
    asyncio coroutines returning the dashboard's mesh document."""

    async def fetch(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@attrs.frozen(slots=True)
class StatusOptions:
    kubeconfig: Path | None
    output: str = "table"  # table, wide, json, yaml
    node: str | None = None
    watch: bool = False
    tunnels: TunnelSource | None = None


def _bytes(n: object) -> str:
    value = float(n) if isinstance(n, (int, float)) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _seconds(age: object) -> str:
    if not isinstance(age, (int, float)):
        return "never"
    seconds = int(age)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def tunnels_text(document: dict[str, Any], node: str) -> str:
    """`node`'s tunnels from the dashboard's mesh document, as a table."""
    entry = next((n for n in document.get("nodes") or () if n.get("name") == node), None)
    if entry is None:
        return f"Tunnels: the controller does not know node {node}"
    tunnels = entry.get("tunnels")
    if tunnels is None:
        return "Tunnels: no telemetry from this node's daemon on the leader (is it connected?)"
    header = ["PEER", "HANDSHAKE AGE", "STATE", "ENDPOINT", "RX", "TX"]
    body = [[str(t.get("peer", "")), _seconds(t.get("handshakeAge")), str(t.get("state", "")),
             str(t.get("endpoint") or "-"), _bytes(t.get("rxBytes")), _bytes(t.get("txBytes"))]
            for t in tunnels]
    return "Tunnels:\n" + ("\n".join("  " + line for line in _table(header, body).splitlines())
                           if body else "  (no peers)")


async def fetch(kubeconfig: Path | None) -> list[NodeRow]:
    from vpblu.kube.client import VPBLU_NODES, open_kube_client

    async with open_kube_client(kubeconfig) as kube:
        with trio.fail_after(API_TIMEOUT):
            listed = await kube.list(VPBLU_NODES)
    return rows(list(listed.items))


async def _tunnels(options: StatusOptions) -> str:
    assert options.node is not None
    if options.tunnels is None:
        return ("Tunnels: per-peer handshake ages are in the leader's memory: add "
                "--dashboard URL --token-file FILE (or see vpblu_peer_handshake_age_seconds)")
    import trio_asyncio

    try:
        with trio.fail_after(API_TIMEOUT):
            document = await trio_asyncio.aio_as_trio(options.tunnels.fetch)()
    except Exception as exc:  # the health table stands without the tunnels
        return f"Tunnels: cannot read them from the dashboard: {exc}"
    return tunnels_text(document, options.node)


async def run_status(options: StatusOptions) -> int:
    """Print the mesh's health (again on every change with `watch`); the exit status."""
    from vpblu.kube.client import ApiError, ApiUnavailable

    shown = None
    while True:
        try:
            table = await fetch(options.kubeconfig)
        except (ApiError, ApiUnavailable, OSError, trio.TooSlowError) as exc:
            print(f"vpblu status: cannot read VpbluNodes: {exc!r}", file=sys.stderr)
            if not options.watch:
                return EXIT_ERROR
            table = None
        if table is not None:
            if options.node is not None and options.node not in {r.name for r in table}:
                print(f"vpblu status: no VpbluNode {options.node}", file=sys.stderr)
                return EXIT_ERROR
            now = datetime.datetime.now(datetime.UTC)
            text = render(table, options.output, now, options.node)
            if options.node is not None and options.output in ("table", "wide"):
                text += "\n" + await _tunnels(options)
            if text != shown:
                if options.watch and shown is not None:
                    print()
                print(text, flush=True)
                shown = text
            subject = ([r for r in table if r.name == options.node]
                       if options.node is not None else table)
            code = EXIT_HEALTHY if healthy(subject) else EXIT_UNHEALTHY
            if not options.watch:
                return code
        await trio.sleep(WATCH_PERIOD)
