"""ConvergenceTracker: how long each change took to reach every node it changed.

Owns the bookkeeping behind `vpblu_convergence_seconds`: for each generation
the StateActor pushed, when the API event behind it was seen and which nodes
still owe an acknowledgement. An ack of generation g settles every generation
up to g for that node (acks are cumulative); a node whose session ends stops
being waited for (what it did not ack never converged, and is not counted as
if it had). When the last node settles, the duration is returned to the
caller, which observes it.

Pure: times come in as arguments; bounded: at most `limit` generations are
tracked, the oldest given up (not observed) beyond that, so a node that never
acks cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict

LIMIT = 256


class ConvergenceTracker:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        # generation -> (when its event was seen, nodes that have not acked it)
        self._open: OrderedDict[int, tuple[float, set[str]]] = OrderedDict()
        self.given_up = 0

    def __len__(self) -> int:
        return len(self._open)

    def pushed(self, generation: int, seen: float, nodes: set[str]) -> None:
        """`nodes` were sent `generation`, made from an event seen at `seen`."""
        if not nodes:
            return
        self._open[generation] = (seen, set(nodes))
        while len(self._open) > self._limit:
            self._open.popitem(last=False)
            self.given_up += 1

    def acked(self, node: str, generation: int, now: float) -> list[float]:
        """`node` applied `generation`: the durations of the generations that
        thereby converged everywhere."""
        done = []
        for gen, (seen, waiting) in list(self._open.items()):
            if gen > generation:
                break
            waiting.discard(node)
            if not waiting:
                del self._open[gen]
                done.append(now - seen)
        return done

    def forget(self, node: str, now: float) -> list[float]:
        """`node`'s session ended: nothing waits for it any more."""
        done = []
        for gen, (seen, waiting) in list(self._open.items()):
            if node in waiting:
                waiting.discard(node)
                if not waiting:
                    del self._open[gen]
                    done.append(now - seen)
        return done
