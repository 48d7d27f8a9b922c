"""PeerSecondaryTier: vLLM nodes share KV-cache chunks over gRPC.

vLLM 0.33.0 loads this class out of tree from ``secondary_tiers`` of
``TieringOffloadingSpec``::

    {"type": "PeerSecondaryTier", "module_path": "kvpeer.tier",
     "directory": "kvdir:7600", "listen": "0.0.0.0:7601", "advertise": "node-0:7601"}

The tier stores nothing of its own: chunk bytes stay in vLLM's shared-memory
primary tier, a chunk server streams them to peers from there, and pulled chunks
land straight in the primary rows vLLM allocated for them. The class itself is a
thin dispatcher; the work lives in one module per job:

============================  ===================================================
:mod:`.primary_source`        serve peers' lookups through vLLM's ParentManager
:mod:`.handoff`               park a PD producer's chunks until its consumer pulls
:mod:`.consumer_state`        a request's lookups: RETRY, then HIT or MISS
:mod:`.resolver`              find holders (directory / peers) and pin chunks there
:mod:`.puller`                pull pinned chunks into primary rows, verified
:mod:`.publisher`             publish held keys, withdraw the ones that are gone
:mod:`.metrics`               vLLM offloading metrics
============================  ===================================================

Every method vLLM calls runs under its manager lock and returns at once: no
network I/O, no sleeping, no waiting on kvpeer's threads (except ``drain_jobs``,
whose contract is to wait, and ``shutdown``, which runs without the lock).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    OffloadingMetricMetadata,
    OffloadKey,
    OffloadPolicy,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector
from vllm.v1.kv_offload.tiering.base import (
    JobResult,
    ParentManager,
    SecondaryTierManager,
    TransferJob,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvpeer.api.errors import ConfigError
from kvpeer.api.same_host import RegionOffer
from kvpeer.client.directory import DirectoryClient
from kvpeer.client.peer import PeerClientPool
from kvpeer.server.peer.service import PeerServer
from kvpeer.tier import metrics
from kvpeer.tier.config import TierConfig
from kvpeer.tier.consumer_state import ConsumerState
from kvpeer.tier.fingerprint import engine_hash_identity, tier_fingerprint
from kvpeer.tier.handoff import HandoffRegistry
from kvpeer.tier.metrics import TierMetrics
from kvpeer.tier.outbox import JobOutbox
from kvpeer.tier.params import PLAIN, RequestParams, RequestParamsError, parse_request_params
from kvpeer.tier.primary_source import PrimaryChunkSource
from kvpeer.tier.publisher import Publisher
from kvpeer.tier.puller import Puller
from kvpeer.tier.resolver import LookupResolver
from kvpeer.tier.rows import PrimaryRows
from kvpeer.tier.vllm_compat import ConfigInfo, ConfigInfoMapping, warn_if_limited

log = logging.getLogger(__name__)

#: Seconds shutdown() gives in-flight pulls and streams before it cancels them.
SHUTDOWN_GRACE_S = 5.0
#: How long the tier waits for vLLM to set up its prefix hash (milliseconds in an engine).
ENGINE_IDENTITY_WAIT_S = 10.0


@dataclass(frozen=True)
class PeerTierInfo(ConfigInfo):
    """Labels of the tier's ``vllm:kv_offload_config_info`` series."""

    kvpeer_node_id: str
    kvpeer_endpoint: str
    kvpeer_directory: str
    kvpeer_fingerprint: str


class PeerSecondaryTier(SecondaryTierManager):
    """A secondary tier that pulls KV chunks from, and serves them to, other vLLM nodes."""

    cache_hit_source: ClassVar[CacheHitSource] = CacheHitSource.P2P
    tolerates_off_thread_polling: ClassVar[bool] = True

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: BackpressureDetector | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        if backpressure_detector is not None:
            raise ConfigError(
                "backpressure", "PeerSecondaryTier copies nothing on store; remove it"
            )
        config = TierConfig.from_kwargs(kwargs)
        self.config = config
        warn_if_limited()
        self.locality = Locality(config.locality)
        dp_index = offloading_spec.config.parallel.data_parallel_index
        listen = _offset(config.listen, dp_index)
        # vLLM sets up its prefix-hash algorithm and seed just after building the
        # tier; until then the fingerprint assumes vLLM's defaults (see _start_sharing).
        self._identity = tier_fingerprint(offloading_spec, self.block_size_bytes)
        self.fingerprint = self._identity.fingerprint

        self._metrics = TierMetrics()
        self._outbox = JobOutbox()
        self._consumers: dict[int, ConsumerState] = {}
        self._directory: DirectoryClient | None = None
        #: Requests between on_new_request and on_request_finished (load for routers).
        self._running_requests = 0
        self._stopping = threading.Event()
        with contextlib.ExitStack() as undo:
            self._rows = PrimaryRows(primary_kv_view)
            undo.callback(self._rows.close)
            self._handoffs = HandoffRegistry(
                self._rows, self._outbox, self._metrics, config.handoff_timeout_s
            )
            undo.callback(self._handoffs.close)
            region = None
            if config.same_host == "auto":  # found now: no export of the view is kept
                region = RegionOffer(
                    primary_kv_view,
                    row_bytes=self.block_size_bytes,
                    engine_id=str(getattr(offloading_spec.config, "engine_id", "") or ""),
                )
                region.get()
            self._source = PrimaryChunkSource(
                self._rows,
                self._outbox,
                self._handoffs,
                on_misses=self._withdraw_missing,
                region=region,
            )
            self._server = PeerServer(
                self._source,
                listen=str(listen),
                pull_port=_offset_port(config.pull_port, dp_index),
                node_id="starting",
                fingerprint=self.fingerprint,
                security=config.security,
                lease_ttl_s=config.lease_ttl_s,
                max_keys_per_lookup=config.max_lookup_keys,
                max_workers=config.server_workers,
            )
            undo.callback(self._server.stop)
            self._server.start()
            if config.advertise is not None:
                self.endpoint = str(_offset(config.advertise, dp_index))
            else:
                self.endpoint = str(listen.with_port(self._server.port))
            self.node_id = config.node_id or self.endpoint
            self._server.node_id = self.node_id
            self._pool = PeerClientPool(
                node_id=self.node_id,
                fingerprint=self.fingerprint,
                chunk_bytes=self.block_size_bytes,
                security=config.security,
                rpc_timeout_s=config.rpc_timeout_s,
                pull_transport=config.pull_transport,
                same_host=config.same_host == "auto",
            )
            undo.callback(self._pool.close_all)
            self._publisher = Publisher(
                reconcile_interval_s=config.reconcile_interval_s,
                batch_keys=config.reconcile_batch_keys,
            )
            self._resolver = LookupResolver(
                pool=self._pool,
                peers=[str(p) for p in config.peers],
                own_endpoint=self.endpoint,
                tier_metrics=self._metrics,
            )
            undo.callback(self._resolver.close)
            self._puller = Puller(
                pool=self._pool,
                rows=self._rows,
                outbox=self._outbox,
                tier_metrics=self._metrics,
                release_lease=self._resolver.release,
                on_loaded=self._publisher.publish,
                streams=config.pull_streams,
                timeout_s=config.pull_timeout_s,
                max_concurrent=config.max_concurrent_pulls,
            )
            undo.callback(self._puller.close, SHUTDOWN_GRACE_S)
            undo.pop_all()
        self._served = (0, 0, 0, 0)
        self._can_ask = bool(config.directory or config.peers)
        self._starter = threading.Thread(
            target=self._start_sharing, name="kvpeer-start", daemon=True
        )
        self._starter.start()
        log.info(
            "kvpeer tier %s serving on %s (advertised %s), directory %s, peers %s",
            self.node_id,
            listen.with_port(self._server.port),
            self.endpoint,
            ", ".join(map(str, config.directory)) or "none",
            ",".join(map(str, config.peers)) or "none",
        )

    def _start_sharing(self) -> None:
        """Adopt the engine's hash identity, then join the directory (own thread).

        vLLM's EngineCore calls ``init_none_hash`` right after it has built the
        scheduler and this tier, so the prefix-hash algorithm and seed — part of
        the fingerprint — are known only then. Until this returns, the tier uses a
        fingerprint that assumes vLLM's defaults; nothing is published yet.
        """
        identity = None
        deadline = time.monotonic() + ENGINE_IDENTITY_WAIT_S
        while identity is None and time.monotonic() < deadline:
            identity = engine_hash_identity()
            if identity is None and self._stopping.wait(0.005):
                return
        if identity is None:
            log.warning(
                "vLLM did not set up its prefix hash within %gs; assuming %s",
                ENGINE_IDENTITY_WAIT_S,
                self._identity.hash_identity,
            )
        else:
            self._identity = tier_fingerprint(
                self._offloading_spec, self.block_size_bytes, hash_identity=identity
            )
        if self._identity.fingerprint != self.fingerprint:
            self.fingerprint = self._identity.fingerprint
            self._server.fingerprint = self.fingerprint
            self._pool.set_fingerprint(self.fingerprint)
        if self._identity.warning:
            log.warning("%s", self._identity.warning)
        log.info("kvpeer tier %s fingerprint %s", self.node_id, self.fingerprint.digest)
        if not self._identity.shareable or not self.config.directory:
            self._publisher.disable()
        if not self.config.directory or self._stopping.is_set():
            return
        directory = DirectoryClient(
            [str(e) for e in self.config.directory],
            node_id=self.node_id,
            advertise=self.endpoint,
            fingerprint=self.fingerprint,
            security=self.config.security,
            rpc_timeout_s=self.config.rpc_timeout_s,
            publish_batch_keys=self.config.publish_batch_keys,
            publish_interval_s=self.config.publish_interval_s,
            publish=self._identity.shareable,
            load=self._load_figures,
            on_replica_failure=self._replica_failed,
        )
        directory.start()
        self._directory = directory
        self._resolver.directory = directory
        if self._identity.shareable:
            self._publisher.attach(directory)

    def _replica_failed(self, endpoint: str) -> None:
        """A directory replica could not answer (any thread): count it by endpoint."""
        self._metrics.count(metrics.DIRECTORY_REPLICA_FAILURES, 1, endpoint)

    def _load_figures(self) -> dict[str, int]:
        """Load sent with directory heartbeats (Directory.Score shows it to routers)."""
        return {
            "running_requests": self._running_requests,
            "peer_leases": self._server.stats()["leases_live"],
        }

    # -- per request ----------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._running_requests += 1
        try:
            params = parse_request_params(req_context.kv_transfer_params)
        except RequestParamsError as exc:
            log.warning("request %s: ignoring kvpeer parameters: %s", req_context.req_id, exc)
            params = PLAIN
        patience = (
            self.config.handoff_wait_s if params.is_consumer else self.config.lookup_timeout_s
        )
        req_context.set_state(ConsumerState(params, patience))
        if params.is_producer:
            return RequestOffloadingContext(policy=OffloadPolicy.REQUEST_LEVEL)
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        state = req_context.get_state(ConsumerState)
        if state is None:
            return
        self._running_requests = max(0, self._running_requests - 1)
        self._consumers.pop(id(state), None)
        with state.lock:
            state.finished = True
            idle = [lease for lease in state.leases if not lease.released and not lease.pulls]
            for lease in idle:
                lease.released = True
        for lease in idle:
            self._resolver.release(lease)
        if state.params.is_producer:
            self._handoffs.producer_finished(state.params.handoff_id)
        if state.timed_out:
            self._metrics.count(metrics.LOOKUPS, state.timed_out, "timeout")

    # -- consumer -------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        state = req_context.get_state(ConsumerState)
        if state is None or not (self._can_ask or state.params.source is not None):
            return LookupResult.MISS
        result = state.answer(key)
        if result is LookupResult.RETRY and state.unsent:
            self._consumers[id(state)] = state
        return result

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        """Hand the keys first asked this step to the resolver, one batch per request."""
        if not self._consumers:
            return
        states, self._consumers = list(self._consumers.values()), {}
        for state in states:
            keys = state.take_unsent()
            if keys:
                self._resolver.submit(state, keys)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._puller.submit(job_metadata, job_metadata.req_context.get_state(ConsumerState))

    # -- holder ---------------------------------------------------------------

    def submit_store(self, job_metadata: TransferJob) -> None:
        """Publish the stored keys; park a PD producer's job, else report it at once."""
        keys = [bytes(k) for k in job_metadata.keys]
        self._publisher.publish(keys)
        state = job_metadata.req_context.get_state(ConsumerState)
        params: RequestParams = state.params if state is not None else PLAIN
        if params.is_producer and self._handoffs.park(params.handoff_id, job_metadata):
            return
        self._outbox.put(JobResult(job_metadata.job_id, True, transfer_bytes=0))

    def serve_external_requests(self, parent: ParentManager) -> None:
        self._source.serve(parent)
        self._publisher.reconcile(parent)

    def _withdraw_missing(self, keys: list[bytes]) -> None:
        self._publisher.withdraw_missing(keys)

    # -- jobs -----------------------------------------------------------------

    def get_finished_jobs(self) -> Iterable[JobResult]:
        return self._outbox.take()

    def has_pending_work(self) -> bool:
        return bool(
            len(self._outbox)
            or self._source.has_queued
            or self._consumers
            or self._resolver.busy
            or self._puller.busy
        )

    def drain_jobs(self) -> None:
        """Wait for pulls in flight, then end every serve lease and parked handoff.

        Called by vLLM's ``reset_cache`` under its lock, before it wipes the primary
        tier: afterwards no kvpeer thread reads or writes primary rows, and every
        job is in the outbox. Pulls are never aborted; streams being served finish
        (they have deadlines) before their leases end.
        """
        self._puller.drain()
        self._server.revoke_leases()
        self._handoffs.end_all("reset")

    def shutdown(self) -> None:
        """Stop every thread and socket within a few seconds; called without vLLM's lock."""
        self._stopping.set()
        self._starter.join(timeout=SHUTDOWN_GRACE_S)
        self._resolver.close()
        self._puller.close(SHUTDOWN_GRACE_S)
        self._server.stop(grace=SHUTDOWN_GRACE_S)
        self._source.close()
        self._handoffs.close()
        if self._directory is not None:
            self._directory.close()
        self._pool.close_all()
        self._rows.close()

    # -- metrics --------------------------------------------------------------

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        return dict(metrics.DEFINITIONS)

    def get_stats(self) -> OffloadingConnectorStats | None:
        served = self._server.stats()
        now = (
            served["chunks_served"],
            served["bytes_served"],
            served["chunks_mapped"],
            served["bytes_mapped"],
        )
        metrics.count_served(self._metrics, now, self._served)
        self._served = now
        return self._metrics.take()

    @classmethod
    def config_info_keys(cls, tier_config: dict[str, Any]) -> tuple[str, ...]:
        return PeerTierInfo.config_info_keys()

    def config_info(self) -> ConfigInfoMapping:
        return PeerTierInfo(
            kvpeer_node_id=self.node_id,
            kvpeer_endpoint=self.endpoint,
            kvpeer_directory=",".join(map(str, self.config.directory)),
            kvpeer_fingerprint=self.fingerprint.digest,
        ).as_config_info()


def _offset(endpoint, dp_index: int):
    """One endpoint per data-parallel replica: base port + replica index (port 0 stays 0)."""
    return (
        endpoint
        if not endpoint.port or not dp_index
        else endpoint.with_port(endpoint.port + dp_index)
    )


def _offset_port(port: int | None, dp_index: int) -> int | None:
    """The pull port of a data-parallel replica, as :func:`_offset` (0 and None stay)."""
    return port + dp_index if port else port
