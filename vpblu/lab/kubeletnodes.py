"""The local cluster with real nodes: containerd, kubelet and kube-proxy per node.

`KubeletCluster.start()` builds what `LocalCluster` builds (a TestEnv, an
underlay bridge, one network namespace per node on it, the real kube-proxy in
each), but no vpblu process of its own: instead every node runs a container
runtime and a kubelet, the control plane adds kube-controller-manager and
kube-scheduler, and vpblu is installed as a user installs it, with
`kubectl apply -k` of an overlay (written into the cluster's directory) that
points at the image `make image` built. The DaemonSet's and the Deployment's
pods, their probes, mounts, security context, ServiceAccount tokens, the
certs Job, Services and EndpointSlices are then made and run by Kubernetes.

Per node i (network namespace vc-<TAG>-n<i>, underlay address 10.78.K.i):

- a mount namespace of its own (`unshare --mount`, kept by a bind mount of
  its nsfs file in the node's directory) in which /var/lib/vpblu,
  /var/run/wireguard and /etc/cni are the node's own directories and
  /sys/fs/bpf is a fresh bpffs: three nodes on one machine see what three
  machines would at the paths the DaemonSet mounts (so the daemon's defaults,
  wg-mesh and /sys/fs/bpf/vpblu, are used unchanged);
- containerd (Debian's 1.6) with its own root, state, socket, runc root and
  CNI directories; the pause image and the test-pod image
  (scripts/build-node-images.sh) and vpblu's image are imported with `ctr`
  (nothing is pulled: every pod says imagePullPolicy IfNotPresent or Never);
- a bridge + host-local CNI (cni0, the node's podCIDR) and, as a host-gw CNI
  would, a route to every other node's podCIDR via that node's underlay
  address; pods reach the API server through the `kubernetes` Service, whose
  endpoint is a forwarder on the controllers' address (masqueraded on the
  node: the root namespace has no route back to pods);
- kubelet (cgroupfs driver, cgroup v1, its own --root-dir and cgroup root
  /vc<TAG>n<i>), authenticated as system:node:node<i> by a client certificate;
- kube-proxy, as in LocalCluster.

Teardown (every exit path): kube-proxy, kubelets, every container's
processes (by the node's cgroup root) and containerd shims (by their socket
address), containerd, the mount namespaces, cgroups, then what LocalCluster
removes. A harness killed with SIGKILL leaves its shims; the next start
sweeps them with the rest (`sweep_stale_nodes`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import yaml

from vpblu.lab.localcluster import (
    DIR_PREFIX,
    KUSTOMIZE_BASE,
    KUSTOMIZE_SAMPLES,
    OWNER_FILE,
    POD_SUPERNET,
    PREFIX,
    REPO,
    SYSTEM_NAMESPACE,
    TAG_FILE,
    ClusterError,
    ClusterSettings,
    LocalCluster,
    Node,
    _free_underlay,
    _remove_tag,
    _signals_deferred,
    nsenter,
    pids_where,
    run,
    sweep_stale,
)
from vpblu.lab.pki import write_private
from vpblu.lab.testenv import ChildProcess, TestEnv, default_cache, pid_alive

log = logging.getLogger(__name__)

SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
CLUSTER_DNS = "10.0.0.10"
CNI_BIN = Path("/usr/lib/cni")
CGROUP_V1 = Path("/sys/fs/cgroup")
NODE_PATHS = ("/var/lib/vpblu", "/var/run/wireguard", "/etc/cni")
NODE_USER_GROUP = "system:nodes"
NODE_ROLE = "system:node"
IMAGE_NAME = "docker.io/library/vpblu"

CONTAINERD_START_TIMEOUT = 60.0
NODE_READY_TIMEOUT = 180.0
ROLLOUT_TIMEOUT = 300.0
IMPORT_TIMEOUT = 300.0
# Cold (Debian root filesystem, locked dependencies): a few minutes; warm, the
# vpblu layer alone: well under a minute.
IMAGE_BUILD_TIMEOUT = 900.0
MESH_TIMEOUT = 120.0
POD_TIMEOUT = 120.0
TEST_NAMESPACE = "default"
KUSTOMIZE_CLEANUP = REPO / "kustomize" / "cleanup"


@attrs.frozen(slots=True)
class KubeletSettings:
    nodes: int = 3
    proxy_mode: str = "iptables"
    log_level: str = "INFO"


@attrs.define
class NodeRuntime:
    """What a kubelet node runs besides its namespace (LocalCluster's Node)."""

    node: Node
    dir: Path
    cgroup_root: str  # /vc<TAG>node<i>, in every cgroup v1 hierarchy
    containerd: ChildProcess | None = None
    kubelet: ChildProcess | None = None

    @property
    def mntns(self) -> Path:
        return self.dir / "mntns"

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    def enter(self) -> list[str]:
        """The argv prefix that runs a command on this node (its net and mount namespaces)."""
        return ["nsenter", f"--net=/run/netns/{self.node.netns}", f"--mount={self.mntns}", "--"]

    def ctr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run(*self.enter(), "ctr", f"--address={self.socket}", "--namespace=k8s.io",
                   *args, timeout=timeout)


def _image(option: str) -> tuple[Path, str]:
    out = run("bash", str(REPO / "scripts" / "build-node-images.sh"), option,
              timeout=IMPORT_TIMEOUT).stdout.split()
    return Path(out[0]), out[1]


def _vpblu_image(*, build: bool = False) -> tuple[Path, str]:
    """The archive `make image` built and its manifest digest; with `build`, built
    first from this checkout (scripts/build-image.sh: cached by its inputs, so
    only what changed is rebuilt, and the manifests never meet an image older
    than the code they were written for)."""
    script = REPO / "scripts" / "build-image.sh"
    if build:
        run("bash", str(script), timeout=IMAGE_BUILD_TIMEOUT)
    path = Path(run("bash", str(script), "--print-path").stdout.strip())
    digest = run("bash", str(script), "--print-digest", check=False).stdout.strip()
    if not path.exists() or not digest.startswith("sha256:"):
        raise ClusterError(f"no vpblu image at {path}: run `make image`")
    return path, digest


def _shim_pids(address_prefix: str) -> list[int]:
    """containerd-shim processes serving a containerd whose socket is under the prefix."""
    return pids_where(lambda argv: b"containerd-shim" in argv[0] and any(
        a.startswith(address_prefix.encode()) for a in argv))


def _cgroup_dirs(root: str) -> list[Path]:
    if not CGROUP_V1.is_dir():
        return []
    return [c / root.lstrip("/") for c in CGROUP_V1.iterdir()
            if (c / root.lstrip("/")).is_dir()]


def _walk_dirs(top: Path) -> list[Path]:
    """Every directory under `top` (cgroups vanish while walked: errors ignored)."""
    return [Path(d) for d, _, _ in os.walk(top, onerror=lambda _e: None)]


def _kill_cgroup_tree(root: str) -> None:
    """SIGKILL every process under the cgroup root, then remove its cgroups."""
    for _ in range(50):
        pids: set[int] = set()
        for top in _cgroup_dirs(root):
            for d in _walk_dirs(top):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for top in _cgroup_dirs(root):
        for d in sorted(_walk_dirs(top), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _remove_node_runtime(directory: Path, tag: str) -> None:
    """Everything a kubelet cluster's nodes leave outside LocalCluster's objects."""
    for pid in _shim_pids(str(directory)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for i in range(1, 64):
        _kill_cgroup_tree(f"/{tag}node{i}")
    # The mount namespaces' files first, then the node directories (bind-mounted
    # onto themselves, so os.path.ismount cannot tell: read mountinfo).
    for mnt in sorted(_mounts_under(directory), key=lambda m: len(m.parts), reverse=True):
        run("umount", "-l", str(mnt), check=False)


def _mounts_under(directory: Path) -> list[Path]:
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = Path(line.split()[4].replace("\\040", " "))
            if point.is_relative_to(directory):
                found.append(point)
    return found


def sweep_stale_nodes(root: Path | None = None) -> list[str]:
    """Shims, cgroups and mount namespaces of kubelet clusters whose harness died."""
    root = Path(tempfile.gettempdir()) if root is None else root
    swept = []
    for d in root.glob(DIR_PREFIX + "*"):
        try:
            owner = int((d / OWNER_FILE).read_text())
            tag = (d / TAG_FILE).read_text().strip()
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner) and (d / "kubelet-cluster").exists():
            _remove_node_runtime(d, f"{PREFIX}{tag}")
            swept.append(tag)
    return swept


class KubeletCluster(LocalCluster):
    """LocalCluster's namespaces with real nodes. `KubeletCluster.start()`."""

    runtimes: list[NodeRuntime]
    _aux: list[ChildProcess]
    pause_image: str
    testpod_image: str

    @classmethod
    @contextlib.contextmanager
    def start_kubelet(cls, settings: KubeletSettings | None = None, *,
                      progress: Callable[[str], None] | None = None
                      ) -> Iterator[KubeletCluster]:
        """A cluster whose nodes are Ready, nothing of vpblu installed yet."""
        ks = settings or KubeletSettings()
        say = progress or (lambda _msg: None)
        sweep_stale_nodes()
        sweep_stale()
        tag, underlay = _free_underlay()
        directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{tag}-"))
        (directory / OWNER_FILE).write_text(str(os.getpid()))
        (directory / TAG_FILE).write_text(tag)
        (directory / "kubelet-cluster").write_text("")
        began = time.monotonic()
        try:
            controller_ip = str(underlay[253])
            with TestEnv.start(serving_ips=(KUBERNETES_SERVICE_IP,),
                               advertise_address=controller_ip,
                               service_account_admission=True) as env:
                base = ClusterSettings(nodes=ks.nodes, pods_per_node=0, daemons=False,
                                       kube_proxy=True, proxy_mode=ks.proxy_mode,
                                       log_level=ks.log_level)
                cluster = cls(base, env, directory, tag, underlay)
                cluster.runtimes = []
                cluster._aux = []
                try:
                    say(f"API server {env.server_url} ready ({env.apiserver_start_seconds:.1f} s)")
                    cluster._make_underlay()
                    cluster.controllers.clear()
                    cluster._prepare_kube_proxy()
                    cluster._forward_service_endpoint()
                    cluster._start_control_plane()
                    say("kube-controller-manager and kube-scheduler started")
                    images = [_image("--print-pause"), _image("--print-testpod"),
                              (_vpblu_image(build=True)[0], f"{IMAGE_NAME}:0.1.0")]
                    cluster.pause_image = images[0][1]
                    cluster.testpod_image = images[1][1]
                    for i in range(1, ks.nodes + 1):
                        cluster._make_node(i)
                    for node in cluster.nodes:
                        cluster._make_runtime(node)
                    say(f"{ks.nodes} nodes: containerd running "
                        f"({time.monotonic() - began:.0f} s)")
                    digest = _vpblu_image()[1]

                    def load(rt: NodeRuntime) -> None:
                        # Unpacked now (the snapshotter the CRI uses), not when the
                        # first pod needs it: the certs Job's pod then starts at once.
                        for archive, _ in images:
                            rt.ctr("images", "import", str(archive), timeout=IMPORT_TIMEOUT)
                        # The name a pull by digest leaves (the manifests say
                        # vpblu:0.1.0@sha256:...), which `ctr import` does not.
                        rt.ctr("images", "tag", f"{IMAGE_NAME}:0.1.0", f"{IMAGE_NAME}@{digest}")

                    with ThreadPoolExecutor(max_workers=len(cluster.runtimes)) as pool:
                        list(pool.map(load, cluster.runtimes))
                    say(f"images imported into every containerd ({time.monotonic() - began:.0f} s)")
                    for rt in cluster.runtimes:
                        cluster._start_kubelet(rt)
                    cluster._wait_nodes_registered()
                    for node in cluster.nodes:
                        cluster.start_kube_proxy(node)
                    cluster.wait_for(cluster._nodes_ready, NODE_READY_TIMEOUT,
                                     "every Node Ready")
                    cluster.kube_proxy_ready_seconds = cluster.wait_kube_proxies_ready()
                    say(f"{ks.nodes} kubelet nodes Ready, kube-proxy programmed "
                        f"({time.monotonic() - began:.0f} s)")
                    yield cluster
                finally:
                    cluster.close()
        finally:
            _remove_node_runtime(directory, f"{PREFIX}{tag}")
            _remove_tag(tag)
            shutil.rmtree(directory, ignore_errors=True)

    # --- installing vpblu like a user ------------------------------------------------

    def write_overlay(self, *, daemon_capabilities: Sequence[str] = ()) -> Path:
        """kustomize/base with the local image (by digest).

        `daemon_capabilities`: run the daemon without privilege, with only these
        capabilities and /dev/net/tun (the capability experiment)."""
        _, digest = _vpblu_image()
        overlay = self.dir / "overlay"
        overlay.mkdir(exist_ok=True)
        base = os.path.relpath(KUSTOMIZE_BASE, overlay)
        kustomization: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [base],
            "images": [{"name": "vpblu", "newTag": "0.1.0", "digest": digest}],
            # Nothing else: the base needs no cluster DNS (the daemons dial
            # the controller Service's ClusterIP from kubelet's variables).
            "patches": [],
        }
        if daemon_capabilities:
            kustomization["patches"].append({
                "target": {"kind": "DaemonSet", "name": "vpblu-daemon"},
                "patch": yaml.safe_dump([
                    {"op": "replace", "path": "/spec/template/spec/containers/0/securityContext",
                     "value": {"privileged": False,
                               "capabilities": {"drop": ["ALL"],
                                                "add": list(daemon_capabilities)}}},
                    {"op": "add", "path": "/spec/template/spec/volumes/-",
                     "value": {"name": "dev-net-tun",
                               "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}}},
                    {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-",
                     "value": {"name": "dev-net-tun", "mountPath": "/dev/net/tun"}},
                ])})
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return overlay

    def write_cleanup_overlay(self) -> Path:
        _, digest = _vpblu_image()
        overlay = self.dir / "cleanup-overlay"
        overlay.mkdir(exist_ok=True)
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(KUSTOMIZE_CLEANUP, overlay)],
            "images": [{"name": "vpblu", "newTag": "0.1.0", "digest": digest}],
        }))
        return overlay

    def uninstall(self, timeout: float = ROLLOUT_TIMEOUT) -> float:
        """What the README says a user does: `kubectl delete -k` the install, then
        apply kustomize/cleanup, wait for it on every node, delete it."""
        began = time.monotonic()
        self.kubectl("delete", "-k", str(self.dir / "overlay"), "--ignore-not-found",
                     "--wait=true", f"--timeout={int(timeout)}s")
        cleanup = self.write_cleanup_overlay()
        self.kubectl("apply", "-k", str(cleanup))
        result = self.kubectl("rollout", "status", "daemonset/vpblu-cleanup", "-n",
                              "kube-system", f"--timeout={int(timeout)}s", check=False)
        if result.returncode != 0:
            raise ClusterError(f"vpblu-cleanup did not finish: {result.stderr.strip()}\n"
                               f"{self.diagnostics()}")
        self.kubectl("delete", "-k", str(cleanup), "--wait=true", f"--timeout={int(timeout)}s")
        return time.monotonic() - began

    def vpblu_state(self, node: Node) -> dict[str, str]:
        """What vpblu leaves on a node, by kind (empty strings: nothing)."""
        rt = self.runtime(node)
        links = run(*rt.enter(), "ip", "-o", "link", "show").stdout
        rules = run(*rt.enter(), "ip", "rule", "show").stdout
        nft = run(*rt.enter(), "nft", "list", "ruleset", check=False).stdout
        return {
            "links": "\n".join(line for line in links.splitlines() if "wg-mesh" in line),
            "rules": "\n".join(line for line in rules.splitlines()
                               if line.split(":")[0].strip() not in ("0", "32766", "32767")),
            "table": run(*rt.enter(), "ip", "route", "show", "table", "5182",
                         check=False).stdout.strip(),
            "tc": run(*rt.enter(), "tc", "filter", "show", "dev", node.underlay_interface,
                      "egress", check=False).stdout.strip(),
            # (progs.debug and maps.debug are the kernel's own in every bpffs.)
            "pins": run(*rt.enter(), "find", "/sys/fs/bpf", "-mindepth", "1", "!", "-name",
                        "*.debug").stdout.strip(),
            "state": run(*rt.enter(), "find", "/var/lib/vpblu", "-mindepth", "1").stdout.strip(),
            "sockets": run(*rt.enter(), "find", "/var/run/wireguard", "-mindepth", "1",
                           check=False).stdout.strip(),
            "nft": "\n".join(line for line in nft.splitlines() if "vpblu" in line.lower()),
        }

    def runtime(self, node: Node) -> NodeRuntime:
        return next(rt for rt in self.runtimes if rt.node is node)

    def exec_in(self, netns: str, *argv: str, check: bool = True,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A node's namespace is entered with its mount namespace too (wg's UAPI
        sockets - the vpblu-wireguard pod's wireguard-go, on the hostPath
        /var/run/wireguard -, bpffs and the state directory are the node's own)."""
        for rt in getattr(self, "runtimes", []):
            if rt.node.netns != netns:
                continue
            return run(*rt.enter(), *argv, check=check, timeout=timeout)
        return run(*nsenter(netns), *argv, check=check, timeout=timeout)

    def daemon_pod(self, node: Node) -> str:
        """The name of the DaemonSet's pod on `node` (ClusterError: none)."""
        out = json.loads(self.kubectl(
            "get", "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=daemon",
            "--field-selector", f"spec.nodeName={node.name}", "-o", "json").stdout)
        running = [p["metadata"]["name"] for p in out["items"]
                   if (p.get("status") or {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        if not running:
            raise ClusterError(f"no running daemon pod on {node.name}")
        return str(running[0])

    def apply_tunnel_policy(self, timeout: float = MESH_TIMEOUT) -> float:
        """kustomize/samples (the full-mesh TunnelPolicy), then every node's wg-mesh
        has the others as peers with their published keys."""
        self.apply_kustomize(KUSTOMIZE_SAMPLES)
        return self.wait_for(self.mesh_complete, timeout, "the mesh complete on every node")

    # --- pods --------------------------------------------------------------------------

    def run_pod(self, name: str, node: Node, args: list[str], *,
                labels: dict[str, str] | None = None) -> dict[str, Any]:
        """A test pod (busybox image) on `node`, Running; its object."""
        self.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": TEST_NAMESPACE, "labels": labels or {}},
            "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 1,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": self.testpod_image,
                                     "imagePullPolicy": "Never", "args": args}]},
        })

        def running() -> bool:
            obj = self.get("pod", name, namespace=TEST_NAMESPACE) or {}
            return (obj.get("status") or {}).get("phase") == "Running"

        self.wait_for(running, POD_TIMEOUT, f"pod {name} Running")
        pod = self.get("pod", name, namespace=TEST_NAMESPACE)
        assert pod is not None
        return pod

    def pod_pid(self, name: str, namespace: str = TEST_NAMESPACE) -> int:
        """A process of the pod's (first) container, found by its cgroup."""
        obj = self.get("pod", name, namespace=namespace)
        if obj is None:
            raise ClusterError(f"no pod {namespace}/{name}")
        uid = obj["metadata"]["uid"]
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        cid = (statuses[0].get("containerID") or "").rpartition("//")[2] if statuses else ""
        if not cid:
            raise ClusterError(f"pod {namespace}/{name} has no container yet")
        for rt in self.runtimes:
            top = CGROUP_V1 / "pids" / rt.cgroup_root.lstrip("/")
            for d in _walk_dirs(top):
                if d.name == cid and d.parent.name == f"pod{uid}":
                    with contextlib.suppress(OSError):
                        pids = (d / "cgroup.procs").read_text().split()
                        if pids:
                            return int(pids[0])
        raise ClusterError(f"no process of pod {namespace}/{name} (container {cid[:12]})")

    def exec_in_pod(self, name: str, *argv: str, check: bool = True,
                    timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run argv inside the pod's container (its network, mount and pid namespaces)."""
        pid = self.pod_pid(name)
        return run("nsenter", "-t", str(pid), "-n", "-m", "-p", "--", *argv, check=check,
                   timeout=timeout)

    def pod_netns(self, name: str) -> str:
        """The pod's network namespace as a path nsenter --net= takes."""
        return f"/proc/{self.pod_pid(name)}/ns/net"

    def install(self, timeout: float = ROLLOUT_TIMEOUT, *,
                daemon_capabilities: Sequence[str] = ()) -> float:
        """`kubectl apply -k` the overlay; wait for the Deployment and DaemonSet to roll out."""
        began = time.monotonic()
        overlay = self.write_overlay(daemon_capabilities=daemon_capabilities)
        self.kubectl("apply", "-k", str(overlay))
        self.wait_rollout(timeout)
        return time.monotonic() - began

    def wait_rollout(self, timeout: float = ROLLOUT_TIMEOUT) -> None:
        """`kubectl rollout status` of both (polled: kubectl's own calls are bounded
        shorter than a rollout on a busy machine)."""
        for what in ("deployment/vpblu-controller", "daemonset/vpblu-daemon"):
            said = ""

            def done(what: str = what) -> bool:
                nonlocal said
                result = self.kubectl("rollout", "status", what, "-n", SYSTEM_NAMESPACE,
                                      "--timeout=20s", check=False)
                said = (result.stdout + result.stderr).strip()
                return result.returncode == 0

            try:
                self.wait_for(done, timeout, f"{what} rolled out")
            except ClusterError as exc:
                raise ClusterError(f"{what}: {said}\n{exc}") from None
        # vpblu-wireguard rolls OnDelete (kubectl rollout status refuses it):
        # every node's pod, of the DaemonSet's current spec, Ready.
        self.wait_for(lambda: self.daemonset_ready("vpblu-wireguard"), timeout,
                      "daemonset/vpblu-wireguard Ready on every node")

    def daemonset_ready(self, name: str) -> bool:
        ds = self.get("daemonset", name, namespace=SYSTEM_NAMESPACE)
        if ds is None:
            return False
        status = ds.get("status") or {}
        want = len(self.nodes)
        return (status.get("desiredNumberScheduled") == want
                and status.get("numberReady") == want
                and status.get("observedGeneration") == ds["metadata"]["generation"])

    def restart_kubelet(self, node: Node, timeout: float = NODE_READY_TIMEOUT) -> None:
        """Stop `node`'s kubelet (its containers keep running) and start it again:
        it registers its Node anew (a kubelet registers only at start: a deleted
        Node stays deleted until then), whose podCIDR is set as at start."""
        rt = self.runtime(node)
        proc, rt.kubelet = rt.kubelet, None
        if proc is not None:
            proc.stop()
        self._start_kubelet(rt)
        self.wait_for(lambda: self.get("node", node.name) is not None, timeout,
                      f"{node.name}'s kubelet registering its Node again")
        self.kubectl("patch", "node", node.name, "--type=merge", "-p", json.dumps(
            {"spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]}}))

    # --- diagnostics -----------------------------------------------------------------

    def diagnostics(self) -> str:
        parts = []
        out = self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        parts.append(f"--- pods:\n{out}")
        events = self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp",
                              check=False).stdout
        parts.append(f"--- events:\n{events[-3000:]}")
        for rt in getattr(self, "runtimes", []):
            if rt.kubelet is not None:
                parts.append(f"--- kubelet {rt.node.name}:\n{rt.kubelet.log_tail()[-1500:]}")
        for proc in getattr(self, "_aux", []):
            parts.append(f"--- {proc.name}:\n{proc.log_tail()[-800:]}")
        return "\n".join(parts)

    def pod_logs(self, name: str, namespace: str = SYSTEM_NAMESPACE) -> str:
        """A pod's container logs read from its node's kubelet log directory."""
        out = ""
        for rt in self.runtimes:
            for f in (rt.dir / "pod-logs").glob(f"{namespace}_{name}_*/*/*.log"):
                out += f.read_text(errors="replace")
        return out

    # --- building --------------------------------------------------------------------

    def _forward_service_endpoint(self) -> None:
        """The `kubernetes` Service's endpoint (advertise address, secure port)."""
        listen = f"{self.controller_ip}:{self.env.port}"
        proc = self._spawn("api-endpoint-forwarder", [
            sys.executable,
            "-m", "vpblu.lab.tcpforward", listen, f"127.0.0.1:{self.env.port}",
        ], self.dir / "api-endpoint-forwarder.log")
        self._aux.append(proc)
        self.wait_for(lambda: bool(run("ss", "-Htln", f"( src {listen} )").stdout.strip()),
                      30.0, f"the API endpoint forwarder listening on {listen}")

    def _start_control_plane(self) -> None:
        bin_dir = default_cache() / "bin"
        for name in ("kube-controller-manager", "kube-scheduler", "kubelet"):
            if not os.access(bin_dir / name, os.X_OK):
                raise ClusterError(f"{bin_dir / name} is missing: run `bash scripts/build-kube.sh`")
        d, kubeconfig = self.env.dir, str(self.env.kubeconfig_path)
        self.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "vpblu-lab-nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": NODE_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                          "name": NODE_USER_GROUP}],
        })
        self._aux.append(self._spawn("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
            f"--root-ca-file={d / 'serving-ca.crt'}",
            f"--service-account-private-key-file={d / 'sa.key'}",
            "--use-service-account-credentials=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,"
            "-node-route-controller,-persistentvolume-binder,-attachdetach",
            # Quick to notice a node's kubelet is gone (a test stops one).
            "--node-monitor-grace-period=20s",
            "--concurrent-gc-syncs=5", "--v=1",
        ], self.dir / "kube-controller-manager.log"))
        self._aux.append(self._spawn("kube-scheduler", [
            str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--v=1",
        ], self.dir / "kube-scheduler.log"))

    def _make_node(self, i: int) -> Node:
        node = super()._make_node(i)
        # The daemon's own default, as on a user's node (its mount namespace
        # keeps wireguard-go's UAPI socket apart from the other nodes').
        node.interface = "wg-mesh"
        ns = node.netns
        # A host-gw CNI's routes to the other nodes' pods; the root namespace
        # has no route back to pods, so what they send to the API forwarder is
        # masqueraded to the node's address.
        for j in range(1, self.settings.nodes + 1):
            if j != i:
                run("ip", "-n", ns, "route", "add", f"{POD_SUPERNET}.{j}.0/24", "via",
                    str(self.underlay[j]))
        run(*nsenter(ns), "iptables", "-t", "nat", "-A", "POSTROUTING", "-s",
            str(node.pod_cidr), "-d", f"{self.controller_ip}/32", "-j", "MASQUERADE")
        run(*nsenter(ns), "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=False)
        return node

    def _make_runtime(self, node: Node) -> NodeRuntime:
        rt = NodeRuntime(node, self.dir / node.name, f"/{PREFIX}{self.tag}{node.name}")
        self.runtimes.append(rt)
        d = rt.dir
        d.mkdir(parents=True, exist_ok=True)
        for sub in ("containerd/root", "containerd/state", "containerd/opt", "runc", "cni/net.d",
                    "cni/ipam", "kubelet", "pod-logs", "vpblu", "wireguard", "etc-cni"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # The nsfs file that keeps the mount namespace must sit on a private mount.
        run("mount", "--bind", str(d), str(d))
        run("mount", "--make-private", str(d))
        rt.mntns.touch()
        run("unshare", f"--mount={rt.mntns}", "--propagation", "private", "true")
        for path in NODE_PATHS:
            Path(path).mkdir(parents=True, exist_ok=True)
        # The namespace starts as a copy of the host's mounts: the other
        # clusters' /run/netns entries are dropped from it (a copy would keep
        # their network namespaces alive after they delete them), and the
        # node gets a /run/netns of its own (containerd's cni-* files go with it).
        mounts = ("for m in $(awk '$5 ~ \"^/run/netns/\" {print $5}' /proc/self/mountinfo); "
                  "do umount -l \"$m\"; done; "
                  "mount -t tmpfs -o mode=0755 tmpfs /run/netns && "
                  f"mount --bind {d / 'vpblu'} /var/lib/vpblu && "
                  f"mount --bind {d / 'wireguard'} /var/run/wireguard && "
                  f"mount --bind {d / 'etc-cni'} /etc/cni && "
                  "mount -t bpf bpf /sys/fs/bpf")
        run("nsenter", f"--mount={rt.mntns}", "--", "sh", "-c", mounts)
        cni = {
            "cniVersion": "0.4.0", "name": "vpblu-lab",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(d / "cni" / "ipam"),
                          "ranges": [[{"subnet": str(node.pod_cidr)}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (d / "cni" / "net.d" / "10-vpblu-lab.conflist").write_text(json.dumps(cni))
        (d / "containerd.toml").write_text(self._containerd_config(rt))
        rt.containerd = self._spawn(f"containerd-{node.name}", [
            *rt.enter(), "containerd", f"--config={d / 'containerd.toml'}"],
            self.dir / f"containerd-{node.name}.log")
        self.wait_for(lambda: rt.socket.exists() and run(
            *rt.enter(), "ctr", f"--address={rt.socket}", "version", check=False,
        ).returncode == 0, CONTAINERD_START_TIMEOUT, f"containerd on {node.name} answering")
        return rt

    def _containerd_config(self, rt: NodeRuntime) -> str:
        d = rt.dir
        return f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{rt.socket}"
[ttrpc]
  address = "{rt.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.pause_image}"
  disable_apparmor = true
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which this
  # machine's root lacks (runc: "failed to update /proc/self/oom_score_adj:
  # Permission denied" for kubelet's -998 sandboxes): no lower than containerd's.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        BinaryName = "{os.environ.get('VPBLU_LAB_RUNC', 'runc')}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni/net.d"
"""

    def _start_kubelet(self, rt: NodeRuntime) -> None:
        node, d = rt.node, rt.dir
        cert = self.env.issue_client_cert(f"system:node:{node.name}", (NODE_USER_GROUP,))
        listen = f"{self.controller_ip}:6443"
        config = self.env.client_kubeconfig(f"system:node:{node.name}", cert.cert_pem,
                                            cert.key_pem, server=f"https://{listen}",
                                            tls_server_name="localhost")
        write_private(d / "kubelet.kubeconfig", yaml.safe_dump(config).encode())
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        for top in CGROUP_V1.iterdir():
            if top.is_dir() and not top.is_symlink() and (top / "cgroup.procs").exists():
                (top / rt.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False},
                               "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.env.dir / "client-ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": rt.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{rt.socket}",
            "address": str(node.underlay_ip),
            "healthzBindAddress": "127.0.0.1",
            "readOnlyPort": 0,
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            "resolvConf": str(d / "resolv.conf"),
            "podLogsDir": str(d / "pod-logs"),
            # A shared disk and a busy machine: never evict or collect images.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
            "maxPods": 30,
            "serializeImagePulls": False,
            "protectKernelDefaults": False,
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        rt.kubelet = self._spawn(f"kubelet-{node.name}", [
            *rt.enter(), str(default_cache() / "bin" / "kubelet"),
            f"--config={d / 'kubelet.yaml'}", f"--kubeconfig={d / 'kubelet.kubeconfig'}",
            f"--root-dir={d / 'kubelet'}", f"--cert-dir={d / 'kubelet-pki'}",
            f"--hostname-override={node.name}", f"--node-ip={node.underlay_ip}",
            "--v=1",
        ], self.dir / f"kubelet-{node.name}.log")

    def _wait_nodes_registered(self) -> None:
        def registered() -> bool:
            for rt in self.runtimes:
                if rt.kubelet is not None and rt.kubelet.exited():
                    raise ClusterError(f"kubelet on {rt.node.name} exited:\n"
                                       f"{rt.kubelet.log_tail()}")
            return all(self.get("node", n.name) is not None for n in self.nodes)

        self.wait_for(registered, NODE_READY_TIMEOUT, "every kubelet's Node registered")
        for node in self.nodes:
            self.kubectl("patch", "node", node.name, "--type=merge", "-p", json.dumps(
                {"spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]}}))

    def _nodes_ready(self) -> bool:
        out = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        ready = {
            item["metadata"]["name"]
            for item in out["items"]
            for c in item.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        }
        return ready >= {n.name for n in self.nodes}

    def pod_ip_netns(self, pod: str, namespace: str) -> str:
        """/proc/<pid>/ns/net of a running pod's container (to run a probe inside it)."""
        obj = self.get("pod", pod, namespace=namespace)
        if obj is None:
            raise ClusterError(f"no pod {namespace}/{pod}")
        ip = obj["status"].get("podIP")
        for rt in self.runtimes:
            for procs in (CGROUP_V1 / "pids" / rt.cgroup_root.lstrip("/")).rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    out = run("nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-4", "-o",
                              "addr", "show", check=False).stdout
                    if ip and f" {ip}/" in out:
                        return f"/proc/{pid}/ns/net"
        raise ClusterError(f"no process of pod {namespace}/{pod} ({ip}) found")

    def close(self) -> None:
        with _signals_deferred():
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self.stop_kube_proxy(node)
            for rt in getattr(self, "runtimes", []):
                proc, rt.kubelet = rt.kubelet, None
                if proc is not None:
                    with contextlib.suppress(Exception):
                        proc.stop()
            for rt in getattr(self, "runtimes", []):
                _kill_cgroup_tree(rt.cgroup_root)
            for pid in _shim_pids(str(self.dir)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for rt in getattr(self, "runtimes", []):
                proc, rt.containerd = rt.containerd, None
                if proc is not None:
                    with contextlib.suppress(Exception):
                        proc.stop()
            for proc in getattr(self, "_aux", []):
                with contextlib.suppress(Exception):
                    proc.stop()
            _remove_node_runtime(self.dir, f"{PREFIX}{self.tag}")
        super().close()
