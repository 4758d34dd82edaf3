"""Benchmark of the pure core (vpblu.core.desiredstate): not a test, a measurement.

Run: `python bench/desiredstate.py`. Prints, as medians of several runs:
compute() for a FullMesh of N nodes (every state built), and the join path
a StateActor takes when one node joins an N-node FullMesh - recompute() of
the new snapshot against the previous result, which yields every node's
changes - for N = 100, 300, 1000, with the number of changes it produced.

Then one RoutePolicy of 4096 routes (issue 16: "4096 routes recompute in
< 50 ms"): random parts of random nodes' pod CIDRs via random nodes, so
many of them nest, overlap and conflict, in a 100-node FullMesh. It times
the route resolution alone (`_overrides`, quadratic before), a whole
compute() and a recompute() after one node changed, and a calibration loop:
a fixed piece of pure Python whose time says how fast this machine was
while it ran, so figures from a loaded machine can be read against it
(each figure is also given in calibration units).
"""

from __future__ import annotations

import base64
import random
import statistics
import sys
import time
from collections.abc import Callable

from vpblu.core.desiredstate import DesiredResult, _Findings, _overrides, compute, recompute
from vpblu.core.model import ClusterSnapshot, NodeInfo, RouteOverride, RoutePolicy, TunnelPolicy

RUNS = 7
SIZES = (100, 300, 1000)
ROUTES = 4096
ROUTE_NODES = 100
ROUTE_SEED = 16
CALIBRATION_ITERATIONS = 1_000_000


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


def _calibration() -> None:
    total = 0
    for i in range(CALIBRATION_ITERATIONS):
        total += i & 7


def _route_snapshot() -> ClusterSnapshot:
    rnd = random.Random(ROUTE_SEED)
    nodes = [_node(i) for i in range(ROUTE_NODES)]
    routes = []
    for _ in range(ROUTES):
        pod = rnd.choice(nodes).pod_cidrs[0]
        prefix = rnd.randint(25, 32)
        index = rnd.randrange(1 << (prefix - pod.prefixlen))
        cidr = f"{pod.network_address + (index << (32 - prefix))}/{prefix}"
        routes.append(RouteOverride(cidr, rnd.choice(nodes).name))
    return ClusterSnapshot(nodes=nodes, tunnel_policies=[TunnelPolicy("mesh")],
                           route_policies=[RoutePolicy("many", routes=routes)])


def _routes(calibration: float) -> None:
    snapshot = _route_snapshot()
    nodes = {n.name: n for n in snapshot.nodes}
    policies = snapshot.route_policies
    empty: frozenset[str] = frozenset()
    accepted = len(_overrides(policies, nodes, empty, empty, (), _Findings()))
    previous = compute(snapshot)
    changed = ClusterSnapshot(nodes=[*snapshot.nodes[1:], _node(ROUTE_NODES)],
                              tunnel_policies=snapshot.tunnel_policies,
                              route_policies=snapshot.route_policies)
    figures = [
        ("_overrides (route resolution)",
         _median(lambda: _overrides(policies, nodes, empty, empty, (), _Findings()))),
        ("compute (every state)", _median(lambda: compute(snapshot))),
        ("recompute (a node left, one joined)",
         _median(lambda: recompute(previous, changed))),
    ]
    print(f"RoutePolicy of {ROUTES} routes ({accepted} accepted), FullMesh, N={ROUTE_NODES}:")
    for name, t in figures:
        print(f"  {name:<38} {t * 1e3:8.1f} ms  {t / calibration:6.2f} calibration units")


def main() -> int:
    calibration = _median(_calibration)
    print(f"calibration loop ({CALIBRATION_ITERATIONS} iterations): {calibration * 1e3:.1f} ms")
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
    _routes(calibration)
    print(f"calibration loop, again: {_median(_calibration) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
