"""`MeshKernel` over pyroute2's IPRoute: links, routes in the mesh table, the
mesh's ip rules and sysctls, in the daemon's network namespace.

Owns nothing in the kernel: the NetlinkActor owns the resources and is this
adapter's only caller. Every call runs on a worker thread (pyroute2's sync
classes cannot run on the trio thread under trio-asyncio). In the daemon's own
network namespace that is one thread keeping one IPRoute (`_NetlinkThread`)
while calls keep coming; in another namespace (the tests' in-process nodes), a
thread switched into it and a new IPRoute per call, so nothing outlives the
call and keeps a deleted namespace alive.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import attrs
import outcome
import trio

from vpblu.core.model import IPNetwork, network
from vpblu.node.kernel.devconf import IPV4_DEVCONF_RP_FILTER, setlink_ipv4_devconf
from vpblu.node.kernel.nsexec import run_in_netns

IFF_UP = 0x1
IFF_NOARP = 0x80
ENOENT = 2
ENODEV = 19
ESRCH = 3  # rtnetlink's answer to deleting a route that is not there

# rp_filter: 0 off, 1 strict, 2 loose. The kernel uses max(all, <interface>).
RP_FILTER_OFF = 0
RP_FILTER_LOOSE = 2
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
RTN_THROW = 9
_DEFAULT_DST: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
# Fallback routes of the mesh table sit at these metrics, behind every tunnel
# route (IPv4 metric 0, IPv6 1024) for the same prefix: this node's own pod
# CIDRs (thrown back to the main table) first, then the cluster's pod ranges.
LOCAL_METRIC = 4095
CLUSTER_METRIC = 4096
FALLBACK_METRICS = (LOCAL_METRIC, CLUSTER_METRIC)


@attrs.frozen(slots=True)
class MeshRule:
    """``ip rule [to <dst>] [fwmark <fwmark>/<mask>] lookup <table> priority <priority>``."""

    family: int
    table: int
    priority: int
    dst: IPNetwork | None = None
    fwmark: int = 0
    mask: int = 0


@attrs.frozen(slots=True)
class FallbackRoute:
    """A route of the mesh table that is not a tunnel: ``throw <cidr>`` (back to
    the main table) when `device` is None, else ``<cidr> dev <device>``; always
    at `metric`, so a tunnel route or a throw for the same prefix wins."""

    cidr: IPNetwork
    device: str | None
    metric: int


@attrs.frozen(slots=True)
class KernelStatistics:
    writes: int



def _os_error(exc: Any) -> OSError:
    """An OSError carrying a NetlinkError's errno and message."""
    code = exc.code if isinstance(getattr(exc, "code", None), int) else 0
    message = exc.args[1] if len(exc.args) > 1 and exc.args[1] else (
        os.strerror(code) if code else str(exc))
    return OSError(code, f"netlink: {message}")


IDLE_SECONDS = 60.0  # a `_NetlinkThread` with no call for this long closes and ends
# A function of the IPRoute, and how its outcome gets back to the waiting task.
_Call = tuple[Callable[[Any], Any], Callable[[outcome.Outcome[Any]], None]]


class _NetlinkThread:
    """One thread, started at the first call, that holds one IPRoute and runs
    the calls given to it in turn; it closes the IPRoute and ends after
    IDLE_SECONDS without a call, or at `close`, and the next call starts
    another.

    Why: a new IPRoute per call (its socket, and its asyncio event loop, which
    under trio-asyncio's loop policy is a trio-asyncio loop) cost about as
    much CPU as the call itself, and an apply makes several; at N=10 nine
    daemons adding one peer at once on two cores spent most of their CPU
    there. The loop given to IPRoute is a plain selector loop this thread
    makes and closes. A call fails with what its function raised; any error
    but the kernel's refusal also drops the IPRoute, and the next call makes
    a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The running thread and its own queue (None in a queue: end).
        self._worker: tuple[threading.Thread, queue.SimpleQueue[_Call | None]] | None = None

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        with self._lock:
            if self._worker is None:
                calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
                thread = threading.Thread(target=self._serve, args=(calls,),
                                          name="vpblu-netlink", daemon=True)
                self._worker = thread, calls
                thread.start()
            self._worker[1].put((fn, deliver))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the call runs to its end, as on a thread

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def close(self) -> None:
        """End the thread (after the calls already given) and close its IPRoute."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            thread, calls = worker
            calls.put(None)
            await trio.to_thread.run_sync(thread.join)

    def _serve(self, calls: queue.SimpleQueue[_Call | None]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        ipr: Any = None
        loop: asyncio.AbstractEventLoop | None = None

        def drop() -> None:
            nonlocal ipr, loop
            try:
                if ipr is not None:
                    ipr.close()
                if loop is not None:
                    # What closing scheduled (the transport's connection_lost)
                    # runs before the loop goes: else its socket is left open.
                    loop.run_until_complete(asyncio.sleep(0))
                    loop.run_until_complete(asyncio.sleep(0))
            finally:
                if loop is not None:
                    loop.close()
                ipr = loop = None

        try:
            while True:
                try:
                    item = calls.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if self._worker is not None and self._worker[1] is calls \
                                and calls.empty():
                            self._worker = None
                            return
                    continue  # a call came meanwhile, or `close` put the end in
                if item is None:
                    return
                fn, deliver = item
                if ipr is None:
                    try:
                        loop = asyncio.SelectorEventLoop()
                        ipr = IPRoute(use_event_loop=loop)
                    except BaseException as exc:
                        drop()
                        deliver(outcome.Error(exc))
                        continue
                result = outcome.capture(fn, ipr)
                if isinstance(result, outcome.Error) and not isinstance(result.error,
                                                                        NetlinkError):
                    drop()
                deliver(result)
        finally:
            drop()


class IPRouteKernel:
    """`MeshKernel` over pyroute2's IPRoute, on a worker thread, in `netns`.
    `aclose` ends its netlink thread (a later call starts another)."""

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns
        self._writes = 0
        self._thread = _NetlinkThread() if netns is None else None

    def statistics(self) -> KernelStatistics:
        return KernelStatistics(writes=self._writes)

    async def aclose(self) -> None:
        if self._thread is not None:
            await self._thread.close()

    async def _call(self, fn: Any) -> Any:
        """Run `fn(ipr)` on a worker thread. pyroute2's NetlinkError (the
        kernel's refusal: EEXIST, EINVAL, ENETUNREACH...) is not an OSError;
        it becomes one here, with the kernel's errno, so the NetlinkActor
        reports it in the apply's ack like any other kernel error instead of
        crashing on it."""
        from pyroute2.netlink.exceptions import NetlinkError

        if self._thread is not None:
            try:
                return await self._thread.call(fn)
            except NetlinkError as exc:
                raise _os_error(exc) from exc

        def run() -> Any:
            from pyroute2 import IPRoute

            try:
                with IPRoute() as ipr:
                    return fn(ipr)
            except NetlinkError as exc:
                raise _os_error(exc) from exc

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
        try:
            await self._route("del", table, interface, cidr)
        except OSError as e:
            # Already gone: the kernel drops an interface's routes with its last
            # address, so removing a node's addresses first leaves nothing here.
            if e.errno != ESRCH:
                raise

    async def replace_route(self, table: int, cidr: IPNetwork, interface: str) -> None:
        await self._route("replace", table, interface, cidr)

    async def _route(self, command: str, table: int, interface: str, cidr: IPNetwork) -> None:
        self._writes += 1
        await self._call(
            lambda ipr: ipr.route(
                command, dst=str(cidr), oif=_index(ipr, interface), table=table,
                family=family_of(cidr)
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
        return rule in await self.rules(rule.priority)

    async def rules(self, priority: int) -> frozenset[MeshRule]:
        def dump(ipr: Any) -> frozenset[MeshRule]:
            found = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.get_rules(family=family):
                    if msg.get_attr("FRA_PRIORITY") != priority:
                        continue
                    dst = msg.get_attr("FRA_DST")
                    found.add(MeshRule(
                        family=family,
                        table=msg.get_attr("FRA_TABLE") or msg["table"],
                        priority=priority,
                        dst=network(f"{dst}/{msg['dst_len']}") if dst is not None else None,
                        fwmark=msg.get_attr("FRA_FWMARK") or 0,
                        mask=msg.get_attr("FRA_FWMASK") or 0,
                    ))
            return frozenset(found)

        result: frozenset[MeshRule] = await self._call(dump)
        return result

    async def add_rule(self, rule: MeshRule) -> None:
        await self._rule("add", rule)

    async def delete_rule(self, rule: MeshRule) -> None:
        await self._rule("del", rule)

    async def _rule(self, command: str, rule: MeshRule) -> None:
        self._writes += 1
        selector: dict[str, Any] = {}
        if rule.dst is not None:
            selector.update(dst=str(rule.dst.network_address), dst_len=rule.dst.prefixlen)
        if rule.fwmark:
            selector.update(fwmark=rule.fwmark, fwmask=rule.mask)
        await self._call(
            lambda ipr: ipr.rule(
                command, family=rule.family, table=rule.table, priority=rule.priority, **selector
            )
        )

    async def fallback_routes(self, table: int) -> frozenset[FallbackRoute]:
        def dump(ipr: Any) -> frozenset[FallbackRoute]:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            found = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.get_routes(family=family, table=table):
                    metric = msg.get_attr("RTA_PRIORITY") or 0
                    if (msg.get_attr("RTA_TABLE") != table or metric not in FALLBACK_METRICS
                            or msg["type"] not in (RTN_THROW, RTN_UNICAST)):
                        continue
                    dst = msg.get_attr("RTA_DST") or _DEFAULT_DST[family].split("/")[0]
                    device = (names.get(msg.get_attr("RTA_OIF"))
                              if msg["type"] == RTN_UNICAST else None)
                    found.add(FallbackRoute(network(f"{dst}/{msg['dst_len']}"), device, metric))
            return frozenset(found)

        result: frozenset[FallbackRoute] = await self._call(dump)
        return result

    async def add_fallback_route(self, table: int, route: FallbackRoute) -> None:
        await self._fallback("replace", table, route)

    async def delete_fallback_route(self, table: int, route: FallbackRoute) -> None:
        await self._fallback("del", table, route)

    async def _fallback(self, command: str, table: int, route: FallbackRoute) -> None:
        self._writes += 1

        def write(ipr: Any) -> None:
            where: dict[str, Any] = (
                {"type": "throw"} if route.device is None
                else {"oif": _index(ipr, route.device)})
            ipr.route(command, dst=str(route.cidr), table=table, family=family_of(route.cidr),
                      priority=route.metric, **where)

        await self._call(write)

    async def addresses(self, interface: str) -> frozenset[IPNetwork]:
        """The addresses on `interface`, each as a host prefix (/32, /128)."""
        def dump(ipr: Any) -> frozenset[IPNetwork]:
            index = _index(ipr, interface)
            return frozenset(
                network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
                for msg in ipr.get_addr(index=index)
                if msg.get_attr("IFA_ADDRESS") is not None and msg["scope"] == 0)

        result: frozenset[IPNetwork] = await self._call(dump)
        return result

    async def add_address(self, interface: str, address: IPNetwork) -> None:
        self._writes += 1
        await self._call(lambda ipr: ipr.addr(
            "add", index=_index(ipr, interface), address=str(address.network_address),
            prefixlen=address.prefixlen, family=family_of(address)))

    async def delete_address(self, interface: str, address: IPNetwork) -> None:
        self._writes += 1
        await self._call(lambda ipr: ipr.addr(
            "del", index=_index(ipr, interface), address=str(address.network_address),
            prefixlen=address.prefixlen, family=family_of(address)))

    async def ensure_sink(self, interface: str, peer: str) -> None:
        """A veth pair whose peer stays down: what is routed into `interface` is
        dropped by the kernel and counted in its tx_dropped (the fail-closed
        drop counter), never delivered anywhere."""
        def ensure(ipr: Any) -> None:
            if not ipr.link_lookup(ifname=interface):
                self._writes += 1
                ipr.link("add", ifname=interface, kind="veth", peer=peer)
            index = _index(ipr, interface)
            flags = ipr.get_links(index)[0]["flags"]
            if not flags & IFF_NOARP:
                # Without NOARP the kernel would ARP for every destination and
                # queue (then silently drop) the packets themselves: the counter
                # would count the probes, not what was dropped.
                self._writes += 1
                ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
            if not flags & IFF_UP:
                self._writes += 1
                ipr.link("set", index=index, state="up")

        await self._call(ensure)

    async def delete_link(self, interface: str) -> None:
        def delete(ipr: Any) -> None:
            if ipr.link_lookup(ifname=interface):
                self._writes += 1
                ipr.link("del", index=_index(ipr, interface))

        await self._call(delete)

    async def tx_dropped(self, interface: str) -> int:
        def read(ipr: Any) -> int:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                return 0
            stats = ipr.get_links(found[0])[0].get_attr("IFLA_STATS64")
            return int(stats["tx_dropped"]) if stats is not None else 0

        result: int = await self._call(read)
        return result

    async def relax_rp_filter(self, interface: str) -> None:
        # Decrypted packets come out of the mesh interface with a remote pod's
        # source address, but the route back to that address lives only in the
        # fwmark table (the reverse-path check looks up without the mark), so a
        # strict rp_filter sees them arrive on the "wrong" interface and drops
        # them. The kernel uses max(conf/all, conf/<iface>): with `all` off we
        # turn the interface off too; with `all` strict (1) the best the
        # interface can do is loose (2), which accepts any source that has some
        # route (a default route is enough) — and leaves `all` to its owner.
        # Read from /proc/sys (readable in any container), written over
        # rtnetlink: a container that is not privileged has /proc/sys read-only.
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
            setlink_ipv4_devconf(socket.if_nametoindex(interface),
                                 {IPV4_DEVCONF_RP_FILTER: want})

        await run_in_netns(self._netns, relax)


    async def table_routes(self, table: int) -> dict[IPNetwork, str]:
        def dump(ipr: Any) -> dict[IPNetwork, str]:
            from pyroute2.netlink.exceptions import NetlinkError

            routes = _table_routes(ipr, table)
            # The names of the few devices the routes use, not a dump of every
            # link (a node has one per pod).
            names: dict[int, str] = {}
            for oif in {oif for _, oif in routes if oif is not None}:
                try:
                    names[oif] = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
                except NetlinkError as exc:
                    if exc.code != ENODEV:  # gone since the dump: so are its routes
                        raise
            return {net: names[oif] for net, oif in routes if oif in names}

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


def family_of(cidr: IPNetwork) -> int:
    return socket.AF_INET if cidr.version == 4 else socket.AF_INET6


def _table_routes(ipr: Any, table: int) -> list[tuple[IPNetwork, int | None]]:
    """Every route of `table` (both families) with its output interface index,
    but the fallback routes (FALLBACK_METRICS): a rotation moves tunnel routes,
    and a fallback for the same prefix must not hide one."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=table):
            if (msg.get_attr("RTA_TABLE") != table
                    or msg.get_attr("RTA_PRIORITY") in FALLBACK_METRICS):
                continue
            dst = msg.get_attr("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if family == socket.AF_INET else "::"
            found.append((network(f"{dst}/{msg['dst_len']}"), msg.get_attr("RTA_OIF")))
    return found
