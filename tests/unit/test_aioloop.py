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
