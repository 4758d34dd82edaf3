"""`vpblu meshtop`: the mesh live in a terminal (textual), like `top`.

Owns the terminal view of the dashboard's document (`vpblu.dashboard.meshview`):
a table of nodes (Ready, Connected, peers up/total, applied generation, key
age, rotation phase, the oldest handshake among its tunnels (HS), throughput),
sorted and filtered at will; one node's tunnels (peer, handshake age, rates,
bytes, endpoint) and conditions; a nodes x peers matrix of handshake ages;
the leader. It redraws in place every `--refresh` seconds (no flicker: the
table's cells change, the screen is not cleared) and fits 80x24, so it works
over SSH.

Where the data comes from (read-only, never a node):
- the API server, with your kubeconfig (like `vpblu status`): the VpbluNodes
  with the health the leader wrote, the policies and the Lease. Per-peer
  handshakes and bytes live only in the leader's memory, so this source shows
  nodes, not tunnels;
- `--dashboard URL` with `--token-file`: the controller's dashboard JSON API
  (through `kubectl port-forward`), reviewed with your token like a browser
  sign-in: everything, tunnels included.

Textual runs its own asyncio loop, so both sources are plain asyncio
(kubernetes-asyncio, aiohttp) here, in this separate process, rather than the
controller's trio adapter.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Input, Static

from vpblu.dashboard.meshview import JSON, Rates, mesh_view

REFRESH = 2.0
API_TIMEOUT = 15.0
SORTS: tuple[tuple[str, Callable[[JSON], Any]], ...] = (
    ("name", lambda n: n["name"]),
    ("ready", lambda n: (n["ready"] == "True", n["name"])),
    ("handshake", lambda n: (-(_oldest(n) or 0.0), n["name"])),
    ("throughput", lambda n: (-sum(_traffic(n)), n["name"])),
    ("key age", lambda n: (-(n.get("keyAge") or 0.0), n["name"])),
)


class MeshSource(Protocol):
    """Where meshtop reads the document (asyncio; may raise SourceError)."""

    def describe(self) -> str: ...

    async def fetch(self) -> JSON: ...

    async def close(self) -> None: ...


class SourceError(Exception):
    """The source could not be read; shown in the status line, tried again."""


def _oldest(node: JSON) -> float | None:
    ages = [t["handshakeAge"] for t in node.get("tunnels") or ()]
    if not ages:
        return None
    return float("inf") if any(a is None for a in ages) else max(ages)


def _traffic(node: JSON) -> tuple[float, float]:
    tunnels = node.get("tunnels") or ()
    return (sum(t["rxRate"] for t in tunnels), sum(t["txRate"] for t in tunnels))


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return "never"
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size * (2 if unit != "d" else 1):
            return f"{s // size}{unit}"
    return f"{s}s"


def rate(value: float) -> str:
    v = float(value)
    for unit in ("B", "K", "M", "G"):
        if v < 1000:
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.1f}T"


def visible(nodes: list[JSON], filter_text: str, sort: int, reverse: bool) -> list[JSON]:
    """The nodes shown: those whose name, rotation or problem contains the
    filter (case-insensitive; `!ready` shows only nodes not Ready), sorted."""
    text = filter_text.strip().lower()
    shown = nodes
    if text == "!ready":
        shown = [n for n in nodes if n["ready"] != "True"]
    elif text:
        shown = [n for n in nodes if text in n["name"].lower()
                 or text in str(n.get("rotation", "")).lower()
                 or text in str(n.get("problem", "")).lower()]
    return sorted(shown, key=SORTS[sort][1], reverse=reverse)


class ApiSource:
    """The API server through a kubeconfig (or in-cluster)."""

    def __init__(self, kubeconfig: Path | None, lease_namespace: str = "vpblu-system",
                 lease_name: str = "vpblu-controller") -> None:
        self._kubeconfig = kubeconfig
        self._lease = (lease_namespace, lease_name)
        self._api: Any = None
        self._rates = Rates()

    def describe(self) -> str:
        return f"API ({self._kubeconfig or 'in-cluster'})"

    async def _client(self) -> Any:
        from kubernetes_asyncio import client, config

        if self._api is None:
            cfg = client.Configuration()
            if self._kubeconfig is None:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                await config.load_kube_config(config_file=str(self._kubeconfig),
                                              client_configuration=cfg, persist_config=False)
            self._api = client.ApiClient(configuration=cfg)
        return self._api

    async def fetch(self) -> JSON:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            api = await self._client()
            custom = client.CustomObjectsApi(api)

            async def items(plural: str) -> list[JSON]:
                got = await custom.list_cluster_custom_object(
                    "vpblu.io", "v1alpha1", plural, _request_timeout=API_TIMEOUT)
                return list(got.get("items") or ())

            nodes = await items("vpblunodes")
            policies = {kind: await items(plural) for kind, plural in (
                ("TunnelPolicy", "tunnelpolicies"), ("RoutePolicy", "routepolicies"),
                ("BlockPolicy", "blockpolicies"), ("RotationPolicy", "rotationpolicies"))}
            try:
                lease = await client.CoordinationV1Api(api).read_namespaced_lease(
                    self._lease[1], self._lease[0], _request_timeout=API_TIMEOUT)
                leader = str(lease.spec.holder_identity or "")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                leader = ""
        except (ApiException, OSError, TimeoutError, ValueError) as exc:
            raise SourceError(f"cannot read the API server: {exc}") from exc
        except Exception as exc:  # aiohttp's errors, without importing it here
            if type(exc).__module__.startswith("aiohttp"):
                raise SourceError(f"cannot reach the API server: {exc!r}") from exc
            raise
        return mesh_view(vpblu_nodes=nodes, policies=policies, leader=leader,
                         served_by="meshtop (API)", leading=False, health=None,
                         rates=self._rates, now=time.time())

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None


class DashboardSource:
    """The controller's dashboard JSON API with a bearer token."""

    def __init__(self, url: str, token: str, ca: Path | None = None,
                 insecure: bool = False) -> None:
        self._url = url.rstrip("/") + "/api/mesh"
        self._token = token
        self._ca = ca
        self._insecure = insecure
        self._session: Any = None

    def describe(self) -> str:
        return f"dashboard {self._url.removesuffix('/api/mesh')}"

    async def fetch(self) -> JSON:
        import aiohttp

        if self._session is None:
            context = ssl.create_default_context(cafile=str(self._ca) if self._ca else None)
            if self._insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context), trust_env=False)
        try:
            async with self._session.get(
                    self._url, headers={"Authorization": f"Bearer {self._token}"},
                    timeout=aiohttp.ClientTimeout(total=API_TIMEOUT)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    try:
                        why = json.loads(text).get("error", text)
                    except ValueError:
                        why = text
                    raise SourceError(f"the dashboard answered {resp.status}: {why}")
                doc: JSON = json.loads(text)
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SourceError(f"cannot read the dashboard: {exc!r}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@attrs.define
class ViewState:
    sort: int = 0
    reverse: bool = False
    filter: str = ""
    detail: str | None = None  # a node's name: its tunnels and conditions
    matrix: bool = False


# Narrow headers: 80 columns hold a 14-character node name and every column;
# a longer name scrolls the table sideways with the NODE column kept in place.
NODE_COLUMNS = ("NODE", "READY", "CONN", "PEERS", "GEN", "KEY", "ROTATION", "HS",
                "RX/s", "TX/s")


class MeshTop(App[int]):
    """The terminal view. `source` is read every `refresh` seconds."""

    TITLE = "vpblu meshtop"
    AUTO_FOCUS = "#table"  # not the (hidden) filter box: keys are commands
    CSS = """
    #status { height: 1; background: $boost; }
    #error { height: auto; color: $error; }
    #filter { display: none; height: 3; }
    #filter.shown { display: block; }
    DataTable { height: 1fr; }
    #detail-info { height: auto; max-height: 8; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
        Binding("slash", "filter", "Filter"),
        Binding("m", "matrix", "Matrix"),
        Binding("enter", "detail", "Detail", show=True),
        Binding("escape", "close", "Back"),
    ]

    def __init__(self, source: MeshSource, refresh: float = REFRESH) -> None:
        super().__init__()
        self.source = source
        self.refresh_period = refresh
        self.state = ViewState()
        self.doc: JSON | None = None
        self.error = ""
        self.fetches = 0

    def compose(self) -> ComposeResult:
        yield Static("vpblu meshtop", id="status")
        yield Static("", id="error")
        yield Input(placeholder="filter: name, rotation or problem; !ready", id="filter")
        with Vertical():
            yield Static("", id="detail-info")
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True, fixed_columns=1)
        yield Footer()

    async def on_mount(self) -> None:
        await self.reload()
        self.set_interval(self.refresh_period, self.reload)

    async def on_unmount(self) -> None:
        await self.source.close()

    async def reload(self) -> None:
        try:
            self.doc = await self.source.fetch()
            self.error = ""
        except SourceError as exc:
            self.error = str(exc)
        self.fetches += 1
        self.redraw()

    # --- drawing ---------------------------------------------------------------

    def redraw(self) -> None:
        doc = self.doc or {"nodes": [], "leader": "", "ready": 0}
        nodes = visible(list(doc["nodes"]), self.state.filter, self.state.sort,
                        self.state.reverse)
        mode = ("matrix" if self.state.matrix else
                f"node {self.state.detail}" if self.state.detail else "nodes")
        sort = SORTS[self.state.sort][0] + (" desc" if self.state.reverse else "")
        self.query_one("#status", Static).update(
            f"leader {doc.get('leader') or '-'} | {doc.get('ready', 0)}/{len(doc['nodes'])} "
            f"Ready | {mode} | sort {sort}"
            + (f" | filter {self.state.filter!r}" if self.state.filter else "")
            + f" | {self.source.describe()}")
        error = self.query_one("#error", Static)
        error.update(self.error)
        error.display = bool(self.error)
        table = self.query_one("#table", DataTable)
        info = self.query_one("#detail-info", Static)
        if self.state.detail is not None:
            self._draw_detail(table, info, doc)
        elif self.state.matrix:
            info.update("handshake age, node (row) to peer (column); . none")
            self._draw_matrix(table, nodes)
        else:
            info.update("" if doc.get("telemetry") in (None, "live") else
                        f"tunnels: {doc['telemetry']} (use --dashboard for them)")
            self._draw_nodes(table, nodes)

    def _reset(self, table: DataTable[str], columns: tuple[str, ...]) -> None:
        if tuple(str(c.label) for c in table.columns.values()) != columns:
            table.clear(columns=True)
            table.add_columns(*columns)

    def _fill(self, table: DataTable[str],
              rows: Sequence[tuple[str, tuple[str, ...]]]) -> None:
        """Rows keyed by name, changed in place: the cursor stays on its row."""
        keep = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value) \
            if table.row_count else None
        wanted = [key for key, _ in rows]
        existing = [str(k.value) for k in table.rows]
        if existing != wanted:
            table.clear()
            for key, cells in rows:
                table.add_row(*cells, key=key)
            if keep in wanted:
                table.move_cursor(row=wanted.index(keep))
            return
        columns = list(table.columns)
        for key, cells in rows:
            for column, cell in zip(columns, cells, strict=True):
                if table.get_cell(key, column) != cell:
                    table.update_cell(key, column, cell)

    def _draw_nodes(self, table: DataTable[str], nodes: list[JSON]) -> None:
        self._reset(table, NODE_COLUMNS)
        rows = []
        for n in nodes:
            rx, tx = _traffic(n)
            has = n.get("tunnels") is not None
            rows.append((n["name"], (
                n["name"], n["ready"], n["connected"], n["peers"] or "-",
                str(n["generation"] if n["generation"] is not None else "-"),
                age(n.get("keyAge")), n.get("rotation") or "-",
                age(_oldest(n)) if has else "-", rate(rx) if has else "-",
                rate(tx) if has else "-")))
        self._fill(table, rows)

    def _draw_matrix(self, table: DataTable[str], nodes: list[JSON]) -> None:
        names = [n["name"] for n in nodes]
        short = tuple(name[-8:] for name in names)
        self._reset(table, ("NODE", *short))
        rows = []
        for n in nodes:
            ages = {t["peer"]: t["handshakeAge"] for t in n.get("tunnels") or ()}
            rows.append((n["name"], (n["name"], *(
                ("." if peer not in ages else age(ages[peer]) if ages[peer] is not None
                 else "never") for peer in names))))
        self._fill(table, rows)

    def _draw_detail(self, table: DataTable[str], info: Static, doc: JSON) -> None:
        node = next((n for n in doc["nodes"] if n["name"] == self.state.detail), None)
        if node is None:
            info.update(f"{self.state.detail}: not in the mesh now")
            self._reset(table, ("PEER",))
            self._fill(table, [])
            return
        last = node.get("lastRotation") or {}
        conditions = " ".join(f"{c['type']}={c['status']}" for c in node["conditions"])
        info.update(
            f"{node['name']}  ready {node['ready']}  peers {node['peers'] or '-'}  "
            f"gen {node['generation'] if node['generation'] is not None else '-'}  "
            f"key {age(node.get('keyAge'))}\n"
            f"rotation {node.get('rotation') or '-'}  last "
            f"{last.get('outcome', '-')} {last.get('finished', '')}\n"
            f"{conditions}\n{node.get('problem') or ''}")
        self._reset(table, ("PEER", "HANDSHAKE", "RX/s", "TX/s", "RX", "TX", "ENDPOINT"))
        self._fill(table, [(t["peer"], (
            t["peer"], age(t["handshakeAge"]) if t["handshakeAge"] is not None else "never",
            rate(t["rxRate"]), rate(t["txRate"]), rate(t["rxBytes"]), rate(t["txBytes"]),
            t["endpoint"] or "-")) for t in node.get("tunnels") or ()])

    # --- keys --------------------------------------------------------------------

    def action_sort(self) -> None:
        self.state.sort = (self.state.sort + 1) % len(SORTS)
        self.redraw()

    def action_reverse(self) -> None:
        self.state.reverse = not self.state.reverse
        self.redraw()

    def action_matrix(self) -> None:
        self.state.matrix = not self.state.matrix
        self.state.detail = None
        self.redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.value = self.state.filter
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.state.filter = event.value
        self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.remove_class("shown")
        self.query_one("#table", DataTable).focus()

    def action_detail(self) -> None:
        table = self.query_one("#table", DataTable)
        if self.state.detail is None and not self.state.matrix and table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.state.detail = str(key)
            self.redraw()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if self.state.detail is None and not self.state.matrix:
            self.state.detail = str(event.row_key.value)
            self.redraw()

    def action_close(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_class("shown"):
            box.remove_class("shown")
            self.query_one("#table", DataTable).focus()
            return
        self.state.detail = None
        self.state.matrix = False
        self.redraw()


def run_meshtop(source: MeshSource, refresh: float = REFRESH) -> int:
    MeshTop(source, refresh).run()
    return 0
