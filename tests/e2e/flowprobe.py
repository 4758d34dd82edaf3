"""A pod's traffic for loss accounting: sequence-numbered UDP and a checked TCP stream.

Run inside a network namespace (``ip netns exec NS python flowprobe.py ...``). It owns
nothing but its sockets. Every socket carries SO_MARK so the kernel steers it by fwmark
into the mesh table, as the eBPF classifier would mark a pod's packets.

Modes (each runs until stopped, then drains for ``--grace`` seconds and prints its result
as the last line on stdout, one JSON object):

``udp``        send ``--rate`` datagrams/s to ``--peer``:``--port`` from ``--bind``:``--port``
               and count what arrives from the peer. Datagram = seq (u64) + send time (f64).
``tcp-server`` accept one connection on ``--bind``:``--port`` and check that the bytes are
               the expected counter pattern; report bytes, the longest stall, any error.
``tcp-client`` connect to ``--peer``:``--port`` and stream the pattern at ``--rate`` KiB/s
               (``--bytes`` N: stop by itself once N bytes are sent).

Before the result a probe says where it is, one word a line, so a test waits on a
condition rather than a guess: ``ready`` once its socket is bound (udp), listening
(tcp-server) or connected (tcp-client); ``receiving`` when the first datagram or byte
arrives (udp, tcp-server).

A stop is SIGTERM or SIGINT, EOF on stdin with ``--control-stdin`` (the test closed the
pipe, or died), or ``--max-seconds`` (a probe nobody stops still ends). With
``--control-stdin`` a udp probe also sends nothing before the line ``start`` arrives on
stdin: the test says it once both ends are ready, so the first datagrams never meet a
closed port (without it the probe waits ``--start-delay`` and hopes).

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
# The longest the probe goes without looking at its stop flag.
SLICE = 0.05
# A send blocked this long is an error (the sendall timeout the client had before).
SEND_STALL = 10.0
READY = "ready"
RECEIVING = "receiving"
START = "start"


def pattern(offset: int, length: int) -> bytes:
    """The byte at stream position n is n mod 251 (a prime, so blocks never align)."""
    return bytes((offset + i) % 251 for i in range(length))


def say(word: str) -> None:
    print(word, flush=True)


class Stop:
    """Stop and start requests, as flags the main thread polls every SLICE at most.

    The signal handler only stores a bool. It used to set a threading.Event: the handler
    runs in the main thread between two bytecodes, possibly while that thread is inside
    Event.wait() holding the Event's non-reentrant lock, and set() then blocks on that
    lock forever; the probe ignored every later SIGTERM and the test waited for it.
    """

    def __init__(self, control_stdin: bool, max_seconds: float) -> None:
        self.requested = False
        self.controlled = control_stdin
        self.start_requested = False
        self.deadline = time.monotonic() + max_seconds
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if control_stdin:
            threading.Thread(target=self._read_stdin, daemon=True).start()

    def _on_signal(self, *_: object) -> None:
        self.requested = True  # a plain store: no lock, nothing that can block

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip() == START:
                self.start_requested = True
        self.requested = True  # EOF: the test closed the pipe, or is gone

    def is_set(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.requested = True
        return self.requested

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as a stop was requested."""
        end = time.monotonic() + seconds
        while not self.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, SLICE))
        return True

    def wait_start(self, fallback_delay: float) -> None:
        """Until `start` arrives (--control-stdin) or `fallback_delay` passed, or a stop."""
        if not self.controlled:
            self.wait(fallback_delay)
            return
        while not self.start_requested and not self.wait(SLICE):
            pass


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
            if not seen:
                say(RECEIVING)
            if seq in seen:
                duplicates += 1
            seen.add(seq)
            arrivals.append((seq, time.monotonic()))

    say(READY)  # before the receiver runs: it is the only other thread that prints
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    # Both ends bind before either sends, or the first datagrams meet a closed port.
    stop.wait_start(args.start_delay)
    interval = 1.0 / args.rate
    start = time.monotonic()
    sent = 0
    send_errors = 0
    first_send_wall = 0.0
    while not stop.is_set():
        due = start + sent * interval
        delay = due - time.monotonic()
        if delay > 0:
            stop.wait(delay)
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
    say(READY)
    listener.settimeout(0.2)
    conn = None
    while conn is None and not stop.is_set():
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
        if stop.is_set() and stopping_at is None:
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
        if received == 0:
            say(RECEIVING)
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
    say(READY)
    # Short sends counted to the byte, so a stop is seen within SLICE even while the
    # tunnel is down and the send buffer full (sendall with a 10 s timeout ignored it).
    sock.settimeout(SLICE)
    sent = 0
    error = ""
    stalled_since: float | None = None
    interval = PATTERN_BLOCK / (args.rate * 1024)
    start = time.monotonic()
    while not stop.is_set() and not (args.bytes and sent >= args.bytes):
        due = start + (sent // PATTERN_BLOCK) * interval
        delay = due - time.monotonic()
        if delay > 0:
            stop.wait(delay)
            continue
        length = PATTERN_BLOCK - sent % PATTERN_BLOCK
        if args.bytes:
            length = min(length, args.bytes - sent)
        try:
            sent += sock.send(pattern(sent, length))
            stalled_since = None
        except TimeoutError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > SEND_STALL:
                error = f"a send stalled for {SEND_STALL} s"
                break
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
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
    parser.add_argument("--control-stdin", action="store_true")
    parser.add_argument("--bytes", type=int, default=0)
    # No test runs a probe longer than this; one nobody stopped ends by itself.
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    stop = Stop(args.control_stdin, args.max_seconds)
    runner = {"udp": run_udp, "tcp-server": run_tcp_server, "tcp-client": run_tcp_client}
    result = runner[args.mode](args, stop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
