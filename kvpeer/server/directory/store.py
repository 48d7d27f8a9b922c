"""The contract every directory store keeps: :class:`DirectoryStore`, its records and errors.

The directory servicer validates every request (see :func:`check_keys` and the
limits below) and then asks a store. A store records *registrations* — a node id
joined under an epoch with an endpoint, a fingerprint and a lease — and the keys
each registration holds. Two stores exist:

- :class:`~kvpeer.server.directory.memory_store.MemoryStore`: one process, nothing shared, lost on restart (the
  embedded default; clients re-join and re-publish after a restart);
- :class:`kvpeer.server.directory.redis_store.RedisStore`: state in Redis, shared by every
  directory replica that points at it and kept across their restarts.

Rules every store follows (the behavioural suite in ``tests/test_directory.py``
runs against each):

- **Epochs.** :meth:`DirectoryStore.join` returns an epoch higher than any epoch
  the store has handed out before, to any node — also across restarts of the
  directory (epochs are seeded from the wall clock in microseconds).
- **Fencing.** Entries belong to a (node, epoch). A join, a leave or an expired
  lease ends the previous registration of that node id at once: its entries are
  never returned again. Freeing their memory is :meth:`DirectoryStore.sweep`'s job.
- **Namespaces.** A registration's keys live in its fingerprint's namespace;
  :meth:`DirectoryStore.locate` only searches the namespace it is given.
- **Errors.** Calls naming a node that is not registered (never joined, left,
  lease over) raise :class:`UnknownNodeError`; calls with another epoch than the
  node's current one raise :class:`StaleEpochError`; a store that cannot reach
  its backend raises :class:`StoreUnavailableError`.

This module depends on no store; :mod:`~kvpeer.server.directory.stores` picks one
for a ``--store`` spec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kvpeer.api.errors import KVPeerError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL

#: Longest node id, in characters.
MAX_NODE_ID_CHARS = 128
#: Most keys one registration may hold. A vLLM node holds one key per primary-tier
#: row (a 20 GiB tier of 2 MiB rows is 10,240 keys); the cap keeps one misbehaving
#: or hostile node from growing the directory without bound.
MAX_KEYS_PER_NODE = 1 << 20


class StoreError(KVPeerError):
    """A store refused or could not complete a call; the message is for the caller."""


class UnknownNodeError(StoreError):
    """The node is not registered: it never joined, it left, or its lease ended."""

    def __init__(self, node_id: str) -> None:
        super().__init__(
            f"unknown node {node_id}: it never joined, left, or its lease expired: re-join"
        )
        self.node_id = node_id


class StaleEpochError(StoreError):
    """The call names an epoch other than the node's current one."""

    def __init__(self, node_id: str, epoch: int, current: int) -> None:
        super().__init__(f"stale epoch {epoch} for node {node_id} (current {current}): re-join")
        self.node_id = node_id
        self.epoch = epoch
        self.current = current


class TooManyKeysError(StoreError):
    """Publishing would take a registration past its cap of keys."""

    def __init__(self, node_id: str, held: int, adding: int, cap: int) -> None:
        super().__init__(
            f"node {node_id} holds {held} keys and publishes {adding} new ones, the limit is "
            f"{cap} per node: withdraw keys it no longer holds"
        )


class StoreUnavailableError(StoreError):
    """The store's backend (e.g. Redis) cannot be reached; the call may be retried."""


class MisconfiguredStoreError(StoreUnavailableError):
    """A start check that a down backend postponed failed once it was reachable.

    The replica answers UNAVAILABLE (so nodes use another replica) until it is
    restarted with the right ``--store``; the message says what is wrong.
    """


def check_keys(keys: Sequence[bytes], *, one_length: bool = False) -> str | None:
    """Why ``keys`` is not a valid batch (count and sizes), or None when it is.

    ``one_length``: the keys must also share one length (a Score's keys are one
    request's chunk keys). Used by the servicer before calling a store and by the
    client before sending.
    """
    if not keys:
        return "no keys: send 1 to 4096 keys per call"
    if len(keys) > MAX_KEYS_PER_CALL:
        return f"{len(keys)} keys in one call, max {MAX_KEYS_PER_CALL}: split the batch"
    sizes = set(map(len, keys))  # one C-speed pass; usually a single size
    if min(sizes) < 1 or max(sizes) > MAX_KEY_BYTES:
        index, size = next(
            (i, len(k)) for i, k in enumerate(keys) if not 1 <= len(k) <= MAX_KEY_BYTES
        )
        return f"key {index} has {size} bytes; keys must have 1 to {MAX_KEY_BYTES} bytes"
    if one_length and len(sizes) > 1:
        first = len(keys[0])
        index, size = next((i, len(k)) for i, k in enumerate(keys) if len(k) != first)
        return (
            f"key {index} has {size} bytes but key 0 has {first}: a Score's keys are "
            "one request's chunk keys and share one length"
        )
    return None


@dataclass(frozen=True)
class NodeRef:
    """A live registration, as Locate reports it."""

    node_id: str
    endpoint: str
    epoch: int


@dataclass(frozen=True)
class Located:
    """A store's answer to :meth:`DirectoryStore.locate`.

    ``holders[i]`` lists indices into ``nodes`` of the holders of the i-th key asked
    (tuples: equal rows can be encoded once).
    """

    nodes: list[NodeRef]
    holders: list[tuple[int, ...]]


@dataclass(frozen=True)
class NodeRecord:
    """A live registration, as ListNodes reports it. ``keys`` counts its entries."""

    node_id: str
    endpoint: str
    epoch: int
    fingerprint: Fingerprint
    keys: int
    lease_remaining_s: float


@dataclass(frozen=True)
class NodeLoad:
    """Load figures a node reports with its heartbeats (0 when the node does not know)."""

    pinned_rows: int = 0
    running_requests: int = 0
    peer_leases: int = 0


@dataclass(frozen=True)
class ScoredNode:
    """One live registration's answer to :meth:`DirectoryStore.score`.

    ``prefix_keys`` is the length of the longest run ``keys[0:prefix_keys]`` the
    registration holds. ``load`` is the latest load a heartbeat carried (None if
    none did) and ``load_age_s`` how long ago it came (0.0 without a load).
    """

    node_id: str
    endpoint: str
    epoch: int
    fingerprint: str
    prefix_keys: int
    load: NodeLoad | None
    load_age_s: float


def prefix_length(
    held: set[bytes] | frozenset[bytes], keys: Sequence[bytes], step: int = 64
) -> int:
    """How many of ``keys``, from the first, are in ``held`` without a gap.

    Checks slices of ``step`` keys at C speed (``issuperset``) and looks key by key
    only inside the first slice with a miss.
    """
    for start in range(0, len(keys), step):
        part = keys[start : start + step]
        if not held.issuperset(part):
            return start + next(i for i, key in enumerate(part) if key not in held)
    return len(keys)


def sort_scores(nodes: list[ScoredNode]) -> list[ScoredNode]:
    """``nodes`` longest prefix first, then by node id (every store answers in this order)."""
    return sorted(nodes, key=lambda n: (-n.prefix_keys, n.node_id))


@dataclass(frozen=True)
class NamespaceStats:
    """Live nodes and entries of one fingerprint; a key held by two nodes counts twice."""

    fingerprint: str
    nodes: int
    keys: int


class DirectoryStore(ABC):
    """Contract between the directory servicer and its state.

    Thread-safety: every method may be called at the same time from gRPC handler
    threads and from the server's sweeper thread. Each call is atomic: no other
    call observes it half done. Arguments are already validated by the caller:
    node ids are 1..128 printable characters without whitespace, endpoints are
    ``host:port``, fingerprints are digests (32 hex digits), key batches pass
    :func:`check_keys`, TTLs are positive.
    """

    #: Short description for logs and Stats, e.g. ``memory`` or ``redis://host:6379/0``.
    name: str
    #: Identity of the state, the same for every replica on this store (a memory
    #: store's is its own); "" while not known yet (Redis down since start).
    #: Answers carry it, so a client notices replicas that serve different state.
    store_id: str = ""

    @abstractmethod
    def join(self, node_id: str, endpoint: str, fingerprint: Fingerprint, ttl_s: float) -> int:
        """Register ``node_id`` with a lease of ``ttl_s``; return its new epoch.

        The epoch is higher than every epoch this store handed out before. Any
        previous registration of ``node_id`` ends: its entries are fenced off.
        """

    @abstractmethod
    def heartbeat(
        self, node_id: str, epoch: int, ttl_s: float, load: NodeLoad | None = None
    ) -> None:
        """Extend the registration's lease to ``ttl_s`` from now; record ``load`` if given.

        A heartbeat without a load keeps the last one recorded (and its age).
        Raises :class:`UnknownNodeError` or :class:`StaleEpochError`.
        """

    @abstractmethod
    def publish(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        """Record that the registration holds ``keys``; idempotent; return ``len(keys)``.

        All or nothing: a batch that would take the registration past
        ``max_keys_per_node`` keys records none of them.

        Raises :class:`UnknownNodeError`, :class:`StaleEpochError` or
        :class:`TooManyKeysError`.
        """

    @abstractmethod
    def withdraw(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        """Forget that the registration holds ``keys``; return how many it held.

        Raises :class:`UnknownNodeError` or :class:`StaleEpochError`.
        """

    @abstractmethod
    def locate(self, fingerprint: str, keys: Sequence[bytes], exclude_node_id: str) -> Located:
        """Live holders of each key in namespace ``fingerprint``, leaving out ``exclude_node_id``.

        Only registrations whose lease has not ended are returned. ``nodes`` lists
        each holder once; ``holders`` is aligned with ``keys``. Never raises for
        unknown namespaces or keys (they have no holders).
        """

    @abstractmethod
    def score(self, fingerprint: str | None, keys: Sequence[bytes]) -> list[ScoredNode]:
        """Every live registration (of namespace ``fingerprint``, or of all when None) scored.

        ``keys`` is a request's prefix in order; each registration's ``prefix_keys``
        counts the keys it holds from the first up to its first gap (see
        :func:`prefix_length`), searching its own namespace. Registrations holding
        none are listed too (with 0), so a router sees every node's load. Sorted by
        :func:`sort_scores`. One atomic read: a node that leaves during the call is
        either scored as before it left or not listed. Never raises for unknown
        namespaces or keys.
        """

    @abstractmethod
    def leave(self, node_id: str, epoch: int) -> None:
        """End the registration now; its entries are fenced off.

        Raises :class:`UnknownNodeError` or :class:`StaleEpochError`.
        """

    @abstractmethod
    def list_nodes(self, fingerprint: str | None = None) -> list[NodeRecord]:
        """Live registrations, all or of one namespace, sorted by node id."""

    @abstractmethod
    def stats(self) -> list[NamespaceStats]:
        """Live nodes and entries per namespace, sorted by fingerprint."""

    @abstractmethod
    def sweep(self) -> int:
        """Housekeeping: end expired registrations and free some fenced entries.

        Called periodically by one thread (the server's sweeper). Does a bounded
        amount of work per call so it never holds up other calls for long;
        returns the number of entries freed (0 when there is nothing left to do).
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the store is not used afterwards."""


def next_epoch(last: int, now_us: int) -> int:
    """The epoch after ``last``: seeded from the clock so it also grows across restarts."""
    return max(last + 1, now_us)
