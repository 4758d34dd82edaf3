"""The mesh end to end: real wireguard-go, real namespaces, real packets."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.conftest import Daemon, desired_state, remote_cidrs, start_daemon
from tests.e2e.netns import Lab, Node, Pod, in_ns, wireguard_go_pids
from vpblu.node import netlink
from vpblu.node.config import MESH_FWMARK, MESH_FWMARK_MASK, MESH_TABLE

pytestmark = pytest.mark.e2e

UNDERLAY_MTU = 1400
MESH_MTU = UNDERLAY_MTU - 80
PING_INTERVAL = "0.02"
PING_COUNT = "150"  # ≈ 3-5 s at the kernel's 250 Hz tick
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def build(lab: Lab, nodes: int) -> list[Node]:
    out = []
    for i in range(1, nodes + 1):
        node = lab.add_node(i, f"10.78.{i}.0/24", mtu=UNDERLAY_MTU)
        lab.add_pod(node, 1)
        out.append(node)
    for node in out:
        lab.mark_pod_traffic(
            node, node.pods[0], remote_cidrs(node, lab), MESH_FWMARK, MESH_FWMARK_MASK
        )
    return out


async def converge(daemons: list[Daemon]) -> None:
    for d in daemons:
        await d.apply_ok(desired_state(d.node, daemons))


def ping(
    src: Pod, dst: Pod, *, count: str = "3", extra: tuple[str, ...] = ()
) -> tuple[int, int, str]:
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            src.netns,
            "ping",
            "-n",
            "-q",
            "-c",
            count,
            "-W",
            "2",
            *extra,
            str(dst.ip),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    out = result.stdout + result.stderr
    m = PING_SUMMARY.search(out)
    assert m, out
    return int(m[1]), int(m[2]), out


async def continuous_ping(src: Pod, dst: Pod) -> tuple[int, int, str]:
    return await trio.to_thread.run_sync(
        lambda: ping(src, dst, count=PING_COUNT, extra=("-i", PING_INTERVAL))
    )


async def test_pod_to_pod_is_encrypted_on_the_underlay_and_cleanup_restores(
    lab: Lab, state_root: Path
) -> None:
    nodes = build(lab, 2)
    before = [n.snapshot() for n in nodes]
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        try:
            await converge(daemons)
            capture = state_root / "capture.txt"
            tcpdump = await trio.lowlevel.open_process(
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.underlay,
                    "tcpdump",
                    "-i",
                    "br0",
                    "-n",
                    "-l",
                    "-U",
                    "ip and not igmp",
                ],
                stdout=os.open(capture, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                stderr=subprocess.PIPE,
            )
            try:
                assert tcpdump.stderr is not None
                seen = b""
                with trio.fail_after(5):
                    while b"listening on" not in seen:
                        seen += await tcpdump.stderr.receive_some()
                sent, received, out = ping(nodes[0].pods[0], nodes[1].pods[0], count="5")
                assert (sent, received) == (5, 5), out
                await trio.sleep(0.3)
            finally:
                tcpdump.terminate()
                await tcpdump.wait()
            # IGMP reports from the fresh bridge are the only other IPv4 frames.
            text = await trio.Path(capture).read_text()
            await trio.Path(capture).unlink()
            lines = [line for line in text.splitlines() if line.strip()]
            a, b = (str(n.underlay_ip) for n in nodes)
            wg = re.compile(rf"IP ({a}|{b})\.51820 > ({a}|{b})\.51820: UDP")
            assert len(lines) >= 10, lines  # 5 requests + 5 replies at least
            assert [line for line in lines if not wg.search(line)] == []
            pod_ips = [str(n.pods[0].ip) for n in nodes]
            assert not any(ip in line for line in lines for ip in pod_ips)
        finally:
            for d in daemons:
                await d.cleanup()
    for node, snap in zip(nodes, before, strict=True):
        after = node.snapshot()
        for key in snap:
            assert after[key].splitlines() == snap[key].splitlines(), key
        assert not wireguard_go_pids(node.wg_interface)


async def test_reapplying_the_same_state_writes_nothing(lab: Lab, state_root: Path) -> None:
    nodes = build(lab, 2)
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        try:
            await converge(daemons)
            counts = [
                (d.backend.statistics().writes, d.kernel.statistics().writes) for d in daemons
            ]
            for d in daemons:
                applied = await d.apply_ok(desired_state(d.node, daemons))
                assert not applied.changed_anything
            assert counts == [
                (d.backend.statistics().writes, d.kernel.statistics().writes) for d in daemons
            ]
            assert ping(nodes[0].pods[0], nodes[1].pods[0])[:2] == (3, 3)
        finally:
            for d in daemons:
                await d.cleanup()


async def test_a_delta_takes_what_the_last_apply_left_and_a_whole_state_reads_it(
        lab: Lab, state_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Delta's apply (`whole=False`) reads no route, rule or address: it
    takes what the last apply left, so a peer joining costs its route's write,
    not five dumps. A whole SyncState's apply reads them all and puts back
    what someone removed; so does a Delta's once KNOWN_FOR has passed."""
    nodes = build(lab, 3)
    table = str(MESH_TABLE)
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        try:
            await converge(daemons[:2])
            d0 = daemons[0]
            reads: list[str] = []
            for name in ("table_routes", "fallback_routes", "rules", "addresses"):
                monkeypatch.setattr(d0.kernel, name, _counted(reads, name,
                                                              getattr(d0.kernel, name)))
            everyone = desired_state(d0.node, daemons)

            applied = await d0.apply_ok(everyone, whole=False)
            assert applied.routes_added == (nodes[2].pod_cidr,) and not reads
            assert str(nodes[2].pod_cidr) in in_ns(nodes[0].netns, "ip", "route", "show",
                                                   "table", table)

            in_ns(nodes[0].netns, "ip", "route", "del", str(nodes[1].pod_cidr), "table", table)
            applied = await d0.apply_ok(everyone, whole=False)
            assert not applied.changed_anything and not reads  # taken as there
            applied = await d0.apply_ok(everyone)
            assert applied.routes_added == (nodes[1].pod_cidr,)
            assert sorted(reads) == ["addresses", "fallback_routes", "rules", "table_routes"]

            reads.clear()
            monkeypatch.setattr(netlink, "KNOWN_FOR", 0.0)
            in_ns(nodes[0].netns, "ip", "route", "del", str(nodes[1].pod_cidr), "table", table)
            applied = await d0.apply_ok(everyone, whole=False)
            assert applied.routes_added == (nodes[1].pod_cidr,) and len(reads) == 4
            assert ping(nodes[0].pods[0], nodes[1].pods[0])[:2] == (3, 3)
        finally:
            for d in daemons:
                await d.cleanup()


def _counted(reads: list[str], name: str, read: Any) -> Any:
    async def counted(*args: Any) -> Any:
        reads.append(name)
        return await read(*args)

    return counted


async def test_adding_a_peer_loses_no_packet_to_another(lab: Lab, state_root: Path) -> None:
    nodes = build(lab, 3)
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        try:
            await converge(daemons[:2])
            result: list[tuple[int, int, str]] = []

            async def pinger() -> None:
                result.append(await continuous_ping(nodes[0].pods[0], nodes[1].pods[0]))

            async with trio.open_nursery() as inner:
                inner.start_soon(pinger)
                await trio.sleep(1)
                for d in daemons:
                    applied = await d.apply_ok(desired_state(d.node, daemons))
                    assert not applied.peers_removed and not applied.peers_changed
                    assert len(applied.peers_added) == (2 if d is daemons[2] else 1)
            sent, received, out = result[0]
            assert sent == int(PING_COUNT) and received == sent, out
            assert ping(nodes[0].pods[0], nodes[2].pods[0])[:2] == (3, 3)
        finally:
            for d in daemons:
                await d.cleanup()


async def test_daemon_restart_adopts_the_interface_without_a_write(
    lab: Lab, state_root: Path
) -> None:
    nodes = build(lab, 2)
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        cleanups = list(daemons)
        try:
            await converge(daemons)
            wg_pids = wireguard_go_pids(nodes[0].wg_interface)
            assert len(wg_pids) == 1
            # wireguard-go is not tied to us: another session, not our child.
            assert os.getsid(wg_pids[0]) != os.getsid(0)
            assert os.getppid() != wg_pids[0] and _ppid(wg_pids[0]) != os.getpid()
            result: list[tuple[int, int, str]] = []

            async def pinger() -> None:
                result.append(await continuous_ping(nodes[0].pods[0], nodes[1].pods[0]))

            async with trio.open_nursery() as inner:
                inner.start_soon(pinger)
                await trio.sleep(1)
                daemons[0].crash()
                await trio.sleep(0.5)
                again = await start_daemon(nursery, nodes[0], state_root)
                cleanups[0] = again
                assert again.keys.public_key == daemons[0].keys.public_key
                applied = await again.apply_ok(desired_state(nodes[0], daemons))
                assert not applied.changed_anything
                assert again.backend.statistics().writes == 0
                assert again.kernel.statistics().writes == 0
            sent, received, out = result[0]
            assert sent == int(PING_COUNT) and received == sent, out
            assert wireguard_go_pids(nodes[0].wg_interface) == wg_pids
        finally:
            for d in cleanups:
                await d.cleanup()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


async def test_large_packets_mss_clamp_and_local_emsgsize(lab: Lab, state_root: Path) -> None:
    nodes = build(lab, 2)
    src, dst = nodes[0].pods[0], nodes[1].pods[0]
    async with trio.open_nursery() as nursery:
        daemons = [await start_daemon(nursery, n, state_root) for n in nodes]
        try:
            await converge(daemons)
            mtu = in_ns(nodes[0].netns, "cat", f"/sys/class/net/{nodes[0].wg_interface}/mtu")
            assert int(mtu) == MESH_MTU
            server = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", dst.netns, "iperf3", "-s", "-1", "-B", str(dst.ip)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await trio.sleep(0.5)
                client = await trio.run_process(
                    [
                        "ip",
                        "netns",
                        "exec",
                        src.netns,
                        "iperf3",
                        "-c",
                        str(dst.ip),
                        "-n",
                        "8M",
                        "-J",
                    ],
                    capture_stdout=True,
                    check=False,
                )
                assert client.returncode == 0, client.stdout[-2000:]
                assert (
                    b'"bytes":\t8388608' in client.stdout
                    or b'"bytes": 8388608' in client.stdout
                    or b"8388608" in client.stdout
                )
            finally:
                with trio.move_on_after(5):
                    await server.wait()
                if server.returncode is None:
                    server.kill()
                    await server.wait()
            counters = in_ns(
                nodes[0].netns, "iptables", "-t", "mangle", "-L", "FORWARD", "-v", "-x", "-n"
            )
            clamped = [line for line in counters.splitlines() if "TCPMSS" in line]
            assert len(clamped) == 2 and all(f"set {MESH_MTU - 40}" in c for c in clamped)
            assert sum(int(line.split()[0]) for line in clamped) >= 2, counters
            # From the node itself, a marked DF packet larger than the mesh MTU
            # fails at once with EMSGSIZE instead of vanishing.
            # Blocking on purpose: a short command, nothing else waits on this loop.
            local = subprocess.run(  # noqa: ASYNC221
                [
                    "ip",
                    "netns",
                    "exec",
                    nodes[0].netns,
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-M",
                    "do",
                    "-m",
                    str(MESH_FWMARK),
                    "-s",
                    str(MESH_MTU),
                    str(dst.ip),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            out = local.stdout + local.stderr
            assert local.returncode != 0 and "message too long" in out.lower(), out
            # From a pod (veth MTU 1500) the node answers "fragmentation needed".
            frag = subprocess.run(  # noqa: ASYNC221
                [
                    "ip",
                    "netns",
                    "exec",
                    src.netns,
                    "ping",
                    "-n",
                    "-c",
                    "2",
                    "-W",
                    "2",
                    "-M",
                    "do",
                    "-s",
                    str(MESH_MTU),
                    str(dst.ip),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            out = (frag.stdout + frag.stderr).replace("mtu=", "mtu = ")
            assert frag.returncode != 0 and f"mtu = {MESH_MTU}" in out, out
        finally:
            for d in daemons:
                await d.cleanup()
