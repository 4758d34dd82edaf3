"""Run the slow suites N times in a row and report each test's failures.

    .venv/bin/python scripts/test_repeat.py --runs 5 [--out bench/results] [pytest paths...]

Each run is a fresh pytest process (its own API server, its own namespaces), as
CI runs it; a JUnit XML of every run is read back, and the report lists, per
test, in how many runs it failed and the first line of each failure. The
report is printed and written to OUT/repeat-<UTC stamp>.txt. Exit status 1 if
any run failed, so `make test-repeat` fails too.

After each run the machine is checked for what a run must never leave behind
(network namespaces, the processes the suites start): a leak is reported as a
failure of that run even when every test passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("tests/integration", "tests/e2e")
LEFTOVER_PATTERN = (r"wireguard-go|kube-apiserver|kube-proxy|etcd |flowprobe"
                    r"|vpblu (daemon|controller)")
OWNERS = ("pytest", "vpblu.bench", "vpblu.lab")
# In the environment of every process a run starts: what it left behind is found by it.
RUN_MARKER = "VPBLU_TEST_REPEAT_RUN"


def _failures(junit: Path) -> tuple[int, dict[str, str]]:
    """(tests run, {test id: first line of its failure or error})."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        return 0, {"<session>": f"no JUnit report: {e}"}
    failed: dict[str, str] = {}
    total = 0
    for case in root.iter("testcase"):
        total += 1
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or tag).strip().splitlines()
                failed[test_id] = message[0][:200] if message else tag
    return total, failed


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def _other_pytests() -> bool:
    me = os.getpid()
    return any(any(owner in _cmdline(int(p.name)) for owner in OWNERS) and int(p.name) != me
               for p in Path("/proc").iterdir() if p.name.isdigit())


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _leftovers(netns_before: set[str], marker: bytes) -> list[str]:
    """What this run left behind: processes it started that outlived it and network
    namespaces made during it that stay. A process is this run's when its environment
    carries the run's marker (every process a test starts inherits it, also the
    wireguard-go that daemonizes and is re-parented to init); the machine may be
    shared with other test sessions, whose processes do not carry it. A new namespace
    counts only once no other pytest runs or five minutes have passed with it still
    there."""
    procs = subprocess.run(["pgrep", "-f", LEFTOVER_PATTERN],
                           capture_output=True, text=True).stdout
    found = [f"process {pid} {_cmdline(pid)[:120]}"
             for pid in map(int, procs.split())
             if pid != os.getpid() and _cmdline(pid) and marker in _environ(pid)]
    deadline = time.monotonic() + 300
    new = _netns() - netns_before
    while new and _other_pytests() and time.monotonic() < deadline:
        time.sleep(15)
        new &= _netns()
    found += [f"netns {name}" for name in sorted(new)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    args = parser.parse_args()

    per_test: dict[str, list[tuple[int, str]]] = defaultdict(list)
    lines: list[str] = []
    any_failed = False
    with tempfile.TemporaryDirectory(prefix="vpblu-repeat-") as tmp:
        for run in range(1, args.runs + 1):
            junit = Path(tmp) / f"run{run}.xml"
            netns_before = _netns()
            began = time.monotonic()
            mark = f"{os.getpid()}-{run}-{time.time_ns()}"
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"--junitxml={junit}", *args.paths], cwd=ROOT,
                env={**os.environ, RUN_MARKER: mark}).returncode
            seconds = time.monotonic() - began
            total, failed = _failures(junit)
            leaks = _leftovers(netns_before, f"{RUN_MARKER}={mark}".encode())
            for test_id, message in failed.items():
                per_test[test_id].append((run, message))
            if leaks:
                per_test["<left behind after the run>"].append((run, "; ".join(leaks)[:300]))
            any_failed |= code != 0 or bool(failed) or bool(leaks)
            lines.append(f"run {run}: {total} tests, {len(failed)} failed, exit {code}, "
                         f"{seconds:.0f} s{', LEFT BEHIND: ' + str(len(leaks)) if leaks else ''}")
            print(lines[-1], flush=True)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = [f"vpblu test-repeat {stamp}: {args.runs} runs of {' '.join(args.paths)}", *lines]
    if per_test:
        report.append("failures by test:")
        for test_id, runs in sorted(per_test.items()):
            report.append(f"  {test_id}: failed in {len(runs)} of {args.runs} runs")
            report += [f"    run {run}: {message}" for run, message in runs]
    else:
        report.append(f"0 failures in {args.runs} runs")
    text = "\n".join(report) + "\n"
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"repeat-{stamp}.txt").write_text(text)
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
