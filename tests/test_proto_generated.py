"""The committed kvpeer/v1 modules match proto/: a .proto edit without regeneration fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GENERATE = Path(__file__).resolve().parent.parent / "proto" / "generate.py"


def _generate_module():
    spec = importlib.util.spec_from_file_location("kvpeer_proto_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_fresh():
    stale = _generate_module().stale_files()
    assert stale == [], f"stale generated modules {stale}: run python proto/generate.py"


def test_staleness_check_sees_a_changed_module(tmp_path, monkeypatch):
    """The check itself works: a generated module that differs is reported."""
    generate = _generate_module()
    (tmp_path / "kvpeer").mkdir()
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    (tmp_path / fresh[0]).write_text("# edited by hand\n")
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)
    assert generate.stale_files() == [str(fresh[0])]
