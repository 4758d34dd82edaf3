"""Bad policies against the real controller (issue 16: policies cannot break
enforcement).

A table of inputs that once broke the mesh or would: each is refused by the
API server (the CRD's schema and CEL rules) or, where only the controller can
judge it, accepted by the API server and answered with a status condition
that says what was ignored and why. Meanwhile nothing restarts, no simulated
daemon is given a state its data plane could not hold, the mesh between the
good nodes stays whole, and a good change made afterwards still reaches every
daemon.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio

from tests.integration.meshlab import (
    CONVERGE_TIMEOUT,
    GROUP_PATH,
    ControllerSetup,
    aapi,
    condition,
    policy,
    running_controller,
    unique,
    wait_api,
    wait_leading,
)
from vpblu.core.desiredstate import BLOCK_CAPACITY, MESSAGE_LIMIT
from vpblu.core.model import IPNetwork
from vpblu.lab.sim import SimCluster, SimDaemon

NODES = 4  # the last reports the first one's key
BLOCK_OBJECTS = 100
PAIRS_PER_OBJECT = 100  # 10 000 blocked pairs in all
ROUTES_PER_OBJECT = 1024  # the most one RoutePolicy may hold (the CRD's maxItems)
ROUTE_OBJECTS = 4  # 4096 routes, one of the four all in conflict
SERVICE_CIDR = "10.96.0.0/12"
ROUTED = ipaddress.ip_network("10.200.0.0/16")  # in the pod network, owned by no node
PLURALS = {"TunnelPolicy": "tunnelpolicies", "RoutePolicy": "routepolicies",
           "BlockPolicy": "blockpolicies"}


def pairs(first: int, count: int) -> list[dict[str, str]]:
    return [{"from": f"10.210.{k // 256}.{k % 256}/32", "to": "10.211.0.0/16"}
            for k in range(first, first + count)]


def host_routes(block: int, vias: list[str], shift: int = 0) -> list[dict[str, str]]:
    """ROUTES_PER_OBJECT /32 routes in the `block`-th /22 of ROUTED, via the
    nodes in turn (so no two neighbours merge into one allowed IP)."""
    base = ROUTED.network_address + block * ROUTES_PER_OBJECT
    return [{"cidr": f"{base + i}/32", "via": vias[(i + shift) % len(vias)]}
            for i in range(ROUTES_PER_OBJECT)]


@attrs.frozen
class Refused:
    """A policy the API server must refuse, and what its answer must say."""

    what: str
    kind: str
    spec: dict[str, Any]
    says: tuple[str, ...]


@attrs.frozen
class Conditioned:
    """A RoutePolicy the API server takes, and the condition the controller must write."""

    what: str
    name: str
    routes: list[dict[str, str]]
    reason: str
    says: tuple[str, ...]


def admission_table() -> list[Refused]:
    return [
        Refused("a default route", "RoutePolicy",
                {"routes": [{"cidr": "0.0.0.0/0", "via": "any-node"}]},
                ("spec.routes[0].cidr", "must not be a default route")),
        Refused("an IPv6 default route", "RoutePolicy",
                {"routes": [{"cidr": "::/0", "via": "any-node"}]},
                ("spec.routes[0].cidr", "must not be a default route")),
        Refused("a 4096-route policy", "RoutePolicy",
                {"routes": [{"cidr": f"10.200.{i // 256}.{i % 256}/32", "via": "any-node"}
                            for i in range(4096)]},
                ("spec.routes", "must have at most 1024 items")),
        Refused(f"{BLOCK_CAPACITY + 1} block pairs in one policy", "BlockPolicy",
                {"cidrPairs": pairs(0, BLOCK_CAPACITY + 1)},
                ("spec.cidrPairs", f"must have at most {BLOCK_CAPACITY} items")),
    ]


def condition_table(prefix: str, names: list[str]) -> list[Conditioned]:
    first, via = names[0], names[1]
    return [
        Conditioned("two /1s, 0.0.0.0/0 in two parts", f"{prefix}-halves",
                    [{"cidr": "0.0.0.0/1", "via": via}, {"cidr": "128.0.0.0/1", "via": via}],
                    "CoversServiceCIDR",
                    ("route 0.0.0.0/1 via", "the Service range", "route 128.0.0.0/1 via",
                     "the InternalIP of node")),
        Conditioned("a route over another node's pod CIDR", f"{prefix}-supernet",
                    [{"cidr": "10.128.0.0/16", "via": via}], "CoversPodCIDR",
                    (f"the whole pod CIDR of node {first}",)),
        Conditioned("a route via an unknown node", f"{prefix}-ghost",
                    [{"cidr": "10.201.0.0/24", "via": "no-such-node"}], "UnknownNode",
                    ("no node no-such-node",)),
        Conditioned("a route over the node network", f"{prefix}-underlay",
                    [{"cidr": "172.16.0.0/24", "via": via}], "CoversNodeAddress",
                    (f"the InternalIP of node {first}",)),
        Conditioned("a route over the Service range", f"{prefix}-services",
                    [{"cidr": "10.96.0.0/24", "via": via}], "CoversServiceCIDR",
                    (f"the Service range {SERVICE_CIDR}",)),
        Conditioned(f"{ROUTES_PER_OBJECT} routes that all conflict", f"{prefix}-many-b",
                    host_routes(0, names[:3], shift=1), "ConflictingRoute",
                    (f"already routes it via {first}", "more problems")),
    ]


def restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vpblu.supervisor"
            and any(w in r.getMessage() for w in ("crashed", "restarting", "gave up"))]


def expected_allowed(cluster: SimCluster, peers: Iterable[str],
                     routes: Iterable[tuple[str, str]]) -> dict[str, tuple[IPNetwork, ...]]:
    """Each peer's allowed IPs: what is left of its pod CIDR once the routes
    took their part, and the routes via it, collapsed (what the controller
    should have computed, the slow way)."""
    pods: dict[str, list[IPNetwork]] = {
        n: [ipaddress.ip_network(cluster.nodes[n].pod_cidr)] for n in peers}
    gains: dict[str, list[IPNetwork]] = {n: [] for n in peers}
    for cidr, via in routes:
        net = ipaddress.ip_network(cidr)
        for pieces in pods.values():
            kept: list[IPNetwork] = []
            for piece in pieces:
                if not piece.overlaps(net):  # type: ignore[arg-type]
                    kept.append(piece)
                elif piece.prefixlen < net.prefixlen:
                    kept.extend(piece.address_exclude(net))  # type: ignore[arg-type]
            pieces[:] = kept
        if via in gains:
            gains[via].append(net)
    return {n: tuple(ipaddress.collapse_addresses([*pods[n], *gains[n]]))  # type: ignore[misc]
            for n in pods}


def settled(cluster: SimCluster, good: list[str], duplicate: str,
            routes: list[tuple[str, str]]) -> Callable[[SimDaemon], bool]:
    """The good nodes peer with each other with exactly the allowed IPs the
    accepted routes make, the duplicate with nobody; every node holds the
    blocks the data plane can enforce, and nothing a refused policy asked for."""
    allowed = expected_allowed(cluster, good, routes)
    first_blocks = {(p["from"], p["to"]) for p in pairs(0, PAIRS_PER_OBJECT)}

    def check(daemon: SimDaemon) -> bool:
        state = daemon.applier.current
        if state is None:
            return False
        blocks = {(str(b.src), str(b.dst)) for b in state.blocks}
        if blocks != first_blocks or len(state.blocks) > BLOCK_CAPACITY:
            return False
        if daemon.name == duplicate:
            return state.peers == () and state.routes == ()
        want = {n: allowed[n] for n in good if n != daemon.name}
        return {p.name: p.allowed_ips for p in state.peers} == want

    return check


async def test_bad_policies_are_refused_or_conditioned_and_a_good_change_still_converges(
        mesh: ControllerSetup, aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    env, pki, settings = mesh
    settings = attrs.evolve(settings, service_cidrs=(ipaddress.ip_network(SERVICE_CIDR),))
    caplog.set_level(logging.INFO, logger="vpblu.supervisor")
    prefix = unique("bad")
    tunnel = f"{prefix}-mesh"
    created: list[tuple[str, str]] = []

    async def create(kind: str, name: str, spec: dict[str, Any]) -> None:
        plural = PLURALS[kind]
        await aapi(env, "POST", f"{GROUP_PATH}/{plural}", policy(kind, name, spec))
        created.append((plural, name))

    await create("TunnelPolicy", tunnel, {"mode": "FullMesh"})
    try:
        async with running_controller(settings) as view, \
                SimCluster.open(env, tmp_path / "sim", pki.client, (settings.advertise,), NODES,
                                prefix=prefix, start=False) as cluster:
            names = sorted(cluster.nodes)
            good, duplicate = names[:-1], names[-1]
            # A reinstalled node that came back with another node's key.
            cluster.daemons[duplicate].key_pair = cluster.daemons[names[0]].key_pair
            for name in names:
                await cluster.start_daemon(name)
            await wait_leading(view)

            # Refused at admission: nothing reaches the controller.
            for row in admission_table():
                plural = PLURALS[row.kind]
                answer = await trio.to_thread.run_sync(
                    env.request, "POST", f"{GROUP_PATH}/{plural}",
                    policy(row.kind, f"{prefix}-refused", row.spec))
                if answer.status == 201:
                    created.append((plural, f"{prefix}-refused"))
                assert answer.status == 422, (row.what, answer.status, answer.message)
                for phrase in row.says:
                    assert phrase in answer.message, (row.what, answer.message)

            # 10 000 blocked pairs in 100 policies: the first by name fits the
            # data plane, each of the others would overflow it.
            blocks = [f"{prefix}-block-{i:03d}" for i in range(BLOCK_OBJECTS)]
            for i, name in enumerate(blocks):
                await create("BlockPolicy", name,
                             {"cidrPairs": pairs(i * PAIRS_PER_OBJECT, PAIRS_PER_OBJECT)})
            # 4096 routes in four policies of the schema's maximum; the second
            # ("many-b") claims the first's CIDRs via other nodes.
            accepted: list[tuple[str, str]] = []
            for block, name in ((0, "many-a"), (1, "many-c"), (2, "many-d")):
                routes = host_routes(block, good)
                await create("RoutePolicy", f"{prefix}-{name}", {"routes": routes})
                accepted += [(r["cidr"], r["via"]) for r in routes]
            table = condition_table(prefix, names)
            for row in table:
                await create("RoutePolicy", row.name, {"routes": row.routes})

            for row in table:
                body = await wait_api(env, f"{GROUP_PATH}/routepolicies/{row.name}",
                                      lambda b: condition(b) is not None)
                cond = condition(body) or {}
                assert (cond["status"], cond["reason"]) == ("False", row.reason), \
                    (row.what, cond)
                assert len(cond["message"]) <= MESSAGE_LIMIT, row.what
                for phrase in row.says:
                    assert phrase in cond["message"], (row.what, cond["message"])
            for name in ("many-a", "many-c", "many-d"):
                body = await wait_api(env, f"{GROUP_PATH}/routepolicies/{prefix}-{name}",
                                      lambda b: condition(b) is not None)
                assert (condition(body) or {})["status"] == "True", name

            def blocks_judged(body: dict[str, Any]) -> bool:
                mine = [i for i in body["items"] if i["metadata"]["name"] in blocks]
                return len(mine) == BLOCK_OBJECTS and all(condition(i) for i in mine)

            listed = await wait_api(env, f"{GROUP_PATH}/blockpolicies", blocks_judged)
            verdicts = {i["metadata"]["name"]: condition(i) or {} for i in listed["items"]
                        if i["metadata"]["name"] in blocks}
            assert verdicts[blocks[0]]["status"] == "True"
            for name in blocks[1:]:
                cond = verdicts[name]
                assert (cond["status"], cond["reason"]) == ("False", "BlockCapacityExceeded")
                assert f"the data plane holds at most {BLOCK_CAPACITY}" in cond["message"]

            body = await wait_api(env, f"{GROUP_PATH}/vpblunodes/{duplicate}",
                                  lambda b: (condition(b) or {}).get("reason")
                                  == "DuplicatePublicKey")
            assert f"node {names[0]} reports the same public key" in condition(body)["message"]

            # What the daemons got: the good nodes' mesh whole, with the routes
            # that were accepted; the blocks the data plane holds; nothing else.
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(settled(cluster, good, duplicate, accepted))

            # A good change afterwards still converges everywhere: half of the
            # first node's pod range moves to the second node's tunnel.
            moved = str(next(ipaddress.ip_network(cluster.nodes[names[0]].pod_cidr)
                             .subnets(new_prefix=25)))
            await create("RoutePolicy", f"{prefix}-good",
                         {"routes": [{"cidr": moved, "via": names[1]}]})
            with trio.fail_after(CONVERGE_TIMEOUT):
                await cluster.wait_all(settled(cluster, good, duplicate,
                                               [*accepted, (moved, names[1])]))
            body = await wait_api(env, f"{GROUP_PATH}/routepolicies/{prefix}-good",
                                  lambda b: (condition(b) or {}).get("status") == "True")

            assert view.leading
            assert restarts(caplog) == []
            for daemon in cluster.daemons.values():
                assert daemon.applier.failures == 0
    finally:
        for plural, name in reversed(created):
            await aapi(env, "DELETE", f"{GROUP_PATH}/{plural}/{name}", ok=(200, 404))
