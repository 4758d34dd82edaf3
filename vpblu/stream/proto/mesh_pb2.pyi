from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RotationStepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROTATION_STEP_UNSPECIFIED: _ClassVar[RotationStepKind]
    PREPARE: _ClassVar[RotationStepKind]
    DISTRIBUTE: _ClassVar[RotationStepKind]
    ACTIVATE: _ClassVar[RotationStepKind]
    SWITCH_PEER: _ClassVar[RotationStepKind]
    RETIRE_ROTATING: _ClassVar[RotationStepKind]
    RETIRE_PEER: _ClassVar[RotationStepKind]
    ROLL_BACK_ROTATING: _ClassVar[RotationStepKind]
    ROLL_BACK_PEER: _ClassVar[RotationStepKind]
    ABANDON_ROTATING: _ClassVar[RotationStepKind]
    SWAP_PEER: _ClassVar[RotationStepKind]
ROTATION_STEP_UNSPECIFIED: RotationStepKind
PREPARE: RotationStepKind
DISTRIBUTE: RotationStepKind
ACTIVATE: RotationStepKind
SWITCH_PEER: RotationStepKind
RETIRE_ROTATING: RotationStepKind
RETIRE_PEER: RotationStepKind
ROLL_BACK_ROTATING: RotationStepKind
ROLL_BACK_PEER: RotationStepKind
ABANDON_ROTATING: RotationStepKind
SWAP_PEER: RotationStepKind

class Endpoint(_message.Message):
    __slots__ = ("host", "port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "public_key", "endpoint", "allowed_ips", "persistent_keepalive")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_IPS_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    public_key: str
    endpoint: Endpoint
    allowed_ips: _containers.RepeatedScalarFieldContainer[str]
    persistent_keepalive: int
    def __init__(self, name: _Optional[str] = ..., public_key: _Optional[str] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., allowed_ips: _Optional[_Iterable[str]] = ..., persistent_keepalive: _Optional[int] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("cidr", "via")
    CIDR_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    cidr: str
    via: str
    def __init__(self, cidr: _Optional[str] = ..., via: _Optional[str] = ...) -> None: ...

class CidrPair(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ...) -> None: ...

class DataPath(_message.Message):
    __slots__ = ("local_cidrs", "cluster_cidrs", "fail_open")
    LOCAL_CIDRS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_CIDRS_FIELD_NUMBER: _ClassVar[int]
    FAIL_OPEN_FIELD_NUMBER: _ClassVar[int]
    local_cidrs: _containers.RepeatedScalarFieldContainer[str]
    cluster_cidrs: _containers.RepeatedScalarFieldContainer[str]
    fail_open: bool
    def __init__(self, local_cidrs: _Optional[_Iterable[str]] = ..., cluster_cidrs: _Optional[_Iterable[str]] = ..., fail_open: _Optional[bool] = ...) -> None: ...

class NodeDesiredState(_message.Message):
    __slots__ = ("node", "listen_port", "peers", "routes", "blocks", "datapath")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LISTEN_PORT_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_FIELD_NUMBER: _ClassVar[int]
    node: str
    listen_port: int
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    blocks: _containers.RepeatedCompositeFieldContainer[CidrPair]
    datapath: DataPath
    def __init__(self, node: _Optional[str] = ..., listen_port: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[CidrPair, _Mapping]]] = ..., datapath: _Optional[_Union[DataPath, _Mapping]] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("peer_added", "peer_changed", "peer_removed", "route_added", "route_removed", "block_added", "block_removed", "listen_port_changed", "datapath_changed")
    PEER_ADDED_FIELD_NUMBER: _ClassVar[int]
    PEER_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PEER_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ROUTE_ADDED_FIELD_NUMBER: _ClassVar[int]
    ROUTE_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ADDED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_REMOVED_FIELD_NUMBER: _ClassVar[int]
    LISTEN_PORT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_CHANGED_FIELD_NUMBER: _ClassVar[int]
    peer_added: Peer
    peer_changed: Peer
    peer_removed: str
    route_added: Route
    route_removed: Route
    block_added: CidrPair
    block_removed: CidrPair
    listen_port_changed: int
    datapath_changed: DataPath
    def __init__(self, peer_added: _Optional[_Union[Peer, _Mapping]] = ..., peer_changed: _Optional[_Union[Peer, _Mapping]] = ..., peer_removed: _Optional[str] = ..., route_added: _Optional[_Union[Route, _Mapping]] = ..., route_removed: _Optional[_Union[Route, _Mapping]] = ..., block_added: _Optional[_Union[CidrPair, _Mapping]] = ..., block_removed: _Optional[_Union[CidrPair, _Mapping]] = ..., listen_port_changed: _Optional[int] = ..., datapath_changed: _Optional[_Union[DataPath, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_name", "public_key", "last_applied_generation", "daemon_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    public_key: str
    last_applied_generation: int
    daemon_version: str
    def __init__(self, node_name: _Optional[str] = ..., public_key: _Optional[str] = ..., last_applied_generation: _Optional[int] = ..., daemon_version: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("generation", "error")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    generation: int
    error: str
    def __init__(self, generation: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotationResult(_message.Message):
    __slots__ = ("rotation_id", "step", "error", "new_public_key", "stamp", "rotating_node")
    ROTATION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NEW_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    ROTATING_NODE_FIELD_NUMBER: _ClassVar[int]
    rotation_id: str
    step: RotationStepKind
    error: str
    new_public_key: str
    stamp: int
    rotating_node: str
    def __init__(self, rotation_id: _Optional[str] = ..., step: _Optional[_Union[RotationStepKind, str]] = ..., error: _Optional[str] = ..., new_public_key: _Optional[str] = ..., stamp: _Optional[int] = ..., rotating_node: _Optional[str] = ...) -> None: ...

class PeerColumns(_message.Message):
    __slots__ = ("name", "latest_handshake", "rx_bytes", "tx_bytes", "endpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    name: _containers.RepeatedScalarFieldContainer[str]
    latest_handshake: _containers.RepeatedScalarFieldContainer[int]
    rx_bytes: _containers.RepeatedScalarFieldContainer[int]
    tx_bytes: _containers.RepeatedScalarFieldContainer[int]
    endpoint: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[_Iterable[str]] = ..., latest_handshake: _Optional[_Iterable[int]] = ..., rx_bytes: _Optional[_Iterable[int]] = ..., tx_bytes: _Optional[_Iterable[int]] = ..., endpoint: _Optional[_Iterable[str]] = ...) -> None: ...

class DataPathCounters(_message.Message):
    __slots__ = ("passed", "dropped_blocked", "delivered", "delivery_dropped_blocked", "guard_cleartext", "guard_dropped", "fail_closed_drops", "guard_attached")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_DROPPED_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    GUARD_CLEARTEXT_FIELD_NUMBER: _ClassVar[int]
    GUARD_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAIL_CLOSED_DROPS_FIELD_NUMBER: _ClassVar[int]
    GUARD_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    passed: int
    dropped_blocked: int
    delivered: int
    delivery_dropped_blocked: int
    guard_cleartext: int
    guard_dropped: int
    fail_closed_drops: int
    guard_attached: bool
    def __init__(self, passed: _Optional[int] = ..., dropped_blocked: _Optional[int] = ..., delivered: _Optional[int] = ..., delivery_dropped_blocked: _Optional[int] = ..., guard_cleartext: _Optional[int] = ..., guard_dropped: _Optional[int] = ..., fail_closed_drops: _Optional[int] = ..., guard_attached: _Optional[bool] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("sampled_at", "applied_generation", "public_key", "key_created", "mtu", "rotation", "peers", "datapath", "peer_updates", "down")
    SAMPLED_AT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_CREATED_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_FIELD_NUMBER: _ClassVar[int]
    PEER_UPDATES_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    sampled_at: float
    applied_generation: int
    public_key: str
    key_created: float
    mtu: int
    rotation: str
    peers: PeerColumns
    datapath: DataPathCounters
    peer_updates: PeerUpdates
    down: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sampled_at: _Optional[float] = ..., applied_generation: _Optional[int] = ..., public_key: _Optional[str] = ..., key_created: _Optional[float] = ..., mtu: _Optional[int] = ..., rotation: _Optional[str] = ..., peers: _Optional[_Union[PeerColumns, _Mapping]] = ..., datapath: _Optional[_Union[DataPathCounters, _Mapping]] = ..., peer_updates: _Optional[_Union[PeerUpdates, _Mapping]] = ..., down: _Optional[_Iterable[str]] = ...) -> None: ...

class PeerUpdates(_message.Message):
    __slots__ = ("position", "latest_handshake", "rx_bytes", "tx_bytes", "endpoint", "every_row")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LATEST_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EVERY_ROW_FIELD_NUMBER: _ClassVar[int]
    position: _containers.RepeatedScalarFieldContainer[int]
    latest_handshake: _containers.RepeatedScalarFieldContainer[int]
    rx_bytes: _containers.RepeatedScalarFieldContainer[int]
    tx_bytes: _containers.RepeatedScalarFieldContainer[int]
    endpoint: _containers.RepeatedScalarFieldContainer[str]
    every_row: bool
    def __init__(self, position: _Optional[_Iterable[int]] = ..., latest_handshake: _Optional[_Iterable[int]] = ..., rx_bytes: _Optional[_Iterable[int]] = ..., tx_bytes: _Optional[_Iterable[int]] = ..., endpoint: _Optional[_Iterable[str]] = ..., every_row: _Optional[bool] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("hello", "ack", "heartbeat", "rotation_result", "telemetry")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    heartbeat: Heartbeat
    rotation_result: RotationResult
    telemetry: Telemetry
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., rotation_result: _Optional[_Union[RotationResult, _Mapping]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ...) -> None: ...

class SyncState(_message.Message):
    __slots__ = ("generation", "state")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    state: NodeDesiredState
    def __init__(self, generation: _Optional[int] = ..., state: _Optional[_Union[NodeDesiredState, _Mapping]] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("generation", "base_generation", "changes")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    base_generation: int
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, generation: _Optional[int] = ..., base_generation: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("leader",)
    LEADER_FIELD_NUMBER: _ClassVar[int]
    leader: str
    def __init__(self, leader: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RotationStep(_message.Message):
    __slots__ = ("rotation_id", "step", "rotating_node", "old_public_key", "new_public_key", "stamp", "slot")
    ROTATION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROTATING_NODE_FIELD_NUMBER: _ClassVar[int]
    OLD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NEW_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    rotation_id: str
    step: RotationStepKind
    rotating_node: str
    old_public_key: str
    new_public_key: str
    stamp: int
    slot: int
    def __init__(self, rotation_id: _Optional[str] = ..., step: _Optional[_Union[RotationStepKind, str]] = ..., rotating_node: _Optional[str] = ..., old_public_key: _Optional[str] = ..., new_public_key: _Optional[str] = ..., stamp: _Optional[int] = ..., slot: _Optional[int] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("sync_state", "delta", "redirect", "refused", "rotation_step")
    SYNC_STATE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    ROTATION_STEP_FIELD_NUMBER: _ClassVar[int]
    sync_state: SyncState
    delta: Delta
    redirect: Redirect
    refused: Refused
    rotation_step: RotationStep
    def __init__(self, sync_state: _Optional[_Union[SyncState, _Mapping]] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., rotation_step: _Optional[_Union[RotationStep, _Mapping]] = ...) -> None: ...
