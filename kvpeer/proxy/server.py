"""The prefill/decode proxy: one OpenAI-compatible HTTP front for pools of vLLM nodes.

For each ``POST /v1/completions`` or ``POST /v1/chat/completions`` the proxy

1. sends the request to a prefill node (picked by :mod:`.routing`) as a kvpeer *producer*:
   ``max_tokens=1`` (and ``max_completion_tokens=1`` for chat), ``stream=False``,
   without ``stream_options`` and ``min_tokens``, and
   ``kv_transfer_params.kvpeer = {"handoff_id": H, "role": "producer"}``;
2. sends the client's original request to a decode node (picked likewise) as the
   *consumer*: ``kv_transfer_params.kvpeer = {"handoff_id": H, "role": "consumer",
   "source": "<prefill node's kvpeer host:port>"}`` (``source`` only when the proxy
   knows it; otherwise the decode node finds the producer through the directory);
3. returns the decode node's answer: streamed chunk by chunk (SSE) when the client
   asked ``stream: true``, else as one JSON body. The response carries the handoff id
   in the ``x-kvpeer-handoff-id`` header.

Other keys of a client's ``kv_transfer_params`` pass through; only ``kvpeer`` is the
proxy's. With ``concurrent`` the decode request starts without waiting for the prefill
answer: kvpeer's consumer waits for the producer, so both orders work.

Failures: a 4xx from the prefill node is the client's fault and is returned as is; a
5xx, timeout or unreachable prefill node skips the handoff (the decode node gets the
request without consumer parameters and recomputes the prompt). An unreachable decode
node is replaced by the next one once, then the client gets 502 naming the nodes. A
client that disconnects cancels the upstream requests (the aiohttp handler is
cancelled and the upstream connections are closed, which vLLM treats as an abort).

Routing (``--route``, :mod:`kvpeer.proxy.routing`): ``round-robin``,
``least-loaded``, or ``prefix`` (the default when a directory is given), which computes the request's chunk keys from its
token ids, asks the directory (Directory.Score) how much of that prefix each node
holds, and picks decode and prefill nodes by prefix and load, falling back to
round-robin whenever it cannot. Every response carries the decision in
``x-kvpeer-route``; ``GET /metrics`` counts decisions (``kvpeer_proxy_routed``) and
their time (``kvpeer_proxy_route_seconds``).

Everything runs on one asyncio event loop; no method here blocks it. This module
does not import torch or vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.proxy.config import PrefillNode, ProxyConfig
from kvpeer.proxy.metrics import ProxyMetrics
from kvpeer.proxy.routing import (
    NodeRef,
    Router,
)

log = logging.getLogger(__name__)

#: Response header naming the handoff of a request (also on error answers).
HANDOFF_HEADER = "x-kvpeer-handoff-id"
#: Response header with the routing decision (policy, reason, nodes, prefix held).
ROUTE_HEADER = "x-kvpeer-route"
_ROUTE: Any = web.RequestKey("kvpeer_route", str) if hasattr(web, "RequestKey") else ROUTE_HEADER
#: Request headers passed on to the nodes.
FORWARDED_HEADERS = ("Authorization",)
#: Request-body keys the prefill request drops (it answers one token, not streamed).
_PREFILL_DROPPED_KEYS = ("stream_options", "min_tokens")
#: Errors that mean "this node did not take the request": another node may.
_UNREACHABLE = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
)


class ProxyServer:
    """The proxy, served on ``listen``. Use :meth:`start` and :meth:`close` on one loop."""

    def __init__(self, config: ProxyConfig, listen: Endpoint) -> None:
        self._config = config
        self._listen = listen
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._listen.is_wildcard else self._listen.host
        return f"http://{Endpoint(host, self.port)}"

    async def start(self) -> ProxyServer:
        # handler_cancellation: a client that goes away cancels its handler, which
        # closes the upstream connections, so the nodes abort the request.
        self._runner = web.AppRunner(build_app(self._config), handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._listen.host, self._listen.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                "--listen", f"cannot bind {self._listen}: {exc.strerror or exc}"
            ) from exc
        self.port = self._runner.addresses[0][1]
        log.info("kvpeer proxy listening on %s", self.url)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def build_app(config: ProxyConfig) -> web.Application:
    """The proxy's aiohttp application (routes and the upstream client session)."""
    proxy = _Proxy(config)
    app = web.Application(client_max_size=config.max_body_bytes)
    app.cleanup_ctx.append(proxy.session_context)
    app.on_response_prepare.append(_add_route_header)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/chat/completions", proxy.completions)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/metrics", proxy.metrics)
    return app


async def _add_route_header(request: web.Request, response: web.StreamResponse) -> None:
    """Put the request's routing decision on whatever answer it gets (streamed too)."""
    if (route := request.get(_ROUTE)) is not None:
        response.headers[ROUTE_HEADER] = route


@dataclass(frozen=True)
class _PrefillResult:
    """Outcome of a producer request: whether the handoff happened, or what to tell the client."""

    handoff: bool
    client_error: web.Response | None = None


class _Proxy:
    """Request handlers. All state is touched from the app's event loop only."""

    def __init__(self, config: ProxyConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self.route_metrics = ProxyMetrics()
        self._router: Router | None = None
        self._prefill_timeout = aiohttp.ClientTimeout(
            total=config.timeout_s, connect=config.connect_timeout_s
        )
        self._decode_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=config.timeout_s
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=config.health_timeout_s)

    async def session_context(self, _app: web.Application):
        # No connection cap: the nodes queue requests themselves, and a cap here
        # would stall streams behind one another.
        config = self._config
        self._router = Router.create(
            config.route,
            [(n.url, NodeRef(n.kvpeer, n.node_id) if n.kvpeer else None) for n in config.prefill],
            list(
                zip(config.decode, config.decode_refs or [None] * len(config.decode), strict=True)
            ),
            directory=config.directory,
            timeout_s=config.route_timeout_s,
            keys=config.key_spec,
            security=config.directory_security,
        )
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                self._session = session
                yield
        finally:
            self._session = None
            await self._router.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the app is not running"
        return self._session

    # -- POST /v1/completions, /v1/chat/completions ---------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json_object(request, self._config.max_body_bytes)
        if isinstance(body, web.Response):
            return body
        router = self._router
        assert router is not None, "the app is not running"
        decision = await router.route(body)
        request[_ROUTE] = decision.header(router.prefill, router.decode)
        self.route_metrics.count(decision, router.prefill, router.decode)
        pools = (router.prefill, router.decode)
        picks = (decision.prefill.index, decision.decode.index)
        for pool, index in zip(pools, picks, strict=True):
            pool.inflight[index] += 1
        try:
            return await self._complete(
                request, body, decision.prefill.index, decision.decode.index
            )
        finally:
            for pool, index in zip(pools, picks, strict=True):
                pool.inflight[index] -= 1

    async def _complete(
        self, request: web.Request, body: dict[str, Any], prefill_index: int, decode_index: int
    ) -> web.StreamResponse:
        handoff_id = str(uuid.uuid4())
        headers = _forwarded_headers(request)
        chat = request.path.endswith("/chat/completions")
        prefill = self._config.prefill[prefill_index]
        producer = _prefill_body(body, {"handoff_id": handoff_id, "role": "producer"}, chat)
        consumer = {"handoff_id": handoff_id, "role": "consumer"}
        if prefill.kvpeer is not None:
            consumer["source"] = str(prefill.kvpeer)
        prefill_call = self._prefill(prefill, request.path, producer, headers, handoff_id)

        if self._config.concurrent:
            task = asyncio.create_task(prefill_call)
            try:
                return await self._decode(
                    request, _with_kvpeer(body, consumer), headers, handoff_id, decode_index
                )
            finally:
                task.cancel()  # done by now unless the consumer gave up waiting

        result = await prefill_call
        if result.client_error is not None:
            result.client_error.headers[HANDOFF_HEADER] = handoff_id
            return result.client_error
        decode_body = _with_kvpeer(body, consumer if result.handoff else None)
        return await self._decode(request, decode_body, headers, handoff_id, decode_index)

    async def _prefill(
        self,
        node: PrefillNode,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        handoff_id: str,
    ) -> _PrefillResult:
        try:
            async with self.session.post(
                node.url + path, json=body, headers=headers, timeout=self._prefill_timeout
            ) as resp:
                payload = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning(
                "handoff %s: prefill node %s failed (%s); the decode node recomputes",
                handoff_id,
                node.url,
                _describe(exc),
            )
            return _PrefillResult(handoff=False)
        if 400 <= resp.status < 500:
            log.info("handoff %s: prefill node %s answered %d", handoff_id, node.url, resp.status)
            return _PrefillResult(False, _relay(resp, payload))
        if resp.status >= 300:
            log.warning(
                "handoff %s: prefill node %s answered %d (%s); the decode node recomputes",
                handoff_id,
                node.url,
                resp.status,
                payload[:200].decode("utf-8", "replace"),
            )
            return _PrefillResult(handoff=False)
        return _PrefillResult(handoff=True)

    async def _decode(
        self,
        request: web.Request,
        body: dict[str, Any],
        headers: Mapping[str, str],
        handoff_id: str,
        first: int,
    ) -> web.StreamResponse:
        nodes = self._config.decode
        candidates = dict.fromkeys((first, (first + 1) % len(nodes)))  # the next one, once
        failures = []
        for index in candidates:
            url = nodes[index]
            try:
                resp = await self.session.post(
                    url + request.path, json=body, headers=headers, timeout=self._decode_timeout
                )
            except _UNREACHABLE as exc:
                log.warning("handoff %s: decode node %s unreachable: %s", handoff_id, url, exc)
                failures.append(f"{url} ({_describe(exc)})")
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
                message = f"decode node {url} failed: {_describe(exc)}"
                return _error(status, message, handoff_id)
            try:
                answer = await self._answer(request, resp, body.get("stream") is True, handoff_id)
            except BaseException:
                resp.close()  # drop the upstream connection: the node aborts the request
                raise
            resp.release()
            return answer
        message = "no decode node reachable: " + "; ".join(failures)
        return _error(502, message, handoff_id)

    async def _answer(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        stream: bool,
        handoff_id: str,
    ) -> web.StreamResponse:
        """Relay a decode answer: streamed as it arrives when asked for, else whole."""
        if not (stream and resp.status == 200):
            return _relay(resp, await resp.read(), handoff_id)
        out = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                "Cache-Control": "no-cache",
                HANDOFF_HEADER: handoff_id,
            },
        )
        await out.prepare(request)
        try:
            async for data in resp.content.iter_any():
                await out.write(data)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("handoff %s: decode stream from %s broke: %s", handoff_id, resp.url, exc)
            event = _error_object(502, f"decode node stream broke: {_describe(exc)}")
            await out.write(f"data: {json.dumps(event)}\n\n".encode())
        await out.write_eof()
        return out

    # -- GET /v1/models, /health, /metrics --------------------------------------

    async def metrics(self, _request: web.Request) -> web.Response:
        """Prometheus text: routing decisions and their time."""
        return web.Response(
            body=self.route_metrics.text(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def models(self, request: web.Request) -> web.Response:
        """The first decode node (in order) that answers ``/v1/models`` with 200."""
        headers = _forwarded_headers(request)
        failures = []
        for url in self._config.decode:
            try:
                async with self.session.get(
                    url + "/v1/models", headers=headers, timeout=self._probe_timeout
                ) as resp:
                    payload = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures.append(f"{url} ({_describe(exc)})")
                continue
            if resp.status == 200:
                return _relay(resp, payload)
            failures.append(f"{url} (HTTP {resp.status})")
        return _error(502, "no decode node answered /v1/models: " + "; ".join(failures))

    async def health(self, _request: web.Request) -> web.Response:
        """200 when at least one prefill and one decode node are healthy, else 503."""
        prefill_urls = [node.url for node in self._config.prefill]
        answers = await asyncio.gather(
            *(self._probe(url) for url in (*prefill_urls, *self._config.decode))
        )
        prefill = dict(zip(prefill_urls, answers[: len(prefill_urls)], strict=True))
        decode = dict(zip(self._config.decode, answers[len(prefill_urls) :], strict=True))
        down = [
            f"no healthy {role} node ({', '.join(f'{u}: {s}' for u, s in states.items())})"
            for role, states in (("prefill", prefill), ("decode", decode))
            if "up" not in states.values()
        ]
        body: dict[str, Any] = {
            "status": "unavailable" if down else "ok",
            "prefill": prefill,
            "decode": decode,
        }
        if self._router is not None and self._router.directory is not None:
            # Not a health condition: routing falls back to round-robin without it.
            body["directory"] = self._router.directory.replica_health()
        if down:
            body["error"] = "; ".join(down)
        return web.json_response(body, status=503 if down else 200)

    async def _probe(self, url: str) -> str:
        """``"up"``, or why the node's ``/health`` is not answering 200."""
        try:
            async with self.session.get(url + "/health", timeout=self._probe_timeout) as resp:
                return "up" if resp.status == 200 else f"down: HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"down: {_describe(exc)}"


async def _read_json_object(request: web.Request, limit: int) -> dict[str, Any] | web.Response:
    """The request's JSON object, or a 400/413 answer saying what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body exceeds the proxy's limit of {limit} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(400, f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, f"request body must be a JSON object, got {type(body).__name__}")
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        return _error(
            400,
            f"kv_transfer_params must be a JSON object, got {type(params).__name__}",
            param="kv_transfer_params",
        )
    return body


def _forwarded_headers(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}


def _with_kvpeer(body: Mapping[str, Any], kvpeer: dict[str, str] | None) -> dict[str, Any]:
    """``body`` with ``kv_transfer_params.kvpeer`` set to ``kvpeer`` (removed when None).

    The client's other ``kv_transfer_params`` keys are kept.
    """
    params = {k: v for k, v in (body.get("kv_transfer_params") or {}).items() if k != "kvpeer"}
    if kvpeer is not None:
        params["kvpeer"] = kvpeer
    out = dict(body)
    out.pop("kv_transfer_params", None)
    if params:
        out["kv_transfer_params"] = params
    return out


def _prefill_body(body: Mapping[str, Any], kvpeer: dict[str, str], chat: bool) -> dict[str, Any]:
    """The producer request: one token, not streamed, with the producer parameters."""
    out = _with_kvpeer(body, kvpeer)
    for key in _PREFILL_DROPPED_KEYS:
        out.pop(key, None)
    out["max_tokens"] = 1
    if chat:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    return out


def _relay(
    resp: aiohttp.ClientResponse, payload: bytes, handoff_id: str | None = None
) -> web.Response:
    """A node's whole answer, passed on with its status and content type."""
    headers = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
    if handoff_id is not None:
        headers[HANDOFF_HEADER] = handoff_id
    return web.Response(status=resp.status, body=payload, headers=headers)


def _error_object(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object, typed as vLLM types its own."""
    kind = "BadRequestError" if status == 400 else HTTPStatus(status).phrase
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(
    status: int, message: str, handoff_id: str | None = None, *, param: str | None = None
) -> web.Response:
    headers = {HANDOFF_HEADER: handoff_id} if handoff_id else None
    return web.json_response(_error_object(status, message, param), status=status, headers=headers)


def _describe(exc: BaseException) -> str:
    """A one-line reason for a client-side failure (timeouts have empty messages)."""
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__
