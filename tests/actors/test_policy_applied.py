"""A policy's Applied condition: how many nodes have applied its generation,
following the nodes' acks at a bounded pace, and nothing more once quiet
(StateActor on the autojump clock, its StatusActor inbox read directly)."""

from __future__ import annotations

import trio
import trio.testing

from tests.actors.test_state import Harness, mesh
from vpblu.core.model import Condition
from vpblu.messages import KindChanged, NodeAcked, ObjectConditions, PushSync, SessionClosed

QUIET = 120.0


async def applied(h: Harness, within: float = 30.0) -> Condition:
    """The next Applied condition reported for the TunnelPolicy "mesh"."""
    with trio.fail_after(within):
        while True:
            msg = await h.status.receive()
            if isinstance(msg, ObjectConditions) and (msg.kind, msg.name) == (
                    "TunnelPolicy", "mesh"):
                [cond] = [c for c in msg.conditions if c.type == "Applied"]
                return cond


async def test_applied_counts_nodes_as_they_ack_then_stays_quiet(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.actor.run)
        await h.list_all(range(1, 4))
        first = await applied(h)
        assert (first.status, first.reason) == ("False", "Pending")
        assert first.message == "0/3 nodes have applied generation 1"
        boxes = {i: await h.connect(i) for i in (1, 2, 3)}
        sessions = {i: h.sid - 3 + i for i in (1, 2, 3)}
        syncs = {}
        for i, box in boxes.items():
            sync = await box.receive()
            assert isinstance(sync, PushSync)
            syncs[i] = sync
        for i in (1, 2):
            await h.send.send(NodeAcked(f"n{i}", sessions[i], syncs[i].generation))
        two = await applied(h)
        assert (two.status, two.message) == ("False", "2/3 nodes have applied generation 1")
        began = trio.current_time()
        await h.send.send(NodeAcked("n3", sessions[3], syncs[3].generation))
        done = await applied(h)
        assert (done.status, done.reason) == ("True", "Applied")
        assert done.message == "3/3 nodes have applied generation 1"
        assert trio.current_time() - began <= 1.0  # APPLIED_REPORT_PERIOD
        # Quiet: no ack moves, nothing is reported again.
        with trio.move_on_after(QUIET):
            cond = await applied(h, within=QUIET * 2)
            raise AssertionError(f"reported again in a quiet mesh: {cond}")
        # A new generation of the policy that changes no node's state: every
        # node is caught up with what it was sent, so all have applied it.
        await h.send.send(KindChanged("TunnelPolicy", (mesh(2),), (), (), "9"))
        second = await applied(h)
        assert (second.status, second.message) == (
            "True", "3/3 nodes have applied generation 2")
        # A node whose stream closed has applied nothing we know of.
        await h.send.send(SessionClosed("n3", sessions[3]))
        gone = await applied(h)
        assert (gone.status, gone.message) == ("False", "2/3 nodes have applied generation 2")
        nursery.cancel_scope.cancel()
