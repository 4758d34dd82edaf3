"""The MtuActor's MSS clamp covers the rotation bridge (issue 24), on a fake kernel:
the clamp's interface match is the mesh interface's prefix wildcard, so the
bridge `<interface>-rot` is clamped before it exists; the exact-name rules an
older daemon wrote are replaced, and cleanup removes both kinds."""

from __future__ import annotations

import attrs
import trio

from vpblu.messages import MtuInbox
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iptables import ClampRule
from vpblu.node.mtu import MtuActor
from vpblu.node.rotation import DEFAULT_BRIDGE_SUFFIX

IFACE = "wg-mesh"


@attrs.define
class FakeMtuKernel:
    """Links and iptables rules as plain sets; nothing reaches a kernel."""

    mtus: dict[str, int] = attrs.Factory(lambda: {IFACE: 1500})
    clamps: set[ClampRule] = attrs.Factory(set)
    masquerades: set[str] = attrs.Factory(set)

    async def underlay(self, configured: str | None) -> tuple[str, int]:
        return "eth0", 1500

    async def link_mtu(self, interface: str) -> int | None:
        return self.mtus.get(interface)

    async def set_link_mtu(self, interface: str, mtu: int) -> None:
        self.mtus[interface] = mtu

    async def clamp_rules(self) -> tuple[tuple[ClampRule, str], ...]:
        return tuple((r, repr(r)) for r in sorted(self.clamps))

    async def ensure_clamp(self, rule: ClampRule) -> None:
        self.clamps.add(rule)

    async def delete_clamp(self, line: str) -> None:
        self.clamps = {r for r in self.clamps if repr(r) != line}

    async def ensure_masquerade(self, interface: str) -> None:
        self.masquerades.add(interface)

    async def delete_masquerade(self, interface: str) -> None:
        self.masquerades.discard(interface)


def actor(kernel: FakeMtuKernel) -> MtuActor:
    _, receive = trio.open_memory_channel[MtuInbox](0)
    return MtuActor(DaemonConfig(node_name="a", interface=IFACE), kernel, receive)


def iptables_matches(pattern: str, interface: str) -> bool:
    """iptables' -i/-o semantics: a trailing '+' matches the prefix."""
    if pattern.endswith("+"):
        return interface.startswith(pattern[:-1])
    return interface == pattern


async def test_the_clamp_covers_the_rotation_bridge_before_it_exists() -> None:
    kernel = FakeMtuKernel()
    status = await actor(kernel).check()
    assert status.mss == 1500 - 80 - 40
    bridge = IFACE + DEFAULT_BRIDGE_SUFFIX
    for direction in ("-o", "-i"):
        rules = [r for r in kernel.clamps if r.direction == direction]
        assert len(rules) == 1, kernel.clamps
        assert iptables_matches(rules[0].interface, IFACE)
        assert iptables_matches(rules[0].interface, bridge), rules
        assert rules[0].mss == status.mss


async def test_an_older_daemons_exact_name_rules_are_replaced_and_cleanup_removes_all() -> None:
    kernel = FakeMtuKernel(clamps={ClampRule("-o", IFACE, 1380), ClampRule("-i", IFACE, 1380),
                                   ClampRule("-o", "other0", 1200)})
    mtu = actor(kernel)
    await mtu.check()
    assert {r.interface for r in kernel.clamps} == {IFACE + "+", "other0"}
    await mtu.check()  # nothing new the second time
    assert len(kernel.clamps) == 3
    await mtu.cleanup()
    assert kernel.clamps == {ClampRule("-o", "other0", 1200)}
