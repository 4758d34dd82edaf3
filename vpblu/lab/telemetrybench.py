"""The telemetry scenario: `python -m vpblu.bench --sizes '' --telemetry 1000`.

What telemetry costs the controller, and what a quiet mesh writes to the API
server (issue 18's goals: 0 status writes per minute once a quiet mesh has
settled; controller CPU and RSS less than 10 % above the same run without
telemetry).

Per size it sets up the same thing twice, with telemetry and without (the
simulated daemons of vpblu.lab.sim send their Telemetry on every heartbeat
and on change, or send none), each with a fresh controller process on a test
API server of its own (vpblu.lab.testenv), its metrics on a loopback port,
and measures both over one quiet window (step 5):

1. N simulated daemons connect and apply their first SyncState, every key is
   in the API and the controller is quiet again;
2. formation: a FullMesh TunnelPolicy is created, timed until every daemon
   holds every peer (controller CPU seconds for it);
3. with telemetry, until every VpbluNode is Ready with n-1/n-1 peers;
4. settle: until the controller made no status write for `settle_quiet`
   seconds (longer than the HealthActor's 30 s update pace), bounded;
5. the quiet window, both sides at once, once neither has written a status
   for `settle_quiet` seconds and the new applied generations' deferred
   writes (5 minutes after the formation) are behind both:
   `window` seconds with nothing happening but heartbeats (every daemon
   beats every 30 s, jittered). Measured over it, per side: status writes
   (the controller's vpblu_status_writes_total, every write that reached the
   API server), telemetry messages received, controller CPU seconds; RSS
   (VmRSS) at its end and the process's peak (VmHWM).

Figures from these shared 2-core machines compare only within a run and
through the CPU calibration printed before and after (the real-stack
scenario's fixed loop). The two sides share their quiet window because the
host's speed drifts: run one after the other, the same side's quiet CPU
differed by a quarter between runs, about what telemetry costs. The
simulated daemons run in the benchmark's own process, so the controller's CPU
is its own.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from vpblu import aioloop
from vpblu.actors.health import GENERATION_INTERVAL
from vpblu.lab.interrupt import cancel_on_signal
from vpblu.lab.quiet import quiesce
from vpblu.lab.realstack import calibration
from vpblu.lab.sim import MeshPki, SimCluster, is_full_mesh
from vpblu.lab.testenv import REPO, TestEnv, free_port, install_base, spawn_child

CONTROLLER_START_TIMEOUT = 60.0
# One whole period of the daemons' refreshes (telemetryreport.FULL_REFRESH):
# a thousand nodes whose lists were whole together refresh together, and a
# shorter window measured either all of their refreshes or none.
QUIET_WINDOW = 300.0
SETTLE_QUIET = 40.0
SETTLE_TIMEOUT = 900.0
FORMATION_TIMEOUT = 900.0
READY_TIMEOUT = 600.0
POLL = 1.0
SCRAPE_TIMEOUT = 10.0
# Before the formation, the controller is let finish registering (as the
# main benchmark's quiesce): at most this share of a core over a step.
QUIET_SHARE = 0.1
QUIET_STEP = 2.0
QUIET_MAX = 120.0
KEEPALIVE_TIMEOUT = 120.0  # vpblu.lab.bench.BENCH_KEEPALIVE_TIMEOUT
MESH_PATH = "/apis/vpblu.io/v1alpha1/tunnelpolicies"
MESH_NAME = "telemetry-bench-mesh"
MESH = {"apiVersion": "vpblu.io/v1alpha1", "kind": "TunnelPolicy",
        "metadata": {"name": MESH_NAME}, "spec": {"mode": "FullMesh"}}


@attrs.frozen(slots=True)
class TelemetryRun:
    n: int
    telemetry: bool
    formation_seconds: float
    formation_cpu_seconds: float
    ready_seconds: float | None  # until every node Ready n-1/n-1 (telemetry only)
    settle_seconds: float  # until status writes stopped
    status_writes_settling: float  # during formation, readiness and settling
    window_seconds: float
    status_writes_per_minute: float  # in the quiet window
    telemetry_per_minute: float
    quiet_cpu_seconds: float  # controller CPU over the quiet window
    quiet_cpu_share: float  # of one core
    rss_bytes: int  # VmRSS at the end of the window
    peak_rss_bytes: int  # VmHWM
    # The highest VmRSS sampled in each phase (register, formation, ready,
    # settle, window): where the peak came from.
    peak_rss_by_phase: dict[str, int] = attrs.field(factory=dict)


class MeteredController:
    """`python -m vpblu controller` as a child process (dies with the benchmark),
    measured through /proc, its /metrics on a loopback port. (vpblu.lab.bench
    imports this module, so its ControllerProcess is not reused here.)"""

    def __init__(self, spawner: ThreadPoolExecutor, env: TestEnv, pki: MeshPki, port: int,
                 metrics_port: int, log_path: Path) -> None:
        args = [
            sys.executable, "-m", "vpblu",
            "--log-level", "WARNING", "controller",
            "--kubeconfig", str(env.kubeconfig_path),
            "--listen", f"127.0.0.1:{port}", "--advertise", f"127.0.0.1:{port}",
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--dashboard-addr", "",  # not measured here (and :8082 may be taken)
            # As vpblu.lab.bench's controller: a thousand simulated daemons in
            # one loaded process go silent past the 15 s default while they
            # connect, and every connection would be aborted and re-made.
            "--keepalive-timeout", str(KEEPALIVE_TIMEOUT),
        ]
        self.child = spawn_child(spawner, "controller", args, log_path, REPO)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def rss(self) -> int:
        return self._status_kib("VmRSS:")

    def peak_rss(self) -> int:
        return self._status_kib("VmHWM:")

    def stop(self) -> None:
        self.child.stop()

    async def wait_listening(self, port: int) -> None:
        with trio.fail_after(CONTROLLER_START_TIMEOUT):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    if self.child.exited():
                        raise RuntimeError(
                            f"the controller exited:\n{self.child.log_tail()}") from None
                    await trio.sleep(0.1)
                    continue
                await stream.aclose()
                return

    def scrape(self) -> dict[str, float]:
        """The unlabelled samples of the controller's /metrics, by name."""
        with urllib.request.urlopen(self.metrics_url, timeout=SCRAPE_TIMEOUT) as answer:
            text = answer.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                values[name] = float(value)
        return values


async def _scrape(controller: MeteredController) -> dict[str, float]:
    return await trio.to_thread.run_sync(controller.scrape)


async def _writes(controller: MeteredController) -> float:
    return (await _scrape(controller))["vpblu_status_writes_total"]


async def _all_ready(env: TestEnv, names: Sequence[str]) -> bool:
    answer = await trio.to_thread.run_sync(env.request, "GET",
                                           "/apis/vpblu.io/v1alpha1/vpblunodes")
    full = f"{len(names) - 1}/{len(names) - 1}"
    ready = set()
    for obj in answer.body.get("items", []):
        status = obj.get("status") or {}
        if status.get("peers") == full and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ()):
            ready.add(obj["metadata"]["name"])
    return ready >= set(names)


async def _keys_published(env: TestEnv, cluster: SimCluster, names: Sequence[str]) -> None:
    """Until every VpbluNode's status.publicKey is its daemon's key."""
    while True:
        answer = await trio.to_thread.run_sync(
            env.request, "GET", "/apis/vpblu.io/v1alpha1/vpblunodes")
        keys = {o["metadata"]["name"]: (o.get("status") or {}).get("publicKey")
                for o in answer.body.get("items", [])}
        if all(keys.get(name) == cluster.daemons[name].public_key for name in names):
            return
        await trio.sleep(POLL)


RSS_SAMPLE = 0.5


class _PhasePeaks:
    """The controller's VmRSS every RSS_SAMPLE seconds, the highest per phase."""

    def __init__(self, controller: MeteredController) -> None:
        self._controller = controller
        self.phase = "register"
        self.peaks: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            rss = self._controller.rss()
            if rss > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = rss
            await trio.sleep(RSS_SAMPLE)

    def describe(self) -> str:
        return ", ".join(f"{phase} {rss / 2**20:.0f}" for phase, rss in self.peaks.items())


@attrs.define
class _Prepared:
    """One side of the pair, formed and settled, its quiet window still to come."""

    label: str
    n: int
    telemetry: bool
    controller: MeteredController
    formation: float
    formation_cpu: float
    ready_seconds: float | None
    settle: float
    writes_settling: float
    peaks: _PhasePeaks
    formed_at: float  # trio time the mesh was whole


@asynccontextmanager
async def _prepared(env: TestEnv, workdir: Path, spawner: ThreadPoolExecutor, n: int,
                    telemetry: bool, settle_quiet: float,
                    say: Callable[[str], None]) -> AsyncIterator[_Prepared]:
    """Steps 1-4 (see the module docstring) on `env`; the controller and the
    daemons keep running until the block ends."""
    label = f"N={n} telemetry {'on' if telemetry else 'off'}"
    directory = workdir / f"telemetry-{int(telemetry)}-{n}"
    pki = MeshPki.create(directory / "pki")
    port = free_port()
    controller = MeteredController(spawner, env, pki, port, free_port(),
                                   directory / "controller.log")
    peaks = _PhasePeaks(controller)
    try:
        await controller.wait_listening(port)
        async with trio.open_nursery() as watching, \
                SimCluster.open(env, directory / "nodes", pki.client,
                                   (f"127.0.0.1:{port}",), n, prefix=f"t{int(telemetry)}{n}",
                                   keep_history=False, telemetry=telemetry) as cluster:
            watching.start_soon(peaks.run)
            names = sorted(cluster.daemons)
            with trio.fail_after(FORMATION_TIMEOUT):
                await cluster.wait_all(lambda d: d.applier.current is not None, names)
                # Every key in the API and the controller done with it: a formation
                # that began while keys were still being published timed their
                # recomputes too (41-56 % of its samples, with telemetry or without).
                await _keys_published(env, cluster, names)
            await quiesce(controller, window=QUIET_STEP, share=QUIET_SHARE, limit=QUIET_MAX)
            say(f"  {label}: {n} daemons connected; forming the mesh...")
            peaks.phase = "formation"
            cpu0, began = controller.cpu_seconds(), trio.current_time()
            await trio.to_thread.run_sync(env.request, "POST", MESH_PATH, MESH)
            with trio.fail_after(FORMATION_TIMEOUT):
                await cluster.wait_all(is_full_mesh(cluster, names), names)
            formed_at = trio.current_time()
            formation = formed_at - began
            formation_cpu = controller.cpu_seconds() - cpu0
            say(f"  {label}: full mesh in {formation:.1f} s ({formation_cpu:.1f} s CPU)")
            ready_seconds = None
            peaks.phase = "ready"
            if telemetry:
                with trio.fail_after(READY_TIMEOUT):
                    while True:  # polled: the API server is the only place it shows
                        if await _all_ready(env, names):
                            break
                        await trio.sleep(POLL * 2)
                ready_seconds = trio.current_time() - began
                say(f"  {label}: every VpbluNode Ready {n - 1}/{n - 1} "
                    f"{ready_seconds:.1f} s after the TunnelPolicy")
            peaks.phase = "settle"
            with trio.fail_after(SETTLE_TIMEOUT):
                last, = await _no_writes_for([controller], settle_quiet)
            settle = trio.current_time() - began
            say(f"  {label}: no status write for {settle_quiet:.0f} s, {settle:.0f} s after "
                f"the TunnelPolicy ({last:.0f} writes so far)")
            yield _Prepared(label, n, telemetry, controller, formation, formation_cpu,
                            ready_seconds, settle, last, peaks, formed_at)
            watching.cancel_scope.cancel()
            await trio.to_thread.run_sync(env.request, "DELETE",
                                          f"{MESH_PATH}/{MESH_NAME}")
    finally:
        controller.stop()


async def _settled_together(sides: Sequence[_Prepared], settle_quiet: float,
                            say: Callable[[str], None]) -> None:
    """Until no side has made a status write for `settle_quiet` seconds, and
    not before every side's deferred writes of its nodes' new applied
    generation (GENERATION_INTERVAL after its formation) are due and done: the
    side set up first was quiet for 40 s, then wrote 1000 of them at the
    bucket's rate inside the shared window (244 a minute, its CPU with them)."""
    not_before = max(p.formed_at for p in sides) + GENERATION_INTERVAL
    if not_before > trio.current_time():
        say(f"  waiting {not_before - trio.current_time():.0f} s for the deferred "
            "generation writes...")
    with trio.fail_after(SETTLE_TIMEOUT + GENERATION_INTERVAL):
        await _no_writes_for([p.controller for p in sides], settle_quiet,
                             not_before=not_before)


async def _no_writes_for(controllers: Sequence[MeteredController], quiet: float, *,
                         not_before: float = -math.inf) -> list[float]:
    """Until none of `controllers` made a status write for `quiet` seconds (and
    not before `not_before`, trio time); their status writes so far."""
    last = [await _writes(c) for c in controllers]
    since = trio.current_time()
    while trio.current_time() < not_before or trio.current_time() - since < quiet:
        await trio.sleep(POLL)
        now = [await _writes(c) for c in controllers]
        if now != last:
            last, since = now, trio.current_time()
    return last


async def _quiet_window(sides: Sequence[_Prepared], window: float,
                        say: Callable[[str], None]) -> list[TelemetryRun]:
    """Step 5 for every side at once: the same `window` seconds of the same
    host, so a host that runs slower for a while (the same command's quiet
    CPU differed by a quarter between runs an hour apart, and the CPU
    calibration by as much) slows both sides alike."""
    say(f"  quiet window {window:.0f} s, {' and '.join(p.label for p in sides)} at once...")
    for p in sides:
        p.peaks.phase = "window"
    before = [await _scrape(p.controller) for p in sides]
    cpu0 = [p.controller.cpu_seconds() for p in sides]
    w0 = trio.current_time()
    await trio.sleep(window)
    cpu = [p.controller.cpu_seconds() - c for p, c in zip(sides, cpu0, strict=True)]
    elapsed = trio.current_time() - w0
    after = [await _scrape(p.controller) for p in sides]
    per_minute = 60.0 / elapsed
    runs = []
    for p, b, a, c in zip(sides, before, after, cpu, strict=True):

        def delta(name: str, b: dict[str, float] = b, a: dict[str, float] = a) -> float:
            return a.get(name, 0.0) - b.get(name, 0.0)

        run = TelemetryRun(
            n=p.n, telemetry=p.telemetry, formation_seconds=round(p.formation, 2),
            formation_cpu_seconds=round(p.formation_cpu, 2),
            ready_seconds=None if p.ready_seconds is None else round(p.ready_seconds, 1),
            settle_seconds=round(p.settle, 1),
            status_writes_settling=p.writes_settling,
            window_seconds=round(elapsed, 1),
            status_writes_per_minute=round(delta("vpblu_status_writes_total") * per_minute, 2),
            telemetry_per_minute=round(delta("vpblu_telemetry_received_total") * per_minute, 1),
            quiet_cpu_seconds=round(c, 2), quiet_cpu_share=round(c / elapsed, 4),
            rss_bytes=p.controller.rss(), peak_rss_bytes=p.controller.peak_rss(),
            peak_rss_by_phase=dict(p.peaks.peaks))
        say(f"  {p.label}: {run.status_writes_per_minute} status writes/min, "
            f"{run.telemetry_per_minute} telemetry msgs/min, controller CPU "
            f"{c:.2f} s ({100 * run.quiet_cpu_share:.1f} % of a core), RSS "
            f"{run.rss_bytes / 2**20:.0f} MiB (peak {run.peak_rss_bytes / 2**20:.0f} MiB; "
            f"MiB by phase: {p.peaks.describe()})")
        runs.append(run)
    return runs


def _ratio(on: float, off: float) -> str:
    if off <= 0:
        return "n/a"
    return f"{100 * (on / off - 1):+.1f} %"


def table(runs: Sequence[TelemetryRun]) -> str:
    lines = [f"{'N':>5} {'telemetry':>9} {'form s':>7} {'form CPU s':>10} {'ready s':>8} "
             f"{'writes/min':>10} {'tlm/min':>8} {'quiet CPU s':>11} {'RSS MiB':>8} "
             f"{'peak MiB':>8}"]
    for r in runs:
        lines.append(f"{r.n:>5} {'on' if r.telemetry else 'off':>9} {r.formation_seconds:>7.1f} "
                     f"{r.formation_cpu_seconds:>10.2f} "
                     f"{'-' if r.ready_seconds is None else f'{r.ready_seconds:.1f}':>8} "
                     f"{r.status_writes_per_minute:>10.2f} {r.telemetry_per_minute:>8.0f} "
                     f"{r.quiet_cpu_seconds:>11.2f} {r.rss_bytes / 2**20:>8.0f} "
                     f"{r.peak_rss_bytes / 2**20:>8.0f}")
    by_n: dict[int, dict[bool, TelemetryRun]] = {}
    for r in runs:
        by_n.setdefault(r.n, {})[r.telemetry] = r
    for n, pair in sorted(by_n.items()):
        if True in pair and False in pair:
            on, off = pair[True], pair[False]
            lines.append(
                f"N={n} telemetry on vs off: quiet CPU "
                f"{_ratio(on.quiet_cpu_seconds, off.quiet_cpu_seconds)}, formation CPU "
                f"{_ratio(on.formation_cpu_seconds, off.formation_cpu_seconds)}"
                f", RSS {_ratio(on.rss_bytes, off.rss_bytes)}"
                f", peak RSS {_ratio(on.peak_rss_bytes, off.peak_rss_bytes)}")
    return "\n".join(lines)


async def _run_all(envs: tuple[TestEnv, TestEnv], workdir: Path, spawner: ThreadPoolExecutor,
                   sizes: Sequence[int], window: float, settle_quiet: float,
                   say: Callable[[str], None]) -> list[TelemetryRun]:
    """Per size: the side without telemetry formed and settled first (so the
    one with it cannot be helped by a warmer machine), then the one with it,
    each with a fresh controller and fresh daemons on an API server of its
    own (two controllers on one would contend for the leader's Lease and
    both see every node); then both measured over one quiet window."""
    runs = []
    async with trio.open_nursery() as nursery:
        # Ctrl-C and SIGTERM cancel the run, which then cleans up in order.
        interrupted = await nursery.start(cancel_on_signal, nursery.cancel_scope)
        async with aioloop.open_loop():
            for n in sizes:
                async with AsyncExitStack() as stack:
                    sides = [await stack.enter_async_context(
                        _prepared(env, workdir, spawner, n, telemetry, settle_quiet, say))
                        for env, telemetry in zip(envs, (False, True), strict=True)]
                    await _settled_together(sides, settle_quiet, say)
                    runs.extend(await _quiet_window(sides, window, say))
        nursery.cancel_scope.cancel()
    if interrupted.is_set():
        raise KeyboardInterrupt
    return runs


def main(sizes: Sequence[int], out: Path, *, window: float = QUIET_WINDOW,
         settle_quiet: float = SETTLE_QUIET) -> list[TelemetryRun]:
    """Run the scenario at every size, print the table and write a JSON file into `out`."""

    def say(text: str) -> None:
        print(text, flush=True)

    cal = calibration()
    say(cal.describe())
    with TestEnv.start() as env_off, TestEnv.start() as env_on, \
            tempfile.TemporaryDirectory(prefix="vpblu-bench-") as d, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpblu-bench-spawner") as sp:
        install_base(env_off)
        install_base(env_on)
        runs = trio.run(_run_all, (env_off, env_on), Path(d), sp, sizes, window, settle_quiet,
                        say)
    after = calibration()
    print()
    print(table(runs))
    print(f"before the run: {cal.describe()}")
    print(f"after the run: {after.describe()}")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"telemetry-{stamp}.json"
    result: dict[str, Any] = {
        "when": stamp, "calibration": attrs.asdict(cal),
        "calibration_after": attrs.asdict(after), "window_seconds": window,
        "settle_quiet_seconds": settle_quiet, "runs": [attrs.asdict(r) for r in runs]}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return runs
