"""The span-based collapse answers what ipaddress.collapse_addresses does."""

import ipaddress
import random

from vpblu.core.model import collapse as model_collapse
from vpblu.core.spans import collapse


def _reference(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return [str(n) for n in [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]]


def test_random_sets_of_both_families_collapse_as_the_standard_library_does() -> None:
    rng = random.Random(5182)
    for _ in range(300):
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.7:
                plen = rng.randint(20, 30)
                addr = ipaddress.IPv4Address(0x0A000000 + rng.randrange(1 << 12) * 256)
                nets.append(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
            else:
                plen = rng.randint(56, 64)
                addr = ipaddress.IPv6Address((0xFD00 << 112) + (rng.randrange(1 << 10) << 64))
                nets.append(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
        assert [str(n) for n in collapse(nets)] == _reference(nets), nets


def test_the_model_collapse_is_the_span_collapse() -> None:
    assert model_collapse is collapse


def test_a_network_given_whole_comes_back_as_that_object() -> None:
    net = ipaddress.ip_network("10.1.0.0/16")
    inner = ipaddress.ip_network("10.1.2.0/24")
    assert collapse([inner, net])[0] is net
