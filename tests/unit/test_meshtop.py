"""meshtop through textual's pilot at 80x24, on a fake source (a list of
documents served in turn, named as the fake it is): every node is shown,
a node that leaves goes from the table, sorting, filtering, a node's detail
with its tunnels, the matrix, and a source error shown without a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from textual.widgets import DataTable, Static

from vpblu.core import wire
from vpblu.dashboard.meshview import Rates, mesh_view
from vpblu.meshtop import MeshTop, SourceError, visible
from vpblu.messages import HealthSnapshot, NodeTelemetryView

SIZE = (80, 24)


def vpblu_node(name: str, ready: str = "True", rotation: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {
        "peers": "2/2", "appliedGeneration": 7, "keyCreated": "2026-01-01T00:00:00Z",
        "conditions": [{"type": t, "status": ready, "reason": "r", "message": "m"}
                       for t in ("Connected", "Applied", "Ready", "KeyPublished")]}
    if rotation:
        status["rotation"] = {"phase": rotation}
    return {"metadata": {"name": name}, "status": status}


def document(names: list[str], *, not_ready: tuple[str, ...] = (), rotating: str = "",
             traffic: int = 0) -> dict[str, Any]:
    now = time.time()
    live = tuple(NodeTelemetryView(
        n, True, wire.Telemetry(sampled_at=now, peers=wire.PeerColumns(
            tuple(p for p in names if p != n), tuple(int(now) - 30 for p in names if p != n),
            tuple(traffic * (i + 1) for i, p in enumerate(names) if p != n),
            tuple(traffic for p in names if p != n),
            tuple("10.0.0.1:51820" for p in names if p != n))), 0.5, 7, None)
        for n in names)
    return mesh_view(vpblu_nodes=[vpblu_node(n, "False" if n in not_ready else "True",
                                             "Distribute" if n == rotating else "")
                                  for n in names],
                     policies={}, leader="ctrl-a", served_by="ctrl-a", leading=True,
                     health=HealthSnapshot(live), rates=Rates(), now=now)


class FakeSource:
    """Serves the documents it was given in turn (the last one again), or raises."""

    def __init__(self, docs: list[dict[str, Any] | Exception]) -> None:
        self.docs = docs
        self.served = 0
        self.closed = False

    def describe(self) -> str:
        return "fake"

    async def fetch(self) -> dict[str, Any]:
        doc = self.docs[min(self.served, len(self.docs) - 1)]
        self.served += 1
        if isinstance(doc, Exception):
            raise doc
        return doc

    async def close(self) -> None:
        self.closed = True


def rows(app: MeshTop) -> list[str]:
    table = app.query_one("#table", DataTable)
    return [str(k.value) for k in table.rows]


def text(app: MeshTop, widget: str) -> str:
    return str(app.query_one(widget, Static).render())


def run(source: FakeSource, scenario: Callable[[MeshTop, Any], Awaitable[None]]) -> MeshTop:
    app = MeshTop(source, refresh=3600)  # the test reloads by hand

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await scenario(app, pilot)

    asyncio.run(main())
    return app


def test_meshtop_shows_every_node_and_one_that_leaves_goes() -> None:
    three = ["n-a", "n-b", "n-c"]
    source = FakeSource([document(three), document(["n-a", "n-c"])])

    async def scenario(app: MeshTop, pilot: Any) -> None:
        assert rows(app) == three
        status = text(app, "#status")
        assert "leader ctrl-a" in status and "3/3 Ready" in status
        table = app.query_one("#table", DataTable)
        assert table.get_row("n-b")[:4] == ["n-b", "True", "True", "2/2"]
        assert table.get_row("n-b")[7] == "30s"  # the oldest handshake
        await app.reload()
        await pilot.pause()
        assert rows(app) == ["n-a", "n-c"]
        assert "2/2 Ready" in text(app, "#status")

    run(source, scenario)
    assert source.closed


def test_sort_filter_detail_matrix_and_errors() -> None:
    names = ["n-a", "n-b", "n-c"]
    doc = document(names, not_ready=("n-b",), rotating="n-c", traffic=1000)
    source = FakeSource([doc, doc, SourceError("cannot read the API server: refused")])

    async def scenario(app: MeshTop, pilot: Any) -> None:
        await pilot.press("s")  # by Ready: the one not Ready first
        await pilot.pause()
        assert rows(app)[0] == "n-b" and "sort ready" in text(app, "#status")
        await pilot.press("r")
        await pilot.pause()
        assert rows(app)[-1] == "n-b"
        await pilot.press("slash", *"distr", "enter")  # rotation phase Distribute
        await pilot.pause()
        assert rows(app) == ["n-c"]
        await pilot.press("slash", *["backspace"] * 5, *"!ready", "enter")
        await pilot.pause()
        assert rows(app) == ["n-b"]
        await pilot.press("enter")  # n-b's detail: its tunnels
        await pilot.pause()
        assert rows(app) == ["n-a", "n-c"]
        assert "n-b" in text(app, "#detail-info") and "Ready=False" in text(app, "#detail-info")
        await pilot.press("escape", "slash", *["backspace"] * 6, "enter", "m")
        await pilot.pause()
        table = app.query_one("#table", DataTable)
        shown = rows(app)  # still sorted by Ready, reversed: n-b last
        assert sorted(shown) == names and shown[-1] == "n-b"
        assert [str(c.label) for c in table.columns.values()] == ["NODE", *shown]
        assert table.get_row("n-a")[1:] == ["." if p == "n-a" else "30s" for p in shown]
        await app.reload()
        await app.reload()  # the error, then the view stays as it was
        await pilot.pause()
        assert "refused" in text(app, "#error") and sorted(rows(app)) == names

    run(source, scenario)


def test_visible_keeps_the_filter_and_sort_pure() -> None:
    nodes = document(["b", "a", "c"], not_ready=("c",))["nodes"]
    assert [n["name"] for n in visible(nodes, "", 0, False)] == ["a", "b", "c"]
    assert [n["name"] for n in visible(nodes, "!ready", 0, False)] == ["c"]
    assert [n["name"] for n in visible(nodes, "A", 0, False)] == ["a"]


def test_a_row_with_a_14_character_name_fits_80_columns() -> None:
    names = [f"ip-10-0-0-{i:04d}" for i in range(3)]
    doc = document(names, not_ready=(names[0],), rotating=names[1], traffic=10**9)

    async def scenario(app: MeshTop, pilot: Any) -> None:
        table = app.query_one("#table", DataTable)
        assert rows(app) == names
        assert table.virtual_size.width <= SIZE[0]

    run(FakeSource([doc]), scenario)
