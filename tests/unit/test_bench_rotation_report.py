"""The benchmark's rotation line: what was rotated, per-node time and controller
CPU, and the whole cluster extrapolated (saying so when only a sample was)."""

from __future__ import annotations

from vpblu.core.model import DEFAULT_MAX_CONCURRENT
from vpblu.lab.bench import Summary, table


def _rotation(n: int, p50_ms: float, cpu_ms: float) -> Summary:
    return Summary("rotation", n, "delta", 1, p50_ms, p50_ms, p50_ms, 10.0, 1024.0, cpu_ms)


def test_a_sampled_rotation_says_so_and_extrapolates_time_and_cpu() -> None:
    text = table([_rotation(1000, 40_000.0, 36_000.0)], {}, {"delta-1000": 20}, 1)
    [line] = [ln for ln in text.splitlines() if ln.startswith("rotation N=1000")]
    assert "SAMPLED: 20 of 1000 nodes rotated, extrapolated x50" in line
    assert "maxConcurrent 1: one node at a time" in line
    assert "2000 ms and 1800 ms of controller CPU per rotated node" in line
    assert "the whole cluster ~2000 s (33.3 min), controller CPU ~1800 s" in line


def test_a_full_rotation_is_measured_not_extrapolated() -> None:
    text = table([_rotation(100, 27_000.0, 20_000.0)], {}, {"delta-100": 100})
    [line] = [ln for ln in text.splitlines() if ln.startswith("rotation N=100")]
    assert "measured: every node rotated" in line and "SAMPLED" not in line
    assert "the whole cluster ~27 s (0.5 min)" in line


def test_the_default_concurrency_is_named_when_no_policy_set_it() -> None:
    text = table([_rotation(1000, 4_000.0, 36_000.0)], {}, {"delta-1000": 24})
    [line] = [ln for ln in text.splitlines() if ln.startswith("rotation N=1000")]
    assert f"maxConcurrent {DEFAULT_MAX_CONCURRENT} (the default, no policy)" in line
    assert "SAMPLED: 24 of 1000 nodes rotated" in line
