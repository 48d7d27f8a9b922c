"""``kvpeer demo``: a directory and four vLLM nodes on this machine, sharing KV.

No flags needed (the defaults are the README's main command); ``--quick`` runs
tiny sizes. See :mod:`kvpeer.sim.demo` for what each step shows.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny KV and prompts (a smoke test)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens of the PD handoff prompt (4096)")
    parser.add_argument("--node-mib", type=int, help="primary tier of each node in MiB (1280)")
    parser.add_argument(
        "--same-host",
        choices=("auto", "off"),
        default="auto",
        help="the tiers' same_host: auto copies rows between nodes on this machine through "
        "/dev/shm, off pulls them over TCP (default auto)",
    )


def run(args: argparse.Namespace) -> int:
    from kvpeer.sim.demo import DemoSettings
    from kvpeer.sim.demo import run as run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    overrides = {
        name: value
        for name, value in (("prompt_tokens", args.prompt_tokens), ("node_mib", args.node_mib))
        if value is not None
    }
    for name, value in overrides.items():
        if value <= 0:
            raise SystemExit(f"kvpeer demo: error: --{name.replace('_', '-')} must be positive")
    overrides["same_host"] = args.same_host
    try:
        return run_demo(dataclasses.replace(settings, **overrides))
    except KeyboardInterrupt:
        print("\ninterrupted: every node and /dev/shm file was cleaned up")
        return 130
