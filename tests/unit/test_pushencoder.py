"""PushEncoder: its bytes are exactly the plain codec's, and its Peer cache
never hands out the bytes of a different peer."""

from __future__ import annotations

import base64
import gc

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_codec import KEY, controller_messages, peers, states
from vpblu.core import wire
from vpblu.core.model import Endpoint, NodeDesiredState, Peer, PeerAdded, PeerChanged, PeerRemoved
from vpblu.stream import codec
from vpblu.stream.proto import mesh_pb2 as pb
from vpblu.stream.pushencoder import PIECES_MIN, Pieces, PushEncoder
from vpblu.stream.transport import write_chunks


def plain(message: wire.ControllerMessage) -> bytes:
    data: bytes = codec.encode_controller_message(message).SerializeToString()
    return data


@settings(max_examples=500)
@given(controller_messages)
def test_fast_bytes_are_the_plain_encoders_bytes(message: wire.ControllerMessage) -> None:
    encoder = PushEncoder()
    fast = encoder.encode(message)
    assert fast == plain(message)
    assert pb.ControllerMessage.FromString(fast) == codec.encode_controller_message(message)
    assert codec.decode_controller_message(pb.ControllerMessage.FromString(fast)) == message
    assert encoder.encode(message) == fast  # a second time, from the cache


@given(states, peers)
def test_one_encoder_shared_by_many_messages_stays_exact(state: NodeDesiredState,
                                                         peer: Peer) -> None:
    encoder = PushEncoder()
    messages: list[wire.ControllerMessage] = [
        wire.SyncState(7, state),
        wire.Delta(8, 7, (PeerAdded(peer), PeerRemoved("x"), PeerChanged(peer))),
        wire.SyncState(2**64 - 1, NodeDesiredState(state.node, peers=(peer, *state.peers[1:]))),
    ]
    for message in messages * 2:
        assert encoder.encode(message) == plain(message)


def test_a_peer_is_serialized_once_and_forgotten_when_it_dies() -> None:
    encoder = PushEncoder()
    peer = Peer("b", KEY, Endpoint("192.0.2.1", 51820), ("10.0.1.0/24",), 25)
    first = encoder.peer_bytes(peer)
    assert encoder.peer_bytes(peer) is first
    assert len(encoder) == 1
    del peer
    gc.collect()
    assert len(encoder) == 0


def test_an_equal_but_distinct_peer_is_encoded_from_its_own_fields() -> None:
    encoder = PushEncoder()
    old = Peer("b", KEY, None, ("10.0.1.0/24",))
    encoder.peer_bytes(old)
    new = Peer("b", KEY, None, ("10.0.2.0/24",))
    state = NodeDesiredState("a", peers=(new,))
    assert encoder.encode(wire.SyncState(1, state)) == plain(wire.SyncState(1, state))


def test_a_rotation_step_sent_to_every_peer_is_serialized_once_and_exactly() -> None:
    encoder = PushEncoder()
    step = wire.RotationStep("r1", wire.RotationStepKind.DISTRIBUTE, "n2",
                             base64.b64encode(bytes(32)).decode(),
                             base64.b64encode(bytes([1]) * 32).decode(), stamp=9, slot=3)
    first = encoder.encode(step)
    assert first == codec.encode_controller_message(step).SerializeToString()
    assert encoder.encode(step) is first  # the same object: the bytes kept
    other = attrs.evolve(step, stamp=10)
    assert encoder.encode(other) == codec.encode_controller_message(other).SerializeToString()
    assert encoder.encode(other) != first


def test_a_large_sync_state_is_queued_as_the_cached_pieces_it_is_made_of() -> None:
    """What a stream queues for a SyncState of 999 peers: the peers' cached
    bytes themselves (shared by every stream), joined only as it is written;
    exactly the codec's bytes. A small one is plain bytes."""
    encoder = PushEncoder()
    peers = [Peer(f"node-{i:04d}", base64.b64encode(i.to_bytes(32, "big")).decode(),
                  Endpoint(f"10.1.{i >> 8}.{i & 255}", 51820), (f"10.{i >> 8}.{i & 255}.0/24",), 25)
             for i in range(999)]
    big = wire.SyncState(3, NodeDesiredState("a", peers=peers))
    queued = encoder.encode_for_stream(big)
    assert isinstance(queued, Pieces) and len(queued) >= PIECES_MIN
    assert queued.join() == plain(big) and len(queued) == len(plain(big))
    assert any(part is encoder.peer_bytes(peers[5]) for part in queued.parts)
    small = wire.SyncState(3, NodeDesiredState("a", peers=peers[:2]))
    assert encoder.encode_for_stream(small) == plain(small)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=200), st.integers(1, 2000))
def test_pieces_are_written_in_chunks_of_at_least_the_size_and_nothing_else(
        pieces: list[bytes], size: int) -> None:
    chunks = list(write_chunks(pieces, size))
    assert b"".join(chunks) == b"".join(pieces)
    assert all(len(c) >= size for c in chunks[:-1])
    # A chunk stops at the first piece that reaches the size: less than a piece over.
    assert all(len(c) < size + 300 for c in chunks)
