"""The mesh connections' silence limit is a per-process setting with a floor."""

import pytest

from vpblu.cli import build_parser
from vpblu.stream import transport


def test_the_silence_limit_must_exceed_the_ping_interval() -> None:
    before = transport._silence_limit
    try:
        transport.set_keepalive_timeout(40.0)
        assert transport._silence_limit == 40.0
        with pytest.raises(ValueError, match="between PINGs"):
            transport.set_keepalive_timeout(transport.KEEPALIVE_INTERVAL)
        assert transport._silence_limit == 40.0
    finally:
        transport.set_keepalive_timeout(before)


def test_both_commands_take_the_flag_with_the_production_default() -> None:
    parser = build_parser()
    controller = parser.parse_args([
        "controller", "--listen", "127.0.0.1:7443", "--advertise", "127.0.0.1:7443",
        "--tls-cert", "c.crt", "--tls-key", "c.key"])
    assert controller.keepalive_timeout == transport.KEEPALIVE_TIMEOUT
    daemon = parser.parse_args(["daemon", "run", "--ca", "ca.crt", "--keepalive-timeout", "30"])
    assert daemon.keepalive_timeout == 30.0
