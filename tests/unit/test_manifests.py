"""The manifests call the real command line: the controller's args parse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from vpblu.cli import build_parser

BASE = Path(__file__).resolve().parents[2] / "kustomize" / "base"


def controller_pod() -> dict[str, Any]:
    for doc in yaml.safe_load_all((BASE / "controller.yaml").read_text()):
        if doc and doc["kind"] == "Deployment":
            return dict(doc["spec"]["template"]["spec"])
    raise AssertionError("no Deployment in controller.yaml")


def test_controller_args_are_the_cli_flags() -> None:
    pod = controller_pod()
    container = pod["containers"][0]
    env = {e["name"] for e in container["env"]}
    used = {m for a in container["args"] for m in re.findall(r"\$\((\w+)\)", a)}
    assert used <= env  # every $(VAR) the kubelet expands is defined
    args = [re.sub(r"\$\((\w+)\)", "x", a) for a in container["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "controller"
    assert parsed.listen == "0.0.0.0:7443"
    assert parsed.advertise == "x:7443"
    assert parsed.kubeconfig is None  # in-cluster
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tls": "vpblu-controller-tls"}
    for path in (parsed.tls_cert, parsed.tls_key):
        assert str(path).startswith(mounts["tls"] + "/")
    assert parsed.retry_period < parsed.renew_deadline < parsed.lease_duration


def _pod(name: str, kind: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((BASE / name).read_text()):
        if doc and doc["kind"] == kind:
            return dict(doc["spec"]["template"]["spec"])
    raise AssertionError(f"no {kind} in {name}")


def test_probes_ask_the_metrics_port_the_process_listens_on() -> None:
    for name, kind, command in (("controller.yaml", "Deployment", "controller"),
                                ("daemon.yaml", "DaemonSet", "daemon")):
        container = _pod(name, kind)["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        args = [re.sub(r"\$\((\w+)\)", "127.0.0.1", a) for a in container["args"]]
        if command == "daemon":
            args += ["--node-name=x", "--token-file=/t", "--controller=c:1"]
        parsed = build_parser().parse_args(args)
        assert parsed.metrics_listen.endswith(f":{ports['metrics']}")
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
