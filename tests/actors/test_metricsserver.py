"""MetricsServer over a real loopback socket (real time, not the autojump
clock): /metrics, the probes, and what it refuses."""

from __future__ import annotations

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from vpblu.metricsserver import MetricsServer


async def get(port: int, request: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_and_probes() -> None:
    registry = CollectorRegistry()
    Counter("vpblu_things", "things", registry=registry).inc(3)
    ready = [False]
    server = MetricsServer(registry, host="127.0.0.1", port=0,
                           ready=lambda: (ready[0], "ready" if ready[0] else "not yet"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        port = server.port
        status, body = await get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b"vpblu_things_total 3.0" in body
        assert await get(port, b"GET /healthz HTTP/1.1\r\n\r\n") == (200, b"ok\n")
        assert await get(port, b"GET /readyz HTTP/1.1\r\n\r\n") == (503, b"not yet\n")
        ready[0] = True
        assert await get(port, b"GET /readyz?verbose HTTP/1.0\r\n\r\n") == (200, b"ready\n")
        assert (await get(port, b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await get(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await get(port, b"nonsense\r\n\r\n"))[0] == 400
        nursery.cancel_scope.cancel()
    assert server.requests == 7


async def test_a_port_that_is_taken_is_retried_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    """A second replica on the same host, or any process on the port: the
    server says so and keeps trying; it never ends the process around it."""
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=port)
    with taken:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)  # started, although it cannot listen yet
            assert "cannot listen" in caplog.text
            taken.close()
            assert not server.listening.is_set()
            with trio.fail_after(10):
                await server.listening.wait()
            assert await get(port, b"GET /healthz HTTP/1.1\r\n\r\n") == (200, b"ok\n")
            nursery.cancel_scope.cancel()
