"""Directory throughput: Publish and Locate keys/s, memory store against Redis store.

    python benchmarks/directory_throughput.py [--redis redis://host:port/0] [--json FILE]
    python benchmarks/directory_throughput.py --scaling [--json FILE]

``--scaling`` instead runs :mod:`kvpeer.bench.directory_scaling`: 1, 2 and 4
directory replicas on one private Redis and 4 on a private 3-primary Redis Cluster
(once with one shard, once sharded, a shard per primary), driven by many concurrent
simulated nodes, with aggregate publish keys/s and Locate p50/p99 for each.

Runs ``kvpeer directory`` as a child process once per store (memory, then Redis:
a private ``redis-server`` is started unless ``--redis`` names one), drives it
with raw gRPC stubs for ``--seconds`` per cell and prints keys/s per batch size,
the Redis/memory ratio, the unary-call floor (a health check) and the server
time of a 1,000-key Locate (mean of the servicer's own timer, read from
/metrics). Numbers from a shared machine are noisy: rerun before trusting a
small difference.

Targets: 1,000-key Locate <= 2 ms server time (memory store); batched publishing
>= 200,000 keys/s; the Redis store within 3x of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

from kvpeer.bench.directory import BATCH_SIZES, StoreResult, measure_store
from kvpeer.sim.directory import DirectoryProcess


def _start_redis(stack: ExitStack) -> str:
    """A private redis-server (tests/support/redis_server.py) for this run; its URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.redis_server import RedisServer

    return stack.enter_context(RedisServer()).url


def _print_table(results: list[StoreResult], batch_sizes: list[int]) -> None:
    names = [r.store for r in results]
    header = f"{'op':8s} {'batch':>6s}" + "".join(f" {n + ' keys/s':>16s}" for n in names)
    if len(results) == 2:
        header += f" {names[1] + '/' + names[0]:>14s}"
    print(header)
    for op in ("publish", "locate"):
        for size in batch_sizes:
            cells = [r.cell(op, size) for r in results]
            line = f"{op:8s} {size:6d}" + "".join(f" {c.keys_per_s:16,.0f}" for c in cells)
            if len(cells) == 2:
                line += f" {cells[1].keys_per_s / cells[0].keys_per_s:14.2f}"
            print(line)
    print()
    for r in results:
        print(
            f"{r.store:7s} unary call floor {r.unary_floor_ms:.3f} ms; 1,000-key Locate: "
            f"server time {r.locate_server_ms:.3f} ms (mean of servicer timer), "
            f"client round trip {r.locate_client_median_ms:.3f} ms (median)"
        )
    if len(results) == 2:
        ratio = results[1].locate_server_ms / results[0].locate_server_ms
        print(f"1,000-key Locate server time {names[1]}/{names[0]}: {ratio:.2f}")


def _scaling(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvpeer.bench.directory_scaling import format_scaling, run_scaling
    from tests.support.redis_cluster import RedisCluster
    from tests.support.redis_server import RedisServer

    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        cluster = stack.enter_context(RedisCluster())
        results = run_scaling(
            (redis.url, [redis.pid]),
            (cluster.url, cluster.pids, cluster.flush),
            seconds=args.seconds_scaling,
        )
    print(format_scaling(results))
    if args.json:
        rows = [dict(r.__dict__) for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", help="use this Redis instead of starting one")
    parser.add_argument("--no-redis", action="store_true", help="measure the memory store only")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--locate-samples", type=int, default=200)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--scaling", action="store_true", help="replicas on Redis and on a Redis Cluster"
    )
    parser.add_argument(
        "--seconds-scaling", type=float, default=4.0, help="seconds per --scaling setup"
    )
    args = parser.parse_args(argv)
    if args.scaling:
        return _scaling(args)

    print(
        f"one caller, calls back to back, ~{args.seconds:.1f} s per cell; "
        "this machine is shared, so numbers are noisy"
    )
    results = []
    with ExitStack() as stack:
        stores = [("memory", "memory")]
        if not args.no_redis:
            stores.append(("redis", args.redis or _start_redis(stack)))
        for name, spec in stores:
            with DirectoryProcess(
                ["--store", spec, "--lease-ttl", "600"], metrics=True
            ) as directory:
                results.append(
                    measure_store(
                        directory,
                        name,
                        batch_sizes=args.batches,
                        seconds_per_cell=args.seconds,
                        locate_samples=args.locate_samples,
                    )
                )
    _print_table(results, args.batches)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
