"""PeerSecondaryTier's start-up through vLLM's real factory path, in this process.

A user's mistakes in ``secondary_tiers`` must stop ``vllm serve`` at start-up with
a message naming the key, and leave nothing behind (no bound port, no /dev/shm
file); a good config must expose the tier's metrics and info through vLLM.
"""

from __future__ import annotations

import os
import socket

import pytest

pytest.importorskip("vllm")

from vllm.v1.kv_offload.factory import OffloadingSpecFactory
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from kvpeer.api.errors import ConfigError
from kvpeer.sim.vllm_config import TINY, offloading_config
from kvpeer.tier import metrics


def extra_config(**tier) -> dict:
    return {
        "spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": 1 << 20,
        "secondary_tiers": [{"type": "PeerSecondaryTier", "module_path": "kvpeer.tier", **tier}],
    }


def build(extra: dict, name: str):
    engine_id = f"kvpeer-config-{name}-{os.getpid()}"
    spec = OffloadingSpecFactory.create_spec(offloading_config(TINY, extra, engine_id=engine_id))
    return spec, engine_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("tier", "key", "words"),
    [
        ({"listen": "127.0.0.1:0", "lisen": "x"}, "lisen", "did you mean 'listen'"),
        ({"listen": "127.0.0.1:0", "directory": "kvdir"}, "directory", "missing ':port'"),
        (
            {"listen": "127.0.0.1:0", "directory": ["d1:7600", "d2"]},
            "directory[1]",
            "missing ':port'",
        ),
        (
            {"listen": "127.0.0.1:0", "directory": "d1:7600,d1:7600"},
            "directory",
            "listed twice",
        ),
        ({"listen": "127.0.0.1:0", "directory": []}, "directory", "got none"),
        ({"listen": "127.0.0.1:0", "peers": ["a:1", "b:99999"]}, "peers[1]", "out of range"),
        ({"listen": "0.0.0.0:0"}, "advertise", "required when listen binds every interface"),
        ({"listen": "127.0.0.1:0", "pull_streams": 0}, "pull_streams", "outside"),
        (
            {
                "listen": "127.0.0.1:0",
                "tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"},
            },
            "tls.cert",
            "cannot read",
        ),
        (
            {"listen": "127.0.0.1:0", "auth_token_file": "/nonexistent"},
            "auth_token_file",
            "cannot read",
        ),
        (
            {
                "listen": "127.0.0.1:0",
                "backpressure": {"backpressure_cls": "EMABackpressureDetector"},
            },
            "backpressure",
            "remove it",
        ),
    ],
)
def test_bad_config_fails_at_start_up_naming_the_key(tier, key, words):
    spec, engine_id = build(
        extra_config(**tier), key.replace("[", "").replace("]", "").replace(".", "")
    )
    with pytest.raises(ConfigError) as info:
        spec.get_manager()
    assert info.value.key == key
    assert words in str(info.value)
    assert not any(engine_id in f for f in os.listdir("/dev/shm")), "vLLM cleans its shm up"


def test_failed_start_releases_the_port():
    port = free_port()
    tier = {"listen": f"127.0.0.1:{port}", "directory": "bad"}
    spec, _ = build(extra_config(**tier), "port")
    with pytest.raises(ConfigError):
        spec.get_manager()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing left listening


def test_port_in_use_is_a_clear_start_up_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec, _ = build(extra_config(listen=f"127.0.0.1:{port}"), "inuse")
        with pytest.raises(ConfigError) as info:
            spec.get_manager()
    assert info.value.key == "listen" and str(port) in str(info.value)


def test_metrics_and_info_reach_vllm():
    extra = extra_config(listen="127.0.0.1:0")
    definitions = TieringOffloadingSpec.build_metric_definitions(extra)
    for name in (metrics.PULLED_BYTES, metrics.SERVED_BYTES, metrics.LOOKUPS, metrics.FAILURES):
        assert name in definitions
    keys = TieringOffloadingSpec.config_info_keys(extra)
    assert "kvpeer_fingerprint" in keys and "tier" in keys
    spec, engine_id = build(extra, "info")
    manager = spec.get_manager()
    try:
        info = manager.config_info()[1]
        assert info["tier"] == "1:PeerSecondaryTier"
        assert info["kvpeer_endpoint"].startswith("127.0.0.1:")
        assert len(info["kvpeer_fingerprint"]) == 32
    finally:
        manager.shutdown()
    assert not any(engine_id in f for f in os.listdir("/dev/shm"))
