"""The product's asyncio loop logs what asyncio libraries report to its
exception handler; trio-asyncio's own loop would end everything on it."""

import asyncio
import logging

import pytest
import trio
import trio_asyncio

from vpblu import aioloop


def _report_a_leak_then_work() -> int:
    async def main() -> int:
        async with aioloop.open_loop() as loop:
            loop.call_exception_handler({"message": "Unclosed connection: Channel(test)"})
            await trio.sleep(0.05)  # the strict loop raises in its nursery by now

            async def answer() -> int:
                await asyncio.sleep(0)
                return 42

            return await trio_asyncio.aio_as_trio(answer)()

    return trio.run(main)


def test_a_reported_leak_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert _report_a_leak_then_work() == 42
    assert "Unclosed connection: Channel(test)" in caplog.text


def test_the_strict_loop_would_have_ended_the_run() -> None:
    async def main() -> None:
        async with trio_asyncio.open_loop() as loop:
            loop.call_exception_handler({"message": "Unclosed connection: Channel(test)"})
            await trio.sleep(1)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main)
    assert caught.group_contains(RuntimeError, match="Unclosed connection", depth=None)


def test_cancelled_timers_leave_the_heap_and_the_live_ones_still_fire() -> None:
    """aiohttp re-arms a watch's sock_read timer (320 s) on every chunk: the
    cancelled ones must not pile up in trio-asyncio's heap until their time."""

    async def main() -> tuple[int, int, list[int], int]:
        async with aioloop.open_loop() as loop:
            fired: list[int] = []
            live = [loop.call_later(0.05 + i * 0.01, fired.append, i) for i in range(5)]
            dead = []
            for _ in range(10_000):
                dead.append(loop.call_later(320.0, fired.append, -1))
                await trio.lowlevel.checkpoint()  # the loop moves queued timers into its heap
                dead[-1].cancel()
            held = len(loop._timers)
            await trio.sleep(0.2)
            for handle in live:
                assert not handle.cancelled()
            return held, len(dead), fired, len(loop._timers)

    held, cancelled, fired, left = trio.run(main)
    assert cancelled == 10_000
    # At most half the heap (plus the 100 before a rebuild) is ever dead.
    assert held <= 2 * aioloop.MIN_CANCELLED_TO_PURGE + 5, held
    assert fired == [0, 1, 2, 3, 4]  # in order, each once; no cancelled one ran
    assert left <= aioloop.MIN_CANCELLED_TO_PURGE, left


def test_the_strict_loop_keeps_cancelled_timers_until_their_time() -> None:
    """What the purge is for: trio-asyncio's own loop holds every one."""

    async def main() -> int:
        async with trio_asyncio.open_loop() as loop:
            for _ in range(1000):
                handle = loop.call_later(320.0, lambda: None)
                await trio.lowlevel.checkpoint()
                handle.cancel()
            return len(loop._timers)

    assert trio.run(main) >= 990  # (the newest may still wait in the loop's queue)
