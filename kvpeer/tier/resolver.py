"""Consumer lookups: find who holds a request's chunks and have them pinned there.

The scheduler thread only queues keys (:class:`~kvpeer.tier.consumer_state.ConsumerState`);
:class:`LookupResolver` does the network work on its own threads:

1. candidates: the request's ``source`` peer if it names one, else the directory's
   ``Locate`` (holders per key), else a probe of the static ``peers``;
2. for the keys still to resolve, the holder with the longest run of consecutive
   keys from the first one (ties spread over replicas) is asked to pin that run
   (``Lookup(hold=True)``); the keys it pinned become HIT; at the first key it
   did not have (a stale directory entry) the next candidate is tried;
3. the keys after the first key nobody has become MISS: vLLM only loads a prefix.

A handoff consumer (PD decode) may ask before its producer has stored the chunks
(decode-first): the producer then waits for them (``wait_ms``), or, without a
``source``, the resolver polls the directory until the request's patience runs out.

A peer that does not answer (a host that accepts connections and then hangs)
costs an RPC deadline, longer than a request's patience by default. So the static
peers are probed in parallel, for at most half the request's remaining patience
(the other half is left to pin the chunks at a peer that did answer); and a peer
that failed to answer, or was too slow for that, is left out of lookups for a
back-off (:class:`PeerBackoff`) instead of costing every request its deadline.
A request's own ``source`` is always asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from kvpeer.api.errors import IncompatiblePeerError, KVPeerError, PeerUnavailableError
from kvpeer.client.directory import DirectoryClient
from kvpeer.client.location import Holder, Location, longest_run
from kvpeer.client.peer import PeerClientPool
from kvpeer.tier import metrics
from kvpeer.tier.consumer_state import ConsumerState, Lease, Pin
from kvpeer.tier.metrics import TierMetrics

log = logging.getLogger(__name__)

#: Holders tried for one request batch before the rest is a MISS.
MAX_HOLDER_ATTEMPTS = 4
#: Pause between directory polls while a handoff's producer has not published yet.
HANDOFF_POLL_S = 0.05
#: How long a peer that did not answer is left out of lookups; doubles while it
#: keeps failing, up to PEER_BACKOFF_MAX_S, and ends at its first answer.
PEER_BACKOFF_S = 1.0
PEER_BACKOFF_MAX_S = 10.0


class PeerBackoff:
    """Peers that recently failed to answer, left out of lookups until a deadline.

    Thread-safe (resolver and probe threads); one lock, held for dict updates only.
    """

    def __init__(self, initial_s: float = PEER_BACKOFF_S, max_s: float = PEER_BACKOFF_MAX_S):
        self._initial_s = initial_s
        self._max_s = max_s
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        self._delay: dict[str, float] = {}

    def failed(self, endpoint: str) -> None:
        """``endpoint`` did not answer: leave it out for the next (doubled) back-off."""
        with self._lock:
            delay = min(self._max_s, 2 * self._delay.get(endpoint, self._initial_s / 2))
            self._delay[endpoint] = delay
            self._until[endpoint] = time.monotonic() + delay

    def answered(self, endpoint: str) -> None:
        with self._lock:
            self._until.pop(endpoint, None)
            self._delay.pop(endpoint, None)

    def excluded(self) -> set[str]:
        """Endpoints to leave out now."""
        now = time.monotonic()
        with self._lock:
            return {endpoint for endpoint, until in self._until.items() if until > now}


class LookupResolver:
    """Resolves queued consumer lookups on a small thread pool (idle threads sleep)."""

    def __init__(
        self,
        *,
        pool: PeerClientPool,
        peers: Sequence[str],
        own_endpoint: str,
        tier_metrics: TierMetrics,
        workers: int = 4,
    ) -> None:
        self._pool = pool
        #: Set once the tier has joined its directory; None until then (or without one).
        self.directory: DirectoryClient | None = None
        self._peers = [p for p in peers if p != own_endpoint]
        self._own_endpoint = own_endpoint
        self._metrics = tier_metrics
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kvpeer-lookup")
        # Probes of the static peers, each resolver thread's in parallel.
        self._probes = ThreadPoolExecutor(
            workers * max(1, len(self._peers)), thread_name_prefix="kvpeer-probe"
        )
        self._backoff = PeerBackoff()
        self._warned_incompatible: set[str] = set()
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    def submit(self, state: ConsumerState, keys: list[bytes]) -> None:
        """Resolve ``keys`` (in prefix order) for ``state``; returns at once."""
        with self._lock:
            self._in_flight += 1
        self._executor.submit(self._run, state, keys)

    def release(self, lease: Lease) -> None:
        """Release ``lease`` at its holder in the background (best effort)."""
        self._executor.submit(self._pool.get(lease.endpoint).release, lease.lease_id)

    def close(self) -> None:
        """Stop the resolver threads; a probe still waiting on a peer is not waited for.

        Such a probe ends at its RPC deadline, or at once when the tier closes its
        peer clients (which it does right after).
        """
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._probes.shutdown(wait=False, cancel_futures=True)

    # -- resolver threads -----------------------------------------------------

    def _run(self, state: ConsumerState, keys: list[bytes]) -> None:
        try:
            resolved = self._resolve(state, keys)
        except Exception:  # a bug must not leave the request waiting for its deadline
            log.exception("kvpeer lookup failed")
            resolved = 0
        finally:
            with self._lock:
                self._in_flight -= 1
        with state.lock:
            state.misses.update(k for k in keys[resolved:] if k not in state.pins)
        self._metrics.count(metrics.LOOKUPS, resolved, "hit")
        self._metrics.count(metrics.LOOKUPS, len(keys) - resolved, "miss")

    def _resolve(self, state: ConsumerState, keys: list[bytes]) -> int:
        """Pin the longest prefix of ``keys`` we can; return its length."""
        params = state.params
        if params.source is not None:
            pinned = self._pin_run(state, keys, 0, len(keys), str(params.source))
            # Decode-first handoff: the producer waited as long as it may (it caps
            # wait_ms) and its prefill has not stored anything yet: ask again.
            while pinned is None and params.is_consumer and not state.expired:
                pinned = self._pin_run(state, keys, 0, len(keys), str(params.source))
            return pinned or 0
        done = 0
        attempts = 0
        # endpoint -> first key index it failed to have (0: leave it out altogether)
        tried: dict[str, int] = dict.fromkeys(self._backoff.excluded(), 0)
        location = self._candidates(state, keys)
        while done < len(keys) and attempts < MAX_HOLDER_ATTEMPTS and not state.expired:
            holder, run = longest_run(_tail(location, done, tried))
            if holder is None:
                if params.is_consumer and done == 0 and self.directory is not None:
                    time.sleep(HANDOFF_POLL_S)  # decode-first: the producer has not published yet
                    location = self._candidates(state, keys)
                    continue
                break
            attempts += 1
            pinned = self._pin_run(state, keys, done, done + run, holder.endpoint) or 0
            if pinned < run:
                tried[holder.endpoint] = done + pinned
            done += pinned
        return done

    def _candidates(self, state: ConsumerState, keys: Sequence[bytes]) -> Location:
        if self.directory is not None:
            location = self.directory.locate(keys)
            if not location.ok:
                self._metrics.count(metrics.DIRECTORY_ERRORS)
            if location.ok or not self._peers:
                return location
        return self._probe_peers(state, keys)

    def _probe_peers(self, state: ConsumerState, keys: Sequence[bytes]) -> Location:
        """Holders per key among the static peers (a Lookup without hold at each).

        The peers are asked in parallel. One that has not answered within half the
        request's remaining patience counts as holding nothing and is backed off
        (its call goes on to its own deadline in the background).
        """
        excluded = self._backoff.excluded()
        asked = {
            endpoint: self._probes.submit(self._probe, endpoint, keys)
            for endpoint in self._peers
            if endpoint not in excluded
        }
        wait(asked.values(), timeout=state.remaining_s() / 2)
        holders: list[list[Holder]] = [[] for _ in keys]
        for endpoint, future in asked.items():
            if not future.done():
                self._backoff.failed(endpoint)
                continue
            hits = future.result()
            if hits is None:  # it could not say: it holds nothing for this request
                continue
            for per_key, hit in zip(holders, hits, strict=True):
                if hit:
                    per_key.append(Holder(endpoint, endpoint, 0))
        return Location(holders, True, None)

    def _probe(self, endpoint: str, keys: Sequence[bytes]) -> list[bool] | None:
        """Which ``keys`` ``endpoint`` holds; None if it could not say (probe thread)."""
        if endpoint in self._backoff.excluded():  # it failed while this probe queued
            return None
        try:
            answer = self._pool.get(endpoint).lookup(keys, hold=False)
        except KVPeerError as exc:
            self._count_failure(endpoint, exc)
            return None
        self._backoff.answered(endpoint)
        return answer.hits

    def _pin_run(
        self, state: ConsumerState, keys: list[bytes], start: int, end: int, endpoint: str
    ) -> int | None:
        """Ask ``endpoint`` to pin ``keys[start:end]``; record the pinned prefix; return its length.

        None means the holder answered but had none of the keys yet (worth asking again
        for a handoff); 0 means it failed or refused.
        """
        if endpoint == self._own_endpoint:
            return 0
        run = keys[start:end]
        params = state.params
        try:
            answer = self._pool.get(endpoint).lookup(
                run,
                hold=True,
                handoff_id=params.handoff_id if params.is_consumer else "",
                wait_s=state.remaining_s() if params.is_consumer else 0.0,
            )
        except KVPeerError as exc:
            self._count_failure(endpoint, exc)
            log.warning("lookup at %s failed: %s", endpoint, exc)
            return 0
        self._backoff.answered(endpoint)
        pinned = 0
        while pinned < len(run) and answer.hits[pinned]:
            pinned += 1
        if not answer.lease_id:
            return None if not any(answer.hits) else 0
        lease = Lease(endpoint, answer.lease_id)
        with state.lock:
            keep = pinned > 0 and not state.expired
            if keep:
                lease.pending.update(run[:pinned])
                state.leases.append(lease)
                for i in range(pinned):
                    state.pins[run[i]] = Pin(lease, i)
        if not keep:
            lease.released = True
            self.release(lease)
            return 0 if state.expired else pinned
        return pinned

    def _count_failure(self, endpoint: str, exc: KVPeerError) -> None:
        if isinstance(exc, PeerUnavailableError):
            self._backoff.failed(endpoint)
            reason = "peer_unavailable"
        elif isinstance(exc, IncompatiblePeerError):
            reason = "incompatible_peer"
            if endpoint not in self._warned_incompatible:  # once: it will not change
                self._warned_incompatible.add(endpoint)
                log.warning("not sharing KV with incompatible peer %s: %s", endpoint, exc)
        else:
            reason = "lookup_refused"
        self._metrics.count(metrics.FAILURES, 1, reason)


def _tail(location: Location, start: int, tried: dict[str, int]) -> Location:
    """``location`` from key ``start`` on, without holders known to lack a key there."""
    holders = [
        [h for h in per_key if tried.get(h.endpoint, len(location.holders)) > start + i]
        for i, per_key in enumerate(location.holders[start:])
    ]
    return Location(holders, location.ok, location.error)
