"""Per-request safety alpha in the model runner: attach the safety weights, fill alpha every step.

* :func:`setup_runner` (after vLLM's ``load_lora_model``): locate the safety adapter, build the layer
  table (coverage-checked), attach it to the safety punica wrappers, create the runner's
  :class:`TokenAlphaFiller` and start the guard when configured. Fails closed: every adapter is
  refused when the alpha path is asked for and cannot start.
* :func:`on_step` (after vLLM's ``set_active_loras``, every step): per-token alpha into the wrappers'
  buffers, then the guard's plan for the requests whose prefill ends in this step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..alpha import AlphaPolicy, AlphaTable, resolve_request_alpha
from ..config import load_config
from ..core.artifacts import locate
from ..errors import SafetyPathError
from ..methods.safegene import SAFETY_ADAPTER
from ..metrics import get_metrics
from .guard_runner import plan_guard_step, start_guard
from .layer_table import build_layer_safety, linear_lora_layers
from .punica_wrapper.punica_base import SafetyState
from .worker_state import STATE_ATTR, model_dir

logger = logging.getLogger("vllm_safeguard")

# Attribute of the model runner holding its TokenAlphaFiller.
FILLER_ATTR = "_safeguard_alpha_filler"


@dataclass
class TokenAlphaFiller:
    """Computes each step's per-token alpha from the batch's requests and hands it to the wrappers.

    Per request: an :class:`AlphaTable` override (the guard) wins; else ``extra_args`` parsed once per
    request (cached by request id and SamplingParams identity); else the configured default
    (``default_alpha`` with a task adapter, ``base_request_alpha`` without).
    """

    wrappers: Sequence[SafetyState]
    policy: AlphaPolicy
    table: AlphaTable = field(default_factory=AlphaTable)
    _cache: dict[str, tuple[Any, float]] = field(default_factory=dict)

    def request_alpha(self, req_id: str, state: Any) -> float:
        override = self.table.get(req_id) if self.table else None
        if override is not None:
            return override
        sp = getattr(state, "sampling_params", None)
        hit = self._cache.get(req_id)
        if hit is not None and hit[0] is sp:
            return hit[1]
        lora = getattr(state, "lora_request", None)
        alpha = resolve_request_alpha(
            getattr(sp, "extra_args", None),
            self.policy,
            has_task_adapter=lora is not None and int(getattr(lora, "lora_int_id", 0)) > 0,
        )
        self._cache[req_id] = (sp, alpha)
        return alpha

    def apply_decision(self, req_id: str, alpha: float, start: int, end: int) -> None:
        """A guard's decision for one request: later steps use ``alpha`` (table), and so do the tokens
        ``[start, end)`` of the current step in the layers still to be computed."""
        self.table.set(req_id, alpha)
        for w in self.wrappers:
            w.set_alpha_range(start, end, alpha)

    def fill(self, req_ids: Sequence[str], requests: Any, num_scheduled_tokens: np.ndarray) -> torch.Tensor:
        n_req = len(num_scheduled_tokens)
        per_req = np.fromiter(
            (self.request_alpha(rid, requests.get(rid)) for rid in req_ids[:n_req]),
            dtype=np.float32,
            count=n_req,
        )
        if len(self._cache) > 2 * n_req + 64:  # drop finished requests now and then
            live = set(req_ids[:n_req])
            self._cache = {k: v for k, v in self._cache.items() if k in live or k in requests}
            self.table.prune(requests)
        tokens = torch.from_numpy(np.repeat(per_req, num_scheduled_tokens))
        for w in self.wrappers:
            w.set_token_alpha(tokens)
        return tokens


def on_step(runner: Any, input_batch: Any, num_scheduled_tokens: Any) -> None:
    """Every step, after vLLM set its LoRA mapping: this step's per-token alpha, then the guard plan."""
    filler = getattr(runner, FILLER_ATTR, None)
    if filler is None:
        return
    filler.fill(input_batch.req_ids, runner.requests, num_scheduled_tokens)
    plan_guard_step(runner, input_batch, num_scheduled_tokens)


def setup_runner(runner: Any, vllm_config: Any) -> TokenAlphaFiller | None:
    """Attach the safety weights to the runner's punica wrappers (after ``load_lora_model``).

    Never raises: when the config asks for the alpha path and it cannot start, the worker's adapter
    pipeline is switched off with the reason, so every adapter load is refused (fail closed, the same
    pattern as a broken reference), and the error is logged.
    """
    manager = getattr(runner, "lora_manager", None)
    state = getattr(manager, STATE_ATTR, None)
    config = getattr(state, "config", None)
    if config is None:
        try:
            config = load_config(getattr(vllm_config, "additional_config", None) or {})
        except Exception:
            return None  # attach_worker already refuses every adapter with the config error
    if not (config.enabled and config.alpha_enabled):
        return None
    try:
        adapter_manager = manager._adapter_manager  # type: ignore[union-attr]
        wrappers = [w for w in adapter_manager.punica_wrapper_mapping.values() if isinstance(w, SafetyState)]
        if not wrappers:
            raise SafetyPathError(
                "the platform's punica wrapper was not replaced (unsupported platform "
                f"{type(next(iter(adapter_manager.punica_wrapper_mapping.values()), None)).__name__})"
            )
        tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1))
        if tp > 1:
            raise SafetyPathError(
                f"tensor parallel size {tp} > 1 is not supported (safety weights are not sharded)"
            )
        if type(runner).__module__.startswith("vllm.v1.worker.gpu."):
            raise SafetyPathError("the V2 model runner is not supported yet; set VLLM_USE_V2_MODEL_RUNNER=0")
        model_cfg = vllm_config.model_config
        model_name = getattr(state, "model_name", None) or str(model_cfg.model)
        folder = model_dir(str(model_cfg.model))
        safety = locate(SAFETY_ADAPTER, config, model_name, folder, needed_by="alpha_enabled").value
        layers = build_layer_safety(
            linear_lora_layers(adapter_manager), dict(adapter_manager.packed_modules_mapping), safety
        )
        for w in wrappers:
            w.attach_safety(layers)
        filler = TokenAlphaFiller(wrappers, AlphaPolicy.from_config(config))
        setattr(runner, FILLER_ATTR, filler)
        if config.guard_path is not None:
            start_guard(runner, config.guard_path, folder, filler.apply_decision, model_name)
        logger.info(
            "vllm-safeguard: per-request safety alpha active on %d layers (default %g, base requests %g, "
            "range [%g, %g])",
            len(layers),
            config.default_alpha,
            config.base_request_alpha,
            config.alpha_min,
            config.alpha_max,
        )
        return filler
    except Exception as e:
        msg = f"safety alpha path cannot start: {type(e).__name__}: {e}"
        logger.error("vllm-safeguard: %s; every adapter will be refused", msg)
        if state is not None:
            state.error = msg
            state.pipeline = None
            try:
                get_metrics().worker_active.labels(model_name=state.model_name, method=config.method).set(0)
            except Exception as me:  # metrics must never stop the worker
                logger.warning("vllm-safeguard: metrics error ignored: %s", me)
        return None
