"""``kvpeer proxy``: an OpenAI-compatible HTTP front for prefill/decode nodes.

- :mod:`.server`: the aiohttp server, request routing and the PD handoff parameters.

May import: :mod:`kvpeer.api` and :mod:`kvpeer.client`; never a server or the tier.
"""
