"""Directory throughput: Publish and Locate keys/s through a real directory process.

:class:`~kvpeer.sim.directory.DirectoryProcess` runs ``kvpeer directory`` (the
real command) as a child process. :func:`measure_store` drives it with raw gRPC stubs from this process —
the directory's own cost, not the client's batching — and returns:

- Publish and Locate throughput in keys/s for each batch size, one caller
  issuing calls back to back for about ``seconds_per_cell`` each;
- the floor of one unary call (a ``grpc.health.v1`` Check) as the baseline;
- the **server time** of a 1,000-key Locate: the mean of the servicer's own
  timer (``kvpeer_directory_request_seconds{method="Locate"}``, from the parsed
  request to the built response) over ``locate_samples`` calls, read from
  ``/metrics`` before and after.

``benchmarks/directory_throughput.py`` runs it for the memory and Redis stores
and prints the table with the Redis/memory ratios.
"""

from __future__ import annotations

import re
import statistics
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpeer.api.errors import KVPeerError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.bench.rows import synthetic_keys
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc

BATCH_SIZES = (1, 16, 256, 1024, 4096)
#: Keys in the Locate whose server time is reported.
SERVER_TIME_KEYS = 1000


@dataclass
class Cell:
    """Throughput of one operation at one batch size."""

    op: str
    batch: int
    keys_per_s: float
    calls: int
    median_call_ms: float


@dataclass
class StoreResult:
    store: str
    cells: list[Cell] = field(default_factory=list)
    unary_floor_ms: float = 0.0
    locate_server_ms: float = 0.0
    locate_client_median_ms: float = 0.0

    def cell(self, op: str, batch: int) -> Cell:
        return next(c for c in self.cells if c.op == op and c.batch == batch)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _timed_calls(call, batches: Sequence[list[bytes]], seconds: float) -> tuple[float, int, float]:
    """Call ``call(batch)`` over ``batches`` (cycling) for ~``seconds``.

    Returns (keys/s, calls, median ms per call).
    """
    times = []
    keys = 0
    started = time.perf_counter()
    i = 0
    while True:
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - t0)
        keys += len(batch)
        i += 1
        if time.perf_counter() - started >= seconds and i >= 3:
            break
    elapsed = time.perf_counter() - started
    return keys / elapsed, i, statistics.median(times) * 1000


def _locate_seconds(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the Locate server-time histogram, read from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name in ("sum", "count"):
        match = re.search(
            rf'^kvpeer_directory_request_seconds_{name}\{{method="Locate"\}} (\S+)$', text, re.M
        )
        values[name] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def measure_store(
    directory: DirectoryProcess,
    store: str,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seconds_per_cell: float = 1.0,
    locate_samples: int = 200,
    seed: int = 11,
) -> StoreResult:
    """Benchmark one running directory; see the module docstring."""
    if directory.metrics_port is None:
        raise KVPeerError("the directory must serve /metrics (server time is read there)")
    fingerprint = Fingerprint.of(model="kvpeer-directory-bench", seed=seed)
    result = StoreResult(store)
    with grpc.insecure_channel(directory.endpoint) as channel:
        stub = directory_pb2_grpc.DirectoryStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        epoch = {}
        for node in ("bench-a", "bench-b"):
            epoch[node] = stub.Join(
                pb.JoinRequest(
                    node_id=node, endpoint=f"{node}:7601", fingerprint=fingerprint.to_proto()
                ),
                timeout=10,
            ).epoch

        _, _, floor_ms = _timed_calls(
            lambda _b: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
            [[]],
            seconds_per_cell,
        )
        result.unary_floor_ms = floor_ms

        # Publish: fresh keys for every call, so each one really adds entries.
        offset = 0
        for size in batch_sizes:
            needed = max(size * 3, min(size * 2000, 300_000))
            keys = synthetic_keys(offset + needed, seed)[offset:]
            offset += needed
            batches = [keys[i : i + size] for i in range(0, len(keys) - size + 1, size)]

            def publish(batch: list[bytes]) -> None:
                stub.Publish(
                    pb.PublishRequest(node_id="bench-a", epoch=epoch["bench-a"], keys=batch),
                    timeout=30,
                )

            rate, calls, median = _timed_calls(publish, batches, seconds_per_cell)
            result.cells.append(Cell("publish", size, rate, calls, median))

        # Locate: keys held by bench-a; every other one also by bench-b (two holders).
        located = synthetic_keys(8192, seed + 1)
        for i in range(0, len(located), 4096):
            for node, step in (("bench-a", 1), ("bench-b", 2)):
                stub.Publish(
                    pb.PublishRequest(
                        node_id=node, epoch=epoch[node], keys=located[i : i + 4096 : step]
                    ),
                    timeout=30,
                )

        def locate(batch: list[bytes]) -> None:
            response = stub.Locate(
                pb.LocateRequest(
                    fingerprint=fingerprint.digest, keys=batch, exclude_node_id="bench-client"
                ),
                timeout=30,
            )
            if not response.holders[0].nodes:
                raise KVPeerError("Locate found nothing: the benchmark's keys were not published")

        for size in batch_sizes:
            batches = [located[i : i + size] for i in range(0, len(located) - size + 1, size)]
            rate, calls, median = _timed_calls(locate, batches, seconds_per_cell)
            result.cells.append(Cell("locate", size, rate, calls, median))

        sample = located[:SERVER_TIME_KEYS]
        before = _locate_seconds(directory.metrics_port)
        times = []
        for _ in range(locate_samples):
            t0 = time.perf_counter()
            locate(sample)
            times.append(time.perf_counter() - t0)
        after = _locate_seconds(directory.metrics_port)
        calls = after[1] - before[1]
        result.locate_server_ms = (after[0] - before[0]) / calls * 1000 if calls else 0.0
        result.locate_client_median_ms = statistics.median(times) * 1000
    return result
