"""Ctrl-C and SIGTERM for the benchmarks: cancel the run so that it cleans up in order.

Left to trio's default, the KeyboardInterrupt is raised in whatever code runs
when it comes - often trio-asyncio's loop, whose death leaves every asyncio
call waiting forever, and the run then hangs with its API servers, controller
processes and work directory still there. Instead a task takes the signal and
cancels the run's scope; the caller raises KeyboardInterrupt once everything
it started has been stopped.
"""

from __future__ import annotations

import signal
import sys

import trio


async def cancel_on_signal(scope: trio.CancelScope, *,
                           task_status: trio.TaskStatus[trio.Event]) -> None:
    """Start with `nursery.start`: returns an Event set once SIGINT or SIGTERM
    came, after which `scope` is cancelled."""
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started(interrupted)
        async for signo in signals:
            if not interrupted.is_set():
                print(f"\n{signal.Signals(signo).name}: stopping; cleaning up (nodes, controller,"
                      " API server)...", file=sys.stderr, flush=True)
                interrupted.set()
                scope.cancel()
