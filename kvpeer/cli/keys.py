"""``kvpeer keys``: the chunk keys vLLM and the tier compute for a list of token ids.

Runs without torch or vLLM (:mod:`kvpeer.api.keys`). Prints one hex key per line;
with ``--json`` an object with the settings and the keys (base64 and hex); with
``--score-request`` exactly the ``kvpeer.v1.Directory/Score`` request for ``grpcurl -d``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from kvpeer.api.errors import ConfigError
from kvpeer.api.keys import HASH_ALGOS, KeySpec, request_cache_salt, request_tokens

#: KeySpec's names for its settings -> the flags (the rest are the name, dashed).
FLAGS = {"seed": "--hash-seed", "group_idx": "--group"}


def add_key_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, whose: str, *, required: bool
) -> None:
    """The settings chunk keys depend on (``kvpeer keys``, ``kvpeer proxy --route prefix``).

    ``whose`` says whose settings they must equal, for --help ("the nodes'").
    """
    parser.add_argument(
        "--block-size", type=int, required=required, help=f"{whose} --block-size (tokens per block)"
    )
    parser.add_argument(
        "--blocks-per-chunk", type=int, default=1, help=f"{whose} blocks per chunk (default 1)"
    )
    parser.add_argument(
        "--hash-algo",
        default="sha256",
        choices=HASH_ALGOS,
        help=f"{whose} --prefix-caching-hash-algo (default sha256)",
    )
    parser.add_argument(
        "--hash-seed",
        default=None,
        help=f"NONE_HASH seed: {whose} PYTHONHASHSEED if set (default: this process's "
        "PYTHONHASHSEED, else vLLM's default for sha256/sha256_cbor)",
    )


def key_spec(args: argparse.Namespace, **more: object) -> KeySpec:
    """The KeySpec of :func:`add_key_arguments`' flags; ConfigError names the flag."""
    try:
        return KeySpec(
            args.block_size, args.blocks_per_chunk, args.hash_algo, args.hash_seed, **more
        )
    except ConfigError as exc:
        raise ConfigError(
            FLAGS.get(exc.key, "--" + exc.key.replace("_", "-")), exc.problem
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tokens", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3 (a prompt)"
    )
    source.add_argument(
        "--request",
        metavar="FILE",
        help="an OpenAI request body (JSON; - for stdin) whose prompt is token ids "
        "(prompt_token_ids, or prompt as a list of ints); its cache_salt is used",
    )
    add_key_arguments(parser, "vLLM's", required=True)
    parser.add_argument(
        "--hash-block-size", type=int, default=None, help="tokens per hash (default --block-size)"
    )
    parser.add_argument("--group", type=int, default=0, help="KV-cache group index (default 0)")
    parser.add_argument("--cache-salt", default=None, help="the request's cache_salt")
    parser.add_argument(
        "--model",
        default=None,
        help="the served model, recorded in --json output; keys depend on token ids and the "
        "settings above only (nodes of other models are kept apart by their fingerprint)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON object")
    output.add_argument(
        "--score-request",
        action="store_true",
        help='print a Directory.Score request for grpcurl -d: {"keys": [base64...]}',
    )


def _tokens(args: argparse.Namespace) -> tuple[list[int], str | None]:
    if args.tokens is not None:
        try:
            tokens = [int(t) for t in args.tokens.replace(" ", "").split(",") if t]
        except ValueError as exc:
            raise ConfigError("--tokens", f"expected comma-separated integers: {exc}") from None
        if not tokens or min(tokens) < 0:
            raise ConfigError("--tokens", "expected non-negative token ids")
        return tokens, args.cache_salt
    try:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text()
        body = json.loads(text)
    except OSError as exc:
        raise ConfigError("--request", f"cannot read {args.request!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError("--request", f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ConfigError("--request", "expected a JSON object (an OpenAI request body)")
    tokens = request_tokens(body)
    if tokens is None:
        raise ConfigError(
            "--request",
            "the body has no token-id prompt (prompt_token_ids, or prompt as a list of "
            "ints); text and chat prompts need the model's tokenizer",
        )
    return tokens, args.cache_salt or request_cache_salt(body)


def run(args: argparse.Namespace) -> int:
    try:
        tokens, salt = _tokens(args)
        spec = key_spec(args, hash_block_size=args.hash_block_size, group_idx=args.group)
        keys = spec.chunk_keys(tokens, cache_salt=salt)
    except ConfigError as exc:
        print(f"kvpeer keys: error: {exc}", file=sys.stderr)
        return 2
    if args.score_request:
        print(json.dumps({"keys": [base64.b64encode(k).decode() for k in keys]}))
        return 0
    if not args.json:
        for key in keys:
            print(key.hex())
        if not keys:
            print(
                f"kvpeer keys: {len(tokens)} tokens make no full chunk of "
                f"{spec.tokens_per_chunk} tokens",
                file=sys.stderr,
            )
        return 0
    out: dict[str, Any] = {
        "model": args.model,
        "tokens": len(tokens),
        "block_size": spec.block_size,
        "blocks_per_chunk": spec.blocks_per_chunk,
        "hash_algo": spec.hash_algo,
        "seed": spec.seed,
        "cache_salt": salt,
        "group": spec.group_idx,
        "keys": [base64.b64encode(k).decode() for k in keys],
        "keys_hex": [k.hex() for k in keys],
    }
    print(json.dumps(out, indent=2))
    return 0
