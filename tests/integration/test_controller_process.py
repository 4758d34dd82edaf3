"""`python -m vpblu controller` as a process on the real API server: SIGTERM
(what Kubernetes sends when a Deployment rolls) releases the Lease and ends
the process cleanly, so the next replica need not wait for it to expire."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vpblu.lab.sim import MeshPki
from vpblu.lab.testenv import REPO, TestEnv, free_port

pytestmark = pytest.mark.integration

LEASE = "/apis/coordination.k8s.io/v1/namespaces/vpblu-system/leases/sigterm-check"
LEAD_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0  # the release itself is bounded by one retry period (2 s)


def lease_holder(env: TestEnv) -> Any:
    answer = env.request("GET", LEASE)
    return answer.body.get("spec", {}).get("holderIdentity") if answer.status == 200 else None


def test_sigterm_releases_the_lease_and_exits_cleanly(
    vpblu_installed: TestEnv, tmp_path: Path,
) -> None:
    env = vpblu_installed
    pki = MeshPki.create(tmp_path / "pki")
    address = f"127.0.0.1:{free_port()}"
    with (tmp_path / "controller.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vpblu", "controller",
             "--kubeconfig", str(env.kubeconfig_path), "--listen", address,
             "--advertise", address, "--tls-cert", str(pki.server.cert),
             "--tls-key", str(pki.server.key), "--identity", "sigterm-check",
             "--lease-name", "sigterm-check"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + LEAD_TIMEOUT
            while lease_holder(env) != "sigterm-check":
                assert proc.poll() is None, (tmp_path / "controller.log").read_text()
                assert time.monotonic() < deadline, "the controller never took the lease"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(STOP_TIMEOUT) == 0, (tmp_path / "controller.log").read_text()
            assert lease_holder(env) is None
            assert "lease sigterm-check: released" in (tmp_path / "controller.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            env.request("DELETE", LEASE)
