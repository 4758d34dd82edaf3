"""The control channel against a hostile or broken peer (issue 19), on the real
API server with simulated daemons (vpblu.lab.sim): an oversized message, a
flood of junk tokens, a leader that goes silent without FIN or RST, and a
controller that redirects to itself. Real sockets, no autojump clock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    FAST_LEASE,
    GROUP_PATH,
    aapi,
    controller_settings,
    mesh_pki,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.core import wire
from vpblu.lab.sim import MeshPki, RecordingApplier, SimCluster, is_full_mesh
from vpblu.lab.testenv import REPO, TestEnv, free_port
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.stream import codec
from vpblu.stream.identity import Identity
from vpblu.stream.proto import mesh_grpc
from vpblu.stream.transport import (
    DAEMON_MESSAGE_LIMIT,
    ClientTLS,
    MeshServer,
    NodeStream,
    StreamClosed,
    client_ssl_context,
)

NODES = 10
MiB = 1 << 20


class RawCodec(ProtoCodec):
    """Sends bytes as they are and hands received messages back as bytes: the
    attacker's client, which need not speak protobuf."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def _open_raw(address: str, tls: ClientTLS, token: str) -> tuple[Channel, Any]:
    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), ssl=client_ssl_context(tls), codec=RawCodec())
    stream = mesh_grpc.MeshStub(channel).Connect.open(
        metadata={"authorization": f"Bearer {token}"})
    await stream.__aenter__()
    await stream.send_request()
    return channel, stream


async def _send_oversized(address: str, tls: ClientTLS, token: str, hello: bytes,
                          size: int) -> str:
    """Hello, then one message of `size` bytes; how the stream ended."""
    channel, stream = await _open_raw(address, tls, token)
    try:
        async with asyncio.timeout(60):
            await stream.send_message(hello)
            try:
                await stream.send_message(b"\0" * size)
                await stream.recv_message()
                await stream.recv_trailing_metadata()
            except GRPCError as exc:
                return exc.status.name
            except Exception as exc:
                return f"connection ended: {type(exc).__name__}"
            return "not refused"
    finally:
        channel.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()  # type: ignore[no-any-return]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@asynccontextmanager
async def full_mesh(env: TestEnv) -> AsyncIterator[None]:
    """A FullMesh TunnelPolicy of its own for the block's duration."""
    tunnel = unique("mesh")
    await aapi(env, "POST", f"{GROUP_PATH}/tunnelpolicies",
               policy("TunnelPolicy", tunnel, {"mode": "FullMesh"}))
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await aapi(env, "DELETE", f"{GROUP_PATH}/tunnelpolicies/{tunnel}", ok=(200, 404))


@asynccontextmanager
async def controller_process(env: TestEnv, pki: MeshPki, tmp_path: Path, *, address: str,
                             metrics_port: int, fast_lease: bool = True
                             ) -> AsyncIterator[trio.Process]:
    """`python -m vpblu controller` leading a lease of its own (its RSS is its own);
    `fast_lease` False: the production lease timing (a 2 s renew deadline
    on two busy shared cores is the test's risk, not the flood's)."""
    lease = unique("lease")
    identity = unique("ctrl")
    command = [
        sys.executable, "-m", "vpblu", "controller", f"--kubeconfig={env.kubeconfig_path}",
        f"--listen={address}", f"--advertise={address}", f"--tls-cert={pki.server.cert}",
        f"--tls-key={pki.server.key}", f"--identity={identity}",
        "--lease-namespace=vpblu-system", f"--lease-name={lease}",
        *([f"--lease-duration={FAST_LEASE['lease_duration']}",
           f"--renew-deadline={FAST_LEASE['renew_deadline']}",
           f"--retry-period={FAST_LEASE['retry_period']}"] if fast_lease else []),
        f"--metrics-listen=127.0.0.1:{metrics_port}",
    ]
    with (tmp_path / "controller.log").open("wb") as log:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(partial(
                trio.run_process, command, check=False, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO))
            try:
                await wait_api(env, f"/apis/coordination.k8s.io/v1/namespaces/vpblu-system/"
                                    f"leases/{lease}",
                               lambda b: b["spec"].get("holderIdentity") == identity)
                yield proc
            finally:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
                    await trio.to_thread.run_sync(
                        env.request, "DELETE",
                        f"/apis/coordination.k8s.io/v1/namespaces/vpblu-system/leases/{lease}")


# --- a 64 MiB message -------------------------------------------------------------------


async def test_a_64_mib_message_is_refused_counted_and_the_controller_stays_small(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = vpblu_installed
    pki = mesh_pki(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    async with full_mesh(env), \
            controller_process(env, pki, tmp_path, address=address,
                               metrics_port=metrics_port) as proc, \
            SimCluster.open(env, tmp_path / "sim", pki.client, (address,), NODES + 1,
                            prefix=unique("big"), start=False) as cluster:
        names = sorted(cluster.daemons)
        honest, attacker = names[:NODES], names[NODES]
        for name in honest:
            await cluster.start_daemon(name)
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster, honest), honest)
        connects = {n: cluster.daemons[n].stream.statistics().connects for n in honest}

        # An authenticated stream (a real token of a real daemon Pod), a good
        # Hello, then one message announcing 64 MiB.
        token = (tmp_path / "sim" / f"{attacker}.token").read_text().strip()
        hello = codec.encode_node_message(wire.Hello(
            attacker, cluster.daemons[attacker].public_key, 0, "attacker")).SerializeToString()
        baseline = rss_bytes(proc.pid)
        peak = baseline
        async with trio.open_nursery() as nursery:
            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes(proc.pid))
                    await trio.sleep(0.01)

            nursery.start_soon(sample)
            with trio.fail_after(60):
                ended = await trio_asyncio.aio_as_trio(_send_oversized)(
                    address, pki.client, token, hello, 64 * MiB)
            await trio.sleep(0.5)  # a few more samples after the refusal
            nursery.cancel_scope.cancel()
        assert ended != "not refused"
        text = await trio.to_thread.run_sync(scrape, metrics_port)
        assert metric(text, 'vpblu_stream_refusals_total{reason="message_too_large"}') == 1.0
        growth = peak - baseline
        print(f"controller RSS {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB during the "
              f"64 MiB message (growth {growth / MiB:.1f} MiB); the attacker saw: {ended}")
        assert growth < 20 * MiB, f"the controller's RSS grew by {growth / MiB:.1f} MiB"
        # Nobody else was touched, and the controller still serves: the node
        # whose token was abused joins for real and everyone converges.
        assert {n: cluster.daemons[n].stream.statistics().connects for n in honest} == connects
        await cluster.start_daemon(attacker)
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))


# --- junk tokens ------------------------------------------------------------------------

JUNK_STREAMS = 1000
JUNK_PER_CONNECTION = 4
CONNECTED_WITHIN = 5.0


JUNK_FLOOD = """
import asyncio, json, secrets, sys
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from vpblu.stream.proto import mesh_grpc
from vpblu.stream.transport import ClientTLS, client_ssl_context
from tests.integration.test_stream_hardening import RawCodec

async def connection(host, port, tls, streams, outcomes):
    channel = Channel(host, port, ssl=client_ssl_context(tls), codec=RawCodec())

    async def one():
        stream = mesh_grpc.MeshStub(channel).Connect.open(
            metadata={"authorization": f"Bearer junk-{secrets.token_hex(16)}"})
        try:
            async with asyncio.timeout(30):
                await stream.__aenter__()
                await stream.send_request()
                await stream.recv_message()
                await stream.recv_trailing_metadata()
            outcomes.append("accepted")
        except GRPCError as exc:
            outcomes.append(exc.status.name)
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    try:
        await asyncio.gather(*(one() for _ in range(streams)))
    finally:
        channel.close()

async def main(address, ca, total, per_connection):
    host, port = address.rsplit(":", 1)
    tls = ClientTLS(ca)
    outcomes = []
    print("flooding", flush=True)
    await asyncio.gather(*(connection(host, int(port), tls, per_connection, outcomes)
                           for _ in range(total // per_connection)))
    print(json.dumps({o: outcomes.count(o) for o in set(outcomes)}), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_a_thousand_junk_token_streams_do_not_keep_daemons_out(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = vpblu_installed
    pki = mesh_pki(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    async with full_mesh(env), \
            controller_process(env, pki, tmp_path, address=address,
                               metrics_port=free_port(), fast_lease=False), \
            SimCluster.open(env, tmp_path / "sim", pki.client, (address,), NODES,
                            prefix=unique("junk")) as cluster:
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))
        for name in cluster.daemons:
            cluster.stop_daemon(name)
        with trio.fail_after(CONVERGE_TIMEOUT):
            while any(d.running for d in cluster.daemons.values()):  # noqa: ASYNC110
                await trio.sleep(0.01)
        connected_after: dict[str, float] = {}
        command = [sys.executable, "-c", JUNK_FLOOD, address, str(pki.client.ca),
                   str(JUNK_STREAMS), str(JUNK_PER_CONNECTION)]
        async with trio.open_nursery() as nursery:
            flood: trio.Process = await nursery.start(partial(
                trio.run_process, command, check=False, stdout=subprocess.PIPE, cwd=REPO))
            assert flood.stdout is not None
            first = await flood.stdout.receive_some()
            assert b"flooding" in first
            await trio.sleep(0.3)  # the flood is under way
            started = trio.current_time()
            before = {n: d.stream.statistics().messages_received
                      for n, d in cluster.daemons.items()}
            for name, daemon in cluster.daemons.items():
                # Reinstalled (a new key): the controller must take its Hello
                # and push to everyone, so a message received proves a stream
                # the controller accepted and serves.
                daemon.new_key()
                await cluster.start_daemon(name)
            with trio.move_on_after(CONVERGE_TIMEOUT):
                while len(connected_after) < NODES:
                    for name, daemon in cluster.daemons.items():
                        if name not in connected_after and \
                                daemon.stream.statistics().messages_received > before[name]:
                            connected_after[name] = trio.current_time() - started
                    await trio.sleep(0.02)
            report = b""
            with trio.fail_after(60):
                async for chunk in flood.stdout:
                    report += chunk
            flood_lasted = trio.current_time() - started
        refused = json.loads(report.decode().strip().splitlines()[-1])
        slowest = max(connected_after.values(), default=float("inf"))
        print(f"{sum(refused.values())} junk streams ended: {refused}, the last "
              f"{flood_lasted:.1f} s after the daemons started; the daemons were served after "
              f"{sorted(round(t, 2) for t in connected_after.values())} s")
        assert len(connected_after) == NODES, f"connected: {sorted(connected_after)}"
        assert slowest < CONNECTED_WITHIN, f"the slowest daemon took {slowest:.1f} s"
        assert "accepted" not in refused
        with trio.fail_after(CONVERGE_TIMEOUT):
            await cluster.wait_all(is_full_mesh(cluster))


# --- a leader gone silent ---------------------------------------------------------------

ON_NEW_LEADER_WITHIN = 30.0


class BlackholeForwarder:
    """TCP forwarding to `target` that, once `blackhole()` is called, keeps
    every socket open and passes nothing either way: the peer's packets
    vanish, with no FIN and no RST."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.dark = False
        self.port = 0

    def blackhole(self) -> None:
        self.dark = True

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                if not self.dark:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self.dark:
            await trio.sleep_forever()  # say nothing, close nothing

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream)
            nursery.start_soon(self._pump, upstream, client)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def test_a_leader_whose_packets_vanish_loses_every_daemon_to_the_new_leader(
        vpblu_installed: TestEnv, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    env = vpblu_installed
    pki = mesh_pki(tmp_path)
    lease = unique("lease")
    port_a = free_port()
    settings_b = controller_settings(env, pki, lease, identity="ctrl-b")
    async with full_mesh(env), trio.open_nursery() as nursery:
        forwarder = BlackholeForwarder(("127.0.0.1", port_a))
        await nursery.start(forwarder.run)
        via_forwarder = f"127.0.0.1:{forwarder.port}"
        # A listens on port_a and is reached (and advertised) through the forwarder.
        settings_a = attrs.evolve(
            controller_settings(env, pki, lease, port=port_a, identity="ctrl-a"),
            advertise=via_forwarder)
        scope_a = trio.CancelScope()
        nursery.start_soon(_run_until_cancelled, settings_a, scope_a)
        await wait_api(env, f"/apis/coordination.k8s.io/v1/namespaces/vpblu-system/"
                            f"leases/{lease}",
                       lambda b: b["spec"].get("holderIdentity") == "ctrl-a")
        async with running_controller(settings_b) as view_b, \
                SimCluster.open(env, tmp_path / "sim", pki.client,
                                (via_forwarder, settings_b.advertise), NODES,
                                prefix=unique("bh")) as cluster:
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))
                assert all(d.stream.statistics().connected_to == via_forwarder
                           for d in cluster.daemons.values())
                # A's packets vanish, and A is gone (its lease goes to B); no
                # daemon hears a thing.
                forwarder.blackhole()
                gone_at = trio.current_time()
                scope_a.cancel()
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await wait_leading(view_b)
                with trio.move_on_after(ON_NEW_LEADER_WITHIN * 2):
                    while not all(  # noqa: ASYNC110 (polling the daemons' statistics)
                            d.stream.statistics().connected_to == settings_b.advertise
                            for d in cluster.daemons.values()):
                        await trio.sleep(0.1)
                took = trio.current_time() - gone_at
                where = {n: d.stream.statistics().connected_to
                         for n, d in cluster.daemons.items()}
                print(f"every daemon on the new leader {took:.1f} s after the old one went dark")
                assert took < ON_NEW_LEADER_WITHIN, f"after {took:.1f} s: {where}"
                with trio.fail_after(CONVERGE_TIMEOUT):
                    await cluster.wait_all(is_full_mesh(cluster))
        nursery.cancel_scope.cancel()


async def _run_until_cancelled(settings: Any, scope: trio.CancelScope) -> None:
    with scope:
        async with running_controller(settings):
            await trio.sleep_forever()


# --- a controller redirecting to itself -------------------------------------------------

REDIRECT_WINDOW = 15.0
# Without backoff a daemon follows a self-redirect hundreds of times a second;
# with it (0.2 s doubling, jitter up to 1 s) about 7 times in 15 s.
MOST_ATTEMPTS = 12


class _Unused:
    async def authenticate(self, token: str) -> Identity:
        raise AssertionError("a redirecting server never authenticates")


async def test_a_controller_redirecting_to_itself_makes_daemons_back_off(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    send, _receive = trio.open_memory_channel[NodeStream](1)
    port = free_port()
    own = f"127.0.0.1:{port}"
    server = MeshServer(host="127.0.0.1", port=port, tls=pki.server, authenticator=_Unused(),
                        new_streams=send, redirect_to=own)
    token = tmp_path / "token"
    token.write_text("token")
    actors = [StreamActor(f"n{i}", lambda: "k" * 43 + "=", RecordingApplier(f"n{i}"),
                          StreamSettings(addresses=(own,), tls=pki.client, token_file=token))
              for i in range(NODES)]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        for actor in actors:
            nursery.start_soon(actor.run)
        await trio.sleep(REDIRECT_WINDOW)  # the window over which attempts are counted
        nursery.cancel_scope.cancel()
    attempts = _attempts(actors)
    print(f"redirects followed in {REDIRECT_WINDOW:.0f} s, per daemon: {attempts}")
    assert all(2 <= a <= MOST_ATTEMPTS for a in attempts), attempts


def _attempts(actors: Sequence[StreamActor]) -> list[int]:
    return [a.statistics().redirects for a in actors]



# --- a daemon gone silent, and the daemon's own limit ----------------------------------

SESSION_GONE_WITHIN = 30.0


class _NodeTokens:
    """Tokens 'token-NODE' speak for NODE (this test is about the transport)."""

    async def authenticate(self, token: str) -> Identity:
        return Identity(node_name=token.removeprefix("token-"))


@asynccontextmanager
async def plain_server(pki: MeshPki) -> AsyncIterator[tuple[MeshServer, int,
                                                              trio.MemoryReceiveChannel[NodeStream]]]:
    send, receive = trio.open_memory_channel[NodeStream](4)
    port = free_port()
    server = MeshServer(host="127.0.0.1", port=port, tls=pki.server,
                        authenticator=_NodeTokens(), new_streams=send)
    async with trio.open_nursery() as nursery, send, receive:
        await nursery.start(server.run)
        yield server, port, receive
        nursery.cancel_scope.cancel()


def one_daemon(tmp_path: Path, pki: MeshPki, address: str) -> StreamActor:
    token = tmp_path / "token"
    token.write_text("token-a")
    return StreamActor("a", lambda: "k" * 43 + "=", RecordingApplier("a"),
                       StreamSettings(addresses=(address,), tls=pki.client, token_file=token))


async def test_a_daemon_whose_packets_vanish_loses_its_session_on_the_controller(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    async with plain_server(pki) as (server, port, streams), \
            trio.open_nursery() as nursery:
        forwarder = BlackholeForwarder(("127.0.0.1", port))
        await nursery.start(forwarder.run)
        nursery.start_soon(one_daemon(tmp_path, pki, f"127.0.0.1:{forwarder.port}").run)
        with trio.fail_after(CONVERGE_TIMEOUT):
            stream = await streams.receive()
        with trio.fail_after(CLOSE_WAIT):
            while server.statistics().live != 1:  # noqa: ASYNC110 (the server's own count)
                await trio.sleep(0.01)
        forwarder.blackhole()
        gone_at = trio.current_time()
        with trio.fail_after(SESSION_GONE_WITHIN):
            while True:
                try:
                    await stream.receive_batch()  # heartbeats until the end
                except StreamClosed as closed:
                    reason = closed.reason
                    break
        took = trio.current_time() - gone_at
        print(f"the controller ended the silent daemon's stream after {took:.1f} s: {reason}")
        with trio.fail_after(CLOSE_WAIT):
            while server.statistics().live:  # noqa: ASYNC110 (the server's own count)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


CLOSE_WAIT = 10.0


async def test_a_message_above_the_daemons_limit_is_refused_and_the_daemon_reconnects(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    async with plain_server(pki) as (_server, port, streams), trio.open_nursery() as nursery:
        actor = one_daemon(tmp_path, pki, f"127.0.0.1:{port}")
        nursery.start_soon(actor.run)
        with trio.fail_after(CONVERGE_TIMEOUT):
            first = await streams.receive()
        # Bytes the daemon cannot decode, announced above its limit: it must
        # refuse them by the length prefix, not buffer 33 MiB and fail then.
        first._call.enqueue([b"\0" * (DAEMON_MESSAGE_LIMIT + MiB)])
        with trio.fail_after(CONVERGE_TIMEOUT):
            second = await streams.receive()
        assert second.hello.node_name == "a"
        assert actor.statistics().connects == 2
        assert actor.statistics().messages_received == 0
        size = DAEMON_MESSAGE_LIMIT + MiB
        assert f"a message of {size} bytes is above the limit of {DAEMON_MESSAGE_LIMIT} bytes" \
            in caplog.text
        nursery.cancel_scope.cancel()
