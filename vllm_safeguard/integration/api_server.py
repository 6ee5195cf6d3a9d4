"""The API-server side: what the front-end patches call before and after the engine sees a request.

* :func:`early_path_refusal`: a ``/v1/load_lora_adapter`` path outside ``adapter_roots`` gets a 400
  before the engine is asked (the worker checks again: it is the authority).
* :func:`refusal_as_400`: vLLM turns any ``add_lora`` failure into a 500; a safeguard refusal (the
  delimited text of :class:`~vllm_safeguard.errors.AdapterRefused`) becomes a 400 carrying our message,
  a full admission queue (:mod:`vllm_safeguard.integration.front_admission`) a 503.
* :func:`request_adapter_problem`: a request whose adapter's admitted copy is gone gets a 400 of its
  own (:mod:`vllm_safeguard.admission.bindings`), before the engine step.

Anything unexpected here defers to the worker (returns None): the API server is never the only check.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from ..admission.bindings import binding_problem
from ..admission.paths import resolve_adapter_path
from ..config import load_config
from ..errors import AdapterValidationError, is_overload, refusal_text
from .worker_state import served_model_name

logger = logging.getLogger("vllm_safeguard")


def early_path_refusal(serving: Any, request: Any, original: Callable[..., Any]) -> Any | None:
    """API-server side of path containment: a ``lora_path`` outside ``adapter_roots`` gets a 400 here,
    before the engine sees it. The worker checks again (it is the authority: static adapters and
    resolvers never pass through here); anything unexpected here defers to it."""
    try:
        vllm_config = getattr(getattr(serving, "engine_client", None), "vllm_config", None)
        config = load_config(getattr(vllm_config, "additional_config", None) or {})
        lora_path = getattr(request, "lora_path", None)
        if not config.enabled or not config.adapter_roots or not isinstance(lora_path, str) or not lora_path:
            return None
        make_error = getattr(sys.modules.get(original.__module__), "create_error_response", None)
        if make_error is None:
            return None
    except Exception as e:
        logger.debug("vllm-safeguard: API-side path check skipped (%s); the worker checks", e)
        return None
    try:
        resolve_adapter_path(lora_path, config.adapter_roots)
    except AdapterValidationError as e:
        name = str(getattr(request, "lora_name", ""))
        logger.error("vllm-safeguard: adapter %r refused: %s", name, e)
        return make_error(
            message=f"vllm-safeguard: adapter {name!r} refused: {e}", status_code=HTTPStatus.BAD_REQUEST
        )
    return None


def refusal_as_400(result: Any) -> Any:
    """``result`` of ``load_lora_adapter`` with a safeguard refusal (a 500 from ``add_lora``) turned
    into a 400 carrying our message (a 503 when the admission queue was full); any other result
    unchanged."""
    error = getattr(result, "error", None)
    text = refusal_text(str(getattr(error, "message", ""))) if error is not None else None
    if error is None or text is None:
        return result
    kind, code = ("ServiceUnavailableError", 503) if is_overload(text) else ("BadRequestError", 400)
    new_error = error.model_copy(update={"message": f"vllm-safeguard: {text}", "type": kind, "code": code})
    return result.model_copy(update={"error": new_error})


def request_adapter_problem(processor: Any, lora_request: Any) -> str | None:
    """API-server side of reload integrity (vllm_safeguard.admission.bindings); anything unexpected
    defers to the worker."""
    try:
        cached = getattr(processor, "_safeguard_binding_ctx", None)
        if cached is None:  # once per processor: the config does not change while it lives
            vllm_config = getattr(processor, "vllm_config", None)
            config = load_config(getattr(vllm_config, "additional_config", None) or {})
            instance = str(getattr(vllm_config, "instance_id", "") or "")
            cached = (config, served_model_name(vllm_config), instance)
            processor._safeguard_binding_ctx = cached
        config, model_name, instance = cached
        if not config.enabled:
            return None
        return binding_problem(
            config.cache_dir, model_name, str(lora_request.lora_name), int(lora_request.lora_int_id), instance
        )
    except Exception as e:
        logger.debug("vllm-safeguard: API-side binding check skipped (%s); the worker decides", e)
        return None
