"""Pull throughput: kvpeer's chunk stream against raw TCP, between two processes on loopback.

    python benchmarks/pull_throughput.py --total-mib 256 --chunk-mib 2 --streams 4 --repeat 5

Both sides move the same synthetic rows (``--total-mib`` in ``--chunk-mib`` rows)
from a server process into a preallocated buffer of this process: raw TCP with
``recv_into``, and kvpeer with lookup + pull (digests verified) + release.
Repetitions are interleaved so that machine noise hits both alike; the medians
and their ratio are printed, and written as JSON with ``--json``.
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
from kvpeer.peer_client import PeerClient

SEED = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per repetition")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="size of one row")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="pull streams")
    parser.add_argument("--channels", type=int, default=1, help="TCP connections per client")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    chunk_bytes = int(args.chunk_mib * (1 << 20))
    num_chunks = max(1, (args.total_mib << 20) // chunk_bytes)
    total = num_chunks * chunk_bytes
    expected = synthetic_rows(num_chunks, chunk_bytes, SEED)
    keys = synthetic_keys(num_chunks, SEED)
    dest = np.empty_like(expected)
    samples: dict[str, list[float]] = {"raw_tcp": []}
    samples.update({f"kvpeer_{s}_streams": [] for s in args.streams})

    print(
        f"moving {total / 2**20:.0f} MiB in {num_chunks} rows of {chunk_bytes} bytes, "
        f"{args.repeat} interleaved repetitions (medians; this machine is shared, so noisy)"
    )
    with (
        RawTcpSender(num_chunks, chunk_bytes, SEED) as sender,
        PeerNodeProcess(num_chunks, chunk_bytes, SEED) as node,
        PeerClient(
            node.endpoint,
            node_id="bench-client",
            fingerprint=bench_fingerprint(chunk_bytes),
            chunk_bytes=chunk_bytes,
            channels=args.channels,
        ) as client,
    ):
        client.handshake()
        for repetition in range(args.repeat):
            dest.fill(0)
            seconds = receive(sender.port, memoryview(dest))
            _check(dest, expected, "raw TCP")
            samples["raw_tcp"].append(total / seconds / 1e9)
            for streams in args.streams:
                dest.fill(0)
                seconds = timed_pull(client, keys, dest, streams=streams)
                _check(dest, expected, "kvpeer")
                samples[f"kvpeer_{streams}_streams"].append(total / seconds / 1e9)
            print(
                f"  repetition {repetition + 1}: "
                + ", ".join(f"{name} {values[-1]:.2f}" for name, values in samples.items())
            )

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["raw_tcp"]
    print(f"{'path':<20} {'median GB/s':>12} {'vs raw TCP':>11}")
    for name, value in medians.items():
        print(f"{name:<20} {value:>12.2f} {value / baseline:>10.0%}")
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
                },
                f,
                indent=2,
            )
    return 0


def _check(dest: np.ndarray, expected: np.ndarray, what: str) -> None:
    if not np.array_equal(dest, expected):
        raise SystemExit(f"{what} delivered wrong bytes")


if __name__ == "__main__":
    sys.exit(main())
