"""Benchmark of the pure core (vpblu.core.desiredstate): not a test, a measurement.

Run: `python bench/desiredstate.py`. Prints, as medians of several runs:
compute() for a FullMesh of N nodes (every state built), and the join path
a StateActor takes when one node joins an N-node FullMesh - recompute() of
the new snapshot against the previous result, which yields every node's
changes - for N = 100, 300, 1000, with the number of changes it produced.
"""

from __future__ import annotations

import base64
import statistics
import sys
import time
from collections.abc import Callable

from vpblu.core.desiredstate import DesiredResult, compute, recompute
from vpblu.core.model import ClusterSnapshot, NodeInfo, TunnelPolicy

RUNS = 7
SIZES = (100, 300, 1000)


def _node(i: int) -> NodeInfo:
    return NodeInfo(
        name=f"node-{i:05d}",
        internal_ip=f"172.16.{i // 250}.{i % 250 + 1}",
        pod_cidrs=(f"10.{i // 256}.{i % 256}.0/24",),
        public_key=base64.b64encode(i.to_bytes(4, "big") * 8).decode(),
    )


def _snapshot(n: int) -> ClusterSnapshot:
    return ClusterSnapshot(
        nodes=[_node(i) for i in range(n)], tunnel_policies=[TunnelPolicy("mesh")]
    )


def _median(run: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    base = _snapshot(1000)
    t = _median(lambda: compute(base))
    print(f"compute, FullMesh, N=1000 (all 1000 states): {t * 1e3:8.1f} ms")
    print("join of one node into an N-node FullMesh (recompute -> per-node changes):")
    print(f"{'N':>6} {'recompute ms':>13} {'changes':>8} {'nodes changed':>14} {'us per node':>12}")
    for n in SIZES:
        before = _snapshot(n)
        previous: DesiredResult = compute(before)
        after = ClusterSnapshot(
            nodes=[*before.nodes, _node(n)], tunnel_policies=before.tunnel_policies
        )
        t = _median(lambda p=previous, a=after: recompute(p, a))  # type: ignore[misc]
        joined = recompute(previous, after)
        count = sum(len(c) for c in joined.changes.values())
        print(f"{n:>6} {t * 1e3:>13.2f} {count:>8} {len(joined.changes):>14} {t / n * 1e6:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
