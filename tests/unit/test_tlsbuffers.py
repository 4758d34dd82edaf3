"""The controller's TLS read buffers: one per connection, 32 KiB instead of 256 KiB."""

from __future__ import annotations

import asyncio.sslproto

import pytest

from vpblu.stream.tlsbuffers import TLS_READ_BUFFER, shrink_tls_read_buffers


def test_new_tls_connections_read_into_the_smaller_buffer() -> None:
    before = asyncio.sslproto.SSLProtocol.max_size
    try:
        shrink_tls_read_buffers()
        # Each new SSLProtocol allocates a buffer of this size (and the socket
        # transport reads at most this much into it).
        assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER < before
        with pytest.raises(ValueError, match="below one record"):
            shrink_tls_read_buffers(4096)
    finally:
        asyncio.sslproto.SSLProtocol.max_size = before
