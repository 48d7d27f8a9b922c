"""``kvpeer proxy``: an OpenAI-compatible HTTP front for prefill/decode nodes.

- :mod:`.config`: the settings, checked once (node lists, routing, timeouts);
- :mod:`.server`: the aiohttp server, the PD handoff parameters;
- :mod:`.routing`: which node serves a request (round-robin, least-loaded, prefix);
- :mod:`.metrics`: the proxy's Prometheus metrics.

May import: :mod:`kvpeer.api` and :mod:`kvpeer.client`; never a server or the tier.
"""
