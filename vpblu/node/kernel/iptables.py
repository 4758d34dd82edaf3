"""`MtuKernel` over pyroute2 (link MTUs) and the iptables command (the mangle
table's TCP MSS clamp), in the daemon's network namespace. Only the
MtuActor calls it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from typing import Any

import attrs
import trio

from vpblu.node.kernel.nsexec import command_prefix, run_in_netns
from vpblu.node.kernel.underlay import find_underlay

IPTABLES_LOCK_WAIT = "5"

RULE_COMMENT = "vpblu"

MANGLE_CHAIN = "FORWARD"

@attrs.frozen(slots=True, order=True)
class ClampRule:
    """SYNs going out of (``-o``) or coming in from (``-i``) `interface` get MSS `mss`."""

    direction: str  # "-o" | "-i"
    interface: str
    mss: int

    def spec(self) -> list[str]:
        return [
            MANGLE_CHAIN,
            self.direction,
            self.interface,
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,RST",
            "SYN",
            "-m",
            "comment",
            "--comment",
            RULE_COMMENT,
            "-j",
            "TCPMSS",
            "--set-mss",
            str(self.mss),
        ]

_SAVED_RULE = re.compile(r"^-A FORWARD (?P<dir>-[io]) (?P<iface>\S+) .*--set-mss (?P<mss>\d+)")

def parse_clamp_rules(saved: str) -> tuple[tuple[ClampRule, str], ...]:
    """Our rules in ``iptables -t mangle -S FORWARD`` output, with their lines."""
    found = []
    for line in saved.splitlines():
        if f"--comment {RULE_COMMENT} " not in line and f'--comment "{RULE_COMMENT}" ' not in line:
            continue
        m = _SAVED_RULE.match(line)
        if m:
            found.append((ClampRule(m["dir"], m["iface"], int(m["mss"])), line))
    return tuple(found)



class IptablesMtuKernel:
    """`MtuKernel` over pyroute2 (links) and the iptables command (mangle), in `netns`."""

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns
        self.writes = 0

    async def _ipr(self, fn: Any) -> Any:
        def run() -> Any:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                return fn(ipr)

        return await run_in_netns(self._netns, run)

    async def underlay(self, configured: str | None) -> tuple[str, int]:
        def find(ipr: Any) -> tuple[str, int]:
            link = find_underlay(ipr, configured)
            return link.name, link.mtu

        result: tuple[str, int] = await self._ipr(find)
        return result

    async def link_mtu(self, interface: str) -> int | None:
        def mtu(ipr: Any) -> int | None:
            index = ipr.link_lookup(ifname=interface)
            if not index:
                return None
            return int(ipr.get_links(index[0])[0].get_attr("IFLA_MTU"))

        result: int | None = await self._ipr(mtu)
        return result

    async def set_link_mtu(self, interface: str, mtu: int) -> None:
        self.writes += 1
        await self._ipr(
            lambda ipr: ipr.link("set", index=ipr.link_lookup(ifname=interface)[0], mtu=mtu)
        )

    async def _iptables(self, *args: str, check: bool = True,
                        table: str = "mangle") -> subprocess.CompletedProcess[bytes]:
        cmd = [
            *command_prefix(self._netns),
            "iptables",
            "-w",
            IPTABLES_LOCK_WAIT,
            "-t",
            table,
            *args,
        ]
        result = await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
        if check and result.returncode != 0:
            raise OSError(f"{shlex.join(cmd)}: {result.stderr.decode(errors='replace').strip()}")
        return result

    async def clamp_rules(self) -> tuple[tuple[ClampRule, str], ...]:
        result = await self._iptables("-S", MANGLE_CHAIN)
        return parse_clamp_rules(result.stdout.decode())

    async def ensure_clamp(self, rule: ClampRule) -> None:
        if (await self._iptables("-C", *rule.spec(), check=False)).returncode == 0:
            return
        self.writes += 1
        await self._iptables("-A", *rule.spec())

    async def delete_clamp(self, line: str) -> None:
        self.writes += 1
        tokens = shlex.split(line)
        await self._iptables("-D", *tokens[1:])

    async def ensure_masquerade(self, interface: str) -> None:
        spec = masquerade_spec(interface)
        if (await self._iptables("-C", *spec, check=False, table="nat")).returncode == 0:
            return
        self.writes += 1
        await self._iptables("-A", *spec, table="nat")

    async def delete_masquerade(self, interface: str) -> None:
        spec = masquerade_spec(interface)
        if (await self._iptables("-C", *spec, check=False, table="nat")).returncode != 0:
            return
        self.writes += 1
        await self._iptables("-D", *spec, table="nat")


def masquerade_spec(interface: str) -> list[str]:
    """The node's own packets into the mesh leave with the mesh interface's
    address (the first of this node's pod CIDR, which the peers' allowed IPs
    accept). Needed for host-network traffic to a ClusterIP: its source was
    chosen by the route to the Service address, before the DNAT to a remote
    pod moved it into the mesh, and the peer would drop the underlay address."""
    return ["POSTROUTING", "-o", interface, "-m", "addrtype", "--src-type", "LOCAL",
            "-m", "comment", "--comment", RULE_COMMENT, "-j", "MASQUERADE"]
