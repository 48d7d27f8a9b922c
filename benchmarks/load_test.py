"""Load test: consumers pull concurrently from holders that keep storing and evicting.

    python benchmarks/load_test.py                  # 4 holders, 4 consumers x 8 threads, >= 2 GiB
    python benchmarks/load_test.py --quick          # the CI size (tests/test_load.py)
    python benchmarks/load_test.py --json load.json --log-dir /tmp/load-logs

Every node is a simulated vLLM node process (kvpeer.sim.node) with PeerSecondaryTier,
joined to one directory; see kvpeer.bench.load for the workload. Prints throughput,
p50/p99 pull latency against one request alone (the baseline, measured first in the
same run), full/partial/miss counts, wrong rows and leaked pins; exits 1 if any row
loaded was wrong or any pin, lease, job or row view was left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from kvpeer.bench.load import QUICK, LoadConfig, run_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI size (about a minute)")
    parser.add_argument("--holders", type=int, help="holder nodes")
    parser.add_argument("--consumers", type=int, help="consumer nodes")
    parser.add_argument("--threads", type=int, help="request threads per consumer")
    parser.add_argument("--gib", type=float, help="stop after loading this many GiB")
    parser.add_argument("--prompt-chunks", type=int, help="2 MiB chunks per prompt")
    parser.add_argument("--holder-chunks", type=int, help="primary rows per holder")
    parser.add_argument("--pull-streams", type=int, help="streams per pull")
    parser.add_argument("--json", metavar="FILE", help="write every sample and figure here")
    parser.add_argument("--log-dir", help="keep the nodes' logs here")
    args = parser.parse_args(argv)

    config = QUICK if args.quick else LoadConfig()
    overrides = {
        "holders": args.holders,
        "consumers": args.consumers,
        "threads": args.threads,
        "target_bytes": None if args.gib is None else int(args.gib * (1 << 30)),
        "prompt_chunks": args.prompt_chunks,
        "holder_chunks": args.holder_chunks,
        "pull_streams": args.pull_streams,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})

    result = run_load(config, log_dir=args.log_dir)
    print(result.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    if result.wrong_rows or result.leaked_pins or result.open_jobs:
        print(
            f"FAILED: {result.wrong_rows} wrong rows, {result.leaked_pins} leaked pins, "
            f"{result.open_jobs} open jobs or row views"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
