"""The load test at CI size: concurrent pulls from holders that keep storing and evicting.

``kvpeer.bench.load`` with :data:`~kvpeer.bench.load.QUICK`: 2 holder and 2 consumer
node processes, 8 pulls in flight, 512 MiB loaded while the holders keep storing
prompts (evicting older ones the directory still lists). Every loaded row is
checked against its holder's; the full size runs as ``benchmarks/load_test.py``.
"""

from __future__ import annotations

import pytest

from kvpeer.bench.load import QUICK, run_load

pytestmark = pytest.mark.slow


def test_concurrent_pulls_under_churn_load_exact_rows_and_leak_nothing(tmp_path):
    result = run_load(QUICK, log_dir=str(tmp_path))
    print(result.format())

    assert result.wrong_rows == 0
    assert result.leaked_pins == 0, result.leftovers
    assert result.open_jobs == 0, result.leftovers
    assert result.bytes_loaded >= QUICK.target_bytes
    assert result.outcomes()["full"] > 0
    # The holders stored more than they keep: the run went on through evictions.
    assert result.prompts_stored * QUICK.prompt_chunks > QUICK.holders * QUICK.holder_chunks
