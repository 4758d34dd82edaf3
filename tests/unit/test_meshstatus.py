"""`vpblu status`: the table, one node, JSON/YAML, and the exit status."""

from __future__ import annotations

import datetime
import json
from typing import Any

import yaml

from vpblu.cli import build_parser
from vpblu.meshstatus import healthy, render, rows

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


def node(name: str, ready: str, *, peers: str = "2/2") -> dict[str, Any]:
    conds = [{"type": t, "status": s, "reason": r, "message": m,
              "lastTransitionTime": "2026-01-01T11:00:00Z"} for t, s, r, m in (
        ("Connected", "True" if ready == "True" else "False", "StreamOpen", "up"),
        ("Applied", "True", "Applied", "applied"),
        ("Ready", ready, "Ready" if ready == "True" else "NotConnected", "why"),
        ("KeyPublished", "True", "Published", "ok"))]
    return {"metadata": {"name": name}, "spec": {},
            "status": {"conditions": conds, "peers": peers, "appliedGeneration": 4294967301,
                       "keyCreated": "2026-01-01T09:00:00Z", "publicKey": "K="}}


def test_the_table_and_its_verdict() -> None:
    table = rows([node("b", "True"), node("a", "False", peers="0/2")])
    assert [r.name for r in table] == ["a", "b"] and not healthy(table)
    text = render(table, "table", NOW)
    header, first, second, summary = text.splitlines()
    assert header.split()[:5] == ["NAME", "READY", "CONNECTED", "APPLIED", "PEERS"]
    assert first.split()[:5] == ["a", "False", "False", "True", "0/2"]
    assert "3h" in second  # key age
    assert summary == "1/2 nodes Ready: the mesh is NOT healthy"
    assert "Connected: StreamOpen" in render(table, "wide", NOW)
    assert healthy(rows([node("b", "True")]))
    assert not healthy([])


def test_one_node_and_machine_output() -> None:
    table = rows([node("a", "False"), node("b", "True")])
    one = render(table, "table", NOW, node="a")
    assert "Ready:       False" in one and "NotConnected: why" in one
    data = json.loads(render(table, "json", NOW))
    assert data["healthy"] is False and [n["name"] for n in data["nodes"]] == ["a", "b"]
    assert data["nodes"][1]["conditions"]["Ready"]["status"] == "True"
    only = yaml.safe_load(render(table, "yaml", NOW, node="b"))
    assert [n["name"] for n in only["nodes"]] == ["b"]


def test_the_command_line() -> None:
    args = build_parser().parse_args(["status", "-o", "wide", "--node", "n1", "--watch"])
    assert (args.command, args.output, args.node, args.watch) == ("status", "wide", "n1", True)


def test_the_tunnels_of_one_node_from_the_dashboards_document() -> None:
    from vpblu.meshstatus import tunnels_text

    document = {"nodes": [
        {"name": "n1", "tunnels": [
            {"peer": "n2", "handshakeAge": 12.4, "state": "ok", "endpoint": "10.0.0.2:51820",
             "rxBytes": 2048, "txBytes": 3 * 2**20},
            {"peer": "n3", "handshakeAge": None, "state": "down", "endpoint": "",
             "rxBytes": 0, "txBytes": 0},
            {"peer": "n4", "handshakeAge": 200.0, "state": "down", "endpoint": "10.0.0.4:51820",
             "rxBytes": 10, "txBytes": 10}]},
        {"name": "n9", "tunnels": None}]}
    text = tunnels_text(document, "n1").splitlines()
    assert text[0] == "Tunnels:"
    assert text[1].split() == ["PEER", "HANDSHAKE", "AGE", "STATE", "ENDPOINT", "RX", "TX"]
    assert text[2].split() == ["n2", "12s", "ok", "10.0.0.2:51820", "2.0", "KiB", "3.0", "MiB"]
    assert text[3].split() == ["n3", "never", "down", "-", "0", "B", "0", "B"]
    assert text[4].split()[:3] == ["n4", "3m20s", "down"]
    assert "no telemetry" in tunnels_text(document, "n9")
    assert "does not know node n7" in tunnels_text(document, "n7")


def test_status_dashboard_needs_a_token_file() -> None:
    from vpblu.cli import main

    assert main(["status", "--node", "n1", "--dashboard", "https://127.0.0.1:1"]) == 2
