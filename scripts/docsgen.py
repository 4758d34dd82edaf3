"""The generated pages of the documentation site: the CRD reference, the CLI
reference and the benchmark table.

Owns turning three sources of truth into Markdown, so the site cannot drift
from them:

- kustomize/base/crds (every field: type, default, limits, CEL rules with their
  messages; printer columns). A field with no description is an error that
  fails the build: the reference would otherwise show a blank where an
  operator looks for an answer. The fields every Kubernetes object has
  (apiVersion, kind, metadata) and the standard Condition fields are described
  here once, in STANDARD_FIELDS, instead of in every CRD.
- vpblu.cli.build_parser(): the parser itself is imported, never restated.
- bench/results/bench-*.json: for each (scenario, N, mode) the newest file
  that measured it.

MkDocs runs this as a hook (mkdocs.yml `hooks:`): on_files adds the pages as
generated files, so nothing generated is ever written into docs/. Run by hand
(`python scripts/docsgen.py OUTDIR`) it writes the same pages into OUTDIR.
VPBLU_DOCS_CRD_DIR points the build at another CRD folder (the tests use it
to show the reference follows an edited copy).

It must never write into the source tree, reach the network or read the
machine's environment into a page (argparse defaults that come from the
environment are rendered from an empty one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "kustomize" / "base" / "crds"
BENCH_DIR = ROOT / "bench" / "results"
CRD_DIR_ENV = "VPBLU_DOCS_CRD_DIR"

# Fields whose meaning Kubernetes defines, described once here (in our words).
STANDARD_FIELDS: Mapping[str, str] = {
    "apiVersion": "`vpblu.io/v1alpha1`.",
    "kind": "The kind's name, as in the heading of this page.",
    "metadata": "Standard Kubernetes object metadata (name, labels, annotations, ...).",
    "spec": "What you want; written by you (or your tooling).",
    "status": "What the controller observed; written by the leader only, through the "
              "status subresource.",
}
CONDITION_FIELDS: Mapping[str, str] = {
    "type": "The condition's name, e.g. `Accepted` or `Ready`; one entry per type.",
    "status": "`True`, `False` or `Unknown`.",
    "reason": "A CamelCase word saying why, for machines and `kubectl get` columns.",
    "message": "A sentence saying why, for people.",
    "observedGeneration": "The object's `metadata.generation` the controller judged.",
    "lastTransitionTime": "When `status` last changed.",
}

LIMIT_KEYS = (
    ("minimum", "minimum {}"), ("maximum", "maximum {}"),
    ("exclusiveMinimum", "exclusive minimum {}"), ("exclusiveMaximum", "exclusive maximum {}"),
    ("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
    ("minItems", "at least {} items"), ("maxItems", "at most {} items"),
    ("minProperties", "at least {} keys"), ("maxProperties", "at most {} keys"),
    ("format", "format `{}`"),
)


class DocsError(Exception):
    """A source the reference is generated from is incomplete: the build fails."""


# ---------------------------------------------------------------------------
# CRD reference


def _code(value: object, table: bool = False) -> str:
    """Inline code; in a table cell a `|` is escaped (Python-Markdown's tables
    honour the backslash inside code, elsewhere it would show)."""
    text = value if isinstance(value, str) else json.dumps(value)
    if table:
        text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _oneline(text: str) -> str:
    return " ".join(text.split())


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type_of(schema['additionalProperties'])}"
    if kind is None and schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    if kind is None:
        return "any"
    return str(kind)


class _Field:
    def __init__(self, path: str, schema: Mapping[str, Any], required: bool,
                 description: str) -> None:
        self.path = path
        self.schema = schema
        self.required = required
        self.description = description


def _walk(schema: Mapping[str, Any], path: str, required: bool, where: str,
          condition_item: bool = False) -> Iterator[_Field]:
    """Every field below `schema` (depth first, in the CRD's order)."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    needed = set(schema.get("required", []))
    for name, sub in properties.items():
        sub_path = f"{path}.{name}" if path else name
        description = sub.get("description")
        if not description and condition_item:
            description = CONDITION_FIELDS.get(name)
        if not description and not path:
            description = STANDARD_FIELDS.get(name)
        if not description:
            raise DocsError(f"{where}: field {sub_path} has no description")
        yield _Field(sub_path, sub, name in needed, _oneline(str(description)))
        yield from _below(sub, sub_path, where, name)
    del required


def _below(schema: Mapping[str, Any], path: str, where: str, name: str) -> Iterator[_Field]:
    if schema.get("type") == "array":
        items = schema.get("items", {})
        is_conditions = name == "conditions" and set(items.get("properties", {})) <= set(
            CONDITION_FIELDS)
        yield from _walk(items, f"{path}[]", False, where, condition_item=is_conditions)
    elif schema.get("type") == "object" and "additionalProperties" in schema:
        additional = schema["additionalProperties"]
        if isinstance(additional, Mapping):
            yield from _walk(additional, f"{path}.<key>", False, where)
    elif schema.get("type") == "object":
        yield from _walk(schema, path, False, where)


def _limits(schema: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, template in LIMIT_KEYS:
        if key in schema:
            out.append(template.format(schema[key]))
    if "enum" in schema:
        out.append("one of " + ", ".join(_code(v) for v in schema["enum"]))
    if "pattern" in schema:
        out.append(f"matches {_code(schema['pattern'])}")
    items = schema.get("items", {})
    if schema.get("type") == "array":
        for key, template in LIMIT_KEYS:
            if key in items and key != "format":
                out.append("each " + template.format(items[key]))
        if "pattern" in items:
            out.append(f"each matches {_code(items['pattern'])}")
        if "enum" in items:
            out.append("each one of " + ", ".join(_code(v) for v in items["enum"]))
    if schema.get("x-kubernetes-list-type"):
        keys = schema.get("x-kubernetes-list-map-keys")
        out.append(f"list type {schema['x-kubernetes-list-type']}"
                   + (f" keyed by {', '.join(keys)}" if keys else ""))
    return out


def _rules(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rules = list(schema.get("x-kubernetes-validations", []))
    if schema.get("type") == "array":
        rules += [dict(r, each=True) for r in
                  schema.get("items", {}).get("x-kubernetes-validations", [])]
    return rules


def _anchor(path: str) -> str:
    return path.replace(".", "-").replace("[]", "").replace("<key>", "key").lower()


def _render_field(field: _Field) -> list[str]:
    schema = field.schema
    facts = [f"Type: *{_type_of(schema)}*"]
    if field.required:
        facts.append("**required**")
    if "default" in schema:
        facts.append(f"Default: {_code(schema['default'])}")
    limits = _limits(schema)
    if limits:
        facts.append("Limits: " + "; ".join(limits))
    lines = [f"#### `{field.path}` {{ #{_anchor(field.path)} }}", "", " · ".join(facts), "",
             field.description, ""]
    for rule in _rules(schema):
        message = rule.get("message") or rule.get("messageExpression")
        if not message:
            raise DocsError(f"field {field.path}: CEL rule {rule['rule']!r} has no message")
        scope = "each item: " if rule.get("each") else ""
        extra = f" (reason `{rule['reason']}`)" if "reason" in rule else ""
        lines.append(f"- Rule: {scope}{_code(rule['rule'])}  \n  refused with: "
                     f"*{_oneline(message)}*{extra}")
    if _rules(schema):
        lines.append("")
    return lines


def crd_page(path: Path) -> tuple[str, str]:
    """(kind, Markdown) of one CRD file."""
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]
    names = spec["names"]
    kind = names["kind"]
    out = [f"# {kind}", ""]
    short = ", ".join(f"`{s}`" for s in names.get("shortNames", []))
    out += [
        "| property | value |", "|---|---|",
        f"| API group | `{spec['group']}` |",
        f"| scope | {spec['scope']} |",
        f"| plural | `{names['plural']}` |",
        f"| short names | {short or '-'} |",
        f"| categories | {', '.join(names.get('categories', [])) or '-'} |",
        f"| source | `kustomize/base/crds/{path.name}` |", "",
    ]
    for version in spec["versions"]:
        where = f"{path.name} {version['name']}"
        schema = version["schema"]["openAPIV3Schema"]
        top = schema.get("description")
        if not top:
            raise DocsError(f"{where}: the schema has no description")
        served = "served" if version.get("served") else "not served"
        stored = ", the storage version" if version.get("storage") else ""
        out += [f"## {version['name']}", "", f"*{served}{stored}*", "", _oneline(top), ""]
        sub = version.get("subresources", {})
        if sub:
            out += ["Subresources: " + ", ".join(f"`{s}`" for s in sub) + ".", ""]
        columns = version.get("additionalPrinterColumns", [])
        if columns:
            out += ["### Columns of `kubectl get`", "",
                    "| column | type | from | shown | description |",
                    "|---|---|---|---|---|"]
            for col in columns:
                shown = "with `-o wide`" if col.get("priority", 0) > 0 else "always"
                json_path = _code(col["jsonPath"], table=True)
                out.append(f"| {col['name']} | {col['type']} | {json_path} | {shown} | "
                           f"{_oneline(col.get('description', '')) or '-'} |")
            out.append("")
        rules = _rules(schema)
        fields = list(_walk(schema, "", False, where))
        out += ["### Fields", ""]
        for rule in rules:
            out.append(f"- {_code(rule['rule'])}: *{_oneline(rule.get('message', ''))}*")
        for field in fields:
            out += _render_field(field)
    return kind, "\n".join(out)


def crd_pages(crd_dir: Path) -> dict[str, str]:
    """Pages under reference/crds/ keyed by their path in the site."""
    files = sorted(crd_dir.glob("*.yaml"))
    if not files:
        raise DocsError(f"no CRDs in {crd_dir}")
    pages: dict[str, str] = {}
    index = ["# Custom Resources", "",
             "Generated from `kustomize/base/crds` at build time: what the API server "
             "enforces is what this says.", "",
             "| kind | what it is |", "|---|---|"]
    for path in files:
        kind, text = crd_page(path)
        pages[f"reference/crds/{kind.lower()}.md"] = text
        description = yaml.safe_load(path.read_text())["spec"]["versions"][0]["schema"][
            "openAPIV3Schema"]["description"]
        index.append(f"| [{kind}]({kind.lower()}.md) | {_oneline(description)} |")
    pages["reference/crds/index.md"] = "\n".join(index) + "\n"
    return pages


# ---------------------------------------------------------------------------
# CLI reference


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str,
                                                                    argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or action.dest
        help_text = formatter._expand_help(action) if action.help else ""
        default = action.default
        if action.required:
            shown = "required"
        elif default in (None, argparse.SUPPRESS, False) or default == []:
            shown = ""
        else:
            shown = _code(str(default), table=True)
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            help_text += " (one of " + ", ".join(_code(str(c), table=True)
                                                for c in action.choices) + ")"
        if isinstance(action, argparse._AppendAction) and "repeatable" not in help_text:
            help_text += " Repeatable."
        rows.append(f"| `{name}` | {shown} | {_oneline(help_text).replace('|', '/')} |")
    return rows


def _cli_sections(parser: argparse.ArgumentParser, words: list[str], level: int) -> list[str]:
    out = [f"{'#' * level} `{' '.join(words)}`", ""]
    if parser.description:
        out += [_oneline(parser.description), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    out += ["```", usage, "```", ""]
    rows = _option_rows(parser)
    if rows:
        out += ["| option | default | what |", "|---|---|---|", *rows, ""]
    for name, help_text, sub in _subcommands(parser):
        if help_text and not sub.description:
            sub.description = help_text[0].upper() + help_text[1:] + "."
        out += _cli_sections(sub, [*words, name], min(level + 1, 4))
    return out


def cli_page() -> str:
    # Defaults read from the environment (NODE_NAME, ...) would put this
    # machine's values into the page: build the parser in an empty one.
    sys.path.insert(0, str(ROOT))
    try:
        from vpblu.cli import build_parser
        with mock.patch.dict(os.environ, {}, clear=True):
            parser = build_parser()
    finally:
        sys.path.remove(str(ROOT))
    parser.prog = "vpblu"
    # Usage lines wrap at the terminal's width: fix it, so every build is the same.
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
        return _cli_text(parser)


def _cli_text(parser: argparse.ArgumentParser) -> str:
    out = ["# Command line", "",
           "Generated from the argparse definitions in `vpblu/cli.py` at build time. "
           "The same program is `kubectl vpblu` when `kubectl-vpblu` is on the PATH.", ""]
    return "\n".join(out + _cli_sections(parser, ["vpblu"], 2)) + "\n"


# ---------------------------------------------------------------------------
# Benchmark


SCENARIOS = {"join": "join", "leave": "leave", "block": "BlockPolicy", "route": "RoutePolicy",
             "formation": "mesh formation", "rotation": "key rotation (cluster)"}


def _ms(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _stamp(name: str) -> str:
    """`bench-20261124T012905Z.json` -> `20261124T012905Z` (the run's UTC start)."""
    return f"`{name.removeprefix('bench-').removesuffix('.json')}`"


def bench_page(results: Path) -> tuple[str, Path | None]:
    """The benchmark table (newest measurement of each row) and the newest plot."""
    files = sorted(results.glob("bench-*.json"))
    if not files:
        raise DocsError(f"no bench-*.json in {results}")
    rows: dict[tuple[str, int, str], tuple[dict[str, Any], str]] = {}
    rss: dict[str, tuple[int, str]] = {}
    for path in files:  # oldest first: newer files overwrite
        data = json.loads(path.read_text())
        for summary in data["summaries"]:
            rows[(summary["scenario"], summary["n"], summary["mode"])] = (summary, path.name)
        for key, value in data.get("peak_rss_bytes", {}).items():
            rss[key] = (value, path.name)
    order = list(SCENARIOS)
    table = ["| event | N | pushes | p50 | p95 | p99 | events | KiB sent / event "
             "| controller CPU / event | run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (scenario, n, mode), (s, name) in sorted(
            rows.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99,
                                          kv[0][2], kv[0][1])):
        table.append(
            f"| {SCENARIOS.get(scenario, scenario)} | {n} | {mode} | {_ms(s['p50_ms'])} | "
            f"{_ms(s['p95_ms'])} | {_ms(s['p99_ms'])} | {s['count']} | "
            f"{s['bytes'] / 1024:,.1f} | {_ms(s['cpu_ms'])} | {_stamp(name)} |")
    rss_table = ["| pushes-N | controller peak RSS | run |", "|---|---|---|"]
    for key, (value, name) in sorted(rss.items(), key=lambda kv: (kv[0].split("-")[0],
                                                                  int(kv[0].split("-")[-1]))):
        rss_table.append(f"| {key} | {value / 2**20:.0f} MiB | {_stamp(name)} |")
    plots = sorted(results.glob("bench-*.png"))
    real = _realstack_section(results)
    text = "\n".join([
        "## Results", "",
        "Generated at build time from `bench/results/bench-*.json`: each row is the newest "
        "run that measured that event, size and push mode (*run* names "
        "`bench/results/bench-<run>.json`). *pushes*: `delta` is what vpblu runs; `full` "
        "is the `--compare` baseline of whole-state pushes.", "",
        *table, "", *rss_table, "",
        *([f"![Latency by N, from {plots[-1].name}](bench-latest.png)", ""] if plots else []),
        *real,
    ])
    return text + "\n", (plots[-1] if plots else None)


def _realstack_section(results: Path) -> list[str]:
    """The newest `python -m vpblu.bench --real-stack` run, when one is recorded."""
    files = sorted(results.glob("realstack-*.json"))
    if not files:
        return []
    path = files[-1]
    try:
        data = json.loads(path.read_text())
        lines = ["### Real stack", "",
                 f"`python -m vpblu.bench --real-stack`, run `{data['when']}` "
                 f"(`bench/results/{path.name}`): the local cluster with real daemons "
                 "(wireguard-go, eBPF); each event is one API write, timed until every other "
                 "node's WireGuard shows it.", "",
                 "| N | event | runs | median | min | max |", "|---|---|---|---|---|---|"]
        losses = []
        for run in data["runs"]:
            for event in ("new-machine", "rejoin", "leave"):
                secs = sorted(x["seconds"] for x in run["samples"] if x["event"] == event)
                if secs:
                    lines.append(f"| {run['size']} | {event} | {len(secs)} | "
                                 f"{_ms(statistics.median(secs) * 1000)} | "
                                 f"{_ms(secs[0] * 1000)} | {_ms(secs[-1] * 1000)} |")
            losses.append(f"N={run['size']}: {run['datagrams_missing']} of "
                          f"{run['datagrams_sent']} datagrams between uninvolved nodes missing")
    except (KeyError, TypeError, ValueError) as e:
        raise DocsError(f"{path.name}: not the real-stack format the docs know ({e!r})") from e
    return [*lines, "", "Loss meanwhile: " + "; ".join(losses) + ".", ""]


# ---------------------------------------------------------------------------
# MkDocs hook and command line


def generate(crd_dir: Path | None = None) -> tuple[dict[str, str], dict[str, Path]]:
    """(Markdown pages, binary files) keyed by their path in the site."""
    crds = crd_dir or Path(os.environ.get(CRD_DIR_ENV) or CRD_DIR)
    pages = crd_pages(crds)
    pages["reference/cli.md"] = cli_page()
    bench_text, plot = bench_page(BENCH_DIR)
    pages["benchmark-results.md"] = bench_text
    binaries = {"bench-latest.png": plot} if plot else {}
    return pages, binaries


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated pages to the build (nothing is written to docs/)."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        pages, binaries = generate()
    except DocsError as e:
        raise PluginError(f"docsgen: {e}") from e
    for uri, text in pages.items():
        if uri == "benchmark-results.md":
            continue  # included into benchmark.md by on_page_markdown
        files.append(File.generated(config, uri, content=text))
    for uri, path in binaries.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: `<!-- vpblu:bench-results -->` becomes the generated table."""
    marker = "<!-- vpblu:bench-results -->"
    if marker in markdown:
        text, _ = bench_page(BENCH_DIR)
        markdown = markdown.replace(marker, text)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the generated docs pages into OUTDIR.")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--crd-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        pages, binaries = generate(args.crd_dir)
    except DocsError as e:
        print(f"docsgen: {e}", file=sys.stderr)
        return 1
    for uri, text in pages.items():
        target = args.outdir / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for uri, path in binaries.items():
        (args.outdir / uri).write_bytes(path.read_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
