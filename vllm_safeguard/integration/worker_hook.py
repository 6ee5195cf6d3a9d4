"""The worker side of admission: what the vLLM patches call inside each ``WorkerLoRAManager``.

* :func:`attach_worker` (after ``WorkerLoRAManager.__init__``): resolve the config (vLLM's
  ``--additional-config`` is only known here), load the reference once per process, build the
  :class:`~vllm_safeguard.admission.pipeline.SafeguardPipeline`. Never raises: a broken setup refuses adapters.
* :func:`load_adapter_hook` (instead of ``WorkerLoRAManager._load_adapter``): admit the adapter, then
  let vLLM's own loader read the *canonical copy* the plugin wrote (a copy of the ``LoRARequest`` whose
  ``lora_path`` points into the private cache). vLLM never reads the untrusted folder itself, and an
  eviction reload reads the admitted copy bound at the first load, never the source folder again.

Refusals raise :class:`~vllm_safeguard.errors.AdapterRefused` (outside an engine step), whose text is
delimited so that the API-server patch can turn vLLM's 500 into a 400 carrying it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..admission.bindings import binding_lock, publish_binding, read_binding
from ..admission.paths import resolve_adapter_path, warn_if_unrestricted
from ..admission.pipeline import LoadOutcome, PipelineContext, SafeguardPipeline, summarize
from ..config import SafeguardConfig, load_config, log_effective
from ..core.adapter_io import WEIGHTS_NAME
from ..errors import AdapterRefused, AdapterValidationError, refusal_kind
from ..protection import log_protection, resolve_protection
from .worker_state import STATE_ATTR, Binding, WorkerState, model_dir, served_model_name

logger = logging.getLogger("vllm_safeguard")


def attach_worker(manager: Any, vllm_config: Any) -> WorkerState:
    """Build the worker's pipeline. Never raises: a broken setup refuses adapters instead."""
    from ..metrics import get_metrics

    model_cfg = vllm_config.model_config
    model_name = served_model_name(vllm_config)
    state = WorkerState(model_name=model_name, instance=str(getattr(vllm_config, "instance_id", "") or ""))
    setattr(manager, STATE_ATTR, state)
    method = "unknown"
    try:
        config = load_config(getattr(vllm_config, "additional_config", None) or {})
        # Artifact-dependent defaults (alpha on when a safety adapter exists, the guard by model).
        config, protection = resolve_protection(config, model_name, model_dir(str(model_cfg.model)))
        state.config = config
        method = config.method
        log_effective(config, context=f"model {model_name}")
        log_protection(protection, model_name)
        with _suppress_metric_errors():
            for layer, on in protection.layers.items():
                get_metrics().protection.labels(model_name=model_name, layer=layer).set(1 if on else 0)
        warn_if_unrestricted(config.adapter_roots)
        if config.enabled and config.alpha_enabled:
            # The punica-wrapper patch (create_lora_manager runs right after this) reads this flag.
            from .punica_wrapper.selector import request_safety_wrapper

            request_safety_wrapper()
        if config.enabled:
            lora_cfg = vllm_config.lora_config
            lora_dtype = getattr(lora_cfg, "lora_dtype", None)
            ctx = PipelineContext(
                model_name=model_name,
                model_dir=model_dir(str(model_cfg.model)),
                max_lora_rank=getattr(lora_cfg, "max_lora_rank", None),
                served_dtype=lora_dtype
                if isinstance(lora_dtype, torch.dtype)
                else getattr(model_cfg, "dtype", None),
            )
            state.pipeline = SafeguardPipeline.create(config, ctx)
            logger.info("vllm-safeguard: active for model %s (method %s)", model_name, config.method)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        logger.error(
            "vllm-safeguard: cannot protect model %s; every adapter will be refused: %s", model_name, e
        )
    with _suppress_metric_errors():
        get_metrics().worker_active.labels(model_name=model_name, method=method).set(
            1 if state.pipeline is not None else 0
        )
    return state


class _suppress_metric_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is not None:
            logger.warning("vllm-safeguard: metrics error ignored: %s", exc)
        return True


def _short_path(path: object, limit: int = 200) -> str:
    text = repr(path)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def publish_served_context(runner: Any, vllm_config: Any) -> None:
    """After vLLM built the LoRA model manager: fix the module kinds it applies LoRA to in the
    pipeline's context and publish that context for the API server's admission
    (vllm_safeguard.admission.served_context). Never raises: without it the worker admits itself."""
    manager = getattr(runner, "lora_manager", None)
    state: WorkerState | None = getattr(manager, STATE_ATTR, None)
    if state is None or state.pipeline is None:
        return
    try:
        from ..admission.served_context import admission_fingerprint, publish_context

        pipeline = state.pipeline
        pipeline.ctx.expected_modules = expected_modules(manager)
        am = getattr(manager, "_adapter_manager", None)
        if am is not None:
            am._safeguard_model_name = state.model_name  # the evictions counter's label
        fingerprint = admission_fingerprint(pipeline)
        publish_context(pipeline.config.cache_dir, state.instance, pipeline.ctx, fingerprint)
        if pipeline._base_shapes is not None and pipeline.reference is not None:
            from ..admission.canonical import write_zero_adapter
            from ..core.adapter import module_kind

            kinds = pipeline.ctx.expected_modules
            candidates = {n for n in pipeline.reference.modules if kinds is None or module_kind(n) in kinds}
            folder = pipeline.config.cache_dir / "served" / f"zero-{fingerprint[:16]}"
            state.zero_adapter = write_zero_adapter(pipeline._base_shapes, candidates, folder)
    except Exception as e:
        logger.warning(
            "vllm-safeguard: served context not published (%s); adapters will be admitted in the worker", e
        )


def count_eviction(adapter_manager: Any) -> None:
    from ..metrics import get_metrics

    with _suppress_metric_errors():
        name = str(getattr(adapter_manager, "_safeguard_model_name", "unknown"))
        get_metrics().evictions.labels(model_name=name).inc()


def adapter_folder(config: SafeguardConfig, lora_path: str) -> str:
    """The folder to inspect for a request's ``lora_path`` (vllm_safeguard.admission.paths).

    With ``adapter_roots`` configured: contained in a root, or :class:`AdapterValidationError`. Without:
    resolved the way vLLM resolves it (absolute, ``~``, working directory, hub id).
    """
    contained = resolve_adapter_path(lora_path, config.adapter_roots)
    if contained is not None:
        return contained
    from vllm.lora.utils import get_adapter_absolute_path

    return str(get_adapter_absolute_path(lora_path))


def expected_modules(manager: Any) -> set[str] | None:
    """The module kinds vLLM's loader accepts for this model (what ``_load_adapter`` computes)."""
    am = getattr(manager, "_adapter_manager", None)
    if am is None:
        return None
    packed = getattr(am, "packed_modules_mapping", {}) or {}
    out: set[str] = set()
    for module in getattr(am, "supported_lora_modules", ()):
        out.update(packed.get(module, [module]))
        if module == "experts":
            out.add(module)
    return out or None


def _resolve_bound(pipeline: SafeguardPipeline, binding: Binding) -> Path | None:
    """The bound canonical folder if it is still intact (cache entries are re-verified), else None."""
    if binding.private:
        return binding.path if (binding.path / WEIGHTS_NAME).is_file() else None
    assert pipeline.cache is not None
    entry = pipeline.cache.get(binding.key)
    return None if entry is None else entry.path


def _empty_lora(
    state: WorkerState | None, manager: Any, lora_request: Any, original: Callable[[Any, Any], Any]
) -> Any:
    """A zero update: what a request gets when its admitted copy cannot be had inside an engine step
    (the engine must not die for one adapter); the base (aligned) model serves it. vLLM reads the
    worker's zero adapter (admission.canonical.write_zero_adapter); a LoRAModel without modules is the
    last resort (vLLM 0.32 cannot add one when the model packs modules)."""
    import msgspec

    zero = state.zero_adapter if state is not None else None
    if zero is not None:
        try:
            return original(manager, msgspec.structs.replace(lora_request, lora_path=str(zero)))
        except Exception as e:
            logger.error("vllm-safeguard: the zero adapter could not be loaded: %s", e)
    from vllm.lora.lora_model import LoRAModel

    return LoRAModel(lora_request.lora_int_id, 1, {})


def load_adapter_hook(
    manager: Any, lora_request: Any, original: Callable[[Any, Any], Any], *, in_step: bool = False
) -> Any:
    """The body of the patched ``WorkerLoRAManager._load_adapter``.

    ``in_step``: vLLM called it inside ``execute_model`` (an adapter of a scheduled request was not in
    its CPU cache). A refusal raised there kills the EngineCore, so in a step nothing raises: a bound
    adapter is served from its admitted canonical copy; when that copy is gone, or the adapter was
    never admitted and is refused now, the requests get the base model (an empty adapter), the error is
    logged and counted (``safeguard_step_failures_total``).
    """
    try:
        return _load_adapter_checked(manager, lora_request, original, in_step)
    except Exception as e:
        if not in_step:
            raise
        from ..metrics import get_metrics

        state: WorkerState | None = getattr(manager, STATE_ATTR, None)
        model_name = state.model_name if state is not None else "unknown"
        logger.error(
            "vllm-safeguard: adapter %r could not be loaded inside an engine step; its requests are served "
            "by the base model without it (the engine keeps running): %s",
            str(lora_request.lora_name),
            e,
        )
        with _suppress_metric_errors():
            get_metrics().step_failures.labels(model_name=model_name).inc()
        return _empty_lora(state, manager, lora_request, original)


def _load_bound(
    manager: Any,
    lora_request: Any,
    original: Callable[[Any, Any], Any],
    pipeline: SafeguardPipeline,
    binding: Binding,
    refuse: Callable[..., AdapterRefused],
    m: Any,
    model_name: str,
) -> Any:
    import msgspec

    bound = _resolve_bound(pipeline, binding)
    if bound is None:
        raise refuse(
            f"its admitted canonical copy is gone or corrupt (cache entry {binding.key[:12]}); unload and "
            "load the adapter again"
        )
    with _suppress_metric_errors():
        m.reloads.labels(model_name=model_name).inc()
    return original(manager, msgspec.structs.replace(lora_request, lora_path=str(bound)))


def _admit(
    manager: Any,
    lora_request: Any,
    original: Callable[[Any, Any], Any],
    pipeline: SafeguardPipeline,
    refuse: Callable[..., AdapterRefused],
    m: Any,
    model_name: str,
    method: str,
) -> tuple[LoadOutcome | None, Any]:
    """Admit the request's folder and let vLLM load the canonical copy: ``(outcome, LoRAModel)``;
    ``(None, LoRAModel)`` when fail_closed=false served it unrepaired."""
    import msgspec
    from vllm.exceptions import LoRAAdapterNotFoundError

    name = str(lora_request.lora_name)
    try:  # admitted before the engine (vllm_safeguard.admission.frontend): verify, never re-admit
        handed = pipeline.handed_over(lora_request.lora_path)
    except AdapterValidationError as e:
        raise refuse(str(e), "invalid") from e
    if handed is not None:
        return handed, _load_outcome(manager, lora_request, original, handed, refuse)
    try:
        path = adapter_folder(pipeline.config, lora_request.lora_path)
    except AdapterValidationError as e:  # outside the adapter roots: always refused, even fail-open
        raise refuse(str(e), "invalid") from e
    except Exception as e:
        raise refuse(
            f"cannot resolve adapter path {_short_path(lora_request.lora_path)}: {e}", "invalid"
        ) from e
    if not os.path.isdir(path):
        # Same answer (404) vLLM gives; raised here so vLLM never opens the path itself.
        raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
    try:
        outcome = pipeline.process(path, name)
    except Exception as e:
        kind = refusal_kind(e)
        # fail_closed=false serves an adapter whose *processing* failed before any decision; a decision
        # (invalid, uncovered, unrepairable; a failed repair is unrepairable) is never overridden.
        if pipeline.config.fail_closed or kind != "error":
            raise refuse(str(e), kind) from e
        logger.error(
            "vllm-safeguard: adapter %r NOT repaired (fail_closed=false), serving it as is: %s", name, e
        )
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome="unrepaired", method=method).inc()
        # The contained folder, not the request's string (which vLLM would resolve on its own terms).
        return None, original(manager, msgspec.structs.replace(lora_request, lora_path=path))
    return outcome, _load_outcome(manager, lora_request, original, outcome, refuse)


def _load_outcome(
    manager: Any,
    lora_request: Any,
    original: Callable[[Any, Any], Any],
    outcome: LoadOutcome,
    refuse: Callable[..., AdapterRefused],
) -> Any:
    """vLLM's loader on the admitted folder; every module must arrive."""
    import msgspec
    from vllm.exceptions import LoRAAdapterNotFoundError

    try:
        try:
            lora = original(manager, msgspec.structs.replace(lora_request, lora_path=str(outcome.path)))
        except LoRAAdapterNotFoundError as e:
            raise refuse(f"the repaired adapter folder vanished: {e}") from e
        except Exception as e:
            raise refuse(f"vLLM could not load the admitted adapter: {e}") from e
        loaded = len(getattr(lora, "loras", {}))
        if loaded != outcome.modules:
            # vLLM skips modules it does not expect; an adapter repaired on paper but not in the engine
            # must not be served.
            raise refuse(f"vLLM loaded {loaded} of the {outcome.modules} repaired modules")
    except AdapterRefused:
        if outcome.cleanup is not None:
            outcome.cleanup()
        raise
    return lora


def _load_adapter_checked(
    manager: Any, lora_request: Any, original: Callable[[Any, Any], Any], in_step: bool = False
) -> Any:
    from ..metrics import get_metrics, record_repair

    state: WorkerState | None = getattr(manager, STATE_ATTR, None)
    name = str(lora_request.lora_name)
    if state is not None and state.config is not None and not state.config.enabled:
        return original(manager, lora_request)
    model_name = state.model_name if state is not None else "unknown"
    method = state.config.method if state is not None and state.config is not None else "unknown"
    m = get_metrics()

    def refuse(reason: str, kind: str = "error") -> AdapterRefused:
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome=f"refused_{kind}", method=method).inc()
        logger.error("vllm-safeguard: adapter %r refused (%s): %s", name, kind, reason)
        return AdapterRefused(name, reason, kind)

    if state is None or state.pipeline is None:
        raise refuse(
            state.error if state is not None and state.error else "safeguard pipeline is not initialised"
        )
    pipeline = state.pipeline
    if pipeline.ctx.expected_modules is None:
        pipeline.ctx.expected_modules = expected_modules(manager)
    bind_key = (name, int(getattr(lora_request, "lora_int_id", 0) or 0))
    if getattr(lora_request, "load_inplace", False) and not in_step:
        state.bindings.pop(bind_key, None)  # an in-place reload asks for the folder's new bytes
    binding = state.bindings.get(bind_key)
    if binding is not None:
        # An eviction reload: the admitted bytes, never the source folder again.
        return _load_bound(manager, lora_request, original, pipeline, binding, refuse, m, model_name)
    cache_dir = pipeline.config.cache_dir
    # One admission per (engine instance, name, int id) across this engine's workers (tensor
    # parallel): the first publishes its binding, the others load the same admitted entry.
    with binding_lock(cache_dir, model_name, name):
        shared = None
        if not getattr(lora_request, "load_inplace", False) and pipeline.config.cache_enabled:
            shared = read_binding(cache_dir, model_name, name, bind_key[1], state.instance)
        if shared is not None:
            binding = Binding(str(shared.get("key", "")), Path(str(shared["path"])))
            state.bindings[bind_key] = binding
            return _load_bound(manager, lora_request, original, pipeline, binding, refuse, m, model_name)
        outcome, lora = _admit(manager, lora_request, original, pipeline, refuse, m, model_name, method)
        if outcome is None:  # fail-open: served unrepaired, never bound
            return lora
        # Private folders (cache disabled) are kept for eviction reloads of this binding.
        state.bindings[bind_key] = Binding(outcome.key, outcome.path, private=outcome.cleanup is not None)
        try:  # for the API server's per-request check and the other workers (vllm_safeguard.admission.bindings)
            publish_binding(
                cache_dir,
                model_name,
                name,
                bind_key[1],
                outcome.path,
                key=outcome.key,
                instance=state.instance,
            )
        except OSError as e:
            logger.warning("vllm-safeguard: cannot publish the binding of adapter %r: %s", name, e)
    with _suppress_metric_errors():
        if pipeline.config.cache_enabled:
            m.cache_lookups.labels(model_name=model_name).inc()
        if outcome.cache_hit:
            m.cache_hits.labels(model_name=model_name).inc()
        m.loads.labels(model_name=model_name, outcome=outcome.decision, method=method).inc()
        m.risk_score.labels(model_name=model_name).observe(outcome.risk_score)
        if outcome.stripped:
            m.modules_stripped.labels(model_name=model_name).inc(len(outcome.stripped))
        m.repair_duration.labels(
            model_name=model_name, method=method, cache="hit" if outcome.cache_hit else "miss"
        ).observe(outcome.duration_s)
        for stage, seconds in outcome.times.items():  # inside the engine loop: ideally only "handover"
            m.admission_stage.labels(model_name=model_name, stage=stage, site="worker").observe(seconds)
        if not outcome.cache_hit:
            record_repair(model_name, method, outcome.report)
    if pipeline.config.log_reports:
        logger.info("%s", summarize(name, outcome, pipeline.config))
    return lora
