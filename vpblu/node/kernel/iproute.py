"""`MeshKernel` over pyroute2's IPRoute: links, routes in the mesh table, the
mesh's ip rules and sysctls, in the daemon's network namespace.

Owns nothing: the NetlinkActor owns the resources and is this adapter's only
caller. Every call runs on a worker thread (pyroute2's sync classes cannot
run on the trio thread under trio-asyncio).
"""

from __future__ import annotations

import socket
from typing import Any

import attrs

from vpblu.core.model import IPNetwork, network
from vpblu.node.kernel.nsexec import run_in_netns

IFF_UP = 0x1
ENOENT = 2

# rp_filter: 0 off, 1 strict, 2 loose. The kernel uses max(all, <interface>).
RP_FILTER_OFF = 0
RP_FILTER_LOOSE = 2
RTN_UNREACHABLE = 7
_DEFAULT_DST: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


@attrs.frozen(slots=True)
class MeshRule:
    """``ip rule fwmark <fwmark>/<mask> lookup <table> priority <priority>``."""

    family: int
    fwmark: int
    mask: int
    table: int
    priority: int

@attrs.frozen(slots=True)
class KernelStatistics:
    writes: int



class IPRouteKernel:
    """`MeshKernel` over pyroute2's IPRoute, on a worker thread, in `netns`."""

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns
        self._writes = 0

    def statistics(self) -> KernelStatistics:
        return KernelStatistics(writes=self._writes)

    async def _call(self, fn: Any) -> Any:
        def run() -> Any:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                return fn(ipr)

        return await run_in_netns(self._netns, run)

    async def link_state(self, interface: str) -> bool | None:
        def state(ipr: Any) -> bool | None:
            links = ipr.get_links(ifname=interface) if ipr.link_lookup(ifname=interface) else []
            if not links:
                return None
            return bool(links[0]["flags"] & IFF_UP)

        result: bool | None = await self._call(state)
        return result

    async def set_link_up(self, interface: str) -> None:
        self._writes += 1
        await self._call(lambda ipr: ipr.link("set", index=_index(ipr, interface), state="up"))

    async def routes(self, table: int, interface: str) -> frozenset[IPNetwork]:
        def dump(ipr: Any) -> frozenset[IPNetwork]:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                return frozenset()
            return frozenset(net for net, oif in _table_routes(ipr, table) if oif == found[0])

        result: frozenset[IPNetwork] = await self._call(dump)
        return result

    async def add_route(self, table: int, interface: str, cidr: IPNetwork) -> None:
        await self._route("add", table, interface, cidr)

    async def delete_route(self, table: int, interface: str, cidr: IPNetwork) -> None:
        await self._route("del", table, interface, cidr)

    async def replace_route(self, table: int, cidr: IPNetwork, interface: str) -> None:
        await self._route("replace", table, interface, cidr)

    async def _route(self, command: str, table: int, interface: str, cidr: IPNetwork) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.route(
                command, dst=str(cidr), oif=_index(ipr, interface), table=table,
                family=_family(cidr)
            )
        )

    async def has_unreachable_default(self, table: int, family: int) -> bool:
        def find(ipr: Any) -> bool:
            return any(
                msg["type"] == RTN_UNREACHABLE
                and msg["dst_len"] == 0
                and msg.get_attr("RTA_TABLE") == table
                for msg in ipr.get_routes(family=family, table=table)
            )

        result: bool = await self._call(find)
        return result

    async def add_unreachable_default(self, table: int, family: int) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.route(
                "add", dst=_DEFAULT_DST[family], table=table, family=family, type="unreachable"
            )
        )

    async def delete_unreachable_default(self, table: int, family: int) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.route(
                "del", dst=_DEFAULT_DST[family], table=table, family=family, type="unreachable"
            )
        )

    async def has_rule(self, rule: MeshRule) -> bool:
        def find(ipr: Any) -> bool:
            for msg in ipr.get_rules(family=rule.family):
                if (
                    msg.get_attr("FRA_PRIORITY") == rule.priority
                    and msg.get_attr("FRA_FWMARK") == rule.fwmark
                    and msg.get_attr("FRA_FWMASK") == rule.mask
                    and msg.get_attr("FRA_TABLE") == rule.table
                ):
                    return True
            return False

        result: bool = await self._call(find)
        return result

    async def add_rule(self, rule: MeshRule) -> None:
        await self._rule("add", rule)

    async def delete_rule(self, rule: MeshRule) -> None:
        await self._rule("del", rule)

    async def _rule(self, command: str, rule: MeshRule) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.rule(
                command,
                family=rule.family,
                fwmark=rule.fwmark,
                fwmask=rule.mask,
                table=rule.table,
                priority=rule.priority,
            )
        )

    async def relax_rp_filter(self, interface: str) -> None:
        # Decrypted packets come out of the mesh interface with a remote pod's
        # source address, but the route back to that address lives only in the
        # fwmark table (the reverse-path check looks up without the mark), so a
        # strict rp_filter sees them arrive on the "wrong" interface and drops
        # them. The kernel uses max(conf/all, conf/<iface>): with `all` off we
        # turn the interface off too; with `all` strict (1) the best the
        # interface can do is loose (2), which accepts any source that has some
        # route (a default route is enough) — and leaves `all` to its owner.
        def relax() -> None:
            base = "/proc/sys/net/ipv4/conf"
            with open(f"{base}/all/rp_filter") as fh:
                all_value = int(fh.read())
            want = RP_FILTER_OFF if all_value == RP_FILTER_OFF else RP_FILTER_LOOSE
            path = f"{base}/{interface}/rp_filter"
            with open(path) as fh:
                if int(fh.read()) == want:
                    return
            self._writes += 1
            with open(path, "w") as fh:
                fh.write(str(want))

        await run_in_netns(self._netns, relax)


    async def table_routes(self, table: int) -> dict[IPNetwork, str]:
        def dump(ipr: Any) -> dict[IPNetwork, str]:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            return {net: names[oif] for net, oif in _table_routes(ipr, table) if oif in names}

        result: dict[IPNetwork, str] = await self._call(dump)
        return result

    async def link_mtu(self, interface: str) -> int:
        def mtu(ipr: Any) -> int:
            return int(ipr.get_links(_index(ipr, interface))[0].get_attr("IFLA_MTU"))

        result: int = await self._call(mtu)
        return result

    async def set_link_mtu_up(self, interface: str, mtu: int) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.link("set", index=_index(ipr, interface), mtu=mtu, state="up"))


def _index(ipr: Any, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise OSError(ENOENT, f"{interface}: no such interface")
    return int(found[0])


def _family(cidr: IPNetwork) -> int:
    return socket.AF_INET if cidr.version == 4 else socket.AF_INET6


def _table_routes(ipr: Any, table: int) -> list[tuple[IPNetwork, int | None]]:
    """Every route of `table` (both families) with its output interface index."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=table):
            if msg.get_attr("RTA_TABLE") != table:
                continue
            dst = msg.get_attr("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if family == socket.AF_INET else "::"
            found.append((network(f"{dst}/{msg['dst_len']}"), msg.get_attr("RTA_OIF")))
    return found
