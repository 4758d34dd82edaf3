"""`python -m vpblu.lab.bench` end to end, small: its own API server, the real
controller process and simulated daemons; every scenario measured, the table,
the JSON and the plot written, and nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vpblu.lab.bench import SCENARIOS
from vpblu.lab.testenv import REPO

pytestmark = pytest.mark.integration

BENCH_TIMEOUT = 300


def test_a_quick_run_measures_every_scenario_and_writes_its_results(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vpblu.lab.bench", "--sizes", "3", "--quick", "--compare",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [result] = tmp_path.glob("bench-*.json")
    data = json.loads(result.read_text())
    rows = {(s["scenario"], s["mode"]): s for s in data["summaries"]}
    assert set(rows) == {(scenario, mode) for scenario in SCENARIOS
                         for mode in ("delta", "full")}
    for row in rows.values():
        assert row["n"] == 3
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["messages"] > 0 and row["bytes"] > 0
    # A join is one new peer for each of the 3 members: the delta carries
    # that peer, the whole-state push carries all of them.
    assert rows[("join", "delta")]["bytes"] < rows[("join", "full")]["bytes"]
    assert data["peak_rss_bytes"]["delta-3"] > 0
    assert list(tmp_path.glob("bench-*.png"))
    assert "scenario" in run.stdout and "controller peak RSS" in run.stdout


def test_sigterm_stops_the_telemetry_scenario_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM while a side's controller runs: the run ends (exit 130) with its
    API servers, controller processes and work directories gone. Before, the
    KeyboardInterrupt landed in trio-asyncio's loop and the run hung."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    bench = subprocess.Popen(
        [sys.executable, "-m", "vpblu.lab.bench", "--sizes", "", "--telemetry", "3",
         "--telemetry-window", "5", "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(temp)})
    try:
        assert bench.stdout is not None
        for line in bench.stdout:
            if "forming the mesh" in line:
                break
        else:
            pytest.fail("the telemetry scenario never formed a mesh")
        bench.send_signal(signal.SIGTERM)
        rest, _ = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130, rest[-2000:]
    assert "everything started was stopped" in rest
    left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True,
                          check=False).stdout.split()
    assert left == [], f"processes still running from {temp}: {left}"
    assert list(temp.iterdir()) == []
    assert not list(tmp_path.glob("telemetry-*.json"))
