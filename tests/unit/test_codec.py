"""Codec: every model value survives the wire; anything malformed is a ProtocolViolation."""

from __future__ import annotations

import base64
import contextlib
import ipaddress

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from vpblu.core import wire
from vpblu.core.model import (
    BlockAdded,
    BlockRemoved,
    Change,
    CidrPair,
    DataPath,
    DataPathChanged,
    Endpoint,
    ListenPortChanged,
    NodeDesiredState,
    Peer,
    PeerAdded,
    PeerChanged,
    PeerRemoved,
    Route,
    RouteAdded,
    RouteRemoved,
)
from vpblu.stream import codec
from vpblu.stream.codec import ProtocolViolation
from vpblu.stream.proto import mesh_pb2 as pb

KEY = base64.b64encode(bytes(range(32))).decode()

names = st.text(st.sampled_from("abcdefghij-.0123456789"), min_size=1, max_size=20)
keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
ports = st.integers(1, 65535)
generations = st.integers(0, wire.MAX_GENERATION)
rotation_ids = st.text(st.sampled_from("abcdef0123456789-"), min_size=1, max_size=64)
v4nets = st.builds(
    lambda addr, plen: ipaddress.ip_network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1), st.integers(0, 32),
)
v6nets = st.builds(
    lambda addr, plen: ipaddress.ip_network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1), st.integers(0, 128),
)
nets = st.one_of(v4nets, v6nets)
hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
endpoints = st.none() | st.builds(Endpoint, hosts, ports)
peers = st.builds(Peer, names, keys, endpoints, st.lists(nets, max_size=4), st.integers(0, 65535))
routes = st.builds(Route, nets, names)
blocks = st.builds(CidrPair, nets, nets)
datapaths = st.builds(DataPath, st.lists(nets, max_size=3), st.lists(nets, max_size=5),
                      st.booleans())
states = st.builds(
    NodeDesiredState,
    names,
    ports,
    st.lists(peers, max_size=5, unique_by=lambda p: p.name),
    st.lists(routes, max_size=5),
    st.lists(blocks, max_size=5),
    datapaths,
)
changes: st.SearchStrategy[Change] = st.one_of(
    st.builds(PeerAdded, peers),
    st.builds(PeerChanged, peers),
    st.builds(PeerRemoved, names),
    st.builds(RouteAdded, routes),
    st.builds(RouteRemoved, routes),
    st.builds(BlockAdded, blocks),
    st.builds(BlockRemoved, blocks),
    st.builds(ListenPortChanged, ports),
    st.builds(DataPathChanged, datapaths),
)
deltas = st.builds(
    lambda base, step, cs: wire.Delta(base + step, base, cs),
    st.integers(0, 2**62), st.integers(1, 2**62), st.lists(changes, max_size=8),
)
controller_messages: st.SearchStrategy[wire.ControllerMessage] = st.one_of(
    st.builds(wire.SyncState, generations, states),
    deltas,
    st.builds(wire.Redirect, st.text(min_size=1)),
    st.builds(wire.Refused, st.text()),
    st.builds(wire.RotationStep, rotation_ids, st.sampled_from(wire.RotationStepKind), names,
              keys, st.just("") | keys, generations),
)
node_messages: st.SearchStrategy[wire.NodeMessage] = st.one_of(
    st.builds(wire.Hello, names, keys, generations, st.text()),
    st.builds(wire.Ack, generations, st.none() | st.text()),
    st.just(wire.Heartbeat()),
    st.deferred(lambda: telemetries),
    st.builds(wire.RotationResult, rotation_ids, st.sampled_from(wire.RotationStepKind),
              names, generations, st.none() | st.text(), st.just("") | keys),
)


def over_the_wire_controller(message: wire.ControllerMessage) -> wire.ControllerMessage:
    data = codec.encode_controller_message(message).SerializeToString()
    return codec.decode_controller_message(pb.ControllerMessage.FromString(data))


def over_the_wire_node(message: wire.NodeMessage) -> wire.NodeMessage:
    data = codec.encode_node_message(message).SerializeToString()
    return codec.decode_node_message(pb.NodeMessage.FromString(data))


@given(controller_messages)
def test_controller_messages_round_trip(message: wire.ControllerMessage) -> None:
    assert over_the_wire_controller(message) == message


@given(node_messages)
def test_node_messages_round_trip(message: wire.NodeMessage) -> None:
    assert over_the_wire_node(message) == message


def test_an_ack_with_an_empty_error_text_is_still_an_error() -> None:
    assert over_the_wire_node(wire.Ack(7, "")) == wire.Ack(7, "")
    assert over_the_wire_node(wire.Ack(7)) == wire.Ack(7, None)


def test_a_peer_without_endpoint_stays_without() -> None:
    peer = Peer("b", KEY, None, ("10.0.1.0/24",))
    state = NodeDesiredState("a", peers=(peer,))
    decoded = over_the_wire_controller(wire.SyncState(3, state))
    assert isinstance(decoded, wire.SyncState)
    assert decoded.state.peers[0].endpoint is None


def _state(**fields: object) -> pb.ControllerMessage:
    state = pb.NodeDesiredState(node="a", listen_port=51820)
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(state, name).extend(value)
        else:
            setattr(state, name, value)
    return pb.ControllerMessage(sync_state=pb.SyncState(generation=1, state=state))


def _peer(**fields: object) -> pb.Peer:
    base: dict[str, object] = {"name": "b", "public_key": KEY, "allowed_ips": ["10.0.1.0/24"]}
    base.update(fields)
    return pb.Peer(**base)  # type: ignore[arg-type]


MALFORMED_CONTROLLER = {
    "empty": (pb.ControllerMessage(), "empty ControllerMessage"),
    "sync without state": (
        pb.ControllerMessage(sync_state=pb.SyncState(generation=1)), "without a state"),
    "port zero": (_state(listen_port=0), "outside 1..65535"),
    "node unnamed": (_state(node=""), "node name"),
    "key not base64": (_state(peers=[_peer(public_key="not a key!")]), "not base64"),
    "key too short": (
        _state(peers=[_peer(public_key=base64.b64encode(b"x" * 31).decode())]), "32 bytes"),
    "host bits set": (_state(peers=[_peer(allowed_ips=["10.0.1.1/24"])]), "host bits"),
    "not a cidr": (_state(routes=[pb.Route(cidr="ten", via="b")]), "ten"),
    "route via nobody": (_state(routes=[pb.Route(cidr="10.0.0.0/8", via="")]), "route via"),
    "bad endpoint host": (
        _state(peers=[_peer(endpoint=pb.Endpoint(host="example.org", port=1))]), "example.org"),
    "endpoint port zero": (
        _state(peers=[_peer(endpoint=pb.Endpoint(host="192.0.2.1", port=0))]), "port"),
    "peer twice": (_state(peers=[_peer(), _peer()]), "one peer twice"),
    "keepalive too big": (_state(peers=[_peer(persistent_keepalive=70000)]), "65535"),
    "block half": (_state(blocks=[pb.CidrPair(src="10.0.0.0/8")]), "does not appear"),
    "delta backwards": (
        pb.ControllerMessage(delta=pb.Delta(generation=3, base_generation=3)), "moves forward"),
    "change empty": (
        pb.ControllerMessage(delta=pb.Delta(generation=2, base_generation=1,
                                            changes=[pb.Change()])), "no change"),
    "port change to zero": (
        pb.ControllerMessage(delta=pb.Delta(generation=2, base_generation=1,
                                            changes=[pb.Change(listen_port_changed=0)])), "port"),
    "redirect nowhere": (pb.ControllerMessage(redirect=pb.Redirect()), "leader address"),
    "rotation step unknown": (
        pb.ControllerMessage(rotation_step=pb.RotationStep(
            rotation_id="r1", step=99, rotating_node="a", old_public_key=KEY)), "unknown rotation"),
    "rotation step without id": (
        pb.ControllerMessage(rotation_step=pb.RotationStep(
            step=1, rotating_node="a", old_public_key=KEY)), "rotation id"),
    "rotation step bad new key": (
        pb.ControllerMessage(rotation_step=pb.RotationStep(
            rotation_id="r1", step=2, rotating_node="a", old_public_key=KEY,
            new_public_key="x")), "new_public_key"),
}


@pytest.mark.parametrize("case", MALFORMED_CONTROLLER, ids=str)
def test_malformed_controller_messages_are_protocol_violations(case: str) -> None:
    message, says = MALFORMED_CONTROLLER[case]
    with pytest.raises(ProtocolViolation, match=says):
        codec.decode_controller_message(message)


MALFORMED_NODE = {
    "empty": (pb.NodeMessage(), "empty NodeMessage"),
    "hello unnamed": (pb.NodeMessage(hello=pb.Hello(public_key=KEY)), "node name"),
    "hello keyless": (pb.NodeMessage(hello=pb.Hello(node_name="a")), "32 bytes"),
    "hello name too long": (
        pb.NodeMessage(hello=pb.Hello(node_name="a" * 254, public_key=KEY)), "1..253"),
    "rotation result unspecified step": (
        pb.NodeMessage(rotation_result=pb.RotationResult(rotation_id="r1", rotating_node="a")),
        "unknown rotation"),
}


@pytest.mark.parametrize("case", MALFORMED_NODE, ids=str)
def test_malformed_node_messages_are_protocol_violations(case: str) -> None:
    message, says = MALFORMED_NODE[case]
    with pytest.raises(ProtocolViolation, match=says):
        codec.decode_node_message(message)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_a_protocol_violation(data: bytes) -> None:
    for message_type, decode in (
        (pb.ControllerMessage, codec.decode_controller_message),
        (pb.NodeMessage, codec.decode_node_message),
    ):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue  # grpclib's codec refuses these before the codec sees them
        with contextlib.suppress(ProtocolViolation):
            decode(message)


def test_equal_peers_decode_to_one_shared_object() -> None:
    peer = Peer("b", KEY, None, ("10.0.1.0/24",))
    state = NodeDesiredState("a", peers=(peer,), routes=(Route("10.0.1.0/24", "b"),))
    one = over_the_wire_controller(wire.SyncState(3, state))
    two = over_the_wire_controller(wire.SyncState(4, state))
    assert isinstance(one, wire.SyncState) and isinstance(two, wire.SyncState)
    assert one.state == two.state == state
    assert one.state.peers[0] is two.state.peers[0]
    assert one.state.routes[0] is two.state.routes[0]


def test_a_malformed_peer_is_refused_every_time_not_remembered() -> None:
    bad = pb.ControllerMessage(sync_state=pb.SyncState(generation=1, state=pb.NodeDesiredState(
        node="a", listen_port=51820,
        peers=[pb.Peer(name="b", public_key="not-a-key", allowed_ips=["10.0.1.0/24"])])))
    for _ in range(2):
        with pytest.raises(codec.ProtocolViolation):
            codec.decode_controller_message(bad)


counts = st.integers(0, 2**64 - 1)
peer_rows = st.lists(st.builds(wire.PeerStats, names, counts, counts, counts,
                               st.just("") | st.just("192.0.2.1:51820")), max_size=6)
telemetries = st.builds(
    wire.Telemetry,
    st.floats(0, 2e9, allow_nan=False),
    generations,
    st.just("") | keys,
    st.floats(0, 2e9, allow_nan=False),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["", "Staged", "Activated"]),
    peer_rows.map(wire.PeerColumns.of),
    st.none() | st.builds(wire.DataPathCounters, counts, counts, counts, counts, counts,
                          counts, counts, st.booleans()),
)


@given(telemetries)
def test_telemetry_round_trips(message: wire.Telemetry) -> None:
    assert over_the_wire_node(message) == message
    assert list(message.peers.rows()) == list(over_the_wire_node(message).peers.rows())


def test_telemetry_with_ragged_columns_is_a_protocol_violation() -> None:
    msg = pb.NodeMessage(telemetry=pb.Telemetry(
        sampled_at=1.0, peers=pb.PeerColumns(name=["a", "b"], latest_handshake=[1],
                                             rx_bytes=[1, 2], tx_bytes=[1, 2],
                                             endpoint=["", ""])))
    with pytest.raises(ProtocolViolation, match="columns differ"):
        codec.decode_node_message(msg)
    empty_name = pb.NodeMessage(telemetry=pb.Telemetry(peers=pb.PeerColumns(
        name=[""], latest_handshake=[0], rx_bytes=[0], tx_bytes=[0], endpoint=[""])))
    with pytest.raises(ProtocolViolation, match="name"):
        codec.decode_node_message(empty_name)
