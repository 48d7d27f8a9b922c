"""Directory.Score's response message.

The scoring itself is each store's :meth:`~kvpeer.server.directory.store.DirectoryStore.score`;
the servicer (:mod:`.service`) validates (``check_keys(..., one_length=True)``),
calls the store and answers with :func:`score_response`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvpeer.server.directory.store import ScoredNode
from kvpeer.v1 import directory_pb2 as pb


def score_response(
    scored: Sequence[ScoredNode], sees_epoch: Callable[[str], bool]
) -> pb.ScoreResponse:
    """The ScoreResponse for a store's answer (order kept).

    ``sees_epoch(node_id)``: whether the caller may learn that node's epoch (it may
    act as the node); other nodes' epochs are sent as 0, as ListNodes does.
    """
    return pb.ScoreResponse(
        nodes=[
            pb.NodeScore(
                node_id=n.node_id,
                endpoint=n.endpoint,
                epoch=n.epoch if sees_epoch(n.node_id) else 0,
                fingerprint=n.fingerprint,
                prefix_keys=n.prefix_keys,
                load=None
                if n.load is None
                else pb.NodeLoad(
                    pinned_rows=n.load.pinned_rows,
                    running_requests=n.load.running_requests,
                    peer_leases=n.load.peer_leases,
                ),
                load_age_ms=min(0xFFFFFFFF, round(n.load_age_s * 1000)),
            )
            for n in scored
        ]
    )
