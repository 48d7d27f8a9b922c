"""Directory scale-out: publish keys/s and Locate latency with 1, 2 and 4 replicas.

Each setup runs real ``kvpeer directory`` processes (:class:`DirectoryProcess`) on
one real ``redis-server`` or on a real 3-primary Redis Cluster, and drives them from
``drivers`` separate processes (so the load is not one Python interpreter's), each
simulating ``nodes_per_driver`` nodes. A simulated node joins through replica
``i % replicas`` and publishes batches of ``batch`` fresh keys back to back, the way
a node's publisher sends what its tier stored (a node storing 2 GB/s of 2 MiB chunks
publishes ~1,000 keys/s in batches of ~50). One thread per driver locates 64 held
keys every 10 ms and records the latency. Reported per setup: aggregate published
keys/s, Locate p50/p99, the CPU each component spent per key, and how the Redis
work splits over the Redis processes (the busiest one's share).

On the cluster the directory runs twice in the same run: with its default layout
(a shard per primary) and with ``?shards=1`` (every key in one slot, so one primary
does all the work), the cluster flushed in between.

Everything shares this machine's cores: the ratios show where the work goes (the
directory processes or Redis, one primary or all), not what separate machines would
reach.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpeer.sim.directory import DirectoryProcess

#: Keys/s one busy node publishes (2 GB/s of 2 MiB chunks).
NODE_KEYS_PER_S = 1000
LOCATE_KEYS = 64


@dataclass(frozen=True)
class ScalingResult:
    setup: str
    replicas: int
    publish_keys_per_s: float
    locate_p50_ms: float
    locate_p99_ms: float
    #: CPU time per published key: of all directory processes, and of Redis.
    directory_cpu_us_per_key: float
    redis_cpu_us_per_key: float
    #: The busiest Redis process's share of all Redis CPU time (1.0 with one Redis).
    redis_busiest_share: float = 1.0

    @property
    def nodes_carried(self) -> int:
        return int(self.publish_keys_per_s // NODE_KEYS_PER_S)

    def nodes_per_core(self, cpu_us_per_key: float) -> int:
        """1,000 keys/s nodes one core of this kind carries, at this cost per key."""
        return int(1e6 / max(cpu_us_per_key, 1e-9) / NODE_KEYS_PER_S)


def _cpu_s(pids: Sequence[int]) -> list[float]:
    """User + system CPU seconds of each process, from /proc (0 for ones that are gone)."""
    seconds = []
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            seconds.append(0.0)
            continue
        seconds.append((int(fields[11]) + int(fields[12])) / tick)
    return seconds


def _drive(
    endpoints: Sequence[str], first_node: int, nodes: int, batch: int, seconds: float
) -> tuple[int, list[float]]:
    """One driver process: ``nodes`` publishing nodes and one locating thread."""
    import grpc

    from kvpeer.api.fingerprint import Fingerprint
    from kvpeer.v1 import directory_pb2 as pb
    from kvpeer.v1 import directory_pb2_grpc

    fp = Fingerprint.of(model="scaling", dtype="float16", tokens_per_hash=16)
    published = [0] * nodes
    latencies: list[float] = []
    start = time.monotonic() + 1.0  # every node joined before the clock starts
    deadline = start + seconds
    held: list[bytes] = []

    def node(i: int) -> None:
        node_id = f"n{first_node + i}"
        channel = grpc.insecure_channel(endpoints[(first_node + i) % len(endpoints)])
        stub = directory_pb2_grpc.DirectoryStub(channel)
        epoch = stub.Join(
            pb.JoinRequest(node_id=node_id, endpoint=f"{node_id}:7601", fingerprint=fp.to_proto()),
            timeout=10,
        ).epoch
        serial = 0
        while time.monotonic() < deadline:
            keys = [f"{node_id}/{serial + j}".encode().ljust(36, b"\0") for j in range(batch)]
            serial += batch
            stub.Publish(pb.PublishRequest(node_id=node_id, epoch=epoch, keys=keys), timeout=10)
            if not held:
                held.extend(keys[:LOCATE_KEYS])
            if time.monotonic() >= start:
                published[i] += batch
        channel.close()

    def locate() -> None:
        channel = grpc.insecure_channel(endpoints[first_node % len(endpoints)])
        stub = directory_pb2_grpc.DirectoryStub(channel)
        while time.monotonic() < deadline:
            if time.monotonic() >= start and held:
                began = time.perf_counter()
                stub.Locate(pb.LocateRequest(fingerprint=fp.digest, keys=held), timeout=10)
                latencies.append(time.perf_counter() - began)
            time.sleep(0.01)
        channel.close()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(nodes)]
    threads.append(threading.Thread(target=locate))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(published), latencies


def measure(
    setup: str,
    store: str,
    replicas: int,
    *,
    store_pids: Sequence[int] = (),
    drivers: int = 3,
    nodes_per_driver: int = 4,
    batch: int = 64,
    seconds: float = 4.0,
) -> ScalingResult:
    """Start ``replicas`` directories on ``store`` and drive them; the result.

    ``store_pids``: the Redis processes, whose CPU time is reported per key.
    """
    with ExitStack() as stack:
        processes = [
            stack.enter_context(DirectoryProcess(["--store", store, "--lease-ttl", "60"]))
            for _ in range(replicas)
        ]
        endpoints = [p.endpoint for p in processes]
        directory_pids = [p.pid for p in processes]
        context = multiprocessing.get_context("spawn")
        with context.Pool(drivers) as pool:
            before = _cpu_s(directory_pids), _cpu_s(store_pids)
            jobs = [
                pool.apply_async(
                    _drive, (endpoints, d * nodes_per_driver, nodes_per_driver, batch, seconds)
                )
                for d in range(drivers)
            ]
            outcomes = [job.get(timeout=seconds + 120) for job in jobs]
            after = _cpu_s(directory_pids), _cpu_s(store_pids)
    total = sum(count for count, _ in outcomes)
    # The CPU was measured over the joins and warm-up second too: an upper bound.
    spent = [
        [b - a for a, b in zip(*pair, strict=True)] for pair in zip(before, after, strict=True)
    ]
    per_key = [sum(each) * 1e6 / max(1, total) for each in spent]
    busiest = max(spent[1]) / sum(spent[1]) if sum(spent[1]) > 0 else 1.0
    latencies = sorted(x for _, values in outcomes for x in values)
    p99 = latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] if latencies else 0.0
    return ScalingResult(
        setup,
        replicas,
        total / seconds,
        statistics.median(latencies) * 1000 if latencies else 0.0,
        p99 * 1000,
        per_key[0],
        per_key[1],
        busiest,
    )


def run_scaling(
    redis: tuple[str, Sequence[int]],
    cluster: tuple[str, Sequence[int], Callable[[], None]] | None,
    **options: Any,
) -> list[ScalingResult]:
    """1, 2, 4 replicas on one Redis, then 4 on the cluster: one shard, then sharded.

    ``redis`` is ``(url, pids)``; ``cluster`` is ``(url, pids, flush)``, ``flush``
    emptying the cluster between its two setups (they are different layouts).
    """
    url, pids = redis
    results = [measure(f"{n} on one Redis", url, n, store_pids=pids, **options) for n in (1, 2, 4)]
    if cluster is not None:
        url, pids, flush = cluster
        for setup, store in (
            ("4 on cluster, 1 shard", f"{url}?shards=1"),
            ("4 on cluster, sharded", url),
        ):
            flush()
            results.append(measure(setup, store, 4, store_pids=pids, **options))
    return results


def format_scaling(results: Sequence[ScalingResult]) -> str:
    base = results[0]
    lines = [
        f"{'replicas':24s} {'publish keys/s':>15s} {'vs 1':>6s} {'Locate p50':>11s} "
        f"{'p99':>9s} {'p99 vs 1':>9s} {'dir us/key':>11s} {'redis us/key':>13s} "
        f"{'busiest redis':>14s}"
    ]
    for r in results:
        lines.append(
            f"{r.setup:24s} {r.publish_keys_per_s:15,.0f} "
            f"{r.publish_keys_per_s / base.publish_keys_per_s:6.2f} {r.locate_p50_ms:8.2f} ms "
            f"{r.locate_p99_ms:6.2f} ms {r.locate_p99_ms / base.locate_p99_ms:9.2f} "
            f"{r.directory_cpu_us_per_key:11.2f} {r.redis_cpu_us_per_key:13.2f} "
            f"{r.redis_busiest_share:13.0%}"
        )
    lines.append(
        f"sizing (1 replica, one Redis): a directory core carries ~"
        f"{base.nodes_per_core(base.directory_cpu_us_per_key):,} nodes publishing "
        f"{NODE_KEYS_PER_S:,} keys/s, a Redis core ~"
        f"{base.nodes_per_core(base.redis_cpu_us_per_key):,}"
    )
    return "\n".join(lines)
