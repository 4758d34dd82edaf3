"""LocalCluster takes away everything it made: on a normal exit, on an error, and
after its owner was SIGKILLed (the next start sweeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vpblu.lab.localcluster import (
    BPF_ROOT,
    DIR_PREFIX,
    PREFIX,
    ClusterSettings,
    LocalCluster,
    sweep_stale,
)

REPO = Path(__file__).resolve().parents[2]


def leftovers(tag: str) -> list[str]:
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}-{tag}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
              if f"{PREFIX}{tag}" in line]
    procs = subprocess.run(["pgrep", "-af", f"wireguard-go {PREFIX}{tag}"],
                           capture_output=True, text=True).stdout
    found += [f"process {p}" for p in procs.splitlines()]
    found += [f"process {p}" for p in cluster_processes(tag)]
    if (BPF_ROOT / f"{PREFIX}{tag}").exists():
        found.append(f"pins {BPF_ROOT / f'{PREFIX}{tag}'}")
    found += [f"dir {d}" for d in Path("/tmp").glob(f"{DIR_PREFIX}{tag}-*")]
    return found


def cluster_processes(tag: str) -> list[str]:
    """Live processes the cluster spawned (controllers, daemons, kube-proxy, the
    API forwarder): every one runs in the cluster's directory."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # gone, or a zombie
        if cwd.startswith(f"/tmp/{DIR_PREFIX}{tag}-"):
            found.append(f"{entry} {argv.decode(errors='replace').strip()}")
    return found


def test_an_error_in_the_block_still_removes_everything() -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            LocalCluster.start(ClusterSettings(nodes=2)) as cluster:
        tag = cluster.tag
        cluster.wait_for(lambda: all(cluster.wg_device(n) for n in cluster.nodes), 60,
                         "both WireGuard devices up")
        assert leftovers(tag)
        assert [p for p in cluster_processes(tag) if "kube-proxy" in p], \
            cluster_processes(tag)
        raise RuntimeError("boom")
    assert leftovers(tag) == []


def test_a_killed_owner_is_swept_by_the_next_start() -> None:
    script = textwrap.dedent("""
        import sys, time
        from vpblu.lab.localcluster import ClusterSettings, LocalCluster
        with LocalCluster.start(ClusterSettings(nodes=1, daemons=False)) as c:
            print(c.tag, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        tag = proc.stdout.readline().strip()
        assert tag and leftovers(tag)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert tag in sweep_stale()
    assert leftovers(tag) == []
