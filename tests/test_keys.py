"""kvpeer.api.keys computes the keys vLLM computes, and the tier publishes, without vLLM.

Checked against vLLM's own functions (``vllm.utils.hashing``,
``vllm.v1.core.kv_cache_utils.hash_block_tokens``, and a real ``Request`` with
vLLM's request block hasher via kvpeer.sim.vllm_keys), then end to end: a
simulated vLLM node computes its keys with vLLM's hasher for a token prompt, its
tier publishes them, and the directory scores kvpeer's own keys for that prompt
as fully held.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import grpc
import pytest
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_utils import hash_block_tokens, make_block_hash_with_group_id

from kvpeer.api.errors import ConfigError
from kvpeer.api.keys import HASH_ALGOS, HashCache, KeySpec, request_cache_salt, request_tokens
from kvpeer.sim.vllm_keys import vllm_chunk_keys
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.cluster import wait_for

TOKENS = [random.Random(7).randrange(50_000) for _ in range(16 * 11 + 9)]


@pytest.fixture
def none_hash():
    """Set vLLM's NONE_HASH for an algorithm and seed as init_none_hash would; restore it."""
    saved = getattr(kv_cache_utils, "NONE_HASH", None)

    def set_to(algo: str, seed: str) -> None:
        kv_cache_utils.NONE_HASH = kv_cache_utils.BlockHash(get_hash_fn_by_name(algo)(seed))

    yield set_to
    kv_cache_utils.NONE_HASH = saved


def vllm_keys(algo, seed, tokens, size, per_chunk, extra_first=None, extra=None, group=0):
    """vLLM's chain of hash_block_tokens, every per_chunk-th hash as an OffloadKey."""
    fn = get_hash_fn_by_name(algo)
    parent, hashes = None, []
    for i in range(len(tokens) // size):
        keys = extra_first if i == 0 else extra
        parent = hash_block_tokens(fn, parent, tokens[i * size : (i + 1) * size], keys)
        hashes.append(parent)
    return [
        bytes(make_block_hash_with_group_id(h, group)) for h in hashes[per_chunk - 1 :: per_chunk]
    ]


@pytest.mark.parametrize("algo", HASH_ALGOS)
@pytest.mark.parametrize("blocks_per_chunk", [1, 2, 4])
def test_keys_equal_vllms_hash_chain(none_hash, algo: str, blocks_per_chunk: int) -> None:
    seed = "1234"
    none_hash(algo, seed)
    spec = KeySpec(16, blocks_per_chunk, algo, seed, group_idx=3)
    ours = spec.chunk_keys(TOKENS, cache_salt="tenant", lora=("ad", "/lora/ad"))
    lora = ("lora", "ad", "/lora/ad")
    theirs = vllm_keys(
        algo, seed, TOKENS, 16, blocks_per_chunk, (lora, ("cache_salt", "tenant")), (lora,), 3
    )
    assert ours == theirs
    assert len(ours) == 11 // blocks_per_chunk
    assert len(ours[0]) == (36 if algo.startswith("sha") else 20)
    assert spec.none_hash == kv_cache_utils.NONE_HASH


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_keys_equal_a_real_vllm_request_with_its_block_hasher(none_hash, algo: str) -> None:
    """vLLM's Request + get_request_block_hasher + the connector's chunk selection."""
    none_hash(algo, "vllm-none-hash")
    for salt in (None, "s1"):
        for per_chunk in (1, 3):
            theirs = vllm_chunk_keys(
                TOKENS, block_size=16, blocks_per_chunk=per_chunk, hash_algo=algo, cache_salt=salt
            )
            ours = KeySpec(16, per_chunk, algo, "vllm-none-hash").chunk_keys(
                TOKENS, cache_salt=salt
            )
            assert ours == theirs and theirs


def test_hash_blocks_smaller_than_gpu_blocks(none_hash) -> None:
    none_hash("sha256", "s")
    spec = KeySpec(32, 2, "sha256", "s", hash_block_size=16)  # 4 hashes per chunk
    assert spec.hashes_per_chunk == 4
    assert spec.chunk_keys(TOKENS) == vllm_keys("sha256", "s", TOKENS, 16, 4)


def test_salt_and_seed_change_every_key_and_the_cache_changes_none() -> None:
    plain = KeySpec(16, seed="a").chunk_keys(TOKENS)
    assert not set(plain) & set(KeySpec(16, seed="a").chunk_keys(TOKENS, cache_salt="x"))
    assert not set(plain) & set(KeySpec(16, seed="b").chunk_keys(TOKENS))
    cache = HashCache(max_entries=5)  # also overflows (and starts again) on the way
    spec = KeySpec(16, seed="a")
    for _ in range(3):
        assert spec.chunk_keys(TOKENS, cache=cache) == plain
        assert spec.chunk_keys(TOKENS, cache=cache, cache_salt="x") == spec.chunk_keys(
            TOKENS, cache_salt="x"
        )
    assert spec.chunk_keys(TOKENS, max_keys=4) == plain[:4]
    assert spec.chunk_keys(TOKENS[:15]) == []


def test_the_cache_tells_apart_blocks_that_differ_after_their_first_token() -> None:
    spec = KeySpec(16, seed="a")
    cache = HashCache()
    variants = []
    for change in (None, 1, 15, 1):  # same parent and first token, other blocks
        tokens = list(TOKENS)
        if change is not None:
            tokens[16 + change] += 1
        variants.append(tokens)
    for tokens in variants * 2:
        assert spec.chunk_keys(tokens, cache=cache) == spec.chunk_keys(tokens)
    assert len({tuple(spec.chunk_keys(t)) for t in variants}) == 3


def test_bad_settings_are_refused_with_the_setting_named(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="unsupported hash algorithm 'md5'"):
        KeySpec(16, hash_algo="md5")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ConfigError, match="random NONE_HASH seed"):
        KeySpec(16, hash_algo="xxhash")
    assert KeySpec(16, hash_algo="sha256").seed == "vllm-none-hash"
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert KeySpec(16, hash_algo="xxhash").seed == "42"
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="block_size"):
            KeySpec(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hash_block_size"):
        KeySpec(16, hash_block_size=5)


def test_request_tokens_reads_token_prompts_only() -> None:
    assert request_tokens({"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert request_tokens({"prompt": [[4, 5], [6]]}) == [4, 5]
    assert request_tokens({"prompt_token_ids": [7], "prompt": "x"}) == [7]
    for body in (
        {"prompt": "text"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": []},
        {"prompt": [1, "2"]},
        {"prompt": [True, 1]},
        {"prompt": [-1]},
        {},
    ):
        assert request_tokens(body) is None, body
    assert request_cache_salt({"cache_salt": "t"}) == "t"
    assert request_cache_salt({"cache_salt": ""}) is None
    assert request_cache_salt({"cache_salt": 3}) is None


def test_cli_prints_the_keys_without_importing_vllm(tmp_path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": TOKENS, "cache_salt": "t"}))
    script = textwrap.dedent(
        f"""
        import sys
        from kvpeer.cli import main
        code = main(["keys", "--block-size", "16", "--hash-seed", "9", "--request", {str(body)!r},
                     "--json", "--model", "m"])
        assert "vllm" not in sys.modules and "torch" not in sys.modules, "imported vLLM"
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = KeySpec(16, seed="9").chunk_keys(TOKENS, cache_salt="t")
    assert out["keys_hex"] == [k.hex() for k in expected]
    assert (out["model"], out["cache_salt"], out["tokens"]) == ("m", "t", len(TOKENS))

    tokens = ",".join(map(str, TOKENS[:40]))
    plain = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvpeer",
            "keys",
            "--block-size",
            "16",
            "--hash-seed",
            "9",
            "--tokens",
            tokens,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert plain.stdout.split() == [k.hex() for k in KeySpec(16, seed="9").chunk_keys(TOKENS[:40])]

    bad = subprocess.run(
        [sys.executable, "-m", "kvpeer", "keys", "--block-size", "16", "--request", "-"],
        input=json.dumps({"prompt": "some text"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "no token-id prompt" in bad.stderr


@pytest.mark.slow
def test_the_tier_publishes_the_keys_kvpeer_computes(cluster) -> None:
    """A real tier node computes keys with vLLM's hasher; the directory holds kvpeer's keys."""
    directory = cluster.directory()
    node = cluster.node("a", tier={"directory": directory.endpoint}, blocks_per_chunk=2)
    prompt = TOKENS[: 16 * 8 + 3]
    answer = node.call("request_tokens", tokens=prompt, cache_salt="tenant")
    assert answer["stored_chunks"] == 4
    # The cluster's nodes run with PYTHONHASHSEED=0: the router is given that seed.
    ours = KeySpec(16, 2, "sha256", seed="0").chunk_keys(prompt, cache_salt="tenant")
    assert [bytes.fromhex(k) for k in answer["keys"]] == ours
    with grpc.insecure_channel(directory.endpoint) as channel:
        stub = directory_pb2_grpc.DirectoryStub(channel)

        def scored() -> dict[str, int]:
            response = stub.Score(pb.ScoreRequest(keys=ours), timeout=10)
            return {n.node_id: n.prefix_keys for n in response.nodes}

        wait_for(lambda: scored() == {node.info["node_id"]: 4}, what="the keys published")

        def load() -> tuple[int, int] | None:  # the tier's heartbeats carry its load
            (entry,) = stub.Score(pb.ScoreRequest(keys=ours), timeout=10).nodes
            if not entry.HasField("load"):
                return None
            return entry.load.running_requests, entry.load.peer_leases

        wait_for(lambda: load() == (0, 0), what="a heartbeat with the finished request's load")
