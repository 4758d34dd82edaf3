"""FakeController: the controller's end of the warm stream, scripted by a test.

A real `vpblu.stream.transport.MeshServer` (TLS, gRPC) with a fake authenticator
(token "token-<node>" speaks for <node>), serving on a listening socket the test
hands it (e.g. one made in the e2e lab's underlay namespace, so daemons in node
namespaces reach it). The test decides what each node should have: `sync`
sends a SyncState now and again on every reconnect (as the real controller
does), `delta` sends a Delta, `rotation_step` one step of a key rotation; every
Hello, Ack and RotationResult is recorded.
"""

from __future__ import annotations

import socket
from collections import defaultdict

import attrs
import trio

from vpblu.core import wire
from vpblu.core.model import Change, NodeDesiredState
from vpblu.stream.identity import AuthenticationFailed, Identity
from vpblu.stream.transport import MeshServer, NodeStream, ServerTLS, StreamClosed

TOKEN_PREFIX = "token-"


class FakeAuthenticator:
    """Tokens are "token-<node>"; anything else is refused."""

    async def authenticate(self, token: str) -> Identity:
        if not token.startswith(TOKEN_PREFIX):
            raise AuthenticationFailed("unknown token")
        return Identity(node_name=token.removeprefix(TOKEN_PREFIX))


@attrs.define
class _Node:
    stream: NodeStream | None = None
    generation: int = 0
    state: NodeDesiredState | None = None
    hellos: list[wire.Hello] = attrs.field(factory=list)
    acks: list[wire.Ack] = attrs.field(factory=list)
    rotation_results: list[wire.RotationResult] = attrs.field(factory=list)


class FakeController:
    def __init__(self, tls: ServerTLS, listen_socket: socket.socket) -> None:
        self._tls = tls
        self._socket = listen_socket
        self._nodes: defaultdict[str, _Node] = defaultdict(_Node)
        self._changed = trio.Event()
        self._next_generation = 0

    def hellos(self, node: str) -> list[wire.Hello]:
        return list(self._nodes[node].hellos)

    def acks(self, node: str) -> list[wire.Ack]:
        return list(self._nodes[node].acks)

    def connected(self, node: str) -> bool:
        return self._nodes[node].stream is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[NodeStream](0)
        server = MeshServer(host="", port=0, tls=self._tls, authenticator=FakeAuthenticator(),
                            new_streams=send, listen_socket=self._socket)
        async with send, receive, trio.open_nursery() as nursery:
            await nursery.start(server.run)
            task_status.started()
            async for stream in receive:
                nursery.start_soon(self._serve, stream)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve(self, stream: NodeStream) -> None:
        node = self._nodes[stream.node_name]
        node.hellos.append(stream.hello)
        node.stream = stream
        self._signal()
        try:
            if node.state is not None:
                await stream.send_batch([wire.SyncState(node.generation, node.state)])
            while True:
                for message in await stream.receive_batch():
                    if isinstance(message, wire.Ack):
                        node.acks.append(message)
                        self._signal()
                    elif isinstance(message, wire.RotationResult):
                        node.rotation_results.append(message)
                        self._signal()
        except StreamClosed:
            pass
        finally:
            if node.stream is stream:
                node.stream = None
                self._signal()

    def _generation(self) -> int:
        self._next_generation += 1
        return self._next_generation

    async def sync(self, node_name: str, state: NodeDesiredState) -> int:
        """Make `state` the node's desired state; send it if the node is connected."""
        node = self._nodes[node_name]
        node.generation, node.state = self._generation(), state
        if node.stream is not None:
            await node.stream.send_batch([wire.SyncState(node.generation, state)])
        return node.generation

    async def delta(self, node_name: str, changes: tuple[Change, ...],
                    result: NodeDesiredState) -> int:
        """Send `changes` (which turn the node's state into `result`) as a Delta."""
        node = self._nodes[node_name]
        base, generation = node.generation, self._generation()
        node.generation, node.state = generation, result
        assert node.stream is not None, f"{node_name} is not connected"
        await node.stream.send_batch([wire.Delta(generation, base, changes)])
        return generation

    async def rotation_step(self, node_name: str, step: wire.RotationStep) -> wire.RotationResult:
        """Send `step` to the node and wait for its result (of that stamp)."""
        node = self._nodes[node_name]
        assert node.stream is not None, f"{node_name} is not connected"
        seen = len(node.rotation_results)
        await node.stream.send_batch([step])
        while True:
            for result in node.rotation_results[seen:]:
                if result.stamp == step.stamp and result.step == step.step:
                    return result
            await self._changed.wait()

    async def wait_hello(self, node: str, count: int = 1) -> wire.Hello:
        while len(self._nodes[node].hellos) < count:
            await self._changed.wait()
        return self._nodes[node].hellos[count - 1]

    async def wait_ack(self, node: str, generation: int, *, after: int = 0) -> wire.Ack:
        """The first Ack of `generation` or later among the acks from index `after`
        on (raises if it carries an error)."""
        while True:
            for ack in self._nodes[node].acks[after:]:
                if ack.generation >= generation:
                    assert ack.error is None, f"{node} failed generation {ack.generation}: {ack}"
                    return ack
            await self._changed.wait()
