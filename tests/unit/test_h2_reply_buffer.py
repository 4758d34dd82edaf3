"""h2's outbound buffer grows linearly with the frames one read answers (issue 20).

A profile of the controller at N=1000 (bench/results/profile-20261127T160000Z.txt)
put 44 % of its main thread, while 1001 daemons connected, in h2's
`H2Connection._prepare_for_sending` under `receive_data`, and read it as a
quadratic `bytes +=`. The h2 this project locks (4.4.1) keeps that buffer in a
bytearray (amortized O(1) appends) and its FrameBuffer deletes parsed frames
from the front of a bytearray (O(1) in CPython): no patch is needed. This test
keeps it that way for any h2 the lock moves to: a read holding 8x as many
frames that each get a reply (PING -> PING ACK) must cost about 8x, not 64x.
The ratio of two CPU-time measurements of the same process is what is
compared, so the machine's speed and load cancel out.
"""

from __future__ import annotations

import time

import h2.config
import h2.connection
from hyperframe.frame import PingFrame

SMALL = 2000
FACTOR = 8
# Linear is FACTOR (cache effects add a little); quadratic would be FACTOR**2.
LINEAR_BOUND = 3 * FACTOR


def connected_server() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server


def answer_one_read(frames: int) -> tuple[float, int]:
    """CPU seconds for one read holding `frames` PINGs, and the reply's size."""
    server = connected_server()
    read = b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize()
                    for i in range(frames))
    started = time.thread_time()
    server.receive_data(read)
    reply = server.data_to_send()
    return time.thread_time() - started, len(reply)


def cost(frames: int) -> float:
    return min(answer_one_read(frames)[0] for _ in range(3))


def test_every_frame_of_one_read_is_answered() -> None:
    _, size = answer_one_read(100)
    assert size == 100 * (9 + 8)  # one PING ACK (header + 8 bytes) per PING


def test_a_read_of_many_frames_costs_linear_time() -> None:
    small, large = cost(SMALL), cost(SMALL * FACTOR)
    assert large < LINEAR_BOUND * max(small, 1e-4), (
        f"{SMALL} frames {small * 1000:.1f} ms, {SMALL * FACTOR} frames {large * 1000:.1f} ms:"
        f" {large / small:.1f}x for {FACTOR}x the frames")
