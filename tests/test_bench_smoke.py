"""``kvpeer bench`` end to end at tiny sizes, and the veth link it measures on.

The smoke test runs the real command (real node processes, real vLLM managers,
vLLM's p2p tier when NIXL imports) with one repetition of a few 64 KiB chunks:
it checks that every setting moved verified bytes and that the JSON report holds
every number the table prints. Throughput values are not asserted (a loaded CI
machine decides them). The veth tests need root and iproute2.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from kvpeer.bench import netns
from kvpeer.bench.rawtcp import RawTcpSender, receive
from kvpeer.bench.rows import synthetic_rows

HAVE_NIXL = importlib.util.find_spec("nixl") is not None


def _bench(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvpeer", "--log-level", "WARNING", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.slow
def test_bench_runs_every_setting_and_writes_json(tmp_path):
    settings = ["raw", "kvpeer"] + (["p2p-tcp"] if HAVE_NIXL else [])
    out = tmp_path / "bench.json"
    done = _bench(
        "--chunks", "4", "--chunk-mib", "0.0625", "--repeat", "1",
        "--only", ",".join(settings), "--no-veth",
        "--idle-seconds", "1", "--directory-seconds", "0.05",
        "--json", str(out), "--log-dir", str(tmp_path / "logs"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads(out.read_text())
    assert report["chunk_bytes"] == 65536 and report["chunks"] == 4
    loopback = report["networks"]["loopback"]["settings"]
    assert sorted(loopback) == sorted(settings)
    for setting in settings:
        assert len(loopback[setting]["samples_gbps"]) == 1
        assert loopback[setting]["median_gbps"] > 0
    assert loopback["raw"]["ratio_to_raw"] == 1.0
    if HAVE_NIXL:
        assert loopback["p2p-tcp"]["ratio_to_p2p_tcp"] == 1.0
        assert report["idle_cpu_percent"]["p2p-tcp"]["producer"] >= 0

    costs = report["caller_cost_us"]
    assert costs["consumer"]["lookup"]["calls"] > 0
    assert costs["consumer"]["submit_load"]["calls"] > 0
    assert costs["holder"]["serve_external_requests"]["calls"] > 0
    assert set(report["idle_cpu_percent"]["kvpeer"]) == {"holder", "consumer"}
    assert {cell["op"] for cell in report["directory"]["cells"]} == {"publish", "locate"}

    table = done.stdout
    assert "vs raw TCP" in table and "kvpeer" in table
    assert "idle CPU per node" in table and "serve_external_requests (holder)" in table


def test_unknown_setting_is_refused_by_name():
    done = _bench("--only", "raw,quic", timeout_s=60)
    assert done.returncode == 2
    assert "quic" in done.stderr and "p2p-tcp" in done.stderr


needs_netns = pytest.mark.skipif(
    netns.unavailable_reason() is not None, reason=f"veth link: {netns.unavailable_reason()}"
)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_netns
def test_veth_link_carries_bytes_between_namespaces_and_is_torn_down():
    rows, chunk = 16, 64 * 1024
    expected = synthetic_rows(rows, chunk, 3)
    dest = np.zeros_like(expected)
    with netns.VethLink(1.0) as link:
        sender = link.run_in("a", lambda: RawTcpSender(rows, chunk, 3, host=link.addresses["a"]))
        try:
            link.run_in(
                "b",
                lambda: receive(
                    sender.port, memoryview(dest), host=link.addresses["a"], timeout_s=30
                ),
            )
        finally:
            sender.stop()
        assert link.namespaces["a"] in _namespaces()
    assert np.array_equal(dest, expected)
    assert link.namespaces["a"] not in _namespaces()
    assert link.namespaces["b"] not in _namespaces()


@needs_netns
def test_veth_link_is_removed_when_the_body_fails():
    link = netns.VethLink(1.0)
    with pytest.raises(RuntimeError, match="boom"), link:
        link.run_in("b", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert link.namespaces["b"] not in _namespaces()
