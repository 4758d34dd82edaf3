"""What handing one encoded batch from trio to asyncio costs, per session.

`python bench/push_crossing.py [sessions] [runs]`: `sessions` (default 1000)
batches of one message each go from trio to an asyncio writer, (a) the way
`BatchStream.send_batch` did until it had an outbox: one `aio_as_trio` call
per batch that returns when the write is done, and (b) the way it does now:
append to the stream's outbox and wake its asyncio writer, no waiting. The
"write" itself is a no-op, so this is the crossing alone. Median of `runs`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import deque

import trio
import trio.lowlevel
import trio_asyncio

PAYLOAD = b"x" * 64


async def write(sink: list[bytes], batch: list[bytes]) -> None:
    sink.extend(batch)


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    async with trio_asyncio.open_loop():
        awaited, queued = [], []
        for _ in range(runs):
            sink: list[bytes] = []
            start = time.perf_counter()
            for _ in range(n):
                await trio_asyncio.aio_as_trio(write)(sink, [PAYLOAD])
            awaited.append(time.perf_counter() - start)

            outboxes = [deque[bytes]() for _ in range(n)]
            ready = asyncio.Event()
            drained = trio.Event()

            async def writer(outboxes: list[deque[bytes]] = outboxes, sink: list[bytes] = sink,
                             ready: asyncio.Event = ready, drained: trio.Event = drained) -> None:
                await ready.wait()
                for outbox in outboxes:
                    while outbox:
                        await write(sink, [outbox.popleft()])
                drained.set()

            task = asyncio.get_running_loop().create_task(writer())
            await trio.lowlevel.checkpoint()
            start = time.perf_counter()
            for outbox in outboxes:
                outbox.append(PAYLOAD)
                ready.set()
            await drained.wait()
            queued.append(time.perf_counter() - start)
            await trio_asyncio.aio_as_trio(asyncio.wait_for)(task, 1)
        a, q = statistics.median(awaited) * 1000, statistics.median(queued) * 1000
        print(f"{n} sessions x one batch: awaited crossing {a:.2f} ms, "
              f"outbox + wake-up {q:.2f} ms ({a / q:.0f}x)")


if __name__ == "__main__":
    trio.run(main)
