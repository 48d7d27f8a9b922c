"""Pull throughput: kvpeer's chunk stream against raw TCP, between two processes on loopback.

    python benchmarks/pull_throughput.py --total-mib 256 --chunk-mib 2 --streams 1 4 \
        --transport h2 grpc --repeat 5

Every path moves the same synthetic rows (``--total-mib`` in ``--chunk-mib`` rows)
from a server process into a preallocated buffer of this process: raw TCP with
``recv_into``, and kvpeer with lookup + pull (digests verified) + release, once
per pull transport (``h2``: kvpeer.h2pull, rows received in place; ``grpc``:
grpcio's stream) and stream count. Both transports pull from the same peer server
process. Repetitions are interleaved so that machine noise hits every path alike;
the medians, their ratio to raw TCP and the median of each repetition's ratio
("paired") are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from kvpeer.bench.pull import PeerNodeProcess, bench_fingerprint, timed_pull
from kvpeer.bench.rawtcp import RawTcpSender, receive
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.peer_client import PULL_TRANSPORTS, PeerClient

SEED = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per repetition")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="size of one row")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="pull streams")
    parser.add_argument(
        "--transport",
        nargs="+",
        choices=PULL_TRANSPORTS,
        default=list(PULL_TRANSPORTS),
        help="pull transports to measure",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC connections per client (grpc transport)"
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
    paths = [(t, s) for t in args.transport for s in args.streams]
    samples: dict[str, list[float]] = {"raw_tcp": []}
    samples.update({_name(t, s): [] for t, s in paths})

    print(
        f"moving {total / 2**20:.0f} MiB in {num_chunks} rows of {chunk_bytes} bytes, "
        f"{args.repeat} interleaved repetitions (medians; this machine is shared, so noisy)"
    )
    with (
        RawTcpSender(num_chunks, chunk_bytes, SEED) as sender,
        PeerNodeProcess(num_chunks, chunk_bytes, SEED) as node,
    ):
        clients = {
            transport: PeerClient(
                node.endpoint,
                node_id=f"bench-client-{transport}",
                fingerprint=bench_fingerprint(chunk_bytes),
                chunk_bytes=chunk_bytes,
                channels=args.channels,
                pull_transport=transport,
            )
            for transport in args.transport
        }
        for client in clients.values():
            client.handshake()
        for repetition in range(args.repeat):
            dest.fill(0)
            seconds = receive(sender.port, memoryview(dest))
            _check(dest, expected, "raw TCP")
            samples["raw_tcp"].append(total / seconds / 1e9)
            for transport, streams in paths:
                dest.fill(0)
                seconds = timed_pull(clients[transport], keys, dest, streams=streams)
                _check(dest, expected, f"kvpeer {transport}")
                samples[_name(transport, streams)].append(total / seconds / 1e9)
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
    print(f"{'path':<24} {'median GB/s':>12} {'vs raw TCP':>11} {'paired':>7}")
    for name, value in medians.items():
        print(f"{name:<24} {value:>12.2f} {value / baseline:>10.0%} {paired[name]:>7.0%}")
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
                },
                f,
                indent=2,
            )
    return 0


def _name(transport: str, streams: int) -> str:
    return f"kvpeer_{transport}_{streams}_streams"


def _check(dest: np.ndarray, expected: np.ndarray, what: str) -> None:
    if not np.array_equal(dest, expected):
        raise SystemExit(f"{what} delivered wrong bytes")


if __name__ == "__main__":
    sys.exit(main())
