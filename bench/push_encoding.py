"""What it costs the controller to encode its pushes, plain codec vs PushEncoder.

`python bench/push_encoding.py [peers] [runs]`: (1) one SyncState with
`peers` peers and a route through each (default 1000, a FullMesh node's
state): plain `codec` + SerializeToString, then `PushEncoder` cold (empty
cache) and warm; (2) one PeerAdded + RouteAdded Delta encoded for each of
`peers` sessions, as the controller does when a node joins.
Prints the median of `runs` (default 7) in milliseconds.
"""

from __future__ import annotations

import base64
import statistics
import sys
import time
from collections.abc import Callable

from vpblu.core import wire
from vpblu.core.model import Endpoint, NodeDesiredState, Peer, PeerAdded, Route, RouteAdded
from vpblu.stream import codec
from vpblu.stream.pushencoder import PushEncoder


def peer(i: int) -> Peer:
    key = base64.b64encode(i.to_bytes(32, "big")).decode()
    return Peer(f"node-{i:05d}", key, Endpoint(f"10.{i >> 8 & 255}.{i & 255}.1", 51820),
                (f"10.{128 + (i >> 8 & 63)}.{i & 255}.0/24",), 25)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    peers = [peer(i) for i in range(n)]
    routes = [Route(p.allowed_ips[0], p.name) for p in peers]
    sync = wire.SyncState(42, NodeDesiredState("node-x", peers=peers, routes=routes))
    joined = peer(n)
    delta = wire.Delta(43, 42, (PeerAdded(joined), RouteAdded(Route(joined.allowed_ips[0],
                                                                    joined.name))))

    plain_sync = median_ms(lambda: codec.encode_controller_message(sync).SerializeToString(), runs)
    cold_sync = median_ms(lambda: PushEncoder().encode(sync), runs)
    warm = PushEncoder()
    warm.encode(sync)
    warm_sync = median_ms(lambda: warm.encode(sync), runs)
    assert warm.encode(sync) == codec.encode_controller_message(sync).SerializeToString()

    def plain_fanout() -> None:
        for _ in range(n):
            codec.encode_controller_message(delta).SerializeToString()

    def fast_fanout() -> None:
        encoder = PushEncoder()
        for _ in range(n):
            encoder.encode(delta)

    print(f"SyncState, {n} peers: plain {plain_sync:.2f} ms, "
          f"PushEncoder cold {cold_sync:.2f} ms, warm {warm_sync:.2f} ms "
          f"({plain_sync / warm_sync:.0f}x)")
    plain_fan = median_ms(plain_fanout, runs)
    fast_fan = median_ms(fast_fanout, runs)
    print(f"PeerAdded+RouteAdded Delta to {n} sessions: plain {plain_fan:.2f} ms, "
          f"PushEncoder {fast_fan:.2f} ms ({plain_fan / fast_fan:.1f}x)")


if __name__ == "__main__":
    main()
