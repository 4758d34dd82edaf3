"""The warm stream over real loopback gRPC with real TLS (no autojump clock:
grpclib's timers would fast-forward with it)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio_asyncio
from google.protobuf.message import Message as ProtobufMessage

from vpblu.core import wire
from vpblu.core.model import NodeDesiredState, Peer, PeerRemoved
from vpblu.lab.pki import CertAuthority
from vpblu.node.stream import StreamActor, StreamSettings
from vpblu.stream.identity import AuthenticationFailed, Identity
from vpblu.stream.transport import (
    ClientTLS,
    ConnectFailed,
    ControllerStream,
    MeshServer,
    NodeStream,
    ServerTLS,
    StreamClosed,
    open_mesh_stream,
)

KEY = base64.b64encode(bytes(range(32))).decode()
PROMPTLY = 3.0  # seconds; a real socket on a loaded 2-core machine


class FakeAuthenticator:
    """Tokens are "token-<node>"; anything else is refused."""

    def __init__(self) -> None:
        self.seen = 0

    async def authenticate(self, token: str) -> Identity:
        self.seen += 1
        if not token.startswith("token-"):
            raise AuthenticationFailed("unknown token")
        return Identity(node_name=token.removeprefix("token-"))


@attrs.frozen
class Pki:
    server: ServerTLS
    client: ClientTLS
    other_ca_client: ClientTLS
    mtls_server: ServerTLS
    mtls_client: ClientTLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("vpblu-grpc-pki")
    ca = CertAuthority.create("mesh-ca")
    ca.write(d / "ca.pem")
    ca.issue("controller", ip_addresses=("127.0.0.1",), server=True).write(
        d / "server.pem", d / "server.key")
    ca.issue("node-a", client=True).write(d / "client.pem", d / "client.key")
    other = CertAuthority.create("someone-else")
    other.write(d / "other-ca.pem")
    server = ServerTLS(d / "server.pem", d / "server.key")
    return Pki(
        server=server,
        client=ClientTLS(d / "ca.pem"),
        other_ca_client=ClientTLS(d / "other-ca.pem"),
        mtls_server=attrs.evolve(server, client_ca=d / "ca.pem"),
        mtls_client=ClientTLS(d / "ca.pem", d / "client.pem", d / "client.key"),
    )


@attrs.define
class Mesh:
    address: str
    streams: trio.MemoryReceiveChannel[NodeStream]
    authenticator: FakeAuthenticator

    async def accept(self) -> NodeStream:
        with trio.fail_after(PROMPTLY):
            return await self.streams.receive()


@asynccontextmanager
async def running_mesh(tls: ServerTLS, *, redirect_to: str | None = None) -> AsyncIterator[Mesh]:
    async with trio_asyncio.open_loop():
        send, receive = trio.open_memory_channel[NodeStream](0)
        authenticator = FakeAuthenticator()
        server = MeshServer(host="127.0.0.1", port=0, tls=tls, authenticator=authenticator,
                            new_streams=send, redirect_to=redirect_to)
        async with trio.open_nursery() as nursery, send, receive:
            await nursery.start(server.run)
            yield Mesh(f"127.0.0.1:{server.port}", receive, authenticator)
            nursery.cancel_scope.cancel()


def hello(node: str = "a", generation: int = 0) -> wire.Hello:
    return wire.Hello(node, KEY, generation, "test")


async def receive_n(stream: ControllerStream | NodeStream, n: int) -> list[object]:
    got: list[object] = []
    with trio.fail_after(PROMPTLY * 3):
        while len(got) < n:
            got.extend(await stream.receive_batch())
    return got


async def closed_with(stream: ControllerStream | NodeStream,
                      drained: list[object] | None = None) -> StreamClosed:
    """Drain whatever arrived (into `drained`); the StreamClosed that follows, promptly."""
    with trio.fail_after(PROMPTLY):
        while True:
            try:
                batch = await stream.receive_batch()
            except StreamClosed as exc:
                return exc
            if drained is not None:
                drained.extend(batch)


async def test_hello_gives_the_controller_a_stream_for_that_node(pki: Pki) -> None:
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello("a", 41)):
        node_stream = await mesh.accept()
        assert node_stream.node_name == "a"
        assert node_stream.identity == Identity("a")
        assert node_stream.hello == hello("a", 41)
        assert node_stream.peer.address.startswith("127.0.0.1:")


async def test_batches_flow_both_ways_in_order(pki: Pki) -> None:
    state = NodeDesiredState("a")
    to_node = [wire.SyncState(5, state), wire.Delta(6, 5, [PeerRemoved("b")])]
    to_controller: list[wire.NodeMessage] = [wire.Ack(5), wire.Ack(6, "boom"), wire.Heartbeat()]
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        await node_stream.send_batch(to_node)
        await daemon.send_batch(to_controller)
        assert await receive_n(daemon, 2) == to_node
        assert await receive_n(node_stream, 3) == to_controller


async def test_a_thousand_messages_pipelined_each_way(pki: Pki) -> None:
    deltas = [wire.Delta(g + 1, g, [PeerRemoved(f"n{g}")]) for g in range(1000)]
    acks = [wire.Ack(g) for g in range(1000)]
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node_stream.send_batch, deltas)
            nursery.start_soon(daemon.send_batch, acks)
            assert await receive_n(daemon, 1000) == deltas
            assert await receive_n(node_stream, 1000) == acks


def _protobuf_locals(coro: object) -> list[str]:
    """Locals holding a protobuf message anywhere in a waiting coroutine's chain."""
    found = []
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frame = coro.cr_frame  # type: ignore[attr-defined]
        found.extend(f"{frame.f_code.co_qualname}: {name}" for name, value
                     in frame.f_locals.items() if isinstance(value, ProtobufMessage))
        coro = coro.cr_await  # type: ignore[attr-defined]
    return found


async def test_a_waiting_reader_holds_no_protobuf_message(pki: Pki) -> None:
    """Each end's reader, waiting for the next message, keeps nothing of the
    last one's protobuf form: that pinned the message's upb arena per stream
    (at N=1000, 140 MB at the leader's peak while whole telemetry samples
    came in; a SyncState of 1000 peers on every daemon)."""
    state = NodeDesiredState("a", peers=tuple(
        Peer(f"p{i:03d}", base64.b64encode(i.to_bytes(32, "big")).decode(), None,
             (f"10.{i // 250}.{i % 250}.0/24",)) for i in range(1, 200)))
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        await node_stream.send_batch([wire.SyncState(5, state)])
        assert await receive_n(daemon, 1) == [wire.SyncState(5, state)]
        await daemon.send_batch([wire.Ack(5)])
        assert await receive_n(node_stream, 1) == [wire.Ack(5)]
        loop = asyncio.get_event_loop()
        readers = [t for t in asyncio.all_tasks(loop)
                   if getattr(t.get_coro(), "__qualname__", "") == "_Call.read_loop"]
        assert len(readers) == 2  # the daemon's and the controller's
        for reader in readers:
            assert _protobuf_locals(reader.get_coro()) == []


async def test_single_message_batches_are_queued_and_arrive_in_order(pki: Pki) -> None:
    deltas = [wire.Delta(g + 1, g, [PeerRemoved(f"n{g}")]) for g in range(300)]
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        for delta in deltas:
            await node_stream.send_batch([delta])
        assert await receive_n(daemon, 300) == deltas


async def test_a_timed_batch_says_when_it_was_written_out(pki: Pki) -> None:
    """What a NodeSessionActor's ack clock counts from (vpblu/actors/session.py):
    a batch sent `timed` is queued, not written, when send_batch returns; once the
    daemon has it, `written_at` says when it left. And `unread` counts what the
    daemon said that waits for receive_batch."""
    push = wire.SyncState(5, NodeDesiredState("a"))
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        assert node_stream.written_at() is None
        queued = trio.current_time()
        await node_stream.send_batch([push], timed=True)
        assert node_stream.written_at() is None  # the writer has not run since
        assert await receive_n(daemon, 1) == [push]
        written = node_stream.written_at()
        assert written is not None
        assert queued <= written <= trio.current_time()
        await node_stream.send_batch([wire.Delta(6, 5, [PeerRemoved("b")])])
        assert node_stream.written_at() == written  # an untimed batch leaves it
        answers: list[wire.NodeMessage] = [wire.Ack(5), wire.Heartbeat()]
        await daemon.send_batch(answers)
        with trio.fail_after(PROMPTLY):
            while node_stream.unread < len(answers):  # noqa: ASYNC110 (the asyncio reader sets no trio event per message)
                await trio.sleep(0.01)
        assert await receive_n(node_stream, 2) == answers
        assert node_stream.unread == 0


def big_state(node: str, peers: int) -> NodeDesiredState:
    return NodeDesiredState(node, peers=[
        Peer(f"p{i:05d}", base64.b64encode(i.to_bytes(32, "big")).decode(), None,
             (f"10.{i >> 8}.{i & 255}.0/24",)) for i in range(peers)])


async def test_queued_messages_of_every_size_share_writes_and_arrive_whole_in_order(
        pki: Pki) -> None:
    """What is queued goes out in as few HTTP/2 writes as fit (transport
    COALESCE_BYTES): small messages around one larger than a whole write,
    from both ends, each arriving whole, in order, and counted once."""
    big = wire.SyncState(7, big_state("a", 700))  # more than COALESCE_BYTES
    to_node = [*(wire.Delta(g + 1, g, [PeerRemoved(f"n{g}")]) for g in range(1, 6)), big,
               *(wire.Delta(g + 1, g, [PeerRemoved(f"n{g}")]) for g in range(8, 13))]
    to_controller: list[wire.NodeMessage] = [
        *(wire.RotationResult(f"r{i}", wire.RotationStepKind.SWITCH_PEER, "b", i + 1)
          for i in range(40)), wire.Ack(12)]
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        await node_stream.send_batch([wire.Delta(1, 0, [PeerRemoved("first")])])
        await daemon.send_batch([wire.Heartbeat()])
        assert len(await receive_n(daemon, 1)) == 1
        assert len(await receive_n(node_stream, 1)) == 1
        for _ in range(3):
            await node_stream.send_batch(to_node)
            await daemon.send_batch(to_controller)
            assert await receive_n(daemon, len(to_node)) == to_node
            assert await receive_n(node_stream, len(to_controller)) == to_controller
        assert node_stream.received[0] == 1 + 3 * len(to_controller)


async def test_a_daemon_that_stops_reading_pushes_back_on_the_sender(pki: Pki) -> None:
    state = big_state("a", 1000)  # ~100 KB a SyncState
    queued = 0
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        with trio.move_on_after(PROMPTLY):
            while queued < 400:  # ~40 MB: far beyond HTTP/2 windows and socket buffers
                queued += 1
                await node_stream.send_batch([wire.SyncState(queued, state)])
        assert queued < 400  # send_batch waited for room, and went on waiting
        assert queued > 2  # writes went on while the daemon did not read
        assert not node_stream.closed
        got = await receive_n(daemon, queued)
        assert [m.generation for m in got] == list(range(1, queued + 1))  # type: ignore[attr-defined]


async def test_a_server_certificate_from_another_ca_fails_to_connect(pki: Pki) -> None:
    async with running_mesh(pki.server) as mesh:
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_mesh_stream(mesh.address, pki.other_ca_client, "token-a", hello()):
                pass


async def test_mtls_takes_a_client_certificate_and_refuses_none(pki: Pki) -> None:
    async with running_mesh(pki.mtls_server) as mesh:
        async with open_mesh_stream(mesh.address, pki.mtls_client, "token-a", hello()):
            node_stream = await mesh.accept()
            assert node_stream.peer.client_cert_subject == "commonName=node-a"
        # TLS 1.3: the client learns of the refusal only after its handshake.
        try:
            async with open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as d:
                closed = await closed_with(d)
        except ConnectFailed as exc:
            closed = exc
        assert "CERTIFICATE_REQUIRED" in closed.reason or "Connection lost" in closed.reason
        with pytest.raises(trio.WouldBlock):
            mesh.streams.receive_nowait()


async def test_a_hello_for_another_node_is_refused(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello("b")) as daemon:
        got: list[object] = []
        closed = await closed_with(daemon, got)
        # The Refused message may be overtaken by the reset that follows
        # non-OK trailers; the status always arrives.
        assert got in ([], [wire.Refused("the token speaks for node 'a', the Hello for 'b'")])
        assert closed.status == "PERMISSION_DENIED"
        assert "speaks for node 'a'" in closed.reason
        with pytest.raises(trio.WouldBlock):
            mesh.streams.receive_nowait()
    assert "refused a mesh stream" in caplog.text


@pytest.mark.parametrize("token", ["", "forged"])
async def test_a_missing_or_invalid_token_is_unauthenticated(pki: Pki, token: str) -> None:
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, token, hello()) as daemon:
        closed = await closed_with(daemon)
        assert closed.status == "UNAUTHENTICATED"
        assert mesh.authenticator.seen == (1 if token else 0)


async def test_a_follower_redirects_to_the_leader(pki: Pki) -> None:
    async with running_mesh(pki.server, redirect_to="10.0.0.7:7443") as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        assert await daemon.receive_batch() == [wire.Redirect("10.0.0.7:7443")]
        closed = await closed_with(daemon)
        assert closed.status == "OK"
        assert mesh.authenticator.seen == 0


async def test_closing_on_the_controller_ends_the_daemons_stream(pki: Pki) -> None:
    async with running_mesh(pki.server) as mesh, \
            open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
        node_stream = await mesh.accept()
        await node_stream.send_batch([wire.Refused("last words")])
        node_stream.close("leadership lost")
        await node_stream.wait_closed()
        assert node_stream.closed
        with pytest.raises(StreamClosed, match="closed here"):
            await node_stream.send_batch([wire.Refused("too late")])
        assert await daemon.receive_batch() == [wire.Refused("last words")]
        closed = await closed_with(daemon)
        assert closed.status == "OK"
        assert closed.reason == "the controller closed the stream: leadership lost"
        with pytest.raises(StreamClosed):
            await daemon.send_batch([wire.Heartbeat()])


async def test_the_daemon_leaving_ends_the_controllers_stream(pki: Pki) -> None:
    async with running_mesh(pki.server) as mesh:
        async with open_mesh_stream(mesh.address, pki.client, "token-a", hello()) as daemon:
            node_stream = await mesh.accept()
            await daemon.send_batch([wire.Ack(1)])
        assert await node_stream.receive_batch() == [wire.Ack(1)]
        await closed_with(node_stream)
        with pytest.raises(StreamClosed):
            await node_stream.send_batch([wire.Refused("gone")])


async def test_the_server_stopping_ends_every_stream(pki: Pki) -> None:
    async with trio_asyncio.open_loop():
        send, receive = trio.open_memory_channel[NodeStream](0)
        server = MeshServer(host="127.0.0.1", port=0, tls=pki.server,
                            authenticator=FakeAuthenticator(), new_streams=send)
        async with trio.open_nursery() as outer, send, receive:
            async with trio.open_nursery() as serving:
                await serving.start(server.run)
                daemon_cm = open_mesh_stream(
                    f"127.0.0.1:{server.port}", pki.client, "token-a", hello())
                daemon = await daemon_cm.__aenter__()
                node_stream = await receive.receive()
                serving.cancel_scope.cancel()
            await closed_with(node_stream)
            closed = await closed_with(daemon)
            assert closed.reason == (
                "the controller closed the stream: the controller is shutting down")
            await daemon_cm.__aexit__(None, None, None)
            outer.cancel_scope.cancel()


class _NoApplier:
    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> None:
        pass


async def test_a_daemon_redirected_by_a_follower_reaches_the_leader(
        pki: Pki, tmp_path: Path) -> None:
    """The StreamActor's Redirect is raised inside its session's nursery: it must
    still be recognised as a redirect (not escape as an ExceptionGroup and crash
    the daemon), and the daemon must open a stream at the leader."""
    token = tmp_path / "token"
    token.write_text("token-a")
    async with trio_asyncio.open_loop():
        leader_send, leader_streams = trio.open_memory_channel[NodeStream](0)
        follower_send, _follower_streams = trio.open_memory_channel[NodeStream](0)
        leader = MeshServer(host="127.0.0.1", port=0, tls=pki.server,
                            authenticator=FakeAuthenticator(), new_streams=leader_send)
        async with trio.open_nursery() as nursery:
            await nursery.start(leader.run)
            follower = MeshServer(host="127.0.0.1", port=0, tls=pki.server,
                                  authenticator=FakeAuthenticator(), new_streams=follower_send,
                                  redirect_to=f"127.0.0.1:{leader.port}")
            await nursery.start(follower.run)
            actor = StreamActor("a", lambda: KEY, _NoApplier(), StreamSettings(
                addresses=(f"127.0.0.1:{follower.port}",), tls=pki.client, token_file=token))
            nursery.start_soon(actor.run)
            with trio.fail_after(PROMPTLY * 3):
                stream = await leader_streams.receive()
            assert stream.node_name == "a"
            assert actor.statistics().redirects == 1
            nursery.cancel_scope.cancel()
