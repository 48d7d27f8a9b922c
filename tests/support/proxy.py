"""Stand-in vLLM nodes and a running ``kvpeer proxy`` for the proxy's tests.

A :class:`StandInNode` is a real aiohttp server on a free loopback port that answers
like vLLM's OpenAI server (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``) and records every completion request it receives. Tests
steer it through a few knobs (status, health, gates that hold an answer) and read what
it saw. :func:`proxy_cluster` starts stand-in prefill and decode nodes and the real
proxy in front of them. Everything runs on the test's own event loop
(:func:`run_async` gives each test a fresh one with an overall deadline).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from kvpeer.api.endpoint import Endpoint
from kvpeer.proxy.config import ProxyConfig
from kvpeer.proxy.server import ProxyServer

T = TypeVar("T")

#: Global arrival order of requests and answers across all stand-ins.
_sequence = itertools.count()


def run_async(coro: Awaitable[T], timeout_s: float = 60.0) -> T:
    """Run ``coro`` on a fresh event loop; fail instead of hanging past ``timeout_s``."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``predicate`` until it holds; raise AssertionError naming ``what`` at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Received:
    """One completion request as a stand-in saw it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    #: Position in the global order of arrivals and answers.
    seq: int

    @property
    def kvpeer(self) -> dict[str, Any] | None:
        return (self.body.get("kv_transfer_params") or {}).get("kvpeer")


@dataclass
class StandInNode:
    """A stand-in vLLM OpenAI server. Create and use on one event loop."""

    name: str
    #: Answer completions with this status and an OpenAI error object (None: 200).
    status: int | None = None
    #: What ``/health`` answers: 200 when True, 503 when False.
    healthy: bool = True
    #: When set, completion handlers wait for this event before answering.
    hold: asyncio.Event | None = None
    #: When set, a streamed answer sends its first event, then waits for this event.
    pause_after_first_event: asyncio.Event | None = None
    #: Content events in a streamed answer (before ``data: [DONE]``).
    stream_events: int = 5
    received: list[Received] = field(default_factory=list)
    #: ``seq`` of each completion answer sent in full.
    answered: list[int] = field(default_factory=list)
    events_sent: int = 0
    #: Set when a completion request ended because its client (the proxy) went away.
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> StandInNode:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # Like vLLM: a client that disconnects cancels the request's handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        for gate in (self.hold, self.pause_after_first_event):
            if gate is not None:
                gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body, next(_sequence)))
        try:
            resp = await self._answer(request, body)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise
        self.answered.append(next(_sequence))
        return resp

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.hold is not None:
            await self.hold.wait()
        if self.status is not None:
            error = {"message": f"{self.name} refuses", "type": "x", "code": self.status}
            return web.json_response({"error": error}, status=self.status)
        if body.get("stream"):
            return await self._stream(request)
        return web.json_response(
            {
                "object": "text_completion",
                "node": self.name,
                "choices": [{"index": 0, "text": f"answer from {self.name}"}],
            }
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.stream_events):
            if i == 1 and self.pause_after_first_event is not None:
                await self.pause_after_first_event.wait()
            event = {"node": self.name, "choices": [{"index": 0, "text": f"t{i}"}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            self.events_sent += 1
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), {}, next(_sequence)))
        if not self.healthy:
            return web.json_response({"error": {"message": "down"}}, status=503)
        return web.json_response(
            {"object": "list", "data": [{"id": "stand-in-model", "owned_by": self.name}]}
        )

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)


@contextmanager
def unreachable_url() -> Iterator[str]:
    """A URL whose port is bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Cluster:
    """Stand-in nodes, the proxy in front of them, and a client session."""

    proxy_url: str
    prefill: list[StandInNode]
    decode: list[StandInNode]
    client: aiohttp.ClientSession

    @property
    def nodes(self) -> list[StandInNode]:
        return [*self.prefill, *self.decode]


@asynccontextmanager
async def proxy_cluster(
    prefill: int = 1,
    decode: int = 1,
    *,
    prefill_kvpeer: bool = True,
    extra_prefill_urls: tuple[str, ...] = (),
    extra_decode_urls: tuple[str, ...] = (),
    **options: Any,
) -> AsyncIterator[Cluster]:
    """Start ``prefill`` + ``decode`` stand-ins and a proxy in front of them.

    ``extra_*_urls`` are placed before the stand-ins in the proxy's node lists (e.g.
    unreachable nodes, tried first). With ``prefill_kvpeer`` the i-th prefill node's
    kvpeer endpoint is ``prefill-{i}:7601``. ``options`` go to :class:`ProxyConfig`.
    """
    nodes: list[StandInNode] = []
    proxy: ProxyServer | None = None
    try:
        prefills = [StandInNode(f"prefill-{i}") for i in range(prefill)]
        decodes = [StandInNode(f"decode-{i}") for i in range(decode)]
        for node in (*prefills, *decodes):
            nodes.append(await node.start())
        prefill_urls = [*extra_prefill_urls, *(n.url for n in prefills)]
        kvpeer = [f"prefill-{i}:7601" for i in range(len(prefill_urls))] if prefill_kvpeer else []
        config = ProxyConfig.create(
            prefill_urls, [*extra_decode_urls, *(n.url for n in decodes)], kvpeer, **options
        )
        proxy = await ProxyServer(config, Endpoint("127.0.0.1", 0)).start()
        async with aiohttp.ClientSession() as client:
            yield Cluster(proxy.url, prefills, decodes, client)
    finally:
        for node in nodes:
            await node.close()
        if proxy is not None:
            await proxy.close()


async def read_events(resp: aiohttp.ClientResponse, count: int | None = None) -> list[str]:
    """The ``data:`` payloads of the next ``count`` SSE events (all of them when None)."""
    events = []
    while count is None or len(events) < count:
        line = await resp.content.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append(line[len(b"data: ") :].decode().strip())
    return events
