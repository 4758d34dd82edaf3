"""A pod's traffic for loss accounting: sequence-numbered UDP and a checked TCP stream.

Run inside a network namespace (``ip netns exec NS python flowprobe.py ...``). It owns
nothing but its sockets. Every socket carries SO_MARK so the kernel steers it by fwmark
into the mesh table, as the eBPF classifier would mark a pod's packets.

Modes (each runs until SIGTERM, then drains for ``--grace`` seconds and prints one JSON
line on stdout):

``udp``        send ``--rate`` datagrams/s to ``--peer``:``--port`` from ``--bind``:``--port``
               and count what arrives from the peer. Datagram = seq (u64) + send time (f64).
``tcp-server`` accept one connection on ``--bind``:``--port`` and check that the bytes are
               the expected counter pattern; report bytes, the longest stall, any error.
``tcp-client`` connect to ``--peer``:``--port`` and stream the pattern at ``--rate`` KiB/s.

ping is not precise enough for this (the kernel ticks at 250 Hz and ping slows during an
outage), which is why loss is counted by sequence numbers at a fixed send schedule.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
import time

SO_MARK = 36
DATAGRAM = struct.Struct("!Qd")
PATTERN_BLOCK = 1024


def pattern(offset: int, length: int) -> bytes:
    """The byte at stream position n is n mod 251 (a prime, so blocks never align)."""
    return bytes((offset + i) % 251 for i in range(length))


class Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, lambda *_: self.event.set())


def run_udp(args: argparse.Namespace, stop: Stop) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((args.bind, args.port))
    sock.settimeout(0.2)
    seen: set[int] = set()
    duplicates = 0
    arrivals: list[tuple[int, float]] = []
    done = threading.Event()

    def receive() -> None:
        nonlocal duplicates
        while not done.is_set():
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                continue
            seq, _sent_at = DATAGRAM.unpack_from(data)
            if seq in seen:
                duplicates += 1
            seen.add(seq)
            arrivals.append((seq, time.monotonic()))

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    # Both ends bind before either sends, or the first datagrams meet a closed port.
    stop.event.wait(args.start_delay)
    interval = 1.0 / args.rate
    start = time.monotonic()
    sent = 0
    send_errors = 0
    first_send_wall = 0.0
    while not stop.event.is_set():
        due = start + sent * interval
        delay = due - time.monotonic()
        if delay > 0:
            stop.event.wait(delay)
            continue
        if sent == 0:
            first_send_wall = time.time()
        try:
            sock.sendto(DATAGRAM.pack(sent, time.time()), (args.peer, args.port))
        except OSError:
            # ENOKEY ("Required key not available") when no peer holds the route: a loss.
            send_errors += 1
        sent += 1
    sending_time = time.monotonic() - start
    time.sleep(args.grace)
    done.set()
    receiver.join()
    top = max(seen) + 1 if seen else 0
    missing = [s for s in range(top) if s not in seen]
    return {
        "mode": "udp",
        "sent": sent,
        "send_errors": send_errors,
        "received": len(seen),
        "highest": top,
        "duplicates": duplicates,
        "missing": missing[:2000],
        "missing_count": len(missing),
        "duration": sending_time,
        # Datagram n left at first_send_wall + n / rate (wall clock, for
        # relating a loss to an API call made outside this process).
        "first_send_wall": first_send_wall,
        "rate": args.rate,
    }


def run_tcp_server(args: argparse.Namespace, stop: Stop) -> dict[str, object]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The listener's mark is what the SYN-ACK and the accepted socket carry.
    listener.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    listener.bind((args.bind, args.port))
    listener.listen(1)
    listener.settimeout(0.2)
    conn = None
    while conn is None and not stop.event.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
    if conn is None:
        return {"mode": "tcp-server", "error": "no connection", "bytes": 0}
    conn.settimeout(0.2)
    received = 0
    error = ""
    longest_stall = 0.0
    last = time.monotonic()
    stopping_at = None
    while True:
        if stop.event.is_set() and stopping_at is None:
            stopping_at = time.monotonic()
        if stopping_at is not None and time.monotonic() - stopping_at > args.grace:
            break
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            if stopping_at is None:
                longest_stall = max(longest_stall, time.monotonic() - last)
            continue
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        if not chunk:
            break
        now = time.monotonic()
        if stopping_at is None:
            longest_stall = max(longest_stall, now - last)
        last = now
        if chunk != pattern(received, len(chunk)):
            error = f"corrupt stream at byte {received}"
            break
        received += len(chunk)
    conn.close()
    return {"mode": "tcp-server", "bytes": received, "error": error, "longest_stall": longest_stall}


def run_tcp_client(args: argparse.Namespace, stop: Stop) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    sock.bind((args.bind, 0))
    sock.settimeout(10)
    sock.connect((args.peer, args.port))
    sent = 0
    error = ""
    interval = PATTERN_BLOCK / (args.rate * 1024)
    start = time.monotonic()
    while not stop.event.is_set():
        due = start + (sent // PATTERN_BLOCK) * interval
        delay = due - time.monotonic()
        if delay > 0:
            stop.event.wait(delay)
            continue
        try:
            sock.sendall(pattern(sent, PATTERN_BLOCK))
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        sent += PATTERN_BLOCK
    if not error:
        sock.shutdown(socket.SHUT_WR)
    sock.close()
    return {"mode": "tcp-client", "bytes": sent, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["udp", "tcp-server", "tcp-client"])
    parser.add_argument("--bind", required=True)
    parser.add_argument("--peer", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=250.0)
    parser.add_argument("--mark", type=lambda v: int(v, 0), default=0)
    parser.add_argument("--grace", type=float, default=1.5)
    parser.add_argument("--start-delay", type=float, default=0.5)
    args = parser.parse_args()
    stop = Stop()
    runner = {"udp": run_udp, "tcp-server": run_tcp_server, "tcp-client": run_tcp_client}
    result = runner[args.mode](args, stop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
