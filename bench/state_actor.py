"""What one node event costs the leader's StateActor at N nodes, profiled.

`python bench/state_actor.py [N] [runs]` (default 1000, 5): a StateActor with
N nodes in a FullMesh, every node connected (mailboxes drained), a status
and a rotations channel drained; then `runs` times a node joins and leaves
and a BlockPolicy comes and goes. Prints the median wall time of the
StateActor's work per event (its recompute, the pushes it offers, the
conditions and rotation views it reports) and, with `--profile`, the top of
a cProfile of all of it. No API server, no gRPC: the actor alone.
"""

from __future__ import annotations

import base64
import cProfile
import ipaddress
import pstats
import statistics
import sys
import time

import trio

from vpblu.actors.state import WATCHED_KINDS, StateActor
from vpblu.core import model
from vpblu.core.sources import NodeSource, ObjectMeta, PolicySource, VpbluNodeSource
from vpblu.messages import (
    KindChanged,
    KindListed,
    RotationsInbox,
    SessionInbox,
    SessionOpened,
    StateInbox,
    StatusInbox,
)


def _meta(name: str) -> ObjectMeta:
    return ObjectMeta(name, 1, "1", f"uid-{name}")


def _node(i: int) -> NodeSource:
    return NodeSource(_meta(f"n{i:04d}"), ipaddress.ip_address(0xAC100000 + i),
                      (ipaddress.ip_network((0x0A800000 + (i << 8), 24)),))


def _vnode(i: int) -> VpbluNodeSource:
    key = base64.b64encode(i.to_bytes(2, "big") * 16).decode()
    return VpbluNodeSource(_meta(f"n{i:04d}"), None, key)


async def _drain(channel: trio.MemoryReceiveChannel[object]) -> None:
    async for _ in channel:
        pass


async def run(n: int, runs: int, profile: cProfile.Profile | None) -> dict[str, list[float]]:
    _inbox_send, inbox = trio.open_memory_channel[StateInbox](0)
    status_send, status = trio.open_memory_channel[StatusInbox](100_000)
    rotations_send, rotations = trio.open_memory_channel[RotationsInbox](100_000)
    actor = StateActor(inbox, status_send, term=1, rotations=rotations_send)
    times: dict[str, list[float]] = {"join": [], "leave": [], "block": [], "unblock": []}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, status)
        nursery.start_soon(_drain, rotations)
        mesh = PolicySource(_meta("mesh"), model.TunnelPolicy("mesh", 1))
        objects = {"Node": tuple(_node(i) for i in range(n)),
                   "VpbluNode": tuple(_vnode(i) for i in range(n + 1)),
                   "TunnelPolicy": (mesh,)}
        for kind in WATCHED_KINDS:
            await actor._handle(KindListed(kind, objects.get(kind, ()), (), "1"))
        for i in range(n + 1):
            mailbox_send, mailbox = trio.open_memory_channel[SessionInbox](1_000_000)
            nursery.start_soon(_drain, mailbox)
            await actor._handle(SessionOpened(f"n{i:04d}", i + 1, mailbox_send))
        await actor._recompute()
        actor._push_pending_syncs()
        await trio.sleep(0.1)
        block = PolicySource(_meta("block"), model.BlockPolicy("block", 1, (model.CidrPair(
            "10.128.0.0/24", f"10.128.{(n - 1) % 256}.0/24"),)))
        events = {
            "join": KindChanged("Node", (_node(n),), (), (), "2"),
            "leave": KindChanged("Node", (), (f"n{n:04d}",), (), "3"),
            "block": KindChanged("BlockPolicy", (block,), (), (), "4"),
            "unblock": KindChanged("BlockPolicy", (), ("block",), (), "5"),
        }
        for _ in range(runs):
            for name, event in events.items():
                if profile:
                    profile.enable()
                t0 = time.perf_counter()
                await actor._handle(event)
                await actor._recompute()
                times[name].append(time.perf_counter() - t0)
                if profile:
                    profile.disable()
                await trio.sleep(0.05)  # the sessions drain their mailboxes
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1000
    runs = int(args[1]) if len(args) > 1 else 5
    profile = cProfile.Profile() if "--profile" in sys.argv else None
    times = trio.run(run, n, runs, profile)
    for name, values in times.items():
        print(f"N={n} {name:<8} median {1000 * statistics.median(values):7.1f} ms "
              f"(min {1000 * min(values):.1f}, max {1000 * max(values):.1f})")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    main()
