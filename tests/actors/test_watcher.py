"""WatcherActor against FakeKubeApi: the list/watch protocol and its faults."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from tests.fakes.kube import FakeKubeApi
from vpblu.actors.watcher import RETRY_MAX, WatcherActor
from vpblu.core.sources import NodeSource
from vpblu.kube.client import NODES, ApiUnavailable
from vpblu.kube.resources import parse_node
from vpblu.messages import KindChanged, KindListed, WatchMessage


def node(name: str, ip: str = "192.0.2.1", cidr: str = "10.244.0.0/24") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


async def start_watcher(
    nursery: trio.Nursery, kube: FakeKubeApi
) -> trio.MemoryReceiveChannel[WatchMessage]:
    send, receive = trio.open_memory_channel[WatchMessage](100)
    await nursery.start(WatcherActor(kube, NODES, parse_node, send).run)
    return receive


def names(msg: KindListed | KindChanged) -> set[str]:
    objs = msg.objects if isinstance(msg, KindListed) else msg.upserted
    return {o.meta.name for o in objs}


async def test_lists_then_streams_changes(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(NODES, node("a"))
    async with trio.open_nursery() as nursery:
        inbox = await start_watcher(nursery, kube)
        listed = await inbox.receive()
        assert isinstance(listed, KindListed)
        assert names(listed) == {"a"}
        assert isinstance(listed.objects[0], NodeSource)
        assert str(listed.objects[0].pod_cidrs[0]) == "10.244.0.0/24"

        await kube.put(NODES, node("b", cidr="10.244.1.0/24"))
        changed = await inbox.receive()
        assert isinstance(changed, KindChanged)
        assert names(changed) == {"b"}

        await kube.remove(NODES, "a")
        changed = await inbox.receive()
        assert isinstance(changed, KindChanged)
        assert changed.deleted == ("a",)
        nursery.cancel_scope.cancel()


async def test_invalid_object_is_reported_not_fatal(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(NODES, node("good"))
    await kube.put(NODES, node("bad", cidr="10.244.0.1/24"))  # host bits set
    async with trio.open_nursery() as nursery:
        inbox = await start_watcher(nursery, kube)
        listed = await inbox.receive()
        assert isinstance(listed, KindListed)
        assert names(listed) == {"good"}
        assert [i.name for i in listed.invalid] == ["bad"]
        assert "spec.podCIDRs" in listed.invalid[0].message
        # The watcher keeps going after a bad object.
        await kube.put(NODES, node("later", cidr="10.244.9.0/24"))
        changed = await inbox.receive()
        assert names(changed) == {"later"}
        nursery.cancel_scope.cancel()


async def test_api_server_down_invents_no_deletion(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(NODES, node("a"))
    await kube.put(NODES, node("b", cidr="10.244.1.0/24"))
    async with trio.open_nursery() as nursery:
        inbox = await start_watcher(nursery, kube)
        await inbox.receive()
        await kube.go_down()
        # A long outage: nothing at all may reach the consumer meanwhile.
        with trio.move_on_after(600):
            msg = await inbox.receive()
            pytest.fail(f"watcher sent {msg} while the API server was down")
        # While down, a deletion happened and history was compacted.
        kube.come_back()
        await kube.remove(NODES, "b")
        kube.compact()
        msg = await inbox.receive()
        # Either the watch resumed and saw the DELETED event, or (410) a relist
        # no longer has it: both are the API server's word, never a guess.
        if isinstance(msg, KindListed):
            assert names(msg) == {"a"}
        else:
            assert msg.deleted == ("b",)
        nursery.cancel_scope.cancel()


async def test_gone_relists(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    await kube.put(NODES, node("a"))
    async with trio.open_nursery() as nursery:
        inbox = await start_watcher(nursery, kube)
        await inbox.receive()
        await kube.go_down()
        await trio.sleep(1)
        await kube.put(NODES, node("c", cidr="10.244.2.0/24"))
        kube.compact()
        kube.come_back()
        msg = await inbox.receive()
        assert isinstance(msg, KindListed)
        assert names(msg) == {"a", "c"}
        assert kube.calls.count(("list", "Node")) == 2
        nursery.cancel_scope.cancel()


async def test_retries_back_off(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    async with trio.open_nursery() as nursery:
        await start_watcher(nursery, kube)
        await kube.go_down()
        start_calls = len(kube.calls)
        t0 = trio.current_time()
        await trio.sleep(300)
        attempts = len(kube.calls) - start_calls
        # Exponential backoff capped at RETRY_MAX: a handful of early retries,
        # then about one per RETRY_MAX; never a tight loop.
        assert attempts <= 10 + (trio.current_time() - t0) / (RETRY_MAX / 2)
        assert attempts >= 3
        nursery.cancel_scope.cancel()


async def test_first_list_waits_for_the_api_server(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKubeApi()
    kube.fail_next = [ApiUnavailable("down"), ApiUnavailable("down")]
    async with trio.open_nursery() as nursery:
        inbox = await start_watcher(nursery, kube)
        assert trio.current_time() > 0  # it had to back off before it could start
        msg = await inbox.receive()
        assert isinstance(msg, KindListed)
        nursery.cancel_scope.cancel()
