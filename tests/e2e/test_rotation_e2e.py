"""Key rotation end to end, on the real stack (issue 7's acceptance).

One `LocalCluster` for the module (three nodes, FullMesh, two controller
replicas, real daemons with wireguard-go). Rotations are requested the way an
operator does it: a new value of the VpbluNode annotation `vpblu.io/rotate-now`;
the test then watches the node's status (status.rotation while it runs,
status.lastRotation once it ended). All the while every pod pair exchanges
sequence-numbered UDP both ways at 200 pkt/s and one TCP stream runs, so a
single lost packet fails the test (tests/e2e/flowprobe.py). The probes are
started through the `reaper` fixture, so none outlives its test; the traffic is
flowing before the test acts, and the sleeps left are dwells (traffic keeps
flowing for a while after a step), not guesses of how long something takes.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import pytest

from tests.e2e.conftest import CLUSTER_CONVERGE_TIMEOUT, restore_cluster
from tests.e2e.flowprobe import READY, RECEIVING
from tests.e2e.procs import STDERR, Helper, Reaper, raise_if_killed, reap, reaped, stop
from tests.e2e.test_acceptance import (
    FLOW_READY_TIMEOUT,
    FLOW_STOP_TIMEOUT,
    UdpFlow,
    probe_argv,
)
from vpblu.core.sources import ROTATE_NOW_ANNOTATION
from vpblu.lab.localcluster import LocalCluster, Node, Pod, nsenter
from vpblu.node.config import MESH_TABLE
from vpblu.node.rotation import DEFAULT_BRIDGE_SUFFIX
from vpblu.node.stepguard import STAMP_FILE_NAME

CONVERGE_TIMEOUT = CLUSTER_CONVERGE_TIMEOUT
# A rotation's steps each wait for prewarm handshakes and drains; on 2 shared
# cores with six probes running one takes well under this.
ROTATION_TIMEOUT = 120.0
PHASE_POLL = 0.05
TCP_RATE_KIB = 256
TCP_PORT = 5301
UDP_BASE_PORT = 6101
KEY_FILE_NAME = "wireguard.key"
# What a node's state directory holds once a rotation ended: its key and the
# highest rotation step stamp it accepted (vpblu/node/stepguard.py).
AFTER_ROTATION = sorted([KEY_FILE_NAME, STAMP_FILE_NAME])
# Dwells: traffic keeps flowing this long after the last step, so a loss the step
# caused late still shows; and a dead daemon stays dead this long (the rotation must
# not move on without it).
SETTLE_DWELL = 1.0
DAEMON_DOWN_DWELL = 1.0


@pytest.fixture
def healthy(cluster: LocalCluster) -> Iterator[LocalCluster]:
    _restore(cluster)
    yield cluster
    _restore(cluster)


def _restore(cluster: LocalCluster) -> None:
    restore_cluster(cluster)
    cluster.wait_for(lambda: not any(_status(cluster, n).get("rotation")
                                     for n in cluster.nodes),
                     ROTATION_TIMEOUT, "no rotation in progress")


class TcpStream:
    """One checked TCP byte stream from pod `a` to pod `b` for the with-block: bytes
    arriving when the block starts, both probes reaped when it ends."""

    def __init__(self, reaper: Reaper, a: Pod, b: Pod) -> None:
        self.reaper, self.a, self.b = reaper, a, b
        self.probes: list[Helper] = []
        self.sent: dict[str, Any] = {}
        self.got: dict[str, Any] = {}

    def __enter__(self) -> TcpStream:
        server = self.reaper.start("tcp server", probe_argv(
            self.b, "tcp-server", "--port", str(TCP_PORT), "--grace", "3"))
        self.probes.append(server)
        try:
            server.wait_for_line(READY, FLOW_READY_TIMEOUT,
                                 f"the TCP server in {self.b.name} listening")
            client = self.reaper.start("tcp client", probe_argv(
                self.a, "tcp-client", "--peer", str(self.b.ip), "--port", str(TCP_PORT),
                "--rate", str(TCP_RATE_KIB)))
            self.probes.insert(0, client)
            server.wait_for_line(RECEIVING, FLOW_READY_TIMEOUT,
                                 f"the TCP stream {self.a.name}->{self.b.name} flowing")
        except BaseException as exc:
            stop(self.probes, FLOW_STOP_TIMEOUT, failing=exc)
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # The client first: the server then reads the stream to its end before it stops.
        client, server = self.probes
        killed = reap([client], FLOW_STOP_TIMEOUT)
        killed += reap([server], FLOW_STOP_TIMEOUT)
        self.sent = client.last_json() if client.last_line().startswith("{") else {}
        self.got = server.last_json() if server.last_line().startswith("{") else {}
        raise_if_killed(killed, FLOW_STOP_TIMEOUT, exc)

    def assert_unbroken(self) -> None:
        sent, got = self.sent, self.got
        assert sent.get("error") == "" and got.get("error") == "", (sent, got)
        assert got["bytes"] == sent["bytes"] > 0, (sent, got)


class AllTraffic:
    """UDP both ways on every pod pair plus one TCP stream, for the with-block."""

    def __init__(self, reaper: Reaper, cluster: LocalCluster) -> None:
        pods = [node.pods[0] for node in cluster.nodes]
        self.udp = [UdpFlow(reaper, a, b, UDP_BASE_PORT + i)
                    for i, (a, b) in enumerate(itertools.combinations(pods, 2))]
        self.tcp = TcpStream(reaper, pods[0], pods[-1])
        self._cluster = cluster
        self._stack = ExitStack()

    def __enter__(self) -> AllTraffic:
        with ExitStack() as stack:
            for flow in self.udp:
                stack.enter_context(flow)
            stack.enter_context(self.tcp)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # The exception on its way out reaches each flow, which then only notes a kill.
        self._stack.__exit__(exc_type, exc, tb)

    def losses(self) -> dict[str, object]:
        lost: dict[str, object] = {
            f"{f.a.name}<->{f.b.name} at {pod.name}": f.received_by(pod)["missing_count"]
            for f in self.udp for pod in (f.a, f.b)}
        lost["tcp bytes, longest stall s"] = (self.tcp.got.get("bytes"),
                                              self.tcp.got.get("longest_stall"))
        return lost

    def assert_lossless(self) -> None:
        try:
            for flow in self.udp:
                flow.assert_lossless()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.loss_report()}") from exc
        self.tcp.assert_unbroken()

    def loss_report(self) -> str:
        """When each missing datagram left (wall clock), every node's WireGuard
        handshakes, and the daemon log lines within 2 s of a loss: what a loss is
        read against (issue 15: one datagram lost at flow start, not explained)."""
        lines = []
        lost_at: list[float] = []
        for flow in self.udp:
            for pod in (flow.a, flow.b):
                r = flow.results.get(pod.name) or {}
                start, rate = r.get("first_send_wall"), r.get("rate")
                if not r.get("missing") or not start or not rate:
                    continue
                # `pod` received: the datagrams were sent by the other end at its times.
                sender = flow.results.get((flow.b if pod is flow.a else flow.a).name) or {}
                base = float(sender.get("first_send_wall") or start)
                when = [base + seq / float(rate) for seq in r["missing"][:20]]
                lost_at += when
                lines.append(f"{pod.name} missed seq {r['missing'][:20]} sent at "
                             f"{[_clock(t) for t in when]}")
        for node in self._cluster.nodes:
            device = self._cluster.wg_device(node)
            shakes = {p.public_key[:8]: _clock(p.latest_handshake)
                      for p in (device.peers if device is not None else ())}
            lines.append(f"{node.name} {node.interface} latest handshakes: {shakes}")
            near = [line for line in self._cluster.daemon_log(node).splitlines()
                    if any(abs(_log_time(line) - t) <= 2.0 for t in lost_at)]
            lines.append(f"{node.name} log within 2 s of a loss:\n  " + "\n  ".join(near[-30:]))
        return "\n".join(lines)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f"{wall % 1:.3f}"[1:] if wall else "-"


def _log_time(line: str) -> float:
    """The wall time of a daemon log line ('2026-11-27 21:39:09,314 INFO ...', in
    local time as logging writes it), or -inf."""
    try:
        stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(stamp) + int(line[20:23]) / 1000
    except ValueError:
        return -math.inf


def _status(cluster: LocalCluster, node: Node) -> dict[str, Any]:
    answer = cluster.env.request(
        "GET", f"/apis/vpblu.io/v1alpha1/vpblunodes/{node.name}")
    assert answer.status == 200, answer
    assert isinstance(answer.body, dict)
    return dict(answer.body.get("status") or {})


def request_rotation(cluster: LocalCluster, node: Node, trigger: str) -> None:
    cluster.kubectl("annotate", "--overwrite", "vpblunode", node.name,
                    f"{ROTATE_NOW_ANNOTATION}={trigger}")


def wait_for_phase(cluster: LocalCluster, node: Node, phase: str) -> dict[str, Any]:
    """status.rotation once it reaches `phase` (polled fast: a phase lasts seconds)."""
    deadline = time.monotonic() + ROTATION_TIMEOUT
    while time.monotonic() < deadline:
        record = _status(cluster, node).get("rotation")
        if record and record.get("phase") == phase:
            return dict(record)
        time.sleep(PHASE_POLL)
    raise AssertionError(f"{node.name} never reached {phase}: {_status(cluster, node)}\n"
                         f"{cluster.diagnostics()}")


def wait_for_outcome(cluster: LocalCluster, node: Node, trigger: str) -> dict[str, Any]:
    """status.lastRotation of the rotation `trigger` started, once it ended."""
    found: dict[str, Any] = {}

    def ended() -> bool:
        status = _status(cluster, node)
        last = status.get("lastRotation") or {}
        if last.get("trigger") == trigger and not status.get("rotation"):
            found.update(last)
            return True
        return False

    cluster.wait_for(ended, ROTATION_TIMEOUT, f"{node.name}'s rotation {trigger} ended")
    return found


def state_files(node: Node) -> list[str]:
    return sorted(p.name for p in node.state_dir.iterdir())


def assert_keys_everywhere(cluster: LocalCluster, old: dict[str, str]) -> None:
    """Every device and every peer entry carries the published keys; none of `old`."""
    keys = cluster.public_keys()
    stale = set(old.values()) - set(keys.values())
    for node in cluster.nodes:
        device = cluster.wg_device(node)
        assert device is not None
        assert device.public_key == keys[node.name], node.name
        peer_keys = {p.public_key for p in device.peers}
        assert peer_keys == {k for n, k in keys.items() if n != node.name}, node.name
        assert not peer_keys & stale, (node.name, peer_keys & stale)


# --- every node rotates under traffic ---------------------------------------------------


def test_every_node_rotates_on_demand_under_traffic_without_losing_a_packet(
        healthy: LocalCluster, reaper: Reaper) -> None:
    cluster = healthy
    before = cluster.public_keys()
    durations: dict[str, float] = {}
    with AllTraffic(reaper, cluster) as traffic:
        for node in cluster.nodes:
            trigger = f"e2e-all-{node.name}-{time.time_ns()}"
            began = time.monotonic()
            request_rotation(cluster, node, trigger)
            last = wait_for_outcome(cluster, node, trigger)
            durations[node.name] = round(time.monotonic() - began, 2)
            assert last["outcome"] == "Completed", last
        time.sleep(SETTLE_DWELL)
    print("rotation seconds:", durations, "losses:", traffic.losses())
    traffic.assert_lossless()
    after = cluster.public_keys()
    for node in cluster.nodes:
        assert after[node.name] != before[node.name], node.name
        assert state_files(node) == AFTER_ROTATION, (node.name, state_files(node))
    assert_keys_everywhere(cluster, before)
    assert cluster.mesh_complete()


# --- fault injection ---------------------------------------------------------------------


def test_daemon_killed_during_distribute_rolls_back_or_completes_without_loss(
        healthy: LocalCluster, reaper: Reaper) -> None:
    cluster = healthy
    node = cluster.nodes[1]
    before = cluster.public_keys()
    trigger = f"e2e-kill-daemon-{time.time_ns()}"
    with AllTraffic(reaper, cluster) as traffic:
        request_rotation(cluster, node, trigger)
        wait_for_phase(cluster, node, "Distribute")
        cluster.kill_daemon(node)
        time.sleep(DAEMON_DOWN_DWELL)
        # Activate needs the dead daemon: the rotation is still half-way.
        at_restart = _status(cluster, node).get("rotation") or {}
        assert at_restart.get("phase") in ("Distribute", "Activate"), at_restart
        cluster.start_daemon(node)
        last = wait_for_outcome(cluster, node, trigger)
        cluster.wait_for(cluster.mesh_complete, CONVERGE_TIMEOUT, "the mesh whole")
        time.sleep(SETTLE_DWELL)
    print("phase at restart:", at_restart.get("phase"), "outcome:", last,
          "losses:", traffic.losses())
    traffic.assert_lossless()
    assert last["outcome"] in ("Completed", "RolledBack"), last
    after = cluster.public_keys()
    if last["outcome"] == "RolledBack":
        assert after[node.name] == before[node.name]
    else:
        assert after[node.name] != before[node.name]
    assert state_files(node) == AFTER_ROTATION, state_files(node)
    assert_keys_everywhere(cluster, before)


# What a new leader does with the record the dead one left (vpblu/actors/rotation.py):
# Prepare and Distribute roll back, Activate and Retire carry on.
OUTCOME_AFTER_FAILOVER = {"Distribute": "RolledBack", "Activate": "Completed",
                          "Retire": "Completed"}
NEXT_PHASE = {"Distribute": "Activate", "Activate": "Retire"}


@pytest.mark.parametrize("kill_at", ["Activate", "Distribute"])
def test_leader_killed_mid_rotation_new_leader_resumes_or_rolls_back_without_loss(
        healthy: LocalCluster, reaper: Reaper, kill_at: str) -> None:
    cluster = healthy
    node = cluster.nodes[2] if kill_at == "Activate" else cluster.nodes[0]
    before = cluster.public_keys()
    trigger = f"e2e-kill-leader-{kill_at}-{time.time_ns()}"
    with AllTraffic(reaper, cluster) as traffic:
        leader = cluster.leading_controller()
        assert leader is not None
        request_rotation(cluster, node, trigger)
        record = wait_for_phase(cluster, node, kill_at)
        cluster.kill_controller(leader.index)
        # What the dead leader left: `kill_at`, or the next phase if the
        # answers came back before the kill landed.
        left = _status(cluster, node).get("rotation") or {}
        assert left.get("rotationId") == record["rotationId"], left
        assert left.get("phase") in (kill_at, NEXT_PHASE[kill_at]), left
        last = wait_for_outcome(cluster, node, trigger)
        successor = next(c for c in cluster.controllers if c is not leader)
        assert successor.identity == cluster.leader()
        assert f"resuming rotation {record['rotationId']}" in successor.log_path.read_text()
        cluster.start_controller(leader.index)
        cluster.wait_for(cluster.mesh_complete, CONVERGE_TIMEOUT, "the mesh whole")
        time.sleep(SETTLE_DWELL)
    print("left at:", left.get("phase"), "outcome:", last, "losses:", traffic.losses())
    traffic.assert_lossless()
    assert last["outcome"] == OUTCOME_AFTER_FAILOVER[left["phase"]], (left, last)
    after = cluster.public_keys()
    assert (after[node.name] == before[node.name]) == (last["outcome"] == "RolledBack")
    assert state_files(node) == AFTER_ROTATION, state_files(node)
    assert_keys_everywhere(cluster, before)


# --- an invalid cron string ----------------------------------------------------------------


def test_an_invalid_cron_string_is_refused_or_reported(healthy: LocalCluster) -> None:
    cluster = healthy

    def policy(name: str, schedule: str) -> dict[str, Any]:
        return {"apiVersion": "vpblu.io/v1alpha1", "kind": "RotationPolicy",
                "metadata": {"name": name}, "spec": {"schedule": schedule}}

    # Not five fields: the API server refuses it (the CRD's validation rule).
    refused = cluster.kubectl("apply", "-f", "-", check=False,
                              input=json.dumps(policy("bad-fields", "every sunday")))
    assert refused.returncode != 0
    assert "must be a 5-field cron schedule" in refused.stderr, refused.stderr
    assert cluster.get("rotationpolicy", "bad-fields") is None
    # Five fields but no valid schedule (minute 61): stored, and the controller
    # says why it ignores it in a condition.
    cluster.apply(policy("bad-minute", "61 * * * *"))
    try:
        found: dict[str, Any] = {}

        def reported() -> bool:
            obj = cluster.get("rotationpolicy", "bad-minute") or {}
            for c in (obj.get("status") or {}).get("conditions") or ():
                if c.get("type") == "Accepted":
                    found.update(c)
                    return True
            return False

        cluster.wait_for(reported, CONVERGE_TIMEOUT, "a condition on bad-minute")
        assert found["status"] == "False", found
        assert found["reason"] == "InvalidSpec", found
        assert "'61 * * * *' is not a valid cron schedule" in found["message"], found
    finally:
        cluster.delete("rotationpolicy", "bad-minute")


# --- the rotation bridge carries full-size TCP, MSS clamped --------------------------------

# Long enough to run a transfer while the rotating node sends through its bridge
# (Activate done, Retire not begun); the rotation waits this long whatever the test does.
BRIDGE_OVERLAP_SECONDS = 30
NEVER_BY_SCHEDULE = "0 0 1 1 *"  # once a year: only rotate-now rotates in these tests
IPERF_PORT = 5201
IPERF_BYTES = "8M"
IPERF_TIMEOUT = 60.0
CAPTURE_READY_TIMEOUT = 15.0
OVERLAP_ATTEMPTS = 3


def tunnel_routes(cluster: LocalCluster, node: Node) -> dict[str, str]:
    """The node's mesh-table routes into a tunnel (its primary or its rotation
    bridge; not the fail-closed sink's): destination -> interface."""
    out = cluster.exec_in(node.netns, "ip", "-j", "route", "show", "table",
                          str(MESH_TABLE)).stdout
    tunnels = {node.interface, node.interface + DEFAULT_BRIDGE_SUFFIX}
    return {r["dst"]: r["dev"] for r in json.loads(out or "[]") if r.get("dev") in tunnels}


def all_into(cluster: LocalCluster, node: Node, interface: str) -> bool:
    routes = tunnel_routes(cluster, node)
    return bool(routes) and set(routes.values()) == {interface}


def rotation_policy(name: str, node: Node, overlap: int) -> dict[str, Any]:
    return {"apiVersion": "vpblu.io/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"name": name},
            "spec": {"schedule": NEVER_BY_SCHEDULE, "overlapSeconds": overlap,
                     "nodes": [node.name]}}


def rotate_with_overlap(cluster: LocalCluster, node: Node, label: str) -> tuple[str, str]:
    """Request a rotation of `node` and return (trigger, rotation id) once it is in its
    overlap window: the leader said so in its log. A valid RotationPolicy gets no
    condition, so nothing says when the controller has read it: a rotation that ran
    without the overlap (the policy not read yet) just ends, and another is asked for."""
    for _ in range(OVERLAP_ATTEMPTS):
        trigger = f"{label}-{time.time_ns()}"
        request_rotation(cluster, node, trigger)
        record = wait_for_phase(cluster, node, "Activate")
        said = f"rotation {record['rotationId']} active; peers accept both keys for"
        found: list[bool] = []

        def overlap_or_ended(said: str = said, found: list[bool] = found,
                             trigger: str = trigger) -> bool:
            leader = cluster.leading_controller()
            if leader is not None and said in leader.log_path.read_text(errors="replace"):
                found.append(True)
                return True
            status = _status(cluster, node)
            return (status.get("lastRotation") or {}).get("trigger") == trigger

        cluster.wait_for(overlap_or_ended, ROTATION_TIMEOUT,
                         f"{node.name}'s rotation in its overlap window, or ended")
        if found:
            return trigger, str(record["rotationId"])
        wait_for_outcome(cluster, node, trigger)
    raise AssertionError(f"no rotation of {node.name} waited for its policy's overlap in "
                         f"{OVERLAP_ATTEMPTS} attempts")


def test_full_size_tcp_through_the_rotation_bridge_is_mss_clamped(
        healthy: LocalCluster, reaper: Reaper) -> None:
    """While the rotating node sends everything through its bridge, an 8 MiB iperf3
    transfer from its pod to a peer's pod completes, and both SYNs on the bridge carry
    the mesh MSS (mesh MTU - 40), not the pods' 1460: the clamp covers the bridge."""
    cluster = healthy
    node, peer = cluster.nodes[0], cluster.nodes[1]
    bridge = node.interface + DEFAULT_BRIDGE_SUFFIX
    mesh_mtu = int(json.loads(cluster.exec_in(
        node.netns, "ip", "-j", "link", "show", node.interface).stdout)[0]["mtu"])
    name = "e2e-bridge-overlap"
    cluster.apply(rotation_policy(name, node, BRIDGE_OVERLAP_SECONDS))
    try:
        trigger, _ = rotate_with_overlap(cluster, node, "e2e-bridge-mss")
        cluster.wait_for(lambda: all_into(cluster, node, bridge),
                         ROTATION_TIMEOUT, f"every tunnel route of {node.name} into {bridge}")
        syns = reaper.start("tcpdump on the bridge", [
            *nsenter(node.netns), "tcpdump", "-i", bridge, "-n", "-l", "-c", "2",
            f"tcp port {IPERF_PORT} and tcp[tcpflags] & tcp-syn != 0"],
            stderr=subprocess.PIPE)
        server = reaper.start("iperf3 server", [
            *nsenter(peer.pods[0].netns), "iperf3", "-s", "-1", "-B", str(peer.pods[0].ip),
            "-p", str(IPERF_PORT), "--forceflush"])
        with reaped(syns, server):
            syns.wait_for_line("listening on", CAPTURE_READY_TIMEOUT,
                               "tcpdump listening on the bridge", stream=STDERR)
            server.wait_for_line("Server listening", CAPTURE_READY_TIMEOUT,
                                 "the iperf3 server listening")
            client = subprocess.run(
                [*nsenter(node.pods[0].netns), "iperf3", "-c", str(peer.pods[0].ip),
                 "-p", str(IPERF_PORT), "-n", IPERF_BYTES, "-J"],
                capture_output=True, text=True, timeout=IPERF_TIMEOUT, check=False)
            syns.wait_exit(CAPTURE_READY_TIMEOUT, "the SYN and the SYN-ACK on the bridge")
            still_bridged = set(tunnel_routes(cluster, node).values())
        assert client.returncode == 0, client.stdout[-2000:] + client.stderr[-2000:]
        result = json.loads(client.stdout)
        assert result["end"]["sum_sent"]["bytes"] >= 8 * 1024 * 1024, result["end"]
        # The whole transfer went through the bridge: it still carried every route.
        assert still_bridged == {bridge}, still_bridged
        lines = syns.lines()
        print("SYNs on the bridge:", lines)
        assert len(lines) == 2, syns.describe()
        assert all(f"mss {mesh_mtu - 40}," in line for line in lines), lines
        last = wait_for_outcome(cluster, node, trigger)
        assert last["outcome"] == "Completed", last
    finally:
        cluster.delete("rotationpolicy", name)


# --- a node added mid-rotation ----------------------------------------------------------------

LATE_OVERLAP_SECONDS = 45  # the newcomer joins, reaches everyone and traffic starts in it


def reaches_every_peer(cluster: LocalCluster, node: Node) -> bool:
    """Its pod pings every other node's pod, and each of them pings it back."""
    mine = node.pods[0]
    return all(cluster.ping(mine, other.pods[0].ip) and cluster.ping(other.pods[0], mine.ip)
               for other in cluster.nodes if other is not node)


def test_a_node_added_mid_rotation_reaches_every_peer_and_loses_nothing(
        healthy: LocalCluster, reaper: Reaper) -> None:
    """node3 leaves the cluster; node1 starts rotating; in node1's overlap window
    (Activate done: node1 answers with K' only) node3 joins again with the key it
    had. The rotation brings it in (its Switch at once), so node3 reaches every pod,
    and UDP on every pair plus a TCP stream, started then, lose nothing through the
    rest of the rotation; every node ends with node1's new key."""
    cluster = healthy
    rotating, newcomer = cluster.nodes[0], cluster.nodes[2]
    before = cluster.public_keys()
    cluster.deregister_node(newcomer)
    try:
        def left() -> bool:
            device = cluster.wg_device(rotating)
            return device is not None and device.peer(before[newcomer.name]) is None

        cluster.wait_for(left, CONVERGE_TIMEOUT, f"{newcomer.name} gone from {rotating.name}")
        name = "e2e-late-peer-overlap"
        cluster.apply(rotation_policy(name, rotating, LATE_OVERLAP_SECONDS))
        try:
            trigger, rotation_id = rotate_with_overlap(cluster, rotating, "e2e-late-peer")
            joined = time.monotonic()
            cluster.register_node(newcomer)
            cluster.wait_for(lambda: reaches_every_peer(cluster, newcomer), ROTATION_TIMEOUT,
                             f"{newcomer.name}, added mid-rotation, reaching every pod")
            reached = round(time.monotonic() - joined, 2)
            at_reach = _status(cluster, rotating).get("rotation") or {}
            with AllTraffic(reaper, cluster) as traffic:
                # Traffic runs from inside the overlap window through Retire.
                last = wait_for_outcome(cluster, rotating, trigger)
                time.sleep(SETTLE_DWELL)
        finally:
            cluster.delete("rotationpolicy", name)
    finally:
        restore_cluster(cluster)
    print(f"{newcomer.name} reached every pod {reached} s after joining, rotation "
          f"{rotation_id} then at {at_reach.get('phase')}/{at_reach.get('step')}; "
          f"losses: {traffic.losses()}")
    assert at_reach.get("rotationId") == rotation_id, at_reach  # still rotating
    assert newcomer.name in at_reach.get("peers", []), at_reach
    traffic.assert_lossless()
    assert last["outcome"] == "Completed", last
    after = cluster.public_keys()
    assert after[rotating.name] != before[rotating.name]
    assert_keys_everywhere(cluster, before)
