"""Per-request safety alpha in the model runner: bind the safety weights, fill alpha every step.

* :func:`setup_runner` (after vLLM's ``load_lora_model``): locate the safety adapter, build the layer
  table (coverage-checked, tensor-parallel shards), bind every LoRA-wrapped linear layer to the safety
  wrappers (static layer ids), create the runner's :class:`TokenAlphaFiller` and start the guard when
  configured. Fails closed: every adapter is refused when the alpha path is asked for and cannot start,
  or vLLM runs in a mode it does not support (the error names the flag).

Per step, on both of vLLM's model runners::

    V1 runner: set_active_loras(input_batch, num_scheduled)   -> stage_v1  (before vLLM's body)
    V2 runner: LoraState.make_lora_inputs(req_ids, slots, n)  -> stage_v2
               (the request's extra_args come from add_requests, recorded by on_new_requests)
    both, and every dummy / profile / CUDA-graph capture run:
        _set_active_loras(prompt_mapping, token_mapping, ...) -> apply_step
            alpha[t] = staged alpha of token t's request, or 0 when nothing was staged (dummy runs)
            every safety wrapper: set_token_alpha(alpha)   (in place: captured graphs see it)
            guard: its plan into the op's buffers
    after execute_model                                       -> after_step (guard scores -> table)

A request's alpha: an :class:`AlphaTable` override (the guard's decision) wins; else its
``extra_args`` (parsed once per request); else the configured default (``default_alpha`` with a task
adapter, ``base_request_alpha`` without).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
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
from .guard_runner import GuardRuntime, guard_flags, start_guard
from .layer_table import build_layer_safety, linear_lora_layers
from .punica_wrapper.punica_base import SafetyState
from .worker_state import STATE_ATTR, model_dir

logger = logging.getLogger("vllm_safeguard")

# Attribute holding the TokenAlphaFiller: on the model runner, and (V2) on its LoraState.
FILLER_ATTR = "_safeguard_alpha_filler"
_LANGUAGE = "LANGUAGE"  # vLLM's LoRAMappingType for the language model (towers have their own wrappers)


def _has_task(lora_request: Any) -> bool:
    """Whether a request runs through a task adapter (vLLM's LoRA ids start at 1)."""
    return lora_request is not None and int(getattr(lora_request, "lora_int_id", 0)) > 0


@dataclass
class TokenAlphaFiller:
    """Computes each step's per-token alpha from the batch's requests and hands it to the wrappers."""

    wrappers: Sequence[SafetyState]
    policy: AlphaPolicy
    table: AlphaTable = field(default_factory=AlphaTable)
    guard: GuardRuntime | None = None
    # req_id -> (SamplingParams, LoRARequest): the V2 runner keeps no per-request sampling params.
    requests: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    _cache: dict[str, tuple[Any, float]] = field(default_factory=dict)
    _staged: torch.Tensor | None = None

    def request_alpha(self, req_id: str, sampling_params: Any, lora_request: Any) -> float:
        override = self.table.get(req_id) if self.table else None
        if override is not None:
            return override
        hit = self._cache.get(req_id)
        if hit is not None and hit[0] is sampling_params:
            return hit[1]
        alpha = resolve_request_alpha(
            getattr(sampling_params, "extra_args", None),
            self.policy,
            has_task_adapter=_has_task(lora_request),
        )
        self._cache[req_id] = (sampling_params, alpha)
        return alpha

    def stage(
        self,
        req_ids: Sequence[str],
        num_scheduled_tokens: np.ndarray,
        request: Callable[[str], tuple[Any, Any]],
        plan_guard: Callable[[GuardRuntime, Callable[[int], tuple[bool, bool]]], None],
        live: Any,
    ) -> None:
        """This step's per-token alpha (host) and the guard's plan, for :meth:`apply` to use.
        ``request(req_id) -> (sampling params, lora request)``; ``live``: the runner's current
        requests (finished ones are dropped from the caches now and then)."""
        n_req = len(num_scheduled_tokens)
        ids = list(req_ids[:n_req])
        info = [request(rid) for rid in ids]
        per_req = np.fromiter(
            (self.request_alpha(rid, sp, lora) for rid, (sp, lora) in zip(ids, info, strict=True)),
            dtype=np.float32,
            count=n_req,
        )
        if len(self._cache) > 2 * n_req + 64:  # drop finished requests now and then
            self._cache = {k: v for k, v in self._cache.items() if k in live or k in ids}
            self.table.prune(live)
            if self.guard is not None:
                self.guard.forget(live)
        self._staged = torch.from_numpy(np.repeat(per_req, num_scheduled_tokens))
        if self.guard is not None:
            by_default = self.policy.default_auto

            def flags(i: int) -> tuple[bool, bool]:
                sp, lora = info[i]
                return guard_flags(
                    getattr(sp, "extra_args", None), auto_by_default=by_default and _has_task(lora)
                )

            plan_guard(self.guard, flags)

    def apply(self, num_tokens: int) -> torch.Tensor:
        """Fill every wrapper's alpha buffer for this step (see the module Semantics)."""
        staged, self._staged = self._staged, None
        alpha = staged if staged is not None and staged.numel() == num_tokens else torch.zeros(num_tokens)
        for w in self.wrappers:
            w.set_token_alpha(alpha)
        if self.guard is not None:
            self.guard.apply(num_tokens)
        return alpha


def _filler(holder: Any) -> TokenAlphaFiller | None:
    return getattr(holder, FILLER_ATTR, None)


def stage_v1(runner: Any, input_batch: Any, num_scheduled_tokens: np.ndarray) -> None:
    """V1 runner, before ``set_active_loras``: requests in ``runner.requests``."""
    filler = _filler(runner)
    if filler is None:
        return
    n = len(num_scheduled_tokens)

    def request(rid: str) -> tuple[Any, Any]:
        state = runner.requests.get(rid)
        return getattr(state, "sampling_params", None), getattr(state, "lora_request", None)

    def plan(guard: GuardRuntime, flags: Callable[[int], tuple[bool, bool]]) -> None:
        guard.plan_step(
            input_batch.req_ids[:n],
            num_scheduled_tokens,
            input_batch.num_computed_tokens_cpu[:n],
            input_batch.num_prompt_tokens[:n],
            flags,
        )

    filler.stage(input_batch.req_ids, num_scheduled_tokens, request, plan, runner.requests)


def stage_v2(
    lora_state: Any, req_ids: Sequence[str], idx_mapping: np.ndarray, num_scheduled: np.ndarray
) -> None:
    """V2 runner, from ``LoraState.make_lora_inputs``: requests recorded by :func:`on_new_requests`."""
    filler = _filler(lora_state)
    if filler is None:
        return
    runner = lora_state._safeguard_runner

    def request(rid: str) -> tuple[Any, Any]:
        return filler.requests.get(rid, (None, lora_state.lora_requests.get(rid)))

    def plan(guard: GuardRuntime, flags: Callable[[int], tuple[bool, bool]]) -> None:
        states = runner.req_states
        guard.plan_step(
            req_ids,
            num_scheduled,
            states.num_computed_tokens_np[idx_mapping],
            states.prompt_len.np[idx_mapping],
            flags,
        )

    filler.stage(req_ids, num_scheduled, request, plan, filler.requests)


def on_new_requests(runner: Any, scheduler_output: Any) -> None:
    """V2 runner, after ``add_requests``: remember each new request's sampling params and adapter."""
    filler = _filler(runner)
    if filler is None:
        return
    for new in getattr(scheduler_output, "scheduled_new_reqs", ()):
        filler.requests[new.req_id] = (new.sampling_params, new.lora_request)


def on_removed_request(runner: Any, req_id: str) -> None:
    filler = _filler(runner)
    if filler is not None:
        filler.requests.pop(req_id, None)


def apply_step(runner: Any, token_lora_mapping: Sequence[int], mapping_type: Any) -> None:
    """After vLLM's ``_set_active_loras`` (every step, dummy and capture runs included)."""
    filler = _filler(runner)
    kind = _LANGUAGE if mapping_type is None else getattr(mapping_type, "name", mapping_type)
    if filler is None or kind != _LANGUAGE:
        return
    filler.apply(len(token_lora_mapping))


def after_step(runner: Any) -> None:
    """After ``execute_model``: the guard's scores of this step to the alpha table, metrics, records."""
    filler = _filler(runner)
    if filler is not None and filler.guard is not None:
        filler.guard.collect()


# ------------------------------------------------------------------------------------- setup


def _runtime_pool(vllm_config: Any) -> AbstractContextManager[Any]:
    """vLLM 0.33 keeps LoRA state in the "runtime" memory pool under sleep mode (level-2 sleep throws
    the "weights" pool away); the safety tensors and guard buffers go there too."""
    if not getattr(vllm_config.model_config, "enable_sleep_mode", False):
        return nullcontext()
    try:
        from vllm.device_allocator import get_mem_allocator_instance
        from vllm.platforms import current_platform

        if not current_platform.is_cuda_alike():
            return nullcontext()
        return get_mem_allocator_instance().use_memory_pool(tag="runtime")  # type: ignore[no-any-return]
    except Exception as e:  # an allocator without tags: the default pool
        logger.warning("vllm-safeguard: no 'runtime' memory pool (%s); safety tensors use the default", e)
        return nullcontext()


def _refuse_unsupported(vllm_config: Any) -> None:
    """Modes the alpha path does not support are refused at startup, naming the flag."""
    lora_cfg = vllm_config.lora_config
    if getattr(lora_cfg, "fully_sharded_loras", False):
        raise SafetyPathError(
            "--fully-sharded-loras is not supported with alpha_enabled (those layers never call "
            "add_lora_linear); serve without it"
        )
    pp = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise SafetyPathError(
            f"--pipeline-parallel-size {pp} is not supported with alpha_enabled; use tensor parallelism"
        )


def _language_wrapper(adapter_manager: Any, wrappers: list[SafetyState]) -> SafetyState:
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

    w = adapter_manager.punica_wrapper_mapping.get(DEFAULT_LANGUAGE_WRAPPER_KEY)
    return w if isinstance(w, SafetyState) else wrappers[0]


def setup_runner(runner: Any, vllm_config: Any) -> TokenAlphaFiller | None:
    """Bind the safety weights to the runner's LoRA layers (after ``load_lora_model``).

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
        _refuse_unsupported(vllm_config)
        adapter_manager = manager._adapter_manager  # type: ignore[union-attr]
        wrappers = [w for w in adapter_manager.punica_wrapper_mapping.values() if isinstance(w, SafetyState)]
        if not wrappers:
            raise SafetyPathError(
                "the platform's punica wrapper was not replaced (unsupported platform "
                f"{type(next(iter(adapter_manager.punica_wrapper_mapping.values()), None)).__name__})"
            )
        model_cfg = vllm_config.model_config
        model_name = getattr(state, "model_name", None) or str(model_cfg.model)
        folder = model_dir(str(model_cfg.model))
        safety = locate(SAFETY_ADAPTER, config, model_name, folder, needed_by="alpha_enabled").value
        pool = _runtime_pool(vllm_config)
        layers = build_layer_safety(
            linear_lora_layers(adapter_manager), dict(adapter_manager.packed_modules_mapping), safety, pool
        )
        # Each layer stays with the wrapper vLLM gave it (the language model's, or a multimodal
        # tower's); per-token alpha is the language model's, so towers' wrappers keep alpha 0.
        by_wrapper: dict[int, tuple[SafetyState, list[tuple[str, Any, Any]]]] = {}
        for entry in layers:
            w = entry[1].punica_wrapper
            if isinstance(w, SafetyState):
                by_wrapper.setdefault(id(w), (w, []))[1].append(entry)
        for w, group in by_wrapper.values():
            w.bind_layers(group)
        language = _language_wrapper(adapter_manager, wrappers)
        filler = TokenAlphaFiller([language], AlphaPolicy.from_config(config))
        setattr(runner, FILLER_ATTR, filler)
        if hasattr(runner, "lora_state"):  # V2 runner: make_lora_inputs finds the filler there
            runner.lora_state._safeguard_runner = runner
            setattr(runner.lora_state, FILLER_ATTR, filler)
        if config.guard_path is not None:
            filler.guard = start_guard(
                runner.get_model(),
                config.guard_path,
                folder,
                filler.table,
                language.safeguard_alpha,
                int(vllm_config.scheduler_config.max_num_seqs),
                model_name,
                _runtime_pool(vllm_config),
            )
        covered = sum(1 for _, _, s in layers if s is not None)
        logger.info(
            "vllm-safeguard: per-request safety alpha active on %d of %d LoRA layers (default %s, base "
            "requests %g, range [%g, %g])",
            covered,
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
