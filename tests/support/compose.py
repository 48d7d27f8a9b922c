"""Reading compose/ as docker compose would, without Docker: for tests/test_compose.py.

:func:`load_compose` parses the compose files (YAML 1.1 merge keys included), fills in
``${VAR}`` from ``compose/.env`` and merges override files the way compose does for the
keys our files use (mappings merge, ``volumes`` merge by container path, other lists are
replaced). A variable that is neither in ``.env`` nor given a default fails loudly,
where compose would only warn and substitute an empty string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
BASE = "docker-compose.yml"
TLS = "docker-compose.tls.yml"
#: Compose file lists of the two ways to run the stack.
VARIANTS = {"plain": (BASE,), "tls": (BASE, TLS)}
NODES = ("prefill", "decode")

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def load_env(path: Path = COMPOSE_DIR / ".env") -> dict[str, str]:
    """``KEY=VALUE`` lines of a compose .env file (comments and blank lines skipped)."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def interpolate(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """``value`` with ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` filled in."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") or match.group("plain")
        name, op, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:-|-)?(.*)$", expr).groups()
        if name in env and (env[name] or op != ":-"):
            return env[name]
        if op is not None:
            return default
        raise KeyError(f"{where}: ${{{name}}} is not set in .env and has no default")

    return _VAR.sub(substitute, value)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if key == "volumes" and isinstance(value, list):
                mounts = {_mount_target(v): v for v in out.get(key, [])}
                mounts.update({_mount_target(v): v for v in value})
                out[key] = list(mounts.values())
            else:
                out[key] = _merge(out[key], value) if key in out else value
        return out
    return override


def _mount_target(volume: str) -> str:
    return volume.split(":")[1]


def load_compose(files: tuple[str, ...], env: Mapping[str, str]) -> dict[str, Any]:
    """The merged, interpolated compose model of ``files`` (names inside compose/)."""
    model: dict[str, Any] = {}
    for name in files:
        raw = yaml.safe_load((COMPOSE_DIR / name).read_text())
        raw = {k: v for k, v in raw.items() if not k.startswith("x-")}
        model = _merge(model, interpolate(raw, env, name))
    return model


def bind_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to compose/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = (COMPOSE_DIR / Path(source).expanduser()).resolve()
    return mounts


def host_path(service: Mapping[str, Any], container_path: str) -> str:
    """Where ``container_path`` of ``service`` lies on the host, through its bind mounts."""
    for target, source in bind_mounts(service).items():
        if container_path.startswith(target.rstrip("/") + "/"):
            return str(source / container_path[len(target.rstrip("/")) + 1 :])
    raise AssertionError(f"{container_path} is not under any bind mount of the service")


def kv_transfer_config(service: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON after ``--kv-transfer-config`` in a vLLM node's command."""
    command = service["command"]
    return json.loads(command[command.index("--kv-transfer-config") + 1])


def byte_size(text: str) -> int:
    """A compose byte size (``10g``, ``512m``, ``1073741824``) in bytes."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert match, f"not a compose byte size: {text!r}"
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " ")
