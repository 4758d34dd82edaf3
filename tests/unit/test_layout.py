"""The layout shows the architecture: these are the rules the tree keeps.

Read from the source (ast), never by importing: a rule about imports must see
the ones inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vpblu"

# The harness: the test API server, the local cluster, simulated daemons, the
# demo and the benchmark. `vpblu.bench` is the command users type for the latter.
LAB = ("vpblu.lab", "vpblu.bench")
# What the pure core may import besides itself and the standard library's pure parts.
CORE_THIRD_PARTY = {"attrs", "cryptography"}
IO_MODULES = {"socket", "subprocess", "os", "asyncio", "trio", "trio_asyncio", "time",
              "pyroute2", "bcc", "grpclib", "kubernetes_asyncio", "aiohttp", "shutil",
              "pathlib", "random", "secrets", "datetime"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "/proto/" not in str(p)}
    found["vpblu.bpf"] = ROOT / "bpf" / "__init__.py"
    return found


def _imports(path: Path, module: str) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0]
                yield f"{base}.{node.module}" if node.module else base
                continue
            assert node.module is not None
            yield node.module
            for a in node.names:  # `from vpblu.core import wire` imports a module
                yield f"{node.module}.{a.name}"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {i for i in _imports(path, name) if i in modules and i != name}
    return graph


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle() -> None:
    graph = _graph()
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        if node in path:
            cycle = [*path[path.index(node):], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            # A package's __init__ is not a dependency of its submodules.
            if not node.startswith(dep + "."):
                visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_product_imports_neither_the_lab_nor_the_tests() -> None:
    offenders = []
    for name, path in _modules().items():
        if _in(name, LAB):
            continue
        for imported in _imports(path, name):
            if _in(imported, LAB) or _in(imported, ("tests",)):
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_the_core_does_no_io() -> None:
    offenders = []
    for name, path in _modules().items():
        if not _in(name, ("vpblu.core",)):
            continue
        for imported in _imports(path, name):
            top = imported.split(".")[0]
            if top == "vpblu":
                if not _in(imported, ("vpblu.core",)):
                    offenders.append(f"{name} imports {imported} (outside the core)")
            elif top in IO_MODULES:
                offenders.append(f"{name} imports {imported} (I/O or a clock)")
    assert offenders == []


def test_messages_depend_only_on_the_core() -> None:
    imported = {i for i in _imports(PACKAGE / "messages.py", "vpblu.messages")
                if i.startswith("vpblu")}
    assert {i for i in imported if not _in(i, ("vpblu.core",))} == set()


def test_kernel_adapters_never_import_the_actors_that_own_them() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if _in(name, ("vpblu.node.kernel",)):
            outside = {d for d in deps if _in(d, ("vpblu.node",)) and d != "vpblu.node"
                       and not _in(d, ("vpblu.node.kernel", "vpblu.node.config"))}
            assert outside == set(), f"{name} imports {outside}"


def test_every_package_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"vpblu.bpf"}
    assert listed == on_disk


def test_the_dashboards_assets_ship_in_the_package() -> None:
    """Clusters are often offline: every page, script and stylesheet is package
    data of vpblu.dashboard (no CDN), and the pages name no other origin."""
    import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["vpblu.dashboard"]
    folder = PACKAGE / "dashboard"
    assets = [p.relative_to(folder).as_posix() for sub in ("templates", "static")
              for p in (folder / sub).iterdir()]
    assert assets and all(any(fnmatch.fnmatch(a, g) for g in globs) for a in assets), assets
    for asset in assets:
        text = (folder / asset).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text, asset


def test_the_dashboards_view_is_pure() -> None:
    module = "vpblu.dashboard.meshview"
    for imported in _imports(PACKAGE / "dashboard" / "meshview.py", module):
        assert imported.split(".")[0] not in IO_MODULES - {"datetime"}, imported
