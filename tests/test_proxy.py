"""The PD proxy, started for real in front of stand-in vLLM nodes (tests/support/proxy.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid

import aiohttp
import pytest

from kvpeer.api.endpoint import Endpoint
from kvpeer.cli import main as kvpeer_main
from kvpeer.proxy.server import HANDOFF_HEADER
from kvpeer.tier.params import parse_request_params
from tests.support.proxy import (
    StandInNode,
    proxy_cluster,
    read_events,
    run_async,
    unreachable_url,
    wait_until,
)

AUTH = {"Authorization": "Bearer client-token"}


def _is_uuid4(text: str) -> bool:
    return uuid.UUID(text).version == 4


def test_completion_hands_off_from_prefill_to_decode() -> None:
    client_body = {
        "model": "m",
        "prompt": "hello",
        "max_tokens": 40,
        "min_tokens": 3,
        "temperature": 0,
        "kv_transfer_params": {"other": {"x": 1}, "kvpeer": {"role": "client-set"}},
    }

    async def scenario() -> None:
        async with proxy_cluster() as c:
            async with c.client.post(
                f"{c.proxy_url}/v1/completions", json=client_body, headers=AUTH
            ) as resp:
                assert resp.status == 200
                answer = await resp.json()
                handoff_id = resp.headers[HANDOFF_HEADER]
            assert answer["node"] == "decode-0"
            assert _is_uuid4(handoff_id)

            (prefill,) = c.prefill[0].received
            expected_prefill = {
                k: v for k, v in client_body.items() if k not in ("min_tokens",)
            } | {
                "max_tokens": 1,
                "stream": False,
                "kv_transfer_params": {
                    "other": {"x": 1},
                    "kvpeer": {"handoff_id": handoff_id, "role": "producer"},
                },
            }
            assert prefill.body == expected_prefill
            assert "max_completion_tokens" not in prefill.body

            (decode,) = c.decode[0].received
            assert decode.body == client_body | {
                "kv_transfer_params": {
                    "other": {"x": 1},
                    "kvpeer": {
                        "handoff_id": handoff_id,
                        "role": "consumer",
                        "source": "prefill-0:7601",
                    },
                }
            }
            # What the tier makes of them (kvpeer.tier.params parses kv_transfer_params).
            produce = parse_request_params(prefill.body["kv_transfer_params"])
            consume = parse_request_params(decode.body["kv_transfer_params"])
            assert (produce.role, produce.handoff_id) == ("producer", handoff_id)
            assert (consume.role, consume.handoff_id) == ("consumer", handoff_id)
            assert consume.source == Endpoint("prefill-0", 7601)
            # Prefill first: the decode request left only after the prefill answer.
            assert decode.seq > c.prefill[0].answered[0]
            for seen in (prefill, decode):
                assert seen.headers["Authorization"] == AUTH["Authorization"]

    run_async(scenario())


def test_chat_prefill_is_one_token_and_unstreamed_decode_keeps_the_request() -> None:
    client_body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 30,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def scenario() -> None:
        async with proxy_cluster(prefill_kvpeer=False) as c:
            async with c.client.post(
                f"{c.proxy_url}/v1/chat/completions", json=client_body
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = await read_events(resp)
                handoff_id = resp.headers[HANDOFF_HEADER]
            assert events[-1] == "[DONE]"
            assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [
                f"t{i}" for i in range(5)
            ]

            (prefill,) = c.prefill[0].received
            assert prefill.path == "/v1/chat/completions"
            assert prefill.body["max_tokens"] == 1
            assert prefill.body["max_completion_tokens"] == 1
            assert prefill.body["stream"] is False
            assert "stream_options" not in prefill.body
            (decode,) = c.decode[0].received
            assert decode.path == "/v1/chat/completions"
            # Without --prefill-kvpeer the consumer has no source: the directory finds it.
            assert decode.body == client_body | {
                "kv_transfer_params": {"kvpeer": {"handoff_id": handoff_id, "role": "consumer"}}
            }

    run_async(scenario())


def test_stream_reaches_the_client_before_the_node_sends_the_rest() -> None:
    async def scenario() -> None:
        async with proxy_cluster() as c:
            node = c.decode[0]
            node.pause_after_first_event = asyncio.Event()
            body = {"model": "m", "prompt": "p", "stream": True}
            async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                first = await asyncio.wait_for(read_events(resp, 1), 10)
                assert json.loads(first[0])["choices"][0]["text"] == "t0"
                # The stand-in is paused after its first event: the proxy did not
                # wait for the whole answer before passing the first event on.
                assert node.events_sent == 1 < node.stream_events
                node.pause_after_first_event.set()
                rest = await read_events(resp)
            assert len(rest) == node.stream_events  # t1..t4 and [DONE]
            assert rest[-1] == "[DONE]"

    run_async(scenario())


def test_round_robin_over_prefill_and_decode_nodes() -> None:
    async def scenario() -> None:
        async with proxy_cluster(prefill=2, decode=2) as c:
            for _ in range(4):
                async with c.client.post(
                    f"{c.proxy_url}/v1/completions", json={"model": "m", "prompt": "p"}
                ) as resp:
                    assert resp.status == 200
            assert [len(n.received) for n in c.nodes] == [2, 2, 2, 2]
            # Each handoff names, as its source, the prefill node that produced it.
            producers = {
                r.kvpeer["handoff_id"]: i for i, n in enumerate(c.prefill) for r in n.received
            }
            for node in c.decode:
                for r in node.received:
                    assert r.kvpeer["source"] == f"prefill-{producers[r.kvpeer['handoff_id']]}:7601"
            order = sorted((r.seq, n.name) for n in c.decode for r in n.received)
            assert [name for _, name in order] == ["decode-0", "decode-1"] * 2

    run_async(scenario())


@pytest.mark.parametrize(
    ("payload", "content_type", "message", "param"),
    [
        (b'{"model": "m", "prompt": ', "application/json", "not valid JSON", None),
        (b'["a list"]', "application/json", "must be a JSON object, got list", None),
        (b"\xff\xfe", "application/json", "not valid JSON", None),
        (
            b'{"prompt": "p", "kv_transfer_params": [1]}',
            "application/json",
            "kv_transfer_params must be a JSON object",
            "kv_transfer_params",
        ),
    ],
)
def test_bad_request_body_is_400_with_an_openai_error(
    payload: bytes, content_type: str, message: str, param: str | None
) -> None:
    async def scenario() -> None:
        async with proxy_cluster() as c:
            async with c.client.post(
                f"{c.proxy_url}/v1/completions",
                data=payload,
                headers={"Content-Type": content_type},
            ) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
            assert message in error["message"]
            assert error["type"] == "BadRequestError"
            assert error["code"] == 400
            assert error["param"] == param
            assert all(not n.received for n in c.nodes)

    run_async(scenario())


def test_prefill_client_error_is_passed_through_and_decode_is_not_called() -> None:
    async def scenario() -> None:
        async with proxy_cluster() as c:
            c.prefill[0].status = 422
            async with c.client.post(
                f"{c.proxy_url}/v1/completions", json={"model": "nope", "prompt": "p"}
            ) as resp:
                assert resp.status == 422
                assert (await resp.json())["error"]["message"] == "prefill-0 refuses"
                assert _is_uuid4(resp.headers[HANDOFF_HEADER])
            assert c.decode[0].received == []

    run_async(scenario())


@pytest.mark.parametrize("failure", ["5xx", "unreachable", "timeout"])
def test_failed_prefill_skips_the_handoff_and_decode_recomputes(failure: str) -> None:
    async def scenario() -> None:
        with unreachable_url() as dead:
            if failure == "unreachable":
                cluster = proxy_cluster(prefill=0, extra_prefill_urls=(dead,))
            else:
                cluster = proxy_cluster(timeout_s=0.5)
            async with cluster as c:
                if failure == "5xx":
                    c.prefill[0].status = 503
                if failure == "timeout":
                    c.prefill[0].hold = asyncio.Event()  # never answers
                body = {"model": "m", "prompt": "p", "kv_transfer_params": {"other": 1}}
                async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["node"] == "decode-0"
                (decode,) = c.decode[0].received
                # No consumer parameters (nothing to hand off); the client's own kept.
                assert decode.body == body
                if failure == "timeout":
                    # The proxy gave up on the producer request and closed it.
                    await wait_until(c.prefill[0].aborted.is_set, "prefill request aborted")

    run_async(scenario())


def test_unreachable_decode_node_is_replaced_by_the_next_one() -> None:
    async def scenario() -> None:
        with unreachable_url() as dead:
            async with proxy_cluster(extra_decode_urls=(dead,)) as c:
                for _ in range(2):  # first turn: dead node, then the next; second turn: next
                    async with c.client.post(
                        f"{c.proxy_url}/v1/completions", json={"model": "m", "prompt": "p"}
                    ) as resp:
                        assert resp.status == 200
                        assert (await resp.json())["node"] == "decode-0"
                assert len(c.decode[0].received) == 2
                # The retried request still carries the handoff parameters.
                assert all(r.kvpeer["role"] == "consumer" for r in c.decode[0].received)

    run_async(scenario())


def test_no_reachable_decode_node_is_502_naming_the_nodes() -> None:
    async def scenario() -> None:
        with unreachable_url() as dead_a, unreachable_url() as dead_b:
            async with proxy_cluster(decode=0, extra_decode_urls=(dead_a, dead_b)) as c:
                async with c.client.post(
                    f"{c.proxy_url}/v1/completions", json={"model": "m", "prompt": "p"}
                ) as resp:
                    assert resp.status == 502
                    error = (await resp.json())["error"]
                assert dead_a in error["message"] and dead_b in error["message"]
                assert error["code"] == 502

    run_async(scenario())


def test_client_disconnect_mid_stream_cancels_the_decode_request() -> None:
    async def scenario() -> None:
        async with proxy_cluster() as c:
            node = c.decode[0]
            node.pause_after_first_event = asyncio.Event()
            body = {"model": "m", "prompt": "p", "stream": True}
            resp = await c.client.post(f"{c.proxy_url}/v1/completions", json=body)
            assert resp.status == 200
            assert len(await read_events(resp, 1)) == 1
            resp.close()  # the client goes away mid-stream
            await wait_until(node.aborted.is_set, "the decode node to see the request aborted")
            assert node.answered == []

    run_async(scenario())


def test_concurrent_mode_sends_decode_before_the_prefill_answer() -> None:
    async def scenario() -> None:
        async with proxy_cluster(concurrent=True) as c:
            prefill, decode = c.prefill[0], c.decode[0]
            prefill.hold, decode.hold = asyncio.Event(), asyncio.Event()

            async def send() -> aiohttp.ClientResponse:
                body = {"model": "m", "prompt": "p"}
                return await c.client.post(f"{c.proxy_url}/v1/completions", json=body)

            request = asyncio.create_task(send())
            await wait_until(
                lambda: prefill.received and decode.received, "both nodes to get the request"
            )
            assert prefill.answered == []  # the decode request did not wait for it
            handoff = prefill.received[0].kvpeer["handoff_id"]
            assert decode.received[0].kvpeer == {
                "handoff_id": handoff,
                "role": "consumer",
                "source": "prefill-0:7601",
            }
            prefill.hold.set()
            await wait_until(lambda: prefill.answered, "the prefill answer")
            decode.hold.set()
            async with await request as resp:
                assert resp.status == 200
                assert resp.headers[HANDOFF_HEADER] == handoff

    run_async(scenario())


def test_health_needs_one_healthy_prefill_and_one_healthy_decode_node() -> None:
    async def scenario() -> None:
        with unreachable_url() as dead:
            async with proxy_cluster(prefill=2, decode=1, extra_decode_urls=(dead,)) as c:
                async with c.client.get(f"{c.proxy_url}/health") as resp:
                    assert resp.status == 200
                    body = await resp.json()
                assert body["status"] == "ok"
                assert body["decode"][c.decode[0].url] == "up"
                assert body["decode"][dead].startswith("down")

                c.prefill[0].healthy = False  # one prefill node left is enough
                async with c.client.get(f"{c.proxy_url}/health") as resp:
                    assert resp.status == 200

                c.decode[0].healthy = False
                async with c.client.get(f"{c.proxy_url}/health") as resp:
                    assert resp.status == 503
                    body = await resp.json()
                assert body["status"] == "unavailable"
                assert "no healthy decode node" in body["error"]
                assert dead in body["error"] and c.decode[0].url in body["error"]
                assert "prefill" not in body["error"]
                assert body["decode"][c.decode[0].url] == "down: HTTP 503"

    run_async(scenario())


def test_models_come_from_the_first_healthy_decode_node() -> None:
    async def scenario() -> None:
        with unreachable_url() as dead:
            async with proxy_cluster(decode=2, extra_decode_urls=(dead,)) as c:
                c.decode[0].healthy = False
                async with c.client.get(f"{c.proxy_url}/v1/models", headers=AUTH) as resp:
                    assert resp.status == 200
                    models = await resp.json()
                assert models["data"] == [{"id": "stand-in-model", "owned_by": "decode-1"}]
                assert c.decode[1].received[0].headers["Authorization"] == AUTH["Authorization"]

                c.decode[1].healthy = False
                async with c.client.get(f"{c.proxy_url}/v1/models") as resp:
                    assert resp.status == 502
                    message = (await resp.json())["error"]["message"]
                assert dead in message and c.decode[1].url in message

    run_async(scenario())


# -- the command line -----------------------------------------------------------

# Runs `kvpeer` with torch and vLLM made unimportable: the proxy must not need them.
_NO_VLLM_MAIN = (
    "import sys\n"
    "sys.modules['torch'] = sys.modules['vllm'] = None\n"
    "from kvpeer.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_cli_serves_the_proxy_without_torch_or_vllm() -> None:
    async def scenario() -> None:
        prefill, decode = await StandInNode("prefill").start(), await StandInNode("decode").start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _NO_VLLM_MAIN,
            "--log-level=INFO",
            "proxy",
            "--listen=127.0.0.1:0",
            f"--prefill={prefill.url}",
            f"--decode={decode.url}",
            "--prefill-kvpeer=prefill:7601",
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log_lines: list[str] = []
        try:
            url = None
            while url is None:
                line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
                assert line, f"the proxy exited early: {''.join(log_lines)}"
                log_lines.append(line)
                found = re.search(r"listening on (http://\S+)", line)
                url = found and found.group(1)
            drain = asyncio.create_task(proc.stderr.read())  # keep the pipe flowing
            async with (
                aiohttp.ClientSession() as client,
                client.post(f"{url}/v1/completions", json={"model": "m", "prompt": "p"}) as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["node"] == "decode"
            assert decode.received[0].kvpeer["source"] == "prefill:7601"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            await drain
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await prefill.close()
            await decode.close()

    run_async(scenario())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--prefill", "http://p:8000", "http://q:8000", "--prefill-kvpeer", "p:7601"],
            "--prefill-kvpeer: got 1 endpoint(s) for 2 prefill URL(s)",
        ),
        (["--prefill", "p:8000"], "--prefill[0]: expected an http:// or https:// URL"),
        (["--prefill", "http://p:99999"], "--prefill[0]: invalid port"),
        (["--prefill", "http://p:8000", "--listen", "nohost"], "--listen: missing ':port'"),
        (["--prefill", "http://p:8000", "--timeout", "0"], "--timeout: expected a positive"),
        (
            ["--prefill", "http://p:8000", "--prefill-kvpeer", "p:x"],
            "--prefill-kvpeer[0]: port must be a number",
        ),
    ],
)
def test_cli_rejects_bad_options_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kvpeer_main(["proxy", "--decode", "http://d:8000", *argv]) == 2
    assert message in capsys.readouterr().err
