"""The image `make image` builds, run for real: loaded into podman and into
containerd (each in a throwaway store of its own), it answers `vpblu
--version` and `vpblu daemon run --help`, and the controller's side of it
imports the whole product as a non-root user on a read-only root filesystem
with no capabilities, as its Deployment runs it.

The image comes from the cached make target: `make test` builds it during
setup (cold: a few minutes), so here it is a no-op; run alone on a cold
cache, the first test builds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="building and running images needs root"),
]

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"docker.io/library/vpblu:{VERSION}"
BUILD_TIMEOUT = 1800.0
LOAD_TIMEOUT = 300.0
RUN_TIMEOUT = 120.0
# This machine's sandbox refuses runc's raising of RLIMIT_NPROC and
# RLIMIT_NOFILE to podman's defaults (EPERM, no CAP_SYS_RESOURCE); limits
# below the host's are accepted.
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# What the controller's Deployment sets (kustomize/base/controller.yaml).
CONTROLLER_SECURITY = ("--user", "65532:65532", "--read-only", "--cap-drop", "all",
                       "--security-opt", "no-new-privileges")


@pytest.fixture(scope="session")
def image_archive() -> tuple[Path, str]:
    """The archive and its digest, from `make image` (a no-op when warm)."""
    started = time.monotonic()
    subprocess.run(["make", "-s", "image"], cwd=ROOT, check=True, timeout=BUILD_TIMEOUT,
                   stdout=subprocess.DEVNULL)
    print(f"make image: {time.monotonic() - started:.1f} s")
    path = Path(subprocess.run(["bash", "scripts/build-image.sh", "--print-path"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.strip())
    digest = subprocess.run(["bash", "scripts/build-image.sh", "--print-digest"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()
    assert path.is_file(), path
    assert digest.startswith("sha256:") and len(digest) == 71, digest
    return path, digest


class Podman:
    """podman on a store of its own under `base`, removed afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.flags = ("--root", str(base / "root"), "--runroot", str(base / "run"))

    def __call__(self, *args: str, timeout: float = RUN_TIMEOUT,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *self.flags, *args], capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}"
        return done

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self("run", "--rm", "--network", "none", *ULIMITS, *args)


@pytest.fixture
def podman() -> Iterator[Podman]:
    # Not under tmp_path: podman refuses a runroot path longer than 50 characters.
    p = Podman(Path(tempfile.mkdtemp(prefix="vpblu-podman-")))
    try:
        yield p
    finally:
        p("rm", "--all", "--force", check=False)
        p("rmi", "--all", "--force", check=False)
        shutil.rmtree(p.base, ignore_errors=True)


@pytest.mark.timeout(BUILD_TIMEOUT + 600)
def test_podman_loads_the_image_and_both_commands_run_in_it(
        image_archive: tuple[Path, str], podman: Podman) -> None:
    archive, digest = image_archive
    loaded = podman("load", "--input", str(archive), timeout=LOAD_TIMEOUT)
    assert IMAGE in loaded.stdout + loaded.stderr
    assert podman("image", "inspect", "--format", "{{.Digest}}", IMAGE).stdout.strip() == digest

    assert podman.run(IMAGE, "--version").stdout.strip() == f"vpblu {VERSION}"
    daemon_help = podman.run(IMAGE, "daemon", "run", "--help").stdout
    assert daemon_help.startswith("usage: vpblu daemon run")
    assert "--wireguard-backend" in daemon_help

    # The controller as its Deployment runs it: every module of the product
    # (and so every locked dependency it needs) imports, nothing is written.
    imports = podman.run(*CONTROLLER_SECURITY, "--entrypoint", "python3", IMAGE, "-c",
                         "import os, vpblu.cli, vpblu.certs, vpblu.actors.controller, "
                         "vpblu.node.daemon; print(os.getuid())")
    assert imports.stdout.strip() == "65532"
    assert podman.run(*CONTROLLER_SECURITY, IMAGE, "controller", "--help").returncode == 0

    # What the daemon runs, from Debian, inside the image.
    tools = podman.run("--entrypoint", "sh", IMAGE, "-c",
                       "wireguard-go --version && wg --version && iptables --version "
                       "&& ip -V && python3 -c 'import bcc; print(\"bcc\", bcc.__file__)'").stdout
    assert "wireguard-go" in tools
    assert "nf_tables" in tools  # iptables on its nft backend
    assert "bcc /usr/lib/python3/dist-packages/bcc/" in tools


@pytest.mark.timeout(BUILD_TIMEOUT + 600)
def test_containerd_imports_the_image_and_runs_it(
        image_archive: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = image_archive
    base = tmp_path / "containerd"
    base.mkdir()
    sock = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n')
    with (base / "containerd.log").open("wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ctr = ("ctr", "--address", str(sock), "--namespace", "vpblu-test")
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not come up"
            time.sleep(0.2)
        subprocess.run([*ctr, "images", "import", str(archive)], check=True,
                       capture_output=True, timeout=LOAD_TIMEOUT)
        listed = subprocess.run([*ctr, "images", "ls"], check=True, capture_output=True,
                                text=True).stdout
        assert IMAGE in listed and digest in listed, listed
        ran = subprocess.run([*ctr, "run", "--rm", IMAGE, "vpblu-version", "vpblu",
                              "--version"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == f"vpblu {VERSION}"
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)
