"""``kvpeer proxy --route``: prefix routing through a real directory, its rule, its fallbacks.

The proxy runs in front of stand-in vLLM nodes (tests/support/proxy.py) and asks a
real DirectoryServer (memory or Redis) in which fake nodes joined and published
the keys kvpeer.api.keys computes for a prompt, as their tiers would.
"""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import closing

import pytest

from kvpeer.api.keys import KeySpec
from kvpeer.api.security import Security
from kvpeer.client.score import NodeScore, ScoreClient
from kvpeer.proxy.routing import (
    DECODE_RULE,
    NodeRef,
    PickRule,
    Pool,
    RoutePolicy,
    Router,
    parse_node_ref,
    pick_by_prefix,
)
from kvpeer.proxy.server import ROUTE_HEADER
from kvpeer.v1 import directory_pb2 as pb
from tests.support.directory import (
    FP_A,
    RPC_TIMEOUT_S,
    DirectoryHarness,
    make_directory,
    publish,
)
from tests.support.proxy import proxy_cluster, run_async

__all__ = ["make_directory"]

SPEC = KeySpec(16, seed="route-test")
PROMPT = list(range(500, 500 + 16 * 8 + 5))  # 8 full chunks
KEYS = SPEC.chunk_keys(PROMPT)
DECODE_IDS = ["decode-0:7601", "decode-1:7601", "decode-2:7601"]


def holdings(
    directory: DirectoryHarness, held: dict[str, int], security: Security | None = None
) -> None:
    """Join a node per entry (its node id is its endpoint) holding KEYS[:n]."""
    stub = directory.stub(security)
    for node, count in held.items():
        request = pb.JoinRequest(node_id=node, endpoint=node, fingerprint=FP_A.to_proto())
        epoch = stub.Join(request, timeout=RPC_TIMEOUT_S).epoch
        if count:
            publish(stub, node, epoch, KEYS[:count])


def route_of(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split("; "))


def routed_options(directory_endpoint: str, **more: object) -> dict[str, object]:
    return {
        "route": "prefix",
        "directory": directory_endpoint,
        "key_spec": SPEC,
        "decode_kvpeer": DECODE_IDS,
        "route_timeout_s": 0.5,  # loaded CI machines; the fallback tests use short ones
        **more,
    }


def test_prefix_routing_sends_a_prompt_to_its_holder(make_directory) -> None:
    directory = make_directory("memory")
    holdings(
        directory,
        {"decode-1:7601": 8, "decode-2:7601": 3, "prefill-1:7601": 8, "stranger:7601": 8},
    )

    async def scenario() -> None:
        async with proxy_cluster(2, 3, **routed_options(directory.endpoint)) as c:
            for _ in range(4):  # every time, not one time in three
                body = {"model": "m", "prompt": PROMPT, "max_tokens": 2}
                async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["node"] == "decode-1"
                    route = route_of(resp.headers[ROUTE_HEADER])
                assert route["policy"] == "prefix" and route["reason"] == "prefix"
                assert (route["decode"], route["decode_prefix"]) == ("decode-1:7601", "8")
                assert (route["prefill"], route["prefill_prefix"]) == ("prefill-1:7601", "8")
                assert route["keys"] == "8"
            assert len(c.prefill[1].received) == 4 and not c.prefill[0].received
            # A streamed answer carries the header too; a batch of token prompts uses the first.
            body = {"model": "m", "prompt": [PROMPT, [1, 2]], "stream": True}
            async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                assert route_of(resp.headers[ROUTE_HEADER])["decode"] == "decode-1:7601"
                await resp.read()
            async with c.client.get(f"{c.proxy_url}/metrics") as resp:
                text = await resp.text()
            assert (
                'kvpeer_proxy_routed_total{backend="decode-1:7601",pool="decode",reason="prefix"} 5.0'
                in text
            )
            assert "kvpeer_proxy_route_keys_total 40.0" in text
            assert "kvpeer_proxy_route_seconds_count 5.0" in text

    run_async(scenario())


def test_text_prompts_and_short_prompts_fall_back_to_round_robin(make_directory) -> None:
    directory = make_directory("memory")
    holdings(directory, {"decode-1:7601": 8})

    async def scenario() -> None:
        async with proxy_cluster(1, 3, **routed_options(directory.endpoint)) as c:
            seen = []
            for body in (
                {"model": "m", "prompt": "text has no token ids"},
                {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                {"model": "m", "prompt": PROMPT[:10]},  # shorter than a chunk
                {"model": "m", "prompt": [1, *[[2]] * 20, 3]},  # vLLM's to refuse
            ):
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                async with c.client.post(c.proxy_url + path, json=body) as resp:
                    assert resp.status == 200
                    seen.append(route_of(resp.headers[ROUTE_HEADER])["reason"])
            assert seen == [
                *["fallback-text-prompt"] * 2,
                "fallback-short-prompt",
                "fallback-bad-tokens",
            ]
            assert sorted(len(d.received) for d in c.decode) == [1, 1, 2]  # round-robin

    run_async(scenario())


def test_prefix_routing_asks_a_directory_that_requires_a_reader_token(
    make_directory, tmp_path
) -> None:
    tokens = {}
    for role in ("shared", "reader"):
        tokens[role] = tmp_path / f"{role}.token"
        tokens[role].write_text(f"tok-{role}-0123456789\n")
    server = Security.from_config(
        auth_token_file=str(tokens["shared"]), read_only_token_file=str(tokens["reader"])
    )
    directory = make_directory("memory", security=server)
    holdings(
        directory, {"decode-2:7601": 8}, Security.from_config(auth_token_file=str(tokens["shared"]))
    )

    async def scenario(security: Security | None) -> dict[str, str]:
        options = routed_options(directory.endpoint, directory_security=security)
        async with proxy_cluster(1, 3, **options) as c:
            body = {"model": "m", "prompt": PROMPT}
            async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                return route_of(resp.headers[ROUTE_HEADER])

    reader = Security.from_config(auth_token_file=str(tokens["reader"]))
    route = run_async(scenario(reader))
    assert (route["reason"], route["decode"]) == ("prefix", "decode-2:7601")
    assert run_async(scenario(None))["reason"] == "fallback-directory-refused"


def _silent_listener() -> socket.socket:
    """A TCP port that accepts connections and never answers: a hung directory."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("failure", ["down", "hung"])
def test_an_unreachable_or_hung_directory_never_fails_a_request(failure: str) -> None:
    with closing(_silent_listener()) as hung, closing(socket.socket()) as free:
        free.bind(("127.0.0.1", 0))
        port = hung.getsockname()[1] if failure == "hung" else free.getsockname()[1]
        if failure == "down":
            free.close()  # nothing listens there now
        options = routed_options(f"127.0.0.1:{port}", route_timeout_s=0.005)

        async def scenario() -> None:
            async with proxy_cluster(1, 3, **options) as c:
                reasons = []
                for _ in range(3):
                    started = time.monotonic()
                    body = {"model": "m", "prompt": PROMPT}
                    async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        reasons.append(route_of(resp.headers[ROUTE_HEADER])["reason"])
                    assert time.monotonic() - started < 2.0
                assert all(r.startswith("fallback-directory-") for r in reasons), reasons
                assert sorted(len(d.received) for d in c.decode) == [1, 1, 1]

        run_async(scenario())


def test_prefix_routing_fails_over_to_a_live_directory_replica(make_directory) -> None:
    directory = make_directory("memory")
    holdings(directory, {"decode-0:7601": 8})
    with closing(socket.socket()) as free:
        free.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{free.getsockname()[1]}"  # nothing listens there
    options = routed_options([dead, directory.endpoint])

    async def scenario() -> list[str]:
        async with proxy_cluster(1, 3, **options) as c:
            reasons = []
            for _ in range(3):
                body = {"model": "m", "prompt": PROMPT}
                async with c.client.post(f"{c.proxy_url}/v1/completions", json=body) as resp:
                    route = route_of(resp.headers[ROUTE_HEADER])
                    reasons.append(f"{route['reason']}:{route['decode']}")
            return reasons

    assert run_async(scenario()) == ["prefix:decode-0:7601"] * 3


def test_least_loaded_and_round_robin_policies() -> None:
    async def scenario() -> None:
        async with proxy_cluster(1, 2, route="least-loaded") as c:
            hold = asyncio.Event()
            c.decode[0].hold = hold
            first = asyncio.create_task(
                c.client.post(f"{c.proxy_url}/v1/completions", json={"prompt": "a"})
            )
            await asyncio.sleep(0.2)  # decode-0 now has one request in flight
            for _ in range(3):
                async with c.client.post(
                    f"{c.proxy_url}/v1/completions", json={"prompt": "b"}
                ) as resp:
                    assert route_of(resp.headers[ROUTE_HEADER])["reason"] == "least-loaded"
                    assert (await resp.json())["node"] == "decode-1"
            hold.set()
            (await first).release()

    run_async(scenario())


def test_the_prefix_rule_breaks_ties_and_near_ties_by_load() -> None:
    def pool(inflight: list[int], rule: PickRule = DECODE_RULE) -> Pool:
        p = Pool("decode", tuple(f"http://d{i}" for i in range(len(inflight))), (None,) * 3, rule)
        p.inflight[:] = inflight
        return p

    def scores(*prefix: int, running: list[int | None] | None = None) -> list[NodeScore]:
        running = running or [None] * len(prefix)
        return [
            NodeScore(
                f"d{i}", f"d{i}:1", "fp", n, running[i], None, None, 0.0 if running[i] else None
            )
            for i, n in enumerate(prefix)
        ]

    assert pick_by_prefix(pool([0, 0, 0]), scores(2, 8, 3)).index == 1
    # Tied leaders: the less loaded one.
    assert pick_by_prefix(pool([5, 0, 1]), scores(8, 8, 3)).index == 1
    # Near tie (one chunk less) wins only when much less loaded (margin 4).
    assert pick_by_prefix(pool([3, 0, 0]), scores(8, 7, 0)).index == 0
    choice = pick_by_prefix(pool([4, 0, 0]), scores(8, 7, 0))
    assert (choice.index, choice.reason, choice.prefix_keys) == (
        1,
        "prefix-near-tie-less-loaded",
        7,
    )
    # Two chunks less is never a near tie.
    assert pick_by_prefix(pool([20, 0, 0]), scores(8, 6, 0)).index == 0
    # The directory's reported load counts when it exceeds the proxy's own count.
    assert pick_by_prefix(pool([0, 0, 0]), scores(8, 7, 0, running=[9, 1, None])).index == 1
    # Nobody holds anything: least loaded.
    choice = pick_by_prefix(pool([2, 1, 3]), scores(0, 0, 0))
    assert (choice.index, choice.reason) == (1, "no-prefix-held")
    # Backend identities.
    assert parse_node_ref("n-1=host:7601", key="k") == NodeRef(
        parse_node_ref("host:7601", key="k").endpoint, "n-1"
    )


def test_memory_and_redis_directories_give_the_same_decisions(make_directory) -> None:
    """The same holdings in both stores: the same backend for each prompt, in order."""
    prompts = [PROMPT[: 16 * n] for n in range(1, 9)] + [list(range(9000, 9100))]

    async def decisions(directory: DirectoryHarness) -> list[tuple[int, int]]:
        router = Router.create(
            RoutePolicy.PREFIX,
            [("http://p0", None)],
            [(f"http://d{i}", parse_node_ref(DECODE_IDS[i], key="k")) for i in range(3)],
            directory=directory.endpoint,
            timeout_s=2.0,
            keys=SPEC,
        )
        try:
            out = []
            for prompt in prompts:
                decision = await router.route({"prompt": prompt})
                out.append((decision.decode.index, decision.decode.prefix_keys))
            return out
        finally:
            await router.close()

    answers = []
    for kind in ("memory", "redis"):
        directory = make_directory(kind)
        holdings(directory, {"decode-0:7601": 2, "decode-1:7601": 8, "decode-2:7601": 5})
        answers.append(run_async(decisions(directory)))
    assert answers[0] == answers[1]
    assert [p for _, p in answers[0][:8]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(index == 1 for index, _ in answers[0][5:8])


def test_a_node_that_left_is_no_longer_preferred(make_directory) -> None:
    directory = make_directory("redis")
    holdings(directory, {"decode-0:7601": 8, "decode-1:7601": 4})

    async def scenario() -> None:
        client = ScoreClient(directory.endpoint, timeout_s=2.0)
        try:
            before = {s.node_id: s.prefix_keys for s in await client.score(KEYS)}
            holdings(directory, {"decode-0:7601": 0})  # re-join: a new registration, empty
            after = {s.node_id: s.prefix_keys for s in await client.score(KEYS)}
        finally:
            await client.close()
        assert before == {"decode-0:7601": 8, "decode-1:7601": 4}
        assert after == {"decode-0:7601": 0, "decode-1:7601": 4}

    run_async(scenario())


def _proxy_config(argv: list[str]):
    from kvpeer.cli import build_parser
    from kvpeer.cli.proxy import config_from_args

    args = build_parser().parse_args(["proxy", "--prefill", "http://p:8000", *argv])
    return config_from_args(args)[0]


def test_the_default_route_is_prefix_when_a_directory_is_given() -> None:
    assert _proxy_config(["--decode", "http://d:8000"]).route is RoutePolicy.ROUND_ROBIN
    routed = [
        "--decode", "http://d:8000", "--decode-kvpeer", "d:7601",
        "--directory", "dir:7600", "--block-size", "16", "--hash-seed", "1",
    ]  # fmt: skip
    config = _proxy_config(routed)
    assert config.route is RoutePolicy.PREFIX and config.directory == ("dir:7600",)
    assert config.decode_refs == (parse_node_ref("d:7601", key="x"),)
    assert _proxy_config([*routed, "--route", "least-loaded"]).route is RoutePolicy.LEAST_LOADED


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--directory", "dir:7600"], "--block-size: --route prefix needs the nodes'"),
        (
            ["--directory", "dir:7600", "--block-size", "16"],
            "--decode-kvpeer: --route prefix needs to know which directory node",
        ),
        (["--route", "prefix", "--block-size", "16"], "--directory: --route prefix needs"),
        (
            ["--decode-kvpeer", "a:1", "b:2"],
            "--decode-kvpeer: got 2 endpoint(s) for 1 decode URL(s)",
        ),
        (["--decode-kvpeer", "=d:1"], "--decode-kvpeer[0]: expected [NODE_ID=]HOST:PORT"),
        (["--block-size", "0"], "--block-size: expected a positive integer"),
        (
            ["--block-size", "16", "--hash-algo", "xxhash"],
            "--hash-seed: xxhash nodes use a random NONE_HASH seed",
        ),
        (["--route-timeout", "0"], "--route-timeout: expected a positive"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file: cannot read"),
    ],
)
def test_routing_options_are_checked_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from kvpeer.cli import main as kvpeer_main

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert (
        kvpeer_main(["proxy", "--prefill", "http://p:8000", "--decode", "http://d:8000", *argv])
        == 2
    )
    assert message in capsys.readouterr().err
