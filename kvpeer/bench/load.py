"""The load test: consumers pull concurrently from holders that keep storing and evicting.

A directory process, ``holders`` holder nodes and ``consumers`` consumer nodes,
each a :class:`~kvpeer.sim.node.NodeProcess` (vLLM's real
``TieringOffloadingManager`` with ``PeerSecondaryTier`` over ``/dev/shm``, Llama-3-8B
rows of 2 MiB), all joined to the directory:

- every holder first fills its primary tier (``holder_chunks`` rows) with prompts
  of ``prompt_chunks`` chunks, then stores a new prompt every ``store_interval_s``
  during the load, which evicts its oldest while the directory still lists them;
  a prompt becomes requestable once the directory has its keys;
- every consumer runs ``threads`` request threads; each takes one of the
  ``recent_prompts`` latest prompts it has not asked for yet (some already
  evicted at their holder: stale entries, which must cost a MISS, never wrong
  bytes) and requests it with no parameters and nothing computed: lookup through
  the directory, pin at a holder, pull into the consumer's primary rows;
- the consumer node compares every row it loaded with the row its holder
  computed (rows derive from their keys), so a wrong row is counted, not missed;
- the run stops once ``target_bytes`` have been loaded; then every node must
  release every pin and lease within ``settle_timeout_s``.

Before the load, a baseline in the same run: one consumer requests prompts one at
a time from an otherwise idle cluster. The report gives throughput, p50/p99 of the
per-request pull latency (the node's ``lookup_s + load_s``: first lookup until
the rows are in its primary tier and read) for requests that loaded, the ratios
to the baseline, full/partial/miss counts, wrong rows and leaked pins.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from kvpeer.bench.tier import close_concurrently
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess, NodeSpec
from kvpeer.sim.rows import chunk_keys

#: Llama-3-8B KV of one 16-token block in bf16: one chunk.
CHUNK_BYTES = 2 << 20
_SHAPE = "llama3-8b"


@dataclass(frozen=True)
class LoadConfig:
    """The size of a load run. The defaults are the full test (>= 2 GiB, 32 pulls at once)."""

    holders: int = 4
    consumers: int = 4
    #: Request threads per consumer: pulls in flight = consumers x threads.
    threads: int = 8
    prompt_chunks: int = 16
    #: The run stops once the consumers have loaded this many bytes.
    target_bytes: int = 2 << 30
    #: Primary rows of a holder; it keeps about holder_chunks / prompt_chunks prompts.
    holder_chunks: int = 128
    store_interval_s: float = 1.0
    #: Consumers pick among this many latest prompts (0: 1.5x what the holders keep).
    recent_prompts: int = 0
    pull_streams: int = 2
    #: A request's patience; generous, as 8 nodes share the machine's cores.
    lookup_timeout_s: float = 10.0
    lease_ttl_s: float = 10.0
    baseline_requests: int = 4
    settle_timeout_s: float = 60.0
    #: The load stops here even if target_bytes has not moved (then it falls short).
    max_load_s: float = 600.0

    @property
    def holder_prompts(self) -> int:
        """Prompts a holder's primary tier keeps."""
        return self.holder_chunks // self.prompt_chunks

    @property
    def consumer_chunks(self) -> int:
        """Primary rows of a consumer: every thread's prompt pinned at once, plus room."""
        return (self.threads + 2) * self.prompt_chunks

    @property
    def window(self) -> int:
        if self.recent_prompts:
            return self.recent_prompts
        return max(self.holders, self.holders * self.holder_prompts * 3 // 2)


#: The CI-sized run (tests/test_load.py).
QUICK = LoadConfig(
    holders=2,
    consumers=2,
    threads=4,
    prompt_chunks=8,
    target_bytes=512 << 20,
    holder_chunks=48,
    store_interval_s=0.2,
    baseline_requests=2,
)


@dataclass(frozen=True)
class Sample:
    """One request's outcome, from the consumer node's report."""

    consumer: int
    chunks: int
    hit_chunks: int
    verified_chunks: int
    wrong_chunks: int
    bytes_loaded: int
    latency_s: float
    started: float
    ended: float

    @property
    def outcome(self) -> str:
        if self.hit_chunks == self.chunks:
            return "full"
        return "partial" if self.hit_chunks else "miss"


@dataclass
class LoadResult:
    """Everything a run measured; :meth:`format` prints it, :meth:`to_json` saves it."""

    config: LoadConfig
    baseline: list[Sample]
    samples: list[Sample]
    wall_s: float
    #: Prompts the holders stored, the warm-up's included.
    prompts_stored: int
    store_shortfalls: int
    #: Per node name, after the settle wait: primary rows still ``pinned``, chunk
    #: server ``leases`` still live, vLLM ``jobs`` and row ``views`` still open.
    leftovers: dict[str, dict[str, int]]
    #: Chunks each node's chunk server streamed during the load.
    served_chunks: dict[str, int]
    #: Counters of the consumers' tier metrics, summed: {metric: {label: value}}.
    consumer_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    settle_s: float = 0.0

    @property
    def bytes_loaded(self) -> int:
        return sum(s.bytes_loaded for s in self.samples)

    @property
    def gbps(self) -> float:
        return self.bytes_loaded / self.wall_s / 1e9 if self.wall_s else 0.0

    @property
    def wrong_rows(self) -> int:
        return sum(s.wrong_chunks for s in self.samples + self.baseline)

    @property
    def leaked_pins(self) -> int:
        """Primary rows still pinned plus leases still live, over every node."""
        return sum(left["pinned"] + left["leases"] for left in self.leftovers.values())

    @property
    def open_jobs(self) -> int:
        """vLLM jobs and row views still open, over every node."""
        return sum(left["jobs"] + left["views"] for left in self.leftovers.values())

    def outcomes(self) -> dict[str, int]:
        counts = {"full": 0, "partial": 0, "miss": 0}
        for sample in self.samples:
            counts[sample.outcome] += 1
        return counts

    def latencies(self, samples: list[Sample] | None = None) -> dict[str, float]:
        """p50/p99 (seconds) of the requests that loaded something."""
        chosen = self.samples if samples is None else samples
        loaded = sorted(s.latency_s for s in chosen if s.bytes_loaded)
        return {"p50_s": _percentile(loaded, 50), "p99_s": _percentile(loaded, 99)}

    def baseline_gbps(self) -> float:
        """Median GB/s of one request alone (its bytes over its pull latency)."""
        rates = [s.bytes_loaded / s.latency_s / 1e9 for s in self.baseline if s.bytes_loaded]
        return statistics.median(rates) if rates else 0.0

    def summary(self) -> dict[str, Any]:
        base = self.baseline_gbps()
        base_p50 = self.latencies(self.baseline)["p50_s"]
        latency = self.latencies()
        return {
            "requests": len(self.samples),
            **self.outcomes(),
            "gb_loaded": self.bytes_loaded / 1e9,
            "wall_s": self.wall_s,
            "gbps": self.gbps,
            **latency,
            "baseline_gbps_per_request": base,
            "baseline_p50_s": base_p50,
            "gbps_vs_baseline": self.gbps / base if base else None,
            "p50_vs_baseline": latency["p50_s"] / base_p50 if base_p50 else None,
            "wrong_rows": self.wrong_rows,
            "leaked_pins": self.leaked_pins,
            "open_jobs": self.open_jobs,
            "prompts_stored": self.prompts_stored,
            "store_shortfalls": self.store_shortfalls,
            "settle_s": self.settle_s,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "summary": self.summary(),
            "leftovers": self.leftovers,
            "served_chunks": self.served_chunks,
            "consumer_metrics": self.consumer_metrics,
            "baseline": [asdict(s) for s in self.baseline],
            "samples": [asdict(s) for s in self.samples],
        }

    def format(self) -> str:
        c, s = self.config, self.summary()
        alone = (
            f"  ({s['gbps_vs_baseline']:.2f}x one request alone: "
            f"{s['baseline_gbps_per_request']:.2f} GB/s)"
            if s["gbps_vs_baseline"]
            else ""
        )
        alone_p50 = (
            f"  (p50 alone {s['baseline_p50_s'] * 1e3:.0f} ms: {s['p50_vs_baseline']:.1f}x)"
            if s["p50_vs_baseline"]
            else ""
        )
        lines = [
            f"load: {c.holders} holders, {c.consumers} consumers x {c.threads} threads "
            f"({c.consumers * c.threads} pulls in flight), prompts of {c.prompt_chunks} x "
            f"{CHUNK_BYTES >> 20} MiB, holders keep {c.holder_chunks} rows and store a prompt "
            f"every {c.store_interval_s:g} s",
            f"  moved        {s['gb_loaded']:.2f} GB in {s['wall_s']:.1f} s = "
            f"{s['gbps']:.2f} GB/s{alone}",
            f"  latency      p50 {s['p50_s'] * 1e3:.0f} ms, "
            f"p99 {s['p99_s'] * 1e3:.0f} ms{alone_p50}",
            f"  requests     {s['requests']}: {s['full']} full, {s['partial']} partial, "
            f"{s['miss']} miss",
            f"  wrong rows   {s['wrong_rows']}",
            f"  leaked pins  {s['leaked_pins']} (pinned rows + live leases on every node, "
            f"{s['settle_s']:.1f} s after the load); open jobs and row views {s['open_jobs']}",
            f"  holders      {s['prompts_stored']} prompts stored, "
            f"{s['store_shortfalls']} stores short of rows",
            "  served       "
            + ", ".join(f"{name} {chunks}" for name, chunks in self.served_chunks.items()),
        ]
        for name, values in sorted(self.consumer_metrics.items()):
            shown = ", ".join(
                f"{label or '-'} {value:g}" for label, value in sorted(values.items())
            )
            lines.append(f"  {name.removeprefix('vllm:')}: {shown}")
        return "\n".join(lines)


def run_load(config: LoadConfig, *, log_dir: str | None = None) -> LoadResult:
    """Start the cluster, measure the baseline and the load, stop everything."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="kvpeer-load-")
    os.makedirs(log_dir, exist_ok=True)
    directory = DirectoryProcess(["--lease-ttl", "10"], metrics=False)
    nodes: list[NodeProcess] = []
    try:
        holders = [
            _node(f"load-holder-{i}", config.holder_chunks, config, directory, log_dir)
            for i in range(config.holders)
        ]
        consumers = [
            _node(f"load-consumer-{i}", config.consumer_chunks, config, directory, log_dir)
            for i in range(config.consumers)
        ]
        nodes = holders + consumers
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(timeout_s=600)
        return _Run(config, holders, consumers).measure()
    finally:
        close_concurrently(lambda node=node: _stop(node) for node in nodes)
        directory.close()


# -- private ---------------------------------------------------------------------


def _node(
    name: str, rows: int, config: LoadConfig, directory: DirectoryProcess, log_dir: str
) -> NodeProcess:
    tier = {
        "listen": "127.0.0.1:0",
        "directory": directory.endpoint,
        "lookup_timeout_s": config.lookup_timeout_s,
        "lease_ttl_s": config.lease_ttl_s,
        "pull_streams": config.pull_streams,
        "max_concurrent_pulls": config.threads,
    }
    spec = NodeSpec(
        name, tier, shape=_SHAPE, cpu_bytes=rows * CHUNK_BYTES, env={"PYTHONHASHSEED": "0"}
    )
    return NodeProcess(spec, log_path=os.path.join(log_dir, f"{name}.log"))


def _stop(node: NodeProcess) -> None:
    if node.proc is None or node.proc.poll() is not None:
        return
    try:
        node.stop(timeout_s=30)
    except Exception:
        node.kill()


@dataclass(frozen=True)
class _Prompt:
    number: int
    keys: list[str]


class _Catalog:
    """Prompts the holders stored, newest last; each consumer asks for each at most once.

    Thread-safe: holder store threads add, consumer request threads pick.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._prompts: list[_Prompt] = []
        self._taken: dict[int, set[int]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._prompts)

    def add(self, keys: list[str]) -> None:
        with self._lock:
            self._prompts.append(_Prompt(len(self._prompts), keys))

    def pick(self, consumer: int, rng: random.Random) -> _Prompt | None:
        """A random recent prompt ``consumer`` has not asked for; None if there is none."""
        with self._lock:
            taken = self._taken.setdefault(consumer, set())
            recent = [p for p in self._prompts[-self._window :] if p.number not in taken]
            if not recent:
                return None
            prompt = rng.choice(recent)
            taken.add(prompt.number)
            return prompt


class _Run:
    """One measurement over started nodes (the caller stops them)."""

    def __init__(
        self, config: LoadConfig, holders: list[NodeProcess], consumers: list[NodeProcess]
    ) -> None:
        self.config = config
        self.holders = holders
        self.consumers = consumers
        self.catalog = _Catalog(config.window)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._loaded = 0
        self._shortfalls = 0
        self._errors: list[str] = []

    @property
    def nodes(self) -> list[NodeProcess]:
        return self.holders + self.consumers

    def measure(self) -> LoadResult:
        baseline = self._baseline()
        self._warm_up()
        for node in self.nodes:
            node.call("stats")  # the load's counters start from zero
        served_before = {n.spec.name: n.call("served")["chunks"] for n in self.nodes}
        storers = [
            threading.Thread(target=self._store_loop, args=(i, h), name=f"store-{i}")
            for i, h in enumerate(self.holders)
        ]
        for thread in storers:
            thread.start()
        try:
            pullers = [
                threading.Thread(
                    target=self._request_loop,
                    args=(c, node, random.Random(c * 1000 + t)),
                    name=f"pull-{c}-{t}",
                )
                for c, node in enumerate(self.consumers)
                for t in range(self.config.threads)
            ]
            for thread in pullers:
                thread.start()
            deadline = time.monotonic() + self.config.max_load_s
            for thread in pullers:
                thread.join(max(0.0, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    self._stop.set()  # threads end after their request in flight
            for thread in pullers:
                thread.join()
        finally:
            self._stop.set()
            for thread in storers:
                thread.join()
        if self._errors:
            raise RuntimeError("load run failed: " + "; ".join(self._errors[:3]))
        samples = self._samples
        if not samples:
            raise RuntimeError("load run failed: no request ran")
        wall = max(s.ended for s in samples) - min(s.started for s in samples)
        settle_s, leftovers = self._settle()
        served = {
            n.spec.name: n.call("served")["chunks"] - served_before[n.spec.name] for n in self.nodes
        }
        return LoadResult(
            config=self.config,
            baseline=baseline,
            samples=samples,
            wall_s=wall,
            prompts_stored=len(self.catalog),
            store_shortfalls=self._shortfalls,
            leftovers=leftovers,
            served_chunks=served,
            consumer_metrics=_sum_counters(c.call("stats") for c in self.consumers),
            settle_s=settle_s,
        )

    def _baseline(self) -> list[Sample]:
        """One consumer, one request at a time, nothing else running."""
        holder, consumer = self.holders[0], self.consumers[0]
        samples = []
        for n in range(self.config.baseline_requests):
            keys = [k.hex() for k in chunk_keys(f"baseline/{n}", self.config.prompt_chunks)]
            holder.call("store", keys=keys)
            holder.call("flush")
            samples.append(self._request(0, consumer, keys))
        return samples

    def _warm_up(self) -> None:
        """Every holder fills its primary tier with prompts (side by side)."""
        with ThreadPoolExecutor(len(self.holders)) as pool:
            futures = [
                pool.submit(self._store, i, holder, n)
                for n in range(self.config.holder_prompts)
                for i, holder in enumerate(self.holders)
            ]
        for future in futures:
            future.result()

    def _store_loop(self, index: int, holder: NodeProcess) -> None:
        """A holder's thread: a new prompt every store_interval_s until the run stops."""
        number = self.config.holder_prompts  # the warm-up stored the ones before
        while not self._stop.wait(self.config.store_interval_s):
            try:
                self._store(index, holder, number)
            except Exception as exc:
                self._fail(f"holder {index} store: {exc}")
                return
            number += 1

    def _store(self, index: int, holder: NodeProcess, number: int) -> None:
        """``holder`` computes and stores a prompt; it is requestable once published."""
        name = f"holder-{index}/prompt-{number}"
        keys = [k.hex() for k in chunk_keys(name, self.config.prompt_chunks)]
        if holder.call("store", keys=keys) < len(keys):
            with self._lock:
                self._shortfalls += 1  # rows pinned by readers: vLLM stored fewer
        holder.call("flush")
        self.catalog.add(keys)

    def _request_loop(self, index: int, consumer: NodeProcess, rng: random.Random) -> None:
        """A consumer's request thread: recent prompts, one at a time, until enough moved."""
        while not self._stop.is_set():
            with self._lock:
                if self._loaded >= self.config.target_bytes:
                    return
            prompt = self.catalog.pick(index, rng)
            if prompt is None:
                self._stop.wait(0.05)
                continue
            try:
                sample = self._request(index, consumer, prompt.keys)
            except Exception as exc:
                self._fail(f"consumer {index} request: {exc}")
                return
            with self._lock:
                self._samples.append(sample)
                self._loaded += sample.bytes_loaded

    def _request(self, index: int, consumer: NodeProcess, keys: list[str]) -> Sample:
        started = time.monotonic()
        report = consumer.call("request", keys=keys, compute=False, timeout_s=300)
        return Sample(
            consumer=index,
            chunks=len(keys),
            hit_chunks=report["hit_chunks"],
            verified_chunks=report["verified_chunks"],
            wrong_chunks=len(report["wrong_chunks"]),
            bytes_loaded=report["verified_chunks"] * CHUNK_BYTES,
            latency_s=report["lookup_s"] + report["load_s"],
            started=started,
            ended=time.monotonic(),
        )

    def _fail(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)
        self._stop.set()

    def _settle(self) -> tuple[float, dict[str, dict[str, int]]]:
        """Wait until no node pins a row or holds a lease; what is left at the deadline."""
        started = time.monotonic()
        deadline = started + self.config.settle_timeout_s
        while True:
            left = {node.spec.name: _leftovers(node) for node in self.nodes}
            if not any(any(v.values()) for v in left.values()) or time.monotonic() > deadline:
                return time.monotonic() - started, left
            time.sleep(0.2)


def _leftovers(node: NodeProcess) -> dict[str, int]:
    state = node.call("tier_state")
    return {
        "pinned": node.call("pinned"),
        "leases": node.call("leases")["live"],
        "jobs": state["jobs"],
        "views": state["open_row_views"],
    }


def _sum_counters(stats: Any) -> dict[str, dict[str, float]]:
    """Sum the kvpeer counters (lookups, failures...) of several ``stats`` results."""
    total: dict[str, dict[str, float]] = {}
    for one in stats:
        for name, values in one.items():
            if not name.startswith("vllm:kvpeer_"):
                continue
            for label, value in values.items():
                if isinstance(value, (int, float)):
                    total.setdefault(name, {}).setdefault(label, 0)
                    total[name][label] += value
    return total


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
