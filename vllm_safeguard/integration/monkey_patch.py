"""Every vLLM monkeypatch of vllm-safeguard, in one module (the mechanism is ``patching.py``).

Importing this module registers the patches; :func:`install` applies them (each right after vLLM
imports its module). Each wrapper is thin: it calls the original and hands over to the module that
does the work, imported lazily so that ``register()`` stays cheap in processes that never load LoRA.

=========================================  ==============================================================
patch                                      hands over to
=========================================  ==============================================================
WorkerLoRAManager.__init__                 worker_hook.attach_worker (config, reference, pipeline)
WorkerLoRAManager._load_adapter            worker_hook.load_adapter_hook (admit, then vLLM reads the copy)
WorkerLoRAManager.set_active_adapters      marks loads inside the engine step (they must not raise)
OpenAIServingModels.load_lora_adapter      api_server (early path refusal; refusal 500 -> 400/503)
AsyncLLM.add_lora                          front_admission (admit in the API server, hand over the entry)
OpenAIServingModels.resolve_lora           front_admission (a resolver load keeps our refusal text)
LRUCacheLoRAModelManager.remove_oldest...  metrics (evictions from a worker's CPU LoRA cache)
InputProcessor.__init__                    alpha.set_frontend_additional_config (the validator's config)
InputProcessor._validate_lora              api_server.request_adapter_problem (400 for a lost adapter)
model_manager.get_punica_wrapper           punica_wrapper.selector (the safety wrapper, alpha enabled)
LoRAModelRunnerMixin.load_lora_model       worker_hook.publish_served_context; alpha_runner.setup_runner
LoRAModelRunnerMixin.set_active_loras      alpha_runner.stage_v1 (V1: per-token alpha, guard plan)
LoRAModelRunnerMixin._set_active_loras     alpha_runner.apply_step (both runners, dummy/capture runs)
LoraState.make_lora_inputs (V2)            alpha_runner.stage_v2 (V2: per-token alpha, guard plan)
GPUModelRunner.add_requests (V2)           alpha_runner.on_new_requests (sampling params by request)
GPUModelRunner._remove_request (V2)        alpha_runner.on_removed_request
GPUModelRunner.execute_model (V1, V2)      alpha_runner.after_step (guard scores -> alpha table)
=========================================  ==============================================================
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from .patching import Patch, install_patches, register_patch

logger = logging.getLogger("vllm_safeguard")

# ------------------------------------------------------------------------------ adapter admission


def _wrap_worker_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        from .worker_hook import attach_worker

        attach_worker(self, vllm_config)

    return __init__


# Set while vLLM runs WorkerLoRAManager.set_active_adapters (inside execute_model): a load raised
# there kills the EngineCore, so the load hook must not raise while it is set.
_IN_STEP = threading.local()


def in_engine_step() -> bool:
    return bool(getattr(_IN_STEP, "depth", 0))


def _wrap_load_adapter(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _load_adapter(self: Any, lora_request: Any) -> Any:
        from .worker_hook import load_adapter_hook

        return load_adapter_hook(self, lora_request, original, in_step=in_engine_step())

    return _load_adapter


def _wrap_set_active_adapters(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_active_adapters(self: Any, requests: Any, mapping: Any) -> Any:
        _IN_STEP.depth = getattr(_IN_STEP, "depth", 0) + 1
        try:
            return original(self, requests, mapping)
        finally:
            _IN_STEP.depth -= 1

    return set_active_adapters


def _wrap_serving_load(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def load_lora_adapter(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        from .api_server import early_path_refusal, refusal_as_400

        early = early_path_refusal(self, request, original)
        if early is not None:
            return early
        return refusal_as_400(await original(self, request, *args, **kwargs))

    return load_lora_adapter


def _wrap_add_lora(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def add_lora(self: Any, lora_request: Any) -> Any:
        from .front_admission import admit_then_add

        return await admit_then_add(self, lora_request, original)

    return add_lora


def _wrap_resolve_lora(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def resolve_lora(self: Any, lora_name: str) -> Any:
        from .front_admission import resolve_then_restore

        return await resolve_then_restore(self, lora_name, original)

    return resolve_lora


def _wrap_remove_oldest_adapter(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def remove_oldest_adapter(self: Any) -> Any:
        removed = original(self)
        if removed:
            from .worker_hook import count_eviction

            count_eviction(self)
        return removed

    return remove_oldest_adapter


def _wrap_input_processor_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        from ..alpha import set_frontend_additional_config
        from .worker_state import model_dir, served_model_name

        # The alpha validator has no vllm_config; give it --additional-config and the served model
        # (its artifacts decide whether alpha / "auto" are on), in the front-end process.
        model = None
        try:
            model = (served_model_name(vllm_config), model_dir(str(vllm_config.model_config.model)))
        except Exception as e:  # the validator then sees the config alone; the worker still decides
            logger.warning("vllm-safeguard: served model unknown to the alpha validator: %s", e)
        set_frontend_additional_config(getattr(vllm_config, "additional_config", None), model)
        original(self, vllm_config, *args, **kwargs)

    return __init__


def _wrap_validate_lora(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _validate_lora(self: Any, lora_request: Any) -> None:
        original(self, lora_request)
        if lora_request is None:
            return
        from .api_server import request_adapter_problem

        problem = request_adapter_problem(self, lora_request)
        if problem is not None:
            from vllm.exceptions import VLLMValidationError

            logger.error("vllm-safeguard: request refused: %s", problem)
            raise VLLMValidationError(f"vllm-safeguard: {problem}")

    return _validate_lora


register_patch(
    Patch(
        name="worker_lora_init",
        module="vllm.lora.worker_manager",
        owner="WorkerLoRAManager",
        attr="__init__",
        make=_wrap_worker_init,
        parameters=("self", "vllm_config", "device", "embedding_modules"),
        is_async=False,
        inherited_by=("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager",),
        description="build the worker's safeguard pipeline (config, reference) next to the LoRA manager",
    )
)
register_patch(
    Patch(
        name="worker_lora_set_active_adapters",
        module="vllm.lora.worker_manager",
        owner="WorkerLoRAManager",
        attr="set_active_adapters",
        make=_wrap_set_active_adapters,
        parameters=("self", "requests", "mapping"),
        is_async=False,
        inherited_by=("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager",),
        description="mark loads inside the engine step (they must never raise: that kills the EngineCore)",
    )
)
register_patch(
    Patch(
        name="worker_lora_load_adapter",
        module="vllm.lora.worker_manager",
        owner="WorkerLoRAManager",
        attr="_load_adapter",
        make=_wrap_load_adapter,
        parameters=("self", "lora_request"),
        is_async=False,
        inherited_by=("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager",),
        description="validate -> score -> repair every adapter before vLLM reads it (static, runtime, resolver)",
    )
)
register_patch(
    Patch(
        name="serving_models_load_lora_adapter",
        module="vllm.entrypoints.openai.models.serving",
        owner="OpenAIServingModels",
        attr="load_lora_adapter",
        make=_wrap_serving_load,
        parameters=("self", "request", "base_model_name"),
        is_async=True,
        description="turn a safeguard refusal (a 500 from add_lora) into a 400 with our message",
    )
)
register_patch(
    Patch(
        name="async_llm_add_lora",
        module="vllm.v1.engine.async_llm",
        owner="AsyncLLM",
        attr="add_lora",
        make=_wrap_add_lora,
        parameters=("self", "lora_request"),
        is_async=True,
        description="admit every adapter in the API server before the engine sees it; hand over the entry",
    )
)
register_patch(
    Patch(
        name="serving_models_resolve_lora",
        module="vllm.entrypoints.openai.models.serving",
        owner="OpenAIServingModels",
        attr="resolve_lora",
        make=_wrap_resolve_lora,
        parameters=("self", "lora_name"),
        is_async=True,
        description="a resolver load refused by the admission keeps our message (vLLM's is generic)",
    )
)
register_patch(
    Patch(
        name="lru_lora_remove_oldest_adapter",
        module="vllm.lora.model_manager",
        owner="LRUCacheLoRAModelManager",
        attr="remove_oldest_adapter",
        make=_wrap_remove_oldest_adapter,
        parameters=("self",),
        is_async=False,
        description="count evictions from the worker's CPU LoRA cache (reloads read the admitted copy)",
    )
)


# ------------------------------------------------------------------------- per-request safety alpha


def _wrap_get_punica_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_punica_wrapper(*args: Any, **kwargs: Any) -> Any:
        from .punica_wrapper.selector import make_safety_wrapper, safety_wrapper_wanted

        # Only when this worker's config enables the alpha path (set by attach_worker just before).
        if not safety_wrapper_wanted():
            return original(*args, **kwargs)
        return make_safety_wrapper(original, *args, **kwargs)

    return get_punica_wrapper


def _wrap_load_lora_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_lora_model(self: Any, model: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, model, vllm_config, *args, **kwargs)
        from .punica_wrapper.selector import safety_wrapper_wanted
        from .worker_hook import publish_served_context

        publish_served_context(self, vllm_config)

        if safety_wrapper_wanted():
            from .alpha_runner import setup_runner

            setup_runner(self, vllm_config)
        return out

    return load_lora_model


def _wrap_set_active_loras(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_active_loras(
        self: Any, input_batch: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any
    ) -> Any:
        from .alpha_runner import stage_v1

        stage_v1(self, input_batch, num_scheduled_tokens)  # before: the body calls _set_active_loras
        return original(self, input_batch, num_scheduled_tokens, *args, **kwargs)

    return set_active_loras


def _wrap__set_active_loras(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _set_active_loras(
        self: Any, prompt_lora_mapping: Any, token_lora_mapping: Any, *args: Any, **kwargs: Any
    ) -> Any:
        out = original(self, prompt_lora_mapping, token_lora_mapping, *args, **kwargs)
        from .alpha_runner import apply_step

        mapping_type = kwargs.get("mapping_type", args[1] if len(args) > 1 else None)
        apply_step(self, token_lora_mapping, mapping_type)
        return out

    return _set_active_loras


def _wrap_make_lora_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def make_lora_inputs(self: Any, req_ids: Any, idx_mapping: Any, num_scheduled_tokens: Any) -> Any:
        out = original(self, req_ids, idx_mapping, num_scheduled_tokens)
        from .alpha_runner import stage_v2

        stage_v2(self, req_ids, idx_mapping, num_scheduled_tokens)
        return out

    return make_lora_inputs


def _wrap_add_requests(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_requests(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, scheduler_output, *args, **kwargs)
        from .alpha_runner import on_new_requests

        on_new_requests(self, scheduler_output)
        return out

    return add_requests


def _wrap_remove_request(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _remove_request(self: Any, req_id: str, *args: Any, **kwargs: Any) -> Any:
        out = original(self, req_id, *args, **kwargs)
        from .alpha_runner import on_removed_request

        on_removed_request(self, req_id)
        return out

    return _remove_request


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        from .alpha_runner import after_step

        after_step(self)
        return out

    return execute_model


# Runners that must inherit the mixin's LoRA methods unchanged: V1 (GPU, CPU) and V2 (GPU, CPU; the
# default on GPU in vLLM 0.33). Not in ``inherited_by``: the patches are applied while these modules are
# still importing the mixin (a circular, partial import), so the contract test checks them instead
# (tests/plugin/test_patch_contract.py). V2 runners call only _set_active_loras; V1 runners call it
# through set_active_loras.
V1_RUNNERS = (
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
)
V2_RUNNERS = (
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner",
    "vllm.v1.worker.cpu.model_runner:CPUModelRunner",
)
RUNNERS_USING_LORA_MIXIN = V1_RUNNERS + V2_RUNNERS

register_patch(
    Patch(
        name="model_manager_get_punica_wrapper",
        module="vllm.lora.model_manager",
        owner="",
        attr="get_punica_wrapper",
        make=_wrap_get_punica_wrapper,
        parameters=("args", "kwargs"),
        is_async=False,
        description="use the safety punica wrapper (task LoRA + alpha * safety delta) when alpha is enabled",
    )
)
register_patch(
    Patch(
        name="runner_load_lora_model",
        module="vllm.v1.worker.lora_model_runner_mixin",
        owner="LoRAModelRunnerMixin",
        attr="load_lora_model",
        make=_wrap_load_lora_model,
        parameters=("self", "model", "vllm_config", "device"),
        is_async=False,
        description="attach the safety adapter's weights to the LoRA layers (coverage-checked) after vLLM wraps them",
    )
)
register_patch(
    Patch(
        name="runner_set_active_loras",
        module="vllm.v1.worker.lora_model_runner_mixin",
        owner="LoRAModelRunnerMixin",
        attr="set_active_loras",
        make=_wrap_set_active_loras,
        parameters=("self", "input_batch", "num_scheduled_tokens", "num_sampled_tokens", "mapping_type"),
        is_async=False,
        description="V1 runners: stage this step's per-token alpha and guard plan from the batch's requests",
    )
)
register_patch(
    Patch(
        name="runner__set_active_loras",
        module="vllm.v1.worker.lora_model_runner_mixin",
        owner="LoRAModelRunnerMixin",
        attr="_set_active_loras",
        make=_wrap__set_active_loras,
        parameters=("self", "prompt_lora_mapping", "token_lora_mapping", "lora_requests", "mapping_type"),
        is_async=False,
        description="both runners, dummy and capture runs: write the staged alpha (or 0) into the buffers in place",
    )
)
register_patch(
    Patch(
        name="v2_lora_state_make_lora_inputs",
        module="vllm.v1.worker.gpu.lora_utils",
        owner="LoraState",
        attr="make_lora_inputs",
        make=_wrap_make_lora_inputs,
        parameters=("self", "req_ids", "idx_mapping", "num_scheduled_tokens"),
        is_async=False,
        description="V2 runner: stage this step's per-token alpha and guard plan",
    )
)
register_patch(
    Patch(
        name="v2_runner_add_requests",
        module="vllm.v1.worker.gpu.model_runner",
        owner="GPUModelRunner",
        attr="add_requests",
        make=_wrap_add_requests,
        parameters=("self", "scheduler_output"),
        is_async=False,
        description="V2 runner: remember each new request's sampling params (safeguard_alpha) and adapter",
    )
)
register_patch(
    Patch(
        name="v2_runner_remove_request",
        module="vllm.v1.worker.gpu.model_runner",
        owner="GPUModelRunner",
        attr="_remove_request",
        make=_wrap_remove_request,
        parameters=("self", "req_id"),
        is_async=False,
        description="V2 runner: forget a finished request",
    )
)
register_patch(
    Patch(
        name="v1_runner_execute_model",
        module="vllm.v1.worker.gpu_model_runner",
        owner="GPUModelRunner",
        attr="execute_model",
        make=_wrap_execute_model,
        parameters=("self", "scheduler_output"),
        is_async=False,
        description="after the step: the guard's in-graph scores to the alpha table, metrics and records",
    )
)
register_patch(
    Patch(
        name="v2_runner_execute_model",
        module="vllm.v1.worker.gpu.model_runner",
        owner="GPUModelRunner",
        attr="execute_model",
        make=_wrap_execute_model,
        parameters=("self", "scheduler_output"),
        is_async=False,
        description="after the step: the guard's in-graph scores to the alpha table, metrics and records",
    )
)
register_patch(
    Patch(
        name="input_processor_init",
        module="vllm.v1.engine.input_processor",
        owner="InputProcessor",
        attr="__init__",
        make=_wrap_input_processor_init,
        parameters=("self", "vllm_config"),
        is_async=False,
        description="let the safeguard_alpha validator see --additional-config in the front-end process",
    )
)
register_patch(
    Patch(
        name="input_processor_validate_lora",
        module="vllm.v1.engine.input_processor",
        owner="InputProcessor",
        attr="_validate_lora",
        make=_wrap_validate_lora,
        parameters=("self", "lora_request"),
        is_async=False,
        description="refuse (400) a request whose adapter's admitted copy is gone, before the engine step",
    )
)


def install() -> list[str]:
    """Apply every patch above in this process (now if its module is imported, else right after vLLM
    imports it); idempotent. Returns the names applied immediately."""
    return install_patches()
