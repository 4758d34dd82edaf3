"""The read buffer asyncio gives every TLS connection, sized for a controller
holding a thousand of them.

Owns one process-wide setting: `asyncio.sslproto.SSLProtocol.max_size`. Python
3.11's asyncio TLS protocol allocates, per connection, a read buffer of that
many bytes (256 KiB by default), zero-filled at once and so resident whether
or not anything large ever arrives. A controller with one warm stream per
node paid 1000 x 256 KiB = 250 MiB of RSS for it at N=1000 (measured with
the benchmark's peak RSS). A TLS record carries at most 16 KiB, so a 32 KiB
buffer still takes two records per read; a large SyncState costs a few more
read calls, nothing else. It only changes how much one read may return,
never what arrives.

Must be called before the connections it should cover are made (it changes
the class attribute each new connection reads), and must never be set below
one TLS record.
"""

from __future__ import annotations

import asyncio.sslproto

TLS_READ_BUFFER = 32 * 1024
TLS_RECORD_MAX = 16 * 1024 + 2048  # a record's plaintext plus the most overhead


def shrink_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Every TLS connection made from now on in this process reads into `size` bytes."""
    if size < TLS_RECORD_MAX:
        raise ValueError(f"a TLS read buffer of {size} bytes is below one record")
    asyncio.sslproto.SSLProtocol.max_size = size
