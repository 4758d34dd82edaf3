"""The optional monitoring component (kustomize/components/monitoring) renders
on top of kustomize/base, its PrometheusRule's group passes Debian's
`promtool check rules`, each alert fires on the series it is about and stays
quiet on a healthy mesh (`promtool test rules`, on promtool's own virtual
clock), and every metric the rules and the Grafana dashboard name is one the
controller or the daemon exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_metrics import controller_exposition, daemon_exposition

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "kustomize"
PROMTOOL_TIMEOUT = 60


def render(tmp_path: Path) -> list[dict[str, Any]]:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize refuses absolute paths to other kustomizations.
    rel = os.path.relpath(KUSTOMIZE, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [f"{rel}/base"], "components": [f"{rel}/components/monitoring"]}))
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def rule_groups(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The PrometheusRule's groups as a Prometheus rule file."""
    rule = find(render(tmp_path), "PrometheusRule", "vpblu")
    groups = rule["spec"]["groups"]
    path = tmp_path / "vpblu-rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path, groups


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=PROMTOOL_TIMEOUT, check=False)


def test_the_component_adds_scraping_rules_and_the_dashboard(tmp_path: Path) -> None:
    docs = render(tmp_path)
    for kind, name, component in (("Deployment", "vpblu-controller", "controller"),
                                  ("DaemonSet", "vpblu-daemon", "daemon")):
        workload = find(docs, kind, name)
        notes = workload["spec"]["template"]["metadata"]["annotations"]
        port = next(p["containerPort"] for p in
                    workload["spec"]["template"]["spec"]["containers"][0]["ports"]
                    if p["name"] == "metrics")
        assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                         "prometheus.io/path": "/metrics"}, notes
        monitor = find(docs, "PodMonitor", name)
        assert monitor["metadata"]["namespace"] == "vpblu-system"
        assert monitor["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "vpblu", "app.kubernetes.io/component": component}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboard = find(docs, "ConfigMap", "vpblu-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["vpblu-mesh.json"])
    assert board["uid"] == "vpblu-mesh" and board["panels"]
    alerts = {r["alert"] for g in find(docs, "PrometheusRule", "vpblu")["spec"]["groups"]
              for r in g["rules"]}
    assert {"VpbluNodeNotReady", "VpbluPeerHandshakeStale", "VpbluCleartextPackets",
            "VpbluConvergenceSlow"} <= alerts


def test_promtool_check_rules_accepts_the_prometheusrule(tmp_path: Path) -> None:
    path, _ = rule_groups(tmp_path)
    checked = promtool("check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout, checked.stdout


# Series in promtool's expanding notation: 'a+bxN' is a, a+b, ... (N+1 samples, 1m apart).
LEADER = ('vpblu_leader{job="c",instance="c0"}', "1x30")
FOLLOWER = ('vpblu_leader{job="c",instance="c1"}', "0x30")
UNIT_TESTS: list[dict[str, Any]] = [
    {   # one node of three not Ready for 6 minutes; the follower's stale gauges ignored
        "interval": "1m",
        "input_series": [
            {"series": LEADER[0], "values": LEADER[1]},
            {"series": FOLLOWER[0], "values": FOLLOWER[1]},
            {"series": 'vpblu_nodes{job="c",instance="c0"}', "values": "3x30"},
            {"series": 'vpblu_nodes_ready{job="c",instance="c0"}', "values": "3 3 2x28"},
            {"series": 'vpblu_nodes{job="c",instance="c1"}', "values": "3x30"},
            {"series": 'vpblu_nodes_ready{job="c",instance="c1"}', "values": "0x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "VpbluNodeNotReady", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "VpbluNodeNotReady",
             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
            {"eval_time": "8m", "alertname": "VpbluNoLeader", "exp_alerts": []},
        ],
    },
    {   # a healthy mesh: nothing fires
        "interval": "1m",
        "input_series": [
            {"series": LEADER[0], "values": LEADER[1]},
            {"series": 'vpblu_nodes{job="c",instance="c0"}', "values": "3x30"},
            {"series": 'vpblu_nodes_ready{job="c",instance="c0"}', "values": "3x30"},
            {"series": 'vpblu_handshake_age_max_seconds{node="n1",instance="d1"}',
             "values": "20 40 60 80 100 120 20 40 60 80 100 120 20x18"},
            {"series": 'vpblu_peers_never_handshaked{node="n1",instance="d1"}',
             "values": "0x30"},
            {"series": 'vpblu_cleartext_packets_total{node="n1",instance="d1"}',
             "values": "0x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="0.25"}',
             "values": "0+100x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="1"}',
             "values": "0+100x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="+Inf"}',
             "values": "0+100x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": name, "exp_alerts": []}
            for name in ("VpbluNodeNotReady", "VpbluNoLeader", "VpbluPeerHandshakeStale",
                         "VpbluPeerNeverHandshaked", "VpbluCleartextPackets",
                         "VpbluConvergenceSlow")
        ],
    },
    {   # a stale peer, a peer that never handshaked, cleartext, slow convergence
        "interval": "1m",
        "input_series": [
            {"series": LEADER[0], "values": LEADER[1]},
            {"series": 'vpblu_handshake_age_max_seconds{node="n2",instance="d2"}',
             "values": "60+60x30"},
            {"series": 'vpblu_peers_never_handshaked{node="n3",instance="d3"}',
             "values": "1x30"},
            {"series": 'vpblu_cleartext_packets_total{node="n2",instance="d2"}',
             "values": "0x10 5x20"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="0.25"}',
             "values": "0+10x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="1"}',
             "values": "0+50x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="2.5"}',
             "values": "0+100x30"},
            {"series": 'vpblu_convergence_seconds_bucket{job="c",instance="c0",le="+Inf"}',
             "values": "0+100x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "VpbluPeerHandshakeStale", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "VpbluPeerHandshakeStale",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "node": "n2",
                                            "instance": "d2"}}]},
            {"eval_time": "5m", "alertname": "VpbluPeerNeverHandshaked",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "node": "n3",
                                            "instance": "d3"}}]},
            {"eval_time": "10m", "alertname": "VpbluCleartextPackets", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "VpbluCleartextPackets",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "node": "n2",
                                            "instance": "d2"}}]},
            {"eval_time": "25m", "alertname": "VpbluConvergenceSlow",
             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
        ],
    },
    {   # no replica leads
        "interval": "1m",
        "input_series": [{"series": FOLLOWER[0], "values": FOLLOWER[1]}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "VpbluNoLeader", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "VpbluNoLeader",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
        ],
    },
]


def test_each_alert_fires_on_its_series_and_not_on_a_healthy_mesh(tmp_path: Path) -> None:
    _, groups = rule_groups(tmp_path)
    # promtool test rules compares annotations too; what is tested here is each
    # expression and its `for` (check rules above has parsed the templates).
    bare = tmp_path / "vpblu-rules-bare.yml"
    bare.write_text(yaml.safe_dump({"groups": [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in groups]}))
    tests = tmp_path / "vpblu-rules-test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [bare.name], "evaluation_interval": "1m",
                                     "tests": UNIT_TESTS}))
    tested = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name the controller and a daemon (with telemetry) expose,
    also of families that have no labelled child yet."""
    names: set[str] = set()
    for text in (controller_exposition(), daemon_exposition(3)):
        for family in text_string_to_metric_families(text.decode()):
            names.update(s.name for s in family.samples)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


METRIC = re.compile(r"\bvpblu_[a-z0-9_]+")


def test_rules_and_dashboard_name_only_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names()
    _, groups = rule_groups(tmp_path)
    board = json.loads((KUSTOMIZE / "components" / "monitoring" / "dashboard.json").read_text())
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    exprs += [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, exprs
    assert used <= exported, f"not exported: {sorted(used - exported)}"
