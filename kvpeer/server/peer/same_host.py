"""The holder's side of the same-host fast path: ``KVPeer.MapRows`` and ``KVPeer.CheckLease``.

A consumer on the same host (same kernel boot id, the holder's region file opens
and its identity matches: :mod:`kvpeer.client.same_host`) copies a lease's rows
itself instead of pulling them over TCP. What it gets here is exactly what an
authorised Pull would give it, in place of the bytes:

- MapRows(lease, indices): for each pinned row its key, its byte offset in the
  region file (checked against the region before it is handed out) and its
  XXH3-128 digest, computed now from the pinned row as Pull computes it. The
  lease is held like a Pull's (``begin_pull``/``end_pull``) while the digests are
  computed, and a cache reset (``revoke_leases``) waits for the row being hashed
  and ends the call UNAVAILABLE, as it cuts a Pull short;
- CheckLease(lease): OK only while the lease is live. The consumer asks after
  copying, and keeps the rows only if the lease was live all along (released,
  expired, revoked or unknown to a restarted server: NOT_FOUND).

The consumer's copy is not tracked here: the pins stay until Release or expiry,
as for a Pull that has not started. A consumer that dies mid-copy leaves a lease
that expires after ``lease_ttl_s``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from kvpeer.api.wire import digest
from kvpeer.server.peer.chunk_source import ChunkSource
from kvpeer.server.peer.leases import Lease
from kvpeer.transport.pull_stream import REVOKED_MESSAGE, Refusal
from kvpeer.v1 import peer_pb2

NO_REGION_MESSAGE = (
    "this node offers no same-host region (its rows are not in a shared file it can "
    "describe, or the file was replaced): pull over the network"
)


class RowMapping:
    """One MapRows call in progress, revocable like a :class:`PullStream`.

    The handler thread holds :attr:`lock` while it hashes a row; :meth:`revoke`
    (from ``revoke_leases``, any thread) sets :attr:`revoked` and waits for that row.
    """

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lock = threading.Lock()
        self.revoked = False

    def revoke(self) -> None:
        self.revoked = True
        with self.lock:
            pass


def map_rows(
    source: ChunkSource,
    mapping: RowMapping,
    indices: list[int],
    count: Callable[[str, int], None],
) -> peer_pb2.MapRowsResponse:
    """The MapRowsResponse for ``indices`` (validated) of ``mapping``'s lease.

    Called on a gRPC handler thread between ``begin_pull`` and ``end_pull`` of the
    lease, with ``mapping`` registered for revocation.

    Raises:
        Refusal: FAILED_PRECONDITION (no region, or a row outside it) or
            UNAVAILABLE (the lease was revoked meanwhile).
    """
    region = source.region()
    if region is None:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, NO_REGION_MESSAGE)
    response = peer_pb2.MapRowsResponse(region=region.to_proto())
    lease = mapping.lease
    nbytes = 0
    for index in indices:
        with mapping.lock:
            if mapping.revoked:
                raise Refusal(grpc.StatusCode.UNAVAILABLE, REVOKED_MESSAGE)
            row = lease.row(index)
            offset = region.offset_of(row)
            if offset is None or offset + row.nbytes > region.size:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, NO_REGION_MESSAGE)
            row_digest = digest(row)
        response.rows.add(
            index=index,
            key=lease.keys[index],
            offset=offset,
            length=row.nbytes,
            digest=row_digest,
        )
        nbytes += row.nbytes
    count("chunks_mapped", len(indices))
    count("bytes_mapped", nbytes)
    return response
