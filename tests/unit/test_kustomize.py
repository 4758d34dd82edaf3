"""The kustomize tree renders (`kubectl kustomize`, no cluster) and says what
the install needs: one image, named, tagged and pinned in one place; the TLS
objects the pods mount made by the certs Job in the base and by cert-manager
in its overlay, under the same names; the controller non-root."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from vpblu.certs import CA_CONFIGMAP, SERVING_SECRET, CertsSettings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "kustomize"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")


def _render(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE / path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def _images(docs: list[dict[str, Any]]) -> set[str]:
    return {c["image"] for d in docs if d["kind"] in {"Deployment", "DaemonSet", "Job", "CronJob"}
            for c in _pod(d)["containers"]}


def _pinned_digest() -> str:
    base = yaml.safe_load((KUSTOMIZE / "base" / "kustomization.yaml").read_text())
    (entry,) = base["images"]
    assert entry["name"] == "vpblu"
    assert entry["newTag"] == VERSION, "the image tag is the package's version"
    digest: str = entry["digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    return digest


def test_one_image_named_tagged_and_pinned_in_one_place() -> None:
    digest = _pinned_digest()
    assert _images(_render("base")) == {f"vpblu:{VERSION}@{digest}"}
    # The manifests name the image only; no tag or digest anywhere else.
    for path in KUSTOMIZE.rglob("*.yaml"):
        text = path.read_text()
        if path != KUSTOMIZE / "base" / "kustomization.yaml":
            assert "sha256:" not in text, path
        assert not re.search(r"image: vpblu:", text), path


def test_the_image_overlay_points_at_a_registry_with_the_same_tag_and_digest() -> None:
    digest = _pinned_digest()
    (image,) = _images(_render("overlays/image"))
    name, _, rest = image.partition(":")
    assert "/" in name and name != "vpblu"
    assert rest == f"{VERSION}@{digest}"


def test_the_controller_runs_non_root_read_only_without_capabilities() -> None:
    docs = _render("base")
    for kind, name in (("Deployment", "vpblu-controller"), ("Job", "vpblu-certs"),
                       ("CronJob", "vpblu-certs-renew")):
        pod = _pod(_find(docs, kind, name))
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]


def _tls_mounts(docs: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    controller = _pod(_find(docs, "Deployment", "vpblu-controller"))
    daemon = _pod(_find(docs, "DaemonSet", "vpblu-daemon"))
    secrets = {v["secret"]["secretName"] for v in controller["volumes"] if "secret" in v}
    configmaps = {v["configMap"]["name"] for v in daemon["volumes"] if "configMap" in v}
    return secrets, configmaps


def test_the_base_makes_its_tls_objects_with_vpblu_certs() -> None:
    docs = _render("base")
    assert _tls_mounts(docs) == ({SERVING_SECRET}, {CA_CONFIGMAP})
    job = _pod(_find(docs, "Job", "vpblu-certs"))["containers"][0]
    assert job["command"] == ["vpblu"] and job["args"] == ["certs"]
    cron = _find(docs, "CronJob", "vpblu-certs-renew")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert _pod(cron)["containers"][0]["args"] == ["certs", "--renew-before", "30d"]
    # Only the certs ServiceAccount reaches Secrets, and only by name for reading.
    role = _find(docs, "Role", "vpblu-certs")
    readable = [r for r in role["rules"] if "get" in r["verbs"] and "secrets" in r["resources"]]
    assert readable and all(r.get("resourceNames") for r in readable)
    for d in docs:
        if d["kind"] in {"Role", "ClusterRole"} and d["metadata"]["name"] != "vpblu-certs":
            for rule in d.get("rules", []):
                assert "secrets" not in rule.get("resources", []), d["metadata"]["name"]


def test_the_cert_manager_overlay_makes_the_same_objects_instead() -> None:
    docs = _render("overlays/cert-manager")
    assert not [d for d in docs if d["metadata"]["name"] in {"vpblu-certs", "vpblu-certs-renew"}]
    assert _tls_mounts(docs) == ({SERVING_SECRET}, {CA_CONFIGMAP})
    serving = _find(docs, "Certificate", "vpblu-controller")
    assert serving["metadata"]["namespace"] == "vpblu-system"
    assert serving["spec"]["secretName"] == SERVING_SECRET
    assert tuple(serving["spec"]["dnsNames"]) == CertsSettings().dns_names
    assert serving["spec"]["renewBefore"] == "720h"
    ca = _find(docs, "Certificate", "vpblu-ca")
    assert ca["spec"]["isCA"] is True
    assert _find(docs, "ClusterIssuer", "vpblu-ca")["spec"]["ca"]["secretName"] == (
        ca["spec"]["secretName"])
    assert serving["spec"]["issuerRef"]["name"] == "vpblu-ca"
    bundle = _find(docs, "Bundle", CA_CONFIGMAP)  # trust-manager names the ConfigMap after it
    assert bundle["spec"]["sources"] == [{"secret": {"name": ca["spec"]["secretName"],
                                                     "key": "ca.crt"}}]
    assert bundle["spec"]["target"]["configMap"]["key"] == "ca.crt"
    assert bundle["spec"]["target"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "vpblu-system"}
