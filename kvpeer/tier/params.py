"""Per-request kvpeer parameters, parsed once from a request's ``kv_transfer_params``.

Users (or a PD proxy) write them in the OpenAI request body. kvpeer's own spelling:

- ``{"kvpeer": {"handoff_id": "h1", "role": "producer"}}`` on a prefill request;
- ``{"kvpeer": {"handoff_id": "h1", "role": "consumer", "source": "host:port"}}`` on the
  decode request (``source`` optional: the directory finds the producer).

So that PD proxies and routers written for vLLM's built-in p2p tier work unchanged,
its spellings are understood too:

- ``{"remote_decoder": {"kv_request_id": "h1"}}``: producer of handoff ``h1``;
- ``{"remote_prefiller": {"kv_request_id": "h1", "remote_host": H, "remote_port": P}}``:
  consumer of handoff ``h1`` whose producer's kvpeer endpoint is ``H:P``;
- ``{"remote_kv_source": {"kv_request_id": ..., "remote_host": H, "remote_port": P}}``:
  plain prefix reuse, asking ``H:P`` first instead of the directory.

No parameters: plain prefix reuse through the directory or the static peers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError

MAX_HANDOFF_ID_CHARS = 256


class RequestParamsError(ValueError):
    """``kv_transfer_params`` are malformed; the message names the field."""


@dataclass(frozen=True)
class RequestParams:
    """What this request asks of kvpeer.

    ``role`` is ``"producer"`` or ``"consumer"`` for a PD handoff, else None.
    ``source`` is the peer to ask (consumer of a handoff, or a p2p-style source).
    """

    role: str | None = None
    handoff_id: str = ""
    source: Endpoint | None = None

    @property
    def is_producer(self) -> bool:
        return self.role == "producer"

    @property
    def is_consumer(self) -> bool:
        return self.role == "consumer"


PLAIN = RequestParams()


def parse_request_params(params: Mapping[str, Any] | None) -> RequestParams:
    """Parse ``kv_transfer_params``; raise :class:`RequestParamsError` naming the bad field."""
    if not params:
        return PLAIN
    if not isinstance(params, Mapping):
        raise RequestParamsError(
            f"kv_transfer_params must be an object, got {type(params).__name__}"
        )
    if "kvpeer" in params:
        return _parse_kvpeer(params["kvpeer"])
    if "remote_decoder" in params:
        spec = _object(params["remote_decoder"], "remote_decoder")
        return RequestParams(
            "producer", _handoff_id(spec.get("kv_request_id"), "remote_decoder.kv_request_id")
        )
    for name, role in (("remote_prefiller", "consumer"), ("remote_kv_source", None)):
        if name in params:
            spec = _object(params[name], name)
            handoff_id = _handoff_id(spec.get("kv_request_id"), f"{name}.kv_request_id")
            source = _host_port(spec, name)
            return RequestParams(role, handoff_id if role else "", source)
    return PLAIN


def _parse_kvpeer(raw: Any) -> RequestParams:
    spec = _object(raw, "kvpeer")
    unknown = sorted(set(spec) - {"handoff_id", "role", "source"})
    if unknown:
        raise RequestParamsError(
            f"kvpeer.{unknown[0]}: unknown field (known: handoff_id, role, source)"
        )
    role = spec.get("role")
    if role not in ("producer", "consumer"):
        raise RequestParamsError(f"kvpeer.role: expected 'producer' or 'consumer', got {role!r}")
    handoff_id = _handoff_id(spec.get("handoff_id"), "kvpeer.handoff_id")
    source = None
    if spec.get("source") is not None:
        if role != "consumer":
            raise RequestParamsError("kvpeer.source: only a consumer names a source")
        source = _endpoint(spec["source"], "kvpeer.source")
    return RequestParams(role, handoff_id, source)


def _object(raw: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise RequestParamsError(f"{field}: expected an object, got {raw!r}")
    return raw


def _handoff_id(raw: Any, field: str) -> str:
    if (
        not isinstance(raw, str)
        or not raw
        or len(raw) > MAX_HANDOFF_ID_CHARS
        or not raw.isprintable()
    ):
        raise RequestParamsError(
            f"{field}: expected a printable id of 1-{MAX_HANDOFF_ID_CHARS} characters, got {raw!r}"
        )
    return raw


def _host_port(spec: Mapping[str, Any], field: str) -> Endpoint:
    host, port = spec.get("remote_host"), spec.get("remote_port")
    if not isinstance(host, str) or not host:
        raise RequestParamsError(f"{field}.remote_host: expected a host name, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, (int, str)):
        raise RequestParamsError(f"{field}.remote_port: expected a port number, got {port!r}")
    host_text = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return _endpoint(f"{host_text}:{port}", f"{field}.remote_host/remote_port")


def _endpoint(raw: Any, field: str) -> Endpoint:
    try:
        return parse_endpoint(raw, key=field)
    except ConfigError as exc:
        raise RequestParamsError(str(exc)) from exc
