"""How the proxy picks a node per request: ``round-robin``, ``least-loaded`` or ``prefix``.

The default is ``prefix`` when the proxy is given a directory to ask, else
``round-robin``: on the routing benchmark (``kvpeer bench --routing``, README)
prefix routing recomputes several times fewer chunks and pulls less.

**Backends and directory nodes.** Each backend (a vLLM HTTP base URL) may be given
its kvpeer identity as ``[NODE_ID=]HOST:PORT`` (``--prefill-kvpeer`` /
``--decode-kvpeer``, in the order of the URLs). A directory node *is* that backend
when its node id equals ``NODE_ID`` — or, without one, when its advertised kvpeer
endpoint equals ``HOST:PORT`` (also its node id by default). Directory nodes that
match no backend are ignored; backends no directory node matches score 0.

**Load** of a backend is the larger of the requests this proxy has in flight to it
(always fresh) and the ``running_requests`` its tier last reported to the directory
(which also counts other proxies' requests; ignored once older than 10 s).

**round-robin**: the next backend in turn. **least-loaded**: the backend with the
least load; ties go to the next in turn.

**prefix** (the rule, per pool, with ``slack`` and ``margin`` from :class:`PickRule`):

1. Compute the request's chunk keys from its token ids (:mod:`kvpeer.api.keys`) and
   ask the directory for every node's longest held prefix (one Score call for both
   pools, deadline ``--route-timeout``).
2. ``best`` = the longest prefix among the pool's backends. If ``best`` is 0, pick as
   least-loaded.
3. The *leader* is the least-loaded backend holding ``best`` keys (ties: next in turn).
4. A *challenger* is the least-loaded backend holding at least ``best - slack`` keys
   (but fewer than ``best``). It wins only when its load is at least ``margin`` below
   the leader's: giving up a little prefix (one chunk by default) is worth it only
   to a much less loaded node.

Decode uses ``slack`` 1, ``margin`` 4 (a decode node holding the prefix pulls less);
prefill uses ``slack`` 1, ``margin`` 2 (prefill is compute-bound: load counts more).

**Fallback**: a text or chat prompt (the proxy has no tokenizer), a prompt shorter
than one chunk, token ids that cannot be hashed, a directory that is unreachable,
slow or refusing: round-robin, with the reason (``fallback-...``) in the decision.
Routing never fails a request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.keys import HashCache, KeySpec, request_cache_salt, request_tokens
from kvpeer.api.limits import MAX_KEYS_PER_CALL
from kvpeer.api.security import Security
from kvpeer.client.replicas import parse_directory_endpoints
from kvpeer.client.score import NodeScore, ScoreClient, ScoreError

log = logging.getLogger(__name__)

#: A node's reported load older than this is not used.
LOAD_MAX_AGE_S = 10.0


class RoutePolicy(str, Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    PREFIX = "prefix"


@dataclass(frozen=True)
class NodeRef:
    """How a backend is known to the directory: a node id and/or a kvpeer endpoint."""

    endpoint: Endpoint
    node_id: str | None = None

    def matches(self, score: NodeScore) -> bool:
        if self.node_id is not None:
            return score.node_id == self.node_id
        return score.endpoint == str(self.endpoint) or score.node_id == str(self.endpoint)

    def __str__(self) -> str:
        return self.node_id or str(self.endpoint)


def parse_node_ref(text: str, *, key: str) -> NodeRef:
    """``HOST:PORT`` or ``NODE_ID=HOST:PORT``; ConfigError naming ``key`` otherwise."""
    node_id, sep, address = text.strip().rpartition("=")
    if sep and (not node_id or any(c.isspace() for c in node_id)):
        raise ConfigError(key, f"expected [NODE_ID=]HOST:PORT, got {text!r}")
    return NodeRef(parse_endpoint(address, key=key), node_id or None)


@dataclass(frozen=True)
class PickRule:
    """The prefix rule's knobs (see the module docstring)."""

    slack_keys: int = 1
    load_margin: int = 4


DECODE_RULE = PickRule(slack_keys=1, load_margin=4)
PREFILL_RULE = PickRule(slack_keys=1, load_margin=2)


@dataclass
class Pool:
    """One pool of backends (prefill or decode): names, identities, in-flight counts."""

    name: str
    urls: tuple[str, ...]
    refs: tuple[NodeRef | None, ...]
    rule: PickRule
    inflight: list[int] = field(init=False)
    _turn: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inflight = [0] * len(self.urls)
        self._turn = itertools.count()

    def next_turn(self) -> int:
        return next(self._turn) % len(self.urls)

    def backend_name(self, index: int) -> str:
        """The backend's directory identity if known, else its URL (headers, metrics)."""
        ref = self.refs[index]
        return str(ref) if ref is not None else self.urls[index]


@dataclass(frozen=True)
class Choice:
    """The backend picked in one pool: its index, why, and the prefix it holds."""

    index: int
    reason: str
    prefix_keys: int = 0


@dataclass(frozen=True)
class Decision:
    """The picks for one request; :meth:`header` is the ``x-kvpeer-route`` value."""

    policy: RoutePolicy
    prefill: Choice
    decode: Choice
    keys: int
    seconds: float

    def header(self, prefill: Pool, decode: Pool) -> str:
        return (
            f"policy={self.policy.value}; reason={self.decode.reason}; "
            f"decode={decode.backend_name(self.decode.index)}; "
            f"decode_prefix={self.decode.prefix_keys}; "
            f"prefill={prefill.backend_name(self.prefill.index)}; "
            f"prefill_prefix={self.prefill.prefix_keys}; "
            f"keys={self.keys}; route_us={round(self.seconds * 1e6)}"
        )


def _load(pool: Pool, index: int, reported: NodeScore | None) -> int:
    load = pool.inflight[index]
    if (
        reported is not None
        and reported.running_requests is not None
        and (reported.load_age_s or 0.0) <= LOAD_MAX_AGE_S
    ):
        load = max(load, reported.running_requests)
    return load


def _least(indices: Sequence[int], loads: Sequence[int], start: int, size: int) -> int:
    """The least loaded of ``indices``; ties go to the first at or after ``start`` in turn."""
    return min(indices, key=lambda i: (loads[i], (i - start) % size))


def pick_least_loaded(pool: Pool, scores: Sequence[NodeScore | None] | None = None) -> Choice:
    loads = [_load(pool, i, scores[i] if scores else None) for i in range(len(pool.urls))]
    index = _least(range(len(pool.urls)), loads, pool.next_turn(), len(pool.urls))
    return Choice(index, "least-loaded")


def pick_by_prefix(pool: Pool, scores: Sequence[NodeScore | None]) -> Choice:
    """The prefix rule of the module docstring over one pool (``scores`` by backend)."""
    size = len(pool.urls)
    prefix = [s.prefix_keys if s is not None else 0 for s in scores]
    loads = [_load(pool, i, scores[i]) for i in range(size)]
    start = pool.next_turn()
    best = max(prefix)
    if best == 0:
        return Choice(_least(range(size), loads, start, size), "no-prefix-held", 0)
    leader = _least([i for i in range(size) if prefix[i] == best], loads, start, size)
    near = [i for i in range(size) if best - pool.rule.slack_keys <= prefix[i] < best]
    if near:
        challenger = _least(near, loads, start, size)
        if loads[challenger] + pool.rule.load_margin <= loads[leader]:
            return Choice(challenger, "prefix-near-tie-less-loaded", prefix[challenger])
    return Choice(leader, "prefix", best)


def match_scores(pool: Pool, scores: Sequence[NodeScore]) -> list[NodeScore | None]:
    """For each backend, the directory node that is it (None: not in the directory)."""
    out: list[NodeScore | None] = []
    for ref in pool.refs:
        out.append(next((s for s in scores if ref is not None and ref.matches(s)), None))
    return out


def check_route_options(options: dict[str, Any], *, mapped: bool) -> None:
    """Validate (in place) the routing fields of ProxyConfig options; ConfigError names the flag.

    ``mapped``: some backend was given its kvpeer identity (prefix routing needs that).
    """
    route = options.get("route")
    if route is None:  # the default: prefix when a directory is given to ask
        route = RoutePolicy.PREFIX if options.get("directory") else RoutePolicy.ROUND_ROBIN
    try:
        options["route"] = RoutePolicy(route)
    except ValueError:
        choices = ", ".join(p.value for p in RoutePolicy)
        raise ConfigError("--route", f"expected one of {choices}, got {route!r}") from None
    if options["route"] is not RoutePolicy.PREFIX:
        return
    if not options.get("directory"):
        raise ConfigError("--directory", "--route prefix needs the directory's host:port")
    options["directory"] = parse_directory_endpoints(options["directory"], key="--directory")
    if options.get("key_spec") is None:
        raise ConfigError("--block-size", "--route prefix needs the nodes' --block-size")
    if not mapped:
        raise ConfigError(
            "--decode-kvpeer",
            "--route prefix needs to know which directory node each backend is: "
            "give --decode-kvpeer (and --prefill-kvpeer) [NODE_ID=]host:port",
        )


class Router:
    """Routes requests over a prefill and a decode pool. Use on one event loop.

    ``directory`` and ``keys`` are needed for ``prefix`` (and make ``least-loaded``
    use reported loads only through in-flight counts: it never asks the directory).
    """

    def __init__(
        self,
        policy: RoutePolicy,
        prefill: Pool,
        decode: Pool,
        *,
        directory: ScoreClient | None = None,
        keys: KeySpec | None = None,
    ) -> None:
        if policy is RoutePolicy.PREFIX and (directory is None or keys is None):
            raise ConfigError("--route", "prefix routing needs --directory and --block-size")
        self.policy = policy
        self.prefill = prefill
        self.decode = decode
        self.directory = directory
        self.keys = keys
        self._cache = HashCache()

    @classmethod
    def create(
        cls,
        policy: RoutePolicy,
        prefill: Sequence[tuple[str, NodeRef | None]],
        decode: Sequence[tuple[str, NodeRef | None]],
        *,
        directory: str | Sequence[str] | None = None,
        timeout_s: float = 0.005,
        keys: KeySpec | None = None,
        security: Security | None = None,
    ) -> Router:
        """A router over ``(url, directory identity)`` backends; call on the event loop.

        Opens a :class:`ScoreClient` to ``directory`` for ``prefix``, presenting
        ``security``'s credentials (:meth:`close` it).
        """
        score = (
            ScoreClient(directory, timeout_s=timeout_s, security=security)
            if directory is not None and policy is RoutePolicy.PREFIX
            else None
        )
        return cls(
            policy,
            Pool(
                "prefill", tuple(u for u, _ in prefill), tuple(r for _, r in prefill), PREFILL_RULE
            ),
            Pool("decode", tuple(u for u, _ in decode), tuple(r for _, r in decode), DECODE_RULE),
            directory=score,
            keys=keys,
        )

    async def close(self) -> None:
        if self.directory is not None:
            await self.directory.close()

    def _fallback(self, reason: str, keys: int = 0, started: float = 0.0) -> Decision:
        return Decision(
            self.policy,
            Choice(self.prefill.next_turn(), reason),
            Choice(self.decode.next_turn(), reason),
            keys,
            time.perf_counter() - started if started else 0.0,
        )

    async def route(self, body: Mapping[str, Any]) -> Decision:
        """Pick the prefill and decode backends for a request body. Never raises."""
        started = time.perf_counter()
        if self.policy is RoutePolicy.ROUND_ROBIN:
            return self._fallback("round-robin", 0, started)
        if self.policy is RoutePolicy.LEAST_LOADED:
            return Decision(
                self.policy,
                pick_least_loaded(self.prefill),
                pick_least_loaded(self.decode),
                0,
                time.perf_counter() - started,
            )
        assert self.keys is not None and self.directory is not None
        tokens = request_tokens(body, strict=False)
        if tokens is None:
            return self._fallback("fallback-text-prompt", 0, started)
        try:
            keys = self.keys.chunk_keys(
                tokens,
                cache_salt=request_cache_salt(body),
                max_keys=MAX_KEYS_PER_CALL,
                cache=self._cache,
            )
        except Exception:  # e.g. a list among the token ids: vLLM will refuse the request
            log.debug("cannot compute chunk keys for a prompt", exc_info=True)
            return self._fallback("fallback-bad-tokens", 0, started)
        if not keys:
            return self._fallback("fallback-short-prompt", 0, started)
        try:
            scores = await self.directory.score(keys)
        except ScoreError as exc:
            return self._fallback(f"fallback-directory-{exc.reason}", len(keys), started)
        return Decision(
            self.policy,
            pick_by_prefix(self.prefill, match_scores(self.prefill, scores)),
            pick_by_prefix(self.decode, match_scores(self.decode, scores)),
            len(keys),
            time.perf_counter() - started,
        )
