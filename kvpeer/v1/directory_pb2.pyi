from kvpeer.v1 import fingerprint_pb2 as _fingerprint_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "endpoint", "fingerprint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    fingerprint: _fingerprint_pb2.Fingerprint
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., fingerprint: _Optional[_Union[_fingerprint_pb2.Fingerprint, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("epoch", "lease_ttl_ms", "store_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    lease_ttl_ms: int
    store_id: str
    def __init__(self, epoch: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., store_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    load: NodeLoad
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("pinned_rows", "running_requests", "peer_leases")
    PINNED_ROWS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PEER_LEASES_FIELD_NUMBER: _ClassVar[int]
    pinned_rows: int
    running_requests: int
    peer_leases: int
    def __init__(self, pinned_rows: _Optional[int] = ..., running_requests: _Optional[int] = ..., peer_leases: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_ms",)
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_ms: int
    def __init__(self, lease_ttl_ms: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "keys")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "keys")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class WithdrawResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("fingerprint", "keys", "exclude_node_id")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    exclude_node_id: str
    def __init__(self, fingerprint: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., exclude_node_id: _Optional[str] = ...) -> None: ...

class NodeRef(_message.Message):
    __slots__ = ("node_id", "endpoint", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class KeyHolders(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, nodes: _Optional[_Iterable[int]] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("nodes", "holders", "store_id")
    NODES_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRef]
    holders: _containers.RepeatedCompositeFieldContainer[KeyHolders]
    store_id: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeRef, _Mapping]]] = ..., holders: _Optional[_Iterable[_Union[KeyHolders, _Mapping]]] = ..., store_id: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "endpoint", "epoch", "fingerprint", "keys", "lease_remaining_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    epoch: int
    fingerprint: _fingerprint_pb2.Fingerprint
    keys: int
    lease_remaining_ms: int
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., epoch: _Optional[int] = ..., fingerprint: _Optional[_Union[_fingerprint_pb2.Fingerprint, _Mapping]] = ..., keys: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FingerprintStats(_message.Message):
    __slots__ = ("fingerprint", "nodes", "keys")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    nodes: int
    keys: int
    def __init__(self, fingerprint: _Optional[str] = ..., nodes: _Optional[int] = ..., keys: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("nodes", "keys", "fingerprints", "store", "store_id")
    NODES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    keys: int
    fingerprints: _containers.RepeatedCompositeFieldContainer[FingerprintStats]
    store: str
    store_id: str
    def __init__(self, nodes: _Optional[int] = ..., keys: _Optional[int] = ..., fingerprints: _Optional[_Iterable[_Union[FingerprintStats, _Mapping]]] = ..., store: _Optional[str] = ..., store_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("fingerprint", "keys")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, fingerprint: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class NodeScore(_message.Message):
    __slots__ = ("node_id", "endpoint", "epoch", "fingerprint", "prefix_keys", "load", "load_age_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    epoch: int
    fingerprint: str
    prefix_keys: int
    load: NodeLoad
    load_age_ms: int
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., epoch: _Optional[int] = ..., fingerprint: _Optional[str] = ..., prefix_keys: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., load_age_ms: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("nodes", "store_id")
    NODES_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeScore]
    store_id: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeScore, _Mapping]]] = ..., store_id: _Optional[str] = ...) -> None: ...
