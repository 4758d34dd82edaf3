"""A throwaway Kubernetes control plane on loopback: etcd plus kube-apiserver.

Owns, for the lifetime of one `TestEnv`: a temporary directory (certificates,
keys, the kubeconfig, etcd's data, the logs), the etcd and kube-apiserver child
processes on free 127.0.0.1 ports, and their shutdown. Used by the integration
and e2e tests (a session-scoped pytest fixture) and by a human
(`python -m vpblu.lab.testenv up`).

It must never leave anything behind: every exit path (a normal exit, an
exception in the with-block, Ctrl-C) stops the API server, then etcd (SIGTERM,
then SIGKILL after `STOP_TIMEOUT`), and removes the directory. If the Python
process itself is killed, the kernel kills the children (PR_SET_PDEATHSIG), and
the next `TestEnv.start` removes directories whose owner is gone
(`sweep_stale_dirs`). It must never listen on anything but loopback, and never
hand out the service-account signing key: tokens come from the TokenRequest API
(`kubectl create token`, `TestEnv.create_token`), as on a real cluster.

The binaries are built by `scripts/build-kube.sh` into `$VPBLU_CACHE/bin`
(default `~/.cache/vpblu/bin`). The API server flags follow controller-runtime's
envtest; there is no kube-controller-manager, so no garbage collection and no
ServiceAccount token controller, but TokenRequest and TokenReview work.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import attrs
import yaml
from cryptography.hazmat.primitives import serialization

from vpblu.lab.pki import CertAuthority, IssuedCert, write_private

DIR_PREFIX = "vpblu-testenv-"
OWNER_FILE = "owner.pid"

# Cold start on a busy 2-core machine: etcd ≈ 0.3 s, the API server ≈ 1-3 s to
# /readyz. The bound is generous because six test suites share those cores.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
PROBE_TIMEOUT = 2.0
REQUEST_TIMEOUT = 30.0
KUBECTL_TIMEOUT = 60.0
# Another process may take a port between our probe and the child's bind.
PORT_ATTEMPTS = 3
LOG_TAIL_BYTES = 4000
# Set (by the test session, tests/conftest.py) to a directory: every TestEnv
# started with it audits every write, and its close moves the audit log there
# (for vpblu.lab.controlleraudit; its children inherit it, e.g. the benchmark).
AUDIT_DIR_ENV = "VPBLU_TEST_AUDIT_DIR"

_PR_SET_PDEATHSIG = 1


@attrs.frozen(slots=True)
class ApiResponse:
    status: int
    body: Any

    @property
    def message(self) -> str:
        """The API server's explanation when it refused (a Status object's message)."""
        if isinstance(self.body, dict):
            return str(self.body.get("message", ""))
        return ""


class ApiConnection:
    """One HTTPS connection to the API server, reopened when the server has
    closed it while idle. Not thread-safe. Made by `TestEnv.connection`."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self._port = port
        self._context = context
        self._conn: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, body: object = None, *,
                content_type: str = "application/json") -> ApiResponse:
        payload = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = content_type
        reused = self._conn is not None
        try:
            return self._exchange(method, path, payload, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not reused:
                raise
        # The server dropped a kept-alive connection before reading the
        # request (Go's idle timeout): nothing was done, so it is sent again.
        return self._exchange(method, path, payload, headers)

    def _exchange(self, method: str, path: str, payload: str | None,
                  headers: dict[str, str]) -> ApiResponse:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection("127.0.0.1", self._port,
                                                     timeout=REQUEST_TIMEOUT,
                                                     context=self._context)
        self._conn.request(method, path, body=payload, headers=headers)
        resp = self._conn.getresponse()
        data = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return ApiResponse(resp.status, json.loads(data))
        return ApiResponse(resp.status, data.decode(errors="replace"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class TestEnvError(RuntimeError):
    """The control plane could not be started (the message carries the log tail)."""

    __test__ = False


class KubectlError(RuntimeError):
    """kubectl failed; the message carries its stderr."""


class TokenRequestFailed(RuntimeError):
    """The TokenRequest API refused; the message carries the API server's reason."""


def default_cache() -> Path:
    """Where `scripts/build-kube.sh` caches what it builds (`$VPBLU_CACHE`)."""
    return Path(os.environ.get("VPBLU_CACHE") or Path.home() / ".cache" / "vpblu")


@attrs.frozen(slots=True)
class Binaries:
    kube_apiserver: Path
    etcd: Path

    @classmethod
    def from_cache(cls, cache: Path | None = None) -> Binaries:
        """The binaries `scripts/build-kube.sh` left in `$VPBLU_CACHE/bin`."""
        if cache is None:
            cache = default_cache()
        found = cls(cache / "bin" / "kube-apiserver", cache / "bin" / "etcd")
        for path in (found.kube_apiserver, found.etcd):
            if not os.access(path, os.X_OK):
                raise TestEnvError(f"{path} is missing: run `bash scripts/build-kube.sh`")
        return found


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the thread that forked it exits.

    The signal fires when the forking *thread* exits, which is why every child
    is forked by the TestEnv's own spawner thread, which lives exactly as long
    as the TestEnv. prctl is looked up here, before the fork: dlopen in a
    forked child of a threaded process can deadlock on a lock held by a thread
    that does not exist there.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(127)

    return preexec


def spawn_child(spawner: ThreadPoolExecutor, name: str, argv: list[str], log_path: Path,
                cwd: Path) -> ChildProcess:
    """Start `argv` from `spawner` (a one-thread pool that lives as long as its
    owner: see _die_with_parent), logging to `log_path`, in a session of its
    own so a terminal's Ctrl-C reaches only the owner, which stops its
    children in order. Used by TestEnv and vpblu.lab.localcluster."""
    log = log_path.open("ab")
    preexec = _die_with_parent()

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=cwd, preexec_fn=preexec, start_new_session=True,
        )

    try:
        proc = spawner.submit(popen).result()
    except BaseException:
        log.close()
        raise
    return ChildProcess(name, proc, log_path, log)


# Ports handed out by free_port come from here: below the kernel's ephemeral
# range (32768-60999 by default) and the NodePort range (30000-32767), above the
# 10xxx ports the control plane and kubelets listen on. A port taken from the
# ephemeral range can be free when chosen and then become the local end of some
# outgoing connection (a watch, a forwarder's upstream) before the server binds
# it: a CI run once lost a controller that way, Address already in use five
# times in 30 s.
_LISTEN_PORTS = range(15000, 30000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port no socket holds now, never one this process handed out before."""
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.choice(_LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_LISTEN_PORTS.start}-{_LISTEN_PORTS.stop - 1}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_dirs(root: Path | None = None) -> list[Path]:
    """Remove TestEnv directories whose owning process is gone (it was SIGKILLed).

    A directory without an owner file is left alone: it may belong to a TestEnv
    being created right now.
    """
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for d in root.glob(DIR_PREFIX + "*"):
        try:
            owner = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class ChildProcess:
    """One child process with its log file; stopped with TERM, then KILL.

    Shared by the test API server's etcd and kube-apiserver and by
    vpblu.lab.localcluster's controllers and daemons."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path,
                 log: IO[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log_tail(self) -> str:
        self._log.flush()
        try:
            data = self.log_path.read_bytes()[-LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a process is OOM-killed."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        try:
            self.proc.wait(KILL_TIMEOUT)
        finally:
            self._log.close()

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(KILL_TIMEOUT)
        finally:
            self._log.close()


class TestEnv:
    """etcd + kube-apiserver on loopback. Create with `TestEnv.start()`.

    Attributes for clients: `kubeconfig_path` (admin, O=system:masters, 0600),
    `server_url`, `ca_pem` (the serving CA), `port`, `etcd_url`, `dir`.

    All methods are synchronous and may be called from any thread (one caller
    at a time), e.g. `await trio.to_thread.run_sync(env.restart_apiserver)`
    from a trio test: the children are forked by the TestEnv's own thread, so
    they do not die with the calling thread.
    """

    __test__ = False  # not a pytest test class, despite the name
    # Opt in (a subclass sets it, or AUDIT_DIR_ENV is set) to kube-apiserver's
    # audit log: every write (metadata level, no reads), JSON lines in
    # `audit_log_path`. In the test suite every TestEnv has it (tests/conftest.py).
    audit_writes = False

    def __init__(self, binaries: Binaries, directory: Path, *,
                 kubectl: str | None = None, serving_ips: Sequence[str] = (),
                 advertise_address: str = "127.0.0.1",
                 service_account_admission: bool = False) -> None:
        self.binaries = binaries
        self.dir = directory
        # For real nodes (vpblu.lab.kubeletnodes): pods reach the API server
        # through the `kubernetes` Service (its ClusterIP, in serving_ips), whose
        # endpoint is advertise_address (a forwarder the nodes reach), and get
        # their kube-api-access volume from the ServiceAccount admission plugin.
        self.serving_ips = tuple(serving_ips)
        self.advertise_address = advertise_address
        self.service_account_admission = service_account_admission
        self._kubectl = kubectl or shutil.which("kubectl") or "kubectl"
        # The one thread that forks every child (see _die_with_parent).
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=DIR_PREFIX)
        self._etcd: ChildProcess | None = None
        self._apiserver: ChildProcess | None = None
        self.port = 0
        self.etcd_port = 0
        self.etcd_peer_port = 0
        self.ca_pem = b""
        self._client_ca: CertAuthority | None = None
        self.kubeconfig_path = directory / "kubeconfig"
        self.apiserver_start_seconds = 0.0

    # --- lifecycle ----------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(cls, binaries: Binaries | None = None, *,
              kubectl: str | None = None, serving_ips: Sequence[str] = (),
              advertise_address: str = "127.0.0.1",
              service_account_admission: bool = False) -> Iterator[TestEnv]:
        """A running control plane for the duration of the with-block; then nothing."""
        sweep_stale_dirs()
        binaries = binaries or Binaries.from_cache()
        directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        env = cls(binaries, directory, kubectl=kubectl, serving_ips=serving_ips,
                  advertise_address=advertise_address,
                  service_account_admission=service_account_admission)
        try:
            (directory / OWNER_FILE).write_text(str(os.getpid()))
            env._write_pki()
            env._start_etcd()
            env.start_apiserver()
            yield env
        finally:
            env.close()

    def close(self) -> None:
        """Stop the API server, then etcd, then remove the directory. Idempotent."""
        try:
            try:
                self.stop_apiserver()
            finally:
                if self._etcd is not None:
                    self._etcd.stop()
        finally:
            self._spawner.shutdown(wait=True)
            self._keep_audit_log()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _keep_audit_log(self) -> None:
        keep = os.environ.get(AUDIT_DIR_ENV)
        if keep and self.audit_log_path.exists():
            with contextlib.suppress(OSError):
                shutil.move(self.audit_log_path,
                            Path(keep) / f"{self.dir.name}-{self.port}.audit.log")

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def pids(self) -> tuple[int, ...]:
        """Pids of the children started so far (running or not)."""
        return tuple(c.pid for c in (self._etcd, self._apiserver) if c is not None)

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and not self._apiserver.exited()

    def stop_apiserver(self) -> None:
        """Stop the API server only; etcd and its data stay. No-op if stopped."""
        child, self._apiserver = self._apiserver, None
        if child is not None:
            child.stop()

    def start_apiserver(self) -> None:
        """Start the API server (on the same port as before, if it ran before) and
        return once /readyz answers ok."""
        if self._apiserver is not None:
            raise TestEnvError("the API server is already running")
        fixed = self.port != 0
        for attempt in range(1 if fixed else PORT_ATTEMPTS):
            if not fixed:
                self.port = free_port()
            began = time.monotonic()
            child = self._spawn("kube-apiserver", self._apiserver_args())
            self._apiserver = child
            try:
                self._wait_ready(child, self._apiserver_ready)
            except TestEnvError:
                self.stop_apiserver()
                if fixed or attempt == PORT_ATTEMPTS - 1 or "address already in use" \
                        not in child.log_tail():
                    raise
                continue
            self.apiserver_start_seconds = time.monotonic() - began
            if not fixed:
                self._write_kubeconfig()
            return

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    # --- clients ------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this API server (always with --kubeconfig).

        With `check`, a failure raises `KubectlError` carrying kubectl's stderr.
        """
        result = subprocess.run(
            [self._kubectl, f"--kubeconfig={self.kubeconfig_path}", *args],
            input=input, capture_output=True, text=True, check=False, timeout=KUBECTL_TIMEOUT,
        )
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited with {result.returncode}: "
                               f"{result.stderr.strip()}")
        return result

    def create_token(self, service_account: str, namespace: str,
                     audiences: Sequence[str] = (), *, bound_pod: str | None = None) -> str:
        """A bound ServiceAccount token from the TokenRequest API.

        With `bound_pod` the token is bound to that Pod (in `namespace`, run
        by `service_account`): it dies with the Pod, and when the Pod has
        spec.nodeName, TokenReview reports the node in user.extra
        ("authentication.kubernetes.io/node-name"). That needs no kubelet:
        the API server reads the Pod (and its Node, if any) when it mints
        the token, and checks the Pod still exists when it reviews it.
        """
        args = ["create", "token", service_account, "-n", namespace]
        args += [f"--audience={a}" for a in audiences]
        if bound_pod is not None:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"]
        return self.kubectl(*args).stdout.strip()

    def request_token(self, service_account: str, namespace: str,
                      audiences: Sequence[str] = (), *, bound_pod: str | None = None,
                      expiration_seconds: int = 3600) -> str:
        """`create_token` through one HTTPS call instead of a kubectl process:
        the same TokenRequest, cheap enough to mint a thousand (the bench)."""
        spec: dict[str, Any] = {"audiences": list(audiences),
                                "expirationSeconds": expiration_seconds}
        if bound_pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": bound_pod}
        answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        if answer.status != 201:
            raise TokenRequestFailed(f"TokenRequest for {namespace}/{service_account} answered "
                               f"{answer.status}: {answer.message}")
        return str(answer.body["status"]["token"])

    def request(self, method: str, path: str, body: object = None, *,
                content_type: str = "application/json") -> ApiResponse:
        """One admin HTTPS call to the API server. The body is sent as JSON; the
        answer is parsed when it is JSON, else kept as text (e.g. /readyz)."""
        with self.connection() as conn:
            return conn.request(method, path, body, content_type=content_type)

    @contextlib.contextmanager
    def connection(self) -> Iterator[ApiConnection]:
        """An admin connection kept open across calls (one thread at a time):
        a timed call then costs the call, not a TLS handshake too."""
        conn = ApiConnection(self.port, self.ssl_context())
        try:
            yield conn
        finally:
            conn.close()

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: trusts the serving CA, presents the admin cert."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        ctx.load_cert_chain(self.dir / "admin.crt", self.dir / "admin.key")
        return ctx

    # --- internals ----------------------------------------------------------------

    def _write_pki(self) -> None:
        d = self.dir
        serving_ca = CertAuthority.create("vpblu-testenv serving CA")
        client_ca = CertAuthority.create("vpblu-testenv client CA")
        self._client_ca = client_ca
        sa_signer = CertAuthority.create("vpblu-testenv service-account signer")
        self.ca_pem = serving_ca.cert_pem
        serving_ca.write(d / "serving-ca.crt")
        client_ca.write(d / "client-ca.crt")
        serving_ca.issue(
            "kube-apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            ip_addresses=("127.0.0.1", *self.serving_ips), server=True,
        ).write(d / "apiserver.crt", d / "apiserver.key")
        client_ca.issue(
            "vpblu-testenv-admin", organizations=("system:masters",), client=True,
        ).write(d / "admin.crt", d / "admin.key")
        write_private(d / "sa.key", sa_signer.key_pem)
        (d / "sa.pub").write_bytes(sa_signer.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write_kubeconfig(self) -> None:
        """The admin kubeconfig names its certificate and key files instead of
        embedding them: kubernetes-asyncio copies embedded data into temporary
        files that it removes only at interpreter exit, so every controller a
        test killed left the admin key behind in /tmp."""
        d = self.dir
        write_private(self.kubeconfig_path, yaml.safe_dump(self.kubeconfig(
            "admin", {"client-certificate": str(d / "admin.crt"),
                      "client-key": str(d / "admin.key")})).encode())

    def kubeconfig(self, user: str, credentials: dict[str, str], *,
                   ca: dict[str, str] | None = None, server: str | None = None,
                   tls_server_name: str | None = None) -> dict[str, Any]:
        """A kubeconfig (as a dict) for `user` presenting `credentials` (a
        kubeconfig user's fields); it trusts the serving CA by its file unless
        `ca` gives the cluster's CA fields.

        `server` defaults to `server_url`; a caller that reaches the API server
        through another address (a forwarder) names it, with `tls_server_name`
        one of the serving certificate's names ("localhost")."""
        cluster: dict[str, Any] = {
            "server": server or self.server_url,
            **(ca or {"certificate-authority": str(self.dir / "serving-ca.crt")})}
        if tls_server_name:
            cluster["tls-server-name"] = tls_server_name
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "vpblu-testenv", "cluster": cluster}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "vpblu-testenv",
                          "context": {"cluster": "vpblu-testenv", "user": user}}],
            "current-context": "vpblu-testenv",
        }

    def client_kubeconfig(self, user: str, cert_pem: bytes, key_pem: bytes, *,
                          server: str | None = None,
                          tls_server_name: str | None = None) -> dict[str, Any]:
        """A kubeconfig (as a dict) with the client certificate, its key and the
        CA embedded, for the Go components (kubelets, kube-proxy)."""
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        return self.kubeconfig(user, {"client-certificate-data": b64(cert_pem),
                                      "client-key-data": b64(key_pem)},
                               ca={"certificate-authority-data": b64(self.ca_pem)},
                               server=server, tls_server_name=tls_server_name)

    def issue_client_cert(self, user: str, groups: Sequence[str] = ()) -> IssuedCert:
        """A client certificate from the API server's client CA: the API server
        authenticates it as `user` (CN) in `groups` (O), as a real cluster's
        x509 users (kubelets, kube-proxy) are."""
        if self._client_ca is None:
            raise TestEnvError("the TestEnv has no client CA yet")
        return self._client_ca.issue(user, organizations=tuple(groups), client=True)

    def _spawn(self, name: str, args: list[str]) -> ChildProcess:
        return spawn_child(self._spawner, name, args, self.dir / f"{name}.log", self.dir)

    def _start_etcd(self) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self.etcd_port, self.etcd_peer_port = free_port(), free_port()
            data = self.dir / "etcd-data"
            shutil.rmtree(data, ignore_errors=True)
            peer = f"http://127.0.0.1:{self.etcd_peer_port}"
            child = self._spawn("etcd", [
                str(self.binaries.etcd),
                f"--data-dir={data}",
                "--name=vpblu-testenv",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=vpblu-testenv={peer}",
                # Throwaway data: durability buys nothing and fsync is the
                # slowest thing etcd does on a shared disk.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ])
            self._etcd = child
            try:
                self._wait_ready(child, self._etcd_ready)
                return
            except TestEnvError:
                self._etcd = None
                child.stop()
                if attempt == PORT_ATTEMPTS - 1 or "address already in use" \
                        not in child.log_tail():
                    raise

    def _apiserver_args(self) -> list[str]:
        d = self.dir
        return [
            str(self.binaries.kube_apiserver),
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            "--bind-address=127.0.0.1",
            # Otherwise it advertises the default route's address (TESTENV.md).
            f"--advertise-address={self.advertise_address}",
            f"--secure-port={self.port}",
            f"--cert-dir={d}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'client-ca.crt'}",
            f"--etcd-servers={self.etcd_url}",
            # No ServiceAccount controller runs, so pods must not need one
            # (unless real nodes run kube-controller-manager).
            *(() if self.service_account_admission
              else ("--disable-admission-plugins=ServiceAccount",)),
            f"--service-account-issuer={self.server_url}/",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            *self._audit_args(),
        ]

    @property
    def audit_log_path(self) -> Path:
        return self.dir / "audit.log"

    def _audit_args(self) -> list[str]:
        if not (self.audit_writes or os.environ.get(AUDIT_DIR_ENV)):
            return []
        policy = self.dir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata",
                       "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
                      {"level": "None"}]}))
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json", "--audit-log-mode=blocking"]

    def _wait_ready(self, child: ChildProcess, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if child.exited():
                raise TestEnvError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
            if probe():
                return
            if time.monotonic() > deadline:
                raise TestEnvError(
                    f"{child.name} not ready after {START_TIMEOUT} s:\n{child.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def _etcd_ready(self) -> bool:
        return self._get_ok(http.client.HTTPConnection(
            "127.0.0.1", self.etcd_port, timeout=PROBE_TIMEOUT), "/health", b'"health":"true"')

    def _apiserver_ready(self) -> bool:
        return self._get_ok(http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=PROBE_TIMEOUT, context=self.ssl_context()),
            "/readyz", b"ok")

    @staticmethod
    def _get_ok(conn: http.client.HTTPConnection, path: str, expect: bytes) -> bool:
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status == 200 and expect in resp.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()


def _up() -> int:
    def on_signal(_signo: int, _frame: object) -> None:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with TestEnv.start() as env:
            print(f"API server {env.server_url} ready in {env.apiserver_start_seconds:.2f} s",
                  file=sys.stderr)
            print(env.kubeconfig_path)
            print(f"export KUBECONFIG={env.kubeconfig_path}", flush=True)
            print("Ctrl-C stops it and removes everything.", file=sys.stderr, flush=True)
            while env.apiserver_running:
                time.sleep(1)
            print("the API server exited", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["up"]:
        print("usage: python -m vpblu.lab.testenv up", file=sys.stderr)
        return 2
    return _up()


if __name__ == "__main__":
    sys.exit(main())


# --- vpblu's kustomize base on a TestEnv ----------------------------------------------

# The repository checkout (vpblu is installed editable from it).
REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "kustomize" / "base"
SAMPLES = REPO / "kustomize" / "samples"
CRD_NAMES = frozenset({
    "vpblunodes.vpblu.io",
    "tunnelpolicies.vpblu.io",
    "routepolicies.vpblu.io",
    "blockpolicies.vpblu.io",
    "rotationpolicies.vpblu.io",
})
# Established usually follows the apply within a second; the bound is for a
# loaded machine.
ESTABLISHED_TIMEOUT = 30.0
CRD_POLL_INTERVAL = 0.1


def established_crds(env: TestEnv) -> frozenset[str]:
    out = env.kubectl("get", "crd", "-o", "json").stdout
    names = set()
    for crd in json.loads(out)["items"]:
        conditions = crd.get("status", {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            names.add(crd["metadata"]["name"])
    return frozenset(names)


def wait_established(env: TestEnv, names: frozenset[str]) -> None:
    deadline = time.monotonic() + ESTABLISHED_TIMEOUT
    while not names <= (seen := established_crds(env)):
        if time.monotonic() > deadline:
            raise AssertionError(f"not Established after {ESTABLISHED_TIMEOUT} s: "
                                 f"{sorted(names - seen)}")
        time.sleep(CRD_POLL_INTERVAL)
    # Established is not yet served: for a moment after it, a list answers 429
    # "storage is (re)initializing" while the resource's watch cache fills.
    for name in names:
        plural, group = name.split(".", 1)
        path = f"/apis/{group}/v1alpha1/{plural}"
        while (status := env.request("GET", path).status) != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {path} answers {status} after "
                                     f"{ESTABLISHED_TIMEOUT} s")
            time.sleep(CRD_POLL_INTERVAL)


def install_base(env: TestEnv) -> None:
    """`kubectl apply -k kustomize/base`, then wait until every CRD is served."""
    env.kubectl("apply", "-k", str(BASE))
    wait_established(env, CRD_NAMES)
