from kvpeer.v1 import fingerprint_pb2 as _fingerprint_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Host(_message.Message):
    __slots__ = ("boot_id", "hostname")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    hostname: str
    def __init__(self, boot_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("path", "size", "st_dev", "st_ino", "engine_id", "row_bytes", "num_rows")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ST_DEV_FIELD_NUMBER: _ClassVar[int]
    ST_INO_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    st_dev: int
    st_ino: int
    engine_id: str
    row_bytes: int
    num_rows: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., st_dev: _Optional[int] = ..., st_ino: _Optional[int] = ..., engine_id: _Optional[str] = ..., row_bytes: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "node_id", "chunk_bytes", "fingerprint", "host")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    chunk_bytes: int
    fingerprint: _fingerprint_pb2.Fingerprint
    host: Host
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., fingerprint: _Optional[_Union[_fingerprint_pb2.Fingerprint, _Mapping]] = ..., host: _Optional[_Union[Host, _Mapping]] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("protocol_version", "node_id", "chunk_bytes", "fingerprint", "max_keys_per_lookup", "lease_ttl_ms", "pull_port", "listen_port", "host", "region")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_PER_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    PULL_PORT_FIELD_NUMBER: _ClassVar[int]
    LISTEN_PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    chunk_bytes: int
    fingerprint: _fingerprint_pb2.Fingerprint
    max_keys_per_lookup: int
    lease_ttl_ms: int
    pull_port: int
    listen_port: int
    host: Host
    region: Region
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., fingerprint: _Optional[_Union[_fingerprint_pb2.Fingerprint, _Mapping]] = ..., max_keys_per_lookup: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., pull_port: _Optional[int] = ..., listen_port: _Optional[int] = ..., host: _Optional[_Union[Host, _Mapping]] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("fingerprint", "keys", "hold", "handoff_id", "wait_ms", "node_id")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    hold: bool
    handoff_id: str
    wait_ms: int
    node_id: str
    def __init__(self, fingerprint: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., hold: _Optional[bool] = ..., handoff_id: _Optional[str] = ..., wait_ms: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("lease_id", "hit", "lease_ttl_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HIT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    hit: _containers.RepeatedScalarFieldContainer[bool]
    lease_ttl_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., hit: _Optional[_Iterable[bool]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("lease_id", "indices")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "key", "digest", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: bytes
    digest: bytes
    data: bytes
    def __init__(self, index: _Optional[int] = ..., key: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MapRowsRequest(_message.Message):
    __slots__ = ("lease_id", "indices")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class MappedRow(_message.Message):
    __slots__ = ("index", "key", "offset", "length", "digest")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: bytes
    offset: int
    length: int
    digest: bytes
    def __init__(self, index: _Optional[int] = ..., key: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class MapRowsResponse(_message.Message):
    __slots__ = ("region", "rows")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    region: Region
    rows: _containers.RepeatedCompositeFieldContainer[MappedRow]
    def __init__(self, region: _Optional[_Union[Region, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[MappedRow, _Mapping]]] = ...) -> None: ...

class CheckLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class CheckLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
