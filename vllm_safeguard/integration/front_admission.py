"""The API server's side of admission before the engine (:mod:`vllm_safeguard.admission.frontend`).

Every way an adapter reaches vLLM's engine from the API server goes through ``AsyncLLM.add_lora``:
``/v1/load_lora_adapter``, ``--lora-modules`` at startup (vLLM loads them with the same method) and the
LoRA resolvers. The patch on it (:func:`admit_then_add`) admits the adapter in this process's
admission pool, then hands the engine the admitted cache entry instead of the source folder, by
rewriting the ``LoRARequest``'s ``lora_path`` in place (vLLM keeps that object for every later request
of the adapter, so an eviction reload reads the entry too). The worker verifies the entry and keys it
itself (``SafeguardPipeline.handed_over``); a repair never runs inside the engine loop.

Refusals raise :class:`~vllm_safeguard.errors.AdapterRefused` as in the worker: vLLM turns them into a
500, :func:`~vllm_safeguard.integration.api_server.refusal_as_400` into a 400 (a 503 for an overload).
A resolver swallows the error of ``add_lora``; :func:`resolver_error` restores its text. vLLM's
``_check_model`` forwards only a 400 from a resolver (any other status becomes "model not found"), so a
resolver load refused for overload is a 400 whose message says so, not a 503.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from ..admission.frontend import ContextUnavailable, FrontAdmission
from ..config import load_config
from ..errors import AdapterRefused, AdapterValidationError, refusal_kind, refusal_text
from ..protection import resolve_protection
from .worker_state import model_dir, served_model_name

logger = logging.getLogger("vllm_safeguard")

_ATTR = "_safeguard_front_admission"
# The last refusal text of this task's add_lora (a resolver catches the exception itself).
_REFUSAL: contextvars.ContextVar[str | None] = contextvars.ContextVar("safeguard_refusal", default=None)
_warned: set[str] = set()


def _front(client: Any) -> FrontAdmission | None:
    """This engine client's admission (built once), or None where the API server does not admit."""
    cached = getattr(client, _ATTR, None)
    if cached is not None:
        return cached if isinstance(cached, FrontAdmission) else None
    front: FrontAdmission | bool
    try:
        vllm_config = client.vllm_config
        config = load_config(getattr(vllm_config, "additional_config", None) or {})
        model_name = served_model_name(vllm_config)
        if config.enabled and config.admission_frontend:
            # Same artifact-dependent defaults as the worker (its key depends on them).
            config, _ = resolve_protection(config, model_name, model_dir(str(vllm_config.model_config.model)))
            instance = str(getattr(vllm_config, "instance_id", "") or "")
            front = FrontAdmission(config, model_name, instance)
        else:
            front = False
    except Exception as e:  # the worker admits instead (it is the authority either way)
        logger.warning("vllm-safeguard: admission before the engine is off (%s); the worker admits", e)
        front = False
    setattr(client, _ATTR, front)
    return front if isinstance(front, FrontAdmission) else None


def _warn_once(what: str, why: object) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning("vllm-safeguard: %s: %s", what, why)


def _count_refusal(front: FrontAdmission, kind: str) -> None:
    try:
        from ..metrics import get_metrics

        get_metrics().loads.labels(
            model_name=front.model_name, outcome=f"refused_{kind}", method=front.config.method
        ).inc()
    except Exception as e:  # metrics must never change a decision
        logger.warning("vllm-safeguard: metrics error ignored: %s", e)


async def admit_then_add(
    client: Any, lora_request: Any, original: Callable[[Any, Any], Awaitable[Any]]
) -> Any:
    """The body of the patched ``AsyncLLM.add_lora`` (see module docstring)."""
    front = _front(client)
    if front is None or lora_request is None:
        return await original(client, lora_request)
    from .worker_hook import adapter_folder

    name = str(lora_request.lora_name)
    try:
        try:
            folder = adapter_folder(front.config, lora_request.lora_path)
        except Exception as e:  # outside the adapter roots, or not a path at all
            _count_refusal(front, "invalid")
            if isinstance(e, AdapterValidationError):
                raise AdapterRefused(name, str(e), "invalid") from e
            raise AdapterRefused(
                name, f"cannot resolve adapter path {lora_request.lora_path!r}: {e}", "invalid"
            ) from e
        if not os.path.isdir(folder):
            return await original(client, lora_request)  # the worker answers vLLM's own 404
        try:
            outcome = await front.admit(folder, name)
        except ContextUnavailable as e:
            _warn_once("adapters are admitted in the worker, inside the engine loop", e)
            return await original(client, lora_request)
        except AdapterRefused as e:
            if e.kind != "overloaded":
                _count_refusal(front, e.kind)
            raise
        except Exception as e:
            kind = refusal_kind(e)
            if not front.config.fail_closed and kind == "error":
                # fail_closed=false: the worker applies the policy (it serves or refuses, and counts).
                logger.error(
                    "vllm-safeguard: admission of %r failed in the API server (%s); the worker decides",
                    name,
                    e,
                )
                return await original(client, lora_request)
            _count_refusal(front, kind)
            raise AdapterRefused(name, str(e), kind) from e
    except AdapterRefused as e:
        logger.error("vllm-safeguard: adapter %r refused (%s): %s", name, e.kind, e.reason)
        _REFUSAL.set(str(e))
        raise
    lora_request.lora_path = str(outcome.path)  # in place: later requests and reloads read the entry
    return await original(client, lora_request)


def resolver_error(serving: Any, result: Any, original: Callable[..., Any]) -> Any:
    """``resolve_lora``'s result with our refusal's text restored (vLLM answers any failed resolver load
    with a generic 400; see the module docstring for why an overload stays a 400 here)."""
    message = _REFUSAL.get()
    if message is None or getattr(result, "error", None) is None:
        return result
    _REFUSAL.set(None)
    make_error = getattr(sys.modules.get(original.__module__), "create_error_response", None)
    text = refusal_text(message) or message
    if make_error is None:
        return result
    return make_error(message=f"vllm-safeguard: {text}", status_code=HTTPStatus.BAD_REQUEST)


async def resolve_then_restore(serving: Any, lora_name: str, original: Callable[..., Awaitable[Any]]) -> Any:
    """The body of the patched ``OpenAIServingModels.resolve_lora``."""
    token = _REFUSAL.set(None)
    try:
        result = await original(serving, lora_name)
        return resolver_error(serving, result, original)
    finally:
        _REFUSAL.reset(token)
