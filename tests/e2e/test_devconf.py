"""The mesh interface's rp_filter is set over rtnetlink, so a daemon that is
not privileged (read-only /proc/sys, CAP_NET_ADMIN only) can set it.

Real network namespaces and a real veth; the read-only /proc/sys is a
bind mount in a mount namespace of the child's own, as a container's is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpblu.node.kernel.iproute import IPRouteKernel

CHILD_TIMEOUT = 60.0


@pytest.fixture
def netns(veth_netns: str) -> str:
    return veth_netns


def _sysctl(netns: str, key: str, value: str | None = None) -> str:
    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", "sysctl", "-n"]
    if value is not None:
        argv = [*argv[:-1], "-qw", f"{key}={value}"]
    else:
        argv.append(key)
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize(("all_value", "expected"), [("0", "0"), ("1", "2"), ("2", "2")])
async def test_relax_rp_filter_sets_the_interface_over_netlink(
        netns: str, all_value: str, expected: str) -> None:
    _sysctl(netns, "net.ipv4.conf.all.rp_filter", all_value)
    _sysctl(netns, "net.ipv4.conf.m0.rp_filter", "1")
    kernel = IPRouteKernel(netns=netns)
    await kernel.relax_rp_filter("m0")
    assert _sysctl(netns, "net.ipv4.conf.m0.rp_filter") == expected
    assert kernel.statistics().writes == 1
    # Already right: read, not written again.
    await kernel.relax_rp_filter("m0")
    assert kernel.statistics().writes == 1


CHILD = """
import sys, trio
from vpblu.node.kernel.iproute import IPRouteKernel
try:
    open("/proc/sys/net/ipv4/conf/m0/rp_filter", "w").write("2")
except OSError as exc:
    print("proc-write", exc.errno)
trio.run(IPRouteKernel().relax_rp_filter, "m0")
print("relaxed")
"""


def test_relax_rp_filter_works_with_a_read_only_proc_sys_and_only_net_admin(
        netns: str) -> None:
    """What a container with capabilities [NET_ADMIN] and no privilege sees."""
    _sysctl(netns, "net.ipv4.conf.all.rp_filter", "1")
    _sysctl(netns, "net.ipv4.conf.m0.rp_filter", "1")
    repo = Path(__file__).resolve().parents[2]
    script = ("mount --bind -o ro /proc/sys /proc/sys && "
              "mount -o remount,bind,ro /proc/sys && "
              "exec setpriv --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin "
              "--bounding-set=-all,+net_admin --reuid=65534 --regid=65534 --clear-groups "
              f"-- {sys.executable} -c \"$0\"")
    result = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "--", "unshare", "--mount",
         "--propagation", "private", "sh", "-c", script, CHILD],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr
    # The write the daemon used to make is refused there (EROFS, 30).
    assert "proc-write 30" in result.stdout, result.stdout
    assert "relaxed" in result.stdout
    assert _sysctl(netns, "net.ipv4.conf.m0.rp_filter") == "2"
