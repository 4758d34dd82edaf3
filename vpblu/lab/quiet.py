"""Waiting for a measured process to be quiet before and after what is timed
(the benchmark's events, the telemetry scenario's formation)."""

from __future__ import annotations

from typing import Protocol

import trio


class Metered(Protocol):
    def cpu_seconds(self) -> float: ...


async def quiesce(process: Metered, *, window: float, share: float, limit: float) -> None:
    """Until `process` used at most `share` of a core over one `window` (or
    `limit` passed: daemons' heartbeats and lease renewals never stop
    entirely)."""
    with trio.move_on_after(limit):
        while True:
            cpu = process.cpu_seconds()
            await trio.sleep(window)
            if process.cpu_seconds() - cpu <= share * window:
                return
