"""The ``kvpeer`` command line.

Each subcommand lives in its own module under :mod:`kvpeer.cli` with two
functions: ``add_arguments(parser)`` and ``run(args) -> int``. Modules import
their heavy dependencies (vLLM, torch) inside ``run`` so that ``kvpeer --help``
and the directory and proxy start without them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvpeer import __version__

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "kvpeer.cli.demo",
        "run a directory and vLLM nodes on this machine and show them share KV",
    ),
    "directory": ("kvpeer.cli.directory", "run the directory service"),
    "proxy": ("kvpeer.cli.proxy", "run the prefill/decode OpenAI-compatible proxy"),
    "inspect": (
        "kvpeer.cli.inspect",
        "show the fingerprints of nodes or of the directory, and why two nodes do not share",
    ),
    "bench": ("kvpeer.cli.bench", "compare kvpeer with raw TCP and vLLM's p2p tier"),
    "keys": (
        "kvpeer.cli.keys",
        "compute the chunk keys vLLM and the tier compute for token ids (no vLLM needed)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpeer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvpeer {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
