"""A swapped VpbluNode key never reaches a peer's WireGuard (issue 19), on the
local cluster: real daemons with wireguard-go in their namespaces, the real
controller on its ServiceAccount's token, the real API server.

Someone patches node1's status.publicKey with another key; the controller puts
it back (a StatusReverted Event). Meanwhile the peers' `wg show dump` is read
over and over, before, during and well after: no sample lists the swapped key,
every sample lists node1's real one. (tests/integration/test_key_anchor.py
checks every state the daemons applied; this samples the kernel side.)
"""

from __future__ import annotations

import json
import threading
import time

from vpblu.lab.localcluster import LocalCluster

OTHER_KEY = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
WAIT = 60.0
# Samples of each peer after the restore: pushes caused by the swap (if any)
# would land within a few hundred milliseconds of it.
SAMPLES_AFTER = 10
JOIN_TIMEOUT = 30.0


def test_a_swapped_status_key_never_reaches_a_peer_s_wireguard(cluster: LocalCluster) -> None:
    swapped, *peers = cluster.nodes
    key = cluster.public_keys()[swapped.name]
    samples: dict[str, list[frozenset[str]]] = {p.name: [] for p in peers}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for peer in peers:
                device = cluster.wg_device(peer)
                if device is not None:
                    samples[peer.name].append(frozenset(p.public_key for p in device.peers))

    def sampled(at_least: dict[str, int]) -> bool:
        return all(len(samples[n]) >= k for n, k in at_least.items())

    sampler = threading.Thread(target=sample, name="wg-sampler")
    sampler.start()
    try:
        cluster.wait_for(lambda: sampled({p.name: 3 for p in peers}), WAIT,
                         "3 samples of every peer's WireGuard")
        cluster.kubectl("patch", "vpblunode", swapped.name, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"publicKey": OTHER_KEY}}))
        patched_at = time.monotonic()
        cluster.wait_for(lambda: cluster.public_keys().get(swapped.name) == key, WAIT,
                         f"{swapped.name}'s key restored")
        restored = time.monotonic() - patched_at

        def reverted() -> bool:
            events = json.loads(cluster.kubectl(
                "get", "events", "-n", "default", "-o", "json",
                f"--field-selector=involvedObject.name={swapped.name}").stdout)
            return any(e.get("reason") == "StatusReverted" and "kubectl-patch" in e["message"]
                       for e in events.get("items") or ())

        cluster.wait_for(reverted, WAIT, "a StatusReverted Event naming kubectl-patch")
        after = {n: len(s) + SAMPLES_AFTER for n, s in samples.items()}
        cluster.wait_for(lambda: sampled(after), WAIT,
                         f"{SAMPLES_AFTER} more samples of every peer's WireGuard")
    finally:
        stop.set()
        sampler.join(JOIN_TIMEOUT)
    assert not sampler.is_alive()
    for name, taken in samples.items():
        assert not [s for s in taken if OTHER_KEY in s], f"{name}'s WireGuard listed the key"
        assert all(key in s for s in taken), f"{name} lost {swapped.name}'s key"
    print(f"restored {restored:.3f} s after kubectl returned; "
          f"{sum(map(len, samples.values()))} samples of {len(peers)} peers' WireGuard, "
          "none with the swapped key")
