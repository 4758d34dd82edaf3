"""KernelApplier: the order of its two kernel actors, and its failures, on fake actors."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from vpblu.core.model import CidrPair, NodeDesiredState, Route
from vpblu.messages import (
    Applied,
    ApplyDataPath,
    ApplyFailed,
    BpfMapInbox,
    DataPathApplied,
    NetlinkInbox,
)
from vpblu.node.applier import ApplyError, KernelApplier


@attrs.frozen
class FakeWrites:
    writes: int = 0


class FakeCounter:
    def statistics(self) -> FakeWrites:
        return FakeWrites()


@attrs.define
class FakeKernelActors:
    """Answers both inboxes and records, in order, which routes each was asked for."""

    log: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list)
    netlink_error: str | None = None
    refused: str | None = None

    async def netlink(self, inbox: trio.MemoryReceiveChannel[NetlinkInbox]) -> None:
        async for message in inbox:
            self.log.append(("netlink", tuple(str(r.cidr) for r in message.state.routes)))
            if self.netlink_error:
                await message.reply.send(ApplyFailed(self.netlink_error))
            else:
                await message.reply.send(Applied())

    async def datapath(self, inbox: trio.MemoryReceiveChannel[BpfMapInbox]) -> None:
        async for message in inbox:
            self.log.append(("maps", tuple(str(r.cidr) for r in message.routes)))
            assert message.reply is not None
            await message.reply.send(DataPathApplied(1, 0, refused=self.refused))


def state(*cidrs: str, blocks: tuple[CidrPair, ...] = ()) -> NodeDesiredState:
    return NodeDesiredState("n1", routes=[Route(c, "n2") for c in cidrs], blocks=blocks)


async def run_applier(fake: FakeKernelActors, *states: NodeDesiredState) -> None:
    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](0)
    dp_send, dp_recv = trio.open_memory_channel[BpfMapInbox](0)
    applier = KernelApplier(nl_send, dp_send, routes_counter=FakeCounter(),
                            wireguard_counter=FakeCounter())
    error: ApplyError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.netlink, nl_recv)
        nursery.start_soon(fake.datapath, dp_recv)
        try:
            for s in states:
                await applier.apply(s)
        except ApplyError as exc:
            error = exc  # raised out here, not wrapped in the nursery's ExceptionGroup
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def test_blocks_are_in_the_maps_before_the_tunnels_change() -> None:
    fake = FakeKernelActors()
    await run_applier(fake, state("10.1.0.0/24"), state("10.2.0.0/24"))
    assert fake.log == [
        ("maps", ("10.1.0.0/24",)),
        ("netlink", ("10.1.0.0/24",)),
        ("maps", ("10.2.0.0/24",)),
        ("netlink", ("10.2.0.0/24",)),
    ]


async def test_each_state_is_one_map_and_one_netlink_apply() -> None:
    fake = FakeKernelActors()
    await run_applier(fake, state("10.1.0.0/24"), state("10.1.0.0/24"))
    assert [who for who, _ in fake.log] == ["maps", "netlink", "maps", "netlink"]


@pytest.mark.parametrize("where", ["netlink", "maps"])
async def test_a_failed_step_raises_so_the_stream_acks_an_error(where: str) -> None:
    fake = FakeKernelActors(
        netlink_error="EPERM" if where == "netlink" else None,
        refused="too many block rules" if where == "maps" else None,
    )
    with pytest.raises(ApplyError, match="EPERM" if where == "netlink" else "too many"):
        await run_applier(fake, state("10.1.0.0/24"))
    # Refused blocks never go on to change the tunnels.
    if where == "maps":
        assert fake.log == [("maps", ("10.1.0.0/24",))]


async def test_an_actor_that_never_answers_times_out() -> None:
    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](1)
    dp_send, dp_recv = trio.open_memory_channel[BpfMapInbox](1)
    applier = KernelApplier(nl_send, dp_send, routes_counter=FakeCounter(),
                            wireguard_counter=FakeCounter(), step_timeout=0.5)
    async with nl_recv, dp_recv:
        with pytest.raises(trio.TooSlowError):
            await applier.apply(state("10.1.0.0/24"))
        held = dp_recv.receive_nowait()
        assert isinstance(held, ApplyDataPath)
        with pytest.raises(trio.WouldBlock):
            nl_recv.receive_nowait()  # the tunnels were never asked to change


async def test_before_the_programs_load_tunnels_go_at_once_and_the_maps_catch_up() -> None:
    """The daemon announces itself before bcc has compiled: a state without
    blocks reaches the NetlinkActor while the BpfMapActor reads nothing yet,
    and the maps get the latest state once `datapath_ready` is set."""
    fake = FakeKernelActors()
    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](0)
    dp_send, dp_recv = trio.open_memory_channel[BpfMapInbox](0)
    ready = trio.Event()
    applier = KernelApplier(nl_send, dp_send, routes_counter=FakeCounter(),
                            wireguard_counter=FakeCounter(), datapath_ready=ready)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.netlink, nl_recv)
        await applier.apply(state("10.1.0.0/24"))
        await applier.apply(state("10.2.0.0/24"))
        assert fake.log == [("netlink", ("10.1.0.0/24",)), ("netlink", ("10.2.0.0/24",))]
        nursery.start_soon(fake.datapath, dp_recv)
        ready.set()
        await applier.catch_up()
        await applier.catch_up()  # nothing left behind: no second map apply
        assert fake.log[2:] == [("maps", ("10.2.0.0/24",))]
        await applier.apply(state("10.3.0.0/24"))
        assert fake.log[3:] == [("maps", ("10.3.0.0/24",)), ("netlink", ("10.3.0.0/24",))]
        nursery.cancel_scope.cancel()


async def test_before_the_programs_load_a_state_with_blocks_waits_for_the_maps() -> None:
    """Blocks are never silently unenforced: no tunnel changes until the maps hold them."""
    fake = FakeKernelActors()
    nl_send, nl_recv = trio.open_memory_channel[NetlinkInbox](0)
    dp_send, dp_recv = trio.open_memory_channel[BpfMapInbox](0)
    applier = KernelApplier(nl_send, dp_send, routes_counter=FakeCounter(),
                            wireguard_counter=FakeCounter(), datapath_ready=trio.Event())
    blocked = state("10.1.0.0/24", blocks=(CidrPair("10.1.0.0/24", "10.9.0.0/24"),))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.netlink, nl_recv)
        nursery.start_soon(applier.apply, blocked)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.log == []  # the netlink step waits behind the maps
        nursery.start_soon(fake.datapath, dp_recv)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.log == [("maps", ("10.1.0.0/24",)), ("netlink", ("10.1.0.0/24",))]
        nursery.cancel_scope.cancel()
