"""`vpblu controller` against an API server older than it needs: it stops at
start with exit code 2 and says which version it found and why it needs more.
The test API server is v1.34; the minimum is raised above it for the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpblu import kubeversion
from vpblu.cli import main
from vpblu.lab.testenv import TestEnv

pytestmark = pytest.mark.integration


def test_the_controller_refuses_an_api_server_older_than_the_minimum(
        kube: TestEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(kubeversion, "MINIMUM", (1, 99))
    code = main(["controller", "--kubeconfig", str(kube.kubeconfig_path),
                 "--listen", "127.0.0.1:1", "--advertise", "127.0.0.1:1",
                 "--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(tmp_path / "none.key"),
                 "--metrics-listen", ""])
    assert code == 2
    err = capsys.readouterr().err
    assert "vpblu controller: the API server runs Kubernetes v1.34" in err
    assert "vpblu needs 1.99 or newer" in err
