"""Pull throughput: kvpeer's chunk stream against raw TCP, between two processes on loopback.

    python benchmarks/pull_throughput.py --total-mib 256 --chunk-mib 2 --streams 1 4 \
        --path h2 h2-main grpc --repeat 5

Every path moves the same synthetic rows (``--total-mib`` in ``--chunk-mib`` rows)
from a server process into a preallocated buffer of this process: raw TCP with
``recv_into``, and kvpeer with lookup + pull (digests verified) + release, once
per pull path and stream count. The paths (:data:`kvpeer.bench.pull.PULL_PATHS`):
``h2``, kvpeer.transport.pull_client from the server's pull port (rows sent with one ``sendmsg``
each, received in place: no user-space copy on either side); ``h2-main``, the same
client on the grpcio port (the server copies each row twice); ``grpc``, grpcio on
both ends. All kvpeer paths pull from the same peer server process. Repetitions
are interleaved so that machine noise hits every path alike; the medians, their
ratio to raw TCP, the median of each repetition's ratio ("paired"), and the CPU
seconds per GB moved of the sending process ("server") and of this process
("client", all threads) are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from kvpeer.bench.process import cpu_seconds
from kvpeer.bench.pull import PULL_PATHS, PeerNodeProcess, bench_fingerprint, timed_pull
from kvpeer.bench.rawtcp import RawTcpSender, receive
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClient

SEED = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per repetition")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="size of one row")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="pull streams")
    parser.add_argument(
        "--path",
        nargs="+",
        choices=list(PULL_PATHS),
        default=list(PULL_PATHS),
        help="pull paths to measure",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC connections per client (grpc path)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    chunk_bytes = int(args.chunk_mib * (1 << 20))
    num_chunks = max(1, (args.total_mib << 20) // chunk_bytes)
    total = num_chunks * chunk_bytes
    expected = synthetic_rows(num_chunks, chunk_bytes, SEED)
    keys = synthetic_keys(num_chunks, SEED)
    dest = np.empty_like(expected)
    runs = [(p, s) for p in args.path for s in args.streams]
    names = ["raw_tcp", *(_name(p, s) for p, s in runs)]
    samples: dict[str, list[float]] = {name: [] for name in names}
    server_cpu: dict[str, list[float]] = {name: [] for name in names}
    client_cpu: dict[str, list[float]] = {name: [] for name in names}

    print(
        f"moving {total / 2**20:.0f} MiB in {num_chunks} rows of {chunk_bytes} bytes, "
        f"{args.repeat} interleaved repetitions (medians; this machine is shared, so noisy)"
    )
    with (
        RawTcpSender(num_chunks, chunk_bytes, SEED) as sender,
        PeerNodeProcess(num_chunks, chunk_bytes, SEED) as node,
    ):
        clients = {
            path: PeerClient(
                node.endpoint,
                node_id=f"bench-client-{path}",
                fingerprint=bench_fingerprint(chunk_bytes),
                chunk_bytes=chunk_bytes,
                channels=args.channels,
                **PULL_PATHS[path],
            )
            for path in args.path
        }
        for client in clients.values():
            client.handshake()

        def measure(name: str, server_pid: int, transfer) -> None:
            dest.fill(0)
            server_before, client_before = cpu_seconds(server_pid), time.process_time()
            seconds = transfer()
            server_after, client_after = cpu_seconds(server_pid), time.process_time()
            if not np.array_equal(dest, expected):
                raise SystemExit(f"{name} delivered wrong bytes")
            samples[name].append(total / seconds / 1e9)
            server_cpu[name].append((server_after - server_before) / (total / 1e9))
            client_cpu[name].append((client_after - client_before) / (total / 1e9))

        for repetition in range(args.repeat):
            measure("raw_tcp", sender.pid, lambda: receive(sender.port, memoryview(dest)))
            for path, streams in runs:
                measure(
                    _name(path, streams),
                    node.pid,
                    lambda path=path, streams=streams: timed_pull(
                        clients[path], keys, dest, streams=streams
                    ),
                )
            print(
                f"  repetition {repetition + 1}: "
                + ", ".join(f"{name} {values[-1]:.2f}" for name, values in samples.items())
            )
        for client in clients.values():
            client.close()

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["raw_tcp"]
    # Each path against raw TCP in the same repetition: steadier when load comes and goes.
    paired = {
        name: statistics.median(v / raw for v, raw in zip(values, samples["raw_tcp"], strict=True))
        for name, values in samples.items()
    }
    cpu = {
        name: (statistics.median(server_cpu[name]), statistics.median(client_cpu[name]))
        for name in names
    }
    print(
        f"{'path':<24} {'median GB/s':>12} {'vs raw TCP':>11} {'paired':>7}"
        f" {'server CPU-s/GB':>16} {'client CPU-s/GB':>16}"
    )
    for name, value in medians.items():
        print(
            f"{name:<24} {value:>12.2f} {value / baseline:>10.0%} {paired[name]:>7.0%}"
            f" {cpu[name][0]:>16.2f} {cpu[name][1]:>16.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "total_bytes": total,
                    "chunk_bytes": chunk_bytes,
                    "channels": args.channels,
                    "samples_gbps": samples,
                    "median_gbps": medians,
                    "ratio_to_raw_tcp": {k: v / baseline for k, v in medians.items()},
                    "median_paired_ratio_to_raw_tcp": paired,
                    "server_cpu_s_per_gb": server_cpu,
                    "client_cpu_s_per_gb": client_cpu,
                },
                f,
                indent=2,
            )
    return 0


def _name(path: str, streams: int) -> str:
    return f"kvpeer_{path}_{streams}_streams"


if __name__ == "__main__":
    sys.exit(main())
