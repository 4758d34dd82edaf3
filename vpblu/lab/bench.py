"""`python -m vpblu.lab.bench`: how fast the mesh converges, measured on the real thing.

Owns the benchmark: a real kube-apiserver (vpblu.lab.testenv), the real
controller as its own process (so its CPU time and peak RSS are its own), and
N simulated daemons (vpblu.lab.sim: the real daemon stream over real TLS gRPC,
with a recording kernel) in this process. Each scenario is timed from the
API write that triggers it to the moment the last affected daemon has applied
(and so acknowledged) the resulting state:

    formation   N nodes with keys, then a FullMesh TunnelPolicy is created
    join        a node's Node object is created (its daemon is already up)
    leave       that Node object is deleted
    block       a BlockPolicy with one CIDR pair is created
    route       a RoutePolicy moving part of one node's pod CIDR is created
    rotation    every node is annotated vpblu.io/rotate-now: the whole cluster's
                keys are rotated, in batches of the default maxConcurrent (or of
                --rotation-max-concurrent K, set by a RotationPolicy), until every
                daemon holds every peer's new key and every node retired its old one

For every event it also counts what the daemons received (messages, protobuf
bytes) and the controller's CPU seconds. `--compare` runs every size twice,
with deltas and with whole-state pushes, so the gain is a ratio from one run.

It prints a table (with progress while it runs) and writes a JSON file and a
PNG plot of latency against N into bench/results/. It must never be run as a
timed test: these machines are noisy, so it reports medians and percentiles
of repeated events.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import ipaddress
import json
import logging
import math
import operator
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from vpblu import aioloop
from vpblu.cli import CONTROLLER_GC_THRESHOLDS
from vpblu.core.model import DEFAULT_MAX_CONCURRENT, MAX_CONCURRENT
from vpblu.core.sources import ROTATE_NOW_ANNOTATION
from vpblu.lab import quiet
from vpblu.lab.interrupt import cancel_on_signal
from vpblu.lab.quiet import Metered
from vpblu.lab.sim import MeshPki, SimCluster, SimDaemon, has_rotated, is_full_mesh
from vpblu.lab.testenv import REPO, ApiConnection, TestEnv, free_port, install_base, spawn_child
from vpblu.node.stream import StreamStatistics
from vpblu.stream.transport import set_keepalive_timeout

_PEER_NAME = operator.attrgetter("name")

log = logging.getLogger("vpblu.lab.bench")

SCENARIOS = ("formation", "join", "leave", "block", "route", "rotation")
DEFAULT_SIZES = (10, 100, 1000)
RESULTS = REPO / "bench" / "results"
# Per size: how many times a mesh is formed, and each other event repeated.
# A p99 means something from 100 samples on (below that, nearest rank makes
# it the worst one seen): 100 at N=10 and 100. At N=1000 an event costs
# seconds of setup and wait, so there p99 is the worst of 20 (p95 the second
# worst), and mesh formation's (N^2 peers of work) the worst of 3.
REPEATS = {10: (10, 100), 100: (5, 100), 1000: (3, 20)}
SPARE_NODES = 1
EVENT_TIMEOUT = 120.0
SETTLE_TIMEOUT = 300.0
# The spare daemon back on a served stream after a leave (its backoff is at most
# RECONNECT_MAX plus jitter, 31 s).
SERVED_AGAIN_TIMEOUT = 60.0
CONTROLLER_START_TIMEOUT = 60.0
# Nodes rotated in the rotation scenario: all of them up to N=100, a sample above.
ROTATION_ALL_UP_TO = 100
ROTATION_SAMPLE = 20
# How the leader's RotationActors take them: in batches of maxConcurrent, each batch
# holding the cluster-wide RotationToken (vpblu/actors/rotation.py). Without
# --rotation-max-concurrent there is no RotationPolicy: the default applies, and
# rotate-now has no overlap window; with it, a RotationPolicy says K, with the
# shortest overlap window it allows (1 s per batch).
ROTATION_POLICY = "bench-rotation"
ROTATION_POLICY_OVERLAP = 1
# A whole-cluster rotation is one event of many rotations in a row: its bound
# grows with them (0.3-2 s each on a quiet machine, several times that at a
# load average of 15 on two cores).
ROTATION_NODE_TIMEOUT = 30.0
# Before and after an event the controller is let finish what it is doing
# (see quiesce); /proc counts CPU in 10 ms ticks, so a window is 10 of them.
QUIET_WINDOW = 0.1
QUIET_SHARE = 0.2
QUIET_MAX = 5.0
PROFILER_ATTACH = 0.5  # seconds py-spy is given to attach before an event


@attrs.frozen(slots=True)
class Sample:
    scenario: str
    n: int
    mode: str
    latency: float  # seconds, API write -> last affected daemon applied
    messages: int  # received by all daemons for this event
    bytes: int
    controller_cpu: float  # seconds of the controller process for this event
    # Seconds of this process (the N simulated daemons): on a 2-core machine
    # the harness competes with the controller, so a latency is only the
    # controller's when this stays well below it.
    harness_cpu: float = 0.0
    # The controller's desired-state recomputes for this event, and their
    # main-thread seconds (vpblu_desired_state_recompute*_total).
    recomputes: float = 0.0
    recompute_cpu: float = 0.0


@attrs.frozen(slots=True)
class Summary:
    scenario: str
    n: int
    mode: str
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    messages: float  # median per event
    bytes: float
    cpu_ms: float
    harness_cpu_ms: float = 0.0
    recomputes: float = 0.0  # median per event
    recompute_ms: float = 0.0

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Summary:
        first = samples[0]
        lat = sorted(s.latency for s in samples)
        return cls(first.scenario, first.n, first.mode, len(samples),
                   1000 * _percentile(lat, 50), 1000 * _percentile(lat, 95),
                   1000 * _percentile(lat, 99),
                   statistics.median(s.messages for s in samples),
                   statistics.median(s.bytes for s in samples),
                   1000 * statistics.median(s.controller_cpu for s in samples),
                   1000 * statistics.median(s.harness_cpu for s in samples),
                   statistics.median(s.recomputes for s in samples),
                   1000 * statistics.median(s.recompute_cpu for s in samples))


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: with few samples, p99 is the worst one seen."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# The mesh connections' silence limit, both ends, here only: the thousand
# simulated daemons share one process and the controller's two cores, and a
# formation at N=1000 on a loaded host starves either side for longer than
# the production 15 s (seen: every connection aborted and re-made, the run
# never converging). A real daemon has its own process.
BENCH_KEEPALIVE_TIMEOUT = 120.0


class ControllerProcess:
    """`python -m vpblu controller` as a child process, measured through /proc.

    Started like the test API server (vpblu.lab.testenv.spawn_child): it dies with
    the benchmark even when the benchmark is SIGKILLed."""

    def __init__(self, spawner: ThreadPoolExecutor, env: TestEnv, pki: MeshPki, port: int, *,
                 full_pushes: bool, log_path: Path) -> None:
        self.metrics_port = free_port()
        # The whole-state baseline is the same controller with one decision replaced,
        # in its own entry point: the product has no benchmark switch.
        entry = "vpblu.lab.wholestate" if full_pushes else "vpblu"
        args = [
            sys.executable, "-m", entry, "--log-level", "WARNING", "controller",
            "--kubeconfig", str(env.kubeconfig_path),
            "--listen", f"127.0.0.1:{port}", "--advertise", f"127.0.0.1:{port}",
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            # No dashboard: its fixed port may be taken by another controller on
            # this machine, and it serves nobody here.
            "--dashboard-addr", "",
            # Not the default 0.0.0.0:9090: on a shared machine a wildcard socket
            # answered a local cluster's scrapes of its own controller there.
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--keepalive-timeout", str(BENCH_KEEPALIVE_TIMEOUT),
        ]  # the production lease settings: the bench measures what an operator gets
        self.child = spawn_child(spawner, "controller", args, log_path, REPO)

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def counters(self, name: str) -> dict[str, float]:
        """The controller's samples of the counter `name` (its /metrics), by label
        values ('' for none); empty if the scrape fails."""
        return self.counters_of((name,))[name]

    def counters_of(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """`counters` of each of `names`, from one scrape."""
        found: dict[str, dict[str, float]] = {name: {} for name in names}
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
        except OSError:
            return found
        for family in text_string_to_metric_families(text):
            if family.name in found:
                for sample in family.samples:
                    if sample.name == f"{family.name}_total":
                        found[family.name][",".join(sample.labels.values())] = sample.value
        return found

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.child.stop()


async def _wait_listening(port: int, controller: ControllerProcess) -> None:
    with trio.fail_after(CONTROLLER_START_TIMEOUT):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                if controller.child.exited():
                    raise RuntimeError(f"the controller exited:\n{controller.child.log_tail()}"
                                       ) from None
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


async def _wait_served_again(daemon: SimDaemon, before_leave: StreamStatistics) -> None:
    """The leave ended the spare daemon's stream (its Node went: it says its key
    again in a new Hello); the next join starts once a new stream is up and
    served (its SyncState applied), as the first one does. Without this the
    join waited out the daemon's reconnect backoff, which grows when streams
    end less than STABLE_AFTER apart, as back-to-back rounds do: 0.4 s, 3.3 s,
    6.2 s at N=100 on 2026-11-27."""
    with trio.move_on_after(SERVED_AGAIN_TIMEOUT):
        while True:
            now = daemon.stream.statistics()
            if (now.connected_to is not None and now.connects > before_leave.connects
                    and now.syncs_applied > before_leave.syncs_applied):
                return
            await trio.sleep(0.02)
    raise RuntimeError(f"the spare daemon {daemon.name} had no new served stream"
                       f" {SERVED_AGAIN_TIMEOUT:.0f} s after its Node was deleted")


async def quiesce(controller: Metered) -> None:
    """Until the controller used at most QUIET_SHARE of a core over one
    QUIET_WINDOW (at most QUIET_MAX)."""
    await quiet.quiesce(controller, window=QUIET_WINDOW, share=QUIET_SHARE, limit=QUIET_MAX)


class Bench:
    def __init__(self, env: TestEnv, connection: ApiConnection, workdir: Path,
                 args: argparse.Namespace, spawner: ThreadPoolExecutor) -> None:
        self.env = env
        self.connection = connection
        self.spawner = spawner
        self.workdir = workdir
        self.args = args
        self.samples: list[Sample] = []
        self.peak_rss: dict[str, int] = {}
        # Per size: seconds from the controller listening to every node
        # registered and served (settle), and the controller's CPU seconds by then.
        self.registration: dict[str, tuple[float, float]] = {}
        self.rotations: dict[str, int] = {}  # nodes rotated in the rotation scenario

    def say(self, text: str) -> None:
        print(text, flush=True)

    # --- API writes, timed ------------------------------------------------------------

    async def api(self, method: str, path: str, body: object = None) -> None:
        """A triggering write, on a connection kept open: what is timed is the
        call, not a TLS handshake of the benchmark's own."""
        answer = await trio.to_thread.run_sync(self.connection.request, method, path, body)
        if answer.status not in (200, 201, 202):
            raise RuntimeError(f"{method} {path}: {answer.status} {answer.message}")

    async def measure(self, scenario: str, n: int, mode: str, cluster: SimCluster,
                      controller: ControllerProcess, trigger: Callable[[], Any],
                      done: Callable[[SimDaemon], bool], affected: Sequence[str],
                      bound: float = EVENT_TIMEOUT) -> None:
        # From a quiet controller: what the previous write (often the undoing
        # of the last event) left it to do would otherwise be timed and
        # counted as this event's.
        await quiesce(controller)
        with self._profiling(scenario, n, mode, controller):
            before = _received(cluster)
            totals0 = await trio.to_thread.run_sync(_totals, controller)
            cpu0 = controller.cpu_seconds()
            harness0 = time.process_time()
            t0 = trio.current_time()
            await trigger()
            with trio.fail_after(bound):
                await cluster.wait_all(done, affected)
            latency = trio.current_time() - t0
            # The event's own work after the last daemon applied it (its
            # acks, status writes) is part of its CPU.
            await quiesce(controller)
            after = _received(cluster)
            harness = time.process_time() - harness0
            cpu = controller.cpu_seconds() - cpu0
            totals1 = await trio.to_thread.run_sync(_totals, controller)
        self.samples.append(Sample(scenario, n, mode, latency, after[0] - before[0],
                                   after[1] - before[1], cpu, harness,
                                   totals1[0] - totals0[0], totals1[1] - totals0[1]))

    @contextmanager
    def _profiling(self, scenario: str, n: int, mode: str,
                   controller: ControllerProcess) -> Iterator[None]:
        """With --profile DIR: py-spy samples the controller and this process
        (the simulated daemons) while one event runs, into
        DIR/<scenario>-<n>-<mode>-<i>-{controller,harness}.txt (collapsed stacks).
        Only samples that hold the GIL count (`--gil`): without it a process
        waiting on the run queue - two cores shared with the API server and
        the other process - was sampled where it was preempted, most often a
        socket send, and a fifth of a join's samples looked like kernel work."""
        if self.args.profile is None:
            yield
            return
        self.args.profile.mkdir(parents=True, exist_ok=True)
        i = sum(1 for s in self.samples if (s.scenario, s.n, s.mode) == (scenario, n, mode))
        spies = [subprocess.Popen(
            [self.args.py_spy, "record", "--pid", str(pid), "--nonblocking", "--gil",
             "--format", "raw", "--rate", "500",
             "--output", str(self.args.profile / f"{scenario}-{n}-{mode}-{i}-{who}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for who, pid in (("controller", controller.pid), ("harness", os.getpid()))]
        time.sleep(PROFILER_ATTACH)
        try:
            yield
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait()

    # --- one size, one mode -----------------------------------------------------------

    async def run_size(self, n: int, mode: str) -> None:
        formations, events = REPEATS.get(n, (3, 10))
        if self.args.quick:
            formations, events = 2, 3
        directory = self.workdir / f"{mode}-{n}"
        pki = MeshPki.create(directory / "pki")
        port = free_port()
        controller = ControllerProcess(self.spawner, self.env, pki, port,
                                       full_pushes=(mode == "full"),
                                       log_path=directory / "controller.log")
        try:
            # Daemons started before the controller listens would each log
            # every refused attempt of their backoff (hundreds of lines at N=100).
            await _wait_listening(port, controller)
            async with SimCluster.open(self.env, directory / "nodes", pki.client,
                                       (f"127.0.0.1:{port}",), n + SPARE_NODES,
                                       prefix=f"b{mode[0]}{n}", keep_history=False) as cluster:
                names = sorted(cluster.daemons)
                members, spare = names[:n], names[n]
                registering = time.monotonic()
                await self.settle(cluster, names)
                self.registration[f"{mode}-{n}"] = (time.monotonic() - registering,
                                                    controller.cpu_seconds())
                # The spare node's daemon is up and its key is known; its Node
                # object goes, so a join is one Node create.
                await cluster.delete_node(spare)
                await self.run_events(cluster, controller, n, mode, members, spare,
                                      formations, events)
                self.peak_rss[f"{mode}-{n}"] = controller.peak_rss()
        finally:
            controller.stop()

    async def settle(self, cluster: SimCluster, names: list[str]) -> None:
        """Every daemon connected and applied its first sync; every key is in the API."""
        with trio.fail_after(SETTLE_TIMEOUT):
            await cluster.wait_all(lambda d: d.applier.current is not None, names)
            while True:
                answer = await trio.to_thread.run_sync(
                    self.env.request, "GET", "/apis/vpblu.io/v1alpha1/vpblunodes")
                keys = {o["metadata"]["name"]: (o.get("status") or {}).get("publicKey")
                        for o in answer.body.get("items", [])}
                if all(keys.get(name) == cluster.daemons[name].public_key for name in names):
                    return
                await trio.sleep(0.2)

    async def run_events(self, cluster: SimCluster, controller: ControllerProcess, n: int,
                         mode: str, members: list[str], spare: str, formations: int,
                         events: int) -> None:
        mesh_path = "/apis/vpblu.io/v1alpha1/tunnelpolicies"
        mesh = {"apiVersion": "vpblu.io/v1alpha1", "kind": "TunnelPolicy",
                "metadata": {"name": "bench-mesh"}, "spec": {"mode": "FullMesh"}}
        full = is_full_mesh(cluster, members)

        def no_peers(d: SimDaemon) -> bool:
            return d.applier.current is not None and not d.applier.current.peers

        wanted = self.args.scenarios
        if "formation" not in wanted:
            formations = 1  # the mesh must form once for the other scenarios
        self.say(f"  N={n} {mode}: formation x{formations}")
        for i in range(formations):
            await self.measure("formation", n, mode, cluster, controller,
                               lambda: self.api("POST", mesh_path, mesh), full, members)
            if i < formations - 1:
                await self.api("DELETE", f"{mesh_path}/bench-mesh")
                await cluster.wait_all(no_peers, members)
        self._progress("formation", n, mode)

        node_body = _node_body(cluster, spare)

        def has_spare(d: SimDaemon) -> bool:
            state = d.applier.current
            # In C: a generator over 999 peers for each of 1000 daemons was
            # a twentieth of the harness's CPU in a join.
            return state is not None and spare in map(_PEER_NAME, state.peers)

        def lacks_spare(d: SimDaemon) -> bool:
            return not has_spare(d)

        self.say(f"  N={n} {mode}: join and leave x{events}")
        for _ in range(events if {"join", "leave"} & wanted else 0):
            await self.measure("join", n, mode, cluster, controller,
                               lambda: self.api("POST", "/api/v1/nodes", node_body),
                               has_spare, members)
            before_leave = cluster.daemons[spare].stream.statistics()
            await self.measure("leave", n, mode, cluster, controller,
                               lambda: self.api("DELETE", f"/api/v1/nodes/{spare}"),
                               lacks_spare, members)
            await _wait_served_again(cluster.daemons[spare], before_leave)
        self._progress("join", n, mode)
        self._progress("leave", n, mode)

        src = cluster.nodes[members[0]].pod_cidr
        dst = cluster.nodes[members[-1]].pod_cidr
        block_path = "/apis/vpblu.io/v1alpha1/blockpolicies"
        block = {"apiVersion": "vpblu.io/v1alpha1", "kind": "BlockPolicy",
                 "metadata": {"name": "bench-block"},
                 "spec": {"cidrPairs": [{"from": src, "to": dst}]}}

        def has_block(d: SimDaemon) -> bool:
            state = d.applier.current
            return state is not None and any(str(b.src) == src for b in state.blocks)

        self.say(f"  N={n} {mode}: block x{events}")
        for _ in range(events if "block" in wanted else 0):
            await self.measure("block", n, mode, cluster, controller,
                               lambda: self.api("POST", block_path, block), has_block, members)
            await self.api("DELETE", f"{block_path}/bench-block")
            await cluster.wait_all(lambda d: not has_block(d), members)
        self._progress("block", n, mode)

        # Half of the first node's pod CIDR is moved to the last node's tunnel.
        owner, via = members[0], members[-1]
        moved = str(next(_subnets(cluster.nodes[owner].pod_cidr)))
        route_path = "/apis/vpblu.io/v1alpha1/routepolicies"
        route = {"apiVersion": "vpblu.io/v1alpha1", "kind": "RoutePolicy",
                 "metadata": {"name": "bench-route"},
                 "spec": {"routes": [{"cidr": moved, "via": via}]}}

        moved_network = ipaddress.ip_network(moved)

        def routed(d: SimDaemon) -> bool:
            state = d.applier.current
            if d.name == via:
                return True  # the via node never routes to itself
            # `via` first: a plain string test rules out all but ~2 of N routes
            # (formatting every route's CIDR was most of the harness's work).
            return state is not None and any(
                r.via == via and r.cidr == moved_network for r in state.routes)

        self.say(f"  N={n} {mode}: route x{events}")
        for _ in range(events if "route" in wanted else 0):
            await self.measure("route", n, mode, cluster, controller,
                               lambda: self.api("POST", route_path, route), routed, members)
            await self.api("DELETE", f"{route_path}/bench-route")
            await cluster.wait_all(lambda d: not routed(d) or d.name == via,
                                   [m for m in members if m != via])
        self._progress("route", n, mode)

        if "rotation" in wanted:
            # Each rotation is O(N) steps: the whole cluster is O(N^2), so a large
            # cluster rotates a sample of its nodes (whole batches of them).
            concurrent = self.args.rotation_max_concurrent or DEFAULT_MAX_CONCURRENT
            sample = -(-ROTATION_SAMPLE // concurrent) * concurrent
            rotating = members[:n if n <= ROTATION_ALL_UP_TO else sample]
            self.rotations[f"{mode}-{n}"] = len(rotating)
            policy_path = "/apis/vpblu.io/v1alpha1/rotationpolicies"
            if self.args.rotation_max_concurrent:
                await self.api("POST", policy_path, {
                    "apiVersion": "vpblu.io/v1alpha1", "kind": "RotationPolicy",
                    "metadata": {"name": ROTATION_POLICY},
                    "spec": {"schedule": "0 3 1 1 *", "overlapSeconds": ROTATION_POLICY_OVERLAP,
                             "maxConcurrent": self.args.rotation_max_concurrent}})
            self.say(f"  N={n} {mode}: rotation of {len(rotating)} of {n} nodes' keys x1, "
                     f"{rotation_concurrency(self.args.rotation_max_concurrent)}")
            before = await trio.to_thread.run_sync(_totals, controller)
            await self.measure("rotation", n, mode, cluster, controller,
                               lambda: self.rotate_all(rotating, f"bench-{mode}-{n}"),
                               has_rotated(cluster, rotating), members,
                               bound=max(EVENT_TIMEOUT, ROTATION_NODE_TIMEOUT * len(rotating)))
            dropped = await trio.to_thread.run_sync(controller.counters,
                                                    "vpblu_rotation_messages_dropped")
            self.say(f"  N={n} {mode}: rotation messages dropped on a full mailbox since the "
                     f"controller started: {dropped or 'not scraped'}")
            after = await trio.to_thread.run_sync(_totals, controller)
            self.say(f"  N={n} {mode}: during the rotation, status writes "
                     f"{after[2] - before[2]:.0f}, pushes {after[3] - before[3]:.0f}")
            if self.args.rotation_max_concurrent:
                await self.api("DELETE", f"{policy_path}/{ROTATION_POLICY}")
            self._progress("rotation", n, mode)
        await self.api("DELETE", f"{mesh_path}/bench-mesh")

    async def rotate_all(self, members: Sequence[str], trigger: str) -> None:
        """Annotate every VpbluNode: the leader's RotationActors take them in batches."""
        patch = {"metadata": {"annotations": {ROTATE_NOW_ANNOTATION: trigger}}}

        def annotate(name: str) -> None:
            answer = self.env.request(
                "PATCH", f"/apis/vpblu.io/v1alpha1/vpblunodes/{name}", patch,
                content_type="application/merge-patch+json")
            if answer.status != 200:
                raise RuntimeError(f"annotating {name}: {answer.status} {answer.message}")

        limiter = trio.CapacityLimiter(8)
        async with trio.open_nursery() as nursery:
            for name in members:
                nursery.start_soon(functools.partial(
                    trio.to_thread.run_sync, annotate, name, limiter=limiter))


    def _progress(self, scenario: str, n: int, mode: str) -> None:
        mine = [s for s in self.samples if (s.scenario, s.n, s.mode) == (scenario, n, mode)]
        if mine:
            s = Summary.of(mine)
            self.say(f"    {scenario:<9} p50 {s.p50_ms:8.1f} ms  p99 {s.p99_ms:8.1f} ms  "
                     f"{s.messages:7.0f} msgs {s.bytes / 1024:9.1f} KiB  cpu {s.cpu_ms:7.1f} ms"
                     f" (harness {s.harness_cpu_ms:.0f} ms; {s.recomputes:.0f} recomputes"
                     f" {s.recompute_ms:.0f} ms)")


_TOTALS = ("vpblu_desired_state_recomputes", "vpblu_desired_state_recompute_seconds",
           "vpblu_status_writes", "vpblu_pushes")


def _totals(controller: ControllerProcess) -> tuple[float, float, float, float]:
    """The controller's recomputes, their seconds, status writes and pushes so far,
    from one scrape (0 for each if it fails). Blocking: call it in a thread."""
    found = controller.counters_of(_TOTALS)
    return (found[_TOTALS[0]].get("", 0.0), found[_TOTALS[1]].get("", 0.0),
            found[_TOTALS[2]].get("", 0.0), sum(found[_TOTALS[3]].values()))


def _received(cluster: SimCluster) -> tuple[int, int]:
    messages = byte_count = 0
    for daemon in cluster.daemons.values():
        stats = daemon.stream.statistics()
        messages += stats.messages_received
        byte_count += stats.bytes_received
    return messages, byte_count


def _subnets(cidr: str) -> Iterator[Any]:
    import ipaddress

    net = ipaddress.ip_network(cidr)
    return net.subnets(prefixlen_diff=1)


def _node_body(cluster: SimCluster, name: str) -> dict[str, Any]:
    node = cluster.nodes[name]
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": {"vpblu.io/simulated": "true"}},
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": node.internal_ip}]},
    }


# --- reporting ---------------------------------------------------------------------------


def summarize(samples: Sequence[Sample]) -> list[Summary]:
    groups: dict[tuple[str, int, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.scenario, s.n, s.mode), []).append(s)
    return [Summary.of(g) for _, g in sorted(groups.items(), key=lambda kv: (
        SCENARIOS.index(kv[0][0]), kv[0][1], kv[0][2]))]


def slope(summaries: Sequence[Summary], scenario: str, mode: str) -> float | None:
    """Least-squares slope of controller CPU per event against N (ms per node)."""
    points = [(s.n, s.cpu_ms) for s in summaries if s.scenario == scenario and s.mode == mode]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(p[0] for p in points)
    mean_y = statistics.fmean(p[1] for p in points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def rotation_concurrency(max_concurrent: int = 0) -> str:
    """How the rotation scenario's nodes were taken (0: no RotationPolicy)."""
    if not max_concurrent:
        return f"maxConcurrent {DEFAULT_MAX_CONCURRENT} (the default, no policy)"
    alone = ": one node at a time" if max_concurrent == 1 else ""
    return (f"maxConcurrent {max_concurrent}{alone} (RotationPolicy, overlap "
            f"{ROTATION_POLICY_OVERLAP} s)")


def table(summaries: Sequence[Summary], peak_rss: dict[str, int],
          rotations: dict[str, int] | None = None, max_concurrent: int = 0) -> str:
    lines = [f"{'scenario':<10}{'N':>6} {'mode':<6}{'runs':>5}{'p50 ms':>10}{'p95 ms':>10}"
             f"{'p99 ms':>10}{'msgs/ev':>9}{'KiB/ev':>10}{'ctl cpu ms':>11}{'sim cpu ms':>11}"]
    for s in summaries:
        lines.append(f"{s.scenario:<10}{s.n:>6} {s.mode:<6}{s.count:>5}{s.p50_ms:>10.1f}"
                     f"{s.p95_ms:>10.1f}{s.p99_ms:>10.1f}{s.messages:>9.0f}"
                     f"{s.bytes / 1024:>10.1f}{s.cpu_ms:>11.1f}{s.harness_cpu_ms:>11.1f}")
    for key, rss in sorted(peak_rss.items()):
        lines.append(f"controller peak RSS ({key}): {rss / 2**20:.0f} MiB")
    for s in summaries:
        rotated = (rotations or {}).get(f"{s.mode}-{s.n}")
        if s.scenario == "rotation" and rotated:
            per_node = s.p50_ms / rotated
            cpu_per_node = s.cpu_ms / rotated
            how = ("measured: every node rotated" if rotated >= s.n else
                   f"SAMPLED: {rotated} of {s.n} nodes rotated, extrapolated x{s.n / rotated:.0f}")
            lines.append(f"rotation N={s.n} ({s.mode}, {rotation_concurrency(max_concurrent)}): "
                         f"{how}; "
                         f"{per_node:.0f} ms and {cpu_per_node:.0f} ms of controller CPU per "
                         f"rotated node; the whole cluster ~{per_node * s.n / 1000:.0f} s "
                         f"({per_node * s.n / 60000:.1f} min), controller CPU "
                         f"~{cpu_per_node * s.n / 1000:.0f} s")
    for scenario in ("join", "block"):
        k = slope(summaries, scenario, "delta")
        if k is not None:
            lines.append(f"controller CPU per {scenario} event grows {k:.3f} ms per node")
    for scenario in SCENARIOS:
        pairs = {(s.n): s for s in summaries if s.scenario == scenario and s.mode == "delta"}
        fulls = {(s.n): s for s in summaries if s.scenario == scenario and s.mode == "full"}
        for n in sorted(pairs.keys() & fulls.keys()):
            d, f = pairs[n], fulls[n]
            if d.bytes:
                lines.append(f"{scenario} N={n}: full pushes send {f.bytes / d.bytes:.1f}x the "
                             f"bytes of deltas; p50 {f.p50_ms / max(d.p50_ms, 1e-9):.2f}x")
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, scenario in enumerate(SCENARIOS):
        color = colors[index % len(colors)]  # one colour per scenario, a line style per mode
        for mode, style in (("delta", "-o"), ("full", "--x")):
            pts = sorted((s.n, s.p99_ms) for s in summaries
                         if s.scenario == scenario and s.mode == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color,
                        label=f"{scenario} ({mode}) p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel("API write -> last daemon applied (ms)")
    ax.set_title("vpblu convergence latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- entry point -------------------------------------------------------------------------


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vpblu-bench-") as d:
        yield Path(d)


async def _main(args: argparse.Namespace, env: TestEnv, connection: ApiConnection,
                workdir: Path, spawner: ThreadPoolExecutor) -> Bench:
    bench = Bench(env, connection, workdir, args, spawner)
    modes = ("delta", "full") if args.compare else ("delta",)
    async with trio.open_nursery() as nursery:
        # Ctrl-C and SIGTERM cancel the run, which then cleans up in order.
        interrupted = await nursery.start(cancel_on_signal, nursery.cancel_scope)
        async with aioloop.open_loop():
            for n in args.sizes:
                for mode in modes:
                    bench.say(f"N={n} ({mode} pushes): registering {n + SPARE_NODES} nodes...")
                    started = time.monotonic()
                    await bench.run_size(n, mode)
                    bench.say(f"  done in {time.monotonic() - started:.0f} s")
        nursery.cancel_scope.cancel()
    if interrupted.is_set():
        raise KeyboardInterrupt
    return bench


def _interrupted() -> int:
    """What a run stopped by Ctrl-C or SIGTERM says, and its exit status."""
    print("interrupted: nothing was written; everything started was stopped", file=sys.stderr)
    return 130


def _dump_tasks(_signo: int, _frame: object) -> None:
    """SIGUSR1: print where every trio task waits (for a run that seems stuck)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        print("(not inside trio.run)", file=sys.stderr, flush=True)
        return
    stack: list[tuple[trio.lowlevel.Task, int]] = [(root, 0)] if root else []
    while stack:
        task, depth = stack.pop()
        where = " <- ".join(f"{f.f_code.co_name}:{line}"
                            for f, line in list(task.iter_await_frames())[-3:])
        print(f"{'  ' * depth}{task.name}: {where}", file=sys.stderr)
        for nursery in task.child_nurseries:
            stack.extend((child, depth + 1) for child in nursery.child_tasks)
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    set_keepalive_timeout(BENCH_KEEPALIVE_TIMEOUT)
    parser = argparse.ArgumentParser(prog="python -m vpblu.lab.bench", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        type=lambda s: tuple(int(x) for x in s.split(",") if x),
                        help="comma-separated node counts (default 10,100,1000)")
    parser.add_argument("--compare", action="store_true",
                        help="also run every size with whole-state pushes instead of deltas")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        type=lambda s: frozenset(x for x in s.split(",") if x),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default all;"
                             " the mesh is formed once even when formation is left out)")
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--real-stack", default="", metavar="SIZES",
                        type=lambda s: tuple(int(x) for x in s.split(",") if x),
                        help="also run the real-stack scenario (vpblu.lab.realstack: the local"
                             " cluster with real daemons) at these sizes, e.g. 3,10; with"
                             " --sizes '' only it runs")
    parser.add_argument("--real-stack-repeats", type=int, default=5,
                        help="rounds of leave, rejoin and new-machine join per size")
    parser.add_argument("--real-stack-logs", type=Path, default=None, metavar="DIR",
                        help="keep the real-stack clusters' controller and daemon logs here")
    parser.add_argument("--telemetry", default="", metavar="SIZES",
                        type=lambda s: tuple(int(x) for x in s.split(",") if x),
                        help="also run the telemetry scenario (vpblu.lab.telemetrybench: status"
                             " writes in a quiet mesh, controller CPU and RSS with telemetry"
                             " against without) at these sizes, e.g. 1000")
    parser.add_argument("--telemetry-window", type=float, default=300.0, metavar="SECONDS",
                        help="the telemetry scenario's quiet window (default: one period"
                             " of the daemons' 5-minute refreshes)")
    parser.add_argument("--rotation-max-concurrent", type=int, default=0, metavar="K",
                        choices=range(0, MAX_CONCURRENT + 1),
                        help="the rotation scenario's batches: a RotationPolicy with"
                             f" maxConcurrent K (1..{MAX_CONCURRENT}); default: no policy,"
                             f" maxConcurrent {DEFAULT_MAX_CONCURRENT}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the controller with py-spy during every event and"
                             " write its collapsed stacks into DIR (needs py-spy)")
    args = parser.parse_args(argv)
    args.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(
        Path(sys.executable).parent))
    if args.profile is not None and args.py_spy is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    if not args.scenarios <= set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(args.scenarios - set(SCENARIOS)))}")
    logging.basicConfig(level=logging.WARNING)
    # A SIGTERM must clean up like Ctrl-C: the API server, the controller,
    # the simulated nodes' objects and the work directory all go. It is
    # turned into a SIGINT so that, inside trio.run, trio's own handler takes
    # it (a KeyboardInterrupt raised in trio's internals is a TrioInternalError
    # and skips the cleanup).
    signal.signal(signal.SIGTERM, lambda _sig, _frame: os.kill(os.getpid(), signal.SIGINT))
    signal.signal(signal.SIGUSR1, _dump_tasks)
    # The simulated daemons stand in for N processes; in one they hold N^2
    # peers, and the default collector thresholds would make the harness,
    # not the controller, the slow part (the controller sets the same).
    gc.set_threshold(*CONTROLLER_GC_THRESHOLDS)
    if args.telemetry:
        from vpblu.lab import telemetrybench
        try:
            telemetrybench.main(args.telemetry, args.out, window=args.telemetry_window)
        except KeyboardInterrupt:
            return _interrupted()
    if not args.sizes:
        if args.telemetry and not args.real_stack:
            return 0
        if not args.real_stack:
            parser.error("nothing to run: --sizes is empty and --real-stack not given")
        from vpblu.lab import realstack
        realstack.main(args.real_stack, args.real_stack_repeats, args.out,
                       args.real_stack_logs)
        return 0
    from vpblu.lab.realstack import calibration
    print(calibration().describe(), flush=True)
    print("starting the test API server...", flush=True)
    try:
        with TestEnv.start() as env, _workdir() as workdir, ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="vpblu-bench-spawner") as spawner, \
                env.connection() as connection:
            install_base(env)
            bench = trio.run(_main, args, env, connection, workdir, spawner)
    except KeyboardInterrupt:
        return _interrupted()
    summaries = summarize(bench.samples)
    print()
    print(table(summaries, bench.peak_rss, bench.rotations, args.rotation_max_concurrent))
    for key, (seconds, cpu) in sorted(bench.registration.items()):
        print(f"registration ({key}): every node served in {seconds:.1f} s,"
              f" controller CPU {cpu:.1f} s since its start")
    print(f"after the run: {calibration().describe()}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "when": stamp,
        "machine": {"cpus": os.cpu_count()},
        "sizes": list(args.sizes),
        "summaries": [attrs.asdict(s) for s in summaries],
        "peak_rss_bytes": bench.peak_rss,
        "registration_seconds_cpu": bench.registration,
        "nodes_rotated": bench.rotations,
        "rotation_max_concurrent": args.rotation_max_concurrent or DEFAULT_MAX_CONCURRENT,
        "samples": [attrs.asdict(s) for s in bench.samples],
    }
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {json_path}")
    png = args.out / f"bench-{stamp}.png"
    if plot(summaries, png):
        print(f"wrote {png}")
    if args.real_stack:
        from vpblu.lab import realstack
        realstack.main(args.real_stack, args.real_stack_repeats, args.out,
                       args.real_stack_logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
