"""Which safety punica wrapper this platform gets (vLLM's ``punica_selector`` for the safety path)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vllm_safeguard")

# Set in the worker by attach_worker when the config asks for the alpha path; read by the
# get_punica_wrapper patch, which runs later in the same process (inside create_lora_manager).
_WANTED = False


def request_safety_wrapper(wanted: bool = True) -> None:
    global _WANTED
    _WANTED = wanted


def safety_wrapper_wanted() -> bool:
    return _WANTED


def make_safety_wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The safety subclass of the platform's punica wrapper; the platform's own when there is none
    (the load_lora_model hook then refuses to start the safety path, loudly)."""
    from vllm.platforms import current_platform

    qualname = str(current_platform.get_punica_wrapper())
    cls: type | None = None
    if qualname.endswith(".PunicaWrapperCPU"):
        from .punica_cpu import SafeguardPunicaWrapperCPU

        cls = SafeguardPunicaWrapperCPU
    elif qualname.endswith(".PunicaWrapperGPU"):
        from .punica_gpu import SafeguardPunicaWrapperGPU  # None where vLLM has no GPU wrapper

        cls = SafeguardPunicaWrapperGPU
    if cls is None:
        logger.error("vllm-safeguard: no safety punica wrapper for %s", qualname)
        return original(*args, **kwargs)
    logger.info("vllm-safeguard: using %s (per-request safety alpha)", cls.__name__)
    return cls(*args, **kwargs)
