"""The controller's TLS read buffers: one per connection, 8 KiB instead of 256 KiB."""

from __future__ import annotations

import asyncio.sslproto

import pytest

from vpblu.stream.tlsbuffers import TLS_READ_BUFFER, shrink_tls_read_buffers

ASYNCIO_DEFAULT = 256 * 1024  # SSLProtocol.max_size in CPython 3.11


def test_new_tls_connections_read_into_the_smaller_buffer() -> None:
    before = asyncio.sslproto.SSLProtocol.max_size
    try:
        # asyncio's own size: a controller started in this process by an
        # earlier test has shrunk it already (it is process-wide).
        asyncio.sslproto.SSLProtocol.max_size = ASYNCIO_DEFAULT
        shrink_tls_read_buffers()
        # Each new SSLProtocol allocates a buffer of this size (and the socket
        # transport reads at most this much into it).
        assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER < ASYNCIO_DEFAULT
        with pytest.raises(ValueError, match="is below"):
            shrink_tls_read_buffers(1024)
    finally:
        asyncio.sslproto.SSLProtocol.max_size = before
