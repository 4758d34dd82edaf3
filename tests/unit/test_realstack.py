"""The real-stack scenario's own reading of a daemon's log and its table (the
scenario itself runs in `python -m vpblu.bench --real-stack 3,10`)."""

from __future__ import annotations

import datetime
from pathlib import Path

from vpblu.lab.realstack import Calibration, RealRun, RealSample, _daemon_timeline, table


def test_the_timeline_is_read_from_the_log_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    old = "2026-11-27 09:00:00,000 INFO vpblu.node.stream: mesh stream to 10.0.0.1:7443 open\n"
    log.write_text(old + (
        "2026-11-27 09:00:10,250 INFO vpblu.node.daemon: node n3: key /s/key (public x)\n"
        "2026-11-27 09:00:10,300 INFO vpblu.node.stream: mesh stream to 10.0.0.1:7443 open\n"))
    wall = datetime.datetime(2026, 11, 27, 9, 0, 10).timestamp()
    first, hello = _daemon_timeline(log, len(old), wall)
    assert first is not None and abs(first - 0.25) < 1e-6
    assert hello is not None and abs(hello - 0.3) < 1e-6
    assert _daemon_timeline(tmp_path / "absent.log", 0, wall) == (None, None)


def test_the_table_carries_the_calibration_and_the_hello_share() -> None:
    cal = Calibration(0.05, 0.1, "Some CPU", 2, (1.0, 1.0, 1.0), "3.11.7")
    run = RealRun(3, (RealSample(3, "new-machine", 0.8, 0.2, 0.15),
                      RealSample(3, "rejoin", 0.05), RealSample(3, "leave", 0.04)),
                  probes=2, datagrams_sent=1000, datagrams_missing=0, send_errors=0)
    text = table([run], cal)
    assert "fixed loop 50.0 ms of CPU in 100.0 ms" in text
    assert "Some CPU x2" in text
    assert "25% (200 ms)" in text
    assert "0 of 1000 datagrams missing" in text


def test_a_hello_a_follower_only_redirected_does_not_count(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(
        "2026-11-27 09:00:10,250 INFO vpblu.node.daemon: node n3: key /s/key (public x)\n"
        "2026-11-27 09:00:10,300 INFO vpblu.node.stream: mesh stream to 10.0.0.1:7443 open\n"
        "2026-11-27 09:00:10,310 INFO vpblu.node.daemon: kernel actors start 0.06 s after the "
        "daemon (the Hello is out)\n"
        "2026-11-27 09:00:11,200 INFO vpblu.node.stream: controller at 10.0.0.1:7443 is a "
        "follower; the leader is 10.0.0.1:7444\n"
        "2026-11-27 09:00:11,700 INFO vpblu.node.stream: mesh stream to 10.0.0.1:7444 open\n")
    wall = datetime.datetime(2026, 11, 27, 9, 0, 10).timestamp()
    first, hello = _daemon_timeline(log, 0, wall)
    assert first is not None and abs(first - 0.25) < 1e-6
    assert hello is not None and abs(hello - 1.7) < 1e-6
