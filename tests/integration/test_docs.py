"""The documentation site: `make docs` builds it with warnings as errors, its
generated references follow their sources (the CRDs, the argparse parser),
it loads nothing from outside, and headless Chromium renders it.

Real tools only: the real `make docs` (MkDocs with the Material theme and the
scripts/docsgen.py hook), the real Debian Chromium against the built site
served on loopback. The screenshots are kept in a temporary folder the test
prints; every server and browser the test starts is stopped on every exit
path.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from vpblu.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "kustomize" / "base" / "crds"
# A cold build on two busy cores takes a few seconds; this only bounds a hang.
BUILD_TIMEOUT = 300.0
BROWSER_TIMEOUT = 120.0
KILL_TIMEOUT = 10.0
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WINDOW = (1280, 900)


def _build(site: Path, crd_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`make docs` into `site`; with `crd_dir`, the reference is made from that copy."""
    env = dict(os.environ)
    env.pop("VPBLU_DOCS_CRD_DIR", None)
    if crd_dir is not None:
        env["VPBLU_DOCS_CRD_DIR"] = str(crd_dir)
    return subprocess.run(["make", "-s", "docs", f"SITE_DIR={site}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)


def _text(page: Path) -> str:
    """A page's visible text, roughly: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = _build(out)
    assert result.returncode == 0, f"make docs failed:\n{result.stdout}\n{result.stderr}"
    return out


PAGES = ["index.html", "quickstart.html", "install.html", "operations.html", "dashboard.html",
         "security.html",
         "architecture.html", "benchmark.html", "comparison.html", "reference/cli.html",
         "reference/crds/index.html"]


def test_make_docs_builds_every_page_strictly(site: Path) -> None:
    for page in PAGES:
        assert (site / page).is_file(), page
    for crd in CRDS.glob("*.yaml"):
        kind = yaml.safe_load(crd.read_text())["spec"]["names"]["kind"]
        assert (site / "reference" / "crds" / f"{kind.lower()}.html").is_file(), kind


def test_the_crd_reference_shows_every_field_rule_and_column(site: Path) -> None:
    crd = yaml.safe_load((CRDS / "tunnelpolicies.yaml").read_text())
    version = crd["spec"]["versions"][0]
    page = _text(site / "reference" / "crds" / "tunnelpolicy.html")
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name, field in spec["properties"].items():
        assert f"spec.{name}" in page, name
        assert " ".join(field["description"].split()) in page, name
    for rule in spec["properties"]["clusterCIDRs"]["items"]["x-kubernetes-validations"]:
        assert rule["rule"] in page and rule["message"] in page
    for column in version["additionalPrinterColumns"]:
        assert column["jsonPath"] in page
    assert "Default: 51820" in page and "maximum 65535" in page


def test_the_cli_reference_is_the_parser(site: Path) -> None:
    page = _text(site / "reference" / "cli.html")
    parser = build_parser()
    seen = 0
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    stack.append(action.choices[sub])
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in page, option
                    seen += 1
    assert seen > 40


def test_the_site_loads_nothing_from_outside(site: Path) -> None:
    outside = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""")
    for page in site.rglob("*.html"):
        text = page.read_text()
        # Links a reader may follow are fine; a stylesheet, script, font or
        # image from elsewhere is not.
        for tag in re.findall(r"<(?:script|link|img|iframe|source)\b[^>]*>", text):
            assert not outside.search(tag), f"{page.relative_to(site)}: {tag}"
    for css in site.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", css.read_text()), css
        assert "fonts.googleapis" not in css.read_text()


def _listen_port(doc: dict[str, Any]) -> dict[str, Any]:
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field: dict[str, Any] = schema["properties"]["spec"]["properties"]["listenPort"]
    return field


def test_the_crd_reference_follows_an_edited_copy(tmp_path: Path) -> None:
    crds = tmp_path / "crds"
    shutil.copytree(CRDS, crds)
    path = crds / "tunnelpolicies.yaml"
    doc = yaml.safe_load(path.read_text())
    old = " ".join(_listen_port(doc)["description"].split())
    new = "Edited in a temporary copy (the port) 4f1c0de."
    _listen_port(doc)["description"] = new
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "site"
    result = _build(out, crds)
    assert result.returncode == 0, result.stderr
    page = _text(out / "reference" / "crds" / "tunnelpolicy.html")
    assert new in page and old not in page


def test_a_field_without_a_description_fails_the_build(tmp_path: Path) -> None:
    crds = tmp_path / "crds"
    shutil.copytree(CRDS, crds)
    path = crds / "tunnelpolicies.yaml"
    doc = yaml.safe_load(path.read_text())
    del _listen_port(doc)["description"]
    path.write_text(yaml.safe_dump(doc))
    result = _build(tmp_path / "site", crds)
    assert result.returncode != 0
    assert "spec.listenPort has no description" in result.stdout + result.stderr


def _docsgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docsgen", ROOT / "scripts" / "docsgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_table_takes_each_row_from_the_newest_run(tmp_path: Path) -> None:
    def run(stamp: str, p50: float) -> None:
        row = {"scenario": "join", "n": 10, "mode": "delta", "count": 5, "p50_ms": p50,
               "p95_ms": p50, "p99_ms": p50, "messages": 10, "bytes": 2048, "cpu_ms": 7.0}
        (tmp_path / f"bench-{stamp}.json").write_text(json.dumps(
            {"summaries": [row], "peak_rss_bytes": {"delta-10": 2**20}}))

    run("20260101T000000Z", 11.0)
    run("20260102T000000Z", 22.0)
    text, plot = _docsgen().bench_page(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| join |")]
    assert rows == ["| join | 10 | delta | 22 ms | 22 ms | 22 ms | 5 | 2.0 | 7 ms "
                    "| `20260102T000000Z` |"]
    assert plot is None and "Real stack" not in text

    samples = [{"size": 3, "event": "leave", "seconds": s} for s in (0.5, 0.1, 0.3)]
    (tmp_path / "realstack-20260103T000000Z.json").write_text(json.dumps(
        {"when": "20260103T000000Z", "runs": [
            {"size": 3, "samples": samples, "probes": 2, "datagrams_sent": 400,
             "datagrams_missing": 0, "send_errors": 0}]}))
    text, _ = _docsgen().bench_page(tmp_path)
    assert "| 3 | leave | 3 | 300 ms | 100 ms | 500 ms |" in text
    assert "0 of 400 datagrams" in text


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serve(root: Path) -> Iterator[str]:
    """The built site over HTTP on loopback (search needs it served)."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="docs-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(KILL_TIMEOUT)


def _screenshot(url: str, png: Path, netlog: Path, profile: Path) -> None:
    """Headless Chromium renders `url` into `png`; every name but 127.0.0.1
    resolves to nothing, so the page renders from the site alone."""
    assert Path(CHROMIUM).exists(), "no chromium: `make setup-system` installs Debian's"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--no-first-run", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--disable-default-apps",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--log-net-log={netlog}", "--virtual-time-budget=5000",
            f"--screenshot={png}", url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    finally:
        if proc.poll() is None:  # timed out or interrupted: the whole group goes
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=KILL_TIMEOUT)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
    assert png.is_file(), f"chromium wrote no screenshot: {err.decode()[-2000:]}"


def _page_requests(netlog: Path, origin: str) -> set[str]:
    """URLs the page itself asked for (Chromium's own background requests,
    which name no initiator, are left out)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return {e["params"]["url"] for e in log["events"]
            if e["type"] == start and e.get("params", {}).get("initiator") == origin}


def _not_blank(png: Path) -> None:
    from matplotlib import image

    pixels = image.imread(str(png))
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0]), pixels.shape
    assert float(pixels.std()) > 0.05, f"{png} is (nearly) one colour"


def test_chromium_renders_the_landing_page_and_a_crd_page(
        site: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    shots = tmp_path_factory.mktemp("docs-screenshots")
    with _serve(site) as origin:
        for name, page in (("landing", "index.html"),
                           ("crd-tunnelpolicy", "reference/crds/tunnelpolicy.html")):
            png = shots / f"{name}.png"
            netlog = shots / f"{name}.netlog.json"
            _screenshot(f"{origin}/{page}", png, netlog, shots / f"profile-{name}")
            _not_blank(png)
            requests = _page_requests(netlog, origin)
            assert any(u.endswith(".css") for u in requests), requests  # it did load
            assert all(u.startswith(origin + "/") for u in requests), requests
            shutil.rmtree(shots / f"profile-{name}", ignore_errors=True)
    print(f"screenshots in {shots}", file=sys.stderr)
