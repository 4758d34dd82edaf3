"""The test control plane itself: it works as a cluster does for vpblu (tokens,
restarts) and leaves no process and no directory behind, however it ends."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpblu.lab.testenv import OWNER_FILE, TestEnv, sweep_stale_dirs

pytestmark = pytest.mark.integration

GONE_TIMEOUT = 15.0
UP_READY_TIMEOUT = 90.0
POLL_INTERVAL = 0.05
# PR_SET_PDEATHSIG fires at once when the forking thread exits; this is ample.
THREAD_EXIT_GRACE = 0.5


class Boom(Exception):
    pass


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_gone(pids: list[int] | tuple[int, ...]) -> list[int]:
    deadline = time.monotonic() + GONE_TIMEOUT
    while (alive := [p for p in pids if Path(f"/proc/{p}/cmdline").exists()
                     and Path(f"/proc/{p}/cmdline").read_bytes()]):
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL)
    return alive


def assert_left_nothing(directory: Path, pids: tuple[int, ...]) -> None:
    assert not directory.exists()
    assert not processes_mentioning(str(directory))
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_token_request_and_token_review(kube: TestEnv) -> None:
    """What the daemon's identity check needs, without kube-controller-manager."""
    kube.kubectl("create", "namespace", "token-check")
    try:
        kube.kubectl("create", "serviceaccount", "daemon", "-n", "token-check")
        token = kube.create_token("daemon", "token-check", audiences=["vpblu"])
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": ["vpblu"]}}
        got = kube.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
        assert got.status == 201, got.message
        assert got.body["status"]["authenticated"] is True
        assert got.body["status"]["user"]["username"] == \
            "system:serviceaccount:token-check:daemon"
        wrong = dict(review, spec={"token": token, "audiences": ["someone-else"]})
        refused = kube.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", wrong)
        assert refused.body["status"].get("authenticated") is not True
    finally:
        kube.kubectl("delete", "namespace", "token-check", "--wait=false")


def test_secrets_are_private(kube: TestEnv) -> None:
    for name in ("kubeconfig", "admin.key", "apiserver.key", "sa.key"):
        mode = stat.S_IMODE((kube.dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert "PRIVATE KEY" not in repr(kube.__dict__)


def test_restart_keeps_port_and_data_then_leaves_nothing() -> None:
    with TestEnv.start() as env:
        directory, url, first_pids = env.dir, env.server_url, env.pids
        assert len(first_pids) == 2
        env.kubectl("create", "namespace", "survives-restart")
        old_apiserver = first_pids[1]
        env.stop_apiserver()
        assert not env.apiserver_running
        assert wait_gone([old_apiserver]) == []
        with pytest.raises(ConnectionRefusedError):
            env.request("GET", "/readyz")
        # Started from a thread that is gone right after (as from
        # trio.to_thread): the API server must outlive that thread.
        starter = threading.Thread(target=env.start_apiserver)
        starter.start()
        starter.join()
        time.sleep(THREAD_EXIT_GRACE)
        assert env.apiserver_running
        assert env.request("GET", "/readyz").status == 200
        assert env.server_url == url
        assert env.pids[0] == first_pids[0]  # etcd kept running
        out = json.loads(env.kubectl("get", "namespace", "survives-restart", "-o", "json").stdout)
        assert out["metadata"]["name"] == "survives-restart"
        pids = env.pids
    assert_left_nothing(directory, pids)


def test_with_block_raising_still_cleans_up() -> None:
    with pytest.raises(Boom), TestEnv.start() as env:
        directory, pids = env.dir, env.pids
        assert processes_mentioning(str(directory))
        raise Boom
    assert_left_nothing(directory, pids)


@contextlib.contextmanager
def up_command() -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`python -m vpblu.lab.testenv up` as a user runs it; killed if still running at the end."""
    with subprocess.Popen(
        [sys.executable, "-m", "vpblu.lab.testenv", "up"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], UP_READY_TIMEOUT)
            assert ready, f"`up` printed nothing in {UP_READY_TIMEOUT} s"
            kubeconfig = Path(proc.stdout.readline().strip())
            assert proc.stdout.readline().strip() == f"export KUBECONFIG={kubeconfig}"
            yield proc, kubeconfig
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_up_command_serves_until_ctrl_c_then_leaves_nothing() -> None:
    with up_command() as (proc, kubeconfig):
        directory = kubeconfig.parent
        children = processes_mentioning(str(directory))
        assert len(children) == 2
        listed = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "ns", "-o",
                                 "name"], capture_output=True, text=True, check=True)
        assert "namespace/default" in listed.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(GONE_TIMEOUT) == 0
    assert_left_nothing(directory, tuple(children))


def test_killed_parent_takes_its_children_along() -> None:
    children: list[int] = []
    try:
        with up_command() as (proc, kubeconfig):
            directory = kubeconfig.parent
            children = processes_mentioning(str(directory))
            assert len(children) == 2
            assert (directory / OWNER_FILE).read_text() == str(proc.pid)
            proc.kill()  # no cleanup code runs: the kernel's PR_SET_PDEATHSIG must do it
            proc.wait()
        assert wait_gone(children) == []
        # The next TestEnv.start sweeps the directory of a dead owner. (Another
        # suite's TestEnv on this machine may sweep it first: either is fine.)
        sweep_stale_dirs()
        assert not directory.exists()
    finally:
        for pid in wait_gone(children):
            os.kill(pid, signal.SIGKILL)
