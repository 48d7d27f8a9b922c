"""The README's main command, ``kvpeer demo``, works and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_step_and_leaves_nothing_behind():
    shm_before = set(os.listdir("/dev/shm"))
    result = subprocess.run(
        [sys.executable, "-m", "kvpeer", "--log-level", "WARNING", "demo", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("PD handoff", "prefix reuse", "cross-TP reuse", "holder dies"):
        assert step in out
    assert "WRONG" not in out and "all loaded rows were byte-exact" in out
    leftovers = {f for f in set(os.listdir("/dev/shm")) - shm_before if "kvpeer-sim" in f}
    assert not leftovers
