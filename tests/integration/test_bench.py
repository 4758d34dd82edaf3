"""`python -m vpblu.lab.bench` end to end, small: its own API server, the real
controller process and simulated daemons; every scenario measured, the table,
the JSON and the plot written, and nothing left running."""

from __future__ import annotations

import json
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
