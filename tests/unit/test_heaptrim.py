"""The heap trimmer: when it asks glibc to give free heap back, and that the
real call does give back what a burst left behind."""

from __future__ import annotations

import attrs
import pytest
import trio

from vpblu.heaptrim import TRIM_MIN_FREE, Heap, HeapTrimmer


@attrs.define
class FakeHeap:
    """Free bytes as a test sets them; a trim releases what is free from RSS."""

    free: int = 0
    resident: int = 500 * 2**20
    trims: int = 0

    def heap(self) -> Heap:
        return Heap(lambda: self.free, self.trim)

    def trim(self) -> None:
        self.trims += 1
        self.resident -= self.free // 2  # some pages of the free chunks


def test_trims_only_when_enough_new_free_memory_lies_in_the_heap() -> None:
    fake = FakeHeap()
    trimmer = HeapTrimmer(fake.heap(), resident=lambda: fake.resident)
    fake.free = TRIM_MIN_FREE - 1
    assert not trimmer.trim_if_worth_it()
    fake.free = 100 * 2**20
    assert trimmer.trim_if_worth_it()
    assert trimmer.statistics().returned_bytes == 50 * 2**20
    # The same free chunks (their pages already released): no second trim.
    assert not trimmer.trim_if_worth_it()
    # Reused, then a new burst frees as much again: worth a trim.
    fake.free = 10 * 2**20
    assert not trimmer.trim_if_worth_it()
    fake.free = 10 * 2**20 + TRIM_MIN_FREE
    assert trimmer.trim_if_worth_it()
    assert fake.trims == trimmer.statistics().trims == 2


def test_without_the_calls_the_trimmer_only_waits() -> None:
    assert not HeapTrimmer(None).trim_if_worth_it()


async def test_runs_on_its_period(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeHeap(free=100 * 2**20)
    trimmer = HeapTrimmer(fake.heap(), period=60.0, resident=lambda: fake.resident)
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run)
        await trio.sleep(59)
        assert fake.trims == 0
        await trio.sleep(2)
        assert fake.trims == 1
        nursery.cancel_scope.cancel()


def test_glibc_gives_back_what_a_burst_of_buffers_left_free() -> None:
    """Real glibc: a burst of 64 KiB buffers, every other one kept, leaves
    free chunks between kept ones; the trim gives their pages back."""
    heap = Heap.of_libc()
    if heap is None:
        pytest.fail("this machine's C library is glibc (Debian): mallinfo2 and malloc_trim")
    trimmer = HeapTrimmer(heap)
    burst = [bytearray(48 * 1024) for _ in range(4000)]  # ~190 MiB, touched
    kept = burst[::2]
    del burst
    assert heap.free_bytes() >= 64 * 2**20
    assert trimmer.trim_if_worth_it()
    assert trimmer.statistics().returned_bytes >= 32 * 2**20
    del kept
