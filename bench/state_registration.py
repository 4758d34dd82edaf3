"""What N nodes registering cost the leader's StateActor, paced or not (issue 20).

`python bench/state_registration.py [N ...] [--every MS]` (default 300 1000,
5 ms): a StateActor running its own loop (as in the controller; no API
server, no gRPC), every watched kind listed with a FullMesh TunnelPolicy and
no nodes; then N nodes register one at a time, EVERY ms apart: the Node's
watch batch, its VpbluNode's, and its daemon's session (mailboxes drained).
Each size runs with the recompute pacing (vpblu.actors.state.RECOMPUTE_SPACING,
as shipped) and with it off (0: a recompute per batch, the code before).
Prints per run: the CPU seconds of the process (the actor and the feeder),
the recomputes, the wall time until the last node's peers were pushed to
everyone, and the longest a node waited from its Node batch to its first
push including it (the join latency this pacing could add).
"""

from __future__ import annotations

import sys
import time

import trio

# The same fixtures as bench/state_actor.py (run from bench/, as this script is).
from state_actor import _drain, _meta, _node, _vnode

from vpblu.actors import state as state_module
from vpblu.actors.state import WATCHED_KINDS, StateActor
from vpblu.core import model
from vpblu.core.sources import PolicySource
from vpblu.messages import (
    KindChanged,
    KindListed,
    PushDelta,
    PushSync,
    SessionInbox,
    SessionOpened,
    StateInbox,
    StatusInbox,
)


async def run(n: int, every: float) -> dict[str, float]:
    inbox_send, inbox = trio.open_memory_channel[StateInbox](100_000)
    status_send, status = trio.open_memory_channel[StatusInbox](1_000_000)
    actor = StateActor(inbox, status_send, term=1)
    registered: dict[str, float] = {}  # node -> when its Node batch went
    first_seen: dict[str, float] = {}  # node -> when a push to n0000 first listed it

    async def watch_first(mailbox: trio.MemoryReceiveChannel[SessionInbox]) -> None:
        async for push in mailbox:
            if isinstance(push, PushSync | PushDelta):
                now = time.perf_counter()
                for peer in push.state.peers:
                    first_seen.setdefault(peer.name, now)

    async def drain(mailbox: trio.MemoryReceiveChannel[SessionInbox]) -> None:
        async for _ in mailbox:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, status)
        await nursery.start(actor.run)
        mesh = PolicySource(_meta("mesh"), model.TunnelPolicy("mesh", 1))
        for kind in WATCHED_KINDS:
            await inbox_send.send(KindListed(kind, (mesh,) if kind == "TunnelPolicy" else (),
                                             (), "1"))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        recomputes0 = actor.statistics().recomputes
        for i in range(n):
            name = f"n{i:04d}"
            registered[name] = time.perf_counter()
            await inbox_send.send(KindChanged("Node", (_node(i),), (), (), str(3 * i)))
            await inbox_send.send(KindChanged("VpbluNode", (_vnode(i),), (), (), str(3 * i + 1)))
            mailbox_send, mailbox = trio.open_memory_channel[SessionInbox](1_000_000)
            nursery.start_soon(watch_first if i == 0 else drain, mailbox)
            await inbox_send.send(SessionOpened(name, i + 1, mailbox_send))
            await trio.sleep(every)
        last = f"n{n - 1:04d}"
        while True:
            if last in first_seen:
                break
            await trio.sleep(0.001)
        result = {
            "cpu_s": time.process_time() - cpu0,
            "wall_s": first_seen[last] - wall0,
            "recomputes": actor.statistics().recomputes - recomputes0,
            "worst_wait_ms": 1000 * max(first_seen[k] - registered[k]
                                        for k in registered if k != "n0000"),
        }
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    every = 0.005
    sizes = []
    args = sys.argv[1:]
    while args:
        arg = args.pop(0)
        if arg == "--every":
            every = float(args.pop(0)) / 1000
        else:
            sizes.append(int(arg))
    shipped = state_module.RECOMPUTE_SPACING
    for n in sizes or [300, 1000]:
        for label, spacing in (("paced", shipped), ("per batch", 0.0)):
            state_module.RECOMPUTE_SPACING = spacing
            r = trio.run(run, n, every)
            print(f"N={n:5d} {label:<10} recomputes {r['recomputes']:5.0f}  CPU {r['cpu_s']:6.2f} s"
                  f"  all pushed after {r['wall_s']:6.2f} s"
                  f"  worst wait Node->push {r['worst_wait_ms']:7.1f} ms", flush=True)
    state_module.RECOMPUTE_SPACING = shipped


if __name__ == "__main__":
    main()
