"""The daemon's StreamActor over real loopback gRPC and TLS, against a scripted
Mesh server (no autojump clock: grpclib's timers would fast-forward)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio_asyncio

from vpblu.core import wire
from vpblu.core.model import NodeDesiredState, Peer, PeerAdded
from vpblu.lab.sim import MeshPki, RecordingApplier
from vpblu.node.stream import (
    CLOSED_RECONNECT_JITTER,
    RECONNECT_INITIAL,
    RECONNECT_JITTER,
    StreamActor,
    StreamSettings,
)
from vpblu.stream.identity import AuthenticationFailed, Identity
from vpblu.stream.transport import MeshServer, NodeStream

KEY = base64.b64encode(bytes(range(32))).decode()
PEER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
PROMPTLY = 10.0


class FakeAuthenticator:
    async def authenticate(self, token: str) -> Identity:
        if not token.startswith("token-"):
            raise AuthenticationFailed("unknown token")
        return Identity(node_name=token.removeprefix("token-"))


@asynccontextmanager
async def mesh_server(pki: MeshPki, redirect_to: str | None = None
                      ) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[NodeStream]]]:
    send, receive = trio.open_memory_channel[NodeStream](4)
    server = MeshServer(host="127.0.0.1", port=0, tls=pki.server,
                        authenticator=FakeAuthenticator(), new_streams=send,
                        redirect_to=redirect_to)
    async with trio.open_nursery() as nursery, send, receive:
        await nursery.start(server.run)
        yield f"127.0.0.1:{server.port}", receive
        nursery.cancel_scope.cancel()


def daemon(tmp_path: Path, pki: MeshPki, *addresses: str) -> tuple[StreamActor, RecordingApplier]:
    token = tmp_path / "token"
    token.write_text("token-a")
    applier = RecordingApplier("a")
    settings = StreamSettings(addresses=addresses, tls=pki.client, token_file=token)
    return StreamActor("a", lambda: KEY, applier, settings), applier


async def acks_until(stream: NodeStream, generation: int) -> None:
    with trio.fail_after(PROMPTLY):
        while True:
            for message in await stream.receive_batch():
                if isinstance(message, wire.Ack) and message.generation >= generation:
                    return


async def test_follows_a_redirect_and_survives_the_stream_ending(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    async with mesh_server(pki) as (leader, streams), \
            mesh_server(pki, redirect_to=leader) as (follower, _), \
            trio.open_nursery() as nursery:
        actor, applier = daemon(tmp_path, pki, follower)
        nursery.start_soon(actor.run)
        with trio.fail_after(PROMPTLY):
            first = await streams.receive()
        assert actor.statistics().redirects == 1
        await first.send_batch([wire.SyncState(1, NodeDesiredState("a"))])
        await acks_until(first, 1)
        # The controller ends the stream cleanly: the daemon goes straight
        # back to it (no second redirect) without a backoff, and keeps what
        # it applied meanwhile.
        first.close("the test ends this stream")
        with trio.fail_after(PROMPTLY):
            second = await streams.receive()
        assert second.hello.last_applied_generation == 1
        stats = actor.statistics()
        assert stats.redirects == 1
        assert stats.closed_reconnects == 1
        assert stats.last_reconnect_delay is not None
        assert stats.last_reconnect_delay <= CLOSED_RECONNECT_JITTER
        assert applier.current == NodeDesiredState("a")
        # Ended cleanly again at once: that is a repeat, and it backs off
        # (to the next address: the follower, which redirects again).
        second.close("the test ends this stream again")
        with trio.fail_after(PROMPTLY + RECONNECT_INITIAL * 2 + RECONNECT_JITTER):
            third = await streams.receive()
        assert third.hello.last_applied_generation == 1
        stats = actor.statistics()
        assert stats.closed_reconnects == 1
        assert stats.redirects == 2
        assert stats.last_reconnect_delay is not None
        assert stats.last_reconnect_delay >= RECONNECT_INITIAL * 2
        nursery.cancel_scope.cancel()


async def test_stale_messages_are_ignored_and_the_applied_generation_acked(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    peer = Peer("b", PEER_KEY, None, ("10.0.2.0/24",))
    current = NodeDesiredState("a", peers=(peer,))
    async with mesh_server(pki) as (leader, streams), trio.open_nursery() as nursery:
        actor, applier = daemon(tmp_path, pki, leader)
        nursery.start_soon(actor.run)
        with trio.fail_after(PROMPTLY):
            stream = await streams.receive()
        await stream.send_batch([wire.SyncState(10, current)])
        await acks_until(stream, 10)
        # An older leader's delta and an older sync (both below 10) change nothing.
        await stream.send_batch([wire.Delta(9, 8, [PeerAdded(attrs_peer("c"))]),
                                 wire.SyncState(5, NodeDesiredState("a"))])
        # Each batch the daemon handles is acknowledged (at 10, what it has).
        with trio.fail_after(PROMPTLY):
            while actor.statistics().ignored_stale < 2:
                await acks_until(stream, 10)
        assert actor.statistics().ignored_stale == 2
        assert [step.state for step in applier.history] == [current]
        # A delta whose base is not what the daemon applied is refused with an
        # error Ack (the controller then sends a full SyncState).
        await stream.send_batch([wire.Delta(12, 11, [PeerAdded(attrs_peer("c"))])])
        with trio.fail_after(PROMPTLY):
            errors: list[wire.Ack] = []
            while not errors:
                errors = [m for m in await stream.receive_batch()
                          if isinstance(m, wire.Ack) and m.error]
        assert errors[0].generation == 12
        assert applier.current == current
        nursery.cancel_scope.cancel()


def attrs_peer(name: str) -> Peer:
    return Peer(name, PEER_KEY, None, ("10.0.3.0/24",))


class GatedFakeApplier(RecordingApplier):
    """A fake kernel whose applies wait for `gate` (a slow first apply: a
    node still starting wireguard-go under load)."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.gate = trio.Event()
        self.gate.set()
        self.waiting = trio.Event()

    async def apply(self, state: NodeDesiredState, *, whole: bool = True) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await super().apply(state)


async def test_a_stream_ending_during_an_apply_is_followed_at_once_and_the_apply_finishes(
        aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path) -> None:
    pki = MeshPki.create(tmp_path / "pki")
    async with mesh_server(pki) as (leader, streams), trio.open_nursery() as nursery:
        token = tmp_path / "token"
        token.write_text("token-a")
        applier = GatedFakeApplier("a")
        actor = StreamActor("a", lambda: KEY, applier,
                            StreamSettings(addresses=(leader,), tls=pki.client, token_file=token))
        nursery.start_soon(actor.run)
        with trio.fail_after(PROMPTLY):
            first = await streams.receive()
        await first.send_batch([wire.SyncState(1, NodeDesiredState("a"))])
        await acks_until(first, 1)
        # An apply that does not finish, and the controller ends the stream.
        applier.gate = trio.Event()
        slow = NodeDesiredState("a", listen_port=51821)
        await first.send_batch([wire.SyncState(2, slow)])
        with trio.fail_after(PROMPTLY):
            await applier.waiting.wait()
        first.close("its Node was deleted or replaced; say the key again in a new Hello")
        # The next stream's Hello comes while that apply still waits.
        with trio.fail_after(PROMPTLY):
            second = await streams.receive()
        assert not applier.gate.is_set()
        assert second.hello.last_applied_generation == 1
        assert actor.statistics().ended_mid_apply == 1
        assert actor.statistics().closed_reconnects == 1
        # It finishes, and the new stream's state goes after it.
        await second.send_batch([wire.SyncState(3, NodeDesiredState("a"))])
        applier.gate.set()
        await acks_until(second, 3)
        assert [step.state for step in applier.history][-2:] == [slow, NodeDesiredState("a")]
        assert actor.statistics().applied_generation == 3
        nursery.cancel_scope.cancel()
