"""Where a daemon's start goes, up to its Hello: the real `vpblu daemon run`
against a stand-in controller that only records when the Hello arrives.

`python bench/daemon_start.py [runs] [--compare TREE]` (default 7; as root;
with --compare, the runs alternate between this checkout and the checkout
TREE, e.g. a `git worktree` of an older commit, under the same load): each
run starts
the daemon exactly as the local cluster does (a new state directory, so a
new key, as on a new machine) and times, from the spawn:

    first log line   the interpreter up, the imports done, the key made
    TCP accept       the stream's connection reaches the controller
    TLS done         the handshake finished on the controller's side
    Hello            the first HTTP/2 DATA frame (the gRPC Hello) arrived

and the daemon's CPU time (user + system, from /proc) at the Hello. Then
`python -X importtime` of the same command line's imports, summed by
package (self times), says what the imports are. Prints medians and the
calibration of `vpblu.lab.realstack` (figures compare across runs and days
only through it).

Isolation: the script re-runs itself under `unshare --net --pid --mount
--mount-proc --fork --kill-child`: the daemon, and the wireguard-go it
starts once the Hello is out, live in a network namespace and a PID
namespace of their own, where the script is the first process: after each
run it kills and reaps every other process there, and all end with it.
The UAPI socket (the directory is the host's) is removed after each run.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ISOLATED = "VPBLU_DAEMON_START_ISOLATED"
HERE = Path(__file__).resolve().parents[1]
INTERFACE = "vpbstart0"
UAPI = Path("/var/run/wireguard") / f"{INTERFACE}.sock"
HELLO_TIMEOUT = 60.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA = 0x0
H2_SETTINGS = 0x4


class StandIn:
    """A TLS listener with ALPN h2 that answers the HTTP/2 preface with an empty
    SETTINGS (and acks the client's), and notes when each connection's first
    DATA frame arrives. It never answers a request: it is a stopwatch."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.events: dict[str, float] = {}
        self.hello = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def reset(self) -> None:
        self.events = {}
        self.hello.clear()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        events = self.events
        events.setdefault("accept", time.monotonic())
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                events.setdefault("tls", time.monotonic())
                tls.sendall(_frame(H2_SETTINGS, 0, b""))
                data = b""
                while len(data) < len(H2_PREFACE):
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data[len(H2_PREFACE):]
                while True:
                    while len(data) >= 9:
                        length = int.from_bytes(data[:3], "big")
                        kind, flags = data[3], data[4]
                        if len(data) < 9 + length:
                            break
                        if kind == H2_SETTINGS and not flags & 0x1:
                            tls.sendall(_frame(H2_SETTINGS, 0x1, b""))
                        if kind == H2_DATA and "hello" not in events:
                            events["hello"] = time.monotonic()
                            self.hello.set()
                        data = data[9 + length:]
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    data += chunk
        except OSError:
            return


def _frame(kind: int, flags: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + b"\0\0\0\0" + payload


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _end_the_rest() -> None:
    """Kill and reap every process of this PID namespace but this one (the
    wireguard-go a daemon started, in a session of its own)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), 9)
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _first_log_line(log: Path, wall: float) -> float | None:
    import datetime

    for line in log.read_text(errors="replace").splitlines():
        try:
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        return at - wall
    return None


def daemon_argv(work: Path, port: int, run: int) -> list[str]:
    state = Path(tempfile.mkdtemp(prefix=f"state{run}-", dir=work))  # a new key each time
    return [sys.executable, "-m", "vpblu.cli", "--log-level", "INFO", "daemon", "run",
            "--controller", f"127.0.0.1:{port}", "--ca", str(work / "ca.pem"),
            "--server-name", "controller.test", "--token-file", str(work / "token"),
            "--node-name", "start-bench", "--interface", INTERFACE,
            "--state-dir", str(state), "--bpf-pin-dir", str(state / "pins"),
            "--pod-veth-glob", "vpbstartveth*", "--underlay-interface", "lo",
            "--wireguard-backend", "userspace", "--metrics-listen", ""]


def one_run(work: Path, stand_in: StandIn, run: int, tree: Path
            ) -> dict[str, float | None]:
    stand_in.reset()
    log = Path(tempfile.mkstemp(prefix=f"daemon{run}-", suffix=".log", dir=work)[1])
    with log.open("wb") as out:
        wall, began = time.time(), time.monotonic()
        # From `tree`: `-m` puts the working directory first on sys.path.
        proc = subprocess.Popen(daemon_argv(work, stand_in.port, run), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tree)
        try:
            if not stand_in.hello.wait(HELLO_TIMEOUT):
                raise TimeoutError(f"no Hello within {HELLO_TIMEOUT} s from {tree}; the "
                                   f"daemon's log:\n{log.read_text(errors='replace')[-3000:]}")
            cpu = _cpu_seconds(proc.pid)
        finally:
            proc.kill()
            proc.wait()
            _end_the_rest()
            UAPI.unlink(missing_ok=True)
    events = dict(stand_in.events)
    return {"first_log_line": _first_log_line(log, wall),
            "accept": events["accept"] - began, "tls": events["tls"] - began,
            "hello": events["hello"] - began, "cpu_at_hello": cpu}


IMPORTS = """
import vpblu.cli
from vpblu import aioloop
from vpblu.node.daemon import DaemonSettings, cleanup_node, run_daemon
from vpblu.node.keys import KeyFileError
from vpblu.node.stream import StreamSettings
from vpblu.stream.transport import ClientTLS, set_keepalive_timeout
from vpblu.supervisor import SupervisorEscalation
"""


def import_groups() -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """(total ms, self ms by top-level package, the 12 slowest vpblu modules by
    self ms) of the daemon's imports before its Hello, from -X importtime."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS],
                         capture_output=True, text=True, check=True).stderr
    groups: collections.Counter[str] = collections.Counter()
    ours: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        self_us, name = int(m.group(1)), m.group(4)
        top = name.split(".")[0]
        groups[top.lstrip("_") if top.startswith("_") and "." not in name else top] += self_us
        if name.startswith("vpblu"):
            ours[name] = self_us / 1e3
    total = sum(groups.values()) / 1e3
    return (total, [(k, v / 1e3) for k, v in groups.most_common(14)],
            sorted(ours.items(), key=lambda kv: -kv[1])[:12])


def main(runs: int, compare: Path | None) -> None:
    if os.getpid() != 1:
        # _end_the_rest kills every other process it sees: only as the first
        # process of a PID namespace of its own.
        raise SystemExit(f"run without {ISOLATED}: the script isolates itself")
    sys.path.insert(0, str(HERE))
    from vpblu.lab.pki import CertAuthority
    from vpblu.lab.realstack import calibration

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    cal = calibration()
    print(cal.describe(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="vpblu-start-"))
    try:
        ca = CertAuthority.create("start-bench")
        (work / "ca.pem").write_bytes(ca.cert_pem)
        ca.issue("controller.test", dns_names=("controller.test",), server=True).write(
            work / "server.pem", work / "server.key")
        (work / "token").write_text("not-checked")
        stand_in = StandIn(work / "server.pem", work / "server.key")
        trees = {"this checkout": HERE, **({} if compare is None else {str(compare): compare})}
        results: dict[str, list[dict[str, float | None]]] = {t: [] for t in trees}
        for run in range(runs):
            for name, tree in trees.items():
                r = one_run(work, stand_in, run, tree)
                results[name].append(r)
                print(f"  run {run + 1}/{runs} ({name}): " + ", ".join(
                    f"{k} {v * 1e3:.0f} ms" for k, v in r.items() if v is not None), flush=True)
        for name, rs in results.items():
            print(f"\ndaemon start to its Hello ({name}), medians of {runs} "
                  "(ms after the spawn):")
            for key in rs[0]:
                values = [v for r in rs if (v := r[key]) is not None]
                if values:
                    print(f"  {key:<15} {statistics.median(values) * 1e3:7.0f}"
                          f"   (min {min(values) * 1e3:.0f}, max {max(values) * 1e3:.0f})")
        total, groups, ours = import_groups()
        print(f"\nimports before the Hello (-X importtime, self times summed): {total:.0f} ms")
        for name, ms in groups:
            print(f"  {name:<28} {ms:6.1f} ms")
        print("slowest vpblu modules (self):")
        for name, ms in ours:
            print(f"  {name:<40} {ms:6.1f} ms")
        print(f"after: {calibration().describe()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        UAPI.unlink(missing_ok=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=7)
    parser.add_argument("--compare", type=Path, default=None, metavar="TREE")
    args = parser.parse_args()
    if os.environ.get(ISOLATED) != "1":
        os.environ[ISOLATED] = "1"
        sys.exit(subprocess.call(["unshare", "--net", "--pid", "--mount", "--mount-proc",
                                  "--fork", "--kill-child", sys.executable,
                                  str(Path(__file__).resolve()), *sys.argv[1:]]))
    main(args.runs, args.compare.resolve() if args.compare else None)
