"""The daemon's reconnect decisions (vpblu.node.stream.reconnect_plan): a
stream the controller ended cleanly is followed at once, to the same
controller; everything else, and a clean end again soon after, backs off."""

from __future__ import annotations

import random

import pytest

from vpblu.node.stream import (
    CLOSED_RECONNECT_JITTER,
    RECONNECT_INITIAL,
    RECONNECT_JITTER,
    RECONNECT_MAX,
    ended_cleanly,
    reconnect_plan,
)
from vpblu.stream.transport import ConnectFailed, StreamClosed
from vpblu.supervisor import Backoff

BACKOFF = Backoff(RECONNECT_INITIAL, RECONNECT_MAX, RECONNECT_JITTER)


def test_a_clean_end_is_told_from_failures() -> None:
    assert ended_cleanly(StreamClosed("the controller closed the stream: its Node was "
                                      "deleted or replaced", status="OK"))
    assert ended_cleanly(StreamClosed("the controller ended the stream", status="OK"))
    assert not ended_cleanly(StreamClosed("the controller refused this daemon: bad token"))
    assert not ended_cleanly(StreamClosed("refused: too large", status="RESOURCE_EXHAUSTED"))
    assert not ended_cleanly(StreamClosed("stream broken: reset"))
    assert not ended_cleanly(ConnectFailed("cannot open a mesh stream to x:1: refused"))


@pytest.mark.parametrize("seed", range(50))
def test_the_first_reconnect_after_a_clean_end_is_prompt_and_to_the_same_controller(
        seed: int) -> None:
    random.seed(seed)
    delay, same = reconnect_plan(1, clean=True, backoff=BACKOFF)
    assert same
    assert 0 <= delay <= CLOSED_RECONNECT_JITTER


@pytest.mark.parametrize("seed", range(50))
def test_failures_and_repeated_clean_ends_back_off_to_the_next_controller(seed: int) -> None:
    random.seed(seed)
    # A failure, even the first, backs off as before (RECONNECT_INITIAL + jitter).
    delay, same = reconnect_plan(1, clean=False, backoff=BACKOFF)
    assert not same
    assert RECONNECT_INITIAL <= delay <= RECONNECT_INITIAL + RECONNECT_JITTER
    # A clean end that follows another end within STABLE_AFTER is a repeat:
    # the backoff grows (a controller that accepts and closes at once must
    # not make daemons spin).
    for attempt in range(2, 12):
        delay, same = reconnect_plan(attempt, clean=True, backoff=BACKOFF)
        assert not same
        floor = min(RECONNECT_MAX, RECONNECT_INITIAL * 2 ** (attempt - 1))
        assert floor <= delay <= RECONNECT_MAX
