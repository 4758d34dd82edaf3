"""`vpblu daemon run` end to end: real daemon processes in node namespaces, fed by a
FakeController over real TLS gRPC; wireguard-go, the daemon's steering rules, the bcc
programs on real veths (no iptables stand-in), real packets between pod namespaces.

Helper processes (flow probes, tcpdump, iperf3) start through the `reaper` fixture
and are stopped when their block ends, whichever way. Waits are on conditions (a
probe bound, packets arriving, a server listening); the sleeps left are dwells, time
the claim is about (traffic crosses a change for 1 s)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

import attrs
import pytest
import trio

from tests.e2e.daemonlab import (
    MESH_MTU,
    REPO,
    DaemonLab,
    daemon_lab,
    full_mesh,
    node_state,
    pinned_map_ids,
)
from tests.e2e.datapath import Receiver, Sender
from tests.e2e.netns import UNDERLAY_GATEWAY, Node, Pod, in_ns, wireguard_go_pids
from tests.e2e.procs import (
    STDERR,
    Helper,
    Reaper,
    reaped_from_trio,
    start_udp_probes,
    stop_from_trio,
)
from vpblu.core import wire
from vpblu.core.model import CidrPair
from vpblu.node.config import MESH_TABLE
from vpblu.node.kernel.wireguard import UAPI_SOCKET_DIR
from vpblu.node.rotation import bridge_name, bridge_names

pytestmark = pytest.mark.e2e

ACK_TIMEOUT = 20.0
# A Prepare starts a bridge's wireguard-go; a Distribute waits for its first handshake.
ROTATION_STEP_TIMEOUT = 60.0
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
FLOWPROBE = str(REPO / "tests" / "e2e" / "flowprobe.py")
FLOW_PORT = 40100
FLOW_RATE = 200.0  # datagrams/s each way
BLOCK_DEADLINE = 1.0
START_TIMEOUT_BAD_KEY = 20.0
# Helper processes: a python or tcpdump start in a namespace, on 2 possibly busy cores.
READY_TIMEOUT = 30.0
FLOW_STOP_TIMEOUT = 15.0
IPERF_TIMEOUT = 60.0  # 8 MiB through the mesh
POLL = 0.05
FLOW_BEFORE_BLOCK = 50  # datagrams the receiver has before the block goes in
# Dwells, time the claims are about: a capture's last packets reach tcpdump's buffer;
# the flow crosses a change; the node has no daemon for a while; nothing gets through a
# block after its deadline.
CAPTURE_DRAIN = 0.3
FLOW_DWELL = 1.0
DAEMON_DOWN_DWELL = 0.5
BLOCK_DWELL = BLOCK_DEADLINE + 0.5


def ping(src: Pod, dst: Pod, *extra: str, count: int = 3) -> tuple[int, int, str]:
    result = subprocess.run(
        ["ip", "netns", "exec", src.netns, "ping", "-n", "-c", str(count), "-W", "2",
         *extra, str(dst.ip)],
        capture_output=True, text=True, check=False,
    )
    out = result.stdout + result.stderr
    m = PING_SUMMARY.search(out)
    assert m, out
    return int(m[1]), int(m[2]), out


async def converge(dl: DaemonLab, members: list[Node], keys: dict[str, str]) -> dict[str, int]:
    gens = {n.name: await dl.controller.sync(n.name, full_mesh(n, keys, members))
            for n in members}
    with trio.fail_after(ACK_TIMEOUT):
        for n in members:
            await dl.controller.wait_ack(n.name, gens[n.name])
    return gens


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    with trio.move_on_after(within):
        # Polled: the record the condition reads (datapath.Receiver's) has no event.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(POLL)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


class Flow:
    """Sequence-numbered UDP both ways between two pods (tests/e2e/flowprobe.py), for the
    async with-block: flowing both ways when it starts, the probes reaped when it ends."""

    def __init__(self, reaper: Reaper, a: Pod, b: Pod, port: int = FLOW_PORT) -> None:
        self.reaper = reaper
        self.ends = [(a, b), (b, a)]
        self.port = port
        self.probes: list[Helper] = []

    async def __aenter__(self) -> Flow:
        for src, dst in self.ends:
            self.probes.append(self.reaper.start(f"udp probe {src.netns}->{dst.netns}", [
                "ip", "netns", "exec", src.netns, sys.executable, FLOWPROBE, "udp",
                "--bind", str(src.ip), "--peer", str(dst.ip), "--port", str(self.port),
                "--rate", str(FLOW_RATE), "--control-stdin"]))
        a, b = self.ends[0]
        try:
            await trio.to_thread.run_sync(start_udp_probes, self.probes, READY_TIMEOUT,
                                          f"UDP {a.netns}<->{b.netns}")
        except BaseException as exc:
            await stop_from_trio(self.probes, FLOW_STOP_TIMEOUT, failing=exc)
            raise
        return self

    async def stop(self) -> list[dict[str, object]]:
        """Both probes stopped together; what each counted."""
        await stop_from_trio(self.probes, FLOW_STOP_TIMEOUT)
        return [probe.last_json() for probe in self.probes]

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await stop_from_trio(self.probes, FLOW_STOP_TIMEOUT, failing=exc)


def assert_no_loss(results: list[dict[str, object]]) -> None:
    a, b = results
    for sender, receiver in ((a, b), (b, a)):
        assert sender["send_errors"] == 0, results
        assert receiver["missing_count"] == 0, results
        assert receiver["received"] == sender["sent"], results


async def test_daemons_mesh_pods_encrypted_idempotent_blocked_mtu_and_cleanup(
        reaper: Reaper) -> None:
    async with daemon_lab(2) as dl:
        n1, n2 = dl.nodes
        p1, p2 = n1.pods[0], n2.pods[0]
        before = {n.name: node_state(n) for n in dl.nodes}
        keys = {n.name: await dl.start(n) for n in dl.nodes}
        await converge(dl, dl.nodes, keys)

        # --- pod to pod through wg-mesh, steered by destination; only WireGuard on the wire
        capture = dl.tmp / "capture.txt"
        with capture.open("wb") as sink:
            tcpdump = reaper.start("tcpdump", [
                "ip", "netns", "exec", dl.lab.underlay, "tcpdump", "-i", "br0", "-n", "-l",
                "-U", "ip and not igmp"], stdout=sink, stderr=subprocess.PIPE)
        async with reaped_from_trio(tcpdump):
            await trio.to_thread.run_sync(tcpdump.wait_for_line, "listening on", READY_TIMEOUT,
                                          "tcpdump capturing on the underlay", STDERR)
            sent, received, out = ping(p1, p2, count=5)
            assert (sent, received) == (5, 5), out
            await trio.sleep(CAPTURE_DRAIN)
        lines = [ln for ln in capture.read_text().splitlines() if " IP " in ln]
        node_ips = {str(n.underlay_ip) for n in dl.nodes}
        wg = re.compile(r" IP (?P<src>[\d.]+)\.(?P<sport>\d+) > (?P<dst>[\d.]+)\.(?P<dport>\d+): "
                        r"UDP")
        ctl_port = dl.address.rsplit(":", 1)[1]
        wireguard_packets = 0
        for line in lines:
            assert "10.78." not in line, f"a pod address on the underlay: {line}"
            m = wg.search(line)
            if m and {m["src"], m["dst"]} <= node_ips and "51820" in (m["sport"], m["dport"]):
                wireguard_packets += 1
                continue
            # The only other traffic: the daemons' TLS stream to the controller.
            controller = f"{UNDERLAY_GATEWAY}.{ctl_port}"
            assert (f"IP {controller} >" in line or f"> {controller}:" in line) and (
                "Flags [" in line), line
        assert wireguard_packets >= 10, lines

        # --- the block classifier is on the pod's veth
        marked = in_ns(n1.netns, "tc", "filter", "show", "dev", p1.host_veth, "ingress")
        assert "vpblu-classify" in marked and "direct-action" in marked, marked

        # --- the same state again: a new generation, no write anywhere
        before_applies = len(dl.daemons[n1.name].applies())
        gen = await dl.controller.sync(n1.name, full_mesh(n1, keys, dl.nodes))
        with trio.fail_after(ACK_TIMEOUT):
            await dl.controller.wait_ack(n1.name, gen)
        applies = dl.daemons[n1.name].applies()
        assert len(applies) == before_applies + 1
        assert applies[-1].writes == 0, applies[-1]
        print(f"apply times n1 (ms): {[a.ms for a in applies]}")

        # --- fail closed: a packet to a steered range whose mesh route is gone is refused, never
        # routed in the clear through the main table; the next apply puts the route back
        table = str(MESH_TABLE)
        assert "unreachable default" in in_ns(n1.netns, "ip", "route", "show", "table", table)
        assert "unreachable default" in in_ns(n1.netns, "ip", "-6", "route", "show", "table",
                                              table)
        in_ns(n1.netns, "ip", "route", "del", str(n2.pod_cidr), "table", table)
        sent, received, out = ping(p1, p2, count=1)
        assert received == 0 and "Unreachable" in out, out
        gen = await dl.controller.sync(n1.name, full_mesh(n1, keys, dl.nodes))
        with trio.fail_after(ACK_TIMEOUT):
            await dl.controller.wait_ack(n1.name, gen)
        assert dl.daemons[n1.name].applies()[-1].netlink == 1
        sent, received, out = ping(p1, p2, count=1)
        assert received == 1, out

        # --- a blocked pair is dropped within 1 s of the map write
        receiver = Receiver()
        sender = Sender(p1.netns, str(p2.ip), stream=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, p2.netns)
            await nursery.start(sender.run)
            await wait_until(lambda: len(receiver.stream(1)) > FLOW_BEFORE_BLOCK,
                             READY_TIMEOUT, f"{FLOW_BEFORE_BLOCK} datagrams p1->p2 arrived")
            blocked = attrs.evolve(full_mesh(n1, keys, dl.nodes),
                                   blocks=(CidrPair(n1.pod_cidr, n2.pod_cidr),))
            asked = trio.current_time()
            gen = await dl.controller.sync(n1.name, blocked)
            with trio.fail_after(ACK_TIMEOUT):
                await dl.controller.wait_ack(n1.name, gen)
            acked = trio.current_time()
            await trio.sleep(BLOCK_DWELL)
            nursery.cancel_scope.cancel()
        got = receiver.stream(1)
        assert len(got) > FLOW_BEFORE_BLOCK, "the flow never ran before the block"
        late = [seq for seq, at in got.items() if at > acked + BLOCK_DEADLINE]
        assert not late, f"{len(late)} packets sent > 1 s after the map write got through"
        last_through = max(got.values())
        print(f"block: ack {1000 * (acked - asked):.1f} ms after the sync; last packet through "
              f"was sent {1000 * (last_through - asked):.1f} ms after the sync")
        assert last_through - asked <= BLOCK_DEADLINE + (acked - asked)
        gen = await dl.controller.sync(n1.name, full_mesh(n1, keys, dl.nodes))
        with trio.fail_after(ACK_TIMEOUT):
            await dl.controller.wait_ack(n1.name, gen)

        # --- MSS clamp: several MB of TCP pod to pod; DF above the mesh MTU fails loudly
        mtu = in_ns(n1.netns, "cat", f"/sys/class/net/{n1.wg_interface}/mtu")
        assert int(mtu) == MESH_MTU
        server = reaper.start("iperf3 server", [
            "ip", "netns", "exec", p2.netns, "iperf3", "-s", "-1", "-B", str(p2.ip),
            "--forceflush"])
        async with reaped_from_trio(server):
            await trio.to_thread.run_sync(server.wait_for_line, "Server listening",
                                          READY_TIMEOUT, "the iperf3 server listening")
            with trio.fail_after(IPERF_TIMEOUT):
                client = await trio.run_process(
                    ["ip", "netns", "exec", p1.netns, "iperf3", "-c", str(p2.ip), "-n", "8M",
                     "-J"], capture_stdout=True, check=False)
            assert client.returncode == 0, client.stdout[-2000:]
            result = json.loads(client.stdout)
            # iperf3 -n stops counting when the client has written 8 MiB; the
            # server's figure is taken at that moment, a little behind.
            assert result["end"]["sum_sent"]["bytes"] >= 8 * 1024 * 1024, result["end"]
            assert result["end"]["sum_received"]["bytes"] >= 4 * 1024 * 1024, result["end"]
        counters = in_ns(n1.netns, "iptables", "-t", "mangle", "-L", "FORWARD", "-v", "-x", "-n")
        clamped = [ln for ln in counters.splitlines() if "TCPMSS" in ln]
        assert len(clamped) == 2 and all(f"set {MESH_MTU - 40}" in c for c in clamped), counters
        assert sum(int(ln.split()[0]) for ln in clamped) >= 2, counters
        sent, received, out = ping(p1, p2, "-M", "do", "-s", str(MESH_MTU), count=2)
        out = out.replace("mtu=", "mtu = ")
        assert received == 0 and f"mtu = {MESH_MTU}" in out, out

        # --- SIGTERM ends a daemon cleanly and leaves its mesh in place;
        # cleanup then gives the namespaces back as they were
        for n in dl.nodes:
            daemon = dl.daemons[n.name]
            await daemon.stop()
            assert daemon.process is not None
            assert daemon.process.returncode == 0, daemon.log()[-2000:]
            assert node_state(n) != before[n.name]
            result = await dl.cleanup(n)
            assert result.returncode == 0, result.stderr.decode()
            after = node_state(n)
            for what in before[n.name]:
                assert after[what] == before[n.name][what], (n.name, what, after[what])
            assert (dl.state_dir(n) / "wireguard.key").exists()  # kept without --remove-key


async def test_cleanup_after_daemons_killed_mid_rotation_removes_every_slots_bridge() -> None:
    """A batch of two rotations stopped half way - n1 rotating in slot 1, n2 in slot 3,
    n2 distributed for n1 (its route to n1 on its slot-1 bridge) - and both daemons
    killed -9: the bridges' wireguard-go outlive them. One of them is then killed -9 too
    (its link goes with it, its UAPI socket stays). `vpblu daemon cleanup` gives each
    namespace back as it was and leaves no bridge's socket or wireguard-go; run again,
    it changes nothing."""
    kind = wire.RotationStepKind
    async with daemon_lab(2) as dl:
        n1, n2 = dl.nodes
        before = {n.name: node_state(n) for n in dl.nodes}
        keys = {n.name: await dl.start(n) for n in dl.nodes}
        await converge(dl, dl.nodes, keys)

        async def run_step(node: Node, step: wire.RotationStep) -> wire.RotationResult:
            with trio.fail_after(ROTATION_STEP_TIMEOUT):
                result = await dl.controller.rotation_step(node.name, step)
            assert result.error is None, result
            return result

        prepared = await run_step(n1, wire.RotationStep(
            rotation_id="n1-rotation", step=kind.PREPARE, rotating_node=n1.name,
            old_public_key=keys[n1.name], stamp=1, slot=1))
        await run_step(n2, wire.RotationStep(
            rotation_id="n2-rotation", step=kind.PREPARE, rotating_node=n2.name,
            old_public_key=keys[n2.name], stamp=2, slot=3))
        await run_step(n2, wire.RotationStep(
            rotation_id="n1-rotation", step=kind.DISTRIBUTE, rotating_node=n1.name,
            old_public_key=keys[n1.name], new_public_key=prepared.new_public_key, stamp=3,
            slot=1))
        expected = {n1.name: [bridge_name(n1.wg_interface, 1)],
                    n2.name: [bridge_name(n2.wg_interface, 1), bridge_name(n2.wg_interface, 3)]}
        assert {n.name: links_of(n, bridge_names(n.wg_interface)) for n in dl.nodes} == expected
        mesh_routes = in_ns(n2.netns, "ip", "route", "show", "table", str(MESH_TABLE))
        assert f"{n1.pod_cidr} dev {expected[n2.name][0]}" in mesh_routes, mesh_routes

        for d in dl.daemons.values():
            d.kill9()
            await d.wait()
        for name in (*expected[n1.name], *expected[n2.name]):
            assert wireguard_go_pids(name), f"{name}'s wireguard-go did not outlive the daemon"
        stale = bridge_name(n2.wg_interface, 3)
        for pid in wireguard_go_pids(stale):
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not wireguard_go_pids(stale) and not links_of(n2, [stale]),
                         READY_TIMEOUT, f"{stale}'s wireguard-go and link gone after kill -9")
        assert uapi_socket(stale).exists()

        for n in dl.nodes:
            for run in ("first", "second"):
                result = await dl.cleanup(n)
                assert result.returncode == 0, result.stderr.decode()
                after = node_state(n)
                for what in before[n.name]:
                    assert after[what] == before[n.name][what], (n.name, run, what, after[what])
            for name in (n.wg_interface, *bridge_names(n.wg_interface)):
                assert not uapi_socket(name).exists(), f"{name}'s UAPI socket left"
                assert not wireguard_go_pids(name), f"{name}'s wireguard-go left"
        print(f"cleanup after a kill mid-rotation: bridges {expected} removed, and the stale "
              f"socket of {stale}")


def links_of(node: Node, names: Iterable[str]) -> list[str]:
    """Those of `names` that are links in the node's namespace now."""
    present = set(in_ns(node.netns, "ls", "/sys/class/net").split())
    return [name for name in names if name in present]


def uapi_socket(interface: str) -> Path:
    return UAPI_SOCKET_DIR / f"{interface}.sock"


async def test_adding_a_peer_and_kill_9_restart_lose_no_packet(reaper: Reaper) -> None:
    async with daemon_lab(3) as dl:
        n1, n2, n3 = dl.nodes
        p1, p2, p3 = (n.pods[0] for n in dl.nodes)
        keys = {n.name: await dl.start(n) for n in dl.nodes}
        await converge(dl, [n1, n2], keys)
        gen3 = await dl.controller.sync(n3.name, full_mesh(n3, keys, [n3]))
        with trio.fail_after(ACK_TIMEOUT):
            await dl.controller.wait_ack(n3.name, gen3)

        # The claim is about a working tunnel: establish p1-p2 first. (A flow
        # that starts both ways at once on a fresh tunnel makes both
        # wireguard-go ends initiate the first handshake together; in 4 of 5
        # runs that stalled both directions for longer than the flow lasts.)
        sent, received, out = ping(p1, p2)
        assert (sent, received) == (3, 3), out

        # --- a third node joins while p1 and p2 exchange sequence-numbered UDP
        async with Flow(reaper, p1, p2) as flow:
            await converge(dl, dl.nodes, keys)
            await trio.sleep(FLOW_DWELL)
            results = await flow.stop()
        assert_no_loss(results)
        print(f"add peer under flow: {results[0]['sent']}+{results[1]['sent']} datagrams, "
              f"0 lost; apply n1 {dl.daemons[n1.name].applies()[-1].ms:.1f} ms")
        sent, received, out = ping(p1, p3)
        assert (sent, received) == (3, 3), out

        # --- kill -9 the daemon of n1 under traffic, start it again
        d1 = dl.daemons[n1.name]
        ids_before = pinned_map_ids(n1)
        acks_before = len(dl.controller.acks(n1.name))
        log_before = len(d1.log())
        async with Flow(reaper, p1, p2, port=FLOW_PORT + 1) as flow:
            killed = trio.current_time()
            d1.kill9()
            await d1.wait()
            await trio.sleep(DAEMON_DOWN_DWELL)
            key_again = await dl.start(n1)
            with trio.fail_after(ACK_TIMEOUT):
                ack = await dl.controller.wait_ack(n1.name, 1, after=acks_before)
            back = trio.current_time()
            await trio.sleep(FLOW_DWELL)
            results = await flow.stop()
        assert_no_loss(results)
        assert key_again == keys[n1.name]
        assert ack.generation == max(a.generation for a in dl.controller.acks(n1.name))
        assert pinned_map_ids(n1) == ids_before
        second_life = d1.log()[log_before:]
        first = d1.applies()[-1]
        # Nothing rebuilt that was right: wireguard-go adopted, no netlink/UAPI write at
        # start or in the first apply, no map entry written, MTU untouched.
        assert "adopting running wireguard-go" in second_life, second_life
        assert "started wireguard-go" not in second_life
        assert (first.total_netlink, first.total_wireguard, first.maps) == (0, 0, 0), first
        assert " MTU " not in second_life
        print(f"kill -9 restart: {1000 * (back - killed):.0f} ms from the kill to the new "
              f"daemon's ack (0.5 s of it waiting); {results[0]['sent']}+{results[1]['sent']} "
              f"datagrams, 0 lost; map ids {ids_before}")


async def test_a_bad_key_file_stops_the_daemon_before_it_changes_anything() -> None:
    async with daemon_lab(1) as dl:
        (node,) = dl.nodes
        state = dl.state_dir(node)
        state.mkdir(mode=0o700)
        key_file = state / "wireguard.key"
        key_file.write_text("not-a-key\n")
        key_file.chmod(0o600)
        before = node_state(node)
        d = dl.daemon(node)
        await d.start()
        with trio.fail_after(START_TIMEOUT_BAD_KEY):
            code = await d.wait()
        log = d.log()
        assert code != 0
        assert str(key_file) in log and "truncated or corrupt" in log, log
        assert node_state(node) == before
        assert not await trio.Path(f"/var/run/wireguard/{node.wg_interface}.sock").exists()
        assert key_file.read_text() == "not-a-key\n"
