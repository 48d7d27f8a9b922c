"""Smoke test of ``kvpeer bench --routing``: the trace, and one short prefix-routed replay."""

from __future__ import annotations

import pytest

from kvpeer.bench.routing import TraceConfig, make_trace, run_policy
from kvpeer.proxy.routing import RoutePolicy


def test_the_trace_is_deterministic_and_shares_prefixes() -> None:
    config = TraceConfig(requests=200)
    trace = make_trace(config)
    assert trace == make_trace(config) and len(trace) == 200
    firsts = [tuple(t[:64]) for t in trace]
    assert len(set(firsts)) < len(firsts) / 2  # popular system prompts repeat


@pytest.mark.slow
def test_a_short_prefix_routed_replay_hits_and_routes_by_prefix(tmp_path) -> None:
    trace = make_trace(TraceConfig(requests=24, system_prompts=4))
    result = run_policy(
        RoutePolicy.PREFIX, trace, nodes=2, cpu_bytes=1 << 20, log_dir=str(tmp_path)
    ).row()
    assert result["hit_rate"] > 0.3
    assert result["reasons"].get("prefix", 0) >= 12
    assert result["recomputed"] == 0  # everything fits: nothing is computed twice
    assert result["route_p99_ms"] < 100
