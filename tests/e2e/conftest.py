"""Fixtures for the mesh tests: a lab of namespaces and daemons running in them."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.e2e.netns import Lab, Node
from tests.e2e.procs import REAP_TIMEOUT, Reaper
from vpblu.core.model import Endpoint, NodeDesiredState, Peer, Route
from vpblu.lab.localcluster import KUSTOMIZE_SAMPLES, ClusterSettings, LocalCluster
from vpblu.messages import Applied, ApplyDesiredState, ApplyOutcome
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iproute import IPRouteKernel
from vpblu.node.kernel.iptables import IptablesMtuKernel
from vpblu.node.kernel.wireguard import UserspaceBackend
from vpblu.node.keys import KeyStore
from vpblu.node.mtu import MtuActor
from vpblu.node.netlink import NetlinkActor

LISTEN_PORT = 51820
APPLY_TIMEOUT = 10.0
CLUSTER_CONVERGE_TIMEOUT = 90.0
# The call phase's report, for fixtures whose teardown says more when the test failed.
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture
def reaper(request: pytest.FixtureRequest) -> Iterator[Reaper]:
    """Starts a test's helper processes and reaps, after the test, every one still
    running, whichever way the test ended. A helper that had to be SIGKILLed fails the
    test; if it failed already, that is added to its report instead."""
    reaper = Reaper()
    yield reaper
    killed = reaper.close()
    if not killed:
        return
    why = f"helpers still running {REAP_TIMEOUT} s after SIGTERM were killed: {killed}"
    call: pytest.TestReport | None = request.node.stash.get(CALL_REPORT, None)
    if call is not None and call.failed:
        call.sections.append(("helper processes", why))
    else:
        pytest.fail(why)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A 3-node LocalCluster with the sample FullMesh, shared by a module's tests."""
    with LocalCluster.start(ClusterSettings(nodes=3)) as c:
        c.apply_kustomize(KUSTOMIZE_SAMPLES)
        c.wait_for(c.mesh_complete, CLUSTER_CONVERGE_TIMEOUT, "a complete FullMesh")
        yield c


def restore_cluster(cluster: LocalCluster) -> None:
    """Make the shared cluster whole again: every controller and daemon running,
    every Node registered, the mesh complete."""
    for controller in cluster.controllers:
        if not controller.running:
            cluster.start_controller(controller.index)
    for node in cluster.nodes:
        if cluster.get("node", node.name) is None:
            cluster.register_node(node)
        if not node.daemon_running:
            cluster.start_daemon(node)
    cluster.wait_for(cluster.mesh_complete, CLUSTER_CONVERGE_TIMEOUT, "a complete FullMesh")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("vw") as lab:
        yield lab


@dataclass
class Daemon:
    """One node's NetlinkActor and MtuActor, running until `crash()` or `stop()`."""

    node: Node
    config: DaemonConfig
    keys: KeyStore
    backend: UserspaceBackend
    kernel: IPRouteKernel
    actor: NetlinkActor
    mtu: MtuActor
    send: trio.MemorySendChannel[ApplyDesiredState]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> ApplyOutcome:
        reply_send, reply_recv = trio.open_memory_channel[ApplyOutcome](1)
        with trio.fail_after(APPLY_TIMEOUT):
            await self.send.send(ApplyDesiredState(state, reply_send, whole=whole))
            return await reply_recv.receive()

    async def apply_ok(self, state: NodeDesiredState, *, whole: bool = True) -> Applied:
        outcome = await self.apply(state, whole=whole)
        assert isinstance(outcome, Applied), outcome
        return outcome

    def crash(self) -> None:
        """Stop the actors the way a killed daemon stops: no cleanup at all."""
        self.scope.cancel()

    async def cleanup(self) -> None:
        self.crash()
        await self.mtu.cleanup()
        await self.actor.cleanup()


def node_config(node: Node, state_dir: Path) -> DaemonConfig:
    return DaemonConfig(node_name=node.name, interface=node.wg_interface, state_dir=state_dir)


async def start_daemon(nursery: trio.Nursery, node: Node, state_root: Path) -> Daemon:
    config = node_config(node, state_root / node.name)
    keys = await trio.to_thread.run_sync(KeyStore.load_or_create, config.state_dir)
    backend = UserspaceBackend(netns=node.netns)
    kernel = IPRouteKernel(netns=node.netns)
    send, recv = trio.open_memory_channel[ApplyDesiredState](0)
    actor = NetlinkActor(config, keys, backend, kernel, recv)
    _mtu_send, mtu_recv = trio.open_memory_channel[object](0)
    mtu = MtuActor(config, IptablesMtuKernel(netns=node.netns), mtu_recv)  # type: ignore[arg-type]
    daemon = Daemon(node, config, keys, backend, kernel, actor, mtu, send)

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with daemon.scope:
            async with trio.open_nursery() as inner:
                await inner.start(actor.run)
                await inner.start(mtu.run)
                task_status.started()

    await nursery.start(run)
    return daemon


def desired_state(node: Node, daemons: list[Daemon]) -> NodeDesiredState:
    """Full mesh: every other daemon's node is a peer owning its pod CIDR."""
    peers = []
    routes = []
    for other in daemons:
        if other.node is node:
            continue
        peers.append(
            Peer(
                other.node.name,
                other.keys.public_key,
                Endpoint(other.node.underlay_ip, LISTEN_PORT),
                (other.node.pod_cidr,),
            )
        )
        routes.append(Route(other.node.pod_cidr, other.node.name))
    return NodeDesiredState(node.name, LISTEN_PORT, peers, routes)


def remote_cidrs(node: Node, lab: Lab) -> list[ipaddress.IPv4Network]:
    return [n.pod_cidr for n in lab.nodes if n is not node]


@pytest.fixture
def state_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vw-state-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def veth_netns() -> Iterator[str]:
    """A network namespace of the test's own holding a veth pair m0 <-> m1 (down)."""
    name = f"vpvn-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "m0", "type", "veth", "peer", "name",
                        "m1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
