"""Key rotations that run at once, end to end (issue 24, maxConcurrent).

The module's `LocalCluster` (three nodes, FullMesh, two controller replicas, real
daemons with wireguard-go). Every node is asked to rotate at the same moment (one
`kubectl annotate` of all three VpbluNodes); with the RotationPolicy's default
maxConcurrent they form one batch, each in its own slot (bridge `wg-mesh-rot`,
`wg-mesh-rot2`, `wg-mesh-rot3` on listenPort + 1, + 2, + 3) and every pair of
rotating nodes peers with each other, which is the case the batch's barriers and
the Swap step exist for. All the while every pod pair exchanges sequence-numbered
UDP both ways at 200 pkt/s and one TCP stream runs (tests/e2e/flowprobe.py): one
lost datagram fails the test.
"""

from __future__ import annotations

import time

from tests.e2e.procs import Reaper
from tests.e2e.test_rotation_e2e import (
    AFTER_ROTATION,
    PHASE_POLL,
    ROTATION_TIMEOUT,
    SETTLE_DWELL,
    AllTraffic,
    _status,
    assert_keys_everywhere,
    healthy,
    state_files,
)
from vpblu.core.model import DEFAULT_MAX_CONCURRENT
from vpblu.core.sources import ROTATE_NOW_ANNOTATION
from vpblu.lab.localcluster import LocalCluster

__all__ = ["healthy"]  # the fixture, shared with test_rotation_e2e


def test_every_node_rotates_at_once_under_traffic_on_every_pair_without_loss(
        healthy: LocalCluster, reaper: Reaper) -> None:
    cluster = healthy
    assert len(cluster.nodes) <= DEFAULT_MAX_CONCURRENT
    before = cluster.public_keys()
    trigger = f"e2e-together-{time.time_ns()}"
    # Which nodes had a rotation in flight at each poll, and in which slot.
    seen: list[dict[str, int]] = []
    # Each node's (wall time, phase/step) whenever it changed: what a loss is read against.
    timeline: dict[str, list[tuple[float, str]]] = {n.name: [] for n in cluster.nodes}
    outcomes: dict[str, dict[str, object]] = {}
    with AllTraffic(reaper, cluster) as traffic:
        began = time.monotonic()
        cluster.kubectl("annotate", "--overwrite", "vpblunode",
                        *(n.name for n in cluster.nodes), f"{ROTATE_NOW_ANNOTATION}={trigger}")
        deadline = began + ROTATION_TIMEOUT
        while len(outcomes) < len(cluster.nodes):
            assert time.monotonic() < deadline, (
                f"not every rotation ended in {ROTATION_TIMEOUT:.0f}s: {outcomes}\n"
                f"{cluster.diagnostics()}")
            running: dict[str, int] = {}
            for node in cluster.nodes:
                status = _status(cluster, node)
                if record := status.get("rotation"):
                    running[node.name] = int(record.get("slot") or 1)
                said = f"{record['phase']}/{record['step']}" if record else "-"
                if not timeline[node.name] or timeline[node.name][-1][1] != said:
                    timeline[node.name].append((round(time.time(), 2), said))
                last = status.get("lastRotation") or {}
                if last.get("trigger") == trigger and not record:
                    outcomes[node.name] = dict(last)
            if running:
                seen.append(running)
            time.sleep(PHASE_POLL)
        took = round(time.monotonic() - began, 2)
        time.sleep(SETTLE_DWELL)
    most = max(seen, key=len)
    print(f"all {len(cluster.nodes)} rotated in {took}s; most at once: {most}; "
          f"losses: {traffic.losses()}; timeline: {timeline}")
    assert {n: o["outcome"] for n, o in outcomes.items()} == {
        n.name: "Completed" for n in cluster.nodes}, outcomes
    # They ran together, each in a slot of its own.
    assert len(most) == len(cluster.nodes), seen
    for running in seen:
        assert len(set(running.values())) == len(running), running
    traffic.assert_lossless()
    after = cluster.public_keys()
    for node in cluster.nodes:
        assert after[node.name] != before[node.name], node.name
        assert state_files(node) == AFTER_ROTATION, (node.name, state_files(node))
    assert_keys_everywhere(cluster, before)
    # No bridge of any slot is left on any node.
    for node in cluster.nodes:
        links = cluster.exec_in(node.netns, "ip", "-o", "link", "show").stdout
        assert f"{node.interface}-rot" not in links, (node.name, links)
    assert cluster.mesh_complete()
