"""The package as a wheel, not as a checkout: built with `pip wheel .`, unpacked
outside the repository, it carries its eBPF source and proto, the daemon's
classifier compiles from it with bcc, and both commands start.

Run with the test venv's interpreter for the dependencies, but with the
checkout off sys.path (cwd elsewhere, -P), so every vpblu import comes from
the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300.0
RUN_TIMEOUT = 60.0


def _wheel(tmp_path: Path) -> Path:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)],
                   check=True, timeout=BUILD_TIMEOUT, cwd=tmp_path)
    (wheel,) = out.glob("vpblu-*.whl")
    return wheel


def _run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-P", *args], cwd=site.parent, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def test_the_wheel_carries_its_data_and_its_daemon_compiles_the_classifier(
        tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vpblu/bpf/classifier.c" in names
    assert "vpblu/stream/proto/mesh.proto" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    pins = Path(f"/sys/fs/bpf/vpblu-wheel-test-{os.getpid()}")
    probe = _run(site, "-c", (
        "import sys, pathlib, vpblu\n"
        "from vpblu.node.kernel.bcc import CLASSIFIER_SOURCE, BccClassifier, remove_pins\n"
        "pins = pathlib.Path(sys.argv[1])\n"
        "try:\n"
        "    BccClassifier(CLASSIFIER_SOURCE, pins)\n"
        "finally:\n"
        "    remove_pins(pins)\n"
        "print(vpblu.__file__, CLASSIFIER_SOURCE)\n"
    ), str(pins))
    assert probe.returncode == 0, probe.stderr
    where, source = probe.stdout.split()[:2]
    assert where.startswith(str(site)), where
    assert source.startswith(str(site)), source

    for command in (["controller", "--help"], ["daemon", "run", "--help"]):
        started = _run(site, "-m", "vpblu", *command)
        assert started.returncode == 0, started.stderr
        assert "usage: vpblu" in started.stdout
