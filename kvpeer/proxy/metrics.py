"""The proxy's Prometheus metrics (``GET /metrics``): routing decisions and their cost."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kvpeer.proxy.routing import Decision, Pool


class ProxyMetrics:
    """Counters and a histogram in a registry of their own (tests run several proxies).

    - ``kvpeer_proxy_routed_total{pool, backend, reason}``: requests routed;
    - ``kvpeer_proxy_route_prefix_keys_total{pool}``: chunk keys the chosen backends held;
    - ``kvpeer_proxy_route_keys_total``: chunk keys of the routed requests (their ratio
      is the prefix the routing found);
    - ``kvpeer_proxy_route_seconds``: time to route (keys, directory call, decision).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routed = Counter(
            "kvpeer_proxy_routed",
            "Requests routed, by pool, chosen backend and reason.",
            ("pool", "backend", "reason"),
            registry=self.registry,
        )
        self.prefix_keys = Counter(
            "kvpeer_proxy_route_prefix_keys",
            "Chunk keys the chosen backend held (prefix routing), by pool.",
            ("pool",),
            registry=self.registry,
        )
        self.keys = Counter(
            "kvpeer_proxy_route_keys",
            "Chunk keys of the routed requests (prefix routing).",
            registry=self.registry,
        )
        self.seconds = Histogram(
            "kvpeer_proxy_route_seconds",
            "Time to route a request (keys, directory call, decision).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=self.registry,
        )

    def count(self, decision: Decision, prefill: Pool, decode: Pool) -> None:
        self.seconds.observe(decision.seconds)
        for pool, choice in ((prefill, decision.prefill), (decode, decision.decode)):
            self.routed.labels(pool.name, pool.backend_name(choice.index), choice.reason).inc()
            self.prefix_keys.labels(pool.name).inc(choice.prefix_keys)
        self.keys.inc(decision.keys)

    def text(self) -> bytes:
        return generate_latest(self.registry)
