"""vpblu's kustomize base on a TestEnv: where it is, installing it, waiting until it is served."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vpblu.testenv import TestEnv

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "kustomize" / "base"
SAMPLES = REPO / "kustomize" / "samples"
CRD_NAMES = frozenset({
    "vpblunodes.vpblu.io",
    "tunnelpolicies.vpblu.io",
    "routepolicies.vpblu.io",
    "blockpolicies.vpblu.io",
    "rotationpolicies.vpblu.io",
})
# Established usually follows the apply within a second; the bound is for a
# loaded machine.
ESTABLISHED_TIMEOUT = 30.0
POLL_INTERVAL = 0.1


def established_crds(env: TestEnv) -> frozenset[str]:
    out = env.kubectl("get", "crd", "-o", "json").stdout
    names = set()
    for crd in json.loads(out)["items"]:
        conditions = crd.get("status", {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            names.add(crd["metadata"]["name"])
    return frozenset(names)


def wait_established(env: TestEnv, names: frozenset[str]) -> None:
    deadline = time.monotonic() + ESTABLISHED_TIMEOUT
    while not names <= (seen := established_crds(env)):
        if time.monotonic() > deadline:
            raise AssertionError(f"not Established after {ESTABLISHED_TIMEOUT} s: "
                                 f"{sorted(names - seen)}")
        time.sleep(POLL_INTERVAL)
    # Established is not yet served: for a moment after it, a list answers 429
    # "storage is (re)initializing" while the resource's watch cache fills.
    for name in names:
        plural, group = name.split(".", 1)
        path = f"/apis/{group}/v1alpha1/{plural}"
        while (status := env.request("GET", path).status) != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {path} answers {status} after "
                                     f"{ESTABLISHED_TIMEOUT} s")
            time.sleep(POLL_INTERVAL)


def install_base(env: TestEnv) -> None:
    """`kubectl apply -k kustomize/base`, then wait until every CRD is served."""
    env.kubectl("apply", "-k", str(BASE))
    wait_established(env, CRD_NAMES)
