"""The MtuActor: the mesh interface's MTU, the TCP MSS clamp on the mesh path,
and the source NAT of the node's own packets into the mesh.

Owns the MTU of ``config.interface`` (underlay MTU - ``config.mtu_overhead``;
the underlay is ``config.underlay_interface`` or the device of the default
route), the iptables mangle rules, tagged with the comment ``vpblu``, that
clamp the MSS of TCP SYNs through the mesh interface to MTU - 40, and the nat
rule (same tag) that masquerades locally sourced packets leaving by the mesh
interface (see `vpblu.node.kernel.iptables.masquerade_spec`): every iptables
rule vpblu has. Re-checks
every `MTU_RECHECK_INTERVAL` and on `CheckMtu`.

Why: a pod's veth says 1500, WireGuard adds 60 to 80 bytes, and a full-size
encrypted frame that does not fit the underlay is dropped silently, while
pings and handshakes (small) still work. A smaller mesh MTU makes oversize
DF packets fail loudly (ICMP "fragmentation needed" / EMSGSIZE); the MSS
clamp makes TCP never try them.

The clamp matches ``<interface>+``, iptables' prefix wildcard, not the mesh
interface's exact name: during a key rotation the node's mesh routes move into
the transient bridge ``<interface>-rot`` (vpblu/node/rotation.py), which has
the mesh MTU too, and full-size TCP through it needs the same clamp; a rule
keyed on the bridge's own name would have to appear and vanish with every
rotation, while the wildcard is there before the bridge exists and covers it
from its first SYN. (It also covers the fail-closed sink ``<interface>-sink``,
which sends nothing anywhere.) Rules of an older daemon on the exact name are
replaced.

Must never: touch an iptables rule without the ``vpblu`` comment, add a rule
that is already there (``iptables -C`` first), or create the mesh interface
(the NetlinkActor owns its existence; missing, it is checked next time).
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from vpblu.messages import CheckMtu, MtuInbox, MtuStatus
from vpblu.node.config import DaemonConfig
from vpblu.node.kernel.iptables import ClampRule
from vpblu.node.rotation import DEFAULT_BRIDGE_SUFFIX

log = logging.getLogger(__name__)

MTU_RECHECK_INTERVAL = 30.0
# IPv4 20 + TCP 20 bytes of headers between the MTU and the MSS.
TCP_IPV4_HEADERS = 40
# iptables -i/-o: a name ending in "+" matches every interface with that prefix.
IPTABLES_PREFIX_WILDCARD = "+"


class MtuKernel(Protocol):
    async def underlay(self, configured: str | None) -> tuple[str, int]:
        """The underlay interface's name and MTU."""
        ...

    async def link_mtu(self, interface: str) -> int | None: ...

    async def set_link_mtu(self, interface: str, mtu: int) -> None: ...

    async def clamp_rules(self) -> tuple[tuple[ClampRule, str], ...]: ...

    async def ensure_clamp(self, rule: ClampRule) -> None: ...

    async def delete_clamp(self, line: str) -> None: ...

    async def ensure_masquerade(self, interface: str) -> None: ...

    async def delete_masquerade(self, interface: str) -> None: ...


class MtuActor:
    def __init__(
        self,
        config: DaemonConfig,
        kernel: MtuKernel,
        inbox: trio.MemoryReceiveChannel[MtuInbox],
        *,
        recheck_interval: float = MTU_RECHECK_INTERVAL,
    ) -> None:
        self._config = config
        self._kernel = kernel
        self._inbox = inbox
        self._recheck_interval = recheck_interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.check()
        task_status.started()
        async with self._inbox:
            while True:
                message: MtuInbox | None = None
                with trio.move_on_after(self._recheck_interval):
                    try:
                        message = await self._inbox.receive()
                    except trio.EndOfChannel:
                        return
                match message:
                    case None:
                        await self.check()
                    case CheckMtu(reply=reply):
                        await reply.send(await self.check())

    async def check(self) -> MtuStatus:
        """Bring the mesh MTU and the clamp rules to what the underlay asks for."""
        underlay, underlay_mtu = await self._kernel.underlay(self._config.underlay_interface)
        want_mtu = underlay_mtu - self._config.mtu_overhead
        iface = self._config.interface
        changed = False
        have_mtu = await self._kernel.link_mtu(iface)
        if have_mtu is None:
            log.info("%s does not exist yet; MTU and MSS clamp wait for it", iface)
            return MtuStatus(underlay, underlay_mtu, None, None, changed=False)
        if have_mtu != want_mtu:
            log.info(
                "%s: MTU %d -> %d (underlay %s MTU %d)",
                iface,
                have_mtu,
                want_mtu,
                underlay,
                underlay_mtu,
            )
            await self._kernel.set_link_mtu(iface, want_mtu)
            changed = True
        mss = want_mtu - TCP_IPV4_HEADERS
        wanted = {ClampRule(d, clamped_interfaces(iface), mss) for d in ("-o", "-i")}
        for rule, line in await self._kernel.clamp_rules():
            if rule.interface in _ours(iface) and rule not in wanted:
                await self._kernel.delete_clamp(line)
                changed = True
        for rule in sorted(wanted):
            await self._kernel.ensure_clamp(rule)
        await self._kernel.ensure_masquerade(iface)
        return MtuStatus(underlay, underlay_mtu, want_mtu, mss, changed)

    async def cleanup(self) -> None:
        """Remove this interface's clamp and source NAT rules. The MTU goes with
        the interface."""
        for rule, line in await self._kernel.clamp_rules():
            if rule.interface in _ours(self._config.interface):
                await self._kernel.delete_clamp(line)
        await self._kernel.delete_masquerade(self._config.interface)


def clamped_interfaces(interface: str) -> str:
    """The iptables interface match of the MSS clamp: the mesh interface and every
    interface named after it, the rotation bridge first of all."""
    return interface + IPTABLES_PREFIX_WILDCARD


def _ours(interface: str) -> frozenset[str]:
    # The exact names are what daemons before the wildcard wrote.
    return frozenset({clamped_interfaces(interface), interface,
                      interface + DEFAULT_BRIDGE_SUFFIX})
