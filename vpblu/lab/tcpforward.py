"""A TCP forwarder: `python -m vpblu.lab.tcpforward LISTEN_IP:PORT TARGET_IP:PORT`.

The local cluster's API server listens on 127.0.0.1 of the root network
namespace only (vpblu.lab.testenv must never listen elsewhere), which a node's
namespace cannot reach. LocalCluster runs one of these in the root namespace on
the address its controllers use (the root end of the underlay, reachable from
every node and from nothing outside the cluster's namespaces), so the
processes a node runs (kube-proxy) reach the API server as they would on a
real node. The bytes pass through untouched: TLS is end to end between the
client and the API server.

Owns its listening socket and one pair of sockets per connection; nothing
else. Runs until SIGTERM/SIGINT (or its parent's death: LocalCluster spawns it
with PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

CHUNK = 65536


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not an IP:PORT: {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    print(f"forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m vpblu.lab.tcpforward LISTEN_IP:PORT TARGET_IP:PORT",
              file=sys.stderr)
        return 2
    asyncio.run(_serve(_address(args[0]), _address(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
