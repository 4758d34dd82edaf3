"""Warm-stream throughput and round trip over loopback gRPC with real TLS.

`python bench/transport_stream.py [messages] [runs]`: the controller sends
`messages` small Deltas (~64 bytes on the wire) pipelined in batches of 100,
the daemon receives them in whatever batches arrive; then 200 ping-pongs of
one Delta -> one Ack. Prints msgs/s per run, the median, and RTT p50/p99.
"""

from __future__ import annotations

import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio_asyncio

from vpblu.core import wire
from vpblu.core.model import PeerRemoved
from vpblu.lab.pki import CertAuthority
from vpblu.stream import codec
from vpblu.stream.identity import Identity
from vpblu.stream.transport import ClientTLS, MeshServer, NodeStream, ServerTLS, open_mesh_stream

BATCH = 100


def name(g: int) -> str:
    """A node name long enough that one Delta is ~64 bytes on the wire."""
    return f"worker-pool-b-{g:07d}.eu-west-3.cluster.example"
PINGS = 200


class BenchAuthenticator:
    async def authenticate(self, token: str) -> Identity:
        return Identity(token)


async def one_run(tls: ServerTLS, client: ClientTLS, n: int) -> tuple[float, list[float]]:
    send, receive = trio.open_memory_channel[NodeStream](0)
    server = MeshServer(host="127.0.0.1", port=0, tls=tls, authenticator=BenchAuthenticator(),
                        new_streams=send)
    hello = wire.Hello("bench-node", base64.b64encode(bytes(32)).decode())
    deltas = [wire.Delta(g + 1, g, [PeerRemoved(name(g))]) for g in range(n)]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_mesh_stream(f"127.0.0.1:{server.port}", client, "bench-node",
                                    hello) as daemon:
            controller = await receive.receive()
            got = 0
            start = time.perf_counter()
            async with trio.open_nursery() as inner:
                async def sender() -> None:
                    for i in range(0, n, BATCH):
                        await controller.send_batch(deltas[i:i + BATCH])
                inner.start_soon(sender)
                while got < n:
                    got += len(await daemon.receive_batch())
            rate = n / (time.perf_counter() - start)
            rtts = []
            for g in range(PINGS):
                t0 = time.perf_counter()
                await controller.send_batch([deltas[g]])
                await daemon.receive_batch()
                await daemon.send_batch([wire.Ack(g + 1)])
                await controller.receive_batch()
                rtts.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    return rate, rtts


async def main(n: int, runs: int) -> None:
    size = len(codec.encode_controller_message(
        wire.Delta(12346, 12345, [PeerRemoved(name(12345))])).SerializeToString())
    with tempfile.TemporaryDirectory(prefix="vpblu-grpc-bench-") as tmp:
        d = Path(tmp)
        ca = CertAuthority.create("bench-ca")
        ca.write(d / "ca.pem")
        ca.issue("controller", ip_addresses=("127.0.0.1",), server=True).write(
            d / "s.pem", d / "s.key")
        tls, client = ServerTLS(d / "s.pem", d / "s.key"), ClientTLS(d / "ca.pem")
        rates, rtts = [], []
        async with trio_asyncio.open_loop():
            for _ in range(runs):
                rate, rtt = await one_run(tls, client, n)
                rates.append(rate)
                rtts.extend(rtt)
                print(f"run: {rate:,.0f} msg/s")
    rtts.sort()
    print(f"message ~{size} B protobuf; {n} msgs pipelined, median of {runs}: "
          f"{statistics.median(rates):,.0f} msg/s")
    print(f"round trip (Delta -> Ack, {len(rtts)} pings): p50 {rtts[len(rtts) // 2] * 1e3:.2f} ms,"
          f" p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.2f} ms")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    trio.run(main, *(args + [10000, 3][len(args):]))
