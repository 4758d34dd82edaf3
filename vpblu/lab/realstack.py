"""The benchmark's real-stack scenario: join, rejoin and leave on the local cluster.

Owns one `LocalCluster` per size (a real kube-apiserver, the two real
controller processes, N node namespaces each running the real `vpblu daemon
run` with wireguard-go and the bcc-compiled programs) for as long as the
scenario runs, and the probes it starts in the pods. The last node is the one
that moves; every event is triggered by one direct API write (an HTTPS call
on a kept-alive connection, no kubectl process) and timed until every other
node's WireGuard device, read through its UAPI socket, says it:

    leave       the Node is deleted: until no other device lists its key
    rejoin      the Node is created again, its daemon running with the key
                it kept: until every other device lists that key
    new machine the node is wiped (daemon stopped, `vpblu daemon cleanup
                --remove-key`: a new key at the next start), then at t0 its
                daemon is started and its Node created: until every other
                device lists a key for its endpoint that is not the old one.
                The daemon's log says when its stream to the leader opened
                (its Hello sent; a stream a follower only redirected does
                not count): that share of the time is reported beside it.

While every event runs, pods on the other nodes send sequence-numbered UDP
to each other (tests/e2e/flowprobe.py, both directions of each pair, at
UDP_RATE datagrams/s): what is missing at the end is the loss between nodes
the events do not involve, which must be 0.

Each run prints a CPU calibration (`calibration()`): a fixed workload timed in
the same run, the CPU model and the load, since figures from different days or
machines compare only through it. It never asserts a speed: these machines are
noisy, so it reports medians of repeated events.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs

from vpblu.lab.localcluster import (
    KUSTOMIZE_SAMPLES,
    ClusterSettings,
    LocalCluster,
    Node,
    Pod,
    nsenter,
    run,
)
from vpblu.lab.testenv import REPO, ApiConnection

log = logging.getLogger(__name__)

FLOWPROBE = REPO / "tests" / "e2e" / "flowprobe.py"
REAL_SIZES = (3, 10)
REAL_REPEATS = 5
UDP_RATE = 100.0
# Pairs of probed pods at most (each pair is two probe processes): enough to
# see a tunnel cut anywhere among the uninvolved nodes without the probes
# becoming the load.
MAX_PROBE_PAIRS = 4
PROBE_PORT = 47000
PROBE_READY_TIMEOUT = 30.0
PROBE_GRACE = 2.0
# A probe nobody stops (the harness killed) still ends by itself.
PROBE_MAX_SECONDS = 3600.0
PROBE_STOP_TIMEOUT = 20.0
MESH_TIMEOUT = 120.0
EVENT_TIMEOUT = 60.0
# The wipe (`vpblu daemon cleanup --remove-key`) is not timed; it took over
# 60 s on this machine at a load average of 20-30 (interpreter, iptables, tc).
WIPE_TIMEOUT = 300.0
# How often the devices are read while an event is timed: a UAPI get of a
# small device takes well under a millisecond.
POLL_INTERVAL = 0.002
UAPI_DIR = Path("/var/run/wireguard")
UAPI_TIMEOUT = 2.0
HELLO_MARK = "mesh stream to "
FOLLOWER_MARK = " is a follower; the leader is "
CALIBRATION_ROUNDS = 5
CALIBRATION_ITERATIONS = 1_000_000


@attrs.frozen(slots=True)
class Calibration:
    """A fixed pure-Python workload timed in this run (median of rounds), with
    what the machine was: figures compare across runs only through it."""

    seconds: float  # CPU seconds of the loop
    # Wall seconds of the same loop: above `seconds` when other processes
    # took the cores meanwhile (the share this run got is seconds / wall_seconds).
    wall_seconds: float
    cpu_model: str
    cpus: int
    load_average: tuple[float, float, float]
    python: str

    def describe(self) -> str:
        load = ", ".join(f"{x:.2f}" for x in self.load_average)
        return (f"calibration: {CALIBRATION_ITERATIONS} iterations of a fixed loop "
                f"{self.seconds * 1e3:.1f} ms of CPU in {self.wall_seconds * 1e3:.1f} ms "
                f"(medians of {CALIBRATION_ROUNDS}); CPU "
                f"{self.cpu_model} x{self.cpus}; load average {load}; Python {self.python}")


def calibration() -> Calibration:
    def once() -> tuple[float, float]:
        began, wall = time.process_time(), time.perf_counter()
        total = 0
        for i in range(CALIBRATION_ITERATIONS):
            total += (i * 7) % 13
        assert total > 0
        return time.process_time() - began, time.perf_counter() - wall

    rounds = [once() for _ in range(CALIBRATION_ROUNDS)]
    return Calibration(
        seconds=statistics.median(cpu for cpu, _ in rounds),
        wall_seconds=statistics.median(wall for _, wall in rounds),
        cpu_model=_cpu_model(), cpus=os.cpu_count() or 0,
        load_average=os.getloadavg(), python=platform.python_version())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@attrs.frozen(slots=True)
class RealSample:
    size: int
    event: str  # "leave", "rejoin", "new-machine"
    seconds: float
    # new-machine only: from the daemon's start to its stream open (Hello sent),
    # and to its first log line (the interpreter up and the imports done).
    hello_seconds: float | None = None
    imported_seconds: float | None = None


@attrs.frozen(slots=True)
class RealRun:
    size: int
    samples: tuple[RealSample, ...]
    probes: int  # probe processes (two per pair)
    datagrams_sent: int
    datagrams_missing: int
    send_errors: int


# --- reading WireGuard without a process per read -----------------------------------


def device_peers(interface: str) -> dict[str, str | None]:
    """public key (base64) -> endpoint of every peer of `interface`, by its UAPI
    socket (the directory is shared by every namespace). Only public fields are
    kept: the device's own private key in the answer is dropped as it is read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(UAPI_TIMEOUT)
        sock.connect(str(UAPI_DIR / f"{interface}.sock"))
        sock.sendall(b"get=1\n\n")
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    peers: dict[str, str | None] = {}
    current: str | None = None
    for line in data.decode().splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            current = base64.b64encode(bytes.fromhex(value)).decode()
            peers[current] = None
        elif key == "endpoint" and current is not None:
            peers[current] = value
    return peers


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"not {what} after {timeout} s")
        time.sleep(POLL_INTERVAL)
    return time.monotonic() - began


# --- the probes ----------------------------------------------------------------------


@contextmanager
def probes(cluster: LocalCluster, pairs: Sequence[tuple[Pod, Pod]]) -> Iterator[list[Any]]:
    """Sequence-numbered UDP both ways between each pair, running for the
    with-block; yields a list the results are put in on the way out. Every
    probe is stopped and reaped on every exit path."""
    procs: list[subprocess.Popen[str]] = []
    results: list[Any] = []
    try:
        for i, (a, b) in enumerate(pairs):
            for src, dst in ((a, b), (b, a)):
                procs.append(subprocess.Popen(
                    [*nsenter(src.netns), sys.executable, str(FLOWPROBE), "udp",
                     "--bind", str(src.ip), "--peer", str(dst.ip),
                     "--port", str(PROBE_PORT + i), "--rate", str(UDP_RATE),
                     "--grace", str(PROBE_GRACE), "--control-stdin",
                     "--max-seconds", str(PROBE_MAX_SECONDS)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in procs:
            _expect_line(proc, "ready")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("start\n")
            proc.stdin.flush()
        for proc in procs:
            _expect_line(proc, "receiving")
        yield results
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()  # the probe's stop: it drains and prints its result
        for proc in procs:
            assert proc.stdout is not None
            out = proc.stdout.read()  # to EOF: the probe has exited or is exiting
            proc.wait(timeout=PROBE_STOP_TIMEOUT)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _expect_line(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + PROBE_READY_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a probe ended before saying {word!r}")
        if line.strip() == word:
            return
    raise TimeoutError(f"a probe did not say {word!r} within {PROBE_READY_TIMEOUT} s")


# --- the scenario ----------------------------------------------------------------------


class RealStack:
    def __init__(self, cluster: LocalCluster, api: ApiConnection,
                 say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.api = api
        self.say = say
        self.mover = cluster.nodes[-1]
        self.others = cluster.nodes[:-1]

    def keys_of_others(self) -> list[dict[str, str | None]]:
        return [device_peers(n.interface) for n in self.others]

    def node_body(self, node: Node) -> dict[str, Any]:
        # What LocalCluster.register_node writes, as one API call.
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": str(node.underlay_ip)},
                {"type": "Hostname", "address": node.name}]},
        }

    def _write(self, method: str, path: str, body: object = None) -> None:
        response = self.api.request(method, path, body)
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {response.message}")

    def mover_key(self) -> str:
        keys = self.cluster.public_keys()
        return keys[self.mover.name]

    def leave(self, key: str) -> float:
        began = time.monotonic()
        self._write("DELETE", f"/api/v1/nodes/{self.mover.name}")
        _wait(lambda: all(key not in peers for peers in self.keys_of_others()),
              EVENT_TIMEOUT, f"{self.mover.name}'s key gone from every other node")
        return time.monotonic() - began

    def rejoin(self, key: str) -> float:
        began = time.monotonic()
        self._write("POST", "/api/v1/nodes", self.node_body(self.mover))
        _wait(lambda: all(key in peers for peers in self.keys_of_others()),
              EVENT_TIMEOUT, f"{self.mover.name}'s key on every other node")
        return time.monotonic() - began

    def wipe(self) -> None:
        """The machine reinstalled: no daemon, nothing of vpblu left, no key."""
        self.cluster.stop_daemon(self.mover)
        run(*nsenter(self.mover.netns), sys.executable, "-m", "vpblu.cli", "daemon",
            "cleanup", "--remove-key", *self.cluster.daemon_resource_args(self.mover),
            timeout=WIPE_TIMEOUT)

    def new_machine(self, old_key: str) -> RealSample:
        endpoint = f"{self.mover.underlay_ip}:"
        log_start = self.mover.log_path.stat().st_size if self.mover.log_path.exists() else 0

        def new_key_everywhere() -> bool:
            for peers in self.keys_of_others():
                if not any(k != old_key and (ep or "").startswith(endpoint)
                           for k, ep in peers.items()):
                    return False
            return True

        wall = time.time()
        began = time.monotonic()
        self.cluster.start_daemon(self.mover)
        self._write("POST", "/api/v1/nodes", self.node_body(self.mover))
        _wait(new_key_everywhere, EVENT_TIMEOUT,
              f"{self.mover.name}'s new key on every other node")
        total = time.monotonic() - began
        started, hello = _daemon_timeline(self.mover.log_path, log_start, wall)
        return RealSample(len(self.cluster.nodes), "new-machine", total, hello, started)

    def _published_other_than(self, key: str) -> bool:
        return self.cluster.public_keys().get(self.mover.name, key) != key

    def run(self, repeats: int) -> list[RealSample]:
        n = len(self.cluster.nodes)
        samples = []
        for r in range(repeats):
            key = self.mover_key()
            samples.append(RealSample(n, "leave", self.leave(key)))
            samples.append(RealSample(n, "rejoin", self.rejoin(key)))
            self.leave(key)  # not timed: the machine goes away for good
            self.wipe()
            joined = self.new_machine(key)
            samples.append(joined)
            # The new key reaches the VpbluNode's status too before the next round.
            self.cluster.wait_for(functools.partial(self._published_other_than, key),
                                  EVENT_TIMEOUT, "the new key published")
            self.say(f"  N={n} round {r + 1}/{repeats}: " + ", ".join(
                f"{s.event} {s.seconds * 1e3:.0f} ms" for s in samples[-3:])
                + _timeline(joined))
        return samples


def _daemon_timeline(log_path: Path, offset: int, wall: float
                     ) -> tuple[float | None, float | None]:
    """Seconds from `wall` to the daemon's first log line (the interpreter
    started and the imports done) and to its first 'mesh stream ... open' (its
    Hello sent) that was not answered by a follower's redirect (the Hello the
    leader took), read after byte `offset` of its log (asctime: milliseconds)."""
    try:
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None, None
    first: float | None = None
    # Stream opens and follower redirects, in order: (address, seconds, is_open).
    events: list[tuple[str, float, bool]] = []
    for line in text.splitlines():
        try:
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if first is None:
            first = at - wall
        if HELLO_MARK in line and line.rstrip().endswith(" open"):
            address = line.rstrip().removesuffix(" open").rsplit(HELLO_MARK, 1)[1]
            events.append((address, at - wall, True))
        elif FOLLOWER_MARK in line:
            address = line.split("controller at ", 1)[-1].split(FOLLOWER_MARK, 1)[0]
            events.append((address, at - wall, False))
    for i, (address, seconds, is_open) in enumerate(events):
        after = events[i + 1] if i + 1 < len(events) else None
        if is_open and not (after is not None and not after[2] and after[0] == address):
            return first, seconds
    return first, None


def _timeline(sample: RealSample) -> str:
    parts = []
    if sample.imported_seconds is not None:
        parts.append(f"first log line {sample.imported_seconds * 1e3:.0f} ms")
    if sample.hello_seconds is not None:
        parts.append(f"Hello {sample.hello_seconds * 1e3:.0f} ms")
    return f" ({', '.join(parts)} after the start)" if parts else ""


def _pairs(cluster: LocalCluster) -> list[tuple[Pod, Pod]]:
    others = [n for n in cluster.nodes[:-1] if n.pods]
    pairs = [(others[i].pods[0], others[i + 1].pods[0]) for i in range(0, len(others) - 1, 2)]
    if len(others) >= 2 and not pairs:
        pairs = [(others[0].pods[0], others[1].pods[0])]
    return pairs[:MAX_PROBE_PAIRS]


def run_size(n: int, repeats: int, say: Callable[[str], None],
             logs: Path | None = None) -> RealRun:
    settings = ClusterSettings(nodes=n, pods_per_node=1, kube_proxy=False, log_level="INFO")
    with ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster.start(settings, progress=lambda m: say(
            f"  N={n}: {m}")))
        cluster.apply_kustomize(KUSTOMIZE_SAMPLES)
        cluster.wait_for(cluster.mesh_complete, MESH_TIMEOUT, "a complete FullMesh")
        api = stack.enter_context(cluster.env.connection())
        pairs = _pairs(cluster)
        say(f"  N={n}: mesh complete; {len(pairs)} probed pair(s) among the other nodes")
        try:
            with probes(cluster, pairs) as results:
                samples = RealStack(cluster, api, say).run(repeats)
        finally:
            if logs is not None:
                # The controllers' and daemons' logs, for reading where the time went.
                target = logs / f"N{n}"
                target.mkdir(parents=True, exist_ok=True)
                for path in cluster.dir.glob("*.log"):
                    shutil.copy(path, target / path.name)
        sent = sum(int(r["sent"]) for r in results)
        missing = sum(int(r["missing_count"]) for r in results)
        errors = sum(int(r["send_errors"]) for r in results)
        return RealRun(n, tuple(samples), len(results), sent, missing, errors)


def table(runs: Sequence[RealRun], cal: Calibration) -> str:
    lines = ["real stack (LocalCluster: kube-apiserver, 2 controllers, wireguard-go and "
             "eBPF daemons; triggers are direct API writes)",
             cal.describe(),
             f"{'N':>4} {'event':<12} {'runs':>4} {'median':>9} {'min':>9} {'max':>9}"
             " Hello share of it (ms from the start)"]
    for r in runs:
        for event in ("new-machine", "rejoin", "leave"):
            xs = [s for s in r.samples if s.event == event]
            if not xs:
                continue
            secs = sorted(s.seconds for s in xs)
            share = ""
            hellos = [s.hello_seconds / s.seconds for s in xs
                      if s.hello_seconds is not None and s.seconds > 0]
            if hellos:
                hello_ms = statistics.median(s.hello_seconds or 0.0 for s in xs)
                share = f"{statistics.median(hellos) * 100:.0f}% ({hello_ms * 1e3:.0f} ms)"
                imported = [s.imported_seconds for s in xs if s.imported_seconds is not None]
                if imported:
                    share += (f"; first log line at {statistics.median(imported) * 1e3:.0f} ms"
                              " (interpreter and imports)")
            lines.append(f"{r.size:>4} {event:<12} {len(xs):>4} "
                         f"{statistics.median(secs) * 1e3:>7.0f}ms {secs[0] * 1e3:>7.0f}ms "
                         f"{secs[-1] * 1e3:>7.0f}ms {share}")
        lines.append(f"{r.size:>4} loss between uninvolved nodes: {r.datagrams_missing} of "
                     f"{r.datagrams_sent} datagrams missing, {r.send_errors} send errors "
                     f"({r.probes} probes at {UDP_RATE:.0f}/s)")
    return "\n".join(lines)


def main(sizes: Sequence[int], repeats: int, out: Path,
         logs: Path | None = None) -> list[RealRun]:
    """Run the scenario at every size, print the table, write a JSON file into
    `out` (and every process's log into `logs`/N<size>/ when given)."""
    def say(text: str) -> None:
        print(text, flush=True)

    cal = calibration()
    say(cal.describe())
    runs = []
    for n in sizes:
        if n < 3:
            raise ValueError("the real-stack scenario needs N >= 3 (two uninvolved nodes)")
        say(f"real stack N={n}: starting the local cluster...")
        runs.append(run_size(n, repeats, say, logs))
    after = calibration()
    print()
    print(table(runs, cal))
    print(f"after the run: {after.describe()}")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"realstack-{stamp}.json"
    path.write_text(json.dumps({
        "when": stamp, "calibration": attrs.asdict(cal), "calibration_after": attrs.asdict(after),
        "runs": [attrs.asdict(r) for r in runs]}, indent=1))
    print(f"wrote {path}")
    return runs
