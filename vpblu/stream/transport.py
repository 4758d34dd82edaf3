"""The warm stream's transport: the one adapter between vpblu and grpclib.

Owns the Mesh gRPC service on the controller (`MeshServer`) and the daemon's
end of it (`open_mesh_stream`), TLS on both, and the check that a stream
speaks for the node its token proves (`vpblu.stream.identity`). Above this module
everything is plain trio and typed `vpblu.core.wire` values; below it, grpclib
runs on asyncio under trio-asyncio.

Shape of one stream: grpclib's per-message loops stay on the asyncio side.
A reader task decodes every incoming message into a bounded inbox (full
inbox = the reader stops = HTTP/2 flow control pushes back on the sender);
the trio side takes whatever has arrived as one batch, and hands whole
batches to be written. Crossing between trio and asyncio costs about five
times a message's own cost (STACK.md), so it happens once per batch.

On the controller a push goes to thousands of streams at once, and even one
awaited crossing per stream cost more than the push itself: 0.14-0.2 ms
each, 140-210 ms for 1000 sessions (bench/push_crossing.py, busy 2 cores).
So `send_batch` does not cross at all: it appends the already-serialized
batch to the stream's bounded outbox and wakes the stream's asyncio writer
task (0.7-0.8 ms for 1000 sessions, ~200x less). It waits
(one crossing) only when the outbox holds OUTBOX_LIMIT bytes, so a daemon
that stops reading pushes back on its session, whose mailbox coalesces. A
failed write closes the stream; the sender learns it from its next
`send_batch` or `receive_batch`. The daemon's end writes the same way (an
ack then costs no asyncio task; the benchmark runs 1000 daemons in one
process), and what it queued before it closes still goes out first.

grpclib does not see trio deadlines: every wait on the asyncio side has its
own named timeout. A stream that fails in any way (reset, dropped
connection, malformed message, closed by either end) ends as one
`StreamClosed` on the trio side, raised by the next `receive_batch` once
what had arrived is consumed; it never raises anywhere else.

Limits against a hostile or broken peer (issue 19): every received message
is refused by its gRPC length prefix, before a byte of it is buffered, above
CONTROLLER_MESSAGE_LIMIT (what daemons send) or DAEMON_MESSAGE_LIMIT (what
the controller sends): the stream ends with RESOURCE_EXHAUSTED and its
connection is closed. The controller's HTTP/2 windows are small (a peer can
make it hold at most that much unread) and each connection may open
MAX_STREAMS_PER_CONNECTION streams. Both ends PING an idle connection every
KEEPALIVE_INTERVAL and abort one that said nothing for KEEPALIVE_TIMEOUT (no
graceful TLS shutdown toward a dead peer); TCP_USER_TIMEOUT does the same
for data the kernel cannot deliver. Unauthenticated streams pass
`vpblu.stream.admission` before a TokenReview.

It must never log a token, never retry (the stream actors own reconnecting
with backoff) and never decide anything about desired state.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import attrs
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.settings import SettingCodes

from vpblu.core import wire
from vpblu.stream import codec
from vpblu.stream.admission import Admission, AdmissionRefused, AdmissionStatistics
from vpblu.stream.codec import ProtocolViolation
from vpblu.stream.identity import AuthenticationFailed, Authenticator, Identity
from vpblu.stream.proto import mesh_grpc
from vpblu.stream.proto import mesh_pb2 as pb
from vpblu.stream.pushencoder import Pieces, PushEncoder

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # TCP + TLS + request headers + Hello
AUTH_TIMEOUT = 15.0  # the Authenticator's own TokenReview timeout is shorter
HELLO_TIMEOUT = 10.0  # a client that connects and says nothing is dropped
ACCEPT_TIMEOUT = 10.0  # the controller must take a new stream off the channel in this time
WRITE_TIMEOUT = 10.0  # one batch; a peer that stops reading for this long is gone
CLOSE_TIMEOUT = 5.0  # ending an RPC (trailers or reset) never waits longer
SERVER_STOP_TIMEOUT = 5.0
# How often the server looks whether its certificate files changed (kubelet
# updates a mounted Secret within about a minute of a renewal).
CERT_RELOAD_INTERVAL = 30.0
INBOX_LIMIT = 1024  # messages buffered per stream before flow control pushes back
INBOX_BYTES = 8 << 20  # ... or this many bytes of them (~60 SyncStates of 1000 peers)
# Serialized bytes queued per controller stream before send_batch waits: a
# byte bound, because a SyncState at N=1000 is ~150 KB and a message count
# would let 1000 sessions queue gigabytes; small deltas never reach it.
OUTBOX_LIMIT = 128 * 1024
# Queued messages written together, up to this many bytes, ...
COALESCE_BYTES = 64 * 1024
# ... handed to HTTP/2 in writes of about one DATA frame (16 KiB by default)
# each: what is joined at once for a write.
WRITE_CHUNK = 16 * 1024
# A gRPC message's prefix: compressed flag, then the length (big-endian).
_GRPC_PREFIX = struct.Struct(">?I")
ROOM_TIMEOUT = WRITE_TIMEOUT + CLOSE_TIMEOUT  # the writer gives up before this
BATCH_LIMIT = 1024  # most messages one receive_batch returns
CLOSE_REASON_KEY = "vpblu-close-reason"  # trailing metadata of a stream the controller closed
# Largest message accepted, by its length prefix. A daemon's biggest is a
# Telemetry (per-peer columns, ~60 B a peer: ~0.3 MB at 5000 peers); the
# controller's a SyncState (~150 KB at N=1000, more with many routes and
# blocks). grpclib itself takes up to 4 GiB.
CONTROLLER_MESSAGE_LIMIT = 4 << 20
DAEMON_MESSAGE_LIMIT = 32 << 20
# The controller's receive windows: what one connection (and one stream) can
# make it buffer before a message is read. Daemons send small messages; a
# bigger one just takes a few round trips.
SERVER_WINDOW = 256 * 1024
MAX_STREAMS_PER_CONNECTION = 4  # a daemon opens one; HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
# Connections waiting to be accepted (grpclib's default is 100): a burst of
# connects beyond it (daemons reconnecting after a failover, a flood) has its
# handshakes dropped by the kernel and retried after 1, 3, 7 s.
LISTEN_BACKLOG = 1024
# Dead-peer detection, both ends: a connection that received nothing for
# KEEPALIVE_INTERVAL is sent an HTTP/2 PING (the other end's HTTP/2 layer
# answers it, whatever its application does); nothing received for
# KEEPALIVE_TIMEOUT and the connection is aborted: detected within
# KEEPALIVE_TIMEOUT + KEEPALIVE_INTERVAL (20 s) of the last byte.
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_TIMEOUT = 15.0
TCP_USER_TIMEOUT_MS = int(KEEPALIVE_TIMEOUT * 1000)
# This process's silence limit (`--keepalive-timeout`). The kernel's
# TCP_USER_TIMEOUT catches a path that drops packets whatever this is; this
# catches a peer whose host answers but whose process does not, and must stay
# above the longest stretch the peer may be too busy to read: a controller
# that forms a mesh of thousands of nodes on a starved CPU, or a benchmark
# whose thousand simulated daemons share one process.
_silence_limit = KEEPALIVE_TIMEOUT


def set_keepalive_timeout(seconds: float) -> None:
    """Abort a mesh connection of this process after `seconds` without a byte."""
    global _silence_limit
    if not seconds > KEEPALIVE_INTERVAL:
        raise ValueError(f"the keepalive timeout must exceed the {KEEPALIVE_INTERVAL:.0f} s "
                         f"between PINGs, got {seconds}")
    _silence_limit = seconds

R = TypeVar("R")
S = TypeVar("S")


class StreamClosed(Exception):
    """The stream is over; nothing more can be sent or received on it.

    `status` is the gRPC status name when the other end ended the RPC with
    one ("UNAUTHENTICATED", "PERMISSION_DENIED", ...), else None.
    """

    def __init__(self, reason: str, *, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ConnectFailed(StreamClosed):
    """The daemon could not open the stream at all (refused, TLS, timeout)."""


class MessageTooLarge(Exception):
    """The other end announced a message above the limit; nothing of it was read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes is above the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def _limit_messages(stream: Any, limit: int) -> None:
    """Refuse any message on grpclib `stream` longer than `limit` bytes.

    grpclib reads a message as `recv_data(5)` (flag and length) and then
    `recv_data(length)`, which buffers and acknowledges all `length` bytes
    (the sender's window refills) before anything looks at them: one
    announced 4 GiB message is 4 GiB of memory. grpclib has no limit and no
    hook, so the adapter wraps this stream's `recv_data`: a length above the
    limit raises `MessageTooLarge` before the first byte of it is read."""
    h2_stream = stream._stream
    if getattr(h2_stream, "vpblu_message_limit", None) == limit:
        return
    h2_stream.vpblu_message_limit = limit
    read = h2_stream.recv_data

    async def recv_data(size: int) -> bytes:
        if size > limit:
            raise MessageTooLarge(size, limit)
        return await read(size)  # type: ignore[no-any-return]

    h2_stream.recv_data = recv_data


def _close_connection(stream: Any) -> None:
    """Close the HTTP/2 connection `stream` runs on, once what was written
    (its trailers) is out."""
    with contextlib.suppress(Exception):
        stream._stream.connection.close()


class _MeshProtocol(H2Protocol):
    """grpclib's HTTP/2 protocol with vpblu's liveness and limits (see the
    module docstring): keepalive PINGs and an abort of a silent connection,
    TCP_USER_TIMEOUT, and on the server SETTINGS_MAX_CONCURRENT_STREAMS."""

    max_streams: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._raw_transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                TCP_USER_TIMEOUT_MS)
        if self.max_streams is not None:
            # Enforced by h2 once the client acknowledges the setting: a
            # stream over it is a protocol error that ends the connection.
            self.connection._connection.update_settings(
                {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
            self.connection.flush()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_received = loop.time()
        self._keepalive = loop.call_later(KEEPALIVE_INTERVAL, self._tick)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        super().data_received(data)

    def _tick(self) -> None:
        silent = self._loop.time() - self._last_received
        if silent >= _silence_limit:
            addr = self._raw_transport.get_extra_info("peername")
            log.warning("mesh connection to %s: nothing received for %.0f s; aborting it",
                        addr, silent)
            self._raw_transport.abort()
            return
        if silent >= KEEPALIVE_INTERVAL - 0.5 and not self.connection.is_closing():
            with contextlib.suppress(Exception):
                self.connection._connection.ping(b"vpbluka!")
                self.connection.flush()
        self._keepalive = self._loop.call_later(KEEPALIVE_INTERVAL, self._tick)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._keepalive.cancel()
        super().connection_lost(exc)


# --- TLS -------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ServerTLS:
    """File paths (a mounted Secret in production). `client_ca`: require client
    certificates signed by it (mTLS); None: TLS with tokens only."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@attrs.frozen(slots=True)
class ClientTLS:
    """`ca` verifies the controller; `cert`/`key` for mTLS; `server_name`
    overrides the name checked in the controller's certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


def server_ssl_context(tls: ServerTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(["h2"])
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if tls.cert is not None:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


# --- the asyncio side of one stream --------------------------------------------------


class _Inbox(Generic[R]):
    """Decoded messages waiting for the trio side. One producer (the asyncio
    reader), one consumer (a trio task), both in trio's thread: the consumer
    takes without crossing into asyncio and waits on a trio event the reader
    sets, so an ack costs no asyncio task."""

    def __init__(self, limit: int, byte_limit: int = INBOX_BYTES) -> None:
        self._items: deque[tuple[R, int]] = deque()
        self._limit = limit
        self._byte_limit = byte_limit
        self._bytes = 0
        self._arrived = trio.Event()  # for the trio side: something to take
        self._writable = asyncio.Event()  # for the reader: room again
        self._closed: StreamClosed | None = None

    async def put(self, item: R, size: int = 0) -> None:
        """Wait until there is room: fewer than `limit` messages and `byte_limit`
        bytes (of their wire form) wait; one message alone always fits."""
        while self._items and (len(self._items) >= self._limit
                               or self._bytes + size > self._byte_limit):
            self._writable.clear()
            await self._writable.wait()
        self._items.append((item, size))
        self._bytes += size
        self._arrived.set()

    async def take(self, limit: int) -> list[R]:
        """At least one message, at most `limit` (trio side); `StreamClosed`
        once closed and everything that arrived was taken."""
        while not self._items:
            if self._closed is not None:
                raise StreamClosed(self._closed.reason, status=self._closed.status)
            # No checkpoint between the check and the wait: the reader cannot
            # put in between, so a fresh event never misses an arrival.
            self._arrived = trio.Event()
            await self._arrived.wait()
        batch = []
        for _ in range(min(limit, len(self._items))):
            item, size = self._items.popleft()
            self._bytes -= size
            batch.append(item)
        self._writable.set()
        return batch

    @property
    def waiting(self) -> int:
        return len(self._items)

    def close(self, why: StreamClosed) -> None:
        """First reason wins; what already arrived is still delivered."""
        if self._closed is None:
            self._closed = why
        self._arrived.set()

    @property
    def closed(self) -> StreamClosed | None:
        return self._closed


class _Call(Generic[R, S]):
    """One RPC on the asyncio side: the reader loop, the outbox and its
    writer loop, ending.

    `stream` is a grpclib server or client stream (same send/recv API).
    """

    def __init__(self, stream: Any, decode: Callable[[Any], R], limit: int) -> None:
        self.stream = stream
        self._decode = decode
        _limit_messages(stream, limit)
        self.too_large: MessageTooLarge | None = None
        self.inbox: _Inbox[R] = _Inbox(INBOX_LIMIT)
        self._write_lock = asyncio.Lock()
        self.stop = asyncio.Event()  # the reader ended, or the trio side closed
        self.finished = asyncio.Event()  # the RPC is over on this side
        self.close_reason: str | None = None
        self.messages_received = 0
        self.bytes_received = 0  # protobuf bytes, without gRPC/HTTP/2/TLS framing
        self.outbox: deque[S] = deque()
        self.outbox_bytes = 0
        # Messages queued and written out so far; the timed batch (see `enqueue`) is
        # the one whose last message is number `_timed_mark`, written at `timed_at`.
        self.enqueued = 0
        self.written = 0
        self._timed_mark = 0
        self.timed_at: float | None = None
        self._outbox_ready = asyncio.Event()  # the writer has something to do
        self._room = asyncio.Event()  # the outbox went below OUTBOX_LIMIT

    def _stopped(self) -> None:
        self.stop.set()
        self._outbox_ready.set()
        self._room.set()

    async def read_loop(self) -> None:
        try:
            while True:
                received = await self._receive_one()
                if received is None:
                    self.inbox.close(await self._end_of_stream())
                    return
                await self.inbox.put(*received)
                del received
        except ProtocolViolation as exc:
            log.warning("protocol violation on the mesh stream: %s", exc)
            self.inbox.close(StreamClosed(f"protocol violation: {exc}"))
        except MessageTooLarge as exc:
            log.warning("refused a message on the mesh stream: %s", exc)
            self.too_large = exc
            self.inbox.close(StreamClosed(f"refused: {exc}", status="RESOURCE_EXHAUSTED"))
        except GRPCError as exc:
            self.inbox.close(StreamClosed(_grpc_reason(exc), status=exc.status.name))
        except Exception as exc:
            # Every other failure here (reset, connection lost, h2 or protobuf
            # decode errors) means the same thing to the trio side: this
            # stream is gone and a new one must be opened.
            self.inbox.close(self._status_behind(exc))
        finally:
            self.inbox.close(StreamClosed("stream ended"))
            self._stopped()

    async def _receive_one(self) -> tuple[R, int] | None:
        """The next message decoded, and its protobuf size; None at the end.

        The protobuf message goes with this frame, before the reader waits
        again: a local of the loop would pin every stream's latest one, and
        with it the upb arena it was parsed into (~3.5 times the message:
        140 KB for a 40 KB whole telemetry sample). At N=1000 every daemon's
        whole sample arrives within one beat, and the leader held 140 MB of
        arenas at its peak (memray) until the streams' next messages."""
        message = await self.stream.recv_message()
        if message is None:
            return None
        size = message.ByteSize()
        self.messages_received += 1
        self.bytes_received += size
        return self._decode(message), size

    async def _end_of_stream(self) -> StreamClosed:
        return StreamClosed("the other end ended the stream")

    def _status_behind(self, exc: Exception) -> StreamClosed:
        return StreamClosed(f"stream broken: {exc!r}")

    def check_open(self) -> None:
        """`StreamClosed` if nothing more may be written."""
        if self.close_reason is not None:
            raise StreamClosed(f"closed here: {self.close_reason}")
        if self.stop.is_set():
            closed = self.inbox.closed
            raise StreamClosed(closed.reason if closed else "stream ended",
                               status=closed.status if closed else None)

    def enqueue(self, batch: Sequence[S], *, timed: bool = False) -> bool:
        """Called from trio (same thread): queue `batch` for the writer, in
        order. False when the outbox is full and the caller must `wait_for_room`.
        `timed`: `timed_at` becomes the time its last message is written out
        (None until then), in place of the previous timed batch's."""
        self.check_open()
        self.enqueued += len(batch)
        if timed:
            self._timed_mark, self.timed_at = self.enqueued, None
        self.outbox.extend(batch)
        self.outbox_bytes += sum(_size(m) for m in batch)
        # Setting an asyncio Event from trio is safe under trio-asyncio: it
        # only schedules the waiter's wake-up on the loop, which runs in this
        # thread.
        self._outbox_ready.set()
        return self.outbox_bytes < OUTBOX_LIMIT

    async def wait_for_room(self) -> None:
        try:
            async with asyncio.timeout(ROOM_TIMEOUT):
                while self.outbox_bytes >= OUTBOX_LIMIT and not self.stop.is_set():
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            self.request_close("the outbox did not drain")
        self.check_open()

    async def write_loop(self) -> None:
        """Write what is queued, until the stream stops. After a close asked
        for here, what is still queued goes out first (within CLOSE_TIMEOUT):
        a controller's last messages must arrive, and a daemon's last acks."""
        while True:
            while not self.outbox:
                if self.stop.is_set():
                    return
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            if self.stop.is_set() and self.close_reason is None:
                return  # the stream broke or the other end ended it: nothing more goes out
            if not await self._write_out():
                return

    async def _write_out(self) -> bool:
        timeout = CLOSE_TIMEOUT if self.stop.is_set() else WRITE_TIMEOUT
        async with self._write_lock:
            try:
                async with asyncio.timeout(timeout):
                    while self.outbox:
                        if self.stop.is_set() and self.close_reason is None:
                            return False
                        taken, size = await self._send_some()
                        self.outbox_bytes -= size
                        for _ in range(taken):
                            self.outbox.popleft()
                            self.written += 1
                            if self.written == self._timed_mark:
                                self.timed_at = trio.current_time()
                        if self.outbox_bytes < OUTBOX_LIMIT:
                            self._room.set()
            except TimeoutError:
                self.request_close("a write timed out")
                return False
            except Exception as exc:
                self.request_close(f"a write failed: {exc!r}")
                return False
        return True

    async def _send_some(self) -> tuple[int, int]:
        """Write the head of the outbox; return how many messages went, and their
        bytes as the outbox counts them.

        Whatever is queued (up to COALESCE_BYTES) goes out together, in
        HTTP/2 DATA writes of about a frame (WRITE_CHUNK): gRPC messages are
        length-prefixed in the stream's bytes, so several may share a frame,
        and each write costs an h2 frame, a TLS record and a socket write
        however small it is. A batch of rotations
        hands a daemon one step per member at once, and a daemon answers them
        together. The first message of a stream goes through grpclib's own
        send_message, which sends the request or response headers first."""
        batch, size = [], 0
        if self.written:
            for message in self.outbox:
                batch.append(message)
                size += _size(message)
                if size >= COALESCE_BYTES:
                    break
        if not batch:
            first = self.outbox[0]
            await self.stream.send_message(first.join() if isinstance(first, Pieces) else first)
            return 1, _size(first)
        grpc = self.stream
        codec, send_type = grpc._codec, grpc._send_type
        # Joined and handed to HTTP/2 a frame's worth at a time: a SyncState
        # queued as Pieces is never one 150 KB string here either.
        pieces: list[bytes] = []
        for message in batch:
            if isinstance(message, Pieces):
                pieces.append(_GRPC_PREFIX.pack(False, len(message)))
                pieces.extend(message.parts)
            else:
                body = codec.encode(message, send_type)
                pieces += (_GRPC_PREFIX.pack(False, len(body)), body)
        for chunk in write_chunks(pieces, WRITE_CHUNK):
            await grpc._stream.send_data(chunk)
        # What grpclib's send_message counts (its keepalive reads the connection's).
        grpc._messages_sent += len(batch)
        connection = grpc._stream.connection
        connection.messages_sent += len(batch)
        connection.last_message_sent = time.monotonic()
        return len(batch), size

    def request_close(self, reason: str) -> None:
        """From either side; the task serving the RPC ends it."""
        if self.close_reason is None and not self.finished.is_set():
            self.close_reason = reason
        self.inbox.close(StreamClosed(f"closed here: {reason}"))
        self._stopped()


def _grpc_reason(exc: GRPCError) -> str:
    return f"{exc.status.name}: {exc.message}" if exc.message else exc.status.name


def write_chunks(pieces: list[bytes], size: int) -> Iterator[bytes]:
    """`pieces` joined, in order, into strings of at least `size` bytes (the
    last may be shorter; a piece is never split). The boundaries are found in
    C (running sums, bisection): a SyncState of 999 peers is ~4000 pieces."""
    ends = list(itertools.accumulate(map(len, pieces)))
    start, done = 0, 0
    while start < len(pieces):
        stop = min(bisect.bisect_left(ends, done + size, lo=start) + 1, len(pieces))
        yield b"".join(pieces[start:stop])
        start, done = stop, ends[stop - 1]


def _size(message: Any) -> int:
    """Bytes of a queued message: serialized already (whole or in pieces), or
    a protobuf message."""
    return len(message) if isinstance(message, (bytes, Pieces)) else int(message.ByteSize())


class _ServerCall(_Call[wire.NodeMessage, bytes | pb.ControllerMessage]):
    """The controller's end, run by grpclib's handler task (`serve`)."""

    async def serve(self) -> None:
        """Run in grpclib's handler task until the stream ends; then end the RPC."""
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self.read_loop())
                tasks.create_task(self.write_loop())
                await self.stop.wait()
                reader.cancel()
                # The writer ends on its own: at once, or once the queue is
                # out after a close asked for here (bounded by CLOSE_TIMEOUT).
            await self._finish()
        except asyncio.CancelledError:
            # grpclib cancels handlers when the server closes but leaves the
            # connection open: reset the stream, or the daemon never learns.
            with contextlib.suppress(Exception):
                await self.stream.cancel()
            raise
        finally:
            self.inbox.close(StreamClosed("stream ended"))
            self.finished.set()

    async def _finish(self) -> None:
        stream = self.stream
        if self.too_large is not None:
            # Nothing more for this peer: the status, then the connection goes.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await stream.send_trailing_metadata(
                        status=Status.RESOURCE_EXHAUSTED, status_message=str(self.too_large))
            _close_connection(stream)
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT), self._write_lock:
                if self.close_reason is not None:
                    # Status OK, the reason in trailing metadata: grpclib
                    # resets the stream right after non-OK trailers, and a
                    # reset makes the client drop messages it has not read
                    # yet; a controller's last messages must still arrive.
                    reason = self.close_reason.encode("ascii", "backslashreplace").decode()
                    await stream.send_trailing_metadata(metadata={CLOSE_REASON_KEY: reason})
                else:
                    await stream.send_trailing_metadata()
        except Exception as exc:
            log.debug("ending a mesh stream: %r", exc)
            with contextlib.suppress(Exception):
                await stream.cancel()


class _ClientCall(_Call[wire.ControllerMessage, pb.NodeMessage]):
    def __init__(self, channel: Channel, stream: Any) -> None:
        super().__init__(stream, codec.decode_controller_message, DAEMON_MESSAGE_LIMIT)
        self.channel = channel
        # The reader is an asyncio task owned by this call, not a trio task:
        # a nursery around the daemon's `async with` block would wrap every
        # error raised in the block into an ExceptionGroup. `shutdown`
        # cancels and awaits it, so it never outlives the stream.
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self.read_loop())
        self._writer = loop.create_task(self.write_loop())

    @classmethod
    async def open(cls, host: str, port: int, tls: ClientTLS, token: str,
                   hello: pb.NodeMessage) -> _ClientCall:
        # The Channel is made here, inside asyncio context (trio-asyncio trap).
        channel = _MeshChannel(host, port, ssl=client_ssl_context(tls),
                          config=Configuration(ssl_target_name_override=tls.server_name))
        stream = mesh_grpc.MeshStub(channel).Connect.open(
            metadata={"authorization": f"Bearer {token}"})
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await stream.__aenter__()
                await stream.send_request()
                await stream.send_message(hello)
        except BaseException:
            channel.close()
            raise
        return cls(channel, stream)

    async def _end_of_stream(self) -> StreamClosed:
        # The server ended its side: its trailers say why (a status other
        # than OK raises here). grpclib reads them only once we end ours.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.stream.end()
                await self.stream.recv_trailing_metadata()
        except GRPCError as exc:
            return StreamClosed(_grpc_reason(exc), status=exc.status.name)
        except Exception as exc:
            return self._status_behind(exc)
        reason = (self.stream.trailing_metadata or {}).get(CLOSE_REASON_KEY)
        if reason:
            return StreamClosed(f"the controller closed the stream: {reason}", status="OK")
        return StreamClosed("the controller ended the stream", status="OK")

    def _status_behind(self, exc: Exception) -> StreamClosed:
        """A reset can overtake the trailers that came before it: grpclib's
        own exit reads the status the server sent from the stream then, and
        so do we (`_maybe_raise` is how grpclib 0.4 does it)."""
        try:
            self.stream._maybe_raise()
        except GRPCError as status:
            return StreamClosed(_grpc_reason(status), status=status.status.name)
        except Exception as other:
            log.debug("no status behind a broken mesh stream: %r", other)
        return StreamClosed(f"stream broken: {exc!r}")

    async def shutdown(self) -> None:
        """Reset the RPC (the server sees it at once) and close the connection.
        Never waits for trailers: that wait is what hangs (STACK.md)."""
        try:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            # What was queued before the close goes out first (the writer
            # ends once it is out), then the reset. Half the caller's bound
            # (open_mesh_stream gives shutdown CLOSE_TIMEOUT): the reset and
            # the channel's close must still fit in it.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._writer, CLOSE_TIMEOUT / 2)
            with contextlib.suppress(Exception):
                await self.stream.cancel()
            with contextlib.suppress(Exception):
                await self.stream.__aexit__(None, None, None)
        finally:
            self.channel.close()
            self.finished.set()


# --- the trio side ----------------------------------------------------------------------


class BatchStream(Generic[R, S]):
    """The trio face of one stream: receive and send whole batches.

    Receive from one task and send from another freely; `receive_batch` from
    two tasks at once is not supported (one consumer).
    """

    def __init__(self, call: _Call[R, Any], encode: Callable[[S], Any]) -> None:
        self._call = call
        self._encode = encode

    async def receive_batch(self) -> list[R]:
        """At least one message, all that arrived up to BATCH_LIMIT; or
        `StreamClosed` once the stream is over and everything was delivered."""
        return await self._call.inbox.take(BATCH_LIMIT)

    async def send_batch(self, messages: Sequence[S], *, timed: bool = False) -> None:
        """Queued in order for the stream's writer; returns without crossing
        into asyncio unless the outbox is full. `StreamClosed` if the stream
        is over (a failed earlier write included). `timed`: `written_at` tells
        when these messages have been written out (this replaces the batch it
        told of before)."""
        if not messages:
            return
        if not self._call.enqueue([self._encode(m) for m in messages], timed=timed):
            await trio_asyncio.aio_as_trio(self._call.wait_for_room)()

    def written_at(self) -> float | None:
        """When (trio's clock) the last batch sent `timed` was written out to the
        stream, None while it still waits in the outbox (or none was sent timed).
        A busy controller queues for seconds before it writes: what the other end
        owes for a message counts from here, not from `send_batch`."""
        return self._call.timed_at

    @property
    def unread(self) -> int:
        """Messages that arrived and wait for `receive_batch`."""
        return self._call.inbox.waiting

    @property
    def received(self) -> tuple[int, int]:
        """Messages and protobuf bytes received on this stream so far."""
        return self._call.messages_received, self._call.bytes_received

    def close(self, reason: str) -> None:
        """End the stream; returns at once, the RPC ends in the background
        (`wait_closed` to wait). Idempotent."""
        self._call.request_close(reason)

    async def wait_closed(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await trio_asyncio.aio_as_trio(self._call.finished.wait)()

    @property
    def closed(self) -> bool:
        return self._call.stop.is_set()


@attrs.frozen(slots=True)
class PeerInfo:
    """Where a stream came from, for logs and status."""

    address: str
    client_cert_subject: str | None = None


class NodeStream(BatchStream[wire.NodeMessage, wire.ControllerMessage]):
    """A daemon's stream as the controller sees it, after authentication and Hello.

    What it sends is serialized by the server's one `PushEncoder` (each Peer
    once for all streams), handed to grpclib as bytes (`_PreEncodedCodec`)
    and queued for the stream's writer (see the module docstring).
    """

    def __init__(self, call: _ServerCall, hello: wire.Hello, identity: Identity,
                 peer: PeerInfo, encoder: PushEncoder) -> None:
        super().__init__(call, encoder.encode_for_stream)
        self.hello = hello
        self.identity = identity
        self.peer = peer

    @property
    def node_name(self) -> str:
        return self.hello.node_name

    def __repr__(self) -> str:
        return f"NodeStream({self.node_name!r} from {self.peer.address})"


ControllerStream = BatchStream[wire.ControllerMessage, wire.NodeMessage]


# --- server --------------------------------------------------------------------------------


def _bearer_token(metadata: Any) -> str | None:
    value = metadata.get("authorization") if metadata is not None else None
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _peer_info(stream: Any) -> PeerInfo:
    peer = stream.peer
    addr = peer.addr()
    address = f"{addr[0]}:{addr[1]}" if addr else "?"
    subject = None
    cert = peer.cert()
    if cert:
        subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    return PeerInfo(address, subject)


class _PreEncodedCodec(ProtoCodec):
    """grpclib's protobuf codec that also takes a message already serialized
    (bytes from `PushEncoder`) and sends it as it is."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)


class _MeshService(mesh_grpc.MeshBase):
    """The grpclib handler; runs on asyncio, one task per stream."""

    def __init__(self, authenticator: Admission,
                 new_streams: trio.MemorySendChannel[NodeStream],
                 redirect_to: str | None,
                 refused: Callable[[str], None]) -> None:
        self._authenticator = authenticator
        self._new_streams = new_streams
        self.redirect_to = redirect_to
        self._refused = refused
        self.live: set[_ServerCall] = set()
        self.encoder = PushEncoder()

    async def Connect(self, stream: Any) -> None:
        peer = _peer_info(stream)
        _limit_messages(stream, CONTROLLER_MESSAGE_LIMIT)
        if self.redirect_to is not None:
            redirect = wire.Redirect(self.redirect_to)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await stream.send_message(codec.encode_controller_message(redirect))
                await stream.send_trailing_metadata()
            return
        identity = await self._authenticate(stream, peer)
        hello = await self._receive_hello(stream)
        if hello.node_name != identity.node_name:
            reason = (f"the token speaks for node {identity.node_name!r}, "
                      f"the Hello for {hello.node_name!r}")
            log.warning("refused a mesh stream from %s: %s", peer.address, reason)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await stream.send_message(codec.encode_controller_message(wire.Refused(reason)))
            raise GRPCError(Status.PERMISSION_DENIED, reason)
        call = _ServerCall(stream, codec.decode_node_message, CONTROLLER_MESSAGE_LIMIT)
        node_stream = NodeStream(call, hello, identity, peer, self.encoder)
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT):
                await trio_asyncio.trio_as_aio(self._new_streams.send)(node_stream)
        except TimeoutError:
            raise GRPCError(Status.UNAVAILABLE, "the controller is not taking streams") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise GRPCError(Status.UNAVAILABLE, "the controller is shutting down") from None
        log.info("mesh stream from node %s at %s", hello.node_name, peer.address)
        self.live.add(call)
        try:
            await call.serve()
        finally:
            self.live.discard(call)
            if call.too_large is not None:
                self._refused(REFUSED_TOO_LARGE)

    async def _authenticate(self, stream: Any, peer: PeerInfo) -> Identity:
        token = _bearer_token(stream.metadata)
        if token is None:
            log.warning("refused a mesh stream from %s: no bearer token", peer.address)
            raise GRPCError(Status.UNAUTHENTICATED, "no bearer token in the request metadata")
        try:
            async with asyncio.timeout(AUTH_TIMEOUT):
                # Fair by address (vpblu.stream.admission), not by port.
                source = peer.address.rsplit(":", 1)[0]
                return await trio_asyncio.trio_as_aio(  # type: ignore[no-any-return]
                    partial(self._authenticator.authenticate, token, source=source))()
        except AuthenticationFailed as exc:
            log.warning("refused a mesh stream from %s: %s", peer.address, exc)
            raise GRPCError(Status.UNAUTHENTICATED, f"token refused: {exc}") from None
        except AdmissionRefused as exc:
            self._refused(REFUSED_ADMISSION)
            raise GRPCError(Status.UNAVAILABLE, str(exc)) from None
        except TimeoutError:
            raise GRPCError(Status.UNAVAILABLE, "authentication timed out") from None
        except GRPCError:
            raise
        except Exception as exc:
            log.warning("cannot authenticate a mesh stream from %s: %r", peer.address, exc)
            raise GRPCError(Status.UNAVAILABLE, "cannot check the token now") from None

    async def _receive_hello(self, stream: Any) -> wire.Hello:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await stream.recv_message()
        except TimeoutError:
            raise GRPCError(
                Status.DEADLINE_EXCEEDED, f"no Hello within {HELLO_TIMEOUT} s") from None
        except MessageTooLarge as exc:
            log.warning("refused a mesh stream: its Hello: %s", exc)
            self._refused(REFUSED_TOO_LARGE)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await stream.send_trailing_metadata(
                        status=Status.RESOURCE_EXHAUSTED, status_message=str(exc))
            _close_connection(stream)
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        if first is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "the stream ended before a Hello")
        try:
            hello = codec.decode_node_message(first)
        except ProtocolViolation as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        if not isinstance(hello, wire.Hello):
            raise GRPCError(Status.INVALID_ARGUMENT, "the first message must be a Hello")
        return hello


REFUSED_TOO_LARGE = "message_too_large"
REFUSED_ADMISSION = "admission_queue_full"


@attrs.frozen(slots=True)
class MeshServerStatistics:
    refused: dict[str, int]  # streams refused or cut by a limit, by REFUSED_* reason
    live: int  # streams being served
    admission: AdmissionStatistics
    # Protobuf bytes of what the streams were handed to send, by kind (sync,
    # delta, other), since the server was made.
    pushed_bytes: dict[str, int] = attrs.field(factory=dict)


class _MeshServerProtocol(_MeshProtocol):
    max_streams = MAX_STREAMS_PER_CONNECTION


class _MeshGrpcServer(Server):
    """grpclib's Server whose connections speak `_MeshServerProtocol`."""

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()  # registers the connection's handler
        return _MeshServerProtocol(plain.handler, plain.config, plain.h2_config)


class _MeshChannel(Channel):
    """grpclib's Channel whose connection speaks `_MeshProtocol`."""

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return _MeshProtocol(plain.handler, plain.config, plain.h2_config)


class MeshServer:
    """The controller's Mesh gRPC server, run as a trio task.

    Every authenticated stream whose Hello matches its token's node arrives
    on `new_streams` as a `NodeStream`. With `redirect_to` (a follower), every
    stream is answered with one Redirect to that address and ended.
    """

    def __init__(self, *, host: str, port: int, tls: ServerTLS, authenticator: Authenticator,
                 new_streams: trio.MemorySendChannel[NodeStream],
                 redirect_to: str | None = None,
                 listen_socket: socket.socket | None = None,
                 cert_reload_interval: float = CERT_RELOAD_INTERVAL,
                 on_refused: Callable[[str], None] | None = None) -> None:
        # `listen_socket`: a bound, listening TCP socket to serve on instead of
        # binding host:port here (made in another network namespace, say); the
        # server owns it from now on.
        self._listen_socket = listen_socket
        self._cert_reload_interval = cert_reload_interval
        self._host = host
        self._port = port
        self._tls = tls
        # `on_refused(reason)`: a stream was refused or cut by a limit (a
        # metric); `statistics()` keeps the same counts.
        self._on_refused = on_refused
        self._refusals: dict[str, int] = {}
        self.admission = authenticator if isinstance(authenticator, Admission) \
            else Admission(authenticator)
        self._service = _MeshService(self.admission, new_streams, redirect_to, self._refused)
        self._bound_port: int | None = None

    def _refused(self, reason: str) -> None:
        self._refusals[reason] = self._refusals.get(reason, 0) + 1
        if self._on_refused is not None:
            self._on_refused(reason)

    def statistics(self) -> MeshServerStatistics:
        return MeshServerStatistics(dict(self._refusals), len(self._service.live),
                                    self.admission.statistics(),
                                    dict(self._service.encoder.encoded_bytes))

    def redirect_to(self, leader: str | None) -> None:
        """From now on answer new streams with a Redirect to `leader` (this
        replica follows), or, with None, hand them to `new_streams` (it leads).
        Streams already handed over are not touched."""
        self._service.redirect_to = leader

    serving = False  # it accepts streams now (the controller's readiness)

    @property
    def port(self) -> int:
        """The port it listens on (useful with port 0); only once started."""
        if self._bound_port is None:
            raise RuntimeError("the Mesh server is not started")
        return self._bound_port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = server_ssl_context(self._tls)
        if self._listen_socket is not None:
            sock = self._listen_socket
        else:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket.create_server((self._host, self._port), family=family)
        try:
            self._bound_port = sock.getsockname()[1]
            server = await trio_asyncio.aio_as_trio(self._start)(sock, ctx)
        except BaseException:
            sock.close()
            raise
        try:
            self.serving = True
            task_status.started()
            await self._reload_certificate(ctx)
        finally:
            self.serving = False
            with trio.CancelScope(shield=True), trio.move_on_after(SERVER_STOP_TIMEOUT):
                await trio_asyncio.aio_as_trio(self._stop)(server)

    async def _reload_certificate(self, ctx: ssl.SSLContext) -> None:
        """Serve new connections with the certificate files' current content.

        `vpblu certs` (or cert-manager) renews the serving certificate in its
        Secret and kubelet swaps the mounted files; loading them into the live
        context changes what every later handshake presents, while streams
        already open keep theirs - no restart, no daemon reconnects. A pair
        that does not load (a key not matching its certificate) is reported
        and the certificate in use is kept until the files load."""
        paths = (self._tls.cert, self._tls.key)

        def read() -> tuple[bytes, ...]:
            return tuple(p.read_bytes() for p in paths)

        loaded = await trio.to_thread.run_sync(read)
        while True:
            await trio.sleep(self._cert_reload_interval)
            try:
                current = await trio.to_thread.run_sync(read)
                if current == loaded:
                    continue
                # A pair that does not load can leave a context without its
                # certificate: try it on a throwaway context first. The
                # asyncio side runs on this thread too: no handshake reads the
                # live context while it changes.
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*paths)
                ctx.load_cert_chain(*paths)
            except (OSError, ssl.SSLError) as exc:
                log.warning("serving certificate %s not reloaded, keeping the one in use: %s",
                            self._tls.cert, exc)
                continue
            loaded = current
            log.info("serving certificate reloaded from %s", self._tls.cert)

    async def _start(self, sock: socket.socket, ctx: ssl.SSLContext) -> Server:
        # grpclib's Server binds the running asyncio loop when it is made.
        server = _MeshGrpcServer([self._service], codec=_PreEncodedCodec(), config=Configuration(
            http2_connection_window_size=SERVER_WINDOW, http2_stream_window_size=SERVER_WINDOW))
        await server.start(sock=sock, ssl=ctx, backlog=LISTEN_BACKLOG)
        return server

    async def _stop(self, server: Server) -> None:
        # End every stream with its trailers first, so daemons reconnect at
        # once and get the messages already sent; whatever is still
        # handshaking is reset by server.close().
        calls = list(self._service.live)
        for call in calls:
            call.request_close("the controller is shutting down")
        if calls:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    for call in calls:
                        await call.finished.wait()
        server.close()
        await server.wait_closed()


# --- client ----------------------------------------------------------------------------------


@asynccontextmanager
async def open_mesh_stream(address: str, tls: ClientTLS, token: str,
                           hello: wire.Hello) -> AsyncIterator[ControllerStream]:
    """The daemon's end of the warm stream, Hello already sent.

    Raises `ConnectFailed` if the controller cannot be reached or its
    certificate does not verify. A refusal (bad token, wrong node) and a
    Redirect arrive through the stream: a `Refused`/`Redirect` message and
    then `StreamClosed` from `receive_batch`. Leaving the block resets the
    stream and closes the connection.
    """
    host, port = split_address(address)
    try:
        call = await trio_asyncio.aio_as_trio(_ClientCall.open)(
            host, port, tls, token, codec.encode_node_message(hello))
    except (OSError, TimeoutError, GRPCError) as exc:
        raise ConnectFailed(f"cannot open a mesh stream to {address}: {exc!r}") from None
    stream = ControllerStream(call, codec.encode_node_message)
    try:
        yield stream
    finally:
        call.request_close("the daemon closed the stream")
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await trio_asyncio.aio_as_trio(call.shutdown)()
